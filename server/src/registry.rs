//! Who is registered, under which key, and where: the server's decisions
//! about registration and introductions, without any I/O.
//!
//! The registry is generic over `H`, the handle used to reach an online
//! agent (a channel sender in the server), so it is tested without sockets.

use punch_protocol::signal::{Candidate, CandidateKind, ErrorCode, NatClass, PublicKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::SystemTime;

/// An online agent's connection.
#[derive(Clone, Debug)]
pub struct Online<H> {
    /// Distinguishes successive connections of one worker.
    pub conn_id: u64,
    pub observed: SocketAddr,
    pub since: SystemTime,
    pub local: Vec<Candidate>,
    /// The NAT class the agent reported, if it did.
    pub nat: Option<NatClass>,
    pub handle: H,
}

impl<H> Online<H> {
    /// Candidates offered to peers: the server-observed address first, then
    /// the agent's own interface addresses.
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut v = vec![Candidate {
            addr: self.observed,
            kind: CandidateKind::ServerReflexive,
        }];
        for c in &self.local {
            if !v.iter().any(|x| x.addr == c.addr) {
                v.push(*c);
            }
        }
        v
    }
}

#[derive(Clone, Debug)]
struct Worker<H> {
    key: PublicKey,
    ephemeral: bool,
    online: Option<Online<H>>,
}

/// A public view of one worker, for the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub worker_id: String,
    pub observed: SocketAddr,
    pub since: SystemTime,
    /// Everything offered to peers, server-observed address first.
    pub candidates: Vec<Candidate>,
    pub nat: Option<NatClass>,
}

/// The outcome of a successful registration.
#[derive(Debug)]
pub struct Registered<H> {
    /// The previous connection of the same worker, now replaced.
    pub replaced: Option<Online<H>>,
}

/// Both ends of an introduction.
#[derive(Debug)]
pub struct Introduction<'a, H> {
    pub requester: &'a Online<H>,
    pub requester_key: PublicKey,
    pub target: &'a Online<H>,
    pub target_key: PublicKey,
}

/// The registry of workers.
#[derive(Debug)]
pub struct Registry<H> {
    workers: HashMap<String, Worker<H>>,
    max_workers: usize,
}

impl<H> Registry<H> {
    /// An empty registry holding at most `max_workers` ids.
    pub fn new(max_workers: usize) -> Self {
        Registry {
            workers: HashMap::new(),
            max_workers,
        }
    }

    /// Registers `id` for `key`. A known id with another key is refused; a
    /// known id with the same key replaces the previous connection (the
    /// agent reconnected before the server noticed the old one die).
    pub fn register(
        &mut self,
        id: &str,
        key: PublicKey,
        ephemeral: bool,
        online: Online<H>,
    ) -> Result<Registered<H>, ErrorCode> {
        if let Some(w) = self.workers.get_mut(id) {
            if w.key != key {
                return Err(ErrorCode::IdTaken);
            }
            w.ephemeral = ephemeral;
            let replaced = w.online.replace(online);
            return Ok(Registered { replaced });
        }
        if self.workers.len() >= self.max_workers {
            self.evict_offline_ephemeral();
            if self.workers.len() >= self.max_workers {
                return Err(ErrorCode::RateLimited);
            }
        }
        self.workers.insert(
            id.to_string(),
            Worker {
                key,
                ephemeral,
                online: Some(online),
            },
        );
        Ok(Registered { replaced: None })
    }

    fn evict_offline_ephemeral(&mut self) {
        self.workers
            .retain(|_, w| w.online.is_some() || !w.ephemeral);
    }

    /// Marks `id` offline if `conn_id` is still its current connection.
    /// Ephemeral ids are forgotten; others keep their key binding.
    pub fn unregister(&mut self, id: &str, conn_id: u64) -> bool {
        let Some(w) = self.workers.get_mut(id) else {
            return false;
        };
        if w.online.as_ref().map(|o| o.conn_id) != Some(conn_id) {
            return false;
        }
        w.online = None;
        if w.ephemeral {
            self.workers.remove(id);
        }
        true
    }

    /// Records a new observed address; true when it changed.
    pub fn update_observed(&mut self, id: &str, conn_id: u64, addr: SocketAddr) -> bool {
        match self.workers.get_mut(id).and_then(|w| w.online.as_mut()) {
            Some(o) if o.conn_id == conn_id && o.observed != addr => {
                o.observed = addr;
                true
            }
            _ => false,
        }
    }

    /// Replaces the local candidates of a connection.
    pub fn update_local(&mut self, id: &str, conn_id: u64, local: Vec<Candidate>) {
        if let Some(o) = self.workers.get_mut(id).and_then(|w| w.online.as_mut()) {
            if o.conn_id == conn_id {
                o.local = local;
            }
        }
    }

    /// Records the NAT class a connection reported.
    pub fn update_nat(&mut self, id: &str, conn_id: u64, nat: NatClass) {
        if let Some(o) = self.workers.get_mut(id).and_then(|w| w.online.as_mut()) {
            if o.conn_id == conn_id {
                o.nat = Some(nat);
            }
        }
    }

    /// Looks up both sides of a connect request.
    pub fn introduce(
        &self,
        requester: &str,
        target: &str,
    ) -> Result<Introduction<'_, H>, ErrorCode> {
        if requester == target {
            return Err(ErrorCode::SelfConnect);
        }
        let t = self.workers.get(target).ok_or(ErrorCode::UnknownWorker)?;
        let t_online = t.online.as_ref().ok_or(ErrorCode::WorkerOffline)?;
        let r = self.workers.get(requester).ok_or(ErrorCode::Internal)?;
        let r_online = r.online.as_ref().ok_or(ErrorCode::Internal)?;
        Ok(Introduction {
            requester: r_online,
            requester_key: r.key,
            target: t_online,
            target_key: t.key,
        })
    }

    /// Online workers, sorted by id.
    pub fn online(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .workers
            .iter()
            .filter_map(|(id, w)| {
                w.online.as_ref().map(|o| PeerInfo {
                    worker_id: id.clone(),
                    observed: o.observed,
                    since: o.since,
                    candidates: o.candidates(),
                    nat: o.nat,
                })
            })
            .collect();
        v.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        v
    }

    /// Number of online workers.
    pub fn online_count(&self) -> usize {
        self.workers.values().filter(|w| w.online.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(conn_id: u64, port: u16) -> Online<()> {
        Online {
            conn_id,
            observed: SocketAddr::from(([203, 0, 113, 1], port)),
            since: SystemTime::now(),
            local: vec![],
            nat: None,
            handle: (),
        }
    }

    #[test]
    fn id_is_bound_to_key() {
        let mut r = Registry::new(10);
        r.register("b", [1; 32], false, online(1, 1)).unwrap();
        assert_eq!(
            r.register("b", [2; 32], false, online(2, 2)).unwrap_err(),
            ErrorCode::IdTaken
        );
        // Same key: the new connection replaces the old one.
        let reg = r.register("b", [1; 32], false, online(3, 3)).unwrap();
        assert_eq!(reg.replaced.unwrap().conn_id, 1);
        // The stale connection going away does not take the new one down.
        assert!(!r.unregister("b", 1));
        assert_eq!(r.online_count(), 1);
        assert!(r.unregister("b", 3));
        // Offline, but the binding stays.
        assert_eq!(
            r.register("b", [2; 32], false, online(4, 4)).unwrap_err(),
            ErrorCode::IdTaken
        );
    }

    #[test]
    fn introductions_distinguish_unknown_offline_and_self() {
        let mut r = Registry::new(10);
        r.register("a", [1; 32], true, online(1, 1)).unwrap();
        r.register("b", [2; 32], false, online(2, 2)).unwrap();
        let i = r.introduce("a", "b").unwrap();
        assert_eq!(i.target_key, [2; 32]);
        assert_eq!(i.requester.conn_id, 1);
        assert_eq!(
            r.introduce("a", "zz").unwrap_err(),
            ErrorCode::UnknownWorker
        );
        assert_eq!(r.introduce("a", "a").unwrap_err(), ErrorCode::SelfConnect);
        r.unregister("b", 2);
        assert_eq!(r.introduce("a", "b").unwrap_err(), ErrorCode::WorkerOffline);
        // Ephemeral ids are forgotten when they leave.
        r.unregister("a", 1);
        assert_eq!(r.introduce("b", "a").unwrap_err(), ErrorCode::UnknownWorker);
    }

    #[test]
    fn observed_address_changes_are_noticed() {
        let mut r = Registry::new(10);
        r.register("a", [1; 32], false, online(1, 1)).unwrap();
        let new = SocketAddr::from(([203, 0, 113, 1], 9));
        assert!(r.update_observed("a", 1, new));
        assert!(!r.update_observed("a", 1, new));
        assert!(!r.update_observed("a", 7, SocketAddr::from(([1, 1, 1, 1], 1))));
        assert_eq!(r.online()[0].observed, new);
    }

    #[test]
    fn table_is_bounded() {
        let mut r = Registry::new(2);
        r.register("a", [1; 32], false, online(1, 1)).unwrap();
        r.register("b", [2; 32], false, online(2, 2)).unwrap();
        assert_eq!(
            r.register("c", [3; 32], false, online(3, 3)).unwrap_err(),
            ErrorCode::RateLimited
        );
    }
}
