//! Views shared by the server and the agent: the JSON of a worker and of a
//! NAT class (the server's HTTP API and the agent's `--json` print the same
//! fields), and escaping for their HTML status pages.

use crate::allocator::Allocator;
use crate::signal::{NatClass, WorkerInfo};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

/// An agent's NAT class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NatView {
    /// Short form: `none`, or e.g. `eim-apdf`.
    pub label: String,
    /// Mapping behaviour, e.g. `endpoint-independent`.
    pub mapping: &'static str,
    /// Filtering behaviour, same values.
    pub filtering: &'static str,
    /// The NAT kept the agent's source port.
    pub port_preserved: bool,
    /// How the NAT picks ports for new mappings, when the agent reported
    /// it (agents of protocol version 5 and later, on this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocator: Option<AllocatorView>,
}

/// A NAT's port allocator, as `nat-check --json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AllocatorView {
    /// `preserving`, `sequential`, `block`, `random` or `unknown`.
    pub kind: &'static str,
    /// Step between successive ports (sequential).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stride: Option<i16>,
    /// The host's port block (block).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_base: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u16>,
    /// Most mappings toward one remote a punch makes on this NAT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<usize>,
}

impl From<Allocator> for AllocatorView {
    fn from(a: Allocator) -> Self {
        let (stride, block) = match a {
            Allocator::Sequential { stride } => (Some(stride), None),
            Allocator::Block { base, size } => (None, Some((base, size))),
            _ => (None, None),
        };
        AllocatorView {
            kind: a.kind(),
            stride,
            block_base: block.map(|b| b.0),
            block_size: block.map(|b| b.1),
            budget: a.budget(),
        }
    }
}

impl AllocatorView {
    /// One line for status pages: `block 20480+64 (budget 4)`.
    pub fn summary(&self) -> String {
        let mut s = self.kind.to_string();
        if let Some(st) = self.stride {
            s.push_str(&format!(" stride {st}"));
        }
        if let (Some(b), Some(n)) = (self.block_base, self.block_size) {
            s.push_str(&format!(" {b}+{n}"));
        }
        if let Some(b) = self.budget {
            s.push_str(&format!(" (budget {b})"));
        }
        s
    }
}

impl From<NatClass> for NatView {
    fn from(n: NatClass) -> Self {
        NatView {
            label: n.label(),
            mapping: n.mapping.as_str(),
            filtering: n.filtering.as_str(),
            port_preserved: n.port_preserved,
            allocator: None,
        }
    }
}

impl NatView {
    /// The class with its allocator, when known.
    pub fn with_allocator(n: NatClass, a: Option<Allocator>) -> Self {
        NatView {
            allocator: a.map(AllocatorView::from),
            ..NatView::from(n)
        }
    }
}

/// One worker of the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerView {
    /// Its id.
    pub worker_id: String,
    /// Its type (`serve --type`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its metadata, as an object.
    pub metadata: BTreeMap<String, String>,
    /// `online` or `stale`.
    pub state: &'static str,
    /// Its address as the server saw it last.
    pub observed_addr: String,
    /// How it reaches the server: `udp` (QUIC) or `tcp` (WebSocket).
    pub transport: &'static str,
    /// Its NAT class, if it reported one.
    pub nat: Option<NatView>,
    /// RFC 3339: when it registered (online) or dropped (stale).
    pub since: String,
}

impl From<WorkerInfo> for WorkerView {
    fn from(w: WorkerInfo) -> Self {
        WorkerView {
            worker_id: w.id,
            kind: w.kind,
            tags: w.tags,
            metadata: w.metadata.into_iter().collect(),
            state: w.state.as_str(),
            observed_addr: w.observed.to_string(),
            transport: w.transport.as_str(),
            nat: w.nat.map(NatView::from),
            since: humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_millis(w.since_ms),
            )
            .to_string(),
        }
    }
}

/// Escapes text for HTML (element content and quoted attributes).
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{NatBehaviour, WorkerState};

    #[test]
    fn views_have_the_documented_fields() {
        let w = WorkerInfo {
            id: "gpu-1".into(),
            transport: crate::signal::Transport::Tcp,
            kind: Some("gpu".into()),
            tags: vec!["eu".into()],
            metadata: vec![("zone".into(), "a b".into())],
            state: WorkerState::Stale,
            observed: "198.51.100.7:4000".parse().unwrap(),
            nat: Some(NatClass {
                public: false,
                mapping: NatBehaviour::EndpointIndependent,
                filtering: NatBehaviour::AddressAndPortDependent,
                port_preserved: true,
            }),
            since_ms: 0,
        };
        let v = serde_json::to_value(WorkerView::from(w)).unwrap();
        assert_eq!(v["worker_id"], "gpu-1");
        assert_eq!(v["type"], "gpu");
        assert_eq!(v["metadata"]["zone"], "a b");
        assert_eq!(v["state"], "stale");
        assert_eq!(v["transport"], "tcp");
        assert_eq!(v["nat"]["label"], "eim-apdf");
        assert_eq!(v["nat"]["filtering"], "address-and-port-dependent");
        assert_eq!(v["since"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
