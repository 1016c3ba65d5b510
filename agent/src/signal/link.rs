//! The agent's side of its link to the server, as the rest of the agent
//! uses it: numbered requests and their answers, notices, the
//! registration status, what the server speaks and how relay frames
//! reach it.

use crate::{clock, socket, AgentError, AgentEvent, Inner, Reply, Status};
use punch_protocol::signal::{ClientMsg, Transport};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// The signaling client's state: what the channel tasks set and the rest
/// of the agent reads through [`Inner`]'s methods below.
pub(crate) struct ServerLink {
    /// Where messages to the server go, while a channel is up.
    pub(crate) control: Mutex<Option<mpsc::Sender<ClientMsg>>>,
    /// The server's UDP address as last resolved (also the relay).
    pub(crate) server_addr: Mutex<Option<SocketAddr>>,
    /// Which of the configured servers (a cluster) is in use.
    pub(crate) server_idx: AtomicUsize,
    /// The channel signaling runs on now, if registered.
    pub(crate) transport: Mutex<Option<Transport>>,
    /// Registered over TCP with no UDP mapping known: nobody can punch to
    /// us.
    pub(crate) tcp_only: AtomicBool,
    /// The protocol version the server welcomed us with.
    pub(crate) server_version: AtomicU16,
    /// The server's clock against ours, from the TCP channel.
    pub(crate) server_clock: clock::ServerClock,
    /// Counts new channels to the server (connections re-punch on a change).
    pub(crate) channel_changes: watch::Sender<u64>,
    /// Trust anchors for a front, loaded on first use.
    roots: OnceLock<Option<rustls::RootCertStore>>,
    /// Requests waiting for their answers, by number.
    pub(crate) pending: Mutex<HashMap<u32, oneshot::Sender<Reply>>>,
    next_req: AtomicU32,
}

impl Default for ServerLink {
    fn default() -> Self {
        ServerLink {
            control: Mutex::new(None),
            server_addr: Mutex::new(None),
            server_idx: AtomicUsize::new(0),
            transport: Mutex::new(None),
            tcp_only: AtomicBool::new(false),
            server_version: AtomicU16::new(0),
            server_clock: clock::ServerClock::default(),
            channel_changes: watch::channel(0).0,
            roots: OnceLock::new(),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU32::new(1),
        }
    }
}

impl Inner {
    /// How relay frames reach the server now: over the WebSocket while
    /// signaling runs there, else over UDP.
    pub(crate) fn relay_via(&self) -> Option<socket::RelayVia> {
        if *self.link.transport.lock().expect("not poisoned") == Some(Transport::Tcp) {
            return Some(socket::RelayVia::Tcp);
        }
        self.link
            .server_addr
            .lock()
            .expect("not poisoned")
            .map(socket::RelayVia::Udp)
    }

    /// Registered with the server now.
    pub(crate) fn registered(&self) -> bool {
        matches!(*self.status.borrow(), Status::Registered { .. })
    }

    /// Sets the registration status and tells the event stream.
    pub(crate) fn set_status(&self, s: Status) {
        let event = match &s {
            Status::Registered { observed } => Some(AgentEvent::Registered {
                server: super::current_server(self),
                transport: self
                    .link
                    .transport
                    .lock()
                    .expect("not poisoned")
                    .unwrap_or_default(),
                observed: *observed,
            }),
            Status::Connecting(Some(e)) => Some(AgentEvent::Disconnected { error: e.clone() }),
            Status::Connecting(None) => None,
            Status::Failed(e) => Some(AgentEvent::Stopped { error: e.clone() }),
        };
        self.status.send_replace(s);
        if let Some(e) = event {
            self.events.emit(e);
        }
    }

    /// Registered over TCP with no UDP mapping of our own.
    pub(crate) fn tcp_only(&self) -> bool {
        self.link.tcp_only.load(Ordering::SeqCst)
    }

    /// The front's trust anchors: `--server-ca`, else the system roots;
    /// `None` (pinned key only) when neither loads.
    pub(crate) fn front_roots(&self) -> Option<rustls::RootCertStore> {
        self.link
            .roots
            .get_or_init(
                || match punch_tls::tcp::load_roots(self.config.server_ca.as_deref()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!("{e}; only the server's pinned key is accepted on TCP");
                        None
                    }
                },
            )
            .clone()
    }
    /// Sends a request and waits for its answer.
    pub(crate) async fn request(
        &self,
        make: impl FnOnce(u32) -> ClientMsg,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        let req = self.link.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let control = self.link.control.lock().expect("not poisoned").clone();
        let Some(control) = control else {
            return Err(AgentError::ServerUnreachable {
                server: self.config.server.clone(),
                reason: "not connected".into(),
            });
        };
        self.link
            .pending
            .lock()
            .expect("not poisoned")
            .insert(req, tx);
        // However this ends (an answer, a time-out, the caller dropping the
        // request midway), the slot goes; after an answer it is gone already.
        struct Forget<'a>(&'a Inner, u32);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0
                    .link
                    .pending
                    .lock()
                    .expect("not poisoned")
                    .remove(&self.1);
            }
        }
        let _forget = Forget(self, req);
        let lost = || AgentError::ServerUnreachable {
            server: self.config.server.clone(),
            reason: "signaling connection lost".into(),
        };
        if control.send(make(req)).await.is_err() {
            return Err(lost());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(lost()),
            Err(_) => Err(AgentError::Timeout("no answer from the server".into())),
        }
    }

    /// Does the server read messages of protocol version `v`?
    pub(crate) fn server_speaks(&self, v: u16) -> bool {
        self.link
            .server_version
            .load(std::sync::atomic::Ordering::SeqCst)
            >= v
    }

    /// Tells the server our NAT class and, if it reads it, our port
    /// allocator.
    pub(crate) fn report_nat(&self, nat: punch_protocol::signal::NatClass) {
        self.notify(ClientMsg::Nat(nat));
        let alloc = self.nat.alloc();
        if alloc != punch_protocol::allocator::Allocator::Unknown && self.server_speaks(5) {
            self.notify(ClientMsg::Allocator(alloc));
        }
    }

    /// Sends a message without waiting for an answer (dropped when the
    /// channel is down or full: notices are sent again on reconnect).
    pub(crate) fn notify(&self, msg: ClientMsg) {
        if let Some(c) = self.link.control.lock().expect("not poisoned").as_ref() {
            let _ = c.try_send(msg);
        }
    }
}
