//! What users run over a connection: port forwarding to a real HTTP server
//! (Python's http.server) through two agents, many connections at once,
//! and refusals for targets not on the allow list; file sharing with
//! listing, download, resume, hash verification and path-escape refusals.

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

    // An interrupted download (the first 2.5 MB already in .part) resumes.
    let out2 = dir.path().join("resumed.bin");
    std::fs::write(dir.path().join("resumed.bin.part"), &big[..2_500_000]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out2);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("resumed from byte 2500000"), "{r:?}");
    assert!(std::fs::read(&out2).unwrap() == big);

    // A corrupt partial file is caught by the hash, removed, not put in place.
    let out3 = dir.path().join("bad.bin");
    std::fs::write(dir.path().join("bad.bin.part"), vec![0u8; 1_000_000]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["get", "sharer", "big.bin", "-o"]).arg(&out3);
    let r = run(cmd, T).unwrap();
    assert_ne!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("hash mismatch"), "{r:?}");
    assert!(!out3.exists() && !dir.path().join("bad.bin.part").exists());

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
