//! `punch-agent connect`: one connection and one round trip, for scripts
//! that want to know whether and how TARGET is reachable.

use crate::args::Common;
use crate::output::{first_hop_family, path_now, round3};
use crate::session::connect_timed;
use punch_agent::AgentError;
use serde_json::json;

pub async fn run(c: &Common, target: &str, json: bool, timeout: f64) -> Result<(), AgentError> {
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let mut pinger = pc
        .pinger()
        .await
        .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
    let rtt = pinger
        .ping()
        .await
        .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
    let connect_ms = pc.path.connect_time.as_secs_f64() * 1e3;
    let rtt_ms = rtt.as_secs_f64() * 1e3;
    let (kind, remote, transport) = path_now(&pc);
    let family = first_hop_family(&pc);
    if json {
        println!(
            "{}",
            json!({
                "target": target,
                "path": kind.as_str(),
                "family": family,
                "initial_path": pc.path.kind.as_str(),
                "remote_addr": remote,
                "transport": transport.as_str(),
                "connect_ms": round3(connect_ms),
                "rtt_ms": round3(rtt_ms),
                "worker_id": agent.worker_id(),
                "session": pc.path.session.to_string(),
                "via_mapped": pc.path.via_mapped,
                "strategy": pc.path.strategy.map(|s| s.as_str()),
                "relay_reason": pc.path.relay_reason.map(|r| r.as_str()),
                "port_mapping": agent.port_mapping(),
            })
        );
    } else {
        println!(
            "connected to {target} via {} path {remote} ({} over {family}) in {connect_ms:.1} ms, rtt {rtt_ms:.2} ms",
            kind.as_str(),
            transport.as_str(),
        );
    }
    pc.close().await;
    agent.close().await;
    Ok(())
}
