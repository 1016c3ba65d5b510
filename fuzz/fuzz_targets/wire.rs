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
    let from = "198.51.100.7:40000".parse().unwrap();
    let _ = t.handle(from, data, now);
});
