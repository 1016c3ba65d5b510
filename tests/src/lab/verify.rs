//! `punch-lab verify-nat`: build one site per NAT type and prove with plain
//! UDP probes that each behaves as named. The UDP-less types (`udp-blocked`,
//! `proxy-only`) have no UDP mapping or filtering to classify: for them it
//! checks the blocking instead ([`super::reach::check_site`]).

use super::nat::{Filtering, Mapping, NatType};
use super::probe::NatReport;
use super::reach::{self, BlockReport};
use super::{bin_self, in_ns, Impair, Lab, SiteSpec, SERVER_IP, SERVER_IP2};
use crate::harness::{run, Proc};
use anyhow::{Context, Result};
use std::time::Duration;

/// One site's verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub nat: NatType,
    pub expected_mapping: &'static str,
    pub expected_filtering: &'static str,
    /// The UDP probes' findings (none for the UDP-less types).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<NatReport>,
    pub block_ok: bool,
    /// What a UDP-less type let through (instead of `measured`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocking: Option<BlockReport>,
    /// `punch-agent nat-check` against punch-server's RFC 5780 STUN.
    pub nat_check_mapping: String,
    pub nat_check_filtering: String,
    /// nat-check's port allocator (`allocator.kind`).
    pub nat_check_allocator: String,
    pub nat_check_ok: bool,
    pub ok: bool,
}

fn mapping_name(m: Mapping) -> &'static str {
    match m {
        Mapping::EndpointIndependent => "endpoint-independent",
        Mapping::EndpointDependent => "endpoint-dependent",
        Mapping::NoUdp => "no-udp",
    }
}

fn filtering_name(f: Filtering) -> &'static str {
    match f {
        Filtering::Open | Filtering::EndpointIndependent => "endpoint-independent",
        Filtering::AddressDependent => "address-dependent",
        Filtering::AddressAndPortDependent => "address-and-port-dependent",
        Filtering::Blocked => "blocked",
    }
}

fn probe_in(ns: &str) -> Result<NatReport> {
    let mut cmd = in_ns(ns, bin_self()?);
    cmd.arg("nat-probe");
    let r = run(cmd, Duration::from_secs(30))?;
    if r.code != Some(0) {
        anyhow::bail!("nat-probe in {ns} failed: {}", r.stderr.trim());
    }
    serde_json::from_str(r.stdout.trim())
        .with_context(|| format!("nat-probe output {:?}", r.stdout))
}

/// The allocator nat-check should read behind `t`, where the lab's rule
/// makes it plain: Cloud NAT's `snat ... random` over 64 ports, the
/// symmetric type's `masquerade fully-random`, the port-restricted type's
/// plain `snat` (Linux keeps the source port).
fn expected_allocator(t: NatType) -> Option<&'static str> {
    match t {
        NatType::Cloudnat => Some("block"),
        // In order through a block reads as a counter, as the sequential
        // type does: four mappings cannot tell them apart.
        NatType::CloudnatInorder | NatType::Seq | NatType::Seq2 => Some("sequential"),
        NatType::CloudnatDpa => Some("block"),
        NatType::Symmetric => Some("random"),
        NatType::PortRestricted => Some("preserving"),
        _ => None,
    }
}

fn nat_check_in(ns: &str) -> Result<(String, String, String)> {
    let mut cmd = in_ns(ns, crate::harness::bin("punch-agent")?);
    cmd.args([
        "nat-check",
        "--json",
        "--server",
        &format!("{SERVER_IP}:3478"),
    ]);
    let r = run(cmd, Duration::from_secs(30))?;
    if r.code != Some(0) {
        anyhow::bail!("nat-check in {ns} failed: {}", r.stderr.trim());
    }
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .with_context(|| format!("nat-check output {:?}", r.stdout))?;
    Ok((
        v["mapping"].as_str().unwrap_or_default().to_string(),
        v["filtering"].as_str().unwrap_or_default().to_string(),
        v["allocator"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ))
}

/// Builds the sites and checks each.
pub fn verify(types: &[NatType]) -> Result<Vec<Verdict>> {
    let mut lab = Lab::new()?;
    let mut sites = Vec::new();
    for t in types {
        sites.push(lab.add_site(&SiteSpec {
            nat: *t,
            hosts: 1,
            impair: Impair::default(),
            port_mapping: None,
            ipv6: false,
        })?);
    }
    let mut cmd = in_ns(&lab.server_ns, bin_self()?);
    cmd.args([
        "reflector",
        "--ips",
        &format!("{SERVER_IP},{SERVER_IP2}"),
        "--seconds",
        "600",
    ]);
    let log = lab.path("reflector.log");
    let mut p = Proc::spawn("reflector", cmd, Some(&log))?;
    p.wait_line("reflecting", Duration::from_secs(10))?;
    lab.keep(p);
    super::matrix::start_server(&mut lab)?;
    if types.iter().any(|t| !t.has_udp()) {
        reach::start_echo(&mut lab)?;
    }
    let mut out = Vec::new();
    for (t, site) in types.iter().zip(sites) {
        let ns = lab.sites[site].hosts[0].clone();
        let expected_mapping = mapping_name(t.mapping());
        let expected_filtering = filtering_name(t.filtering());
        if !t.has_udp() {
            // Nothing to classify (and punch-agent nat-check has no UDP to
            // work with either): check that UDP is blocked and that TCP
            // gets out as the type promises.
            let b = reach::check_site(&lab, site)?;
            out.push(Verdict {
                nat: *t,
                expected_mapping,
                expected_filtering,
                measured: None,
                block_ok: true,
                ok: b.ok,
                blocking: Some(b),
                nat_check_mapping: "skipped (no UDP)".into(),
                nat_check_filtering: "skipped (no UDP)".into(),
                nat_check_allocator: "skipped (no UDP)".into(),
                nat_check_ok: true,
            });
            continue;
        }
        let check = |m: &NatReport| {
            let mapping_ok = match t.mapping() {
                Mapping::EndpointIndependent => m.mapping == "endpoint-independent",
                Mapping::EndpointDependent => m.mapping != "endpoint-independent",
                Mapping::NoUdp => unreachable!("UDP-less types are checked above"),
            };
            let block_ok = match t {
                NatType::Cloudnat | NatType::CloudnatEim | NatType::CloudnatInorder => {
                    let lo = 20480 + 64 * site as u16;
                    m.mapped
                        .parse::<std::net::SocketAddr>()
                        .is_ok_and(|a| (lo..lo + 64).contains(&a.port()))
                }
                NatType::CloudnatDpa => {
                    let lo = 20480 + 64 * site as u16;
                    m.mapped
                        .parse::<std::net::SocketAddr>()
                        .is_ok_and(|a| (lo..lo + 32).contains(&a.port()))
                }
                _ => true,
            };
            (
                mapping_ok && m.filtering == expected_filtering && block_ok,
                block_ok,
            )
        };
        let mut measured = probe_in(&ns)?;
        let (mut ok, mut block_ok) = check(&measured);
        if !ok {
            // A random allocator can repeat a port by chance (1 in 64 for
            // the Cloud NAT block): one fresh attempt before calling it.
            measured = probe_in(&ns)?;
            (ok, block_ok) = check(&measured);
        }
        let nat_check_ok = |(m, f, a): &(String, String, String)| {
            let mapping_ok = match t.mapping() {
                Mapping::EndpointIndependent => m == "endpoint-independent",
                Mapping::EndpointDependent => m == "address-and-port-dependent",
                Mapping::NoUdp => unreachable!("UDP-less types are checked above"),
            };
            let alloc_ok = expected_allocator(*t).is_none_or(|want| a == want);
            mapping_ok && f == expected_filtering && alloc_ok
        };
        let mut nc = nat_check_in(&ns)?;
        if !nat_check_ok(&nc) {
            // Same chance repeat as above (1 in 64 for the Cloud NAT block;
            // random picks that happen to count up, for the allocator).
            nc = nat_check_in(&ns)?;
        }
        let nc_ok = nat_check_ok(&nc);
        out.push(Verdict {
            nat: *t,
            expected_mapping,
            expected_filtering,
            measured: Some(measured),
            block_ok,
            blocking: None,
            nat_check_mapping: nc.0,
            nat_check_filtering: nc.1,
            nat_check_allocator: nc.2,
            nat_check_ok: nc_ok,
            ok: ok && nc_ok,
        });
    }
    Ok(out)
}

/// The readable table. The UDP-less types get a row saying nothing was
/// classified, and below the table what each check saw.
pub fn table(v: &[Verdict]) -> String {
    let mut s = format!(
        "{:<16} {:<28} {:<28} {:<22} {:<6} {:<20} {}\n",
        "NAT",
        "mapping (measured)",
        "filtering (measured)",
        "mapped",
        "pres.",
        "nat-check",
        "verdict"
    );
    let mut notes = String::new();
    for x in v {
        if let Some(b) = &x.blocking {
            s.push_str(&format!(
                "{:<16} {:<28} {:<28} {:<22} {:<6} {:<20} {}\n",
                x.nat.name(),
                "no UDP: not classified",
                "blocking checked instead",
                "-",
                "-",
                "skipped",
                if x.ok {
                    "ok (UDP blocked, TCP as promised)".to_string()
                } else {
                    format!("MISMATCH: {}", b.problems.join("; "))
                }
            ));
            notes.push_str(&blocking_notes(x.nat, b));
            continue;
        }
        let Some(m) = &x.measured else { continue };
        s.push_str(&format!(
            "{:<16} {:<28} {:<28} {:<22} {:<6} {:<20} {}\n",
            x.nat.name(),
            m.mapping,
            m.filtering,
            m.mapped,
            if m.port_preserved { "yes" } else { "no" },
            if x.nat_check_ok {
                format!("agrees ({})", x.nat_check_allocator)
            } else {
                format!(
                    "{}/{}/{}",
                    x.nat_check_mapping, x.nat_check_filtering, x.nat_check_allocator
                )
            },
            if x.ok {
                "ok".to_string()
            } else {
                format!(
                    "MISMATCH: expected {} / {}{}",
                    x.expected_mapping,
                    x.expected_filtering,
                    if x.block_ok {
                        ""
                    } else {
                        ", port outside the host's block"
                    }
                )
            }
        ));
    }
    if !notes.is_empty() {
        s.push('\n');
        s.push_str(&notes);
    }
    s
}

fn blocking_notes(t: NatType, b: &BlockReport) -> String {
    let line = |what: &str, r: &reach::Reach| format!("  {what}: {} ({:.0} ms)\n", r.detail, r.ms);
    let mut s = format!("{t}:\n");
    s.push_str(&line("UDP echo from the gateway (control)", &b.control_udp));
    s.push_str(&line("TCP echo from the gateway (control)", &b.control_tcp));
    s.push_str(&line("UDP echo from the host", &b.udp));
    s.push_str(&line("direct TCP from the host", &b.tcp_direct));
    if let Some(r) = &b.tcp_via_proxy {
        s.push_str(&line(
            &format!("TCP through {}", b.proxy.as_deref().unwrap_or("?")),
            r,
        ));
    }
    if let Some(r) = &b.proxy_unlisted_port {
        s.push_str(&line(
            &format!("CONNECT to unlisted port {}", reach::UNLISTED_PORT),
            r,
        ));
    }
    if !b.agent_args.is_empty() {
        s.push_str(&format!("  agent arguments: {}\n", b.agent_args.join(" ")));
    }
    s
}
