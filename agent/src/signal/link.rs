//! The agent's side of its link to the server, as the rest of the agent
//! uses it: numbered requests and their answers, notices, the
//! registration status, what the server speaks and how relay frames
//! reach it.

use crate::{socket, AgentError, AgentEvent, Inner, Reply, Status};
use punch_protocol::signal::ClientMsg;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::oneshot;

impl Inner {
    /// How relay frames reach the server now: over the WebSocket while
    /// signaling runs there, else over UDP.
    pub(crate) fn relay_via(&self) -> Option<socket::RelayVia> {
        if *self.transport.lock().expect("not poisoned")
            == Some(punch_protocol::signal::Transport::Tcp)
        {
            return Some(socket::RelayVia::Tcp);
        }
        self.server_addr
            .lock()
            .expect("not poisoned")
            .map(socket::RelayVia::Udp)
    }

    /// Sets the registration status and tells the event stream.
    pub(crate) fn set_status(&self, s: Status) {
        let event = match &s {
            Status::Registered { observed } => Some(AgentEvent::Registered {
                server: super::current_server(self),
                transport: self
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
        self.tcp_only.load(Ordering::SeqCst)
    }

    /// The front's trust anchors: `--server-ca`, else the system roots;
    /// `None` (pinned key only) when neither loads.
    pub(crate) fn front_roots(&self) -> Option<rustls::RootCertStore> {
        self.roots
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
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let control = self.control.lock().expect("not poisoned").clone();
        let Some(control) = control else {
            return Err(AgentError::ServerUnreachable {
                server: self.config.server.clone(),
                reason: "not connected".into(),
            });
        };
        self.pending.lock().expect("not poisoned").insert(req, tx);
        // However this ends (an answer, a time-out, the caller dropping the
        // request midway), the slot goes; after an answer it is gone already.
        struct Forget<'a>(&'a Inner, u32);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.pending.lock().expect("not poisoned").remove(&self.1);
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
        self.server_version
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
        if let Some(c) = self.control.lock().expect("not poisoned").as_ref() {
            let _ = c.try_send(msg);
        }
    }
}
