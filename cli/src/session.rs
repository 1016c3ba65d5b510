//! The one-off agent a command works through: registered for a registry
//! query, or registered and connected to one peer, within the command's
//! limits.

use crate::args::Common;
use crate::config::{config, secs};
use punch_agent::portmap::PortMapping;
use punch_agent::{Agent, AgentBuilder, AgentError, PeerConnection};
use std::time::{Duration, Instant};

/// The config of a one-off agent that asks and goes: no NAT check, and no
/// port of its own on the gateway.
pub fn quiet_config(c: &Common) -> Result<punch_agent::AgentConfig, AgentError> {
    let mut cfg = config(c, false)?;
    cfg.nat_check = false;
    cfg.port_mapping.mode = PortMapping::Off;
    Ok(cfg)
}

/// A one-off agent for registry queries.
pub async fn query_agent(c: &Common) -> Result<Agent, AgentError> {
    let agent = Agent::start(quiet_config(c)?).await?;
    agent.registered(Duration::from_secs(15)).await?;
    Ok(agent)
}

/// Longest a connect to a peer the address book knows waits for the
/// server.
const KNOWN_PEER_WAIT: Duration = Duration::from_secs(2);

/// Waits until the agent registers (`Ok`) or its first attempt fails, or
/// `limit` passes (the reason as `Err`).
async fn first_attempt(agent: &Agent, limit: Duration) -> Result<(), AgentError> {
    let mut rx = agent.watch_status();
    let wait = async {
        loop {
            match &*rx.borrow_and_update() {
                punch_agent::Status::Registered { .. } => return Ok(()),
                punch_agent::Status::Failed(e) | punch_agent::Status::Connecting(Some(e)) => {
                    return Err(e.clone())
                }
                punch_agent::Status::Connecting(None) => {}
            }
            if rx.changed().await.is_err() {
                return Err(AgentError::Io("agent stopped".into()));
            }
        }
    };
    tokio::time::timeout(limit, wait).await.unwrap_or_else(|_| {
        Err(AgentError::ServerUnreachable {
            server: agent.server().to_string(),
            reason: format!("not registered within {:.1} s", limit.as_secs_f64()),
        })
    })
}

/// One limit covers registering and connecting, so a script has one
/// number to set.
pub async fn connect_timed(
    c: &Common,
    target: &str,
    timeout: f64,
) -> Result<(Agent, PeerConnection), AgentError> {
    connect_timed_with(c, target, timeout, |b| b).await
}

/// [`connect_timed`] with an agent `build` adds to (the protocols it
/// serves the peer).
pub async fn connect_timed_with(
    c: &Common,
    target: &str,
    timeout: f64,
    build: impl FnOnce(AgentBuilder) -> AgentBuilder,
) -> Result<(Agent, PeerConnection), AgentError> {
    let limit = secs(timeout, "--timeout")?;
    let agent = build(AgentBuilder::from_config(config(c, false)?))
        .start()
        .await?;
    let deadline = Instant::now() + limit;
    let known = agent
        .known_peers()
        .iter()
        .any(|p| p.worker_id == target && p.reachable_without_server)
        || c.lan_discovery;
    if known {
        // The address book knows the target, or the LAN may: a server that
        // does not answer the first attempt is not waited for (the connect
        // knocks on the peer's last or announced endpoints instead).
        if let Err(e) = first_attempt(&agent, limit.min(KNOWN_PEER_WAIT)).await {
            eprintln!(
                "warning: {e}; connecting to {target} without the server (address book, LAN)"
            );
        }
    } else {
        agent.registered(limit).await?;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let pc = tokio::time::timeout(left, agent.connect(target))
        .await
        .map_err(|_| {
            AgentError::Timeout(format!("no connection to {target:?} within {timeout} s"))
        })??;
    Ok((agent, pc))
}
