//! The receiver's commit engine: turn the committed tree into a new
//! snapshot so that no reader ever sees a half-arrived repository.
//!
//! A commit runs in this order:
//! 1. every new or changed file is assembled from verified chunks in the
//!    state directory's `tmp/` (same filesystem as the tree), with its mode,
//!    mtime and (optionally) owner (symlinks are made at step 4, from the
//!    manifest). A *fresh subtree* (a new directory whose parent was there
//!    already, such as a new repository) is built whole in `tmp/t/` at its
//!    path in the tree: its directories, files, the symlinks that point
//!    only inside it and its directories' metadata (see
//!    [`crate::plan::Fresh`]);
//! 2. the new snapshot's tree objects are appended to the state's tree
//!    log, and one flush makes them durable with every temporary (instead
//!    of one fsync per file: thousands of small files cost one flush). See
//!    [`crate::flush`]: a `syncfs`, or on ext4 with a journal each
//!    temporary's data written out and one journal commit;
//! 3. the journal (old and new root, plan digest, log length) is written in
//!    place and `fdatasync`: from here on the commit rolls forward after a
//!    crash;
//! 4. the tree is changed: directories (a fresh subtree appears complete,
//!    by one rename of its root), then files renamed into place,
//!    metadata and hard links, then symlinks (created at a free path,
//!    else built in `tmp/` and renamed over the old entry), then deletions, then
//!    directory modes and mtimes, deepest first;
//! 5. [`Receiver::settle`]: a flush, the head naming the new snapshot is
//!    stored, staging and scratch cleared. A receiver may answer its
//!    sender before this step ([`Receiver::settle_later`]): the journal
//!    already decides the commit.
//!
//! Every step of 4 is idempotent (a temp that is gone was renamed), so a
//! crash at any instant is finished by [`Receiver::open`]; a crash before 3
//! leaves the tree untouched. All writes go through [`crate::safefs`]:
//! beneath the root, never through a symlink. Blocking IO.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;
use rustix::fs::{
    linkat, mkdirat, openat, renameat, renameat_with, symlinkat, unlinkat, utimensat, AtFlags,
    FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps,
};
use rustix::fs::{Gid, Uid};
use rustix::io::Errno;

use crate::chunk::{chunk_spans, ChunkBytes};
use crate::crashpoint::{self, hit};
use crate::flush::{self, Flush};
use crate::hash::{ChunkId, FileHash, SnapshotId, TreeId};
use crate::manifest::{lossy, Entry, Kind, Manifest, ManifestError};
use crate::plan::{NodeKind, Op, Place, PlanError, SyncPlan};
use crate::safefs::{self, kind_of, lstat_at, Root, SafeFsError};
use crate::session::ChunkLocator;
use crate::state::{default_state_dir, unfinished_journal, Head, Journal, StateDir, StateError};
use crate::store::{ChunkSource, Sources, Staging, StoreError, TreeChunks};
use crate::verify::{verify, VerifyError, VerifyOptions, VerifyReport};

/// Bytes a tree log may grow past twice its size after the last rewrite
/// before it is rewritten (small logs are not worth it).
const COMPACT_SLACK: u64 = if cfg!(test) { 0 } else { 8 << 20 };

/// Why a commit (or opening the receiver) failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fs(#[from] SafeFsError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("chunk {id} for {path} is neither staged nor found intact in the tree")]
    MissingChunk { id: ChunkId, path: String },
    #[error("assembled {path} does not match its hash (a chunk or the manifest is wrong)")]
    ContentMismatch { path: String },
    #[error("plan starts at {plan}, but the committed snapshot is {committed}; plan again")]
    StalePlan {
        plan: SnapshotId,
        committed: SnapshotId,
    },
    #[error("plan does not lead to the snapshot {0} being committed")]
    PlanMismatch(SnapshotId),
    #[error("not enough space for {path}: {need} bytes to write, {avail} available")]
    NoSpace { path: String, need: u64, avail: u64 },
    #[error("{path} on disk is {found}, where the commit needs {want}")]
    Unexpected {
        path: String,
        found: String,
        want: &'static str,
    },
    #[error("journal in {state} is for snapshot {journal_from}, but {committed} is committed")]
    JournalMismatch {
        state: PathBuf,
        journal_from: SnapshotId,
        committed: SnapshotId,
    },
}

fn io_err<'p>(op: &'static str, path: &'p [u8]) -> impl FnOnce(Errno) -> CommitError + 'p {
    move |e| CommitError::Io {
        op,
        path: lossy(path),
        source: e.into(),
    }
}

/// Options of one commit.
#[derive(Clone, Debug, Default)]
pub struct CommitOptions {
    /// Apply uid/gid from the manifest (only when running as root).
    pub owners: bool,
}

/// What a commit did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommitSummary {
    pub root: Option<SnapshotId>,
    pub files_written: u64,
    pub bytes_written: u64,
    pub dirs_created: u64,
    pub hardlinks: u64,
    pub symlinks: u64,
    pub metadata: u64,
    pub deleted: u64,
    /// The commit finished one that a crash had interrupted.
    pub rolled_forward: bool,
}

/// The receiving end of a tree: its root, state directory (locked),
/// staging area and committed manifest.
pub struct Receiver {
    root: Arc<Root>,
    state: StateDir,
    staging: Staging,
    committed: Manifest,
    /// Where `committed` is stored; `None` before the first commit.
    head: Option<Head>,
    tree: OnceLock<TreeChunks>,
    /// Set after a roll-forward done by `open`.
    recovered: Option<CommitSummary>,
    /// Where the committed manifest and chunk index go when this closes.
    cache: Option<Arc<ReceiverCache>>,
    /// (from, to, digest) of the last plan [`Receiver::plan`] made: a commit
    /// of that very plan need not build it again to check it.
    planned: Mutex<Option<(SnapshotId, SnapshotId, [u8; 32])>>,
    /// Temporaries built while the chunks of an expected snapshot arrive.
    prebuild: Option<Prebuild>,
    /// The last commit changed the tree; its head is not stored yet (see
    /// [`Receiver::settle`]).
    unsettled: bool,
    /// Commits leave [`Receiver::settle`] to the caller.
    settle_later: bool,
    /// The snapshot the chunk index describes, when a commit has not
    /// updated it yet (see [`Receiver::settle`]).
    index_from: Option<Manifest>,
    /// How commits make their writes durable (see [`crate::flush`]).
    flush: Flush,
}

/// What [`Receiver::expect`] planned: the plan (taken for the commit),
/// and the builder of its files' temporaries.
struct Prebuild {
    /// Handed out once, by [`Receiver::expected_plan`].
    handed: bool,
    builder: Arc<Prebuilder>,
}

/// What planning a commit ahead needs, handed out by
/// [`Receiver::plan_ahead`]: planning runs without the receiver.
pub struct PlanAhead {
    committed: Manifest,
    state: PathBuf,
    owners: bool,
}

/// A plan made ahead, for [`Receiver::expect_planned`].
pub struct Planned {
    plan: SyncPlan,
    scratch: Scratch,
    owners: bool,
}

impl PlanAhead {
    /// Plan the commit of `new` and build the skeleton of its fresh
    /// subtrees in the scratch space [`Receiver::plan_ahead`] cleared.
    pub fn plan(self, new: &Manifest) -> Result<Planned, CommitError> {
        self.plan_from(new, None)
    }

    /// [`PlanAhead::plan`] from the changes a sink session found
    /// ([`crate::session::SinkSession::take_changes`]): used if they lead
    /// from the snapshot committed here, else the snapshots are diffed.
    pub fn plan_from(
        self,
        new: &Manifest,
        changes: Option<(SnapshotId, Vec<crate::diff::Change>)>,
    ) -> Result<Planned, CommitError> {
        let t = std::time::Instant::now();
        // Which chunks are missing is filled in by `expect_planned`.
        // Its digest is left to the builder (see `Prebuilder::digest`):
        // files are built as soon as the plan says where they go.
        let from = self.committed.snapshot();
        let given = changes.filter(|(base, _)| *base == from);
        let diffed = given.is_none();
        let plan = match given {
            Some((_, changes)) => SyncPlan::build_from(&self.committed, new, changes, |_| false)?,
            None => SyncPlan::build(&self.committed, new, |_| false)?,
        };
        let planned = t.elapsed();
        let scratch = Scratch::open(&self.state, &plan)?;
        if let Some(inner) = scratch.in_fresh(self.owners) {
            build_skeleton(&inner, &plan)?;
        }
        tracing::debug!(
            plan_ms = planned.as_millis() as u64,
            ms = t.elapsed().as_millis() as u64,
            diffed,
            "planned ahead"
        );
        Ok(Planned {
            plan,
            scratch,
            owners: self.owners,
        })
    }
}

/// Builds the temporaries of an expected plan's files as soon as their
/// content arrives, on the caller's thread and without the receiver: a
/// driver runs it beside the staging of the same chunks. Only files that
/// are exactly one chunk are built here; the commit builds the rest, and
/// closes the builder first (waiting for a batch in progress).
pub struct Prebuilder {
    /// Where the temporaries go; its `tmp/t` holds the skeleton of the
    /// plan's fresh subtrees.
    scratch: Scratch,
    owners: bool,
    plan: Arc<SyncPlan>,
    state: Mutex<PrebuildState>,
    /// Staging's directory of chunks that are whole files (see
    /// [`Staging::put_linked`]), if it could be opened.
    link_dir: Option<OwnedFd>,
    /// The plan's digest, once [`Prebuilder::digest`] computed it.
    digest: OnceLock<[u8; 32]>,
    /// How many of the plan's symlinks [`Prebuilder::link`] has been
    /// through (held while it runs).
    linked: Mutex<usize>,
    /// Set by [`Prebuilder::close`]: stop linking.
    stop: std::sync::atomic::AtomicBool,
}

/// What a [`Prebuilder`] made before the commit closed it.
struct Prebuilt {
    /// Indexes of the files whose temporaries are built.
    files: HashSet<usize>,
    /// The plan's symlinks below this index that lead only inside a fresh
    /// subtree are made there.
    linked: usize,
}

#[derive(Default)]
struct PrebuildState {
    /// Files that are one chunk, by that chunk.
    waiting: std::collections::HashMap<ChunkId, Vec<usize>>,
    /// Indexes (in the plan's files) of the temporaries built.
    built: HashSet<usize>,
    closed: bool,
}

impl Prebuilder {
    /// The digest of the plan (see [`SyncPlan::digest`]), computed once:
    /// the commit needs it, and a driver may compute it on a spare thread
    /// before (the linking job does).
    pub fn digest(&self) -> [u8; 32] {
        *self.digest.get_or_init(|| self.plan.digest())
    }

    /// Build the temporaries of the expected files that are exactly one of
    /// `chunks` (each already checked against its id). A temporary that
    /// fails is removed and left to the commit. Returns the chunks of at
    /// least [`LINK_MIN`] bytes whose temporary was also hard-linked into
    /// staging (for [`Receiver::stage_linked`]: staged without a second
    /// write of their bytes), when `link` (chunks not staged yet).
    pub fn build(&self, chunks: &[(ChunkId, ChunkBytes)], link: bool) -> Vec<ChunkId> {
        let mut linked = Vec::new();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            return linked;
        }
        for (id, data) in chunks {
            let Some(files) = st.waiting.remove(id) else {
                continue;
            };
            let mut last = None;
            let mut link = self
                .link_dir
                .as_ref()
                .filter(|_| link && data.len() >= LINK_MIN)
                .map(|d| (d.as_fd(), Staging::linked_name(id)));
            for i in files {
                let one = OneChunk(*id, data);
                // Read back by a later commit if need be: only a file its
                // owner may read is shared with staging.
                let readable = self.owners || self.plan.files[i].entry.mode & 0o400 != 0;
                let to = link
                    .as_ref()
                    .filter(|_| readable)
                    .map(|(d, n)| (*d, n.as_str()));
                match build_temp(
                    self.scratch.tmp.as_fd(),
                    self.scratch.fresh.as_ref(),
                    &self.plan,
                    i,
                    &one,
                    self.owners,
                    &mut last,
                    to,
                ) {
                    Ok(true) => {
                        st.built.insert(i);
                        linked.push(*id);
                        link = None;
                    }
                    Ok(false) => {
                        st.built.insert(i);
                    }
                    Err(e) => tracing::debug!("temporary left to the commit: {e}"),
                }
            }
        }
        linked
    }

    /// The chunks whose files still wait for their temporary (those staged
    /// before this builder existed are read back for it by a driver: see
    /// [`Receiver::read_staged`]).
    pub fn waiting(&self) -> Vec<ChunkId> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting.keys().copied().collect()
    }

    /// Make the symlinks that lead only inside the plan's fresh subtrees
    /// (their skeleton is built; they need no chunk), in the plan's order,
    /// until all are made or the builder is closed. Meant to run beside
    /// the transfer; one that fails is left to the commit.
    pub fn link(&self) {
        let Some(inner) = self.scratch.in_fresh(self.owners) else {
            return;
        };
        let mut linked = self.linked.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = None;
        for (i, op) in self.plan.symlinks.iter().enumerate().skip(*linked) {
            if i % 256 == 0 && self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            if self.plan.fresh.symlink(i) {
                if let Err(e) = inner.symlink(i, op, &mut last) {
                    tracing::debug!("symlinks left to the commit: {e}");
                    return;
                }
            }
            *linked = i + 1;
        }
    }

    /// Whether the commit has taken over (nothing more is built here).
    pub fn is_closed(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop building (waiting for a batch or a run of links in progress);
    /// what was made so far.
    fn close(&self) -> Prebuilt {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let linked = *self.linked.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.closed = true;
        Prebuilt {
            files: std::mem::take(&mut st.built),
            linked,
        }
    }
}

/// One chunk in memory, as a [`ChunkSource`].
struct OneChunk<'a>(ChunkId, &'a ChunkBytes);

impl ChunkSource for OneChunk<'_> {
    fn have(&self, id: &ChunkId) -> bool {
        *id == self.0
    }
    fn read(&self, id: &ChunkId) -> Option<Cow<'_, [u8]>> {
        (*id == self.0).then(|| self.1.contiguous())
    }
    fn read_parts(&self, id: &ChunkId) -> Option<Vec<Cow<'_, [u8]>>> {
        (*id == self.0).then(|| self.1.parts().map(Cow::Borrowed).collect())
    }
}

/// What a long-running agent keeps of a tree between its sessions: the
/// committed manifest and its chunk index, so that opening the tree again
/// costs no more than reading its head. They are used only while the head
/// on disk is still the one they belong to (no other process committed,
/// no commit is pending).
#[derive(Default)]
pub struct ReceiverCache(Mutex<Option<Cached>>);

struct Cached {
    head: Head,
    committed: Manifest,
    index: Option<ChunkLocator>,
}

impl std::fmt::Debug for ReceiverCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map(|c| c.as_ref().map(|c| c.head.root));
        f.debug_tuple("ReceiverCache").field(&held).finish()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            // The journal finishes the commit when this state is opened.
            tracing::warn!("finishing the last commit failed: {e}");
            self.head = None;
        }
        // Still under the state directory's lock: nobody commits meanwhile.
        let (Some(cache), Some(head)) = (&self.cache, self.head) else {
            return;
        };
        let index = self.tree.take().map(TreeChunks::into_index);
        let committed = std::mem::take(&mut self.committed);
        if let Ok(mut c) = cache.0.lock() {
            *c = Some(Cached {
                head,
                committed,
                index,
            });
        }
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("root", &self.root.path())
            .field("state", &self.state.path())
            .field("committed", &self.committed.snapshot())
            .finish()
    }
}

impl Receiver {
    /// Open the tree `dest` (created if missing, its parent must exist),
    /// lock its state directory (`state` or the default sibling) and roll
    /// forward any interrupted commit.
    pub fn open(dest: &Path, state: Option<&Path>) -> Result<Receiver, CommitError> {
        Self::open_with(dest, state, None)
    }

    /// Like [`Receiver::open`], taking the committed manifest from `cache`
    /// when it still matches the state directory, and leaving it there
    /// when this receiver is dropped.
    pub fn open_cached(
        dest: &Path,
        state: Option<&Path>,
        cache: &Arc<ReceiverCache>,
    ) -> Result<Receiver, CommitError> {
        Self::open_with(dest, state, Some(cache))
    }

    fn open_with(
        dest: &Path,
        state: Option<&Path>,
        cache: Option<&Arc<ReceiverCache>>,
    ) -> Result<Receiver, CommitError> {
        match std::fs::create_dir(dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CommitError::Io {
                    op: "create",
                    path: dest.display().to_string(),
                    source,
                })
            }
        }
        let dest = dest.canonicalize().map_err(|source| CommitError::Io {
            op: "resolve",
            path: dest.display().to_string(),
            source,
        })?;
        let state_path = match state {
            Some(s) => s.to_path_buf(),
            None => default_state_dir(&dest)?,
        };
        let state = StateDir::open(&state_path, &dest)?;
        let root = Arc::new(Root::open(&dest)?);
        let staging = Staging::open(&state.staging_dir())?;
        let cached = cache.and_then(|c| c.0.lock().ok()?.take());
        let now = state.head()?;
        let pending = unfinished_journal(state.path(), now.as_ref())?.is_some();
        let tree = OnceLock::new();
        let (committed, head) = match cached {
            Some(c) if !pending && Some(c.head) == now => {
                if let Some(index) = c.index {
                    let _ = tree.set(TreeChunks::from_index(root.clone(), index));
                }
                (c.committed, Some(c.head))
            }
            _ => state.load_committed(now)?,
        };
        let flush = {
            let state_dir = state.open_dir()?;
            let tmp = open_state_dir(state.path(), "tmp")?;
            Flush::for_fds(&[root.fd(), state_dir.as_fd(), tmp.as_fd()])
        };
        tracing::debug!(?flush, "durability");
        let mut r = Receiver {
            root,
            state,
            staging,
            committed,
            head,
            tree,
            recovered: None,
            cache: cache.cloned(),
            planned: Mutex::new(None),
            prebuild: None,
            unsettled: false,
            settle_later: false,
            index_from: None,
            flush,
        };
        r.recovered = r.recover()?;
        if r.recovered.is_none() {
            r.clean_scratch()?;
        }
        r.state.remove_other_logs(r.head.as_ref())?;
        Ok(r)
    }

    /// The snapshot the tree holds.
    pub fn committed(&self) -> &Manifest {
        &self.committed
    }

    /// The tree root path (canonical).
    pub fn dest(&self) -> &Path {
        self.root.path()
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// The summary of a commit that `open` rolled forward, if any.
    pub fn recovered(&self) -> Option<&CommitSummary> {
        self.recovered.as_ref()
    }

    fn tree_chunks(&self) -> &TreeChunks {
        self.tree.get_or_init(|| {
            TreeChunks::build(self.root.clone(), &self.committed).unwrap_or_else(|e| {
                tracing::warn!("chunk index of the committed tree unavailable: {e}");
                TreeChunks::build(self.root.clone(), &Manifest::empty())
                    .expect("an empty manifest walks")
            })
        })
    }

    /// Where the next tree objects go: the log and its committed length
    /// (the first log, empty, before the first commit).
    fn log_end(&self) -> (u64, u64) {
        self.head.map_or((1, 0), |h| (h.gen, h.len))
    }

    /// The head of the snapshot `root` whose trees end at `len` of log `gen`.
    fn next_head(&self, root: TreeId, gen: u64, len: u64) -> Head {
        Head {
            root,
            gen,
            len,
            base: self.head.map_or(len, |h| h.base),
        }
    }

    /// Build the committed tree's chunk index now rather than at the first
    /// [`Receiver::have`] (which a session's latency would pay).
    pub fn index_tree(&self) {
        self.tree_chunks();
    }

    /// Whether a chunk is staged or (per the index, unverified) in the tree.
    pub fn have(&self, id: &ChunkId) -> bool {
        self.staging.contains(id) || self.tree_chunks().contains(id)
    }

    /// The plan from the committed snapshot to `new`.
    pub fn plan(&self, new: &Manifest) -> Result<SyncPlan, CommitError> {
        Ok(self.plan_and_digest(new)?.0)
    }

    /// A plan and its digest, remembered so that its commit need not
    /// rebuild it to check it.
    fn plan_and_digest(&self, new: &Manifest) -> Result<(SyncPlan, [u8; 32]), CommitError> {
        let plan = SyncPlan::build(&self.committed, new, |id| self.have(id))?;
        let digest = plan.digest();
        *self.planned.lock().unwrap() = Some((plan.from, plan.to, digest));
        Ok((plan, digest))
    }

    /// Get ready for a commit of `new` whose chunks are about to arrive:
    /// plan it now, and return a [`Prebuilder`] that builds the temporary
    /// of each file that is a single chunk as soon as it is handed that
    /// chunk, while the rest is still in flight. Nothing in the tree
    /// changes; a session that ends without committing leaves only scratch
    /// files, cleared on the next open. `None` while a journaled commit
    /// waits to be finished.
    pub fn expect(
        &mut self,
        new: &Manifest,
        opts: &CommitOptions,
    ) -> Result<Option<Arc<Prebuilder>>, CommitError> {
        let Some(ahead) = self.plan_ahead(opts)? else {
            return Ok(None);
        };
        let ready = ahead.plan(new)?;
        Ok(self.expect_planned(ready))
    }

    /// [`Receiver::expect`] in three steps, so that a driver holds the
    /// receiver only for the short first and last: this one clears the
    /// scratch space and hands out what planning needs; the plan (the long
    /// step: a diff of both snapshots, a skeleton of new directories) is
    /// made by [`PlanAhead::plan`] meanwhile chunks are staged, and
    /// [`Receiver::expect_planned`] takes it. `None` while a journaled
    /// commit waits to be finished.
    pub fn plan_ahead(&mut self, opts: &CommitOptions) -> Result<Option<PlanAhead>, CommitError> {
        self.settle()?;
        if let Some(p) = self.prebuild.take() {
            p.builder.close();
        }
        if self.unfinished_journal()?.is_some() {
            return Ok(None);
        }
        self.clean_scratch()?;
        Ok(Some(PlanAhead {
            committed: self.committed.clone(),
            state: self.state.path().to_path_buf(),
            owners: opts.owners && rustix::process::geteuid().is_root(),
        }))
    }

    /// Take the plan [`PlanAhead::plan`] made, and return the builder of
    /// its temporaries; `None` if the committed snapshot moved meanwhile
    /// (the commit then plans anew).
    pub fn expect_planned(&mut self, ready: Planned) -> Option<Arc<Prebuilder>> {
        let Planned {
            mut plan,
            scratch,
            owners,
        } = ready;
        if plan.from != self.committed.snapshot() || self.prebuild.is_some() {
            return None;
        }
        plan.missing = plan
            .chunks
            .iter()
            .copied()
            .filter(|(id, _)| !self.have(id))
            .collect();
        let mut state = PrebuildState::default();
        for (i, op) in plan.files.iter().enumerate() {
            if let Kind::File { size, hash, chunks } = &op.entry.kind {
                if *size > 0 && chunks.is_empty() {
                    state
                        .waiting
                        .entry(ChunkId::from(*hash))
                        .or_default()
                        .push(i);
                }
            }
        }
        let link_dir = openat(
            rustix::fs::CWD,
            self.staging.linked_dir(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok();
        let builder = Arc::new(Prebuilder {
            scratch,
            owners,
            link_dir,
            state: Mutex::new(state),
            plan: Arc::new(plan),
            digest: OnceLock::new(),
            linked: Mutex::new(0),
            stop: Default::default(),
        });
        self.prebuild = Some(Prebuild {
            handed: false,
            builder: builder.clone(),
        });
        Some(builder)
    }

    /// The plan made by [`Receiver::expect`], if `new` is what was
    /// expected (the commit then need not plan again).
    pub fn expected_plan(&mut self, new: &Manifest) -> Option<Arc<SyncPlan>> {
        let p = self.prebuild.as_mut().filter(|p| !p.handed)?;
        p.handed = true;
        let plan = &p.builder.plan;
        (plan.from == self.committed.snapshot() && plan.to == new.snapshot()).then(|| plan.clone())
    }

    /// The chunks of `plan` still to fetch: neither staged nor in the tree.
    pub fn missing_chunks(&self, plan: &SyncPlan) -> Vec<(ChunkId, u32)> {
        plan.chunks
            .iter()
            .copied()
            .filter(|(id, _)| !self.have(id))
            .collect()
    }

    /// The staged ones of `ids`, taken off the end of `ids` until about
    /// `max_bytes` are read (the rest of `ids` stays).
    pub fn read_staged(
        &self,
        ids: &mut Vec<ChunkId>,
        max_bytes: usize,
    ) -> Vec<(ChunkId, ChunkBytes)> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while bytes < max_bytes {
            let Some(id) = ids.pop() else { break };
            if let Some(data) = self.staging.get(&id) {
                bytes += data.len();
                out.push((id, data.into()));
            }
        }
        out
    }

    /// Verify and stage one received chunk (durable after [`Receiver::sync_staging`]
    /// or once enough bytes have accumulated).
    pub fn stage(&mut self, id: ChunkId, data: &[u8]) -> Result<(), CommitError> {
        self.settle()?;
        self.staging.put(id, data)?;
        hit("staged-chunk");
        Ok(())
    }

    /// Stage a chunk whose hash the caller has just checked (see
    /// [`Staging::put_checked`]).
    pub fn stage_checked(&mut self, id: ChunkId, data: &ChunkBytes) -> Result<(), CommitError> {
        self.settle()?;
        self.staging.put_checked_parts(id, data)?;
        hit("staged-chunk");
        Ok(())
    }

    /// Stage a chunk that a [`Prebuilder::build`] linked into staging (see
    /// [`Staging::put_linked`]).
    pub fn stage_linked(&mut self, id: ChunkId, len: u32) -> Result<(), CommitError> {
        self.settle()?;
        self.staging.put_linked(id, len)?;
        hit("staged-chunk");
        Ok(())
    }

    /// Make every staged chunk durable (fsync).
    pub fn sync_staging(&mut self) -> Result<(), CommitError> {
        Ok(self.staging.sync()?)
    }

    /// Make every staged chunk survive this process (not a power loss)
    /// without waiting for the disk: what a receiver does before it
    /// acknowledges chunks, so a restarted one resumes where it stopped.
    /// Data bound for the tree is made durable by the commit instead, and
    /// the pack is dropped before that flush so its bytes are never
    /// written to disk twice.
    pub fn persist_staging(&mut self) -> Result<(), CommitError> {
        Ok(self.staging.persist()?)
    }

    /// Commit `new` by `plan` (from [`Receiver::plan`]) with chunks from
    /// staging and the committed tree.
    pub fn commit(
        &mut self,
        new: &Manifest,
        plan: &SyncPlan,
        opts: &CommitOptions,
    ) -> Result<CommitSummary, CommitError> {
        self.commit_with(new, plan, opts, None)
    }

    /// Like [`Receiver::commit`], also reading chunks from `extra` (e.g. the
    /// source tree of a local push, so its bytes are not copied twice).
    pub fn commit_with(
        &mut self,
        new: &Manifest,
        plan: &SyncPlan,
        opts: &CommitOptions,
        extra: Option<&dyn ChunkSource>,
    ) -> Result<CommitSummary, CommitError> {
        self.settle()?;
        self.recover()?;
        if plan.from != self.committed.snapshot() {
            return Err(CommitError::StalePlan {
                plan: plan.from,
                committed: self.committed.snapshot(),
            });
        }
        // The plan must be the one recomputed on roll-forward: one that
        // `plan` made (and nobody changed since) is; any other is rebuilt.
        let t = std::time::Instant::now();
        // The very plan the builder holds (shared behind an `Arc`, so
        // unchanged) was made from the committed snapshot to `new`: its
        // digest is usually computed already (34 ms at 100k entries).
        let ahead = matches!(&self.prebuild,
            Some(p) if std::ptr::eq(plan, Arc::as_ptr(&p.builder.plan)));
        let digest = match &self.prebuild {
            Some(p) if ahead => p.builder.digest(),
            _ => plan.digest(),
        };
        let made = self.planned.lock().unwrap().take();
        if plan.to != new.snapshot()
            || (!ahead
                && made != Some((plan.from, plan.to, digest))
                && SyncPlan::build(&self.committed, new, |_| true)?.digest() != digest)
        {
            return Err(CommitError::PlanMismatch(new.snapshot()));
        }
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "plan checked");
        let owners = opts.owners && rustix::process::geteuid().is_root();
        let span = tracing::info_span!("commit", to = %new.snapshot().short());
        let _g = span.enter();

        self.staging.persist()?;
        // What the builder made while the chunks arrived (the skeleton and
        // some temporaries) is kept: scratch holds nothing else since
        // `expect` cleared it. Any other commit starts clean.
        let prebuilt = match self.prebuild.take() {
            Some(p) if p.builder.owners == owners && (ahead || p.builder.digest() == digest) => {
                Some(p.builder.close())
            }
            other => {
                if let Some(p) = other {
                    p.builder.close();
                }
                self.clean_scratch()?;
                None
            }
        };
        let scratch = self.scratch(plan)?;
        let started = std::time::Instant::now();
        let prepared = {
            let mut sources: Vec<&dyn ChunkSource> = vec![&self.staging, self.tree_chunks()];
            sources.extend(extra);
            let src = Sources(sources);
            let a = scratch.applier(&self.root, owners);
            prepare(&a, plan, &src, prebuilt.as_ref())
        };
        let (files_written, bytes_written) = match prepared {
            Ok(v) => v,
            Err(e) => {
                // Nothing in the tree was touched; drop the half-built temps.
                let _ = self.clean_scratch();
                if let CommitError::MissingChunk { id, .. } = &e {
                    if self.staging.contains(id) {
                        // Staged but damaged (a power loss before the disk
                        // had it): start afresh so the next sync asks again.
                        tracing::warn!(chunk = %id, "a staged chunk is damaged; dropping staging");
                        let _ = self.staging.clear();
                    }
                }
                return Err(e);
            }
        };
        // Every staged byte now sits in a temp file: drop the pack before
        // the flush, so its pages are discarded instead of written.
        let cleared = started.elapsed();
        self.staging.clear()?;
        let built = started.elapsed();

        // The new snapshot's tree objects that the log lacks: small,
        // whatever the tree's size. One sync of the filesystem makes them
        // durable with the temporaries (and the last commit's head); only
        // then is the journal naming them written, in place.
        let (gen, at) = self.log_end();
        let fresh = new
            .packed()
            .iter()
            .filter(|(id, _)| self.head.is_none() || !self.committed.contains_tree(id))
            .map(|(id, p)| (id, &p[..]));
        let len = self.state.write_trees(gen, at, fresh)?;
        let trees = started.elapsed();
        hit("trees-appended");
        hit("before-flush");
        let state_dir = self.state.open_dir()?;
        let journal = self.flush == Flush::Journal
            && write_out_temps(&scratch, plan)
                .inspect_err(|e| tracing::debug!("{e}: syncfs instead"))
                .is_ok();
        if journal {
            self.state.write_out_log(gen)?;
            flush::commit_journal(state_dir.as_fd()).map_err(io_err("commit the journal", b"."))?;
        } else {
            sync_filesystems(&[scratch.tmp.as_fd(), state_dir.as_fd()])?;
        }
        hit("after-flush");
        tracing::debug!(
            build_ms = cleared.as_millis() as u64,
            clear_ms = (built - cleared).as_millis() as u64,
            trees_ms = (trees - built).as_millis() as u64,
            sync_ms = (started.elapsed() - trees).as_millis() as u64,
            "temporaries built and durable"
        );
        self.state.write_journal(&Journal {
            from: plan.from,
            to: plan.to,
            plan_digest: digest,
            gen,
            len,
        })?;
        hit("journal-written");
        let head = self.next_head(new.root(), gen, len);
        let mut summary = self.apply_and_finish(plan, new.clone(), head, owners)?;
        summary.files_written = files_written;
        summary.bytes_written = bytes_written;
        Ok(summary)
    }

    /// Check the tree against the committed manifest.
    pub fn verify(&self, opts: &VerifyOptions) -> Result<VerifyReport, CommitError> {
        Ok(verify(&self.root, &self.committed, opts)?)
    }

    fn open_state_dir(&self, sub: &str) -> Result<OwnedFd, CommitError> {
        open_state_dir(self.state.path(), sub)
    }

    /// The scratch directories for `plan`.
    fn scratch(&self, plan: &SyncPlan) -> Result<Scratch, CommitError> {
        Scratch::open(self.state.path(), plan)
    }

    /// Empty `tmp/` and `trash/`.
    fn clean_scratch(&self) -> Result<(), CommitError> {
        for sub in ["tmp", "trash"] {
            let fd = self.open_state_dir(sub)?;
            safefs::clear_dir(&fd).map_err(io_err("clean", sub.as_bytes()))?;
        }
        Ok(())
    }

    /// The journal of a commit not finished yet (the last commit's own
    /// stays until the next one's replaces it).
    fn unfinished_journal(&self) -> Result<Option<Journal>, CommitError> {
        Ok(unfinished_journal(self.state.path(), self.head.as_ref())?)
    }

    /// Finish a journaled commit, if there is one.
    fn recover(&mut self) -> Result<Option<CommitSummary>, CommitError> {
        let Some(j) = self.unfinished_journal()? else {
            return Ok(None);
        };
        let span = tracing::info_span!("roll-forward", to = %j.to.short());
        let _g = span.enter();
        tracing::warn!("finishing an interrupted commit");
        if j.from != self.committed.snapshot() {
            return Err(CommitError::JournalMismatch {
                state: self.state.path().into(),
                journal_from: j.from,
                committed: self.committed.snapshot(),
            });
        }
        let (gen, at) = self.log_end();
        let damaged = |why: &str| StateError::Damaged {
            path: self.state.path().join("journal"),
            why: why.into(),
        };
        if j.gen != gen || j.len < at {
            return Err(damaged("it names tree objects the state directory does not hold").into());
        }
        let mut new = self.committed.clone();
        self.state.read_trees(gen, at, j.len, &mut new)?;
        new.set_root(j.to.into())?;
        let plan = SyncPlan::build(&self.committed, &new, |_| true)?;
        if plan.digest() != j.plan_digest {
            return Err(
                damaged("the plan recomputed from it differs from the one journaled").into(),
            );
        }
        let head = self.next_head(new.root(), gen, j.len);
        // Owners were applied to the temps already; later steps re-apply
        // them only when they are ours to set.
        let owners = rustix::process::geteuid().is_root();
        let mut s = self.apply_and_finish(&plan, new, head, owners)?;
        s.rolled_forward = true;
        Ok(Some(s))
    }

    fn apply_and_finish(
        &mut self,
        plan: &SyncPlan,
        new: Manifest,
        head: Head,
        owners: bool,
    ) -> Result<CommitSummary, CommitError> {
        let scratch = self.scratch(plan)?;
        let started = std::time::Instant::now();
        let mut summary = scratch.applier(&self.root, owners).apply(plan)?;
        summary.root = Some(plan.to);
        tracing::debug!(apply_ms = started.elapsed().as_millis() as u64, "applied");
        // The chunk index follows in `settle` (for a large commit, a tenth
        // of a second that the sender need not wait for).
        self.index_from = Some(std::mem::replace(&mut self.committed, new));
        self.head = Some(head);
        self.unsettled = true;
        if !self.settle_later {
            self.settle()?;
        }
        tracing::info!(?summary, "committed");
        Ok(summary)
    }

    /// Bring the committed tree's chunk index to the last commit.
    fn update_index(&mut self) {
        let Some(old) = self.index_from.take() else {
            return;
        };
        if let Some(t) = self.tree.get_mut() {
            if let Err(e) = t.update(&old, &self.committed) {
                tracing::warn!("chunk index dropped: {e}");
                self.tree = OnceLock::new();
            }
        }
    }

    /// Let [`Receiver::commit`] return once the tree is changed, before the
    /// wait for the disk that makes its new head durable: the caller then
    /// reports the commit and calls [`Receiver::settle`]. The commit is
    /// decided once its journal is durable (a crash before the head is
    /// stored is finished by the journal's roll-forward), so this only
    /// moves the wait out of the time a sender waits for the answer.
    pub fn settle_later(&mut self, later: bool) {
        self.settle_later = later;
    }

    /// Finish the last commit: one flush (see [`crate::flush`]; the
    /// temporaries were made durable before the journal, so only metadata
    /// and the head are left) makes the changed tree and the staged head
    /// durable, the head is renamed in (not synced: the journal, which
    /// stays, finishes the commit again if the rename is lost, and the next
    /// commit's flush makes it durable before its own journal replaces this
    /// one), then staging and scratch are cleared.
    /// Called by every commit (first, for one left unsettled) and on drop.
    pub fn settle(&mut self) -> Result<(), CommitError> {
        if !self.unsettled {
            return Ok(());
        }
        let head = self.head.expect("a commit set the head");
        let started = std::time::Instant::now();
        hit("before-final-flush");
        self.state.stage_head(&head)?;
        let state_dir = self.state.open_dir()?;
        match self.flush {
            Flush::Journal => {
                self.state.write_out_staged_head()?;
                flush::commit_journal(state_dir.as_fd())
                    .map_err(io_err("commit the journal", b"."))?;
            }
            Flush::Syncfs => {
                let tmp = self.open_state_dir("tmp")?;
                sync_filesystems(&[self.root.fd(), tmp.as_fd(), state_dir.as_fd()])?;
            }
        }
        tracing::debug!(sync_ms = started.elapsed().as_millis() as u64, "settled");
        hit("before-manifest-store");
        self.state.publish_head()?;
        hit("head-stored");
        self.unsettled = false;
        self.update_index();
        self.staging.clear()?;
        self.staging.purge();
        self.clean_scratch()?;
        self.compact_if_due()?;
        Ok(())
    }

    /// Rewrite the tree log without the objects no snapshot reaches any
    /// more, once it has grown to twice its size after the last rewrite.
    fn compact_if_due(&mut self) -> Result<(), CommitError> {
        let Some(head) = self.head else {
            return Ok(());
        };
        if head.len <= 2 * head.base + COMPACT_SLACK {
            return Ok(());
        }
        let mut live = self.committed.clone();
        live.gc();
        let next = self.state.rewrite_log(&live, head.gen + 1)?;
        hit("log-rewritten");
        self.state.store_head(&next)?;
        self.state.remove_other_logs(Some(&next))?;
        tracing::debug!(from = head.len, to = next.len, "tree log rewritten");
        self.committed = live;
        self.head = Some(next);
        Ok(())
    }
}

/// `syncfs` each filesystem that one of `fds` lies on, once.
fn sync_filesystems(fds: &[BorrowedFd<'_>]) -> Result<(), CommitError> {
    flush::sync_filesystems(fds).map_err(|source| CommitError::Io {
        op: "syncfs",
        path: ".".into(),
        source,
    })
}

/// Write out the data of every temporary of `plan` and wait for it
/// ([`Flush::Journal`]; the journal commit that follows makes it durable).
/// Files under [`WRITEBACK_MIN`], not started when built, are all started
/// before the first wait. An error (a temporary that cannot be opened,
/// such as one of mode 000 when not root; a failed write) makes the caller
/// fall back to `syncfs`.
fn write_out_temps(scratch: &Scratch, plan: &SyncPlan) -> Result<(), CommitError> {
    let open = |i: usize, last: &mut LastParent| -> Result<OwnedFd, CommitError> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        at_temp(
            scratch.tmp.as_fd(),
            scratch.fresh.as_ref(),
            plan,
            i,
            last,
            |dir, name| {
                openat(dir, name, flags, Mode::empty())
                    .map_err(io_err("open a temporary of", &plan.files[i].path))
            },
        )
    };
    let size = |op: &Op| match &op.entry.kind {
        Kind::File { size, .. } => *size,
        _ => 0,
    };
    in_parallel(&plan.files, 0, |i, op, last| {
        if (1..WRITEBACK_MIN).contains(&size(op)) {
            flush::start_write(open(i, last)?.as_fd());
        }
        Ok(())
    })?;
    in_parallel(&plan.files, 0, |i, op, last| match size(op) {
        0 => Ok(()),
        _ => flush::write_and_wait(open(i, last)?.as_fd()).map_err(|source| CommitError::Io {
            op: "write out",
            path: lossy(&op.path),
            source,
        }),
    })
}

fn timestamps(mtime_ns: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn ids(e: &Entry) -> (Option<Uid>, Option<Gid>) {
    // -1 means "leave unchanged" to chown; never pass it on.
    (
        (e.uid != u32::MAX).then(|| Uid::from_raw(e.uid)),
        (e.gid != u32::MAX).then(|| Gid::from_raw(e.gid)),
    )
}

/// The directory in `tmp/` holding fresh subtrees (temporaries are named
/// by a letter and a number, so never this).
const FRESH: &str = "t";

/// The state directory's scratch space for one plan: `tmp/`, `trash/` and,
/// when the plan has fresh subtrees, `tmp/t/`.
struct Scratch {
    tmp: OwnedFd,
    trash: OwnedFd,
    fresh: Option<Root>,
}

/// `sub` of the state directory `state`.
fn open_state_dir(state: &Path, sub: &str) -> Result<OwnedFd, CommitError> {
    let p = state.join(sub);
    openat(
        rustix::fs::CWD,
        &p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| CommitError::Io {
        op: "open",
        path: p.display().to_string(),
        source: e.into(),
    })
}

impl Scratch {
    /// The scratch directories of the state directory `state` for `plan`,
    /// with `tmp/t` (made if missing) when it has fresh subtrees.
    fn open(state: &Path, plan: &SyncPlan) -> Result<Scratch, CommitError> {
        let tmp = open_state_dir(state, "tmp")?;
        let trash = open_state_dir(state, "trash")?;
        let fresh = match plan.fresh.roots().next() {
            None => None,
            Some(_) => {
                match mkdirat(&tmp, FRESH, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err("create", FRESH.as_bytes())(e)),
                }
                Some(Root::open(&state.join("tmp").join(FRESH))?)
            }
        };
        Ok(Scratch { tmp, trash, fresh })
    }

    fn applier<'a>(&'a self, root: &'a Root, owners: bool) -> Applier<'a> {
        Applier {
            root,
            tmp: self.tmp.as_fd(),
            trash: self.trash.as_fd(),
            owners,
            fresh: self.fresh.as_ref(),
        }
    }

    /// The applier of the fresh subtrees alone (`tmp/t` as its root), if
    /// the plan has any.
    fn in_fresh(&self, owners: bool) -> Option<Applier<'_>> {
        self.applier(self.fresh.as_ref()?, owners).in_fresh()
    }
}

fn tmp_name(prefix: char, i: usize) -> String {
    format!("{prefix}{i}")
}

/// How often (every how many items) a long phase hits a crash point.
fn step(n: usize) -> usize {
    (n / 256).max(1)
}

/// Build every new file of `plan` in `tmp` and its fresh subtrees whole
/// in `tmp/t`; nothing in the tree changes. `prebuilt`: the files (by
/// index) that an expected plan's builder made, beside the skeleton of the
/// fresh subtrees. Returns (files, bytes) written.
fn prepare(
    a: &Applier<'_>,
    plan: &SyncPlan,
    src: &dyn ChunkSource,
    prebuilt: Option<&Prebuilt>,
) -> Result<(u64, u64), CommitError> {
    let root = a.root;
    preflight(root, plan)?;
    let bytes = plan.file_bytes();
    let st = rustix::fs::fstatvfs(a.tmp).map_err(io_err("statvfs", b"tmp"))?;
    let avail = st.f_bavail.saturating_mul(st.f_frsize);
    if bytes > avail {
        return Err(CommitError::NoSpace {
            path: root.path().display().to_string(),
            need: bytes,
            avail,
        });
    }
    let started = std::time::Instant::now();
    let inner = a.in_fresh();
    if let (Some(inner), None) = (&inner, prebuilt) {
        build_skeleton(inner, plan)?;
    }
    let skeleton = started.elapsed();
    let every = step(plan.files.len());
    in_parallel_by(&plan.files, 0, (64, 64), |i, _, last| {
        if !prebuilt.is_some_and(|b| b.files.contains(&i)) {
            build_temp(a.tmp, a.fresh, plan, i, src, a.owners, last, None)?;
        }
        if i % every == 0 {
            hit("temp-file-written");
        }
        Ok(())
    })?;
    let files = started.elapsed();
    if let Some(inner) = &inner {
        // Inside a subtree no reader sees yet, in any order.
        let linked = prebuilt.map_or(0, |b| b.linked);
        in_parallel(&plan.symlinks, 0, |i, op, last| {
            match i >= linked && plan.fresh.symlink(i) {
                true => inner.symlink(i, op, last),
                false => Ok(()),
            }
        })?;
        in_parallel(&plan.dir_meta, 0, |i, op, _| match plan.fresh.dir_meta(i) {
            true => inner.dir_meta(op),
            false => Ok(()),
        })?;
    }
    let count = |v: &[bool]| v.iter().filter(|&&b| b).count();
    tracing::debug!(
        files = plan.files.len(),
        before = prebuilt.map_or(0, |b| b.files.len()),
        linked_before = prebuilt.map_or(0, |b| b.linked),
        fresh_roots = plan.fresh.roots().count(),
        fresh_files = count(&plan.fresh.files),
        fresh_symlinks = count(&plan.fresh.symlinks),
        skeleton_ms = skeleton.as_millis() as u64,
        files_ms = (files - skeleton).as_millis() as u64,
        ms = started.elapsed().as_millis() as u64,
        "temporary files built"
    );
    // Symlinks are made at their turn in the apply (from the manifest, so a
    // roll-forward makes them again); only their targets are checked here.
    for op in &plan.symlinks {
        let Kind::Symlink { target } = &op.entry.kind else {
            continue;
        };
        if target.is_empty() || target.contains(&0) {
            return Err(SafeFsError::Unsafe {
                path: lossy(&op.path),
                why: "symlink target empty or with NUL".into(),
            }
            .into());
        }
    }
    hit("temp-symlinks-made");
    Ok((plan.files.len() as u64, bytes))
}

/// Below this many items a phase of the apply runs on the calling thread.
const PAR_MIN: usize = 1024;
/// Items per parallel task: consecutive paths mostly share their parent.
const PAR_CHUNK: usize = 512;

/// Run `f(index, op, last parent)` over `ops`, numbered from `base`, on
/// the rayon pool when there are many (the kernel's inode allocation and
/// directory updates then use both cores). The items must not depend on
/// each other; on an error the others may or may not have been done, as
/// with a crash, and every step of the apply is idempotent.
fn in_parallel(
    ops: &[Op],
    base: usize,
    f: impl Fn(usize, &Op, &mut LastParent) -> Result<(), CommitError> + Sync,
) -> Result<(), CommitError> {
    in_parallel_by(ops, base, (PAR_MIN, PAR_CHUNK), f)
}

/// [`in_parallel`] from `min` items on, `chunk` items per task.
fn in_parallel_by(
    ops: &[Op],
    base: usize,
    (min, chunk): (usize, usize),
    f: impl Fn(usize, &Op, &mut LastParent) -> Result<(), CommitError> + Sync,
) -> Result<(), CommitError> {
    let run = |(k, part): (usize, &[Op])| {
        let mut last = None;
        part.iter()
            .enumerate()
            .try_for_each(|(j, op)| f(base + k * chunk + j, op, &mut last))
    };
    if ops.len() < min {
        return run((0, ops));
    }
    ops.par_chunks(chunk).enumerate().try_for_each(run)
}

/// The last parent directory opened for a run of paths: symlinks come
/// sorted by path, so most of them share their parent with the one before.
type LastParent = Option<(Vec<u8>, OwnedFd)>;

/// The parent directory of `path` (beneath the root, as [`Root::parent`]),
/// reusing `last` when it is the same directory.
fn parent_of<'c, 'p>(
    root: &Root,
    path: &'p [u8],
    last: &'c mut LastParent,
) -> Result<(&'c OwnedFd, &'p [u8]), CommitError> {
    let (parent, name) = safefs::split(path);
    if last.as_ref().is_none_or(|(p, _)| p.as_slice() != parent) {
        let (dir, _) = root.parent(path)?;
        *last = Some((parent.to_vec(), dir));
    }
    Ok((&last.as_ref().expect("just set").1, name))
}

/// Before the journal, check every path the plan touches: valid, and each
/// parent that must already exist opens beneath the root with no symlink
/// on the way. A tree changed behind our back then fails the commit while
/// the tree is still untouched, instead of stopping a journaled one.
fn preflight(root: &Root, plan: &SyncPlan) -> Result<(), CommitError> {
    let created: HashSet<&[u8]> = plan.mkdirs.iter().map(|o| o.path.as_slice()).collect();
    let mut parents: HashSet<&[u8]> = HashSet::new();
    let ops = plan
        .mkdirs
        .iter()
        .chain(&plan.files)
        .chain(&plan.meta)
        .chain(&plan.hardlinks)
        .chain(&plan.symlinks)
        .chain(&plan.dir_meta);
    for op in ops {
        safefs::check_path(&op.path)?;
        parents.insert(safefs::split(&op.path).0);
    }
    for d in &plan.deletions {
        safefs::check_path(&d.path)?;
    }
    for p in parents {
        if p.is_empty() || created.contains(p) {
            continue;
        }
        root.open_dir(p, OFlags::PATH)?;
    }
    Ok(())
}

/// Make the directories of `plan`'s fresh subtrees in `tmp/t` (the root
/// of `inner`), each at its path in the tree, below plain directories
/// standing for the parents the tree has already. Idempotent.
fn build_skeleton(inner: &Applier<'_>, plan: &SyncPlan) -> Result<(), CommitError> {
    let mut made: HashSet<&[u8]> = HashSet::new();
    for i in plan.fresh.roots() {
        let mut up = Vec::new();
        let mut p = safefs::split(&plan.mkdirs[i].path).0;
        while !p.is_empty() && made.insert(p) {
            up.push(p);
            p = safefs::split(p).0;
        }
        for a in up.into_iter().rev() {
            let (dir, name) = inner.root.parent(a)?;
            match mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io_err("create directory", a)(e)),
            }
        }
    }
    for (i, op) in plan.mkdirs.iter().enumerate() {
        if plan.fresh.mkdir(i) != Place::Tree {
            inner.mkdir(i, op)?;
        }
    }
    Ok(())
}

/// Build the temporary of `plan.files[i]`: at its path in `fresh` when it
/// lies in a fresh subtree, else as `tmp/f<i>`. One that fails is removed.
#[allow(clippy::too_many_arguments)]
fn build_temp(
    tmp: BorrowedFd<'_>,
    fresh: Option<&Root>,
    plan: &SyncPlan,
    i: usize,
    src: &dyn ChunkSource,
    owners: bool,
    last: &mut LastParent,
    link_to: Option<(BorrowedFd<'_>, &str)>,
) -> Result<bool, CommitError> {
    let op = &plan.files[i];
    at_temp(tmp, fresh, plan, i, last, |dir, name| {
        build_file(dir, name, op, src, owners).inspect_err(|_| {
            let _ = unlinkat(dir, name, AtFlags::empty());
        })?;
        // A second name in staging (never through a symlink: the temporary
        // was just created here, and linkat does not follow it). Left over
        // from a session that ended early, the name is replaced.
        let Some((to_dir, to_name)) = link_to else {
            return Ok(false);
        };
        let link = || linkat(dir, name, to_dir, to_name, AtFlags::empty());
        Ok(match link() {
            Ok(()) => true,
            Err(Errno::EXIST) => {
                unlinkat(to_dir, to_name, AtFlags::empty()).is_ok() && link().is_ok()
            }
            Err(_) => false,
        })
    })
}

/// Where the temporary of `plan.files[i]` is: at its path in `fresh` when
/// it lies in a fresh subtree, else `tmp/f<i>`; `f` is called with its
/// directory and name.
fn at_temp<R>(
    tmp: BorrowedFd<'_>,
    fresh: Option<&Root>,
    plan: &SyncPlan,
    i: usize,
    last: &mut LastParent,
    f: impl FnOnce(BorrowedFd<'_>, &[u8]) -> Result<R, CommitError>,
) -> Result<R, CommitError> {
    match fresh.filter(|_| plan.fresh.file(i)) {
        Some(t) => {
            let (dir, name) = parent_of(t, &plan.files[i].path, last)?;
            f(dir.as_fd(), name)
        }
        None => f(tmp, tmp_name('f', i).as_bytes()),
    }
}

/// Chunks at least this long that are a whole file are staged as a hard
/// link to that file's temporary instead of being written to the pack: a
/// smaller one costs less to write twice than to link and unlink.
pub const LINK_MIN: usize = 64 << 10;

fn build_file(
    tmp: BorrowedFd<'_>,
    name: &[u8],
    op: &Op,
    src: &dyn ChunkSource,
    owners: bool,
) -> Result<(), CommitError> {
    let Kind::File { size, hash, chunks } = &op.entry.kind else {
        return Err(CommitError::Unexpected {
            path: lossy(&op.path),
            found: format!("{:?}", NodeKind::of(&op.entry)),
            want: "a regular file",
        });
    };
    let werr = |e: io::Error| CommitError::Io {
        op: "write",
        path: lossy(&op.path),
        source: e,
    };
    let fd = openat(
        tmp,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io_err("create a temporary for", &op.path))?;
    let file = File::from(fd);
    let mut hasher = (!chunks.is_empty()).then(blake3::Hasher::new);
    let mut written = 0u64;
    for (id, off, len) in chunk_spans(*size, *hash, chunks) {
        let parts = src
            .read_parts(&id)
            .ok_or_else(|| CommitError::MissingChunk {
                id,
                path: lossy(&op.path),
            })?;
        if parts.iter().map(|p| p.len()).sum::<usize>() != len as usize {
            return Err(CommitError::ContentMismatch {
                path: lossy(&op.path),
            });
        }
        crashpoint::check_write().map_err(werr)?;
        let mut at = off;
        for p in &parts {
            crate::safefs::write_all_at(&file, p, at).map_err(werr)?;
            at += p.len() as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(p);
            }
        }
        written += len as u64;
    }
    if *size >= WRITEBACK_MIN {
        flush::start_write(file.as_fd());
    }
    let whole_ok = match hasher {
        Some(h) => FileHash::from(h.finalize()) == *hash,
        None => *size > 0 || *hash == FileHash::of(b""),
    };
    if written != *size || !whole_ok {
        return Err(CommitError::ContentMismatch {
            path: lossy(&op.path),
        });
    }
    set_fd_meta(&file, &op.entry, owners).map_err(|e| CommitError::Io {
        op: "set metadata of",
        path: lossy(&op.path),
        source: e.into(),
    })
}

/// Files from this size have their writeback started as soon as they are
/// built. Smaller ones are left to the flush before the journal: started
/// one by one while chunks arrive, each is an IO of its own that costs the
/// transfer more CPU than the flush saves (an initial sync
/// of 101k entries, 10k of its 14k files under 64 KiB: 2.96-3.16 s this way
/// against 3.16-3.53 s with every file started, and 3.5-3.6 s with none).
const WRITEBACK_MIN: u64 = 64 << 10;

/// Owner, then mode (chown clears setuid), then times, on an open fd.
fn set_fd_meta(fd: impl AsFd, e: &Entry, owners: bool) -> Result<(), Errno> {
    if owners {
        let (u, g) = ids(e);
        rustix::fs::fchown(&fd, u, g)?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(e.mode))?;
    rustix::fs::futimens(&fd, &timestamps(e.mtime_ns))
}

/// Times and owner of a symlink itself (a symlink has no mode of its own).
fn set_link_meta(
    dir: BorrowedFd<'_>,
    name: &[u8],
    e: &Entry,
    owners: bool,
    path: &[u8],
) -> Result<(), CommitError> {
    if owners {
        let (u, g) = ids(e);
        rustix::fs::chownat(dir, name, u, g, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err("chown", path))?;
    }
    utimensat(
        dir,
        name,
        &timestamps(e.mtime_ns),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io_err("set times of", path))
}

/// Applies the tree-changing steps of a plan; each is idempotent.
struct Applier<'a> {
    root: &'a Root,
    tmp: BorrowedFd<'a>,
    trash: BorrowedFd<'a>,
    owners: bool,
    /// Where the plan's fresh subtrees are built (`tmp/t`), if it has any.
    fresh: Option<&'a Root>,
}

impl<'a> Applier<'a> {
    /// The same steps inside `tmp/t`, where the fresh subtrees are built.
    fn in_fresh(&self) -> Option<Applier<'a>> {
        Some(Applier {
            root: self.fresh?,
            fresh: None,
            ..*self
        })
    }

    fn apply(&self, plan: &SyncPlan) -> Result<CommitSummary, CommitError> {
        let mut s = CommitSummary::default();
        let every = step(plan.mkdirs.len());
        for (i, op) in plan.mkdirs.iter().enumerate() {
            match plan.fresh.mkdir(i) {
                Place::Tree => self.mkdir(i, op)?,
                Place::Root => {
                    self.place_subtree(i, op)?;
                    hit("subtree-placed");
                }
                Place::Inside => {}
            }
            s.dirs_created += 1;
            if i % every == 0 {
                hit("mkdir");
            }
        }
        let every = step(plan.files.len());
        in_parallel(&plan.files, 0, |i, op, _| {
            if plan.fresh.file(i) {
                return Ok(());
            }
            self.place(&tmp_name('f', i), &op.path)?;
            if i % every == 0 {
                hit("file-renamed");
            }
            Ok(())
        })?;
        for op in &plan.meta {
            self.set_meta(op)?;
            s.metadata += 1;
        }
        hit("metadata-set");
        for (i, op) in plan.hardlinks.iter().enumerate() {
            self.hardlink(i, op)?;
            s.hardlinks += 1;
        }
        hit("hardlinks-made");
        // Wave by wave; the symlinks of one wave do not point at each other.
        let every = step(plan.symlinks.len());
        let mut start = 0;
        let ends = plan.symlink_waves.iter().copied();
        for end in ends.chain([plan.symlinks.len()]) {
            let end = end.clamp(start, plan.symlinks.len());
            in_parallel(&plan.symlinks[start..end], start, |i, op, last| {
                if plan.fresh.symlink(i) {
                    return Ok(());
                }
                self.symlink(i, op, last)?;
                if i % every == 0 {
                    hit("symlink-flipped");
                }
                Ok(())
            })?;
            start = end;
        }
        s.symlinks += plan.symlinks.len() as u64;
        let every = step(plan.deletions.len());
        for (i, d) in plan.deletions.iter().enumerate() {
            self.delete(i, &d.path, d.kind)?;
            s.deleted += 1;
            if i % every == 0 {
                hit("deleted");
            }
        }
        for (i, op) in plan.dir_meta.iter().enumerate() {
            if !plan.fresh.dir_meta(i) {
                self.dir_meta(op)?;
            }
        }
        hit("dir-meta-set");
        Ok(s)
    }

    fn mkdir(&self, i: usize, op: &Op) -> Result<(), CommitError> {
        let (dir, name) = self.root.parent(&op.path)?;
        let mk = || mkdirat(&dir, name, Mode::from_raw_mode(0o700));
        match mk() {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = lstat_at(&dir, name).map_err(io_err("stat", &op.path))?;
                if st.is_some_and(|st| kind_of(&st) == FileType::Directory) {
                    return Ok(());
                }
                // A file or symlink where the directory goes (the plan
                // replaces it, or it was planted): move it out, never enter it.
                renameat(&dir, name, self.trash, format!("m{i}").as_str())
                    .map_err(io_err("move aside", &op.path))?;
                mk().map_err(io_err("create directory", &op.path))?;
            }
            Err(e) => return Err(io_err("create directory", &op.path)(e)),
        }
        // Permissive modes now, so a reader can enter the directory once a
        // symlink points at it; restrictive ones at the end (dir_meta).
        let root = rustix::process::geteuid().is_root();
        if root || op.entry.mode & 0o300 == 0o300 {
            let fd = openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err("open", &op.path))?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(op.entry.mode))
                .map_err(io_err("chmod", &op.path))?;
        }
        Ok(())
    }

    /// Move the fresh subtree built at `op.path` in `tmp/t` into the tree
    /// (gone from there = already done). The path was free in the old
    /// snapshot: whatever stands there was planted and goes to the trash.
    fn place_subtree(&self, i: usize, op: &Op) -> Result<(), CommitError> {
        let t = self.fresh.ok_or_else(|| CommitError::Unexpected {
            path: lossy(&op.path),
            found: "no directory of fresh subtrees".into(),
            want: "a fresh subtree",
        })?;
        let (from, name) = match t.parent(&op.path) {
            Ok(v) => v,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if lstat_at(&from, name)
            .map_err(io_err("stat", &op.path))?
            .is_none()
        {
            return Ok(());
        }
        let (dir, _) = self.root.parent(&op.path)?;
        if lstat_at(&dir, name)
            .map_err(io_err("stat", &op.path))?
            .is_some()
        {
            renameat(&dir, name, self.trash, format!("m{i}").as_str())
                .map_err(io_err("move aside", &op.path))?;
        }
        renameat(&from, name, &dir, name).map_err(io_err("move into place", &op.path))
    }

    /// Move `tmp/<tmp>` to `path`. Gone from tmp = already done. If a
    /// directory sits at `path` it is swapped out atomically (exchange) and
    /// then moved to the trash; a directory found in tmp is such a leftover.
    fn place(&self, tmp: &str, path: &[u8]) -> Result<(), CommitError> {
        let Some(st) = lstat_at(self.tmp, tmp.as_bytes()).map_err(io_err("stat", path))? else {
            return Ok(());
        };
        if kind_of(&st) == FileType::Directory {
            return self.to_trash(tmp, path);
        }
        let (dir, name) = self.root.parent(path)?;
        match renameat(self.tmp, tmp, &dir, name) {
            Ok(()) => Ok(()),
            Err(Errno::ISDIR) | Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => {
                renameat_with(self.tmp, tmp, &dir, name, RenameFlags::EXCHANGE)
                    .map_err(io_err("swap in", path))?;
                hit("directory-swapped-out");
                self.to_trash(tmp, path)
            }
            Err(e) => Err(io_err("rename into place", path)(e)),
        }
    }

    /// Put the symlink of `op` in place: at a free path it is created
    /// there (creating a name is atomic); over another entry it is built
    /// in `tmp/` and renamed over it, so the flip is atomic. Idempotent: a
    /// link already there with the right target only gets its metadata set
    /// again, and a temporary left by an interrupted flip is built afresh.
    fn symlink(&self, i: usize, op: &Op, last: &mut LastParent) -> Result<(), CommitError> {
        let Kind::Symlink { target } = &op.entry.kind else {
            return Ok(());
        };
        let (dir, name) = parent_of(self.root, &op.path, last)?;
        match symlinkat(target.as_slice(), dir, name) {
            Ok(()) => {}
            Err(Errno::EXIST) => return self.symlink_over(i, op, target, dir.as_fd(), name),
            Err(e) => return Err(io_err("symlink", &op.path)(e)),
        }
        set_link_meta(dir.as_fd(), name, &op.entry, self.owners, &op.path)
    }

    /// The name of `op` is taken: the right link already (metadata set
    /// again), or another entry that a temporary is renamed over.
    fn symlink_over(
        &self,
        i: usize,
        op: &Op,
        target: &[u8],
        dir: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), CommitError> {
        let st = lstat_at(dir, name).map_err(io_err("stat", &op.path))?;
        if st.is_some_and(|st| kind_of(&st) == FileType::Symlink)
            && rustix::fs::readlinkat(dir, name, Vec::new())
                .map_err(io_err("read link", &op.path))?
                .as_bytes()
                == target
        {
            return set_link_meta(dir, name, &op.entry, self.owners, &op.path);
        }
        // A temporary left by an interrupted flip is built afresh.
        let tmp = tmp_name('l', i);
        safefs::remove_all_at(self.tmp, tmp.as_bytes()).map_err(io_err("clean", &op.path))?;
        symlinkat(target, self.tmp, tmp.as_str()).map_err(io_err("symlink", &op.path))?;
        set_link_meta(self.tmp, tmp.as_bytes(), &op.entry, self.owners, &op.path)?;
        self.place(&tmp, &op.path)
    }

    fn to_trash(&self, tmp: &str, path: &[u8]) -> Result<(), CommitError> {
        renameat(self.tmp, tmp, self.trash, tmp).map_err(io_err("move to trash", path))
    }

    fn set_meta(&self, op: &Op) -> Result<(), CommitError> {
        let (dir, name) = self.root.parent(&op.path)?;
        let st = lstat_at(&dir, name)
            .map_err(io_err("stat", &op.path))?
            .ok_or_else(|| CommitError::Unexpected {
                path: lossy(&op.path),
                found: "nothing".into(),
                want: "an existing entry",
            })?;
        match (&op.entry.kind, kind_of(&st)) {
            (Kind::Symlink { .. }, FileType::Symlink) => {
                set_link_meta(dir.as_fd(), name, &op.entry, self.owners, &op.path)
            }
            (Kind::File { .. }, FileType::RegularFile) => {
                let fd = openat(
                    &dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_err("open", &op.path))?;
                set_fd_meta(&fd, &op.entry, self.owners)
                    .map_err(io_err("set metadata of", &op.path))
            }
            (_, found) => Err(CommitError::Unexpected {
                path: lossy(&op.path),
                found: format!("{found:?}"),
                want: "the kind in the snapshot",
            }),
        }
    }

    fn hardlink(&self, i: usize, op: &Op) -> Result<(), CommitError> {
        let Kind::HardLink { path: primary, .. } = &op.entry.kind else {
            return Ok(());
        };
        let tmp = tmp_name('h', i);
        if lstat_at(self.tmp, tmp.as_bytes())
            .map_err(io_err("stat", &op.path))?
            .is_some()
        {
            return self.place(&tmp, &op.path);
        }
        let (pdir, pname) = self.root.parent(primary)?;
        let pst = lstat_at(&pdir, pname)
            .map_err(io_err("stat", primary))?
            .filter(|st| kind_of(st) == FileType::RegularFile)
            .ok_or_else(|| CommitError::Unexpected {
                path: lossy(primary),
                found: "no regular file".into(),
                want: "the primary of a hard link",
            })?;
        let (dir, name) = self.root.parent(&op.path)?;
        if let Some(st) = lstat_at(&dir, name).map_err(io_err("stat", &op.path))? {
            if st.st_ino == pst.st_ino && st.st_dev == pst.st_dev {
                return Ok(());
            }
        }
        linkat(&pdir, pname, self.tmp, tmp.as_str(), AtFlags::empty())
            .map_err(io_err("hard-link", &op.path))?;
        self.place(&tmp, &op.path)
    }

    fn delete(&self, i: usize, path: &[u8], kind: NodeKind) -> Result<(), CommitError> {
        let (dir, name) = match self.root.parent(path) {
            Ok(v) => v,
            // No parent, no entry: already gone.
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let to_trash = || -> Result<(), CommitError> {
            match renameat(&dir, name, self.trash, format!("d{i}").as_str()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(io_err("remove", path)(e)),
            }
        };
        if kind == NodeKind::Dir {
            // The whole subtree leaves the tree in one rename.
            return to_trash();
        }
        match unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::ISDIR) | Err(Errno::PERM) => to_trash(),
            Err(e) => Err(io_err("remove", path)(e)),
        }
    }

    fn dir_meta(&self, op: &Op) -> Result<(), CommitError> {
        let fd = self.root.open_dir(&op.path, OFlags::RDONLY)?;
        set_fd_meta(&fd, &op.entry, self.owners).map_err(io_err("set metadata of", &op.path))
    }
}

/// Push a local tree: commit `src` (the manifest of `src_root`) into the
/// receiver, reading missing chunks straight from the source files (each
/// verified against its id; a source file changed since the scan makes
/// the commit fail with [`CommitError::MissingChunk`], never write wrong
/// bytes).
pub fn push_local(
    src: &Manifest,
    src_root: &Path,
    recv: &mut Receiver,
    opts: &CommitOptions,
) -> Result<CommitSummary, CommitError> {
    let plan = recv.plan(src)?;
    // Every chunk of the plan, not only the missing ones: a tree copy that
    // fails verification at commit time is then read from the source.
    let src_chunks = source_chunks(src_root, &plan)?;
    recv.commit_with(src, &plan, opts, Some(&src_chunks))
}

/// The chunks of the files `plan` writes, in the source tree at
/// `src_root`: located from the plan alone, so the cost follows the change.
fn source_chunks(src_root: &Path, plan: &SyncPlan) -> Result<TreeChunks, CommitError> {
    let mut index = ChunkLocator::default();
    for op in &plan.files {
        index.add_file(&op.path, &op.entry);
    }
    Ok(TreeChunks::from_index(
        Arc::new(Root::open(src_root)?),
        index,
    ))
}

/// Like [`push_local`], but every missing chunk travels through the
/// staging area first, exactly as chunks received from a peer do.
pub fn push_local_staged(
    src: &Manifest,
    src_root: &Path,
    recv: &mut Receiver,
    opts: &CommitOptions,
) -> Result<CommitSummary, CommitError> {
    let plan = recv.plan(src)?;
    let missing = recv.missing_chunks(&plan);
    let src_chunks = source_chunks(src_root, &plan)?;
    for (id, _) in missing {
        let data = src_chunks
            .read(&id)
            .ok_or_else(|| CommitError::MissingChunk {
                id,
                path: src_root.display().to_string(),
            })?;
        recv.stage(id, &data)?;
    }
    recv.persist_staging()?;
    recv.commit(src, &plan, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;

    fn op(path: &[u8], kind: Kind) -> Op {
        Op {
            path: path.to_vec(),
            entry: Entry {
                name: safefs::split(path).1.to_vec(),
                mode: 0o644,
                mtime_ns: 0,
                uid: 0,
                gid: 0,
                kind,
            },
            replaces: None,
        }
    }

    fn scan(src: &Path) -> Manifest {
        let opts = crate::scan::ScanOptions {
            cache: None,
            owners: false,
            // Unpacked trees, compressed when the commit stores them.
            pack: false,
        };
        crate::scan::scan(src, &opts).unwrap().manifest
    }

    fn index_of(r: &Receiver) -> Vec<(ChunkId, Vec<u8>)> {
        let t = r.tree_chunks();
        let mut v: Vec<_> = t
            .index()
            .ids()
            .map(|id| (*id, t.locate(id).unwrap().0.to_vec()))
            .collect();
        v.sort();
        v
    }

    /// A plan made ahead from a session's changes is the plan of the
    /// snapshots; changes that lead from another snapshot are not used.
    #[test]
    fn a_plan_from_given_changes_is_the_plan_of_the_snapshots() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f"), b"one").unwrap();
        let m1 = scan(&src);
        let opts = CommitOptions::default();
        let mut r = Receiver::open(&dest, None).unwrap();
        push_local(&m1, &src, &mut r, &opts).unwrap();
        std::fs::write(src.join("d/g"), b"two").unwrap();
        std::os::unix::fs::symlink("d/g", src.join("cur")).unwrap();
        let m2 = scan(&src);
        let want = SyncPlan::build(&m1, &m2, |_| false).unwrap().digest();
        let changes = crate::diff::diff(&m1, &m2).unwrap();
        let plan_from = |r: &mut Receiver, given| {
            let ahead = r.plan_ahead(&opts).unwrap().expect("no journal");
            ahead.plan_from(&m2, given).unwrap().plan
        };
        let given = plan_from(&mut r, Some((m1.snapshot(), changes.clone())));
        assert_eq!(given.digest(), want);
        // Changes from elsewhere (here: from nothing) are diffed anew.
        let stale = plan_from(
            &mut r,
            Some((Manifest::empty().snapshot(), changes[..1].to_vec())),
        );
        assert_eq!(stale.digest(), want);
        let wrong = SyncPlan::build_from(&m1, &m2, changes[..1].to_vec(), |_| false).unwrap();
        assert_ne!(
            wrong.digest(),
            want,
            "a plan follows the changes it is given"
        );
    }

    /// Temporaries built while chunks arrive are used by the commit (which
    /// would fail on an existing temporary if it built them again); the
    /// rest comes from staging; an unexpected snapshot ignores them.
    #[test]
    fn files_built_ahead_are_committed_and_the_rest_come_from_staging() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        for i in 0..6u8 {
            std::fs::write(src.join(format!("d/f{i}")), vec![i; 1000 + i as usize]).unwrap();
        }
        std::fs::write(src.join("d/same-as-f1"), vec![1u8; 1001]).unwrap();
        std::os::unix::fs::symlink("d/f1", src.join("cur")).unwrap();
        // Links inside the new `d` (made ahead) and one leading out of it.
        std::os::unix::fs::symlink("f1", src.join("d/l1")).unwrap();
        std::os::unix::fs::symlink("l1", src.join("d/l2")).unwrap();
        std::os::unix::fs::symlink("../cur", src.join("d/out")).unwrap();
        let m = scan(&src);
        let opts = CommitOptions::default();
        let mut r = Receiver::open(&dest, None).unwrap();
        let b = r.expect(&m, &opts).unwrap().expect("a builder");
        // Each chunk in two pieces, as a data stream may hand it over.
        let chunk = |name: &str| {
            let data = std::fs::read(src.join(name)).unwrap();
            let mut pieces = ChunkBytes::default();
            pieces.push(data[..data.len() / 3].to_vec().into());
            pieces.push(data[data.len() / 3..].to_vec().into());
            (ChunkId::of(&data), pieces)
        };
        // Every chunk is staged; all but f5's are handed to the builder.
        let chunks: Vec<_> = (0..6).map(|i| chunk(&format!("d/f{i}"))).collect();
        for (id, data) in &chunks {
            r.stage(*id, &data.to_vec()).unwrap();
        }
        r.persist_staging().unwrap();
        b.build(&chunks[..5], true);
        b.link();
        let tmp = r.state_dir().join("tmp");
        let names = |dir: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // `d` is new: its files are built at their names in its subtree,
        // with the links that stay inside it.
        assert_eq!(names(&tmp), ["t"]);
        assert_eq!(
            names(&tmp.join("t/d")),
            ["f0", "f1", "f2", "f3", "f4", "l1", "l2", "same-as-f1"]
        );
        assert_eq!(
            std::fs::read_link(tmp.join("t/d/l2")).unwrap(),
            Path::new("l1")
        );
        let plan = r.expected_plan(&m).expect("the plan made ahead");
        r.commit(&m, &plan, &opts).unwrap();
        assert!(r.verify(&VerifyOptions::default()).unwrap().is_clean());
        assert_eq!(scan(&dest).root(), m.root());
        b.build(&chunks[5..], true);
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "closed by the commit"
        );

        // Expecting one snapshot and committing another: built files unused.
        std::fs::write(src.join("d/f0"), b"changed").unwrap();
        let m2 = scan(&src);
        let b = r.expect(&m2, &opts).unwrap().expect("a builder");
        b.build(&[chunk("d/f0")], true);
        assert_eq!(names(&tmp), ["f0"], "a changed file is built as tmp/f<i>");
        std::fs::write(src.join("d/f0"), b"changed again").unwrap();
        let m3 = scan(&src);
        assert!(r.expected_plan(&m3).is_none());
        push_local(&m3, &src, &mut r, &opts).unwrap();
        assert_eq!(scan(&dest).root(), m3.root());
        assert_eq!(std::fs::read(dest.join("d/f0")).unwrap(), b"changed again");
    }

    /// A receiver kept in a cache across sessions follows every commit:
    /// its manifest and chunk index equal freshly loaded ones, the tree log
    /// is rewritten once mostly garbage, and a commit by another process
    /// makes the cache stale rather than wrong.
    #[test]
    fn a_cached_receiver_follows_commits_and_rewrites_its_log() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        let cache = Arc::new(ReceiverCache::default());
        let opts = CommitOptions::default();
        for step in 0..8u32 {
            std::fs::write(src.join(format!("f{step}")), vec![step as u8; 70_000]).unwrap();
            std::fs::write(src.join("d/same"), format!("v{}", step % 3)).unwrap();
            if step >= 2 {
                std::fs::remove_file(src.join(format!("f{}", step - 2))).unwrap();
            }
            let m = scan(&src);
            {
                let mut r = Receiver::open_cached(&dest, None, &cache).unwrap();
                if step > 0 {
                    assert!(r.tree.get().is_some(), "index kept from the last session");
                }
                push_local(&m, &src, &mut r, &opts).unwrap();
            }
            let cached = Receiver::open_cached(&dest, None, &cache).unwrap();
            let cached_index = index_of(&cached);
            let cached_root = cached.committed().root();
            drop(cached);
            let fresh = Receiver::open(&dest, None).unwrap();
            assert_eq!(fresh.committed().root(), m.root());
            assert_eq!(cached_root, m.root());
            assert_eq!(index_of(&fresh), cached_index, "step {step}");
            assert!(fresh.verify(&VerifyOptions::default()).unwrap().is_clean());
        }
        let head =
            crate::state::read_head(&default_state_dir(&dest.canonicalize().unwrap()).unwrap())
                .unwrap()
                .unwrap();
        assert!(head.gen > 1, "the log was rewritten: {head:?}");

        // Another process commits: the cache is stale and not used.
        std::fs::write(src.join("late"), b"late").unwrap();
        let m = scan(&src);
        let mut other = Receiver::open(&dest, None).unwrap();
        push_local(&m, &src, &mut other, &opts).unwrap();
        drop(other);
        let r = Receiver::open_cached(&dest, None, &cache).unwrap();
        assert_eq!(r.committed().root(), m.root());
        assert!(r.tree.get().is_none());
    }

    /// A commit keeps its journal (its removal could become durable before
    /// the unsynced rename of the head): while the head names the journal's
    /// target it is nothing to do, and if the head's rename is lost the
    /// journal finishes the commit again.
    #[test]
    fn the_last_journal_stays_and_covers_a_lost_head() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        std::fs::create_dir_all(src.join("repo")).unwrap();
        std::fs::write(src.join("repo/a"), b"one").unwrap();
        // Enough trees that the second commit's do not make the log due
        // for a rewrite (whose durable head would supersede the lost one).
        for i in 0..20 {
            std::fs::create_dir_all(src.join(format!("old/{i}"))).unwrap();
        }
        let opts = CommitOptions::default();
        let m1 = scan(&src);
        push_local(&m1, &src, &mut Receiver::open(&dest, None).unwrap(), &opts).unwrap();
        let state = default_state_dir(&dest.canonicalize().unwrap()).unwrap();
        let head1 = std::fs::read(state.join("head")).unwrap();

        std::fs::write(src.join("repo/b"), b"two").unwrap();
        std::os::unix::fs::symlink("repo", src.join("current")).unwrap();
        let m2 = scan(&src);
        push_local(&m2, &src, &mut Receiver::open(&dest, None).unwrap(), &opts).unwrap();
        let j = crate::state::StateDir::open(&state, &dest.canonicalize().unwrap())
            .unwrap()
            .read_journal()
            .unwrap()
            .expect("the journal stays");
        assert_eq!(j.to, m2.snapshot());
        assert_eq!(crate::state::peek_committed_root(&state), Some(m2.root()));
        let r = Receiver::open(&dest, None).unwrap();
        assert!(r.recovered().is_none(), "nothing to finish");
        drop(r);

        // The head's rename lost (a power loss before any later sync).
        std::fs::write(state.join("head"), head1).unwrap();
        assert_eq!(crate::state::peek_committed_root(&state), None);
        let r = Receiver::open(&dest, None).unwrap();
        assert!(r.recovered().is_some_and(|s| s.rolled_forward));
        assert_eq!(r.committed().root(), m2.root());
        assert!(r.verify(&VerifyOptions::default()).unwrap().is_clean());
    }

    /// A commit left to settle later is decided: the answer may go out
    /// before its head is stored, and a crash then is finished by the
    /// journal. The journal is rewritten in place by later commits.
    #[test]
    fn an_unsettled_commit_is_finished_by_its_journal() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        std::fs::create_dir_all(src.join("repo")).unwrap();
        std::fs::write(src.join("repo/a"), b"one").unwrap();
        let opts = CommitOptions::default();
        let m1 = scan(&src);
        let mut r = Receiver::open(&dest, None).unwrap();
        r.settle_later(true);
        push_local(&m1, &src, &mut r, &opts).unwrap();
        let state = default_state_dir(&dest.canonicalize().unwrap()).unwrap();
        assert!(
            crate::state::read_head(&state).unwrap().is_none(),
            "head not stored yet"
        );
        assert_eq!(std::fs::read(dest.join("repo/a")).unwrap(), b"one");
        // A crash before the head is stored.
        r.unsettled = false;
        drop(r);
        let mut r = Receiver::open(&dest, None).unwrap();
        assert!(r.recovered().is_some_and(|s| s.rolled_forward));
        assert_eq!(r.committed().root(), m1.root());
        assert_eq!(crate::state::peek_committed_root(&state), Some(m1.root()));
        let journal = std::fs::metadata(state.join("journal")).unwrap().ino();

        std::fs::write(src.join("repo/b"), b"two").unwrap();
        let m2 = scan(&src);
        r.settle_later(true);
        push_local(&m2, &src, &mut r, &opts).unwrap();
        assert_eq!(
            crate::state::peek_committed_root(&state),
            None,
            "journal ahead of head"
        );
        r.settle().unwrap();
        assert_eq!(crate::state::peek_committed_root(&state), Some(m2.root()));
        let j = std::fs::metadata(state.join("journal")).unwrap();
        assert_eq!(j.ino(), journal, "the journal is written in place");
        assert!(!state.join("journal.new").exists());
        drop(r);
        let r = Receiver::open(&dest, None).unwrap();
        assert!(r.recovered().is_none());
        assert!(r.verify(&VerifyOptions::default()).unwrap().is_clean());
    }

    /// The applier itself refuses hostile paths, even in a plan that never
    /// went through the digest check of `Receiver::commit`.
    #[test]
    fn the_applier_refuses_hostile_paths_of_a_forged_plan() {
        let t = tempfile::tempdir().unwrap();
        let (dest, tmp, trash, outside) = (
            t.path().join("dest"),
            t.path().join("tmp"),
            t.path().join("trash"),
            t.path().join("outside"),
        );
        for d in [&dest, &tmp, &trash, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        std::os::unix::fs::symlink(&outside, dest.join("x")).unwrap();
        let root = Root::open(&dest).unwrap();
        let tmpfd = File::open(&tmp).unwrap();
        let trashfd = File::open(&trash).unwrap();
        let applier = Applier {
            root: &root,
            tmp: tmpfd.as_fd(),
            trash: trashfd.as_fd(),
            owners: false,
            fresh: None,
        };
        let empty = Manifest::empty();
        let mut plan = SyncPlan::build(&empty, &empty, |_| true).unwrap();
        let file = Kind::File {
            size: 0,
            hash: FileHash::of(b""),
            chunks: vec![],
        };
        for bad in [&b"../evil"[..], b"/abs", b"a/../../b", b"x/evil", b"n\0ul"] {
            std::fs::write(tmp.join("f0"), b"").unwrap();
            plan.files = vec![op(bad, file.clone())];
            assert!(applier.apply(&plan).is_err(), "{bad:?}");
            assert!(preflight(&root, &plan).is_err(), "{bad:?}");
        }
        plan.files.clear();
        plan.mkdirs = vec![op(b"x/sub", Kind::Dir { tree: empty.root() })];
        assert!(applier.apply(&plan).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!t.path().join("evil").exists());
    }
}
