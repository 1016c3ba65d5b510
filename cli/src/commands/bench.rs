//! `punch-agent bench`: throughput each way over the peer connection.

use crate::args::Common;
use crate::output::{first_hop_family, path_now, round3};
use crate::session::connect_timed;
use punch_agent::AgentError;
use serde_json::json;
use std::time::Duration;

pub async fn run(
    c: &Common,
    target: &str,
    seconds: u32,
    json: bool,
    timeout: f64,
) -> Result<(), AgentError> {
    if !(1..=60).contains(&seconds) {
        return Err(AgentError::Config(
            "--seconds must be between 1 and 60".into(),
        ));
    }
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let per = Duration::from_secs(seconds as u64);
    let peer_err = |e: punch_agent::PeerError| AgentError::PeerConnect(e.to_string());
    let limit = per + Duration::from_secs(30);
    let late = || AgentError::Timeout(format!("{target} stopped answering during the bench"));
    let (kind, remote, transport) = path_now(&pc);
    if !json {
        println!(
            "bench {target} via {} path {remote} ({}), {seconds} s each way",
            kind.as_str(),
            transport.as_str()
        );
    }
    let (up_bytes, up_time) = tokio::time::timeout(limit, punch_apps::bench::upload(&pc, per))
        .await
        .map_err(|_| late())?
        .map_err(peer_err)?;
    let up = up_bytes as f64 / up_time.as_secs_f64() / 1e6;
    if !json {
        println!("upload:   {up:9.1} MB/s ({:.0} Mbit/s)", up * 8.0);
    }
    let (down_bytes, down_time) =
        tokio::time::timeout(limit, punch_apps::bench::download(&pc, per))
            .await
            .map_err(|_| late())?
            .map_err(peer_err)?;
    let down = down_bytes as f64 / down_time.as_secs_f64() / 1e6;
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
                "seconds": seconds,
                "upload_bytes": up_bytes,
                "upload_mb_per_s": round3(up),
                "download_bytes": down_bytes,
                "download_mb_per_s": round3(down),
                "rtt_ms": round3(pc.conn.rtt().as_secs_f64() * 1e3),
            })
        );
    } else {
        println!("download: {down:9.1} MB/s ({:.0} Mbit/s)", down * 8.0);
    }
    pc.close().await;
    agent.close().await;
    Ok(())
}
