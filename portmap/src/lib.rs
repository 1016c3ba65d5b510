//! Port mapping for punch: ask the NAT gateway for a public UDP port with
//! PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD.
//!
//! - [`pcp`] and [`natpmp`]: request encoding and answer validation,
//!   without I/O (every answer is untrusted: sizes, versions, opcodes,
//!   result codes, nonces and ports are checked, nothing panics).
//! - [`lease`]: when to renew, and gateway restarts seen in the epoch.
//! - [`client`]: the async client (tokio) that finds the default gateway,
//!   tries PCP, then NAT-PMP, then UPnP IGD (SSDP discovery,
//!   AddPortMapping through the `igd-next` crate) with bounded retries, and
//!   [`client::spawn`], which keeps a mapping alive in the background and
//!   deletes it on shutdown (feature `client`, on by default).

#![warn(missing_docs)]

#[cfg(feature = "client")]
pub mod client;
pub mod lease;
pub mod natpmp;
pub mod pcp;
pub mod route;

use std::net::SocketAddr;
use std::time::Duration;

/// The protocol a mapping was made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
    /// UPnP Internet Gateway Device (WANIPConnection AddPortMapping).
    Upnp,
}

impl Protocol {
    /// `"pcp"`, `"nat-pmp"` or `"upnp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }

    /// `"PCP"`, `"NAT-PMP"` or `"UPnP"`, for logs.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP",
        }
    }

    /// Every protocol, in the order they are tried.
    pub const ALL: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "pcp" => Ok(Protocol::Pcp),
            "nat-pmp" | "natpmp" | "pmp" => Ok(Protocol::NatPmp),
            "upnp" | "igd" => Ok(Protocol::Upnp),
            _ => Err(format!(
                "unknown port mapping protocol {s:?}: pcp, nat-pmp or upnp"
            )),
        }
    }
}

/// A mapping the gateway granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// How it was made.
    pub protocol: Protocol,
    /// The public address and port (from the gateway's answer).
    pub external: SocketAddr,
    /// Our internal (LAN) address and port it forwards to.
    pub internal: SocketAddr,
    /// The lifetime the gateway granted.
    pub lifetime: Duration,
}
