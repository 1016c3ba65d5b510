//! The `punch-agent` command.

mod args;
mod commands;
mod config;
mod output;
mod session;
mod status;

use args::{Cli, Cmd};
use clap::Parser;
use commands::{bench, connect, doctor, files, forward, nat_check, ping, pipe, registry, serve};
use std::process::ExitCode;

/// Logs on stderr, filtered by --log / PUNCH_LOG, else `default`.
fn init_logs(given: Option<&str>, default: &str) {
    let filter = match given.map(tracing_subscriber::EnvFilter::try_new) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("punch-agent: ignoring --log/PUNCH_LOG {given:?}: {e}");
            tracing_subscriber::EnvFilter::new(default)
        }
        None => tracing_subscriber::EnvFilter::new(default),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = cli.common.log.clone();
    let init_logs = |default: &str| init_logs(log.as_deref(), default);
    let (json, result) = match &cli.cmd {
        Cmd::Pipe { target, timeout } => {
            init_logs("error");
            (false, pipe::run(&cli.common, target, *timeout).await)
        }
        Cmd::Doctor { to, json, timeout } => {
            init_logs("error");
            return doctor::main(&cli.common, to.as_deref(), *json, *timeout).await;
        }
        Cmd::Docs(docs) => {
            use clap::CommandFactory;
            return match punch_clidoc::run(docs, Cli::command()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("punch-agent: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Cmd::NatCheck { json } => {
            init_logs("error");
            (*json, nat_check::run(&cli.common, *json).await)
        }
        Cmd::Serve {
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
        } => {
            init_logs("info");
            let args = serve::ServeArgs {
                kind: kind.clone(),
                tags: tags.clone(),
                meta: meta.clone(),
                http: serve::http_addr(*http),
                allow_forward: allow_forward.clone(),
                allow_reverse: allow_reverse.clone(),
                share: share.clone(),
                allow_pipe: allow_pipe.clone(),
                events: *events,
                walk: walk.clone(),
            };
            (false, serve::run(&cli.common, args).await)
        }
        Cmd::List {
            lan,
            lan_wait,
            known,
            kind,
            tag,
            json,
        } => {
            init_logs("error");
            let r = if *lan {
                registry::list_lan(&cli.common, *lan_wait, *json).await
            } else if *known {
                registry::list_known(&cli.common, *json).await
            } else {
                registry::list(&cli.common, kind.as_deref(), tag.as_deref(), *json).await
            };
            (*json, r)
        }
        Cmd::Discover { kind, json } => {
            init_logs("error");
            (*json, registry::discover(&cli.common, kind, *json).await)
        }
        Cmd::Forward {
            target,
            local,
            remote,
            remote_listen,
            timeout,
        } => {
            init_logs("warn");
            let r = match (remote, remote_listen) {
                (_, Some(listen)) => {
                    forward::reverse(&cli.common, target, *local, *listen, *timeout).await
                }
                (Some(remote), None) => {
                    forward::run(&cli.common, target, *local, *remote, *timeout).await
                }
                (None, None) => Err(punch_agent::AgentError::Config(
                    "forward needs --remote IP:PORT or --remote-listen IP:PORT".into(),
                )),
            };
            (false, r)
        }
        Cmd::Files {
            target,
            json,
            timeout,
        } => {
            init_logs("error");
            (
                *json,
                files::list(&cli.common, target, *json, *timeout).await,
            )
        }
        Cmd::Get {
            target,
            name,
            output,
            timeout,
            json,
            jobs,
        } => {
            init_logs("error");
            let how = files::GetOpts {
                json: *json,
                jobs: *jobs,
                timeout: *timeout,
            };
            (
                *json,
                files::get(&cli.common, target, name, output.clone(), how).await,
            )
        }
        Cmd::Wait { worker, timeout } => {
            init_logs("error");
            (false, registry::wait(&cli.common, worker, *timeout).await)
        }
        Cmd::Connect {
            target,
            json,
            timeout,
        } => {
            init_logs("error");
            (
                *json,
                connect::run(&cli.common, target, *json, *timeout).await,
            )
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
                ping::run(&cli.common, target, *count, *interval, *json, *timeout).await,
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
                bench::run(&cli.common, target, *seconds, *json, *timeout).await,
            )
        }
    };
    output::finish(json, result)
}
