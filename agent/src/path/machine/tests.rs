//! docs/paths.md, scenario by scenario, on a fake clock.

use super::*;

/// A driver on a fake clock: a direct path whose last datagram arrived at
/// `last_rx` (None: the connection is relayed), carrying out actions the
/// way `session::maintain` does.
struct Drive {
    m: PathMachine,
    start: Instant,
    now: Instant,
    /// The direct path's last arrival, while it is the path.
    last_rx: Option<Instant>,
    has_relay: bool,
    ended: Option<SessionId>,
    /// Keep the direct path alive (keep-alives arrive) until then.
    alive_until: Option<Instant>,
    /// Every action with its time since the start.
    log: Vec<(Duration, PathAction)>,
}

fn dialer() -> PathRole {
    PathRole {
        dialer: true,
        may_punch: true,
    }
}

impl Drive {
    fn direct(role: PathRole) -> Self {
        let now = Instant::now();
        Drive {
            m: PathMachine::new(now, role, PathConfig::default()),
            start: now,
            now,
            last_rx: Some(now),
            has_relay: true,
            ended: None,
            alive_until: None,
            log: Vec::new(),
        }
    }

    fn relayed(role: PathRole) -> Self {
        let mut d = Drive::direct(role);
        d.last_rx = None;
        d
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn view(&self) -> PathView {
        PathView {
            on_relay: self.last_rx.is_none() && self.has_relay,
            has_relay: self.has_relay,
            direct_silence: self.last_rx.map(|t| self.now - t),
            relay_ended: self.ended,
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.m.poll_action() {
            if let PathAction::FallBack { .. } = a {
                self.last_rx = None;
            }
            self.log.push((self.now - self.start, a));
        }
    }

    /// Runs the machine's timers up to `ms` after the start.
    fn run_to(&mut self, ms: u64) {
        let end = self.at(ms);
        loop {
            self.drain();
            let t = self.m.poll_timeout();
            if t > end {
                self.now = end;
                break;
            }
            self.now = t.max(self.now);
            if let (Some(until), Some(_)) = (self.alive_until, self.last_rx) {
                // A keep-alive a second, as peer connections send.
                let mut rx = self.last_rx.unwrap();
                while rx + Duration::from_secs(1) <= self.now.min(until) {
                    rx += Duration::from_secs(1);
                }
                self.last_rx = Some(rx);
            }
            let v = self.view();
            self.m.handle_timeout(self.now, &v);
        }
        self.drain();
    }

    fn repunch_done(&mut self, direct: bool) {
        if direct {
            self.last_rx = Some(self.now);
        }
        self.m.handle_repunch_done(self.now, direct);
        self.drain();
    }

    fn repunches(&self) -> Vec<(Duration, bool, Option<SessionId>)> {
        self.log
            .iter()
            .filter_map(|(t, a)| match a {
                PathAction::Repunch { punch, renews } => Some((*t, *punch, *renews)),
                _ => None,
            })
            .collect()
    }

    fn fallbacks(&self) -> Vec<Duration> {
        self.log
            .iter()
            .filter_map(|(t, a)| matches!(a, PathAction::FallBack { .. }).then_some(*t))
            .collect()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_silent_direct_path_falls_back_to_the_relay_after_2_5_s() {
    let mut d = Drive::direct(dialer());
    d.run_to(2_400);
    assert!(d.fallbacks().is_empty(), "too early: {:?}", d.log);
    d.run_to(2_600);
    assert_eq!(d.fallbacks(), vec![ms(2_500)]);
    // One fall-back, and the relay carries on.
    d.run_to(2_900);
    assert_eq!(d.fallbacks().len(), 1);
}

#[test]
fn keep_alives_keep_a_direct_path_and_a_single_loss_does_not_switch() {
    let mut d = Drive::direct(dialer());
    d.alive_until = Some(d.at(60_000));
    d.run_to(60_000);
    assert!(d.fallbacks().is_empty());
    // One keep-alive lost (2 s of silence) is not death.
    d.alive_until = None;
    let last = d.last_rx.unwrap();
    d.run_to(60_000 + 1_900);
    assert!(d.fallbacks().is_empty());
    d.last_rx = Some(last + Duration::from_secs(2));
    d.alive_until = Some(d.at(120_000));
    d.run_to(90_000);
    assert!(d.fallbacks().is_empty(), "{:?}", d.fallbacks());
}

#[test]
fn repunch_backs_off_doubling_to_5_min_and_a_success_resets_it() {
    let mut d = Drive::direct(dialer());
    d.run_to(2_500);
    assert_eq!(d.fallbacks(), vec![ms(2_500)]);
    // First re-punch 1 s after the death.
    d.run_to(3_600);
    assert_eq!(d.repunches(), vec![(ms(3_500), true, None)]);
    // While one runs, no second one starts.
    d.run_to(10_000);
    assert_eq!(d.repunches().len(), 1);
    // Each failure doubles the wait: 2, 4, 8, ... s, up to 300 s.
    let mut waits = Vec::new();
    for _ in 0..12 {
        d.repunch_done(false);
        let failed_at = d.now;
        let n = d.repunches().len();
        while d.repunches().len() == n {
            let next = (d.now - d.start).as_millis() as u64 + 250;
            d.run_to(next);
        }
        let started = d.start + d.repunches().last().unwrap().0;
        waits.push((started - failed_at).as_secs());
    }
    assert_eq!(
        waits,
        vec![2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300]
    );
    // A success: the next death starts over at 1 s.
    d.repunch_done(true);
    let t = (d.now - d.start).as_millis() as u64;
    d.run_to(t + 2_500);
    assert_eq!(d.fallbacks().len(), 2);
    let n = d.repunches().len();
    d.run_to(t + 2_500 + 1_000);
    assert_eq!(d.repunches().len(), n + 1);
}

#[test]
fn a_connection_that_started_on_the_relay_first_repunches_after_30_s() {
    let mut d = Drive::relayed(dialer());
    d.run_to(29_900);
    assert!(d.repunches().is_empty());
    d.run_to(30_100);
    assert_eq!(d.repunches(), vec![(ms(30_000), true, None)]);
    // Failed at 30.1 s: the next one 60 s later, at the next check.
    d.run_to(30_100);
    d.repunch_done(false);
    d.run_to(30_100 + 59_900);
    assert_eq!(d.repunches().len(), 1);
    d.run_to(30_100 + 60_250);
    assert_eq!(d.repunches().len(), 2);
}

#[test]
fn a_channel_change_resets_the_backoff() {
    let mut d = Drive::relayed(dialer());
    d.run_to(30_000);
    d.repunch_done(false);
    // Next due after 60 s; a new channel brings it to 500 ms.
    d.run_to(40_000);
    let v = d.view();
    d.m.handle_channel_change(d.now, &v);
    d.run_to(40_600);
    assert_eq!(d.repunches().len(), 2);
    assert_eq!(d.repunches()[1].0, ms(40_500));
    // And the back-off starts over at 1 s: doubled by this failure (at
    // 40.6 s) to 2 s, met by the check at 42.75 s.
    d.repunch_done(false);
    d.run_to(42_500);
    assert_eq!(d.repunches().len(), 2);
    d.run_to(42_800);
    assert_eq!(d.repunches().len(), 3);
    assert_eq!(d.repunches()[2].0, ms(42_750));
}

#[test]
fn a_channel_change_on_a_direct_path_changes_nothing() {
    let mut d = Drive::direct(dialer());
    d.alive_until = Some(d.at(100_000));
    d.run_to(1_000);
    let v = d.view();
    d.m.handle_channel_change(d.now, &v);
    d.run_to(100_000);
    assert!(d.repunches().is_empty());
}

#[test]
fn an_ended_relay_session_is_renewed_at_once_and_at_most_once_per_backoff() {
    let mut d = Drive::relayed(dialer());
    d.run_to(5_000);
    d.ended = Some(SessionId(1));
    d.m.handle_relay_ended(d.now);
    d.run_to(5_000);
    assert_eq!(d.repunches(), vec![(ms(5_000), true, Some(SessionId(1)))]);
    // The renewal failed: session 1 is still ended. Retried after 1 s,
    // then 2 s, 4 s.
    d.repunch_done(false);
    d.run_to(5_900);
    assert_eq!(d.repunches().len(), 1);
    d.run_to(6_100);
    assert_eq!(d.repunches().len(), 2);
    d.repunch_done(false);
    d.run_to(6_000 + 1_900);
    assert_eq!(d.repunches().len(), 2);
    d.run_to(6_000 + 2_100);
    assert_eq!(d.repunches().len(), 3);
    // It worked, and later the new session 2 ends too: renewed at once.
    d.ended = None;
    d.repunch_done(false);
    d.run_to(20_000);
    let n = d.repunches().len();
    d.ended = Some(SessionId(2));
    d.m.handle_relay_ended(d.now);
    d.run_to(20_000);
    assert_eq!(d.repunches().len(), n + 1);
    assert_eq!(d.repunches()[n].2, Some(SessionId(2)));
}

#[test]
fn the_accepting_side_never_repunches_nor_renews() {
    let acceptor = PathRole {
        dialer: false,
        may_punch: true,
    };
    let mut d = Drive::direct(acceptor);
    d.run_to(2_600);
    // It does fall back: its packets must reach the peer.
    assert_eq!(d.fallbacks(), vec![ms(2_500)]);
    d.ended = Some(SessionId(3));
    d.m.handle_relay_ended(d.now);
    d.run_to(600_000);
    assert!(d.repunches().is_empty(), "{:?}", d.repunches());
}

#[test]
fn force_relay_never_punches_but_renews_its_relay_session() {
    let forced = PathRole {
        dialer: true,
        may_punch: false,
    };
    let mut d = Drive::relayed(forced);
    d.run_to(600_000);
    assert!(d.repunches().is_empty());
    d.ended = Some(SessionId(4));
    d.m.handle_relay_ended(d.now);
    d.run_to(600_000);
    assert_eq!(
        d.repunches(),
        vec![(ms(600_000), false, Some(SessionId(4)))]
    );
}

#[test]
fn without_a_relay_a_dead_direct_path_is_punched_again() {
    let mut d = Drive::direct(dialer());
    d.has_relay = false;
    d.run_to(3_400);
    assert!(d.fallbacks().is_empty(), "nothing to fall back on");
    assert!(d.repunches().is_empty());
    d.run_to(3_600);
    assert_eq!(d.repunches(), vec![(ms(3_500), true, None)]);
    // A found path ends the silence.
    d.repunch_done(true);
    d.alive_until = Some(d.at(200_000));
    d.run_to(200_000);
    assert_eq!(d.repunches().len(), 1);
}

#[test]
fn the_relay_binding_is_refreshed_every_20_s() {
    let mut d = Drive::direct(dialer());
    d.alive_until = Some(d.at(100_000));
    d.run_to(100_000);
    let refreshes: Vec<Duration> = d
        .log
        .iter()
        .filter_map(|(t, a)| (*a == PathAction::RefreshRelay).then_some(*t))
        .collect();
    assert_eq!(
        refreshes,
        [20, 40, 60, 80, 100]
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_finished_repunch_nudges_quinn() {
    let mut d = Drive::relayed(dialer());
    d.run_to(30_000);
    d.repunch_done(false);
    assert_eq!(d.log.last().map(|(_, a)| *a), Some(PathAction::Nudge));
}

#[test]
fn a_renewal_that_failed_while_the_channel_was_down_goes_again_on_the_new_one() {
    let mut d = Drive::relayed(dialer());
    d.run_to(1_000);
    d.ended = Some(SessionId(9));
    d.m.handle_relay_ended(d.now);
    d.run_to(1_000);
    assert_eq!(d.repunches().len(), 1);
    // The server is down: the renewal fails; the same session is still
    // ended, so the next try would wait 1 s ...
    d.repunch_done(false);
    d.run_to(1_100);
    // ... but the channel came back (re-registered): at once.
    let v = d.view();
    d.m.handle_channel_change(d.now, &v);
    d.run_to(1_100);
    assert_eq!(d.repunches().len(), 2);
    assert_eq!(d.repunches()[1], (ms(1_100), true, Some(SessionId(9))));
}
