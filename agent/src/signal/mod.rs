//! The signaling client: connect, register, dispatch, reconnect.

mod channel;
mod dispatch;
mod link;
mod nat;
mod quic;
mod register;
mod ws;

pub(crate) use link::ServerLink;

pub use quic::server_silent;

use crate::{AgentError, Inner, Status};
use channel::{connect_once, Channel};
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, info_span, warn, Instrument};

/// Delay before reconnect attempt `attempt` (0-based): exponential from
/// 250 ms, capped at 10 s, with ±50 % jitter so a fleet does not reconnect
/// in lockstep after a server restart.
pub fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    let jitter = rand::thread_rng().gen_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// Runs the signaling connection for the agent's lifetime.
pub(crate) async fn run(inner: Arc<Inner>) {
    let span = info_span!("signal", worker = %inner.worker_id);
    run_loop(inner.clone()).instrument(span).await;
    inner.signal_stopped.send_replace(true);
}

async fn run_loop(inner: Arc<Inner>) {
    let mut attempt = 0u32;
    loop {
        match connect_once(&inner).await {
            Ok((chan, observed)) => {
                attempt = 0;
                let transport = chan.transport();
                info!(%observed, server = %current_server(&inner), transport = transport.as_str(), "registered");
                let end = match chan {
                    Channel::Quic { conn, send, recv } => {
                        quic::session(&inner, &conn, send, recv, observed).await
                    }
                    Channel::Ws(ws) => ws::ws_session(&inner, *ws, observed).await,
                };
                *inner.link.control.lock().expect("not poisoned") = None;
                inner.socket.set_tcp_out(None);
                *inner.link.transport.lock().expect("not poisoned") = None;
                inner.link.pending.lock().expect("not poisoned").clear();
                if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let planned = matches!(end, SessionEnd::Renew(_));
                let reason = end.to_string();
                if planned {
                    info!("{reason}; reconnecting");
                } else {
                    warn!("signaling connection lost: {reason}; reconnecting");
                }
                inner.set_status(Status::Connecting(Some(AgentError::ServerUnreachable {
                    server: current_server(&inner),
                    reason,
                })));
                if !planned && next_server(&inner) {
                    info!(server = %current_server(&inner), "trying the next server");
                }
                if !planned {
                    // Immediately, but jittered so a fleet spreads out.
                    let pause = Duration::from_millis(rand::thread_rng().gen_range(0..200));
                    tokio::time::sleep(pause).await;
                }
                continue;
            }
            Err(_) if inner.closing.load(std::sync::atomic::Ordering::SeqCst) => return,
            Err(e) if e.is_fatal() => {
                warn!("giving up: {e}");
                inner.set_status(Status::Failed(e));
                return;
            }
            Err(e) => {
                // Through the whole list quickly, then back off per round.
                let n = inner.config.servers().len().max(1) as u32;
                attempt = attempt.saturating_add(1);
                let delay = if !attempt.is_multiple_of(n) {
                    Duration::from_millis(50)
                } else {
                    backoff(attempt / n - 1)
                };
                // Said out loud at the 1st, 2nd, 4th, 8th … failure: a
                // wrong certificate or fingerprint must not stay silent,
                // nor fill the log while the server is away.
                if attempt.is_power_of_two() {
                    warn!("registration failed (attempt {attempt}): {e}; retrying in {delay:?}");
                } else {
                    debug!("registration failed (attempt {attempt}): {e}; retrying in {delay:?}");
                }
                inner.set_status(Status::Connecting(Some(e)));
                next_server(&inner);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// How a registered session ended.
enum SessionEnd {
    /// On purpose: a fresh channel follows at once (UDP answers again, or
    /// the WebSocket reached its maximum age).
    Renew(String),
    /// The channel failed.
    Lost(String),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Renew(s) | SessionEnd::Lost(s) => f.write_str(s),
        }
    }
}

/// The server in use: one of `--server`'s list.
pub(crate) fn current_server(inner: &Inner) -> String {
    let all = inner.config.servers();
    if all.is_empty() {
        return inner.config.server.clone();
    }
    let i = inner
        .link
        .server_idx
        .load(std::sync::atomic::Ordering::Relaxed);
    all[i % all.len()].clone()
}

/// Moves to the next server of the list; false when there is only one.
fn next_server(inner: &Inner) -> bool {
    if inner.config.servers().len() < 2 {
        return false;
    }
    inner
        .link
        .server_idx
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    true
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d >= Duration::from_millis(125), "{attempt}: {d:?}");
            assert!(d <= Duration::from_millis(15_000), "{attempt}: {d:?}");
        }
        assert!(backoff(0) < Duration::from_millis(400));
        assert!(backoff(10) >= Duration::from_secs(5));
    }
}
