//! The default IPv4 gateway, from `/proc/net/route` (Linux).

use std::net::Ipv4Addr;

/// Parses `/proc/net/route` text: the gateway of the default route with
/// the lowest metric that is up (flag RTF_UP) and has a gateway
/// (RTF_GATEWAY). Lines that do not parse are skipped.
pub fn parse_default_gateway(text: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dest), Ok(gw), Ok(flags), Ok(metric), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[2], 16),
            u32::from_str_radix(f[3], 16),
            f[6].parse::<u32>(),
            u32::from_str_radix(f.get(7).copied().unwrap_or("x"), 16),
        ) else {
            continue;
        };
        if dest != 0 || mask != 0 || flags & RTF_UP == 0 || flags & RTF_GATEWAY == 0 {
            continue;
        }
        // The kernel prints the address's bytes (network order) read as a
        // native u32: its native bytes are the address.
        let ip = Ipv4Addr::from(gw.to_ne_bytes());
        if ip.is_unspecified() {
            continue;
        }
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, ip));
        }
    }
    best.map(|(_, ip)| ip)
}

/// The default IPv4 gateway of this host, if any.
pub fn default_gateway() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_gateway(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_route() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0100010A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                 eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 wlan0\t00000000\t0101A8C0\t0003\t0\t0\t50\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_default_gateway(t),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                 eth0\t00000000\t0100010A\t0003\t0\t0\t100\t00000000\n";
        assert_eq!(parse_default_gateway(t), Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(parse_default_gateway("junk\n\u{0}\u{ff}"), None);
        assert_eq!(parse_default_gateway(""), None);
        // Down routes and routes without a gateway do not count.
        let t = "h\neth0\t00000000\t0100010A\t0002\t0\t0\t1\t00000000\n";
        assert_eq!(parse_default_gateway(t), None);
    }
}
