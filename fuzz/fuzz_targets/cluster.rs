//! Messages between cluster servers (Redis pub/sub and worker keys): every
//! decoder on arbitrary bytes; what decodes re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use punch_protocol::cluster::{parse_worker_value, worker_value, Bus, SharedEvent};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Bus::decode(data) {
        assert_eq!(Bus::decode(&m.encode()).as_ref(), Ok(&m));
    }
    let _ = SharedEvent::decode(data);
    if let Ok((server, info)) = parse_worker_value(data) {
        let again = parse_worker_value(&worker_value(&server, &info)).expect("re-encodes");
        assert_eq!(again, (server, info));
    }
});
