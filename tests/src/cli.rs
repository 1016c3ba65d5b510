//! `punch-lab`'s command line: its subcommands and their flags.

use anyhow::Result;
use clap::{Parser, Subcommand};
use punch_lab::lab::Impair;
use std::path::PathBuf;

/// punch lab: the loopback demo and benchmarks, and a network-namespace NAT
/// lab that measures hole punching with real punch-server and punch-agent
/// processes behind nftables NATs (root needed for the lab).
#[derive(Parser, Debug)]
#[command(name = "punch-lab", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ImpairArgs {
    /// One-way delay added on every site's uplink, each direction (ms).
    #[arg(long, default_value_t = 0)]
    delay: u32,
    /// Uniform jitter on top of the delay (ms).
    #[arg(long, default_value_t = 0)]
    jitter: u32,
    /// Loss on every site's uplink, each direction (percent).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
}

impl ImpairArgs {
    pub(crate) fn impair(&self) -> Result<Impair> {
        let i = Impair {
            delay_ms: self.delay,
            jitter_ms: self.jitter,
            loss_pct: self.loss,
        };
        i.validate()?;
        Ok(i)
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Start a server and two agents, connect them by id, ping, and say what
    /// happened step by step. Without --nat on loopback (no root); with
    /// --nat TYPE_A,TYPE_B behind two simulated NATs (root).
    Demo {
        /// Two NAT types, e.g. `port-restricted,symmetric`.
        #[arg(long)]
        nat: Option<String>,
        #[command(flatten)]
        impair: ImpairArgs,
    },
    /// Median and p95 time to connect over N loopback connects (one agent,
    /// in process); with --nat A,B in the lab (root): N fresh
    /// `punch-agent connect` processes on A's site, timed from process
    /// start to the first round trip (registration included), and with
    /// --iroh DIR the same for the iroh comparison peer.
    BenchConnect {
        /// Number of connects.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Loopback address family: 127.0.0.1 or ::1 (without --nat).
        #[arg(long, default_value = "127.0.0.1")]
        ip: String,
        /// Two NAT types, A (connects) and B (serves), e.g.
        /// `udp-blocked,full-cone`: measure in the lab.
        #[arg(long)]
        nat: Option<String>,
        #[command(flatten)]
        impair: ImpairArgs,
        /// Directory with the iroh comparison peer's `relay` and `probe`
        /// binaries: measure iroh in the same lab (its relay over plain
        /// HTTP on the server host, port 3340).
        #[arg(long, requires = "nat")]
        iroh: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Prove with plain UDP probes that each lab NAT type behaves as named
    /// (for `udp-blocked` and `proxy-only`, which have no UDP to classify:
    /// that UDP is blocked and TCP gets out as the type promises).
    VerifyNat {
        /// Comma-separated NAT types; `all` (the UDP types), `tcp-only`
        /// (udp-blocked, proxy-only).
        #[arg(long, default_value = "all")]
        types: String,
        /// Write the verdicts as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Connect every ordered pair of NAT types N times and report success,
    /// path and time to connect, against what theory predicts.
    Matrix {
        /// Comma-separated NAT types; `all` (the UDP types), `tcp-only`
        /// (udp-blocked, proxy-only), `allocators` (cloudnat-inorder, seq,
        /// seq2, cloudnat-dpa); `TYPE+upnp` runs a port-mapping daemon
        /// (miniupnpd: PCP, NAT-PMP, UPnP IGD) on the site's gateway
        /// (`+pcp`, `+nat-pmp`, `+igd`: one protocol); `TYPE+v6` makes the
        /// site dual-stack (global IPv6 behind a stateful firewall beside
        /// the IPv4 NAT), e.g. `cgnat+v6`.
        #[arg(long, default_value = "all")]
        types: String,
        /// Connects per pair.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[command(flatten)]
        impair: ImpairArgs,
        /// Punch deadline given to the agents (s).
        #[arg(long, default_value_t = 3.0)]
        punch_timeout: f64,
        /// Skip the two-hosts-behind-one-NAT pair.
        #[arg(long)]
        no_same_nat: bool,
        /// Keep the NAT mappings earlier runs left on the dialing site (by
        /// default its conntrack is flushed before each run): shows whether
        /// punches in a row from one host fit in its port budget.
        #[arg(long)]
        keep_mappings: bool,
        /// Write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write an SVG heatmap of the direct rate.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// At the end, screenshot the server's status page into DIR.
        #[arg(long, value_name = "DIR")]
        screenshots: Option<PathBuf>,
        /// Exit non-zero when a pair that theory says goes direct does not,
        /// a pair does not connect at all, an agent on a UDP-less site
        /// connects other than over TCP, or the server relayed bytes during
        /// a run the agent called direct.
        #[arg(long)]
        strict: bool,
        /// Pass --no-relay to the agents (measure punching alone).
        #[arg(long)]
        no_relay: bool,
        /// Pass --relay-after SECS to the agents.
        #[arg(long)]
        relay_after: Option<f64>,
        /// Only the ordered pairs with one of these comma-separated site
        /// types on either side (as in --types, `allocators` included), e.g.
        /// `--types symmetric+upnp,symmetric,port-restricted,cloudnat
        /// --with symmetric+upnp`.
        #[arg(long)]
        with: Option<String>,
    },
    /// Kill a live connection's direct path (flush conntrack in both NATs
    /// while pings run) and check it carries on over the relay, then goes
    /// direct again: one connection throughout, every ping answered.
    Failover {
        /// Two NAT types that punch, the first one's port allocation
        /// random so the flush really changes the mapping.
        #[arg(long, default_value = "cloudnat,port-restricted")]
        nat: String,
        /// Pings, 100 ms apart.
        #[arg(long, default_value_t = 120)]
        pings: u32,
        #[command(flatten)]
        impair: ImpairArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A pings B over one connection relayed over A's WebSocket (A's site
    /// is udp-blocked); the lab lifts the UDP block on A's NAT and checks
    /// that the connection moves to UDP and a direct path without a new
    /// connection and without losing an echo.
    TcpUpgrade {
        /// B's NAT type: one that punches with a port-restricted NAT
        /// (none, full-cone, restricted, port-restricted, cgnat,
        /// cloudnat-eim).
        #[arg(long, default_value = "full-cone")]
        b: String,
        /// Seconds between echoes.
        #[arg(long, default_value_t = 0.05)]
        interval: f64,
        /// Echoes answered over the relay before the block is lifted.
        #[arg(long, default_value_t = 20)]
        before: usize,
        /// Echoes answered directly before the lab stops.
        #[arg(long, default_value_t = 30)]
        after: usize,
        /// Longest wait for the direct path after the lift (s).
        #[arg(long, default_value_t = 60)]
        limit: u64,
        #[command(flatten)]
        impair: ImpairArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// `punch-agent bench` between two lab sites (delay and loss on their
    /// links), beside iperf3 over TCP between the same hosts (with
    /// `--nat none,none` and iperf3 installed) for the path's ceiling;
    /// and, asked for, `punch-agent get` of a file and of a tree.
    Throughput {
        /// Two NAT types.
        #[arg(long, default_value = "none,none")]
        nat: String,
        /// Seconds per direction.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[command(flatten)]
        impair: ImpairArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Also `punch-agent get` one file of this many MB from B's share.
        #[arg(long, default_value_t = 0)]
        get_mb: u32,
        /// Also `punch-agent get` a tree of this many 4 KiB files.
        #[arg(long, default_value_t = 0)]
        get_files: u32,
    },
    /// Send forged and malformed datagrams at a punch-server's UDP port
    /// (one socket, as fast as it sends) while real agents connect by id N
    /// times, and report connects, their times beside a baseline without
    /// the flood, and what the server refused and forwarded (loopback;
    /// exits 1 when a connect failed or anything was forwarded).
    ChaosFlood {
        #[arg(long, default_value_t = 100)]
        connects: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold N slow-loris clients against a punch-server's TCP ports (half
    /// trickle an HTTP request head at the HTTP listener, half a TLS record
    /// at the TLS port, a byte a second) and report whether the server
    /// closed them all at its deadlines, its memory, and how /healthz and a
    /// real agent over the TLS port fared meanwhile (loopback; exits 1 when
    /// a client was never closed or others were not served).
    ChaosSlow {
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        /// The server's --header-timeout-secs.
        #[arg(long, default_value_t = 10)]
        header_timeout_secs: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Kill a punch-server (SIGKILL) under N simulated agents, start it
    /// again on the same port and data directory after DOWN_MS, and report
    /// how many registered again and how fast (loopback; exits 1 when any
    /// agent was lost).
    ChaosRestart {
        #[arg(long, default_value_t = 5000)]
        agents: usize,
        /// How long the server stays down.
        #[arg(long, default_value_t = 1000)]
        down_ms: u64,
        /// How long to wait for every agent to register again.
        #[arg(long, default_value_t = 10)]
        deadline_secs: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold N simulated agents (real QUIC signaling connections with
    /// keep-alive) on a punch-server started on loopback, send connect
    /// requests between them at R per second for S seconds, and report
    /// agents held, registration rate, offer latency and the server's
    /// memory and CPU.
    Load {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 500)]
        connects_per_sec: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Two servers sharing a redis-server started for the run (cluster
        /// mode); agents alternate between them, so about half the
        /// connects cross servers.
        #[arg(long)]
        cluster: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// STUN Binding requests per second against TARGET (loopback), every
    /// answer validated, with p50/p99 latency.
    StunBench {
        /// The STUN server, e.g. 127.0.0.1:3478.
        #[arg(long)]
        target: std::net::SocketAddr,
        /// Seconds to run (1 to 60).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client sockets.
        #[arg(long, default_value_t = 16)]
        sockets: usize,
        /// Requests in flight per socket.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// TARGET is a plain UDP echo server (the ceiling), not STUN.
        #[arg(long)]
        echo: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A do-nothing UDP echo server on loopback (the ceiling for stun-bench).
    UdpEcho {
        #[arg(long, default_value = "127.0.0.1:3480")]
        listen: std::net::SocketAddr,
    },
    /// Print the table of what theory predicts for each pair (Markdown).
    Theory,
    /// Remove every lab namespace (and processes in them) left on this machine.
    Clean,
    /// (internal) Forward frames between two interfaces with delay.
    #[command(hide = true)]
    Forwarder {
        #[arg(long)]
        a: String,
        #[arg(long)]
        b: String,
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        #[arg(long, default_value_t = 0)]
        jitter_ms: u32,
    },
    /// (internal) UDP reflector for verify-nat.
    #[command(hide = true)]
    Reflector {
        #[arg(long, value_delimiter = ',')]
        ips: Vec<std::net::Ipv4Addr>,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// (internal) Mapping and filtering probe for verify-nat.
    #[command(hide = true)]
    NatProbe,
    /// (internal) UDP and TCP echo on lab addresses, for verify-nat's
    /// checks of the UDP-less site types.
    #[command(hide = true)]
    LabEcho {
        #[arg(long, value_delimiter = ',')]
        udp: Vec<std::net::SocketAddr>,
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<std::net::SocketAddr>,
    },
    /// (internal) One reachability check against lab-echo; prints JSON.
    #[command(hide = true)]
    Reach {
        /// A UDP echo.
        #[arg(long, conflicts_with = "tcp", required_unless_present = "tcp")]
        udp: Option<std::net::SocketAddr>,
        /// A TCP echo (directly, or through --proxy).
        #[arg(long)]
        tcp: Option<std::net::SocketAddr>,
        /// HTTP CONNECT proxy URL for --tcp, e.g. http://10.2.0.1:8888.
        #[arg(long, requires = "tcp")]
        proxy: Option<String>,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}
