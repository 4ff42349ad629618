//! `sync-agent`: the long-running sync daemon. `serve` receives pushes
//! into its trees and serves pulls of their committed snapshots over QUIC
//! with pinned mutual TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sync_agent::config::{parse_allow, parse_tree, Access, AgentConfig, TreeConfig};
use sync_agent::server::Server;

const AFTER_HELP: &str = "\
Exit codes:
  0  clean shutdown (SIGINT or SIGTERM)
  1  runtime failure (cannot bind, tree unusable, ...)
  2  bad usage or configuration";

/// The sync daemon: receives pushes into its trees, serves pulls.
#[derive(Parser, Debug)]
#[command(name = "sync-agent", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve trees over QUIC until SIGINT/SIGTERM.
    #[command(after_help = AFTER_HELP)]
    Serve(ServeOptions),
}

#[derive(clap::Args, Debug)]
struct ServeOptions {
    /// TOML configuration (identity, listen, [[tree]] with per-tree allow lists).
    #[arg(long, conflicts_with_all = ["listen", "tree", "identity", "allow"])]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A tree to serve, NAME=PATH (repeatable).
    #[arg(long)]
    tree: Vec<String>,
    /// Directory holding this agent's cert.pem and key.pem.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// A peer fingerprint allowed on every --tree, FP[:push|:pull]
    /// (no suffix: push and pull; repeatable).
    #[arg(long)]
    allow: Vec<String>,
    /// Print the readiness line as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let Command::Serve(o) = cli.command;
    let cfg = match config_of(&o) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sync-agent: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match serve(cfg, o.json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sync-agent: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn config_of(o: &ServeOptions) -> anyhow::Result<AgentConfig> {
    if let Some(path) = &o.config {
        return Ok(AgentConfig::load(path)?);
    }
    let identity = o
        .identity
        .clone()
        .context("--identity DIR is required (or --config FILE)")?;
    let listen = o
        .listen
        .context("--listen ADDR is required (or --config FILE)")?;
    let mut allow = std::collections::HashMap::new();
    for a in &o.allow {
        let (fp, acc) = parse_allow(a)?;
        let e: &mut Access = allow.entry(fp).or_default();
        e.push |= acc.push;
        e.pull |= acc.pull;
    }
    let mut trees = Vec::new();
    for t in &o.tree {
        let (name, path) = parse_tree(t)?;
        trees.push(TreeConfig {
            name,
            path,
            state: None,
            allow: allow.clone(),
        });
    }
    let cfg = AgentConfig {
        identity,
        listen,
        trees,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn serve(cfg: AgentConfig, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let server = Server::bind(&cfg)?;
        let addr = server.local_addr().context("bound address")?;
        let fp = server.fingerprint();
        if json {
            println!(
                "{}",
                serde_json::json!({"listening": addr.to_string(), "fingerprint": fp.to_string()})
            );
        } else {
            println!("listening on {addr} fingerprint {fp}");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        tracing::info!(%addr, %fp, trees = cfg.trees.len(), "serving");
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received");
            let _ = tx.send(true);
        });
        server.run(rx).await;
        Ok(())
    })
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
