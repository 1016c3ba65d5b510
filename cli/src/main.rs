//! The `punch-agent` command.

mod status;

use clap::{Args, Parser, Subcommand};
use punch_agent::portmap::{PortMapSettings, PortMapping};
use punch_agent::{Agent, AgentConfig, AgentError, PeerConnection, RelayMode, Status};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// punch agent: register with a punch rendezvous server and reach other
/// workers by id over direct, mutually authenticated QUIC connections.
///
/// Exit codes: 0 ok, 1 I/O, 2 usage/config, 3 unknown worker, 4 worker
/// offline, 5 punch timed out, 6 bad token, 7 server fingerprint mismatch,
/// 8 server unreachable, 9 worker id taken, 10 protocol version mismatch,
/// 11 peer connection failed, 12 timeout, 13 other server refusal.
#[derive(Parser, Debug)]
#[command(name = "punch-agent", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Common {
    /// Rendezvous server. HOST:PORT: QUIC over UDP there, and the TCP
    /// channel (TLS + WebSocket) at the same host and port, tried when UDP
    /// has not answered within 300 ms. wss://HOST[:PORT]/ws: the TCP
    /// channel only (a server behind an HTTPS-only front). A comma-separated
    /// list names servers of one cluster (`punch-server --registry
    /// redis://…`): the agent uses the first that answers and moves to the
    /// next when its server fails.
    #[arg(long, global = true, env = "PUNCH_SERVER")]
    server: Option<String>,
    /// The TCP channel when it is not at --server's host and port, e.g. an
    /// HTTPS front: wss://HOST[:PORT]/ws.
    #[arg(long, global = true, env = "PUNCH_SERVER_TCP")]
    server_tcp: Option<String>,
    /// CA certificates (PEM) that sign the front's certificate, instead of
    /// the system roots. The server's own pinned key is always accepted.
    #[arg(long, global = true, env = "PUNCH_SERVER_CA")]
    server_ca: Option<PathBuf>,
    /// HTTP proxy for the TCP channel, http://[USER:PASS@]HOST:PORT (HTTP
    /// CONNECT, Basic auth). Default: $HTTPS_PROXY / $ALL_PROXY; $NO_PROXY
    /// exempts hosts either way.
    #[arg(long, global = true)]
    proxy: Option<String>,
    /// Renew the TCP channel after this many seconds, before a front cuts
    /// it (Cloud Run ends WebSockets at 60 minutes); peer connections stay.
    #[arg(
        long,
        global = true,
        env = "PUNCH_WS_MAX_AGE",
        default_value_t = 3000.0
    )]
    ws_max_age: f64,
    /// Never use the TCP channel (UDP only).
    #[arg(long, global = true)]
    no_tcp: bool,
    /// SHA-256 fingerprint of the server key (`punch-server fingerprint`).
    #[arg(long, global = true, env = "PUNCH_SERVER_FINGERPRINT")]
    server_fingerprint: Option<String>,
    /// Token, if the server requires one.
    #[arg(long, global = true, env = "PUNCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Our worker id. `connect` and `ping` register a one-off anon-… id
    /// when none is given.
    #[arg(long, global = true, env = "PUNCH_ID")]
    id: Option<String>,
    /// Persistent Ed25519 key of this agent; created if missing. Default:
    /// <data dir>/punch/agent.key for agents with an id, a one-off key
    /// otherwise.
    #[arg(long, global = true, env = "PUNCH_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Local UDP address of the agent's one socket.
    #[arg(long, global = true, env = "PUNCH_BIND", default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Seconds to punch before giving up.
    #[arg(
        long,
        global = true,
        env = "PUNCH_PUNCH_TIMEOUT",
        default_value_t = 5.0
    )]
    punch_timeout: f64,
    /// A standard STUN server (HOST:PORT) to learn our public mapping from;
    /// repeatable. Its answers become candidates in offers.
    #[arg(long, global = true, env = "PUNCH_STUN", value_delimiter = ',')]
    stun: Vec<String>,
    /// Never use the server's relay: fail when no direct path can be punched.
    #[arg(long, global = true, conflicts_with = "force_relay")]
    no_relay: bool,
    /// Use the server's relay at once, without punching.
    #[arg(long, global = true)]
    force_relay: bool,
    /// Start on the relay when punching has found no path after this many
    /// seconds; the connection moves to the direct path once one is found.
    #[arg(long, global = true, env = "PUNCH_RELAY_AFTER", default_value_t = 3.0)]
    relay_after: f64,
    /// Do not classify our NAT after registering (by default the agent runs
    /// the nat-check tests once in the background and tells the server its
    /// class, which offers and the server's metrics carry).
    #[arg(long, global = true)]
    no_nat_check: bool,
    /// Ask the gateway for a port mapping (PCP, then NAT-PMP, then UPnP
    /// IGD) forwarded to our UDP socket, in the background, and offer the
    /// public address to peers: auto or off. Off sends nothing to the
    /// gateway. Skipped for a loopback socket or server.
    #[arg(
        long,
        global = true,
        env = "PUNCH_PORT_MAPPING",
        default_value = "auto",
        value_parser = ["auto", "off"]
    )]
    port_mapping: String,
    /// Testing: the port mapping protocols to try, in order (pcp,
    /// nat-pmp, upnp).
    #[arg(long, global = true, hide = true, value_delimiter = ',')]
    port_mapping_protocols: Vec<String>,
    /// Testing: the mapping lifetime to ask for, seconds.
    #[arg(long, global = true, hide = true)]
    port_mapping_lifetime: Option<u32>,
    /// Testing: the gateway's PCP/NAT-PMP address instead of the default
    /// route's gateway on port 5351.
    #[arg(long, global = true, hide = true)]
    port_mapping_gateway: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Register and accept peer connections (answers ping, echo and bench
    /// streams) until interrupted. Reconnects by itself when the server
    /// goes away; Ctrl-C or SIGTERM deregisters at once.
    Serve {
        /// Our type (service kind), for `list --type` and `discover`.
        #[arg(long = "type", env = "PUNCH_TYPE")]
        kind: Option<String>,
        /// A tag to filter on; repeatable.
        #[arg(long = "tag", env = "PUNCH_TAGS", value_delimiter = ',')]
        tags: Vec<String>,
        /// Metadata KEY=VALUE; repeatable.
        #[arg(long = "meta", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
        /// Share this directory read-only with peers (`files`, `get`).
        #[arg(long, value_name = "DIR")]
        share: Option<PathBuf>,
        /// Let peers forward TCP connections to this address (`forward
        /// --remote`); repeatable. Nothing is allowed by default.
        #[arg(long = "allow-forward", value_name = "IP:PORT")]
        allow_forward: Vec<SocketAddr>,
        /// Serve GET /healthz and GET / (our status) on this TCP address.
        /// Default: 0.0.0.0:$PORT when PORT is set (Cloud Run), else off.
        #[arg(long)]
        http: Option<SocketAddr>,
    },
    /// List workers online or stale (recently dropped), optionally of one
    /// type and with one tag.
    List {
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Print a random online worker of TYPE (exit 3 when none is online).
    Discover {
        #[arg(value_name = "TYPE")]
        kind: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Forward local TCP connections to a TCP service reachable from
    /// TARGET (like `ssh -L`): each connection to --local rides its own
    /// QUIC stream; TARGET connects to --remote if it is on its
    /// --allow-forward list. Runs until interrupted.
    Forward {
        /// Worker id to reach.
        target: String,
        /// Local TCP address to listen on.
        #[arg(long, value_name = "IP:PORT")]
        local: SocketAddr,
        /// The address TARGET connects to, as TARGET sees it.
        #[arg(long, value_name = "IP:PORT")]
        remote: SocketAddr,
        /// Limit in seconds for connecting to TARGET.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
    /// List the files TARGET shares (serve --share): name, size, BLAKE3.
    Files {
        target: String,
        /// Print a JSON array of {name, size, blake3}.
        #[arg(long)]
        json: bool,
        /// Limit in seconds for connecting.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
    /// Download NAME from TARGET's shared directory, with a progress bar.
    /// A partial download (PATH.part) resumes; the file is put in place
    /// only after its BLAKE3 matches.
    Get {
        target: String,
        name: String,
        /// Where to write (default: the name's last component, here).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Limit in seconds for connecting.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
    /// Wait until WORKER is online: exit 0 as soon as it is, 12 on timeout.
    /// For start-up ordering of containers.
    Wait {
        worker: String,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Connect to TARGET, measure one round trip, print the result, exit.
    Connect {
        /// Worker id to reach.
        target: String,
        /// Print exactly one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Overall limit in seconds (registration, punching, handshake).
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
    /// Classify this host's NAT (RFC 5780): public address, mapping and
    /// filtering behaviour, port preservation, hairpinning. Asks the
    /// --server's STUN port (start punch-server with --alt-listen), or the
    /// first --stun server. No registration, no fingerprint needed.
    NatCheck {
        /// Print exactly one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Connect to TARGET and measure round trips: min/avg/max.
    Ping {
        /// Worker id to reach.
        target: String,
        /// Number of round trips.
        #[arg(short = 'c', long, default_value_t = 4)]
        count: u32,
        /// Seconds between round trips.
        #[arg(short = 'i', long, default_value_t = 1.0)]
        interval: f64,
        /// Print exactly one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Limit in seconds for connecting.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
    /// Connect to TARGET and measure throughput over the peer connection:
    /// upload for N seconds, then download for N seconds (MB = 10^6 bytes).
    /// With --force-relay, through the server's relay.
    Bench {
        /// Worker id to reach.
        target: String,
        /// Seconds per direction (1 to 60).
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Print exactly one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Limit in seconds for connecting.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUNCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn secs(v: f64, what: &str) -> Result<Duration, AgentError> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(AgentError::Config(format!(
            "{what} must be between 0 and 86400 seconds, got {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

fn default_key_file() -> PathBuf {
    dirs::data_local_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("punch")
        .join("agent.key")
}

fn config(c: &Common, persistent: bool) -> Result<AgentConfig, AgentError> {
    let server = c.server.clone().ok_or_else(|| {
        AgentError::Config("--server HOST:PORT (or PUNCH_SERVER) is required".into())
    })?;
    let fp = c.server_fingerprint.clone().ok_or_else(|| {
        AgentError::Config(
            "--server-fingerprint (or PUNCH_SERVER_FINGERPRINT) is required; get it with `punch-server fingerprint`"
                .into(),
        )
    })?;
    let mut cfg = AgentConfig::new(server, fp);
    cfg.worker_id = c.id.clone();
    cfg.token = c.token.clone().filter(|t| !t.is_empty());
    cfg.key_file = match (&c.key_file, persistent || c.id.is_some()) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(default_key_file()),
        (None, false) => None,
    };
    cfg.bind = c.bind;
    cfg.punch_timeout = secs(c.punch_timeout, "--punch-timeout")?;
    cfg.relay_after = secs(c.relay_after, "--relay-after")?;
    cfg.stun = c.stun.clone();
    cfg.nat_check = !c.no_nat_check;
    cfg.server_tcp = c.server_tcp.clone().filter(|s| !s.is_empty());
    cfg.server_ca = c.server_ca.clone();
    cfg.proxy = c.proxy.clone().filter(|s| !s.is_empty());
    cfg.ws_max_age = secs(c.ws_max_age, "--ws-max-age")?;
    if cfg.ws_max_age < Duration::from_secs(10) {
        return Err(AgentError::Config(
            "--ws-max-age must be at least 10 seconds".into(),
        ));
    }
    cfg.port_mapping = port_mapping_settings(c)?;
    cfg.udp_only = c.no_tcp;
    if cfg.udp_only && cfg.server_tcp_only() {
        return Err(AgentError::Config(
            "--no-tcp, but --server names a WebSocket".into(),
        ));
    }
    cfg.relay = if c.no_relay {
        RelayMode::Never
    } else if c.force_relay {
        RelayMode::Force
    } else {
        RelayMode::Auto
    };
    Ok(cfg)
}

fn port_mapping_settings(c: &Common) -> Result<PortMapSettings, AgentError> {
    let mut s = PortMapSettings {
        mode: c.port_mapping.parse().map_err(AgentError::Config)?,
        ..PortMapSettings::default()
    };
    if !c.port_mapping_protocols.is_empty() {
        s.protocols = c
            .port_mapping_protocols
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .map_err(AgentError::Config)?;
    }
    if let Some(l) = c.port_mapping_lifetime {
        if l == 0 {
            return Err(AgentError::Config(
                "--port-mapping-lifetime must be at least 1".into(),
            ));
        }
        s.lifetime = Duration::from_secs(l as u64);
    }
    s.gateway = c.port_mapping_gateway;
    Ok(s)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (json, result) = match &cli.cmd {
        Cmd::NatCheck { json } => {
            init_logs("error");
            (*json, nat_check(&cli.common, *json).await)
        }
        Cmd::Serve {
            kind,
            tags,
            meta,
            http,
            allow_forward,
            share,
        } => {
            init_logs("info");
            let http = http.or_else(|| {
                std::env::var("PORT")
                    .ok()
                    .and_then(|p| p.parse::<u16>().ok())
                    .map(|p| SocketAddr::from(([0, 0, 0, 0], p)))
            });
            (
                false,
                serve(
                    &cli.common,
                    kind.clone(),
                    tags.clone(),
                    meta.clone(),
                    http,
                    allow_forward.clone(),
                    share.clone(),
                )
                .await,
            )
        }
        Cmd::List { kind, tag, json } => {
            init_logs("error");
            (
                *json,
                list(&cli.common, kind.as_deref(), tag.as_deref(), *json).await,
            )
        }
        Cmd::Discover { kind, json } => {
            init_logs("error");
            (*json, discover(&cli.common, kind, *json).await)
        }
        Cmd::Forward {
            target,
            local,
            remote,
            timeout,
        } => {
            init_logs("warn");
            (
                false,
                forward(&cli.common, target, *local, *remote, *timeout).await,
            )
        }
        Cmd::Files {
            target,
            json,
            timeout,
        } => {
            init_logs("error");
            (*json, files(&cli.common, target, *json, *timeout).await)
        }
        Cmd::Get {
            target,
            name,
            output,
            timeout,
        } => {
            init_logs("error");
            (
                false,
                get(&cli.common, target, name, output.clone(), *timeout).await,
            )
        }
        Cmd::Wait { worker, timeout } => {
            init_logs("error");
            (false, wait(&cli.common, worker, *timeout).await)
        }
        Cmd::Connect {
            target,
            json,
            timeout,
        } => {
            init_logs("error");
            (*json, connect(&cli.common, target, *json, *timeout).await)
        }
        Cmd::Ping {
            target,
            count,
            interval,
            json,
            timeout,
        } => {
            init_logs("error");
            (
                *json,
                ping(&cli.common, target, *count, *interval, *json, *timeout).await,
            )
        }
        Cmd::Bench {
            target,
            seconds,
            json,
            timeout,
        } => {
            init_logs("error");
            (
                *json,
                bench(&cli.common, target, *seconds, *json, *timeout).await,
            )
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({"error": e.kind(), "message": e.to_string(), "exit_code": e.exit_code()})
                );
            }
            eprintln!("punch-agent: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn nat_check(c: &Common, json: bool) -> Result<(), AgentError> {
    let target = c.stun.first().or(c.server.as_ref()).ok_or_else(|| {
        AgentError::Config("nat-check needs --server HOST:PORT or --stun HOST:PORT".into())
    })?;
    let addr = tokio::net::lookup_host(target)
        .await
        .map_err(|e| AgentError::ServerUnreachable {
            server: target.clone(),
            reason: format!("cannot resolve: {e}"),
        })?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| AgentError::Config(format!("{target} has no IPv4 address")))?;
    let bind = if c.bind.ip().is_unspecified() {
        std::net::SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        c.bind
    };
    let settings = port_mapping_settings(c)?;
    let (r, pm) = tokio::join!(
        punch_agent::natcheck::check(addr, bind, true),
        punch_agent::portmap::nat_check(&settings, bind, target)
    );
    let r = r?;
    if json {
        let mut v = serde_json::to_value(&r).map_err(|e| AgentError::Io(e.to_string()))?;
        v["port_mapping"] = json!(pm);
        println!("{v}");
        return Ok(());
    }
    match &pm {
        None => println!(
            "port mapping:   not asked (--port-mapping off, or a loopback socket or server)"
        ),
        Some(p) => {
            let said = |name: &str, r: &Option<String>| match r {
                None => format!("{name} mapped"),
                Some(e) => format!("{name}: {e}"),
            };
            println!(
                "port mapping:   gateway {}: {}",
                p.gateway.as_deref().unwrap_or("none"),
                [
                    ("PCP", &p.errors.pcp, p.pcp),
                    ("NAT-PMP", &p.errors.nat_pmp, p.nat_pmp),
                    ("UPnP", &p.errors.upnp, p.upnp)
                ]
                .iter()
                .map(|(n, e, ok)| if *ok { said(n, &None) } else { said(n, e) })
                .collect::<Vec<_>>()
                .join("; ")
            );
            if let Some(m) = &p.mapped_addr {
                println!("mapped address: {m} (via {})", p.protocol.unwrap_or("?"));
            }
        }
    }
    if r.udp == "blocked" {
        println!("UDP: blocked (no STUN answer from {addr})");
    } else {
        println!("UDP:            ok");
        println!(
            "public address: {}",
            r.public_addr.clone().unwrap_or_default()
        );
        println!("mapping:        {}", r.mapping);
        println!("filtering:      {}", r.filtering);
        println!("port preserved: {}", r.port_preserved.unwrap_or(false));
        println!("hairpinning:    {}", r.hairpin.unwrap_or(false));
        let a = &r.allocator;
        let how = match (a.shape.stride, a.shape.block_base, a.shape.block_size) {
            (Some(s), _, _) => format!("sequential, stride {s}"),
            (_, Some(b), Some(n)) => format!("from a {n}-port block at {b}"),
            _ => a.shape.kind.to_string(),
        };
        let ports = a
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        println!("port allocator: {how} (ports {ports})");
        if let Some(b) = a.shape.budget {
            println!("port budget:    {b} mappings toward one peer per punch");
        }
        if r.other_addr.is_none() {
            println!("(the server has no alternate address: start punch-server with --alt-listen)");
        }
    }
    Ok(())
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    punch_protocol::signal::validate_name("metadata key", k)?;
    if v.len() > punch_protocol::signal::MAX_METADATA_LEN {
        return Err(format!(
            "metadata value longer than {} bytes",
            punch_protocol::signal::MAX_METADATA_LEN
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

/// A worker as `list --json` and `discover --json` print it (the same
/// fields as the server's HTTP API).
fn worker_json(w: &punch_protocol::signal::WorkerInfo) -> serde_json::Value {
    json!(punch_protocol::view::WorkerView::from(w.clone()))
}

/// A one-off agent for registry queries.
async fn query_agent(c: &Common) -> Result<Agent, AgentError> {
    let mut cfg = config(c, false)?;
    cfg.nat_check = false;
    // A one-off query has no use for a port of its own.
    cfg.port_mapping.mode = PortMapping::Off;
    let agent = Agent::start(cfg).await?;
    agent.registered(Duration::from_secs(15)).await?;
    Ok(agent)
}

async fn list(
    c: &Common,
    kind: Option<&str>,
    tag: Option<&str>,
    json: bool,
) -> Result<(), AgentError> {
    let agent = query_agent(c).await?;
    let r = agent.list(kind, tag).await;
    agent.close().await;
    let workers = r?;
    if json {
        let v: Vec<_> = workers.iter().map(worker_json).collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<24} {:<12} {:<7} {:<22} {:<10} TAGS",
        "WORKER", "TYPE", "STATE", "ADDRESS", "NAT"
    );
    for w in &workers {
        println!(
            "{:<24} {:<12} {:<7} {:<22} {:<10} {}",
            w.id,
            w.kind.as_deref().unwrap_or("-"),
            w.state.as_str(),
            w.observed,
            w.nat.map(|n| n.label()).unwrap_or_else(|| "-".into()),
            w.tags.join(",")
        );
    }
    Ok(())
}

async fn discover(c: &Common, kind: &str, json: bool) -> Result<(), AgentError> {
    punch_protocol::signal::validate_name("type", kind).map_err(AgentError::Config)?;
    let agent = query_agent(c).await?;
    let r = agent.discover(kind).await;
    agent.close().await;
    match r? {
        Some(w) if json => println!("{}", worker_json(&w)),
        Some(w) => println!("{}", w.id),
        None => {
            return Err(AgentError::UnknownWorker(format!(
                "no online worker of type {kind}"
            )))
        }
    }
    Ok(())
}

async fn forward(
    c: &Common,
    target: &str,
    local: SocketAddr,
    remote: SocketAddr,
    timeout: f64,
) -> Result<(), AgentError> {
    use punch_agent::forward::{self, ForwardError};
    let remote_s = remote.to_string();
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    // Refused up front, with the peer's reason, rather than per connection.
    match forward::open(&pc, &remote_s, true).await {
        Ok(_) => {}
        Err(ForwardError::Refused(why)) => {
            return Err(AgentError::PeerConnect(format!(
                "{target} refuses to forward to {remote}: {why}"
            )))
        }
        Err(e) => return Err(AgentError::PeerConnect(e.to_string())),
    }
    let listener = tokio::net::TcpListener::bind(local)
        .await
        .map_err(|e| AgentError::Config(format!("--local {local}: {e}")))?;
    let (kind, _) = pc.path_now();
    println!(
        "forwarding {} -> {target} -> {remote} ({} path)",
        listener.local_addr().unwrap_or(local),
        kind.as_str()
    );
    let pc = std::sync::Arc::new(tokio::sync::Mutex::new(pc));
    let shutdown = punch_net::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (tcp, from) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (agent, pc, remote_s, target) = (
            agent.clone(),
            pc.clone(),
            remote_s.clone(),
            target.to_string(),
        );
        tokio::spawn(async move {
            // The peer connection may have died (peer restarted): connect
            // again for this and later connections.
            let conn = {
                let mut g = pc.lock().await;
                if g.conn.close_reason().is_some() {
                    match agent.connect(&target).await {
                        Ok(new) => *g = new,
                        Err(e) => {
                            tracing::warn!(%from, "cannot reach {target}: {e}");
                            return;
                        }
                    }
                }
                g.clone()
            };
            match forward::open(&conn, &remote_s, false).await {
                Ok((send, recv)) => {
                    let (up, down) = forward::pipe(tcp, send, recv).await;
                    tracing::debug!(%from, up, down, "forwarded connection closed");
                }
                Err(e) => tracing::warn!(%from, "forward to {remote_s} via {target} failed: {e}"),
            }
        });
    }
    pc.lock().await.close().await;
    agent.close().await;
    Ok(())
}

async fn files(c: &Common, target: &str, json: bool, timeout: f64) -> Result<(), AgentError> {
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let r = punch_agent::files::list(&pc).await;
    pc.close().await;
    agent.close().await;
    let listing = r.map_err(|e| AgentError::PeerConnect(format!("{target}: {e}")))?;
    for p in &listing.problems {
        eprintln!("warning: {target}: {p}");
    }
    let list = &listing.files;
    if json {
        // blake3 is null for a file the sharer has not hashed yet.
        let v: Vec<_> = list
            .iter()
            .map(|f| {
                let h = (!f.blake3.is_empty()).then_some(&f.blake3);
                json!({"name": f.name, "size": f.size, "blake3": h})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        let mut unhashed = 0;
        for f in list {
            let h = if f.blake3.is_empty() {
                unhashed += 1;
                "(not hashed yet)"
            } else {
                &f.blake3
            };
            println!("{:>14}  {h:<64}  {}", f.size, f.name);
        }
        if unhashed > 0 {
            println!(
                "{} files ({unhashed} not hashed yet: the sharer is hashing them; `get` verifies every download)",
                list.len()
            );
        } else {
            println!("{} files", list.len());
        }
    }
    Ok(())
}

async fn get(
    c: &Common,
    target: &str,
    name: &str,
    output: Option<PathBuf>,
    timeout: f64,
) -> Result<(), AgentError> {
    punch_agent::files::check_name(name).map_err(AgentError::Config)?;
    let out = match output {
        Some(o) => o,
        None => PathBuf::from(
            std::path::Path::new(name)
                .file_name()
                .ok_or_else(|| AgentError::Config(format!("{name:?} has no file name")))?,
        ),
    };
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let r = punch_agent::files::get(&pc, name, &out, &progress).await;
    bar.finish_and_clear();
    pc.close().await;
    agent.close().await;
    let (size, resumed, hash) = r.map_err(|e| match e {
        punch_agent::files::FileError::Io(m) => AgentError::Io(m),
        other => AgentError::PeerConnect(format!("{target}: {other}")),
    })?;
    let resumed = if resumed > 0 {
        format!(" (resumed from byte {resumed})")
    } else {
        String::new()
    };
    println!(
        "got {name}: {size} bytes, blake3 {hash} -> {}{resumed}",
        out.display()
    );
    Ok(())
}

async fn wait(c: &Common, worker: &str, timeout: f64) -> Result<(), AgentError> {
    let limit = secs(timeout, "--timeout")?;
    let agent = query_agent(c).await?;
    let r = agent.wait_for(worker, limit).await;
    agent.close().await;
    match r {
        Ok(w) => {
            println!("{} is online at {}", w.id, w.observed);
            Ok(())
        }
        Err(AgentError::Timeout(_)) => Err(AgentError::Timeout(format!(
            "{worker} did not come online within {timeout} s"
        ))),
        Err(e) => Err(e),
    }
}

async fn serve(
    c: &Common,
    kind: Option<String>,
    tags: Vec<String>,
    meta: Vec<(String, String)>,
    http: Option<SocketAddr>,
    allow_forward: Vec<SocketAddr>,
    share: Option<PathBuf>,
) -> Result<(), AgentError> {
    // First of all, before registering: a SIGTERM from then on, also
    // between two turns of the loop below, shuts down cleanly.
    let shutdown = punch_net::shutdown_signal();
    if c.id.is_none() {
        return Err(AgentError::Config(
            "serve needs --id NAME (or PUNCH_ID): the id other agents connect to".into(),
        ));
    }
    if let Some(k) = &kind {
        punch_protocol::signal::validate_name("type", k).map_err(AgentError::Config)?;
    }
    for t in &tags {
        punch_protocol::signal::validate_name("tag", t).map_err(AgentError::Config)?;
    }
    let max = punch_protocol::signal::MAX_TAGS;
    if tags.len() > max {
        return Err(AgentError::Config(format!("at most {max} tags")));
    }
    let max = punch_protocol::signal::MAX_METADATA;
    if meta.len() > max {
        return Err(AgentError::Config(format!("at most {max} --meta entries")));
    }
    let mut cfg = config(c, true)?;
    cfg.kind = kind;
    cfg.tags = tags;
    cfg.metadata = meta;
    cfg.allow_forward = allow_forward;
    cfg.share = share;
    let agent = Agent::start(cfg).await?;
    if let Some(addr) = http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Config(format!("--http {addr}: {e}")))?;
        tracing::info!(%addr, "status on HTTP");
        tokio::spawn(status::serve(listener, agent.clone()));
    }
    let mut status = agent.watch_status();
    let accept = {
        let agent = agent.clone();
        async move {
            while let Some(pc) = agent.accept().await {
                tokio::spawn(pc.serve());
            }
        }
    };
    tokio::spawn(accept);
    // What the background NAT check found, once (scripts and the lab wait
    // for it: a worker's punching method depends on it).
    if !c.no_nat_check {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent.nat_checked().await;
            let class = agent
                .nat_class()
                .map_or("unknown".to_string(), |n| n.label());
            let a = agent.nat_allocator();
            let alloc = match a {
                punch_protocol::allocator::Allocator::Sequential { stride } => {
                    format!("sequential, stride {stride}")
                }
                punch_protocol::allocator::Allocator::Block { base, size } => {
                    format!("block of {size} at {base}")
                }
                other => other.kind().to_string(),
            };
            println!("punch-agent NAT: {class} (port allocator: {alloc})");
        });
    }
    let mut announced = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                agent.close().await;
                return Ok(());
            }
            changed = status.changed() => {
                if changed.is_err() {
                    return Err(AgentError::Io("agent stopped".into()));
                }
                let s = status.borrow_and_update().clone();
                match s {
                    Status::Failed(e) => return Err(e),
                    Status::Registered { observed } if !announced => {
                        announced = true;
                        println!("punch-agent serving as {} (server sees us at {observed})", agent.worker_id());
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn connect_timed(
    c: &Common,
    target: &str,
    timeout: f64,
) -> Result<(Agent, PeerConnection), AgentError> {
    let limit = secs(timeout, "--timeout")?;
    let agent = Agent::start(config(c, false)?).await?;
    let deadline = Instant::now() + limit;
    agent.registered(limit).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let pc = tokio::time::timeout(left, agent.connect(target))
        .await
        .map_err(|_| {
            AgentError::Timeout(format!("no connection to {target:?} within {timeout} s"))
        })??;
    Ok((agent, pc))
}

/// The path a connection uses now: its kind, where packets go (the peer,
/// the relay's UDP address, or the relay over the TCP channel), and the
/// transport this side sends on.
fn path_now(
    pc: &PeerConnection,
) -> (
    punch_agent::PathKind,
    String,
    punch_protocol::signal::Transport,
) {
    let (kind, remote) = pc.path_now();
    let transport = pc.transport_now();
    let remote = match (remote, transport) {
        (Some(r), _) => r.to_string(),
        (None, punch_protocol::signal::Transport::Tcp) => "server relay over TCP".to_string(),
        (None, _) => pc.path.remote_addr.to_string(),
    };
    (kind, remote, transport)
}

async fn connect(c: &Common, target: &str, json: bool, timeout: f64) -> Result<(), AgentError> {
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let mut pinger = pc
        .pinger()
        .await
        .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
    let rtt = pinger
        .ping()
        .await
        .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
    let connect_ms = pc.path.connect_time.as_secs_f64() * 1e3;
    let rtt_ms = rtt.as_secs_f64() * 1e3;
    let (kind, remote, transport) = path_now(&pc);
    // The IP family of the packets' first hop (the peer on a direct path,
    // the relay otherwise).
    let family = match pc.path_now().1.unwrap_or(pc.path.remote_addr) {
        a if punch_net::canonical(a).is_ipv6() => "ipv6",
        _ => "ipv4",
    };
    if json {
        println!(
            "{}",
            json!({
                "target": target,
                "path": kind.as_str(),
                "family": family,
                "initial_path": pc.path.kind.as_str(),
                "remote_addr": remote,
                "transport": transport.as_str(),
                "connect_ms": round3(connect_ms),
                "rtt_ms": round3(rtt_ms),
                "worker_id": agent.worker_id(),
                "session": pc.path.session.to_string(),
                "via_mapped": pc.path.via_mapped,
                "strategy": pc.path.strategy.map(|s| s.as_str()),
                "relay_reason": pc.path.relay_reason.map(|r| r.as_str()),
                "port_mapping": agent.port_mapping(),
            })
        );
    } else {
        println!(
            "connected to {target} via {} path {remote} ({} over {family}) in {connect_ms:.1} ms, rtt {rtt_ms:.2} ms",
            kind.as_str(),
            transport.as_str(),
        );
    }
    pc.close().await;
    agent.close().await;
    Ok(())
}

async fn bench(
    c: &Common,
    target: &str,
    seconds: u32,
    json: bool,
    timeout: f64,
) -> Result<(), AgentError> {
    if !(1..=60).contains(&seconds) {
        return Err(AgentError::Config(
            "--seconds must be between 1 and 60".into(),
        ));
    }
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let per = Duration::from_secs(seconds as u64);
    let peer_err = |e: punch_agent::PeerError| AgentError::PeerConnect(e.to_string());
    let limit = per + Duration::from_secs(30);
    let late = || AgentError::Timeout(format!("{target} stopped answering during the bench"));
    let (kind, remote, transport) = path_now(&pc);
    if !json {
        println!(
            "bench {target} via {} path {remote} ({}), {seconds} s each way",
            kind.as_str(),
            transport.as_str()
        );
    }
    let (up_bytes, up_time) = tokio::time::timeout(limit, pc.upload(per))
        .await
        .map_err(|_| late())?
        .map_err(peer_err)?;
    let up = up_bytes as f64 / up_time.as_secs_f64() / 1e6;
    if !json {
        println!("upload:   {up:9.1} MB/s ({:.0} Mbit/s)", up * 8.0);
    }
    let (down_bytes, down_time) = tokio::time::timeout(limit, pc.download(per))
        .await
        .map_err(|_| late())?
        .map_err(peer_err)?;
    let down = down_bytes as f64 / down_time.as_secs_f64() / 1e6;
    let (kind, remote, transport) = path_now(&pc);
    // The IP family of the packets' first hop (the peer on a direct path,
    // the relay otherwise).
    let family = match pc.path_now().1.unwrap_or(pc.path.remote_addr) {
        a if punch_net::canonical(a).is_ipv6() => "ipv6",
        _ => "ipv4",
    };
    if json {
        println!(
            "{}",
            json!({
                "target": target,
                "path": kind.as_str(),
                "family": family,
                "remote_addr": remote,
                "transport": transport.as_str(),
                "seconds": seconds,
                "upload_bytes": up_bytes,
                "upload_mb_per_s": round3(up),
                "download_bytes": down_bytes,
                "download_mb_per_s": round3(down),
                "rtt_ms": round3(pc.conn.rtt().as_secs_f64() * 1e3),
            })
        );
    } else {
        println!("download: {down:9.1} MB/s ({:.0} Mbit/s)", down * 8.0);
    }
    pc.close().await;
    agent.close().await;
    Ok(())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

async fn ping(
    c: &Common,
    target: &str,
    count: u32,
    interval: f64,
    json: bool,
    timeout: f64,
) -> Result<(), AgentError> {
    if count == 0 || count > 1_000_000 {
        return Err(AgentError::Config(
            "-c must be between 1 and 1000000".into(),
        ));
    }
    let interval = if interval == 0.0 {
        Duration::ZERO
    } else {
        secs(interval, "--interval")?
    };
    let (agent, pc) = connect_timed(c, target, timeout).await?;
    let mut pinger = pc
        .pinger()
        .await
        .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
    if !json {
        println!(
            "PING {target} via {} path {}",
            pc.path.kind.as_str(),
            pc.path.remote_addr
        );
    }
    let mut rtts = Vec::with_capacity(count as usize);
    let mut paths = Vec::with_capacity(count as usize);
    let mut transports = Vec::with_capacity(count as usize);
    for seq in 1..=count {
        let rtt = tokio::time::timeout(Duration::from_secs(5), pinger.ping())
            .await
            .map_err(|_| AgentError::Timeout(format!("no echo for seq {seq} within 5 s")))?
            .map_err(|e| AgentError::PeerConnect(e.to_string()))?;
        let ms = rtt.as_secs_f64() * 1e3;
        let (kind, _) = pc.path_now();
        let transport = pc.transport_now().as_str();
        if !json {
            println!(
                "reply from {target}: seq={seq} time={ms:.3} ms path={} transport={transport}",
                kind.as_str()
            );
        }
        rtts.push(ms);
        paths.push(kind.as_str());
        transports.push(transport);
        if seq < count {
            tokio::time::sleep(interval).await;
        }
    }
    let min = rtts.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().cloned().fold(0.0, f64::max);
    let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
    let (kind, remote, transport) = path_now(&pc);
    // The IP family of the packets' first hop (the peer on a direct path,
    // the relay otherwise).
    let family = match pc.path_now().1.unwrap_or(pc.path.remote_addr) {
        a if punch_net::canonical(a).is_ipv6() => "ipv6",
        _ => "ipv4",
    };
    if json {
        println!(
            "{}",
            json!({
                "target": target,
                "path": kind.as_str(),
                "family": family,
                "remote_addr": remote,
                "transport": transport.as_str(),
                "transports": transports,
                "count": count,
                "rtts_ms": rtts.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
                "paths": paths,
                "min_ms": round3(min),
                "avg_ms": round3(avg),
                "max_ms": round3(max),
            })
        );
    } else {
        println!("{count} round trips: min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms");
    }
    pc.close().await;
    agent.close().await;
    Ok(())
}
