//! Peer exchange (`punch/pex`): asking a peer we can reach where peers we
//! both know are now.
//!
//! The asker names keys it already pins; the answerer says, for each that
//! its own address book holds, the endpoints it last saw it at (a peer's
//! knocks keep those fresh while the server is away). Nothing else: the
//! asker learns no id, key or secret it did not have, the answerer's book
//! cannot be listed through it, and an endpoint the answer gives is only
//! ever added to the entry of the key it was given for. A lying answer
//! costs a few knocks that nobody verifies.

use crate::book::{Book, MAX_ENDPOINTS};
use crate::peer::{PeerConnection, PeerError};
use crate::protocols::{ProtocolHandler, ProtocolStream};
use punch_tls::PublicKey;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// The protocol's name on a peer connection.
pub const PEX_PROTOCOL: &str = "punch/pex";
/// Most keys one question names.
pub const MAX_KEYS: usize = 64;
/// Largest question and answer on the wire.
const MAX_ASK: usize = 64 + MAX_KEYS * 40;
const MAX_ANSWER: usize = 64 + MAX_KEYS * (48 + MAX_ENDPOINTS * 32);

/// Where are these peers?
#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    keys: Vec<PublicKey>,
}

/// Where the answerer last saw the keys it knows.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    found: Vec<Found>,
}

/// One peer the answerer knows: its endpoints, most recent first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Found {
    pub key: PublicKey,
    pub endpoints: Vec<SocketAddr>,
}

/// The application's protocols and ours (an application's own
/// `punch/pex` handler, if it has one, stays).
pub(crate) fn with_handler(
    protocols: crate::protocols::Protocols,
    book: &Arc<Mutex<Book>>,
) -> crate::protocols::Protocols {
    if protocols.contains_key(PEX_PROTOCOL) {
        return protocols;
    }
    let mut all = (*protocols).clone();
    all.insert(PEX_PROTOCOL.to_string(), Arc::new(handler(book.clone())));
    Arc::new(all)
}

/// Answers questions from our address book.
pub(crate) fn handler(book: Arc<Mutex<Book>>) -> impl ProtocolHandler {
    move |mut s: ProtocolStream| {
        let book = book.clone();
        async move {
            let Some(ask) = s.question::<Ask>(MAX_ASK, "peer-exchange").await else {
                return;
            };
            let answer = answer(&book.lock().expect("not poisoned"), &ask.keys);
            s.answer(&answer).await;
        }
    }
}

fn answer(book: &Book, keys: &[PublicKey]) -> Answer {
    let found = keys
        .iter()
        .take(MAX_KEYS)
        .filter_map(|k| {
            let e = book.by_key(k)?;
            (!e.endpoints.is_empty()).then(|| Found {
                key: *k,
                endpoints: e.endpoints.clone(),
            })
        })
        .collect();
    Answer { found }
}

/// Asks the peer of `pc` where `keys` are; only answers for keys asked,
/// each with at most [`MAX_ENDPOINTS`] endpoints, are kept.
pub(crate) async fn ask(pc: &PeerConnection, keys: &[PublicKey]) -> Result<Vec<Found>, PeerError> {
    let keys: Vec<PublicKey> = keys.iter().take(MAX_KEYS).copied().collect();
    let ask = Ask { keys: keys.clone() };
    let a: Answer = pc.ask(PEX_PROTOCOL, &ask, MAX_ANSWER).await?;
    Ok(checked(a, &keys))
}

fn checked(a: Answer, asked: &[PublicKey]) -> Vec<Found> {
    a.found
        .into_iter()
        .filter(|f| asked.contains(&f.key))
        .map(|mut f| {
            f.endpoints.truncate(MAX_ENDPOINTS);
            f
        })
        .take(asked.len())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_tells_only_what_was_asked_and_the_asker_keeps_only_that() {
        let mut book = Book::in_memory();
        let b: SocketAddr = "198.51.100.2:4000".parse().unwrap();
        let c: SocketAddr = "198.51.100.3:4000".parse().unwrap();
        book.record("worker-b", [2; 32], None, &[b], 1);
        book.record("worker-c", [3; 32], None, &[c], 1);
        // Asked for c (and a key it does not know): c alone.
        let a = answer(&book, &[[3; 32], [9; 32]]);
        assert_eq!(
            a.found,
            vec![Found {
                key: [3; 32],
                endpoints: vec![c]
            }]
        );
        // A lying answer: a key not asked for, too many endpoints.
        let lie = Answer {
            found: vec![
                Found {
                    key: [2; 32],
                    endpoints: vec![b],
                },
                Found {
                    key: [3; 32],
                    endpoints: vec![c; 10],
                },
            ],
        };
        let kept = checked(lie, &[[3; 32]]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].key, [3; 32]);
        assert_eq!(kept[0].endpoints.len(), MAX_ENDPOINTS);
    }
}
