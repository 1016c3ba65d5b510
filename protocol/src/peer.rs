//! Requests on agent-to-agent streams.
//!
//! Each bidirectional stream a peer opens starts with one [`crate::codec`]
//! frame holding a [`PeerRequest`]; what follows depends on the request.

use serde::{Deserialize, Serialize};

/// Largest peer request header.
pub const MAX_PEER_HEADER: usize = 4096;

/// What the opener of a stream wants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Echo every byte back until the opener finishes its side.
    Echo,
    /// Read and discard everything until the opener finishes, then answer
    /// with the byte count (8 bytes, big-endian): upload throughput.
    Sink,
    /// Send bytes for this many milliseconds (at most [`MAX_SOURCE_MS`]),
    /// then finish: download throughput.
    Source { millis: u32 },
    /// Connect to `target` (`IP:PORT`, which must be on the peer's forward
    /// allow list) and carry the stream's bytes to and from it; the peer
    /// answers with a [`PeerReply`] first. `check_only` asks whether it
    /// would be allowed, without connecting.
    Forward { target: String, check_only: bool },
    /// List the shared files; answered with a [`PeerReply`], then a
    /// [`FileList`] frame.
    ListFiles,
    /// Send shared file `name` from byte `offset`: a [`PeerReply`], a
    /// [`FileHeader`] frame, then the bytes until the stream finishes.
    GetFile { name: String, offset: u64 },
    /// Hand the stream to the application protocol `protocol` (at most
    /// [`MAX_PROTOCOL_NAME`] bytes) registered on the peer; the peer answers
    /// with a [`PeerReply`] first, refused when it has no such protocol.
    /// Agents older than this variant refuse the stream.
    Open { protocol: String },
    /// List the shared files in pages: a [`PeerReply`], then
    /// [`FileListPage`] frames until one has `more: false`. A share of any
    /// allowed size fits (one [`FileList`] frame holds only ~700 entries).
    /// Agents older than this variant reset the stream; askers then fall
    /// back to [`PeerRequest::ListFiles`].
    ListFilesPaged,
    /// Send shared file `name` as a BLAKE3-verified stream: a
    /// [`PeerReply`], a [`VerifiedHeader`], then the bao encoding (pre-order,
    /// chunk groups of 2^[`BAO_BLOCK_LOG`] KiB) of the file from byte
    /// `offset` (a multiple of [`BAO_GROUP`]) to its end: each group comes
    /// after the parent hashes that prove it, so the asker checks it before
    /// writing it. Agents older than this variant reset the stream; askers
    /// then fall back to [`PeerRequest::GetFile`].
    GetVerified { name: String, offset: u64 },
    /// Send the outboard of shared file `name` (its hash tree, without the
    /// data: 64 bytes for every chunk group but one): a [`PeerReply`], a
    /// [`VerifiedHeader`], then the outboard in pre-order. A resuming asker
    /// checks the bytes it already has against it before it asks for more.
    GetOutboard { name: String },
}

/// The protocol that serves the file requests ([`PeerRequest::ListFiles`],
/// [`PeerRequest::ListFilesPaged`], [`PeerRequest::GetFile`]).
pub const FILES_PROTOCOL: &str = "punch/files";
/// The protocol that serves [`PeerRequest::Forward`].
pub const FORWARD_PROTOCOL: &str = "punch/forward";
/// The protocol that serves the throughput requests ([`PeerRequest::Sink`],
/// [`PeerRequest::Source`]).
pub const BENCH_PROTOCOL: &str = "punch/bench";

impl PeerRequest {
    /// The protocol this request is for: the named one of
    /// [`PeerRequest::Open`], the protocol of a request that predates
    /// `Open` ([`FILES_PROTOCOL`], [`FORWARD_PROTOCOL`], [`BENCH_PROTOCOL`]),
    /// or `None` for [`PeerRequest::Echo`], which every agent serves itself
    /// (it is how peers measure a round trip).
    pub fn protocol(&self) -> Option<&str> {
        match self {
            PeerRequest::Echo => None,
            PeerRequest::Sink | PeerRequest::Source { .. } => Some(BENCH_PROTOCOL),
            PeerRequest::Forward { .. } => Some(FORWARD_PROTOCOL),
            PeerRequest::ListFiles
            | PeerRequest::ListFilesPaged
            | PeerRequest::GetFile { .. }
            | PeerRequest::GetVerified { .. }
            | PeerRequest::GetOutboard { .. } => Some(FILES_PROTOCOL),
            PeerRequest::Open { protocol } => Some(protocol),
        }
    }

    /// Does the serving side answer this request with a [`PeerReply`]
    /// first? (The throughput requests start with their bytes.)
    pub fn has_reply(&self) -> bool {
        !matches!(
            self,
            PeerRequest::Echo | PeerRequest::Sink | PeerRequest::Source { .. }
        )
    }
}

/// Longest application protocol name in [`PeerRequest::Open`].
pub const MAX_PROTOCOL_NAME: usize = 64;

/// Most entries in a [`FileList`].
pub const MAX_FILES: usize = 10_000;
/// Longest shared file name (a relative path with `/`).
pub const MAX_FILE_NAME: usize = 1024;
/// Largest [`FileList`] frame.
pub const MAX_FILE_LIST_FRAME: usize = 4 << 20;
/// Largest [`FileListPage`] frame (one ordinary frame).
pub const MAX_FILE_LIST_PAGE: usize = crate::codec::MAX_FRAME;
/// Most problems the last [`FileListPage`] reports.
pub const MAX_LIST_PROBLEMS: usize = 16;
/// Longest problem message in a [`FileListPage`].
pub const MAX_LIST_PROBLEM: usize = 512;

/// One shared file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path inside the shared directory, `/`-separated.
    pub name: String,
    pub size: u64,
    /// BLAKE3 of the whole file, hex.
    pub blake3: String,
}

/// The shared files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub files: Vec<FileEntry>,
}

/// One page of an answer to [`PeerRequest::ListFilesPaged`]. A
/// [`FileEntry::blake3`] that is empty means "not hashed yet": the sharer
/// hashes lazily, and a download verifies the whole file anyway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListPage {
    pub files: Vec<FileEntry>,
    /// More pages follow.
    pub more: bool,
    /// On the last page: what the sharer could not list (unreadable
    /// directories, files it could not stat), at most
    /// [`MAX_LIST_PROBLEMS`] of [`MAX_LIST_PROBLEM`] bytes, and a note when
    /// the share holds more than [`MAX_FILES`] files.
    pub problems: Vec<String>,
}

/// What precedes a file's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// The whole file's size.
    pub size: u64,
    /// BLAKE3 of the whole file, hex.
    pub blake3: String,
}

/// Chunk groups of verified streams are 2^this 1 KiB chunks (16 KiB): the
/// outboard is 64 bytes a group, 0.4 % of the file.
pub const BAO_BLOCK_LOG: u8 = 4;
/// Bytes in a chunk group of a verified stream.
pub const BAO_GROUP: u64 = 1024 << BAO_BLOCK_LOG;

/// What precedes a verified stream or an outboard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedHeader {
    /// The whole file's size.
    pub size: u64,
    /// BLAKE3 of the whole file, hex: the root every group is checked
    /// against.
    pub blake3: String,
    /// log2 of the chunks in a group; always [`BAO_BLOCK_LOG`] today, and
    /// an asker refuses any other.
    pub block_log: u8,
}

/// The first frame of an answer to a request that can be refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReply {
    pub ok: bool,
    /// Why not, when refused.
    pub message: String,
}

/// Longest [`PeerRequest::Source`] a peer serves.
pub const MAX_SOURCE_MS: u32 = 60_000;
