//! Per-call connect options, and the dial policy they resolve to.

use crate::{AgentConfig, RelayMode};
use std::time::Duration;

/// Choices for one [`crate::Agent::connect_with`] call. Each one left
/// unset takes the agent's setting ([`AgentConfig`]); `timeout` has none,
/// so unset means the connect's own limits only (server answer, punch
/// deadline, QUIC handshake).
///
/// ```
/// use punch_agent::{ConnectOptions, RelayMode};
/// use std::time::Duration;
/// let opts = ConnectOptions::new()
///     .timeout(Duration::from_secs(8))
///     .relay(RelayMode::Never)
///     .punch_timeout(Duration::from_secs(6));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// The whole connect (introduction, punching, handshake) gives up with
    /// [`crate::AgentError::Timeout`] after this long.
    pub timeout: Option<Duration>,
    /// Relay policy for this connection (also later on: a forced relay
    /// never punches again, a relay that is off is never bound).
    pub relay: Option<RelayMode>,
    /// Give up punching after this long.
    pub punch_timeout: Option<Duration>,
    /// Start on the relay when punching has no path by then.
    pub relay_after: Option<Duration>,
}

impl ConnectOptions {
    /// Every choice the agent's.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limit for the whole connect.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Relay policy for this connection.
    pub fn relay(mut self, mode: RelayMode) -> Self {
        self.relay = Some(mode);
        self
    }

    /// Punch deadline for this connection.
    pub fn punch_timeout(mut self, d: Duration) -> Self {
        self.punch_timeout = Some(d);
        self
    }

    /// When to start on the relay while punching goes on.
    pub fn relay_after(mut self, d: Duration) -> Self {
        self.relay_after = Some(d);
        self
    }
}

/// What one connection's dialing and upkeep go by: the agent's config
/// with a call's options over it. The answering side uses the config's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DialPolicy {
    pub relay: RelayMode,
    pub punch_timeout: Duration,
    pub relay_after: Duration,
}

impl DialPolicy {
    /// The agent's own policy.
    pub fn of(config: &AgentConfig) -> Self {
        DialPolicy {
            relay: config.relay,
            punch_timeout: config.punch_timeout,
            relay_after: config.relay_after,
        }
    }

    /// `opts` over the agent's policy.
    pub fn with(config: &AgentConfig, opts: &ConnectOptions) -> Self {
        let base = Self::of(config);
        DialPolicy {
            relay: opts.relay.unwrap_or(base.relay),
            punch_timeout: opts.punch_timeout.unwrap_or(base.punch_timeout),
            relay_after: opts.relay_after.unwrap_or(base.relay_after),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_options_take_the_agents_settings_and_set_ones_win() {
        let mut cfg = AgentConfig::new("127.0.0.1:1", "00");
        cfg.relay = RelayMode::Auto;
        cfg.punch_timeout = Duration::from_secs(5);
        cfg.relay_after = Duration::from_secs(3);
        assert_eq!(
            DialPolicy::with(&cfg, &ConnectOptions::new()),
            DialPolicy::of(&cfg)
        );
        let p = DialPolicy::with(
            &cfg,
            &ConnectOptions::new()
                .relay(RelayMode::Force)
                .punch_timeout(Duration::from_secs(9)),
        );
        assert_eq!(p.relay, RelayMode::Force);
        assert_eq!(p.punch_timeout, Duration::from_secs(9));
        assert_eq!(p.relay_after, Duration::from_secs(3));
    }
}
