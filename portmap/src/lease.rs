//! When to renew a mapping, and whether the gateway lost its state, without
//! I/O: functions of the granted lifetime, the gateway's epoch and time.

use std::time::{Duration, Instant};

/// Shortest lifetime we act on; anything shorter is renewed at this pace.
pub const MIN_RENEW: Duration = Duration::from_secs(1);

/// When to renew a mapping granted at `at` for `lifetime`: at half its
/// life (RFC 6886 §3.3 and RFC 6887 §11.2.1 renew at 1/2), never sooner
/// than [`MIN_RENEW`] from `at`.
pub fn renew_at(at: Instant, lifetime: Duration) -> Instant {
    at + (lifetime / 2).max(MIN_RENEW)
}

/// After a failed renewal at `now`, when to try again: half of what is left
/// of the lifetime, at least [`MIN_RENEW`]; `None` once the mapping has
/// expired (`now >= expires`).
pub fn retry_at(now: Instant, expires: Instant) -> Option<Instant> {
    if now >= expires {
        return None;
    }
    Some(now + ((expires - now) / 2).max(MIN_RENEW))
}

/// Follows a gateway's epoch (seconds since its mapping table was last
/// reset) across answers: RFC 6887 §8.5 and RFC 6886 §3.6. An epoch that
/// went back, or moved much unlike our own clock, means the gateway
/// restarted and lost its mappings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epoch {
    last: Option<(u32, Instant)>,
}

impl Epoch {
    /// Records an answer's epoch received at `now`; false when it shows
    /// the gateway lost its state since the previous answer.
    pub fn observe(&mut self, epoch: u32, now: Instant) -> bool {
        let ok = match self.last {
            None => true,
            Some((prev, prev_at)) => {
                if epoch.wrapping_add(1) < prev {
                    false
                } else {
                    let client = now.saturating_duration_since(prev_at).as_secs();
                    let server = epoch.saturating_sub(prev) as u64;
                    !(client + 2 < server.saturating_sub(server / 16)
                        || server + 2 < client.saturating_sub(client / 16))
                }
            }
        };
        self.last = Some((epoch, now));
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half() {
        let t = Instant::now();
        assert_eq!(
            renew_at(t, Duration::from_secs(120)),
            t + Duration::from_secs(60)
        );
        assert_eq!(renew_at(t, Duration::from_secs(1)), t + MIN_RENEW);
        let exp = t + Duration::from_secs(10);
        assert_eq!(retry_at(t, exp), Some(t + Duration::from_secs(5)));
        assert_eq!(retry_at(exp, exp), None);
        assert_eq!(
            retry_at(exp - Duration::from_millis(100), exp),
            Some(exp - Duration::from_millis(100) + MIN_RENEW)
        );
    }

    #[test]
    fn epoch_going_back_is_a_restart() {
        let t = Instant::now();
        let mut e = Epoch::default();
        assert!(e.observe(1000, t));
        assert!(e.observe(1060, t + Duration::from_secs(60)));
        assert!(!e.observe(5, t + Duration::from_secs(61)));
        assert!(e.observe(35, t + Duration::from_secs(91)));
        // Jumped far ahead of our clock.
        assert!(!e.observe(100_000, t + Duration::from_secs(92)));
        assert!(e.observe(100_000, t + Duration::from_secs(92)));
    }
}
