//! The random walk's decisions, without I/O or a clock of its own: when the
//! next walk starts, whom it asks next, and how long a peer that failed is
//! left alone. The driver ([`super::run`]) connects, asks and tells the
//! machine what came of it.
//!
//! A walk is a bounded session of [`WalkConfig::hops`] questions. Its first
//! hop is a random peer of the starting set (the configured bootstrap
//! workers and the peers the book knows for a topic); each next hop is a
//! random peer the previous answer named that this walk has not asked yet
//! (falling back to the starting set when the answer named none), as
//! p2panda-net's walks go. A peer whose connect or answer failed waits
//! out an exponential back-off before any walk asks it again.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How walks are paced.
#[derive(Clone, Debug)]
pub struct WalkConfig {
    /// Questions per walk.
    pub hops: usize,
    /// From the end of one walk to the start of the next (±25 %).
    pub every: Duration,
    /// A peer's first back-off; it doubles with every failure in a row ...
    pub backoff_min: Duration,
    /// ... up to this.
    pub backoff_max: Duration,
}

impl Default for WalkConfig {
    fn default() -> Self {
        WalkConfig {
            hops: 3,
            every: Duration::from_secs(60),
            backoff_min: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
        }
    }
}

/// Most peers whose back-off is remembered (the oldest is forgotten).
const MAX_BACKOFF: usize = 256;

#[derive(Clone, Copy, Debug)]
struct Backoff {
    fails: u32,
    until: Instant,
}

#[derive(Debug, Default)]
struct Walk {
    asked: Vec<String>,
    learned: usize,
    failed: usize,
    /// The last answer's peers: where the walk goes next.
    next: Vec<String>,
}

/// What one finished walk did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkSummary {
    /// The peers asked, in order.
    pub asked: Vec<String>,
    /// Peers learned that we had not heard of.
    pub learned: usize,
    /// Questions that failed (no connection or no answer).
    pub failed: usize,
}

/// What became of one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answered {
    /// The peer answered, naming these workers (new to us or not).
    Named {
        /// The ids named, to walk on to.
        peers: Vec<String>,
        /// How many of them we had not heard of.
        new: usize,
    },
    /// No connection, or no answer.
    Failed,
}

/// The walk machine.
#[derive(Debug)]
pub struct Walker {
    cfg: WalkConfig,
    rng: StdRng,
    next_walk: Instant,
    walk: Option<Walk>,
    asking: Option<String>,
    backoff: HashMap<String, Backoff>,
    ended: Option<WalkSummary>,
}

impl Walker {
    /// A walker whose first walk is due at `first`; `seed` makes its
    /// choices repeatable.
    pub fn new(cfg: WalkConfig, seed: u64, first: Instant) -> Walker {
        Walker {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            next_walk: first,
            walk: None,
            asking: None,
            backoff: HashMap::new(),
            ended: None,
        }
    }

    /// Makes the next walk due at `now`, unless one is under way.
    pub fn start_now(&mut self, now: Instant) {
        if self.walk.is_none() {
            self.next_walk = self.next_walk.min(now);
        }
    }

    /// A walk is under way (the next [`Walker::poll_ask`] does not start
    /// one).
    pub fn walking(&self) -> bool {
        self.walk.is_some()
    }

    /// The summary of a walk that [`Walker::poll_ask`] ended for want of
    /// anyone to ask.
    pub fn take_ended(&mut self) -> Option<WalkSummary> {
        self.ended.take()
    }

    /// When the machine next has something to do (`None`: it waits for an
    /// answer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Mid-walk, `next_walk` is when the last answer came: the next hop
        // is due at once.
        self.asking.is_none().then_some(self.next_walk)
    }

    fn waiting(&self, id: &str, now: Instant) -> bool {
        self.backoff.get(id).is_some_and(|b| b.until > now)
    }

    /// The peer to ask now, if one is due; `start` is the starting set
    /// (bootstrap workers and the book's peers for our topics, without
    /// ourselves). A walk with no one to ask ends at once.
    pub fn poll_ask(&mut self, now: Instant, start: &[String]) -> Option<String> {
        if self.asking.is_some() {
            return None;
        }
        if self.walk.is_none() {
            if now < self.next_walk {
                return None;
            }
            self.walk = Some(Walk::default());
        }
        let walk = self.walk.as_ref().expect("just set");
        let open = |ids: &[String]| -> Vec<String> {
            ids.iter()
                .filter(|id| !walk.asked.contains(id) && !self.waiting(id, now))
                .cloned()
                .collect()
        };
        let mut choice = open(&walk.next);
        if choice.is_empty() {
            choice = open(start);
        }
        match choice.choose(&mut self.rng).cloned() {
            Some(id) => {
                self.asking = Some(id.clone());
                Some(id)
            }
            None => {
                self.ended = self.finish(now);
                None
            }
        }
    }

    /// What the question to `peer` came to; the summary when that ended
    /// the walk.
    pub fn handle_answer(
        &mut self,
        now: Instant,
        peer: &str,
        answer: Answered,
    ) -> Option<WalkSummary> {
        if self.asking.as_deref() != Some(peer) {
            return None;
        }
        self.asking = None;
        let walk = self.walk.get_or_insert_with(Walk::default);
        walk.asked.push(peer.to_string());
        match answer {
            Answered::Named { peers, new } => {
                self.backoff.remove(peer);
                walk.learned += new;
                walk.next = peers;
            }
            Answered::Failed => {
                walk.failed += 1;
                walk.next.clear();
                let fails = self.backoff.get(peer).map_or(0, |b| b.fails) + 1;
                let wait = self
                    .cfg
                    .backoff_min
                    .saturating_mul(1 << (fails - 1).min(16))
                    .min(self.cfg.backoff_max);
                if self.backoff.len() >= MAX_BACKOFF && !self.backoff.contains_key(peer) {
                    self.backoff.retain(|_, b| b.until > now);
                    if self.backoff.len() >= MAX_BACKOFF {
                        let oldest = self.backoff.iter().min_by_key(|(_, b)| b.until);
                        if let Some(k) = oldest.map(|(k, _)| k.clone()) {
                            self.backoff.remove(&k);
                        }
                    }
                }
                self.backoff.insert(
                    peer.to_string(),
                    Backoff {
                        fails,
                        until: now + wait,
                    },
                );
            }
        }
        if walk.asked.len() >= self.cfg.hops {
            return self.finish(now);
        }
        self.next_walk = now;
        None
    }

    fn finish(&mut self, now: Instant) -> Option<WalkSummary> {
        let walk = self.walk.take()?;
        let quarter = self.cfg.every / 4;
        let jitter = self.rng.gen_range(0..=2 * quarter.as_millis() as u64);
        self.next_walk = now + self.cfg.every - quarter + Duration::from_millis(jitter);
        Some(WalkSummary {
            asked: walk.asked,
            learned: walk.learned,
            failed: walk.failed,
        })
    }

    /// How long `peer` is left alone from `now` (zero: not at all).
    pub fn backoff_left(&self, peer: &str, now: Instant) -> Duration {
        self.backoff
            .get(peer)
            .map_or(Duration::ZERO, |b| b.until.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn cfg() -> WalkConfig {
        WalkConfig {
            hops: 3,
            every: Duration::from_secs(60),
            backoff_min: Duration::from_secs(5),
            backoff_max: Duration::from_secs(40),
        }
    }

    #[test]
    fn a_walk_follows_the_answers_asks_no_one_twice_and_ends_after_its_hops() {
        let t0 = Instant::now();
        let mut w = Walker::new(cfg(), 7, t0);
        let start = ids(&["b"]);
        assert_eq!(w.poll_ask(t0, &start).as_deref(), Some("b"));
        // Waiting for b's answer: nothing else to do.
        assert_eq!(w.poll_timeout(), None);
        assert_eq!(w.poll_ask(t0, &start), None);
        let named = Answered::Named {
            peers: ids(&["c", "b"]),
            new: 1,
        };
        assert_eq!(w.handle_answer(t0, "b", named), None);
        // b named c and itself: c is the only peer not asked yet.
        assert_eq!(w.poll_ask(t0, &start).as_deref(), Some("c"));
        let named = Answered::Named {
            peers: ids(&["d"]),
            new: 1,
        };
        assert_eq!(w.handle_answer(t0, "c", named), None);
        assert_eq!(w.poll_ask(t0, &start).as_deref(), Some("d"));
        let summary = w
            .handle_answer(
                t0,
                "d",
                Answered::Named {
                    peers: vec![],
                    new: 0,
                },
            )
            .expect("three hops end the walk");
        assert_eq!(summary.asked, ids(&["b", "c", "d"]));
        assert_eq!((summary.learned, summary.failed), (2, 0));
        // The next walk: 45 to 75 s later, not before.
        let next = w.poll_timeout().unwrap();
        assert!(next >= t0 + Duration::from_secs(45) && next <= t0 + Duration::from_secs(75));
        assert_eq!(w.poll_ask(next - Duration::from_millis(1), &start), None);
        assert_eq!(w.poll_ask(next, &start).as_deref(), Some("b"));
    }

    #[test]
    fn a_failing_peer_backs_off_doubling_up_to_the_cap_and_is_forgiven_when_it_answers() {
        let t0 = Instant::now();
        let mut w = Walker::new(cfg(), 1, t0);
        let start = ids(&["b"]);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            assert_eq!(w.poll_ask(now, &start).as_deref(), Some("b"));
            w.handle_answer(now, "b", Answered::Failed);
            waits.push(w.backoff_left("b", now).as_secs());
            // With b backing off and no one else, the walk ends: nothing
            // is asked until the back-off is over.
            assert_eq!(w.poll_ask(now, &start), None);
            now += w.backoff_left("b", now).max(Duration::from_secs(75));
        }
        assert_eq!(waits, [5, 10, 20, 40, 40]);
        assert_eq!(w.poll_ask(now, &start).as_deref(), Some("b"));
        w.handle_answer(
            now,
            "b",
            Answered::Named {
                peers: vec![],
                new: 0,
            },
        );
        assert_eq!(w.backoff_left("b", now), Duration::ZERO);
    }

    #[test]
    fn a_walk_with_no_one_to_ask_ends_at_once_and_an_unasked_answer_is_ignored() {
        let t0 = Instant::now();
        let mut w = Walker::new(cfg(), 3, t0);
        assert_eq!(w.poll_ask(t0, &[]), None);
        let empty = w.take_ended().expect("the walk ended");
        assert!(empty.asked.is_empty());
        assert!(w.poll_timeout().unwrap() >= t0 + Duration::from_secs(45));
        // Asked to walk now, it does.
        w.start_now(t0 + Duration::from_secs(1));
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        // An answer from a peer the walker did not ask changes nothing.
        let stray = Answered::Named {
            peers: ids(&["x"]),
            new: 1,
        };
        assert_eq!(w.handle_answer(t0, "x", stray), None);
        assert_eq!(w.backoff_left("x", t0), Duration::ZERO);
    }

    #[test]
    fn the_back_off_table_is_bounded() {
        let t0 = Instant::now();
        let mut w = Walker::new(cfg(), 3, t0);
        for i in 0..(MAX_BACKOFF + 50) {
            let id = format!("w{i}");
            w.asking = Some(id.clone());
            w.walk = Some(Walk::default());
            w.handle_answer(t0 + Duration::from_millis(i as u64), &id, Answered::Failed);
        }
        assert!(w.backoff.len() <= MAX_BACKOFF);
        // The newest failure is remembered.
        let last = format!("w{}", MAX_BACKOFF + 49);
        assert!(w.backoff_left(&last, t0) > Duration::ZERO);
    }
}
