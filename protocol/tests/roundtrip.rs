//! Round trips of the wire messages, decode(encode(x)) == x, over generated
//! values (the fuzz targets cover arbitrary bytes), and the STUN responder's
//! no-amplification bound.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use punch_protocol::allocator::Allocator;
use punch_protocol::cluster::{Bus, Introduced, PeerCard, Refusal};
use punch_protocol::codec::{self, FrameDecoder};
use punch_protocol::peer::{
    FileEntry, FileHeader, FileList, FileListPage, PeerReply, PeerRequest, VerifiedHeader,
};
use punch_protocol::probe::Probe;
use punch_protocol::relay::{self, EndReason, Frame};
use punch_protocol::signal::*;
use punch_protocol::stun::{self, attr, Builder, ResponderInfo};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

/// Worker ids the validators accept.
fn id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Controlling), Just(Role::Controlled)]
}

fn candidate() -> impl Strategy<Value = Candidate> {
    let kind = prop_oneof![
        Just(CandidateKind::Local),
        Just(CandidateKind::ServerReflexive),
        Just(CandidateKind::Stun),
        Just(CandidateKind::Mapped),
        Just(CandidateKind::PeerReflexive),
        Just(CandidateKind::Predicted),
    ];
    (addr(), kind).prop_map(|(addr, kind)| Candidate { addr, kind })
}

fn behaviour() -> impl Strategy<Value = NatBehaviour> {
    prop_oneof![
        Just(NatBehaviour::Unknown),
        Just(NatBehaviour::EndpointIndependent),
        Just(NatBehaviour::AddressDependent),
        Just(NatBehaviour::AddressAndPortDependent),
    ]
}

fn nat() -> impl Strategy<Value = NatClass> {
    (any::<bool>(), behaviour(), behaviour(), any::<bool>()).prop_map(
        |(public, mapping, filtering, port_preserved)| NatClass {
            public,
            mapping,
            filtering,
            port_preserved,
        },
    )
}

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), 0..4)
}

fn worker() -> impl Strategy<Value = WorkerInfo> {
    (
        id(),
        prop_oneof![Just(Transport::Udp), Just(Transport::Tcp)],
        option::of(text()),
        vec(text(), 0..3),
        pairs(),
        prop_oneof![Just(WorkerState::Online), Just(WorkerState::Stale)],
        addr(),
        option::of(nat()),
        any::<u64>(),
    )
        .prop_map(
            |(id, transport, kind, tags, metadata, state, observed, nat, since_ms)| WorkerInfo {
                id,
                transport,
                kind,
                tags,
                metadata,
                state,
                observed,
                nat,
                since_ms,
            },
        )
}

fn path() -> impl Strategy<Value = PathKind> {
    prop_oneof![
        Just(PathKind::Direct),
        Just(PathKind::Relayed),
        Just(PathKind::Failed)
    ]
}

fn query() -> impl Strategy<Value = Query> {
    prop_oneof![
        (option::of(text()), option::of(text())).prop_map(|(kind, tag)| Query::List { kind, tag }),
        id().prop_map(|id| Query::Get { id }),
        text().prop_map(|kind| Query::Discover { kind }),
        (id(), any::<u32>()).prop_map(|(id, timeout_ms)| Query::Wait { id, timeout_ms }),
    ]
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    let hello = (
        any::<u16>(),
        id(),
        any::<[u8; 32]>(),
        option::of(any::<[u8; 32]>()),
        any::<bool>(),
        vec(candidate(), 0..4),
        pairs(),
        option::of(text()),
        vec(text(), 0..3),
    )
        .prop_map(
            |(
                version,
                worker_id,
                public_key,
                token_proof,
                ephemeral,
                local,
                metadata,
                kind,
                tags,
            )| {
                ClientMsg::Hello(Hello {
                    version,
                    worker_id,
                    public_key,
                    token_proof,
                    ephemeral,
                    local_candidates: local,
                    metadata,
                    kind,
                    tags,
                })
            },
        );
    let outcome = (
        any::<u64>(),
        path(),
        any::<u32>(),
        option::of(addr()),
        any::<bool>(),
    )
        .prop_map(|(s, path, connect_ms, remote, via_mapped)| {
            ClientMsg::Outcome(Outcome {
                session: SessionId(s),
                path,
                connect_ms,
                remote,
                via_mapped,
            })
        });
    prop_oneof![
        hello,
        (any::<u32>(), id()).prop_map(|(req, target)| ClientMsg::Connect { req, target }),
        outcome,
        any::<u32>().prop_map(|req| ClientMsg::Ping { req }),
        vec(candidate(), 0..4).prop_map(|local| ClientMsg::Candidates { local }),
        nat().prop_map(ClientMsg::Nat),
        (any::<u32>(), query()).prop_map(|(req, query)| ClientMsg::Query { req, query }),
        Just(ClientMsg::Bye),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadVersion),
        Just(ErrorCode::BadToken),
        Just(ErrorCode::IdTaken),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::UnknownWorker),
        Just(ErrorCode::WorkerOffline),
        Just(ErrorCode::SelfConnect),
        Just(ErrorCode::Malformed),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::Internal),
        Just(ErrorCode::Timeout),
    ]
}

fn offer() -> impl Strategy<Value = Offer> {
    (
        (
            option::of(any::<u32>()),
            any::<u64>(),
            any::<[u8; 32]>(),
            role(),
        ),
        (id(), any::<[u8; 32]>(), vec(candidate(), 0..4)),
        (
            any::<u32>(),
            any::<bool>(),
            option::of(nat()),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((req, s, secret, role), (peer_id, peer_key, cands), (start, relay, nat, tcp))| {
                Offer {
                    req,
                    session: SessionId(s),
                    secret,
                    role,
                    peer_id,
                    peer_key,
                    peer_candidates: cands,
                    start_in_ms: start,
                    relay,
                    peer_nat: nat,
                    peer_tcp_only: tcp,
                    // Not in Offer's encoding (see OfferWithAllocator).
                    peer_allocator: None,
                }
            },
        )
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<u16>(), addr())
            .prop_map(|(version, observed)| ServerMsg::Welcome { version, observed }),
        (option::of(any::<u32>()), error_code(), text())
            .prop_map(|(req, code, message)| ServerMsg::Error { req, code, message }),
        offer().prop_map(ServerMsg::Offer),
        (offer(), allocator()).prop_map(|(offer, peer_allocator)| {
            ServerMsg::OfferWithAllocator {
                offer,
                peer_allocator,
            }
        }),
        any::<u32>().prop_map(|req| ServerMsg::Pong { req }),
        addr().prop_map(|observed| ServerMsg::AddressChanged { observed }),
        (any::<u32>(), vec(worker(), 0..3))
            .prop_map(|(req, workers)| ServerMsg::Workers { req, workers }),
    ]
}

fn peer_request() -> impl Strategy<Value = PeerRequest> {
    prop_oneof![
        Just(PeerRequest::Echo),
        Just(PeerRequest::Sink),
        any::<u32>().prop_map(|millis| PeerRequest::Source { millis }),
        (text(), any::<bool>())
            .prop_map(|(target, check_only)| PeerRequest::Forward { target, check_only }),
        Just(PeerRequest::ListFiles),
        (text(), any::<u64>()).prop_map(|(name, offset)| PeerRequest::GetFile { name, offset }),
        text().prop_map(|protocol| PeerRequest::Open { protocol }),
        Just(PeerRequest::ListFilesPaged),
        (text(), any::<u64>()).prop_map(|(name, offset)| PeerRequest::GetVerified { name, offset }),
        text().prop_map(|name| PeerRequest::GetOutboard { name }),
    ]
}

fn card() -> impl Strategy<Value = PeerCard> {
    (
        id(),
        any::<[u8; 32]>(),
        vec(candidate(), 0..4),
        option::of(nat()),
        any::<bool>(),
        option::of(addr()),
        option::of(allocator()),
    )
        .prop_map(
            |(id, key, candidates, nat, tcp_only, seen, allocator)| PeerCard {
                id,
                key,
                candidates,
                nat,
                tcp_only,
                seen: seen.map(|a| a.ip()),
                allocator,
            },
        )
}

fn allocator() -> impl Strategy<Value = Allocator> {
    prop_oneof![
        Just(Allocator::Unknown),
        Just(Allocator::Preserving),
        any::<i16>().prop_map(|stride| Allocator::Sequential { stride }),
        (any::<u16>(), any::<u16>()).prop_map(|(base, size)| Allocator::Block { base, size }),
        Just(Allocator::Random),
    ]
}

fn bus() -> impl Strategy<Value = Bus> {
    let intro = (any::<u64>(), any::<[u8; 32]>(), option::of(addr()), card()).prop_map(
        |(session, secret, relay, target)| Introduced {
            session,
            secret,
            relay,
            target,
        },
    );
    let refusal = (error_code(), text()).prop_map(|(code, message)| Refusal { code, message });
    prop_oneof![
        (
            any::<u64>(),
            "[0-9a-f]{16}",
            option::of(addr()),
            card(),
            id()
        )
            .prop_map(|(corr, from, relay, requester, target)| Bus::Connect {
                corr,
                from,
                relay,
                requester,
                target,
            }),
        (any::<u64>(), intro).prop_map(|(corr, i)| Bus::Answer {
            corr,
            result: Ok(i)
        }),
        (any::<u64>(), refusal).prop_map(|(corr, r)| Bus::Answer {
            corr,
            result: Err(r)
        }),
    ]
}

/// Encodes `m` as a frame and reads it back, whole and byte by byte.
fn frame_round_trip<T>(m: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let f = codec::encode_frame(m).unwrap();
    assert_eq!(&codec::decode_body::<T>(&f[4..]).unwrap(), m);
    let mut d = FrameDecoder::default();
    let mut got = None;
    for b in &f {
        d.push(std::slice::from_ref(b)).unwrap();
        if let Some(x) = d.next_frame::<T>().unwrap() {
            got = Some(x);
        }
    }
    assert_eq!(got.as_ref(), Some(m));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn client_messages_round_trip(m in client_msg()) {
        frame_round_trip(&m);
        // Over the WebSocket channel too.
        let w = punch_protocol::ws::encode_signal(&m);
        match punch_protocol::ws::parse(&w).unwrap() {
            punch_protocol::ws::WsFrame::Signal(b) => {
                prop_assert_eq!(punch_protocol::ws::decode::<ClientMsg>(b).unwrap(), m);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn server_messages_round_trip(m in server_msg()) {
        frame_round_trip(&m);
    }

    #[test]
    fn peer_messages_round_trip(
        r in peer_request(),
        ok in any::<bool>(),
        message in text(),
        files in vec((text(), any::<u64>(), "[0-9a-f]{64}"), 0..5),
    ) {
        frame_round_trip(&r);
        frame_round_trip(&PeerReply { ok, message: message.clone() });
        let files: Vec<FileEntry> = files
            .into_iter()
            .map(|(name, size, blake3)| FileEntry { name, size, blake3 })
            .collect();
        if let Some(f) = files.first() {
            frame_round_trip(&FileHeader { size: f.size, blake3: f.blake3.clone() });
            frame_round_trip(&VerifiedHeader {
                size: f.size,
                blake3: f.blake3.clone(),
                block_log: f.size as u8,
            });
        }
        frame_round_trip(&FileListPage { files: files.clone(), more: ok, problems: vec![message] });
        frame_round_trip(&FileList { files });
    }

    #[test]
    fn probes_round_trip(
        secret in any::<[u8; 32]>(),
        role in role(),
        session in any::<u64>(),
        txid in any::<u64>(),
        observed in option::of(addr()),
    ) {
        let p = Probe::ping(role, SessionId(session), txid);
        let p = match observed {
            Some(a) => p.pong_to(role, a),
            None => p,
        };
        let d = p.encode(&secret);
        prop_assert!(punch_protocol::probe::is_probe(&d));
        prop_assert_eq!(Probe::peek_session(&d).unwrap(), SessionId(session));
        prop_assert_eq!(Probe::decode(&d, &secret).unwrap(), p);
        // Another secret does not verify.
        let mut other = secret;
        other[0] ^= 1;
        prop_assert!(Probe::decode(&d, &other).is_err());
    }

    #[test]
    fn relay_frames_round_trip(
        secret in any::<[u8; 32]>(),
        session in any::<u64>(),
        side in role(),
        nonce in any::<u64>(),
        payload in vec(any::<u8>(), 0..200),
        items in vec(vec(any::<u8>(), 0..100), 0..6),
    ) {
        let s = SessionId(session);
        let bind = relay::encode_bind_request(&secret, s, side, nonce);
        let f = relay::parse(&bind).unwrap();
        let ok = matches!(f, Frame::Bind { session: x, side: y, nonce: n, .. } if x == s && y == side && n == nonce);
        prop_assert!(ok, "{:?}", f);
        prop_assert!(relay::verify_bind(&f, &secret));
        let ok = relay::encode_bind_ok(&secret, s, side, nonce);
        let f = relay::parse(&ok).unwrap();
        let ok = matches!(f, Frame::BindOk { session: x, side: y, nonce: n, .. } if x == s && y == side && n == nonce);
        prop_assert!(ok, "{:?}", f);
        prop_assert!(relay::verify_bind(&f, &secret));
        for reason in [EndReason::Bytes, EndReason::Time] {
            let e = relay::encode_ended(&secret, s, reason, nonce);
            let f = relay::parse(&e).unwrap();
            let ok = matches!(f, Frame::Ended { session: x, reason: r, nonce: n, .. } if x == s && r == reason && n == nonce);
        prop_assert!(ok, "{:?}", f);
            prop_assert!(relay::verify_bind(&f, &secret));
        }
        let mut data = vec![0u8; relay::DATA_HEADER];
        relay::write_data_header(&mut data, s);
        data.extend_from_slice(&payload);
        prop_assert_eq!(relay::parse(&data).unwrap(), Frame::Data { session: s, payload: &payload });
        let mut batch = Vec::new();
        relay::start_batch(&mut batch, s);
        for i in &items {
            relay::push_batch_item(&mut batch, i);
        }
        let Frame::Batch { session: x, body } = relay::parse(&batch).unwrap() else {
            panic!("not a batch");
        };
        prop_assert_eq!(x, s);
        let got: Vec<&[u8]> = relay::batch_items(body).unwrap().into_iter().map(|r| &body[r]).collect();
        let want: Vec<&[u8]> = items.iter().map(|i| i.as_slice()).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn cluster_messages_round_trip(m in bus()) {
        prop_assert_eq!(Bus::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn worker_values_round_trip(server in "[0-9a-f]{16}", w in worker()) {
        let v = punch_protocol::cluster::worker_value(&server, &w);
        prop_assert_eq!(punch_protocol::cluster::parse_worker_value(&v).unwrap(), (server, w));
    }

    #[test]
    fn stun_messages_round_trip(
        txid in any::<[u8; 12]>(),
        attrs in vec((0x8000u16..0xffff, vec(any::<u8>(), 0..40)), 0..6),
        change_ip in any::<bool>(),
        change_port in any::<bool>(),
        fingerprint in any::<bool>(),
    ) {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        t[4..].copy_from_slice(&txid);
        let attrs: Vec<_> = attrs.into_iter().filter(|(k, _)| *k != attr::FINGERPRINT).collect();
        let mut b = Builder::new(stun::BINDING_REQUEST, &t);
        for (k, v) in &attrs {
            b.attr(*k, v);
        }
        let m = if fingerprint { b.finish_with_fingerprint() } else { b.finish() };
        prop_assert!(stun::looks_like_stun(&m));
        let p = stun::parse(&m).unwrap();
        prop_assert_eq!(p.msg_type, stun::BINDING_REQUEST);
        prop_assert_eq!(p.txid, t);
        prop_assert_eq!(p.len, m.len());
        let got: Vec<(u16, &[u8])> = p.attrs.iter().copied().filter(|(k, _)| *k != attr::FINGERPRINT).collect();
        let want: Vec<(u16, &[u8])> = attrs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        prop_assert_eq!(got, want);
        let req = stun::binding_request(&t, change_ip, change_port);
        prop_assert_eq!(stun::parse(&req).unwrap().change_request(), (change_ip, change_port));
    }

    /// The mapped address the server writes is the one a client reads.
    #[test]
    fn stun_answers_carry_the_sender(from in addr(), txid in any::<[u8; 12]>(), classic in any::<bool>()) {
        let mut t = [0u8; 16];
        t[4..].copy_from_slice(&txid);
        if !classic {
            t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        } else if t[..4] == stun::MAGIC_COOKIE.to_be_bytes() {
            t[0] ^= 1;
        }
        let req = Builder::new(stun::BINDING_REQUEST, &t).finish();
        let info = ResponderInfo { local: None, other: None };
        let resp = stun::answer(&stun::parse(&req).unwrap(), from, info, "x").unwrap();
        let r = stun::parse(&resp).unwrap();
        prop_assert_eq!(r.msg_type, stun::BINDING_SUCCESS);
        prop_assert_eq!(r.txid, t);
        let want = SocketAddr::new(from.ip().to_canonical(), from.port());
        prop_assert_eq!(r.mapped_address(), Some(want));
    }

    /// No amplification: an answer is never larger than its request, except
    /// for the least it must carry (header, mapped address, FINGERPRINT for
    /// RFC 8489 clients; the 420 error and its list of unknown attributes).
    #[test]
    fn stun_answers_are_no_larger_than_allowed(
        from in addr(),
        txid in any::<[u8; 12]>(),
        classic in any::<bool>(),
        change in proptest::option::of(0u8..8),
        padding in proptest::option::of(0usize..1400),
        unknown in vec(0x0030u16..0x7fff, 0..12),
        optional in vec((0x8000u16..0xffff, vec(any::<u8>(), 0..30)), 0..4),
        fingerprint in any::<bool>(),
        alt in any::<bool>(),
    ) {
        let mut t = [0u8; 16];
        t[4..].copy_from_slice(&txid);
        if !classic {
            t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        } else if t[..4] == stun::MAGIC_COOKIE.to_be_bytes() {
            t[0] ^= 1;
        }
        let mut b = Builder::new(stun::BINDING_REQUEST, &t);
        if let Some(c) = change {
            b.attr(attr::CHANGE_REQUEST, &[0, 0, 0, c << 1]);
        }
        if let Some(n) = padding {
            b.attr(attr::PADDING, &vec![0; n]);
        }
        let unknown: Vec<u16> = unknown
            .into_iter()
            .filter(|k| ![attr::PADDING, attr::RESPONSE_PORT, attr::USERHASH, attr::PASSWORD_ALGORITHM, attr::MESSAGE_INTEGRITY_SHA256].contains(k))
            .collect();
        for k in &unknown {
            b.attr(*k, &[0; 4]);
        }
        for (k, v) in optional.iter().filter(|(k, _)| *k != attr::FINGERPRINT) {
            b.attr(*k, v);
        }
        let req = if fingerprint && !classic { b.finish_with_fingerprint() } else { b.finish() };
        let Ok(m) = stun::parse(&req) else {
            // Too big to parse: never answered.
            prop_assert!(req.len() > stun::MAX_MESSAGE);
            return Ok(());
        };
        let info = ResponderInfo {
            local: Some(if from.is_ipv4() { "203.0.113.1:3478".parse().unwrap() } else { "[2001:db8::1]:3478".parse().unwrap() }),
            other: alt.then(|| if from.is_ipv4() { "203.0.113.2:3479".parse().unwrap() } else { "[2001:db8::2]:3479".parse().unwrap() }),
        };
        let resp = stun::answer(&m, from, info, "punch-server 0.1.0").unwrap();
        let r = stun::parse(&resp).unwrap();
        let fp = if classic { 0 } else { 8 };
        let a = |x: SocketAddr| 4 + if x.ip().to_canonical().is_ipv4() { 8 } else { 20 };
        let least = if r.msg_type == stun::BINDING_ERROR {
            let k = m.unknown_required().len().min(8);
            20 + 4 + 24 + 4 + (2 * k).div_ceil(4) * 4 + fp
        } else {
            let rfc5780 = info.other.map_or(0, |o| a(o) + a(info.local.unwrap()));
            20 + a(from) + rfc5780 + fp
        };
        prop_assert!(
            resp.len() <= req.len().max(least),
            "answer of {} bytes to a request of {} (least answer {})", resp.len(), req.len(), least
        );
        if r.msg_type != stun::BINDING_SUCCESS {
            return Ok(());
        }
        // RFC 5780: with an alternate address, every answer names it and
        // the address it came from, whatever the request's size.
        let (other_t, origin_t) = if classic {
            (attr::CHANGED_ADDRESS, attr::SOURCE_ADDRESS)
        } else {
            (attr::OTHER_ADDRESS, attr::RESPONSE_ORIGIN)
        };
        if let Some(o) = info.other {
            prop_assert_eq!(r.get(other_t).and_then(|v| stun::decode_address(v, None)), Some(o));
            prop_assert_eq!(r.get(origin_t).and_then(|v| stun::decode_address(v, None)), info.local);
        }
        // A padded request gets an answer padded to its size (to the 4-byte
        // grain), once the request is larger than the least answer.
        if padding.is_some() && req.len() >= least + 8 {
            prop_assert!(r.get(attr::PADDING).is_some());
            prop_assert!(resp.len() + 8 > req.len(), "{} bytes to a request of {}", resp.len(), req.len());
        }
    }
}
