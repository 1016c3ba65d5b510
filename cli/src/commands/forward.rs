//! `punch-agent forward`: local TCP connections to a service TARGET can
//! reach, one QUIC stream each; or reversed, TARGET's connections to us.

use crate::args::Common;
use crate::session::{connect_timed, connect_timed_with};
use punch_agent::AgentError;
use std::net::SocketAddr;

pub async fn run(
    c: &Common,
    target: &str,
    local: SocketAddr,
    remote: SocketAddr,
    timeout: f64,
) -> Result<(), AgentError> {
    use punch_apps::forward::{self, ForwardError};
    let remote_s = remote.to_string();
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    // Refused up front, with the peer's reason, rather than per connection.
    match forward::open(&pc, &remote_s, true).await {
        Ok(_) => {}
        Err(ForwardError::Refused(why)) => {
            return Err(AgentError::PeerConnect(format!(
                "{target} refuses to forward to {remote}: {why}"
            )))
        }
        Err(e) => return Err(AgentError::PeerConnect(e.to_string())),
    }
    let listener = tokio::net::TcpListener::bind(local)
        .await
        .map_err(|e| AgentError::Config(format!("--local {local}: {e}")))?;
    let (kind, _) = pc.path_now();
    println!(
        "forwarding {} -> {target} -> {remote} ({} path)",
        listener.local_addr().unwrap_or(local),
        kind.as_str()
    );
    let pc = std::sync::Arc::new(tokio::sync::Mutex::new(pc));
    let shutdown = punch_net::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (tcp, from) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (agent, pc, remote_s, target) = (
            agent.clone(),
            pc.clone(),
            remote_s.clone(),
            target.to_string(),
        );
        tokio::spawn(async move {
            // The peer connection may have died (peer restarted): connect
            // again for this and later connections.
            let conn = {
                let mut g = pc.lock().await;
                if g.conn.close_reason().is_some() {
                    match agent.connect(&target).await {
                        Ok(new) => *g = new,
                        Err(e) => {
                            tracing::warn!(%from, "cannot reach {target}: {e}");
                            return;
                        }
                    }
                }
                g.clone()
            };
            match forward::open(&conn, &remote_s, false).await {
                Ok((send, recv)) => {
                    let (up, down) = forward::pipe(tcp, send, recv).await;
                    tracing::debug!(%from, up, down, "forwarded connection closed");
                }
                Err(e) => tracing::warn!(%from, "forward to {remote_s} via {target} failed: {e}"),
            }
        });
    }
    pc.lock().await.close().await;
    agent.close().await;
    Ok(())
}

/// `punch-agent forward TARGET --remote-listen IP:PORT --local IP:PORT`:
/// TARGET listens, and every connection it accepts comes back to --local.
pub async fn reverse(
    c: &Common,
    target: &str,
    local: SocketAddr,
    listen: SocketAddr,
    timeout: f64,
) -> Result<(), AgentError> {
    use punch_apps::forward::ForwardError;
    use punch_apps::reverse::{self, ReverseConn};
    // Connections come back as streams TARGET opens: served by this
    // agent's handler, which takes them only from TARGET.
    let conn = ReverseConn::new(target, local);
    let (agent, pc) =
        connect_timed_with(c, target, timeout, |b| b.protocol(reverse::CONN, conn)).await?;
    tokio::spawn(pc.clone().serve());
    let (_send, mut recv) = match reverse::listen(&pc, listen).await {
        Ok(s) => s,
        Err(ForwardError::Refused(why)) => {
            return Err(AgentError::PeerConnect(format!(
                "{target} refuses to listen on {listen}: {why}"
            )))
        }
        Err(e) => return Err(AgentError::PeerConnect(e.to_string())),
    };
    let (kind, _) = pc.path_now();
    println!(
        "reverse forwarding {target}:{listen} -> {local} ({} path)",
        kind.as_str()
    );
    let shutdown = punch_net::shutdown_signal();
    let ended = tokio::select! {
        _ = shutdown => false,
        _ = reverse::closed(&mut recv) => true,
    };
    pc.close().await;
    agent.close().await;
    if ended {
        return Err(AgentError::PeerConnect(format!(
            "{target} stopped listening on {listen} (the connection ended)"
        )));
    }
    Ok(())
}
