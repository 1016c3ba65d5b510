//! PCP (RFC 6887) and NAT-PMP (RFC 6886) answers from an untrusted
//! gateway: every parser on arbitrary datagrams, and what a successful
//! parse promises (our nonce, our port, a usable external address).
#![no_main]

use libfuzzer_sys::fuzz_target;
use punch_portmap::{natpmp, pcp};
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    // The request the seeds answer (see examples/seeds.rs).
    let req = pcp::MapRequest::udp([7; 12], Ipv4Addr::new(192, 168, 1, 20), 40000, 7200);
    if let Ok(r) = req.parse_response(data) {
        assert_eq!(data[24..36], req.nonce);
        assert!(r.external.port() != 0 && !r.external.ip().is_unspecified());
    }
    let delete = pcp::MapRequest { lifetime: 0, ..req };
    let _ = delete.parse_response(data);
    if let Ok(r) = natpmp::parse_external(data) {
        assert!(!r.ip.is_unspecified() && !r.ip.is_loopback());
    }
    if let Ok(r) = natpmp::parse_map(data, 40000, false) {
        assert_ne!(r.external_port, 0);
    }
    let _ = natpmp::parse_map(data, 40000, true);
});
