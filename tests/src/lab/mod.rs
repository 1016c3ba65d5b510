//! The NAT lab: a fake internet, a server host and NATed sites built from
//! Linux network namespaces, veth pairs, a bridge and nftables.
//!
//! Every namespace carries the prefix `plab<pid>-`, so a run's leftovers can
//! be told from another live run's, and `punch-lab clean` (or the next run)
//! removes namespaces whose creating process is gone. A [`Lab`] removes
//! what it built when dropped, also on Ctrl-C (the binary turns SIGINT into
//! an orderly exit).

pub mod bench;
pub mod delay;
pub mod demo;
pub mod failover;
mod gateway_daemons;
pub mod matrix;
pub mod nat;
mod netns;
pub mod probe;
pub mod reach;
pub mod report;
mod site;
pub mod throughput;
pub mod upgrade;
pub mod verify;

use crate::harness::{bin, Proc};
use anyhow::{bail, Context, Result};
use nat::{NatAddrs, NatType, PortMapDaemon};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Every lab namespace starts with this.
pub const PREFIX: &str = "plab";

/// Public address of the server host (the second one is [`SERVER_IP2`]).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The server host's second public address.
pub const SERVER_IP2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The server host's IPv6 address. The internet's IPv6 is one link,
/// 2001:db8::/64, with a router ([`INET_IP6`]) that knows every
/// dual-stack site's prefix.
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The internet's IPv6 router.
pub const INET_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);

/// A dual-stack site's IPv6 addresses: its gateway's on the internet
/// link, the LAN prefix's `n`-th address (1 the gateway, 0x10 + h host h),
/// and a CGNAT site's carrier link (1 the carrier, 2 the home gateway).
fn site_ip6(site: usize, net: u16, n: u16) -> Ipv6Addr {
    match net {
        0 => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100 + site as u16),
        _ => Ipv6Addr::new(0x2001, 0xdb8, net, site as u16, 0, 0, 0, n),
    }
}
/// Adds IPv6 address `a` (in a /64) to `dev` of namespace `ns`.
fn addr6(ns: &str, a: Ipv6Addr, dev: &str) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{a}/64"),
        "dev",
        dev,
        "nodad",
    ])
}

/// Adds an IPv6 route to `dst` (`default` or a prefix) via `via` in `ns`.
fn route6(ns: &str, dst: &str, via: Ipv6Addr) -> Result<()> {
    ip(&["-n", ns, "-6", "route", "add", dst, "via", &via.to_string()])
}

/// A dual-stack site's LAN prefix, `2001:db8:1:<site>::/64`.
fn lan6_prefix(site: usize) -> String {
    format!("{}/64", site_ip6(site, LAN6, 0))
}

/// The LAN and carrier-link networks of [`site_ip6`].
const LAN6: u16 = 1;
const CARRIER6: u16 = 2;

/// Ports a `proxy-only` site's HTTP proxy lets CONNECT reach (tinyproxy's
/// `ConnectPort`; with no such line it would allow every port): HTTPS, the
/// server's ports (3478, 3479) and the lab's TCP echo
/// ([`reach::ECHO_PORT`]). Every other port is refused with 403, like a
/// corporate proxy does ([`reach::UNLISTED_PORT`] checks that).
pub const PROXY_CONNECT_PORTS: [u16; 4] = [443, 3478, 3479, reach::ECHO_PORT];

/// Link impairments on a site's uplink.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Impair {
    /// One-way delay added in each direction, ms.
    pub delay_ms: u32,
    /// Uniform jitter added on top of the delay, ms.
    pub jitter_ms: u32,
    /// Loss in each direction, percent.
    pub loss_pct: f64,
}

impl Impair {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if self.delay_ms > 2_000 || self.jitter_ms > 2_000 {
            bail!("delay and jitter must be at most 2000 ms");
        }
        if !(0.0..=50.0).contains(&self.loss_pct) || self.loss_pct.is_nan() {
            bail!("loss must be between 0 and 50 percent");
        }
        Ok(())
    }
}

/// One site: hosts behind a NAT (or public hosts for `none`).
#[derive(Clone, Debug)]
pub struct SiteSpec {
    pub nat: NatType,
    pub hosts: usize,
    pub impair: Impair,
    /// Run a port-mapping daemon (miniupnpd) on the gateway, answering
    /// these protocols; it starts with [`Lab::start_port_mapping`], once
    /// the server's STUN port answers.
    pub port_mapping: Option<PortMapDaemon>,
    /// Dual-stack: hosts also get global IPv6 addresses behind a stateful
    /// firewall on the gateway (see [`nat::SiteType::ipv6`]).
    pub ipv6: bool,
}

/// A built site.
#[derive(Clone, Debug)]
pub struct Site {
    pub index: usize,
    pub nat: NatType,
    /// Namespace names of the hosts.
    pub hosts: Vec<String>,
    /// Their addresses (private, or public for `none`).
    pub host_ips: Vec<Ipv4Addr>,
    /// Their global IPv6 addresses on a dual-stack site (empty otherwise).
    pub host_ips6: Vec<Ipv6Addr>,
    /// The outermost NAT namespace (or the host itself for `none`).
    pub edge_ns: String,
    /// Namespaces of all NAT layers, outermost first.
    pub nat_ns: Vec<String>,
    /// The site's public address (the first host's for `none`).
    pub public_ip: Ipv4Addr,
    /// The HTTP CONNECT proxy the hosts must use (`http://10.x.0.1:8888`),
    /// set for `proxy-only` sites only.
    pub proxy: Option<String>,
    /// The port-mapping daemon on the gateway, if any.
    pub port_mapping: Option<PortMapDaemon>,
    /// Its lease file (where miniupnpd records live mappings).
    pub lease_file: Option<PathBuf>,
    /// Its log.
    pub daemon_log: Option<PathBuf>,
}

impl Site {
    /// Extra `punch-agent` arguments an agent on this site's hosts needs:
    /// `--proxy URL` on a `proxy-only` site, nothing elsewhere.
    pub fn agent_args(&self) -> Vec<String> {
        match &self.proxy {
            Some(url) => vec!["--proxy".to_string(), url.clone()],
            None => Vec::new(),
        }
    }
}

/// A running lab. Dropping it kills its processes and deletes its namespaces.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    /// Namespace of the server host.
    pub server_ns: String,
    pub sites: Vec<Site>,
    pub dir: tempfile::TempDir,
}

pub use crate::harness::have;
pub use netns::{
    clean, in_ns, is_root, lab_ready, list_lab_namespaces, preflight, remove_namespace, sh,
    LAB_TOOLS,
};
use netns::{eim_port_window, ip, nft, sysctl};

impl Lab {
    /// Checks the machine, removes leftovers of killed runs (saying so), and
    /// starts an empty lab with the internet and the server host.
    pub fn new() -> Result<Lab> {
        preflight()?;
        let stale = clean(true)?;
        if !stale.is_empty() {
            eprintln!(
                "punch-lab: removed {} namespaces left by a killed run: {}",
                stale.len(),
                stale.join(", ")
            );
        }
        let prefix = format!("{PREFIX}{}", std::process::id());
        let mut lab = Lab {
            server_ns: format!("{prefix}-srv"),
            prefix,
            namespaces: Vec::new(),
            procs: Vec::new(),
            sites: Vec::new(),
            dir: tempfile::tempdir()?,
        };
        if std::env::var_os("PUNCH_LAB_KEEP").is_some() {
            // Logs (agents, server, proxy) stay for a look afterwards.
            lab.dir.disable_cleanup(true);
            eprintln!(
                "punch-lab: PUNCH_LAB_KEEP set; logs stay in {}",
                lab.dir.path().display()
            );
        }
        if list_lab_namespaces()?
            .iter()
            .any(|n| n.starts_with(&format!("{}-", lab.prefix)))
        {
            bail!("namespaces with prefix {} already exist", lab.prefix);
        }
        lab.build_core()?;
        Ok(lab)
    }

    fn add_ns(&mut self, name: &str) -> Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // The lab's IPv6 addresses are unique by construction: duplicate
        // address detection would only hold each one back for a second.
        for k in [
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ] {
            sysctl(&ns, k)?;
        }
        Ok(ns)
    }

    fn inet(&self) -> String {
        format!("{}-inet", self.prefix)
    }

    fn build_core(&mut self) -> Result<()> {
        let inet = self.add_ns("inet")?;
        ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &inet, "link", "set", "br0", "up"])?;
        // Private sources never cross the fake internet: a NAT bug can then
        // never pass for a punched path.
        nft(
            &inet,
            "table bridge punchnet {\n  chain forward_filter {\n    type filter hook forward priority 0; policy accept;\n    \
             ip saddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 } counter drop\n    \
             ip6 saddr fc00::/7 counter drop\n  }\n}\n",
        )?;
        // The IPv6 internet routes: dual-stack sites add their prefixes.
        addr6(&inet, INET_IP6, "br0")?;
        sysctl(&inet, "net.ipv6.conf.all.forwarding=1")?;
        let srv = self.add_ns("srv")?;
        self.uplink(&srv, "srv", Impair::default())?;
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "wan0",
        ])?;
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{SERVER_IP2}/24"),
            "dev",
            "wan0",
        ])?;
        addr6(&srv, SERVER_IP6, "wan0")?;
        route6(&srv, "default", INET_IP6)?;
        Ok(())
    }

    /// Connects `ns` to the internet bridge with interface `wan0`, through a
    /// delay namespace when the link has delay or jitter.
    fn uplink(&mut self, ns: &str, tag: &str, imp: Impair) -> Result<()> {
        let inet = self.inet();
        let port = format!("p-{tag}");
        if imp.delay_ms == 0 && imp.jitter_ms == 0 {
            ip(&[
                "link", "add", "wan0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                &inet,
            ])?;
        } else {
            let dly = self.add_ns(&format!("{tag}-dly"))?;
            ip(&[
                "link", "add", "wan0", "netns", ns, "type", "veth", "peer", "name", "dla", "netns",
                &dly,
            ])?;
            ip(&[
                "link", "add", "dlb", "netns", &dly, "type", "veth", "peer", "name", &port,
                "netns", &inet,
            ])?;
            // The forwarder copies whole frames as they are: it cannot send
            // one larger than the MTU (a UDP GSO super-frame) nor fill in a
            // checksum left to offload, so offloads are off on every
            // interface of the delayed link.
            for (n, i) in [
                (&dly, "dla"),
                (&dly, "dlb"),
                (&ns.to_string(), "wan0"),
                (&inet, port.as_str()),
            ] {
                if n.as_str() == dly {
                    ip(&["-n", n, "link", "set", i, "promisc", "on"])?;
                }
                sh(in_ns(n, "ethtool").args([
                    "-K",
                    i,
                    "tx",
                    "off",
                    "tso",
                    "off",
                    "gso",
                    "off",
                    "gro",
                    "off",
                    "tx-udp-segmentation",
                    "off",
                ]))
                .context("ethtool is needed for delayed links (apt-get install -y ethtool)")?;
                ip(&["-n", n, "link", "set", i, "up"])?;
            }
            let mut cmd = in_ns(&dly, bin_self()?);
            cmd.args([
                "forwarder",
                "--a",
                "dla",
                "--b",
                "dlb",
                "--delay-ms",
                &imp.delay_ms.to_string(),
                "--jitter-ms",
                &imp.jitter_ms.to_string(),
            ]);
            let log = self.dir.path().join(format!("{tag}-dly.log"));
            let mut p = Proc::spawn(&format!("{tag}-forwarder"), cmd, Some(&log))?;
            p.wait_line("forwarding", Duration::from_secs(10))?;
            self.procs.push(p);
        }
        ip(&["-n", &inet, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", ns, "link", "set", "wan0", "up"])?;
        if imp.loss_pct > 0.0 {
            let n = (imp.loss_pct * 100.0).round() as u32;
            nft(
                ns,
                &format!(
                    "table inet punchloss {{\n  chain in {{ type filter hook prerouting priority -300; policy accept; \
                     iifname \"wan0\" numgen random mod 10000 < {n} drop; }}\n  \
                     chain out {{ type filter hook postrouting priority 300; policy accept; \
                     oifname \"wan0\" numgen random mod 10000 < {n} drop; }}\n}}\n"
                ),
            )?;
        }
        Ok(())
    }

    /// Extra `punch-agent` arguments for an agent in host namespace `ns`
    /// ([`Site::agent_args`] of the site it belongs to; none for the
    /// server host or an unknown namespace).
    pub fn agent_args_for(&self, ns: &str) -> Vec<String> {
        self.sites
            .iter()
            .find(|s| s.hosts.iter().any(|h| h == ns))
            .map(Site::agent_args)
            .unwrap_or_default()
    }

    /// A kept process, by name (the first of that name).
    pub fn kept(&mut self, name: &str) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.name == name)
    }

    /// Kills the kept processes named `name` (SIGKILL: a crash, or a
    /// machine gone); how many there were.
    pub fn kill(&mut self, name: &str) -> usize {
        let mut n = 0;
        self.procs.retain_mut(|p| {
            if p.name == name {
                p.kill();
                n += 1;
                false
            } else {
                true
            }
        });
        n
    }

    /// Keeps a process alive for the lab's lifetime.
    pub fn keep(&mut self, p: Proc) {
        self.procs.push(p);
    }

    /// Flushes conntrack in every NAT of a site (forgets all mappings).
    pub fn flush_conntrack(&self, site: usize) -> Result<()> {
        for ns in &self.sites[site].nat_ns {
            let _ = sh(in_ns(ns, "conntrack").args(["-F"]));
            let _ = sh(in_ns(ns, "conntrack").args(["-F", "-f", "ipv6"]));
        }
        Ok(())
    }

    /// Lets UDP through a `udp-blocked` site's NAT from now on: deletes
    /// the two rules that drop forwarded UDP (its `track` chain), so the
    /// NAT behaves as `port-restricted` for UDP too. Connections keep
    /// running; what happens next is up to the agents. Fails for other
    /// site types and when the rules are not there (lifted already).
    pub fn lift_udp_block(&mut self, site: usize) -> Result<()> {
        let s = &self.sites[site];
        if s.nat != NatType::UdpBlocked {
            bail!("site {site} is {}, not udp-blocked", s.nat);
        }
        let ns = s.edge_ns.clone();
        let listing =
            sh(in_ns(&ns, "nft").args(["-a", "list", "chain", "ip", "punchnat", "track"]))?;
        let handles = nat::udp_block_handles(&listing);
        if handles.len() != 2 {
            bail!("expected the two UDP drop rules in {ns}, found {handles:?} in:\n{listing}");
        }
        for h in handles {
            sh(in_ns(&ns, "nft").args([
                "delete",
                "rule",
                "ip",
                "punchnat",
                "track",
                "handle",
                &h.to_string(),
            ]))?;
        }
        Ok(())
    }

    /// Where logs and data go.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// This executable (run inside namespaces for the forwarder and probes).
pub fn bin_self() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    if exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("punch-lab"))
    {
        return Ok(exe);
    }
    // In tests the current exe is the test binary: use the built punch-lab.
    bin("punch-lab")
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
    }
}
