//! Embedding the agent: `cargo run -p punch-agent --example embed -- \
//!   --server HOST:PORT --fingerprint FP --id worker-a [--target worker-b]`.
//! Without `--target` it serves (accepts peers and answers their streams);
//! with it, it connects by id, reports the path and a round trip, and sends
//! a message on a stream of its own.

use punch_agent::Agent;
use std::time::Duration;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (Some(server), Some(fp), Some(id)) = (arg("--server"), arg("--fingerprint"), arg("--id"))
    else {
        eprintln!("usage: embed --server HOST:PORT --fingerprint FP --id NAME [--target NAME]");
        std::process::exit(2);
    };
    let agent = Agent::builder(server, fp).worker_id(id).start().await?;
    let seen = agent.registered(Duration::from_secs(10)).await?;
    println!("registered as {} (server sees {seen})", agent.worker_id());
    match arg("--target") {
        None => {
            while let Some(peer) = agent.accept().await {
                println!("{} connected ({:?})", peer.peer_id, peer.path.kind);
                tokio::spawn(peer.serve());
            }
        }
        Some(target) => {
            let peer = agent.connect(&target).await?;
            let (kind, remote) = peer.path_now();
            println!(
                "connected to {} via {} path {:?} in {:?}",
                peer.peer_id,
                kind.as_str(),
                remote,
                peer.path.connect_time
            );
            let mut pinger = peer.pinger().await?;
            println!("round trip {:?}", pinger.ping().await?);
            // Your own protocol: any quinn stream on `peer.conn`.
            let (mut send, _recv) = peer.conn.open_uni().await.map(|s| (s, ()))?;
            send.write_all(b"hello from an embedded agent").await?;
            send.finish()?;
            peer.conn.close(0u32.into(), b"bye");
            agent.close().await;
        }
    }
    Ok(())
}
