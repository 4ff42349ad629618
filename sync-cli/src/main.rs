//! `sync-cli`: the admin tool. Parses arguments, runs one command, prints
//! human or `--json` output and maps failures to documented exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod exit;
mod scan;

/// Content-addressed sync for build servers and their mirrors.
#[derive(Parser, Debug)]
#[command(name = "sync-cli", version, about)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Hash a tree into its Merkle manifest and print the root and counts.
    Scan(ScanOptions),
}

#[derive(clap::Args, Debug)]
pub struct ScanOptions {
    /// The tree to scan.
    pub path: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Do not read or write the hash cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Hash cache file (default: $XDG_CACHE_HOME/sync-engine/<tree>.hcache).
    #[arg(long, conflicts_with = "no_cache")]
    pub cache: Option<PathBuf>,
    /// Record uid/gid as 0, to compare trees owned by different users.
    #[arg(long)]
    pub no_owners: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Scan(o) => scan::run(o),
    };
    exit::report(result)
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
