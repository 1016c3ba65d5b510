//! Server restarts and hostile clients.

use punch_agent::{Agent, AgentConfig, PathKind, Status};
use punch_lab::harness::ServerProc;
use punch_net::{read_frame, write_frame};
use punch_protocol::signal::{ClientMsg, ErrorCode, Hello, ServerMsg};
use punch_protocol::{ALPN_SIGNAL, PROTOCOL_VERSION};
use punch_tls::{Expect, Identity, KeyVerifier};
use std::time::{Duration, Instant};

async fn agent(s: &ServerProc, id: &str, dir: &std::path::Path) -> Agent {
    let mut cfg = AgentConfig::new(s.udp.to_string(), s.fingerprint.clone());
    cfg.worker_id = Some(id.into());
    cfg.key_file = Some(dir.join(format!("{id}.key")));
    cfg.bind = "127.0.0.1:0".parse().unwrap();
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
    let bb = b.clone();
    tokio::spawn(async move {
        while let Some(pc) = bb.accept().await {
            tokio::spawn(pc.serve());
        }
    });
    assert_eq!(
        a.connect("worker-b").await.unwrap().path.kind,
        PathKind::Direct
    );

    // Kill -9 and restart on the same port with the same data dir.
    let port = s.udp.port().to_string();
    s.proc.kill();
    let listen = format!("127.0.0.1:{port}");
    let s2 = ServerProc::start(dir.path(), &["--listen", &listen]).unwrap();
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
    let bb = b.clone();
    tokio::spawn(async move {
        while let Some(pc) = bb.accept().await {
            tokio::spawn(pc.serve());
        }
    });

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
    let b2 = bb.clone();
    tokio::spawn(async move {
        while let Some(pc) = b2.accept().await {
            tokio::spawn(pc.serve());
        }
    });
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

/// An agent with `id`'s key (kept in `dir`), as a restarted process would
/// be, using the relay as `relay` says.
async fn agent_mode(
    s: &ServerProc,
    id: &str,
    dir: &std::path::Path,
    relay: punch_agent::RelayMode,
) -> Agent {
    let mut cfg = AgentConfig::new(s.udp.to_string(), s.fingerprint.clone());
    cfg.worker_id = Some(id.into());
    cfg.key_file = Some(dir.join(format!("{id}.key")));
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.relay = relay;
    let a = Agent::start(cfg).await.unwrap();
    a.registered(Duration::from_secs(10)).await.unwrap();
    a
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
    let bb = b.clone();
    tokio::spawn(async move {
        while let Some(pc) = bb.accept().await {
            tokio::spawn(pc.serve());
        }
    });
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
    let bb = b.clone();
    tokio::spawn(async move {
        while let Some(pc) = bb.accept().await {
            tokio::spawn(pc.serve());
        }
    });
    let server = match (ws, s.tcp) {
        (true, Some(tcp)) => format!("wss://{tcp}/ws"),
        (true, None) => return Err("the server has no TCP listener".into()),
        (false, _) => s.udp.to_string(),
    };
    let mut cfg = AgentConfig::new(server, s.fingerprint.clone());
    cfg.worker_id = Some("worker-a".into());
    cfg.key_file = Some(dir.path().join("worker-a.key"));
    cfg.bind = "127.0.0.1:0".parse().unwrap();
    cfg.relay = punch_agent::RelayMode::Force;
    let a = Agent::start(cfg).await.unwrap();
    a.registered(Duration::from_secs(10)).await.unwrap();
    let pc = a.connect("worker-b").await.map_err(|e| e.to_string())?;
    assert_eq!(pc.path.kind, PathKind::Relayed);
    let mut pinger = pc.pinger().await.map_err(|e| e.to_string())?;
    for _ in 0..3 {
        pinger.ping().await.map_err(|e| e.to_string())?;
    }
    let listen = format!("127.0.0.1:{}", s.udp.port());
    s.proc.kill();
    // The outage itself, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _s2 = ServerProc::start(dir.path(), &["--listen", &listen]).unwrap();
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
                if took > Duration::from_secs(2) {
                    failures.push(format!("{name}: pings resumed only after {took:?}"));
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
