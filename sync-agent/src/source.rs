//! The source side of continuous mirroring: watch a tree, rescan what the
//! watcher marked dirty once it is quiet, and push each new snapshot to
//! every downstream peer concurrently, each at its own pace. A slow or dead
//! mirror never holds the others back, and one that was down catches up
//! with a single sync of the latest snapshot (intermediate ones are never
//! replayed). Failures back off exponentially with jitter, capped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sync_core::debounce::{Batch, Debouncer};
use sync_core::scan::{rescan, scan, ScanError, ScanOptions, ScanOutcome};
use sync_core::{Manifest, SnapshotId};
use tokio::sync::watch;

use crate::client::{self, RemoteUrl};
use crate::driver::{DriveOptions, LazyLocator};
use crate::identity::{Fingerprint, Identity};
use crate::ratelimit::RateLimit;
use crate::watcher::{Hints, Watch, DEGRADED_RESCAN};

/// One mirror to keep up to date.
#[derive(Clone, Debug)]
pub struct Downstream {
    pub url: RemoteUrl,
    pub peer: Fingerprint,
}

#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub root: PathBuf,
    /// The tree's name in status output.
    pub name: String,
    pub downstream: Vec<Downstream>,
    /// Rescan once no change arrived for this long.
    pub quiet: Duration,
    /// ... or at the latest this long after the first pending change.
    pub max_delay: Duration,
    /// Full rescan this often, whatever the watcher says.
    pub rescan_interval: Duration,
    /// Hash cache file.
    pub cache: Option<PathBuf>,
    /// Bytes per second all pushes of this tree may send together.
    pub bandwidth_limit: Option<u64>,
}

impl SourceConfig {
    pub const DEFAULT_QUIET: Duration = Duration::from_millis(100);
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(2);
    pub const DEFAULT_RESCAN: Duration = Duration::from_secs(3600);
}

/// A published snapshot.
#[derive(Debug)]
pub struct Snapshot {
    pub taken: SystemTime,
    /// The manifest and its chunk index, shared by the pushes to every peer.
    pub locator: Arc<LazyLocator>,
}

impl Snapshot {
    /// A snapshot of `manifest` taken now; its chunk index is built by
    /// the first push that needs chunks, over what that mirror fetched.
    fn new(manifest: Manifest) -> Snapshot {
        Snapshot {
            locator: Arc::new(LazyLocator::new(manifest)),
            taken: SystemTime::now(),
        }
    }

    pub fn root(&self) -> SnapshotId {
        self.locator.manifest().snapshot()
    }
}

/// What `sync-cli status` shows for one peer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerStatus {
    pub url: String,
    pub committed_root: Option<String>,
    #[serde(skip)]
    pub committed_snapshot_taken: Option<SystemTime>,
    /// Seconds since the snapshot the peer has was taken, while it is
    /// behind; 0 when current.
    pub lag_seconds: f64,
    /// Bytes the peer still lacks, as of the last plan (0 when current).
    pub lag_bytes: u64,
    pub last_error: Option<String>,
    pub last_sync_unix: Option<u64>,
    pub syncs: u64,
    pub failures: u64,
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    pub wire_bytes_sent: u64,
}

/// What `sync-cli status` shows for one source tree.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TreeStatus {
    pub name: String,
    pub path: String,
    pub role: &'static str,
    pub root: Option<String>,
    pub snapshot_unix: Option<u64>,
    pub scans: u64,
    pub last_scan_ms: u64,
    pub last_scan_error: Option<String>,
    pub watcher_degraded: bool,
    pub peers: Vec<PeerStatus>,
}

pub type SharedStatus = Arc<Mutex<TreeStatus>>;

fn unix(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// A request to publish now (from the control socket): answered with the
/// root that was published once it is.
pub type PublishRequest = tokio::sync::oneshot::Sender<Result<SnapshotId, String>>;

/// Run until `shutdown` turns true.
pub async fn run(
    cfg: SourceConfig,
    identity: Arc<Identity>,
    status: SharedStatus,
    mut publish_now: tokio::sync::mpsc::Receiver<PublishRequest>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let scan_opts = ScanOptions {
        cache: cfg.cache.clone(),
        owners: true,
        // Kept in memory as long as the agent runs.
        pack: true,
    };
    init_status(&status, &cfg.name, &cfg.root, "source", &cfg.downstream);
    let hints = Hints::new(cfg.root.clone(), Debouncer::new(cfg.quiet, cfg.max_delay));
    // Watch before the first scan, so no change slips between them.
    let watch_root = hints.clone();
    let watcher = Arc::new(tokio::task::spawn_blocking(move || Watch::start(watch_root)).await?);

    let (snap_tx, snap_rx) = watch::channel::<Option<Arc<Snapshot>>>(None);
    let pusher = Pusher {
        root: cfg.root.clone(),
        identity: identity.clone(),
        limit: cfg.bandwidth_limit.map(|r| Arc::new(RateLimit::new(r))),
    };
    let peers = spawn_peers(&cfg.downstream, &pusher, &status, &snap_rx, &shutdown);

    let mut last: Option<ScanOutcome> = None;
    let mut next_full = Instant::now();
    let mut waiting: Vec<PublishRequest> = Vec::new();
    loop {
        let now = Instant::now();
        // A publish request forces a full scan, unless changes are still
        // arriving: then the quiet period comes first, whatever asks.
        let pending = hints.debouncer.lock().unwrap().is_pending();
        let batch = if now >= next_full || (!waiting.is_empty() && !pending) {
            // Drop what the watcher gathered: a full scan covers it.
            let _ = hints
                .debouncer
                .lock()
                .unwrap()
                .poll(Instant::now() + cfg.max_delay);
            Some(Batch::Full)
        } else {
            hints.debouncer.lock().unwrap().poll(now)
        };
        if let Some(batch) = batch {
            if batch == Batch::Full {
                let every = if hints.degraded() {
                    cfg.rescan_interval.min(DEGRADED_RESCAN)
                } else {
                    cfg.rescan_interval
                };
                next_full = Instant::now() + every;
            }
            let started = Instant::now();
            let root = cfg.root.clone();
            let opts = scan_opts.clone();
            let prev = last.take();
            let b = batch.clone();
            let w = watcher.clone();
            let h = hints.clone();
            let (result, prev, changes_before) = tokio::task::spawn_blocking(move || {
                // Hints of changes made before the scan starts belong to this
                // batch or the next, not to the torn test.
                w.sync();
                let before = h.changes.load(std::sync::atomic::Ordering::SeqCst);
                let r = match (&b, &prev) {
                    (Batch::Dirs(dirs), Some(p)) => rescan(&root, &opts, p, dirs),
                    _ => scan(&root, &opts),
                };
                // Every change made during the scan is a hint once this returns.
                w.sync();
                (r, prev, before)
            })
            .await?;
            let ms = started.elapsed().as_millis() as u64;
            let torn = hints.changes.load(std::sync::atomic::Ordering::SeqCst) != changes_before;
            let result = match result {
                // The scan may mix a half-written build with a flipped
                // `current`: publish nothing, rescan once it is quiet.
                Ok(out) if torn => {
                    tracing::debug!(ms, "tree changed during the scan; rescanning when quiet");
                    hints
                        .debouncer
                        .lock()
                        .unwrap()
                        .retry(batch.clone(), Instant::now());
                    Err(out)
                }
                Ok(out) => Ok(out),
                Err(e) => {
                    last = prev;
                    let retry = matches!(e, ScanError::Changing { .. });
                    tracing::warn!(
                        "scan failed{}: {e}",
                        if retry { ", retrying when quiet" } else { "" }
                    );
                    status.lock().unwrap().last_scan_error = Some(e.to_string());
                    hints.debouncer.lock().unwrap().retry(batch, Instant::now());
                    if !retry {
                        for w in waiting.drain(..) {
                            let _ = w.send(Err(e.to_string()));
                        }
                    }
                    continue;
                }
            };
            match result {
                // Torn: keep its listing as the base of the next rescan
                // (every directory it may have misread is marked dirty).
                Err(out) => {
                    let mut d = hints.debouncer.lock().unwrap();
                    for dir in &out.new_dirs {
                        d.mark(dir.clone(), Instant::now());
                    }
                    drop(d);
                    last = prev;
                }
                Ok(out) => {
                    let root = out.manifest.snapshot();
                    let changed = prev.as_ref().map(|p| p.manifest.snapshot()) != Some(root);
                    tracing::info!(
                        root = %root.short(),
                        changed,
                        dirs = out.dirs_listed,
                        hashed = out.files_hashed,
                        ms,
                        "scanned"
                    );
                    {
                        let mut s = status.lock().unwrap();
                        s.scans += 1;
                        s.last_scan_ms = ms;
                        s.last_scan_error = None;
                        s.watcher_degraded = hints.degraded();
                        if changed {
                            s.root = Some(root.to_hex());
                            s.snapshot_unix = unix(SystemTime::now());
                        }
                    }
                    if changed {
                        let snap = Snapshot::new(out.manifest.clone());
                        let _ = snap_tx.send(Some(Arc::new(snap)));
                    }
                    for w in waiting.drain(..) {
                        let _ = w.send(Ok(root));
                    }
                    if !out.new_dirs.is_empty() {
                        // Entries written before inotify watched a new
                        // directory raised no event: list it once more.
                        let mut d = hints.debouncer.lock().unwrap();
                        for dir in &out.new_dirs {
                            d.mark(dir.clone(), Instant::now());
                        }
                    }
                    last = Some(out);
                }
            }
            continue;
        }
        let deadline = hints
            .debouncer
            .lock()
            .unwrap()
            .deadline()
            .unwrap_or(next_full)
            .min(next_full);
        tokio::select! {
            _ = hints.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
            req = publish_now.recv() => {
                if let Some(req) = req { waiting.push(req); }
            }
            _ = shutdown.changed() => break,
        }
    }
    for p in peers {
        let _ = p.await;
    }
    Ok(())
}

/// Name the tree and list its peers in status before anything runs.
fn init_status(
    status: &SharedStatus,
    name: &str,
    root: &std::path::Path,
    role: &'static str,
    downstream: &[Downstream],
) {
    let mut s = status.lock().unwrap();
    s.name = name.to_string();
    s.path = root.display().to_string();
    s.role = role;
    s.peers = downstream
        .iter()
        .map(|d| PeerStatus {
            url: format!("quic://{}:{}/{}", d.url.host, d.url.port, d.url.tree),
            ..Default::default()
        })
        .collect();
}

/// One task per downstream peer, each at its own pace.
fn spawn_peers(
    downstream: &[Downstream],
    pusher: &Pusher,
    status: &SharedStatus,
    snaps: &watch::Receiver<Option<Arc<Snapshot>>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    downstream
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let url = format!("quic://{}:{}/{}", d.url.host, d.url.port, d.url.tree);
            let task = peer_loop(
                i,
                d.clone(),
                pusher.clone(),
                status.clone(),
                snaps.clone(),
                shutdown.clone(),
            );
            tokio::spawn(tracing::Instrument::instrument(
                task,
                tracing::info_span!("peer", %url),
            ))
        })
        .collect()
}

/// A sink tree that relays: where its commits are found, and where they go.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The tree's name in status output.
    pub name: String,
    /// The sink tree (chunks are read from its committed files).
    pub root: PathBuf,
    /// Its state directory, whose `manifest` each commit replaces.
    pub state: PathBuf,
    pub downstream: Vec<Downstream>,
    pub bandwidth_limit: Option<u64>,
}

/// How often a relay looks at its tree's committed root without a hint.
const RELAY_POLL: Duration = Duration::from_secs(1);

/// Relay until `shutdown` turns true: each snapshot the sink tree commits
/// (found from an inotify hint on its state directory, or a poll) is pushed
/// on to every downstream peer, with the same root; nothing before it is
/// committed, and never an empty tree because nothing was committed yet.
pub async fn run_relay(
    cfg: RelayConfig,
    identity: Arc<Identity>,
    status: SharedStatus,
    mut publish_now: tokio::sync::mpsc::Receiver<PublishRequest>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    init_status(&status, &cfg.name, &cfg.root, "relay", &cfg.downstream);
    std::fs::create_dir_all(&cfg.state)?;
    let hints = Hints::new(
        cfg.state.clone(),
        Debouncer::new(Duration::from_millis(5), Duration::from_millis(50)),
    );
    let watch_dir = hints.clone();
    let _watch = tokio::task::spawn_blocking(move || Watch::start(watch_dir)).await?;
    let (snap_tx, snap_rx) = watch::channel::<Option<Arc<Snapshot>>>(None);
    let pusher = Pusher {
        root: cfg.root.clone(),
        identity,
        limit: cfg.bandwidth_limit.map(|r| Arc::new(RateLimit::new(r))),
    };
    let peers = spawn_peers(&cfg.downstream, &pusher, &status, &snap_rx, &shutdown);
    let mut last: Option<sync_core::hash::TreeId> = None;
    let mut waiting: Vec<PublishRequest> = Vec::new();
    loop {
        let _ = hints
            .debouncer
            .lock()
            .unwrap()
            .poll(Instant::now() + RELAY_POLL);
        let state = cfg.state.clone();
        let seen = last;
        let found = tokio::task::spawn_blocking(move || {
            // A commit under way, or nothing committed yet: nothing to relay.
            let root = sync_core::state::peek_committed_root(&state)?;
            if Some(root) == seen {
                return Some(Ok(None));
            }
            Some(
                sync_core::state::peek_manifest(&state)
                    .map(|m| Some(m).filter(|m| m.root() == root)),
            )
        })
        .await?;
        match found {
            Some(Ok(Some(m))) => {
                let root = m.snapshot();
                last = Some(m.root());
                tracing::info!(root = %root.short(), "relaying a committed snapshot");
                {
                    let mut s = status.lock().unwrap();
                    s.scans += 1;
                    s.last_scan_error = None;
                    s.root = Some(root.to_hex());
                    s.snapshot_unix = unix(SystemTime::now());
                }
                let _ = snap_tx.send(Some(Arc::new(Snapshot::new(m))));
            }
            Some(Err(e)) => {
                tracing::warn!("cannot read the committed manifest: {e}");
                status.lock().unwrap().last_scan_error = Some(e.to_string());
            }
            Some(Ok(None)) | None => {}
        }
        if let Some(root) = snap_tx.borrow().as_ref().map(|s| s.root()) {
            for w in waiting.drain(..) {
                let _ = w.send(Ok(root));
            }
        }
        tokio::select! {
            _ = hints.wake.notified() => {}
            _ = tokio::time::sleep(RELAY_POLL) => {}
            req = publish_now.recv() => {
                if let Some(req) = req { waiting.push(req); }
            }
            _ = shutdown.changed() => break,
        }
    }
    for w in waiting {
        let _ = w.send(Err("the relay is shutting down".into()));
    }
    for p in peers {
        let _ = p.await;
    }
    Ok(())
}

/// Keep one peer at the latest snapshot.
async fn peer_loop(
    index: usize,
    d: Downstream,
    pusher: Pusher,
    status: SharedStatus,
    mut snaps: watch::Receiver<Option<Arc<Snapshot>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut committed: Option<SnapshotId> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let snap = snaps.borrow_and_update().clone();
        let Some(snap) = snap.filter(|s| Some(s.root()) != committed) else {
            tokio::select! {
                r = snaps.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let started = SystemTime::now();
        let result = push_once(&d, &pusher, &snap, shutdown.clone()).await;
        let failed = {
            let mut s = status.lock().unwrap();
            let ps = &mut s.peers[index];
            match result {
                Ok(o) => {
                    backoff.reset();
                    committed = Some(snap.root());
                    ps.committed_root = Some(snap.root().to_hex());
                    ps.committed_snapshot_taken = Some(snap.taken);
                    ps.last_error = None;
                    ps.last_sync_unix = unix(started);
                    ps.syncs += 1;
                    ps.bytes_sent += o.bytes;
                    ps.chunks_sent += o.chunks;
                    ps.wire_bytes_sent += o.wire;
                    tracing::info!(root = %snap.root().short(), bytes = o.bytes, "peer committed");
                    None
                }
                Err(e) => {
                    ps.failures += 1;
                    ps.last_error = Some(e.clone());
                    Some(e)
                }
            }
        };
        if let Some(e) = failed {
            let wait = backoff.next();
            tracing::warn!("push failed, retrying in {:.1} s: {e}", wait.as_secs_f64());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

struct Pushed {
    bytes: u64,
    chunks: u64,
    wire: u64,
}

/// What every push of one tree shares.
#[derive(Clone)]
struct Pusher {
    root: PathBuf,
    identity: Arc<Identity>,
    /// The tree's bandwidth limit, shared by all its peers.
    limit: Option<Arc<RateLimit>>,
}

async fn push_once(
    d: &Downstream,
    pusher: &Pusher,
    snap: &Snapshot,
    shutdown: watch::Receiver<bool>,
) -> Result<Pushed, String> {
    let addr: SocketAddr = d.url.resolve().map_err(|e| e.to_string())?;
    let opts = DriveOptions {
        shutdown: Some(shutdown),
        rate_limit: pusher.limit.clone(),
        ..Default::default()
    };
    let out = client::push(
        addr,
        &d.url.tree,
        &pusher.identity,
        d.peer,
        snap.locator.clone(),
        &pusher.root,
        opts,
    )
    .await
    .map_err(|e| e.to_string())?;
    match out.result {
        Ok(sum) => Ok(Pushed {
            bytes: sum.bytes_sent,
            chunks: sum.chunks_sent,
            wire: out.wire_tx,
        }),
        Err(e) => Err(e.to_string()),
    }
}

/// Capped exponential backoff with jitter (so that many sources reconnecting
/// to one mirror after an outage do not arrive in lockstep).
struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
    seed: u64,
}

impl Backoff {
    fn new(base: Duration, cap: Duration) -> Backoff {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Backoff {
            base,
            cap,
            next: base,
            seed,
        }
    }

    fn reset(&mut self) {
        self.next = self.base;
    }

    fn next(&mut self) -> Duration {
        // xorshift: jitter needs no cryptographic quality.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        // Between half and all of the current step.
        d / 2 + Duration::from_nanos(self.seed % (d.as_nanos() as u64 / 2 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..10).map(|_| b.next()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(2)));
        assert!(waits[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
