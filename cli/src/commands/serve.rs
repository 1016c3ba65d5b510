//! `punch-agent serve`: the long-running agent other workers connect to.

use crate::args::Common;
use crate::config::config;
use crate::status;
use punch_agent::{AgentBuilder, AgentError, Status};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The status address: --http, else 0.0.0.0:$PORT when PORT is set,
/// because Cloud Run sets PORT and counts the service as up only once an
/// HTTP port answers there.
pub fn http_addr(http: Option<SocketAddr>) -> Option<SocketAddr> {
    http.or_else(|| {
        std::env::var("PORT")
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
            .map(|p| SocketAddr::from(([0, 0, 0, 0], p)))
    })
}

/// What `serve` was asked for, beside the common flags.
pub struct ServeArgs {
    pub kind: Option<String>,
    pub tags: Vec<String>,
    pub meta: Vec<(String, String)>,
    /// Where the status page listens, if anywhere.
    pub http: Option<SocketAddr>,
    pub allow_forward: Vec<SocketAddr>,
    /// Where peers may have us listen for them (`--allow-reverse`).
    pub allow_reverse: Vec<SocketAddr>,
    pub share: Option<PathBuf>,
    /// What pipes from peers are joined to (`--allow-pipe`).
    pub allow_pipe: Option<punch_apps::pipe::PipeTarget>,
    /// Print the agent's events as JSON lines.
    pub events: bool,
    /// Random walks (`--walk-topic`, `--bootstrap`, `--walk-every`).
    pub walk: crate::args::WalkArgs,
}

pub async fn run(c: &Common, args: ServeArgs) -> Result<(), AgentError> {
    let ServeArgs {
        kind,
        tags,
        meta,
        http,
        allow_forward,
        allow_reverse,
        share,
        allow_pipe,
        events,
        walk,
    } = args;
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
    cfg.walk_topics = walk.topics;
    cfg.bootstrap = walk.bootstrap;
    cfg.walk_every = Duration::try_from_secs_f64(walk.walk_every)
        .ok()
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| {
            AgentError::Config(format!(
                "--walk-every {}: at least 1 second",
                walk.walk_every
            ))
        })?;
    // The apps other workers use through us: bench always, files,
    // forward and reverse refusing with a reason unless --share /
    // --allow-forward / --allow-reverse.
    let files = match &share {
        Some(d) => Some(
            punch_apps::files::Share::new(d)
                .map_err(|e| AgentError::Config(format!("--share {}: {e}", d.display())))?
                .with_outboard_dir(crate::config::data_dir().join("outboards")),
        ),
        None => None,
    };
    let agent = AgentBuilder::from_config(cfg)
        .protocol(punch_apps::bench::NAME, punch_apps::bench::Bench)
        .protocol(
            punch_apps::files::NAME,
            punch_apps::files::Files::new(files),
        )
        .protocol(
            punch_apps::forward::NAME,
            punch_apps::forward::Forward::new(allow_forward),
        )
        .protocol(
            punch_apps::reverse::NAME,
            punch_apps::reverse::Reverse::new(allow_reverse),
        )
        .protocol(
            punch_apps::pipe::NAME,
            punch_apps::pipe::Pipe::new(allow_pipe),
        )
        .start()
        .await?;
    if events {
        // Asked at once: the first receiver has everything since start.
        let mut rx = agent.events();
        tokio::spawn(async move {
            use std::io::Write;
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let line = match rx.recv().await {
                    Ok(e) => e.to_json(),
                    Err(RecvError::Lagged(n)) => {
                        serde_json::json!({"event": "lagged", "missed": n})
                    }
                    Err(RecvError::Closed) => break,
                };
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        });
    }
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
