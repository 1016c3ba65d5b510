//! Server restarts and hostile clients.

use punch_agent::{Agent, AgentConfig, AgentError, PathKind, Status};
use punch_lab::harness::ServerProc;
use punch_net::{read_frame, write_frame};
use punch_protocol::signal::{ClientMsg, ErrorCode, Hello, ServerMsg};
use punch_protocol::{ALPN_SIGNAL, PROTOCOL_VERSION};
use punch_tls::{Expect, Identity, KeyVerifier};
use std::time::{Duration, Instant};

/// Serves every peer connection `a` accepts with the built-in protocols.
fn serve_peers(a: &Agent) {
    let a = a.clone();
    tokio::spawn(async move {
        while let Some(pc) = a.accept().await {
            tokio::spawn(pc.serve());
        }
    });
}

async fn agent(s: &ServerProc, id: &str, dir: &std::path::Path) -> Agent {
    agent_mode(s, id, dir, punch_agent::RelayMode::Auto).await
}

/// A registered agent of the server at `server` (as `AgentConfig::new`
/// takes it) with `id`'s key, kept in `dir` (a restarted process with the
/// same key is the same peer), using the relay as `relay` says.
async fn agent_at(
    server: String,
    s: &ServerProc,
    id: &str,
    dir: &std::path::Path,
    relay: punch_agent::RelayMode,
) -> Agent {
    let mut cfg = AgentConfig::new(server, s.fingerprint.clone());
    cfg.worker_id = Some(id.into());
    cfg.key_file = Some(dir.join(format!("{id}.key")));
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.relay = relay;
    let a = Agent::start(cfg).await.unwrap();
    a.registered(Duration::from_secs(10)).await.unwrap();
    a
}

/// Waits until the agent has lost its registration and registered again.
async fn reregistered(a: &Agent, limit: Duration) -> Result<(), String> {
    let mut rx = a.watch_status();
    let mut lost = false;
    let wait = async {
        loop {
            match &*rx.borrow_and_update() {
                Status::Connecting(_) => lost = true,
                Status::Registered { .. } if lost => return Ok(()),
                Status::Failed(e) => return Err(e.to_string()),
                _ => {}
            }
            rx.changed().await.map_err(|e| e.to_string())?;
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| format!("{} did not re-register within {limit:?}", a.worker_id()))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reregister_after_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(dir.path(), &[]).unwrap();
    let a = agent(&s, "worker-a", dir.path()).await;
    let b = agent(&s, "worker-b", dir.path()).await;
    serve_peers(&b);
    assert_eq!(
        a.connect("worker-b").await.unwrap().path.kind,
        PathKind::Direct
    );

    // Kill -9 and restart on the same port with the same data dir.
    let s2 = s.restart(&[]).unwrap();
    let restarted = Instant::now();
    let (ra, rb) = tokio::join!(
        reregistered(&a, Duration::from_secs(10)),
        reregistered(&b, Duration::from_secs(10))
    );
    ra.unwrap();
    rb.unwrap();
    let took = restarted.elapsed();
    eprintln!("both agents re-registered {took:?} after the restart");
    let peers = s2.http_get("/peers").unwrap();
    assert!(
        peers.contains("worker-a") && peers.contains("worker-b"),
        "{peers}"
    );
    let pc = a.connect("worker-b").await.unwrap();
    assert_eq!(pc.path.kind, PathKind::Direct);
    let rtt = pc.pinger().await.unwrap().ping().await.unwrap();
    assert!(rtt < Duration::from_secs(1));
}

/// A raw signaling client that can send anything.
async fn raw_client(
    s: &ServerProc,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    Identity,
) {
    let id = Identity::generate().unwrap();
    let cfg = punch_tls::client_config(
        &id,
        KeyVerifier::new(Expect::Fingerprint(s.fingerprint.clone())),
        ALPN_SIGNAL,
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, s.udp, "punch").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (ep, conn, send, recv, id)
}

fn hello_of(id: &Identity, name: &str) -> Hello {
    match hello(id, PROTOCOL_VERSION, name) {
        ClientMsg::Hello(h) => h,
        _ => unreachable!(),
    }
}

fn hello(id: &Identity, version: u16, name: &str) -> ClientMsg {
    ClientMsg::Hello(Hello {
        version,
        worker_id: name.into(),
        public_key: id.public_key(),
        token_proof: None,
        ephemeral: true,
        local_candidates: vec![],
        metadata: vec![],
        kind: None,
        tags: vec![],
    })
}

async fn next(recv: &mut quinn::RecvStream) -> ServerMsg {
    tokio::time::timeout(Duration::from_secs(10), read_frame(recv, 1 << 16))
        .await
        .expect("server answers within 10 s")
        .expect("a valid frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_errors_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let b = agent(&s, "worker-b", dir.path()).await;
    serve_peers(&b);

    // Wrong protocol version.
    let (_ep, _c, mut send, mut recv, id) = raw_client(&s).await;
    write_frame(&mut send, &hello(&id, PROTOCOL_VERSION + 98, "v99"))
        .await
        .unwrap();
    match next(&mut recv).await {
        ServerMsg::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::BadVersion);
            assert!(message.contains("version"), "{message}");
        }
        m => panic!("expected BadVersion, got {m:?}"),
    }

    // A hello whose key is not the TLS key.
    let (_ep, _c, mut send, mut recv, _) = raw_client(&s).await;
    let other = Identity::generate().unwrap();
    write_frame(&mut send, &hello(&other, PROTOCOL_VERSION, "liar"))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut recv).await,
        ServerMsg::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));

    // A bad worker id.
    let (_ep, _c, mut send, mut recv, id) = raw_client(&s).await;
    write_frame(&mut send, &hello(&id, PROTOCOL_VERSION, "no spaces"))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut recv).await,
        ServerMsg::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));

    // Registry metadata out of bounds: too many tags, a bad type name, an
    // oversized metadata value.
    for bad in [
        Hello {
            tags: (0..17).map(|i| format!("t{i}")).collect(),
            ..hello_of(&id, "tags")
        },
        Hello {
            kind: Some("bad type!".into()),
            ..hello_of(&id, "kind")
        },
        Hello {
            metadata: vec![("k".into(), "v".repeat(257))],
            ..hello_of(&id, "meta")
        },
    ] {
        let (_ep, _c, mut send, mut recv, id2) = raw_client(&s).await;
        let bad = Hello {
            public_key: id2.public_key(),
            ..bad
        };
        write_frame(&mut send, &ClientMsg::Hello(bad))
            .await
            .unwrap();
        assert!(matches!(
            next(&mut recv).await,
            ServerMsg::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
    }

    // Garbage instead of a hello: an unknown message type.
    let (_ep, _c, mut send, mut recv, _) = raw_client(&s).await;
    send.write_all(&[0, 0, 0, 3, 0xee, 0xff, 0x01])
        .await
        .unwrap();
    assert!(matches!(
        next(&mut recv).await,
        ServerMsg::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));

    // After a good hello: a truncated frame, then an oversized length.
    let (_ep, conn, mut send, mut recv, id) = raw_client(&s).await;
    write_frame(&mut send, &hello(&id, PROTOCOL_VERSION, "raw-1"))
        .await
        .unwrap();
    assert!(matches!(next(&mut recv).await, ServerMsg::Welcome { .. }));
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(matches!(
        next(&mut recv).await,
        ServerMsg::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    assert!(
        closed.is_ok(),
        "server closes a connection that sent an oversized frame"
    );

    // A connection that never says hello is dropped after the hello timeout;
    // meanwhile a well-behaved agent connects as usual.
    let (_ep, _idle, _send, _recv, _) = raw_client(&s).await;
    let a = agent(&s, "worker-a", dir.path()).await;
    let pc = a.connect("worker-b").await.unwrap();
    assert_eq!(pc.path.kind, PathKind::Direct);
    let health: serde_json::Value = serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap();
    assert!(
        health["metrics"]["decode_errors"].as_u64().unwrap() >= 2,
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_concurrent_connects_to_one_peer() {
    // Sequential: each connection closes before the next opens (the
    // previous one's clean-up must not tear down the next one's path).
    let b = punch_lab::demo::bench_connect(20, "127.0.0.1")
        .await
        .unwrap();
    assert_eq!(b.count, 20);
    // Concurrent: two live connections to the same peer share its path.
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let a = agent(&s, "worker-a", dir.path()).await;
    let bb = agent(&s, "worker-b", dir.path()).await;
    serve_peers(&bb);
    let one = a.connect("worker-b").await.unwrap();
    let two = a.connect("worker-b").await.unwrap();
    assert_eq!(one.virtual_addr, two.virtual_addr);
    for pc in [&one, &two, &one] {
        let rtt = tokio::time::timeout(Duration::from_secs(5), async {
            pc.pinger().await.unwrap().ping().await.unwrap()
        })
        .await
        .expect("both connections carry data");
        assert!(rtt < Duration::from_secs(1));
    }
    two.conn.close(0u32.into(), b"done");
    two.conn.closed().await;
    // Closing one leaves the other working.
    let rtt = tokio::time::timeout(Duration::from_secs(5), async {
        one.pinger().await.unwrap().ping().await.unwrap()
    })
    .await
    .expect("the remaining connection still carries data");
    assert!(rtt < Duration::from_secs(1));
}

/// What a scripted server answers one registration.
#[derive(Clone, Debug)]
enum Answer {
    /// A refusal, as punch-server sends one (then it closes).
    Refuse(ErrorCode),
    /// Closes without an answer (a server that fails mid-registration).
    Drop,
    /// A welcome speaking this protocol version; the connection stays up.
    Welcome(u16),
}

/// A signaling server that answers the n-th registration with the n-th
/// answer (the last one repeats): refusals on demand, without a hook in the
/// real server. Returns its address and fingerprint.
async fn scripted_server(answers: Vec<Answer>) -> (std::net::SocketAddr, String) {
    let id = Identity::generate().unwrap();
    let fingerprint = id.fingerprint();
    let cfg =
        punch_tls::server_config(&id, KeyVerifier::new(Expect::AnyKey), &[ALPN_SIGNAL]).unwrap();
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut n = 0;
        while let Some(incoming) = ep.accept().await {
            let answer = answers[n.min(answers.len() - 1)].clone();
            n += 1;
            let Ok(conn) = incoming.await else { continue };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                continue;
            };
            let hello: Result<ClientMsg, _> = read_frame(&mut recv, 1 << 16).await;
            assert!(matches!(hello, Ok(ClientMsg::Hello(_))), "{hello:?}");
            match answer {
                Answer::Refuse(code) => {
                    let m = ServerMsg::Error {
                        req: None,
                        code,
                        message: format!("scripted {}", code.as_str()),
                    };
                    write_frame(&mut send, &m).await.unwrap();
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                    conn.close(punch_server::signal::error_close_code(code), b"scripted");
                }
                Answer::Drop => conn.close(0u32.into(), b""),
                Answer::Welcome(version) => {
                    let m = ServerMsg::Welcome {
                        version,
                        observed: conn.remote_address(),
                    };
                    write_frame(&mut send, &m).await.unwrap();
                    held.push((conn, send, recv));
                }
            }
        }
    });
    (addr, fingerprint)
}

fn quiet_agent(server: String, fingerprint: String) -> AgentConfig {
    let mut cfg = AgentConfig::new(server, fingerprint);
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.udp_only = true;
    cfg.nat_check = false;
    cfg.local_candidates = false;
    cfg
}

/// Follows an agent's status until it registers or gives up (at most
/// `limit`): the errors it went through, and how it ended.
async fn outcome(a: &Agent, limit: Duration) -> (Vec<String>, Result<(), AgentError>) {
    let mut rx = a.watch_status();
    let mut seen = Vec::new();
    let end = tokio::time::timeout(limit, async {
        loop {
            match &*rx.borrow_and_update() {
                Status::Registered { .. } => return Ok(()),
                Status::Failed(e) => return Err(e.clone()),
                Status::Connecting(Some(e)) => {
                    let k = e.to_string();
                    if seen.last() != Some(&k) {
                        seen.push(k);
                    }
                }
                Status::Connecting(None) => {}
            }
            rx.changed().await.expect("agent runs");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("neither registered nor failed within {limit:?}: {seen:?}"));
    (seen, end)
}

/// Refusals that can pass are retried with back-off until the server
/// accepts: bad request and malformed (a server bug or a rolling upgrade),
/// busy, and a server that drops the connection mid-registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_refusals_are_retried_until_registration() {
    let (addr, fp) = scripted_server(vec![
        Answer::Refuse(ErrorCode::BadRequest),
        Answer::Refuse(ErrorCode::Malformed),
        Answer::Refuse(ErrorCode::RateLimited),
        Answer::Drop,
        Answer::Welcome(PROTOCOL_VERSION),
    ])
    .await;
    let a = Agent::start(quiet_agent(addr.to_string(), fp))
        .await
        .unwrap();
    let (seen, end) = outcome(&a, Duration::from_secs(30)).await;
    assert!(end.is_ok(), "{end:?} after {seen:?}");
    for code in ["bad_request", "malformed", "rate_limited"] {
        assert!(
            seen.iter().any(|e| e.contains(&format!("scripted {code}"))),
            "{code} not seen (and retried): {seen:?}"
        );
    }
}

/// The refusals retrying cannot fix stop the agent at once, each with its
/// own error (and so its own exit code): a wrong or missing token, an id
/// bound to another key, a server key other than the pinned one, another
/// protocol version (refused by the server, or spoken in its welcome).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lasting_refusals_stop_the_agent() {
    let limit = Duration::from_secs(15);
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--token", "right"]).unwrap();
    let with = |token: Option<&str>, id: Option<&str>, key: &str| {
        let mut cfg = quiet_agent(s.udp.to_string(), s.fingerprint.clone());
        cfg.token = token.map(str::to_string);
        cfg.worker_id = id.map(str::to_string);
        cfg.key_file = Some(dir.path().join(key));
        cfg
    };
    let stopped = |r: (Vec<String>, Result<(), AgentError>)| match r.1 {
        Err(e) => e,
        Ok(()) => panic!("registered, expected a stop (after {:?})", r.0),
    };

    for token in [Some("wrong"), None] {
        let a = Agent::start(with(token, None, "t.key")).await.unwrap();
        let e = stopped(outcome(&a, limit).await);
        assert!(matches!(e, AgentError::BadToken(_)), "{e:?}");
        assert_eq!(e.exit_code(), 6);
    }

    let owner = Agent::start(with(Some("right"), Some("taken"), "one.key"))
        .await
        .unwrap();
    owner.registered(limit).await.unwrap();
    owner.close().await;
    let thief = Agent::start(with(Some("right"), Some("taken"), "two.key"))
        .await
        .unwrap();
    let e = stopped(outcome(&thief, limit).await);
    assert!(matches!(e, AgentError::IdTaken(_)), "{e:?}");
    assert_eq!(e.exit_code(), 9);

    let other = Identity::generate().unwrap().fingerprint();
    let mut cfg = with(Some("right"), None, "p.key");
    cfg.server_fingerprint = other;
    let a = Agent::start(cfg).await.unwrap();
    let e = stopped(outcome(&a, limit).await);
    assert!(matches!(e, AgentError::FingerprintMismatch { .. }), "{e:?}");
    assert_eq!(e.exit_code(), 7);

    for answer in [
        Answer::Refuse(ErrorCode::BadVersion),
        Answer::Welcome(PROTOCOL_VERSION + 1),
    ] {
        let (addr, fp) = scripted_server(vec![answer.clone()]).await;
        let a = Agent::start(quiet_agent(addr.to_string(), fp))
            .await
            .unwrap();
        let e = stopped(outcome(&a, limit).await);
        assert!(matches!(e, AgentError::BadVersion(_)), "{answer:?}: {e:?}");
        assert_eq!(e.exit_code(), 10);
    }
}

/// Our own hello is checked at start: a bad tag is a configuration error
/// there, not a refusal to retry for ever.
#[tokio::test]
async fn a_bad_hello_is_a_config_error_at_start() {
    let mut cfg = quiet_agent(
        "127.0.0.1:9".into(),
        Identity::generate().unwrap().fingerprint(),
    );
    cfg.tags = vec!["no spaces".into()];
    let e = Agent::start(cfg).await.err().expect("refused at start");
    assert!(matches!(e, AgentError::Config(_)), "{e:?}");
    assert_eq!(e.exit_code(), 2);
}

/// [`agent_at`] the server's UDP address.
async fn agent_mode(
    s: &ServerProc,
    id: &str,
    dir: &std::path::Path,
    relay: punch_agent::RelayMode,
) -> Agent {
    agent_at(s.udp.to_string(), s, id, dir, relay).await
}

/// A peer that comes back (same id and key, a new process) on another path
/// than its earlier connection took is answered on the path its new
/// handshake arrives on, not on the stale one: direct→relay, relay→direct
/// and direct→direct, 0, 1 and 5 s after the first process went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_answered_on_the_path_its_handshake_takes() {
    use punch_agent::RelayMode::{Auto, Force};
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let b = agent(&s, "worker-b", dir.path()).await;
    serve_peers(&b);
    let kind = |m| {
        if m == Force {
            PathKind::Relayed
        } else {
            PathKind::Direct
        }
    };
    let mut failures = Vec::new();
    for (first, second) in [(Auto, Force), (Force, Auto), (Auto, Auto)] {
        for delay in [0u64, 1, 5] {
            let case = format!("{first:?} -> {second:?} after {delay} s");
            let a1 = agent_mode(&s, "worker-a", dir.path(), first).await;
            let pc = a1
                .connect("worker-b")
                .await
                .unwrap_or_else(|e| panic!("{case}: first connection: {e}; before: {failures:#?}"));
            assert_eq!(pc.path.kind, kind(first), "{case}: first connection");
            pc.pinger().await.unwrap().ping().await.unwrap();
            a1.close().await;
            drop((pc, a1));
            // The scenario's pause, not a synchronisation.
            tokio::time::sleep(Duration::from_secs(delay)).await;
            let a2 = agent_mode(&s, "worker-a", dir.path(), second).await;
            let started = Instant::now();
            // A relayed connect on loopback takes milliseconds; a handshake
            // answered on a stale path needed quinn's retransmits (~6 s) or
            // timed out.
            let r = tokio::time::timeout(Duration::from_secs(3), async {
                let pc = a2.connect("worker-b").await.map_err(|e| e.to_string())?;
                pc.pinger()
                    .await
                    .map_err(|e| e.to_string())?
                    .ping()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(pc.path.kind)
            })
            .await;
            match r {
                Ok(Ok(k)) if k == kind(second) => {
                    eprintln!("{case}: {k:?} in {:?}", started.elapsed())
                }
                Ok(Ok(k)) => failures.push(format!("{case}: {k:?}")),
                Ok(Err(e)) => failures.push(format!("{case}: {e}")),
                Err(_) => failures.push(format!("{case}: no round trip within 3 s")),
            }
            a2.close().await;
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Restarts the server (stopped 2 s) under a relayed connection that
/// carries a ping stream, and returns how long after the server was back
/// the pings went through again, on the same connection. `ws`: the dialer
/// reaches the server only over the WebSocket (its relay rides there).
async fn relayed_pings_across_a_restart(ws: bool) -> Result<Duration, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(dir.path(), &[]).unwrap();
    let b = agent(&s, "worker-b", dir.path()).await;
    serve_peers(&b);
    let server = match (ws, s.tcp) {
        (true, Some(tcp)) => format!("wss://{tcp}/ws"),
        (true, None) => return Err("the server has no TCP listener".into()),
        (false, _) => s.udp.to_string(),
    };
    let a = agent_at(
        server,
        &s,
        "worker-a",
        dir.path(),
        punch_agent::RelayMode::Force,
    )
    .await;
    let pc = a.connect("worker-b").await.map_err(|e| e.to_string())?;
    assert_eq!(pc.path.kind, PathKind::Relayed);
    let mut pinger = pc.pinger().await.map_err(|e| e.to_string())?;
    for _ in 0..3 {
        pinger.ping().await.map_err(|e| e.to_string())?;
    }
    s.proc.kill();
    // The outage itself, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _s2 = s.restart(&[]).unwrap();
    let back = Instant::now();
    // One ping waits (its stream retransmits) until the path carries again.
    tokio::time::timeout(Duration::from_secs(10), pinger.ping())
        .await
        .map_err(|_| "no echo within 10 s of the server being back".to_string())?
        .map_err(|e| e.to_string())?;
    let took = back.elapsed();
    if let Some(reason) = pc.conn.close_reason() {
        return Err(format!("the connection closed: {reason}"));
    }
    // And it keeps carrying.
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(2), pinger.ping())
            .await
            .map_err(|_| "a later ping got no echo".to_string())?
            .map_err(|e| e.to_string())?;
    }
    a.close().await;
    b.close().await;
    Ok(took)
}

/// A relayed connection outlives a server restart: the new server does
/// not know the relay session, says so ("unknown"), and the agents renew
/// it under the same connection (UDP relay and relay over WebSocket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_connections_outlive_a_server_restart() {
    let mut failures = Vec::new();
    for ws in [false, true] {
        let name = if ws { "WebSocket" } else { "UDP" };
        match relayed_pings_across_a_restart(ws).await {
            Ok(took) => {
                eprintln!("{name} relay: pings resumed {took:?} after the server was back");
                // The goal is 2 s (measured: ~1.1 s UDP, ~0.3 s WebSocket on
                // a quiet machine). The first echo waits for QUIC's next
                // probe of the stalled stream, whose timeout doubled during
                // the 2 s outage: on a loaded machine that alone reached
                // 3.1 s, so the bound is 5 s (a relay session never renewed
                // fails at 10 s above).
                if took > Duration::from_secs(5) {
                    failures.push(format!("{name}: pings resumed only after {took:?}"));
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Protocol version 5 (issue 19) next to 4: a server welcomes an agent of
/// the older version in that version (such an agent refuses any other),
/// takes a newer agent's port allocator (and drops an implausible one) and
/// shows it in the worker's `nat` object of `/peers` and
/// `/api/v1/workers/{id}`, and a real connect's requester names its
/// strategy in `/api/v1/connects` (the recent-connects view).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_agents_keep_their_version_and_newer_ones_report_allocators() {
    use punch_protocol::allocator::Allocator;
    use punch_protocol::signal::{NatBehaviour, NatClass};
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();

    /// A raw client says hello in `version` and is welcomed in it.
    async fn welcomed(
        s: &ServerProc,
        version: u16,
        name: &str,
    ) -> (
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    ) {
        let (ep, c, mut send, mut recv, id) = raw_client(s).await;
        write_frame(&mut send, &hello(&id, version, name))
            .await
            .unwrap();
        match next(&mut recv).await {
            ServerMsg::Welcome { version: v, .. } => assert_eq!(v, version, "{name}"),
            m => panic!("{name}: expected a welcome, got {m:?}"),
        }
        (ep, c, send, recv)
    }
    let _old = welcomed(&s, punch_protocol::MIN_PROTOCOL_VERSION, "old-agent").await;
    let (_ep, _c, mut send, mut recv) = welcomed(&s, PROTOCOL_VERSION, "new-agent").await;
    let nat = NatClass {
        public: false,
        mapping: NatBehaviour::AddressAndPortDependent,
        filtering: NatBehaviour::AddressAndPortDependent,
        port_preserved: false,
    };
    for m in [
        ClientMsg::Nat(nat),
        ClientMsg::Allocator(Allocator::Block {
            base: 20480,
            size: 64,
        }),
        // Not a block infer could report: ignored, the first one stays.
        ClientMsg::Allocator(Allocator::Block { base: 7, size: 3 }),
        ClientMsg::Ping { req: 1 },
    ] {
        write_frame(&mut send, &m).await.unwrap();
    }
    // The ping's answer: everything before it was handled.
    loop {
        if let ServerMsg::Pong { req: 1 } = next(&mut recv).await {
            break;
        }
    }
    let get = |path: &str| -> serde_json::Value {
        serde_json::from_str(&s.http_get(path).unwrap()).unwrap()
    };
    let peers = get("/peers");
    let me = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["worker_id"] == "new-agent")
        .unwrap_or_else(|| panic!("new-agent in {peers}"));
    let a = &me["nat"]["allocator"];
    assert_eq!(a["kind"], "block", "{me}");
    assert_eq!(a["block_base"], 20480, "{me}");
    assert_eq!(a["block_size"], 64, "{me}");
    assert_eq!(a["budget"], 4, "{me}");
    let w = get("/api/v1/workers/new-agent");
    assert_eq!(w["nat"]["allocator"]["kind"], "block", "{w}");
    assert_eq!(w["nat"]["label"], "apdm-apdf", "{w}");
    let w = get("/api/v1/workers/old-agent");
    assert!(w["nat"].is_null(), "{w}");

    // Real agents: the requester's outcome detail reaches the view.
    let b = agent(&s, "worker-b", dir.path()).await;
    serve_peers(&b);
    let a = agent(&s, "worker-a", dir.path()).await;
    let pc = a.connect("worker-b").await.unwrap();
    let session = pc.path.session.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        let all = get("/api/v1/connects");
        let c = all
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["session"] == session.as_str() && !c["strategy"].is_null())
            .cloned();
        if let Some(c) = c {
            break c;
        }
        assert!(Instant::now() < deadline, "no detail for {session}: {all}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(c["requester"], "worker-a", "{c}");
    assert_eq!(c["target"], "worker-b", "{c}");
    assert_eq!(c["path"], "direct", "{c}");
    assert_eq!(c["strategy"], "plain", "{c}");
    assert_eq!(c["relayed_bytes"].as_u64().unwrap_or(0), 0, "{c}");
    // The page carries its first snapshot; its script draws the table.
    let page = s.http_get("/").unwrap();
    assert!(page.contains("\"strategy\":\"plain\""), "{page}");
}

/// Waits until the agent has lost its registration.
async fn unregistered(a: &Agent, limit: Duration) {
    let mut rx = a.watch_status();
    let wait = async {
        while matches!(&*rx.borrow_and_update(), Status::Registered { .. }) {
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| panic!("{} still registered after {limit:?}", a.worker_id()));
}

/// The address book: with the server killed, a connect to a peer this
/// agent connected to before goes through the book (knock, punch, the
/// pinned key), and both sides say so on their event streams; a worker the
/// book does not know is refused at once as the server being unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_peers_are_reached_with_the_server_gone() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let a = agent(&s, "worker-a", dir.path()).await;
    let b = agent(&s, "worker-b", dir.path()).await;
    serve_peers(&b);
    let mut b_events = b.events();
    let pc = a.connect("worker-b").await.unwrap();
    assert_eq!(pc.path.strategy, Some(punch_agent::Strategy::Plain));
    pc.close().await;
    assert_eq!(a.known_peers()[0].worker_id, "worker-b");
    assert!(a.known_peers()[0].reachable_without_server);
    let mut s = s;
    s.proc.kill();
    let limit = Duration::from_secs(20);
    let t = Instant::now();
    tokio::join!(unregistered(&a, limit), unregistered(&b, limit));
    eprintln!("both unregistered after {:?}", t.elapsed());
    for _ in 0..3 {
        let t = Instant::now();
        let pc = a.connect("worker-b").await.unwrap();
        assert_eq!(pc.path.kind, PathKind::Direct);
        assert_eq!(pc.path.strategy, Some(punch_agent::Strategy::AddressBook));
        let rtt = pc.pinger().await.unwrap().ping().await.unwrap();
        assert!(rtt < Duration::from_secs(1));
        pc.close().await;
        eprintln!("reconnected in {:?}", t.elapsed());
    }
    let c = a.discovery_counts();
    assert_eq!((c.started, c.ended, c.failed), (3, 3, 0), "{c:?}");
    assert_eq!(b.discovery_counts().answered, 3);
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        let mut n = 0;
        while n < 3 {
            if let punch_agent::AgentEvent::Discovery(d) = b_events.recv().await.unwrap() {
                assert_eq!((d.source, d.incoming), ("address-book", true), "{d:?}");
                n += 1;
            }
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "worker-b's stream has no discovery events"
    );
    match a.connect("worker-x").await {
        Err(AgentError::ServerUnreachable { .. }) => {}
        other => panic!("a worker the book does not know: {other:?}"),
    }
}

/// An agent with `id`'s key in `dir`, on its own fixed port, not waiting
/// to register (the server is gone).
async fn agent_on(s: &ServerProc, id: &str, dir: &std::path::Path, port: u16) -> Agent {
    let mut cfg = AgentConfig::new(s.udp.to_string(), s.fingerprint.clone());
    cfg.worker_id = Some(id.into());
    cfg.key_file = Some(dir.join(format!("{id}.key")));
    cfg.bind = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    cfg.punch_timeout = Duration::from_secs(2);
    Agent::start(cfg).await.unwrap()
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Peer exchange: with the server gone, worker-a and worker-c both restart
/// on new ports, so neither hears the other's knocks (aimed at the old
/// ports) and a's book points at c's old port; worker-b stayed and hears
/// c's knocks. a's connect to c fails at the remembered endpoint, asks b
/// (reached through the book) where c is, and connects there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_moved_is_found_through_a_peer_that_saw_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(dir.path(), &[]).unwrap();
    let a = agent(&s, "worker-a", dir.path()).await;
    let b = agent(&s, "worker-b", dir.path()).await;
    let c = agent(&s, "worker-c", dir.path()).await;
    for x in [&a, &b, &c] {
        serve_peers(x);
    }
    for (from, to) in [(&a, "worker-b"), (&a, "worker-c"), (&b, "worker-c")] {
        from.connect(to).await.unwrap().close().await;
    }
    s.proc.kill();
    let limit = Duration::from_secs(20);
    tokio::join!(unregistered(&a, limit), unregistered(&b, limit));
    for x in [&a, &c] {
        x.close().await;
    }
    drop((a, c));
    let c = agent_on(&s, "worker-c", dir.path(), free_port()).await;
    serve_peers(&c);
    let c_at = c.local_addr().unwrap();
    // b hears c's knocks (c knocks once a second while unregistered).
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let p = b.known_peers();
            if p.iter()
                .any(|p| p.worker_id == "worker-c" && p.endpoints.first() == Some(&c_at))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        heard.is_ok(),
        "worker-b never heard worker-c at {c_at}: {:?}",
        b.known_peers()
    );
    let a = agent_on(&s, "worker-a", dir.path(), free_port()).await;
    let before = a.known_peers();
    let c_old = before.iter().find(|p| p.worker_id == "worker-c").unwrap();
    assert!(!c_old.endpoints.contains(&c_at), "{before:?}");
    let pc = a.connect("worker-c").await.unwrap();
    assert_eq!(pc.path.kind, PathKind::Direct);
    assert_eq!(pc.path.strategy, Some(punch_agent::Strategy::PeerExchange));
    assert_eq!(pc.path.remote_addr, c_at);
    let rtt = pc.pinger().await.unwrap().ping().await.unwrap();
    assert!(rtt < Duration::from_secs(1));
    let known = a.known_peers();
    let c_now = known.iter().find(|p| p.worker_id == "worker-c").unwrap();
    assert_eq!(c_now.endpoints.first(), Some(&c_at), "{known:?}");
}
