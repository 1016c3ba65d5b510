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
pub mod probe;
pub mod reach;
pub mod report;
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

/// Does this process run as root (real uid 0)?
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Tools every lab test uses, with their Debian packages.
pub const LAB_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
];

/// Can a lab test run here (root and the [`LAB_TOOLS`], plus `extra`)? When
/// not, outside CI it prints one line saying what is missing and returns
/// false (the test skips); under CI (`CI` set) it panics, since `.ci/run`
/// installs everything and runs as root.
pub fn lab_ready(what: &str, extra: &[(&str, &str)]) -> bool {
    let tools: Vec<(&str, &str)> = LAB_TOOLS.iter().chain(extra).copied().collect();
    let mut missing = crate::harness::missing_tools(&tools);
    if !is_root() {
        missing.insert(0, "root (network namespaces and nftables)".to_string());
    }
    crate::harness::ready(what, &missing)
}

/// Checks that the lab can run here: root, `ip` and `nft`.
pub fn preflight() -> Result<()> {
    if !is_root() {
        bail!("the NAT lab needs root (network namespaces and nftables); run it with sudo, or use `punch-lab demo` without --nat");
    }
    for tool in ["ip", "nft"] {
        if !have(tool) {
            bail!("`{tool}` not found: install iproute2 and nftables (apt-get install -y iproute2 nftables conntrack)");
        }
    }
    Ok(())
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args)).map(|_| ())
}

/// A command run inside namespace `ns`.
pub fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

fn nft(ns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = in_ns(ns, "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}\n--- script ---\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The ephemeral port range of host `h` of a `cloudnat-eim` site with
/// `hosts` hosts. That NAT maps an inside port to `block | (port & 63)`
/// (one external port whatever the destination); a real Cloud NAT gives a
/// new socket a free port of the block, ours would drop the flow of a
/// second socket with the same low bits. Windows of distinct low bits
/// keep the function one-to-one on the ports the hosts pick; without them
/// one start in twenty saw its registration collide with its own NAT
/// check's sockets and ran UDP-less.
fn eim_port_window(h: usize, hosts: usize) -> String {
    const BASE: usize = 49152; // a multiple of 64
    let per = 64 / hosts.clamp(1, 64);
    let lo = BASE + h * per;
    format!("net.ipv4.ip_local_port_range={lo} {}", lo + per - 1)
}

fn sysctl(ns: &str, kv: &str) -> Result<()> {
    sh(in_ns(ns, "sysctl").args(["-qw", kv])).map(|_| ())
}

/// Lab namespaces present on the machine.
pub fn list_lab_namespaces() -> Result<Vec<String>> {
    let out = sh(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_string)
        .collect())
}

fn owner_pid(ns: &str) -> Option<u32> {
    ns.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes lab namespaces. With `only_dead`, only those whose creating
/// process has exited. Returns the names removed.
pub fn clean(only_dead: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in list_lab_namespaces()? {
        let alive = owner_pid(&ns).is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if only_dead && alive {
            continue;
        }
        if remove_namespace(&ns) {
            removed.push(ns);
        }
    }
    Ok(removed)
}

/// Kills what runs in a namespace and deletes it; true when it is gone.
pub fn remove_namespace(ns: &str) -> bool {
    kill_ns_processes(ns);
    ip(&["netns", "del", ns]).is_ok()
}

fn kill_ns_processes(ns: &str) {
    // Processes a crashed run left inside the namespace.
    if let Ok(out) = sh(Command::new("ip").args(["netns", "pids", ns])) {
        for pid in out.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

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

    /// Adds a site; returns its index in [`Lab::sites`].
    pub fn add_site(&mut self, spec: &SiteSpec) -> Result<usize> {
        spec.impair.validate()?;
        if spec.hosts == 0 || spec.hosts > 8 {
            bail!("a site has 1 to 8 hosts");
        }
        let i = self.sites.len();
        if i >= 200 {
            bail!("too many sites");
        }
        if spec.port_mapping.is_some() && !spec.nat.takes_port_mapping() {
            bail!("{} cannot run a port-mapping daemon", spec.nat);
        }
        let tag = format!("s{i}");
        let public_ip = Ipv4Addr::new(203, 0, 113, 10 + i as u8);
        let mut hosts = Vec::new();
        let mut host_ips = Vec::new();
        if spec.nat == NatType::None {
            // Public hosts: one address each on the internet.
            let h = self.add_ns(&format!("{tag}-h0"))?;
            self.uplink(&h, &tag, spec.impair)?;
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &format!("{public_ip}/24"),
                "dev",
                "wan0",
            ])?;
            let mut host_ips6 = Vec::new();
            if spec.ipv6 {
                host_ips6.push(self.ipv6_uplink(&h, i, false)?);
            }
            hosts.push(h.clone());
            host_ips.push(public_ip);
            self.sites.push(Site {
                index: i,
                nat: spec.nat,
                hosts,
                host_ips,
                host_ips6,
                edge_ns: h,
                nat_ns: vec![],
                public_ip,
                proxy: None,
                port_mapping: None,
                lease_file: None,
                daemon_log: None,
            });
            return Ok(i);
        }
        let lan_net = format!("10.{}.0", i + 1);
        let mut nat_ns = Vec::new();
        let edge;
        let inner;
        if spec.nat == NatType::Cgnat {
            // Carrier NAT on the internet, home NAT behind it in 100.64/10.
            let cgn = self.add_ns(&format!("{tag}-cgn"))?;
            self.uplink(&cgn, &tag, spec.impair)?;
            ip(&[
                "-n",
                &cgn,
                "addr",
                "add",
                &format!("{public_ip}/24"),
                "dev",
                "wan0",
            ])?;
            let home = self.add_ns(&format!("{tag}-nat"))?;
            ip(&[
                "link", "add", "lan0", "netns", &cgn, "type", "veth", "peer", "name", "wan0",
                "netns", &home,
            ])?;
            let carrier_net = format!("100.64.{i}");
            ip(&[
                "-n",
                &cgn,
                "addr",
                "add",
                &format!("{carrier_net}.1/24"),
                "dev",
                "lan0",
            ])?;
            ip(&["-n", &cgn, "link", "set", "lan0", "up"])?;
            ip(&[
                "-n",
                &home,
                "addr",
                "add",
                &format!("{carrier_net}.2/24"),
                "dev",
                "wan0",
            ])?;
            ip(&["-n", &home, "link", "set", "wan0", "up"])?;
            ip(&[
                "-n",
                &home,
                "route",
                "add",
                "default",
                "via",
                &format!("{carrier_net}.1"),
            ])?;
            sysctl(&cgn, "net.ipv4.ip_forward=1")?;
            nft(
                &cgn,
                &nat::ruleset(
                    NatType::PortRestricted,
                    &NatAddrs {
                        lan: format!("{carrier_net}.0/24"),
                        wan_ip: public_ip.to_string(),
                        block_base: 0,
                    },
                ),
            )?;
            if spec.ipv6 {
                // The carrier routes the site's prefix to the home gateway
                // and filters nothing; the home gateway's firewall does.
                self.ipv6_uplink(&cgn, i, true)?;
                let (carrier, home6) = (site_ip6(i, CARRIER6, 1), site_ip6(i, CARRIER6, 2));
                addr6(&cgn, carrier, "lan0")?;
                addr6(&home, home6, "wan0")?;
                route6(&home, "default", carrier)?;
                route6(&cgn, &lan6_prefix(i), home6)?;
            }
            nat_ns.push(cgn.clone());
            nat_ns.push(home.clone());
            edge = cgn;
            inner = (home, format!("{carrier_net}.2"));
        } else {
            let n = self.add_ns(&format!("{tag}-nat"))?;
            self.uplink(&n, &tag, spec.impair)?;
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("{public_ip}/24"),
                "dev",
                "wan0",
            ])?;
            if spec.ipv6 {
                self.ipv6_uplink(&n, i, true)?;
            }
            nat_ns.push(n.clone());
            edge = n.clone();
            inner = (n, public_ip.to_string());
        }
        let (nat_inner, inner_wan_ip) = inner;
        ip(&["-n", &nat_inner, "link", "add", "lan0", "type", "bridge"])?;
        ip(&[
            "-n",
            &nat_inner,
            "addr",
            "add",
            &format!("{lan_net}.1/24"),
            "dev",
            "lan0",
        ])?;
        ip(&["-n", &nat_inner, "link", "set", "lan0", "up"])?;
        // A proxy-only gateway routes nothing (its ruleset drops all
        // forwarding as well).
        let forward = spec.nat != NatType::ProxyOnly;
        sysctl(
            &nat_inner,
            &format!("net.ipv4.ip_forward={}", u8::from(forward)),
        )?;
        let kind = if spec.nat == NatType::Cgnat {
            NatType::PortRestricted
        } else {
            spec.nat
        };
        nft(
            &nat_inner,
            &nat::ruleset_with(
                kind,
                &NatAddrs {
                    lan: format!("{lan_net}.0/24"),
                    wan_ip: inner_wan_ip,
                    block_base: 20480 + 64 * i as u16,
                },
                spec.port_mapping,
            ),
        )?;
        let mut host_ips6 = Vec::new();
        if spec.ipv6 {
            let gw6 = site_ip6(i, LAN6, 1);
            addr6(&nat_inner, gw6, "lan0")?;
            sysctl(&nat_inner, "net.ipv6.conf.all.forwarding=1")?;
            nft(&nat_inner, nat::IPV6_FIREWALL)?;
            for h in 0..spec.hosts {
                host_ips6.push(site_ip6(i, LAN6, 0x10 + h as u16));
            }
        }
        if matches!(
            spec.nat,
            NatType::Cloudnat
                | NatType::CloudnatEim
                | NatType::CloudnatInorder
                | NatType::CloudnatDpa
                | NatType::Seq
                | NatType::Seq2
        ) {
            // Cloud NAT drops idle UDP mappings after 30 s (the module is
            // loaded by the ruleset above, so the knobs exist now).
            for k in [
                "net.netfilter.nf_conntrack_udp_timeout=30",
                "net.netfilter.nf_conntrack_udp_timeout_stream=30",
            ] {
                sysctl(&nat_inner, k)?;
            }
        }
        for h in 0..spec.hosts {
            let hn = self.add_ns(&format!("{tag}-h{h}"))?;
            let port = format!("h{h}");
            ip(&[
                "link", "add", &port, "netns", &nat_inner, "type", "veth", "peer", "name", "eth0",
                "netns", &hn,
            ])?;
            ip(&[
                "-n", &nat_inner, "link", "set", &port, "master", "lan0", "up",
            ])?;
            let addr = Ipv4Addr::new(10, i as u8 + 1, 0, 10 + h as u8);
            ip(&[
                "-n",
                &hn,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &hn, "link", "set", "eth0", "up"])?;
            if spec.nat == NatType::CloudnatEim {
                sysctl(&hn, &eim_port_window(h, spec.hosts))?;
            }
            ip(&[
                "-n",
                &hn,
                "route",
                "add",
                "default",
                "via",
                &format!("{lan_net}.1"),
            ])?;
            if let Some(a6) = host_ips6.get(h) {
                addr6(&hn, *a6, "eth0")?;
                route6(&hn, "default", site_ip6(i, LAN6, 1))?;
            }
            hosts.push(hn);
            host_ips.push(addr);
        }
        let proxy = if spec.nat == NatType::ProxyOnly {
            let gw: Ipv4Addr = format!("{lan_net}.1").parse()?;
            Some(self.start_proxy(&tag, &nat_inner, gw, &format!("{lan_net}.0/24"))?)
        } else {
            None
        };
        self.sites.push(Site {
            index: i,
            nat: spec.nat,
            hosts,
            host_ips,
            host_ips6,
            edge_ns: edge,
            nat_ns,
            public_ip,
            proxy,
            port_mapping: spec.port_mapping,
            lease_file: None,
            daemon_log: None,
        });
        Ok(i)
    }

    /// Gives a dual-stack site's outermost namespace `ns` its address on
    /// the IPv6 internet and a default route; for a gateway (`routes`),
    /// the internet's router learns the site's LAN prefix through it.
    /// Returns the address.
    fn ipv6_uplink(&mut self, ns: &str, site: usize, routes: bool) -> Result<Ipv6Addr> {
        let wan6 = site_ip6(site, 0, 0);
        addr6(ns, wan6, "wan0")?;
        route6(ns, "default", INET_IP6)?;
        if routes {
            sysctl(ns, "net.ipv6.conf.all.forwarding=1")?;
            let inet = self.inet();
            route6(&inet, &lan6_prefix(site), wan6)?;
        }
        Ok(wan6)
    }

    /// Runs tinyproxy in the gateway namespace `ns`, listening on the LAN
    /// address `gw`, open to `lan` only; returns its URL. Its own
    /// connections leave from the gateway's WAN address. Config and log go
    /// in the lab directory; the process is killed with the lab.
    fn start_proxy(&mut self, tag: &str, ns: &str, gw: Ipv4Addr, lan: &str) -> Result<String> {
        if !have("tinyproxy") {
            bail!("proxy-only sites run tinyproxy: apt-get install -y tinyproxy");
        }
        let port = nat::PROXY_PORT;
        let connect_ports: String = PROXY_CONNECT_PORTS
            .iter()
            .map(|p| format!("ConnectPort {p}\n"))
            .collect();
        // No LogFile: in the foreground (-d) tinyproxy logs to stdout, which
        // is copied to the log file and read for its readiness line. No
        // PidFile, no daemon. It binds as root, then runs as nobody.
        let conf = format!(
            "# punch-lab: the HTTP CONNECT proxy of proxy-only site {tag}\n\
             User nobody\n\
             Group nogroup\n\
             Listen {gw}\n\
             Port {port}\n\
             Timeout 600\n\
             MaxClients 100\n\
             LogLevel Info\n\
             DisableViaHeader Yes\n\
             Allow {lan}\n\
             {connect_ports}"
        );
        let conf_path = self.path(&format!("{tag}-tinyproxy.conf"));
        std::fs::write(&conf_path, conf)?;
        let mut cmd = in_ns(ns, "tinyproxy");
        cmd.arg("-d").arg("-c").arg(&conf_path);
        let log = self.path(&format!("{tag}-tinyproxy.log"));
        let mut p = Proc::spawn_tee(&format!("{tag}-tinyproxy"), cmd, &log)?;
        p.wait_line("Accepting connections", Duration::from_secs(10))
            .with_context(|| format!("tinyproxy in {ns}; log {}", log.display()))?;
        self.procs.push(p);
        Ok(format!("http://{gw}:{port}"))
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
