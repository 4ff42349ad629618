//! Push to and restore from an agent over QUIC (`quic://HOST:PORT/TREE`):
//! runs the one-shot clients of `sync_agent::client` on a tokio runtime,
//! shows a progress bar on a terminal and prints a summary. A failed
//! session still prints its counters with `--json` (`"ok": false`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sync_agent::client::{self, RemoteOutcome, RemoteUrl};
use sync_agent::driver::{DriveOptions, Progress};
use sync_agent::identity::{Fingerprint, Identity};
use sync_core::commit::{CommitOptions, Receiver};

use crate::exit::Outcome;
use crate::progress::Phase;
use crate::scan::human_bytes;
use crate::{PushOptions, RestoreOptions};

/// How long a connection made before the scan is used for the push.
const EARLY_CONNECTION_MAX_AGE: Duration = Duration::from_secs(5);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn credentials(
    identity: &Option<PathBuf>,
    peer: &Option<String>,
) -> anyhow::Result<(Identity, Fingerprint)> {
    let dir = identity
        .as_ref()
        .context("a quic:// address needs --identity DIR (see `sync-cli keygen`)")?;
    let id = Identity::load(dir)
        .with_context(|| format!("loading the identity in {}", dir.display()))?;
    let peer = peer
        .as_ref()
        .context("a quic:// address needs --peer FINGERPRINT (the agent's fingerprint)")?
        .parse::<Fingerprint>()?;
    Ok((id, peer))
}

/// A transfer bar on stderr when it is a terminal, fed from the driver's
/// counters by a small task.
struct Bar {
    pb: Option<ProgressBar>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bar {
    fn start(rt: &tokio::runtime::Runtime, on: bool, verb: &'static str, p: Arc<Progress>) -> Bar {
        if !on || !std::io::stderr().is_terminal() {
            return Bar {
                pb: None,
                task: None,
            };
        }
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template"),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        let bar = pb.clone();
        let task = rt.spawn(async move {
            loop {
                let (c, b, r) = (
                    p.chunks.load(Ordering::Relaxed),
                    p.bytes.load(Ordering::Relaxed),
                    p.remaining.load(Ordering::Relaxed),
                );
                let rest = if r > 0 {
                    format!(", {r} to go")
                } else {
                    String::new()
                };
                bar.set_message(format!("{verb} {c} chunks, {}{rest}", human_bytes(b)));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Bar {
            pb: Some(pb),
            task: Some(task),
        }
    }

    fn finish(self) {
        if let Some(t) = self.task {
            t.abort();
        }
        if let Some(pb) = self.pb {
            pb.finish_and_clear();
        }
    }
}

#[derive(Serialize)]
struct PushReport {
    ok: bool,
    error: Option<String>,
    root: String,
    unchanged: bool,
    files: u64,
    chunks: u64,
    bytes_sent: u64,
    trees_sent: u64,
    wire_bytes: u64,
    wire_rx_bytes: u64,
    files_hashed: u64,
    cache_hits: u64,
    elapsed_ms: u128,
}

fn emit<T: Serialize>(
    json: bool,
    report: &T,
    human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, report)?;
        writeln!(out)?;
    } else {
        human(&mut out)?;
    }
    out.flush()?;
    Ok(())
}

pub fn push(o: PushOptions) -> Outcome {
    let start = Instant::now();
    let url = RemoteUrl::parse(o.dest())?;
    if o.dry_run {
        anyhow::bail!("--dry-run is for local pushes; a remote push plans on the agent");
    }
    let (id, peer) = credentials(&o.identity, &o.peer)?;
    let addr = url.resolve()?;
    let rt = runtime()?;
    // Shake hands while the source is scanned (the runtime's threads drive
    // it): an unchanged push is little more than the scan.
    let cfg = client::config(addr, &id, peer)?;
    let early = rt.spawn(client::connect_with(addr, cfg));
    let phase = Phase::start(!o.json, "scanning source");
    let scan_started = Instant::now();
    let scanned = crate::push::scan_source(&o);
    phase.finish();
    // On an error, dropping the runtime cancels the handshake.
    let scanned = scanned?;
    tracing::debug!(ms = start.elapsed().as_millis() as u64, "source scanned");
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(&rt, !o.json, "sent", progress.clone());
    let opts = DriveOptions {
        progress: Some(progress),
        ..DriveOptions::default()
    };
    let manifest = scanned.manifest.clone();
    let locator = std::sync::Arc::new(sync_agent::driver::LazyLocator::new(manifest));
    let res = rt.block_on(async {
        // The agent waits 10 s for a session to start: after a long scan,
        // connect again rather than race its timeout.
        let conn = match early.await {
            Ok(Ok((endpoint, conn)))
                if scan_started.elapsed() < EARLY_CONNECTION_MAX_AGE
                    && conn.close_reason().is_none() =>
            {
                (endpoint, conn)
            }
            Ok(Err(e)) => return Err(e),
            _ => client::connect(addr, &id, peer).await?,
        };
        let (endpoint, conn) = conn;
        client::push_on(endpoint, conn, addr, &url.tree, locator, o.src(), opts).await
    });
    bar.finish();
    let out: RemoteOutcome = res.with_context(|| format!("pushing to {}", o.dest()))?;
    let s = out.result.as_ref().unwrap_or(&out.partial);
    let report = PushReport {
        ok: out.result.is_ok(),
        error: out.result.as_ref().err().map(|e| e.to_string()),
        root: scanned.manifest.snapshot().to_hex(),
        unchanged: out.result.as_ref().is_ok_and(|s| s.unchanged),
        // Every regular file of a full scan (hard links too) was either
        // read or found in the cache, once: no walk of the manifest needed.
        files: scanned.files_hashed + scanned.cache_hits,
        chunks: s.chunks_sent,
        bytes_sent: s.bytes_sent,
        trees_sent: s.trees_sent,
        wire_bytes: out.wire_tx,
        wire_rx_bytes: out.wire_rx,
        files_hashed: scanned.files_hashed,
        cache_hits: scanned.cache_hits,
        elapsed_ms: start.elapsed().as_millis(),
    };
    if report.ok || o.json {
        emit(o.json, &report, |w| {
            if report.unchanged {
                writeln!(w, "unchanged  {}", report.root)?;
            } else {
                writeln!(w, "root       {}", report.root)?;
                writeln!(
                    w,
                    "sent       {} chunks, {} ({} trees); {} on the wire",
                    report.chunks,
                    human_bytes(report.bytes_sent),
                    report.trees_sent,
                    human_bytes(report.wire_bytes)
                )?;
            }
            writeln!(w, "files      {}", report.files)?;
            writeln!(w, "elapsed    {:.3} s", report.elapsed_ms as f64 / 1000.0)
        })?;
    }
    match out.result {
        Ok(_) => Ok(0),
        Err(e) => Err(anyhow!(e).context(format!("pushing to {}", o.dest()))),
    }
}

#[derive(Serialize)]
struct RestoreReport {
    ok: bool,
    error: Option<String>,
    root: String,
    unchanged: bool,
    files: u64,
    files_changed: u64,
    chunks: u64,
    chunks_local: u64,
    bytes_received: u64,
    trees_received: u64,
    wire_bytes: u64,
    wire_tx_bytes: u64,
    state_dir: String,
    elapsed_ms: u128,
}

pub fn restore(o: RestoreOptions) -> Outcome {
    let start = Instant::now();
    let url = RemoteUrl::parse(&o.src)?;
    let (id, peer) = credentials(&o.identity, &o.peer)?;
    let addr = url.resolve()?;
    let recv = Receiver::open(&o.dest, o.state.as_deref())
        .with_context(|| format!("opening {}", o.dest.display()))?;
    if let Some(r) = recv.recovered() {
        tracing::warn!(
            files = r.files_written,
            "finished a commit that a crash had interrupted"
        );
    }
    let state_dir = recv.state_dir().display().to_string();
    let dest = recv.dest().to_path_buf();
    let rt = runtime()?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(&rt, !o.json, "received", progress.clone());
    let opts = DriveOptions {
        progress: Some(progress),
        ..DriveOptions::default()
    };
    let commit = CommitOptions { owners: o.owners };
    let res = rt.block_on(client::pull(addr, &url.tree, &id, peer, recv, commit, opts));
    bar.finish();
    let out = res.with_context(|| format!("restoring from {}", o.src))?;
    let s = out.result.as_ref().unwrap_or(&out.partial);
    let files = match &out.result {
        Ok(_) => count_files(&dest, o.state.as_deref()),
        Err(_) => 0,
    };
    let report = RestoreReport {
        ok: out.result.is_ok(),
        error: out.result.as_ref().err().map(|e| e.to_string()),
        root: s.root.to_hex(),
        unchanged: out.result.as_ref().is_ok_and(|s| s.unchanged),
        files,
        files_changed: s.files_changed,
        chunks: s.chunks_received,
        chunks_local: s.chunks_local,
        bytes_received: s.bytes_received,
        trees_received: s.trees_received,
        wire_bytes: out.wire_rx,
        wire_tx_bytes: out.wire_tx,
        state_dir,
        elapsed_ms: start.elapsed().as_millis(),
    };
    if report.ok || o.json {
        emit(o.json, &report, |w| {
            if report.unchanged {
                writeln!(w, "unchanged  {}", report.root)?;
            } else {
                writeln!(w, "root       {}", report.root)?;
                writeln!(
                    w,
                    "received   {} chunks, {} ({} already here); {} on the wire",
                    report.chunks,
                    human_bytes(report.bytes_received),
                    report.chunks_local,
                    human_bytes(report.wire_bytes)
                )?;
                writeln!(w, "changed    {} files", report.files_changed)?;
            }
            writeln!(w, "files      {}", report.files)?;
            writeln!(w, "state      {}", report.state_dir)?;
            writeln!(w, "elapsed    {:.3} s", report.elapsed_ms as f64 / 1000.0)
        })?;
    }
    match out.result {
        Ok(_) => Ok(0),
        Err(e) => Err(anyhow!(e).context(format!("restoring from {}", o.src))),
    }
}

/// Files in the committed snapshot of `dest` (after a restore).
fn count_files(dest: &std::path::Path, state: Option<&std::path::Path>) -> u64 {
    Receiver::open(dest, state)
        .ok()
        .and_then(|r| r.committed().stats().ok())
        .map_or(0, |s| s.files + s.hardlinks)
}
