//! `punch-agent serve --http ADDR`: the agent's own status over HTTP, so it
//! can run as a Cloud Run service (which wants an HTTP port that answers)
//! and so people can see what it is doing. `GET /healthz` is 200 while
//! registered and 503 otherwise; `GET /` is a small HTML page; `GET
//! /metrics` is the same in Prometheus' text format.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use punch_agent::{Agent, Status};
use punch_protocol::view::html_escape as esc;

fn state(agent: &Agent) -> (bool, serde_json::Value) {
    let status = agent.watch_status().borrow().clone();
    let (registered, server_state, observed, error) = match status {
        Status::Registered { observed } => (true, "registered", Some(observed.to_string()), None),
        Status::Connecting(e) => (false, "connecting", None, e.map(|e| e.to_string())),
        Status::Failed(e) => (false, "failed", None, Some(e.to_string())),
    };
    let nat = agent.nat_class().map(punch_protocol::view::NatView::from);
    (
        registered,
        serde_json::json!({
            "worker_id": agent.worker_id(),
            "server": agent.server(),
            "server_state": server_state,
            "public_addr": observed,
            "nat": nat,
            "port_mapping": agent.port_mapping(),
            "error": error,
            "discovery": agent.discovery_counts(),
        }),
    )
}

async fn healthz(State(agent): State<Agent>) -> impl IntoResponse {
    let (ok, body) = state(&agent);
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// `punch_agent_*`: registration, the address book, what walks heard
/// of, LAN peers, and sessions without the server by kind.
fn prometheus(agent: &Agent) -> String {
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    let mut reg = prometheus_client::registry::Registry::with_prefix("punch_agent");
    let registered = matches!(*agent.watch_status().borrow(), Status::Registered { .. });
    let gauges = [
        (
            "registered",
            "1 while registered with the server",
            registered as i64,
        ),
        (
            "known_peers",
            "Peers in the address book",
            agent.known_peers().len() as i64,
        ),
        (
            "heard_peers",
            "Workers walks heard of, not connected to",
            agent.heard_peers().len() as i64,
        ),
        (
            "lan_peers",
            "Agents LAN discovery sees",
            agent.lan_peers().len() as i64,
        ),
    ];
    for (name, help, v) in gauges {
        reg.register(name, help, ConstGauge::new(v));
    }
    let c = agent.discovery_counts();
    let counters = [
        (
            "discovery_started",
            "Connects without the server we started",
            c.started,
        ),
        (
            "discovery_answered",
            "Knocks of known peers we answered",
            c.answered,
        ),
        (
            "discovery_ended",
            "Our connects without the server that came up",
            c.ended,
        ),
        (
            "discovery_failed",
            "Our connects without the server that failed",
            c.failed,
        ),
        ("walks", "Random walks ended", c.walks),
        (
            "walk_questions",
            "Questions random walks asked",
            c.walk_questions,
        ),
        ("walk_failed", "Walk questions that failed", c.walk_failed),
        (
            "walk_learned",
            "Workers walks heard of first",
            c.walk_learned,
        ),
        (
            "walk_answered",
            "Walk questions of peers we answered",
            c.walk_answered,
        ),
    ];
    for (name, help, v) in counters {
        reg.register(name, help, ConstCounter::new(v));
    }
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

async fn metrics(State(agent): State<Agent>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        prometheus(&agent),
    )
}

async fn index(State(agent): State<Agent>) -> Html<String> {
    let (_, v) = state(&agent);
    let field = |k: &str| match &v[k] {
        serde_json::Value::String(s) => esc(s),
        serde_json::Value::Null => "–".into(),
        other => esc(&other.to_string()),
    };
    let nat = v["nat"]["label"].as_str().unwrap_or("not classified yet");
    let pm = &v["port_mapping"];
    let mapping = match (pm["protocol"].as_str(), pm["external"].as_str()) {
        (Some(p), Some(e)) => format!(
            "{e} via {p}, renews in {} s",
            pm["renews_in_s"].as_u64().unwrap_or(0)
        ),
        _ if pm.is_null() => "off".to_string(),
        _ => "none".to_string(),
    };
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>punch-agent {id}</title><style>body{{font:14px system-ui,sans-serif;margin:2em}}td{{padding:2px 12px 2px 0}}</style></head>
<body><h1>punch-agent <span id="worker">{id}</span></h1><table>
<tr><td>server</td><td>{server}</td></tr><tr><td>state</td><td id="state">{state}</td></tr>
<tr><td>public address</td><td>{public}</td></tr><tr><td>NAT</td><td>{nat}</td></tr>
<tr><td>port mapping</td><td id="port-mapping">{mapping}</td></tr>
<tr><td>last error</td><td>{error}</td></tr></table></body></html>
"#,
        id = field("worker_id"),
        server = field("server"),
        state = field("server_state"),
        public = field("public_addr"),
        nat = esc(nat),
        mapping = esc(&mapping),
        error = field("error"),
    ))
}

/// Serves the status until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, agent: Agent) {
    let app = Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(agent);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("status HTTP server failed: {e}");
    }
}
