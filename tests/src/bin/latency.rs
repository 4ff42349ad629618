//! `latency`: the latency benchmark of issue 5. For each tree size, times
//! how long after the builder's last write of a new build the mirror's
//! `current` points at it, for our watching agent and for lsyncd
//! (`default.rsync`, `delay = 1`) watching the same tree (taking turns by
//! default, or at once with `--schedule concurrent`), with a reader on each
//! mirror counting broken repositories behind `current`. Prints a markdown
//! table; `--json OUT` writes the same results as JSON.
//!
//! `cargo run --release -p sync-tests --bin latency -- --entries 100000,300000 --builds 30`
//! (smoke: `--entries 5000 --builds 5`, under a minute).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use sync_tests::latency::{
    ensure_lsyncd, markdown, run_size, version_of, Binaries, LatencyOptions, Mirror, PeerChoice,
    Schedule,
};

#[derive(Parser)]
#[command(name = "latency", about = "Build-to-mirror latency: ours vs lsyncd")]
struct Cli {
    /// Tree sizes in entries (files + dirs + symlinks), about; one run each.
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    entries: Vec<usize>,
    /// Builds to time per size.
    #[arg(long, default_value_t = 30)]
    builds: usize,
    /// File-size multiplier (1.0 = realistic, ~1.5 GB per 100k entries).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Work directory (default $TMPDIR/sync-latency); one subdirectory per size.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which mirrors to run.
    #[arg(long, value_enum, default_value_t = PeerChoice::Both)]
    peer: PeerChoice,
    /// With both: take turns (the idle one frozen) or time every build on both at once.
    #[arg(long, value_enum, default_value_t = Schedule::Alternate)]
    schedule: Schedule,
    /// With --schedule alternate: builds per turn.
    #[arg(long, default_value_t = 5)]
    block: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the generated trees and mirrors.
    #[arg(long)]
    keep: bool,
    /// Seeds the 1–2 s pauses between builds.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest wait for one build on a mirror, in seconds (then a timeout).
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Longest wait for a mirror's initial full copy, in seconds.
    #[arg(long, default_value_t = 1800)]
    initial_timeout_secs: u64,
    /// Pause of each reader between two reads of `current`, in milliseconds.
    #[arg(long, default_value_t = 5)]
    read_pause_ms: u64,
    /// lsyncd's `delay` in seconds.
    #[arg(long, default_value_t = 1)]
    lsyncd_delay: u32,
    /// Take sync-agent and sync-cli from this directory instead of
    /// building the workspace's.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// RUST_LOG of the agents; their logs go to <dir>/e<entries>/ours-*.log.
    #[arg(long, default_value = "info")]
    agent_log: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = cli
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join("sync-latency"));
    let mut mirrors = cli.peer.mirrors();
    let mut context = Vec::new();
    if mirrors.contains(&Mirror::Lsyncd) {
        if let Err(e) = ensure_lsyncd() {
            eprintln!("latency: lsyncd unavailable, running ours only: {e:#}");
            context.push(("lsyncd", format!("unavailable: {e:#}")));
            mirrors.retain(|m| *m != Mirror::Lsyncd);
        }
    }
    anyhow::ensure!(!mirrors.is_empty(), "no mirror to run");
    let turns = match (mirrors.len(), cli.schedule) {
        (1, _) => "one mirror".to_string(),
        (_, Schedule::Alternate) => format!(
            "both mirrors watch the same source tree and take turns in blocks of {} builds; \
             the idle one is frozen (SIGSTOP) so that neither competes with the other while \
             timed, and catches up untimed before its next turn",
            cli.block
        ),
        (_, Schedule::Concurrent) => "both mirrors watch the same source tree and time \
             every build at once, competing for the machine"
            .to_string(),
    };
    context.push((
        "design",
        format!(
            "{turns}; per build, `evolve(1)` (write the build, flip the links, purge), then a \
             poller per timed mirror reads `current` every 1 ms from the moment `evolve` returned; \
             a reader per mirror judges the repository behind `current` while its mirror is \
             timed; builds spaced by a seeded 1-2 s pause after the flip"
        ),
    ));
    let bins = Binaries::new(cli.bin_dir.as_deref());
    for p in [&bins.agent, &bins.cli] {
        anyhow::ensure!(p.is_file(), "{} is missing", p.display());
    }
    context.extend([
        ("lsyncd", version_of("lsyncd", "--version")),
        ("rsync", version_of("rsync", "--version")),
        (
            "sync-agent",
            format!(
                "{} ({})",
                version_of(&bins.agent.to_string_lossy(), "--version"),
                bins.agent.display()
            ),
        ),
        (
            "machine",
            format!(
                "{} CPUs, kernel {}",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                version_of("uname", "-r")
            ),
        ),
    ]);
    let mut reports = Vec::new();
    for &entries in &cli.entries {
        let o = LatencyOptions {
            entries,
            scale: cli.scale,
            builds: cli.builds.max(1),
            dir: dir.join(format!("e{entries}")),
            mirrors: mirrors.clone(),
            schedule: cli.schedule,
            block: cli.block,
            seed: cli.seed,
            timeout: Duration::from_secs(cli.timeout_secs),
            initial_timeout: Duration::from_secs(cli.initial_timeout_secs),
            read_pause: Duration::from_millis(cli.read_pause_ms),
            lsyncd_delay: cli.lsyncd_delay,
            keep: cli.keep,
            bins: bins.clone(),
            agent_log: cli.agent_log.clone(),
        };
        let r = run_size(&o).with_context(|| format!("at {entries} entries"))?;
        reports.push(r);
    }
    println!("### latency: builder's last write to `current` flipped on the mirror\n");
    for (k, v) in &context {
        println!("- {k}: {v}");
    }
    for r in &reports {
        println!(
            "- tree at --entries {}: {} entries ({} files, {} dirs, {} symlinks), {:.2} GB, scale {}",
            r.entries_asked,
            r.stats.entries(),
            r.stats.files,
            r.stats.dirs,
            r.stats.symlinks,
            r.stats.bytes as f64 / 1e9,
            r.scale
        );
    }
    println!();
    print!("{}", markdown(&reports));
    if let Some(path) = cli.json {
        let v = json!({
            "benchmark": "latency",
            "builds": cli.builds,
            "seed": cli.seed,
            "context": context.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "sizes": reports.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("latency: wrote {}", path.display());
    }
    Ok(())
}
