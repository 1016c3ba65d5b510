//! The OpenAPI 3.1 description of the HTTP API, served at
//! `/api/v1/openapi.json`. The schemas come from the handlers' own
//! response types (utoipa's `ToSchema`); the operations are described
//! here, beside each other, and a test holds them to the router's routes
//! (`http::route_paths`) both ways.

use crate::api::{BarrierJson, ConnectView, ErrorJson, Health, PeerJson};
use crate::hub::EventRecord;
use crate::status::StatusJson;
use punch_protocol::view::WorkerView;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "punch-server HTTP API",
        description = "Health, metrics, the worker registry, waits, barriers, events and the status page of a punch rendezvous server. Routes under /api/v1/ and / need the server's token as a bearer token when it has one (the status page and its data also take ?token=), unless --http-open; /healthz and /metrics are open unless --metrics-auth.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&BearerToken),
    security(("token" = [])),
    paths(
        healthz, metrics, peers, workers, worker, discover, wait, barrier_get, barrier_put,
        events, connects, status, status_stream, status_page, openapi_json, websocket
    ),
    components(schemas(ErrorJson, BarrierJson, EventRecord, StatusJson, WorkerView, Health, PeerJson, ConnectView))
)]
pub struct ApiDoc;

/// The description as JSON.
pub fn json() -> String {
    ApiDoc::openapi()
        .to_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// `GET /api/v1/openapi.json`.
pub async fn serve() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json(),
    )
}

// The operations. These functions are never called: each only carries
// its route's description.

#[utoipa::path(get, path = "/healthz", security(()),
    responses((status = 200, description = "The server's state and counters", body = Health)))]
#[allow(dead_code)]
fn healthz() {}

#[utoipa::path(get, path = "/metrics", security(()),
    responses((status = 200, description = "Prometheus / OpenMetrics text: punch_* counters, gauges and histograms", content_type = "application/openmetrics-text", body = String)))]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(get, path = "/peers",
    responses((status = 200, description = "Online workers with their candidates", body = Vec<PeerJson>),
        (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn peers() {}

#[utoipa::path(get, path = "/api/v1/workers",
    params(("type" = Option<String>, Query, description = "Only workers of this type"),
        ("tag" = Option<String>, Query, description = "Only workers with this tag")),
    responses((status = 200, description = "Workers online or stale, by id", body = Vec<WorkerView>),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn workers() {}

#[utoipa::path(get, path = "/api/v1/workers/{id}",
    params(("id" = String, Path, description = "Worker id")),
    responses((status = 200, description = "One worker, online or stale", body = WorkerView),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 404, description = "Not online or stale (unknown_worker)", body = ErrorJson)))]
#[allow(dead_code)]
fn worker() {}

#[utoipa::path(get, path = "/api/v1/discover/{type}",
    params(("type" = String, Path, description = "Worker type")),
    responses((status = 200, description = "A random online worker of the type", body = WorkerView),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 404, description = "None online (none_online)", body = ErrorJson)))]
#[allow(dead_code)]
fn discover() {}

#[utoipa::path(get, path = "/api/v1/wait/{id}",
    params(("id" = String, Path, description = "Worker id"),
        ("timeout" = Option<f64>, Query, description = "Seconds to wait: default 30, at most 3600")),
    responses((status = 200, description = "The worker, as soon as it is online", body = WorkerView),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 408, description = "Timed out", body = ErrorJson),
        (status = 429, description = "Too many waits (busy)", body = ErrorJson)))]
#[allow(dead_code)]
fn wait() {}

#[utoipa::path(get, path = "/api/v1/barriers/{key}",
    params(("key" = String, Path, description = "Barrier name"),
        ("timeout" = Option<f64>, Query, description = "Seconds to wait: default 30, at most 3600")),
    responses((status = 200, description = "Released (at once if it already was)", body = BarrierJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 408, description = "Timed out", body = ErrorJson),
        (status = 429, description = "Too many waits or barriers (busy)", body = ErrorJson)))]
#[allow(dead_code)]
fn barrier_get() {}

#[utoipa::path(put, path = "/api/v1/barriers/{key}",
    params(("key" = String, Path, description = "Barrier name")),
    responses((status = 200, description = "Released; its waiters return", body = BarrierJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 429, description = "Too many barriers (busy)", body = ErrorJson)))]
#[allow(dead_code)]
fn barrier_put() {}

#[utoipa::path(get, path = "/api/v1/events",
    responses((status = 200, description = "Server-sent events named registered, address_changed, stale, deregistered, expired; each data line is an EventRecord", content_type = "text/event-stream", body = EventRecord),
        (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn events() {}

#[utoipa::path(get, path = "/api/v1/connects",
    responses((status = 200, description = "The latest 50 connects, newest first", body = Vec<ConnectView>),
        (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn connects() {}

#[utoipa::path(get, path = "/api/v1/status",
    params(("token" = Option<String>, Query, description = "The token, for clients that cannot send headers")),
    responses((status = 200, description = "What the status page draws", body = StatusJson),
        (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn status() {}

#[utoipa::path(get, path = "/api/v1/status/stream",
    params(("token" = Option<String>, Query, description = "The token (a browser's EventSource cannot send headers)")),
    responses((status = 200, description = "Server-sent events named status, each data line a StatusJson: at once, after every registry event or connect (at most 4 a second), every 5 s otherwise", content_type = "text/event-stream", body = StatusJson),
        (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn status_stream() {}

#[utoipa::path(get, path = "/",
    params(("token" = Option<String>, Query, description = "The token, for a browser")),
    responses((status = 200, description = "The live status page", content_type = "text/html", body = String),
        (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn status_page() {}

#[utoipa::path(get, path = "/api/v1/openapi.json",
    responses((status = 200, description = "This description", body = Object),
        (status = 401, body = ErrorJson)))]
#[allow(dead_code)]
fn openapi_json() {}

#[utoipa::path(get, path = "/ws", security(()),
    responses((status = 101, description = "The agents' signaling and relay channel (WebSocket; agents prove their token inside it)")))]
#[allow(dead_code)]
fn websocket() {}
