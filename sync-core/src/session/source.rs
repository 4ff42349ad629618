//! The source end of a sync: offers its snapshot, answers `WantTrees` from
//! its manifest and `WantChunks` with chunks the driver reads for it. It
//! never sends a chunk it was not asked for, nor one twice, and checks each
//! chunk the driver hands in against its id, so a file that changed since
//! the scan fails the session here instead of at the sink. No IO.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::{check_version, hello, Channel, SessionError, Summary, PARALLEL_TREES};
use crate::chunk::chunk_spans;
use crate::diff::{diff, Change};
use crate::hash::{ChunkId, SnapshotId, TreeId};
use crate::manifest::{Entry, Kind, Manifest, ManifestError};
use crate::wire::{
    Direction, ErrorCode, Frame, MAX_CHUNK_BATCH, MAX_FRAME, MAX_IDS_PER_MESSAGE, MAX_TREE_BATCH,
    PROTOCOL_VERSION,
};

/// Bounds a source holds a (possibly hostile) sink to.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Chunks asked for and not yet sent.
    pub max_pending_chunks: usize,
    /// Tree objects served in one session.
    pub max_trees: usize,
}

/// Chunk bytes per `Chunks` frame, well below the wire's limit
/// ([`MAX_CHUNK_BATCH`], which one largest chunk fills): the sink checks and
/// stages the first frames while the next ones are on their way.
const FRAME_TARGET: usize = 1 << 20;
const _: () = assert!(FRAME_TARGET <= MAX_CHUNK_BATCH);

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            max_pending_chunks: 4 * MAX_IDS_PER_MESSAGE,
            max_trees: crate::manifest::MAX_TREES,
        }
    }
}

/// Work for the driver, or the outcome.
#[derive(Debug)]
pub enum SourceEvent {
    /// Read these chunks (see [`ChunkLocator`]) and hand them to
    /// [`SourceSession::send_chunks`], in any order and batches.
    ReadChunks(Vec<ChunkId>),
    Finished(Summary),
    Failed(ErrorCode, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitWelcome,
    AwaitSinkRoot,
    Serving,
    Finished,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitWelcome => "awaiting welcome",
            State::AwaitSinkRoot => "awaiting sink state",
            State::Serving => "serving",
            State::Finished => "finished",
            State::Failed => "failed",
        }
    }
}

/// Output in order; tree objects are copied into frames only when polled,
/// so a burst of `WantTrees` costs ids, not megabytes, until sent.
enum Out {
    Frame(Channel, Frame),
    Trees(VecDeque<TreeId>),
}

/// The sending end of one sync.
pub struct SourceSession {
    manifest: Manifest,
    root: SnapshotId,
    opts: SourceOptions,
    state: State,
    sink_root: Option<SnapshotId>,
    trees_served: HashSet<TreeId>,
    asked: HashSet<ChunkId>,
    pending: HashSet<ChunkId>,
    wants_closed: bool,
    done_sent: bool,
    out: VecDeque<Out>,
    events: VecDeque<SourceEvent>,
    trees_sent: u64,
    chunks_sent: u64,
    bytes_sent: u64,
    started: Instant,
    last: Instant,
}

impl SourceSession {
    fn new(manifest: Manifest, opts: SourceOptions, state: State, now: Instant) -> Self {
        SourceSession {
            root: manifest.snapshot(),
            manifest,
            opts,
            state,
            sink_root: None,
            trees_served: HashSet::new(),
            asked: HashSet::new(),
            pending: HashSet::new(),
            wants_closed: false,
            done_sent: false,
            out: VecDeque::new(),
            events: VecDeque::new(),
            trees_sent: 0,
            chunks_sent: 0,
            bytes_sent: 0,
            started: now,
            last: now,
        }
    }

    /// Push client: queues `Hello` and `Offer` in one flight.
    pub fn client(
        tree: &str,
        client_agent: &str,
        manifest: Manifest,
        opts: SourceOptions,
        now: Instant,
    ) -> Result<Self, SessionError> {
        let hello = hello(tree, client_agent, Direction::Push)?;
        let mut s = Self::new(manifest, opts, State::AwaitWelcome, now);
        s.push(Channel::Control, hello);
        s.push(Channel::Control, Frame::Offer { root: s.root });
        Ok(s)
    }

    /// Pull server, after [`super::accept`] read the client's `Hello`:
    /// queues `Welcome` and `Offer`, then expects the client's `SinkState`.
    pub fn server(manifest: Manifest, opts: SourceOptions, now: Instant) -> Self {
        let mut s = Self::new(manifest, opts, State::AwaitSinkRoot, now);
        s.push(
            Channel::Control,
            Frame::Welcome {
                version: PROTOCOL_VERSION,
                sink_root: None,
            },
        );
        s.push(Channel::Control, Frame::Offer { root: s.root });
        s
    }

    /// The snapshot this session offers.
    pub fn root(&self) -> SnapshotId {
        self.root
    }

    /// What the sink said it had committed (from `Welcome` or `SinkState`).
    pub fn sink_root(&self) -> Option<SnapshotId> {
        self.sink_root
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    pub fn is_failed(&self) -> bool {
        self.state == State::Failed
    }

    /// Finished or failed: no more input is taken.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Finished | State::Failed)
    }

    /// When the last input arrived (for the driver's stall timeout).
    pub fn last_activity(&self) -> Instant {
        self.last
    }

    /// The `Done` frame has been queued: the driver may finish its data
    /// streams once it has sent everything polled so far.
    pub fn all_sent(&self) -> bool {
        self.done_sent
    }

    /// Chunks asked for that the driver has not handed in yet.
    pub fn pending_chunks(&self) -> usize {
        self.pending.len()
    }

    /// Counters so far.
    pub fn summary(&self) -> Summary {
        Summary {
            root: self.root,
            unchanged: self.sink_root == Some(self.root),
            trees_sent: self.trees_sent,
            trees_received: 0,
            chunks_sent: self.chunks_sent,
            chunks_received: 0,
            bytes_sent: self.bytes_sent,
            bytes_received: 0,
            chunks_local: 0,
            files_changed: 0,
            elapsed: self.last.saturating_duration_since(self.started),
        }
    }

    /// A frame from the peer. `Err` means the session failed: an `Error`
    /// frame and a `Failed` event are queued. Input after the end is ignored.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        self.last = self.last.max(now);
        self.on_frame(frame).map_err(|e| self.fail(e))
    }

    /// Chunk contents the driver read after [`SourceEvent::ReadChunks`].
    pub fn send_chunks(&mut self, chunks: Vec<(ChunkId, Vec<u8>)>) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        self.on_chunks(chunks).map_err(|e| self.fail(e))
    }

    /// The driver gives up (e.g. a chunk could not be read): tell the peer.
    pub fn abort(&mut self, code: ErrorCode, message: impl Into<String>) {
        if !self.is_closed() {
            self.fail(SessionError::Aborted {
                code,
                message: message.into(),
            });
        }
    }

    /// The next frame to send, and on which channel.
    pub fn poll_transmit(&mut self) -> Option<(Channel, Frame)> {
        loop {
            match self.out.pop_front()? {
                Out::Frame(ch, f) => return Some((ch, f)),
                Out::Trees(mut ids) => {
                    // A batch's worth of ids (presence and size were
                    // checked when asked for), then their encodings,
                    // decompressed on every core.
                    let mut batch = Vec::new();
                    let mut bytes = 0usize;
                    while let Some(id) = ids.front() {
                        let Some(len) = self.manifest.raw_len(id) else {
                            ids.pop_front();
                            continue;
                        };
                        if !batch.is_empty()
                            && (bytes + len > MAX_TREE_BATCH || batch.len() >= MAX_IDS_PER_MESSAGE)
                        {
                            break;
                        }
                        bytes += len;
                        batch.push(*id);
                        ids.pop_front();
                    }
                    if !ids.is_empty() {
                        self.out.push_front(Out::Trees(ids));
                    }
                    let raw = |id: &TreeId| Some((*id, self.manifest.raw(id)?));
                    let trees: Vec<(TreeId, Vec<u8>)> = match batch.len() < PARALLEL_TREES {
                        true => batch.iter().filter_map(raw).collect(),
                        false => {
                            use rayon::prelude::*;
                            batch.par_iter().filter_map(raw).collect()
                        }
                    };
                    if trees.is_empty() {
                        continue;
                    }
                    self.trees_sent += trees.len() as u64;
                    return Some((Channel::Control, Frame::Trees { trees }));
                }
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// Tree objects the sink asked for: every chunk it can want is in a
    /// file of one of them (unless it kept trees from an earlier session).
    pub fn trees_served(&self) -> &HashSet<TreeId> {
        &self.trees_served
    }

    fn push(&mut self, ch: Channel, f: Frame) {
        self.out.push_back(Out::Frame(ch, f));
    }

    fn fail(&mut self, e: SessionError) -> SessionError {
        tracing::debug!(error = %e, "source session failed");
        self.out.clear();
        self.events.clear();
        if !matches!(e, SessionError::Peer { .. }) {
            self.push(Channel::Control, e.to_frame());
        }
        self.state = State::Failed;
        self.events
            .push_back(SourceEvent::Failed(e.code(), e.to_string()));
        e
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        match (self.state, frame) {
            (_, Frame::Error { code, message }) => Err(SessionError::Peer { code, message }),
            (State::AwaitWelcome, Frame::Welcome { version, sink_root }) => {
                check_version(version)?;
                self.sink_root = sink_root;
                self.state = State::Serving;
                Ok(())
            }
            (State::AwaitSinkRoot, Frame::SinkState { root }) => {
                self.sink_root = root;
                self.state = State::Serving;
                Ok(())
            }
            (State::Serving, Frame::WantTrees { ids }) => self.on_want_trees(ids),
            (State::Serving, Frame::WantChunks { ids }) => self.on_want_chunks(ids),
            (State::Serving, Frame::Committed { root }) => {
                if root != self.root {
                    return Err(SessionError::WrongRoot {
                        expected: self.root,
                        got: root,
                    });
                }
                self.state = State::Finished;
                self.events.clear();
                let mut summary = self.summary();
                summary.unchanged = self.trees_sent == 0 && self.chunks_sent == 0;
                self.events.push_back(SourceEvent::Finished(summary));
                Ok(())
            }
            (state, other) => Err(SessionError::Unexpected {
                frame: other.name(),
                state: state.name(),
            }),
        }
    }

    fn on_want_trees(&mut self, ids: Vec<TreeId>) -> Result<(), SessionError> {
        if ids.is_empty() {
            return Ok(());
        }
        if self.trees_served.len() + ids.len() > self.opts.max_trees {
            return Err(SessionError::TooLarge(format!(
                "more than {} tree objects asked for",
                self.opts.max_trees
            )));
        }
        for id in &ids {
            let len = self
                .manifest
                .raw_len(id)
                .ok_or(SessionError::UnknownTree(*id))?;
            if len > MAX_FRAME - 64 {
                return Err(SessionError::TooLarge(format!(
                    "tree {id} of {len} bytes does not fit in a frame"
                )));
            }
            if !self.trees_served.insert(*id) {
                return Err(SessionError::Duplicate {
                    what: "tree",
                    id: id.to_string(),
                });
            }
        }
        self.out.push_back(Out::Trees(ids.into()));
        Ok(())
    }

    fn on_want_chunks(&mut self, ids: Vec<ChunkId>) -> Result<(), SessionError> {
        if self.wants_closed {
            return Err(SessionError::Unexpected {
                frame: "WantChunks",
                state: "after the last want",
            });
        }
        if ids.is_empty() {
            self.wants_closed = true;
            self.maybe_done();
            return Ok(());
        }
        if self.pending.len() + ids.len() > self.opts.max_pending_chunks {
            return Err(SessionError::TooLarge(format!(
                "more than {} chunks outstanding",
                self.opts.max_pending_chunks
            )));
        }
        for id in &ids {
            if !self.asked.insert(*id) {
                return Err(SessionError::Duplicate {
                    what: "chunk",
                    id: id.to_string(),
                });
            }
            self.pending.insert(*id);
        }
        self.events.push_back(SourceEvent::ReadChunks(ids));
        Ok(())
    }

    fn on_chunks(&mut self, chunks: Vec<(ChunkId, Vec<u8>)>) -> Result<(), SessionError> {
        for (id, _) in &chunks {
            if !self.pending.contains(id) {
                return Err(SessionError::Driver(format!(
                    "chunk {id} was not asked for or was already sent"
                )));
            }
        }
        // Not hashed again here: the sink checks every chunk it receives
        // (a file changed since the scan fails the session there, and the
        // next scan sees the change), and a second BLAKE3 pass over every
        // byte sent was the source's largest cost after the reads.
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for (id, data) in chunks {
            self.pending.remove(&id);
            if !batch.is_empty()
                && (bytes + data.len() > FRAME_TARGET || batch.len() >= MAX_IDS_PER_MESSAGE)
            {
                self.flush_chunks(std::mem::take(&mut batch));
                bytes = 0;
            }
            bytes += data.len();
            batch.push((id, data));
        }
        if !batch.is_empty() {
            self.flush_chunks(batch);
        }
        self.maybe_done();
        Ok(())
    }

    fn flush_chunks(&mut self, chunks: Vec<(ChunkId, Vec<u8>)>) {
        self.chunks_sent += chunks.len() as u64;
        self.bytes_sent += chunks.iter().map(|c| c.1.len() as u64).sum::<u64>();
        self.push(Channel::Data, Frame::Chunks { chunks });
    }

    fn maybe_done(&mut self) {
        if self.wants_closed && self.pending.is_empty() && !self.done_sent {
            self.done_sent = true;
            self.push(Channel::Control, Frame::Done { root: self.root });
        }
    }
}

/// Where a chunk's bytes are in the source tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Relative path, '/'-separated raw bytes, shared by a file's chunks.
    pub path: Arc<[u8]>,
    pub offset: u64,
    pub len: u32,
}

/// ChunkId -> first place in a manifest that holds it, for a source driver
/// answering `ReadChunks`.
#[derive(Clone, Debug, Default)]
pub struct ChunkLocator {
    map: HashMap<ChunkId, ChunkLocation>,
}

impl ChunkLocator {
    /// Index every file chunk of `manifest` (hard links point at a file
    /// indexed under its first name).
    pub fn build(manifest: &Manifest) -> Result<ChunkLocator, ManifestError> {
        Self::build_within(manifest, |_| true)
    }

    /// Index only the files of the directories `within` accepts (the root
    /// is always listed): what a sync that fetched those trees can ask for,
    /// found at the cost of the change.
    pub fn build_within(
        manifest: &Manifest,
        within: impl Fn(&TreeId) -> bool,
    ) -> Result<ChunkLocator, ManifestError> {
        let mut me = ChunkLocator::default();
        manifest.walk(|path, e| match e.kind {
            Kind::Dir { tree } => within(&tree),
            _ => {
                me.add_file(path, e);
                true
            }
        })?;
        Ok(me)
    }

    /// Index the chunks of one regular file entry at `path` (other kinds
    /// hold none).
    pub fn add_file(&mut self, path: &[u8], e: &Entry) {
        if let Kind::File { size, hash, chunks } = &e.kind {
            let mut shared: Option<Arc<[u8]>> = None;
            for (id, offset, len) in chunk_spans(*size, *hash, chunks) {
                if self.map.contains_key(&id) {
                    continue;
                }
                let path = shared.get_or_insert_with(|| Arc::from(path)).clone();
                self.map.insert(id, ChunkLocation { path, offset, len });
            }
        }
    }

    fn forget(&mut self, path: &[u8], e: &Entry) {
        if let Kind::File { size, hash, chunks } = &e.kind {
            for (id, _, _) in chunk_spans(*size, *hash, chunks) {
                if self.map.get(&id).is_some_and(|l| *l.path == *path) {
                    self.map.remove(&id);
                }
            }
        }
    }

    /// Follow the tree from `old` (the manifest this index describes) to
    /// `new`, visiting only what changed: entries of removed or rewritten
    /// files are dropped, those of new files added. A chunk that a removed
    /// file shared with a file that stays may drop out of the index: it is
    /// then fetched again, never read from a wrong place.
    pub fn update(&mut self, old: &Manifest, new: &Manifest) -> Result<(), ManifestError> {
        let changes = diff(old, new)?;
        for c in &changes {
            match c {
                Change::Removed { path, entry } => match entry.kind {
                    Kind::Dir { tree } => old.walk_tree(tree, path, |p, e| {
                        self.forget(p, e);
                        true
                    })?,
                    _ => self.forget(path, entry),
                },
                Change::Modified { path, old, .. } => self.forget(path, old),
                Change::Added { .. } => {}
            }
        }
        for c in &changes {
            match c {
                Change::Added { path, entry }
                | Change::Modified {
                    path, new: entry, ..
                } => self.add_file(path, entry),
                Change::Removed { .. } => {}
            }
        }
        Ok(())
    }

    /// Every chunk indexed.
    pub fn ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.map.keys()
    }

    pub fn get(&self, id: &ChunkId) -> Option<&ChunkLocation> {
        self.map.get(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Group `ids` by file, each file's chunks in offset order, so a driver
    /// opens each file once. `Err` names the first id not in the manifest.
    pub fn plan_reads(&self, ids: &[ChunkId]) -> Result<Vec<FileReads>, ChunkId> {
        let mut by_file: HashMap<Arc<[u8]>, FileReads> = HashMap::new();
        for id in ids {
            let loc = self.map.get(id).ok_or(*id)?;
            by_file
                .entry(loc.path.clone())
                .or_insert_with(|| FileReads {
                    path: loc.path.clone(),
                    spans: Vec::new(),
                })
                .spans
                .push((*id, loc.offset, loc.len));
        }
        let mut out: Vec<FileReads> = by_file.into_values().collect();
        out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        for r in &mut out {
            r.spans.sort_unstable_by_key(|s| s.1);
        }
        Ok(out)
    }
}

/// The chunks to read from one file: (id, offset, length) in offset order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileReads {
    pub path: Arc<[u8]>,
    pub spans: Vec<(ChunkId, u64, u32)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_content;
    use crate::manifest::{Entry, Kind};

    fn manifest(files: &[(&[u8], Vec<u8>)]) -> Manifest {
        let mut m = Manifest::empty();
        for (name, data) in files {
            let c = chunk_content(data);
            let e = Entry {
                name: name.to_vec(),
                mode: 0o644,
                mtime_ns: 0,
                uid: 0,
                gid: 0,
                kind: Kind::File {
                    size: c.size,
                    hash: c.hash,
                    chunks: c.chunks,
                },
            };
            m.set_entry(name, Some(e)).unwrap();
        }
        m
    }

    fn located(l: &ChunkLocator) -> Vec<(ChunkId, Vec<u8>, u64)> {
        let mut v: Vec<_> = l
            .map
            .iter()
            .map(|(id, at)| (*id, at.path.to_vec(), at.offset))
            .collect();
        v.sort();
        v
    }

    /// An index that followed a change equals one built afresh: files of a
    /// removed directory, rewritten and removed files are gone from it.
    #[test]
    fn a_locator_follows_changes() {
        let big = |seed: u8| {
            (0..200_000u32)
                .map(|i| (i * 7 + seed as u32) as u8 ^ seed)
                .collect::<Vec<u8>>()
        };
        let old = manifest(&[
            (b"a", big(1)),
            (b"b", b"bee".to_vec()),
            (b"c", b"sea".to_vec()),
        ]);
        let mut new = old.clone();
        let dir = Entry {
            name: b"d".to_vec(),
            mode: 0o755,
            mtime_ns: 0,
            uid: 0,
            gid: 0,
            kind: Kind::Dir {
                tree: new.insert(&crate::manifest::Tree::default()),
            },
        };
        new.set_entry(b"d", Some(dir.clone())).unwrap();
        let moved = manifest(&[(b"x", big(2)), (b"y", b"sea".to_vec())]);
        let mut with_dir = old.clone();
        with_dir.set_entry(b"d", Some(dir)).unwrap();
        for (p, e) in [
            (&b"d/x"[..], moved.lookup(b"x")),
            (b"d/y", moved.lookup(b"y")),
        ] {
            let mut e = e.unwrap().unwrap();
            e.name = p[2..].to_vec();
            with_dir.set_entry(p, Some(e)).unwrap();
        }
        // old -> with_dir: a directory of files added.
        let mut l = ChunkLocator::build(&old).unwrap();
        l.update(&old, &with_dir).unwrap();
        assert_eq!(
            located(&l),
            located(&ChunkLocator::build(&with_dir).unwrap())
        );
        // Only the fetched directories: the root's files and `d`'s when
        // `d` was fetched.
        let d_tree = with_dir.lookup(b"d").unwrap().unwrap().subtree().unwrap();
        let top = ChunkLocator::build_within(&with_dir, |_| false).unwrap();
        let all = ChunkLocator::build_within(&with_dir, |t| *t == d_tree).unwrap();
        assert_eq!(
            located(&all),
            located(&ChunkLocator::build(&with_dir).unwrap())
        );
        assert!(located(&top).iter().all(|(_, p, _)| !p.starts_with(b"d/")));
        assert!(located(&top).len() < located(&all).len());
        // with_dir -> final: the directory removed, `a` rewritten, `b` gone;
        // `c` keeps the content `d/y` had.
        let mut fin = with_dir.clone();
        fin.set_entry(b"d", None).unwrap();
        fin.set_entry(b"b", None).unwrap();
        let mut a = manifest(&[(b"a", big(3))]).lookup(b"a").unwrap().unwrap();
        a.mode = 0o600;
        fin.set_entry(b"a", Some(a)).unwrap();
        l.update(&with_dir, &fin).unwrap();
        assert_eq!(located(&l), located(&ChunkLocator::build(&fin).unwrap()));
    }

    fn served(m: Manifest) -> SourceSession {
        let now = Instant::now();
        let mut s = SourceSession::client("t", "test", m, SourceOptions::default(), now).unwrap();
        assert!(matches!(s.poll_transmit(), Some((_, Frame::Hello { .. }))));
        assert!(matches!(s.poll_transmit(), Some((_, Frame::Offer { .. }))));
        s.handle_frame(
            Frame::Welcome {
                version: PROTOCOL_VERSION,
                sink_root: None,
            },
            now,
        )
        .unwrap();
        s
    }

    #[test]
    fn serves_trees_and_asked_chunks_only() {
        let data = b"hello world".to_vec();
        let m = manifest(&[(b"a", data.clone())]);
        let root = m.root();
        let mut s = served(m);
        let now = Instant::now();
        s.handle_frame(Frame::WantTrees { ids: vec![root] }, now)
            .unwrap();
        let Some((Channel::Control, Frame::Trees { trees })) = s.poll_transmit() else {
            panic!("no trees")
        };
        assert_eq!(trees[0].0, root);
        let id = ChunkId::of(&data);
        s.handle_frame(Frame::WantChunks { ids: vec![id] }, now)
            .unwrap();
        let Some(SourceEvent::ReadChunks(ids)) = s.poll_event() else {
            panic!("no read")
        };
        assert_eq!(ids, vec![id]);
        // Chunks go out as read: checking them is the sink's.
        s.send_chunks(vec![(id, data)]).unwrap();
        assert!(matches!(
            s.poll_transmit(),
            Some((Channel::Data, Frame::Chunks { .. }))
        ));
        // A chunk not asked for (or sent already) is the driver's mistake.
        let err = s.send_chunks(vec![(id, b"x".to_vec())]).unwrap_err();
        assert!(matches!(err, SessionError::Driver(_)));
        assert!(s.is_failed());
        assert!(matches!(
            s.poll_transmit(),
            Some((
                Channel::Control,
                Frame::Error {
                    code: ErrorCode::Internal,
                    ..
                }
            ))
        ));
    }

    #[test]
    fn done_after_last_want_and_finish_on_committed() {
        let data = vec![5u8; 1000];
        let m = manifest(&[(b"a", data.clone())]);
        let snap = m.snapshot();
        let mut s = served(m);
        let now = Instant::now();
        let id = ChunkId::of(&data);
        s.handle_frame(Frame::WantChunks { ids: vec![id] }, now)
            .unwrap();
        s.handle_frame(Frame::WantChunks { ids: vec![] }, now)
            .unwrap();
        assert!(!s.all_sent());
        s.send_chunks(vec![(id, data)]).unwrap();
        assert!(matches!(
            s.poll_transmit(),
            Some((Channel::Data, Frame::Chunks { .. }))
        ));
        assert!(matches!(
            s.poll_transmit(),
            Some((Channel::Control, Frame::Done { .. }))
        ));
        // Asking again, or after the last want, is a protocol error.
        let err = s
            .handle_frame(Frame::WantChunks { ids: vec![id] }, now)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Protocol);
        let mut s2 = served(manifest(&[(b"a", vec![5u8; 1000])]));
        s2.handle_frame(Frame::Committed { root: snap }, now)
            .unwrap();
        assert!(s2.is_finished());
    }

    #[test]
    fn refuses_unknown_and_repeated_requests() {
        let m = manifest(&[(b"a", vec![1; 10])]);
        let root = m.root();
        let now = Instant::now();
        let mut s = served(m.clone());
        let err = s
            .handle_frame(
                Frame::WantTrees {
                    ids: vec![TreeId([9; 32])],
                },
                now,
            )
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnknownTree);
        let mut s = served(m.clone());
        s.handle_frame(Frame::WantTrees { ids: vec![root] }, now)
            .unwrap();
        assert!(s
            .handle_frame(Frame::WantTrees { ids: vec![root] }, now)
            .is_err());
        let mut s = served(m);
        let id = ChunkId([1; 32]);
        s.handle_frame(Frame::WantChunks { ids: vec![id, id] }, now)
            .unwrap_err();
        // Before Welcome, a want is out of order.
        let mut c =
            SourceSession::client("t", "a", Manifest::empty(), SourceOptions::default(), now)
                .unwrap();
        let err = c
            .handle_frame(Frame::WantChunks { ids: vec![id] }, now)
            .unwrap_err();
        assert!(matches!(err, SessionError::Unexpected { .. }));
    }

    #[test]
    fn locator_finds_every_chunk_once() {
        let mut big = vec![0u8; 9 << 20];
        blake3::Hasher::new().finalize_xof().fill(&mut big);
        let m = manifest(&[
            (b"a", big.clone()),
            (b"b", big.clone()),
            (b"c", vec![1; 10]),
        ]);
        let loc = ChunkLocator::build(&m).unwrap();
        let c = chunk_content(&big);
        assert_eq!(loc.len(), c.chunks.len() + 1);
        for r in &c.chunks {
            let l = loc.get(&r.id).unwrap();
            assert_eq!(&*l.path, b"a");
            let piece = &big[l.offset as usize..l.offset as usize + l.len as usize];
            assert_eq!(ChunkId::of(piece), r.id);
        }
        let ids: Vec<ChunkId> = c.chunks.iter().rev().map(|r| r.id).collect();
        let plan = loc.plan_reads(&ids).unwrap();
        assert_eq!(plan.len(), 1);
        assert!(plan[0].spans.windows(2).all(|w| w[0].1 < w[1].1));
        assert_eq!(loc.plan_reads(&[ChunkId([0; 32])]), Err(ChunkId([0; 32])));
    }
}
