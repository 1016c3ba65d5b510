//! Our candidates: what we tell the server and peers besides the address
//! the server observes (the gateway's mapping, our port counter's
//! predictions, interface addresses, what STUN saw).

use crate::session::birthday::CounterState;
use crate::{portmap, Inner};
use punch_protocol::signal::{Candidate, CandidateKind, ClientMsg};
use std::net::SocketAddr;
use std::sync::Mutex;

/// What the gatherer keeps between registrations.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    /// The STUN candidates of the last registration (sent again with the
    /// mapped candidate when it changes).
    pub(crate) stun_seen: Mutex<Vec<Candidate>>,
    /// Where our NAT's port counter stands, when it counts: offered to
    /// peers as two predicted candidates ([`punch_protocol::predict`]).
    pub(crate) counter: Mutex<CounterState>,
    /// Held while the counter is read: reads run one after another, so
    /// the last one written is the latest (a slow read must not put an
    /// older position back over a newer one).
    pub(crate) counter_read: tokio::sync::Mutex<()>,
}

impl Inner {
    /// Our public address by the gateway's port mapping, if one is live.
    pub(crate) fn mapped_external(&self) -> Option<SocketAddr> {
        self.portmap_state
            .as_ref()
            .and_then(|s| s.borrow().mapping.map(|m| m.external))
    }

    /// Tells the server all our candidates (ours and what STUN saw) anew.
    pub(crate) fn announce_candidates(&self) {
        let mut local = self.local_candidates();
        for c in self.gather.stun_seen.lock().expect("not poisoned").iter() {
            if !local.iter().any(|l| l.addr == c.addr) {
                local.push(*c);
            }
        }
        local.truncate(punch_protocol::signal::MAX_CANDIDATES);
        self.notify(ClientMsg::Candidates { local });
    }

    /// Our candidates besides the server-observed address.
    pub(crate) fn local_candidates(&self) -> Vec<Candidate> {
        let mut out = Vec::new();
        // The gateway's mapping first: it is what peers behind hard NATs
        // reach.
        if let Some(c) = self
            .portmap_state
            .as_ref()
            .and_then(|s| portmap::candidate(&s.borrow()))
        {
            out.push(c);
        }
        // Our counter next: what a peer behind a per-destination NAT aims
        // at (first, so that many interface addresses do not crowd it out).
        if let Some(c) = self.gather.counter.lock().expect("not poisoned").counter {
            out.extend(c.candidates());
        }
        if !self.config.local_candidates {
            return out;
        }
        let Ok(local) = self.endpoint.local_addr() else {
            return out;
        };
        if !local.ip().is_unspecified() {
            if !local.ip().is_loopback() {
                out.push(Candidate {
                    addr: punch_net::canonical(local),
                    kind: CandidateKind::Local,
                });
            }
            return out;
        }
        let Ok(ifs) = if_addrs::get_if_addrs() else {
            return out;
        };
        for i in ifs {
            let ip = i.ip();
            if ip.is_loopback() || !self.socket.supports(ip) {
                continue;
            }
            if let std::net::IpAddr::V6(v6) = ip {
                // Link-local addresses need a scope id that peers do not know.
                if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                    continue;
                }
            }
            out.push(Candidate {
                addr: SocketAddr::new(ip, local.port()),
                kind: CandidateKind::Local,
            });
            if out.len() >= punch_protocol::signal::MAX_CANDIDATES {
                break;
            }
        }
        out
    }
}
