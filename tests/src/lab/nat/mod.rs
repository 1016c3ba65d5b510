//! NAT types of the lab: what each one is (RFC 4787 terms), the nftables
//! rules that make a namespace behave as it, and what theory predicts for a
//! pair of them.

use std::fmt;
use std::str::FromStr;

/// A site's NAT behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatType {
    /// A public host, no NAT.
    None,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Endpoint-dependent mapping (random ports), address-and-port-dependent filtering.
    Symmetric,
    /// Google Cloud NAT as created by default: endpoint-dependent mapping
    /// from a fixed block of 64 ports per host, APDF, no hairpin, 30 s UDP.
    Cloudnat,
    /// Cloud NAT with Endpoint-Independent Mapping on (still APDF).
    CloudnatEim,
    /// A home NAT (EIM, APDF) behind a carrier NAT (EIM, APDF).
    Cgnat,
    /// A network that lets no UDP out or in at all (dropped in both
    /// directions at the NAT), while TCP leaves through an ordinary
    /// port-restricted-like NAT.
    UdpBlocked,
    /// A network with no route out for its hosts except a real HTTP CONNECT
    /// proxy (tinyproxy) on the gateway: the gateway forwards nothing.
    ProxyOnly,
    /// Cloud NAT's default block of 64 ports a host, taken in order (a
    /// counter through the block, `numgen inc`), APDF, 30 s UDP.
    CloudnatInorder,
    /// A sequential symmetric NAT: every new mapping takes the next port of
    /// one counter over 30000-32047 (`numgen inc`), APDF.
    Seq,
    /// [`NatType::Seq`] with a stride of 2 (30000, 30002, …): NATs that
    /// hand ports out in pairs or skip every other port.
    Seq2,
    /// Cloud NAT with dynamic port allocation as a host starts out: its
    /// minimum of 32 ports (a 32-port block, picked at random), mapping
    /// per destination, APDF, 30 s UDP. (The growth of the block to 64,
    /// 128, … once a host uses them all is not modelled: nftables cannot
    /// count a host's mappings.)
    CloudnatDpa,
}

/// A real port-mapping daemon (miniupnpd) on a site's gateway, and the
/// protocols it answers. miniupnpd 2.3.1 has one switch for PCP and
/// NAT-PMP together (`enable_natpmp`): to offer one of them alone, the
/// gateway's firewall drops the other's requests (PCP is version 2 in the
/// first byte of the payload to port 5351, NAT-PMP version 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PortMapDaemon {
    /// PCP (RFC 6887).
    pub pcp: bool,
    /// NAT-PMP (RFC 6886).
    pub nat_pmp: bool,
    /// UPnP IGD (SSDP and SOAP).
    pub upnp: bool,
}

impl PortMapDaemon {
    /// All three protocols (`+upnp`).
    pub const ALL: PortMapDaemon = PortMapDaemon {
        pcp: true,
        nat_pmp: true,
        upnp: true,
    };

    /// The suffix on the command line.
    pub fn suffix(self) -> &'static str {
        match (self.pcp, self.nat_pmp, self.upnp) {
            (true, true, true) => "+upnp",
            (true, false, false) => "+pcp",
            (false, true, false) => "+nat-pmp",
            (false, false, true) => "+igd",
            _ => "+portmap",
        }
    }
}

/// A site as named on the command line: a NAT type, with a suffix a
/// port-mapping daemon on its gateway: `symmetric+upnp` (PCP, NAT-PMP
/// and UPnP IGD), `+pcp`, `+nat-pmp` or `+igd` (one protocol); with
/// `+v6` the site is dual-stack: its hosts also have global IPv6
/// addresses (2001:db8::/32) behind a stateful firewall on the gateway
/// (the common home and mobile setup), while IPv4 goes through the NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SiteType {
    /// The NAT.
    pub nat: NatType,
    /// The daemon, if any.
    pub port_mapping: Option<PortMapDaemon>,
    /// Dual-stack (`+v6`).
    pub ipv6: bool,
}

impl From<NatType> for SiteType {
    fn from(nat: NatType) -> Self {
        SiteType {
            nat,
            port_mapping: None,
            ipv6: false,
        }
    }
}

impl fmt::Display for SiteType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.nat.name())?;
        if let Some(d) = self.port_mapping {
            f.write_str(d.suffix())?;
        }
        if self.ipv6 {
            f.write_str("+v6")?;
        }
        Ok(())
    }
}

impl FromStr for SiteType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split('+');
        let nat: NatType = parts.next().unwrap_or_default().parse()?;
        let mut site = SiteType::from(nat);
        for x in parts {
            let daemon = match x {
                "v6" => {
                    if site.ipv6 {
                        return Err(format!("{s}: +v6 twice"));
                    }
                    site.ipv6 = true;
                    continue;
                }
                "upnp" => PortMapDaemon::ALL,
                "pcp" => PortMapDaemon {
                    pcp: true,
                    nat_pmp: false,
                    upnp: false,
                },
                "nat-pmp" => PortMapDaemon {
                    pcp: false,
                    nat_pmp: true,
                    upnp: false,
                },
                "igd" => PortMapDaemon {
                    pcp: false,
                    nat_pmp: false,
                    upnp: true,
                },
                x => {
                    return Err(format!(
                        "unknown site option +{x}: +upnp (PCP, NAT-PMP and UPnP IGD), +pcp, +nat-pmp, +igd or +v6 (dual-stack)"
                    ))
                }
            };
            if site.port_mapping.replace(daemon).is_some() {
                return Err(format!("{s}: one port-mapping daemon a site"));
            }
        }
        if site.port_mapping.is_some() && !nat.takes_port_mapping() {
            return Err(format!(
                "{nat} cannot run a port-mapping daemon (only one-layer NATs with UDP can)"
            ));
        }
        if site.ipv6 && !nat.has_udp() {
            return Err(format!(
                "{nat} cannot be dual-stack (+v6 is for sites that pass UDP)"
            ));
        }
        Ok(site)
    }
}

/// Parses a comma-separated list of sites: [`parse_types`]' names and
/// groups, each name maybe with a port-mapping suffix
/// (`symmetric+upnp,symmetric,port-restricted`).
pub fn parse_sites(list: &str) -> Result<Vec<SiteType>, String> {
    parse_list(list, |s| {
        Ok(if s == "dual-stack" {
            // IPv6 beside IPv4 behind a carrier NAT or a symmetric one.
            ["cgnat+v6", "symmetric+v6"]
                .iter()
                .map(|x| x.parse())
                .collect::<Result<_, _>>()?
        } else if s.contains('+') {
            vec![s.parse()?]
        } else {
            parse_types(s)?.into_iter().map(SiteType::from).collect()
        })
    })
}

/// The items of a comma-separated list, each name expanded by `group`,
/// in order, without repeats; an empty list is an error.
fn parse_list<T: PartialEq>(
    list: &str,
    group: impl Fn(&str) -> Result<Vec<T>, String>,
) -> Result<Vec<T>, String> {
    let mut v = Vec::new();
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        for t in group(s)? {
            if !v.contains(&t) {
                v.push(t);
            }
        }
    }
    if v.is_empty() {
        return Err("no NAT types given".into());
    }
    Ok(v)
}

/// What theory predicts for two sites: a side with a port-mapping daemon
/// has a public, endpoint-independent and unfiltered port (the mapping),
/// so it counts as `full-cone`.
pub fn site_theory(a: SiteType, b: SiteType) -> (Expect, &'static str) {
    if a.ipv6 && b.ipv6 {
        return (
            Expect::Direct,
            "both sites are dual-stack: their hosts' global IPv6 addresses need no NAT, and \
             simultaneous probes open both stateful firewalls",
        );
    }
    let eff = |s: SiteType| {
        if s.port_mapping.is_some() {
            NatType::FullCone
        } else {
            s.nat
        }
    };
    let (e, why) = theory(eff(a), eff(b));
    if (a.port_mapping.is_some() || b.port_mapping.is_some()) && e == Expect::Direct {
        return (
            e,
            "a side's gateway maps a public port on request (PCP, NAT-PMP or UPnP): the peer's \
             probes reach it whatever the NATs' mapping and filtering",
        );
    }
    (e, why)
}

/// The HTTP CONNECT proxy's port on a `proxy-only` site's gateway.
pub const PROXY_PORT: u16 = 8888;

/// How a NAT picks external ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    EndpointIndependent,
    EndpointDependent,
    /// No UDP leaves the site, so there is no UDP mapping to speak of
    /// (`udp-blocked`, `proxy-only`).
    NoUdp,
}

/// Which unsolicited inbound packets a NAT lets through to a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    Open,
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
    /// Every UDP packet is dropped, solicited or not (`udp-blocked`,
    /// `proxy-only`).
    Blocked,
}

impl NatType {
    /// The classic UDP NAT types, in table order: what `all` means on the
    /// command line (`matrix`, `verify-nat`).
    ///
    /// The UDP-less types are kept out of this list on purpose (they are in
    /// [`NatType::TCP_ONLY`]): `matrix` runs every pair of `all` by default
    /// and `matrix --strict` (the CI lab test) requires every pair to
    /// connect, which pairs with a UDP-less site cannot do until the agent
    /// can reach the server over TCP (through a proxy).
    pub const ALL: [NatType; 8] = [
        NatType::None,
        NatType::FullCone,
        NatType::Restricted,
        NatType::PortRestricted,
        NatType::Symmetric,
        NatType::Cloudnat,
        NatType::CloudnatEim,
        NatType::Cgnat,
    ];

    /// Sites without UDP: `tcp-only` on the command line. Their connections
    /// can only go through a relay reached over TCP.
    pub const TCP_ONLY: [NatType; 2] = [NatType::UdpBlocked, NatType::ProxyOnly];

    /// NATs that map per destination and count ports (`allocators` on the
    /// command line): for port prediction.
    pub const ALLOCATORS: [NatType; 4] = [
        NatType::CloudnatInorder,
        NatType::Seq,
        NatType::Seq2,
        NatType::CloudnatDpa,
    ];

    /// [`NatType::ALL`], [`NatType::TCP_ONLY`], then
    /// [`NatType::ALLOCATORS`]: every type the lab builds (names, the
    /// theory table).
    pub const EVERY: [NatType; 14] = [
        NatType::None,
        NatType::FullCone,
        NatType::Restricted,
        NatType::PortRestricted,
        NatType::Symmetric,
        NatType::Cloudnat,
        NatType::CloudnatEim,
        NatType::Cgnat,
        NatType::UdpBlocked,
        NatType::ProxyOnly,
        NatType::CloudnatInorder,
        NatType::Seq,
        NatType::Seq2,
        NatType::CloudnatDpa,
    ];

    /// Can a port-mapping daemon run on this type's gateway (one NAT layer
    /// that passes UDP, not `restricted`)?
    pub fn takes_port_mapping(self) -> bool {
        // Restricted filters in prerouting on the external port, before
        // the daemon's DNAT: not modelled with a daemon.
        self.has_udp() && !matches!(self, NatType::None | NatType::Cgnat | NatType::Restricted)
    }

    /// False for the types that pass no UDP at all.
    pub fn has_udp(self) -> bool {
        !NatType::TCP_ONLY.contains(&self)
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            NatType::None => "none",
            NatType::FullCone => "full-cone",
            NatType::Restricted => "restricted",
            NatType::PortRestricted => "port-restricted",
            NatType::Symmetric => "symmetric",
            NatType::Cloudnat => "cloudnat",
            NatType::CloudnatEim => "cloudnat-eim",
            NatType::Cgnat => "cgnat",
            NatType::UdpBlocked => "udp-blocked",
            NatType::ProxyOnly => "proxy-only",
            NatType::CloudnatInorder => "cloudnat-inorder",
            NatType::Seq => "seq",
            NatType::Seq2 => "seq2",
            NatType::CloudnatDpa => "cloudnat-dpa",
        }
    }

    /// Mapping behaviour as built (for UDP: the UDP-less types have none;
    /// `udp-blocked` maps TCP like `port-restricted`, `proxy-only` only
    /// lets the proxy's own connections out).
    pub fn mapping(self) -> Mapping {
        match self {
            NatType::UdpBlocked | NatType::ProxyOnly => Mapping::NoUdp,
            NatType::Symmetric
            | NatType::Cloudnat
            | NatType::CloudnatInorder
            | NatType::Seq
            | NatType::Seq2
            | NatType::CloudnatDpa => Mapping::EndpointDependent,
            _ => Mapping::EndpointIndependent,
        }
    }

    /// Filtering behaviour as built (for UDP: everything is dropped on the
    /// UDP-less types).
    pub fn filtering(self) -> Filtering {
        match self {
            NatType::UdpBlocked | NatType::ProxyOnly => Filtering::Blocked,
            NatType::None => Filtering::Open,
            NatType::FullCone => Filtering::EndpointIndependent,
            NatType::Restricted => Filtering::AddressDependent,
            _ => Filtering::AddressAndPortDependent,
        }
    }

    /// Does a fresh mapping get the inside port (when free)?
    pub fn preserves_port(self) -> bool {
        matches!(
            self,
            NatType::None
                | NatType::FullCone
                | NatType::Restricted
                | NatType::PortRestricted
                | NatType::Cgnat
        )
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NatType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        NatType::EVERY
            .iter()
            .copied()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown NAT type {s:?}; known: {} (or `all`, `tcp-only`, `allocators`)",
                    NatType::EVERY.map(|t| t.name()).join(", ")
                )
            })
    }
}

/// Parses a comma-separated list of types; `all` stands for the classic
/// UDP types ([`NatType::ALL`]) and `tcp-only` for the UDP-less ones
/// ([`NatType::TCP_ONLY`]), e.g. `all,tcp-only` for every type.
pub fn parse_types(list: &str) -> Result<Vec<NatType>, String> {
    parse_list(list, |s| {
        Ok(match s {
            "all" => NatType::ALL.to_vec(),
            "tcp-only" => NatType::TCP_ONLY.to_vec(),
            "allocators" => NatType::ALLOCATORS.to_vec(),
            _ => vec![s.parse()?],
        })
    })
}

/// What theory says a pair gets with plain simultaneous probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    Direct,
    /// Needs port prediction, block scanning, the birthday method or a relay.
    NeedsPredictionOrRelay,
    /// One side passes no UDP: only a relay reached over TCP (through the
    /// site's HTTP proxy for `proxy-only`) can connect the pair.
    RelayOverTcp,
}

impl Expect {
    /// The short word used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Expect::Direct => "direct",
            Expect::NeedsPredictionOrRelay => "hard",
            Expect::RelayOverTcp => "relay-tcp",
        }
    }
}

/// The expected outcome for A connecting to B, and why.
pub fn theory(a: NatType, b: NatType) -> (Expect, &'static str) {
    use Mapping::*;
    if a == NatType::ProxyOnly || b == NatType::ProxyOnly {
        return (
            Expect::RelayOverTcp,
            "one side reaches the internet only through an HTTP CONNECT proxy: no UDP at all, \
             so only a relay reached over TCP through the proxy can carry the connection",
        );
    }
    if a == NatType::UdpBlocked || b == NatType::UdpBlocked {
        return (
            Expect::RelayOverTcp,
            "one side's network drops all UDP: no punched path and no UDP relay, \
             so only a relay reached over TCP can carry the connection",
        );
    }
    if a == NatType::None || b == NatType::None {
        return (
            Expect::Direct,
            "one side has no NAT: the other side's probes open its own NAT and reach it",
        );
    }
    match (a.mapping(), b.mapping()) {
        (EndpointIndependent, EndpointIndependent) => (
            Expect::Direct,
            "both mappings are endpoint-independent: the addresses the server saw are the ones \
             the peer's probes reach, and simultaneous probes open both filters",
        ),
        (NoUdp, _) | (_, NoUdp) => unreachable!("UDP-less types are handled above"),
        (EndpointDependent, EndpointDependent) => (
            Expect::NeedsPredictionOrRelay,
            "both mappings are endpoint-dependent: neither side knows the port the other's NAT \
             uses towards it",
        ),
        _ => {
            let easy = if a.mapping() == EndpointIndependent {
                a
            } else {
                b
            };
            match easy.filtering() {
                Filtering::Open | Filtering::EndpointIndependent | Filtering::AddressDependent => (
                    Expect::Direct,
                    "the hard side's new mapping is learned from its probe, which the easy side's \
                     filter lets in (endpoint-independent or address-dependent filtering)",
                ),
                Filtering::AddressAndPortDependent | Filtering::Blocked => (
                    Expect::NeedsPredictionOrRelay,
                    "the hard side's probes come from an unadvertised port, which the easy side's \
                     address-and-port-dependent filter drops",
                ),
            }
        }
    }
}

mod rules;
pub use rules::{ruleset, ruleset_with, udp_block_handles, NatAddrs, IPV6_FIREWALL};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_and_unknown_is_an_error() {
        for t in NatType::EVERY {
            assert_eq!(t.name().parse::<NatType>().unwrap(), t);
        }
        assert!("cone".parse::<NatType>().unwrap_err().contains("known:"));
        assert!("cone"
            .parse::<NatType>()
            .unwrap_err()
            .contains("proxy-only"));
        assert_eq!(
            parse_types("symmetric,none,symmetric").unwrap(),
            vec![NatType::Symmetric, NatType::None]
        );
        assert!(parse_types(",").is_err());
        assert_eq!(parse_types("all").unwrap(), NatType::ALL.to_vec());
        assert_eq!(
            parse_types("tcp-only").unwrap(),
            vec![NatType::UdpBlocked, NatType::ProxyOnly]
        );
        assert_eq!(
            parse_types("all,tcp-only,allocators").unwrap(),
            NatType::EVERY.to_vec()
        );
    }

    #[test]
    fn sites_with_a_port_mapping_daemon() {
        let s = parse_sites("symmetric+upnp,symmetric,port-restricted+pcp").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].to_string(), "symmetric+upnp");
        assert_eq!(s[0].port_mapping, Some(PortMapDaemon::ALL));
        assert_eq!(s[1].port_mapping, None);
        assert_eq!(s[2].to_string(), "port-restricted+pcp");
        assert_eq!(parse_sites("all").unwrap().len(), NatType::ALL.len());
        for bad in [
            "none+upnp",
            "cgnat+upnp",
            "restricted+upnp",
            "udp-blocked+upnp",
            "symmetric+x",
        ] {
            assert!(bad.parse::<SiteType>().is_err(), "{bad}");
        }
        assert_eq!(
            site_theory(s[0], NatType::Symmetric.into()).0,
            Expect::Direct
        );
        assert_eq!(
            site_theory(NatType::Symmetric.into(), NatType::Cloudnat.into()).0,
            Expect::NeedsPredictionOrRelay
        );
        let a = NatAddrs {
            lan: "10.1.0.0/24".into(),
            wan_ip: "203.0.113.10".into(),
            block_base: 0,
        };
        let plain = ruleset(NatType::Symmetric, &a);
        let with = ruleset_with(
            NatType::Symmetric,
            &a,
            Some(PortMapDaemon {
                pcp: true,
                nat_pmp: false,
                upnp: true,
            }),
        );
        assert!(plain.starts_with("flush ruleset") && !plain.contains("miniupnpd"));
        for chain in [
            "chain miniupnpd",
            "chain prerouting_miniupnpd",
            "chain postrouting_miniupnpd",
        ] {
            assert!(with.contains(chain), "{with}");
        }
        // New inbound is dropped after the daemon's DNAT, not before it.
        assert!(
            with.contains("ct state new ct status dnat accept"),
            "{with}"
        );
        assert!(
            !with.contains("priority -150; policy accept;\n    iifname \"wan0\" ct state new drop")
        );
        // NAT-PMP (version 0) off, PCP (version 2) on.
        assert!(with.contains("@th,64,8 0 counter drop"), "{with}");
        assert!(!with.contains("@th,64,8 2 counter drop"), "{with}");
    }

    #[test]
    fn every_is_all_then_tcp_only() {
        let joined: Vec<NatType> = NatType::ALL
            .iter()
            .chain(NatType::TCP_ONLY.iter())
            .chain(NatType::ALLOCATORS.iter())
            .copied()
            .collect();
        assert_eq!(joined, NatType::EVERY.to_vec());
        assert!(NatType::ALL.iter().all(|t| t.has_udp()));
        assert!(NatType::TCP_ONLY.iter().all(|t| !t.has_udp()
            && t.mapping() == Mapping::NoUdp
            && t.filtering() == Filtering::Blocked
            && !t.preserves_port()));
    }

    #[test]
    fn udp_less_sites_are_relay_over_tcp_with_anyone() {
        for t in NatType::TCP_ONLY {
            for other in NatType::EVERY {
                assert_eq!(theory(t, other).0, Expect::RelayOverTcp);
                assert_eq!(theory(other, t).0, Expect::RelayOverTcp);
            }
        }
    }

    #[test]
    fn udp_blocked_drops_udp_and_proxy_only_forwards_nothing() {
        let a = NatAddrs {
            lan: "10.9.0.0/24".into(),
            wan_ip: "203.0.113.18".into(),
            block_base: 0,
        };
        let u = ruleset(NatType::UdpBlocked, &a);
        assert!(
            u.contains("oifname \"wan0\" meta l4proto udp counter drop"),
            "{u}"
        );
        assert!(
            u.contains("iifname \"wan0\" meta l4proto udp counter drop"),
            "{u}"
        );
        assert!(u.contains("snat ip to 203.0.113.18"), "{u}");
        let p = ruleset(NatType::ProxyOnly, &a);
        assert!(p.contains("hook forward priority 0; policy drop;"), "{p}");
        assert!(p.contains(&format!("tcp dport {PROXY_PORT} accept")), "{p}");
        assert!(!p.contains("snat") && !p.contains("masquerade"), "{p}");
    }

    #[test]
    fn udp_block_rules_are_found_by_handle() {
        let listing = "table ip punchnat {\n\tchain track { # handle 4\n\t\t\
            type filter hook forward priority filter; policy accept;\n\t\t\
            oifname \"wan0\" meta l4proto udp counter packets 3 bytes 90 drop # handle 7\n\t\t\
            iifname \"wan0\" meta l4proto udp counter packets 0 bytes 0 drop # handle 8\n\t}\n}\n";
        assert_eq!(udp_block_handles(listing), vec![7, 8]);
        assert!(udp_block_handles("chain track { # handle 4\n}").is_empty());
    }

    #[test]
    fn theory_matches_the_textbook() {
        use NatType::*;
        assert_eq!(theory(FullCone, Symmetric).0, Expect::Direct);
        assert_eq!(theory(Restricted, Cloudnat).0, Expect::Direct);
        assert_eq!(theory(PortRestricted, PortRestricted).0, Expect::Direct);
        assert_eq!(
            theory(Symmetric, PortRestricted).0,
            Expect::NeedsPredictionOrRelay
        );
        assert_eq!(theory(Cloudnat, Cloudnat).0, Expect::NeedsPredictionOrRelay);
        assert_eq!(
            theory(Cloudnat, CloudnatEim).0,
            Expect::NeedsPredictionOrRelay
        );
        assert_eq!(theory(Symmetric, None).0, Expect::Direct);
        assert_eq!(theory(Cgnat, CloudnatEim).0, Expect::Direct);
    }
}

/// The theory table as Markdown (checked in as `docs/nat-theory.md`).
pub fn theory_markdown() -> String {
    let mut s = String::from(
        "# What theory predicts for each pair of lab NAT types\n\n\
         Generated by `punch-lab theory` from `tests/src/lab/nat/mod.rs`; a unit test keeps this file in step.\n\
         \"direct\" means plain simultaneous probing (what punch does today) gets a direct path;\n\
         \"hard\" means it needs port prediction, block scanning, the birthday method or a relay;\n\
         \"relay-tcp\" means one side passes no UDP, so only a relay reached over TCP can connect them.\n\
         `punch-lab matrix` marks every pair where measurement and this table differ.\n\n\
         `udp-blocked` drops all UDP (both ways) and lets TCP out through a port-restricted-like NAT;\n\
         `proxy-only` forwards nothing and offers only an HTTP CONNECT proxy (tinyproxy) on its gateway.\n\
         Neither is in `all` (`punch-lab matrix`'s default); name them, or use `tcp-only`.\n\n\
         Any type that passes UDP can be made dual-stack with `+v6` (`cgnat+v6`; `dual-stack` names\n\
         `cgnat+v6,symmetric+v6`): its hosts also get global IPv6 addresses behind a stateful firewall.\n\
         Two dual-stack sites are \"direct\" whatever their IPv4 NATs: IPv6 needs no NAT, and\n\
         simultaneous probes open both firewalls.\n\n\
         | NAT type | mapping | filtering |\n|---|---|---|\n",
    );
    for t in NatType::EVERY {
        s.push_str(&format!(
            "| {} | {:?} | {:?} |\n",
            t.name(),
            t.mapping(),
            t.filtering()
        ));
    }
    s.push_str("\n| A \\ B |");
    for b in NatType::EVERY {
        s.push_str(&format!(" {} |", b.name()));
    }
    s.push_str("\n|---|");
    for _ in NatType::EVERY {
        s.push_str("---|");
    }
    s.push('\n');
    for a in NatType::EVERY {
        s.push_str(&format!("| **{}** |", a.name()));
        for b in NatType::EVERY {
            s.push_str(&format!(" {} |", theory(a, b).0.label()));
        }
        s.push('\n');
    }
    s.push_str("\nTwo hosts behind the same NAT (no hairpinning): direct, through their LAN candidates.\n\n## Why\n\n");
    let mut seen = Vec::new();
    for a in NatType::EVERY {
        for b in NatType::EVERY {
            let (e, why) = theory(a, b);
            if !seen.contains(&why) {
                seen.push(why);
                s.push_str(&format!(
                    "- **{}** (e.g. {} → {}): {why}.\n",
                    e.label(),
                    a.name(),
                    b.name()
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod doc_tests {
    #[test]
    fn checked_in_theory_table_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/nat-theory.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            on_disk,
            super::theory_markdown(),
            "docs/nat-theory.md is stale: run `punch-lab theory > docs/nat-theory.md`"
        );
    }
}
