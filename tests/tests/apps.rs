//! What users run over a connection: port forwarding to a real HTTP server
//! (Python's http.server) through two agents, many connections at once,
//! and refusals for targets not on the allow list.

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
