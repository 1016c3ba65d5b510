//! File sharing from the downloading side: `files` lists what TARGET
//! shares (serve --share), `get` downloads one of them.

use crate::args::Common;
use crate::session::connect_timed;
use punch_agent::AgentError;
use serde_json::json;
use std::path::PathBuf;

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

pub async fn get(
    c: &Common,
    target: &str,
    name: &str,
    output: Option<PathBuf>,
    timeout: f64,
) -> Result<(), AgentError> {
    punch_apps::files::check_name(name).map_err(AgentError::Config)?;
    let out = match output {
        Some(o) => o,
        None => PathBuf::from(
            std::path::Path::new(name)
                .file_name()
                .ok_or_else(|| AgentError::Config(format!("{name:?} has no file name")))?,
        ),
    };
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let r = punch_apps::files::get(&pc, name, &out, &progress).await;
    bar.finish_and_clear();
    pc.close().await;
    agent.close().await;
    let (size, resumed, hash) = r.map_err(|e| match e {
        punch_apps::files::FileError::Io(m) => AgentError::Io(m),
        other => AgentError::PeerConnect(format!("{target}: {other}")),
    })?;
    let resumed = if resumed > 0 {
        format!(" (resumed from byte {resumed})")
    } else {
        String::new()
    };
    println!(
        "got {name}: {size} bytes, blake3 {hash} -> {}{resumed}",
        out.display()
    );
    Ok(())
}
