//! Chaos on loopback, in a test binary of its own: 300 agents
//! reconnecting at once load both cores, and the timing tests beside them
//! (resilience.rs: relayed pings resume within 2 s) would measure that.

use std::time::Duration;

/// The server killed (SIGKILL) under 300 agents and started again on its
/// port a second later: every agent registers again within 10 s, and the
/// new server counts them all (`punch-lab chaos-restart` runs it with
/// 5,000; BENCHMARKS.md has the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_registers_again_after_the_server_is_killed() {
    let r = punch_lab::chaos::restart(300, Duration::from_secs(1), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.registered_before, 300, "{r:?}");
    assert_eq!(r.lost, 0, "{r:?}");
    assert_eq!(r.registered_again, 300, "{r:?}");
    assert!(r.server_online_after >= 300, "{r:?}");
}
