//! `sync-agent`: the long-running sync daemon. `--config FILE` runs every
//! tree of a TOML file (sink trees served over QUIC with pinned mutual TLS,
//! source trees watched and pushed to their mirrors) and reloads it on
//! SIGHUP; `check-config` validates such a file; `serve` and `watch` run
//! one role from flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sync_agent::agent::{self, RunOptions};
use sync_agent::config::{
    parse_allow, parse_tree, Access, AgentConfig, Config, ConfigError, Severity, TreeConfig,
};
use sync_agent::server::Server;

const AFTER_HELP: &str = "\
Exit codes:
  0  clean shutdown (SIGINT or SIGTERM)
  1  runtime failure (cannot bind, tree unusable, ...)
  2  bad usage or configuration";

const RUN_HELP: &str = "\
Signals:
  SIGHUP          re-read the configuration file: if it has an error, log every
                  error and keep running; else start added trees, stop removed
                  ones, restart changed ones, leave the others untouched
  SIGINT/SIGTERM  shut down gracefully

Exit codes:
  0  clean shutdown (SIGINT or SIGTERM)
  1  runtime failure (cannot bind, tree unusable, ...)
  2  bad usage or configuration";

const CHECK_HELP: &str = "\
Every error is reported as FILE:LINE:COLUMN: message (warnings say so).

Exit codes:
  0  the file is valid (warnings allowed); prints a one-line summary
  2  the file has errors or cannot be read";

/// The sync daemon: mirrors source trees to their mirrors, receives pushes
/// into sink trees, serves pulls.
#[derive(Parser, Debug)]
#[command(
    name = "sync-agent",
    version,
    about,
    after_help = RUN_HELP,
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true
)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Run every tree of this TOML file until SIGINT/SIGTERM; SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every tree of a TOML file (same as the global --config).
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Check a TOML configuration file without starting anything.
    #[command(after_help = CHECK_HELP)]
    CheckConfig(CheckArgs),
    /// Serve trees over QUIC until SIGINT/SIGTERM.
    #[command(after_help = AFTER_HELP)]
    Serve(ServeOptions),
    /// Watch a tree and keep mirrors current until SIGINT/SIGTERM.
    #[command(after_help = AFTER_HELP)]
    Watch(WatchOptions),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The TOML configuration (identity, listen, control, metrics, [[tree]]).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Print the readiness lines as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The TOML configuration to check.
    file: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ServeOptions {
    /// TOML configuration: runs the whole file, as `sync-agent --config`.
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
    sync_agent::tune_allocator();
    let cli = Cli::parse();
    sync_agent::init_logging(cli.verbose);
    let (file, json) = match (cli.config, cli.command) {
        (Some(file), _) => (file, false),
        (None, Some(Command::Run(r))) => (r.config, r.json),
        (
            None,
            Some(Command::Serve(ServeOptions {
                config: Some(file),
                json,
                ..
            })),
        ) => (file, json),
        (None, Some(Command::CheckConfig(c))) => return ExitCode::from(check_config(&c.file)),
        (None, Some(Command::Watch(o))) => {
            return match watch(o) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sync-agent: error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        (None, Some(Command::Serve(o))) => {
            let cfg = match config_of(&o) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sync-agent: error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            return match serve(cfg, o.json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sync-agent: error: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        (None, None) => unreachable!("clap requires --config or a subcommand"),
    };
    run_file(&file, json)
}

/// `sync-agent --config FILE`: every tree of the file, reloaded on SIGHUP.
fn run_file(file: &Path, json: bool) -> ExitCode {
    let config = match Config::load(file) {
        Ok((c, warnings)) => {
            for w in warnings {
                eprintln!("{}", w.in_file(file));
            }
            c
        }
        Err(e @ ConfigError::Read { .. }) => {
            eprintln!("sync-agent: error: {e}");
            return ExitCode::from(2);
        }
        Err(ConfigError::File { diagnostics, .. }) => {
            for d in &diagnostics {
                eprintln!("{}", d.in_file(file));
            }
            eprintln!("sync-agent: {}: invalid configuration", file.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("sync-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sync-agent: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(agent::run(file.to_path_buf(), config, RunOptions { json })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sync-agent: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `sync-agent check-config FILE`: every error and warning with its
/// position, then a summary line when valid.
fn check_config(file: &Path) -> u8 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sync-agent: error: cannot read {}: {e}", file.display());
            return 2;
        }
    };
    let checked = Config::check(&text);
    for d in &checked.diagnostics {
        eprintln!("{}", d.in_file(file));
    }
    match &checked.config {
        Some(c) => {
            println!("{}: ok: {}", file.display(), c.summary());
            0
        }
        None => {
            let n = checked
                .diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count();
            eprintln!(
                "{}: {n} error{}",
                file.display(),
                if n == 1 { "" } else { "s" }
            );
            2
        }
    }
}

fn config_of(o: &ServeOptions) -> anyhow::Result<AgentConfig> {
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
            relay: None,
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

#[derive(clap::Args, Debug)]
struct WatchOptions {
    /// The tree to watch and mirror.
    path: PathBuf,
    /// A mirror to keep current, quic://HOST:PORT/NAME (repeatable).
    #[arg(long = "to", required = true)]
    to: Vec<String>,
    /// The fingerprint of each --to agent, in the same order (repeatable).
    #[arg(long = "peer", required = true)]
    peer: Vec<String>,
    /// Directory holding this agent's cert.pem and key.pem.
    #[arg(long)]
    identity: PathBuf,
    /// The tree's name in status output (default: the first --to NAME).
    #[arg(long)]
    name: Option<String>,
    /// Rescan once no change arrived for this many milliseconds.
    #[arg(long, default_value_t = 100)]
    quiet_ms: u64,
    /// ... or at the latest this long after the first pending change.
    #[arg(long, default_value_t = 2000)]
    max_delay_ms: u64,
    /// Full rescan this often whatever the watcher says, in seconds.
    #[arg(long, default_value_t = 3600)]
    rescan_secs: u64,
    /// Hash cache file (default: $XDG_CACHE_HOME/sync-engine/<tree>.hcache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Control socket (default: /run/sync-agent.sock as root, else
    /// $XDG_RUNTIME_DIR/sync-agent.sock or /tmp/sync-agent-UID.sock).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (opt-in).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

fn watch(o: WatchOptions) -> anyhow::Result<()> {
    use sync_agent::client::RemoteUrl;
    use sync_agent::control::{self, Control, ControlledTree};
    use sync_agent::source::{self, Downstream, SourceConfig};
    if o.to.len() != o.peer.len() {
        anyhow::bail!(
            "{} --to but {} --peer: give one --peer fingerprint per --to, in order",
            o.to.len(),
            o.peer.len()
        );
    }
    let mut downstream = Vec::new();
    for (to, peer) in o.to.iter().zip(&o.peer) {
        downstream.push(Downstream {
            url: RemoteUrl::parse(to)?,
            peer: peer.parse()?,
        });
    }
    let name = o
        .name
        .clone()
        .unwrap_or_else(|| downstream[0].url.tree.clone());
    let identity = std::sync::Arc::new(
        sync_agent::identity::Identity::load(&o.identity)
            .with_context(|| format!("loading the identity in {}", o.identity.display()))?,
    );
    let cfg = SourceConfig {
        root: o.path.clone(),
        name,
        downstream,
        quiet: std::time::Duration::from_millis(o.quiet_ms),
        max_delay: std::time::Duration::from_millis(o.max_delay_ms),
        rescan_interval: std::time::Duration::from_secs(o.rescan_secs.max(1)),
        cache: o
            .cache
            .clone()
            .or_else(|| sync_core::cache::default_path(&o.path)),
        bandwidth_limit: None,
    };
    let control_path = o.control.clone().unwrap_or_else(control::default_path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        spawn_signal_handler(tx);
        let status = source::SharedStatus::default();
        let (pub_tx, pub_rx) = tokio::sync::mpsc::channel(16);
        let ctl = std::sync::Arc::new(Control {
            sources: vec![ControlledTree {
                status: status.clone(),
                publish: pub_tx,
            }],
            sinks: Vec::new(),
        });
        let c = ctl.clone();
        let crx = rx.clone();
        let cpath = control_path.clone();
        match control::bind(&cpath) {
            Ok(listener) => {
                tokio::spawn(async move { control::serve(listener, &cpath, c, crx).await });
            }
            Err(e) => tracing::error!(path = %cpath.display(), "control socket: {e}"),
        }
        if let Some(addr) = o.metrics {
            let c = ctl.clone();
            let mrx = rx.clone();
            match control::bind_metrics(addr) {
                Ok(listener) => {
                    tokio::spawn(async move { control::serve_metrics(listener, c, mrx).await });
                }
                Err(e) => tracing::error!(%addr, "metrics endpoint: {e}"),
            }
        }
        println!(
            "watching {} control {}",
            o.path.display(),
            control_path.display()
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        source::run(cfg, identity, status, pub_rx, rx).await
    })
}

fn spawn_signal_handler(tx: tokio::sync::watch::Sender<bool>) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received, shutting down");
        let _ = tx.send(true);
    });
}
