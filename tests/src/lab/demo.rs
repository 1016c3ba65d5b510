//! `punch-lab demo --nat A,B`: the core demo behind two simulated NATs.

use super::matrix::{agent_cmd, pair_lab, PairLab};
use super::nat::{site_theory, SiteType};
use super::{Impair, SERVER_IP};
use crate::harness::run;
use anyhow::{bail, Result};
use std::time::Duration;

/// Builds two sites, a server, and connects A to B; prints each step.
pub fn nat_demo(a: impl Into<SiteType>, b: impl Into<SiteType>, impair: Impair) -> Result<()> {
    let (a, b) = (a.into(), b.into());
    println!("punch demo behind NATs: A behind {a}, B behind {b}\n");
    let PairLab {
        lab,
        fp,
        sa,
        sb,
        ns_a,
        ..
    } = pair_lab(a, b, impair)?;
    for s in [sa, sb] {
        let site = &lab.sites[s];
        println!(
            "1. site {} ({}): host {} at {}, public address {}",
            s, site.nat, site.hosts[0], site.host_ips[0], site.public_ip
        );
    }
    println!("2. punch-server on the fake internet at {SERVER_IP}:3478");
    println!("3. worker-b registered from behind its {b} NAT");
    let (expect, why) = site_theory(a, b);
    println!("4. theory for {a} -> {b}: {expect:?} ({why})");
    let mut cmd = agent_cmd(&ns_a, &fp, 3.0)?;
    cmd.args(["ping", "worker-b", "-c", "3", "-i", "0.2"]);
    cmd.args(lab.agent_args_for(&ns_a));
    let r = run(cmd, Duration::from_secs(60))?;
    for l in r.stdout.lines() {
        println!("5. {l}");
    }
    if r.code != Some(0) {
        println!("5. {}", r.stderr.trim());
        bail!("A could not reach B");
    }
    println!("\ndemo ok");
    Ok(())
}
