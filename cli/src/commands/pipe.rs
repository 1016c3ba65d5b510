//! `punch-agent pipe`: stdin and stdout joined to a peer over one stream.

use crate::args::Common;
use crate::session::connect_timed;
use punch_agent::AgentError;
use punch_apps::pipe::{self, PipeError};

pub async fn run(c: &Common, target: &str, timeout: f64) -> Result<(), AgentError> {
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let (send, recv) = pipe::open(&pc).await.map_err(|e| match e {
        PipeError::Refused(m) => AgentError::PeerConnect(format!("{target} refuses the pipe: {m}")),
        e => AgentError::PeerConnect(e.to_string()),
    })?;
    let (received, sent) = pipe::join(tokio::io::stdin(), tokio::io::stdout(), send, recv).await;
    tracing::debug!(received, sent, "pipe closed");
    pc.close().await;
    agent.close().await;
    Ok(())
}
