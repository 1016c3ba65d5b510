//! How far the server's clock stands from ours, read from the `Date`
//! header of the TCP channel's WebSocket upgrade (the server's, or its
//! front's). The header counts whole seconds, so a skew within about a
//! second is noise.

use std::sync::Mutex;
use std::time::SystemTime;

/// The last reading.
#[derive(Debug, Default)]
pub(crate) struct ServerClock(Mutex<Option<i64>>);

impl ServerClock {
    /// Records an HTTP `Date` value seen now; an unparsable one is ignored.
    pub(crate) fn record_http_date(&self, date: &str) {
        let Ok(server) = httpdate::parse_http_date(date) else {
            return;
        };
        *self.0.lock().expect("not poisoned") = Some(skew_ms(server, SystemTime::now()));
    }

    /// Server minus local time, ms, if a reading was made.
    pub(crate) fn skew_ms(&self) -> Option<i64> {
        *self.0.lock().expect("not poisoned")
    }
}

fn skew_ms(server: SystemTime, local: SystemTime) -> i64 {
    match server.duration_since(local) {
        Ok(ahead) => ahead.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

impl crate::Agent {
    /// How far the server's clock is ahead of ours (negative: behind), in
    /// ms, as the `Date` of the TCP channel's upgrade said (whole seconds);
    /// `None` until a TCP channel opened.
    pub fn server_clock_skew_ms(&self) -> Option<i64> {
        self.inner.link.server_clock.skew_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_date_header_gives_the_signed_skew() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(skew_ms(t + Duration::from_secs(90), t), 90_000);
        assert_eq!(skew_ms(t, t + Duration::from_millis(1500)), -1500);
        let c = ServerClock::default();
        c.record_http_date("not a date");
        assert_eq!(c.skew_ms(), None);
        c.record_http_date(&httpdate::fmt_http_date(
            SystemTime::now() + Duration::from_secs(600),
        ));
        let s = c.skew_ms().unwrap();
        assert!((598_000..=600_000).contains(&s), "{s}");
    }
}
