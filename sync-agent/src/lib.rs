//! The sync agent as a library: identities, mutual TLS over QUIC, the
//! session driver, the server and one-shot clients, the source loop, the
//! configuration file and the agent that runs one, shared by the
//! `sync-agent` daemon and by `sync-cli` for push and restore.

pub mod agent;
pub mod client;
pub mod config;
pub mod control;
pub mod driver;
pub mod identity;
pub mod ratelimit;
pub mod server;
pub mod source;
pub mod tls;
pub mod watcher;

/// Install the `tracing` subscriber of a binary: stderr, `RUST_LOG` if set,
/// else warn / info (`-v`) / debug (`-vv`).
pub fn init_logging(verbose: u8) {
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
