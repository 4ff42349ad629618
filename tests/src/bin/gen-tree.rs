//! `gen-tree`: command-line front end to the deterministic test-tree generators.
//!
//! Subcommands `dlrn` (create a DLRN-like tree), `evolve` (continue one, using
//! the `<OUT>.gen.json` sidecar next to it) and `edge` (edge-case tree). Prints a
//! one-line JSON summary of the resulting tree on stdout.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;
use sync_tests::gen::{tree_stats, DlrnSpec, DlrnTree};

#[derive(Parser)]
#[command(name = "gen-tree", about = "Generate deterministic test trees")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a DLRN-like tree in OUT (must not exist or be empty).
    Dlrn {
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Pick projects/builds to get about this many entries.
        #[arg(long, conflicts_with_all = ["projects", "builds"])]
        entries: Option<usize>,
        #[arg(long, requires = "builds")]
        projects: Option<usize>,
        #[arg(long, requires = "projects")]
        builds: Option<usize>,
        /// Multiplies file sizes (1.0 = realistic).
        #[arg(long)]
        scale: Option<f64>,
        /// Keep only the newest N builds (plus link targets and each project's latest); 0 = all.
        #[arg(long, default_value_t = 0)]
        keep: usize,
        /// Evolve this many steps (one build each) after creating.
        #[arg(long, default_value_t = 0)]
        evolve: usize,
    },
    /// Continue a tree made by `dlrn`: add builds, flip symlinks, purge.
    Evolve {
        out: PathBuf,
        /// Must match the seed recorded in the sidecar, if given.
        #[arg(long)]
        seed: Option<u64>,
        /// Number of evolve steps.
        #[arg(long, default_value_t = 1)]
        steps: usize,
        /// Builds added per step.
        #[arg(long, default_value_t = 1)]
        builds_per_step: usize,
    },
    /// Create the edge-case tree in OUT (plus special files with --special).
    Edge {
        out: PathBuf,
        /// Also create a fifo and a unix socket at the top.
        #[arg(long)]
        special: bool,
    },
}

fn summary(root: &Path, extra: serde_json::Value, started: Instant) -> Result<()> {
    let s = tree_stats(root)?;
    let mut v = serde_json::json!({
        "root": root.display().to_string(),
        "entries": s.entries(),
        "files": s.files,
        "symlinks": s.symlinks,
        "dirs": s.dirs,
        "bytes": s.bytes,
        "secs": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    println!("{v}");
    Ok(())
}

fn main() -> Result<()> {
    let started = Instant::now();
    match Cli::parse().cmd {
        Cmd::Dlrn {
            out,
            seed,
            entries,
            projects,
            builds,
            scale,
            keep,
            evolve,
        } => {
            let mut spec = match (entries, projects, builds) {
                (Some(n), _, _) => DlrnSpec::entries_target(n),
                (None, Some(p), Some(b)) => DlrnSpec {
                    projects: p,
                    builds: b,
                    scale: 1.0,
                    ..DlrnSpec::quick()
                },
                _ => DlrnSpec {
                    scale: 1.0,
                    ..DlrnSpec::quick()
                },
            };
            spec.seed = seed;
            spec.keep_builds = keep;
            if let Some(s) = scale {
                spec.scale = s;
            }
            let mut t = DlrnTree::create(&out, spec.clone())?;
            for _ in 0..evolve {
                t.evolve(1)?;
            }
            let extra = serde_json::json!({
                "projects": spec.projects,
                "builds": t.total_builds(),
                "current": t.current_target().display().to_string(),
            });
            summary(&out, extra, started)
        }
        Cmd::Evolve {
            out,
            seed,
            steps,
            builds_per_step,
        } => {
            let mut t = DlrnTree::open(&out)?;
            if let Some(s) = seed {
                if s != t.spec().seed {
                    bail!(
                        "--seed {s} does not match the sidecar's seed {}",
                        t.spec().seed
                    );
                }
            }
            let mut new = Vec::new();
            for _ in 0..steps {
                new.extend(t.evolve(builds_per_step)?);
            }
            let extra = serde_json::json!({
                "builds": t.total_builds(),
                "current": t.current_target().display().to_string(),
                "new": new.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            });
            summary(&out, extra, started)
        }
        Cmd::Edge { out, special } => {
            sync_tests::edge::create_edge_tree(&out)?;
            if special {
                sync_tests::edge::create_special_files(&out)?;
            }
            summary(&out, serde_json::json!({}), started)
        }
    }
}
