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
