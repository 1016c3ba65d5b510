//! Embedding the agent: `cargo run -p punch-agent --example embed -- \
//!   --server HOST:PORT --fingerprint FP --id worker-a [--target worker-b]`.
//! Both sides serve an application protocol of their own, `hello/1`, beside
//! the library's echo and one of the apps of `punch-apps` (bench), each
//! registered the same way. Without `--target` it serves (accepts peers and
//! answers their streams: ping, bench, and `hello/1`); with it, it connects
//! by id, reports the path and a round trip (built-in echo), uploads for a
//! moment (bench), then says hello over `hello/1` on the same connection
//! and prints the answer.

use punch_agent::{Agent, ProtocolStream};
use std::time::Duration;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The application's own protocol: read the message (up to 1 KiB, until
/// the peer finishes its side), answer with a greeting.
async fn hello(mut s: ProtocolStream) {
    let Ok(msg) = s.recv.read_to_end(1024).await else {
        return;
    };
    let answer = format!(
        "hello {}, you said {:?}",
        s.peer_id,
        String::from_utf8_lossy(&msg)
    );
    let _ = s.send.write_all(answer.as_bytes()).await;
    let _ = s.send.finish();
    // Keep the stream until the peer has read the answer.
    let _ = s.send.stopped().await;
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (Some(server), Some(fp), Some(id)) = (arg("--server"), arg("--fingerprint"), arg("--id"))
    else {
        eprintln!("usage: embed --server HOST:PORT --fingerprint FP --id NAME [--target NAME]");
        std::process::exit(2);
    };
    let agent = Agent::builder(server, fp)
        .worker_id(id)
        .protocol("hello/1", hello)
        .protocol(punch_apps::bench::NAME, punch_apps::bench::Bench)
        .start()
        .await?;
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
            let (bytes, took) =
                punch_apps::bench::upload(&peer, Duration::from_millis(200)).await?;
            println!("bench: uploaded {bytes} bytes in {took:?}");
            // Our own protocol, on the same connection.
            let (mut send, mut recv) = peer.open_protocol("hello/1").await?;
            send.write_all(b"hi from an embedded agent").await?;
            send.finish()?;
            let answer = recv.read_to_end(4096).await?;
            println!("hello/1 answered: {}", String::from_utf8_lossy(&answer));
            peer.conn.close(0u32.into(), b"bye");
            agent.close().await;
        }
    }
    Ok(())
}
