//! Registry queries: `list`, `discover` and `wait`. Each registers a
//! one-off agent, asks the server once, and leaves.

use crate::args::Common;
use crate::config::secs;
use crate::session::query_agent;
use punch_agent::AgentError;
use serde_json::json;

/// A worker as `list --json` and `discover --json` print it (the same
/// fields as the server's HTTP API).
fn worker_json(w: &punch_protocol::signal::WorkerInfo) -> serde_json::Value {
    json!(punch_protocol::view::WorkerView::from(w.clone()))
}

pub async fn list(
    c: &Common,
    kind: Option<&str>,
    tag: Option<&str>,
    json: bool,
) -> Result<(), AgentError> {
    let agent = query_agent(c).await?;
    let r = agent.list(kind, tag).await;
    agent.close().await;
    let workers = r?;
    if json {
        let v: Vec<_> = workers.iter().map(worker_json).collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<24} {:<12} {:<7} {:<22} {:<10} TAGS",
        "WORKER", "TYPE", "STATE", "ADDRESS", "NAT"
    );
    for w in &workers {
        println!(
            "{:<24} {:<12} {:<7} {:<22} {:<10} {}",
            w.id,
            w.kind.as_deref().unwrap_or("-"),
            w.state.as_str(),
            w.observed,
            w.nat.map(|n| n.label()).unwrap_or_else(|| "-".into()),
            w.tags.join(",")
        );
    }
    Ok(())
}

pub async fn discover(c: &Common, kind: &str, json: bool) -> Result<(), AgentError> {
    punch_protocol::signal::validate_name("type", kind).map_err(AgentError::Config)?;
    let agent = query_agent(c).await?;
    let r = agent.discover(kind).await;
    agent.close().await;
    match r? {
        Some(w) if json => println!("{}", worker_json(&w)),
        Some(w) => println!("{}", w.id),
        None => {
            return Err(AgentError::UnknownWorker(format!(
                "no online worker of type {kind}"
            )))
        }
    }
    Ok(())
}

pub async fn wait(c: &Common, worker: &str, timeout: f64) -> Result<(), AgentError> {
    let limit = secs(timeout, "--timeout")?;
    let agent = query_agent(c).await?;
    let r = agent.wait_for(worker, limit).await;
    agent.close().await;
    match r {
        Ok(w) => {
            println!("{} is online at {}", w.id, w.observed);
            Ok(())
        }
        Err(AgentError::Timeout(_)) => Err(AgentError::Timeout(format!(
            "{worker} did not come online within {timeout} s"
        ))),
        Err(e) => Err(e),
    }
}

/// `list --lan`: what LAN discovery sees within `wait` seconds (no server
/// needed: the agent does not wait to register).
pub async fn list_lan(c: &Common, wait: f64, json: bool) -> Result<(), AgentError> {
    let limit = secs(wait, "--lan-wait")?;
    let mut cfg = crate::session::quiet_config(c)?;
    cfg.lan_discovery = true;
    let agent = punch_agent::Agent::start(cfg).await?;
    tokio::time::sleep(limit).await;
    let peers = agent.lan_peers();
    agent.close().await;
    if json {
        println!("{}", json!(peers));
        return Ok(());
    }
    println!("{:<24} {:<18} ENDPOINTS", "WORKER", "KEY");
    for p in &peers {
        let eps: Vec<String> = p.endpoints.iter().map(|e| e.to_string()).collect();
        println!(
            "{:<24} {:<18} {}",
            p.worker_id,
            &p.fingerprint[..16],
            eps.join(",")
        );
    }
    Ok(())
}

/// `list --known`: the address book of this agent's key.
pub async fn list_known(c: &Common, json: bool) -> Result<(), AgentError> {
    let cfg = crate::session::quiet_config(c)?;
    if cfg.key_file.is_none() {
        return Err(AgentError::Config(
            "list --known reads the address book beside a key: give --id (its default key) or --key-file".into(),
        ));
    }
    let agent = punch_agent::Agent::start(cfg).await?;
    let peers = agent.known_peers();
    agent.close().await;
    if json {
        println!("{}", json!(peers));
        return Ok(());
    }
    println!(
        "{:<24} {:<18} {:<20} ENDPOINTS",
        "WORKER", "KEY", "LAST CONNECTED"
    );
    for p in &peers {
        let eps: Vec<String> = p.endpoints.iter().map(|e| e.to_string()).collect();
        let when = ago(p.last_ok);
        println!(
            "{:<24} {:<18} {:<20} {}",
            p.worker_id,
            &p.fingerprint[..16],
            when,
            eps.join(",")
        );
    }
    Ok(())
}

/// `42 s ago`, `5 min ago`, `3 h ago`, `2 d ago` for a Unix time.
fn ago(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match now.saturating_sub(unix) {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}
