use super::*;
use crate::relay::wire::{encode_bind_request, write_data_header, DATA_HEADER, MAGIC};
use proptest::prelude::*;

const S: SessionId = SessionId(77);
const K: [u8; 32] = [5; 32];

fn a(p: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 9], p))
}

#[test]
fn bind_then_forward_both_ways() {
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits::default());
    t.insert(S, K, now).unwrap();
    let mut data = vec![0u8; DATA_HEADER + 5];
    write_data_header(&mut data, S);
    // Nobody bound yet.
    assert_eq!(t.handle(a(1), &data, now), Err(RelayError::NotBound));
    let bind = encode_bind_request(&K, S, Role::Controlling, 1);
    let Action::Reply(ok) = t.handle(a(1), &bind, now).unwrap() else {
        panic!()
    };
    assert!(verify_bind(&parse(&ok).unwrap(), &K));
    // Sent before the peer bound: held, a few and a few KB at most.
    for _ in 0..HOLD_FRAMES {
        assert_eq!(t.handle(a(1), &data, now), Ok(Action::Held));
    }
    assert_eq!(t.handle(a(1), &data, now), Err(RelayError::PeerNotBound));
    assert!(t.take_released().is_empty());
    t.handle(a(2), &encode_bind_request(&K, S, Role::Controlled, 2), now)
        .unwrap();
    // The bind releases them to the side that just bound, in order.
    let released = t.take_released();
    assert_eq!(released.len(), HOLD_FRAMES);
    assert!(released
        .iter()
        .all(|(to, f)| *to == a(2).into() && *f == data));
    assert!(t.take_released().is_empty());
    assert_eq!(t.handle(a(1), &data, now), Ok(Action::Forward(a(2).into())));
    assert_eq!(t.handle(a(2), &data, now), Ok(Action::Forward(a(1).into())));
    assert_eq!(t.handle(a(3), &data, now), Err(RelayError::NotBound));
    assert_eq!(t.stats.forwarded_packets, 2 + HOLD_FRAMES as u64);
    assert_eq!(t.stats.held, HOLD_FRAMES as u64);
}

#[test]
fn large_frames_are_not_held() {
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits::default());
    t.insert(S, K, now).unwrap();
    t.handle(a(1), &encode_bind_request(&K, S, Role::Controlling, 1), now)
        .unwrap();
    let mut big = vec![0u8; HOLD_BYTES + 1];
    write_data_header(&mut big, S);
    assert_eq!(t.handle(a(1), &big, now), Err(RelayError::PeerNotBound));
    let mut data = vec![0u8; HOLD_BYTES - 100];
    write_data_header(&mut data, S);
    assert_eq!(t.handle(a(1), &data, now), Ok(Action::Held));
    assert_eq!(t.handle(a(1), &data, now), Err(RelayError::PeerNotBound));
}

#[test]
fn a_tcp_client_and_a_udp_address_relay_to_each_other() {
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits::default());
    t.insert(S, K, now).unwrap();
    t.handle(
        Endpoint::Tcp(4),
        &encode_bind_request(&K, S, Role::Controlling, 1),
        now,
    )
    .unwrap();
    t.handle(a(2), &encode_bind_request(&K, S, Role::Controlled, 2), now)
        .unwrap();
    let mut data = vec![0u8; DATA_HEADER + 5];
    write_data_header(&mut data, S);
    assert_eq!(
        t.handle(Endpoint::Tcp(4), &data, now),
        Ok(Action::Forward(a(2).into()))
    );
    assert_eq!(
        t.handle(a(2), &data, now),
        Ok(Action::Forward(Endpoint::Tcp(4)))
    );
    // Another TCP client is not bound to the session.
    assert_eq!(
        t.handle(Endpoint::Tcp(5), &data, now),
        Err(RelayError::NotBound)
    );
}

#[test]
fn a_bind_for_an_unknown_session_is_answered_unknown_within_a_budget() {
    let now = Instant::now();
    let limits = RelayLimits {
        unknown_replies_per_sec: 3,
        ..RelayLimits::default()
    };
    let mut t = RelayTable::new(limits);
    let bind = encode_bind_request(&K, S, Role::Controlling, 1);
    let want = Ok(Action::Reply(encode_unknown(S)));
    for _ in 0..3 {
        assert_eq!(t.handle(a(1), &bind, now), want);
    }
    // Over the budget: dropped until the next second.
    assert_eq!(t.handle(a(1), &bind, now), Err(RelayError::UnknownSession));
    let later = now + Duration::from_secs(1);
    assert_eq!(t.handle(a(1), &bind, later), want);
    assert_eq!(t.stats.unknown_replies, 4);
    // The answer parses, is never larger than the bind, and no agent
    // can make the table take it as input.
    let answer = encode_unknown(S);
    assert!(answer.len() < bind.len());
    assert_eq!(parse(&answer), Ok(Frame::Unknown { session: S }));
    assert_eq!(t.handle(a(1), &answer, later), Err(RelayError::Malformed));
    // Data for an unknown session is told the same (it would otherwise
    // wait for its next bind refresh), from the same budget.
    let mut data = vec![0u8; DATA_HEADER + 5];
    write_data_header(&mut data, S);
    assert_eq!(t.handle(a(1), &data, later), want);
    assert_eq!(t.handle(a(1), &data, later), want);
    assert_eq!(
        t.handle(a(1), &data, later),
        Err(RelayError::UnknownSession)
    );
}

#[test]
fn a_bind_replayed_from_another_address_is_refused() {
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits::default());
    t.insert(S, K, now).unwrap();
    let bind_a = encode_bind_request(&K, S, Role::Controlling, 41);
    let bind_b = encode_bind_request(&K, S, Role::Controlled, 42);
    assert!(matches!(t.handle(a(1), &bind_a, now), Ok(Action::Reply(_))));
    assert!(matches!(t.handle(a(2), &bind_b, now), Ok(Action::Reply(_))));
    // A captured bind sent again from elsewhere does not move side A.
    assert_eq!(t.handle(a(9), &bind_a, now), Err(RelayError::Replayed));
    assert_eq!(t.stats.replayed_binds, 1);
    let mut data = vec![0u8; DATA_HEADER + 5];
    write_data_header(&mut data, S);
    assert_eq!(t.handle(a(2), &data, now), Ok(Action::Forward(a(1).into())));
    // The same bind again from its own address is a duplicate: answered.
    assert_eq!(
        t.handle(a(1), &bind_a, now),
        Ok(Action::Reply(encode_bind_ok(&K, S, Role::Controlling, 41)))
    );
    // A fresh bind (a new nonce) moves the side, as a NAT rebinding does.
    let fresh = encode_bind_request(&K, S, Role::Controlling, 43);
    assert!(matches!(t.handle(a(9), &fresh, now), Ok(Action::Reply(_))));
    assert_eq!(t.handle(a(2), &data, now), Ok(Action::Forward(a(9).into())));
    // The window is bounded: old nonces fall out of it.
    for n in 100..100 + BIND_NONCES as u64 {
        let f = encode_bind_request(&K, S, Role::Controlling, n);
        assert!(matches!(t.handle(a(9), &f, now), Ok(Action::Reply(_))));
    }
    assert!(t.sessions[&S].nonces[0].len() <= BIND_NONCES);
}

#[test]
fn forged_binds_and_unknown_sessions_are_refused() {
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits::default());
    t.insert(S, K, now).unwrap();
    let forged = encode_bind_request(&[6; 32], S, Role::Controlling, 1);
    assert_eq!(t.handle(a(1), &forged, now), Err(RelayError::BadMac));
    // A bind for a session the table does not know binds nothing; it
    // is told "unknown" (see the test of that budget).
    let other = encode_bind_request(&K, SessionId(78), Role::Controlling, 1);
    assert_eq!(
        t.handle(a(1), &other, now),
        Ok(Action::Reply(encode_unknown(SessionId(78))))
    );
    assert_eq!(t.len(), 1);
    assert_eq!(t.stats.dropped, 1);
}

#[test]
fn quotas_idle_and_cap() {
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits {
        max_sessions: 1,
        session_bytes: 40,
        idle: Duration::from_secs(10),
        ..RelayLimits::default()
    });
    t.insert(S, K, now).unwrap();
    assert_eq!(t.insert(SessionId(2), K, now), Err(RelayError::Full));
    t.handle(a(1), &encode_bind_request(&K, S, Role::Controlling, 1), now)
        .unwrap();
    t.handle(a(2), &encode_bind_request(&K, S, Role::Controlled, 1), now)
        .unwrap();
    let mut data = vec![0u8; 30];
    write_data_header(&mut data, S);
    assert!(t.handle(a(1), &data, now).is_ok());
    assert_eq!(t.handle(a(1), &data, now), Err(RelayError::Quota));
    // Both sides are told, with the session's MAC, once a second.
    let notices = t.take_released();
    assert_eq!(
        notices.iter().map(|(to, _)| *to).collect::<Vec<_>>(),
        vec![Endpoint::Udp(a(1)), Endpoint::Udp(a(2))]
    );
    for (_, f) in &notices {
        let parsed = parse(f).unwrap();
        assert!(matches!(
            parsed,
            Frame::Ended {
                session: S,
                reason: EndReason::Bytes,
                ..
            }
        ));
        assert!(verify_bind(&parsed, &K));
        assert!(!verify_bind(&parsed, &[6; 32]));
    }
    assert_eq!(t.handle(a(2), &data, now), Err(RelayError::Quota));
    assert!(t.take_released().is_empty());
    let later = now + ENDED_EVERY;
    assert_eq!(t.handle(a(2), &data, later), Err(RelayError::Quota));
    assert_eq!(t.take_released().len(), 2);
    assert_eq!((t.stats.quota_dropped, t.stats.ended_notices), (3, 4));
    // An agent cannot forge one into the table.
    let forged = encode_ended(&K, S, EndReason::Bytes, 1);
    assert_eq!(t.handle(a(1), &forged, later), Err(RelayError::Malformed));
    t.expire(now + Duration::from_secs(11));
    assert!(t.is_empty());
    assert_eq!(t.stats.expired, 1);
    // The slot is free again.
    t.insert(SessionId(2), K, now).unwrap();
}

#[test]
fn a_full_table_is_swept_at_most_once_a_second() {
    let t0 = Instant::now();
    let mut t = RelayTable::new(RelayLimits {
        max_sessions: 2,
        idle: Duration::from_millis(100),
        ..RelayLimits::default()
    });
    t.insert(SessionId(1), K, t0).unwrap();
    t.insert(SessionId(2), K, t0).unwrap();
    // Full, nothing idle yet: sweeps and refuses.
    assert_eq!(t.insert(SessionId(3), K, t0), Err(RelayError::Full));
    // Idle now, but the last sweep was under a second ago: refused
    // without another sweep.
    let t1 = t0 + Duration::from_millis(500);
    assert_eq!(t.insert(SessionId(3), K, t1), Err(RelayError::Full));
    assert_eq!(t.len(), 2);
    // A second later the sweep runs and frees both slots.
    let t2 = t0 + Duration::from_millis(1000);
    t.insert(SessionId(3), K, t2).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t.stats.expired, 2);
}

#[test]
fn a_requester_holds_at_most_its_share() {
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits {
        per_owner: 2,
        ..RelayLimits::default()
    });
    let id = SessionId;
    assert_eq!(t.insert_owned(id(1), K, "a", now), Ok(None));
    assert_eq!(t.insert_owned(id(2), K, "a", now), Ok(None));
    // Full share: the oldest unused session makes room.
    assert_eq!(t.insert_owned(id(3), K, "a", now), Ok(Some(id(1))));
    assert_eq!((t.owned_by("a"), t.len()), (2, 2));
    // Others are not touched by a's share.
    assert_eq!(t.insert_owned(id(10), K, "b", now), Ok(None));
    // Bound sessions are in use: never dropped for a new one.
    for s in [2, 3] {
        t.handle(
            a(1),
            &encode_bind_request(&K, id(s), Role::Controlling, 1),
            now,
        )
        .unwrap();
    }
    assert_eq!(
        t.insert_owned(id(4), K, "a", now),
        Err(RelayError::ShareFull)
    );
    assert_eq!((t.stats.share_evicted, t.stats.share_refused), (1, 1));
    assert_eq!(
        t.handle(
            a(1),
            &encode_bind_request(&K, id(1), Role::Controlling, 1),
            now
        ),
        Ok(Action::Reply(encode_unknown(id(1)))),
        "the evicted session is gone"
    );
    // Expiry frees the share (idle sessions of the owner go first).
    let later = now + RelayLimits::default().idle;
    assert_eq!(t.insert_owned(id(5), K, "a", later), Ok(None));
    assert_eq!(t.owned_by("a"), 1);
    t.expire(later + RelayLimits::default().idle);
    assert!(t.is_empty());
    assert_eq!((t.owned_by("a"), t.owned_by("b")), (0, 0));
    assert!(t.owners.is_empty());
}

proptest! {
    #[test]
    fn any_bytes_are_ok_or_err(mut d in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut t = RelayTable::new(RelayLimits::default());
        t.insert(S, K, Instant::now()).unwrap();
        let _ = t.handle(a(1), &d, Instant::now());
        if d.len() >= 4 { d[..4].copy_from_slice(&MAGIC); }
        let _ = t.handle(a(1), &d, Instant::now());
        let _ = parse(&d);
    }
}
