//! Headless Chromium driven over the DevTools protocol: open a page, run
//! script in it, wait for what it shows, take screenshots. For the status
//! page's tests and its documentation images.

use anyhow::{bail, Context, Result};
use base64::Engine;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The flags that keep Chromium off the network but for the page itself
/// (without them it calls Google's hosts, refused here, many at a time).
pub const QUIET_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// A running headless Chromium with one page attached. It speaks DevTools
/// over a pair of pipes (`--remote-debugging-pipe`: commands on its fd 3,
/// answers and events on its fd 4, each message ended by a NUL), which
/// also reach a browser started inside another network namespace.
pub struct Browser {
    to: std::fs::File,
    from: mpsc::Receiver<serde_json::Value>,
    session: String,
    next_id: u64,
    child: Child,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors on success; we own them after.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Browser {
    /// Starts Chromium on `url` with its profile under `dir`, and attaches
    /// to the page. `prefix` runs it inside something (`ip netns exec NS`).
    pub fn open(url: &str, dir: &Path, prefix: &[&str]) -> Result<Browser> {
        use std::os::fd::AsRawFd;
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile)?;
        let (cmd_r, cmd_w) = pipe()?;
        let (ev_r, ev_w) = pipe()?;
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.push("chromium".into());
        argv.extend(QUIET_FLAGS.iter().map(|s| s.to_string()));
        argv.push(format!("--user-data-dir={}", profile.display()));
        argv.push("--remote-debugging-pipe".into());
        argv.push("--window-size=1280,1000".into());
        argv.push(url.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("chromium.log"))?);
        let (r, w) = (cmd_r.as_raw_fd(), ev_w.as_raw_fd());
        // SAFETY: only async-signal-safe fcntl/dup2/close between fork and
        // exec. The pipes may already sit on 3 or 4, so they are first
        // copied out of the way; dup2 onto 3 and 4 clears close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                let r2 = libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(r2);
                libc::close(w2);
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning chromium")?;
        drop((cmd_r, ev_w));
        let (tx, from) = mpsc::channel();
        let events = std::fs::File::from(ev_r);
        std::thread::spawn(move || {
            for msg in BufReader::new(events).split(0) {
                let Ok(msg) = msg else { break };
                let Ok(v) = serde_json::from_slice(&msg) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut b = Browser {
            to: std::fs::File::from(cmd_w),
            from,
            session: String::new(),
            next_id: 1,
            child,
        };
        // The page target the URL opened.
        let deadline = Instant::now() + Duration::from_secs(20);
        let target = loop {
            let t = b.call("Target.getTargets", serde_json::json!({}))?;
            let page = t["targetInfos"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["targetId"].as_str().map(str::to_string));
            if let Some(id) = page {
                break id;
            }
            if Instant::now() > deadline {
                bail!("no page target: {t}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let a = b.call(
            "Target.attachToTarget",
            serde_json::json!({"targetId": target, "flatten": true}),
        )?;
        b.session = a["sessionId"]
            .as_str()
            .context("no session id")?
            .to_string();
        Ok(b)
    }

    /// Calls a DevTools method (on the page once attached) and returns its
    /// result.
    pub fn call(&mut self, method: &str, params: serde_json::Value) -> Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() && !method.starts_with("Browser.") {
            msg["sessionId"] = self.session.clone().into();
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .with_context(|| format!("{method}: chromium's pipe"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.from.recv_timeout(left) {
                Ok(v) => v,
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("{method}: no answer within 30 s"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{method}: chromium exited ({:?})", self.child.try_wait())
                }
            };
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value.
    pub fn eval(&mut self, expr: &str) -> Result<serde_json::Value> {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `expr` is true in the page. The page changes on events
    /// this process cannot see, so it asks every 50 ms, within `limit`.
    pub fn wait_for(&mut self, expr: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            // An exception (the page not loaded yet) is "not yet" too.
            let last = self.eval(expr);
            if matches!(last, Ok(serde_json::Value::Bool(true))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body.innerText").unwrap_or_default();
                bail!("not true within {limit:?}: {expr} (last: {last:?})\npage:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets the viewport: `mobile` emulates a phone.
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({"width": width, "height": height, "deviceScaleFactor": if mobile { 2 } else { 1 }, "mobile": mobile}),
        )?;
        Ok(())
    }

    /// Saves a PNG of the whole page.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.call(
            "Page.captureScreenshot",
            serde_json::json!({"format": "png", "captureBeyondViewport": true}),
        )?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().context("no screenshot data")?)?;
        anyhow::ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).with_context(|| format!("{}", path.display()))?;
        Ok(())
    }

    /// Closes the browser, waiting (bounded) for it to exit.
    pub fn close(mut self) -> Result<()> {
        let _ = self.call("Browser.close", serde_json::json!({}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("chromium did not exit within 10 s of Browser.close");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Opens a punch-server status page at `url` and saves, once its stream is
/// live, `status-page.png` (1280 wide) and `status-page-phone.png` (390
/// wide, as a phone) into `out`.
pub fn status_page_screenshots(
    url: &str,
    profile: &Path,
    prefix: &[&str],
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let mut b = Browser::open(url, profile, prefix)?;
    b.viewport(1280, 1000, false)?;
    let live = "document.getElementById('live').textContent === 'live'";
    b.wait_for(live, Duration::from_secs(20))?;
    b.screenshot(&out.join("status-page.png"))?;
    b.viewport(390, 844, true)?;
    let fits = "document.documentElement.scrollWidth <= window.innerWidth + 1";
    b.wait_for(fits, Duration::from_secs(20))?;
    b.screenshot(&out.join("status-page-phone.png"))?;
    b.close()?;
    eprintln!("status page screenshots in {}", out.display());
    Ok(())
}
