//! End-to-end tests of the core: real punch-server and punch-agent
//! processes, real UDP and QUIC on loopback.

use punch_lab::harness::{run, ServerProc};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn two_agents_connect_by_id_directly() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    // worker-b classifies its NAT after registering and reports it: on
    // loopback there is none.
    let deadline = std::time::Instant::now() + T;
    let nat = loop {
        let peers: serde_json::Value =
            serde_json::from_str(&s.http_get("/peers").unwrap()).unwrap();
        let nat = peers[0]["nat"].clone();
        if !nat.is_null() {
            break nat;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker-b never reported its NAT class: {peers}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(nat["label"], "none", "{nat}");
    assert_eq!(nat["port_preserved"], true, "{nat}");

    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "worker-b", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    assert_eq!(j["target"], "worker-b");
    assert_eq!(j["path"], "direct");
    assert!(j["connect_ms"].as_f64().unwrap() > 0.0);
    assert!(j["rtt_ms"].as_f64().unwrap() > 0.0);
    let remote: std::net::SocketAddr = j["remote_addr"].as_str().unwrap().parse().unwrap();
    assert!(remote.ip().is_loopback());

    // ping: N round trips and a summary.
    let mut cmd = s.agent().unwrap();
    cmd.args(["ping", "worker-b", "-c", "3", "-i", "0.05", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    let rtts: Vec<f64> = j["rtts_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(rtts.len(), 3);
    // The summary is the summary of the round trips it lists.
    let close = |a: f64, b: f64| (a - b).abs() < 1e-3;
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().copied().fold(0.0, f64::max);
    assert!(close(j["min_ms"].as_f64().unwrap(), min), "{j}");
    assert!(close(j["max_ms"].as_f64().unwrap(), max), "{j}");
    let mean = rtts.iter().sum::<f64>() / 3.0;
    assert!((j["avg_ms"].as_f64().unwrap() - mean).abs() < 2e-3, "{j}");
    assert!(rtts.iter().all(|r| *r > 0.0), "{j}");

    // /peers lists the serving worker with its observed address.
    let peers: serde_json::Value = serde_json::from_str(&s.http_get("/peers").unwrap()).unwrap();
    let b = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["worker_id"] == "worker-b")
        .expect("worker-b in /peers");
    assert!(b["observed_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(b["connected_since"].as_str().unwrap().ends_with('Z'));
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    assert_eq!(health["status"], "ok");
    assert!(health["metrics"]["outcome_direct"].as_u64().unwrap() >= 2);
    // Outcomes by NAT-class pair: the target's class is known.
    let pairs = health["outcomes_by_nat_pair"].as_object().unwrap();
    let direct: u64 = pairs
        .iter()
        .filter(|(k, _)| k.ends_with("/none"))
        .map(|(_, v)| v["direct"].as_u64().unwrap())
        .sum();
    assert_eq!(direct, 2, "{pairs:?}");
}

#[test]
fn unknown_and_offline_targets_are_distinct_errors() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "nobody"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(3), "{r:?}");
    assert!(r.stderr.contains("unknown worker"), "{r:?}");

    let mut c = s.serve(dir.path(), "worker-c", &[]).unwrap();
    c.terminate(Duration::from_secs(10)).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "worker-c", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(4), "{r:?}");
    assert!(r.stderr.contains("offline"), "{r:?}");
    assert_eq!(r.json().unwrap()["error"], "worker_offline");
    assert_eq!(r.json().unwrap()["fault"], "peer");
}

#[test]
fn tokens_are_enforced() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &["--token", "s3cret"]).unwrap();
    for (token, what) in [(None, "missing"), (Some("wrong"), "wrong")] {
        let mut cmd = s.agent().unwrap();
        cmd.args(["connect", "x"]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let r = run(cmd, T).unwrap();
        assert_eq!(r.code, Some(6), "{what} token: {r:?}");
        assert!(r.stderr.contains("bad token"), "{r:?}");
    }
    // The right token from the environment works.
    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "nobody"]).env("PUNCH_TOKEN", "s3cret");
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(3), "{r:?}");
}

#[test]
fn wrong_fingerprint_and_unreachable_server_are_refused() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let other = punch_tls::Identity::generate().unwrap().fingerprint();
    let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-agent").unwrap());
    cmd.args([
        "connect",
        "x",
        "--server",
        &s.udp.to_string(),
        "--server-fingerprint",
        &other,
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(7), "{r:?}");
    assert!(r.stderr.contains("fingerprint mismatch"), "{r:?}");

    // A port nobody listens on.
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-agent").unwrap());
    cmd.args([
        "connect",
        "x",
        "--timeout",
        "2",
        "--server",
        &addr.to_string(),
        "--server-fingerprint",
        &other,
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(8), "{r:?}");
    assert!(r.stderr.contains("unreachable"), "{r:?}");
}

#[test]
fn same_id_with_another_key_is_refused() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["serve", "--id", "worker-b", "--key-file"])
        .arg(dir.path().join("impostor.key"));
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(9), "{r:?}");
    assert!(r.stderr.contains("another key"), "{r:?}");
}

#[test]
fn malformed_datagram_flood_does_not_stop_a_connect() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    let target = s.udp;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Bounded in count and time.
            let until = std::time::Instant::now() + Duration::from_secs(20);
            punch_lab::flood::forged_datagrams(target, &stop, 200_000, until).unwrap()
        })
    };
    for _ in 0..3 {
        let mut cmd = s.agent().unwrap();
        cmd.args(["connect", "worker-b", "--json"]);
        let r = run(cmd, T).unwrap();
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.json().unwrap()["path"], "direct");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(sent > 100, "flood sent only {sent} datagrams");
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    assert_eq!(health["status"], "ok");
    // Seen from the server: the forged relay frames reached it and were
    // refused (malformed, or a session it does not know), and it forwarded
    // nothing (the three connects went direct).
    let relay = &health["relay"];
    let refused = relay["dropped"].as_u64().unwrap() + relay["unknown_replies"].as_u64().unwrap();
    assert!(refused > 10, "{relay}");
    assert_eq!(relay["forwarded_packets"], 0, "{relay}");
}

#[test]
fn ipv6_loopback_connect() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipping: no IPv6 loopback on this machine");
        return;
    }
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &["--listen", "[::1]:0"]).unwrap();
    assert!(s.udp.is_ipv6());
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "worker-b", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    assert_eq!(j["path"], "direct");
    let remote: std::net::SocketAddr = j["remote_addr"].as_str().unwrap().parse().unwrap();
    assert!(remote.is_ipv6(), "{remote}");
}

#[test]
fn bad_cli_input_is_a_usage_error() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    for args in [
        vec!["connect", "bad id!"],
        vec!["connect", "x", "--timeout=-1"],
        vec!["serve"],
    ] {
        let mut cmd = s.agent().unwrap();
        cmd.args(&args);
        let r = run(cmd, T).unwrap();
        assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
        assert!(r.stderr.contains("error"), "{r:?}");
    }
    let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-agent").unwrap());
    cmd.args([
        "connect",
        "x",
        "--server",
        "127.0.0.1:1",
        "--server-fingerprint",
        "abc",
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("fingerprint"), "{r:?}");
}

/// `bench worker-b --seconds 1 --force-relay`: its JSON and the bytes
/// up and down.
fn relayed_bench(s: &ServerProc) -> (serde_json::Value, u64, u64) {
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "bench",
        "worker-b",
        "--seconds",
        "1",
        "--force-relay",
        "--json",
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    assert_eq!(j["path"], "relayed", "{j}");
    let up = j["upload_bytes"].as_u64().unwrap();
    let down = j["download_bytes"].as_u64().unwrap();
    (j, up, down)
}

#[test]
fn a_spent_relay_session_is_renewed_under_a_live_connection() {
    // 2 MiB a session: a 1 s bench each way spends several, and the
    // connection carries on over the next one each time.
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &["--relay-session-mib", "2"]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    let (j, up, down) = relayed_bench(&s);
    assert!(
        up > 6 << 20 && down > 6 << 20,
        "more than three sessions' worth each way: {j}"
    );
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    let relay = &health["relay"];
    assert!(relay["quota_dropped"].as_u64().unwrap() >= 1, "{health}");
    assert!(relay["ended_notices"].as_u64().unwrap() >= 2, "{health}");
    // Every session the connection used was one introduction.
    let sessions = (up + down) / (2 << 20);
    assert!(
        health["metrics"]["outcome_relayed"].as_u64().unwrap() >= sessions.saturating_sub(1),
        "{sessions} sessions' worth relayed: {health}"
    );
}

#[test]
fn forced_relay_carries_the_connection_and_is_counted() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "ping",
        "worker-b",
        "-c",
        "5",
        "-i",
        "0.01",
        "--force-relay",
        "--json",
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    assert_eq!(j["path"], "relayed");
    assert_eq!(
        j["remote_addr"],
        s.udp.to_string(),
        "relayed via the server"
    );
    assert_eq!(j["rtts_ms"].as_array().unwrap().len(), 5);
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    let relay = &health["relay"];
    assert!(relay["binds"].as_u64().unwrap() >= 2, "{health}");
    assert!(
        relay["forwarded_packets"].as_u64().unwrap() >= 10,
        "{health}"
    );
    assert!(
        health["metrics"]["outcome_relayed"].as_u64().unwrap() >= 1,
        "{health}"
    );

    // Bulk data both ways through the relay (GRO/GSO batches on the
    // server): the peer counts every byte sent, and the relay carried them.
    let (j, up, down) = relayed_bench(&s);
    assert!(up > 1_000_000 && down > 1_000_000, "{j}");
    assert!(j["upload_mb_per_s"].as_f64().unwrap() > 0.0, "{j}");
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    assert!(
        health["relay"]["forwarded_bytes"].as_u64().unwrap() >= up + down,
        "{health}"
    );
    let mut cmd = s.agent().unwrap();
    cmd.args(["bench", "worker-b", "--seconds", "0"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("--seconds"), "{r:?}");

    // --no-relay and --force-relay contradict each other.
    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "worker-b", "--force-relay", "--no-relay"]);
    assert_eq!(run(cmd, T).unwrap().code, Some(2));
}

#[test]
fn a_server_without_relay_refuses_forced_relay_clearly() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &["--no-relay"]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "worker-b", "--force-relay", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(11), "{r:?}");
    assert!(r.stderr.contains("does not relay"), "{r:?}");
    // Punching still works.
    let mut cmd = s.agent().unwrap();
    cmd.args(["connect", "worker-b", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.json().unwrap()["path"], "direct");
}

#[test]
fn nat_check_against_rfc5780_server_and_blocked_udp() {
    let dir = tmp();
    let port = std::net::UdpSocket::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let alt = format!("127.0.0.2:{port}");
    let s = ServerProc::start(dir.path(), &["--alt-listen", &alt]).unwrap();
    let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-agent").unwrap());
    cmd.args(["nat-check", "--json", "--server", &s.udp.to_string()]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    // Loopback has no NAT: everything is endpoint-independent.
    assert_eq!(j["udp"], "ok");
    assert_eq!(j["mapping"], "endpoint-independent", "{j}");
    assert_eq!(j["filtering"], "endpoint-independent", "{j}");
    assert_eq!(j["port_preserved"], true);
    assert_eq!(j["other_addr"], alt);
    let public: std::net::SocketAddr = j["public_addr"].as_str().unwrap().parse().unwrap();
    let local: std::net::SocketAddr = j["local_addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(public.port(), local.port());
    assert_eq!(j["hairpin"], true, "loopback reaches itself");
    // Four mappings, all on our own port: a preserving allocator.
    assert_eq!(j["allocator"]["kind"], "preserving", "{j}");
    assert_eq!(
        j["allocator"]["ports"],
        serde_json::json!(vec![local.port(); 4]),
        "{j}"
    );

    // Nothing listening: UDP reported blocked, exit 0 (it is a finding).
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-agent").unwrap());
    cmd.args(["nat-check", "--json", "--server", &addr.to_string()]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.json().unwrap()["udp"], "blocked");
}

#[test]
fn load_generator_holds_agents_and_measures_offers() {
    let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-lab").unwrap());
    cmd.args([
        "load",
        "--agents",
        "40",
        "--connects-per-sec",
        "100",
        "--seconds",
        "1",
        "--json",
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json().unwrap();
    assert_eq!(j["agents_held"], 40, "{j}");
    assert!(j["connects_sent"].as_u64().unwrap() >= 50, "{j}");
    assert_eq!(j["connects_sent"], j["offers_received"], "{j}");
    assert_eq!(j["connect_errors"], 0, "{j}");
    assert!(j["server_rss_mib"].as_f64().unwrap() > 0.0, "{j}");
    let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-lab").unwrap());
    cmd.args(["load", "--agents", "1"]);
    assert_ne!(run(cmd, T).unwrap().code, Some(0));
}

/// A dialer that closes its connection and exits tells the peer so: the
/// CONNECTION_CLOSE goes out on the path before the path is forgotten. (It
/// once raced the path's release: the close was dropped unrouted about
/// half the time, and the peer held a dead connection until its idle
/// timeout, moving it to the relay after 2.5 s of silence.)
#[test]
fn a_dialer_that_exits_closes_its_connection_at_the_peer() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s
        .serve(dir.path(), "worker-b", &["--no-nat-check"])
        .unwrap();
    let log = dir.path().join("worker-b.log");
    let closes = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("peer connection closed"))
            .map(str::to_string)
            .collect()
    };
    let runs = 10;
    for i in 1..=runs {
        let mut cmd = s.agent().unwrap();
        cmd.args(["--no-nat-check", "connect", "worker-b", "--json"]);
        let r = run(cmd, T).unwrap();
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.json().unwrap()["path"], "direct");
        // The peer logs the end of each connection: with the dialer's own
        // close, not after a timeout or a stateless reset. Bounded wait for
        // its line (the log is the agent's stderr).
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while closes().len() < i && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let seen = closes();
        assert_eq!(seen.len(), i, "{seen:#?}");
        assert!(seen[i - 1].contains("closed by peer: done"), "{seen:#?}");
    }
    // And the server relayed nothing for any of them.
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    assert_eq!(health["relay"]["forwarded_packets"], 0, "{health}");
}
