//! Registry events, waits and barriers: what HTTP long-polls, the event
//! stream and agents' `Wait` queries block on. Every wait is bounded in
//! time and in number.

use crate::registry::{Event, EventKind};
use crate::Shared;
use punch_protocol::signal::WorkerInfo;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::time::Instant;

/// Default cap on waits (worker waits and barrier waits, HTTP and
/// signaling) at once.
pub const MAX_WAITS: usize = 10_000;
/// Named barriers held at once.
pub const MAX_BARRIERS: usize = 10_000;
/// How long a released barrier is remembered (later waits return at once)
/// unless the server is told otherwise.
pub const BARRIER_TTL: Duration = Duration::from_secs(600);
/// Longest wait honoured; longer ones are capped.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Events buffered for slow subscribers before they miss some.
const EVENT_BUFFER: usize = 1024;

/// One event as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct EventRecord {
    /// Increases by one per event.
    pub seq: u64,
    /// `registered`, `address_changed`, `stale`, `deregistered`, `expired`.
    pub event: EventKind,
    pub worker: String,
    pub observed_addr: Option<String>,
    /// RFC 3339, UTC.
    pub at: String,
    /// In cluster mode, the id of the server that holds the worker when it
    /// is another server; absent for this server's own workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// Why a wait did not succeed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("timed out")]
    Timeout,
    #[error("too many waits in progress")]
    Busy,
    #[error("too many barriers")]
    Full,
}

/// Events, waits and barriers.
#[derive(Debug)]
pub struct Hub {
    events: broadcast::Sender<Arc<EventRecord>>,
    seq: AtomicU64,
    waits: Arc<Semaphore>,
    max_waits: usize,
    barriers: Mutex<Barriers>,
    /// Waits refused because [`MAX_WAITS`] were running.
    pub waits_refused: AtomicU64,
}

/// The barriers held now. An entry lives while it has waiters or, once
/// released, for the TTL: without both rules every key ever used stayed
/// until a restart and the cap turned into a lifetime quota.
#[derive(Debug)]
struct Barriers {
    map: HashMap<String, Barrier>,
    /// Released barriers by release time (and a number that makes the key
    /// unique): the oldest are forgotten first, at amortised O(log n).
    released: BTreeMap<(Instant, u64), String>,
    next: u64,
    ttl: Duration,
}

#[derive(Debug)]
struct Barrier {
    tx: watch::Sender<bool>,
    /// Its key in [`Barriers::released`], once released.
    released: Option<(Instant, u64)>,
}

impl Barriers {
    /// Forgets the released barriers older than the TTL.
    fn sweep(&mut self, now: Instant) {
        while let Some(entry) = self.released.first_entry() {
            if now.saturating_duration_since(entry.key().0) < self.ttl {
                break;
            }
            let key = entry.remove();
            self.map.remove(&key);
        }
    }

    /// Room for one more barrier?
    fn room(&mut self, now: Instant) -> Result<(), WaitError> {
        self.sweep(now);
        if self.map.len() >= MAX_BARRIERS {
            return Err(WaitError::Full);
        }
        Ok(())
    }

    /// Marks `key` released now (its TTL starts again if it already was).
    fn mark_released(&mut self, key: &str, now: Instant) {
        let Some(b) = self.map.get_mut(key) else {
            return;
        };
        if let Some(old) = b.released.take() {
            self.released.remove(&old);
        }
        let stamp = (now, self.next);
        self.next += 1;
        b.released = Some(stamp);
        b.tx.send_replace(true);
        self.released.insert(stamp, key.to_string());
    }
}

/// Forgets an unreleased barrier when its last waiter leaves, however it
/// leaves (answered, timed out, or its HTTP client went away and the
/// future was dropped).
struct WaiterGuard<'a> {
    hub: &'a Hub,
    key: &'a str,
    rx: Option<watch::Receiver<bool>>,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        // Our receiver goes first, so the count below excludes us.
        drop(self.rx.take());
        let mut b = self.hub.barriers.lock().expect("not poisoned");
        let idle = b
            .map
            .get(self.key)
            .is_some_and(|e| e.released.is_none() && e.tx.receiver_count() == 0);
        if idle {
            b.map.remove(self.key);
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(MAX_WAITS)
    }
}

impl Hub {
    /// A hub allowing `max_waits` waits at once.
    pub fn new(max_waits: usize) -> Self {
        Hub {
            events: broadcast::channel(EVENT_BUFFER).0,
            seq: AtomicU64::new(0),
            waits: Arc::new(Semaphore::new(max_waits)),
            max_waits,
            barriers: Mutex::new(Barriers {
                map: HashMap::new(),
                released: BTreeMap::new(),
                next: 0,
                ttl: BARRIER_TTL,
            }),
            waits_refused: AtomicU64::new(0),
        }
    }

    /// Remembers released barriers for `ttl` instead of [`BARRIER_TTL`].
    pub fn with_barrier_ttl(self, ttl: Duration) -> Self {
        self.barriers.lock().expect("not poisoned").ttl = ttl;
        self
    }

    /// Barriers held now: released within the TTL, or with waiters.
    pub fn barriers_held(&self) -> usize {
        self.barriers.lock().expect("not poisoned").map.len()
    }

    /// Forgets the released barriers whose TTL has passed (also done on
    /// every new barrier; this frees the memory of an idle server).
    pub fn sweep_barriers(&self) {
        self.barriers
            .lock()
            .expect("not poisoned")
            .sweep(Instant::now());
    }

    /// Publishes a registry event.
    pub fn publish(&self, ev: Event) {
        self.publish_record(ev.kind, ev.worker, ev.observed.map(|a| a.to_string()), None);
    }

    /// Publishes an event, possibly of another server (`server`).
    pub fn publish_record(
        &self,
        event: EventKind,
        worker: String,
        observed_addr: Option<String>,
        server: Option<String>,
    ) {
        let rec = EventRecord {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            event,
            worker,
            observed_addr,
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            server,
        };
        tracing::debug!(event = rec.event.as_str(), worker = %rec.worker, seq = rec.seq, "registry event");
        let _ = self.events.send(Arc::new(rec));
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.events.subscribe()
    }

    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, WaitError> {
        self.waits.clone().try_acquire_owned().map_err(|_| {
            self.waits_refused.fetch_add(1, Ordering::Relaxed);
            WaitError::Busy
        })
    }

    /// Waits (at most `timeout`, capped at [`MAX_WAIT`]) until `id` is
    /// online; returns at once when it already is.
    pub async fn wait_online(
        &self,
        shared: &Shared,
        id: &str,
        timeout: Duration,
    ) -> Result<WorkerInfo, WaitError> {
        let _permit = self.permit()?;
        // Subscribe before looking, so a registration in between is seen.
        let mut rx = self.subscribe();
        let online = |shared: &Shared| {
            let r = shared.registry.lock().expect("not poisoned");
            r.is_online(id).then(|| r.get(id)).flatten()
        };
        if let Some(w) = online(shared) {
            return Ok(w);
        }
        // In a cluster, it may be online at another server.
        let remote = || async {
            crate::query::get_remote(shared, id)
                .await
                .filter(|w| w.state == punch_protocol::signal::WorkerState::Online)
        };
        if shared.cluster.is_some() {
            if let Some(w) = remote().await {
                return Ok(w);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Err(WaitError::Timeout),
                Ok(Ok(ev)) if ev.worker != id => {}
                Ok(Ok(ev)) if ev.server.is_some() => {
                    if ev.event == EventKind::Registered {
                        if let Some(w) = remote().await {
                            return Ok(w);
                        }
                    }
                }
                // Our worker's event, or we lagged: look again.
                Ok(_) => {
                    if let Some(w) = online(shared) {
                        return Ok(w);
                    }
                }
            }
        }
    }

    /// Releases barrier `key`: every waiter returns, later waits (within
    /// the TTL) return at once.
    pub fn release(&self, key: &str) -> Result<(), WaitError> {
        self.release_at(key, Instant::now())
    }

    fn release_at(&self, key: &str, now: Instant) -> Result<(), WaitError> {
        let mut b = self.barriers.lock().expect("not poisoned");
        if !b.map.contains_key(key) {
            b.room(now)?;
            b.map.insert(
                key.to_string(),
                Barrier {
                    tx: watch::channel(false).0,
                    released: None,
                },
            );
        }
        b.mark_released(key, now);
        Ok(())
    }

    /// Waits until barrier `key` is released (at most `timeout`).
    pub async fn wait_barrier(&self, key: &str, timeout: Duration) -> Result<(), WaitError> {
        let _permit = self.permit()?;
        let rx = {
            let mut b = self.barriers.lock().expect("not poisoned");
            match b.map.get(key) {
                Some(e) => e.tx.subscribe(),
                None => {
                    b.room(Instant::now())?;
                    let tx = watch::channel(false).0;
                    let rx = tx.subscribe();
                    b.map
                        .insert(key.to_string(), Barrier { tx, released: None });
                    rx
                }
            }
        };
        let mut guard = WaiterGuard {
            hub: self,
            key,
            rx: Some(rx),
        };
        let rx = guard.rx.as_mut().expect("set above");
        // A zero timeout asks "released yet?": answered without a timer (a
        // timer would cost a tick of the clock, ~1 ms).
        if timeout.is_zero() && !*rx.borrow() {
            return Err(WaitError::Timeout);
        }
        let released = tokio::time::timeout(timeout.min(MAX_WAIT), rx.wait_for(|r| *r)).await;
        match released {
            Ok(Ok(_)) => Ok(()),
            _ => Err(WaitError::Timeout),
        }
    }

    /// Waits running now.
    pub fn waits_in_progress(&self) -> usize {
        self.max_waits - self.waits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 50,000 distinct barriers, released 10,000 (the cap) per TTL: each
    /// round fits because the previous one has been forgotten.
    #[test]
    fn released_barriers_are_forgotten_after_the_ttl() {
        let ttl = Duration::from_secs(60);
        let hub = Hub::new(MAX_WAITS).with_barrier_ttl(ttl);
        let start = Instant::now();
        for round in 0..5u32 {
            let now = start + ttl * round;
            for i in 0..MAX_BARRIERS {
                hub.release_at(&format!("job-{round}-{i}"), now)
                    .unwrap_or_else(|e| panic!("round {round}, barrier {i}: {e}"));
            }
            assert_eq!(hub.barriers_held(), MAX_BARRIERS);
        }
        // The 50,001st, within the TTL of the last round: the table is full.
        let last = start + ttl * 4;
        assert_eq!(hub.release_at("one-more", last), Err(WaitError::Full));
        // A re-release of a held barrier is no new barrier; its TTL starts
        // again.
        hub.release_at("job-4-0", last + ttl / 2).unwrap();
        // And once that round's TTL has passed, it goes.
        let later = start + ttl * 5;
        hub.release_at("one-more", later).unwrap();
        assert_eq!(
            hub.barriers_held(),
            2,
            "one-more and the re-released job-4-0"
        );
    }

    /// A released barrier still answers at once within its TTL.
    #[tokio::test]
    async fn released_barrier_answers_within_its_ttl() {
        let hub = Hub::new(MAX_WAITS);
        hub.release("b").unwrap();
        hub.wait_barrier("b", Duration::ZERO).await.unwrap();
        assert_eq!(hub.barriers_held(), 1);
    }

    /// Waits that time out leave nothing behind: 50,000 of them, then a
    /// 50,001st barrier that is released and waited on.
    #[tokio::test]
    async fn unreleased_barriers_are_forgotten_when_waiters_leave() {
        let hub = Hub::new(MAX_WAITS);
        for i in 0..50_000 {
            assert_eq!(
                hub.wait_barrier(&format!("w-{i}"), Duration::ZERO).await,
                Err(WaitError::Timeout),
                "barrier {i}"
            );
        }
        assert_eq!(hub.barriers_held(), 0);
        // Through the timer too.
        for i in 0..3 {
            let key = format!("t-{i}");
            let r = hub.wait_barrier(&key, Duration::from_millis(5)).await;
            assert_eq!(r, Err(WaitError::Timeout));
        }
        assert_eq!(hub.barriers_held(), 0);
        hub.release("w-50000").unwrap();
        hub.wait_barrier("w-50000", Duration::ZERO).await.unwrap();
    }

    /// A waiter that goes away (its future dropped, as when an HTTP client
    /// disconnects) forgets the barrier, but only once it was the last.
    #[tokio::test]
    async fn a_dropped_waiter_forgets_the_barrier_when_last() {
        let hub = Arc::new(Hub::new(MAX_WAITS));
        let first = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_barrier("k", Duration::from_secs(30)).await }
        });
        let second = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_barrier("k", Duration::from_secs(30)).await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hub.waits_in_progress() < 2 {
            assert!(std::time::Instant::now() < deadline, "waits never started");
            tokio::task::yield_now().await;
        }
        assert_eq!(hub.barriers_held(), 1);
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert_eq!(hub.barriers_held(), 1, "the second waiter still holds it");
        hub.release("k").unwrap();
        second.await.unwrap().unwrap();

        let gone = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_barrier("gone", Duration::from_secs(30)).await }
        });
        while hub.barriers_held() < 2 {
            assert!(std::time::Instant::now() < deadline, "wait never started");
            tokio::task::yield_now().await;
        }
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(hub.barriers_held(), 1, "only the released k is left");
    }
}
