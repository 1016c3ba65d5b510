//! Agent errors, each with its own exit code so scripts can tell them apart.

use punch_protocol::signal::ErrorCode;

/// Everything that can go wrong for an agent. [`AgentError::fault`] says
/// whose it was; new kinds may come, so a `match` needs a catch-all arm.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("unknown worker {0:?}: no agent has registered under that id")]
    /// No agent ever registered under this id.
    UnknownWorker(String),
    #[error("worker {0:?} is offline")]
    /// The worker is known but not connected now.
    WorkerOffline(String),
    #[error("punch timed out: no direct path to {target:?} within {secs:.1} s")]
    /// No direct path within the punch deadline (and no relay).
    #[allow(missing_docs)]
    PunchTimeout { target: String, secs: f64 },
    #[error("bad token: {0}")]
    /// The server wants a token we lack, or ours is wrong.
    BadToken(String),
    #[error("server fingerprint mismatch: expected {expected}, server presented {got}")]
    /// The server's key is not the pinned one.
    #[allow(missing_docs)]
    FingerprintMismatch { expected: String, got: String },
    #[error("server unreachable at {server}: {reason}")]
    /// No answer from the server.
    #[allow(missing_docs)]
    ServerUnreachable { server: String, reason: String },
    #[error("worker id refused: {0}")]
    /// The worker id is bound to another key.
    IdTaken(String),
    #[error("protocol version mismatch: {0}")]
    /// The server speaks another protocol version.
    BadVersion(String),
    #[error("peer connection failed: {0}")]
    /// The QUIC connection to the peer (or a stream on it) failed.
    PeerConnect(String),
    #[error("timed out: {0}")]
    /// A limit passed.
    Timeout(String),
    #[error("request refused by server ({code}): {message}")]
    /// The server refused a request (its error code and message).
    #[allow(missing_docs)]
    Server { code: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    /// A bad setting or argument.
    Config(String),
    #[error("I/O error: {0}")]
    /// A local I/O failure.
    Io(String),
}

/// Whose fault an error was: what to fix, or whom to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The caller's: a setting, an argument, a credential or a target id.
    Caller,
    /// The rendezvous server's: it refused, or speaks another version.
    Server,
    /// The peer's: it is offline, or its connection failed.
    Peer,
    /// The network's: no answer, or no path, in time.
    Network,
    /// This host's: a local I/O failure.
    Local,
}

impl Fault {
    /// Stable snake_case name, for JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Caller => "caller",
            Fault::Server => "server",
            Fault::Peer => "peer",
            Fault::Network => "network",
            Fault::Local => "local",
        }
    }
}

impl AgentError {
    /// Whose fault this was. A pinned fingerprint the server does not
    /// match is the caller's to check first (a wrong setting is likelier
    /// than an impostor); a worker id nobody registered, likewise.
    pub fn fault(&self) -> Fault {
        match self {
            AgentError::UnknownWorker(_)
            | AgentError::BadToken(_)
            | AgentError::FingerprintMismatch { .. }
            | AgentError::IdTaken(_)
            | AgentError::Config(_) => Fault::Caller,
            AgentError::BadVersion(_) | AgentError::Server { .. } => Fault::Server,
            AgentError::WorkerOffline(_) | AgentError::PeerConnect(_) => Fault::Peer,
            AgentError::PunchTimeout { .. }
            | AgentError::ServerUnreachable { .. }
            | AgentError::Timeout(_) => Fault::Network,
            AgentError::Io(_) => Fault::Local,
        }
    }

    /// Process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::UnknownWorker(_) => 3,
            AgentError::WorkerOffline(_) => 4,
            AgentError::PunchTimeout { .. } => 5,
            AgentError::BadToken(_) => 6,
            AgentError::FingerprintMismatch { .. } => 7,
            AgentError::ServerUnreachable { .. } => 8,
            AgentError::IdTaken(_) => 9,
            AgentError::BadVersion(_) => 10,
            AgentError::PeerConnect(_) => 11,
            AgentError::Timeout(_) => 12,
            AgentError::Server { .. } => 13,
            AgentError::Config(_) => 2,
            AgentError::Io(_) => 1,
        }
    }

    /// Stable snake_case kind, for JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::UnknownWorker(_) => "unknown_worker",
            AgentError::WorkerOffline(_) => "worker_offline",
            AgentError::PunchTimeout { .. } => "punch_timeout",
            AgentError::BadToken(_) => "bad_token",
            AgentError::FingerprintMismatch { .. } => "fingerprint_mismatch",
            AgentError::ServerUnreachable { .. } => "server_unreachable",
            AgentError::IdTaken(_) => "id_taken",
            AgentError::BadVersion(_) => "bad_version",
            AgentError::PeerConnect(_) => "peer_connect",
            AgentError::Timeout(_) => "timeout",
            AgentError::Server { .. } => "server_error",
            AgentError::Config(_) => "config",
            AgentError::Io(_) => "io",
        }
    }

    /// Errors that retrying cannot fix: the agent stops reconnecting. Of
    /// the server's refusals only these four are: a wrong token, a server
    /// key other than the pinned one, an id bound to another key and
    /// another protocol version. Everything else (time-outs, a busy or
    /// failing server, even a bad-request answer, which may be a server
    /// bug or a rolling upgrade) is retried with back-off.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            AgentError::BadToken(_)
                | AgentError::FingerprintMismatch { .. }
                | AgentError::IdTaken(_)
                | AgentError::BadVersion(_)
                | AgentError::Config(_)
        )
    }

    /// Maps the server's refusal of our registration: the four refusals
    /// that retrying cannot fix keep their own errors (and exit codes);
    /// every other code, `bad_request` and `malformed` included, is a
    /// [`AgentError::Server`] error, which the agent retries: our own
    /// hello was checked at start ([`crate::Agent::start`]), so a refusal
    /// of it says more about the server than about us.
    pub fn from_registration(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::BadToken => AgentError::BadToken(message),
            ErrorCode::IdTaken => AgentError::IdTaken(message),
            ErrorCode::BadVersion => AgentError::BadVersion(message),
            other => AgentError::Server {
                code: other.as_str(),
                message,
            },
        }
    }

    /// Maps a server error code for a request about `target`.
    pub fn from_code(code: ErrorCode, message: String, target: &str) -> Self {
        match code {
            ErrorCode::UnknownWorker => AgentError::UnknownWorker(target.to_string()),
            ErrorCode::WorkerOffline => AgentError::WorkerOffline(target.to_string()),
            ErrorCode::BadToken => AgentError::BadToken(message),
            ErrorCode::IdTaken => AgentError::IdTaken(message),
            ErrorCode::BadVersion => AgentError::BadVersion(message),
            ErrorCode::Timeout => AgentError::Timeout(message),
            ErrorCode::BadRequest => AgentError::Config(message),
            other => AgentError::Server {
                code: other.as_str(),
                message,
            },
        }
    }
}

impl From<std::io::Error> for AgentError {
    fn from(e: std::io::Error) -> Self {
        AgentError::Io(e.to_string())
    }
}

impl From<punch_tls::TlsError> for AgentError {
    fn from(e: punch_tls::TlsError) -> Self {
        AgentError::Config(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_names_whose_fault_it_was() {
        let cases = [
            (AgentError::Config("x".into()), Fault::Caller),
            (AgentError::UnknownWorker("w".into()), Fault::Caller),
            (AgentError::WorkerOffline("w".into()), Fault::Peer),
            (AgentError::Timeout("t".into()), Fault::Network),
            (
                AgentError::Server {
                    code: "internal",
                    message: String::new(),
                },
                Fault::Server,
            ),
            (AgentError::Io("disk".into()), Fault::Local),
        ];
        for (e, fault) in cases {
            assert_eq!(e.fault(), fault, "{e}");
        }
        assert_eq!(Fault::Network.as_str(), "network");
    }

    #[test]
    fn only_four_registration_refusals_are_fatal() {
        let all = [
            ErrorCode::BadVersion,
            ErrorCode::BadToken,
            ErrorCode::IdTaken,
            ErrorCode::BadRequest,
            ErrorCode::UnknownWorker,
            ErrorCode::WorkerOffline,
            ErrorCode::SelfConnect,
            ErrorCode::Malformed,
            ErrorCode::RateLimited,
            ErrorCode::Internal,
            ErrorCode::Timeout,
        ];
        for code in all {
            let e = AgentError::from_registration(code, "m".into());
            let fatal = matches!(
                code,
                ErrorCode::BadVersion | ErrorCode::BadToken | ErrorCode::IdTaken
            );
            assert_eq!(e.is_fatal(), fatal, "{code:?} -> {e:?}");
        }
        // The exit codes of the stopping kinds stay what scripts know.
        let code = |c| AgentError::from_registration(c, String::new()).exit_code();
        assert_eq!(
            [
                ErrorCode::BadToken,
                ErrorCode::IdTaken,
                ErrorCode::BadVersion
            ]
            .map(code),
            [6, 9, 10]
        );
        assert_eq!(code(ErrorCode::BadRequest), 13);
    }
}
