//! The address book: the peers this agent has connected to, so that it can
//! find them again while the server is away.
//!
//! For each peer: the key it proved (pinned: a peer found through the book
//! must prove the same key again), the worker id the server vouched for,
//! its last endpoints, and the secrets of the last sessions the server set
//! up between us ("standing" sessions), which authenticate knocks
//! ([`crate::session::serverless`]). Nothing here widens trust: an endpoint
//! only ever serves the key it was recorded for.
//!
//! Persisted as JSON beside the key file (`KEY.peers.json`, mode 0600: it
//! holds session secrets), bounded ([`MAX_PEERS`]) and expiring
//! ([`EXPIRE`]); a file that is too large or does not parse is set aside
//! with a warning, never trusted in part.

use punch_protocol::signal::SessionId;
use punch_tls::PublicKey;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// Most peers remembered; the least recently used is forgotten first.
pub const MAX_PEERS: usize = 256;
/// Most endpoints remembered per peer.
pub const MAX_ENDPOINTS: usize = 4;
/// Most standing sessions per peer (the two sides may have recorded
/// different last sessions when one connect half-failed).
pub const MAX_STANDING: usize = 3;
/// A peer not connected to for this long is forgotten.
pub const EXPIRE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest book file read.
const MAX_FILE: u64 = 1 << 20;
const VERSION: u32 = 1;

/// One session the server set up between us and a peer: its id and the
/// probe secret only the two agents (and the server) know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    pub session: u64,
    #[serde(with = "hex32")]
    pub secret: [u8; 32],
}

/// What the book knows of one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub worker_id: String,
    #[serde(with = "hex32")]
    pub key: PublicKey,
    /// Most recently working first.
    pub endpoints: Vec<SocketAddr>,
    /// Newest first.
    pub standing: Vec<Standing>,
    /// Unix seconds of the last connection.
    pub last_ok: u64,
    /// Its type and tags, as it told us over a walk ([`crate::walk`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
}

/// A peer of the address book, as the application sees it (no secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KnownPeer {
    /// The id the server vouched for.
    pub worker_id: String,
    /// Fingerprint of its pinned key.
    pub fingerprint: String,
    /// Its last endpoints, most recently working first.
    pub endpoints: Vec<SocketAddr>,
    /// Unix seconds of the last connection.
    pub last_ok: u64,
    /// A connect can knock on it without the server.
    pub reachable_without_server: bool,
    /// Its type and tags, as it told us over a walk.
    pub topics: Vec<String>,
}

impl KnownPeer {
    pub(crate) fn of(e: &Entry) -> KnownPeer {
        KnownPeer {
            worker_id: e.worker_id.clone(),
            fingerprint: punch_tls::fingerprint_of(&e.key),
            endpoints: e.endpoints.clone(),
            last_ok: e.last_ok,
            reachable_without_server: !e.standing.is_empty() && !e.endpoints.is_empty(),
            topics: e.topics.clone(),
        }
    }
}

impl crate::Agent {
    /// Sessions without the server (address book, LAN) and walks so far.
    pub fn discovery_counts(&self) -> crate::DiscoveryCounts {
        let mut c = *self.inner.discovery.lock().expect("not poisoned");
        c.walk_answered = self.inner.walking.answered();
        c
    }

    /// The peers the address book knows (those this agent connected to,
    /// most recent first): what a connect falls back to while the server
    /// cannot be reached.
    pub fn known_peers(&self) -> Vec<KnownPeer> {
        let book = self.inner.book.lock().expect("not poisoned");
        book.entries().iter().map(KnownPeer::of).collect()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    /// Our UDP port when we last connected: a restarted agent binds it
    /// again, so the peers' knocks (aimed at our old mapping) still fit.
    local_port: Option<u16>,
    peers: Vec<Entry>,
}

/// The address book (in memory, with the file it is saved to).
#[derive(Debug, Default)]
pub struct Book {
    path: Option<PathBuf>,
    peers: HashMap<String, Entry>,
    local_port: Option<u16>,
    dirty: bool,
    /// Sessions we answered, recorded once their connection comes up.
    pending: std::collections::VecDeque<(SessionId, Pending)>,
}

/// Most answered sessions waiting for their connection.
const MAX_PENDING: usize = 64;

#[derive(Debug)]
struct Pending {
    worker_id: String,
    key: PublicKey,
    standing: Option<Standing>,
    endpoints: Vec<SocketAddr>,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The book file beside `key_file`.
pub fn path_for(key_file: &Path) -> PathBuf {
    let mut name = key_file.file_name().unwrap_or_default().to_os_string();
    name.push(".peers.json");
    key_file.with_file_name(name)
}

impl Book {
    /// A book kept in memory only (no key file: an ephemeral identity).
    pub fn in_memory() -> Book {
        Book::default()
    }

    /// Loads the book at `path` (empty when there is none yet).
    pub fn load(path: PathBuf) -> Book {
        let mut book = Book {
            path: Some(path.clone()),
            ..Book::default()
        };
        match read(&path) {
            Ok(Some(f)) => {
                let now = now_unix();
                book.local_port = f.local_port.filter(|p| *p != 0);
                for e in f.peers {
                    if valid(&e) && !expired(&e, now) {
                        book.peers.insert(e.worker_id.clone(), e);
                    }
                }
                book.trim(None);
            }
            Ok(None) => {}
            Err(why) => {
                warn!(path = %path.display(), "address book not used: {why}");
                // Kept for a look, out of the way of the next save.
                let mut aside = path.clone().into_os_string();
                aside.push(".bad");
                let _ = std::fs::rename(&path, aside);
            }
        }
        book
    }

    /// The book of an agent (beside its key file, or in memory when its
    /// key is not in a file) and its UDP socket ([`Book::bind`]).
    pub(crate) fn open(
        config: &crate::AgentConfig,
    ) -> Result<(std::sync::Arc<std::sync::Mutex<Book>>, std::net::UdpSocket), crate::AgentError>
    {
        let book = match &config.key_file {
            Some(p) if config.secret_key.is_none() => Book::load(path_for(p)),
            _ => Book::in_memory(),
        };
        let sock = book.bind(config.bind)?;
        Ok((std::sync::Arc::new(std::sync::Mutex::new(book)), sock))
    }

    /// The agent's UDP socket at `bind`; with no port asked for, the one we
    /// last connected from if it is free: the peers' knocks while the
    /// server is away aim at its mapping.
    pub(crate) fn bind(&self, bind: SocketAddr) -> Result<std::net::UdpSocket, crate::AgentError> {
        let remembered = self
            .local_port
            .filter(|_| bind.port() == 0)
            .and_then(|p| punch_net::bind_udp(SocketAddr::new(bind.ip(), p)).ok());
        match remembered {
            Some(s) => Ok(s),
            None => punch_net::bind_udp(bind)
                .map_err(|e| crate::AgentError::Io(format!("cannot bind UDP {bind}: {e}"))),
        }
    }

    /// What the book knows of `worker_id`.
    pub fn get(&self, worker_id: &str) -> Option<&Entry> {
        self.peers.get(worker_id)
    }

    /// The book holds a session the server set up with `worker_id`: a
    /// connect can knock on it without the server.
    pub fn has_standing(&self, worker_id: &str) -> bool {
        self.get(worker_id).is_some_and(|e| !e.standing.is_empty())
    }

    /// Every peer, most recently connected first.
    pub fn entries(&self) -> Vec<Entry> {
        let mut v: Vec<_> = self.peers.values().cloned().collect();
        v.sort_by(|a, b| {
            b.last_ok
                .cmp(&a.last_ok)
                .then(a.worker_id.cmp(&b.worker_id))
        });
        v
    }

    /// The entry pinning `key`.
    pub fn by_key(&self, key: &PublicKey) -> Option<&Entry> {
        self.peers.values().find(|e| e.key == *key)
    }

    /// Endpoints a peer told us for `key` (peer exchange): they go before
    /// ours, which just failed, in the entry of that key and no other.
    /// True when one was new.
    pub fn learned(&mut self, key: &PublicKey, endpoints: &[SocketAddr]) -> bool {
        let Some(e) = self.peers.values_mut().find(|e| e.key == *key) else {
            return false;
        };
        // Only endpoints we do not have count: one we have, further down,
        // is no news.
        let new: Vec<SocketAddr> = endpoints
            .iter()
            .filter(|a| !e.endpoints.contains(&punch_net::canonical(**a)))
            .copied()
            .collect();
        if !prepend(&mut e.endpoints, &new) {
            return false;
        }
        self.dirty = true;
        true
    }

    /// The peer and the secret of a standing session `session`.
    pub fn by_standing(&self, session: SessionId) -> Option<(&Entry, [u8; 32])> {
        self.peers.values().find_map(|e| {
            e.standing
                .iter()
                .find(|s| s.session == session.0)
                .map(|s| (e, s.secret))
        })
    }

    /// Records a connection to `worker_id` (key `key`) that worked:
    /// endpoints first in what they are worth, and the session the server
    /// set up (`None` for one found without the server: the standing ones
    /// stay as both sides have them). A new key for a worker id replaces
    /// the entry (the server vouched for it).
    pub fn record(
        &mut self,
        worker_id: &str,
        key: PublicKey,
        standing: Option<Standing>,
        endpoints: &[SocketAddr],
        local_port: u16,
    ) {
        let now = now_unix();
        let e = self
            .peers
            .entry(worker_id.to_string())
            .or_insert_with(|| Entry {
                worker_id: worker_id.to_string(),
                key,
                endpoints: Vec::new(),
                standing: Vec::new(),
                last_ok: now,
                topics: Vec::new(),
            });
        if e.key != key {
            e.key = key;
            e.endpoints.clear();
            e.standing.clear();
        }
        prepend(&mut e.endpoints, endpoints);
        if let Some(s) = standing {
            e.standing.retain(|x| x.session != s.session);
            e.standing.insert(0, s);
            e.standing.truncate(MAX_STANDING);
        }
        e.last_ok = now;
        if local_port != 0 {
            self.local_port = Some(local_port);
        }
        self.trim(Some(worker_id));
        self.dirty = true;
    }

    /// Remembers a session we answer, to [`Book::confirm`] when the
    /// peer's connection comes up (a punch alone proves no key).
    pub fn expect(
        &mut self,
        session: SessionId,
        worker_id: &str,
        key: PublicKey,
        standing: Option<Standing>,
        endpoints: Vec<SocketAddr>,
    ) {
        self.pending.retain(|(s, _)| *s != session);
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back((
            session,
            Pending {
                worker_id: worker_id.to_string(),
                key,
                standing,
                endpoints,
            },
        ));
    }

    /// The peer of session `session` connected to us with `key` (from
    /// `remote`, when direct): record it.
    pub fn confirm(
        &mut self,
        session: SessionId,
        key: PublicKey,
        remote: Option<SocketAddr>,
        local_port: u16,
    ) {
        let Some(i) = self.pending.iter().position(|(s, _)| *s == session) else {
            return;
        };
        let (_, p) = self.pending.remove(i).expect("found");
        if p.key != key {
            return;
        }
        let eps: Vec<SocketAddr> = remote.into_iter().chain(p.endpoints).collect();
        self.record(&p.worker_id, p.key, p.standing, &eps, local_port);
    }

    /// The type and tags `worker_id` told us it has (over a walk, from
    /// the connection that proved its key); nothing for a peer the book
    /// does not know.
    pub fn set_topics(&mut self, worker_id: &str, topics: &[String]) {
        let Some(e) = self.peers.get_mut(worker_id) else {
            return;
        };
        if e.topics != topics {
            e.topics = topics.to_vec();
            self.dirty = true;
        }
    }

    /// Notes that a peer answered from `addr` (an authenticated knock):
    /// that endpoint goes first.
    pub fn saw(&mut self, worker_id: &str, addr: SocketAddr) {
        let Some(e) = self.peers.get_mut(worker_id) else {
            return;
        };
        if prepend(&mut e.endpoints, &[addr]) {
            self.dirty = true;
        }
    }

    /// Forgets expired entries, and the least recently connected beyond
    /// [`MAX_PEERS`], never `keep` (the one just recorded: within one
    /// second every entry is as recent as it).
    fn trim(&mut self, keep: Option<&str>) {
        let now = now_unix();
        self.peers.retain(|_, e| !expired(e, now));
        while self.peers.len() > MAX_PEERS {
            let oldest = self
                .peers
                .values()
                .filter(|e| Some(e.worker_id.as_str()) != keep)
                .min_by(|a, b| {
                    a.last_ok
                        .cmp(&b.last_ok)
                        .then(a.worker_id.cmp(&b.worker_id))
                })
                .map(|e| e.worker_id.clone());
            match oldest {
                Some(id) => self.peers.remove(&id),
                None => break,
            };
        }
    }

    /// Writes the book if it changed (to a temporary file, then renamed,
    /// so a crash leaves the old one).
    pub fn save(&mut self) {
        if let Some(w) = self.changes() {
            w.write();
        }
    }

    /// What [`Book::save`] would write, if the book changed: to be written
    /// without holding the book.
    pub fn changes(&mut self) -> Option<BookWrite> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let path = self.path.clone()?;
        let f = File {
            version: VERSION,
            local_port: self.local_port,
            peers: self.entries(),
        };
        let json = serde_json::to_vec_pretty(&f).ok()?;
        Some(BookWrite { path, json })
    }
}

/// A book's contents on their way to its file.
#[derive(Debug)]
pub struct BookWrite {
    path: PathBuf,
    json: Vec<u8>,
}

impl BookWrite {
    /// Writes them (a warning when it cannot).
    pub fn write(self) {
        if let Err(e) = write_private(&self.path, &self.json) {
            warn!(path = %self.path.display(), "cannot save the address book: {e}");
        }
    }
}

/// Puts `new` (canonical, with a port and an address, each once) before
/// `eps`, keeping at most [`MAX_ENDPOINTS`]; true when `eps` changed.
fn prepend(eps: &mut Vec<SocketAddr>, new: &[SocketAddr]) -> bool {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(MAX_ENDPOINTS);
    for a in new
        .iter()
        .map(|a| punch_net::canonical(*a))
        .chain(eps.iter().copied())
    {
        if !out.contains(&a) && a.port() != 0 && !a.ip().is_unspecified() {
            out.push(a);
        }
    }
    out.truncate(MAX_ENDPOINTS);
    let changed = out != *eps;
    *eps = out;
    changed
}

/// The candidates of an offer worth remembering, best first: what the
/// server saw and gateway mappings before LAN addresses; never guesses.
pub fn endpoints_of(candidates: &[punch_protocol::signal::Candidate]) -> Vec<SocketAddr> {
    use punch_protocol::signal::CandidateKind as K;
    let rank = |k: K| match k {
        K::ServerReflexive | K::PeerReflexive => 0,
        K::Mapped | K::Stun => 1,
        K::Local => 2,
        K::Predicted => 3,
    };
    let mut c: Vec<_> = candidates.iter().filter(|c| rank(c.kind) < 3).collect();
    c.sort_by_key(|c| rank(c.kind));
    c.into_iter().map(|c| c.addr).collect()
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn read(path: &Path) -> Result<Option<File>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if meta.len() > MAX_FILE {
        return Err(format!("{} bytes, more than {MAX_FILE}", meta.len()));
    }
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let f: File = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
    if f.version != VERSION {
        return Err(format!("version {}, we read {VERSION}", f.version));
    }
    Ok(Some(f))
}

fn valid(e: &Entry) -> bool {
    punch_protocol::signal::validate_worker_id(&e.worker_id).is_ok()
        && e.endpoints.len() <= MAX_ENDPOINTS
        && e.standing.len() <= MAX_STANDING
        && e.topics.len() <= punch_protocol::signal::MAX_TAGS + 1
}

fn expired(e: &Entry, now: u64) -> bool {
    now.saturating_sub(e.last_ok) > EXPIRE.as_secs()
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(n: u64) -> Standing {
        Standing {
            session: n,
            secret: [n as u8; 32],
        }
    }

    #[test]
    fn records_persist_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("agent.key"));
        assert!(path.ends_with("agent.key.peers.json"));
        let mut b = Book::load(path.clone());
        let a: SocketAddr = "203.0.113.5:4000".parse().unwrap();
        b.record("worker-b", [7; 32], Some(st(1)), &[a], 40000);
        b.record("worker-b", [7; 32], Some(st(2)), &[a], 40000);
        b.save();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let b = Book::load(path);
        let e = b.get("worker-b").unwrap();
        assert_eq!(e.key, [7; 32]);
        assert_eq!(e.endpoints, vec![a]);
        assert_eq!(e.standing, vec![st(2), st(1)]);
        assert_eq!(b.local_port, Some(40000));
        assert_eq!(b.by_standing(SessionId(1)).unwrap().1, [1; 32]);
        assert!(b.by_standing(SessionId(9)).is_none());
    }

    #[test]
    fn learned_endpoints_go_to_the_key_they_were_given_for_only() {
        let mut b = Book::in_memory();
        let old: SocketAddr = "203.0.113.5:4000".parse().unwrap();
        let new: SocketAddr = "203.0.113.5:4999".parse().unwrap();
        b.record("w", [1; 32], Some(st(1)), &[old], 1);
        b.record("x", [2; 32], Some(st(2)), &[old], 1);
        assert!(!b.learned(&[9; 32], &[new]), "no entry has that key");
        assert!(b.learned(&[1; 32], &[new]));
        assert!(!b.learned(&[1; 32], &[new]), "nothing new the second time");
        assert_eq!(b.get("w").unwrap().endpoints, vec![new, old]);
        assert_eq!(b.get("x").unwrap().endpoints, vec![old]);
    }

    #[test]
    fn a_new_key_for_an_id_forgets_the_old_endpoints_and_secrets() {
        let mut b = Book::in_memory();
        let a: SocketAddr = "203.0.113.5:4000".parse().unwrap();
        let c: SocketAddr = "198.51.100.5:4000".parse().unwrap();
        b.record("w", [1; 32], Some(st(1)), &[a], 1);
        b.record("w", [2; 32], Some(st(2)), &[c], 1);
        let e = b.get("w").unwrap();
        assert_eq!((e.key, e.endpoints.clone()), ([2; 32], vec![c]));
        assert_eq!(e.standing, vec![st(2)]);
    }

    #[test]
    fn bounded_in_peers_endpoints_and_sessions() {
        let mut b = Book::in_memory();
        for i in 0..(MAX_PEERS + 10) {
            let eps: Vec<SocketAddr> = (0..10)
                .map(|p| SocketAddr::from(([203, 0, 113, 1], 1000 + p)))
                .collect();
            b.record(&format!("w{i}"), [1; 32], Some(st(i as u64)), &eps, 1);
        }
        assert_eq!(b.entries().len(), MAX_PEERS);
        let eps: Vec<SocketAddr> = (0..10)
            .map(|p| SocketAddr::from(([198, 51, 100, 1], 1000 + p)))
            .collect();
        for i in 0..10 {
            b.record("w300", [1; 32], Some(st(1000 + i)), &eps, 1);
        }
        assert_eq!(b.entries().len(), MAX_PEERS);
        let e = b.get("w300").unwrap();
        assert_eq!(e.endpoints.len(), MAX_ENDPOINTS);
        assert_eq!(e.standing.len(), MAX_STANDING);
    }

    #[test]
    fn a_bad_or_huge_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.peers.json");
        std::fs::write(&path, b"{ not json").unwrap();
        let b = Book::load(path.clone());
        assert!(b.entries().is_empty());
        assert!(dir.path().join("k.peers.json.bad").exists());
        std::fs::write(&path, vec![b' '; (MAX_FILE + 1) as usize]).unwrap();
        assert!(Book::load(path).entries().is_empty());
    }

    #[test]
    fn entries_past_their_time_are_forgotten_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.peers.json");
        let old = Entry {
            worker_id: "old".into(),
            key: [1; 32],
            endpoints: vec![],
            standing: vec![],
            last_ok: now_unix() - EXPIRE.as_secs() - 10,
            topics: vec![],
        };
        let f = File {
            version: VERSION,
            local_port: None,
            peers: vec![old],
        };
        std::fs::write(&path, serde_json::to_vec(&f).unwrap()).unwrap();
        assert!(Book::load(path).get("old").is_none());
    }
}
