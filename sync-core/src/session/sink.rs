//! The sink end of a sync: learns the offered root, fetches the tree
//! objects it lacks top down (skipping every subtree its committed manifest
//! holds), diffs, asks the driver which needed chunks it already holds,
//! requests the rest in a bounded window, verifies each chunk against its
//! id, hands it to the driver to stage, and once every chunk is staged asks
//! the driver to commit. No IO: staging and commit are driver events.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::{check_version, hello, Channel, SessionError, Summary, PARALLEL_TREES};
use crate::chunk::ChunkBytes;
use crate::diff::{self, Change};
use crate::hash::{ChunkId, SnapshotId, TreeId};
use crate::manifest::{Kind, Manifest, ManifestError, Tree, MAX_DEPTH, MAX_TREES};
use crate::wire::{Direction, ErrorCode, Frame, MAX_IDS_PER_MESSAGE, PROTOCOL_VERSION};

/// Flow-control bounds of a sink.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Chunk bytes asked for and not yet staged by the driver.
    pub max_outstanding_bytes: u64,
    /// Chunks asked for and not yet staged.
    pub max_outstanding_chunks: usize,
    /// Tree objects asked for and not yet received.
    pub max_outstanding_trees: usize,
    /// Bytes of tree objects one session may fetch.
    pub max_tree_bytes: u64,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            max_outstanding_bytes: 32 << 20,
            max_outstanding_chunks: 4096,
            max_outstanding_trees: 4096,
            max_tree_bytes: 4 << 30,
        }
    }
}

/// Work for the driver, or the outcome.
#[derive(Debug)]
pub enum SinkEvent {
    /// Which of these (id, length) does the driver lack, in its tree or in
    /// staging? Answer with [`SinkSession::chunks_missing`].
    NeedChunkCheck(Vec<(ChunkId, u32)>),
    /// Chunks verified against their ids: stage them durably, then call
    /// [`SinkSession::chunks_stored`]; only then do they count as held.
    StoreChunks(Vec<(ChunkId, ChunkBytes)>),
    /// Every needed chunk is staged: commit `manifest` (its trees include
    /// the previous snapshot's; `gc` it before keeping it if that matters)
    /// and call [`SinkSession::commit_done`]. `changes` is
    /// `diff(committed, manifest)`, unless the driver took them earlier
    /// ([`SinkSession::take_changes`]).
    Commit {
        manifest: Manifest,
        changes: Vec<Change>,
    },
    Finished(Summary),
    Failed(ErrorCode, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitWelcome,
    AwaitOffer,
    FetchTrees,
    CheckChunks,
    Transfer,
    Committing,
    Finished,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitWelcome => "awaiting welcome",
            State::AwaitOffer => "awaiting offer",
            State::FetchTrees => "fetching trees",
            State::CheckChunks => "checking local chunks",
            State::Transfer => "transferring chunks",
            State::Committing => "committing",
            State::Finished => "finished",
            State::Failed => "failed",
        }
    }
}

/// A chunk asked for: not yet arrived, or arrived and being staged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Asked(u32),
    Staging(u32),
}

/// The receiving end of one sync.
pub struct SinkSession {
    opts: SinkOptions,
    state: State,
    base: Manifest,
    committed: Option<SnapshotId>,
    offered: Option<SnapshotId>,
    incoming: Manifest,
    empty_tree: TreeId,
    /// Trees to ask for, with their depth below the root.
    tree_queue: VecDeque<(TreeId, usize)>,
    tree_pending: HashMap<TreeId, usize>,
    tree_bytes: u64,
    /// Every tree queued, asked for or received in this session.
    trees_seen: HashSet<TreeId>,
    /// Tree objects fetched by an earlier, interrupted session.
    cache: HashMap<TreeId, Arc<[u8]>>,
    /// Tree objects received from the peer in this session.
    fetched: Vec<(TreeId, Arc<[u8]>)>,
    changes: Vec<Change>,
    /// Received trees as decoded when checked, for the diff once all are
    /// here (up to [`DECODED_MAX`] of their encoded bytes).
    decoded: HashMap<TreeId, Tree>,
    decoded_bytes: usize,
    needed: Vec<(ChunkId, u32)>,
    chunk_queue: VecDeque<(ChunkId, u32)>,
    slots: HashMap<ChunkId, Slot>,
    outstanding_bytes: u64,
    wants_closed: bool,
    source_done: bool,
    out: VecDeque<(Channel, Frame)>,
    events: VecDeque<SinkEvent>,
    trees_received: u64,
    chunks_received: u64,
    bytes_received: u64,
    chunks_local: u64,
    files_changed: u64,
    started: Instant,
    last: Instant,
}

/// Encoded bytes of received trees kept decoded for the diff (their decoded
/// form takes a few times more memory); past it, the diff decodes them.
const DECODED_MAX: usize = 16 << 20;

impl SinkSession {
    fn new(committed: Option<Manifest>, opts: SinkOptions, state: State, now: Instant) -> Self {
        let committed_root = committed.as_ref().map(Manifest::snapshot);
        let mut base = committed.unwrap_or_default();
        let empty_tree = base.insert(&Tree::default());
        SinkSession {
            opts,
            state,
            incoming: Manifest::empty(),
            base,
            committed: committed_root,
            offered: None,
            empty_tree,
            tree_queue: VecDeque::new(),
            tree_pending: HashMap::new(),
            tree_bytes: 0,
            trees_seen: HashSet::new(),
            cache: HashMap::new(),
            fetched: Vec::new(),
            changes: Vec::new(),
            decoded: HashMap::new(),
            decoded_bytes: 0,
            needed: Vec::new(),
            chunk_queue: VecDeque::new(),
            slots: HashMap::new(),
            outstanding_bytes: 0,
            wants_closed: false,
            source_done: false,
            out: VecDeque::new(),
            events: VecDeque::new(),
            trees_received: 0,
            chunks_received: 0,
            bytes_received: 0,
            chunks_local: 0,
            files_changed: 0,
            started: now,
            last: now,
        }
    }

    /// Pull client (restore): queues `Hello` and `SinkState` in one flight.
    /// `committed` is the snapshot the sink serves now, if any.
    pub fn client(
        tree: &str,
        client_agent: &str,
        committed: Option<Manifest>,
        opts: SinkOptions,
        now: Instant,
    ) -> Result<Self, SessionError> {
        let hello = hello(tree, client_agent, Direction::Pull)?;
        let mut s = Self::new(committed, opts, State::AwaitWelcome, now);
        s.out.push_back((Channel::Control, hello));
        let root = s.committed;
        s.out
            .push_back((Channel::Control, Frame::SinkState { root }));
        Ok(s)
    }

    /// Push server, after [`super::accept`] read the client's `Hello`:
    /// queues `Welcome` with the committed root, then expects `Offer`.
    pub fn server(committed: Option<Manifest>, opts: SinkOptions, now: Instant) -> Self {
        let mut s = Self::new(committed, opts, State::AwaitOffer, now);
        let sink_root = s.committed;
        s.out.push_back((
            Channel::Control,
            Frame::Welcome {
                version: PROTOCOL_VERSION,
                sink_root,
            },
        ));
        s
    }

    /// Tree objects an earlier, interrupted session fetched (see
    /// [`SinkSession::fetched_trees`]): they are checked against their ids
    /// and walked locally instead of being asked for again. Call before
    /// the `Offer` arrives.
    pub fn seed_trees(&mut self, trees: impl IntoIterator<Item = (TreeId, Arc<[u8]>)>) {
        self.cache.extend(trees);
    }

    /// Tree objects received from the peer so far, verified. A driver may
    /// keep them with its staging area to seed the next session after a
    /// dropped connection.
    pub fn fetched_trees(&self) -> Vec<(TreeId, Arc<[u8]>)> {
        self.fetched.clone()
    }

    /// The root the source offered, once known.
    pub fn offered(&self) -> Option<SnapshotId> {
        self.offered
    }

    /// The offered snapshot's manifest, once all its trees are here and
    /// until it is handed over for the commit (from the
    /// [`SinkEvent::NeedChunkCheck`] on): a driver may plan with it early.
    pub fn incoming(&self) -> Option<&Manifest> {
        matches!(self.state, State::CheckChunks | State::Transfer).then_some(&self.incoming)
    }

    /// Take the changes from the committed snapshot to the offered one,
    /// with the snapshot they lead from, once [`SinkSession::incoming`] is
    /// there: a driver that plans early need not diff again. The
    /// [`SinkEvent::Commit`] then carries none.
    pub fn take_changes(&mut self) -> Option<(SnapshotId, Vec<Change>)> {
        self.incoming()?;
        Some((self.base.snapshot(), std::mem::take(&mut self.changes)))
    }

    /// The root committed before this session.
    pub fn committed_root(&self) -> Option<SnapshotId> {
        self.committed
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

    /// The source said it has sent every wanted chunk.
    pub fn source_done(&self) -> bool {
        self.source_done
    }

    /// When the last input arrived (for the driver's stall timeout).
    pub fn last_activity(&self) -> Instant {
        self.last
    }

    /// Chunk bytes asked for and not yet staged.
    pub fn outstanding_bytes(&self) -> u64 {
        self.outstanding_bytes
    }

    /// Chunks asked for and not yet staged.
    pub fn outstanding_chunks(&self) -> usize {
        self.slots.len()
    }

    /// Chunks still to be asked for.
    pub fn queued_chunks(&self) -> usize {
        self.chunk_queue.len()
    }

    /// Counters so far.
    pub fn summary(&self) -> Summary {
        Summary {
            root: self
                .offered
                .or(self.committed)
                .unwrap_or(SnapshotId([0; 32])),
            unchanged: self.offered.is_some() && self.offered == self.committed,
            trees_sent: 0,
            trees_received: self.trees_received,
            chunks_sent: 0,
            chunks_received: self.chunks_received,
            bytes_sent: 0,
            bytes_received: self.bytes_received,
            chunks_local: self.chunks_local,
            files_changed: self.files_changed,
            elapsed: self.last.saturating_duration_since(self.started),
        }
    }

    /// A frame from the peer. `Err` means the session failed: an `Error`
    /// frame and a `Failed` event are queued. Input after the end is ignored.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), SessionError> {
        match frame {
            Frame::Chunks { chunks } => {
                let chunks = chunks.into_iter().map(|(id, d)| (id, d.into())).collect();
                self.handle_chunks(chunks, now)
            }
            frame => self.input(now, |s| s.on_frame(frame)),
        }
    }

    /// The chunks of a `Chunks` frame, as a data stream's decoder gives
    /// them (see [`crate::wire::ChunkDecoder`]).
    pub fn handle_chunks(
        &mut self,
        chunks: Vec<(ChunkId, ChunkBytes)>,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.input(now, |s| match s.state {
            State::Transfer => s.on_chunks(chunks),
            state => Err(SessionError::Unexpected {
                frame: "Chunks",
                state: state.name(),
            }),
        })
    }

    /// Input from the peer at `now`, ignored after the end; an error fails
    /// the session.
    fn input(
        &mut self,
        now: Instant,
        f: impl FnOnce(&mut Self) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        self.last = self.last.max(now);
        f(self).map_err(|e| self.fail(e))
    }

    /// Answer to [`SinkEvent::NeedChunkCheck`]: the ids the driver lacks.
    pub fn chunks_missing(&mut self, missing: Vec<ChunkId>) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        self.on_missing(missing).map_err(|e| self.fail(e))
    }

    /// Answer to [`SinkEvent::StoreChunks`]: these are durably staged.
    pub fn chunks_stored(&mut self, ids: Vec<ChunkId>) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        self.on_stored(ids).map_err(|e| self.fail(e))
    }

    /// Answer to [`SinkEvent::Commit`]: the committed root, or why not.
    pub fn commit_done(&mut self, result: Result<SnapshotId, String>) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        self.on_commit_done(result).map_err(|e| self.fail(e))
    }

    /// The driver gives up (disk full, shutdown): tell the peer.
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
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SinkEvent> {
        self.events.pop_front()
    }

    fn send(&mut self, f: Frame) {
        self.out.push_back((Channel::Control, f));
    }

    fn fail(&mut self, e: SessionError) -> SessionError {
        tracing::debug!(error = %e, "sink session failed");
        self.out.clear();
        self.events.clear();
        if !matches!(e, SessionError::Peer { .. }) {
            self.send(e.to_frame());
        }
        self.state = State::Failed;
        self.events
            .push_back(SinkEvent::Failed(e.code(), e.to_string()));
        e
    }

    fn finish(&mut self, root: SnapshotId) {
        self.send(Frame::Committed { root });
        self.state = State::Finished;
        let summary = self.summary();
        self.events.push_back(SinkEvent::Finished(summary));
    }

    fn unexpected(&self, frame: &Frame) -> SessionError {
        SessionError::Unexpected {
            frame: frame.name(),
            state: self.state.name(),
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        match (self.state, frame) {
            (_, Frame::Error { code, message }) => Err(SessionError::Peer { code, message }),
            (State::AwaitWelcome, Frame::Welcome { version, .. }) => {
                check_version(version)?;
                self.state = State::AwaitOffer;
                Ok(())
            }
            (State::AwaitOffer, Frame::Offer { root }) => self.on_offer(root),
            (State::FetchTrees, Frame::Trees { trees }) => self.on_trees(trees),
            (State::Transfer | State::Committing, Frame::Done { root }) if self.wants_closed => {
                if Some(root) != self.offered {
                    return Err(SessionError::WrongRoot {
                        expected: self.offered.unwrap_or(SnapshotId([0; 32])),
                        got: root,
                    });
                }
                if self.source_done {
                    return Err(SessionError::Unexpected {
                        frame: "Done",
                        state: "after done",
                    });
                }
                self.source_done = true;
                Ok(())
            }
            (_, other) => Err(self.unexpected(&other)),
        }
    }

    fn on_offer(&mut self, root: SnapshotId) -> Result<(), SessionError> {
        self.offered = Some(root);
        if self.committed == Some(root) {
            self.finish(root);
            return Ok(());
        }
        self.incoming = self.base.clone();
        self.state = State::FetchTrees;
        self.want_tree(root.into(), 0)?;
        self.pump_trees();
        self.trees_complete_if_done()
    }

    /// Queue a tree for fetching unless the committed manifest holds it
    /// (and so its whole subtree) or it was asked for already. A cached
    /// tree is taken from the cache and its children are wanted in turn.
    /// A chain nested deeper than the limit is refused while fetching,
    /// before it costs more than `MAX_DEPTH` round trips.
    fn want_tree(&mut self, id: TreeId, depth: usize) -> Result<(), SessionError> {
        let mut stack = vec![(id, depth)];
        while let Some((id, depth)) = stack.pop() {
            if id == self.empty_tree || self.base.contains_tree(&id) {
                continue;
            }
            if !self.trees_seen.insert(id) {
                continue;
            }
            if depth > MAX_DEPTH {
                return Err(SessionError::BadTree {
                    id,
                    reason: format!("nests deeper than {MAX_DEPTH} levels"),
                });
            }
            if let Some(bytes) = self.cache.get(&id).cloned() {
                if let Ok(tree) = self.incoming.insert_raw(id, &bytes) {
                    let subs = tree.entries.iter().filter_map(|e| e.subtree());
                    stack.extend(subs.map(|t| (t, depth + 1)));
                    continue;
                }
            }
            self.tree_queue.push_back((id, depth));
        }
        Ok(())
    }

    fn pump_trees(&mut self) {
        while !self.tree_queue.is_empty()
            && self.tree_pending.len() < self.opts.max_outstanding_trees
        {
            let room = (self.opts.max_outstanding_trees - self.tree_pending.len())
                .min(MAX_IDS_PER_MESSAGE);
            let n = room.min(self.tree_queue.len());
            let batch: Vec<(TreeId, usize)> = self.tree_queue.drain(..n).collect();
            self.tree_pending.extend(batch.iter().copied());
            let ids: Vec<TreeId> = batch.into_iter().map(|t| t.0).collect();
            self.send(Frame::WantTrees { ids });
        }
    }

    fn on_trees(&mut self, trees: Vec<(TreeId, Vec<u8>)>) -> Result<(), SessionError> {
        // Each one asked for, all within the budget, before any is decoded.
        let mut depths = Vec::with_capacity(trees.len());
        for (id, bytes) in &trees {
            let Some(depth) = self.tree_pending.remove(id) else {
                return Err(SessionError::NotRequested {
                    what: "tree",
                    id: id.to_string(),
                });
            };
            self.tree_bytes += bytes.len() as u64;
            if self.tree_bytes > self.opts.max_tree_bytes {
                return Err(SessionError::TooLarge(format!(
                    "more than {} bytes of tree objects",
                    self.opts.max_tree_bytes
                )));
            }
            depths.push(depth);
        }
        // Checked, decoded and compressed on every core: the fetch of a
        // large tree's objects is on the way to its first chunk.
        let checked: Vec<_> = {
            use rayon::prelude::*;
            let check = |(id, bytes): &(TreeId, Vec<u8>)| Manifest::check_raw(*id, bytes);
            match trees.len() < PARALLEL_TREES {
                true => trees.iter().map(check).collect(),
                false => trees.par_iter().map(check).collect(),
            }
        };
        for (((id, bytes), depth), checked) in trees.into_iter().zip(depths).zip(checked) {
            let checked = checked.map_err(|e| SessionError::BadTree {
                id,
                reason: e.to_string(),
            })?;
            let tree = self.incoming.insert_checked(checked);
            self.trees_received += 1;
            let len = bytes.len();
            // Kept as received (checked above) for a resumed fetch: not
            // read back out of the manifest, which holds it compressed.
            self.fetched.push((id, bytes.into()));
            if self.trees_received as usize > MAX_TREES {
                return Err(SessionError::TooLarge(format!(
                    "more than {MAX_TREES} tree objects"
                )));
            }
            for sub in tree.entries.iter().filter_map(|e| e.subtree()) {
                self.want_tree(sub, depth + 1)?;
            }
            if self.decoded_bytes + len <= DECODED_MAX {
                self.decoded_bytes += len;
                self.decoded.insert(id, tree);
            }
        }
        self.pump_trees();
        self.trees_complete_if_done()
    }

    fn trees_complete_if_done(&mut self) -> Result<(), SessionError> {
        if !self.tree_pending.is_empty() || !self.tree_queue.is_empty() {
            return Ok(());
        }
        let root = self.offered.expect("offer precedes tree fetch");
        self.incoming
            .set_root(root.into())
            .map_err(|e| SessionError::Manifest(e.to_string()))?;
        self.decoded_bytes = 0;
        let decoded = std::mem::take(&mut self.decoded);
        let changes =
            diff::diff_decoded(&self.base, &self.incoming, decoded).map_err(|e| match e {
                ManifestError::MissingTree(_) => SessionError::Manifest(e.to_string()),
                other => SessionError::BadTree {
                    id: root.into(),
                    reason: other.to_string(),
                },
            })?;
        self.files_changed = changes
            .iter()
            .filter(|c| match c {
                Change::Added { entry, .. } => matches!(entry.kind, Kind::File { .. }),
                Change::Modified { new, .. } => matches!(new.kind, Kind::File { .. }),
                Change::Removed { .. } => false,
            })
            .count() as u64;
        self.needed = diff::missing_chunks(&changes, |_| false);
        self.changes = changes;
        self.state = State::CheckChunks;
        if self.needed.is_empty() {
            self.on_missing(Vec::new())
        } else {
            self.events
                .push_back(SinkEvent::NeedChunkCheck(self.needed.clone()));
            Ok(())
        }
    }

    fn on_missing(&mut self, missing: Vec<ChunkId>) -> Result<(), SessionError> {
        if self.state != State::CheckChunks {
            return Err(SessionError::Driver(format!(
                "chunks_missing while {}",
                self.state.name()
            )));
        }
        let mut missing: HashSet<ChunkId> = missing.into_iter().collect();
        let needed = std::mem::take(&mut self.needed);
        let total = needed.len();
        // Keep first-use order so files complete early in the stream.
        self.chunk_queue = needed
            .into_iter()
            .filter(|(id, _)| missing.remove(id))
            .collect();
        if let Some(id) = missing.into_iter().next() {
            return Err(SessionError::Driver(format!(
                "chunk {id} reported missing was never asked about"
            )));
        }
        self.chunks_local = (total - self.chunk_queue.len()) as u64;
        self.state = State::Transfer;
        self.pump_chunks();
        self.commit_if_done();
        Ok(())
    }

    /// Ask for more chunks once the window has drained to half, so wants go
    /// out in large batches; close the wants when the queue is empty.
    fn pump_chunks(&mut self) {
        if self.wants_closed {
            return;
        }
        let max_bytes = self.opts.max_outstanding_bytes;
        let max_ids = self.opts.max_outstanding_chunks.max(1);
        let busy = !self.slots.is_empty()
            && (self.outstanding_bytes > max_bytes / 2 || self.slots.len() > max_ids / 2);
        if !busy {
            let mut batch = Vec::new();
            while let Some(&(id, len)) = self.chunk_queue.front() {
                let full = self.slots.len() >= max_ids
                    || (!self.slots.is_empty() && self.outstanding_bytes + len as u64 > max_bytes);
                if full {
                    break;
                }
                self.chunk_queue.pop_front();
                self.slots.insert(id, Slot::Asked(len));
                self.outstanding_bytes += len as u64;
                batch.push(id);
                if batch.len() == MAX_IDS_PER_MESSAGE {
                    self.send(Frame::WantChunks {
                        ids: std::mem::take(&mut batch),
                    });
                }
            }
            if !batch.is_empty() {
                self.send(Frame::WantChunks { ids: batch });
            }
        }
        if self.chunk_queue.is_empty() {
            self.wants_closed = true;
            self.send(Frame::WantChunks { ids: Vec::new() });
        }
    }

    fn on_chunks(&mut self, chunks: Vec<(ChunkId, ChunkBytes)>) -> Result<(), SessionError> {
        for (id, data) in &chunks {
            let len = match self.slots.get(id) {
                Some(Slot::Asked(len)) => *len,
                Some(Slot::Staging(_)) => {
                    return Err(SessionError::Duplicate {
                        what: "chunk",
                        id: id.to_string(),
                    })
                }
                None => {
                    return Err(SessionError::NotRequested {
                        what: "chunk",
                        id: id.to_string(),
                    })
                }
            };
            if data.hash() != *id {
                return Err(SessionError::BadChunk {
                    id: *id,
                    reason: "content does not match its hash (a source file \
                             changed since its scan? the next push rescans it)"
                        .into(),
                });
            }
            if data.len() != len as usize {
                return Err(SessionError::BadChunk {
                    id: *id,
                    reason: format!("{} bytes, the manifest says {len}", data.len()),
                });
            }
            self.slots.insert(*id, Slot::Staging(len));
        }
        self.chunks_received += chunks.len() as u64;
        self.bytes_received += chunks.iter().map(|c| c.1.len() as u64).sum::<u64>();
        self.events.push_back(SinkEvent::StoreChunks(chunks));
        Ok(())
    }

    fn on_stored(&mut self, ids: Vec<ChunkId>) -> Result<(), SessionError> {
        for id in ids {
            match self.slots.get(&id) {
                Some(Slot::Staging(len)) => {
                    self.outstanding_bytes -= *len as u64;
                    self.slots.remove(&id);
                }
                _ => {
                    return Err(SessionError::Driver(format!(
                        "chunk {id} reported stored was not handed out for staging"
                    )))
                }
            }
        }
        self.pump_chunks();
        self.commit_if_done();
        Ok(())
    }

    fn commit_if_done(&mut self) {
        if self.state == State::Transfer
            && self.wants_closed
            && self.slots.is_empty()
            && self.chunk_queue.is_empty()
        {
            self.state = State::Committing;
            let manifest = std::mem::take(&mut self.incoming);
            let changes = std::mem::take(&mut self.changes);
            self.events
                .push_back(SinkEvent::Commit { manifest, changes });
        }
    }

    fn on_commit_done(&mut self, result: Result<SnapshotId, String>) -> Result<(), SessionError> {
        if self.state != State::Committing {
            return Err(SessionError::Driver(format!(
                "commit_done while {}",
                self.state.name()
            )));
        }
        let root = result.map_err(SessionError::CommitFailed)?;
        if Some(root) != self.offered {
            return Err(SessionError::CommitFailed(format!(
                "committed {root}, expected {}",
                self.offered.map(|r| r.to_string()).unwrap_or_default()
            )));
        }
        self.finish(root);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;

    fn file(name: &[u8], content: &[u8]) -> Entry {
        let c = crate::chunk::chunk_content(content);
        Entry {
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
        }
    }

    fn offered(m: &Manifest) -> SinkSession {
        let now = Instant::now();
        let mut s = SinkSession::server(None, SinkOptions::default(), now);
        assert!(matches!(
            s.poll_transmit(),
            Some((_, Frame::Welcome { .. }))
        ));
        s.handle_frame(Frame::Offer { root: m.snapshot() }, now)
            .unwrap();
        s
    }

    #[test]
    fn unchanged_root_is_committed_at_once() {
        let mut m = Manifest::empty();
        m.set_entry(b"a", Some(file(b"a", b"x"))).unwrap();
        let now = Instant::now();
        let mut s = SinkSession::server(Some(m.clone()), SinkOptions::default(), now);
        s.poll_transmit();
        s.handle_frame(Frame::Offer { root: m.snapshot() }, now)
            .unwrap();
        assert!(matches!(
            s.poll_transmit(),
            Some((_, Frame::Committed { .. }))
        ));
        assert!(matches!(
            s.poll_event(),
            Some(SinkEvent::Finished(Summary {
                unchanged: true,
                ..
            }))
        ));
    }

    #[test]
    fn fetches_verifies_and_commits() {
        let mut m = Manifest::empty();
        m.set_entry(b"a", Some(file(b"a", b"hello"))).unwrap();
        let mut s = offered(&m);
        let now = Instant::now();
        let Some((_, Frame::WantTrees { ids })) = s.poll_transmit() else {
            panic!()
        };
        assert_eq!(ids, vec![m.root()]);
        // A tree under another id is bad data.
        let mut bad = offered(&m);
        bad.poll_transmit();
        let other = Tree::default().encode();
        let err = bad
            .handle_frame(
                Frame::Trees {
                    trees: vec![(m.root(), other)],
                },
                now,
            )
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadData);

        let raw = m.raw(&m.root()).unwrap().to_vec();
        s.handle_frame(
            Frame::Trees {
                trees: vec![(m.root(), raw)],
            },
            now,
        )
        .unwrap();
        let id = ChunkId::of(b"hello");
        let Some(SinkEvent::NeedChunkCheck(need)) = s.poll_event() else {
            panic!()
        };
        assert_eq!(need, vec![(id, 5)]);
        s.chunks_missing(vec![id]).unwrap();
        assert!(
            matches!(s.poll_transmit(), Some((_, Frame::WantChunks { ids })) if ids == vec![id])
        );
        assert!(
            matches!(s.poll_transmit(), Some((_, Frame::WantChunks { ids })) if ids.is_empty())
        );
        // A corrupted chunk is refused.
        let mut s2 = offered(&m);
        s2.poll_transmit();
        s2.handle_frame(
            Frame::Trees {
                trees: vec![(m.root(), m.raw(&m.root()).unwrap().to_vec())],
            },
            now,
        )
        .unwrap();
        s2.chunks_missing(vec![id]).unwrap();
        let err = s2
            .handle_frame(
                Frame::Chunks {
                    chunks: vec![(id, b"HELLO".to_vec())],
                },
                now,
            )
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadData);
        // So is one in pieces (as a data stream hands them over).
        let pieces = |parts: &[&'static [u8]]| {
            let mut c = ChunkBytes::default();
            parts
                .iter()
                .for_each(|p| c.push(bytes::Bytes::from_static(p)));
            c
        };
        let mut s3 = offered(&m);
        s3.poll_transmit();
        let early = s3.handle_chunks(vec![(id, pieces(&[b"hello"]))], now);
        assert!(matches!(early, Err(SessionError::Unexpected { .. })));
        let mut s4 = offered(&m);
        s4.poll_transmit();
        s4.handle_frame(
            Frame::Trees {
                trees: vec![(m.root(), m.raw(&m.root()).unwrap().to_vec())],
            },
            now,
        )
        .unwrap();
        s4.chunks_missing(vec![id]).unwrap();
        let err = s4
            .handle_chunks(vec![(id, pieces(&[b"hel", b"LO"]))], now)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadData);

        s.handle_chunks(vec![(id, pieces(&[b"he", b"llo"]))], now)
            .unwrap();
        let Some(SinkEvent::StoreChunks(c)) = s.poll_event() else {
            panic!()
        };
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1.parts().len(), 2, "handed on in its pieces");
        assert_eq!(s.outstanding_chunks(), 1);
        s.chunks_stored(vec![id]).unwrap();
        let Some(SinkEvent::Commit { manifest, changes }) = s.poll_event() else {
            panic!()
        };
        assert_eq!(manifest.snapshot(), m.snapshot());
        assert_eq!(changes.len(), 1);
        s.commit_done(Ok(m.snapshot())).unwrap();
        assert!(matches!(
            s.poll_transmit(),
            Some((_, Frame::Committed { .. }))
        ));
        let Some(SinkEvent::Finished(sum)) = s.poll_event() else {
            panic!()
        };
        assert_eq!(
            (sum.chunks_received, sum.bytes_received, sum.files_changed),
            (1, 5, 1)
        );
    }

    /// A driver planning early takes the session's changes instead of
    /// diffing again; the commit then carries none.
    #[test]
    fn changes_are_handed_out_once_the_trees_are_here() {
        let mut base = Manifest::empty();
        base.set_entry(b"old", Some(file(b"old", b"x"))).unwrap();
        let mut m = base.clone();
        m.set_entry(b"a", Some(file(b"a", b"hello"))).unwrap();
        m.gc();
        let now = Instant::now();
        let mut s = SinkSession::server(Some(base.clone()), SinkOptions::default(), now);
        s.poll_transmit();
        s.handle_frame(Frame::Offer { root: m.snapshot() }, now)
            .unwrap();
        assert!(s.take_changes().is_none(), "no trees yet");
        let Some((_, Frame::WantTrees { ids })) = s.poll_transmit() else {
            panic!()
        };
        let trees = ids.iter().map(|id| (*id, m.raw(id).unwrap())).collect();
        s.handle_frame(Frame::Trees { trees }, now).unwrap();
        let (from, changes) = s.take_changes().expect("the trees are here");
        assert_eq!(from, base.snapshot());
        assert_eq!(changes, diff::diff(&base, &m).unwrap());
        assert_eq!(changes.len(), 1);
        let id = ChunkId::of(b"hello");
        s.chunks_missing(vec![id]).unwrap();
        s.handle_frame(
            Frame::Chunks {
                chunks: vec![(id, b"hello".to_vec())],
            },
            now,
        )
        .unwrap();
        while let Some(ev) = s.poll_event() {
            if matches!(ev, SinkEvent::StoreChunks(_)) {
                s.chunks_stored(vec![id]).unwrap();
            }
            if let SinkEvent::Commit { manifest, changes } = ev {
                assert_eq!(manifest.snapshot(), m.snapshot());
                assert!(changes.is_empty(), "taken by the driver");
                return;
            }
        }
        panic!("no commit");
    }

    #[test]
    fn commit_failure_is_reported_to_the_peer() {
        let m = Manifest::empty();
        let mut base = Manifest::empty();
        base.set_entry(b"a", Some(file(b"a", b"x"))).unwrap();
        let now = Instant::now();
        let mut s = SinkSession::server(Some(base), SinkOptions::default(), now);
        s.poll_transmit();
        // The empty tree needs no fetch and no chunk.
        s.handle_frame(Frame::Offer { root: m.snapshot() }, now)
            .unwrap();
        assert!(
            matches!(s.poll_transmit(), Some((_, Frame::WantChunks { ids })) if ids.is_empty())
        );
        let Some(SinkEvent::Commit { changes, .. }) = s.poll_event() else {
            panic!()
        };
        assert_eq!(changes.len(), 1);
        let err = s.commit_done(Err("disk full".into())).unwrap_err();
        assert_eq!(err.code(), ErrorCode::CommitFailed);
        assert!(matches!(
            s.poll_transmit(),
            Some((
                _,
                Frame::Error {
                    code: ErrorCode::CommitFailed,
                    ..
                }
            ))
        ));
    }

    #[test]
    fn window_bounds_outstanding_chunks() {
        let mut m = Manifest::empty();
        for i in 0..50u32 {
            let name = format!("f{i}");
            m.set_entry(
                name.as_bytes(),
                Some(file(name.as_bytes(), &i.to_le_bytes())),
            )
            .unwrap();
        }
        let now = Instant::now();
        let opts = SinkOptions {
            max_outstanding_chunks: 8,
            ..SinkOptions::default()
        };
        let mut s = SinkSession::server(None, opts, now);
        s.poll_transmit();
        s.handle_frame(Frame::Offer { root: m.snapshot() }, now)
            .unwrap();
        s.poll_transmit();
        s.handle_frame(
            Frame::Trees {
                trees: vec![(m.root(), m.raw(&m.root()).unwrap().to_vec())],
            },
            now,
        )
        .unwrap();
        let Some(SinkEvent::NeedChunkCheck(need)) = s.poll_event() else {
            panic!()
        };
        s.chunks_missing(need.iter().map(|c| c.0).collect())
            .unwrap();
        let Some((_, Frame::WantChunks { ids })) = s.poll_transmit() else {
            panic!()
        };
        assert_eq!(ids.len(), 8);
        assert_eq!(s.outstanding_chunks(), 8);
        assert!(s.poll_transmit().is_none());
    }
}
