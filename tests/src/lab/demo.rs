//! `punch-lab demo --nat A,B`: the core demo behind two simulated NATs.

use super::matrix::{agent_cmd, serve, start_server};
use super::nat::{theory, NatType};
use super::{Impair, Lab, SiteSpec, SERVER_IP};
use crate::harness::run;
use anyhow::{bail, Result};
use std::time::Duration;

/// Builds two sites, a server, and connects A to B; prints each step.
pub fn nat_demo(a: NatType, b: NatType, impair: Impair) -> Result<()> {
    println!("punch demo behind NATs: A behind {a}, B behind {b}\n");
    let mut lab = Lab::new()?;
    let sa = lab.add_site(&SiteSpec {
        nat: a,
        hosts: 1,
        impair,
    })?;
    let sb = lab.add_site(&SiteSpec {
        nat: b,
        hosts: 1,
        impair,
    })?;
    for s in [sa, sb] {
        let site = &lab.sites[s];
        println!(
            "1. site {} ({}): host {} at {}, public address {}",
            s, site.nat, site.hosts[0], site.host_ips[0], site.public_ip
        );
    }
    let fp = start_server(&mut lab)?;
    println!("2. punch-server on the fake internet at {SERVER_IP}:3478");
    let ns_b = lab.sites[sb].hosts[0].clone();
    serve(&mut lab, &ns_b, "worker-b", &fp, 3.0)?;
    println!("3. worker-b registered from behind its {b} NAT");
    let (expect, why) = theory(a, b);
    println!("4. theory for {a} -> {b}: {expect:?} ({why})");
    let ns_a = lab.sites[sa].hosts[0].clone();
    let mut cmd = agent_cmd(&ns_a, &fp, 3.0)?;
    cmd.args(["ping", "worker-b", "-c", "3", "-i", "0.2"]);
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
