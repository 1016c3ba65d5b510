//! The HTTP API: health, metrics, the worker registry, events, waits,
//! barriers and a status page for people.
//!
//! Routes under `/api/v1/` and `/` need the server token as a bearer token
//! (`Authorization: Bearer TOKEN`; the status page also takes `?token=`)
//! unless the server runs without a token or with `--http-open`;
//! `/healthz` and `/metrics` are open unless `--metrics-auth`. Errors are
//! JSON: `{"error": KIND, "message": TEXT}` with a 4xx status.

use crate::api::{
    BarrierJson, ClusterJson, ConnectView, CounterJson, ErrorJson, Health, PeerJson, RelayJson,
    StunJson,
};
use crate::hub::WaitError;
use crate::Shared;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use punch_protocol::signal::{validate_name, validate_worker_id, MAX_LIST};
use punch_protocol::view::{NatView, WorkerView};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

async fn healthz(State(s): State<Arc<Shared>>) -> Json<Health> {
    let online = s.registry.lock().expect("not poisoned").online_count();
    let relay = s.relay.as_ref().map(|t| {
        let t = t.lock().expect("not poisoned");
        RelayJson {
            sessions: t.len(),
            binds: t.stats.binds,
            forwarded_packets: t.stats.forwarded_packets,
            forwarded_bytes: t.stats.forwarded_bytes,
            dropped: t.stats.dropped,
            expired: t.stats.expired,
            held: t.stats.held,
            quota_dropped: t.stats.quota_dropped,
            ended_notices: t.stats.ended_notices,
            unknown_replies: t.stats.unknown_replies,
            replayed_binds: t.stats.replayed_binds,
        }
    });
    Json(Health {
        status: "ok",
        agents_online: online,
        fingerprint: s.fingerprint.clone(),
        metrics: s.metrics.snapshot(),
        outcomes_by_nat_pair: s.metrics.nat_pairs.lock().expect("not poisoned").counts(),
        relay,
        tcp: s
            .tcp
            .counters()
            .into_iter()
            .map(|(k, _, v)| (k, v))
            .chain([("clients", s.tcp.count() as u64)])
            .collect(),
        http: s
            .http_door
            .stats
            .list()
            .into_iter()
            .map(|(k, _, v)| (k, v))
            .chain([("connections", s.http_door.open() as u64)])
            .collect(),
        stun: StunJson {
            requests: s.stun.requests.load(std::sync::atomic::Ordering::Relaxed),
            errors_sent: s
                .stun
                .errors_sent
                .load(std::sync::atomic::Ordering::Relaxed),
            dropped: s.stun.dropped.load(std::sync::atomic::Ordering::Relaxed),
        },
        cluster: s.cluster.as_ref().map(|c| ClusterJson {
            server_id: c.server_id.clone(),
            redis_up: c.stats.up.load(std::sync::atomic::Ordering::Relaxed),
            relay_addr: c.config.advertise.to_string(),
            counters: c.stats.list().into_iter().map(|(k, _, v)| (k, v)).collect(),
        }),
    })
}

async fn peers(State(s): State<Arc<Shared>>) -> Json<Vec<PeerJson>> {
    let list = s.registry.lock().expect("not poisoned").online();
    Json(
        list.into_iter()
            .map(|p| PeerJson {
                worker_id: p.worker_id,
                observed_addr: p.observed.to_string(),
                connected_since: humantime::format_rfc3339_seconds(p.since).to_string(),
                candidates: p
                    .candidates
                    .iter()
                    .map(|c| {
                        use punch_protocol::signal::CandidateKind::*;
                        let k = match c.kind {
                            Local => "local",
                            ServerReflexive => "server",
                            Stun => "stun",
                            Mapped => "mapped",
                            PeerReflexive => "peer",
                            Predicted => "predicted",
                        };
                        format!("{k} {}", c.addr)
                    })
                    .collect(),
                nat: p.nat.map(|n| NatView::with_allocator(n, p.allocator)),
                counter: punch_protocol::predict::advertised(&p.candidates).map(|c| CounterJson {
                    next: c.next,
                    stride: c.stride,
                }),
            })
            .collect(),
    )
}

/// A JSON error with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorJson {
                error: self.kind.into(),
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<WaitError> for ApiError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Timeout => {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", "timed out")
            }
            WaitError::Busy | WaitError::Full => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", e.to_string())
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(rename = "type")]
    kind: Option<String>,
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TimeoutParam {
    timeout: Option<String>,
}

/// `?timeout=SECS`: default 30 s, capped at an hour; negative, zero-length
/// or non-numbers are refused.
fn timeout_of(p: &TimeoutParam) -> Result<Duration, ApiError> {
    let Some(t) = &p.timeout else {
        return Ok(Duration::from_secs(30));
    };
    let secs: f64 = t
        .parse()
        .map_err(|_| ApiError::bad(format!("timeout {t:?} is not a number of seconds")))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(ApiError::bad(format!(
            "timeout {t:?} must be 0 or more seconds"
        )));
    }
    Ok(Duration::from_secs_f64(
        secs.min(crate::hub::MAX_WAIT.as_secs_f64()),
    ))
}

async fn workers(
    State(s): State<Arc<Shared>>,
    Query(p): Query<ListParams>,
) -> Result<Json<Vec<WorkerView>>, ApiError> {
    if let Some(k) = &p.kind {
        validate_name("type", k).map_err(ApiError::bad)?;
    }
    if let Some(t) = &p.tag {
        validate_name("tag", t).map_err(ApiError::bad)?;
    }
    let list = crate::query::list(&s, p.kind.as_deref(), p.tag.as_deref(), MAX_LIST).await;
    Ok(Json(crate::api::worker_views(&s, list)))
}

/// `GET /api/v1/connects`: the latest connects this server introduced
/// (at most [`crate::metrics::RECENT_CONNECTS`]), newest first.
async fn connects(State(s): State<Arc<Shared>>) -> Json<Vec<ConnectView>> {
    Json(crate::api::connect_views(&s))
}

fn check_id(id: &str) -> Result<(), ApiError> {
    validate_worker_id(id).map_err(|e| ApiError::bad(format!("worker id {id:?}: {e}")))
}

async fn worker(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<WorkerView>, ApiError> {
    check_id(&id)?;
    let local = s.registry.lock().expect("not poisoned").get(&id);
    let w = match local {
        Some(w) => Some(w),
        None => crate::query::get_remote(&s, &id).await,
    };
    w.and_then(|w| crate::api::worker_views(&s, vec![w]).pop())
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_worker",
                format!("no worker {id:?} is online or stale"),
            )
        })
}

async fn discover(
    State(s): State<Arc<Shared>>,
    Path(kind): Path<String>,
) -> Result<Json<WorkerView>, ApiError> {
    validate_name("type", &kind).map_err(ApiError::bad)?;
    let w = crate::query::discover(&s, &kind).await;
    w.map(|w| Json(w.into())).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "none_online",
            format!("no online worker of type {kind:?}"),
        )
    })
}

async fn wait(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(p): Query<TimeoutParam>,
) -> Result<Json<WorkerView>, ApiError> {
    check_id(&id)?;
    let limit = timeout_of(&p)?;
    let w = s.hub.wait_online(&s, &id, limit).await?;
    Ok(Json(w.into()))
}

async fn barrier_put(
    State(s): State<Arc<Shared>>,
    Path(key): Path<String>,
) -> Result<Json<BarrierJson>, ApiError> {
    validate_name("barrier", &key).map_err(ApiError::bad)?;
    s.hub.release(&key)?;
    tracing::info!(barrier = %key, "barrier released");
    Ok(Json(BarrierJson {
        barrier: key,
        released: true,
    }))
}

async fn barrier_get(
    State(s): State<Arc<Shared>>,
    Path(key): Path<String>,
    Query(p): Query<TimeoutParam>,
) -> Result<Json<BarrierJson>, ApiError> {
    validate_name("barrier", &key).map_err(ApiError::bad)?;
    let limit = timeout_of(&p)?;
    s.hub.wait_barrier(&key, limit).await?;
    Ok(Json(BarrierJson {
        barrier: key,
        released: true,
    }))
}

async fn events(
    State(s): State<Arc<Shared>>,
) -> Result<
    Sse<impl tokio_stream::Stream<Item = Result<SseEvent, std::convert::Infallible>>>,
    ApiError,
> {
    use tokio_stream::StreamExt;
    let rx = s.hub.subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| {
        // A subscriber too slow for the buffer misses events; the seq
        // numbers show the gap.
        let ev = r.ok()?;
        let data = serde_json::to_string(&*ev).ok()?;
        Some(Ok(SseEvent::default()
            .event(ev.event.as_str())
            .id(ev.seq.to_string())
            .data(data)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::prometheus(&s),
    )
}

async fn status_page(State(s): State<Arc<Shared>>) -> Html<String> {
    Html(crate::status::page(&s))
}

/// Checks the bearer token (or `?token=` on the status page and its data).
async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(token) = s.config.token.as_deref() else {
        return next.run(req).await;
    };
    if s.config.http_open {
        return next.run(req).await;
    }
    let path = req.uri().path();
    if s.config.metrics_open && (path == "/healthz" || path == "/metrics") {
        return next.run(req).await;
    }
    // The page, and the stream its script opens (an EventSource cannot
    // send headers), also take the token in the query.
    let in_query = matches!(path, "/" | "/api/v1/status" | "/api/v1/status/stream");
    let given = bearer(req.headers()).or_else(|| {
        in_query
            .then(|| {
                req.uri().query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("token="))
                        .map(str::to_string)
                })
            })
            .flatten()
    });
    match given {
        Some(g) if punch_tls::ct_eq(g.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "bad_token", "wrong token").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "this server requires its token: Authorization: Bearer TOKEN",
        )
        .into_response(),
    }
}

fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The routes behind the token check. The router is built from this list
/// alone, so [`route_paths`] is what it serves and the OpenAPI test holds
/// the description to it.
fn api_routes() -> Vec<(&'static str, MethodRouter<Arc<Shared>>)> {
    vec![
        ("/", get(status_page)),
        ("/healthz", get(healthz)),
        ("/metrics", get(metrics_text)),
        ("/peers", get(peers)),
        ("/api/v1/workers", get(workers)),
        ("/api/v1/connects", get(connects)),
        ("/api/v1/workers/{id}", get(worker)),
        ("/api/v1/discover/{type}", get(discover)),
        ("/api/v1/wait/{id}", get(wait)),
        ("/api/v1/barriers/{key}", get(barrier_get).put(barrier_put)),
        ("/api/v1/events", get(events)),
        ("/api/v1/status", get(crate::status::status_json)),
        ("/api/v1/status/stream", get(crate::status::status_stream)),
        ("/api/v1/openapi.json", get(crate::openapi::serve)),
    ]
}

/// Every path the router serves.
pub fn route_paths() -> Vec<&'static str> {
    api_routes()
        .into_iter()
        .map(|(p, _)| p)
        .chain([punch_protocol::ws::PATH])
        .collect()
}

/// The router, for tests and embedding.
pub fn router(shared: Arc<Shared>) -> Router {
    api_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, m)| r.route(path, m))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), auth))
        // Agents prove their token inside the channel (and a front may sit
        // in between), so the WebSocket takes no bearer token.
        .route(punch_protocol::ws::PATH, get(crate::tcp::upgrade))
        .with_state(shared)
}

/// Serves HTTP on `listener` until the task is aborted, within the HTTP
/// door's connection cap and head deadline.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let door = shared.http_door.clone();
    let app = router(shared);
    crate::serving::accept_loop(listener, door.clone(), move |tcp, remote, slot| {
        let (app, door) = (app.clone(), door.clone());
        async move {
            let io = crate::serving::Slotted::new(tcp, slot);
            crate::serving::serve_http(io, remote, app, &door).await;
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The OpenAPI description names exactly the routes the router serves.
    #[test]
    fn every_route_is_described_and_every_description_is_a_route() {
        let spec: serde_json::Value = serde_json::from_str(&crate::openapi::json()).unwrap();
        assert_eq!(spec["openapi"], "3.1.0");
        let described: BTreeSet<&str> = spec["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let served: BTreeSet<&str> = super::route_paths().into_iter().collect();
        assert_eq!(described, served);
        for (path, ops) in spec["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path}: no responses"
                );
            }
        }
    }
}
