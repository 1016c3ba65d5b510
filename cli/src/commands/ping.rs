//! `punch-agent ping`: round trips over the peer connection, with the
//! path and transport of each, since they can change mid-run.

use crate::args::Common;
use crate::config::secs;
use crate::output::{first_hop_family, path_now, round3};
use crate::session::connect_timed;
use punch_agent::AgentError;
use serde_json::json;
use std::time::Duration;

pub async fn run(
    c: &Common,
    target: &str,
    count: u32,
    interval: f64,
    json: bool,
    timeout: f64,
) -> Result<(), AgentError> {
    if count == 0 || count > 1_000_000 {
        return Err(AgentError::Config(
            "-c must be between 1 and 1000000".into(),
        ));
    }
    let interval = if interval == 0.0 {
        Duration::ZERO
    } else {
        secs(interval, "--interval")?
    };
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let mut pinger = pc
        .pinger()
        .await
        .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
    if !json {
        println!(
            "PING {target} via {} path {}",
            pc.path.kind.as_str(),
            pc.path.remote_addr
        );
    }
    let mut rtts = Vec::with_capacity(count as usize);
    let mut paths = Vec::with_capacity(count as usize);
    let mut transports = Vec::with_capacity(count as usize);
    for seq in 1..=count {
        let rtt = tokio::time::timeout(Duration::from_secs(5), pinger.ping())
            .await
            .map_err(|_| AgentError::Timeout(format!("no echo for seq {seq} within 5 s")))?
            .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
        let ms = rtt.as_secs_f64() * 1e3;
        let (kind, _) = pc.path_now();
        let transport = pc.transport_now().as_str();
        if !json {
            println!(
                "reply from {target}: seq={seq} time={ms:.3} ms path={} transport={transport}",
                kind.as_str()
            );
        }
        rtts.push(ms);
        paths.push(kind.as_str());
        transports.push(transport);
        if seq < count {
            tokio::time::sleep(interval).await;
        }
    }
    let min = rtts.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().cloned().fold(0.0, f64::max);
    let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
    let (kind, remote, transport) = path_now(&pc);
    let family = first_hop_family(&pc);
    if json {
        println!(
            "{}",
            json!({
                "target": target,
                "path": kind.as_str(),
                "family": family,
                "remote_addr": remote,
                "transport": transport.as_str(),
                "transports": transports,
                "count": count,
                "rtts_ms": rtts.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
                "paths": paths,
                "min_ms": round3(min),
                "avg_ms": round3(avg),
                "max_ms": round3(max),
            })
        );
    } else {
        println!("{count} round trips: min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms");
    }
    pc.close().await;
    agent.close().await;
    Ok(())
}
