//! What one agent reads from another on a peer stream: the request header,
//! the reply to a refusable request, the file list, a page of it and a file
//! header, each
//! as a length-prefixed frame under the limit the agent reads it with (the
//! bytes split at arbitrary points, as a stream delivers them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use punch_protocol::codec::{self, FrameDecoder};
use punch_protocol::peer::{
    FileHeader, FileList, FileListPage, PeerReply, PeerRequest, VerifiedHeader, MAX_FILE_LIST_FRAME,
    MAX_FILE_LIST_PAGE, MAX_PEER_HEADER,
};
use serde::de::DeserializeOwned;

/// Reads one frame the way `punch_net::read_frame` does.
fn read_frame<T: DeserializeOwned>(d: &[u8], max: usize) -> Option<T> {
    let prefix: [u8; 4] = d.get(..4)?.try_into().ok()?;
    let len = codec::check_len(prefix, max).ok()?;
    assert!(len <= max);
    codec::decode_body(d.get(4..4 + len)?).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, d)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            if let Some(r) = read_frame::<PeerRequest>(d, MAX_PEER_HEADER) {
                let f = codec::encode_frame(&r).expect("re-encodes");
                assert_eq!(read_frame::<PeerRequest>(&f, MAX_PEER_HEADER), Some(r));
            }
        }
        1 => {
            let _ = read_frame::<PeerReply>(d, MAX_PEER_HEADER);
        }
        2 => {
            let _ = read_frame::<FileList>(d, MAX_FILE_LIST_FRAME);
        }
        3 => {
            let _ = read_frame::<FileHeader>(d, MAX_PEER_HEADER);
            let _ = read_frame::<VerifiedHeader>(d, MAX_PEER_HEADER);
        }
        _ => {
            if let Some(p) = read_frame::<FileListPage>(d, MAX_FILE_LIST_PAGE) {
                let f = codec::encode_frame(&p).expect("re-encodes");
                assert_eq!(read_frame::<FileListPage>(&f, MAX_FILE_LIST_PAGE), Some(p));
            }
        }
    }
    // The same bytes arriving in pieces.
    let mut dec = FrameDecoder::default();
    for piece in d.chunks(1 + which as usize % 13) {
        if dec.push(piece).is_err() {
            break;
        }
        while let Ok(Some(_)) = dec.next_frame::<PeerReply>() {}
    }
});
