//! `sync-cli scan`: hash a tree and print its root and counts.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use sync_core::scan::{scan, ScanOptions as CoreOptions};

use crate::exit::Outcome;
use crate::ScanOptions;

#[derive(Serialize)]
struct Report {
    root: String,
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
    bytes: u64,
    chunks: u64,
    trees: usize,
    manifest_held_bytes: usize,
    files_hashed: u64,
    bytes_hashed: u64,
    cache_hits: u64,
    cache: Option<String>,
    warnings: Vec<String>,
    elapsed_ms: u128,
}

pub fn run(o: ScanOptions) -> Outcome {
    let start = Instant::now();
    let cache = if o.no_cache {
        None
    } else {
        o.cache
            .clone()
            .or_else(|| sync_core::cache::default_path(&o.path))
    };
    let opts = CoreOptions {
        cache: cache.clone(),
        owners: !o.no_owners,
        // Held as an agent holds it: `manifest_held_bytes` says how much.
        pack: true,
    };
    let out = scan(&o.path, &opts).with_context(|| format!("scanning {}", o.path.display()))?;
    let s = out.manifest.stats()?;
    let r = Report {
        root: out.manifest.root().to_hex(),
        files: s.files + s.hardlinks,
        dirs: s.dirs,
        symlinks: s.symlinks,
        hardlinks: s.hardlinks,
        bytes: s.bytes,
        chunks: s.chunks,
        trees: out.manifest.tree_count(),
        manifest_held_bytes: out.manifest.held_bytes(),
        files_hashed: out.files_hashed,
        bytes_hashed: out.bytes_hashed,
        cache_hits: out.cache_hits,
        cache: cache.map(|c| c.display().to_string()),
        warnings: out.warnings,
        elapsed_ms: start.elapsed().as_millis(),
    };
    let mut stdout = std::io::stdout().lock();
    if o.json {
        serde_json::to_writer(&mut stdout, &r)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout, "root       {}", r.root)?;
        writeln!(
            stdout,
            "files      {} ({} hard links)",
            r.files, r.hardlinks
        )?;
        writeln!(stdout, "dirs       {}", r.dirs)?;
        writeln!(stdout, "symlinks   {}", r.symlinks)?;
        writeln!(stdout, "bytes      {} ({})", r.bytes, human_bytes(r.bytes))?;
        writeln!(stdout, "chunks     {}", r.chunks)?;
        writeln!(
            stdout,
            "hashed     {} files, {}; {} from cache",
            r.files_hashed,
            human_bytes(r.bytes_hashed),
            r.cache_hits
        )?;
        match &r.cache {
            Some(c) => writeln!(stdout, "cache      {c}")?,
            None => writeln!(stdout, "cache      disabled")?,
        }
        writeln!(stdout, "elapsed    {:.3} s", r.elapsed_ms as f64 / 1000.0)?;
    }
    Ok(0)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
