//! The `punch-server` command.

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand};
use punch_server::{Server, ServerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

/// punch rendezvous server: registers agents by worker id and introduces
/// them so they can punch a direct QUIC connection through their NATs.
#[derive(Parser, Debug)]
#[command(name = "punch-server", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the fingerprint agents pin (--server-fingerprint), creating the
    /// server key if there is none yet.
    Fingerprint {
        /// Directory holding the server key.
        #[arg(long, env = "PUNCH_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
    },
    /// Release WORKER's id: forget the key it is bound to, so another key
    /// may register it. Run it while the server is stopped.
    Forget {
        /// The worker id to release.
        worker: String,
        /// Directory holding the server's data.
        #[arg(long, env = "PUNCH_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
    },
    #[command(flatten)]
    Docs(punch_clidoc::DocsCmd),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// UDP address for QUIC signaling. 0.0.0.0 binds dual-stack ([::]) where
    /// the OS allows.
    #[arg(long, env = "PUNCH_LISTEN", default_value = "0.0.0.0:3478")]
    listen: SocketAddr,
    /// TCP address of the TLS + WebSocket channel (`/ws`) for agents whose
    /// UDP is blocked. Default: the host and port of --listen, on TCP
    /// (deployments behind strict firewalls use 443).
    #[arg(long, env = "PUNCH_TCP_LISTEN")]
    tcp_listen: Option<SocketAddr>,
    /// Do not listen on TCP (agents can still use /ws on the HTTP listener).
    #[arg(long, env = "PUNCH_NO_TCP", value_parser = BoolishValueParser::new())]
    no_tcp: bool,
    /// Most WebSocket clients at once; more are refused and counted.
    #[arg(long, env = "PUNCH_MAX_TCP_CLIENTS", default_value_t = 10_000)]
    max_tcp_clients: usize,
    /// MiB per second one TCP client may send through the relay (excess
    /// frames are dropped and counted); 0 is unlimited.
    #[arg(long, env = "PUNCH_TCP_RATE_MIB", default_value_t = 1024)]
    tcp_rate_mib: u64,
    /// HTTP address for GET /healthz and GET /peers; it also takes the
    /// agents' WebSocket at /ws, for a TLS-terminating front (Cloud Run,
    /// an ingress, nginx) to forward to.
    #[arg(long, env = "PUNCH_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Do not serve HTTP.
    #[arg(long, env = "PUNCH_NO_HTTP", value_parser = BoolishValueParser::new())]
    no_http: bool,
    /// Which of an agent's candidates its peers are given: `open` (every
    /// usable one, for your own agents) or `explained` (public servers:
    /// only addresses the server can explain from what it sees: the
    /// agent's own public address, private ones toward a peer behind the
    /// same public address, IPv6 in the agent's own /64; an agent cannot
    /// point its peers' probes at a third party).
    #[arg(long, env = "PUNCH_CANDIDATES", default_value = "open")]
    candidates: punch_protocol::signal::CandidatePolicy,
    /// Most connections the HTTP listener holds at once (long-polls and
    /// WebSockets forwarded by a front each hold one); more are closed at
    /// accept and counted (`punch_http_refused_full_total`).
    #[arg(long, env = "PUNCH_MAX_HTTP_CONNS", default_value_t = punch_server::serving::MAX_HTTP_CONNS)]
    max_http_conns: usize,
    /// Seconds a client has to send a request's head (line and headers) on
    /// the HTTP listener and the TLS port; a silent or trickling client is
    /// closed after it (`punch_http_header_timeouts_total`).
    #[arg(long, env = "PUNCH_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    header_timeout_secs: u64,
    /// Directory holding the persistent server key (server.key).
    #[arg(long, env = "PUNCH_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Shared token agents must present. Without it the server is open to
    /// anyone who can reach it.
    #[arg(long, env = "PUNCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Most worker ids held in the registry.
    #[arg(long, env = "PUNCH_MAX_WORKERS", default_value_t = 100_000)]
    max_workers: usize,
    /// A second address (other IP and other port) for RFC 5780 NAT
    /// discovery: STUN is then also answered on it and on the two mixed
    /// combinations, and CHANGE-REQUEST is honoured. Needs a specific
    /// --listen address.
    #[arg(long, env = "PUNCH_ALT_LISTEN")]
    alt_listen: Option<SocketAddr>,
    /// Do not relay: agents that cannot punch fail instead.
    #[arg(long, env = "PUNCH_NO_RELAY", value_parser = BoolishValueParser::new())]
    no_relay: bool,
    /// Most relay sessions held at once.
    #[arg(long, env = "PUNCH_RELAY_MAX_SESSIONS", default_value_t = 10_000)]
    relay_max_sessions: usize,
    /// Bytes one relay session may carry, in MiB.
    #[arg(long, env = "PUNCH_RELAY_SESSION_MIB", default_value_t = 4096)]
    relay_session_mib: u64,
    /// Longest life of a relay session, seconds.
    #[arg(long, env = "PUNCH_RELAY_SESSION_SECS", default_value_t = 86_400)]
    relay_session_secs: u64,
    /// A relay session idle this long (seconds) is dropped.
    #[arg(long, env = "PUNCH_RELAY_IDLE_SECS", default_value_t = 60)]
    relay_idle_secs: u64,
    /// Relay sessions one requesting agent may hold. Beyond it its oldest
    /// unused session (its pair went direct) makes room, or, when all are
    /// in use, its offer goes out without a relay; 0: only
    /// --relay-max-sessions bounds it.
    #[arg(long, env = "PUNCH_RELAY_SESSIONS_PER_AGENT", default_value_t = 64)]
    relay_sessions_per_agent: usize,
    /// Connect requests per second one agent may make (a token bucket);
    /// beyond it they are refused (rate_limited) and counted. 0 is
    /// unlimited.
    #[arg(long, env = "PUNCH_CONNECT_RATE", default_value_t = 20)]
    connect_rate: u32,
    /// Connect requests an idle agent may make at once (the bucket's size).
    #[arg(long, env = "PUNCH_CONNECT_BURST", default_value_t = 50)]
    connect_burst: u32,
    /// Queries (waits, listings) one agent may have in flight; more are
    /// refused at once (rate_limited) and counted.
    #[arg(long, env = "PUNCH_MAX_QUERIES_PER_AGENT", default_value_t = 32)]
    max_queries_per_agent: usize,
    /// Seconds without any packet after which an agent's signaling
    /// connection is dropped (agents keep alive every 5 s).
    #[arg(long, env = "PUNCH_IDLE_TIMEOUT", default_value_t = 20)]
    idle_timeout: u64,
    /// Seconds a worker whose connection dropped stays listed as stale
    /// (keeping its place for a quick reconnect) before it expires.
    #[arg(long, env = "PUNCH_STALE_SECS", default_value_t = 30)]
    stale_secs: u64,
    /// Most waits (HTTP long-polls, barrier waits, agents' `wait`) held at
    /// once; more are refused (HTTP 429) and counted.
    #[arg(long, env = "PUNCH_MAX_WAITS", default_value_t = 10_000)]
    max_waits: usize,
    /// Seconds a released barrier is remembered (later waits on it return
    /// at once); then it is forgotten and its key may be used again.
    #[arg(long, env = "PUNCH_BARRIER_TTL_SECS", default_value_t = 600)]
    barrier_ttl_secs: u64,
    /// Serve the HTTP API and status page without the bearer token.
    #[arg(long, env = "PUNCH_HTTP_OPEN", value_parser = BoolishValueParser::new())]
    http_open: bool,
    /// Require the bearer token on /healthz and /metrics too (open by
    /// default, for probes and scrapers).
    #[arg(long, env = "PUNCH_METRICS_AUTH", value_parser = BoolishValueParser::new())]
    metrics_auth: bool,
    /// Where the registry lives: `memory` (this server alone) or
    /// `redis://HOST:PORT[/DB]` to share it with other servers (cluster
    /// mode: a requester on one server reaches a worker on another; servers
    /// of one cluster share one key, i.e. the same server.key).
    #[arg(long, env = "PUNCH_REGISTRY", default_value = "memory")]
    registry: String,
    /// Cluster mode: the UDP address other servers relay to, i.e. this
    /// server's --listen as they reach it. Default: --listen when it names
    /// an address, else this host's first non-loopback address with the
    /// UDP port.
    #[arg(long, env = "PUNCH_CLUSTER_ADDR")]
    cluster_addr: Option<SocketAddr>,
    /// Cluster mode: seconds a worker's entry in Redis lives without a
    /// refresh (refreshed every third of it while the worker is online).
    #[arg(long, env = "PUNCH_CLUSTER_TTL", default_value_t = 15)]
    cluster_ttl: u64,
    /// What to log on stderr, as a tracing filter: a level (error, warn,
    /// info, debug, trace) or per-module directives, e.g.
    /// `info,punch_server=debug`. Default: $RUST_LOG, else info.
    #[arg(long, global = true, env = "PUNCH_LOG", value_name = "FILTER")]
    log: Option<String>,
}

fn default_data_dir() -> PathBuf {
    dirs::data_local_dir()
        .map(|d| d.join("punch-server"))
        .unwrap_or_else(|| PathBuf::from(".punch-server"))
}

fn init_logs(given: Option<&str>) {
    let filter = match given.map(tracing_subscriber::EnvFilter::try_new) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("punch-server: ignoring --log/PUNCH_LOG {given:?}: {e}");
            tracing_subscriber::EnvFilter::new("info")
        }
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Docs(docs)) = &cli.cmd {
        use clap::CommandFactory;
        punch_clidoc::run(docs, Cli::command())?;
        return Ok(());
    }
    if let Some(Cmd::Fingerprint { data_dir }) = cli.cmd {
        let id = punch_tls::Identity::load_or_create(&punch_server::key_path(&data_dir))?;
        println!("{}", id.fingerprint());
        return Ok(());
    }
    if let Some(Cmd::Forget { worker, data_dir }) = cli.cmd {
        punch_protocol::signal::validate_worker_id(&worker)
            .map_err(|e| anyhow::anyhow!("worker id {worker:?}: {e}"))?;
        let store = punch_server::store::Store::open(&data_dir).context(
            "opening the binding store (is punch-server running on this data dir? stop it first)",
        )?;
        if store.forget(&worker)? {
            println!("released {worker}: the next key to register it gets it");
        } else {
            println!("{worker} was not bound");
        }
        return Ok(());
    }
    init_logs(cli.run.log.as_deref());
    let a = cli.run;
    if a.idle_timeout < 5 || a.idle_timeout > 600 {
        anyhow::bail!("--idle-timeout must be between 5 and 600 seconds");
    }
    let mut cfg = ServerConfig::new(a.data_dir);
    cfg.listen = a.listen;
    cfg.http = (!a.no_http).then_some(a.http);
    cfg.token = a.token.filter(|t| !t.is_empty());
    cfg.max_workers = a.max_workers;
    cfg.idle_timeout = std::time::Duration::from_secs(a.idle_timeout);
    cfg.alt_listen = a.alt_listen;
    if !(1..=86_400).contains(&a.stale_secs) {
        anyhow::bail!("--stale-secs must be between 1 and 86400");
    }
    cfg.stale_grace = std::time::Duration::from_secs(a.stale_secs);
    cfg.http_open = a.http_open;
    if !(1..=1_000_000).contains(&a.max_waits) {
        anyhow::bail!("--max-waits must be between 1 and 1000000");
    }
    cfg.max_waits = a.max_waits;
    if !(1..=30 * 86_400).contains(&a.barrier_ttl_secs) {
        anyhow::bail!("--barrier-ttl-secs must be between 1 and 2592000");
    }
    cfg.barrier_ttl = std::time::Duration::from_secs(a.barrier_ttl_secs);
    cfg.metrics_open = !a.metrics_auth;
    cfg.tcp_listen = if a.no_tcp {
        punch_server::TcpListen::Off
    } else {
        match a.tcp_listen {
            Some(addr) => punch_server::TcpListen::Addr(addr),
            None => punch_server::TcpListen::SameAsUdp,
        }
    };
    if !(1..=1_000_000).contains(&a.max_tcp_clients) {
        anyhow::bail!("--max-tcp-clients must be between 1 and 1000000");
    }
    cfg.max_tcp_clients = a.max_tcp_clients;
    if !(1..=1_000_000).contains(&a.max_http_conns) {
        anyhow::bail!("--max-http-conns must be between 1 and 1000000");
    }
    cfg.max_http_conns = a.max_http_conns;
    cfg.candidates = a.candidates;
    if !(1..=3600).contains(&a.header_timeout_secs) {
        anyhow::bail!("--header-timeout-secs must be between 1 and 3600");
    }
    cfg.header_timeout = std::time::Duration::from_secs(a.header_timeout_secs);
    cfg.tcp_rate = a.tcp_rate_mib.saturating_mul(1 << 20);
    if a.relay_idle_secs == 0 || a.relay_session_secs == 0 || a.relay_max_sessions == 0 {
        anyhow::bail!("relay limits must be positive (use --no-relay to turn the relay off)");
    }
    cfg.relay = (!a.no_relay).then(|| punch_protocol::relay::RelayLimits {
        max_sessions: a.relay_max_sessions,
        session_bytes: a.relay_session_mib.saturating_mul(1 << 20),
        session_time: std::time::Duration::from_secs(a.relay_session_secs),
        idle: std::time::Duration::from_secs(a.relay_idle_secs),
        per_owner: a.relay_sessions_per_agent,
        ..Default::default()
    });
    if a.connect_rate > 0 && a.connect_burst == 0 {
        anyhow::bail!("--connect-burst must be at least 1 (or --connect-rate 0 for no limit)");
    }
    cfg.connect_rate = a.connect_rate;
    cfg.connect_burst = a.connect_burst;
    if !(1..=100_000).contains(&a.max_queries_per_agent) {
        anyhow::bail!("--max-queries-per-agent must be between 1 and 100000");
    }
    cfg.max_queries = a.max_queries_per_agent;
    cfg.cluster = match a.registry.trim() {
        "" | "memory" => None,
        url if url.starts_with("rediss://") => anyhow::bail!(
            "--registry {url:?}: TLS to Redis is not built in; reach Redis over a private network (redis://) or a TLS tunnel"
        ),
        url if url.starts_with("redis://") || url.starts_with("redis+unix://") =>
        {
            if !(3..=3600).contains(&a.cluster_ttl) {
                anyhow::bail!("--cluster-ttl must be between 3 and 3600 seconds");
            }
            Some(punch_server::cluster::ClusterConfig {
                url: url.to_string(),
                advertise: a
                    .cluster_addr
                    .unwrap_or_else(|| SocketAddr::new(a.listen.ip(), 0)),
                ttl: std::time::Duration::from_secs(a.cluster_ttl),
            })
        }
        other => anyhow::bail!("--registry {other:?}: expected memory or redis://HOST:PORT"),
    };
    let server = Server::start(cfg).await.context("starting punch-server")?;
    // A machine-readable line for scripts and tests that start us on port 0.
    let or_off = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    println!(
        "punch-server udp={} http={} fingerprint={} tcp={}",
        server.udp_addr,
        or_off(server.http_addr),
        server.fingerprint,
        or_off(server.tcp_addr),
    );
    punch_net::shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Well formed, and every option has a `PUNCH_*` variable.
    #[test]
    fn the_command_line_is_complete() {
        punch_clidoc::assert_complete(super::Cli::command());
    }
}
