//! When a live connection's path changes, decided without I/O.
//!
//! One [`PathMachine`] runs per peer connection, in the shape of
//! `punch_protocol::punch::Puncher`: the driver (`session::maintain`) feeds
//! it what happened (`handle_*`, with the time and a [`PathView`] of the
//! path table) and carries out what [`PathMachine::poll_action`] returns,
//! waking it at [`PathMachine::poll_timeout`]. docs/paths.md tells the
//! policy; each of its scenarios is a test below on a fake clock.
//!
//! - A direct path silent for [`PathConfig::dead_after`] is dead (peers
//!   keep-alive every second: two lost in a row plus a round trip), and the
//!   connection falls back to the relay at once.
//! - The dialing side (it knows the peer's worker id) then asks for a new
//!   introduction after 1 s, doubling up to 5 min while it stays relayed; a
//!   connection that started on the relay first retries after 30 s; a new
//!   channel to the server resets the back-off. The accepting side never
//!   asks: it cannot name the peer.
//! - A relay session the server ended is renewed at once; the same session
//!   still ended after a renewal waits a doubling back-off.
//! - With `--force-relay` nothing is ever punched: renewals only rebind.

use punch_protocol::signal::SessionId;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// The policy's timings; [`Default`] is what the agent uses.
#[derive(Clone, Debug)]
pub struct PathConfig {
    /// A direct path silent this long is dead.
    pub dead_after: Duration,
    /// How often the path is checked.
    pub check_every: Duration,
    /// How often a relay binding is refreshed (the server drops idle ones
    /// after 60 s, and a direct path carries no relay traffic).
    pub refresh_every: Duration,
    /// First re-punch after a direct path died.
    pub repunch_after_death: Duration,
    /// First re-punch of a connection that started on the relay.
    pub repunch_after_relay_start: Duration,
    /// Longest back-off between re-punches (and renewals).
    pub repunch_max: Duration,
    /// First retry of a failed renewal of an ended relay session.
    pub renew_first_retry: Duration,
    /// A relayed connection re-punches this soon after a channel change.
    pub after_channel_change: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            dead_after: Duration::from_millis(2500),
            check_every: Duration::from_millis(250),
            refresh_every: Duration::from_secs(20),
            repunch_after_death: Duration::from_secs(1),
            repunch_after_relay_start: Duration::from_secs(30),
            repunch_max: Duration::from_secs(300),
            renew_first_retry: Duration::from_secs(1),
            after_channel_change: Duration::from_millis(500),
        }
    }
}

/// What the path table says of the peer when the machine looks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathView {
    /// The relay carries the connection now.
    pub on_relay: bool,
    /// A relay binding exists (to fall back on).
    pub has_relay: bool,
    /// How long the direct path has been silent, when it is the path.
    pub direct_silence: Option<Duration>,
    /// The relay session of the binding, when the server ended it.
    pub relay_ended: Option<SessionId>,
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Send a fresh bind for the relay binding (keeps it alive).
    RefreshRelay,
    /// The direct path is dead: give it up for the relay, rebind the relay
    /// (our mapping may be what changed), let the server see our mapping
    /// again and send one ack-eliciting packet so quinn resends now.
    FallBack {
        /// How long the path had been silent.
        silent: Duration,
    },
    /// Ask the server for a new introduction to the peer and move the relay
    /// binding to it; punch when `punch`. Report the result with
    /// [`PathMachine::handle_repunch_done`].
    Repunch {
        /// Punch for a direct path (false: only a new relay session).
        punch: bool,
        /// The ended relay session this renews, if that is why.
        renews: Option<SessionId>,
    },
    /// Send one ack-eliciting packet on the (maybe new) path.
    Nudge,
}

/// Who we are on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathRole {
    /// We dialed, so we can ask the server for the peer again.
    pub dialer: bool,
    /// We may punch (false under `--force-relay`).
    pub may_punch: bool,
}

/// The path policy of one connection.
#[derive(Debug)]
pub struct PathMachine {
    config: PathConfig,
    role: PathRole,
    next_check: Instant,
    next_refresh: Instant,
    repunch_at: Option<Instant>,
    backoff: Duration,
    repunching: bool,
    /// The ended session renewed last, and when to try it again.
    renewed: Option<(SessionId, Instant)>,
    renew_wait: Duration,
    actions: VecDeque<PathAction>,
}

impl PathMachine {
    /// A machine for a connection established at `now`.
    pub fn new(now: Instant, role: PathRole, config: PathConfig) -> Self {
        PathMachine {
            next_check: now,
            next_refresh: now + config.refresh_every,
            repunch_at: None,
            backoff: config.repunch_after_relay_start,
            repunching: false,
            renewed: None,
            renew_wait: config.renew_first_retry,
            actions: VecDeque::new(),
            role,
            config,
        }
    }

    /// The server ended a relay session of ours: look at once.
    pub fn handle_relay_ended(&mut self, now: Instant) {
        self.next_check = now;
    }

    /// A new channel to the server (UDP back after TCP, say): a relayed
    /// connection tries for a direct path soon rather than after its
    /// back-off.
    pub fn handle_channel_change(&mut self, now: Instant, view: &PathView) {
        if view.relay_ended.is_some() {
            // A renewal that failed while the channel was down (the server
            // restarted) goes again at once on the new one.
            self.renewed = None;
            self.renew_wait = self.config.renew_first_retry;
            self.next_check = now;
        }
        if view.on_relay && !self.repunching {
            self.backoff = self.config.repunch_after_death;
            self.repunch_at = Some(now + self.config.after_channel_change);
        }
    }

    /// The re-punch (or renewal) asked for by [`PathAction::Repunch`] is
    /// over; `direct` when it found a direct path.
    pub fn handle_repunch_done(&mut self, now: Instant, direct: bool) {
        self.repunching = false;
        // quinn resends what the old path lost now.
        self.actions.push_back(PathAction::Nudge);
        if direct {
            info!("direct path found again");
            self.backoff = self.config.repunch_after_relay_start;
            self.repunch_at = None;
        } else {
            self.backoff = (self.backoff * 2).min(self.config.repunch_max);
            self.repunch_at = Some(now + self.backoff);
            debug!(next_in = ?self.backoff, "re-punch found no direct path");
        }
    }

    /// Advances to `now`; `view` is the path table's state for the peer.
    pub fn handle_timeout(&mut self, now: Instant, view: &PathView) {
        if now >= self.next_refresh {
            self.actions.push_back(PathAction::RefreshRelay);
            while self.next_refresh <= now {
                self.next_refresh += self.config.refresh_every;
            }
        }
        if now >= self.next_check {
            self.check(now, view);
            self.next_check = now + self.config.check_every;
        }
    }

    fn check(&mut self, now: Instant, view: &PathView) {
        let on_relay = view.on_relay;
        if let Some(session) = view.relay_ended {
            // Another session than the one renewed last: that renewal
            // worked, so this one goes at once; the same one still ended
            // waits (its renewal failed).
            if self.renewed.is_some_and(|(s, _)| s != session) {
                self.renewed = None;
                self.renew_wait = self.config.renew_first_retry;
            }
            let due = self.renewed.is_none_or(|(_, at)| now >= at);
            if on_relay && !self.repunching && due {
                if self.role.dialer {
                    info!(%session, "the server ended the relay session; asking for a new one");
                    self.renewed = Some((session, now + self.renew_wait));
                    self.renew_wait = (self.renew_wait * 2).min(self.config.repunch_max);
                    self.repunching = true;
                    self.actions.push_back(PathAction::Repunch {
                        punch: self.role.may_punch,
                        renews: Some(session),
                    });
                } else {
                    debug!(
                        "the server ended the relay session; the dialing side asks for a new one"
                    );
                }
            }
        }
        let dead = view
            .direct_silence
            .is_some_and(|s| s >= self.config.dead_after);
        // Without a relay, a dead direct path can only be punched again.
        let needs_direct = on_relay || dead;
        if dead {
            if view.has_relay {
                self.actions.push_back(PathAction::FallBack {
                    silent: view.direct_silence.unwrap_or_default(),
                });
                self.backoff = self.config.repunch_after_death;
                self.repunch_at = Some(now + self.backoff);
            } else if self.repunch_at.is_none() && !self.repunching {
                self.backoff = self.config.repunch_after_death;
                self.repunch_at = Some(now + self.backoff);
            }
        } else if on_relay && self.repunch_at.is_none() && !self.repunching {
            self.repunch_at = Some(now + self.backoff);
        }
        if let Some(t) = self.repunch_at {
            let allowed = self.role.dialer && self.role.may_punch;
            if allowed && needs_direct && !self.repunching && now >= t {
                self.repunch_at = None;
                self.repunching = true;
                self.actions.push_back(PathAction::Repunch {
                    punch: true,
                    renews: None,
                });
            }
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<PathAction> {
        self.actions.pop_front()
    }

    /// When [`PathMachine::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_check.min(self.next_refresh)
    }
}

#[cfg(test)]
mod tests;
