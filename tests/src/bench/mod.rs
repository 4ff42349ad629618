//! The benchmark harness behind the `bench` binary: suites that time our
//! binaries against a peer tool on the same generated tree, alternating
//! the two within each round (the machine is shared and noisy), and report
//! medians, spreads, ratios and whether a target ratio holds. Speed targets
//! live here, never in timed tests. Does IO: spawns processes, writes trees.

pub mod freshfs;
pub mod measure;
pub mod report;
pub mod suites;

use std::path::PathBuf;

pub use measure::{run, run_shell, Run, Samples};
pub use report::{Check, Row, Table};
pub use suites::run_suite;

/// The benchmark suites; `quic` is the extension point for remote pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Cold scan vs b3sum, warm rescan vs a find walk, peak RSS per entry.
    Scan,
    /// Local push vs rsync -a and cp -a: initial, unchanged, incremental.
    PushLocal,
    /// Push over QUIC to a sync-agent vs rsync to an rsync daemon.
    Quic,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Scan => "scan",
            Suite::PushLocal => "push-local",
            Suite::Quic => "quic",
        }
    }
}

/// Options shared by every suite (`bench <suite> [options]`).
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Entries (files + dirs + symlinks) of the generated tree, about.
    pub entries: usize,
    /// File-size multiplier of the generator (1.0 = realistic).
    pub scale: f64,
    /// Rounds per case; each round runs ours and the peer once.
    pub rounds: usize,
    /// Rounds of the cheap cases (an unchanged tree).
    pub quick_rounds: usize,
    /// Rounds of the QUIC suite's 5-new-builds case.
    pub build_rounds: usize,
    /// Work directory: trees, destinations, caches.
    pub dir: PathBuf,
    /// Where the JSON results go.
    pub out: PathBuf,
    /// Keep the generated trees afterwards.
    pub keep: bool,
}
