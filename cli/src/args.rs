//! The command line: global flags every subcommand shares, and the
//! subcommands. Help texts, flag names and env vars are a contract that
//! scripts and deploy/check.sh rely on.
//! Every option can also be set from a `PUNCH_*` environment variable
//! (booleans take true/false, yes/no, on/off or 1/0); `--help` names each.

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// punch agent: register with a punch rendezvous server and reach other
/// workers by id over direct, mutually authenticated QUIC connections.
///
/// Exit codes: 0 ok, 1 I/O, 2 usage/config, 3 unknown worker, 4 worker
/// offline, 5 punch timed out, 6 bad token, 7 server fingerprint mismatch,
/// 8 server unreachable, 9 worker id taken, 10 protocol version mismatch,
/// 11 peer connection failed, 12 timeout, 13 other server refusal.
#[derive(Parser, Debug)]
#[command(name = "punch-agent", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Debug)]
pub struct Common {
    /// Rendezvous server. HOST:PORT: QUIC over UDP there, and the TCP
    /// channel (TLS + WebSocket) at the same host and port, tried when UDP
    /// has not answered within 300 ms. wss://HOST[:PORT]/ws: the TCP
    /// channel only (a server behind an HTTPS-only front). A comma-separated
    /// list names servers of one cluster (`punch-server --registry
    /// redis://…`): the agent uses the first that answers and moves to the
    /// next when its server fails.
    #[arg(long, global = true, env = "PUNCH_SERVER")]
    pub server: Option<String>,
    /// The TCP channel when it is not at --server's host and port, e.g. an
    /// HTTPS front: wss://HOST[:PORT]/ws.
    #[arg(long, global = true, env = "PUNCH_SERVER_TCP")]
    pub server_tcp: Option<String>,
    /// CA certificates (PEM) that sign the front's certificate, instead of
    /// the system roots. The server's own pinned key is always accepted.
    #[arg(long, global = true, env = "PUNCH_SERVER_CA")]
    pub server_ca: Option<PathBuf>,
    /// HTTP proxy for the TCP channel, http://[USER:PASS@]HOST:PORT (HTTP
    /// CONNECT, Basic auth). Default: $HTTPS_PROXY / $ALL_PROXY; $NO_PROXY
    /// exempts hosts either way.
    #[arg(long, global = true, env = "PUNCH_PROXY")]
    pub proxy: Option<String>,
    /// Renew the TCP channel after this many seconds, before a front cuts
    /// it (Cloud Run ends WebSockets at 60 minutes); peer connections stay.
    #[arg(
        long,
        global = true,
        env = "PUNCH_WS_MAX_AGE",
        default_value_t = 3000.0
    )]
    pub ws_max_age: f64,
    /// Never use the TCP channel (UDP only).
    #[arg(long, global = true, env = "PUNCH_NO_TCP", value_parser = BoolishValueParser::new())]
    pub no_tcp: bool,
    /// SHA-256 fingerprint of the server key (`punch-server fingerprint`).
    #[arg(long, global = true, env = "PUNCH_SERVER_FINGERPRINT")]
    pub server_fingerprint: Option<String>,
    /// Announce this agent on the local network and find others there
    /// (mDNS, `_punch._udp.local.`, carrying the worker id and key only):
    /// a connect to a known peer then finds it on the LAN while the server
    /// is away, and agents with the same --token meet there without any
    /// server.
    #[arg(long, global = true, env = "PUNCH_LAN_DISCOVERY", value_parser = BoolishValueParser::new())]
    pub lan_discovery: bool,
    /// Token, if the server requires one.
    #[arg(long, global = true, env = "PUNCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Our worker id. `connect` and `ping` register a one-off anon-… id
    /// when none is given.
    #[arg(long, global = true, env = "PUNCH_ID")]
    pub id: Option<String>,
    /// Persistent Ed25519 key of this agent; created if missing. Default:
    /// <data dir>/punch/agent.key for agents with an id, a one-off key
    /// otherwise.
    #[arg(long, global = true, env = "PUNCH_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Local UDP address of the agent's one socket.
    #[arg(long, global = true, env = "PUNCH_BIND", default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
    /// Seconds to punch before giving up.
    #[arg(
        long,
        global = true,
        env = "PUNCH_PUNCH_TIMEOUT",
        default_value_t = 5.0
    )]
    pub punch_timeout: f64,
    /// A standard STUN server (HOST:PORT) to learn our public mapping from;
    /// repeatable. Its answers become candidates in offers.
    #[arg(long, global = true, env = "PUNCH_STUN", value_delimiter = ',')]
    pub stun: Vec<String>,
    /// Never use the server's relay: fail when no direct path can be punched.
    #[arg(long, global = true, env = "PUNCH_NO_RELAY", value_parser = BoolishValueParser::new())]
    pub no_relay: bool,
    /// Use the server's relay at once, without punching.
    #[arg(long, global = true, env = "PUNCH_FORCE_RELAY", value_parser = BoolishValueParser::new())]
    pub force_relay: bool,
    /// Start on the relay when punching has found no path after this many
    /// seconds; the connection moves to the direct path once one is found.
    #[arg(long, global = true, env = "PUNCH_RELAY_AFTER", default_value_t = 3.0)]
    pub relay_after: f64,
    /// Do not classify our NAT after registering (by default the agent runs
    /// the nat-check tests once in the background and tells the server its
    /// class, which offers and the server's metrics carry).
    #[arg(long, global = true, env = "PUNCH_NO_NAT_CHECK", value_parser = BoolishValueParser::new())]
    pub no_nat_check: bool,
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
    pub port_mapping: String,
    /// Testing: the port mapping protocols to try, in order (pcp,
    /// nat-pmp, upnp).
    #[arg(long, global = true, hide = true, value_delimiter = ',')]
    pub port_mapping_protocols: Vec<String>,
    /// Testing: the mapping lifetime to ask for, seconds.
    #[arg(long, global = true, hide = true)]
    pub port_mapping_lifetime: Option<u32>,
    /// Testing: the gateway's PCP/NAT-PMP address instead of the default
    /// route's gateway on port 5351.
    #[arg(long, global = true, hide = true)]
    pub port_mapping_gateway: Option<SocketAddr>,
    /// What to log on stderr, as a tracing filter: a level (error, warn,
    /// info, debug, trace) or per-module directives, e.g.
    /// `info,punch_agent=debug`. Default: info for serve, warn for
    /// forward, error for the one-shot commands.
    #[arg(long, global = true, env = "PUNCH_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
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
        /// (PUNCH_META holds one KEY=VALUE.)
        #[arg(long = "meta", env = "PUNCH_META", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
        /// Share this directory read-only with peers (`files`, `get`).
        #[arg(long, env = "PUNCH_SHARE", value_name = "DIR")]
        share: Option<PathBuf>,
        /// Let peers forward TCP connections to this address (`forward
        /// --remote`); repeatable. Nothing is allowed by default.
        #[arg(
            long = "allow-forward",
            env = "PUNCH_ALLOW_FORWARD",
            value_name = "IP:PORT",
            value_delimiter = ','
        )]
        allow_forward: Vec<SocketAddr>,
        /// Let peers have us listen on this TCP address for them (`forward
        /// --remote-listen`, like `ssh -R`): connections to it go back to
        /// the peer; repeatable. Nothing is allowed by default.
        #[arg(
            long = "allow-reverse",
            env = "PUNCH_ALLOW_REVERSE",
            value_name = "IP:PORT",
            value_delimiter = ','
        )]
        allow_reverse: Vec<SocketAddr>,
        /// Join pipes from peers (`punch-agent pipe`) to this: a shell
        /// command (its stdin and stdout, one process per pipe, e.g.
        /// 'tar x -C /srv/in'), tcp:IP:PORT or unix:PATH. Off by default:
        /// pipes are refused.
        #[arg(
            long,
            env = "PUNCH_ALLOW_PIPE",
            value_name = "COMMAND|tcp:IP:PORT|unix:PATH"
        )]
        allow_pipe: Option<punch_apps::pipe::PipeTarget>,
        /// Serve GET /healthz and GET / (our status) on this TCP address.
        /// Default: 0.0.0.0:$PORT when PORT is set (Cloud Run), else off.
        #[arg(long, env = "PUNCH_HTTP")]
        http: Option<SocketAddr>,
        /// Also print what happens as JSON lines on stdout, one object
        /// each, `"event"` naming it: registered, address_changed,
        /// disconnected, stopped, nat_classified, peer_connected,
        /// path_changed (with its cause), relay_renewed, discovery
        /// (connections without the server, and random walks).
        #[arg(long, env = "PUNCH_EVENTS", value_parser = BoolishValueParser::new())]
        events: bool,
        #[command(flatten)]
        walk: WalkArgs,
    },
    /// List workers online or stale (recently dropped), optionally of one
    /// type and with one tag.
    List {
        /// The agents LAN discovery sees on the local network (mDNS; no
        /// server needed) instead of the server's registry: worker id, key
        /// fingerprint, endpoints. Listens for --lan-wait seconds.
        #[arg(long, env = "PUNCH_LIST_LAN", value_parser = BoolishValueParser::new())]
        lan: bool,
        /// With --lan: how long to listen for announcements.
        #[arg(long, env = "PUNCH_LIST_LAN_WAIT", default_value_t = 2.0)]
        lan_wait: f64,
        /// The address book instead (the peers this agent's key has
        /// connected to, which a connect reaches without the server).
        #[arg(long, env = "PUNCH_LIST_KNOWN", value_parser = BoolishValueParser::new(), conflicts_with = "lan")]
        known: bool,
        /// Only workers of this type.
        #[arg(long = "type", env = "PUNCH_LIST_TYPE")]
        kind: Option<String>,
        /// Only workers with this tag.
        #[arg(long, env = "PUNCH_LIST_TAG")]
        tag: Option<String>,
        /// Print a JSON array.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
    },
    /// Print a random online worker of TYPE (exit 3 when none is online).
    Discover {
        #[arg(value_name = "TYPE")]
        kind: String,
        /// Print one JSON object.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
    },
    /// Forward local TCP connections to a TCP service reachable from
    /// TARGET (like `ssh -L`): each connection to --local rides its own
    /// QUIC stream; TARGET connects to --remote if it is on its
    /// --allow-forward list. With --remote-listen instead of --remote, the
    /// other way (like `ssh -R`): TARGET listens there, if it is on its
    /// --allow-reverse list, and every connection it accepts comes back
    /// to --local here. Runs until interrupted (or, reversed, until
    /// TARGET stops listening).
    Forward {
        /// Worker id to reach.
        target: String,
        /// Local TCP address: listened on, or with --remote-listen the
        /// service the connections come back to.
        #[arg(long, env = "PUNCH_FORWARD_LOCAL", value_name = "IP:PORT")]
        local: SocketAddr,
        /// The address TARGET connects to, as TARGET sees it.
        #[arg(
            long,
            env = "PUNCH_FORWARD_REMOTE",
            value_name = "IP:PORT",
            required_unless_present = "remote_listen",
            conflicts_with = "remote_listen"
        )]
        remote: Option<SocketAddr>,
        /// The address TARGET listens on, as TARGET sees it (reverse).
        #[arg(long, env = "PUNCH_FORWARD_REMOTE_LISTEN", value_name = "IP:PORT")]
        remote_listen: Option<SocketAddr>,
        /// Limit in seconds for connecting to TARGET.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
    },
    /// List the files TARGET shares (serve --share): name, size, BLAKE3.
    Files {
        target: String,
        /// Print a JSON array of {name, size, blake3}.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
        /// Limit in seconds for connecting.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
    },
    /// Download NAME from TARGET's shared directory, with a progress bar:
    /// a file, or with a trailing slash a directory tree (`DIR/`; `/` for
    /// the whole share). Every 16 KiB is checked against the file's BLAKE3
    /// tree as it arrives; a partial download (PATH.part) is checked, then
    /// resumed; files are put in place only when complete. A tree fetches
    /// several files at once and skips those already complete and
    /// verified.
    Get {
        target: String,
        /// A shared file's name, or a directory's with a trailing `/`.
        name: String,
        /// Where to write: the file (default: the name's last component,
        /// here), or the directory the tree goes into (default: the
        /// directory's last component, here; `.` for the whole share).
        #[arg(short = 'o', long, env = "PUNCH_OUTPUT")]
        output: Option<PathBuf>,
        /// Limit in seconds for connecting.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
        /// Print progress as JSON lines on stdout instead of a bar
        /// (`{"event":"progress",…}` at most 4 a second, then one
        /// `{"event":"done",…}`).
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
        /// Files of a tree fetched at once (1 to 64). Each costs a round
        /// trip to start: on an 87 ms path 8 at once fetch ~90 small files
        /// a second, 32 ~4 times that.
        #[arg(long, env = "PUNCH_GET_JOBS", default_value_t = 32)]
        jobs: usize,
    },
    /// Wait until WORKER is online: exit 0 as soon as it is, 12 on timeout.
    /// For start-up ordering of containers.
    Wait {
        worker: String,
        /// Seconds to wait at most.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Connect to TARGET, measure one round trip, print the result, exit.
    Connect {
        /// Worker id to reach.
        target: String,
        /// Print exactly one JSON object on stdout.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
        /// Overall limit in seconds (registration, punching, handshake).
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
    },
    /// Classify this host's NAT (RFC 5780): public address, mapping and
    /// filtering behaviour, port preservation, hairpinning. Asks the
    /// --server's STUN port (start punch-server with --alt-listen), or the
    /// first --stun server. No registration, no fingerprint needed.
    NatCheck {
        /// Print exactly one JSON object on stdout.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
    },
    /// Connect to TARGET and measure round trips: min/avg/max.
    Ping {
        /// Worker id to reach.
        target: String,
        /// Number of round trips.
        #[arg(short = 'c', long, env = "PUNCH_PING_COUNT", default_value_t = 4)]
        count: u32,
        /// Seconds between round trips.
        #[arg(short = 'i', long, env = "PUNCH_PING_INTERVAL", default_value_t = 1.0)]
        interval: f64,
        /// Print exactly one JSON object on stdout.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
        /// Limit in seconds for connecting.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
    },
    /// Connect to TARGET and measure throughput over the peer connection:
    /// upload for N seconds, then download for N seconds (MB = 10^6 bytes).
    /// With --force-relay, through the server's relay.
    Bench {
        /// Worker id to reach.
        target: String,
        /// Seconds per direction (1 to 60).
        #[arg(long, env = "PUNCH_BENCH_SECONDS", default_value_t = 5)]
        seconds: u32,
        /// Print exactly one JSON object on stdout.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
        /// Limit in seconds for connecting.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
    },
    /// Join stdin and stdout to TARGET over the peer connection, like nc
    /// or dumbpipe: stdin goes to what TARGET's serve --allow-pipe names,
    /// its output comes to stdout; the end of stdin is passed on, and the
    /// command ends when both directions have. `tar c . | punch-agent pipe
    /// worker-b` with `serve --allow-pipe 'tar x -C /srv/in'` on worker-b.
    Pipe {
        /// Worker id to reach.
        target: String,
        /// Limit in seconds for connecting.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
    },
    /// Check everything that decides whether this host can reach other
    /// workers: the server over UDP and over the TCP channel (through the
    /// proxy, if one is set), the pinned key, the clock against the
    /// server's, the NAT's class and port
    /// allocator, a port mapping on the gateway, IPv6, the MTU; with --to,
    /// what a connect to WORKER would try, and the connect itself. One
    /// line per check with its verdict (ok, WARN, FAIL, skip) and the fix.
    /// Exit 0 when nothing failed, 1 otherwise.
    Doctor {
        /// Also look up this worker, say what a connect would try, and try.
        #[arg(long, env = "PUNCH_DOCTOR_TO", value_name = "WORKER")]
        to: Option<String>,
        /// Print one JSON object: {"healthy", "checks": [{"check",
        /// "verdict", "detail", "fix"}]}.
        #[arg(long, env = "PUNCH_JSON", value_parser = BoolishValueParser::new())]
        json: bool,
        /// Limit in seconds for the connect of --to.
        #[arg(long, env = "PUNCH_TIMEOUT", default_value_t = 15.0)]
        timeout: f64,
    },
    #[command(flatten)]
    Docs(punch_clidoc::DocsCmd),
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Well formed, and every option has a `PUNCH_*` variable.
    #[test]
    fn the_command_line_is_complete() {
        punch_clidoc::assert_complete(super::Cli::command());
    }
}

/// Random walks (`serve`): finding more workers of some types or tags
/// through the peers we know, so the address book holds peers to reach
/// while the server is away.
#[derive(Args, Debug, Clone)]
pub struct WalkArgs {
    /// A type or tag to find more workers of: every minute or so the agent
    /// asks a peer it knows (a --bootstrap worker, a peer of the address
    /// book with that topic, else one the server lists) which workers of
    /// it that peer has connected to, and walks on to one of them (3 hops,
    /// back-off for peers that fail). Each connection puts the peer in the
    /// address book. Repeatable, at most 8; none: no walks. We answer
    /// others' walks for the topics we share whether or not we walk.
    #[arg(
        long = "walk-topic",
        env = "PUNCH_WALK_TOPICS",
        value_delimiter = ',',
        value_name = "TOPIC"
    )]
    pub topics: Vec<String>,
    /// A worker walks may start from; repeatable.
    #[arg(
        long,
        env = "PUNCH_BOOTSTRAP",
        value_delimiter = ',',
        value_name = "WORKER_ID"
    )]
    pub bootstrap: Vec<String>,
    /// Seconds from one walk to the next (±25 %; at least 1).
    #[arg(
        long,
        env = "PUNCH_WALK_EVERY",
        default_value_t = 60.0,
        value_name = "SECS"
    )]
    pub walk_every: f64,
}
