//! A deterministic in-memory two-peer harness (after quinn-proto's `Pair`):
//! drives a `SourceSession` and a `SinkSession` through the real encoder
//! and decoder, over one ordered control stream and several data streams
//! per direction, and can drop the connection after any frame, reorder
//! data streams, deliver byte by byte and delay staging. The fake sink
//! store persists across sessions, like a real staging area does.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_core::chunk::{chunk_content, chunk_spans};
use sync_core::diff;
use sync_core::manifest::{Entry, Kind, Manifest, Tree};
use sync_core::session::{
    accept, reject, Channel, ChunkLocator, SessionError, SinkEvent, SinkOptions, SinkSession,
    SourceEvent, SourceOptions, SourceSession, Summary,
};
use sync_core::wire::{encode, Direction, ErrorCode, Frame, FrameDecoder, FrameType};
use sync_core::{ChunkId, SnapshotId, TreeId};

const TREE: &str = "dlrn";

// ---------------------------------------------------------------- data

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 0
    }
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x1000_0001));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&r.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Dir,
}

/// A source tree: relative path -> node.
#[derive(Clone, Default)]
struct Files(BTreeMap<Vec<u8>, Node>);

impl Files {
    fn file(&mut self, path: impl AsRef<str>, content: Vec<u8>) {
        self.0
            .insert(path.as_ref().as_bytes().to_vec(), Node::File(content));
    }
    fn symlink(&mut self, path: impl AsRef<str>, target: impl AsRef<str>) {
        self.0.insert(
            path.as_ref().as_bytes().to_vec(),
            Node::Symlink(target.as_ref().as_bytes().to_vec()),
        );
    }
    fn dir(&mut self, path: impl AsRef<str>) {
        self.0.insert(path.as_ref().as_bytes().to_vec(), Node::Dir);
    }
    fn content(&self, path: &[u8]) -> Option<&Vec<u8>> {
        match self.0.get(path) {
            Some(Node::File(c)) => Some(c),
            _ => None,
        }
    }
}

fn entry(name: &[u8], kind: Kind, mode: u32) -> Entry {
    Entry {
        name: name.to_vec(),
        mode,
        mtime_ns: 1_700_000_000_000_000_000,
        uid: 1000,
        gid: 1000,
        kind,
    }
}

fn empty_dir(name: &[u8]) -> Entry {
    entry(
        name,
        Kind::Dir {
            tree: Tree::default().id(),
        },
        0o755,
    )
}

fn build_manifest(files: &Files) -> Manifest {
    let mut m = Manifest::empty();
    let mut dirs: HashSet<Vec<u8>> = HashSet::new();
    for (path, node) in &files.0 {
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        let mut prefix = Vec::new();
        for c in &comps[..comps.len() - 1] {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(c);
            if dirs.insert(prefix.clone()) {
                m.set_entry(&prefix, Some(empty_dir(c))).unwrap();
            }
        }
        let name = comps[comps.len() - 1];
        let e = match node {
            Node::File(content) => {
                let c = chunk_content(content);
                entry(
                    name,
                    Kind::File {
                        size: c.size,
                        hash: c.hash,
                        chunks: c.chunks,
                    },
                    0o644,
                )
            }
            Node::Symlink(t) => entry(name, Kind::Symlink { target: t.clone() }, 0o777),
            Node::Dir => {
                if !dirs.insert(path.clone()) {
                    continue;
                }
                empty_dir(name)
            }
        };
        m.set_entry(path, Some(e)).unwrap();
    }
    m.gc();
    m
}

/// A DLRN-like tree: one hashed directory per built commit holding RPMs
/// (some of several chunks), repodata, a log, a package shared by every
/// commit and relative symlinks; top-level symlinks name the newest.
fn dlrn(commits: std::ops::Range<u64>) -> Files {
    let mut f = Files::default();
    let shared_big = data(1, 4_700_000);
    let shared_small = data(2, 30_000);
    let mut last = String::new();
    for c in commits {
        let h = format!("{:016x}", Rng(c).next());
        let dir = format!("repos/{}/{}/{}_el9", &h[..2], &h[2..4], h);
        f.file(format!("{dir}/common-lib-1.0.rpm"), shared_big.clone());
        f.file(format!("{dir}/python3-common.rpm"), shared_small.clone());
        f.file(
            format!("{dir}/pkg-{c}.rpm"),
            data(100 + c, 300_000 + (c as usize % 4) * 60_000),
        );
        f.file(
            format!("{dir}/repodata/repomd.xml"),
            format!("<repomd revision=\"{c}\"/>").into_bytes(),
        );
        f.file(format!("{dir}/build.log"), data(200 + c, 40_000));
        f.symlink(format!("{dir}/common.rpm"), "common-lib-1.0.rpm");
        last = dir;
    }
    f.symlink("current", &last);
    f.symlink("consistent", &last);
    f.file("README", b"a mirror\n".to_vec());
    f.file("empty-file", Vec::new());
    f.dir("empty-dir");
    f
}

// ---------------------------------------------------------------- hosts

struct SourceHost {
    files: Files,
    manifest: Manifest,
    locator: ChunkLocator,
}

impl SourceHost {
    fn new(files: Files) -> SourceHost {
        let manifest = build_manifest(&files);
        let locator = ChunkLocator::build(&manifest).unwrap();
        SourceHost {
            files,
            manifest,
            locator,
        }
    }

    fn read(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let loc = self.locator.get(id)?;
        let content = self.files.content(&loc.path)?;
        let (o, l) = (loc.offset as usize, loc.len as usize);
        content.get(o..o + l).map(<[u8]>::to_vec)
    }

    fn distinct_chunks(&self) -> HashSet<ChunkId> {
        all_chunks(&self.manifest)
    }
}

fn all_chunks(m: &Manifest) -> HashSet<ChunkId> {
    let mut out = HashSet::new();
    m.walk(|_, e| {
        if let Kind::File { size, hash, chunks } = &e.kind {
            out.extend(chunk_spans(*size, *hash, chunks).map(|s| s.0));
        }
        true
    })
    .unwrap();
    out
}

/// The sink's disk: committed snapshot plus every chunk it holds (in the
/// tree or staged), which survives dropped connections.
#[derive(Default)]
struct SinkHost {
    committed: Option<Manifest>,
    chunks: HashMap<ChunkId, Vec<u8>>,
    commits: u32,
    fail_commit: bool,
    /// Tree objects fetched by interrupted sessions, kept with staging.
    trees: HashMap<TreeId, Arc<[u8]>>,
}

impl SinkHost {
    /// Rebuild every file of the committed snapshot and compare.
    fn assert_mirrors(&self, src: &SourceHost) {
        let m = self.committed.as_ref().expect("a committed snapshot");
        assert_eq!(m.snapshot(), src.manifest.snapshot());
        let mut files = 0;
        m.walk(|path, e| {
            match &e.kind {
                Kind::File { size, hash, chunks } => {
                    let mut content = Vec::new();
                    for (id, _, _) in chunk_spans(*size, *hash, chunks) {
                        content.extend_from_slice(&self.chunks[&id]);
                    }
                    assert_eq!(Some(&content), src.files.content(path), "{path:?}");
                    files += 1;
                }
                Kind::Symlink { target } => {
                    assert_eq!(src.files.0.get(path), Some(&Node::Symlink(target.clone())));
                }
                _ => {}
            }
            true
        })
        .unwrap();
        assert!(files > 0);
    }
}

// ---------------------------------------------------------------- the pair

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Push,
    Pull,
}

/// Direction of travel, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToSink = 0,
    ToSource = 1,
}

#[derive(Clone)]
struct Config {
    mode: Mode,
    data_streams: usize,
    /// Deliver a random stream's head instead of the oldest frame.
    reorder: bool,
    byte_at_a_time: bool,
    /// Chunks the source driver reads per `send_chunks` call.
    read_batch: usize,
    /// Stage received chunks only some steps later.
    store_lag: bool,
    sink: SinkOptions,
    seed: u64,
}

impl Config {
    fn new(mode: Mode) -> Config {
        Config {
            mode,
            data_streams: 1,
            reorder: false,
            byte_at_a_time: false,
            read_batch: usize::MAX,
            store_lag: false,
            sink: SinkOptions::default(),
            seed: 1,
        }
    }

    /// Small windows and batches: many frames, many points to cut at.
    fn choppy(mode: Mode) -> Config {
        Config {
            data_streams: 3,
            read_batch: 3,
            store_lag: true,
            sink: SinkOptions {
                max_outstanding_bytes: 1 << 20,
                max_outstanding_chunks: 8,
                max_outstanding_trees: 3,
                ..SinkOptions::default()
            },
            ..Config::new(mode)
        }
    }
}

struct Link {
    control: VecDeque<(u64, Vec<u8>, Frame)>,
    data: Vec<VecDeque<(u64, Vec<u8>, Frame)>>,
    decoders: Vec<FrameDecoder>,
    next_data: usize,
}

impl Link {
    fn new(streams: usize) -> Link {
        Link {
            control: VecDeque::new(),
            data: (0..streams).map(|_| VecDeque::new()).collect(),
            decoders: (0..=streams).map(|_| FrameDecoder::new()).collect(),
            next_data: 0,
        }
    }
    fn queue(&mut self, i: usize) -> &mut VecDeque<(u64, Vec<u8>, Frame)> {
        if i == 0 {
            &mut self.control
        } else {
            &mut self.data[i - 1]
        }
    }
    fn streams(&self) -> usize {
        self.data.len() + 1
    }
}

#[derive(Debug)]
enum Outcome {
    Done {
        source: Summary,
        sink: Summary,
    },
    Cut,
    Failed {
        source: Option<(ErrorCode, String)>,
        sink: Option<(ErrorCode, String)>,
    },
}

/// What one run put on the wire.
#[derive(Default, Debug)]
struct Log {
    /// (direction, type, encoded bytes) in transmit order.
    sent: Vec<(Dir, FrameType, usize)>,
    chunks_sent: Vec<ChunkId>,
    delivered: [usize; 2],
}

impl Log {
    fn bytes(&self) -> usize {
        self.sent.iter().map(|s| s.2).sum()
    }
    fn count(&self, t: FrameType) -> usize {
        self.sent.iter().filter(|s| s.1 == t).count()
    }
    /// Maximal runs of frames sent in one direction.
    fn flights(&self) -> usize {
        let mut n = 0;
        let mut last = None;
        for s in &self.sent {
            if last != Some(s.0) {
                n += 1;
                last = Some(s.0);
            }
        }
        n
    }
}

struct Pair<'a> {
    cfg: Config,
    rng: Rng,
    src: &'a SourceHost,
    host: &'a mut SinkHost,
    source: Option<SourceSession>,
    sink: Option<SinkSession>,
    links: [Link; 2],
    seq: u64,
    now: Instant,
    reads: VecDeque<ChunkId>,
    unstaged: Vec<(ChunkId, Vec<u8>)>,
    held_at_start: HashSet<ChunkId>,
    asked: HashSet<ChunkId>,
    source_out: Option<Result<Summary, (ErrorCode, String)>>,
    sink_out: Option<Result<Summary, (ErrorCode, String)>>,
    log: Log,
}

impl<'a> Pair<'a> {
    fn new(cfg: Config, src: &'a SourceHost, host: &'a mut SinkHost) -> Pair<'a> {
        let now = Instant::now();
        let (mut source, mut sink) = (None, None);
        match cfg.mode {
            Mode::Push => {
                source = Some(
                    SourceSession::client(
                        TREE,
                        "harness",
                        src.manifest.clone(),
                        SourceOptions::default(),
                        now,
                    )
                    .unwrap(),
                )
            }
            Mode::Pull => {
                let mut s = SinkSession::client(
                    TREE,
                    "harness",
                    host.committed.clone(),
                    cfg.sink.clone(),
                    now,
                )
                .unwrap();
                s.seed_trees(host.trees.clone());
                sink = Some(s);
            }
        }
        let streams = cfg.data_streams;
        Pair {
            rng: Rng(cfg.seed),
            held_at_start: host.chunks.keys().copied().collect(),
            cfg,
            src,
            host,
            source,
            sink,
            links: [Link::new(streams), Link::new(streams)],
            seq: 0,
            now,
            reads: VecDeque::new(),
            unstaged: Vec::new(),
            asked: HashSet::new(),
            source_out: None,
            sink_out: None,
            log: Log::default(),
        }
    }

    fn transmit(&mut self, dir: Dir, ch: Channel, frame: Frame) {
        let bytes = encode(&frame);
        self.log.sent.push((dir, frame.frame_type(), bytes.len()));
        match &frame {
            Frame::WantChunks { ids } => self.asked.extend(ids.iter().copied()),
            Frame::Chunks { chunks } => {
                for (id, _) in chunks {
                    assert!(
                        self.asked.contains(id),
                        "source sent chunk {id} that was not asked for"
                    );
                    assert!(
                        !self.held_at_start.contains(id),
                        "chunk {id} re-sent though the sink held it before this session"
                    );
                    assert!(
                        !self.log.chunks_sent.contains(id),
                        "chunk {id} sent twice in one session"
                    );
                    self.log.chunks_sent.push(*id);
                }
            }
            _ => {}
        }
        let link = &mut self.links[dir as usize];
        let stream = match ch {
            Channel::Control => 0,
            Channel::Data => {
                assert!(matches!(frame, Frame::Chunks { .. }));
                link.next_data = (link.next_data + 1) % link.data.len();
                1 + link.next_data
            }
        };
        self.seq += 1;
        link.queue(stream).push_back((self.seq, bytes, frame));
    }

    fn drain(&mut self) -> bool {
        let mut any = false;
        while let Some((ch, f)) = self.source.as_mut().and_then(|s| s.poll_transmit()) {
            self.transmit(Dir::ToSink, ch, f);
            any = true;
        }
        while let Some((ch, f)) = self.sink.as_mut().and_then(|s| s.poll_transmit()) {
            self.transmit(Dir::ToSource, ch, f);
            any = true;
        }
        while let Some(ev) = self.source.as_mut().and_then(|s| s.poll_event()) {
            any = true;
            match ev {
                SourceEvent::ReadChunks(ids) => self.reads.extend(ids),
                SourceEvent::Finished(s) => self.source_out = Some(Ok(s)),
                SourceEvent::Failed(c, m) => self.source_out = Some(Err((c, m))),
            }
        }
        while let Some(ev) = self.sink.as_mut().and_then(|s| s.poll_event()) {
            any = true;
            let sink = self.sink.as_mut().unwrap();
            match ev {
                SinkEvent::NeedChunkCheck(list) => {
                    let missing = list
                        .iter()
                        .map(|c| c.0)
                        .filter(|id| !self.host.chunks.contains_key(id))
                        .collect();
                    let _ = sink.chunks_missing(missing);
                }
                SinkEvent::StoreChunks(chunks) => {
                    for (id, data) in &chunks {
                        assert_eq!(
                            ChunkId::of(&data.to_vec()),
                            *id,
                            "the session verifies chunks"
                        );
                    }
                    self.unstaged
                        .extend(chunks.into_iter().map(|(id, d)| (id, d.to_vec())));
                    if !self.cfg.store_lag {
                        self.stage();
                    }
                }
                SinkEvent::Commit { manifest, changes } => {
                    let old = self.host.committed.clone().unwrap_or_default();
                    assert_eq!(
                        diff::diff(&old, &manifest).unwrap(),
                        changes,
                        "changes are the diff"
                    );
                    for id in all_chunks(&manifest) {
                        assert!(
                            self.host.chunks.contains_key(&id),
                            "commit before {id} staged"
                        );
                    }
                    let sink = self.sink.as_mut().unwrap();
                    if self.host.fail_commit {
                        let _ = sink.commit_done(Err("no space left on device".into()));
                    } else {
                        let mut m = manifest;
                        m.gc();
                        let root = m.snapshot();
                        self.host.committed = Some(m);
                        self.host.commits += 1;
                        let _ = sink.commit_done(Ok(root));
                    }
                }
                SinkEvent::Finished(s) => self.sink_out = Some(Ok(s)),
                SinkEvent::Failed(c, m) => self.sink_out = Some(Err((c, m))),
            }
        }
        if let Some(sink) = &self.sink {
            assert!(sink.outstanding_chunks() <= self.cfg.sink.max_outstanding_chunks);
            assert!(sink.outstanding_bytes() <= self.cfg.sink.max_outstanding_bytes.max(256 << 10));
        }
        any
    }

    fn keep_trees(&mut self) {
        if let Some(s) = &self.sink {
            self.host.trees.extend(s.fetched_trees());
        }
    }

    /// The sink driver makes what it received durable, then acknowledges.
    fn stage(&mut self) {
        if self.unstaged.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.unstaged);
        let ids = batch.iter().map(|c| c.0).collect();
        self.host.chunks.extend(batch);
        if let Some(sink) = self.sink.as_mut() {
            let _ = sink.chunks_stored(ids);
        }
    }

    /// The source driver reads some wanted chunks.
    fn read_some(&mut self) -> bool {
        if self.reads.is_empty() {
            return false;
        }
        let n = self.cfg.read_batch.min(self.reads.len());
        let ids: Vec<ChunkId> = self.reads.drain(..n).collect();
        let source = self.source.as_mut().unwrap();
        let mut chunks = Vec::new();
        for id in ids {
            match self.src.read(&id) {
                Some(d) => chunks.push((id, d)),
                None => {
                    source.abort(ErrorCode::Internal, format!("cannot read chunk {id}"));
                    return true;
                }
            }
        }
        let _ = source.send_chunks(chunks);
        true
    }

    fn deliver(&mut self, dir: Dir, stream: usize) {
        let link = &mut self.links[dir as usize];
        let (_, bytes, sent) = link.queue(stream).pop_front().unwrap();
        let dec = &mut link.decoders[stream];
        let mut got = None;
        let step = if self.cfg.byte_at_a_time {
            1
        } else {
            bytes.len()
        };
        for piece in bytes.chunks(step) {
            assert!(got.is_none(), "a frame decoded before its last byte");
            dec.push(piece).unwrap();
            got = dec.next_frame().unwrap();
        }
        let frame = got.expect("a whole frame decodes");
        assert_eq!(frame, sent);
        assert_eq!(dec.buffered(), 0);
        self.log.delivered[dir as usize] += 1;
        self.now += Duration::from_millis(1);
        let now = self.now;
        match dir {
            Dir::ToSink => match self.sink.as_mut() {
                Some(s) => {
                    let _ = s.handle_frame(frame, now);
                }
                None => self.accept_as_sink(frame),
            },
            Dir::ToSource => match self.source.as_mut() {
                Some(s) => {
                    let _ = s.handle_frame(frame, now);
                }
                None => self.accept_as_source(frame),
            },
        }
    }

    fn accept_as_sink(&mut self, frame: Frame) {
        match accept(frame) {
            Ok(a) if a.tree == TREE && a.direction == Direction::Push => {
                let mut s = SinkSession::server(
                    self.host.committed.clone(),
                    self.cfg.sink.clone(),
                    self.now,
                );
                s.seed_trees(self.host.trees.clone());
                self.sink = Some(s);
            }
            Ok(a) => {
                let f = reject(ErrorCode::UnknownTree, format!("no tree {}", a.tree));
                self.transmit(Dir::ToSource, Channel::Control, f);
                self.sink_out = Some(Err((ErrorCode::UnknownTree, a.tree)));
            }
            Err(e) => {
                self.transmit(Dir::ToSource, Channel::Control, e.to_frame());
                self.sink_out = Some(Err((e.code(), e.to_string())));
            }
        }
    }

    fn accept_as_source(&mut self, frame: Frame) {
        match accept(frame) {
            Ok(a) if a.tree == TREE && a.direction == Direction::Pull => {
                self.source = Some(SourceSession::server(
                    self.src.manifest.clone(),
                    SourceOptions::default(),
                    self.now,
                ));
            }
            Ok(a) => {
                let f = reject(ErrorCode::UnknownTree, format!("no tree {}", a.tree));
                self.transmit(Dir::ToSink, Channel::Control, f);
                self.source_out = Some(Err((ErrorCode::UnknownTree, a.tree)));
            }
            Err(e) => {
                self.transmit(Dir::ToSink, Channel::Control, e.to_frame());
                self.source_out = Some(Err((e.code(), e.to_string())));
            }
        }
    }

    /// The next frame to deliver: the oldest, or a random stream's head.
    fn pick(&mut self) -> Option<(Dir, usize)> {
        let mut heads = Vec::new();
        for dir in [Dir::ToSink, Dir::ToSource] {
            let link = &mut self.links[dir as usize];
            for s in 0..link.streams() {
                if let Some((seq, _, _)) = link.queue(s).front() {
                    heads.push((*seq, dir, s));
                }
            }
        }
        if heads.is_empty() {
            return None;
        }
        let i = if self.cfg.reorder {
            self.rng.below(heads.len())
        } else {
            (0..heads.len()).min_by_key(|&i| heads[i].0).unwrap()
        };
        Some((heads[i].1, heads[i].2))
    }

    /// Run until both ends are done, or the connection is cut after `cut.1`
    /// frames were delivered in direction `cut.0`.
    fn run(&mut self, cut: Option<(Dir, usize)>) -> Outcome {
        for _ in 0..1_000_000 {
            let mut progress = self.drain();
            if self.cfg.store_lag && !self.unstaged.is_empty() && self.rng.coin() {
                self.stage();
                progress = true;
            }
            progress |= self.read_some();
            progress |= self.drain();
            if let Some((dir, stream)) = self.pick() {
                if cut.is_some_and(|(d, k)| d == dir && self.log.delivered[dir as usize] >= k) {
                    // The connection drops; the driver may or may not have
                    // finished staging what it had in hand.
                    if self.rng.coin() {
                        let batch = std::mem::take(&mut self.unstaged);
                        self.host.chunks.extend(batch);
                    }
                    self.keep_trees();
                    return Outcome::Cut;
                }
                self.deliver(dir, stream);
                progress = true;
            }
            if !progress {
                if self.cfg.store_lag && !self.unstaged.is_empty() {
                    continue;
                }
                break;
            }
        }
        self.keep_trees();
        match (self.source_out.take(), self.sink_out.take()) {
            (Some(Ok(source)), Some(Ok(sink))) => Outcome::Done { source, sink },
            (source, sink) => {
                let source = source.map(|r| r.err().unwrap_or((ErrorCode::Internal, "ok".into())));
                let sink = sink.map(|r| r.err().unwrap_or((ErrorCode::Internal, "ok".into())));
                assert!(
                    source.is_some() || sink.is_some(),
                    "stalled: neither side finished nor failed"
                );
                Outcome::Failed { source, sink }
            }
        }
    }
}

fn sync(cfg: Config, src: &SourceHost, host: &mut SinkHost) -> (Outcome, Log) {
    let mut p = Pair::new(cfg, src, host);
    let out = p.run(None);
    (out, p.log)
}

fn expect_done(out: Outcome) -> (Summary, Summary) {
    match out {
        Outcome::Done { source, sink } => (source, sink),
        other => panic!("sync did not complete: {other:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn full_sync_push_and_pull() {
    let src = SourceHost::new(dlrn(0..6));
    let distinct = src.distinct_chunks();
    for mode in [Mode::Push, Mode::Pull] {
        let mut host = SinkHost::default();
        let (out, log) = sync(Config::new(mode), &src, &mut host);
        let (source, sink) = expect_done(out);
        host.assert_mirrors(&src);
        assert_eq!(source.root, src.manifest.snapshot());
        assert_eq!(sink.root, src.manifest.snapshot());
        assert_eq!(log.chunks_sent.len(), distinct.len());
        assert_eq!(source.chunks_sent, distinct.len() as u64);
        assert_eq!(sink.chunks_received, distinct.len() as u64);
        assert_eq!(source.bytes_sent, sink.bytes_received);
        assert_eq!(source.trees_sent, sink.trees_received);
        assert_eq!(
            sink.trees_received as usize,
            src.manifest.tree_count() - 1,
            "all but the empty tree"
        );
        assert!(sink.files_changed >= 6 * 5);
        assert!(!sink.unchanged && !source.unchanged);
        assert_eq!(host.commits, 1);
    }
}

#[test]
fn unchanged_sync_is_one_round_trip_and_sends_no_chunk() {
    let src = SourceHost::new(dlrn(0..4));
    for mode in [Mode::Push, Mode::Pull] {
        let mut host = SinkHost::default();
        expect_done(sync(Config::new(mode), &src, &mut host).0);
        let (out, log) = sync(Config::new(mode), &src, &mut host);
        let (source, sink) = expect_done(out);
        assert!(sink.unchanged && source.unchanged);
        assert_eq!(log.chunks_sent.len(), 0);
        assert_eq!(
            log.count(FrameType::Trees) + log.count(FrameType::Chunks),
            0
        );
        assert!(
            log.bytes() < 400,
            "{} bytes for an unchanged tree",
            log.bytes()
        );
        let types: Vec<FrameType> = log.sent.iter().map(|s| s.1).collect();
        match mode {
            // client: Hello Offer | server: Welcome Committed
            Mode::Push => {
                assert_eq!(
                    types,
                    [
                        FrameType::Hello,
                        FrameType::Offer,
                        FrameType::Welcome,
                        FrameType::Committed
                    ]
                );
                assert_eq!(log.flights(), 2);
            }
            // client: Hello SinkState | server: Welcome Offer | client: Committed
            Mode::Pull => {
                assert_eq!(log.sent.len(), 5);
                assert_eq!(log.flights(), 3, "the client knows after one round trip");
            }
        }
        assert_eq!(host.commits, 1, "nothing to commit");
    }
}

#[test]
fn incremental_sync_sends_only_new_chunks() {
    let old_files = dlrn(0..5);
    let old = SourceHost::new(old_files.clone());
    let mut host = SinkHost::default();
    expect_done(sync(Config::new(Mode::Push), &old, &mut host).0);

    // Two new builds, an appended log, a deleted build, a flipped symlink.
    let mut files = old_files;
    let extra = dlrn(5..7);
    for (p, n) in extra.0 {
        files.0.insert(p, n);
    }
    let log_path = files
        .0
        .keys()
        .find(|p| p.ends_with(b"pkg-3.rpm"))
        .unwrap()
        .clone();
    if let Some(Node::File(c)) = files.0.get_mut(&log_path) {
        c.extend_from_slice(&data(999, 5000));
    }
    let first_build = files
        .0
        .keys()
        .find(|p| p.ends_with(b"/pkg-0.rpm"))
        .map(|p| p[..p.len() - b"pkg-0.rpm".len()].to_vec())
        .unwrap();
    let gone: Vec<Vec<u8>> = files
        .0
        .keys()
        .filter(|p| p.starts_with(&first_build))
        .cloned()
        .collect();
    assert!(gone.len() >= 5);
    for p in gone {
        files.0.remove(&p);
    }
    let new = SourceHost::new(files);

    let old_m = host.committed.clone().unwrap();
    let changes = diff::diff(&old_m, &new.manifest).unwrap();
    let expected: HashSet<ChunkId> =
        diff::missing_chunks(&changes, |id| host.chunks.contains_key(id))
            .into_iter()
            .map(|c| c.0)
            .collect();
    let (out, log) = sync(Config::new(Mode::Push), &new, &mut host);
    let (source, sink) = expect_done(out);
    host.assert_mirrors(&new);
    let sent: HashSet<ChunkId> = log.chunks_sent.iter().copied().collect();
    assert_eq!(sent, expected);
    assert!(
        sent.len() < new.distinct_chunks().len() / 2,
        "{} of {}",
        sent.len(),
        new.distinct_chunks().len()
    );
    assert!(
        sink.chunks_local > 0,
        "shared chunks come from the sink's own tree"
    );
    assert_eq!(source.chunks_sent as usize, sent.len());
    // The appended file resends only its tail chunks.
    let appended = old.files.content(&log_path).unwrap().len();
    assert!((sink.bytes_received as usize) < 2 * 700_000 + appended);
    assert!(sink.trees_received < new.manifest.tree_count() as u64);
}

#[test]
fn a_chunk_held_by_many_files_is_sent_once() {
    let mut files = Files::default();
    let big = data(7, 900_000);
    let small = data(8, 3000);
    for d in 0..20 {
        files.file(format!("d{d}/big.rpm"), big.clone());
        for e in 0..5 {
            files.file(format!("d{d}/e{e}/small"), small.clone());
        }
    }
    let src = SourceHost::new(files);
    let distinct = src.distinct_chunks();
    let mut host = SinkHost::default();
    let (out, log) = sync(Config::choppy(Mode::Push), &src, &mut host);
    let (_, sink) = expect_done(out);
    host.assert_mirrors(&src);
    assert_eq!(log.chunks_sent.len(), distinct.len());
    assert_eq!(sink.bytes_received as usize, big.len() + small.len());
    assert_eq!(sink.files_changed, 20 * 6);
    // 20 identical subtrees `eN` are fetched once each, not once per parent.
    assert_eq!(sink.trees_received as usize, src.manifest.tree_count());
}

/// Cut after frame k for every k, in each direction and mode, from an
/// empty sink and from an older snapshot; the resumed sync completes and
/// never re-sends a chunk the sink already held (the harness asserts it
/// on every `Chunks` frame).
#[test]
fn dropped_connection_at_every_frame_resumes_without_resending() {
    let old = SourceHost::new(dlrn(0..3));
    let src = SourceHost::new(dlrn(1..6));
    let mut cases = 0;
    for mode in [Mode::Push, Mode::Pull] {
        for incremental in [false, true] {
            let base = |host: &mut SinkHost| {
                if incremental {
                    expect_done(sync(Config::new(Mode::Push), &old, host).0);
                }
            };
            let mut probe = SinkHost::default();
            base(&mut probe);
            let (_, clean) = sync(Config::choppy(mode), &src, &mut probe);
            for dir in [Dir::ToSink, Dir::ToSource] {
                let n = clean.delivered[dir as usize];
                assert!(n > 8, "{n} frames");
                for k in 0..=n {
                    let mut host = SinkHost::default();
                    base(&mut host);
                    let mut cfg = Config::choppy(mode);
                    cfg.seed = k as u64 * 31 + dir as u64;
                    let before = host.chunks.len();
                    let mut p = Pair::new(cfg.clone(), &src, &mut host);
                    let first = p.run(Some((dir, k)));
                    let sent_first = p.log.chunks_sent.len();
                    drop(p);
                    let host_committed_first = host
                        .committed
                        .as_ref()
                        .is_some_and(|m| m.snapshot() == src.manifest.snapshot());
                    if let Outcome::Done { .. } = first {
                        assert!(host_committed_first);
                    }
                    let held = host.chunks.len() - before;
                    assert!(held <= sent_first);
                    let (out, log) = sync(cfg, &src, &mut host);
                    let (_, sink) = expect_done(out);
                    host.assert_mirrors(&src);
                    assert_eq!(sink.root, src.manifest.snapshot());
                    let committed_before = host_committed_first;
                    if committed_before {
                        assert!(sink.unchanged);
                    } else {
                        // What the sink held after the cut is found locally.
                        assert!(sink.chunks_local as usize >= held);
                    }
                    assert!(log.chunks_sent.len() + held <= src.distinct_chunks().len());
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 100, "{cases} cut points");
}

/// Cut every session at the same point until the sync completes: each
/// attempt keeps what it staged, so the sync still gets there.
#[test]
fn repeated_drops_make_progress() {
    let src = SourceHost::new(dlrn(0..6));
    for (mode, dir, k) in [
        (Mode::Push, Dir::ToSink, 14),
        (Mode::Pull, Dir::ToSink, 11),
        (Mode::Push, Dir::ToSource, 12),
        (Mode::Pull, Dir::ToSource, 13),
    ] {
        let mut host = SinkHost::default();
        let mut total_sent = 0;
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts < 100, "no progress");
            let mut cfg = Config::choppy(mode);
            cfg.seed = attempts;
            let mut p = Pair::new(cfg, &src, &mut host);
            let out = p.run(Some((dir, k)));
            total_sent += p.log.chunks_sent.len();
            if let Outcome::Done { .. } = out {
                break;
            }
        }
        host.assert_mirrors(&src);
        assert!(attempts >= 2, "the cut point should interrupt");
        // Only chunks lost between receipt and staging are sent again.
        assert!(total_sent <= src.distinct_chunks().len() * 2);
    }
}

#[test]
fn reordered_data_frames_and_byte_at_a_time_delivery_complete() {
    let src = SourceHost::new(dlrn(0..5));
    for seed in 0..12 {
        for mode in [Mode::Push, Mode::Pull] {
            let mut cfg = Config::choppy(mode);
            cfg.data_streams = 4;
            cfg.reorder = true;
            cfg.byte_at_a_time = seed % 4 == 0;
            cfg.seed = seed;
            let mut host = SinkHost::default();
            let (out, log) = sync(cfg, &src, &mut host);
            expect_done(out);
            host.assert_mirrors(&src);
            assert_eq!(log.chunks_sent.len(), src.distinct_chunks().len());
        }
    }
}

#[test]
fn source_read_failure_and_commit_failure_reach_the_peer() {
    let src = SourceHost::new(dlrn(0..2));
    // A chunk the source driver cannot read.
    let mut broken = SourceHost::new(dlrn(0..2));
    let victim = broken
        .files
        .0
        .keys()
        .find(|p| p.ends_with(b"build.log"))
        .unwrap()
        .clone();
    broken.files.0.insert(victim, Node::File(Vec::new()));
    let mut host = SinkHost::default();
    match sync(Config::new(Mode::Push), &broken, &mut host).0 {
        Outcome::Failed { source, sink } => {
            assert_eq!(source.unwrap().0, ErrorCode::Internal);
            assert_eq!(sink.unwrap().0, ErrorCode::Internal);
        }
        other => panic!("{other:?}"),
    }
    assert!(host.committed.is_none());

    let mut host = SinkHost {
        fail_commit: true,
        ..SinkHost::default()
    };
    match sync(Config::new(Mode::Pull), &src, &mut host).0 {
        Outcome::Failed { source, sink } => {
            assert_eq!(sink.unwrap().0, ErrorCode::CommitFailed);
            let (code, msg) = source.unwrap();
            assert_eq!(code, ErrorCode::CommitFailed);
            assert!(msg.contains("no space left"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    // Everything was staged, so the retry transfers nothing.
    host.fail_commit = false;
    let (out, log) = sync(Config::new(Mode::Pull), &src, &mut host);
    expect_done(out);
    assert_eq!(log.chunks_sent.len(), 0);
    host.assert_mirrors(&src);
}

#[test]
fn server_refuses_unknown_tree_and_bad_first_frames() {
    let src = SourceHost::new(dlrn(0..1));
    let mut host = SinkHost::default();
    let mut p = Pair::new(Config::new(Mode::Push), &src, &mut host);
    p.source = Some(
        SourceSession::client(
            "other",
            "x",
            src.manifest.clone(),
            SourceOptions::default(),
            p.now,
        )
        .unwrap(),
    );
    match p.run(None) {
        Outcome::Failed { source, .. } => assert_eq!(source.unwrap().0, ErrorCode::UnknownTree),
        other => panic!("{other:?}"),
    }
    let offer = Frame::Offer {
        root: SnapshotId([1; 32]),
    };
    assert!(matches!(
        accept(offer),
        Err(SessionError::Unexpected { .. })
    ));
    let hello = Frame::Hello {
        version: 2,
        tree: TREE.into(),
        direction: Direction::Push,
        client_agent: String::new(),
    };
    let err = accept(hello).unwrap_err();
    assert!(matches!(err, SessionError::Version { theirs: 2, .. }));
    assert_eq!(err.code(), ErrorCode::Protocol);
    assert!(SourceSession::client(
        "",
        "x",
        Manifest::empty(),
        SourceOptions::default(),
        Instant::now()
    )
    .is_err());
}
