//! STUN from the agent's one socket: a Binding request and its answer,
//! matched by transaction id, so the mapping learned is the one peers see.

use super::PunchSocket;
use punch_protocol::stun;
use std::net::SocketAddr;

impl PunchSocket {
    /// Asks a STUN server for our mapped address, from the agent's one
    /// socket (so it is the mapping peers see), with retries.
    pub async fn stun_query(
        &self,
        server: SocketAddr,
        limit: std::time::Duration,
    ) -> Option<SocketAddr> {
        let txid = stun::new_txid();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.stun_waiters
            .lock()
            .expect("not poisoned")
            .insert(txid, tx);
        let req = stun::binding_request(&txid, false, false);
        let deadline = tokio::time::Instant::now() + limit;
        let mut wait = std::time::Duration::from_millis(100);
        let mut out = None;
        while tokio::time::Instant::now() < deadline {
            if self.send_raw(server, &req).is_err() {
                break;
            }
            let until = (tokio::time::Instant::now() + wait).min(deadline);
            if let Ok(Ok(resp)) = tokio::time::timeout_at(until, &mut rx).await {
                out = stun::parse(&resp)
                    .ok()
                    .filter(|m| m.msg_type == stun::BINDING_SUCCESS)
                    .and_then(|m| m.mapped_address());
                break;
            }
            wait *= 2;
        }
        self.stun_waiters
            .lock()
            .expect("not poisoned")
            .remove(&txid);
        out.map(punch_net::canonical)
    }

    pub(super) fn stun_in(&self, data: &[u8]) {
        let Ok(m) = stun::parse(data) else { return };
        if m.msg_type != stun::BINDING_SUCCESS && m.msg_type != stun::BINDING_ERROR {
            return;
        }
        if let Some(tx) = self
            .stun_waiters
            .lock()
            .expect("not poisoned")
            .remove(&m.txid)
        {
            let _ = tx.send(data.to_vec());
        }
    }
}
