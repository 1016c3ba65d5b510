//! What we learn of our own address beside signaling: STUN candidates and
//! the NAT classification.

use super::channel::resolve;
use crate::Inner;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn, Instrument};

/// Our mapping as each configured STUN server sees it, asked in parallel
/// (at most one second in all, so registration is never held up long).
pub(super) async fn stun_candidates(
    inner: &Arc<Inner>,
    extra: Option<SocketAddr>,
) -> Vec<punch_protocol::signal::Candidate> {
    let mut asks = Vec::new();
    let servers = extra
        .map(|a| a.to_string())
        .into_iter()
        .chain(inner.config.stun.iter().cloned());
    for s in servers.take(8) {
        let inner = inner.clone();
        let s = s.clone();
        asks.push(tokio::spawn(async move {
            let addr = resolve(&s).await.ok()?;
            let mapped = inner.socket.stun_query(addr, Duration::from_secs(1)).await;
            match mapped {
                Some(m) => info!(stun = %s, mapped = %m, "STUN server reports our address"),
                None => warn!(stun = %s, "no answer from STUN server"),
            }
            mapped
        }));
    }
    let mut out: Vec<punch_protocol::signal::Candidate> = Vec::new();
    for a in asks {
        if let Ok(Some(addr)) = a.await {
            if !out.iter().any(|c| c.addr == addr) {
                out.push(punch_protocol::signal::Candidate {
                    addr,
                    kind: punch_protocol::signal::CandidateKind::Stun,
                });
            }
        }
    }
    out
}

/// Classifies our NAT once, in the background, and reports the class on
/// this and every later registration.
pub(super) fn classify_nat(inner: &Arc<Inner>) {
    if let Some(nat) = inner.nat.class() {
        inner.report_nat(nat);
        return;
    }
    if !inner.config.nat_check || !inner.nat.try_start() {
        return;
    }
    let Some(server) = *inner.link.server_addr.lock().expect("not poisoned") else {
        return;
    };
    let inner = inner.clone();
    tokio::spawn(
        async move {
            let bind = if server.is_ipv4() {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
            };
            // Set when the mapping's early report handed readiness to the
            // counter's advertisement.
            let advertising = std::sync::atomic::AtomicBool::new(false);
            let early = |r: &crate::natcheck::NatReport| {
                // The mapping is what the birthday method needs first.
                if let Some(nat) = r.class() {
                    if nat.mapping != punch_protocol::signal::NatBehaviour::Unknown {
                        inner.nat.set_class(nat, r.allocator.value);
                        inner.report_nat(nat);
                        // A counting NAT: say where the counter stands
                        // before a connect that waits for the mapping asks
                        // for its peer (readiness follows the advertisement).
                        if let punch_protocol::allocator::Allocator::Sequential { .. } =
                            r.allocator.value
                        {
                            inner.gather.counter.lock().expect("not poisoned").other =
                                r.other_addr.as_deref().and_then(|a| a.parse().ok());
                            advertising.store(true, std::sync::atomic::Ordering::SeqCst);
                            let inner = inner.clone();
                            tokio::spawn(
                                async move {
                                    crate::session::birthday::advertise_counter(&inner).await;
                                    inner.nat.set_ready();
                                }
                                .in_current_span(),
                            );
                            return;
                        }
                        inner.nat.set_ready();
                    }
                }
            };
            let result = crate::natcheck::check_with(server, bind, false, early).await;
            if !advertising.load(std::sync::atomic::Ordering::SeqCst) {
                inner.nat.set_ready();
            }
            match result {
                Ok(r) => match r.class() {
                    Some(nat) => {
                        info!(nat = %nat.label(), mapping = nat.mapping.as_str(), filtering = nat.filtering.as_str(), allocator = ?r.allocator.value, "NAT classified");
                        inner.nat.set_class(nat, r.allocator.value);
                        inner.report_nat(nat);
                        inner.events.emit(crate::AgentEvent::NatClassified {
                            nat,
                            allocator: r.allocator.value,
                        });
                    }
                    None => debug!("NAT not classified: no STUN answer"),
                },
                Err(e) => debug!("NAT check failed: {e}"),
            }
            // Without a class (perhaps the server was not up yet) the next
            // registration tries again.
            inner.nat.finish();
        }
        .in_current_span(),
    );
}
