//! Random walks over topics (`punch/walk`): real agents on loopback with a
//! real server, honest and lying peers.

use punch_agent::{Agent, AgentBuilder, AgentEvent, PathKind, ProtocolStream, Status, Strategy};
use punch_lab::harness::ServerProc;
use punch_net::{read_frame, write_frame};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// An agent whose walks come only when the test asks (the first of its
/// own would be 5 minutes after registering).
fn builder(s: &ServerProc, id: &str, dir: &std::path::Path) -> AgentBuilder {
    Agent::builder(s.udp.to_string(), s.fingerprint.clone())
        .worker_id(id)
        .key_file(dir.join(format!("{id}.key")))
        .bind("127.0.0.1:0".parse().unwrap())
        .walk_every(Duration::from_secs(3600))
}

async fn started(b: AgentBuilder) -> Agent {
    let a = b.start().await.unwrap();
    a.registered(Duration::from_secs(10)).await.unwrap();
    let served = a.clone();
    tokio::spawn(async move {
        while let Some(pc) = served.accept().await {
            tokio::spawn(pc.serve());
        }
    });
    a
}

/// Waits (at most 20 s) until `a` knows its server is gone.
async fn server_gone(a: &Agent) {
    let mut rx = a.watch_status();
    tokio::time::timeout(Duration::from_secs(20), async {
        while matches!(&*rx.borrow_and_update(), Status::Registered { .. }) {
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} still registered after 20 s", a.worker_id()));
}

/// Walk events of `a` that have arrived.
fn walk_events(rx: &mut tokio::sync::broadcast::Receiver<AgentEvent>) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        let v = e.to_json();
        if v["event"] == "discovery" && v["source"] == "random-walk" {
            out.push(v);
        }
    }
    out
}

/// worker-c walks first (from worker-b), so b learns c's topics; then
/// worker-a, which only knows b, walks for `gpu`: b names c, a walks on
/// to c through the server and connects. The walk is in a's events and
/// counts; c is in a's book with its topics; and with the server gone, a
/// reaches c from the book, which it could not have before the walk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_finds_a_worker_of_a_topic_through_a_known_peer_and_it_stays_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(dir.path(), &[]).unwrap();
    let b = started(builder(&s, "worker-b", dir.path()).tag("gpu")).await;
    let c = started(
        builder(&s, "worker-c", dir.path())
            .tag("gpu")
            .walk_topic("gpu")
            .bootstrap("worker-b"),
    )
    .await;
    let a = started(
        builder(&s, "worker-a", dir.path())
            .walk_topic("gpu")
            .bootstrap("worker-b"),
    )
    .await;
    let walked = tokio::time::timeout(Duration::from_secs(30), c.walk())
        .await
        .expect("c's walk ends")
        .unwrap();
    assert_eq!(
        walked.asked.first().map(String::as_str),
        Some("worker-b"),
        "{walked:?}"
    );
    assert!(a.known_peers().is_empty());
    let mut events = a.events();
    let walked = tokio::time::timeout(Duration::from_secs(30), a.walk())
        .await
        .expect("a's walk ends")
        .unwrap();
    assert_eq!(walked.asked[..2], ["worker-b", "worker-c"], "{walked:?}");
    assert_eq!(walked.failed, 0, "{walked:?}");
    assert!(walked.learned >= 1, "{walked:?}");
    let known = a.known_peers();
    let kc = known
        .iter()
        .find(|p| p.worker_id == "worker-c")
        .unwrap_or_else(|| panic!("worker-c not in a's book: {known:?}"));
    assert_eq!(kc.topics, ["gpu"]);
    assert!(kc.reachable_without_server, "{kc:?}");
    // Connected to now, so no longer hearsay.
    assert!(
        !a.heard_peers().iter().any(|h| h.worker_id == "worker-c"),
        "{:?}",
        a.heard_peers()
    );
    let ev = walk_events(&mut events);
    let phases: Vec<(String, String)> = ev
        .iter()
        .map(|v| {
            (
                v["peer"].as_str().unwrap().into(),
                v["phase"].as_str().unwrap().into(),
            )
        })
        .collect();
    for want in [
        ("worker-b", "started"),
        ("worker-b", "ended"),
        ("worker-c", "started"),
        ("worker-c", "ended"),
    ] {
        assert!(
            phases.contains(&(want.0.into(), want.1.into())),
            "{want:?} missing in {ev:?}"
        );
    }
    let from_b = ev
        .iter()
        .find(|v| v["peer"] == "worker-b" && v["phase"] == "ended")
        .unwrap();
    assert_eq!(from_b["learned"], 1, "{from_b}");
    let counts = a.discovery_counts();
    assert_eq!(
        (counts.walks, counts.walk_questions, counts.walk_failed),
        (1, walked.asked.len() as u64, 0),
        "{counts:?}"
    );
    assert!(counts.walk_learned >= 1, "{counts:?}");
    assert!(
        b.discovery_counts().walk_answered >= 2,
        "{:?}",
        b.discovery_counts()
    );
    // The server goes: a reaches c from the book the walk filled.
    s.proc.kill();
    server_gone(&a).await;
    let pc = tokio::time::timeout(Duration::from_secs(20), a.connect("worker-c"))
        .await
        .expect("a connect ends")
        .unwrap();
    assert_eq!(pc.path.kind, PathKind::Direct);
    assert_eq!(pc.path.strategy, Some(Strategy::AddressBook));
    pc.close().await;
}

// The walk's wire format as a peer sends it (postcard, `punch/walk`).
#[derive(Serialize, Deserialize)]
struct Ask {
    topics: Vec<String>,
    own: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    own: Vec<String>,
    peers: Vec<Named>,
}

#[derive(Serialize, Deserialize)]
struct Named {
    worker_id: String,
    key: [u8; 32],
    topics: Vec<String>,
}

/// A lying peer answers a walk: it names worker-b (whom a pins) with
/// another key, itself, a worker that does not exist and a worker of a
/// topic nobody asked for. a keeps b's pinned key, hears only of the
/// made-up worker of the asked topic, walks on to it through the server,
/// which knows no such worker, and backs off; nothing a liar said is in
/// the book.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_cannot_change_a_pinned_key_or_put_hearsay_in_the_book() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let liar = started(builder(&s, "liar", dir.path()).protocol(
        "punch/walk",
        |mut st: ProtocolStream| async move {
            let _: Ask = read_frame(&mut st.recv, 4096).await.unwrap();
            let named = |id: &str, k: u8, t: &str| Named {
                worker_id: id.into(),
                key: [k; 32],
                topics: vec![t.into()],
            };
            let lie = Answer {
                own: vec!["gpu".into()],
                peers: vec![
                    named("worker-b", 9, "gpu"),
                    named("liar", 9, "gpu"),
                    named("made-up", 7, "gpu"),
                    named("off-topic", 6, "cpu"),
                ],
            };
            write_frame(&mut st.send, &lie).await.unwrap();
            let _ = st.send.finish();
        },
    ))
    .await;
    let b = started(builder(&s, "worker-b", dir.path()).tag("gpu")).await;
    let a = started(
        builder(&s, "worker-a", dir.path())
            .walk_topic("gpu")
            .bootstrap("liar"),
    )
    .await;
    a.connect("worker-b").await.unwrap().close().await;
    let b_key = a
        .known_peers()
        .into_iter()
        .find(|p| p.worker_id == "worker-b")
        .unwrap()
        .fingerprint;
    let walked = tokio::time::timeout(Duration::from_secs(30), a.walk())
        .await
        .expect("the walk ends")
        .unwrap();
    assert_eq!(walked.asked, ["liar", "made-up"], "{walked:?}");
    assert_eq!((walked.learned, walked.failed), (1, 1), "{walked:?}");
    let heard: Vec<String> = a.heard_peers().into_iter().map(|h| h.worker_id).collect();
    assert_eq!(heard, ["made-up"]);
    let known = a.known_peers();
    let ids: Vec<&str> = known.iter().map(|p| p.worker_id.as_str()).collect();
    assert!(
        !ids.contains(&"made-up") && !ids.contains(&"off-topic"),
        "{known:?}"
    );
    let kb = known.iter().find(|p| p.worker_id == "worker-b").unwrap();
    assert_eq!(kb.fingerprint, b_key, "the liar changed b's pinned key");
    assert_eq!(a.discovery_counts().walk_failed, 1);
    drop((b, liar));
}

/// Walk settings are checked when the agent starts, and an agent without
/// walk topics says so when asked to walk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_walk_settings_are_refused_and_no_topics_means_no_walk() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    for (b, want) in [
        (
            builder(&s, "w1", dir.path()).walk_topic("no spaces"),
            "walk topic",
        ),
        (
            builder(&s, "w2", dir.path()).bootstrap("bad id!"),
            "bootstrap worker",
        ),
    ] {
        let e = b.start().await.err().expect("refused");
        assert!(e.to_string().contains(want), "{e}");
    }
    let a = started(builder(&s, "w3", dir.path())).await;
    let e = a.walk().await.unwrap_err();
    assert!(e.to_string().contains("no walk topics"), "{e}");
}

fn free_tcp() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A metric's value in Prometheus' text format.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// The CLI: `serve --walk-topic gpu --bootstrap worker-b --walk-every 1`
/// walks by itself; its `--events` say so, and both agents' `/metrics`
/// count it (read by Prometheus' own parser, promtool, which CI has).
#[test]
fn serve_walks_by_itself_and_its_metrics_count_the_walks() {
    use punch_lab::harness::http_get;
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let (hb, ha) = (free_tcp(), free_tcp());
    let _b = s
        .serve(dir.path(), "worker-b", &["--tag", "gpu", "--http", &hb])
        .unwrap();
    let mut a = s
        .serve(
            dir.path(),
            "worker-a",
            &[
                "--walk-topic",
                "gpu",
                "--bootstrap",
                "worker-b",
                "--walk-every",
                "1",
                "--events",
                "--http",
                &ha,
            ],
        )
        .unwrap();
    let line = a
        .wait_line(r#""source":"random-walk""#, Duration::from_secs(20))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "discovery");
    assert_eq!(v["peer"], "worker-b");
    a.wait_line(r#""phase":"ended""#, Duration::from_secs(20))
        .unwrap();
    // The walk ends after b (nobody else to ask); the next comes within
    // 1.25 s. Wait for the counter, bounded.
    let get = |at: &str| http_get(at.parse().unwrap(), "/metrics").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = get(&ha);
        if metric(&t, "punch_agent_walks_total") >= 1.0 || std::time::Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(metric(&text, "punch_agent_walks_total") >= 1.0, "{text}");
    assert!(
        metric(&text, "punch_agent_walk_questions_total") >= 1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "punch_agent_registered"), 1.0, "{text}");
    assert!(metric(&text, "punch_agent_known_peers") >= 1.0, "{text}");
    let tb = get(&hb);
    assert!(
        metric(&tb, "punch_agent_walk_answered_total") >= 1.0,
        "{tb}"
    );
    let health: serde_json::Value =
        serde_json::from_str(&http_get(ha.parse().unwrap(), "/healthz").unwrap()).unwrap();
    assert!(health["discovery"]["walks"].as_u64() >= Some(1), "{health}");
    // Prometheus' OpenMetrics parser reads every sample (it wants
    // timestamps: each sample gets one).
    let samples: Vec<String> = text
        .lines()
        .map(|l| match l.starts_with('#') {
            true => l.to_string(),
            false => format!("{l} 1700000000"),
        })
        .collect();
    let n = text.lines().filter(|l| !l.starts_with('#')).count();
    let file = dir.path().join("metrics.om");
    std::fs::write(&file, samples.join("\n") + "\n").unwrap();
    let out = std::process::Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&file)
        .arg(dir.path().join("blocks"))
        .output();
    match out {
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "promtool: {said}");
            let row = said
                .lines()
                .nth(1)
                .unwrap_or_default()
                .split_whitespace()
                .nth(4);
            assert_eq!(
                row,
                Some(n.to_string().as_str()),
                "promtool read another number of samples: {said}"
            );
        }
        Err(e) if std::env::var_os("CI").is_some() => panic!("promtool is needed under CI: {e}"),
        Err(e) => eprintln!("promtool not run: {e}"),
    }
}

// Peer exchange's wire format as a peer sends it (postcard, `punch/pex`).
#[derive(Serialize, Deserialize)]
struct PexAsk {
    keys: Vec<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct PexAnswer {
    found: Vec<PexFound>,
}

#[derive(Serialize, Deserialize)]
struct PexFound {
    key: [u8; 32],
    endpoints: Vec<std::net::SocketAddr>,
}

/// Peer exchange with a lying peer, the server gone: worker-b is gone too,
/// so a's connect to b asks the liar where b is. The liar answers with its
/// own address for b's key, an endpoint for worker-c's key (not asked) and
/// one for a key nobody has. a tries the liar's address for b only, where
/// nothing proves b's key, so the connect fails; c's entry gets nothing,
/// and the book holds no entry for the unknown key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_exchange_answer_is_used_only_for_the_key_asked_and_proves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(dir.path(), &[]).unwrap();
    let fast = |b: AgentBuilder| b.punch_timeout(Duration::from_secs(2));
    let liar_at = std::sync::Arc::new(std::sync::Mutex::new(None::<std::net::SocketAddr>));
    let c_key = std::sync::Arc::new(std::sync::Mutex::new([0u8; 32]));
    let (at, ck) = (liar_at.clone(), c_key.clone());
    let liar = started(fast(builder(&s, "liar", dir.path())).protocol(
        "punch/pex",
        move |mut st: ProtocolStream| {
            let (at, ck) = (at.clone(), ck.clone());
            async move {
                let ask: PexAsk = read_frame(&mut st.recv, 4096).await.unwrap();
                let me = at.lock().unwrap().unwrap();
                let mut found: Vec<PexFound> = ask
                    .keys
                    .iter()
                    .map(|k| PexFound {
                        key: *k,
                        endpoints: vec![me],
                    })
                    .collect();
                found.push(PexFound {
                    key: *ck.lock().unwrap(),
                    endpoints: vec!["127.0.0.1:9".parse().unwrap()],
                });
                found.push(PexFound {
                    key: [7; 32],
                    endpoints: vec!["127.0.0.1:9".parse().unwrap()],
                });
                write_frame(&mut st.send, &PexAnswer { found })
                    .await
                    .unwrap();
                let _ = st.send.finish();
            }
        },
    ))
    .await;
    *liar_at.lock().unwrap() = Some(liar.local_addr().unwrap());
    let b = started(fast(builder(&s, "worker-b", dir.path()))).await;
    let _c = started(fast(builder(&s, "worker-c", dir.path()))).await;
    let a = started(fast(builder(&s, "worker-a", dir.path()))).await;
    for to in ["worker-b", "worker-c", "liar"] {
        a.connect(to).await.unwrap().close().await;
    }
    *c_key.lock().unwrap() = punch_tls::Identity::load_or_create(&dir.path().join("worker-c.key"))
        .unwrap()
        .public_key();
    let before = a.known_peers();
    let c_before = before
        .iter()
        .find(|p| p.worker_id == "worker-c")
        .unwrap()
        .clone();
    b.close().await;
    drop(b);
    s.proc.kill();
    server_gone(&a).await;
    let mut events = a.events();
    let r = tokio::time::timeout(Duration::from_secs(30), a.connect("worker-b"))
        .await
        .expect("the connect ends");
    assert!(
        r.is_err(),
        "connected to something claiming to be worker-b: {:?}",
        r.map(|p| p.path)
    );
    let mut asked_liar = false;
    while let Ok(e) = events.try_recv() {
        let v = e.to_json();
        asked_liar |=
            v["source"] == "peer-exchange" && v["peer"] == "liar" && v["phase"] == "ended";
    }
    assert!(asked_liar, "a never asked the liar");
    let after = a.known_peers();
    let c_after = after.iter().find(|p| p.worker_id == "worker-c").unwrap();
    assert_eq!(
        c_after.endpoints, c_before.endpoints,
        "an endpoint told for a key not asked went into c's entry"
    );
    let b_after = after.iter().find(|p| p.worker_id == "worker-b").unwrap();
    assert_eq!(
        b_after.endpoints.first(),
        liar_at.lock().unwrap().as_ref(),
        "{b_after:?}"
    );
    let unknown = punch_tls::fingerprint_of(&[7; 32]);
    assert!(!after.iter().any(|p| p.fingerprint == unknown), "{after:?}");
    assert_eq!(after.len(), before.len(), "{after:?}");
}
