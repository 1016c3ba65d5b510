//! Routing probes to the punch sessions they name: each session gets a
//! bounded queue, and an agent runs a bounded number of sessions.

use punch_protocol::probe::Probe;
use punch_protocol::signal::SessionId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// A probe datagram delivered to a session.
#[derive(Debug)]
pub struct ProbeDatagram {
    /// Where it came from.
    pub from: SocketAddr,
    /// The whole datagram.
    pub data: Vec<u8>,
}

/// Probes queued per session before they are dropped.
const SESSION_QUEUE: usize = 256;
/// Most concurrent punch sessions per agent.
pub const MAX_SESSIONS: usize = 256;

/// Routes probes to the sessions they belong to.
#[derive(Debug, Default)]
pub struct ProbeRouter {
    sessions: Mutex<HashMap<SessionId, mpsc::Sender<ProbeDatagram>>>,
    /// Where probes of no running session go, when someone listens: the
    /// knocks of peers that find us without the server.
    stray: Mutex<Option<mpsc::Sender<ProbeDatagram>>>,
    /// Probes for no known session, or malformed: dropped and counted.
    pub dropped: AtomicU64,
}

impl ProbeRouter {
    /// Starts routing a session's probes; `None` when too many run.
    pub fn register(&self, session: SessionId) -> Option<mpsc::Receiver<ProbeDatagram>> {
        let mut s = self.sessions.lock().expect("not poisoned");
        if s.len() >= MAX_SESSIONS && !s.contains_key(&session) {
            return None;
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        s.insert(session, tx);
        Some(rx)
    }

    /// Stops routing a session.
    pub fn unregister(&self, session: SessionId) {
        self.sessions.lock().expect("not poisoned").remove(&session);
    }

    /// Probes of no running session from now on (a bounded queue: what
    /// does not fit is dropped and counted).
    pub(crate) fn strays(&self, queue: usize) -> mpsc::Receiver<ProbeDatagram> {
        let (tx, rx) = mpsc::channel(queue);
        *self.stray.lock().expect("not poisoned") = Some(tx);
        rx
    }

    /// Hands a probe to its session (dropped and counted when none has it,
    /// or its queue is full).
    pub(crate) fn route(&self, from: SocketAddr, data: &[u8]) {
        let Ok(session) = Probe::peek_session(data) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let d = || ProbeDatagram {
            from: punch_net::canonical(from),
            data: data.to_vec(),
        };
        let delivered = match self.sessions.lock().expect("not poisoned").get(&session) {
            Some(tx) => tx.try_send(d()).is_ok(),
            None => self
                .stray
                .lock()
                .expect("not poisoned")
                .as_ref()
                .is_some_and(|tx| tx.try_send(d()).is_ok()),
        };
        if !delivered {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
