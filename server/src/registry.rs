//! Who is registered, under which key, and where: the server's decisions
//! about registration, liveness and introductions, without any I/O.
//!
//! The registry is generic over `H`, the handle used to reach an online
//! agent (a channel sender in the server), so it is tested without sockets.
//! A worker is *online* while its signaling connection lives; when the
//! connection drops it turns *stale* for a grace period (so a quick
//! reconnect keeps its place), then *expires*; a clean shutdown (`Bye`)
//! deregisters at once. Key bindings outlive all of that (they are persisted
//! by the server) so an id can never be taken over.

use punch_protocol::allocator::Allocator;
use punch_protocol::signal::{
    Candidate, CandidateKind, ErrorCode, NatClass, PublicKey, Transport, WorkerInfo, WorkerState,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

/// An online agent's connection.
#[derive(Clone, Debug)]
pub struct Online<H> {
    /// Distinguishes successive connections of one worker.
    pub conn_id: u64,
    /// The agent's address as the server sees it: its UDP mapping over
    /// QUIC; over TCP the TCP peer, which is no UDP candidate.
    pub observed: SocketAddr,
    /// How it reaches the server.
    pub transport: Transport,
    pub since: SystemTime,
    pub local: Vec<Candidate>,
    /// The NAT class the agent reported, if it did.
    pub nat: Option<NatClass>,
    /// Its NAT's port allocator, if it reported one (version 5 agents).
    pub allocator: Option<Allocator>,
    pub handle: H,
}

impl<H> Online<H> {
    /// Reaches the server only over TCP and knows no UDP mapping of its
    /// own (no STUN answer): nobody can punch to it.
    pub fn tcp_only(&self) -> bool {
        self.transport == Transport::Tcp
            && !self.local.iter().any(|c| c.kind == CandidateKind::Stun)
    }

    /// Candidates offered to peers: the server-observed address first, then
    /// the agent's own interface addresses that a peer may be sent to
    /// ([`punch_protocol::signal::usable_candidate`]), each address once,
    /// except that predicted candidates are all kept: two of them make a
    /// port counter ([`punch_protocol::predict::advertised`]), even when
    /// one is the observed port.
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut v = Vec::new();
        if self.transport == Transport::Udp {
            v.push(Candidate {
                addr: self.observed,
                kind: CandidateKind::ServerReflexive,
            });
        }
        for c in &self.local {
            let usable = punch_protocol::signal::usable_candidate(c.addr, self.observed);
            let predicted = c.kind == CandidateKind::Predicted;
            if usable && (predicted || !v.iter().any(|x| x.addr == c.addr)) {
                v.push(*c);
            }
        }
        v
    }
}

/// What a worker says about itself at registration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub kind: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
struct Stale {
    since: SystemTime,
    at: Instant,
    observed: SocketAddr,
    transport: Transport,
    nat: Option<NatClass>,
}

#[derive(Clone, Debug)]
struct Worker<H> {
    key: PublicKey,
    ephemeral: bool,
    profile: Profile,
    online: Option<Online<H>>,
    stale: Option<Stale>,
}

/// A public view of one online worker, for the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub worker_id: String,
    pub observed: SocketAddr,
    pub since: SystemTime,
    /// Everything offered to peers, server-observed address first.
    pub candidates: Vec<Candidate>,
    pub nat: Option<NatClass>,
    pub allocator: Option<Allocator>,
}

/// The outcome of a successful registration.
#[derive(Debug)]
pub struct Registered<H> {
    /// The previous connection of the same worker, now replaced.
    pub replaced: Option<Online<H>>,
    /// The id was bound to this key just now (the server persists it).
    pub new_binding: bool,
}

/// Both ends of an introduction.
#[derive(Debug)]
pub struct Introduction<'a, H> {
    pub requester: &'a Online<H>,
    pub requester_key: PublicKey,
    pub target: &'a Online<H>,
    pub target_key: PublicKey,
}

/// What changed, for the event stream (serialized by its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Registered,
    AddressChanged,
    Stale,
    Deregistered,
    Expired,
}

impl EventKind {
    /// `registered`, `address_changed`, `stale`, `deregistered`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Registered => "registered",
            EventKind::AddressChanged => "address_changed",
            EventKind::Stale => "stale",
            EventKind::Deregistered => "deregistered",
            EventKind::Expired => "expired",
        }
    }

    /// The kind named `name` (as [`EventKind::as_str`] spells it).
    pub fn from_name(name: &str) -> Option<EventKind> {
        [
            EventKind::Registered,
            EventKind::AddressChanged,
            EventKind::Stale,
            EventKind::Deregistered,
            EventKind::Expired,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// A registry change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub worker: String,
    pub observed: Option<SocketAddr>,
}

/// The registry of workers.
#[derive(Debug)]
pub struct Registry<H> {
    workers: HashMap<String, Worker<H>>,
    max_workers: usize,
    /// How long a dropped worker stays stale before it expires.
    pub grace: Duration,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<H> Registry<H> {
    /// An empty registry holding at most `max_workers` ids.
    pub fn new(max_workers: usize) -> Self {
        Registry {
            workers: HashMap::new(),
            max_workers,
            grace: Duration::from_secs(30),
        }
    }

    /// Loads persisted id-to-key bindings (offline workers).
    pub fn load_bindings(&mut self, bindings: impl IntoIterator<Item = (String, PublicKey)>) {
        for (id, key) in bindings {
            self.workers.entry(id).or_insert(Worker {
                key,
                ephemeral: false,
                profile: Profile::default(),
                online: None,
                stale: None,
            });
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
        profile: Profile,
        online: Online<H>,
    ) -> Result<Registered<H>, ErrorCode> {
        if let Some(w) = self.workers.get_mut(id) {
            if w.key != key {
                return Err(ErrorCode::IdTaken);
            }
            w.ephemeral = ephemeral;
            w.profile = profile;
            w.stale = None;
            let replaced = w.online.replace(online);
            return Ok(Registered {
                replaced,
                new_binding: false,
            });
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
                profile,
                online: Some(online),
                stale: None,
            },
        );
        Ok(Registered {
            replaced: None,
            new_binding: !ephemeral,
        })
    }

    fn evict_offline_ephemeral(&mut self) {
        self.workers
            .retain(|_, w| w.online.is_some() || w.stale.is_some() || !w.ephemeral);
    }

    /// The connection `conn_id` of `id` ended: a clean one (`Bye`)
    /// deregisters at once, a dropped one turns the worker stale. Ephemeral
    /// ids are forgotten; others keep their key binding. `None` when
    /// `conn_id` was not the current connection.
    pub fn unregister(
        &mut self,
        id: &str,
        conn_id: u64,
        clean: bool,
        now: Instant,
    ) -> Option<Event> {
        let w = self.workers.get_mut(id)?;
        if w.online.as_ref().map(|o| o.conn_id) != Some(conn_id) {
            return None;
        }
        let o = w.online.take()?;
        let kind = if clean || w.ephemeral {
            EventKind::Deregistered
        } else {
            w.stale = Some(Stale {
                since: SystemTime::now(),
                at: now,
                observed: o.observed,
                transport: o.transport,
                nat: o.nat,
            });
            EventKind::Stale
        };
        if w.ephemeral {
            self.workers.remove(id);
        }
        Some(Event {
            kind,
            worker: id.to_string(),
            observed: Some(o.observed),
        })
    }

    /// Expires workers stale for longer than the grace period.
    pub fn expire(&mut self, now: Instant) -> Vec<Event> {
        let grace = self.grace;
        let mut out = Vec::new();
        for (id, w) in self.workers.iter_mut() {
            if w.stale
                .as_ref()
                .is_some_and(|s| now.saturating_duration_since(s.at) >= grace)
            {
                let s = w.stale.take().expect("checked");
                out.push(Event {
                    kind: EventKind::Expired,
                    worker: id.clone(),
                    observed: Some(s.observed),
                });
            }
        }
        out
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

    /// Records the port allocator a worker's current connection reported.
    pub fn update_allocator(&mut self, id: &str, conn_id: u64, a: Allocator) {
        if let Some(o) = self.workers.get_mut(id).and_then(|w| w.online.as_mut()) {
            if o.conn_id == conn_id {
                o.allocator = Some(a);
            }
        }
    }

    /// The port allocator an online worker reported.
    pub fn allocator(&self, id: &str) -> Option<Allocator> {
        self.workers.get(id)?.online.as_ref()?.allocator
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

    fn info(id: &str, w: &Worker<H>) -> Option<WorkerInfo> {
        let (state, observed, transport, nat, since) = match (&w.online, &w.stale) {
            (Some(o), _) => (WorkerState::Online, o.observed, o.transport, o.nat, o.since),
            (None, Some(s)) => (WorkerState::Stale, s.observed, s.transport, s.nat, s.since),
            (None, None) => return None,
        };
        Some(WorkerInfo {
            id: id.to_string(),
            transport,
            kind: w.profile.kind.clone(),
            tags: w.profile.tags.clone(),
            metadata: w.profile.metadata.clone(),
            state,
            observed,
            nat,
            since_ms: unix_ms(since),
        })
    }

    /// One worker, online or stale.
    pub fn get(&self, id: &str) -> Option<WorkerInfo> {
        Self::info(id, self.workers.get(id)?)
    }

    /// Online and stale workers of a type and with a tag (when given),
    /// sorted by id, at most `limit`.
    pub fn list(&self, kind: Option<&str>, tag: Option<&str>, limit: usize) -> Vec<WorkerInfo> {
        let mut v: Vec<WorkerInfo> = self
            .workers
            .iter()
            .filter(|(_, w)| kind.is_none_or(|k| w.profile.kind.as_deref() == Some(k)))
            .filter(|(_, w)| tag.is_none_or(|t| w.profile.tags.iter().any(|x| x == t)))
            .filter_map(|(id, w)| Self::info(id, w))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v.truncate(limit);
        v
    }

    /// A random online worker of a type; `pick` chooses among `n` (the
    /// caller's randomness keeps this testable).
    pub fn discover(&self, kind: &str, pick: impl FnOnce(usize) -> usize) -> Option<WorkerInfo> {
        let mut online: Vec<WorkerInfo> = self
            .list(Some(kind), None, usize::MAX)
            .into_iter()
            .filter(|w| w.state == WorkerState::Online)
            .collect();
        if online.is_empty() {
            return None;
        }
        let i = pick(online.len()).min(online.len() - 1);
        Some(online.swap_remove(i))
    }

    /// An online worker's connection and key.
    pub fn online_with_key(&self, id: &str) -> Option<(&Online<H>, PublicKey)> {
        let w = self.workers.get(id)?;
        Some((w.online.as_ref()?, w.key))
    }

    /// Is the worker online now?
    pub fn is_online(&self, id: &str) -> bool {
        self.workers.get(id).is_some_and(|w| w.online.is_some())
    }

    /// Forgets a worker and its key binding.
    pub fn forget(&mut self, id: &str) -> bool {
        self.workers.remove(id).is_some()
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
                    allocator: o.allocator,
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

    /// Number of stale workers.
    pub fn stale_count(&self) -> usize {
        self.workers.values().filter(|w| w.stale.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(conn_id: u64, port: u16) -> Online<()> {
        Online {
            conn_id,
            observed: SocketAddr::from(([203, 0, 113, 1], port)),
            transport: Transport::Udp,
            since: SystemTime::now(),
            local: vec![],
            nat: None,
            allocator: None,
            handle: (),
        }
    }

    fn typed(kind: &str, tags: &[&str]) -> Profile {
        Profile {
            kind: Some(kind.into()),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            metadata: vec![],
        }
    }

    #[test]
    fn offers_carry_no_unusable_candidates() {
        let host = |a: &str| Candidate {
            addr: a.parse().unwrap(),
            kind: CandidateKind::Local,
        };
        let mut o = online(1, 4000);
        o.local = vec![
            host("10.0.0.5:4000"),
            host("0.0.0.0:4000"),
            host("224.0.0.1:4000"),
            host("255.255.255.255:4000"),
            host("10.0.0.6:0"),
            host("127.0.0.1:4000"),
            host("[::]:4000"),
            host("[ff02::1]:4000"),
            host("[::1]:4000"),
            host("[2001:db8::5]:4000"),
        ];
        let addrs: Vec<String> = o.candidates().iter().map(|c| c.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["203.0.113.1:4000", "10.0.0.5:4000", "[2001:db8::5]:4000"]
        );
        // An agent on the server's own host keeps its loopback candidates.
        o.observed = "127.0.0.1:5000".parse().unwrap();
        assert!(o
            .candidates()
            .iter()
            .any(|c| c.addr.to_string() == "127.0.0.1:4000"));
    }

    /// A counter whose next port is the observed one still reaches peers
    /// as a counter (two predicted candidates); other duplicates go.
    #[test]
    fn predicted_candidates_survive_the_observed_port() {
        let c = |a: &str, kind| Candidate {
            addr: a.parse().unwrap(),
            kind,
        };
        let mut o = online(1, 20545);
        o.local = vec![
            c("203.0.113.1:20545", CandidateKind::Predicted),
            c("203.0.113.1:20546", CandidateKind::Predicted),
            c("203.0.113.1:20545", CandidateKind::Stun),
        ];
        let got = o.candidates();
        assert_eq!(got.len(), 3, "{got:?}");
        let counter = punch_protocol::predict::advertised(&got).expect("a counter");
        assert_eq!((counter.next, counter.stride), (20545, 1));
    }
    #[test]
    fn id_is_bound_to_key() {
        let now = Instant::now();
        let mut r = Registry::new(10);
        let reg = r
            .register("b", [1; 32], false, Profile::default(), online(1, 1))
            .unwrap();
        assert!(reg.new_binding);
        assert_eq!(
            r.register("b", [2; 32], false, Profile::default(), online(2, 2))
                .unwrap_err(),
            ErrorCode::IdTaken
        );
        // Same key: the new connection replaces the old one.
        let reg = r
            .register("b", [1; 32], false, Profile::default(), online(3, 3))
            .unwrap();
        assert_eq!(reg.replaced.unwrap().conn_id, 1);
        assert!(!reg.new_binding);
        // The replaced connection going away does not take the new one down.
        assert!(r.unregister("b", 1, false, now).is_none());
        assert_eq!(r.online_count(), 1);
        assert_eq!(
            r.unregister("b", 3, false, now).unwrap().kind,
            EventKind::Stale
        );
        // Offline, but the binding stays, also after it expires.
        r.expire(now + Duration::from_secs(31));
        assert_eq!(
            r.register("b", [2; 32], false, Profile::default(), online(4, 4))
                .unwrap_err(),
            ErrorCode::IdTaken
        );
        // Persisted bindings hold the same way after a restart.
        let mut r2: Registry<()> = Registry::new(10);
        r2.load_bindings([("b".to_string(), [1; 32])]);
        assert_eq!(
            r2.register("b", [2; 32], false, Profile::default(), online(5, 5))
                .unwrap_err(),
            ErrorCode::IdTaken
        );
        assert!(r2.forget("b"));
        assert!(r2
            .register("b", [2; 32], false, Profile::default(), online(6, 6))
            .is_ok());
    }

    #[test]
    fn stale_then_expired_or_back_or_deregistered() {
        let t0 = Instant::now();
        let mut r = Registry::new(10);
        r.register("b", [1; 32], false, typed("gpu", &[]), online(1, 1))
            .unwrap();
        r.unregister("b", 1, false, t0).unwrap();
        assert_eq!(r.get("b").unwrap().state, WorkerState::Stale);
        assert!(!r.is_online("b"));
        assert!(r.expire(t0 + Duration::from_secs(29)).is_empty());
        // Back within the grace period: online again, no expiry later.
        r.register("b", [1; 32], false, typed("gpu", &[]), online(2, 2))
            .unwrap();
        assert!(r.expire(t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(r.get("b").unwrap().state, WorkerState::Online);
        // Dropped again and not back: expired.
        r.unregister("b", 2, false, t0).unwrap();
        let ev = r.expire(t0 + Duration::from_secs(30));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventKind::Expired);
        assert!(r.get("b").is_none());
        // A clean shutdown deregisters at once.
        r.register("b", [1; 32], false, typed("gpu", &[]), online(3, 3))
            .unwrap();
        assert_eq!(
            r.unregister("b", 3, true, t0).unwrap().kind,
            EventKind::Deregistered
        );
        assert!(r.get("b").is_none());
    }

    #[test]
    fn list_filters_and_discover_picks_online_of_a_type() {
        let t0 = Instant::now();
        let mut r = Registry::new(10);
        r.register("g1", [1; 32], false, typed("gpu", &["eu"]), online(1, 1))
            .unwrap();
        r.register("g2", [2; 32], false, typed("gpu", &["us"]), online(2, 2))
            .unwrap();
        r.register("c1", [3; 32], false, typed("cpu", &["eu"]), online(3, 3))
            .unwrap();
        let ids = |v: Vec<WorkerInfo>| v.into_iter().map(|w| w.id).collect::<Vec<_>>();
        assert_eq!(ids(r.list(Some("gpu"), None, 100)), ["g1", "g2"]);
        assert_eq!(ids(r.list(None, Some("eu"), 100)), ["c1", "g1"]);
        assert_eq!(ids(r.list(Some("gpu"), Some("eu"), 100)), ["g1"]);
        assert_eq!(ids(r.list(None, None, 2)), ["c1", "g1"]);
        assert_eq!(r.discover("gpu", |n| n - 1).unwrap().id, "g2");
        r.unregister("g2", 2, false, t0);
        // Stale workers are listed but never discovered.
        assert_eq!(r.list(Some("gpu"), None, 100).len(), 2);
        assert_eq!(r.discover("gpu", |n| n - 1).unwrap().id, "g1");
        assert!(r.discover("tpu", |_| 0).is_none());
    }

    #[test]
    fn introductions_distinguish_unknown_offline_and_self() {
        let now = Instant::now();
        let mut r = Registry::new(10);
        r.register("a", [1; 32], true, Profile::default(), online(1, 1))
            .unwrap();
        r.register("b", [2; 32], false, Profile::default(), online(2, 2))
            .unwrap();
        let i = r.introduce("a", "b").unwrap();
        assert_eq!(i.target_key, [2; 32]);
        assert_eq!(i.requester.conn_id, 1);
        assert_eq!(
            r.introduce("a", "zz").unwrap_err(),
            ErrorCode::UnknownWorker
        );
        assert_eq!(r.introduce("a", "a").unwrap_err(), ErrorCode::SelfConnect);
        r.unregister("b", 2, false, now);
        assert_eq!(r.introduce("a", "b").unwrap_err(), ErrorCode::WorkerOffline);
        // Ephemeral ids are forgotten when they leave.
        assert_eq!(
            r.unregister("a", 1, false, now).unwrap().kind,
            EventKind::Deregistered
        );
        assert_eq!(r.introduce("b", "a").unwrap_err(), ErrorCode::UnknownWorker);
    }

    #[test]
    fn observed_address_changes_are_noticed() {
        let mut r = Registry::new(10);
        r.register("a", [1; 32], false, Profile::default(), online(1, 1))
            .unwrap();
        let new = SocketAddr::from(([203, 0, 113, 1], 9));
        assert!(r.update_observed("a", 1, new));
        assert!(!r.update_observed("a", 1, new));
        assert!(!r.update_observed("a", 7, SocketAddr::from(([1, 1, 1, 1], 1))));
        assert_eq!(r.online()[0].observed, new);
    }

    #[test]
    fn table_is_bounded() {
        let mut r = Registry::new(2);
        r.register("a", [1; 32], false, Profile::default(), online(1, 1))
            .unwrap();
        r.register("b", [2; 32], false, Profile::default(), online(2, 2))
            .unwrap();
        assert_eq!(
            r.register("c", [3; 32], false, Profile::default(), online(3, 3))
                .unwrap_err(),
            ErrorCode::RateLimited
        );
    }
}
