//! The STUN codec on arbitrary datagrams: parsing, every attribute
//! accessor, and the server's answer (which must itself parse and stay
//! within the amplification bound).
#![no_main]

use libfuzzer_sys::fuzz_target;
use punch_protocol::stun;
use std::net::SocketAddr;

fuzz_target!(|data: &[u8]| {
    let _ = stun::looks_like_stun(data);
    let Ok(m) = stun::parse(data) else { return };
    let _ = m.mapped_address();
    let _ = m.unknown_required();
    let _ = m.change_request();
    for t in [0x0001u16, 0x0020, 0x802c, 0x8020, 0x0005] {
        if let Some(v) = m.get(t) {
            let _ = stun::decode_address(v, Some(&m.txid));
            let _ = stun::decode_address(v, None);
        }
    }
    let from: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let info = stun::ResponderInfo {
        local: Some("203.0.113.1:3478".parse().unwrap()),
        other: Some("203.0.113.2:3479".parse().unwrap()),
    };
    if let Some(resp) = stun::answer(&m, from, info, "punch-fuzz") {
        let r = stun::parse(&resp).expect("our own answer parses");
        assert_eq!(r.txid, m.txid);
        // No larger than the request, but for what an answer must carry
        // (at most 100 bytes: IPv6 mapped, other and origin addresses and
        // FINGERPRINT; a 420 with its list is smaller).
        assert!(
            resp.len() <= m.len.max(100),
            "{} bytes to {}",
            resp.len(),
            m.len
        );
    }
});
