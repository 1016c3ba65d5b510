//! The registry and its HTTP API against a real server with real agents:
//! metadata, list and filters, discover, waits (CLI and HTTP long-poll),
//! barriers, the event stream, liveness (stale, expired, deregistered),
//! bearer tokens, bindings that survive a restart, `forget`, /metrics, the
//! agent's own status port, and the status page in headless Chromium.

use punch_lab::harness::{run, Proc, ServerProc};
use std::io::BufRead;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
const TOKEN: &str = "registry-test-token";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// GET/PUT with an optional bearer token: (status, JSON body).
fn call(method: &str, s: &ServerProc, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let url = format!("http://{}{path}", s.http);
    let mut req = ureq::request(method, &url).timeout(Duration::from_secs(30));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let code = resp.status();
    let body = resp.into_string().unwrap();
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: {code} body is not JSON ({e}): {body}"));
    // Every answer these tests receive is held to the OpenAPI description.
    static SPEC: std::sync::OnceLock<punch_lab::openapi::Spec> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| punch_lab::openapi::Spec::fetch(s.http, Some(TOKEN)).unwrap());
    if let Err(e) = spec.check(method, path, code, &json) {
        panic!("{e}");
    }
    (code, json)
}

fn get(s: &ServerProc, path: &str) -> (u16, serde_json::Value) {
    call("GET", s, path, Some(TOKEN))
}

fn agent(s: &ServerProc) -> Command {
    let mut cmd = s.agent().unwrap();
    cmd.args(["--token", TOKEN]);
    cmd
}

fn serve(s: &ServerProc, dir: &std::path::Path, id: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--token", TOKEN];
    args.extend_from_slice(extra);
    s.serve(dir, id, &args).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap().to_string())
        .collect()
}

/// A GET with the token in a thread of its own: its status, or the error.
fn spawn_get(s: &ServerProc, path: &str) -> std::thread::JoinHandle<Result<u16, String>> {
    let url = format!("http://{}{path}", s.http);
    std::thread::spawn(move || {
        ureq::get(&url)
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    })
}

/// Waits (at most 20 s) until the server counts `n` waits in progress.
fn waits_in_progress(s: &ServerProc, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = format!("punch_waits_in_progress {n}");
    while !s.http_get("/metrics").unwrap().contains(&line) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads server-sent events into a channel: (event name, worker). A plain
/// socket read line by line: each event arrives as one chunk of a chunked
/// response, and a buffering HTTP client would hold events back.
fn event_stream(s: &ServerProc) -> std::sync::mpsc::Receiver<(String, String)> {
    use std::io::Write;
    let mut sock = std::net::TcpStream::connect(s.http).unwrap();
    write!(
        sock,
        "GET /api/v1/events HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n",
        s.http
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in std::io::BufReader::new(sock).lines() {
            let Ok(line) = line else { return };
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                let v: serde_json::Value = serde_json::from_str(d.trim()).unwrap();
                let worker = v["worker"].as_str().unwrap_or_default().to_string();
                if tx.send((event.clone(), worker)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next event for `worker`, skipping others (bounded wait).
fn next_event(rx: &std::sync::mpsc::Receiver<(String, String)>, worker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut skipped = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (ev, w) = rx.recv_timeout(left).unwrap_or_else(|e| {
            panic!("no event for {worker} within 30 s ({e}; skipped {skipped:?})")
        });
        if w == worker {
            return ev;
        }
        skipped.push((ev, w));
    }
}

#[test]
fn registry_api_end_to_end() {
    let dir = tmp();
    // A killed agent is noticed by the signaling idle timeout (5 s here).
    let s = ServerProc::start(
        dir.path(),
        &[
            "--token",
            TOKEN,
            "--stale-secs",
            "2",
            "--idle-timeout",
            "5",
            "--max-waits",
            "4",
        ],
    )
    .unwrap();
    let events = event_stream(&s);

    let _g1 = serve(
        &s,
        dir.path(),
        "gpu-1",
        &["--type", "gpu", "--tag", "eu", "--meta", "zone=a b"],
    );
    let _g2 = serve(&s, dir.path(), "gpu-2", &["--type", "gpu", "--tag", "us"]);
    let _c1 = serve(&s, dir.path(), "cpu-1", &["--type", "cpu", "--tag", "eu"]);
    assert_eq!(next_event(&events, "gpu-1"), "registered");

    // Bearer token enforced on the API, JSON errors.
    let (code, body) = call("GET", &s, "/api/v1/workers", None);
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error"], "missing_token");
    let (code, body) = call("GET", &s, "/api/v1/workers", Some("wrong"));
    assert_eq!((code, body["error"].as_str()), (401, Some("bad_token")));

    // List and filters.
    let (code, all) = get(&s, "/api/v1/workers");
    assert_eq!(code, 200);
    assert_eq!(ids(&all), ["cpu-1", "gpu-1", "gpu-2"]);
    let (_, gpus) = get(&s, "/api/v1/workers?type=gpu");
    assert_eq!(ids(&gpus), ["gpu-1", "gpu-2"]);
    let (_, eu_gpu) = get(&s, "/api/v1/workers?type=gpu&tag=eu");
    assert_eq!(ids(&eu_gpu), ["gpu-1"]);
    let w = &eu_gpu[0];
    assert_eq!(w["type"], "gpu");
    assert_eq!(w["tags"], serde_json::json!(["eu"]));
    assert_eq!(w["metadata"]["zone"], "a b");
    assert_eq!(w["state"], "online");
    assert!(w["observed_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let (code, one) = get(&s, "/api/v1/workers/gpu-2");
    assert_eq!((code, one["worker_id"].as_str()), (200, Some("gpu-2")));
    let (code, body) = get(&s, "/api/v1/workers/nobody");
    assert_eq!(
        (code, body["error"].as_str()),
        (404, Some("unknown_worker"))
    );
    for bad in [
        "/api/v1/workers?type=no%20spaces",
        "/api/v1/workers/bad%20id",
        "/api/v1/wait/gpu-1?timeout=-1",
        "/api/v1/wait/gpu-1?timeout=soon",
    ] {
        let (code, body) = get(&s, bad);
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["message"].is_string(), "{bad}: {body}");
    }
    let (code, body) = get(&s, "/api/v1/discover/gpu");
    assert_eq!(code, 200);
    assert!(["gpu-1", "gpu-2"].contains(&body["worker_id"].as_str().unwrap()));
    assert_eq!(get(&s, "/api/v1/discover/tpu").0, 404);

    // The CLI over signaling.
    let mut cmd = agent(&s);
    cmd.args(["list", "--type", "gpu", "--json"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(ids(&r.json().unwrap()), ["gpu-1", "gpu-2"]);
    let mut cmd = agent(&s);
    cmd.args(["list", "--tag", "eu"]);
    let r = run(cmd, T).unwrap();
    assert!(
        r.stdout.contains("cpu-1") && r.stdout.contains("gpu-1") && !r.stdout.contains("gpu-2"),
        "{r:?}"
    );
    let mut cmd = agent(&s);
    cmd.args(["discover", "cpu"]);
    let r = run(cmd, T).unwrap();
    assert_eq!((r.code, r.stdout.trim()), (Some(0), "cpu-1"), "{r:?}");
    let mut cmd = agent(&s);
    cmd.args(["discover", "tpu"]);
    assert_eq!(run(cmd, T).unwrap().code, Some(3));
    let mut cmd = agent(&s);
    cmd.args(["serve", "--id", "x", "--type", "bad type"]);
    assert_eq!(run(cmd, T).unwrap().code, Some(2));

    // Waits: the CLI and an HTTP long-poll both return when late-1 comes.
    let mut cmd = agent(&s);
    cmd.args(["wait", "late-1", "--timeout", "30"]);
    let mut waiter = Proc::spawn("wait", cmd, None).unwrap();
    let poll = spawn_get(&s, "/api/v1/wait/late-1?timeout=30");
    // Both are waiting once the server counts them.
    waits_in_progress(&s, 2, "waits never started");
    let _late = serve(&s, dir.path(), "late-1", &[]);
    assert!(waiter.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert_eq!(poll.join().unwrap(), Ok(200));
    let mut cmd = agent(&s);
    cmd.args(["wait", "never-1", "--timeout", "0.5"]);
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(12), "{r:?}");
    assert!(r.stderr.contains("did not come online"), "{r:?}");
    assert_eq!(get(&s, "/api/v1/wait/never-1?timeout=0.2").0, 408);
    // A huge timeout is capped, not refused; an online worker answers at once.
    assert_eq!(get(&s, "/api/v1/wait/gpu-1?timeout=1e12").0, 200);

    // Barriers release every waiter; later waits return at once.
    let waiters: Vec<_> = (0..3)
        .map(|_| spawn_get(&s, "/api/v1/barriers/start?timeout=30"))
        .collect();
    waits_in_progress(&s, 3, "barrier waits never started");
    assert_eq!(
        call("PUT", &s, "/api/v1/barriers/start", Some(TOKEN)).0,
        200
    );
    for w in waiters {
        assert_eq!(w.join().unwrap(), Ok(200));
    }
    assert_eq!(get(&s, "/api/v1/barriers/start?timeout=5").0, 200);

    // Waits are bounded (4 here): the fifth is refused and counted.
    let holders: Vec<_> = (0..4)
        .map(|i| spawn_get(&s, &format!("/api/v1/barriers/hold?timeout=30&n={i}")))
        .collect();
    waits_in_progress(&s, 4, "holding waits never started");
    let (code, body) = get(&s, "/api/v1/wait/gpu-1?timeout=1");
    assert_eq!(
        (code, body["error"].as_str()),
        (429, Some("busy")),
        "{body}"
    );
    assert!(s
        .http_get("/metrics")
        .unwrap()
        .contains("punch_waits_refused_total 1"));
    assert_eq!(call("PUT", &s, "/api/v1/barriers/hold", Some(TOKEN)).0, 200);
    for h in holders {
        assert_eq!(h.join().unwrap(), Ok(200));
    }
    assert_eq!(get(&s, "/api/v1/barriers/other?timeout=0.2").0, 408);

    // Liveness: a killed agent goes stale, then expires; a clean shutdown
    // deregisters at once.
    let mut ev1 = serve(&s, dir.path(), "ev-1", &[]);
    assert_eq!(next_event(&events, "ev-1"), "registered");
    ev1.kill();
    assert_eq!(next_event(&events, "ev-1"), "stale");
    assert_eq!(get(&s, "/api/v1/workers/ev-1").1["state"], "stale");
    assert_eq!(next_event(&events, "ev-1"), "expired");
    assert_eq!(get(&s, "/api/v1/workers/ev-1").0, 404);
    let mut ev2 = serve(&s, dir.path(), "ev-2", &[]);
    assert_eq!(next_event(&events, "ev-2"), "registered");
    assert!(ev2.terminate(Duration::from_secs(10)).unwrap().success());
    assert_eq!(next_event(&events, "ev-2"), "deregistered");

    // Metrics, open without the token.
    let m = s.http_get("/metrics").unwrap();
    assert!(m.contains("punch_agents_online "), "{m}");
    assert!(m.contains("punch_registrations_total "), "{m}");
    assert!(m.contains("punch_time_to_connect_seconds_bucket"), "{m}");

    // The status page, in a real browser.
    let url = format!("http://{}/?token={TOKEN}", s.http);
    if let Some(dom) = chromium_dom(&url, dir.path()) {
        for id in ["gpu-1", "gpu-2", "cpu-1"] {
            assert!(
                dom.contains(&format!("<td class=\"worker\">{id}</td>")),
                "{id} missing from the page: {dom}"
            );
        }
    }
}

/// Waits (at most 20 s) until the server holds `n` barriers.
fn barriers_held(s: &ServerProc, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = format!("punch_barriers_held {n}\n");
    loop {
        let m = s.http_get("/metrics").unwrap();
        if m.contains(&line) {
            return;
        }
        let held = m.lines().find(|l| l.starts_with("punch_barriers_held "));
        assert!(Instant::now() < deadline, "{what}: {held:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Barriers are forgotten over HTTP: unreleased ones when their waiter
/// leaves (time-out or disconnect), released ones after
/// `--barrier-ttl-secs`, so more distinct barriers than the cap (10,000)
/// all work. (The hub's own tests run 50,000 of each kind; a request here
/// costs about a millisecond.)
#[test]
fn barriers_are_forgotten() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &["--token", TOKEN, "--barrier-ttl-secs", "1"]).unwrap();
    // One keep-alive connection for the whole loop.
    let http = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let status = |method: &str, path: &str| -> u16 {
        let url = format!("http://{}{path}", s.http);
        match http
            .request(method, &url)
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .call()
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{method} {path}: {e}"),
        }
    };
    let started = Instant::now();
    // More waits than the cap, each on a barrier of its own, all time out.
    for i in 0..10_500 {
        let code = status("GET", &format!("/api/v1/barriers/wait-{i}?timeout=0"));
        assert_eq!(code, 408, "waiting on new barrier {i}");
    }
    barriers_held(&s, 0, "timed-out waits left barriers behind");
    // Released barriers go after their TTL (1 s here).
    for round in 0..2 {
        for i in 0..1_000 {
            let code = status("PUT", &format!("/api/v1/barriers/put-{round}-{i}"));
            assert_eq!(code, 200, "releasing new barrier {round}-{i}");
        }
        barriers_held(&s, 0, "released barriers outlived their TTL");
    }
    // A waiter whose client goes away forgets its barrier too.
    {
        use std::io::Write;
        let mut sock = std::net::TcpStream::connect(s.http).unwrap();
        write!(
            sock,
            "GET /api/v1/barriers/left?timeout=600 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
            s.http
        )
        .unwrap();
        waits_in_progress(&s, 1, "the wait never started");
        barriers_held(&s, 1, "the waiter's barrier should be held");
    }
    barriers_held(&s, 0, "a disconnected waiter left its barrier behind");
    waits_in_progress(&s, 0, "the disconnected wait still runs");
    eprintln!("12,501 barriers in {:?}", started.elapsed());
    // One more: released, then waited on.
    assert_eq!(status("PUT", "/api/v1/barriers/last"), 200);
    assert_eq!(status("GET", "/api/v1/barriers/last?timeout=0"), 200);
}

/// The DOM of `url` as headless Chromium renders it; `None` (skip) when
/// Chromium is missing outside CI.
fn chromium_dom(url: &str, dir: &std::path::Path) -> Option<String> {
    let missing = punch_lab::harness::missing_tools(&[("chromium", "chromium")]);
    if !punch_lab::harness::ready("the browser check", &missing) {
        return None;
    }
    let mut cmd = Command::new("chromium");
    cmd.args(punch_lab::browser::QUIET_FLAGS)
        .arg("--dump-dom")
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg(url);
    let r = run(cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(r.code, Some(0), "chromium failed: {}", r.stderr);
    Some(r.stdout)
}

#[test]
fn bindings_survive_restarts_until_forgotten_and_agents_report_status() {
    let dir = tmp();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = format!("127.0.0.1:{port}");
    let mut b = s.serve(dir.path(), "keeper", &["--http", &http]).unwrap();
    // The agent's own status port.
    let h: serde_json::Value = serde_json::from_str(
        &punch_lab::harness::http_get(http.parse().unwrap(), "/healthz").unwrap(),
    )
    .unwrap();
    assert_eq!(h["worker_id"], "keeper");
    assert_eq!(h["server_state"], "registered");
    let page = punch_lab::harness::http_get(http.parse().unwrap(), "/").unwrap();
    assert!(page.contains("keeper"), "{page}");
    assert!(b.terminate(Duration::from_secs(10)).unwrap().success());

    // Restart the server on the same data dir: the id stays bound.
    let data = s.data_dir.clone();
    drop(s);
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["serve", "--id", "keeper", "--key-file"])
        .arg(dir.path().join("other.key"));
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(9), "another key must not take the id: {r:?}");

    // Forget it (server stopped), then another key may have it.
    drop(s);
    let r = run(
        {
            let mut c = Command::new(punch_lab::harness::bin("punch-server").unwrap());
            c.args(["forget", "keeper", "--data-dir"]).arg(&data);
            c
        },
        T,
    )
    .unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("released keeper"), "{r:?}");
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let dir2 = tmp();
    std::fs::copy(dir.path().join("other.key"), dir2.path().join("keeper.key")).unwrap();
    let _other = s.serve(dir2.path(), "keeper", &[]).unwrap();
}

/// The close code of a shutdown alone (no goodbye message: an agent that
/// exits does not wait for its goodbye to be acknowledged) deregisters the
/// worker at once; any other close leaves it stale.
#[test]
fn a_shutdown_close_deregisters_and_another_close_leaves_the_worker_stale() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, code, then) in [
        ("bye-3", punch_protocol::close::DONE, 404),
        ("bye-4", 7, 200),
    ] {
        let raw = rt.block_on(punch_lab::harness::RawClient::register_opts(
            &s,
            name,
            vec![],
            false,
        ));
        let path = format!("/api/v1/workers/{name}");
        assert_eq!(call("GET", &s, &path, None).1["state"], "online");
        raw.close(code);
        // Bounded: the server sees the close within a round trip.
        let until = Instant::now() + Duration::from_secs(10);
        let (status, body) = loop {
            let (status, body) = call("GET", &s, &path, None);
            if body["state"] != "online" || Instant::now() > until {
                break (status, body);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status, then, "{name}: {body}");
        if then == 200 {
            assert_eq!(body["state"], "stale", "{name}: {body}");
        }
        drop(raw);
    }
}
