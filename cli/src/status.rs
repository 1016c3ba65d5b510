//! `punch-agent serve --http ADDR`: the agent's own status over HTTP, so it
//! can run as a Cloud Run service (which wants an HTTP port that answers)
//! and so people can see what it is doing. `GET /healthz` is 200 while
//! registered and 503 otherwise; `GET /` is a small HTML page.

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
        .with_state(agent);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("status HTTP server failed: {e}");
    }
}
