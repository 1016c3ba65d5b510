//! Every other decoder that sees network bytes: signaling frames (both
//! directions, incremental), peer stream headers, probes, and relay frames
//! through the relay table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use punch_protocol::codec::{self, FrameDecoder};
use punch_protocol::peer::PeerRequest;
use punch_protocol::probe::{self, Probe};
use punch_protocol::relay::{self, RelayLimits, RelayTable};
use punch_protocol::signal::{ClientMsg, ServerMsg, SessionId};
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode_body::<ClientMsg>(data);
    let _ = codec::decode_body::<ServerMsg>(data);
    let _ = codec::decode_body::<PeerRequest>(data);
    let mut d = FrameDecoder::default();
    for chunk in data.chunks(7) {
        if d.push(chunk).is_err() {
            break;
        }
        while let Ok(Some(_)) = d.next_frame::<ClientMsg>() {}
    }
    if probe::is_probe(data) {
        let _ = Probe::peek_session(data);
        let _ = Probe::decode(data, &[7; 32]);
    }
    let _ = relay::parse(data);
    let now = Instant::now();
    let mut t = RelayTable::new(RelayLimits::default());
    let _ = t.insert(SessionId(1), [7; 32], now);
    let from: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let _ = t.handle(from, data, now);
    let _ = t.handle(relay::Endpoint::Tcp(3), data, now);
    // WebSocket messages of the TCP channel.
    match punch_protocol::ws::parse(data) {
        Ok(punch_protocol::ws::WsFrame::Signal(b)) => {
            let _ = punch_protocol::ws::decode::<punch_protocol::signal::ClientMsg>(b);
            let _ = punch_protocol::ws::decode::<punch_protocol::signal::ServerMsg>(b);
        }
        Ok(punch_protocol::ws::WsFrame::Auth(b)) => {
            let _ = punch_protocol::ws::decode::<punch_protocol::ws::WsAuth>(b);
        }
        _ => {}
    }
});
