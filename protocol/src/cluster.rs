//! Messages between the servers of a cluster (see the server's `cluster`
//! module): what goes through Redis pub/sub and into worker keys. Every
//! decoder is size-limited and checks ids before anything uses them.

use crate::signal::{
    validate_worker_id, Candidate, ErrorCode, NatClass, PublicKey, WorkerInfo, MAX_CANDIDATES,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Largest message accepted from the bus or a worker key.
pub const MAX_BUS_MESSAGE: usize = 64 * 1024;

/// A message from another server (or Redis) that does not decode or check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad cluster message: {0}")]
pub struct BadMessage(pub String);

/// One side of an introduction, as the other server needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCard {
    pub id: String,
    pub key: PublicKey,
    pub candidates: Vec<Candidate>,
    pub nat: Option<NatClass>,
    pub tcp_only: bool,
    /// The address its own server sees it at (for the candidate policy;
    /// absent from older servers).
    #[serde(default)]
    pub seen: Option<std::net::IpAddr>,
    /// Its NAT's port allocator, when it reported one (absent from older
    /// servers).
    #[serde(default)]
    pub allocator: Option<crate::allocator::Allocator>,
}

impl PeerCard {
    /// Its candidates that may go to a peer seen at `peer_seen` under
    /// `policy`; from a card without `seen`, under a strict policy, only
    /// the address its server observed.
    pub fn offered(
        &self,
        policy: crate::signal::CandidatePolicy,
        peer_seen: std::net::IpAddr,
    ) -> Vec<Candidate> {
        match self.seen {
            Some(seen) => policy.filter(self.candidates.clone(), seen, Some(peer_seen)),
            None if policy == crate::signal::CandidatePolicy::Open => self.candidates.clone(),
            None => self
                .candidates
                .iter()
                .filter(|c| c.kind == crate::signal::CandidateKind::ServerReflexive)
                .copied()
                .collect(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        validate_worker_id(&self.id).map_err(|e| e.to_string())?;
        if self.candidates.len() > MAX_CANDIDATES + 1 {
            return Err("too many candidates".into());
        }
        Ok(())
    }
}

/// What the target's server answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduced {
    pub session: u64,
    pub secret: [u8; 32],
    /// Where the target's server relays this session, when it does.
    pub relay: Option<SocketAddr>,
    pub target: PeerCard,
}

/// Why the target's server refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// Messages between servers on `punch:to:{server id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Bus {
    /// Introduce `requester` (on server `from`) to `target` (held by the
    /// receiver).
    Connect {
        corr: u64,
        from: String,
        /// The requester's server relays at this address, when it can.
        relay: Option<SocketAddr>,
        requester: PeerCard,
        target: String,
    },
    /// The answer to the `Connect` with the same `corr`.
    Answer {
        corr: u64,
        result: Result<Introduced, Refusal>,
    },
}

impl Bus {
    /// Parses and checks a message from the bus.
    pub fn decode(bytes: &[u8]) -> Result<Bus, BadMessage> {
        if bytes.len() > MAX_BUS_MESSAGE {
            return Err(BadMessage(format!("{} bytes", bytes.len())));
        }
        let m: Bus = serde_json::from_slice(bytes).map_err(|e| BadMessage(e.to_string()))?;
        match &m {
            Bus::Connect {
                from,
                requester,
                target,
                ..
            } => {
                validate_server_id(from)?;
                requester.validate().map_err(BadMessage)?;
                validate_worker_id(target).map_err(|e| BadMessage(e.to_string()))?;
            }
            Bus::Answer {
                result: Ok(intro), ..
            } => intro.target.validate().map_err(BadMessage)?,
            Bus::Answer { result: Err(r), .. } => {
                if r.message.len() > 1024 {
                    return Err(BadMessage("refusal message too long".into()));
                }
            }
        }
        Ok(m)
    }

    /// The message as it goes on the bus.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serializes")
    }
}

/// A registry event as servers share it on `punch:events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedEvent {
    pub server: String,
    pub event: String,
    pub worker: String,
    pub observed_addr: Option<String>,
}

const EVENT_NAMES: [&str; 5] = [
    "registered",
    "address_changed",
    "stale",
    "deregistered",
    "expired",
];

impl SharedEvent {
    /// Parses and checks an event from `punch:events`: the event and its
    /// name as the hub publishes it.
    pub fn decode(bytes: &[u8]) -> Result<(SharedEvent, &'static str), BadMessage> {
        if bytes.len() > MAX_BUS_MESSAGE {
            return Err(BadMessage(format!("{} bytes", bytes.len())));
        }
        let e: SharedEvent =
            serde_json::from_slice(bytes).map_err(|e| BadMessage(e.to_string()))?;
        validate_server_id(&e.server)?;
        validate_worker_id(&e.worker).map_err(|e| BadMessage(e.to_string()))?;
        let name = EVENT_NAMES
            .iter()
            .find(|n| **n == e.event)
            .ok_or_else(|| BadMessage(format!("unknown event {:?}", e.event)))?;
        if e.observed_addr.as_ref().is_some_and(|a| a.len() > 64) {
            return Err(BadMessage("address too long".into()));
        }
        Ok((e, name))
    }
}

/// Server ids are 16 lowercase hex digits.
fn validate_server_id(s: &str) -> Result<(), BadMessage> {
    if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(BadMessage(format!("bad server id {s:?}")))
    }
}

/// The Redis key of a worker.
pub fn worker_key(id: &str) -> String {
    format!("punch:worker:{id}")
}

/// The value of a worker's key: the holding server's id, a newline, and
/// the worker as JSON.
pub fn worker_value(server: &str, info: &WorkerInfo) -> Vec<u8> {
    let mut v = format!("{server}\n").into_bytes();
    v.extend(serde_json::to_vec(info).expect("plain data serializes"));
    v
}

/// Splits a worker key's value into server id and worker.
pub fn parse_worker_value(v: &[u8]) -> Result<(String, WorkerInfo), BadMessage> {
    if v.len() > MAX_BUS_MESSAGE {
        return Err(BadMessage(format!("{} bytes", v.len())));
    }
    let nl = v
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| BadMessage("no server id".into()))?;
    let server = std::str::from_utf8(&v[..nl]).map_err(|e| BadMessage(e.to_string()))?;
    validate_server_id(server)?;
    let info: WorkerInfo =
        serde_json::from_slice(&v[nl + 1..]).map_err(|e| BadMessage(e.to_string()))?;
    validate_worker_id(&info.id).map_err(|e| BadMessage(e.to_string()))?;
    Ok((server.to_string(), info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{CandidateKind, Transport, WorkerState};

    fn info(id: &str) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            transport: Transport::Udp,
            kind: Some("gpu".into()),
            tags: vec!["eu".into()],
            metadata: vec![("k".into(), "v".into())],
            state: WorkerState::Online,
            observed: "203.0.113.5:4000".parse().unwrap(),
            nat: None,
            since_ms: 1,
        }
    }

    #[test]
    fn worker_values_round_trip_and_reject_junk() {
        let v = worker_value("0123456789abcdef", &info("w-1"));
        let (s, i) = parse_worker_value(&v).unwrap();
        assert_eq!(s, "0123456789abcdef");
        assert_eq!(i, info("w-1"));
        for bad in [
            &b""[..],
            b"no newline",
            b"short\n{}",
            b"0123456789abcdef\nnot json",
            b"0123456789abcdeg\n{}",
        ] {
            assert!(parse_worker_value(bad).is_err(), "{bad:?}");
        }
        let mut huge = b"0123456789abcdef\n".to_vec();
        huge.resize(MAX_BUS_MESSAGE + 1, b' ');
        assert!(parse_worker_value(&huge).is_err());
    }

    #[test]
    fn a_card_from_an_older_server_offers_only_what_its_server_saw_when_strict() {
        use crate::signal::CandidatePolicy;
        // An older server's card: no `seen`.
        let json = br#"{"id":"a","key":[3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3],
            "candidates":[{"addr":"192.0.2.1:5","kind":"ServerReflexive"},{"addr":"198.51.100.9:80","kind":"Local"}],
            "nat":null,"tcp_only":false}"#;
        let card: PeerCard = serde_json::from_slice(json).unwrap();
        assert_eq!(card.seen, None);
        let peer = "203.0.113.1".parse().unwrap();
        assert_eq!(card.offered(CandidatePolicy::Open, peer).len(), 2);
        let strict = card.offered(CandidatePolicy::Explained, peer);
        assert_eq!(strict.len(), 1);
        assert_eq!(strict[0].kind, CandidateKind::ServerReflexive);
        // With `seen`, the policy decides.
        let card = PeerCard {
            seen: Some("192.0.2.1".parse().unwrap()),
            ..card
        };
        let strict = card.offered(CandidatePolicy::Explained, peer);
        assert_eq!(strict.len(), 1);
    }

    #[test]
    fn bus_messages_round_trip_and_are_checked() {
        let card = PeerCard {
            id: "a".into(),
            key: [3; 32],
            candidates: vec![Candidate {
                addr: "192.0.2.1:5".parse().unwrap(),
                kind: CandidateKind::ServerReflexive,
            }],
            nat: None,
            tcp_only: false,
            seen: Some("192.0.2.1".parse().unwrap()),
            allocator: Some(crate::allocator::Allocator::Sequential { stride: 2 }),
        };
        let m = Bus::Connect {
            corr: 9,
            from: "0123456789abcdef".into(),
            relay: Some("127.0.0.1:7".parse().unwrap()),
            requester: card.clone(),
            target: "b".into(),
        };
        assert_eq!(Bus::decode(&m.encode()).unwrap(), m);
        let a = Bus::Answer {
            corr: 9,
            result: Err(Refusal {
                code: ErrorCode::WorkerOffline,
                message: "x".into(),
            }),
        };
        assert_eq!(Bus::decode(&a.encode()).unwrap(), a);
        let mut bad = card.clone();
        bad.id = "no spaces allowed".into();
        let m = Bus::Connect {
            corr: 1,
            from: "0123456789abcdef".into(),
            relay: None,
            requester: bad,
            target: "b".into(),
        };
        assert!(Bus::decode(&m.encode()).is_err());
        let m = Bus::Connect {
            corr: 1,
            from: "server".into(),
            relay: None,
            requester: card,
            target: "b".into(),
        };
        assert!(Bus::decode(&m.encode()).is_err());
        assert!(Bus::decode(b"{\"type\":\"connect\"}").is_err());
        assert!(Bus::decode(&vec![b'{'; MAX_BUS_MESSAGE + 1]).is_err());
    }

    #[test]
    fn shared_events_are_checked() {
        let e = SharedEvent {
            server: "0123456789abcdef".into(),
            event: "registered".into(),
            worker: "w".into(),
            observed_addr: None,
        };
        let b = serde_json::to_vec(&e).unwrap();
        assert_eq!(SharedEvent::decode(&b).unwrap(), (e.clone(), "registered"));
        let mut odd = e;
        odd.event = "exploded".into();
        assert!(SharedEvent::decode(&serde_json::to_vec(&odd).unwrap()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn junk_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Bus::decode(&b);
            let _ = SharedEvent::decode(&b);
            let _ = parse_worker_value(&b);
        }
    }
}
