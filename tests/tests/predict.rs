//! Port prediction through a real server over loopback QUIC: a counter an
//! agent advertises (two `predicted` candidates) reaches the peer's offer
//! in order, where `punch_protocol::predict::advertised` reads it back, and
//! `GET /peers` shows it as the worker's `counter`; the allocator it
//! reported comes beside the offer to version 6 agents, not to older ones.

use punch_lab::harness::{RawClient, ServerProc};
use punch_protocol::allocator::Allocator;
use punch_protocol::predict::{advertised, Counter};
use punch_protocol::signal::{ClientMsg, ServerMsg};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advertised_counter_reaches_the_peer_and_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let counter = Counter::after("127.0.0.1".parse().unwrap(), 30000, 4).unwrap();
    let mut a = RawClient::register(&s, "worker-a").await;
    // As the agent does once its NAT check has read the counter.
    a.send(ClientMsg::Candidates {
        local: counter.candidates(),
    })
    .await;
    a.send(ClientMsg::Allocator(Allocator::Sequential { stride: 4 }))
        .await;
    let mut b = RawClient::register(&s, "worker-b").await;
    // The server handles A's messages in order: a ping answered means the
    // candidates are in.
    a.send(ClientMsg::Ping { req: 7 }).await;
    assert!(matches!(a.next().await, ServerMsg::Pong { req: 7 }));
    let offer = match b.connect(1, "worker-a").await {
        ServerMsg::OfferWithAllocator {
            offer,
            peer_allocator,
        } => {
            assert_eq!(peer_allocator, Allocator::Sequential { stride: 4 });
            offer
        }
        m => panic!("expected an offer with the allocator, got {m:?}"),
    };
    // A version 5 agent reads the offer as it always did, the counter in
    // it, no allocator beside.
    let mut old = RawClient::register_version(&s, "worker-old", 5).await;
    match old.connect(1, "worker-a").await {
        ServerMsg::Offer(o) => assert_eq!(advertised(&o.peer_candidates), Some(counter)),
        m => panic!("expected a plain offer, got {m:?}"),
    }
    assert_eq!(
        advertised(&offer.peer_candidates),
        Some(counter),
        "{:?}",
        offer.peer_candidates
    );
    let peers: serde_json::Value = serde_json::from_str(&s.http_get("/peers").unwrap()).unwrap();
    let listed = |id: &str| {
        peers
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["worker_id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {peers}"))
            .clone()
    };
    let wa = listed("worker-a");
    assert_eq!(wa["counter"]["next"], 30004, "{wa}");
    assert_eq!(wa["counter"]["stride"], 4, "{wa}");
    let wb = listed("worker-b");
    assert!(wb["counter"].is_null(), "{wb}");
}
