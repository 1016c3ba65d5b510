//! Registry events, waits and barriers: what HTTP long-polls, the event
//! stream and agents' `Wait` queries block on. Every wait is bounded in
//! time and in number.

use crate::registry::Event;
use crate::Shared;
use punch_protocol::signal::WorkerInfo;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, watch, Semaphore};

/// Default cap on waits (worker waits and barrier waits, HTTP and
/// signaling) at once.
pub const MAX_WAITS: usize = 10_000;
/// Named barriers held at once.
pub const MAX_BARRIERS: usize = 10_000;
/// Longest wait honoured; longer ones are capped.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Events buffered for slow subscribers before they miss some.
const EVENT_BUFFER: usize = 1024;

/// One event as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EventRecord {
    /// Increases by one per event.
    pub seq: u64,
    /// `registered`, `address_changed`, `stale`, `deregistered`, `expired`.
    pub event: &'static str,
    pub worker: String,
    pub observed_addr: Option<String>,
    /// RFC 3339, UTC.
    pub at: String,
    /// In cluster mode, the id of the server that holds the worker when it
    /// is another server; absent for this server's own workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// Why a wait did not succeed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("timed out")]
    Timeout,
    #[error("too many waits in progress")]
    Busy,
    #[error("too many barriers")]
    Full,
}

/// Events, waits and barriers.
#[derive(Debug)]
pub struct Hub {
    events: broadcast::Sender<Arc<EventRecord>>,
    seq: AtomicU64,
    waits: Arc<Semaphore>,
    max_waits: usize,
    barriers: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Waits refused because [`MAX_WAITS`] were running.
    pub waits_refused: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(MAX_WAITS)
    }
}

impl Hub {
    /// A hub allowing `max_waits` waits at once.
    pub fn new(max_waits: usize) -> Self {
        Hub {
            events: broadcast::channel(EVENT_BUFFER).0,
            seq: AtomicU64::new(0),
            waits: Arc::new(Semaphore::new(max_waits)),
            max_waits,
            barriers: Mutex::new(HashMap::new()),
            waits_refused: AtomicU64::new(0),
        }
    }

    /// Publishes a registry event.
    pub fn publish(&self, ev: Event) {
        self.publish_record(
            ev.kind.as_str(),
            ev.worker,
            ev.observed.map(|a| a.to_string()),
            None,
        );
    }

    /// Publishes an event, possibly of another server (`server`).
    pub fn publish_record(
        &self,
        event: &'static str,
        worker: String,
        observed_addr: Option<String>,
        server: Option<String>,
    ) {
        let rec = EventRecord {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            event,
            worker,
            observed_addr,
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            server,
        };
        tracing::debug!(event = rec.event, worker = %rec.worker, seq = rec.seq, "registry event");
        let _ = self.events.send(Arc::new(rec));
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.events.subscribe()
    }

    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, WaitError> {
        self.waits.clone().try_acquire_owned().map_err(|_| {
            self.waits_refused.fetch_add(1, Ordering::Relaxed);
            WaitError::Busy
        })
    }

    /// Waits (at most `timeout`, capped at [`MAX_WAIT`]) until `id` is
    /// online; returns at once when it already is.
    pub async fn wait_online(
        &self,
        shared: &Shared,
        id: &str,
        timeout: Duration,
    ) -> Result<WorkerInfo, WaitError> {
        let _permit = self.permit()?;
        // Subscribe before looking, so a registration in between is seen.
        let mut rx = self.subscribe();
        let online = |shared: &Shared| {
            let r = shared.registry.lock().expect("not poisoned");
            r.is_online(id).then(|| r.get(id)).flatten()
        };
        if let Some(w) = online(shared) {
            return Ok(w);
        }
        // In a cluster, it may be online at another server.
        let remote = || async {
            crate::cluster::get_remote(shared, id)
                .await
                .filter(|w| w.state == punch_protocol::signal::WorkerState::Online)
        };
        if shared.cluster.is_some() {
            if let Some(w) = remote().await {
                return Ok(w);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Err(WaitError::Timeout),
                Ok(Ok(ev)) if ev.worker != id => {}
                Ok(Ok(ev)) if ev.server.is_some() => {
                    if ev.event == "registered" {
                        if let Some(w) = remote().await {
                            return Ok(w);
                        }
                    }
                }
                // Our worker's event, or we lagged: look again.
                Ok(_) => {
                    if let Some(w) = online(shared) {
                        return Ok(w);
                    }
                }
            }
        }
    }

    /// Releases barrier `key`: every waiter returns, later waits return at
    /// once.
    pub fn release(&self, key: &str) -> Result<(), WaitError> {
        let mut b = self.barriers.lock().expect("not poisoned");
        if let Some(tx) = b.get(key) {
            tx.send_replace(true);
            return Ok(());
        }
        if b.len() >= MAX_BARRIERS {
            return Err(WaitError::Full);
        }
        b.insert(key.to_string(), watch::channel(true).0);
        Ok(())
    }

    /// Waits until barrier `key` is released (at most `timeout`).
    pub async fn wait_barrier(&self, key: &str, timeout: Duration) -> Result<(), WaitError> {
        let _permit = self.permit()?;
        let mut rx = {
            let mut b = self.barriers.lock().expect("not poisoned");
            match b.get(key) {
                Some(tx) => tx.subscribe(),
                None => {
                    if b.len() >= MAX_BARRIERS {
                        return Err(WaitError::Full);
                    }
                    let tx = watch::channel(false).0;
                    let rx = tx.subscribe();
                    b.insert(key.to_string(), tx);
                    rx
                }
            }
        };
        let released = tokio::time::timeout(timeout.min(MAX_WAIT), rx.wait_for(|r| *r)).await;
        match released {
            Ok(Ok(_)) => Ok(()),
            _ => Err(WaitError::Timeout),
        }
    }

    /// Waits running now.
    pub fn waits_in_progress(&self) -> usize {
        self.max_waits - self.waits.available_permits()
    }
}
