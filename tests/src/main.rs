//! The `punch-lab` command.

use anyhow::{bail, Context, Result};
use clap::Parser;
use punch_lab::lab::{self, matrix, nat, report, Impair};

mod cli;

use cli::{Cli, Cmd};

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUNCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let uses_lab = matches!(
        cli.cmd,
        Cmd::VerifyNat { .. }
            | Cmd::Matrix { .. }
            | Cmd::Failover { .. }
            | Cmd::Throughput { .. }
            | Cmd::TcpUpgrade { .. }
            | Cmd::BenchConnect { nat: Some(_), .. }
            | Cmd::Demo { nat: Some(_), .. }
    );
    if uses_lab {
        // Ctrl-C: remove this run's namespaces (and what runs in them),
        // then exit, so nothing is left behind.
        let _ = ctrlc::set_handler(|| {
            let mine = format!("{}{}-", lab::PREFIX, std::process::id());
            if let Ok(list) = lab::list_lab_namespaces() {
                for ns in list.into_iter().filter(|n| n.starts_with(&mine)) {
                    lab::remove_namespace(&ns);
                }
            }
            eprintln!("punch-lab: interrupted; lab removed");
            std::process::exit(130);
        });
    }
    match cli.cmd {
        Cmd::Demo { nat: None, .. } => runtime()?.block_on(punch_lab::demo::demo()),
        Cmd::Demo {
            nat: Some(pair),
            impair,
        } => {
            let types = nat::parse_sites(&pair).map_err(anyhow::Error::msg)?;
            let [a, b] = types[..] else {
                bail!("--nat takes exactly two different types, e.g. port-restricted,symmetric or symmetric+upnp,symmetric (got {pair:?})");
            };
            lab::demo::nat_demo(a, b, impair.impair()?)
        }
        Cmd::BenchConnect {
            count,
            nat: Some(pair),
            impair,
            iroh,
            json,
            ..
        } => {
            if !(1..=1000).contains(&count) {
                bail!("--count must be between 1 and 1000 in the lab");
            }
            let types = nat::parse_types(&pair).map_err(anyhow::Error::msg)?;
            let (a, b) = match types[..] {
                [a, b] => (a, b),
                [a] => (a, a),
                _ => bail!("--nat takes two types, A (connects) and B (serves), e.g. udp-blocked,full-cone (got {pair:?})"),
            };
            let r = lab::bench::bench(a, b, impair.impair()?, count, iroh.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let line = |name: &str, f: &lab::bench::Figures| {
                    let o =
                        |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
                    println!(
                        "{name:<6} {}/{} ok; start to first round trip: median {} ms, p95 {} ms; to exit: median {} ms, p95 {} ms; connect: median {} ms, p95 {} ms{}; paths {:?}{}",
                        f.ok,
                        f.runs,
                        o(f.total_median_ms),
                        o(f.total_p95_ms),
                        o(f.wall_median_ms),
                        o(f.wall_p95_ms),
                        o(f.connect_median_ms),
                        o(f.connect_p95_ms),
                        f.setup_median_ms
                            .map(|s| format!(" (after a {s:.0} ms setup)"))
                            .unwrap_or_default(),
                        f.paths,
                        if f.errors.is_empty() {
                            String::new()
                        } else {
                            format!("; errors {:?}", f.errors)
                        }
                    );
                };
                println!(
                    "{} -> {} ({} ms per site link), {} runs:",
                    r.a, r.b, r.impair.delay_ms, r.count
                );
                line("punch", &r.punch);
                if let Some(f) = &r.iroh {
                    line("iroh", f);
                }
            }
            if r.punch.ok < r.count {
                bail!(
                    "{} of {} punch connects failed",
                    r.count - r.punch.ok,
                    r.count
                );
            }
            Ok(())
        }
        Cmd::BenchConnect {
            count,
            ip,
            json,
            impair,
            ..
        } => {
            if !(1..=100_000).contains(&count) {
                bail!("--count must be between 1 and 100000");
            }
            if impair.impair()? != Impair::default() {
                bail!("--delay, --jitter and --loss need --nat (the lab)");
            }
            if ip != "127.0.0.1" && ip != "::1" {
                bail!("--ip must be 127.0.0.1 or ::1 (loopback only)");
            }
            let b = runtime()?.block_on(punch_lab::demo::bench_connect(count, &ip))?;
            if json {
                println!("{}", serde_json::to_string(&b)?);
            } else {
                println!(
                    "connect over loopback ({ip}), {} connects: median {:.2} ms, p95 {:.2} ms, min {:.2} ms, max {:.2} ms",
                    b.count, b.median_ms, b.p95_ms, b.min_ms, b.max_ms
                );
            }
            Ok(())
        }
        Cmd::VerifyNat { types, json } => {
            let types = nat::parse_types(&types).map_err(anyhow::Error::msg)?;
            let v = lab::verify::verify(&types)?;
            print!("{}", lab::verify::table(&v));
            if let Some(p) = json {
                std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
            }
            let bad = v.iter().filter(|x| !x.ok).count();
            if bad > 0 {
                bail!("{bad} NAT type(s) do not behave as named");
            }
            Ok(())
        }
        Cmd::Matrix {
            types,
            runs,
            impair,
            punch_timeout,
            no_same_nat,
            keep_mappings,
            json,
            svg,
            screenshots,
            strict,
            no_relay,
            relay_after,
            with,
        } => {
            let types = nat::parse_sites(&types).map_err(anyhow::Error::msg)?;
            let with = match with {
                Some(w) => {
                    let w = nat::parse_sites(&w).map_err(anyhow::Error::msg)?;
                    if let Some(missing) = w.iter().find(|t| !types.contains(t)) {
                        bail!("--with {missing} is not among --types");
                    }
                    w
                }
                None => Vec::new(),
            };
            if !(1..=1000).contains(&runs) {
                bail!("--runs must be between 1 and 1000");
            }
            if !(0.5..=60.0).contains(&punch_timeout) {
                bail!("--punch-timeout must be between 0.5 and 60 seconds");
            }
            let opts = matrix::MatrixOpts {
                types,
                with,
                runs,
                impair: impair.impair()?,
                punch_timeout,
                same_nat: !no_same_nat,
                keep_mappings,
                progress: true,
                screenshots,
                agent_args: no_relay
                    .then(|| "--no-relay".to_string())
                    .into_iter()
                    .chain(
                        relay_after
                            .iter()
                            .flat_map(|s| ["--relay-after".into(), s.to_string()]),
                    )
                    .collect(),
            };
            let results = matrix::run_matrix(&opts)?;
            print!("{}", report::table(&results));
            if let Some(p) = json {
                std::fs::write(
                    p,
                    serde_json::to_string_pretty(&serde_json::json!({
                        "runs": runs,
                        "impair": opts.impair,
                        "punch_timeout": punch_timeout,
                        "pairs": results,
                    }))?,
                )?;
            }
            if let Some(p) = svg {
                std::fs::write(p, report::svg(&results))?;
            }
            let worse: Vec<String> = results
                .iter()
                .filter(|r| {
                    matches!(
                        r.verdict,
                        "worse-than-theory" | "wrong-transport" | "direct-but-relayed"
                    )
                })
                .map(|r| format!("{} -> {}", r.a, r.b))
                .collect();
            if strict && !worse.is_empty() {
                bail!(
                    "{} pair(s) that theory says go direct did not, that connected from a UDP-less site but not over TCP, or whose direct runs the server relayed: {}",
                    worse.len(),
                    worse.join(", ")
                );
            }
            let unconnected: Vec<String> = results
                .iter()
                .filter(|r| r.connected < r.runs)
                .map(|r| format!("{} -> {}", r.a, r.b))
                .collect();
            if strict && !no_relay && !unconnected.is_empty() {
                bail!(
                    "{} pair(s) did not always connect: {}",
                    unconnected.len(),
                    unconnected.join(", ")
                );
            }
            Ok(())
        }
        Cmd::Failover {
            nat: pair,
            pings,
            impair,
            json,
        } => {
            let types = nat::parse_types(&pair).map_err(anyhow::Error::msg)?;
            let [a, b] = types[..] else {
                bail!(
                    "--nat takes exactly two types, e.g. cloudnat,port-restricted (got {pair:?})"
                );
            };
            if !(40..=10_000).contains(&pings) {
                bail!("--pings must be between 40 and 10000");
            }
            let r = lab::failover::failover(a, b, impair.impair()?, pings)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} -> {}: {} pings, all answered; paths {}; on the relay {:.0} ms after the flush, direct again after {:.0} ms; slowest round trip {:.0} ms",
                    r.a,
                    r.b,
                    r.pings,
                    lab::failover::compress(&r.paths).join(" → "),
                    r.to_relay_ms.unwrap_or_default(),
                    r.to_direct_ms.unwrap_or_default(),
                    r.max_rtt_ms
                );
            }
            Ok(())
        }
        Cmd::TcpUpgrade {
            b,
            interval,
            before,
            after,
            limit,
            impair,
            json,
        } => {
            let b = nat::parse_types(&b).map_err(anyhow::Error::msg)?;
            let [b] = b[..] else {
                bail!("--b takes one NAT type");
            };
            if !b.has_udp() {
                bail!("--b {b}: B needs UDP for a direct path");
            }
            if !(0.01..=1.0).contains(&interval) {
                bail!("--interval must be between 0.01 and 1 s");
            }
            if !(1..=10_000).contains(&before) || !(1..=10_000).contains(&after) {
                bail!("--before and --after must be between 1 and 10000");
            }
            if !(5..=600).contains(&limit) {
                bail!("--limit must be between 5 and 600 s");
            }
            let r = lab::upgrade::tcp_upgrade(&lab::upgrade::UpgradeOpts {
                b,
                impair: impair.impair()?,
                interval,
                before,
                after,
                limit: std::time::Duration::from_secs(limit),
            })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let ms = |v| fmt_ms(v, 0);
                println!(
                    "{} -> {}: {} echoes on one connection, all answered in order; paths {}; after the UDP block was lifted: signaling on UDP after {}, direct after {}; B accepted {} connection(s); slowest round trip {:.0} ms",
                    r.a,
                    r.b,
                    r.answered,
                    r.summary.join(" → "),
                    ms(r.to_udp_signaling_ms),
                    ms(r.to_direct_ms),
                    r.b_connections,
                    r.max_rtt_ms
                );
            }
            Ok(())
        }
        Cmd::Throughput {
            nat: pair,
            seconds,
            impair,
            json,
            get_mb,
            get_files,
        } => {
            let one = |t: &str| -> Result<nat::NatType> {
                let v = nat::parse_types(t).map_err(anyhow::Error::msg)?;
                v.first().copied().context("a NAT type")
            };
            let Some((a, b)) = pair.split_once(',') else {
                bail!("--nat takes two types, e.g. none,none (got {pair:?})");
            };
            let (a, b) = (one(a)?, one(b)?);
            if !(1..=60).contains(&seconds) {
                bail!("--seconds must be between 1 and 60");
            }
            let gets = lab::throughput::Gets {
                file_mb: get_mb,
                files: get_files,
            };
            let t = lab::throughput::throughput(a, b, impair.impair()?, seconds, gets)?;
            lab::throughput::print(&t, json)
        }
        Cmd::Load {
            agents,
            connects_per_sec,
            seconds,
            cluster,
            json,
        } => {
            let r = runtime()?.block_on(punch_lab::load::run(
                agents,
                connects_per_sec,
                seconds,
                cluster,
            ))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} of {} agents held (registered in {:.1} s, {:.0}/s); {} connects at {}/s: {} offers, {} errors, offer p50 {} p99 {}; server RSS {:.1} MiB ({:.0} bytes/agent over idle), CPU {:.0} % while connecting",
                    r.agents_held, r.agents_requested, r.registration_secs, r.registrations_per_sec,
                    r.connects_sent, connects_per_sec, r.offers_received, r.connect_errors,
                    r.offer_p50_ms.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into()),
                    r.offer_p99_ms.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into()),
                    r.server_rss_mib, r.server_bytes_per_agent, r.server_cpu_pct_while_connecting
                );
            }
            Ok(())
        }
        Cmd::ChaosRestart {
            agents,
            down_ms,
            deadline_secs,
            json,
        } => {
            let r = runtime()?.block_on(punch_lab::chaos::restart(
                agents,
                std::time::Duration::from_millis(down_ms),
                std::time::Duration::from_secs(deadline_secs),
            ))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let s =
                    |v: Option<f64>| v.map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into());
                println!(
                    "{} of {} agents registered again within {} s of the restart ({} lost; server down {} ms): p50 {} p99 {} last {}; the new server counts {} online",
                    r.registered_again, r.registered_before, r.deadline_secs, r.lost, r.down_ms,
                    s(r.again_p50_secs), s(r.again_p99_secs), s(r.again_max_secs), r.server_online_after
                );
            }
            if r.lost > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::ChaosFlood { connects, json } => {
            let r = punch_lab::flood::run_flood(connects)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let ms = |v| fmt_ms(v, 1);
                println!(
                    "{} of {} connects during the flood ({} direct): p50 {} p99 {} (without the flood p50 {}); {} forged datagrams in {:.1} s ({:.0}/s); the server refused {} relay frames, forwarded {} packets, answered {} STUN requests ({} dropped)",
                    r.connected, r.connects, r.direct, ms(r.connect_p50_ms), ms(r.connect_p99_ms),
                    ms(r.baseline_p50_ms), r.datagrams, r.flood_secs, r.datagrams_per_sec,
                    r.relay_refused, r.forwarded_packets, r.stun_requests, r.stun_dropped
                );
            }
            if r.connected < r.connects || r.forwarded_packets > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::ChaosSlow {
            clients,
            header_timeout_secs,
            json,
        } => {
            let r = runtime()?.block_on(punch_lab::slow_clients::run_slow(
                clients,
                header_timeout_secs,
            ))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let ms = |v| fmt_ms(v, 1);
                println!(
                    "{} slow clients ({} connected): the server closed {} (the last after {}), {} still open; server memory {:.1} MiB before, {:.1} held, {:.1} after; meanwhile /healthz {}/{} answered (p50 {} p99 {}), an agent over the TLS port {} in {:.0} ms; counters: {} HTTP and {} TLS-port head timeouts, {} TLS handshake failures, {} refused at a cap",
                    r.clients, r.connected, r.closed_by_server,
                    r.last_closed_secs.map(|v| format!("{v:.1} s")).unwrap_or_else(|| "-".into()),
                    r.still_open, r.rss_before_mib, r.rss_held_mib, r.rss_after_mib,
                    r.healthz_ok, r.healthz_asked, ms(r.healthz_p50_ms), ms(r.healthz_p99_ms),
                    if r.agent_over_tls_ok { "registered" } else { "FAILED" }, r.agent_over_tls_ms,
                    r.http_header_timeouts, r.tcp_header_timeouts, r.tls_failures, r.refused_full
                );
            }
            if r.still_open > 0
                || r.healthz_ok < r.healthz_asked
                || !r.agent_over_tls_ok
                || r.connected < r.clients
            {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::StunBench {
            target,
            seconds,
            sockets,
            window,
            echo,
            json,
        } => {
            let b = runtime()?.block_on(punch_lab::stunbench::run(
                target, seconds, sockets, window, echo,
            ))?;
            if json {
                println!("{}", serde_json::to_string(&b)?);
            } else {
                println!(
                    "{}: {:.0} answers/s valid ({} sent, {} answered, {} invalid, {} lost), p50 {:.0} µs, p99 {:.0} µs",
                    b.target, b.per_sec, b.sent, b.answered, b.invalid, b.lost, b.p50_us, b.p99_us
                );
            }
            Ok(())
        }
        Cmd::UdpEcho { listen } => punch_lab::stunbench::echo(listen),
        Cmd::Theory => {
            print!("{}", nat::theory_markdown());
            Ok(())
        }
        Cmd::Clean => {
            lab::preflight()?;
            let removed = lab::clean(false)?;
            println!("removed {} lab namespaces", removed.len());
            Ok(())
        }
        Cmd::Forwarder {
            a,
            b,
            delay_ms,
            jitter_ms,
        } => lab::delay::forward(&a, &b, delay_ms, jitter_ms),
        Cmd::Reflector { ips, seconds } => {
            lab::probe::reflector(&ips, std::time::Duration::from_secs(seconds.min(3600)))
        }
        Cmd::NatProbe => {
            let r = lab::probe::probe([lab::SERVER_IP, lab::SERVER_IP2])?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::LabEcho { udp, tcp } => lab::reach::echo(&udp, &tcp),
        Cmd::Reach {
            udp,
            tcp,
            proxy,
            timeout_ms,
        } => {
            if !(1..=60_000).contains(&timeout_ms) {
                bail!("--timeout-ms must be between 1 and 60000");
            }
            let t = std::time::Duration::from_millis(timeout_ms);
            let r = match (udp, tcp, proxy) {
                (Some(a), _, _) => lab::reach::udp(a, t),
                (None, Some(a), None) => lab::reach::tcp(a, t),
                (None, Some(a), Some(p)) => lab::reach::via_proxy(&p, a, t),
                (None, None, _) => bail!("--udp or --tcp"),
            };
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}

/// `v` milliseconds with `digits` decimals, or `-`.
fn fmt_ms(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$} ms"))
        .unwrap_or_else(|| "-".into())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
