//! Writes the seed corpus (fuzz/seeds/TARGET/NAME) from the real encoders:
//!   cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! Deterministic (fixed ids, keys and nonces), so a re-run after a wire
//! change shows up as a diff.

use punch_portmap::{natpmp, pcp};
use punch_protocol::cluster::{worker_value, Bus, Introduced, PeerCard, Refusal, SharedEvent};
use punch_protocol::codec;
use punch_protocol::peer::{
    FileEntry, FileHeader, FileList, FileListPage, PeerReply, PeerRequest,
};
use punch_protocol::probe::Probe;
use punch_protocol::relay::{self, EndReason};
use punch_protocol::signal::*;
use punch_protocol::stun::{self, attr, Builder};
use punch_protocol::ws;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let _ = std::fs::remove_dir_all(&dir);
    stun_seeds();
    wire_seeds();
    portmap_seeds();
    relay_seeds();
    cluster_seeds();
    peer_seeds();
}

fn stun_seeds() {
    let txid = {
        let mut t = [9u8; 16];
        t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        t
    };
    write(
        "stun",
        "binding",
        &stun::binding_request(&txid, false, false),
    );
    write(
        "stun",
        "change-ip-port",
        &stun::binding_request(&txid, true, true),
    );
    write(
        "stun",
        "bare-20",
        &Builder::new(stun::BINDING_REQUEST, &txid).finish(),
    );
    let mut b = Builder::new(stun::BINDING_REQUEST, &txid);
    b.attr(attr::CHANGE_REQUEST, &[0, 0, 0, 2]);
    b.attr(attr::PADDING, &[0; 64]);
    write("stun", "padded", &b.finish_with_fingerprint());
    let mut b = Builder::new(stun::BINDING_REQUEST, &txid);
    b.attr(0x7777, &[1, 2, 3, 4]);
    write("stun", "unknown-attr", &b.finish_with_fingerprint());
    let classic = [1u8; 16];
    write(
        "stun",
        "rfc3489",
        &Builder::new(stun::BINDING_REQUEST, &classic).finish(),
    );
    let info = stun::ResponderInfo {
        local: Some(addr("203.0.113.1:3478")),
        other: Some(addr("203.0.113.2:3479")),
    };
    for (name, from) in [
        ("answer-v4", "198.51.100.7:40000"),
        ("answer-v6", "[2001:db8::5]:9"),
    ] {
        let mut b = Builder::new(stun::BINDING_REQUEST, &txid);
        b.attr(attr::PADDING, &[0; 128]);
        let req = b.finish_with_fingerprint();
        let m = stun::parse(&req).unwrap();
        write(
            "stun",
            name,
            &stun::answer(&m, addr(from), info, "punch-seeds").unwrap(),
        );
    }
}

fn candidates() -> Vec<Candidate> {
    vec![
        Candidate {
            addr: addr("192.168.1.20:40000"),
            kind: CandidateKind::Local,
        },
        Candidate {
            addr: addr("[2001:db8::1]:40000"),
            kind: CandidateKind::ServerReflexive,
        },
    ]
}

fn nat() -> NatClass {
    NatClass {
        public: false,
        mapping: NatBehaviour::EndpointIndependent,
        filtering: NatBehaviour::AddressAndPortDependent,
        port_preserved: true,
    }
}

fn worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.into(),
        transport: Transport::Udp,
        kind: Some("gpu".into()),
        tags: vec!["eu".into()],
        metadata: vec![("k".into(), "v".into())],
        state: WorkerState::Online,
        observed: addr("203.0.113.5:4000"),
        nat: Some(nat()),
        since_ms: 1,
    }
}

fn wire_seeds() {
    let client = [
        ClientMsg::Hello(Hello {
            version: punch_protocol::PROTOCOL_VERSION,
            worker_id: "worker-a".into(),
            public_key: [3; 32],
            token_proof: Some([4; 32]),
            ephemeral: false,
            local_candidates: candidates(),
            metadata: vec![("gpu".into(), "a100".into())],
            kind: Some("trainer".into()),
            tags: vec!["eu".into()],
        }),
        ClientMsg::Connect {
            req: 1,
            target: "worker-b".into(),
        },
        ClientMsg::Outcome(Outcome {
            session: SessionId(7),
            path: PathKind::Relayed,
            connect_ms: 40,
            remote: Some(addr("203.0.113.9:5000")),
            via_mapped: false,
        }),
        ClientMsg::Nat(nat()),
        ClientMsg::Query {
            req: 2,
            query: Query::Wait {
                id: "worker-b".into(),
                timeout_ms: 1000,
            },
        },
    ];
    for (i, m) in client.iter().enumerate() {
        let f = codec::encode_frame(m).unwrap();
        write("wire", &format!("client-frame-{i}"), &f);
        write("wire", &format!("client-body-{i}"), &f[4..]);
    }
    let server = [
        ServerMsg::Welcome {
            version: punch_protocol::PROTOCOL_VERSION,
            observed: addr("203.0.113.5:4000"),
        },
        ServerMsg::Offer(Offer {
            req: Some(1),
            session: SessionId(7),
            secret: [5; 32],
            role: Role::Controlling,
            peer_id: "worker-b".into(),
            peer_key: [6; 32],
            peer_candidates: candidates(),
            start_in_ms: 0,
            relay: true,
            peer_nat: Some(nat()),
            peer_tcp_only: false,
        }),
        ServerMsg::Workers {
            req: 2,
            workers: vec![worker("worker-b")],
        },
    ];
    for (i, m) in server.iter().enumerate() {
        write(
            "wire",
            &format!("server-body-{i}"),
            &codec::encode_frame(m).unwrap()[4..],
        );
    }
    let ping = Probe::ping(Role::Controlling, SessionId(7), 42);
    write("wire", "probe-ping", &ping.encode(&[7; 32]));
    write(
        "wire",
        "probe-pong",
        &ping
            .pong_to(Role::Controlled, addr("198.51.100.7:40000"))
            .encode(&[7; 32]),
    );
    write(
        "wire",
        "relay-bind",
        &relay::encode_bind_request(&[7; 32], SessionId(1), Role::Controlling, 1),
    );
    write("wire", "ws-signal", &ws::encode_signal(&client[1]));
}

fn portmap_seeds() {
    let req = pcp::MapRequest::udp([7; 12], Ipv4Addr::new(192, 168, 1, 20), 40000, 7200);
    // A server's answer: the request with the R bit, a result, an epoch and
    // the assigned external address (RFC 6887 §11.1).
    let mut ok = req.encode().to_vec();
    ok[1] |= 0x80;
    ok[8..12].copy_from_slice(&1234u32.to_be_bytes());
    ok[12..24].fill(0);
    ok[42..44].copy_from_slice(&40001u16.to_be_bytes());
    ok[44..60].copy_from_slice(&Ipv4Addr::new(203, 0, 113, 5).to_ipv6_mapped().octets());
    write("portmap", "pcp-map-ok", &ok);
    let mut refused = ok[..24].to_vec();
    refused[3] = 2; // NOT_AUTHORIZED
    write("portmap", "pcp-refused", &refused);
    write("portmap", "pcp-request", &req.encode());
    let mut ext = vec![0u8, 128, 0, 0];
    ext.extend_from_slice(&99u32.to_be_bytes());
    ext.extend_from_slice(&[203, 0, 113, 5]);
    write("portmap", "natpmp-external", &ext);
    let r = natpmp::map_request(40000, 40000, 7200);
    let mut map = vec![0u8, 128 | r[1], 0, 0];
    map.extend_from_slice(&99u32.to_be_bytes());
    map.extend_from_slice(&r[4..6]);
    map.extend_from_slice(&40001u16.to_be_bytes());
    map.extend_from_slice(&r[8..12]);
    write("portmap", "natpmp-map", &map);
    write("portmap", "natpmp-request", &r);
}

fn relay_seeds() {
    // head: bit 0 binds side B first; the rest picks the stride. pick: two
    // bits per segment name its sender (0 A, 1 B, 2 a stranger).
    let secret = [7u8; 32];
    let s = SessionId(1);
    let mut data = vec![0u8; relay::DATA_HEADER + 27];
    relay::write_data_header(&mut data, s);
    let stride = data.len();
    let head = 1 | (((stride - 1) / 4) << 1) as u8;
    let mut seq = vec![head, 0b10_01_00_01];
    for _ in 0..4 {
        seq.extend_from_slice(&data);
    }
    write("relay", "data-both-bound", &seq);
    seq[0] &= !1;
    write("relay", "data-held", &seq);
    let bind = relay::encode_bind_request(&secret, s, Role::Controlled, 2);
    let head = 1 | (((bind.len() - 1) / 4) << 1) as u8;
    let mut rebind = vec![head & !1, 0b00_01];
    rebind.extend_from_slice(&bind);
    rebind.extend_from_slice(&relay::encode_ended(&secret, s, EndReason::Bytes, 3));
    write("relay", "bind-b", &rebind);
    let mut batch = Vec::new();
    relay::start_batch(&mut batch, s);
    relay::push_batch_item(&mut batch, b"first datagram");
    relay::push_batch_item(&mut batch, b"second");
    let mut b = vec![1 | ((batch.len().div_ceil(4)) << 1) as u8, 0];
    b.extend_from_slice(&batch);
    write("relay", "batch", &b);
}

fn cluster_seeds() {
    let card = PeerCard {
        id: "worker-a".into(),
        key: [3; 32],
        candidates: candidates(),
        nat: Some(nat()),
        tcp_only: false,
        seen: Some("203.0.113.7".parse().unwrap()),
    };
    let connect = Bus::Connect {
        corr: 9,
        from: "0123456789abcdef".into(),
        relay: Some(addr("203.0.113.1:3478")),
        requester: card.clone(),
        target: "worker-b".into(),
    };
    write("cluster", "connect", &connect.encode());
    let ok = Bus::Answer {
        corr: 9,
        result: Ok(Introduced {
            session: 7,
            secret: [5; 32],
            relay: None,
            target: card,
        }),
    };
    write("cluster", "answer-ok", &ok.encode());
    let refused = Bus::Answer {
        corr: 9,
        result: Err(Refusal {
            code: ErrorCode::WorkerOffline,
            message: "offline".into(),
        }),
    };
    write("cluster", "answer-refused", &refused.encode());
    let ev = SharedEvent {
        server: "0123456789abcdef".into(),
        event: "registered".into(),
        worker: "worker-a".into(),
        observed_addr: Some("203.0.113.5:4000".into()),
    };
    write("cluster", "event", &serde_json::to_vec(&ev).unwrap());
    write(
        "cluster",
        "worker-value",
        &worker_value("0123456789abcdef", &worker("worker-a")),
    );
}

fn peer_seeds() {
    let frame = |which: u8, body: Vec<u8>| {
        let mut v = vec![which];
        v.extend(body);
        v
    };
    let reqs = [
        PeerRequest::Echo,
        PeerRequest::Source { millis: 500 },
        PeerRequest::Forward {
            target: "127.0.0.1:8080".into(),
            check_only: true,
        },
        PeerRequest::GetFile {
            name: "dir/a.bin".into(),
            offset: 4096,
        },
        PeerRequest::ListFilesPaged,
        PeerRequest::GetVerified {
            name: "dir/a.bin".into(),
            offset: 16384,
        },
        PeerRequest::GetOutboard {
            name: "dir/a.bin".into(),
        },
    ];
    for (i, r) in reqs.iter().enumerate() {
        write(
            "peer",
            &format!("request-{i}"),
            &frame(0, codec::encode_frame(r).unwrap()),
        );
    }
    let reply = PeerReply {
        ok: false,
        message: "not allowed".into(),
    };
    write(
        "peer",
        "reply",
        &frame(1, codec::encode_frame(&reply).unwrap()),
    );
    let list = FileList {
        files: vec![FileEntry {
            name: "dir/a.bin".into(),
            size: 10,
            blake3: "ab".repeat(32),
        }],
    };
    write(
        "peer",
        "list",
        &frame(2, codec::encode_frame(&list).unwrap()),
    );
    let header = FileHeader {
        size: 10,
        blake3: "ab".repeat(32),
    };
    write(
        "peer",
        "header",
        &frame(3, codec::encode_frame(&header).unwrap()),
    );
    let page = FileListPage {
        files: vec![FileEntry {
            name: "dir/b.bin".into(),
            size: 7,
            blake3: String::new(),
        }],
        more: false,
        problems: vec!["cannot read dir/locked: permission denied".into()],
    };
    write(
        "peer",
        "page",
        &frame(4, codec::encode_frame(&page).unwrap()),
    );
}
