//! The host side of the lab: root and tools, commands run in a namespace,
//! nftables and sysctl there, and finding and removing namespaces (ours
//! and those of runs that died).

use super::*;

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

pub(super) fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args)).map(|_| ())
}

/// A command run inside namespace `ns`.
pub fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

pub(super) fn nft(ns: &str, script: &str) -> Result<()> {
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
pub(super) fn eim_port_window(h: usize, hosts: usize) -> String {
    const BASE: usize = 49152; // a multiple of 64
    let per = 64 / hosts.clamp(1, 64);
    let lo = BASE + h * per;
    format!("net.ipv4.ip_local_port_range={lo} {}", lo + per - 1)
}

pub(super) fn sysctl(ns: &str, kv: &str) -> Result<()> {
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

pub(super) fn owner_pid(ns: &str) -> Option<u32> {
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

pub(super) fn kill_ns_processes(ns: &str) {
    // Processes a crashed run left inside the namespace.
    if let Ok(out) = sh(Command::new("ip").args(["netns", "pids", ns])) {
        for pid in out.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}
