//! What operators look at: the Grafana dashboard and the Prometheus alert
//! rules in deploy/ against a live server's /metrics.

use punch_lab::dashboards::{self, Query};
use punch_lab::harness::{run, ServerProc};
use std::path::PathBuf;
use std::time::Duration;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn queries() -> Vec<Query> {
    let mut q = dashboards::dashboard_queries(&deploy("grafana/punch-server.json")).unwrap();
    q.extend(dashboards::rule_queries(&deploy("prometheus/punch-alerts.yaml")).unwrap());
    q
}

/// Every metric and label the dashboard and the alert rules query is in a
/// live server's /metrics after a direct and a relayed connect (series
/// with a NAT pair exist only once a connect was reported).
#[test]
fn the_dashboard_and_alert_rules_query_what_a_live_server_exposes() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    for extra in [&[][..], &["--force-relay"][..]] {
        let mut cmd = s.agent().unwrap();
        cmd.args(extra).args(["connect", "worker-b", "--json"]);
        let r = run(cmd, Duration::from_secs(60)).unwrap();
        assert_eq!(r.code, Some(0), "connect {extra:?}: {}", r.stderr);
    }
    // The requester reports its outcome after printing; wait for both.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let m = s.http_get("/metrics").unwrap();
        let reported = m.contains("punch_connect_outcomes_total{path=\"direct\"} 1")
            && m.contains("punch_connect_outcomes_total{path=\"relayed\"} 1");
        if reported {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outcomes not reported: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let q = queries();
    let missing = dashboards::missing(&q, &metrics);
    assert!(
        missing.is_empty(),
        "queried but not exposed:\n{}",
        missing.join("\n")
    );
    let used: usize = q.iter().map(|q| dashboards::uses(&q.expr).len()).sum();
    assert!(
        used >= 30,
        "only {used} metric uses found: the parser lost some"
    );
}

/// promtool (Prometheus' own parser) accepts the alert rules, the scrape
/// configuration and every dashboard query.
#[test]
fn promtool_accepts_the_rules_the_config_and_the_dashboard_queries() {
    let missing = punch_lab::harness::missing_tools(&[("promtool", "prometheus")]);
    if !punch_lab::harness::ready("the promtool check", &missing) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dash = dir.path().join("dashboard-queries.yaml");
    let panel_queries =
        dashboards::dashboard_queries(&deploy("grafana/punch-server.json")).unwrap();
    std::fs::write(&dash, dashboards::as_recording_rules(&panel_queries)).unwrap();
    for args in [
        vec![
            "check".into(),
            "rules".into(),
            deploy("prometheus/punch-alerts.yaml"),
        ],
        vec!["check".into(), "rules".into(), dash.clone()],
        vec![
            "check".into(),
            "config".into(),
            deploy("prometheus/prometheus.yml"),
        ],
    ] {
        let mut cmd = std::process::Command::new("promtool");
        cmd.args(&args);
        let r = run(cmd, Duration::from_secs(60)).unwrap();
        assert_eq!(
            r.code,
            Some(0),
            "promtool {args:?}: {}{}",
            r.stdout,
            r.stderr
        );
    }
}

/// One request on a fresh connection: (status, content type, body). For a
/// stream the body is whatever came with the head.
fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        let streaming = text.split_once("\r\n\r\n").is_some_and(|(head, _)| {
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream")
        });
        if n == 0 || streaming {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    // Bodies of fixed-length answers only (no chunked JSON here).
    (status, ctype, body.to_string())
}

/// Every operation the OpenAPI description names answers on a live server
/// with a status it describes, in the content type it describes, and a
/// JSON body that validates against its schema (the registry tests check
/// every answer they receive the same way).
#[test]
fn every_described_operation_answers_as_described() {
    const TOKEN: &str = "openapi-token";
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--token", TOKEN]).unwrap();
    let _b = s
        .serve(dir.path(), "worker-b", &["--token", TOKEN, "--type", "gpu"])
        .unwrap();
    let mut cmd = s.agent().unwrap();
    cmd.args(["--token", TOKEN, "connect", "worker-b", "--json"]);
    let r = run(cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(r.code, Some(0), "connect: {}", r.stderr);
    let spec = punch_lab::openapi::Spec::fetch(s.http, Some(TOKEN)).unwrap();
    let ops = spec.operations();
    assert!(ops.len() >= 16, "{ops:?}");
    // PUT before GET, so the barrier wait answers at once.
    let mut ops = ops;
    ops.sort_by_key(|(m, _)| m != "PUT");
    for (method, template) in ops {
        if template == "/ws" {
            continue; // a WebSocket upgrade: the agents' tests cover it
        }
        let path = template
            .replace("{id}", "worker-b")
            .replace("{type}", "gpu")
            .replace("{key}", "b1");
        let path = match template.as_str() {
            "/api/v1/wait/{id}" | "/api/v1/barriers/{key}" if method == "GET" => {
                format!("{path}?timeout=1")
            }
            _ => path,
        };
        let (status, ctype, body) = request(s.http, &method, &path, TOKEN);
        assert!(status == 200, "{method} {path}: {status} {body}");
        if ctype.starts_with("application/json") {
            let json: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"));
            spec.check(&method, &path, status, &json).unwrap();
        } else {
            let described = spec.content_types(&method, &template, status);
            assert!(
                described.iter().any(|d| ctype.starts_with(d.as_str())),
                "{method} {path}: answered {ctype}, described {described:?}"
            );
        }
    }
    // Errors too: a 404, a 400 and a 401, each described and well-formed.
    for (path, token, want) in [
        ("/api/v1/workers/nobody", TOKEN, 404),
        ("/api/v1/workers/bad%20id", TOKEN, 400),
        ("/api/v1/connects", "wrong", 401),
    ] {
        let (status, _, body) = request(s.http, "GET", path, token);
        assert_eq!(status, want, "{path}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        spec.check("GET", path, status, &json).unwrap();
    }
}

/// `punch-agent doctor` on loopback: healthy with a connect to a worker;
/// with a wrong pinned key it fails (exit 1) on the server lines and the
/// pinned key, with the fix; an unreachable server fails both channels.
#[test]
fn doctor_says_what_works_and_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let _b = s.serve(dir.path(), "worker-b", &[]).unwrap();
    let doctor = |extra: &[&str], server: Option<&str>, fingerprint: Option<&str>| {
        let mut cmd = std::process::Command::new(punch_lab::harness::bin("punch-agent").unwrap());
        punch_lab::harness::clear_agent_env(&mut cmd);
        cmd.args(["--bind", "127.0.0.1:0", "--server"])
            .arg(server.map_or(s.udp.to_string(), str::to_string))
            .arg("--server-fingerprint")
            .arg(fingerprint.unwrap_or(&s.fingerprint));
        cmd.args(["doctor", "--json"]).args(extra);
        let r = run(cmd, Duration::from_secs(60)).unwrap();
        (r.code, r.json().unwrap())
    };
    let verdict = |v: &serde_json::Value, check: &str| -> String {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == check)
            .and_then(|c| c["verdict"].as_str())
            .unwrap_or_else(|| panic!("no {check}: {v}"))
            .to_string()
    };
    let (code, v) = doctor(&["--to", "worker-b"], None, None);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["healthy"], true, "{v}");
    for c in [
        "config",
        "server over UDP",
        "server over TCP",
        "pinned key",
        "to worker",
        "connect",
        "clock",
    ] {
        assert_eq!(verdict(&v, c), "ok", "{c}: {v}");
    }

    let mut wrong = s.fingerprint.clone();
    let first = if wrong.starts_with('0') { "1" } else { "0" };
    wrong.replace_range(..1, first);
    let (code, v) = doctor(&[], None, Some(&wrong));
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(verdict(&v, "server over UDP"), "fail", "{v}");
    assert_eq!(verdict(&v, "pinned key"), "fail", "{v}");
    let udp = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "server over UDP")
        .unwrap();
    assert!(
        udp["fix"]
            .as_str()
            .unwrap()
            .contains("punch-server fingerprint"),
        "{v}"
    );

    // Nothing listens on port 9 here: both channels fail.
    let (code, v) = doctor(&[], Some("127.0.0.1:9"), None);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(verdict(&v, "server over UDP"), "fail", "{v}");
    assert_eq!(verdict(&v, "server over TCP"), "fail", "{v}");
}
