//! Random walks over topics (`punch/walk`): finding more workers of the
//! types and tags we care about through the peers we already know, as
//! p2panda-net's discovery does, so the address book fills with peers to
//! fall back on while the server is away.
//!
//! An agent with walk topics ([`crate::AgentConfig::walk_topics`]) walks
//! every minute or so ([`machine`]): it connects to a peer of its starting
//! set (configured bootstrap workers, the book's peers of a topic, and,
//! while registered, workers the server lists for one), asks which workers
//! of those topics that peer has connected to, and walks on to one of them.
//! A connection it makes records the peer in the book with a session the
//! server set up, which is what reconnecting without the server needs.
//!
//! What an answer tells is hearsay: worker ids, keys and topics, never
//! endpoints or secrets ([`crate::session::pex`] tells endpoints, for keys
//! the asker already pins). It is kept apart from the book, bounded and
//! short-lived ([`Heard`]); a name whose key differs from one the book
//! pins is refused, and a walk reaches a heard-of worker only through the
//! server, which vouches for its key (a key that then differs from the
//! hearsay is reported as a lie). A peer answers only for topics it shares
//! (its own type and tags, and its walk topics), and only with peers it
//! has connected to itself.

pub mod machine;

use crate::book::Book;
use crate::events::Discovery;
use crate::options::{ConnectOptions, DialPolicy};
use crate::protocols::{ProtocolHandler, ProtocolStream};
use crate::{AgentError, AgentEvent, Inner, Status};
use machine::{Answered, WalkConfig, WalkSummary, Walker};
use punch_protocol::signal::{validate_name, validate_worker_id, SessionId, MAX_TAGS};
use punch_tls::PublicKey;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// The protocol's name on a peer connection.
pub const WALK_PROTOCOL: &str = "punch/walk";
/// Most topics one question names.
pub const MAX_TOPICS: usize = 8;
/// Most peers one answer names.
pub const MAX_NAMED: usize = 16;
/// Most heard-of workers remembered ...
pub const MAX_HEARD: usize = 256;
/// ... each for this long after it was last named.
pub const HEARD_FOR: Duration = Duration::from_secs(3600);
/// Most topics a worker is known by (its type and its tags).
const MAX_OWN: usize = MAX_TAGS + 1;
const MAX_ASK: usize = 64 + (MAX_TOPICS + MAX_OWN) * 72;
const MAX_ANSWER: usize = 64 + MAX_OWN * 72 + MAX_NAMED * (72 + 40 + MAX_OWN * 72);
/// One question, from connecting to the answer.
const QUESTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    /// What the asker looks for.
    topics: Vec<String>,
    /// What the asker is (its type and tags).
    own: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    /// What the answerer is.
    own: Vec<String>,
    /// Workers of the topics asked that the answerer has connected to.
    peers: Vec<Named>,
}

/// One worker an answer names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Named {
    worker_id: String,
    key: PublicKey,
    topics: Vec<String>,
}

/// A worker we heard of from a peer (not connected to, not trusted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HeardPeer {
    /// The id it was named by.
    pub worker_id: String,
    /// Fingerprint of the key it was named with (the server's word wins).
    pub fingerprint: String,
    /// Its topics, as the naming peer knew them.
    pub topics: Vec<String>,
    /// The peer that named it.
    pub from: String,
    /// Unix seconds of the last time it was named.
    pub heard: u64,
}

#[derive(Clone, Debug)]
struct HeardEntry {
    key: PublicKey,
    topics: Vec<String>,
    from: String,
    at: Instant,
    unix: u64,
}

/// The walk's shared state: what we heard, what we answered, and the
/// way to the walker task.
#[derive(Debug, Default)]
pub(crate) struct Walking {
    heard: Mutex<HashMap<String, HeardEntry>>,
    answered: AtomicU64,
    asks: Mutex<Option<mpsc::Sender<oneshot::Sender<WalkSummary>>>>,
}

impl Walking {
    /// Notes the workers `from` named: how many we had not heard of, and
    /// the names believed (to walk on to). A name the book pins with
    /// another key, ours and the namer's own are refused.
    fn heard(
        &self,
        book: &Book,
        us: &str,
        from: &str,
        named: Vec<Named>,
        now: Instant,
    ) -> (usize, Vec<String>) {
        let mut heard = self.heard.lock().expect("not poisoned");
        heard.retain(|_, h| now.duration_since(h.at) < HEARD_FOR);
        let (mut new, mut believed) = (0, Vec::new());
        for n in named {
            if n.worker_id == us || n.worker_id == from {
                continue;
            }
            match book.get(&n.worker_id) {
                Some(e) if e.key != n.key => {
                    warn!(peer = %from, named = %n.worker_id, "a peer names a worker with another key than the one we pin; ignored");
                    continue;
                }
                // Known first-hand: no news.
                Some(_) => {
                    believed.push(n.worker_id);
                    continue;
                }
                None => {}
            }
            let entry = HeardEntry {
                key: n.key,
                topics: n.topics,
                from: from.to_string(),
                at: now,
                unix: crate::book::now_unix(),
            };
            match heard.get(&n.worker_id) {
                Some(h) if h.key != entry.key => {
                    warn!(peer = %from, named = %n.worker_id, first = %h.from, "two peers name a worker with different keys; the first kept until the server says");
                    continue;
                }
                Some(_) => {}
                None if heard.len() >= MAX_HEARD => {
                    let oldest = heard.iter().min_by_key(|(_, h)| h.at);
                    if let Some(k) = oldest.map(|(k, _)| k.clone()) {
                        heard.remove(&k);
                    }
                    new += 1;
                }
                None => new += 1,
            }
            believed.push(n.worker_id.clone());
            heard.insert(n.worker_id, entry);
        }
        (new, believed)
    }

    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Forgets `worker_id` (now known first-hand); the key hearsay gave it.
    fn forget(&self, worker_id: &str) -> Option<PublicKey> {
        let mut heard = self.heard.lock().expect("not poisoned");
        heard.remove(worker_id).map(|h| h.key)
    }
}

/// What we are: our type and tags.
fn own_topics(config: &crate::AgentConfig) -> Vec<String> {
    config.kind.iter().chain(&config.tags).cloned().collect()
}

fn valid_topics(v: &[String], max: usize) -> bool {
    v.len() <= max && v.iter().all(|t| validate_name("topic", t).is_ok())
}

/// The application's protocols and ours (an application's own
/// `punch/walk` handler, if it has one, stays).
pub(crate) fn with_handler(
    protocols: crate::protocols::Protocols,
    book: &Arc<Mutex<Book>>,
    config: &crate::AgentConfig,
    walking: &Arc<Walking>,
) -> crate::protocols::Protocols {
    if protocols.contains_key(WALK_PROTOCOL) {
        return protocols;
    }
    let mut shared = own_topics(config);
    let own = shared.clone();
    shared.extend(config.walk_topics.iter().cloned());
    let mut all = (*protocols).clone();
    let handler = handler(book.clone(), own, shared, walking.clone());
    all.insert(WALK_PROTOCOL.to_string(), Arc::new(handler));
    Arc::new(all)
}

/// Answers questions from the book: peers we connected to, of the topics
/// asked that we share.
fn handler(
    book: Arc<Mutex<Book>>,
    own: Vec<String>,
    shared: Vec<String>,
    walking: Arc<Walking>,
) -> impl ProtocolHandler {
    move |mut s: ProtocolStream| {
        let (book, own, shared, walking) =
            (book.clone(), own.clone(), shared.clone(), walking.clone());
        async move {
            let Some(ask) = s.question::<Ask>(MAX_ASK, "walk").await else {
                return;
            };
            if !valid_topics(&ask.topics, MAX_TOPICS) || !valid_topics(&ask.own, MAX_OWN) {
                debug!(peer = %s.peer_id, "a walk question with bad topics; refused");
                s.refuse_question();
                return;
            }
            let answer = {
                let mut book = book.lock().expect("not poisoned");
                book.set_topics(&s.peer_id, &ask.own);
                answer(&book, &s.peer_id, &ask.topics, &shared, own)
            };
            walking.answered.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %s.peer_id, named = answer.peers.len(), "answered a walk question");
            s.answer(&answer).await;
        }
    }
}

fn answer(
    book: &Book,
    asker: &str,
    asked: &[String],
    shared: &[String],
    own: Vec<String>,
) -> Answer {
    let topics: Vec<&String> = asked.iter().filter(|t| shared.contains(t)).collect();
    let mut peers: Vec<Named> = book
        .entries()
        .into_iter()
        .filter(|e| e.worker_id != asker && e.topics.iter().any(|t| topics.contains(&t)))
        .map(|e| Named {
            worker_id: e.worker_id,
            key: e.key,
            topics: e.topics,
        })
        .collect();
    peers.shuffle(&mut rand::thread_rng());
    peers.truncate(MAX_NAMED);
    Answer { own, peers }
}

/// The answer as far as it can be believed: topics valid, at most
/// [`MAX_NAMED`] workers, each of a topic asked.
fn checked(a: Answer, asked: &[String]) -> Option<(Vec<String>, Vec<Named>)> {
    if !valid_topics(&a.own, MAX_OWN) || a.peers.len() > MAX_NAMED {
        return None;
    }
    let peers = a
        .peers
        .into_iter()
        .filter(|n| {
            validate_worker_id(&n.worker_id).is_ok()
                && valid_topics(&n.topics, MAX_OWN)
                && n.topics.iter().any(|t| asked.contains(t))
        })
        .collect();
    Some((a.own, peers))
}

fn emit(
    inner: &Inner,
    peer: &str,
    session: SessionId,
    phase: &'static str,
    learned: Option<usize>,
    error: Option<AgentError>,
) {
    inner.events.emit(AgentEvent::Discovery(Discovery {
        peer: peer.to_string(),
        session,
        source: "random-walk",
        phase,
        incoming: false,
        error,
        learned,
    }));
}

/// Asks `peer` for workers of our topics: what it named.
async fn question(inner: &Arc<Inner>, peer: &str) -> Answered {
    let (session, own, named) = match ask(inner, peer).await {
        Ok(answered) => answered,
        Err((session, e)) => {
            debug!(%peer, "walk question failed: {e}");
            emit(inner, peer, session, "failed", None, Some(e));
            return Answered::Failed;
        }
    };
    let now = Instant::now();
    let (new, next) = {
        let mut book = inner.book.lock().expect("not poisoned");
        book.set_topics(peer, &own);
        let (new, ids) = inner
            .walking
            .heard(&book, &inner.worker_id, peer, named, now);
        // Without the server, only peers the book can knock on are
        // reachable.
        let reg = inner.registered();
        let next = ids.into_iter().filter(|id| reg || book.has_standing(id));
        (new, next.collect::<Vec<_>>())
    };
    {
        let mut c = inner.discovery.lock().expect("not poisoned");
        c.walk_learned += new as u64;
    }
    info!(%peer, named = next.len(), new, "walk: a peer named workers of our topics");
    emit(inner, peer, session, "ended", Some(new), None);
    Answered::Named { peers: next, new }
}

/// Connects to `peer` (a `started` event once connected) and asks it: the
/// session, the answerer's own topics and the workers it named that can
/// be believed; or the session so far (0 before connecting) and why not.
async fn ask(
    inner: &Arc<Inner>,
    peer: &str,
) -> Result<(SessionId, Vec<String>, Vec<Named>), (SessionId, AgentError)> {
    let policy = DialPolicy::with(&inner.config, &ConnectOptions::new());
    let asked = &inner.config.walk_topics;
    let connect = crate::session::connect(inner, peer, policy);
    let pc = match tokio::time::timeout(QUESTION_TIMEOUT, connect).await {
        Ok(r) => r,
        Err(_) => Err(AgentError::Timeout(format!(
            "no connection to {peer:?} for the walk"
        ))),
    }
    .map_err(|e| (SessionId(0), e))?;
    let session = pc.path.session;
    // The server vouched for the key we just connected to.
    let pinned = inner
        .book
        .lock()
        .expect("not poisoned")
        .get(peer)
        .map(|e| e.key);
    if let (Some(said), Some(pinned)) = (inner.walking.forget(peer), pinned) {
        if said != pinned {
            warn!(%peer, "a peer had named this worker with another key than the one it proved; that hearsay is dropped");
        }
    }
    emit(inner, peer, session, "started", None, None);
    let question = Ask {
        topics: asked.clone(),
        own: own_topics(&inner.config),
    };
    let talk = pc.ask::<_, Answer>(WALK_PROTOCOL, &question, MAX_ANSWER);
    let got = tokio::time::timeout(QUESTION_TIMEOUT, talk).await;
    pc.close().await;
    let answer = match got {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return Err((session, AgentError::PeerConnect(e.to_string()))),
        Err(_) => {
            let e = AgentError::Timeout(format!("{peer:?} did not answer the walk question"));
            return Err((session, e));
        }
    };
    checked(answer, asked)
        .map(|(own, named)| (session, own, named))
        .ok_or_else(|| {
            let e = format!("{peer:?} answered the walk question with too much or bad topics");
            (session, AgentError::PeerConnect(e))
        })
}

/// Where a walk starts: the bootstrap workers, the book's peers of our
/// topics and, while registered, workers the server lists for one topic.
async fn starting_set(inner: &Arc<Inner>) -> Vec<String> {
    let topics = &inner.config.walk_topics;
    let reg = inner.registered();
    let mut ids: Vec<String> = Vec::new();
    {
        let book = inner.book.lock().expect("not poisoned");
        // Without the server, only peers the book can knock on.
        let reachable = |id: &str| reg || book.has_standing(id);
        ids.extend(
            inner
                .config
                .bootstrap
                .iter()
                .filter(|id| reachable(id))
                .cloned(),
        );
        for e in book.entries() {
            if e.topics.iter().any(|t| topics.contains(t)) && reachable(&e.worker_id) {
                ids.push(e.worker_id);
            }
        }
    }
    // The server's list only when nobody else is there to start from.
    let topic = topics.choose(&mut rand::thread_rng()).cloned();
    if let (true, true, Some(t)) = (reg, ids.iter().all(|i| *i == inner.worker_id), topic) {
        for (kind, tag) in [(None, Some(t.clone())), (Some(t), None)] {
            let q = punch_protocol::signal::Query::List { kind, tag };
            let asked = inner.request(
                |req| punch_protocol::signal::ClientMsg::Query { req, query: q },
                Duration::from_secs(5),
            );
            if let Ok(crate::Reply::Msg(punch_protocol::signal::ServerMsg::Workers {
                workers,
                ..
            })) = asked.await
            {
                ids.extend(
                    workers
                        .into_iter()
                        .filter(|w| w.state == punch_protocol::signal::WorkerState::Online)
                        .map(|w| w.id)
                        .take(MAX_NAMED),
                );
            }
        }
    }
    ids.retain(|id| *id != inner.worker_id);
    ids.sort();
    ids.dedup();
    ids
}

/// Walks for the agent's lifetime (when it has walk topics), and at once
/// when [`crate::Agent::walk`] asks.
pub(crate) async fn run(inner: Arc<Inner>) {
    let cfg = WalkConfig {
        every: inner.config.walk_every,
        ..WalkConfig::default()
    };
    let (tx, mut asks) = mpsc::channel::<oneshot::Sender<WalkSummary>>(8);
    *inner.walking.asks.lock().expect("not poisoned") = Some(tx);
    // The first walk a moment after registering (or 10 s after starting,
    // from the book), not in the crowd of a fleet's restart.
    let mut status = inner.status.subscribe();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s, Status::Registered { .. })),
    )
    .await;
    let first = Instant::now() + cfg.every / 12;
    let mut walker = Walker::new(cfg.clone(), rand::random(), first);
    let mut waiting: Vec<oneshot::Sender<WalkSummary>> = Vec::new();
    let mut start = Vec::new();
    loop {
        if inner.closing.load(Ordering::SeqCst) {
            return;
        }
        let due = walker.poll_timeout().unwrap_or_else(Instant::now);
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            a = asks.recv() => match a {
                Some(a) => {
                    waiting.push(a);
                    walker.start_now(Instant::now());
                }
                None => return,
            },
        }
        if !walker.walking() {
            start = starting_set(&inner).await;
        }
        let Some(peer) = walker.poll_ask(Instant::now(), &start) else {
            if let Some(s) = walker.take_ended() {
                ended(&inner, &s, &mut waiting);
            }
            continue;
        };
        {
            inner.discovery.lock().expect("not poisoned").walk_questions += 1;
        }
        let answered = question(&inner, &peer).await;
        if answered == Answered::Failed {
            inner.discovery.lock().expect("not poisoned").walk_failed += 1;
        }
        if let Some(s) = walker.handle_answer(Instant::now(), &peer, answered) {
            ended(&inner, &s, &mut waiting);
        }
    }
}

fn ended(inner: &Inner, s: &WalkSummary, waiting: &mut Vec<oneshot::Sender<WalkSummary>>) {
    inner.discovery.lock().expect("not poisoned").walks += 1;
    info!(asked = ?s.asked, learned = s.learned, failed = s.failed, "walk ended");
    for w in waiting.drain(..) {
        let _ = w.send(s.clone());
    }
}

impl crate::Agent {
    /// Walks once now (see [`crate::walk`]) and says what the walk did;
    /// an error when the agent has no walk topics.
    pub async fn walk(&self) -> Result<WalkSummary, AgentError> {
        let tx = self
            .inner
            .walking
            .asks
            .lock()
            .expect("not poisoned")
            .clone();
        let tx =
            tx.ok_or_else(|| AgentError::Config("no walk topics: nothing to walk for".into()))?;
        let (done, summary) = oneshot::channel();
        let closed = || AgentError::Io("the agent is closed".into());
        tx.send(done).await.map_err(|_| closed())?;
        summary.await.map_err(|_| closed())
    }

    /// The workers walks have heard of and not connected to yet, most
    /// recently named first.
    pub fn heard_peers(&self) -> Vec<HeardPeer> {
        let heard = self.inner.walking.heard.lock().expect("not poisoned");
        let mut v: Vec<HeardPeer> = heard
            .iter()
            .map(|(id, h)| HeardPeer {
                worker_id: id.clone(),
                fingerprint: punch_tls::fingerprint_of(&h.key),
                topics: h.topics.clone(),
                from: h.from.clone(),
                heard: h.unix,
            })
            .collect();
        v.sort_by(|a, b| b.heard.cmp(&a.heard).then(a.worker_id.cmp(&b.worker_id)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(id: &str, key: u8, topics: &[&str]) -> Named {
        Named {
            worker_id: id.into(),
            key: [key; 32],
            topics: topics.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn an_answer_names_only_first_hand_peers_of_shared_topics_and_never_the_asker() {
        let mut book = Book::in_memory();
        let ep: std::net::SocketAddr = "198.51.100.2:4000".parse().unwrap();
        for (id, k, t) in [
            ("gpu-1", 1, "gpu"),
            ("cpu-1", 2, "cpu"),
            ("asker", 3, "gpu"),
        ] {
            book.record(id, [k; 32], None, &[ep], 1);
            book.set_topics(id, &[t.to_string()]);
        }
        let shared = vec!["gpu".to_string(), "cpu".to_string()];
        let a = answer(
            &book,
            "asker",
            &["gpu".into(), "eu".into()],
            &shared,
            vec!["gpu".into()],
        );
        assert_eq!(a.peers, vec![named("gpu-1", 1, &["gpu"])]);
        // A topic we do not share is not answered for.
        let a = answer(&book, "asker", &["cpu".into()], &["gpu".into()], vec![]);
        assert!(a.peers.is_empty());
    }

    #[test]
    fn hearsay_is_checked_against_the_book_bounded_and_a_second_key_is_refused() {
        let mut book = Book::in_memory();
        let ep: std::net::SocketAddr = "198.51.100.2:4000".parse().unwrap();
        book.record("pinned", [1; 32], None, &[ep], 1);
        let w = Walking::default();
        let now = Instant::now();
        let lies = vec![
            // The book pins another key for it.
            named("pinned", 9, &["gpu"]),
            // Ourselves, and the peer answering.
            named("us", 4, &["gpu"]),
            named("liar", 5, &["gpu"]),
            named("new-1", 6, &["gpu"]),
        ];
        assert_eq!(
            w.heard(&book, "us", "liar", lies, now),
            (1, vec!["new-1".to_string()])
        );
        // Another peer names new-1 with another key: the first stays.
        let again = w.heard(&book, "us", "other", vec![named("new-1", 7, &["gpu"])], now);
        assert_eq!(again, (0, vec![]));
        assert_eq!(w.forget("new-1"), Some([6; 32]));
        // Bounded: the oldest goes.
        let many: Vec<Named> = (0..MAX_HEARD + 10)
            .map(|i| named(&format!("w{i}"), 8, &["gpu"]))
            .collect();
        for (i, n) in many.into_iter().enumerate() {
            w.heard(
                &book,
                "us",
                "other",
                vec![n],
                now + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(w.heard.lock().unwrap().len(), MAX_HEARD);
    }

    #[test]
    fn an_answer_with_too_many_or_bad_names_is_not_believed() {
        let asked = vec!["gpu".to_string()];
        let too_many = Answer {
            own: vec![],
            peers: (0..MAX_NAMED + 1)
                .map(|i| named(&format!("w{i}"), 1, &["gpu"]))
                .collect(),
        };
        assert!(checked(too_many, &asked).is_none());
        let mixed = Answer {
            own: vec!["gpu".into()],
            peers: vec![
                named("ok", 1, &["gpu"]),
                named("off-topic", 2, &["cpu"]),
                named("bad id!", 3, &["gpu"]),
            ],
        };
        let (_, kept) = checked(mixed, &asked).unwrap();
        assert_eq!(kept, vec![named("ok", 1, &["gpu"])]);
    }
}
