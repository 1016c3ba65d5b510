//! The mapping kept in the background: probing every protocol once (for
//! `nat-check`), and the task that holds a mapping, renews it before its
//! lease ends, follows a gateway that restarted or a network that changed,
//! and deletes it when stopped.

use super::*;

/// What `nat-check` reports: which protocols answered, and the mapping.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// The gateway asked, if one was found.
    pub gateway: Option<Ipv4Addr>,
    /// Per protocol tried: the mapping it gave, or why not.
    pub results: Vec<(Protocol, Result<Mapping, Error>)>,
    /// The first mapping (in protocol order).
    pub mapping: Option<Mapping>,
}

impl Probe {
    /// The protocols that granted a mapping.
    pub fn answered(&self) -> Vec<Protocol> {
        self.results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(p, _)| *p)
            .collect()
    }
}

/// Asks with every configured protocol in turn (each within the budget's
/// share), deleting each mapping again at once: for `nat-check`.
pub async fn probe(cfg: Config) -> Probe {
    let mut out = Probe::default();
    let budget = cfg.budget;
    let protos = cfg.protocols.clone();
    let mut c = match Client::new(cfg) {
        Ok(c) => c,
        Err(e) => {
            out.results = protos.iter().map(|p| (*p, Err(e.clone()))).collect();
            return out;
        }
    };
    out.gateway = Some(c.gateway());
    for p in protos {
        let share = if p == Protocol::Upnp {
            budget / 2
        } else {
            budget / 4
        };
        let r = c.map_with(p, share).await;
        if let Ok(m) = &r {
            if out.mapping.is_none() {
                out.mapping = Some(*m);
            }
            let _ = c.delete(m, Duration::from_secs(1)).await;
        }
        out.results.push((p, r));
    }
    out
}

/// What the background task knows now.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The live mapping.
    pub mapping: Option<Mapping>,
    /// When it will be renewed.
    pub renews_at: Option<Instant>,
    /// When it expires unless renewed.
    pub expires_at: Option<Instant>,
    /// Answers refused and requests the gateway refused, so far.
    pub gateway_errors: u64,
    /// The last thing that went wrong, for status output.
    pub last_error: Option<String>,
    /// True once the first attempt has finished (with or without mapping).
    pub first_attempt_done: bool,
    /// The protocols the first attempt tried without a mapping, so far.
    pub failed_first: Vec<Protocol>,
}

impl State {
    /// The first attempt is over, or only UPnP (discovery by SSDP, whose
    /// silence proves nothing until a timeout) is left.
    pub fn first_quick_done(&self, protocols: &[Protocol]) -> bool {
        self.first_attempt_done
            || protocols
                .iter()
                .filter(|p| **p != Protocol::Upnp)
                .all(|p| self.failed_first.contains(p))
    }

    /// A mapping is live: it renews at `renew` and expires at `expires`.
    fn set_mapping(&mut self, m: Mapping, renew: Instant, expires: Instant) {
        self.mapping = Some(m);
        self.renews_at = Some(renew);
        self.expires_at = Some(expires);
    }

    /// No mapping is live.
    fn clear_mapping(&mut self) {
        self.mapping = None;
        self.renews_at = None;
        self.expires_at = None;
    }
}

/// A running port-mapping task.
pub struct Handle {
    state: watch::Receiver<State>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Handle {
    /// Watches the task's state.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Deletes the mapping (if any) and ends the task, waiting at most
    /// `limit`.
    pub async fn shutdown(&mut self, limit: Duration) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(limit, t).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Keeps a mapping for `cfg.internal_port` in the background: maps (in at
/// most [`Config::budget`]), renews at half its lifetime, maps again when
/// the network changes or the gateway forgets it, and deletes it on
/// [`Handle::shutdown`]. Never blocks the caller.
pub fn spawn(cfg: Config) -> Handle {
    let (state_tx, state) = watch::channel(State::default());
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(cfg, state_tx, stop_rx));
    Handle {
        state,
        stop,
        task: Some(task),
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Our gateway and local address now, to notice network changes.
fn network_now(cfg: &Config) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let gw = match cfg.gateway {
        Some(g) => g,
        None => crate::route::default_gateway()?,
    };
    let local = match cfg.local_ip {
        Some(l) => l,
        None => local_towards(gw).ok()?,
    };
    Some((gw, local))
}

async fn run(cfg: Config, state: watch::Sender<State>, mut stop: watch::Receiver<bool>) {
    let mut errors_before = 0u64;
    loop {
        let net = network_now(&cfg);
        let mut client = match Client::new(cfg.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                debug!("port mapping: {e}");
                state.send_modify(|s| {
                    s.clear_mapping();
                    s.last_error = Some(e.to_string());
                    s.first_attempt_done = true;
                });
                None
            }
        };
        let mut mapping = None;
        if let Some(c) = client.as_mut() {
            let (m, failures) = tokio::select! {
                r = c.map_progress(|p| {
                    state.send_modify(|s| s.failed_first.push(p));
                }) => r,
                _ = stopped(&mut stop) => return,
            };
            for (p, e) in &failures {
                if e.gateway_answered() {
                    warn!(gateway = %c.gateway(), "port mapping via {}: {e}", p.label());
                }
            }
            let errors = c.errors;
            mapping = m;
            state.send_modify(|s| {
                s.gateway_errors += errors;
                // The mapping with the "done" flag, in one change: a
                // watcher that sees the attempt done sees its result.
                if let Some(m) = mapping {
                    let now = Instant::now();
                    s.set_mapping(m, lease::renew_at(now, m.lifetime), now + m.lifetime);
                }
                s.first_attempt_done = true;
                if mapping.is_none() {
                    s.clear_mapping();
                    s.last_error = failures
                        .iter()
                        .map(|(p, e)| format!("{}: {e}", p.label()))
                        .reduce(|a, b| format!("{a}; {b}"));
                }
            });
            errors_before = errors;
            if mapping.is_none() {
                info!(
                    gateway = %c.gateway(),
                    "no port mapping from the gateway (tried {})",
                    cfg.protocols.iter().map(|p| p.label()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        if let (Some(c), Some(m)) = (client.as_mut(), mapping) {
            if keep(c, m, &cfg, &state, &mut stop, net, &mut errors_before).await {
                return;
            }
            continue;
        }
        // Nothing: look again later, or at once when the network changes.
        let until = tokio::time::Instant::now() + cfg.retry_after;
        loop {
            let next = (tokio::time::Instant::now() + cfg.network_check).min(until);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stopped(&mut stop) => return,
            }
            if tokio::time::Instant::now() >= until || network_now(&cfg) != net {
                break;
            }
        }
    }
}

/// Renews `m` until told to stop (deletes it; returns true) or the mapping
/// is lost or the network changed (returns false: map again).
async fn keep(
    c: &mut Client,
    mut m: Mapping,
    cfg: &Config,
    state: &watch::Sender<State>,
    stop: &mut watch::Receiver<bool>,
    net: Option<(Ipv4Addr, Ipv4Addr)>,
    errors_before: &mut u64,
) -> bool {
    let mut granted = Instant::now();
    let mut renew = lease::renew_at(granted, m.lifetime);
    let publish = |m: &Mapping, renew: Instant, expires: Instant| {
        state.send_modify(|s| s.set_mapping(*m, renew, expires));
    };
    info!(
        "port mapping via {}: {}, renews in {} s",
        m.protocol.label(),
        m.external,
        renew.saturating_duration_since(granted).as_secs()
    );
    publish(&m, renew, granted + m.lifetime);
    loop {
        let next_check = Instant::now() + cfg.network_check;
        let wake = renew.min(next_check);
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stopped(stop) => {
                match c.delete(&m, Duration::from_secs(1)).await {
                    Ok(()) => info!("port mapping via {} deleted: {}", m.protocol.label(), m.external),
                    Err(e) => warn!("deleting the port mapping via {}: {e}", m.protocol.label()),
                }
                state.send_modify(State::clear_mapping);
                return true;
            }
        }
        if network_now(cfg) != net {
            info!("network changed: mapping again");
            let _ = c.delete(&m, Duration::from_millis(500)).await;
            state.send_modify(State::clear_mapping);
            return false;
        }
        let now = Instant::now();
        if now < renew {
            continue;
        }
        let expires = granted + m.lifetime;
        let r = tokio::select! {
            r = c.map_with(m.protocol, cfg.budget) => r,
            _ = stopped(stop) => Err(Error::NoAnswer),
        };
        let new_errors = c.errors - *errors_before;
        *errors_before = c.errors;
        state.send_modify(|s| s.gateway_errors += new_errors);
        match r {
            Ok(n) => {
                if n.external != m.external {
                    info!(old = %m.external, new = %n.external, "the gateway moved our mapping");
                }
                m = n;
                granted = Instant::now();
                renew = lease::renew_at(granted, m.lifetime);
                debug!(
                    "port mapping via {} renewed: {}, renews in {} s",
                    m.protocol.label(),
                    m.external,
                    renew.saturating_duration_since(granted).as_secs()
                );
                publish(&m, renew, granted + m.lifetime);
            }
            Err(e) => {
                if *stop.borrow() {
                    continue;
                }
                warn!("renewing the port mapping via {}: {e}", m.protocol.label());
                state.send_modify(|s| s.last_error = Some(e.to_string()));
                match lease::retry_at(Instant::now(), expires) {
                    Some(t) => {
                        renew = t;
                        state.send_modify(|s| s.renews_at = Some(t));
                    }
                    None => {
                        info!("port mapping {} expired", m.external);
                        state.send_modify(State::clear_mapping);
                        return false;
                    }
                }
            }
        }
    }
}
