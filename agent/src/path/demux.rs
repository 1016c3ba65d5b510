//! What a datagram on the agent's one socket is, from its first bytes.
//!
//! Probes, STUN, relay frames and QUIC share the socket (and so one NAT
//! mapping). Probe and relay frames start with magics whose first bytes
//! (0x0e, 0x0f) are outside both the QUIC range (top bit set, or 0x40 for
//! short headers) and STUN's (two zero top bits with the cookie), so the
//! order of the checks below only matters for garbage.

use punch_protocol::{probe, relay, stun};

/// The kind of a received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram {
    /// A punch probe: for the punch session it names.
    Probe,
    /// A STUN message: an answer to one of our queries.
    Stun,
    /// A relay frame from the server (data, bind-ok, ended).
    Relay,
    /// Anything else: QUIC, for quinn.
    Quic,
}

/// Classifies one datagram (one GRO segment). Never fails: what is not a
/// probe, STUN or a relay frame is quinn's to judge.
pub fn classify(d: &[u8]) -> Datagram {
    if probe::is_probe(d) {
        Datagram::Probe
    } else if stun::looks_like_stun(d) {
        Datagram::Stun
    } else if relay::is_relay(d) {
        Datagram::Relay
    } else {
        Datagram::Quic
    }
}

/// Is this a QUIC (version 1) Initial packet, the first of a new
/// handshake? Long header with the fixed bit, type 0, a non-zero version
/// (zero is version negotiation).
pub fn is_quic_initial(d: &[u8]) -> bool {
    d.len() >= 5 && d[0] & 0xf0 == 0xc0 && d[1..5] != [0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use punch_protocol::probe::Probe;
    use punch_protocol::signal::{Role, SessionId};

    #[test]
    fn each_kind_is_told_apart() {
        let probe = Probe::ping(Role::Controlling, SessionId(7), 1).encode(&[1; 32]);
        assert_eq!(classify(&probe), Datagram::Probe);
        let stun = stun::binding_request(&stun::new_txid(), false, false);
        assert_eq!(classify(&stun), Datagram::Stun);
        let bind = relay::encode_bind_request(&[2; 32], SessionId(7), Role::Controlled, 9);
        assert_eq!(classify(&bind), Datagram::Relay);
        let mut data = vec![0u8; relay::DATA_HEADER + 4];
        relay::write_data_header(&mut data[..relay::DATA_HEADER], SessionId(7));
        assert_eq!(classify(&data), Datagram::Relay);
        // A QUIC long header (Initial) and a short header.
        assert_eq!(classify(&[0xc3, 0, 0, 0, 1, 8]), Datagram::Quic);
        assert_eq!(classify(&[0x41, 1, 2, 3]), Datagram::Quic);
        assert_eq!(classify(&[]), Datagram::Quic);
    }

    #[test]
    fn initials_are_told_from_other_quic_packets() {
        assert!(is_quic_initial(&[0xc3, 0, 0, 0, 1, 8]));
        // Handshake, 0-RTT, Retry, short header, version negotiation.
        assert!(!is_quic_initial(&[0xe3, 0, 0, 0, 1, 8]));
        assert!(!is_quic_initial(&[0xd3, 0, 0, 0, 1, 8]));
        assert!(!is_quic_initial(&[0xf3, 0, 0, 0, 1, 8]));
        assert!(!is_quic_initial(&[0x43, 0, 0, 0, 1, 8]));
        assert!(!is_quic_initial(&[0xc3, 0, 0, 0, 0, 8]));
        assert!(!is_quic_initial(&[0xc3]));
    }

    proptest::proptest! {
        /// Whatever arrives is classified, and only datagrams with a magic
        /// (or STUN's shape) are taken away from quinn.
        #[test]
        fn classify_never_panics_and_quic_stays_quic(d in proptest::collection::vec(proptest::num::u8::ANY, 0..1500)) {
            let k = classify(&d);
            if d.first().is_some_and(|b| *b & 0x80 != 0) {
                proptest::prop_assert_eq!(k, Datagram::Quic);
            }
        }
    }
}
