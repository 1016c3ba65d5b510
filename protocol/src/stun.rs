//! STUN (RFC 8489) Binding: the one codec used by the server's responder and
//! the agent's client, with the RFC 5780 attributes for NAT discovery.
//!
//! The server answers Binding requests on its signaling port (a STUN message
//! starts with two zero bits and carries the magic cookie, which tells it
//! from QUIC as RFC 7983 does). Classic RFC 3489 requests (no cookie) get a
//! MAPPED-ADDRESS answer, so old clients work too.
//!
//! RFC 5780: with an alternate address configured, every answer carries
//! OTHER-ADDRESS and RESPONSE-ORIGIN (CHANGED-ADDRESS and SOURCE-ADDRESS for
//! RFC 3489 clients), and a request with PADDING gets an answer padded up
//! to the request's size, so a client can test fragmented paths.
//!
//! Amplification: an answer carries what it must (the mapped address, with
//! an alternate address the two RFC 5780 addresses, FINGERPRINT for RFC
//! 8489 clients) and adds the optional rest (SOFTWARE, PADDING, a
//! RESPONSE-ORIGIN nobody needs) only while it stays no larger than the
//! request: at most 64 bytes (IPv4; 100 for IPv6) to a 20-byte request,
//! never more than the request beyond that.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The RFC 5389/8489 magic cookie.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Binding request.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Binding success response.
pub const BINDING_SUCCESS: u16 = 0x0101;
/// Binding error response.
pub const BINDING_ERROR: u16 = 0x0111;
/// Largest STUN message we parse: room for a request padded (RFC 5780
/// PADDING) to a jumbo-frame MTU.
pub const MAX_MESSAGE: usize = 9216;

/// Attribute types.
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;
    /// RFC 3489's names for the RFC 5780 pair.
    pub const SOURCE_ADDRESS: u16 = 0x0004;
    pub const CHANGED_ADDRESS: u16 = 0x0005;
}

/// Why a datagram is not an acceptable STUN message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("malformed STUN message")]
    Malformed,
    #[error("STUN FINGERPRINT does not match")]
    BadFingerprint,
}

/// A parsed message (attributes borrowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub msg_type: u16,
    /// False for RFC 3489 messages (no magic cookie).
    pub has_cookie: bool,
    /// 16 bytes: cookie + 96-bit id (RFC 8489), or the 128-bit RFC 3489 id.
    pub txid: [u8; 16],
    pub attrs: Vec<(u16, &'a [u8])>,
    /// Total length on the wire.
    pub len: usize,
}

/// Quick check used to demultiplex: two zero top bits, a length that is a
/// multiple of four and matches the datagram, and (RFC 8489) the cookie.
pub fn looks_like_stun(d: &[u8]) -> bool {
    d.len() >= 20
        && d[0] & 0xC0 == 0
        && u16::from_be_bytes([d[2], d[3]]) as usize + 20 == d.len()
        && d[3].is_multiple_of(4)
        && (d[4..8] == MAGIC_COOKIE.to_be_bytes() || d[0] == 0 && d[1] == 1)
}

/// Parses a STUN message, checking the FINGERPRINT when present.
pub fn parse(d: &[u8]) -> Result<Message<'_>, StunError> {
    if d.len() < 20 || d[0] & 0xC0 != 0 {
        return Err(StunError::NotStun);
    }
    if d.len() > MAX_MESSAGE {
        return Err(StunError::Malformed);
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    if !len.is_multiple_of(4) || len + 20 != d.len() {
        return Err(StunError::Malformed);
    }
    let msg_type = u16::from_be_bytes([d[0], d[1]]);
    let has_cookie = d[4..8] == MAGIC_COOKIE.to_be_bytes();
    let txid: [u8; 16] = d[4..20].try_into().expect("16 bytes");
    let mut attrs = Vec::new();
    let mut i = 20;
    while i < d.len() {
        if i + 4 > d.len() || attrs.len() >= 64 {
            return Err(StunError::Malformed);
        }
        let t = u16::from_be_bytes([d[i], d[i + 1]]);
        let l = u16::from_be_bytes([d[i + 2], d[i + 3]]) as usize;
        let padded = (l + 3) & !3;
        if i + 4 + padded > d.len() {
            return Err(StunError::Malformed);
        }
        if t == attr::FINGERPRINT {
            if l != 4 || i + 8 != d.len() {
                return Err(StunError::Malformed);
            }
            let want = u32::from_be_bytes(d[i + 4..i + 8].try_into().expect("4 bytes"));
            if fingerprint(&d[..i]) != want {
                return Err(StunError::BadFingerprint);
            }
        }
        attrs.push((t, &d[i + 4..i + 4 + l]));
        i += 4 + padded;
    }
    Ok(Message {
        msg_type,
        has_cookie,
        txid,
        attrs,
        len: d.len(),
    })
}

fn fingerprint(prefix: &[u8]) -> u32 {
    // The CRC covers the message with its length already counting the
    // FINGERPRINT attribute, which the caller's header says.
    crc32fast::hash(prefix) ^ 0x5354_554E
}

impl Message<'_> {
    /// The first attribute of type `t`.
    pub fn get(&self, t: u16) -> Option<&[u8]> {
        self.attrs.iter().find(|(k, _)| *k == t).map(|(_, v)| *v)
    }

    /// XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS for classic servers.
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        if let Some(v) = self.get(attr::XOR_MAPPED_ADDRESS) {
            return decode_address(v, Some(&self.txid));
        }
        self.get(attr::MAPPED_ADDRESS)
            .and_then(|v| decode_address(v, None))
    }

    /// Comprehension-required attributes a Binding server does not know.
    pub fn unknown_required(&self) -> Vec<u16> {
        use attr::*;
        const KNOWN: &[u16] = &[
            MAPPED_ADDRESS,
            CHANGE_REQUEST,
            USERNAME,
            MESSAGE_INTEGRITY,
            ERROR_CODE,
            UNKNOWN_ATTRIBUTES,
            REALM,
            NONCE,
            MESSAGE_INTEGRITY_SHA256,
            PASSWORD_ALGORITHM,
            USERHASH,
            XOR_MAPPED_ADDRESS,
            PADDING,
            RESPONSE_PORT,
            SOURCE_ADDRESS,
            CHANGED_ADDRESS,
        ];
        self.attrs
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| *t < 0x8000 && !KNOWN.contains(t))
            .collect()
    }

    /// CHANGE-REQUEST flags: (change IP, change port).
    pub fn change_request(&self) -> (bool, bool) {
        match self.get(attr::CHANGE_REQUEST) {
            Some(v) if v.len() == 4 => (v[3] & 4 != 0, v[3] & 2 != 0),
            _ => (false, false),
        }
    }
}

/// Decodes an address attribute value; `xor` carries the transaction id
/// (cookie included) for XOR-MAPPED-ADDRESS.
pub fn decode_address(v: &[u8], xor: Option<&[u8; 16]>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match (v[1], v.len()) {
        (1, 8) => {
            let mut ip: [u8; 4] = v[4..8].try_into().ok()?;
            if let Some(t) = xor {
                for (b, k) in ip.iter_mut().zip(&t[..4]) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (2, 20) => {
            let mut ip: [u8; 16] = v[4..20].try_into().ok()?;
            if let Some(t) = xor {
                for (b, k) in ip.iter_mut().zip(t.iter()) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

fn encode_address(a: SocketAddr, xor: Option<&[u8; 16]>) -> Vec<u8> {
    let a = SocketAddr::new(a.ip().to_canonical(), a.port());
    let mut port = a.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let mut v = vec![0, 0];
    v[1] = if a.is_ipv4() { 1 } else { 2 };
    v.extend_from_slice(&port.to_be_bytes());
    let mut ip = match a.ip() {
        IpAddr::V4(x) => x.octets().to_vec(),
        IpAddr::V6(x) => x.octets().to_vec(),
    };
    if let Some(t) = xor {
        for (b, k) in ip.iter_mut().zip(t.iter()) {
            *b ^= k;
        }
    }
    v.extend_from_slice(&ip);
    v
}

/// Builds STUN messages.
#[derive(Debug)]
pub struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    /// A message of `msg_type` with this transaction id (cookie included).
    pub fn new(msg_type: u16, txid: &[u8; 16]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&msg_type.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(txid);
        Builder { buf }
    }

    /// Current length on the wire.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when only the header is there.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 20
    }

    /// Appends an attribute (padded to four bytes).
    pub fn attr(&mut self, t: u16, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(v);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self.set_len();
        self
    }

    fn set_len(&mut self) {
        let l = (self.buf.len() - 20) as u16;
        self.buf[2..4].copy_from_slice(&l.to_be_bytes());
    }

    /// Appends FINGERPRINT and returns the message.
    pub fn finish_with_fingerprint(mut self) -> Vec<u8> {
        let l = (self.buf.len() - 20 + 8) as u16;
        self.buf[2..4].copy_from_slice(&l.to_be_bytes());
        let crc = fingerprint(&self.buf);
        self.buf.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
        self.buf.extend_from_slice(&4u16.to_be_bytes());
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.buf
    }

    /// Returns the message as it is.
    pub fn finish(mut self) -> Vec<u8> {
        self.set_len();
        self.buf
    }
}

/// A new random transaction id with the magic cookie.
pub fn new_txid() -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    let r: [u8; 12] = rand::random();
    t[4..].copy_from_slice(&r);
    t
}

/// A Binding request (with FINGERPRINT), optionally with CHANGE-REQUEST.
pub fn binding_request(txid: &[u8; 16], change_ip: bool, change_port: bool) -> Vec<u8> {
    let mut b = Builder::new(BINDING_REQUEST, txid);
    if change_ip || change_port {
        let flags = (change_ip as u8) << 2 | (change_port as u8) << 1;
        b.attr(attr::CHANGE_REQUEST, &[0, 0, 0, flags]);
    }
    b.finish_with_fingerprint()
}

/// What the server knows when it answers.
#[derive(Debug, Clone, Copy)]
pub struct ResponderInfo {
    /// The address the request arrived at (RESPONSE-ORIGIN).
    pub local: Option<SocketAddr>,
    /// The server's alternate address (OTHER-ADDRESS), with `--alt-listen`.
    pub other: Option<SocketAddr>,
}

/// The server's answer to a Binding request from `from`, or `None` when the
/// message is not one to answer (responses, indications, other methods).
pub fn answer(
    req: &Message<'_>,
    from: SocketAddr,
    info: ResponderInfo,
    software: &str,
) -> Option<Vec<u8>> {
    if req.msg_type != BINDING_REQUEST {
        return None;
    }
    let unknown = req.unknown_required();
    if !unknown.is_empty() {
        let mut b = Builder::new(BINDING_ERROR, &req.txid);
        let mut ec = vec![0, 0, 4, 20];
        ec.extend_from_slice(b"Unknown Attribute");
        b.attr(attr::ERROR_CODE, &ec);
        let list: Vec<u8> = unknown
            .iter()
            .take(8)
            .flat_map(|t| t.to_be_bytes())
            .collect();
        b.attr(attr::UNKNOWN_ATTRIBUTES, &list);
        return Some(if req.has_cookie {
            b.finish_with_fingerprint()
        } else {
            b.finish()
        });
    }
    let mut b = Builder::new(BINDING_SUCCESS, &req.txid);
    let budget = req.len;
    if req.has_cookie {
        b.attr(
            attr::XOR_MAPPED_ADDRESS,
            &encode_address(from, Some(&req.txid)),
        );
    } else {
        b.attr(attr::MAPPED_ADDRESS, &encode_address(from, None));
    }
    let (other_t, origin_t) = if req.has_cookie {
        (attr::OTHER_ADDRESS, attr::RESPONSE_ORIGIN)
    } else {
        (attr::CHANGED_ADDRESS, attr::SOURCE_ADDRESS)
    };
    // An RFC 5780 server always says where its other address is and which
    // address answered: a client cannot test anything without them.
    if let Some(o) = info.other {
        b.attr(other_t, &encode_address(o, None));
        if let Some(l) = info.local {
            b.attr(origin_t, &encode_address(l, None));
        }
    }
    // Optional attributes, only while the answer stays within the request's
    // size (FINGERPRINT's 8 bytes reserved for cookie clients).
    let reserve = if req.has_cookie { 8 } else { 0 };
    // A padded request asks for PADDING in the answer (RFC 5780 §7.6): the
    // optional rest must leave room for at least a short one.
    let padded = req.get(attr::PADDING).is_some();
    let pad_room = if padded { 8 } else { 0 };
    let add = |b: &mut Builder, t: u16, v: &[u8]| {
        let cost = 4 + ((v.len() + 3) & !3);
        if b.len() + cost + reserve + pad_room <= budget {
            b.attr(t, v);
        }
    };
    if let (None, Some(l)) = (info.other, info.local) {
        add(&mut b, origin_t, &encode_address(l, None));
    }
    if req.has_cookie {
        add(&mut b, attr::SOFTWARE, software.as_bytes());
    }
    // A padded request (RFC 5780 §7.6) gets an answer padded to its size.
    if padded {
        let room = budget.saturating_sub(b.len() + reserve + 4) & !3;
        if room > 0 {
            b.attr(attr::PADDING, &vec![0; room]);
        }
    }
    Some(if req.has_cookie {
        b.finish_with_fingerprint()
    } else {
        b.finish()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_answer_roundtrip_v4_and_v6() {
        for from in ["198.51.100.7:40000", "[2001:db8::5]:9"] {
            let from: SocketAddr = from.parse().unwrap();
            let txid = new_txid();
            let req = binding_request(&txid, false, false);
            assert!(looks_like_stun(&req));
            let parsed = parse(&req).unwrap();
            let resp = answer(
                &parsed,
                from,
                ResponderInfo {
                    local: None,
                    other: None,
                },
                "punch",
            )
            .unwrap();
            let r = parse(&resp).unwrap();
            assert_eq!(r.msg_type, BINDING_SUCCESS);
            assert_eq!(r.txid, txid);
            assert_eq!(r.mapped_address(), Some(from));
        }
    }

    #[test]
    fn answers_carry_rfc5780_addresses_and_stay_within_the_request() {
        let from: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let info = ResponderInfo {
            local: Some("203.0.113.1:3478".parse().unwrap()),
            other: Some("203.0.113.2:3479".parse().unwrap()),
        };
        // A bare 20-byte request gets the mapped address, the two RFC 5780
        // addresses and FINGERPRINT: 64 bytes, no SOFTWARE.
        let req = Builder::new(BINDING_REQUEST, &new_txid()).finish();
        let resp = answer(&parse(&req).unwrap(), from, info, "punch").unwrap();
        assert_eq!(resp.len(), 20 + 12 + 12 + 12 + 8);
        let r = parse(&resp).unwrap();
        assert!(r.get(attr::OTHER_ADDRESS).is_some() && r.get(attr::RESPONSE_ORIGIN).is_some());
        assert!(r.get(attr::SOFTWARE).is_none());
        // Without an alternate address: the mapped address and FINGERPRINT.
        let plain = ResponderInfo {
            other: None,
            ..info
        };
        let resp = answer(&parse(&req).unwrap(), from, plain, "punch").unwrap();
        assert_eq!(resp.len(), 20 + 12 + 8);
        // A padded request gets SOFTWARE and an answer padded to its size.
        let mut b = Builder::new(BINDING_REQUEST, &new_txid());
        b.attr(attr::PADDING, &[0; 1500]);
        let req = b.finish();
        assert_eq!(req.len(), 1524);
        let resp = answer(&parse(&req).unwrap(), from, info, "punch").unwrap();
        assert_eq!(resp.len(), req.len());
        let r = parse(&resp).unwrap();
        assert!(r.get(attr::SOFTWARE).is_some() && r.get(attr::PADDING).is_some());
    }

    #[test]
    fn a_padded_request_with_little_room_gets_padding_before_software() {
        // Found by the proptest: an IPv6 sender, both addresses, a short
        // padding; SOFTWARE used to fill the room and leave no PADDING.
        let from: SocketAddr = "[2001:db8::9]:5".parse().unwrap();
        let info = ResponderInfo {
            local: Some("[2001:db8::1]:3478".parse().unwrap()),
            other: Some("[2001:db8::2]:3479".parse().unwrap()),
        };
        let mut b = Builder::new(BINDING_REQUEST, &new_txid());
        b.attr(attr::CHANGE_REQUEST, &[0; 4]);
        b.attr(attr::PADDING, &[0; 65]);
        b.attr(0x8000, &[0]);
        b.attr(0x8000, &[0]);
        let req = b.finish_with_fingerprint();
        let resp = answer(&parse(&req).unwrap(), from, info, "punch-server 0.1.0").unwrap();
        assert!(resp.len() <= req.len() && resp.len() + 8 > req.len());
        assert!(parse(&resp).unwrap().get(attr::PADDING).is_some());
    }

    #[test]
    fn unknown_required_attribute_gets_420() {
        let mut b = Builder::new(BINDING_REQUEST, &new_txid());
        b.attr(0x7777, &[1, 2, 3, 4]);
        b.attr(0x8999, &[1]); // comprehension-optional: ignored
        let req = b.finish_with_fingerprint();
        let resp = answer(
            &parse(&req).unwrap(),
            "192.0.2.1:1".parse().unwrap(),
            ResponderInfo {
                local: None,
                other: None,
            },
            "x",
        )
        .unwrap();
        let r = parse(&resp).unwrap();
        assert_eq!(r.msg_type, BINDING_ERROR);
        assert_eq!(r.get(attr::ERROR_CODE).unwrap()[2..4], [4, 20]);
        assert_eq!(r.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x77, 0x77]);
    }

    #[test]
    fn classic_rfc3489_requests_get_mapped_address() {
        let mut txid = [7u8; 16];
        txid[0] = 1;
        let req = Builder::new(BINDING_REQUEST, &txid).finish();
        let from: SocketAddr = "192.0.2.9:5000".parse().unwrap();
        let resp = answer(
            &parse(&req).unwrap(),
            from,
            ResponderInfo {
                local: None,
                other: None,
            },
            "x",
        )
        .unwrap();
        let r = parse(&resp).unwrap();
        assert!(!r.has_cookie);
        assert_eq!(r.mapped_address(), Some(from));
    }

    #[test]
    fn bad_fingerprint_and_truncation_are_errors() {
        let mut req = binding_request(&new_txid(), true, false);
        let n = req.len();
        req[n - 1] ^= 1;
        assert_eq!(parse(&req), Err(StunError::BadFingerprint));
        let req = binding_request(&new_txid(), false, false);
        assert!(parse(&req[..req.len() - 4]).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_parse_to_ok_or_err(mut d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&d);
            if d.len() >= 20 {
                d[0] = 0; d[1] = 1;
                let l = ((d.len() - 20) & !3) as u16;
                d.truncate(20 + l as usize);
                d[2..4].copy_from_slice(&l.to_be_bytes());
                d[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                if let Ok(m) = parse(&d) {
                    let _ = m.mapped_address();
                    let _ = answer(&m, "192.0.2.1:1".parse().unwrap(), ResponderInfo { local: None, other: None }, "x");
                }
            }
        }
    }
}
