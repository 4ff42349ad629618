//! `bench`: the benchmark harness. Times our binaries against peer tools
//! (b3sum, find, rsync, cp -a) on a generated DLRN-like tree, alternating
//! them within each round, and prints one markdown table per suite; the
//! same results go to `<out>/<suite>-<entries>-<unix time>.json`.
//!
//! `cargo run --release -p sync-tests --bin bench -- scan --entries 100000`

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use sync_tests::bench::{run_suite, BenchOptions, Suite};

#[derive(Parser)]
#[command(name = "bench", about = "Benchmarks against peer tools")]
struct Cli {
    /// Suites to run, in order.
    #[arg(value_enum, required = true)]
    suites: Vec<Suite>,
    /// About this many entries (files + dirs + symlinks) in the tree.
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// File-size multiplier (1.0 = realistic, ~1.5 GB per 100k entries).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Rounds per case (each runs ours and the peer once, order alternating).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Rounds of the cheap cases (unchanged tree); default the larger of
    /// --rounds and 9, since sub-second runs swing most on a shared machine.
    #[arg(long)]
    quick_rounds: Option<usize>,
    /// Rounds of the QUIC suite's 5-new-builds case (default --rounds):
    /// a run of a few seconds at most, but each round copies both mirrors.
    #[arg(long)]
    build_rounds: Option<usize>,
    /// Work directory for trees and mirrors (default /work/bench-runs, else $TMPDIR/bench-runs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Directory for the JSON results (default <dir>/results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the generated trees.
    #[arg(long)]
    keep: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = cli.dir.unwrap_or_else(|| {
        if std::path::Path::new("/work").is_dir() {
            PathBuf::from("/work/bench-runs")
        } else {
            std::env::temp_dir().join("bench-runs")
        }
    });
    let out = cli.out.unwrap_or_else(|| dir.join("results"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let o = BenchOptions {
        entries: cli.entries,
        scale: cli.scale,
        rounds: cli.rounds.max(1),
        quick_rounds: cli.quick_rounds.unwrap_or(cli.rounds.max(9)).max(1),
        build_rounds: cli.build_rounds.unwrap_or(cli.rounds).max(1),
        dir,
        out,
        keep: cli.keep,
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut failed = false;
    for suite in cli.suites {
        let table = run_suite(suite, &o).with_context(|| format!("suite {}", suite.name()))?;
        println!("{}", table.markdown());
        let path = o
            .out
            .join(format!("{}-{}-{stamp}.json", suite.name(), o.entries));
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&table.to_json())? + "\n",
        )?;
        eprintln!("bench: wrote {}", path.display());
        for p in &table.cleanup {
            if let Err(e) = sync_tests::bench::suites::remove(p) {
                eprintln!("bench: cannot clean up: {e:#}");
            }
        }
        failed |= table.rows.iter().any(|r| r.pass() == Some(false))
            || table.checks.iter().any(|c| !c.pass());
    }
    if failed {
        eprintln!("bench: some targets were missed (see the tables)");
    }
    Ok(())
}
