//! The async port-mapping client: find the default gateway, ask it for a
//! UDP mapping with PCP, then NAT-PMP, then UPnP IGD, renew it, delete it.
//!
//! Every exchange is bounded: PCP and NAT-PMP resend at 250 ms, doubling,
//! within a per-protocol share of [`Config::budget`]; UPnP's discovery and
//! SOAP calls run under timeouts. Answers that fail validation are logged,
//! counted and ignored (a valid answer may still follow); a gateway that
//! never answers costs at most the budget.

use crate::lease::{self, Epoch};
use crate::natpmp::{self, NatPmpError};
use crate::pcp::{self, PcpError};
use crate::{Mapping, Protocol};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The SSDP multicast address UPnP discovery asks.
pub const SSDP_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900));

/// Port mapping settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our internal UDP port (the agent's one socket).
    pub internal_port: u16,
    /// Our LAN address; default: the source address the kernel picks
    /// towards the gateway.
    pub local_ip: Option<Ipv4Addr>,
    /// The gateway; default: the default route's gateway
    /// (`/proc/net/route`).
    pub gateway: Option<Ipv4Addr>,
    /// The gateway's PCP/NAT-PMP port (5351; tests use others).
    pub server_port: u16,
    /// The lifetime to ask for.
    pub lifetime: Duration,
    /// Protocols to try, in order.
    pub protocols: Vec<Protocol>,
    /// Longest one attempt through all protocols may take.
    pub budget: Duration,
    /// After an attempt found nothing, try again this much later.
    pub retry_after: Duration,
    /// How often the background task checks for a network change (another
    /// gateway or local address).
    pub network_check: Duration,
}

impl Config {
    /// Defaults for a mapping of `internal_port`: every protocol, two hours
    /// asked, 3 s per attempt.
    pub fn new(internal_port: u16) -> Config {
        Config {
            internal_port,
            local_ip: None,
            gateway: None,
            server_port: pcp::SERVER_PORT,
            lifetime: Duration::from_secs(7200),
            protocols: Protocol::ALL.to_vec(),
            budget: Duration::from_secs(3),
            retry_after: Duration::from_secs(300),
            network_check: Duration::from_secs(10),
        }
    }
}

/// Why an attempt with one protocol failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No default IPv4 route with a gateway.
    #[error("no default IPv4 gateway")]
    NoGateway,
    /// A socket operation failed.
    #[error("I/O: {0}")]
    Io(String),
    /// Nothing (valid) came back in time.
    #[error("no answer")]
    NoAnswer,
    /// The gateway's port is closed (ICMP port unreachable).
    #[error("no service (port unreachable)")]
    Unreachable,
    /// A PCP answer was refused.
    #[error("PCP: {0}")]
    Pcp(#[from] PcpError),
    /// A NAT-PMP answer was refused.
    #[error("NAT-PMP: {0}")]
    NatPmp(#[from] NatPmpError),
    /// UPnP discovery or a SOAP call failed.
    #[error("UPnP: {0}")]
    Upnp(String),
}

impl Error {
    /// Did the gateway answer at all (with garbage or a refusal)? Such
    /// errors are counted as gateway errors; silence is not.
    pub fn gateway_answered(&self) -> bool {
        matches!(self, Error::Pcp(_) | Error::NatPmp(_) | Error::Upnp(_))
    }
}

/// Talks to one gateway from one local address.
pub struct Client {
    cfg: Config,
    gateway: Ipv4Addr,
    local: Ipv4Addr,
    nonce: [u8; 12],
    epoch: Epoch,
    upnp: Option<igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>>,
    /// Answers refused (garbage, wrong nonce, errors) so far.
    pub errors: u64,
}

/// The local address the kernel uses towards `gw`.
fn local_towards(gw: Ipv4Addr) -> Result<Ipv4Addr, Error> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| Error::Io(e.to_string()))?;
    s.connect((gw, pcp::SERVER_PORT))
        .map_err(|e| Error::Io(format!("no route to the gateway {gw}: {e}")))?;
    match s.local_addr().map_err(|e| Error::Io(e.to_string()))?.ip() {
        IpAddr::V4(v4) if !v4.is_unspecified() => Ok(v4),
        other => Err(Error::Io(format!("unusable local address {other}"))),
    }
}

impl Client {
    /// Finds the gateway and our local address (no packets sent).
    pub fn new(cfg: Config) -> Result<Client, Error> {
        let gateway = match cfg.gateway {
            Some(g) => g,
            None => crate::route::default_gateway().ok_or(Error::NoGateway)?,
        };
        let local = match cfg.local_ip {
            Some(l) => l,
            None => local_towards(gateway)?,
        };
        Ok(Client {
            cfg,
            gateway,
            local,
            nonce: rand::random(),
            epoch: Epoch::default(),
            upnp: None,
            errors: 0,
        })
    }

    /// The gateway asked.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Our LAN address the mappings point at.
    pub fn local_ip(&self) -> Ipv4Addr {
        self.local
    }

    fn lifetime_secs(&self) -> u32 {
        self.cfg.lifetime.as_secs().clamp(1, u32::MAX as u64) as u32
    }

    /// Sends `req` to the gateway's PCP/NAT-PMP port, resending at 250 ms
    /// doubling, until `parse` accepts an answer or `budget` passes.
    /// Refused answers are counted and remembered; the last one is the
    /// error when nothing valid comes.
    async fn exchange<T, E: Into<Error>>(
        &mut self,
        req: &[u8],
        budget: Duration,
        mut parse: impl FnMut(&[u8]) -> Result<T, E>,
    ) -> Result<T, Error> {
        let sock = UdpSocket::bind((self.local, 0))
            .await
            .map_err(|e| Error::Io(e.to_string()))?;
        // Connected: only datagrams from the gateway's port are read.
        sock.connect((self.gateway, self.cfg.server_port))
            .await
            .map_err(|e| Error::Io(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + budget;
        let mut wait = Duration::from_millis(250);
        let mut last: Option<Error> = None;
        let mut buf = [0u8; pcp::MAX_MESSAGE + 4];
        loop {
            if let Err(e) = sock.send(req).await {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    return Err(last.unwrap_or(Error::Unreachable));
                }
                return Err(Error::Io(e.to_string()));
            }
            let resend = (tokio::time::Instant::now() + wait).min(deadline);
            loop {
                match tokio::time::timeout_at(resend, sock.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        return Err(last.unwrap_or(Error::Unreachable));
                    }
                    Ok(Err(e)) => return Err(Error::Io(e.to_string())),
                    Ok(Ok(n)) => match parse(&buf[..n]) {
                        Ok(v) => return Ok(v),
                        Err(e) => {
                            let e: Error = e.into();
                            self.errors += 1;
                            debug!(gateway = %self.gateway, "refused an answer: {e}");
                            last = Some(e);
                        }
                    },
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(last.unwrap_or(Error::NoAnswer));
            }
            wait *= 2;
        }
    }

    fn check_epoch(&mut self, epoch: u32, proto: Protocol) {
        if !self.epoch.observe(epoch, Instant::now()) {
            self.errors += 1;
            warn!(
                gateway = %self.gateway,
                epoch,
                "{}: the gateway's epoch shows it lost its mappings (restart); mapping again",
                proto.label()
            );
        }
    }

    /// Asks by PCP (`lifetime` 0 deletes).
    async fn pcp(&mut self, lifetime: u32, budget: Duration) -> Result<Mapping, Error> {
        let mut req =
            pcp::MapRequest::udp(self.nonce, self.local, self.cfg.internal_port, lifetime);
        if lifetime == 0 {
            req.suggested_port = 0;
        }
        let bytes = req.encode();
        let r = self
            .exchange(&bytes, budget, |b| req.parse_response(b))
            .await?;
        self.check_epoch(r.epoch, Protocol::Pcp);
        Ok(Mapping {
            protocol: Protocol::Pcp,
            external: r.external,
            internal: SocketAddr::from((self.local, self.cfg.internal_port)),
            lifetime: r.lifetime,
        })
    }

    /// Asks by NAT-PMP: the external address, then the mapping (`lifetime`
    /// 0 deletes, and skips the address).
    async fn natpmp(&mut self, lifetime: u32, budget: Duration) -> Result<Mapping, Error> {
        let start = tokio::time::Instant::now();
        let ip = if lifetime == 0 {
            Ipv4Addr::UNSPECIFIED
        } else {
            let r = self
                .exchange(
                    &natpmp::external_request(),
                    budget / 2,
                    natpmp::parse_external,
                )
                .await?;
            self.check_epoch(r.epoch, Protocol::NatPmp);
            r.ip
        };
        let port = self.cfg.internal_port;
        let suggested = if lifetime == 0 { 0 } else { port };
        let left = budget
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        let r = self
            .exchange(&natpmp::map_request(port, suggested, lifetime), left, |b| {
                natpmp::parse_map(b, port, lifetime == 0)
            })
            .await?;
        self.check_epoch(r.epoch, Protocol::NatPmp);
        Ok(Mapping {
            protocol: Protocol::NatPmp,
            external: SocketAddr::from((ip, r.external_port)),
            internal: SocketAddr::from((self.local, port)),
            lifetime: r.lifetime,
        })
    }

    /// Discovers the IGD by SSDP (once; kept for renewals) and adds the
    /// mapping, on our port if free, else on any port the gateway picks.
    async fn upnp(&mut self, lifetime: u32, budget: Duration) -> Result<Mapping, Error> {
        use igd_next::PortMappingProtocol::UDP;
        let deadline = tokio::time::Instant::now() + budget;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let timed_out = || Error::Upnp("no answer in time".into());
        if self.upnp.is_none() {
            let opts = igd_next::SearchOptions {
                bind_addr: SocketAddr::from((self.local, 0)),
                broadcast_address: SSDP_ADDR,
                timeout: Some(left()),
                single_search_timeout: Some(left()),
            };
            let gw = match tokio::time::timeout(left(), igd_next::aio::tokio::search_gateway(opts))
                .await
            {
                Err(_) | Ok(Err(igd_next::SearchError::NoResponseWithinTimeout)) => {
                    return Err(Error::NoAnswer)
                }
                Ok(Err(e)) => return Err(Error::Upnp(format!("discovery: {e}"))),
                Ok(Ok(gw)) => gw,
            };
            // Anybody on the LAN may answer SSDP: only the gateway counts.
            if gw.addr.ip() != IpAddr::V4(self.gateway) {
                return Err(Error::Upnp(format!(
                    "an IGD at {} answered, but the gateway is {}",
                    gw.addr, self.gateway
                )));
            }
            self.upnp = Some(gw);
        }
        let gw = self.upnp.clone().expect("set above");
        let internal = SocketAddr::from((self.local, self.cfg.internal_port));
        let ip = match tokio::time::timeout(left(), gw.get_external_ip()).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => return Err(Error::Upnp(format!("GetExternalIPAddress: {e}"))),
            Ok(Ok(ip)) => ip,
        };
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(Error::Upnp(format!("unusable external address {ip}")));
        }
        let want = self.cfg.internal_port;
        let port =
            match tokio::time::timeout(left(), gw.add_port(UDP, want, internal, lifetime, "punch"))
                .await
            {
                Err(_) => return Err(timed_out()),
                Ok(Ok(())) => want,
                Ok(Err(e)) => {
                    debug!("UPnP AddPortMapping on port {want}: {e}; asking for any port");
                    match tokio::time::timeout(
                        left(),
                        gw.add_any_port(UDP, internal, lifetime, "punch"),
                    )
                    .await
                    {
                        Err(_) => return Err(timed_out()),
                        Ok(Err(e)) => return Err(Error::Upnp(format!("AddAnyPortMapping: {e}"))),
                        Ok(Ok(0)) => return Err(Error::Upnp("gateway gave port 0".into())),
                        Ok(Ok(p)) => p,
                    }
                }
            };
        Ok(Mapping {
            protocol: Protocol::Upnp,
            external: SocketAddr::new(ip, port),
            internal,
            lifetime: Duration::from_secs(lifetime as u64),
        })
    }

    /// Asks for (or renews) the mapping with one protocol within `budget`.
    pub async fn map_with(&mut self, proto: Protocol, budget: Duration) -> Result<Mapping, Error> {
        let lifetime = self.lifetime_secs();
        let r = match proto {
            Protocol::Pcp => self.pcp(lifetime, budget).await,
            Protocol::NatPmp => self.natpmp(lifetime, budget).await,
            Protocol::Upnp => self.upnp(lifetime, budget).await,
        };
        if let Err(e) = &r {
            if matches!(e, Error::Upnp(_)) {
                self.errors += 1;
                // Discover again next time.
                self.upnp = None;
            }
        }
        match r {
            Ok(m) if m.lifetime.is_zero() && proto != Protocol::Upnp => Err(match proto {
                Protocol::Pcp => Error::Pcp(PcpError::BadExternal(m.external)),
                _ => Error::NatPmp(NatPmpError::BadExternal),
            }),
            other => other,
        }
    }

    /// Tries the configured protocols in order within [`Config::budget`]:
    /// the first mapping, and what each protocol tried said.
    pub async fn map(&mut self) -> (Option<Mapping>, Vec<(Protocol, Error)>) {
        self.map_progress(|_| {}).await
    }

    /// [`Client::map`], calling `step` with each protocol as it finishes
    /// without a mapping.
    pub async fn map_progress(
        &mut self,
        mut step: impl FnMut(Protocol),
    ) -> (Option<Mapping>, Vec<(Protocol, Error)>) {
        let deadline = tokio::time::Instant::now() + self.cfg.budget;
        let mut failures = Vec::new();
        let protos = self.cfg.protocols.clone();
        for (i, p) in protos.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // PCP and NAT-PMP share the gateway's port 5351 (RFC 6887): when
            // it is closed for one it is closed for the other, and NAT-PMP's
            // silence would only cost its share of the budget.
            if *p == Protocol::NatPmp
                && failures
                    .iter()
                    .any(|(q, e)| *q == Protocol::Pcp && *e == Error::Unreachable)
            {
                debug!("no NAT-PMP: the PCP port was unreachable");
                failures.push((*p, Error::Unreachable));
                step(*p);
                continue;
            }
            // PCP and NAT-PMP a quarter each; UPnP (several round trips)
            // what is left.
            let share = if *p == Protocol::Upnp || i + 1 == protos.len() {
                left
            } else {
                (self.cfg.budget / 4).min(left)
            };
            match self.map_with(*p, share).await {
                Ok(m) => return (Some(m), failures),
                Err(e) => {
                    debug!(protocol = p.label(), "no mapping: {e}");
                    failures.push((*p, e));
                    step(*p);
                }
            }
        }
        (None, failures)
    }

    /// Deletes a mapping (best effort, within `budget`).
    pub async fn delete(&mut self, m: &Mapping, budget: Duration) -> Result<(), Error> {
        match m.protocol {
            Protocol::Pcp => self.pcp(0, budget).await.map(|_| ()),
            Protocol::NatPmp => self.natpmp(0, budget).await.map(|_| ()),
            Protocol::Upnp => {
                let Some(gw) = self.upnp.clone() else {
                    return Err(Error::Upnp("gateway not discovered".into()));
                };
                match tokio::time::timeout(
                    budget,
                    gw.remove_port(igd_next::PortMappingProtocol::UDP, m.external.port()),
                )
                .await
                {
                    Err(_) => Err(Error::Upnp("no answer in time".into())),
                    Ok(Err(e)) => Err(Error::Upnp(format!("DeletePortMapping: {e}"))),
                    Ok(Ok(())) => Ok(()),
                }
            }
        }
    }
}

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
