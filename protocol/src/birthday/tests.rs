use super::*;
use crate::allocator::Allocator;
use crate::signal::Candidate;
use rand::SeedableRng;

const SECRET: [u8; 32] = [7; 32];

fn class(mapping: NatBehaviour, filtering: NatBehaviour) -> Option<NatClass> {
    Some(NatClass {
        public: false,
        mapping,
        filtering,
        port_preserved: false,
    })
}

fn offer(peer_nat: Option<NatClass>, cands: &[(&str, CandidateKind)]) -> Offer {
    Offer {
        req: None,
        session: SessionId(5),
        secret: SECRET,
        role: Role::Controlled,
        peer_id: "peer".into(),
        peer_key: [0; 32],
        peer_candidates: cands
            .iter()
            .map(|(a, kind)| Candidate {
                addr: a.parse().unwrap(),
                kind: *kind,
            })
            .collect(),
        start_in_ms: 0,
        relay: true,
        peer_nat,
        peer_tcp_only: false,
        peer_allocator: None,
    }
}

#[test]
fn parts_follow_the_nat_classes() {
    use NatBehaviour::*;
    let sym = class(AddressAndPortDependent, AddressAndPortDependent);
    let pr = class(EndpointIndependent, AddressAndPortDependent);
    let restricted = class(EndpointIndependent, AddressDependent);
    assert_eq!(part(sym, pr), Some(Part::Hard));
    assert_eq!(part(pr, sym), Some(Part::Easy));
    // Both hard: both scan each other's port block.
    assert_eq!(part(sym, sym), Some(Part::Both));
    // Ordinary punching handles these.
    assert_eq!(part(sym, restricted), None);
    assert_eq!(part(pr, pr), None);
    assert_eq!(part(None, pr), None);
    // Not yet known: no birthday.
    let early = class(EndpointIndependent, Unknown);
    assert_eq!(part(early, sym), None);
    assert_eq!(part(sym, early), None);
}

#[test]
fn spray_ports_cover_the_block_first_without_duplicates() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let ports = spray_ports(&[40_010, 40_020], None, &mut rng);
    assert_eq!(ports.len(), SPRAY_PORTS);
    assert_eq!(ports[..64], (40_000..40_064).collect::<Vec<u16>>()[..]);
    // A counter's next ports follow the block.
    let ports = spray_ports(&[40_010], Some(40_100), &mut rng);
    assert_eq!(
        ports[64..64 + 256],
        (40_100..40_356).collect::<Vec<u16>>()[..]
    );
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ports.len());
    assert!(ports.iter().all(|p| *p >= 1024));
}

#[test]
fn plans_follow_the_parts() {
    use NatBehaviour::*;
    let sym = class(AddressAndPortDependent, AddressAndPortDependent);
    let pr = class(EndpointIndependent, AddressAndPortDependent);
    let cands = [
        ("198.51.100.7:40010", CandidateKind::ServerReflexive),
        ("10.0.0.2:5000", CandidateKind::Local),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    // We are easy, the peer hard: spray its public IP, its block first.
    let p = plan(pr, Allocator::Unknown, &offer(sym, &cands), &mut rng);
    let spray = p.spray.expect("spray");
    assert_eq!(spray.ip, "198.51.100.7".parse::<IpAddr>().unwrap());
    assert_eq!(spray.ports[0], 40_000);
    assert_eq!(spray.delay, SPRAY_DELAY);
    assert!(p.hard.is_none());
    // We are hard, the peer easy: many sockets to its one mapping.
    let p = plan(sym, Allocator::Unknown, &offer(pr, &cands), &mut rng);
    assert!(p.spray.is_none());
    let hard = p.hard.expect("hard");
    assert_eq!((hard.part, hard.sockets()), (Part::Hard, AUX_SOCKETS));
    assert_eq!(hard.flows[0], vec!["198.51.100.7:40010".parse().unwrap()]);
    // Behind a 64-port block: 4 of it toward the peer, the main socket's
    // flow included.
    let block = Allocator::Block {
        base: 20480,
        size: 64,
    };
    let hard = plan(sym, block, &offer(pr, &cands), &mut rng)
        .hard
        .expect("hard");
    assert_eq!(hard.sockets(), 3);
    // Both hard: a few sockets to the peer's whole block.
    let hard = plan(sym, Allocator::Unknown, &offer(sym, &cands), &mut rng)
        .hard
        .expect("both");
    assert_eq!((hard.part, hard.sockets()), (Part::Both, BLOCK_SOCKETS));
    assert!(hard.flows.iter().all(|f| f.len() == 64));
    // Nothing to do for an easy pair, nor without a public candidate.
    assert_eq!(
        plan(pr, Allocator::Unknown, &offer(pr, &cands), &mut rng),
        Plan::default()
    );
    let local_only = offer(pr, &cands[1..]);
    assert_eq!(
        plan(sym, Allocator::Unknown, &local_only, &mut rng),
        Plan::default()
    );
}

const PEER: &str = "198.51.100.7:40010";

fn params(role: Role) -> HardParams {
    HardParams {
        session: SessionId(5),
        secret: SECRET,
        role,
        txid_base: 1_000,
    }
}

fn drain(h: &mut HardSide) -> Vec<(usize, Transmit)> {
    std::iter::from_fn(|| h.poll_transmit()).collect()
}

fn pong(txid: u64, observed: &str) -> Vec<u8> {
    Probe {
        kind: ProbeKind::Pong {
            observed: observed.parse().unwrap(),
        },
        role: Role::Controlling,
        session: SessionId(5),
        txid,
    }
    .encode(&SECRET)
}

#[test]
fn hard_side_pings_every_target_twice_then_times_out() {
    let t0 = Instant::now();
    let targets: Vec<SocketAddr> =
        vec![PEER.parse().unwrap(), "198.51.100.7:40011".parse().unwrap()];
    let limit = Duration::from_secs(2);
    let mut h = HardSide::new(params(Role::Controlling), 3, targets.clone(), t0, limit);
    let first = drain(&mut h);
    assert_eq!(first.len(), 6);
    assert_eq!(h.poll_timeout(), Some(t0 + HARD_ROUND_GAP));
    // Socket i's first ping carries txid_base + i.
    let p = Probe::decode(&first[2].1.payload, &SECRET).unwrap();
    assert_eq!((first[2].0, p.txid, p.kind), (1, 1_001, ProbeKind::Ping));
    h.handle_timeout(t0 + Duration::from_millis(100));
    assert!(drain(&mut h).is_empty());
    h.handle_timeout(t0 + HARD_ROUND_GAP);
    let second = drain(&mut h);
    assert_eq!(second.len(), 6);
    let p = Probe::decode(&second[0].1.payload, &SECRET).unwrap();
    assert_eq!(p.txid, 1_000 + TXID_ROUND);
    let deadline = t0 + HARD_ROUND_GAP + limit;
    assert_eq!(h.poll_timeout(), Some(deadline));
    h.handle_timeout(deadline);
    assert_eq!(h.poll_event(), Some(HardEvent::TimedOut));
    assert_eq!(h.poll_timeout(), None);
    assert_eq!(h.pings_sent(), 12);
}

#[test]
fn hard_side_answers_the_spray_and_validates_on_its_own_pong() {
    let t0 = Instant::now();
    let peer_ip: IpAddr = "198.51.100.7".parse().unwrap();
    let mut h = HardSide::new(
        params(Role::Controlled),
        4,
        vec![PEER.parse().unwrap()],
        t0,
        Duration::from_secs(5),
    );
    drain(&mut h);
    // The peer's spray reaches socket 2.
    let now = t0 + Duration::from_millis(50);
    let ping = Probe::ping(Role::Controlling, SessionId(5), 77).encode(&SECRET);
    let from = SocketAddr::new(peer_ip, 40_010);
    h.handle_probe(2, from, &ping, now).unwrap();
    let out = drain(&mut h);
    assert_eq!(out.len(), 2);
    let answer = Probe::decode(&out[0].1.payload, &SECRET).unwrap();
    assert_eq!(
        (out[0].0, answer.txid, answer.kind),
        (2, 77, ProbeKind::Pong { observed: from })
    );
    let back = Probe::decode(&out[1].1.payload, &SECRET).unwrap();
    assert_eq!(back.txid, 1_002 + 2 * TXID_ROUND);
    assert_eq!(h.met(), &[2]);
    // A pong for socket 2's ping arriving on socket 1 proves nothing.
    let later = now + Duration::from_millis(40);
    let p = pong(1_002 + 2 * TXID_ROUND, "203.0.113.9:5555");
    assert!(h.handle_probe(1, from, &p, later).is_err());
    // From another IP neither.
    let stranger = SocketAddr::new("192.0.2.1".parse().unwrap(), 40_010);
    assert!(h.handle_probe(2, stranger, &p, later).is_err());
    // Out of range socket index: an error, not a panic.
    assert!(h.handle_probe(99, from, &p, later).is_err());
    h.handle_probe(2, from, &p, later).unwrap();
    assert_eq!(
        h.poll_event(),
        Some(HardEvent::Validated {
            socket: 2,
            addr: from,
            rtt: Duration::from_millis(40),
            observed: "203.0.113.9:5555".parse().unwrap(),
        })
    );
    // Validated, it still answers the peer's pings on the sockets that met
    // it (the spray ping that opened the way may have been lost, and the
    // peer validates only on a pong), with a pong and nothing else.
    assert!(h.is_done());
    let answering_until = later + HARD_ANSWER_GRACE;
    assert_eq!(h.poll_timeout(), Some(answering_until));
    h.handle_probe(2, from, &ping, later).unwrap();
    let out = drain(&mut h);
    assert_eq!(out.len(), 1);
    let answer = Probe::decode(&out[0].1.payload, &SECRET).unwrap();
    assert_eq!(
        (out[0].0, out[0].1.dst, answer.kind),
        (2, from, ProbeKind::Pong { observed: from })
    );
    // Not on a socket that never met the peer, not a pong, not a stranger.
    assert!(h.handle_probe(1, from, &ping, later).is_err());
    assert!(h.handle_probe(2, from, &p, later).is_err());
    assert!(h.handle_probe(2, stranger, &ping, later).is_err());
    assert!(drain(&mut h).is_empty());
    // After the grace, everything is ignored.
    h.handle_timeout(answering_until);
    assert_eq!(h.poll_timeout(), None);
    assert!(h.handle_probe(2, from, &ping, answering_until).is_err());
    assert!(drain(&mut h).is_empty());
}

#[test]
fn hard_side_rejects_its_own_role_and_other_sessions() {
    let t0 = Instant::now();
    let from: SocketAddr = PEER.parse().unwrap();
    let mut h = HardSide::new(
        params(Role::Controlled),
        1,
        vec![from],
        t0,
        Duration::from_secs(1),
    );
    drain(&mut h);
    let own = Probe::ping(Role::Controlled, SessionId(5), 1).encode(&SECRET);
    assert!(h.handle_probe(0, from, &own, t0).is_err());
    let other = Probe::ping(Role::Controlling, SessionId(6), 1).encode(&SECRET);
    assert!(h.handle_probe(0, from, &other, t0).is_err());
    assert!(h.handle_probe(0, from, b"garbage", t0).is_err());
    assert!(h.met().is_empty());
    assert!(drain(&mut h).is_empty());
}

#[test]
fn hard_side_without_targets_is_done_at_once() {
    let t0 = Instant::now();
    let mut h = HardSide::new(
        params(Role::Controlled),
        8,
        Vec::new(),
        t0,
        Duration::from_secs(1),
    );
    assert_eq!(h.poll_event(), Some(HardEvent::TimedOut));
    assert!(h.poll_transmit().is_none());
    assert_eq!(h.poll_timeout(), None);
}

/// A block the peer reported (version 6 offers) is scanned whole when it
/// holds what we saw of the peer; otherwise, or without one, the aligned
/// 64 ports around that.
#[test]
fn both_hard_scans_the_block_the_peer_reported() {
    use NatBehaviour::*;
    let sym = class(AddressAndPortDependent, AddressAndPortDependent);
    let mut o = offer(
        sym,
        &[("198.51.100.7:20600", CandidateKind::ServerReflexive)],
    );
    let ports =
        |o: &Offer| -> Vec<u16> { targets(o, Part::Both).iter().map(|a| a.port()).collect() };
    assert_eq!(ports(&o), (20544..20608).collect::<Vec<_>>());
    o.peer_allocator = Some(Allocator::Block {
        base: 20480,
        size: 128,
    });
    assert_eq!(ports(&o), (20480..20608).collect::<Vec<_>>());
    // A block that does not hold the observed port, or one too big to scan.
    for a in [
        Allocator::Block {
            base: 30000,
            size: 64,
        },
        Allocator::Block {
            base: 16384,
            size: 1024,
        },
        Allocator::Random,
    ] {
        o.peer_allocator = Some(a);
        assert_eq!(ports(&o), (20544..20608).collect::<Vec<_>>(), "{a:?}");
    }
}
