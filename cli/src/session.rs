//! The one-off agent a command works through: registered for a registry
//! query, or registered and connected to one peer, within the command's
//! limits.

use crate::args::Common;
use crate::config::{config, secs};
use punch_agent::portmap::PortMapping;
use punch_agent::{Agent, AgentBuilder, AgentError, PeerConnection};
use std::time::{Duration, Instant};

/// A one-off agent for registry queries.
pub async fn query_agent(c: &Common) -> Result<Agent, AgentError> {
    let mut cfg = config(c, false)?;
    cfg.nat_check = false;
    // A one-off query has no use for a port of its own.
    cfg.port_mapping.mode = PortMapping::Off;
    let agent = Agent::start(cfg).await?;
    agent.registered(Duration::from_secs(15)).await?;
    Ok(agent)
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
    agent.registered(limit).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let pc = tokio::time::timeout(left, agent.connect(target))
        .await
        .map_err(|_| {
            AgentError::Timeout(format!("no connection to {target:?} within {timeout} s"))
        })??;
    Ok((agent, pc))
}
