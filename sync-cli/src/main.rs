//! `sync-cli`: the admin tool. Parses arguments, runs one command, prints
//! human or `--json` output and maps failures to documented exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod exit;
mod keygen;
mod progress;
mod push;
mod remote;
mod scan;
mod status;
mod verify;

/// Content-addressed sync for build servers and their mirrors.
#[derive(Parser, Debug)]
#[command(name = "sync-cli", version, about)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// The agent's control socket, for `status` and `push --wait` (default:
    /// /run/sync-agent.sock as root, else $XDG_RUNTIME_DIR/sync-agent.sock
    /// or /tmp/sync-agent-UID.sock).
    #[arg(long, global = true, value_name = "PATH")]
    control: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Hash a tree into its Merkle manifest and print the root and counts.
    Scan(ScanOptions),
    /// Mirror SRC into DEST (a local directory or quic://HOST:PORT/TREE on
    /// an agent): only what changed is written or sent, symlinks flip last,
    /// a crash leaves the old or new snapshot.
    Push(PushOptions),
    /// Pull an agent's committed snapshot (quic://HOST:PORT/TREE) into the
    /// local directory DEST, through the same crash-safe commit.
    Restore(RestoreOptions),
    /// Create an identity (cert.pem, key.pem) in DIR and print its fingerprint.
    Keygen(KeygenOptions),
    /// Print the fingerprint of the identity in DIR.
    Fingerprint(FingerprintOptions),
    /// Check a mirror against its committed manifest (exit 3 if it differs).
    Verify(VerifyOptions),
    /// Show a running agent's trees and peers: roots, lag, errors, traffic.
    Status(StatusOptions),
}

#[derive(clap::Args, Debug)]
pub struct StatusOptions {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct PushOptions {
    /// The tree to mirror.
    #[arg(required_unless_present = "wait")]
    pub src: Option<PathBuf>,
    /// Where to mirror it: a local directory, or quic://HOST:PORT/TREE.
    #[arg(required_unless_present = "wait")]
    pub dest: Option<String>,
    /// Ask the running agent (see --control) to publish its source tree
    /// NAME now and wait until every peer committed it; exit 1 if any
    /// failed. For build hooks that gate promotion on the mirrors.
    #[arg(long, value_name = "NAME")]
    pub wait: Option<String>,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 600, requires = "wait")]
    pub timeout: u64,
    /// Our identity directory (cert.pem, key.pem), for quic:// DEST.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// The agent's pinned certificate fingerprint, for quic:// DEST.
    #[arg(long)]
    pub peer: Option<String>,
    /// Print what would change, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// State directory of DEST (default: .<name>.sync-state beside DEST).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Do not use the source's hash cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Apply owners (uid/gid) on DEST; only takes effect as root.
    #[arg(long)]
    pub owners: bool,
}

impl PushOptions {
    /// SRC; clap requires it unless --wait, which never reaches here.
    pub fn src(&self) -> &std::path::Path {
        self.src
            .as_deref()
            .expect("clap requires SRC without --wait")
    }
    /// DEST; clap requires it unless --wait.
    pub fn dest(&self) -> &str {
        self.dest
            .as_deref()
            .expect("clap requires DEST without --wait")
    }
}

#[derive(clap::Args, Debug)]
pub struct RestoreOptions {
    /// The agent's tree: quic://HOST:PORT/TREE.
    pub src: String,
    /// The local directory to restore into (created if missing).
    pub dest: PathBuf,
    /// Our identity directory (cert.pem, key.pem).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// The agent's pinned certificate fingerprint.
    #[arg(long)]
    pub peer: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// State directory of DEST (default: .<name>.sync-state beside DEST).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Apply owners (uid/gid) on DEST; only takes effect as root.
    #[arg(long)]
    pub owners: bool,
}

#[derive(clap::Args, Debug)]
pub struct KeygenOptions {
    /// Directory to create cert.pem and key.pem in (never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Name put in the certificate (identity comes from the fingerprint).
    #[arg(long)]
    pub name: Option<String>,
    /// Print {"fingerprint": ...} instead of the bare fingerprint.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct FingerprintOptions {
    /// Identity directory holding cert.pem.
    pub dir: PathBuf,
    /// Print {"fingerprint": ...} instead of the bare fingerprint.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct VerifyOptions {
    /// The mirror to check.
    pub dest: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// State directory of DEST (default: .<name>.sync-state beside DEST).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Trust size and mtime instead of re-hashing content.
    #[arg(long)]
    pub fast: bool,
    /// Compare owners (uid/gid) too.
    #[arg(long)]
    pub owners: bool,
    /// How many differing paths to show.
    #[arg(long, default_value_t = 20)]
    pub examples: usize,
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
    sync_agent::tune_allocator();
    let cli = Cli::parse();
    sync_agent::init_logging(cli.verbose);
    let result = match cli.command {
        Command::Scan(o) => scan::run(o),
        Command::Push(o) => match &o.wait {
            Some(name) => status::push_wait(cli.control.as_deref(), name, o.json, o.timeout),
            None => push::run(o),
        },
        Command::Status(o) => status::status(cli.control.as_deref(), o.json),
        Command::Verify(o) => verify::run(o),
        Command::Restore(o) => remote::restore(o),
        Command::Keygen(o) => keygen::keygen(o),
        Command::Fingerprint(o) => keygen::fingerprint(o),
    };
    exit::report(result)
}
