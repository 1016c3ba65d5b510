//! LAN discovery with mDNS / DNS-SD (`--lan-discovery`): the agent
//! announces `_punch._udp.local.` (instance: its worker id; TXT: its id,
//! key and key fingerprint; port: its UDP socket's) and browses for the
//! others. What it sees is a bounded table, forgotten when an instance
//! goes or stops being seen.
//!
//! An announcement is anyone's word: it only ever adds endpoints for the
//! key it names, and a connect uses them only for a key it trusts already
//! (pinned in the address book) or, on a first meeting, for a peer that
//! proves it holds the fleet's token (its knock and probes are keyed with
//! a secret derived from it, see [`crate::session::serverless`]), and the
//! QUIC handshake then checks the announced key.

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use punch_tls::PublicKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The DNS-SD service type.
pub const SERVICE: &str = "_punch._udp.local.";
/// Most LAN peers remembered.
const MAX_PEERS: usize = 256;
/// Most addresses taken from one announcement.
const MAX_ADDRS: usize = 8;
/// A peer not announced again for this long is forgotten.
const FORGET: Duration = Duration::from_secs(300);

/// An agent seen on the local network.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct LanPeer {
    /// The id it announces (its word only: no server vouched for it).
    pub worker_id: String,
    /// Fingerprint of the key it announces.
    pub fingerprint: String,
    /// The key it announces; a connection to it must prove this key.
    #[serde(skip)]
    pub key: PublicKey,
    /// Its addresses on the LAN, with its UDP port.
    pub endpoints: Vec<SocketAddr>,
}

type Table = Arc<Mutex<HashMap<String, (LanPeer, Instant)>>>;

/// The running announcement and browser.
pub(crate) struct Lan {
    daemon: ServiceDaemon,
    table: Table,
    ours: String,
    /// Bumped whenever the table changes, for [`Lan::find`] to wait on.
    changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan").field("ours", &self.ours).finish()
    }
}

impl Lan {
    /// LAN discovery for an agent whose config asks for it (a warning, and
    /// none, when it cannot start).
    pub(crate) fn for_agent(
        config: &crate::AgentConfig,
        worker_id: &str,
        identity: &punch_tls::Identity,
        endpoint: &quinn::Endpoint,
    ) -> Option<Lan> {
        if !config.lan_discovery {
            return None;
        }
        let port = endpoint.local_addr().ok()?.port();
        Lan::start(worker_id, &identity.public_key(), port)
            .map_err(|e| warn!("LAN discovery does not run: {e}"))
            .ok()
    }

    /// Announces us (`worker_id` with `key` at UDP `port`) and starts
    /// browsing. Fails when no multicast socket can be opened.
    pub(crate) fn start(worker_id: &str, key: &PublicKey, port: u16) -> Result<Lan, String> {
        let daemon = ServiceDaemon::new().map_err(|e| e.to_string())?;
        let fp = punch_tls::fingerprint_of(key);
        let host = format!("punch-{}.local.", &fp[..16]);
        let props = [
            ("id", worker_id.to_string()),
            ("key", hex::encode(key)),
            ("fp", fp),
            ("v", "1".to_string()),
        ];
        let info = ServiceInfo::new(SERVICE, worker_id, &host, "", port, &props[..])
            .map_err(|e| e.to_string())?
            .enable_addr_auto();
        let ours = info.get_fullname().to_string();
        daemon.register(info).map_err(|e| e.to_string())?;
        let events = daemon.browse(SERVICE).map_err(|e| e.to_string())?;
        let table: Table = Arc::default();
        let t = table.clone();
        let changed = tokio::sync::watch::Sender::new(0u64);
        let bump = changed.clone();
        let me = worker_id.to_string();
        tokio::spawn(async move {
            while let Ok(ev) = events.recv_async().await {
                match ev {
                    ServiceEvent::ServiceResolved(s) => {
                        let Some(p) = parse(
                            s.get_property_val_str("id"),
                            s.get_property_val_str("key"),
                            s.get_property_val_str("fp"),
                            s.get_addresses().iter().map(|a| a.to_ip_addr()),
                            s.get_port(),
                        ) else {
                            debug!(name = %s.fullname, "a LAN announcement that does not parse; ignored");
                            continue;
                        };
                        if p.worker_id == me {
                            continue;
                        }
                        let mut t = t.lock().expect("not poisoned");
                        let now = Instant::now();
                        t.retain(|_, (_, seen)| now.duration_since(*seen) < FORGET);
                        if t.len() >= MAX_PEERS && !t.contains_key(&p.worker_id) {
                            continue;
                        }
                        if t.get(&p.worker_id).map(|(o, _)| o) != Some(&p) {
                            info!(peer = %p.worker_id, endpoints = ?p.endpoints, "seen on the LAN");
                        }
                        t.insert(p.worker_id.clone(), (p, now));
                        bump.send_modify(|n| *n += 1);
                    }
                    ServiceEvent::ServiceRemoved(_, fullname) => {
                        let id = fullname.strip_suffix(&format!(".{SERVICE}")).unwrap_or("");
                        t.lock().expect("not poisoned").remove(id);
                        bump.send_modify(|n| *n += 1);
                    }
                    _ => {}
                }
            }
        });
        Ok(Lan {
            daemon,
            table,
            ours,
            changed,
        })
    }

    /// Every agent seen on the LAN, by worker id.
    pub(crate) fn peers(&self) -> Vec<LanPeer> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .table
            .lock()
            .expect("not poisoned")
            .values()
            .filter(|(_, seen)| now.duration_since(*seen) < FORGET)
            .map(|(p, _)| p.clone())
            .collect();
        v.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        v
    }

    /// The agent announcing `worker_id`, waiting up to `limit` for it.
    pub(crate) async fn find(&self, worker_id: &str, limit: Duration) -> Option<LanPeer> {
        let deadline = tokio::time::Instant::now() + limit;
        // Subscribed before the first look, so no change goes unseen.
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(p) = self.peers().into_iter().find(|p| p.worker_id == worker_id) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// The agent announcing `addr` as one of its endpoints.
    pub(crate) fn at(&self, addr: SocketAddr) -> Option<LanPeer> {
        let addr = punch_net::canonical(addr);
        self.peers()
            .into_iter()
            .find(|p| p.endpoints.contains(&addr))
    }
}

impl crate::Agent {
    /// The agents LAN discovery sees (none when it is off): their word,
    /// which a connect checks before it trusts it.
    pub fn lan_peers(&self) -> Vec<LanPeer> {
        self.inner
            .lan
            .as_ref()
            .map(|l| l.peers())
            .unwrap_or_default()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Says goodbye on the LAN (best effort), then stops the daemon.
        let _ = self.daemon.unregister(&self.ours);
        if let Err(e) = self.daemon.shutdown() {
            warn!("mDNS daemon: {e}");
        }
    }
}

/// A LAN peer from an announcement's fields: the id valid, the key 32
/// bytes whose fingerprint is the one announced, the addresses bounded.
fn parse(
    id: Option<&str>,
    key: Option<&str>,
    fp: Option<&str>,
    addrs: impl Iterator<Item = std::net::IpAddr>,
    port: u16,
) -> Option<LanPeer> {
    let id = id?;
    punch_protocol::signal::validate_worker_id(id).ok()?;
    let mut k = [0u8; 32];
    hex::decode_to_slice(key?, &mut k).ok()?;
    let fingerprint = punch_tls::fingerprint_of(&k);
    if fp? != fingerprint || port == 0 {
        return None;
    }
    let mut endpoints: Vec<SocketAddr> = addrs
        // An IPv6 link-local address means nothing without its interface,
        // which an announcement does not carry.
        .filter(|a| !a.is_unspecified() && !a.is_multicast() && !is_link_local_v6(a))
        .map(|a| punch_net::canonical(SocketAddr::new(a, port)))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints.truncate(MAX_ADDRS);
    (!endpoints.is_empty()).then_some(LanPeer {
        worker_id: id.to_string(),
        fingerprint,
        key: k,
        endpoints,
    })
}

fn is_link_local_v6(a: &std::net::IpAddr) -> bool {
    matches!(a, std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The endpoints a LAN announcement adds for a peer the book pins with
/// `pinned`: none when it names another key (a lying or replaced peer).
pub(crate) fn endpoints_for(pinned: &PublicKey, seen: Option<&LanPeer>) -> Vec<SocketAddr> {
    match seen {
        Some(p) if p.key == *pinned => p.endpoints.clone(),
        Some(p) => {
            warn!(peer = %p.worker_id, announced = %p.fingerprint, "a LAN announcement names another key than the one pinned for this worker; not used");
            Vec::new()
        }
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn announcements_are_checked_before_use() {
        let key = [5u8; 32];
        let (k, fp) = (hex::encode(key), punch_tls::fingerprint_of(&key));
        let ok = parse(
            Some("worker-b"),
            Some(&k),
            Some(&fp),
            [ip("10.0.0.2"), ip("fe80::1")].into_iter(),
            4000,
        )
        .unwrap();
        assert_eq!(ok.endpoints, vec!["10.0.0.2:4000".parse().unwrap()]);
        assert_eq!(ok.key, key);
        // A fingerprint that is not the key's, a short key, a bad id, no
        // address, port 0: all refused.
        let other = punch_tls::fingerprint_of(&[6; 32]);
        let bad = [
            parse(
                Some("w"),
                Some(&k),
                Some(&other),
                [ip("10.0.0.2")].into_iter(),
                1,
            ),
            parse(
                Some("w"),
                Some("abcd"),
                Some(&fp),
                [ip("10.0.0.2")].into_iter(),
                1,
            ),
            parse(
                Some("no spaces"),
                Some(&k),
                Some(&fp),
                [ip("10.0.0.2")].into_iter(),
                1,
            ),
            parse(Some("w"), Some(&k), Some(&fp), std::iter::empty(), 1),
            parse(
                Some("w"),
                Some(&k),
                Some(&fp),
                [ip("10.0.0.2")].into_iter(),
                0,
            ),
            parse(None, Some(&k), Some(&fp), [ip("10.0.0.2")].into_iter(), 1),
        ];
        assert!(bad.iter().all(Option::is_none), "{bad:?}");
        let many = (0..50).map(|i| IpAddr::from([10, 0, 0, i]));
        let p = parse(Some("w"), Some(&k), Some(&fp), many, 1).unwrap();
        assert_eq!(p.endpoints.len(), MAX_ADDRS);
    }

    #[test]
    fn a_lying_announcement_adds_no_endpoint_to_a_pinned_key() {
        let pinned = [1u8; 32];
        let liar = LanPeer {
            worker_id: "worker-b".into(),
            fingerprint: punch_tls::fingerprint_of(&[2; 32]),
            key: [2; 32],
            endpoints: vec!["10.0.0.66:4000".parse().unwrap()],
        };
        assert!(endpoints_for(&pinned, Some(&liar)).is_empty());
        let honest = LanPeer {
            key: pinned,
            fingerprint: punch_tls::fingerprint_of(&pinned),
            ..liar
        };
        assert_eq!(endpoints_for(&pinned, Some(&honest)), honest.endpoints);
        assert!(endpoints_for(&pinned, None).is_empty());
    }
}
