//! The nftables rules that make a NAT namespace behave as its type: the
//! mapping, filtering and port allocation of each, the carrier NAT's
//! counter, the proxy-only site's firewall, IPv6's stateful firewall.

use super::*;

/// Addresses a NAT namespace needs for its rules.
#[derive(Clone, Debug)]
pub struct NatAddrs {
    /// The LAN prefix behind the NAT, e.g. `10.1.0.0/24`.
    pub lan: String,
    /// The NAT's outside address.
    pub wan_ip: String,
    /// Index of the site (for the Cloud NAT port block).
    pub block_base: u16,
}

/// The nftables ruleset (one `nft -f` script) for a NAT namespace whose
/// outside interface is `wan0` and inside interface `lan0`.
pub fn ruleset(t: NatType, a: &NatAddrs) -> String {
    ruleset_with(t, a, None)
}

/// [`ruleset`], and with a port-mapping daemon the tables and chains
/// miniupnpd's nftables backend fills (`table inet filter`: chains
/// `miniupnpd`, `prerouting_miniupnpd`, `postrouting_miniupnpd`), plus
/// drops for the protocols switched off and counters of every request the
/// LAN sends the daemon. New inbound packets are then dropped in the
/// forward hook unless the daemon's DNAT took them (still before conntrack
/// confirms them).
pub fn ruleset_with(t: NatType, a: &NatAddrs, daemon: Option<PortMapDaemon>) -> String {
    let base = ruleset_base(t, a);
    let Some(d) = daemon else {
        return base;
    };
    let base = base.replace(
        "    iifname \"wan0\" ct state new drop\n  }\n  chain nat_pre",
        "  }\n  chain nat_pre",
    );
    let base = base.replace(
        "type filter hook forward priority 0; policy accept;\n",
        "type filter hook forward priority 0; policy accept;\n    iifname \"wan0\" ct state new ct status dnat accept\n    iifname \"wan0\" ct state new drop\n",
    );
    // The daemon checks by STUN (with CHANGE-REQUEST, answered from the
    // server's other address and port) that unsolicited packets reach the
    // gateway; only the gateway's own sockets are concerned, not the NAT.
    let base = base.replace("    iifname \"wan0\" meta l4proto udp drop\n", "");
    let mut off = String::new();
    if !d.pcp {
        off.push_str("    iifname \"lan0\" udp dport 5351 @th,64,8 2 counter drop\n");
    }
    if !d.nat_pmp {
        off.push_str("    iifname \"lan0\" udp dport 5351 @th,64,8 0 counter drop\n");
    }
    // Probes to the site's own public address (two agents behind this NAT
    // scanning each other's port block, which may hold 1900 or 5351) are
    // punching, not port-mapping requests: not counted.
    let wan = &a.wan_ip;
    format!(
        r#"{base}table inet filter {{
  counter pmp_requests {{ }}
  counter ssdp_requests {{ }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "lan0" ip daddr != {wan} udp dport 5351 counter name pmp_requests
    iifname "lan0" ip daddr != {wan} udp dport 1900 counter name ssdp_requests
{off}  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"#
    )
}

fn ruleset_base(t: NatType, a: &NatAddrs) -> String {
    let lan = &a.lan;
    let wan = &a.wan_ip;
    let lo = a.block_base;
    let hi = lo + 63;
    // New inbound on wan0 is dropped *before* conntrack confirms it, so a
    // dropped probe never occupies a tuple that would later make the NAT
    // pick another port (which would fake endpoint-dependent mapping).
    let drop_new_inbound = "iifname \"wan0\" ct state new drop";
    if t == NatType::ProxyOnly {
        return proxy_only_ruleset(a);
    }
    // The Cloud NAT family: UDP gets its external port from `ports` (what
    // follows `snat ip to WAN`), other protocols the plain SNAT; new inbound
    // is dropped.
    let udp_snat = |ports: String| {
        (
            format!(
                "ip saddr {lan} oifname \"wan0\" meta l4proto udp snat ip to {wan}{ports}\n    \
                 ip saddr {lan} oifname \"wan0\" snat ip to {wan}"
            ),
            drop_new_inbound.to_string(),
            String::new(),
            String::new(),
        )
    };
    let (snat, filter_pre, dnat, track) = match t {
        NatType::None => unreachable!("no NAT namespace for public hosts"),
        NatType::FullCone => (
            format!("ip saddr {lan} oifname \"wan0\" snat ip to {wan}"),
            String::new(),
            "iifname \"wan0\" dnat ip to udp dport map @eim".to_string(),
            "iifname \"lan0\" oifname \"wan0\" update @eim { udp sport : ip saddr }".to_string(),
        ),
        NatType::Restricted => (
            format!("ip saddr {lan} oifname \"wan0\" snat ip to {wan}"),
            "iifname \"wan0\" ct state new ip saddr . udp dport != @contacted drop".to_string(),
            "iifname \"wan0\" dnat ip to udp dport map @eim".to_string(),
            "iifname \"lan0\" oifname \"wan0\" update @eim { udp sport : ip saddr } update @contacted { ip daddr . udp sport }"
                .to_string(),
        ),
        NatType::PortRestricted | NatType::Cgnat => (
            format!("ip saddr {lan} oifname \"wan0\" snat ip to {wan}"),
            drop_new_inbound.to_string(),
            String::new(),
            String::new(),
        ),
        // Port-restricted for TCP; every UDP packet forwarded to or from
        // the internet is dropped (the input chain drops UDP to the NAT
        // itself). UDP between two hosts on the LAN bridge (which
        // br_netfilter also shows to this hook) stays allowed.
        NatType::UdpBlocked => (
            format!("ip saddr {lan} oifname \"wan0\" snat ip to {wan}"),
            drop_new_inbound.to_string(),
            String::new(),
            "oifname \"wan0\" meta l4proto udp counter drop\n    \
             iifname \"wan0\" meta l4proto udp counter drop"
                .to_string(),
        ),
        NatType::ProxyOnly => unreachable!("handled above"),
        NatType::Symmetric => (
            format!("ip saddr {lan} oifname \"wan0\" masquerade fully-random"),
            drop_new_inbound.to_string(),
            String::new(),
            String::new(),
        ),
        NatType::Cloudnat => udp_snat(format!(":{lo}-{hi} random")),
        // numgen runs once a new flow (the nat chain sees only a flow's
        // first packet): a counter. A port whose tuple is taken drops the
        // flow's first packet, as a single-port SNAT does.
        // (Through a map: numgen's value is in host byte order, a port in
        // network order, and only a typed map converts.)
        NatType::CloudnatInorder => udp_snat(format!(
            " : numgen inc mod 64 map {{ {} }}",
            counter_map(64, lo, 1)
        )),
        NatType::Seq => udp_snat(format!(
            " : numgen inc mod {SEQ_PORTS} map {{ {} }}",
            counter_map(SEQ_PORTS, SEQ_BASE, 1)
        )),
        NatType::Seq2 => udp_snat(format!(
            " : numgen inc mod {} map {{ {} }}",
            SEQ_PORTS / 2,
            counter_map(SEQ_PORTS / 2, SEQ_BASE, 2)
        )),
        NatType::CloudnatDpa => udp_snat(format!(":{lo}-{} random", lo + 31)),
        // A deterministic function of the inside port into the block: the
        // same external port whatever the destination.
        NatType::CloudnatEim => udp_snat(format!(" : udp sport & 0x3f | {lo}")),
    };
    format!(
        r#"flush ruleset
table ip punchnat {{
  map eim {{ type inet_service : ipv4_addr; flags dynamic,timeout; timeout 120s; }}
  set contacted {{ type ipv4_addr . inet_service; flags dynamic,timeout; timeout 120s; }}
  chain filter_pre {{
    type filter hook prerouting priority -150; policy accept;
    {filter_pre}
  }}
  chain nat_pre {{
    type nat hook prerouting priority -100; policy accept;
    {dnat}
  }}
  chain track {{
    type filter hook forward priority 0; policy accept;
    {track}
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ct state established,related accept
    iifname "wan0" meta l4proto udp drop
    iifname "lan0" ip daddr {wan} drop
  }}
  chain nat_post {{
    type nat hook postrouting priority 100; policy accept;
    {snat}
  }}
}}
"#
    )
}

/// A dual-stack gateway's IPv6 firewall (RFC 6092's default, as home
/// routers and mobile networks ship it): everything out, answers in,
/// ICMPv6 in, nothing new in. Loaded after the NAT's ruleset.
pub const IPV6_FIREWALL: &str = r#"table ip6 punchfw {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname != "wan0" accept
    meta l4proto ipv6-icmp accept
    counter drop
  }
}
"#;

/// The `seq` type's counter runs over this many ports from [`SEQ_BASE`].
const SEQ_PORTS: u16 = 2048;
const SEQ_BASE: u16 = 30000;

/// `0 : base, 1 : base + stride, …`: a counter's value to a port.
fn counter_map(n: u16, base: u16, stride: u16) -> String {
    (0..n)
        .map(|k| format!("{k} : {}", base + k * stride))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nftables handles of a `udp-blocked` NAT's UDP drop rules, read from
/// `nft -a list chain ip punchnat track` (lines like
/// `oifname "wan0" meta l4proto udp counter packets 3 bytes 90 drop # handle 7`).
pub fn udp_block_handles(listing: &str) -> Vec<u64> {
    listing
        .lines()
        .filter(|l| l.contains("meta l4proto udp") && l.contains(" drop"))
        .filter_map(|l| l.rsplit_once("# handle ")?.1.trim().parse().ok())
        .collect()
}

/// A `proxy-only` gateway: nothing is forwarded between LAN and WAN; from
/// the LAN only the proxy port on the gateway itself is open; from the WAN
/// only answers to the gateway's own (the proxy's) connections come in.
/// (Frames between two hosts on the LAN bridge, which br_netfilter also
/// shows to the forward hook, stay on the LAN.)
fn proxy_only_ruleset(a: &NatAddrs) -> String {
    let lan = &a.lan;
    format!(
        r#"flush ruleset
table ip punchnat {{
  chain forward {{
    type filter hook forward priority 0; policy drop;
    iifname != "wan0" oifname != {{ "wan0", "lan0" }} accept
    counter drop
  }}
  chain input {{
    type filter hook input priority 0; policy drop;
    iifname "lo" accept
    ct state established,related accept
    iifname "lan0" ip saddr {lan} tcp dport {PROXY_PORT} accept
  }}
}}
"#
    )
}
