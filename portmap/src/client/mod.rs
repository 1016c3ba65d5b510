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

mod upkeep;
pub use upkeep::{probe, spawn, Handle, Probe, State};
