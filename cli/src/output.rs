//! What commands print that more than one of them shares: the path report
//! of `connect`, `ping` and `bench`, number rounding for JSON, and the
//! error report with its exit code.

use punch_agent::{AgentError, PeerConnection};
use serde_json::json;
use std::process::ExitCode;

/// The path a connection uses now: its kind, where packets go (the peer,
/// the relay's UDP address, or the relay over the TCP channel), and the
/// transport this side sends on.
pub fn path_now(
    pc: &PeerConnection,
) -> (
    punch_agent::PathKind,
    String,
    punch_protocol::signal::Transport,
) {
    let (kind, remote) = pc.path_now();
    let transport = pc.transport_now();
    let remote = match (remote, transport) {
        (Some(r), _) => r.to_string(),
        (None, punch_protocol::signal::Transport::Tcp) => "server relay over TCP".to_string(),
        (None, _) => pc.path.remote_addr.to_string(),
    };
    (kind, remote, transport)
}

/// The IP family of the packets' first hop (the peer on a direct path,
/// the relay otherwise).
pub fn first_hop_family(pc: &PeerConnection) -> &'static str {
    match pc.path_now().1.unwrap_or(pc.path.remote_addr) {
        a if punch_net::canonical(a).is_ipv6() => "ipv6",
        _ => "ipv4",
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The process's exit code for a command's result. A `--json` command
/// still prints one JSON object when it fails, so scripts parse stdout
/// either way; the message goes to stderr too, for people.
pub fn finish(json: bool, result: Result<(), AgentError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({"error": e.kind(), "message": e.to_string(), "exit_code": e.exit_code(), "fault": e.fault().as_str()})
                );
            }
            eprintln!("punch-agent: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
