//! `sync-cli push SRC DEST`: mirror a tree into a local directory through
//! the commit engine (scan, plan against DEST's committed manifest, commit).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use sync_core::commit::{push_local, CommitOptions, Receiver};
use sync_core::scan::{scan, ScanOptions as CoreScan};

use crate::exit::Outcome;
use crate::progress::Phase;
use crate::PushOptions;

#[derive(Serialize)]
struct Report {
    root: String,
    previous_root: String,
    unchanged: bool,
    dry_run: bool,
    files_written: u64,
    bytes_written: u64,
    dirs_created: u64,
    symlinks: u64,
    hardlinks: u64,
    metadata: u64,
    deleted: u64,
    rolled_forward: bool,
    files_hashed: u64,
    cache_hits: u64,
    state_dir: String,
    warnings: Vec<String>,
    elapsed_ms: u128,
}

/// Scan SRC with its hash cache (unless --no-cache), for a local or remote push.
pub fn scan_source(o: &PushOptions) -> anyhow::Result<sync_core::scan::ScanOutcome> {
    let cache = if o.no_cache {
        None
    } else {
        sync_core::cache::default_path(o.src())
    };
    let opts = CoreScan {
        cache,
        owners: true,
        // Held until this process exits: trees are compressed only if a
        // local commit stores them.
        pack: false,
    };
    scan(o.src(), &opts).with_context(|| format!("scanning {}", o.src().display()))
}

pub fn run(o: PushOptions) -> Outcome {
    if o.dest().starts_with("quic://") {
        return crate::remote::push(o);
    }
    if o.identity.is_some() || o.peer.is_some() {
        bail!("--identity and --peer are for a quic:// DEST");
    }
    let start = Instant::now();
    let dest = std::path::PathBuf::from(o.dest());
    let phase = Phase::start(!o.json, "scanning source");
    let scanned = scan_source(&o)?;
    tracing::debug!(ms = start.elapsed().as_millis() as u64, "source scanned");
    phase.next("opening destination");
    let state_dir = match &o.state {
        Some(s) => s.clone(),
        None => sync_core::state::default_state_dir(&dest)?,
    };
    if !o.dry_run
        && sync_core::state::peek_committed_root(&state_dir) == Some(scanned.manifest.root())
    {
        // Unchanged: the roots compare equal, nothing to open or lock.
        phase.finish();
        let root = scanned.manifest.snapshot().to_hex();
        let report = Report {
            previous_root: root.clone(),
            root,
            unchanged: true,
            dry_run: false,
            files_written: 0,
            bytes_written: 0,
            dirs_created: 0,
            symlinks: 0,
            hardlinks: 0,
            metadata: 0,
            deleted: 0,
            rolled_forward: false,
            files_hashed: scanned.files_hashed,
            cache_hits: scanned.cache_hits,
            state_dir: state_dir.display().to_string(),
            warnings: scanned.warnings,
            elapsed_ms: start.elapsed().as_millis(),
        };
        return emit(&o, &report);
    }
    // A dry run reads the committed manifest without locking, creating or
    // rolling forward anything.
    let (mut recv, committed) = if o.dry_run {
        (None, sync_core::state::peek_manifest(&state_dir)?)
    } else {
        let recv = Receiver::open(&dest, o.state.as_deref())
            .with_context(|| format!("opening {}", dest.display()))?;
        if let Some(r) = recv.recovered() {
            tracing::warn!(
                files = r.files_written,
                "finished a commit that a crash had interrupted"
            );
        }
        let committed = recv.committed().clone();
        (Some(recv), committed)
    };
    let previous = committed.snapshot();
    let new = &scanned.manifest;
    let unchanged = previous == new.snapshot();
    let mut report = Report {
        root: new.snapshot().to_hex(),
        previous_root: previous.to_hex(),
        unchanged,
        dry_run: o.dry_run,
        files_written: 0,
        bytes_written: 0,
        dirs_created: 0,
        symlinks: 0,
        hardlinks: 0,
        metadata: 0,
        deleted: 0,
        rolled_forward: recv.as_ref().is_some_and(|r| r.recovered().is_some()),
        files_hashed: scanned.files_hashed,
        cache_hits: scanned.cache_hits,
        state_dir: state_dir.display().to_string(),
        warnings: scanned.warnings.clone(),
        elapsed_ms: 0,
    };
    if o.dry_run {
        phase.next("planning");
        let plan = sync_core::plan::SyncPlan::build(&committed, new, |_| false)?;
        phase.finish();
        if !o.json {
            print!("{plan}");
        }
        report.files_written = plan.files.len() as u64;
        report.bytes_written = plan.file_bytes();
        report.deleted = plan.deletions.len() as u64;
    } else if let (false, Some(recv)) = (unchanged, recv.as_mut()) {
        phase.next("committing");
        tracing::debug!(
            ms = start.elapsed().as_millis() as u64,
            "destination opened"
        );
        let s = push_local(new, o.src(), recv, &CommitOptions { owners: o.owners })
            .with_context(|| format!("mirroring into {}", dest.display()))?;
        phase.finish();
        report.files_written = s.files_written;
        report.bytes_written = s.bytes_written;
        report.dirs_created = s.dirs_created;
        report.symlinks = s.symlinks;
        report.hardlinks = s.hardlinks;
        report.metadata = s.metadata;
        report.deleted = s.deleted;
    } else {
        phase.finish();
    }
    report.elapsed_ms = start.elapsed().as_millis();
    emit(&o, &report)
}

fn emit(o: &PushOptions, report: &Report) -> Outcome {
    let mut out = std::io::stdout().lock();
    if o.json {
        serde_json::to_writer(&mut out, report)?;
        writeln!(out)?;
    } else {
        let verb = if o.dry_run { "would write" } else { "wrote" };
        if report.unchanged {
            writeln!(out, "unchanged  {}", report.root)?;
        } else {
            writeln!(
                out,
                "root       {} (was {})",
                report.root,
                &report.previous_root[..12]
            )?;
            writeln!(
                out,
                "{verb:<10} {} files, {}; {} dirs, {} symlinks, {} deletions",
                report.files_written,
                crate::scan::human_bytes(report.bytes_written),
                report.dirs_created,
                report.symlinks,
                report.deleted
            )?;
        }
        writeln!(out, "state      {}", report.state_dir)?;
        writeln!(out, "elapsed    {:.3} s", report.elapsed_ms as f64 / 1000.0)?;
    }
    Ok(0)
}
