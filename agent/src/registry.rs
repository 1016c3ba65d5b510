//! The registry, asked through the signaling channel: who is online, a
//! worker of a type, waiting for one.

use crate::{Agent, AgentError, Reply};
use punch_protocol::signal::{ClientMsg, Query, ServerMsg, WorkerInfo};
use std::time::Duration;

impl Agent {
    async fn query(&self, query: Query, timeout: Duration) -> Result<Vec<WorkerInfo>, AgentError> {
        let target = match &query {
            Query::Get { id } | Query::Wait { id, .. } => id.clone(),
            _ => String::new(),
        };
        match self
            .inner
            .request(|req| ClientMsg::Query { req, query }, timeout)
            .await?
        {
            Reply::Msg(ServerMsg::Workers { workers, .. }) => Ok(workers),
            Reply::Msg(ServerMsg::Error { code, message, .. }) => {
                Err(AgentError::from_code(code, message, &target))
            }
            other => Err(AgentError::Io(format!("unexpected answer {other:?}"))),
        }
    }

    /// Workers online or stale, optionally of a type and with a tag.
    pub async fn list(
        &self,
        kind: Option<&str>,
        tag: Option<&str>,
    ) -> Result<Vec<WorkerInfo>, AgentError> {
        let query = Query::List {
            kind: kind.map(str::to_string),
            tag: tag.map(str::to_string),
        };
        self.query(query, Duration::from_secs(10)).await
    }

    /// A random online worker of a type, if there is one.
    pub async fn discover(&self, kind: &str) -> Result<Option<WorkerInfo>, AgentError> {
        let query = Query::Discover {
            kind: kind.to_string(),
        };
        Ok(self.query(query, Duration::from_secs(10)).await?.pop())
    }

    /// Waits until worker `id` is online (at most `timeout`).
    pub async fn wait_for(&self, id: &str, timeout: Duration) -> Result<WorkerInfo, AgentError> {
        punch_protocol::signal::validate_worker_id(id)
            .map_err(|e| AgentError::Config(format!("worker id {id:?}: {e}")))?;
        let ms = timeout
            .as_millis()
            .min(punch_protocol::signal::MAX_WAIT_MS as u128) as u32;
        let query = Query::Wait {
            id: id.to_string(),
            timeout_ms: ms,
        };
        self.query(query, timeout + Duration::from_secs(10))
            .await?
            .pop()
            .ok_or_else(|| AgentError::Io("empty answer to wait".into()))
    }
}
