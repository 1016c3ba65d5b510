//! The `punch-lab` command.

use clap::{Parser, Subcommand};

/// punch lab: demo and benchmarks on loopback.
#[derive(Parser, Debug)]
#[command(name = "punch-lab", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a server and two agents on loopback, connect them by id, ping,
    /// and say what happened step by step. No root needed.
    Demo,
    /// Median and p95 time to connect over N loopback connects.
    BenchConnect {
        /// Number of connects.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Loopback address family: 127.0.0.1 or ::1.
        #[arg(long, default_value = "127.0.0.1")]
        ip: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUNCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Demo => punch_lab::demo::demo().await,
        Cmd::BenchConnect { count, ip, json } => {
            if !(1..=100_000).contains(&count) {
                anyhow::bail!("--count must be between 1 and 100000");
            }
            if ip != "127.0.0.1" && ip != "::1" {
                anyhow::bail!("--ip must be 127.0.0.1 or ::1 (loopback only)");
            }
            let b = punch_lab::demo::bench_connect(count, &ip).await?;
            if json {
                println!("{}", serde_json::to_string(&b)?);
            } else {
                println!(
                    "connect over loopback ({ip}), {} connects: median {:.2} ms, p95 {:.2} ms, min {:.2} ms, max {:.2} ms",
                    b.count, b.median_ms, b.p95_ms, b.min_ms, b.max_ms
                );
            }
            Ok(())
        }
    }
}
