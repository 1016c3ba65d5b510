//! Read-only file sharing over a peer connection: `serve --share DIR`,
//! `files TARGET`, `get TARGET NAME`. Names are relative paths inside the
//! shared directory; nothing outside it is ever read (no `..`, no absolute
//! paths, no symlinks leading out: every path is resolved and must stay
//! under the resolved root). Downloads go to `NAME.part`, resume from its
//! length, and are renamed into place only after the BLAKE3 of the whole
//! file matches the sharer's.
//!
//! The sharing side is [`Files`], a protocol handler registered under
//! [`NAME`]; the asking side is [`list`] and [`get`].

mod batch;
mod fetch;
mod outboard;
mod serve;
mod share;

pub use batch::{get_tree, under, TreeProgress, TreeReport, MAX_JOBS};
pub use fetch::{get, list, part_path, Fetched, Listing, Progress};
pub use serve::Files;
pub use share::{Share, LIST_HASH_BUDGET};

use punch_agent::PeerError;
use punch_protocol::peer::{MAX_FILE_NAME, MAX_LIST_PROBLEM};
use std::path::{Component, Path};

/// The protocol name file requests are served under.
pub const NAME: &str = punch_protocol::peer::FILES_PROTOCOL;

/// Errors of file sharing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("the peer refuses: {0}")]
    /// The sharer refused (its reason).
    Refused(String),
    #[error("peer stream: {0}")]
    /// The peer stream failed.
    Stream(String),
    #[error("{0}")]
    /// A local file failed.
    Io(String),
    #[error("hash mismatch: got {got}, the peer announced {want}; the partial file was removed")]
    /// The download's BLAKE3 differs from the sharer's.
    #[allow(missing_docs)]
    HashMismatch { got: String, want: String },
    #[error(
        "the bytes from {at} do not match the file's BLAKE3 tree ({blake3}): the sharer's copy \
         is corrupt or changed while hashed; stopped there, keeping the {kept} verified bytes \
         before it in the partial file"
    )]
    /// A group failed its check: the sharer's fault (its disk, or a change
    /// behind its cache's back). The verified bytes before it are kept.
    #[allow(missing_docs)]
    Corrupt { at: u64, kept: u64, blake3: String },
    #[error("the file changed on the sharer: its BLAKE3 is now {got}, not {want}")]
    /// The sharer announced another BLAKE3 than the caller expected.
    #[allow(missing_docs)]
    Changed { want: String, got: String },
}

pub(crate) fn stream_err(e: impl std::fmt::Display) -> FileError {
    FileError::Stream(e.to_string())
}

impl From<PeerError> for FileError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Refused(m) => FileError::Refused(m),
            e => FileError::Stream(e.to_string()),
        }
    }
}

/// The BLAKE3 of the file at `path`, hex, hashed off the runtime's
/// threads.
pub(crate) async fn hash_file(path: &Path) -> std::io::Result<String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(&p)?)?;
        Ok(h.finalize().to_hex().to_string())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A listing problem cut to [`MAX_LIST_PROBLEM`] bytes (at a character
/// boundary): what the sharer sends and what the asker keeps.
pub(crate) fn clip_problem(mut p: String) -> String {
    if p.len() > MAX_LIST_PROBLEM {
        let mut cut = MAX_LIST_PROBLEM;
        while !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p.truncate(cut);
    }
    p
}

/// Checks a requested name: a relative path of plain components.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_FILE_NAME {
        return Err("bad file name length".into());
    }
    let p = Path::new(name);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) || name.contains('\\') {
        return Err(format!("{name:?} is not a plain relative path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape() {
        assert!(check_name("a/b.txt").is_ok());
        for bad in ["", "../x", "/etc/passwd", "a/../../x", "./a", "a\\..\\b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
