//! The live status page for people (`GET /`) and the data it draws:
//! `GET /api/v1/status`, one snapshot as JSON, and
//! `GET /api/v1/status/stream`, server-sent events carrying a snapshot at
//! once and again after each registry event or connect (at most every
//! [`STREAM_MIN_GAP`], and every [`STREAM_IDLE`] when nothing happens, for
//! the relay's byte counts). The page is one HTML file with its script and
//! styles inline (no CDN, no framework), and carries the first snapshot so
//! that it shows everything before its script connects.

use crate::api::ConnectView;
use crate::metrics::{PairCounts, PAGE_BUCKETS_MS};
use crate::Shared;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use punch_protocol::view::WorkerView;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The page: markup, styles and script, with `/*INITIAL*/` where the first
/// snapshot goes.
const PAGE: &str = include_str!("status.html");

/// Least time between two snapshots on one stream.
pub const STREAM_MIN_GAP: Duration = Duration::from_millis(250);
/// A snapshot at least this often on a quiet server.
pub const STREAM_IDLE: Duration = Duration::from_secs(5);
/// How often the last hour's history is sampled, and how many samples
/// are kept (an hour).
pub const HISTORY_EVERY: Duration = Duration::from_secs(10);
pub const HISTORY_LEN: usize = 360;

/// Counters sampled every [`HISTORY_EVERY`]: the page draws the last hour
/// from their differences.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// Unix time, ms.
    pub t_ms: u64,
    pub relay_bytes: u64,
    pub relay_sessions: usize,
    pub online: usize,
    pub direct: u64,
    pub relayed: u64,
    pub failed: u64,
}

/// The last hour of [`Sample`]s, oldest first, bounded.
#[derive(Debug, Default)]
pub struct History(Mutex<VecDeque<Sample>>);

impl History {
    /// Takes a sample now.
    pub fn sample(&self, s: &Shared) {
        let (relay_bytes, relay_sessions) =
            relay_now(s).map_or((0, 0), |r| (r.forwarded_bytes, r.sessions));
        let m = s.metrics.snapshot();
        let sample = Sample {
            t_ms: unix_ms(SystemTime::now()),
            relay_bytes,
            relay_sessions,
            online: s.registry.lock().expect("not poisoned").online_count(),
            direct: m.outcome_direct,
            relayed: m.outcome_relayed,
            failed: m.outcome_failed,
        };
        let mut h = self.0.lock().expect("not poisoned");
        if h.len() >= HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(sample);
    }

    fn list(&self) -> Vec<Sample> {
        self.0
            .lock()
            .expect("not poisoned")
            .iter()
            .copied()
            .collect()
    }
}

/// Samples the history until the task is aborted.
pub async fn keep_history(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(HISTORY_EVERY);
    loop {
        tick.tick().await;
        s.history.sample(&s);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything the page shows.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatusJson {
    pub fingerprint: String,
    /// Unix time of the snapshot, ms.
    pub now_ms: u64,
    /// Online and stale workers (at most `MAX_LIST`), as
    /// `/api/v1/workers` has them.
    pub workers: Vec<WorkerView>,
    /// Connect outcomes in all.
    pub outcomes: PairCounts,
    /// Outcomes by requester and target NAT class.
    pub nat_pairs: Vec<PairRow>,
    pub connect_time: ConnectTimeJson,
    /// `None` when the relay is off.
    pub relay: Option<RelayNow>,
    /// The last hour, oldest first.
    pub history: Vec<Sample>,
    /// The latest connects, newest first, as `/api/v1/connects` has them.
    pub recent: Vec<ConnectView>,
}

/// Outcomes of one NAT-class pair.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PairRow {
    pub requester: String,
    pub target: String,
    #[serde(flatten)]
    pub counts: PairCounts,
}

/// Times to connect, counted per bucket (not cumulative).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectTimeJson {
    /// Upper bounds, ms; a last bucket holds the rest.
    pub bounds_ms: Vec<u32>,
    pub direct: Vec<u64>,
    pub relayed: Vec<u64>,
}

/// The relay now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RelayNow {
    pub sessions: usize,
    pub forwarded_bytes: u64,
}

fn relay_now(s: &Shared) -> Option<RelayNow> {
    s.relay.as_ref().map(|t| {
        let t = t.lock().expect("not poisoned");
        RelayNow {
            sessions: t.len(),
            forwarded_bytes: t.stats.forwarded_bytes,
        }
    })
}

/// A snapshot of the server for the page.
pub fn snapshot(s: &Shared) -> StatusJson {
    let workers = {
        let list = s.registry.lock().expect("not poisoned").list(
            None,
            None,
            punch_protocol::signal::MAX_LIST,
        );
        crate::api::worker_views(s, list)
    };
    let m = s.metrics.snapshot();
    let nat_pairs = s
        .metrics
        .nat_pairs
        .lock()
        .expect("not poisoned")
        .counts()
        .into_iter()
        .map(|(pair, counts)| {
            let (requester, target) = pair.split_once('/').unwrap_or((&pair, "?"));
            PairRow {
                requester: requester.to_string(),
                target: target.to_string(),
                counts,
            }
        })
        .collect();
    let [direct, relayed] = s.metrics.connect_time.page_buckets();
    StatusJson {
        fingerprint: s.fingerprint.clone(),
        now_ms: unix_ms(SystemTime::now()),
        workers,
        outcomes: PairCounts {
            direct: m.outcome_direct,
            relayed: m.outcome_relayed,
            failed: m.outcome_failed,
        },
        nat_pairs,
        connect_time: ConnectTimeJson {
            bounds_ms: PAGE_BUCKETS_MS.to_vec(),
            direct: direct.to_vec(),
            relayed: relayed.to_vec(),
        },
        relay: relay_now(s),
        history: s.history.list(),
        recent: crate::api::connect_views(s),
    }
}

/// JSON for inside a `<script>` element: no `<`, so no `</script>`.
fn script_json(v: &impl Serialize) -> String {
    serde_json::to_string(v)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c")
}

/// Renders the page with the current snapshot in it.
pub fn page(s: &Shared) -> String {
    PAGE.replacen("/*INITIAL*/", &script_json(&snapshot(s)), 1)
}

/// `GET /api/v1/status`.
pub async fn status_json(State(s): State<Arc<Shared>>) -> Json<StatusJson> {
    Json(snapshot(&s))
}

/// `GET /api/v1/status/stream`: `status` events, each a [`StatusJson`].
pub async fn status_stream(
    State(s): State<Arc<Shared>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let events = s.hub.subscribe();
    let stream = futures_util::stream::unfold(
        (s, events, None),
        |(s, mut events, seen): (_, _, Option<u64>)| async move {
            if let Some(seen) = seen {
                tokio::time::sleep(STREAM_MIN_GAP).await;
                // Armed before the counter is read, so a connect recorded
                // in between still wakes us.
                let changed = s.metrics.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if s.metrics.changes() == seen {
                    tokio::select! {
                        _ = changed => {}
                        r = events.recv() => {
                            if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                                return None;
                            }
                        }
                        _ = tokio::time::sleep(STREAM_IDLE) => {}
                    }
                }
                // Registry events that came meanwhile are in this snapshot.
                while events.try_recv().is_ok() {}
            }
            let seen = s.metrics.changes();
            let ev = SseEvent::default()
                .event("status")
                .data(serde_json::to_string(&snapshot(&s)).unwrap_or_else(|_| "null".into()));
            Some((Ok(ev), (s, events, Some(seen))))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_in_the_page_cannot_close_its_script() {
        let j = script_json(&serde_json::json!({"id": "</script><script>alert(1)</script>"}));
        assert!(!j.contains('<'), "{j}");
        let back: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(back["id"], "</script><script>alert(1)</script>");
        assert!(
            PAGE.contains("/*INITIAL*/"),
            "the page lost its placeholder"
        );
    }
}
