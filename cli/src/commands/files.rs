//! File sharing from the downloading side: `files` lists what TARGET
//! shares (serve --share), `get` downloads one of them.

use crate::args::Common;
use crate::session::connect_timed;
use punch_agent::AgentError;
use punch_apps::files::{FileError, TreeProgress};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub async fn list(c: &Common, target: &str, json: bool, timeout: f64) -> Result<(), AgentError> {
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let r = punch_apps::files::list(&pc).await;
    pc.close().await;
    agent.close().await;
    let listing = r.map_err(|e| AgentError::PeerConnect(format!("{target}: {e}")))?;
    for p in &listing.problems {
        eprintln!("warning: {target}: {p}");
    }
    let list = &listing.files;
    if json {
        // blake3 is null for a file the sharer has not hashed yet.
        let v: Vec<_> = list
            .iter()
            .map(|f| {
                let h = (!f.blake3.is_empty()).then_some(&f.blake3);
                json!({"name": f.name, "size": f.size, "blake3": h})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        let mut unhashed = 0;
        for f in list {
            let h = if f.blake3.is_empty() {
                unhashed += 1;
                "(not hashed yet)"
            } else {
                &f.blake3
            };
            println!("{:>14}  {h:<64}  {}", f.size, f.name);
        }
        if unhashed > 0 {
            println!(
                "{} files ({unhashed} not hashed yet: the sharer is hashing them; `get` verifies every download)",
                list.len()
            );
        } else {
            println!("{} files", list.len());
        }
    }
    Ok(())
}

/// How `get` runs.
pub struct GetOpts {
    pub json: bool,
    pub jobs: usize,
    pub timeout: f64,
}

/// Progress lines at most this often (and one at the end).
const JSON_EVERY: Duration = Duration::from_millis(250);

/// The progress bar; drawn nowhere when progress goes out as JSON lines.
fn bar(json: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn fetch_err(target: &str, e: FileError) -> AgentError {
    match e {
        FileError::Io(m) => AgentError::Io(m),
        other => AgentError::PeerConnect(format!("{target}: {other}")),
    }
}

pub async fn get(
    c: &Common,
    target: &str,
    name: &str,
    output: Option<PathBuf>,
    how: GetOpts,
) -> Result<(), AgentError> {
    if !(1..=punch_apps::files::MAX_JOBS).contains(&how.jobs) {
        return Err(AgentError::Config(format!(
            "--jobs must be between 1 and {}",
            punch_apps::files::MAX_JOBS
        )));
    }
    if let Some(dir) = name.strip_suffix('/') {
        return get_dir(c, target, dir, output, how).await;
    }
    punch_apps::files::check_name(name).map_err(AgentError::Config)?;
    let out = match output {
        Some(o) => o,
        None => PathBuf::from(
            std::path::Path::new(name)
                .file_name()
                .ok_or_else(|| AgentError::Config(format!("{name:?} has no file name")))?,
        ),
    };
    let (agent, pc) = connect_timed(c, target, how.timeout).await?;
    let bar = bar(how.json);
    let last = Mutex::new(None::<Instant>);
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
        if how.json && due(&last) {
            println!(
                "{}",
                json!({"event": "progress", "name": name, "bytes": done, "total_bytes": total})
            );
        }
    };
    let started = Instant::now();
    let r = punch_apps::files::get(&pc, name, &out, None, &progress).await;
    bar.finish_and_clear();
    pc.close().await;
    agent.close().await;
    let got = r.map_err(|e| match e {
        FileError::Refused(m) if m.contains("is not a file") => AgentError::PeerConnect(format!(
            "{target}: {m} (for a directory, end the name with a slash: {name}/)"
        )),
        e => fetch_err(target, e),
    })?;
    if let Some(at) = got.corrupt_from {
        eprintln!(
            "warning: the partial file did not match the file's BLAKE3 tree from byte {at}; \
             fetched again from there"
        );
    }
    if how.json {
        println!(
            "{}",
            json!({"event": "done", "name": name, "size": got.size, "blake3": got.blake3,
                   "resumed": got.resumed, "corrupt_from": got.corrupt_from,
                   "path": out, "seconds": started.elapsed().as_secs_f64()})
        );
        return Ok(());
    }
    let resumed = if got.resumed > 0 {
        format!(" (resumed from byte {})", got.resumed)
    } else {
        String::new()
    };
    println!(
        "got {name}: {} bytes, blake3 {} -> {}{resumed}",
        got.size,
        got.blake3,
        out.display()
    );
    Ok(())
}

/// A progress line is due (and the clock restarted).
fn due(last: &Mutex<Option<Instant>>) -> bool {
    let mut g = last.lock().expect("not poisoned");
    if g.is_some_and(|t| t.elapsed() < JSON_EVERY) {
        return false;
    }
    *g = Some(Instant::now());
    true
}

/// `get TARGET DIR/`: the tree under DIR, into `-o` or DIR's last
/// component.
async fn get_dir(
    c: &Common,
    target: &str,
    dir: &str,
    output: Option<PathBuf>,
    how: GetOpts,
) -> Result<(), AgentError> {
    let dir = dir.trim_start_matches('/');
    if !dir.is_empty() {
        punch_apps::files::check_name(dir).map_err(AgentError::Config)?;
    }
    let dest = output.unwrap_or_else(|| match std::path::Path::new(dir).file_name() {
        Some(n) => PathBuf::from(n),
        None => PathBuf::from("."),
    });
    let (agent, pc) = connect_timed(c, target, how.timeout).await?;
    let listing = punch_apps::files::list(&pc).await;
    let listing = match listing {
        Ok(l) => l,
        Err(e) => {
            pc.close().await;
            agent.close().await;
            return Err(fetch_err(target, e));
        }
    };
    for p in &listing.problems {
        eprintln!("warning: {target}: {p}");
    }
    let files = punch_apps::files::under(&listing.files, dir);
    if files.is_empty() {
        pc.close().await;
        agent.close().await;
        return Err(AgentError::PeerConnect(format!(
            "{target} shares no files under {dir:?}/"
        )));
    }
    let bar = bar(how.json);
    let last = Mutex::new(None::<Instant>);
    let progress = |p: TreeProgress| {
        bar.set_length(p.total_bytes);
        bar.set_position(p.bytes);
        bar.set_message(format!("{}/{} files", p.files_done, p.files));
        if how.json && (due(&last) || p.files_done == p.files) {
            println!(
                "{}",
                json!({"event": "progress", "files": p.files, "files_done": p.files_done,
                "skipped": p.skipped, "failed": p.failed, "bytes": p.bytes, "total_bytes": p.total_bytes})
            );
        }
    };
    let started = Instant::now();
    let report = punch_apps::files::get_tree(&pc, &files, &dest, how.jobs, &progress).await;
    bar.finish_and_clear();
    pc.close().await;
    agent.close().await;
    let p = report.progress;
    let secs = started.elapsed().as_secs_f64();
    for (name, e) in &report.failed {
        eprintln!("error: {name}: {e}");
    }
    if how.json {
        println!(
            "{}",
            json!({"event": "done", "files": p.files, "fetched": p.fetched(),
                   "skipped": p.skipped, "failed": p.failed, "bytes": p.total_bytes,
                   "resumed_bytes": report.resumed_bytes, "path": dest, "seconds": secs})
        );
    } else {
        println!(
            "got {dir}/: {} files ({} fetched, {} already complete, {} failed), {} bytes -> {} in {secs:.1} s",
            p.files,
            p.fetched(),
            p.skipped,
            p.failed,
            p.total_bytes,
            dest.display()
        );
    }
    if let Some((name, e)) = report.failed.into_iter().next() {
        return Err(AgentError::PeerConnect(format!(
            "{target}: {} of {} files failed, the first {name}: {e}; run again to resume",
            p.failed, p.files
        )));
    }
    Ok(())
}
