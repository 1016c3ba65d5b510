//! The server's relay intake: a receive buffer cut into GRO-style segments
//! of one stride, each segment handed to the relay table from one of three
//! senders (the two bound sides of a session and a stranger), with time
//! moving on. The harness binds both sides first with real MACs, so the
//! fuzzer reaches forwarding, holding, batches, quotas and "ended" notices.
//! Checks: a frame goes only to the other bound side of its session (as the
//! binds answered so far say), never back to its sender, and whatever the
//! table answers or releases is a well-formed frame, no larger than what
//! came in when it answers a stranger's frame ("unknown").
#![no_main]

use libfuzzer_sys::fuzz_target;
use punch_protocol::relay::{self, Action, Endpoint, RelayLimits, RelayTable};
use punch_protocol::signal::{Role, SessionId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SECRET: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    // head: bit 0 binds side B before the segments, the rest is the
    // stride; pick: two bits per segment name its sender.
    let [head, pick, rest @ ..] = data else {
        return;
    };
    let (head, pick) = (*head, *pick);
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits {
        max_sessions: 4,
        session_bytes: 64 * 1024,
        session_time: Duration::from_secs(600),
        idle: Duration::from_secs(30),
        ..RelayLimits::default()
    });
    let a: SocketAddr = "127.0.0.1:4001".parse().unwrap();
    let b = Endpoint::Tcp(2);
    let stranger: SocketAddr = "127.0.0.1:4003".parse().unwrap();
    let s = SessionId(1);
    t.insert(s, SECRET, now).unwrap();
    let _ = t.insert(SessionId(2), SECRET, now);
    // Side A binds at once; side B only when the first byte says so, so
    // frames before B's bind are held.
    let bind_a = relay::encode_bind_request(&SECRET, s, Role::Controlling, 1);
    assert!(matches!(t.handle(a, &bind_a, now), Ok(Action::Reply(_))));
    // Who is bound to which (session, controlled side?), as the bind-oks tell.
    let mut bound: HashMap<(u64, bool), Endpoint> = HashMap::new();
    bound.insert((1, false), a.into());
    if head & 1 == 1 {
        let bind_b = relay::encode_bind_request(&SECRET, s, Role::Controlled, 1);
        assert!(matches!(t.handle(b, &bind_b, now), Ok(Action::Reply(_))));
        bound.insert((1, true), b);
    }
    let stride = 1 + (head >> 1) as usize * 4;
    let mut clock = now;
    for (k, seg) in rest.chunks(stride).enumerate() {
        let from: Endpoint = match (pick >> (2 * (k % 4))) & 3 {
            1 => b,
            2 => stranger.into(),
            _ => a.into(),
        };
        clock += Duration::from_millis(u64::from(seg.last().copied().unwrap_or(0)) * 8);
        if k % 5 == 4 {
            t.expire(clock);
        }
        match t.handle(from, seg, clock) {
            Ok(Action::Forward(to)) => {
                assert_ne!(to, from, "a frame went back to its sender");
                let session = match relay::parse(seg) {
                    Ok(
                        relay::Frame::Data { session, .. } | relay::Frame::Batch { session, .. },
                    ) => session.0,
                    other => panic!("forwarded a frame that is not data: {other:?}"),
                };
                let sides = [false, true].map(|r| bound.get(&(session, r)));
                assert!(
                    sides.contains(&Some(&from)) && sides.contains(&Some(&to)),
                    "forwarded {from:?} -> {to:?}, bound: {sides:?}"
                );
            }
            Ok(Action::Reply(f)) => match relay::parse(&f) {
                Ok(relay::Frame::BindOk { session, side, .. }) => {
                    bound.insert((session.0, side == Role::Controlled), from);
                }
                // A session the table does not know: told so, in fewer
                // bytes than were sent (no amplification).
                Ok(relay::Frame::Unknown { session }) => {
                    assert!(session.0 != 1 && session.0 != 2 || t.len() < 2);
                    assert!(f.len() <= seg.len(), "unknown answer larger than the frame");
                }
                other => panic!("a reply that is not a bind-ok or unknown: {other:?}"),
            },
            Ok(Action::Held) | Err(_) => {}
        }
        for (to, f) in t.take_released() {
            assert!(bound.values().any(|e| *e == to), "released to {to:?}");
            assert!(relay::parse(&f).is_ok());
        }
    }
    // Batch bodies: the items found cover the body exactly.
    if let Some(items) = relay::batch_items(rest) {
        let mut end = 0;
        for r in items {
            assert_eq!(r.start, end + 2);
            end = r.end;
        }
        assert_eq!(end, rest.len());
    }
});
