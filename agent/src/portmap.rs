//! Port mapping in the agent: ask the gateway (PCP, NAT-PMP, UPnP IGD; see
//! the `punch-portmap` crate) for a public port forwarded to the agent's
//! one UDP socket, in the background, and offer it to peers as a
//! [`CandidateKind::Mapped`] candidate.
//!
//! Start-up never waits for it: the first attempt runs beside
//! registration (at most [`PortMapSettings::budget`]), and the candidate
//! reaches the server in a `Candidates` update whenever the mapping
//! appears, moves, or the signaling channel is new.

use crate::Inner;
use punch_portmap::client::{Config, Handle, State};
pub use punch_portmap::{Mapping, Protocol};
use punch_protocol::signal::{Candidate, CandidateKind};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `--port-mapping`: ask the gateway for a port, or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PortMapping {
    /// Ask by PCP, NAT-PMP, then UPnP (the default).
    #[default]
    Auto,
    /// Send nothing to the gateway.
    Off,
}

impl std::str::FromStr for PortMapping {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(PortMapping::Auto),
            "off" => Ok(PortMapping::Off),
            _ => Err(format!("--port-mapping takes auto or off, not {s:?}")),
        }
    }
}

/// Port mapping settings of an agent.
#[derive(Clone, Debug)]
pub struct PortMapSettings {
    /// On or off.
    pub mode: PortMapping,
    /// Protocols to try, in order (all by default).
    pub protocols: Vec<Protocol>,
    /// The lifetime to ask for.
    pub lifetime: Duration,
    /// The gateway's PCP/NAT-PMP address, when not the default route's
    /// gateway on port 5351 (tests).
    pub gateway: Option<SocketAddr>,
    /// Longest one attempt through all protocols may take.
    pub budget: Duration,
}

impl Default for PortMapSettings {
    fn default() -> Self {
        PortMapSettings {
            mode: PortMapping::Auto,
            protocols: Protocol::ALL.to_vec(),
            lifetime: Duration::from_secs(7200),
            gateway: None,
            budget: Duration::from_secs(3),
        }
    }
}

/// Is `server` (`HOST:PORT`, maybe a URL) on this host? Then no NAT lies
/// between us and it, and asking a gateway is pointless.
pub(crate) fn on_this_host(server: &str) -> bool {
    let s = server.trim();
    let s = s
        .strip_prefix("wss://")
        .or_else(|| s.strip_prefix("ws://"))
        .unwrap_or(s);
    let host_port = s.split('/').next().unwrap_or(s);
    if let Ok(a) = host_port.parse::<SocketAddr>() {
        return a.ip().is_loopback();
    }
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The client configuration for our socket at `local`, or why none.
pub(crate) fn client_config(
    s: &PortMapSettings,
    local: SocketAddr,
    server: &str,
) -> Result<Config, &'static str> {
    if s.mode == PortMapping::Off {
        return Err("off");
    }
    if s.protocols.is_empty() {
        return Err("no protocols");
    }
    // A gateway on loopback (tests' fake gateways) is asked from loopback.
    let test_gateway = s.gateway.is_some_and(|g| g.ip().is_loopback());
    let local_ip = match local.ip() {
        _ if test_gateway => Some(Ipv4Addr::LOCALHOST),
        IpAddr::V4(v4) if v4.is_loopback() => return Err("bound to loopback"),
        IpAddr::V4(v4) if v4.is_unspecified() => None,
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) if v6.is_unspecified() => None,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if !v4.is_loopback() => Some(v4),
            _ => return Err("bound to IPv6 only"),
        },
    };
    if on_this_host(server) && s.gateway.is_none() {
        return Err("the server is on this host");
    }
    let mut cfg = Config::new(local.port());
    cfg.local_ip = local_ip;
    cfg.protocols = s.protocols.clone();
    cfg.lifetime = s.lifetime;
    cfg.budget = s.budget;
    if let Some(g) = s.gateway {
        if let IpAddr::V4(ip) = g.ip() {
            cfg.gateway = Some(ip);
            cfg.server_port = g.port();
            if ip.is_loopback() {
                cfg.local_ip = Some(Ipv4Addr::LOCALHOST);
            }
        }
    }
    Ok(cfg)
}

/// Starts the background mapping for the agent's socket, if enabled.
pub(crate) fn start(settings: &PortMapSettings, local: SocketAddr, server: &str) -> Option<Handle> {
    match client_config(settings, local, server) {
        Ok(cfg) => Some(punch_portmap::client::spawn(cfg)),
        Err(why) => {
            tracing::debug!("no port mapping: {why}");
            None
        }
    }
}

/// The mapped candidate, if a mapping is live.
pub(crate) fn candidate(state: &State) -> Option<Candidate> {
    state.mapping.map(|m| Candidate {
        addr: m.external,
        kind: CandidateKind::Mapped,
    })
}

/// Tells the server our candidates if the mapping changed since they were
/// last sent on this signaling channel (or never was on it: its `Hello`
/// may have been built before the mapping came).
pub(crate) fn sync(inner: &Inner) {
    let Some(state) = &inner.portmap_state else {
        return;
    };
    let now = (
        *inner.link.channel_changes.borrow(),
        state.borrow().mapping.map(|m| m.external),
    );
    if inner.link.control.lock().expect("not poisoned").is_none() {
        return;
    }
    let mut sent = inner.portmap_sent.lock().expect("not poisoned");
    if *sent == Some(now) {
        return;
    }
    let before = sent.replace(now);
    // Nothing to add or take back.
    if now.1.is_none() && before.is_none_or(|b| b.1.is_none()) {
        return;
    }
    tracing::debug!(mapped = ?now.1, "candidates to the server");
    inner.announce_candidates();
}

/// Keeps the server's view of our mapped candidate current: on every
/// mapping change and every new signaling channel.
pub(crate) async fn announce(inner: Arc<Inner>, mut state: tokio::sync::watch::Receiver<State>) {
    let mut channel = inner.link.channel_changes.subscribe();
    loop {
        state.borrow_and_update();
        channel.borrow_and_update();
        sync(&inner);
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = channel.changed() => if r.is_err() { return },
        }
    }
}

/// Before a connect: waits for the first mapping attempt, so that a fresh
/// agent's offer carries its mapping, and makes sure the server has it.
/// PCP and NAT-PMP answer (or fail: port unreachable) in a LAN round trip;
/// UPnP discovery proves absence only by a timeout, so it gets at most
/// `upnp_grace` after them. Never past `until` (a silent gateway costs a
/// connect at most that). A mapping that comes later still reaches peers
/// in later offers (re-punching, new connects).
pub(crate) async fn settle(inner: &Inner, until: Instant, upnp_grace: Duration) {
    let Some(state) = &inner.portmap_state else {
        return;
    };
    let protocols = &inner.config.port_mapping.protocols;
    let mut rx = state.clone();
    let until = tokio::time::Instant::from_std(until);
    let _ = tokio::time::timeout_at(until, rx.wait_for(|s| s.first_quick_done(protocols))).await;
    if !rx.borrow().first_attempt_done {
        let grace = until.min(tokio::time::Instant::now() + upnp_grace);
        let _ = tokio::time::timeout_at(grace, rx.wait_for(|s| s.first_attempt_done)).await;
    }
    sync(inner);
}

/// What `nat-check` says about port mapping.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NatCheckView {
    /// The gateway asked (the default route's).
    pub gateway: Option<String>,
    /// PCP granted a mapping.
    pub pcp: bool,
    /// NAT-PMP granted a mapping.
    pub nat_pmp: bool,
    /// UPnP IGD granted a mapping.
    pub upnp: bool,
    /// The first protocol that did (`pcp`, `nat-pmp`, `upnp`).
    pub protocol: Option<&'static str>,
    /// The public address it gave.
    pub mapped_addr: Option<String>,
    /// Why the others did not.
    pub errors: NatCheckErrors,
}

/// Per protocol: why it gave no mapping (`None` when it did or was not
/// tried).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NatCheckErrors {
    /// PCP's failure.
    pub pcp: Option<String>,
    /// NAT-PMP's failure.
    pub nat_pmp: Option<String>,
    /// UPnP's failure.
    pub upnp: Option<String>,
}

/// Asks the gateway with each protocol for a mapping of a fresh socket
/// (deleted again at once): `None` when port mapping is off or pointless
/// (a loopback socket or server).
pub async fn nat_check(
    s: &PortMapSettings,
    bind: SocketAddr,
    server: &str,
) -> Option<NatCheckView> {
    let sock = std::net::UdpSocket::bind(SocketAddr::new(bind.ip(), 0)).ok()?;
    let local = sock.local_addr().ok()?;
    let cfg = client_config(s, local, server).ok()?;
    let p = punch_portmap::client::probe(cfg).await;
    drop(sock);
    let mut v = NatCheckView {
        gateway: p.gateway.map(|g| g.to_string()),
        protocol: p.mapping.map(|m| m.protocol.as_str()),
        mapped_addr: p.mapping.map(|m| m.external.to_string()),
        ..NatCheckView::default()
    };
    for (proto, r) in &p.results {
        let (ok, err) = match proto {
            Protocol::Pcp => (&mut v.pcp, &mut v.errors.pcp),
            Protocol::NatPmp => (&mut v.nat_pmp, &mut v.errors.nat_pmp),
            Protocol::Upnp => (&mut v.upnp, &mut v.errors.upnp),
        };
        match r {
            Ok(_) => *ok = true,
            Err(e) => *err = Some(e.to_string()),
        }
    }
    Some(v)
}

/// The live mapping for status output: protocol, address, seconds until
/// renewal, gateway errors.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MappingView {
    /// `pcp`, `nat-pmp` or `upnp`; `None` without a mapping.
    pub protocol: Option<&'static str>,
    /// The public address peers reach us at.
    pub external: Option<String>,
    /// Seconds until the next renewal.
    pub renews_in_s: Option<u64>,
    /// Seconds until it expires unless renewed.
    pub expires_in_s: Option<u64>,
    /// Answers from the gateway refused, and refusals, so far.
    pub gateway_errors: u64,
    /// The last thing that went wrong.
    pub last_error: Option<String>,
}

impl MappingView {
    /// Builds the view of a state.
    pub fn of(s: &State) -> MappingView {
        let now = Instant::now();
        MappingView {
            protocol: s.mapping.map(|m| m.protocol.as_str()),
            external: s.mapping.map(|m| m.external.to_string()),
            renews_in_s: s
                .renews_at
                .map(|t| t.saturating_duration_since(now).as_secs()),
            expires_in_s: s
                .expires_at
                .map(|t| t.saturating_duration_since(now).as_secs()),
            gateway_errors: s.gateway_errors,
            last_error: s.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_are_on_this_host() {
        assert!(on_this_host("127.0.0.1:3478"));
        assert!(on_this_host("[::1]:3478"));
        assert!(on_this_host("localhost:3478"));
        assert!(on_this_host("wss://127.0.0.1:443/ws"));
        assert!(!on_this_host("203.0.113.1:3478"));
        assert!(!on_this_host("srv.example:3478"));
        assert!(!on_this_host("wss://srv.example/ws"));
    }

    #[test]
    fn off_and_loopback_sockets_map_nothing() {
        let s = PortMapSettings::default();
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert!(client_config(&s, any, "203.0.113.1:3478").is_ok());
        assert!(client_config(&s, "127.0.0.1:4000".parse().unwrap(), "203.0.113.1:3478").is_err());
        assert!(client_config(&s, any, "127.0.0.1:3478").is_err());
        let off = PortMapSettings {
            mode: PortMapping::Off,
            ..PortMapSettings::default()
        };
        assert!(client_config(&off, any, "203.0.113.1:3478").is_err());
        let c = client_config(&s, "10.1.0.10:4000".parse().unwrap(), "srv:1").unwrap();
        assert_eq!(c.local_ip, Some(Ipv4Addr::new(10, 1, 0, 10)));
        assert_eq!(c.internal_port, 4000);
    }
}
