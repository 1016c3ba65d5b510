//! What users run over a connection: port forwarding to a real HTTP server
//! (Python's http.server) through two agents, many connections at once,
//! and refusals for targets not on the allow list; file sharing with
//! listing, download, resume, hash verification and path-escape refusals,
//! and a share of 10,000 files.

use punch_lab::harness::{run, Proc, ServerProc};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Python's http.server on a free port, serving `dir`; ready when it
/// answers.
fn http_server(dir: &std::path::Path) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        &port.to_string(),
    ])
    .current_dir(dir);
    let p = Proc::spawn("http.server", cmd, None).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, port)
}

#[test]
fn port_forwarding_carries_http_and_refuses_what_is_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    // A page big enough to span many QUIC packets.
    let page: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(www.join("page.txt"), &page).unwrap();
    let (_http, http_port) = http_server(&www);
    let remote = format!("127.0.0.1:{http_port}");

    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s
        .serve(dir.path(), "worker-b", &["--allow-forward", &remote])
        .unwrap();

    let local = format!("127.0.0.1:{}", free_port());
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "forward", "worker-b", "--local", &local, "--remote", &remote,
    ]);
    let mut fwd = Proc::spawn("forward", cmd, Some(&dir.path().join("forward.log"))).unwrap();
    let line = fwd.wait_line("forwarding", T).unwrap();
    assert!(line.contains(&remote), "{line}");

    // One fetch, then 50 at once, each compared byte for byte.
    let url = format!("http://{local}/page.txt");
    let body = ureq::get(&url)
        .timeout(T)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(body.len(), page.len());
    assert!(body == page, "page differs through the forward");
    let fetches: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                ureq::get(&url)
                    .timeout(Duration::from_secs(60))
                    .call()
                    .map_err(|e| e.to_string())?
                    .into_string()
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for f in fetches {
        let got = f.join().unwrap().expect("concurrent fetch");
        assert!(got == page, "a concurrent fetch got different bytes");
    }

    // Half-close: a client that sends its request and shuts down its
    // writing side still gets the whole answer.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&local).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        c.write_all(b"GET /page.txt HTTP/1.0\r\n\r\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        assert!(
            all.ends_with(page.as_bytes()),
            "half-closed fetch lost data"
        );
    }

    // Not on the allow list: refused up front with the peer's reason.
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "forward",
        "worker-b",
        "--local",
        &format!("127.0.0.1:{}", free_port()),
        "--remote",
        "127.0.0.1:1",
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(11), "{r:?}");
    assert!(
        r.stderr.contains("not on its --allow-forward list"),
        "{}",
        r.stderr
    );
    // Nothing is allowed by default.
    let _c = s.serve(dir.path(), "worker-c", &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "forward",
        "worker-c",
        "--local",
        &format!("127.0.0.1:{}", free_port()),
        "--remote",
        &remote,
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(11), "{r:?}");
    fwd.terminate(Duration::from_secs(10)).unwrap();
}

/// `forward --remote-listen` (like `ssh -R`): the peer listens on an
/// address of its --allow-reverse list and every connection it accepts
/// comes back, on a stream the peer opens, to a real HTTP server on our
/// side; anything else is refused with the peer's reason, and the peer
/// stops listening when the forward ends.
#[test]
fn reverse_forwarding_brings_connections_back_and_refuses_what_is_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let page: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(www.join("page.txt"), &page).unwrap();
    let (_http, http_port) = http_server(&www);
    let local = format!("127.0.0.1:{http_port}");
    let listen = format!("127.0.0.1:{}", free_port());

    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s
        .serve(dir.path(), "worker-b", &["--allow-reverse", &listen])
        .unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "forward",
        "worker-b",
        "--remote-listen",
        &listen,
        "--local",
        &local,
    ]);
    let mut fwd = Proc::spawn("reverse", cmd, Some(&dir.path().join("reverse.log"))).unwrap();
    let line = fwd.wait_line("reverse forwarding", T).unwrap();
    assert!(line.contains(&listen) && line.contains(&local), "{line}");

    // Through the peer's listener and back: one fetch, then 20 at once.
    let url = format!("http://{listen}/page.txt");
    let fetch = |url: &str| -> Result<String, String> {
        ureq::get(url)
            .timeout(T)
            .call()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|e| e.to_string())
    };
    assert!(
        fetch(&url).unwrap() == page,
        "page differs through the reverse forward"
    );
    let fetches: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || fetch(&url))
        })
        .collect();
    for f in fetches {
        assert!(f.join().unwrap().expect("concurrent fetch") == page);
    }

    // Not on the list, and nothing allowed by default: refused up front.
    let other = format!("127.0.0.1:{}", free_port());
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "forward",
        "worker-b",
        "--remote-listen",
        &other,
        "--local",
        &local,
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(11), "{r:?}");
    assert!(
        r.stderr.contains("not on its --allow-reverse list"),
        "{}",
        r.stderr
    );
    let _c = s.serve(dir.path(), "worker-c", &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args([
        "forward",
        "worker-c",
        "--remote-listen",
        &listen,
        "--local",
        &local,
    ]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(11), "{r:?}");

    // The forward ends: within a bound, nothing listens there any more.
    fwd.terminate(Duration::from_secs(10)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "{listen} still listening after the forward ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn file_sharing_lists_downloads_resumes_and_refuses_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    // 6 MB of varied bytes, and a small file in a subdirectory.
    let big: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(share.join("big.bin"), &big).unwrap();
    std::fs::write(share.join("sub/small.txt"), b"small\n").unwrap();
    std::fs::write(dir.path().join("secret.txt"), b"not shared").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), share.join("link-out")).unwrap();

    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s
        .serve(dir.path(), "sharer", &["--share", share.to_str().unwrap()])
        .unwrap();

    // The list: names, sizes, hashes; the symlink out is not there.
    let mut cmd = s.agent().unwrap();
    cmd.args(["files", "sharer", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let list = r.json().unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["big.bin", "sub/small.txt"]);
    assert_eq!(list[0]["size"], 6_000_000);
    let hash = list[0]["blake3"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);

    // A whole download.
    let out = dir.path().join("dl.bin");
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains(&hash), "{r:?}");
    assert!(
        std::fs::read(&out).unwrap() == big,
        "downloaded bytes differ"
    );
    assert!(!dir.path().join("dl.bin.part").exists());

    // An interrupted download (the first 2.5 MB already in .part) resumes
    // from the last whole 16 KiB group it holds (152 × 16384).
    let out2 = dir.path().join("resumed.bin");
    std::fs::write(dir.path().join("resumed.bin.part"), &big[..2_500_000]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out2);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("resumed from byte 2490368"), "{r:?}");
    assert!(std::fs::read(&out2).unwrap() == big);

    // A corrupt partial file (zeros) is caught against the sharer's hash
    // tree before anything is fetched, and fetched again from its first
    // bad group (here the first).
    let out3 = dir.path().join("bad.bin");
    std::fs::write(dir.path().join("bad.bin.part"), vec![0u8; 1_000_000]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out3);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("from byte 0;"), "{r:?}");
    assert!(std::fs::read(&out3).unwrap() == big);
    assert!(!dir.path().join("bad.bin.part").exists());

    // One flipped byte in the middle of a partial file: found before any
    // new byte is fetched; the verified groups before it are kept.
    let out4 = dir.path().join("flipped.bin");
    let mut part = big[..4_000_000].to_vec();
    part[1_000_000] ^= 0x55;
    std::fs::write(dir.path().join("flipped.bin.part"), &part).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out4);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    // 1,000,000 lies in the 16 KiB group that starts at 61 × 16384.
    assert!(r.stderr.contains("from byte 999424;"), "{r:?}");
    assert!(r.stdout.contains("resumed from byte 999424"), "{r:?}");
    assert!(std::fs::read(&out4).unwrap() == big);

    // The sharer's file rots between listing and download, its mtime
    // kept (so its cached hash tree still claims the old bytes): the
    // download stops at that group, not at the end, keeps the verified
    // bytes before it, and puts nothing in place.
    let shared_big = share.join("big.bin");
    let mtime = std::fs::metadata(&shared_big).unwrap().modified().unwrap();
    let mut rotten = big.clone();
    rotten[3_000_000] ^= 1;
    std::fs::write(&shared_big, &rotten).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&shared_big)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let out5 = dir.path().join("rotten.bin");
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out5);
    let r = run(cmd, T).unwrap();
    assert_ne!(r.code, Some(0), "{r:?}");
    // 3,000,000 lies in the group that starts at 183 × 16384.
    assert!(
        r.stderr.contains("the bytes from 2998272 do not match"),
        "{r:?}"
    );
    assert!(!out5.exists());
    let kept = std::fs::metadata(dir.path().join("rotten.bin.part"))
        .unwrap()
        .len();
    assert_eq!(kept, 2_998_272);
    // Mended on the sharer, the download resumes from the kept bytes.
    std::fs::write(&shared_big, &big).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out5);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("resumed from byte 2998272"), "{r:?}");
    assert!(std::fs::read(&out5).unwrap() == big);

    // Escapes are refused by the sharer (and by our own check first).
    for bad in [
        "../secret.txt",
        "link-out",
        "sub/../../secret.txt",
        "nope.txt",
    ] {
        let mut cmd = s.agent().unwrap();
        cmd.args(["get", "sharer", bad, "-o"])
            .arg(dir.path().join("x"));
        let r = run(cmd, T).unwrap();
        assert_ne!(r.code, Some(0), "{bad}: {r:?}");
        assert!(!dir.path().join("x").exists(), "{bad}");
    }
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "link-out", "-o"])
        .arg(dir.path().join("x"));
    let r = run(cmd, T).unwrap();
    assert!(r.stderr.contains("outside the shared directory"), "{r:?}");

    // A worker that shares nothing says so.
    let _c = s.serve(dir.path(), "plain", &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["files", "plain"]);
    let r = run(cmd, T).unwrap();
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("shares no directory"), "{r:?}");
}

/// A share of 10,000 files (the documented most) lists in full — more
/// than one frame holds, so in pages — answering before it has hashed
/// everything; the sharer hashes the rest in the background, so a later
/// listing has every hash; a download of a file listed without a hash is
/// verified all the same.
#[test]
fn a_share_of_ten_thousand_files_lists_in_full_and_hashes_lazily() {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    for i in 0..N {
        let sub = share.join(format!("dir-{:02}", i % 50));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join(format!("file-{i:05}.txt")),
            format!("{i}\n").repeat(200),
        )
        .unwrap();
    }
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s
        .serve(dir.path(), "sharer", &["--share", share.to_str().unwrap()])
        .unwrap();
    let list = |n: usize| {
        let mut cmd = s.agent().unwrap();
        cmd.args(["files", "sharer", "--json"]);
        let r = run(cmd, T).unwrap();
        assert_eq!(r.code, Some(0), "listing {n}: {}", r.stderr);
        let v = r.json().unwrap();
        let files = v.as_array().unwrap().clone();
        assert_eq!(files.len(), N, "listing {n}");
        files
    };
    let first = list(1);
    assert_eq!(first[0]["name"], "dir-00/file-00000.txt");
    assert_eq!(first[N - 1]["name"], "dir-49/file-09999.txt");
    for f in &first {
        let h = &f["blake3"];
        assert!(h.is_null() || h.as_str().unwrap().len() == 64, "{f}");
    }
    // Pick the last file: the first listing's hashing budget reaches it last.
    let name = first[N - 1]["name"].as_str().unwrap().to_string();
    let want = format!("{}\n", N - 1).repeat(200);
    let out = dir.path().join("one.txt");
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", &name, "-o"]).arg(&out);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
    let want_hash = blake3::hash(want.as_bytes()).to_hex().to_string();
    assert!(r.stdout.contains(&want_hash), "{r:?}");
    // Within a bound, a listing carries every hash.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let files = list(2);
        let unhashed = files.iter().filter(|f| f["blake3"].is_null()).count();
        if unhashed == 0 {
            assert_eq!(files[N - 1]["blake3"], want_hash.as_str());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{unhashed} files still unhashed after 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The whole tree, with JSON progress, killed once half the files are
    // done; run again, it skips what is complete and verified, fetches
    // the rest, and every file is the sharer's.
    let dest = dir.path().join("tree");
    let get_tree = || {
        let mut cmd = s.agent().unwrap();
        cmd.args(["get", "sharer", "/", "--json", "-o"]).arg(&dest);
        cmd
    };
    let mut first =
        Proc::spawn("get tree", get_tree(), Some(&dir.path().join("get1.log"))).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let line = first
            .next_line(Duration::from_secs(60))
            .unwrap()
            .expect("progress lines until killed");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "progress", "{line}");
        assert_eq!(v["files"], N, "{line}");
        if v["files_done"].as_u64().unwrap() >= N as u64 / 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{line}");
    }
    first.kill();
    let r = run(get_tree(), Duration::from_secs(300)).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    let done: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["files"], N);
    assert_eq!(done["failed"], 0);
    let skipped = done["skipped"].as_u64().unwrap();
    assert!(skipped >= N as u64 / 2 - 64 && skipped < N as u64, "{done}");
    for i in 0..N {
        let p = dest.join(format!("dir-{:02}/file-{i:05}.txt", i % 50));
        let got = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(got, format!("{i}\n").repeat(200), "{}", p.display());
    }
}

/// An embedder's own protocol (registered by name on the agent) runs beside
/// the library's echo and the apps (bench, files, forward, registered the
/// same way) on one peer connection, at the same time; a protocol the peer
/// does not serve is refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedders_protocol_runs_beside_the_built_ins_on_one_connection() {
    use punch_agent::{Agent, PeerError, ProtocolStream};
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let start = |id: &str| {
        Agent::builder(s.udp.to_string(), s.fingerprint.clone())
            .worker_id(id)
            .key_file(dir.path().join(format!("{id}.key")))
            .bind("127.0.0.1:0".parse().unwrap())
    };
    let share = dir.path().join("b-share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("one.txt"), b"one\n").unwrap();
    let files = punch_apps::files::Share::new(&share).unwrap();
    // upper/1: answers what it read, upper-cased, and who asked.
    let b = start("worker-b")
        .protocol(punch_apps::bench::NAME, punch_apps::bench::Bench)
        .protocol(
            punch_apps::files::NAME,
            punch_apps::files::Files::new(Some(files)),
        )
        .protocol(
            punch_apps::forward::NAME,
            punch_apps::forward::Forward::new(vec![]),
        )
        .protocol("upper/1", |mut st: ProtocolStream| async move {
            let Ok(msg) = st.recv.read_to_end(1 << 16).await else {
                return;
            };
            let answer = format!(
                "{}:{}",
                st.peer_id,
                String::from_utf8_lossy(&msg).to_uppercase()
            );
            let _ = st.send.write_all(answer.as_bytes()).await;
            let _ = st.send.finish();
            let _ = st.send.stopped().await;
        })
        .start()
        .await
        .unwrap();
    b.registered(T).await.unwrap();
    serve_peers(&b);
    let a = start("worker-a").start().await.unwrap();
    a.registered(T).await.unwrap();
    let pc = a.connect("worker-b").await.unwrap();
    let upper = |text: &'static str| {
        let pc = &pc;
        async move {
            let (mut send, mut recv) = pc.open_protocol("upper/1").await.unwrap();
            send.write_all(text.as_bytes()).await.unwrap();
            send.finish().unwrap();
            String::from_utf8(recv.read_to_end(1 << 16).await.unwrap()).unwrap()
        }
    };
    // The apps and ours, at once, on the one connection.
    let mut pinger = pc.pinger().await.unwrap();
    let (one, two, rtt, up, listed, fwd) = tokio::time::timeout(T, async {
        tokio::join!(
            upper("hello"),
            upper("again"),
            pinger.ping(),
            punch_apps::bench::upload(&pc, Duration::from_millis(300)),
            punch_apps::files::list(&pc),
            punch_apps::forward::open(&pc, "127.0.0.1:9", true),
        )
    })
    .await
    .expect("all six finish");
    assert_eq!(one, "worker-a:HELLO");
    assert_eq!(two, "worker-a:AGAIN");
    assert!(rtt.unwrap() < Duration::from_secs(1));
    assert!(up.unwrap().0 > 0, "the bench stream carried bytes");
    let names: Vec<_> = listed.unwrap().files.into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["one.txt"]);
    match fwd {
        Err(punch_apps::forward::ForwardError::Refused(why)) => {
            assert!(why.contains("--allow-forward"), "{why}")
        }
        other => panic!("expected the forward refused, got {other:?}"),
    }
    // Not served there: refused, and the connection still works.
    match pc.open_protocol("nope/1").await {
        Err(PeerError::Refused(why)) => assert!(why.contains("nope/1"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        pc.open_protocol("not a name!").await,
        Err(PeerError::Refused(_))
    ));
    pinger.ping().await.unwrap();
    // The apps are opt-in: worker-a registered none, so its files are
    // refused by name and its bench stream reset; echo works all the same.
    serve_peers(&a);
    let back = b.connect("worker-a").await.unwrap();
    match punch_apps::files::list(&back).await {
        Err(punch_apps::files::FileError::Refused(why)) => {
            assert!(why.contains("punch/files"), "{why}")
        }
        other => panic!("expected the files request refused, got {other:?}"),
    }
    assert!(punch_apps::bench::upload(&back, Duration::from_millis(50))
        .await
        .is_err());
    back.pinger().await.unwrap().ping().await.unwrap();
    // A bad name is refused when the agent starts.
    let bad = start("worker-c")
        .protocol("", |_: ProtocolStream| async {})
        .start()
        .await;
    assert!(bad.is_err());
    a.close().await;
    b.close().await;
}

/// An in-process agent of server `s` on loopback, without the NAT check.
fn loopback_agent(s: &ServerProc, id: &str) -> punch_agent::AgentBuilder {
    punch_agent::Agent::builder(s.udp.to_string(), s.fingerprint.clone())
        .worker_id(id)
        .bind("127.0.0.1:0".parse().unwrap())
        .no_nat_check()
}

/// Accepts every peer of `agent` and serves its streams.
fn serve_peers(agent: &punch_agent::Agent) {
    let agent = agent.clone();
    tokio::spawn(async move {
        while let Some(pc) = agent.accept().await {
            tokio::spawn(pc.serve());
        }
    });
}

/// Per-call connect options over the agent's own settings: a forced relay
/// for one call of an agent that punches (the server relayed it), a limit
/// for the whole connect that ends it with a time-out, and the agent's own
/// policy again for the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_connect_options_override_the_agents_policy() {
    use punch_agent::{AgentError, ConnectOptions, PathKind, RelayMode, RelayReason};
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let start = |id: &str| loopback_agent(&s, id);
    let b = start("worker-b").start().await.unwrap();
    b.registered(T).await.unwrap();
    serve_peers(&b);
    let a = start("worker-a").start().await.unwrap();
    a.registered(T).await.unwrap();
    let relayed = |h: &serde_json::Value| h["relay"]["forwarded_packets"].as_u64().unwrap();
    let health =
        || -> serde_json::Value { serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap() };
    let before = relayed(&health());

    let forced = ConnectOptions::new().relay(RelayMode::Force);
    let pc = tokio::time::timeout(T, a.connect_with("worker-b", forced))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pc.path.kind, PathKind::Relayed, "{:?}", pc.path);
    assert_eq!(pc.path.relay_reason, Some(RelayReason::Forced));
    assert_eq!(pc.path.strategy, None);
    let mut pinger = pc.pinger().await.unwrap();
    for _ in 0..3 {
        pinger.ping().await.unwrap();
    }
    let after = relayed(&health());
    assert!(
        after >= before + 6,
        "the server relayed {before} -> {after} packets"
    );
    pc.conn.close(0u32.into(), b"done");

    // A limit no connect can meet: a time-out, not a hang or another error.
    let hurried = ConnectOptions::new().timeout(Duration::from_millis(1));
    match a.connect_with("worker-b", hurried).await {
        Err(e @ AgentError::Timeout(_)) => assert_eq!(e.kind(), "timeout"),
        other => panic!("expected a time-out, got {:?}", other.map(|p| p.path)),
    }

    // The agent's own policy is untouched: punched, direct.
    let pc = tokio::time::timeout(T, a.connect("worker-b"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pc.path.kind, PathKind::Direct, "{:?}", pc.path);
    assert_eq!(pc.path.relay_reason, None);
    pc.pinger().await.unwrap().ping().await.unwrap();
    a.close().await;
    b.close().await;
}

/// The next event named `want` on `rx` (others skipped), within [`T`].
async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<punch_agent::AgentEvent>,
    want: &'static str,
) -> punch_agent::AgentEvent {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(T, async {
        loop {
            let e = rx.recv().await.unwrap();
            if e.name() == want {
                return e;
            }
            seen.push(e.name());
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {want} event (saw {seen:?})"))
}

/// The event stream: what an application follows instead of log lines.
/// The first receiver has the registration from before it was asked for;
/// a connect shows up on both sides with its path, and a forced relay as
/// a path change to the relay with its cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_tells_registration_connects_and_path_changes() {
    use punch_agent::{AgentEvent, ConnectOptions, PathCause, PathKind, RelayMode};
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let start = |id: &str| loopback_agent(&s, id);
    let b = start("worker-b").start().await.unwrap();
    b.registered(T).await.unwrap();
    // Asked for after registering: the first receiver still has it.
    let mut b_events = b.events();
    serve_peers(&b);
    let a = start("worker-a").start().await.unwrap();
    let mut a_events = a.events();
    a.registered(T).await.unwrap();
    match next_event(&mut b_events, "registered").await {
        AgentEvent::Registered { observed, .. } => assert!(observed.ip().is_loopback()),
        e => panic!("{e:?}"),
    }
    let j = next_event(&mut a_events, "registered").await.to_json();
    assert_eq!(j["transport"], "udp", "{j}");

    let forced = ConnectOptions::new().relay(RelayMode::Force);
    let pc = a.connect_with("worker-b", forced).await.unwrap();
    match next_event(&mut a_events, "path_changed").await {
        AgentEvent::PathChanged(c) => {
            assert_eq!(c.peer, "worker-b");
            assert_eq!(c.path, PathKind::Relayed);
            assert_eq!(c.cause, PathCause::RelayBound);
            assert_eq!(c.session, pc.path.session);
        }
        e => panic!("{e:?}"),
    }
    match next_event(&mut a_events, "peer_connected").await {
        AgentEvent::PeerConnected {
            peer,
            incoming,
            path,
            ..
        } => assert_eq!(
            (peer.as_str(), incoming, path),
            ("worker-b", false, PathKind::Relayed)
        ),
        e => panic!("{e:?}"),
    }
    match next_event(&mut b_events, "peer_connected").await {
        AgentEvent::PeerConnected { peer, incoming, .. } => {
            assert_eq!((peer.as_str(), incoming), ("worker-a", true))
        }
        e => panic!("{e:?}"),
    }
    a.close().await;
    b.close().await;
}

/// The application decides who gets in: worker-b refuses worker-c by id
/// and takes worker-a; worker-c's connection closes with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_refuses_an_incoming_peer_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let start = |id: &str| loopback_agent(&s, id);
    let b = start("worker-b").start().await.unwrap();
    b.registered(T).await.unwrap();
    let bb = b.clone();
    tokio::spawn(async move {
        while let Some(inc) = bb.incoming().await {
            if inc.peer_id() == "worker-c" {
                inc.refuse("worker-c is not welcome here");
            } else {
                tokio::spawn(inc.accept().serve());
            }
        }
    });
    let a = start("worker-a").start().await.unwrap();
    let c = start("worker-c").start().await.unwrap();
    a.registered(T).await.unwrap();
    c.registered(T).await.unwrap();
    let pa = a.connect("worker-b").await.unwrap();
    pa.pinger().await.unwrap().ping().await.unwrap();
    let pc = c.connect("worker-b").await.unwrap();
    let closed = tokio::time::timeout(T, pc.conn.closed()).await.unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, punch_protocol::close::REFUSED.into());
            assert_eq!(&close.reason[..], b"worker-c is not welcome here");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    // worker-a's connection is untouched.
    pa.pinger().await.unwrap().ping().await.unwrap();
    for x in [a, b, c] {
        x.close().await;
    }
}

/// A key the application holds in memory (no key file): the agent is
/// that key, a restart with it keeps the worker id, and another key is
/// refused the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_key_in_memory_keeps_the_worker_id_across_restarts() {
    use punch_agent::{Agent, AgentError, SecretKey};
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let start = |key: SecretKey| {
        Agent::builder(s.udp.to_string(), s.fingerprint.clone())
            .worker_id("keeper")
            .secret_key(key)
            .bind("127.0.0.1:0".parse().unwrap())
            .no_nat_check()
            .start()
    };
    let pem = SecretKey::generate().unwrap().to_pem().unwrap();
    let key = SecretKey::from_pem(&pem).unwrap();
    assert!(!format!("{key:?}").contains("PRIVATE"), "{key:?}");
    let a = start(key.clone()).await.unwrap();
    assert_eq!(a.fingerprint(), key.fingerprint());
    a.registered(T).await.unwrap();
    a.close().await;
    let again = start(SecretKey::from_pem(&pem).unwrap()).await.unwrap();
    again.registered(T).await.unwrap();
    again.close().await;
    let other = start(SecretKey::generate().unwrap()).await.unwrap();
    match other.registered(T).await {
        Err(AgentError::IdTaken(_)) => {}
        r => panic!("expected the id refused to another key, got {r:?}"),
    }
    other.close().await;
    assert!(SecretKey::from_pem("-----BEGIN PRIVATE KEY-----\nnope\n").is_err());
}

/// examples/embed.rs end to end: two processes of the example, one serving
/// and one connecting; the connecting one pings (built-in echo) and talks
/// `hello/1`, the example's own protocol, on the same connection.
#[test]
fn the_embed_example_runs_its_own_protocol_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let example = punch_lab::harness::example("embed").unwrap();
    let server = s.udp.to_string();
    let mut serve = Command::new(&example);
    serve.args([
        "--server",
        &server,
        "--fingerprint",
        &s.fingerprint,
        "--id",
        "worker-b",
    ]);
    let mut serving = Proc::spawn("embed-serve", serve, None).unwrap();
    serving.wait_line("registered as worker-b", T).unwrap();
    let mut connect = Command::new(&example);
    connect.args([
        "--server",
        &server,
        "--fingerprint",
        &s.fingerprint,
        "--id",
        "worker-a",
        "--target",
        "worker-b",
    ]);
    let r = run(connect, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("round trip"), "{}", r.stdout);
    assert!(r.stdout.contains("bench: uploaded"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("hello/1 answered: hello worker-a, you said \"hi from an embedded agent\""),
        "{}",
        r.stdout
    );
}

/// Runs `punch-agent pipe TARGET` with `input` on its stdin: (exit code,
/// stdout, stderr).
fn pipe_through(s: &ServerProc, target: &str, input: &[u8]) -> (Option<i32>, Vec<u8>, String) {
    use std::io::{Read, Write};
    let mut cmd = s.agent().unwrap();
    cmd.args(["pipe", target, "--timeout", "20"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    // Written from a thread and then closed: the end of input must reach
    // the far command for it to finish.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let (mut out, mut err) = (Vec::new(), String::new());
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = se.read_to_string(&mut err);
        err
    });
    so.read_to_end(&mut out).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        assert!(std::time::Instant::now() < deadline, "pipe did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    writer.join().unwrap();
    (code, out, reader.join().unwrap())
}

/// `punch-agent pipe` through a real peer connection: a megabyte through
/// a command on the far side and back, the end of stdin passed on (the
/// far `tr` ends only then), to a TCP socket, and refused by a worker
/// without `--allow-pipe`, saying so.
#[test]
fn pipes_carry_stdin_to_a_command_and_back_and_are_refused_when_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s
        .serve(dir.path(), "pipe-b", &["--allow-pipe", "tr a-z A-Z"])
        .unwrap();
    let input: Vec<u8> = b"hello, pipe\n".repeat(90_000);
    let (code, out, err) = pipe_through(&s, "pipe-b", &input);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.len(),
        input.len(),
        "{err}; starts {:?}, ends {:?}",
        String::from_utf8_lossy(&out[..40.min(out.len())]),
        String::from_utf8_lossy(&out[out.len().saturating_sub(40)..])
    );
    assert_eq!(out, input.to_ascii_uppercase());

    // To a TCP socket: an echo server that answers one line.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (c, _) = echo.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (&c).write_all(format!("echo: {line}").as_bytes()).unwrap();
    });
    let _c = s
        .serve(
            dir.path(),
            "pipe-c",
            &["--allow-pipe", &format!("tcp:{addr}")],
        )
        .unwrap();
    let (code, out, err) = pipe_through(&s, "pipe-c", b"ping\n");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "echo: ping\n");
    server.join().unwrap();

    let _d = s.serve(dir.path(), "pipe-d", &[]).unwrap();
    let (code, out, err) = pipe_through(&s, "pipe-d", b"nothing\n");
    assert_eq!(code, Some(11), "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("takes no pipes") && err.contains("--allow-pipe"),
        "{err}"
    );
}
