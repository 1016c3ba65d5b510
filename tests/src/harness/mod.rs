//! Runs the real `punch-server` and `punch-agent` binaries for tests and
//! the lab: finds (and builds) them, starts them, reads their output with
//! timeouts, and kills them on drop.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Whether a test that needs something of the machine can run: true when
/// nothing is `missing`. Outside CI it prints one line naming what is
/// missing and returns false, so the test skips; under CI (`CI` set) a
/// missing tool or privilege fails the test loudly instead, since `.ci/run`
/// installs every package the tests use.
pub fn ready(what: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let list = missing.join(", ");
    if std::env::var_os("CI").is_some() {
        panic!("{what}: missing {list} under CI (.ci/run installs the packages and runs as root)");
    }
    eprintln!("skipping {what}: missing {list}");
    false
}

/// Is `tool` on the PATH? A `(tool, package)` pair missing becomes the line
/// [`ready`] prints.
pub fn missing_tools(tools: &[(&str, &str)]) -> Vec<String> {
    tools
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(tool, package)| format!("`{tool}` (apt-get install {package})"))
        .collect()
}

/// Is `tool` on the PATH?
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The directory holding the workspace binaries, built on first use so that
/// `cargo test` alone is enough.
pub fn bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_bins().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_bins() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PUNCH_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().context("exe has no parent")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let release = dir.file_name().is_some_and(|n| n == "release");
    cargo_build(&["-p", "punch-server", "-p", "punch-agent-cli"], release)
        .context("cargo build of punch-server/punch-agent")?;
    Ok(dir)
}

/// `cargo build --quiet ARGS` of this workspace, as the running test was
/// built (`release` or not).
fn cargo_build(args: &[&str], release: bool) -> Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet"])
        .args(args)
        .arg("--manifest-path")
        .arg(&manifest);
    if release {
        cmd.arg("--release");
    }
    if !cmd.status().context("running cargo build")?.success() {
        bail!("cargo build failed");
    }
    Ok(())
}

/// Path of one of the agent library's examples, built (in the profile of
/// the running test) on first use.
pub fn example(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    cargo_build(&["-p", "punch-agent", "--example", name], release)
        .with_context(|| format!("cargo build of example {name}"))?;
    let p = dir.join("examples").join(name);
    if !p.exists() {
        bail!("{} not found after building it", p.display());
    }
    Ok(p)
}

/// Path of a workspace binary.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.exists() {
        bail!("{} not found (build the workspace first)", p.display());
    }
    Ok(p)
}

/// A child process whose stdout lines can be awaited. Killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` with piped stdout; stderr goes to `log` if given.
    pub fn spawn(name: &str, mut cmd: Command, log: Option<&Path>) -> Result<Proc> {
        match log {
            Some(p) => {
                cmd.stderr(std::fs::File::create(p)?);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        Self::start(name, cmd, None)
    }

    /// Like [`Proc::spawn`] for a program that logs to stdout: stderr and
    /// every stdout line (still awaitable) both go to `log`.
    pub fn spawn_tee(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        cmd.stderr(file.try_clone()?);
        Self::start(name, cmd, Some(file))
    }

    fn start(name: &str, mut cmd: Command, mut tee: Option<std::fs::File>) -> Result<Proc> {
        use std::io::Write;
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = tee.as_mut() {
                    // One write per line: the child's stderr appends to the
                    // same file, and `writeln!` would write the line and
                    // its newline separately, letting a stderr line in
                    // between.
                    let _ = f.write_all(format!("{line}\n").as_bytes());
                }
                if tx.send(line).is_err() && tee.is_none() {
                    break;
                }
            }
        });
        Ok(Proc {
            name: name.to_string(),
            child,
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// Waits for a stdout line containing `needle`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return Ok(l);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "{}: no line containing {needle:?} within {timeout:?} (saw {:?})",
                    self.name,
                    self.seen
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!(
                    "{}: exited before printing {needle:?} (saw {:?}, status {:?})",
                    self.name,
                    self.seen,
                    self.child.try_wait()
                ),
            }
        }
    }

    /// The next stdout line, or `None` once stdout is closed.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<String>> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => {
                self.seen.push(l.clone());
                Ok(Some(l))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(None),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "{}: no output within {timeout:?} (saw {:?})",
                self.name,
                self.seen
            ),
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a clean shutdown), then reap within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.child.id() as i32;
        // SAFETY-free: plain kill(2) through the `kill` command keeps us off libc.
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        self.wait_exit(timeout)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Removes the `PUNCH_*` settings a test runner may carry (every option
/// has one; `PUNCH_LOG` stays), so an agent sees only the flags the test
/// gives it.
pub fn clear_agent_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("PUNCH_") && k != "PUNCH_LOG" {
            cmd.env_remove(&*k);
        }
    }
    // A proxy in the runner's environment must not carry test traffic.
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
}

/// A running `punch-server` process.
pub struct ServerProc {
    pub proc: Proc,
    pub udp: SocketAddr,
    pub http: SocketAddr,
    /// The TLS + WebSocket port, unless the server runs without one.
    pub tcp: Option<SocketAddr>,
    pub fingerprint: String,
    pub data_dir: PathBuf,
}

impl ServerProc {
    /// Kills the server (SIGKILL, reaped) and starts a new one with the same
    /// data directory on the same UDP and TCP addresses, so agents that knew
    /// the old one find the new one. A port freed by the kill can be taken
    /// for a moment by another test's ephemeral socket, so a start that fails
    /// is retried, at most 10 times within 5 s.
    pub fn restart(&mut self, extra: &[&str]) -> Result<ServerProc> {
        self.proc.kill();
        let dir = self
            .data_dir
            .parent()
            .context("data dir has no parent")?
            .to_path_buf();
        let listen = self.udp.to_string();
        let tcp = self.tcp.map(|t| t.to_string());
        let mut args: Vec<&str> = vec!["--listen", &listen];
        match &tcp {
            Some(t) => args.extend(["--tcp-listen", t.as_str()]),
            None => args.push("--no-tcp"),
        }
        args.extend(extra);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tries = 0;
        loop {
            tries += 1;
            match ServerProc::start(&dir, &args) {
                Ok(s) => return Ok(s),
                Err(e) if tries < 10 && Instant::now() < deadline => {
                    eprintln!("restart on {listen} failed (try {tries}): {e:#}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e.context(format!("restart on {listen} after {tries} tries"))),
            }
        }
    }

    /// Starts `punch-server` with `--data-dir dir`, `--http 127.0.0.1:0` and
    /// the extra arguments, and waits for its listening line.
    pub fn start(dir: &Path, extra: &[&str]) -> Result<ServerProc> {
        let mut cmd = Command::new(bin("punch-server")?);
        cmd.arg("--data-dir").arg(dir.join("server"));
        if !extra.contains(&"--http") {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(extra);
        cmd.env_remove("PUNCH_TOKEN");
        let mut proc = Proc::spawn("punch-server", cmd, Some(&dir.join("server.log")))?;
        let line = proc.wait_line("punch-server udp=", Duration::from_secs(20))?;
        let field = |k: &str| -> Result<String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
                .with_context(|| format!("no {k} in {line:?}"))
        };
        Ok(ServerProc {
            udp: field("udp=")?.parse()?,
            http: field("http=")?.parse()?,
            fingerprint: field("fingerprint=")?,
            tcp: field("tcp=")?.parse().ok(),
            data_dir: dir.join("server"),
            proc,
        })
    }

    /// An agent command pointed at this server, bound to the loopback
    /// address of the server's family: test traffic stays on loopback, and
    /// agents do not offer (and punch to) the machine's other interfaces.
    pub fn agent(&self) -> Result<Command> {
        let mut cmd = Command::new(bin("punch-agent")?);
        let bind = if self.udp.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        cmd.arg("--server")
            .arg(self.udp.to_string())
            .arg("--server-fingerprint")
            .arg(&self.fingerprint)
            .args(["--bind", bind]);
        clear_agent_env(&mut cmd);
        Ok(cmd)
    }

    /// Starts `punch-agent serve --id ID` and waits until it is registered.
    pub fn serve(&self, dir: &Path, id: &str, extra: &[&str]) -> Result<Proc> {
        let mut cmd = self.agent()?;
        cmd.args(["serve", "--id", id, "--key-file"])
            .arg(dir.join(format!("{id}.key")))
            .args(extra);
        let mut p = Proc::spawn(id, cmd, Some(&dir.join(format!("{id}.log"))))?;
        p.wait_line("serving as", Duration::from_secs(20))?;
        Ok(p)
    }

    /// GET a path on the server's HTTP port, returning the body.
    pub fn http_get(&self, path: &str) -> Result<String> {
        http_get(self.http, path)
    }
}

/// A minimal HTTP/1.1 GET for tests (no external client needed).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}

/// Result of one `punch-agent` run.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The stdout parsed as one JSON object.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("stdout is not one JSON object: {self:?}"))
    }
}

/// Runs a command to completion within `timeout`. Its output is read as
/// it comes (a child writing more than a pipe holds would otherwise block
/// until the timeout).
pub fn run(mut cmd: Command, timeout: Duration) -> Result<Run> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn()?;
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let Some(status) = status else {
        bail!(
            "command timed out after {timeout:?}: {cmd:?}\nstdout: {}\nstderr: {}",
            tail(&stdout),
            tail(&stderr)
        );
    };
    Ok(Run {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// The last 4 KiB of `s`: enough to see why, not a flood.
fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(4096);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A `redis-server` on loopback for cluster tests: no persistence, so a
/// restart comes back empty (what the servers must survive).
pub struct RedisProc {
    pub proc: Proc,
    pub port: u16,
}

impl RedisProc {
    /// Is `redis-server` installed?
    pub fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts it on `port` (0: a free one) and waits until it accepts.
    pub fn start(dir: &Path, port: u16) -> Result<RedisProc> {
        let port = if port == 0 {
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        } else {
            port
        };
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir);
        let mut proc = Proc::spawn_tee("redis-server", cmd, &dir.join("redis.log"))?;
        proc.wait_line("Ready to accept connections", Duration::from_secs(10))?;
        Ok(RedisProc { proc, port })
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

mod raw_client;
pub use raw_client::{RawClient, RAW_WAIT};

/// The `p` quantile (0 to 1, nearest rank) of `v`, sorting it; `None` when
/// it is empty.
pub fn quantile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize])
}
