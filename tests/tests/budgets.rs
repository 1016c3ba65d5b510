//! Per-requester budgets on a real server over loopback QUIC: the connect
//! rate (token bucket), each agent's share of the relay table, and the
//! bound on queries in flight per connection; the agent-wide probe budget
//! a peer steering probes at a third party meets. Raw signaling clients, so
//! the test sees every answer (and every offer's relay flag) itself.

use punch_lab::harness::{RawClient as Raw, ServerProc};
use punch_protocol::relay;
use punch_protocol::signal::{ClientMsg, ErrorCode, Offer, Query, Role, ServerMsg};
use std::time::Duration;

/// Every wait on the server is bounded by this.
const T: Duration = Duration::from_secs(10);

/// A counter or gauge from the server's /metrics.
fn metric(s: &ServerProc, name: &str) -> u64 {
    let m = s.http_get("/metrics").unwrap();
    let prefix = format!("{name} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
        .trim()
        .parse()
        .unwrap()
}

fn code(m: &ServerMsg) -> ErrorCode {
    match m {
        ServerMsg::Error { code, .. } => *code,
        m => panic!("expected an error, got {m:?}"),
    }
}

/// Connects beyond the bucket (burst 3, 1 a second) are refused with
/// `rate_limited` and counted; another agent's bucket is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_requests_are_rate_limited_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let s =
        ServerProc::start(dir.path(), &["--connect-rate", "1", "--connect-burst", "3"]).unwrap();
    let mut a = Raw::register(&s, "rate-a").await;
    let mut b = Raw::register(&s, "rate-b").await;
    // All sent at once, then all read: well under the refill second.
    for req in 1..=10 {
        a.send(ClientMsg::Connect {
            req,
            target: "nobody".into(),
        })
        .await;
    }
    let mut codes = Vec::new();
    for _ in 1..=10 {
        codes.push(code(&a.next().await));
    }
    assert_eq!(codes[..3], [ErrorCode::UnknownWorker; 3], "{codes:?}");
    let limited = codes
        .iter()
        .filter(|c| **c == ErrorCode::RateLimited)
        .count();
    // One token may have come back while the frames crossed.
    assert!(limited >= 6, "{codes:?}");
    assert_eq!(
        metric(&s, "punch_connect_rate_limited_total"),
        limited as u64
    );
    // B was not touched by A's loop.
    assert_eq!(
        code(&b.connect(1, "nobody").await),
        ErrorCode::UnknownWorker
    );
    // The bucket refills: within its second and a bit A may connect again.
    let deadline = tokio::time::Instant::now() + T;
    let mut req = 100;
    loop {
        req += 1;
        if code(&a.connect(req, "nobody").await) == ErrorCode::UnknownWorker {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no refill in {T:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Binds `side` of the offer's relay session from a UDP socket of its own,
/// as an agent that fell back to the relay does.
async fn bind_relay(s: &ServerProc, o: &Offer, side: Role) -> tokio::net::UdpSocket {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bind = relay::encode_bind_request(&o.secret, o.session, side, 1);
    sock.send_to(&bind, s.udp).await.unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .expect("a bind-ok within 10 s")
        .unwrap();
    let f = relay::parse(&buf[..n]).unwrap();
    assert!(matches!(f, relay::Frame::BindOk { .. }), "{f:?}");
    sock
}

/// One agent holds at most `--relay-sessions-per-agent` relay sessions:
/// beyond it its oldest unused one makes room; when all are in use its
/// offers go out without a relay. Another agent's offers keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_holds_a_share_of_the_relay_table() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--relay-sessions-per-agent", "2"]).unwrap();
    let mut a = Raw::register(&s, "share-a").await;
    let mut t = Raw::register(&s, "share-t").await;
    let mut c = Raw::register(&s, "share-c").await;
    let mut offers = Vec::new();
    for req in 1..=3 {
        let ServerMsg::Offer(o) = a.connect(req, "share-t").await else {
            panic!("expected an offer");
        };
        assert!(
            o.relay,
            "offer {req} has a relay: unused sessions make room"
        );
        assert_eq!(t.offer().await.session, o.session);
        offers.push(o);
    }
    assert_eq!(metric(&s, "punch_relay_sessions"), 2);
    assert_eq!(metric(&s, "punch_relay_share_evicted_total"), 1);
    // The first made room: its bind finds no session.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bind =
        relay::encode_bind_request(&offers[0].secret, offers[0].session, Role::Controlling, 1);
    sock.send_to(&bind, s.udp).await.unwrap();
    // The other two are bound (in use): A's next offer has no relay.
    let _bound = bind_all(&s, &offers[1..]).await;
    let ServerMsg::Offer(o) = a.connect(4, "share-t").await else {
        panic!("expected an offer");
    };
    assert!(
        !o.relay,
        "A's share is in use: no relay for its fourth offer"
    );
    assert!(!t.offer().await.relay);
    assert_eq!(metric(&s, "punch_relay_share_refused_total"), 1);
    // C is not held back by A.
    let ServerMsg::Offer(o) = c.connect(1, "share-t").await else {
        panic!("expected an offer");
    };
    assert!(o.relay, "another agent's offer keeps its relay");
    assert_eq!(metric(&s, "punch_relay_sessions"), 3);
    // And the session A's first offer lost is unknown to the server.
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .expect("an answer to the bind within 10 s")
        .unwrap();
    assert_eq!(
        relay::parse(&buf[..n]),
        Ok(relay::Frame::Unknown {
            session: offers[0].session
        }),
        "an evicted session answered a bind"
    );
}

/// Binds the requester's side of each offer's relay session.
async fn bind_all(s: &ServerProc, offers: &[Offer]) -> Vec<tokio::net::UdpSocket> {
    let mut out = Vec::new();
    for o in offers {
        out.push(bind_relay(s, o, Role::Controlling).await);
    }
    out
}

/// Queries answered from tasks of their own (waits, listings) are bounded
/// per connection: beyond `--max-queries-per-agent` they are answered
/// `rate_limited` at once and counted, while the others keep waiting and
/// other connections are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_in_flight_are_bounded_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--max-queries-per-agent", "2"]).unwrap();
    let mut a = Raw::register(&s, "query-a").await;
    let wait = |req| ClientMsg::Query {
        req,
        query: Query::Wait {
            id: "never".into(),
            timeout_ms: 60_000,
        },
    };
    for req in 1..=3 {
        a.send(wait(req)).await;
    }
    a.send(ClientMsg::Query {
        req: 4,
        query: Query::List {
            kind: None,
            tag: None,
        },
    })
    .await;
    // Answered without a task, so not bounded: a Get.
    a.send(ClientMsg::Query {
        req: 5,
        query: Query::Get {
            id: "query-a".into(),
        },
    })
    .await;
    let mut answered = Vec::new();
    while answered.len() < 3 {
        match a.next().await {
            ServerMsg::Error {
                req: Some(r),
                code: ErrorCode::RateLimited,
                message,
            } => {
                assert!(message.contains("busy"), "{message}");
                answered.push(r);
            }
            ServerMsg::Workers { req: 5, workers } => {
                assert_eq!(workers.len(), 1);
                answered.push(5);
            }
            m => panic!("unexpected answer {m:?}"),
        }
    }
    answered.sort();
    assert_eq!(answered, [3, 4, 5], "waits 1 and 2 are still in flight");
    assert_eq!(metric(&s, "punch_queries_refused_total"), 2);
    assert_eq!(metric(&s, "punch_waits_in_progress"), 2);
    // Another connection has its own budget.
    let mut b = Raw::register(&s, "query-b").await;
    b.send(ClientMsg::Query {
        req: 1,
        query: Query::Wait {
            id: "query-a".into(),
            timeout_ms: 10_000,
        },
    })
    .await;
    assert!(matches!(b.next().await, ServerMsg::Workers { req: 1, .. }));
}

/// A peer that names a third party's address as its candidates (16 ports
/// of one IP) and asks for 128 sessions at once makes the target send
/// there no more than the agent-wide probe budget (4,000 saved up, 2,000
/// a second), where the sessions' own bounds would allow tens of thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_steer_more_than_the_probe_budget_at_a_third_party() {
    use punch_protocol::budget::{PROBES_PER_IP, PROBE_BURST_PER_IP};
    use punch_protocol::signal::{Candidate, CandidateKind};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    const SESSIONS: u32 = 128;
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--connect-rate", "0"]).unwrap();
    let _target = s.serve(dir.path(), "steer-target", &[]).unwrap();
    // The "third party": 16 sockets on another loopback address, counting.
    let got = Arc::new(AtomicU64::new(0));
    let mut victims = Vec::new();
    let mut candidates = Vec::new();
    for _ in 0..16 {
        let v = tokio::net::UdpSocket::bind("127.0.0.3:0").await.unwrap();
        candidates.push(Candidate {
            addr: v.local_addr().unwrap(),
            kind: CandidateKind::Local,
        });
        let got = got.clone();
        victims.push(tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while v.recv_from(&mut buf).await.is_ok() {
                got.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut a = Raw::register_with(&s, "steerer", candidates).await;
    let started = std::time::Instant::now();
    // In waves of 32: the server refuses offers past the target's queue
    // (64) while the target is busy reading; refused ones are asked again.
    let (mut offers, mut req) = (0, 0);
    while offers < SESSIONS && req < 4 * SESSIONS {
        let wave = (SESSIONS - offers).min(32);
        for _ in 0..wave {
            req += 1;
            a.send(ClientMsg::Connect {
                req,
                target: "steer-target".into(),
            })
            .await;
        }
        for _ in 0..wave {
            match a.next().await {
                ServerMsg::Offer(_) => offers += 1,
                ServerMsg::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => {}
                m => panic!("unexpected answer {m:?}"),
            }
        }
    }
    assert_eq!(
        offers, SESSIONS,
        "every session was introduced ({req} asked)"
    );
    // Every session's punching ends within its 5 s timeout.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let secs = started.elapsed().as_secs_f64();
    let sent = got.load(Ordering::Relaxed);
    let budget = PROBE_BURST_PER_IP as f64 + PROBES_PER_IP as f64 * secs;
    eprintln!("third party got {sent} probes in {secs:.1} s; budget {budget:.0}");
    assert!(sent > 0, "the target probed the candidates at all");
    assert!(
        (sent as f64) <= budget,
        "{sent} probes reached the third party in {secs:.1} s, over the budget of {budget:.0}"
    );
    for v in victims {
        v.abort();
    }
}

/// `--candidates explained`: an agent that names a third party's address
/// (and a private one) as its candidates gets the third party kept out of
/// its peers' offers, and counted; the default passes every usable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_server_offers_only_candidates_it_can_explain() {
    use punch_protocol::signal::{Candidate, CandidateKind};
    let local = |a: &str| Candidate {
        addr: a.parse().unwrap(),
        kind: CandidateKind::Local,
    };
    let forged = vec![
        local("198.51.100.9:80"),
        local("10.9.9.9:4000"),
        local("127.0.0.1:5555"),
    ];
    for (policy, third_party_offered) in [("explained", false), ("open", true)] {
        let dir = tempfile::tempdir().unwrap();
        let s = ServerProc::start(dir.path(), &["--candidates", policy]).unwrap();
        let mut liar = Raw::register_with(&s, "liar", forged.clone()).await;
        let mut peer = Raw::register(&s, "peer").await;
        let ServerMsg::Offer(o) = peer.connect(1, "liar").await else {
            panic!("expected an offer");
        };
        liar.offer().await;
        let addrs: Vec<String> = o
            .peer_candidates
            .iter()
            .map(|c| c.addr.to_string())
            .collect();
        assert_eq!(
            addrs.contains(&"198.51.100.9:80".to_string()),
            third_party_offered,
            "{policy}: {addrs:?}"
        );
        // Its own address (another port) and, toward a peer at the same
        // public address, its private one are explained.
        assert!(
            addrs.contains(&"127.0.0.1:5555".to_string()),
            "{policy}: {addrs:?}"
        );
        assert!(
            addrs.contains(&"10.9.9.9:4000".to_string()),
            "{policy}: {addrs:?}"
        );
        let kept_back = metric(&s, "punch_candidates_unexplained_total");
        assert_eq!(kept_back, u64::from(!third_party_offered), "{policy}");
    }
}
