//! The session driver: moves frames between QUIC streams and a sans-IO
//! [`SourceSession`] or [`SinkSession`], and does the blocking work their
//! events ask for on `spawn_blocking` threads, never on the reactor.
//!
//! Streams of one session: a bidirectional control stream (opened by the
//! client, `Hello` first) and up to [`DATA_STREAMS`] unidirectional data
//! streams opened by the source, which carry only `Chunks` frames. Every
//! stream has its own reader task (bytes -> [`FrameDecoder`], or on a data
//! stream [`ChunkDecoder`] -> one bounded input queue) or writer task
//! (bounded queue of encoded frames -> stream; chunk contents go to quinn
//! as their own buffers, see [`encode_parts`]).
//! The driver loop never blocks on a write: it selects between input, job
//! completions and free writer slots, so neither peer can wedge the other.
//! Memory stays bounded by the sink's window (chunks asked and not yet
//! staged), the source's read window ([`READS_IN_FLIGHT`] batches of
//! [`READ_BATCH`] bytes) and the small writer queues.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use sync_core::chunk::ChunkBytes;
use sync_core::commit::{CommitOptions, Prebuilder, Receiver};
use sync_core::hash::{ChunkId, SnapshotId, TreeId};
use sync_core::manifest::{lossy, Manifest};
use sync_core::safefs::Root;
use sync_core::session::{
    ChunkLocator, SessionError, SinkEvent, SinkSession, SourceEvent, SourceSession, Summary,
};
use sync_core::wire::{
    encode, encode_parts, ChunkDecoder, ErrorCode, Frame, FrameDecoder, WireError,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::ratelimit::RateLimit;

/// Data streams a source opens.
pub const DATA_STREAMS: usize = 4;
/// Data streams a sink accepts from one peer.
const MAX_DATA_STREAMS: usize = 16;
/// Decoded frames waiting for the driver loop.
const INPUT_QUEUE: usize = 16;
/// Encoded frames waiting per writer task.
const WRITE_QUEUE: usize = 2;
/// Chunk bytes one source read job gathers.
pub const READ_BATCH: u64 = 4 << 20;
/// Source read jobs running at once.
pub const READS_IN_FLIGHT: usize = 2;
/// Chunk bytes staged per job (into the page cache: they survive the
/// process; what the tree needs is made durable by the commit). At most
/// [`STORE_JOBS`] run at once, so a burst is staged in few of them.
const STORE_BATCH: usize = 8 << 20;
/// Chunk bytes read back from staging per hold of the receiver, for the
/// files a plan made ahead finds already staged: short holds, so that
/// staging goes on between them.
const CATCH_UP_READ: usize = 1 << 20;
/// Staging jobs at most at once: one builds its files' temporaries while
/// another stages.
const STORE_JOBS: usize = 2;
/// Chunk bytes staged at most while the commit is planned ahead (see
/// `drive_sink`).
const UNPLANNED_MAX: usize = 64 << 20;
/// How long a finished stream waits for the peer to acknowledge its data.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest file of tree objects kept for a resumed tree fetch.
const MAX_KEPT_TREE_BYTES: usize = 256 << 20;
/// Name of that file in the receiver's state directory.
pub const FETCHED_TREES_FILE: &str = "fetched-trees";

/// Why a driven session did not finish.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DriveError {
    /// The peer sent an `Error` frame.
    #[error("peer refused ({code}): {message}")]
    Peer { code: ErrorCode, message: String },
    /// We failed the session (and told the peer).
    #[error("{message}")]
    Local { code: ErrorCode, message: String },
    /// The connection or a stream broke.
    #[error("connection lost: {0}")]
    Lost(String),
}

impl DriveError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            DriveError::Peer { code, .. } | DriveError::Local { code, .. } => Some(*code),
            DriveError::Lost(_) => None,
        }
    }
}

/// What a driven session ends with: the result, and the counters so far
/// (meaningful also after a failure, e.g. bytes sent before a cut).
#[derive(Debug)]
pub struct DriveOutcome {
    pub result: Result<Summary, DriveError>,
    pub partial: Summary,
}

/// Live counters for a progress display, updated by the driver loop.
#[derive(Debug, Default)]
pub struct Progress {
    /// Chunks sent (source) or received (sink).
    pub chunks: AtomicU64,
    /// Chunk payload bytes sent or received.
    pub bytes: AtomicU64,
    /// Sink: chunks still to receive (asked or queued).
    pub remaining: AtomicU64,
}

impl Progress {
    fn set(&self, chunks: u64, bytes: u64, remaining: u64) {
        self.chunks.store(chunks, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        self.remaining.store(remaining, Ordering::Relaxed);
    }
}

/// Knobs shared by both drivers.
#[derive(Clone, Debug, Default)]
pub struct DriveOptions {
    pub progress: Option<Arc<Progress>>,
    /// When this turns `true`, the session is aborted (server shutdown).
    pub shutdown: Option<watch::Receiver<bool>>,
    /// Data streams the source opens (0 means [`DATA_STREAMS`]).
    pub data_streams: usize,
    /// Source: a byte rate every stream of the session (and of any other
    /// session given the same limit) stays under together.
    pub rate_limit: Option<Arc<RateLimit>>,
}

/// The streams of one session.
pub struct Link {
    pub conn: Connection,
    pub control_send: SendStream,
    pub control_recv: RecvStream,
    /// Holds bytes already read from `control_recv` (e.g. after `Hello`).
    pub decoder: FrameDecoder,
}

/// What the source end reads chunks from: the tree the manifest describes.
pub struct SourceIo {
    pub root: Arc<Root>,
    pub locator: Arc<LazyLocator>,
}

/// The chunk index of an offered snapshot, built when the first chunk is
/// asked for: a sync of an unchanged tree never pays for it, and a push
/// first indexes only the directories the sink fetched (the cost of the
/// change), the whole snapshot only when a chunk is not among them.
#[derive(Debug)]
pub struct LazyLocator {
    manifest: Manifest,
    full: OnceLock<Result<ChunkLocator, String>>,
    part: OnceLock<ChunkLocator>,
}

impl LazyLocator {
    pub fn new(manifest: Manifest) -> LazyLocator {
        LazyLocator {
            manifest,
            full: OnceLock::new(),
            part: OnceLock::new(),
        }
    }

    /// The snapshot indexed.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The index built so far, whole or partial.
    pub fn get(&self) -> Option<&ChunkLocator> {
        self.full
            .get()
            .and_then(|r| r.as_ref().ok())
            .or_else(|| self.part.get())
    }

    /// Index the files of the directories in `trees` (blocking).
    pub fn build_within(&self, trees: &HashSet<TreeId>) -> Result<(), String> {
        if self.get().is_none() {
            let l = ChunkLocator::build_within(&self.manifest, |t| trees.contains(t))
                .map_err(|e| e.to_string())?;
            let _ = self.part.set(l);
        }
        Ok(())
    }

    /// The whole index, building it now if needed (blocking).
    pub fn build(&self) -> Result<&ChunkLocator, String> {
        self.full
            .get_or_init(|| ChunkLocator::build(&self.manifest).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// An index that holds every one of `ids` if the snapshot does: the
    /// partial one, else the whole one (blocking).
    pub fn covering(&self, ids: &[ChunkId]) -> Result<&ChunkLocator, String> {
        match self.get() {
            Some(l) if ids.iter().all(|id| l.get(id).is_some()) => Ok(l),
            _ => self.build(),
        }
    }
}

/// What the sink end stages into and commits with.
pub struct SinkIo {
    pub recv: Arc<Mutex<Receiver>>,
    pub commit: CommitOptions,
    /// Tree objects kept from an interrupted session, already seeded.
    pub seeded: Vec<(TreeId, Arc<[u8]>)>,
}

enum Input {
    Frame(Frame),
    /// The chunks of a `Chunks` frame from a data stream.
    Chunks(Vec<(ChunkId, ChunkBytes)>),
    Bad(WireError),
    /// A data stream carried a frame other than `Chunks`.
    Misplaced(&'static str),
    TooManyStreams,
    ControlEnd,
    Lost(String),
}

enum Job {
    Missing(Result<Vec<ChunkId>, String>),
    Stored(Result<Vec<ChunkId>, String>),
    Committed(Result<SnapshotId, String>),
    Read(Result<Vec<(ChunkId, Vec<u8>)>, String>),
    Indexed(Result<(), String>),
    /// Temporaries built ahead from one staged batch.
    Prebuilt,
    /// The sink's commit planned ahead (the builder of its temporaries).
    Planned(Option<Arc<Prebuilder>>),
    /// The plan's symlinks inside new subtrees made ahead.
    Linked,
    /// The last commit's head stored (see `Receiver::settle`).
    Settled,
}

/// Stage one batch of received chunks (each already checked against its id
/// by the session) and hand them to the kernel: acknowledged chunks survive
/// a restart of this process; the commit makes what the tree needs durable.
fn stage_batch(
    r: &mut Receiver,
    batch: &[(ChunkId, ChunkBytes)],
    linked: &[ChunkId],
) -> Result<Vec<ChunkId>, String> {
    let linked: HashSet<&ChunkId> = linked.iter().collect();
    for (id, data) in batch {
        match linked.contains(id) {
            true => r.stage_linked(*id, data.len() as u32),
            false => r.stage_checked(*id, data),
        }
        .map_err(|e| e.to_string())?;
    }
    r.persist_staging().map_err(|e| e.to_string())?;
    Ok(batch.iter().map(|(id, _)| *id).collect())
}

/// Aborts a task when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn wire_code(e: &WireError) -> ErrorCode {
    match e {
        WireError::TooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::Protocol,
    }
}

/// Read one whole frame from `recv` (the server's `Hello`), keeping any
/// bytes after it in `dec`. The error carries the code to answer with.
pub async fn read_frame(
    recv: &mut RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Frame, (ErrorCode, String)> {
    let bad = |e: WireError| (wire_code(&e), e.to_string());
    loop {
        if let Some(f) = dec.next_frame().map_err(bad)? {
            return Ok(f);
        }
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(c)) => dec.push(&c.bytes).map_err(bad)?,
            Ok(None) => {
                return Err((
                    ErrorCode::Protocol,
                    "stream ended before a whole frame".into(),
                ))
            }
            Err(e) => return Err((ErrorCode::Protocol, e.to_string())),
        }
    }
}

async fn read_frames(mut recv: RecvStream, mut dec: FrameDecoder, tx: mpsc::Sender<Input>) {
    loop {
        loop {
            let input = match dec.next_frame() {
                Ok(Some(f)) => Input::Frame(f),
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Input::Bad(e)).await;
                    return;
                }
            };
            if tx.send(input).await.is_err() {
                return;
            }
        }
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(c)) => {
                if let Err(e) = dec.push(&c.bytes) {
                    let _ = tx.send(Input::Bad(e)).await;
                    return;
                }
            }
            Ok(None) => {
                let _ = match dec.finish() {
                    Err(e) => tx.send(Input::Bad(e)).await,
                    Ok(()) => tx.send(Input::ControlEnd).await,
                };
                return;
            }
            Err(e) => {
                let _ = tx.send(Input::Lost(e.to_string())).await;
                return;
            }
        }
    }
}

/// The reader of one data stream: only `Chunks` frames, whose large
/// chunks stay in the received pieces (see [`ChunkDecoder`]).
async fn read_data(mut recv: RecvStream, tx: mpsc::Sender<Input>) {
    let mut dec = ChunkDecoder::new();
    loop {
        let (pushed, end) = match recv.read_chunk(1 << 20, true).await {
            Ok(Some(c)) => (dec.push_bytes(c.bytes), false),
            Ok(None) => (dec.finish(), true),
            Err(e) => {
                let _ = tx.send(Input::Lost(e.to_string())).await;
                return;
            }
        };
        // The frames completed before a failure go first.
        while let Some(c) = dec.next_chunks() {
            if tx.send(Input::Chunks(c)).await.is_err() {
                return;
            }
        }
        match pushed {
            Err(WireError::Misplaced(name)) => {
                let _ = tx.send(Input::Misplaced(name)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Input::Bad(e)).await;
                return;
            }
            Ok(()) if end => return,
            Ok(()) => {}
        }
    }
}

async fn accept_data(conn: Connection, tx: mpsc::Sender<Input>) {
    let mut readers = JoinSet::new();
    let mut n = 0;
    loop {
        match conn.accept_uni().await {
            Ok(recv) => {
                n += 1;
                if n > MAX_DATA_STREAMS {
                    let _ = tx.send(Input::TooManyStreams).await;
                    break;
                }
                readers.spawn(read_data(recv, tx.clone()));
            }
            Err(e) => {
                let _ = tx.send(Input::Lost(e.to_string())).await;
                break;
            }
        }
    }
    // Keep the readers alive until this task is aborted.
    std::future::pending::<()>().await;
    drop(readers);
}

/// Encoded frames on their way to a stream: one buffer, or the parts of
/// [`encode_parts`] (chunk contents handed to quinn without a copy).
struct Outgoing(Vec<Vec<u8>>);

impl From<Vec<u8>> for Outgoing {
    fn from(buf: Vec<u8>) -> Outgoing {
        Outgoing(vec![buf])
    }
}

impl From<Vec<Vec<u8>>> for Outgoing {
    fn from(parts: Vec<Vec<u8>>) -> Outgoing {
        Outgoing(parts)
    }
}

async fn write_frames<T: Into<Outgoing>>(
    mut send: SendStream,
    mut rx: mpsc::Receiver<T>,
    limit: Option<Arc<RateLimit>>,
) -> Result<(), String> {
    while let Some(out) = rx.recv().await {
        let Outgoing(parts) = out.into();
        if let Some(l) = &limit {
            l.acquire(parts.iter().map(Vec::len).sum()).await;
        }
        // Handed over whole: quinn keeps the buffers instead of copying them.
        let mut bufs: Vec<bytes::Bytes> = parts.into_iter().map(bytes::Bytes::from).collect();
        send.write_all_chunks(&mut bufs)
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, send.stopped()).await;
    Ok(())
}

/// Wait for the writers to flush (bounded), after their queues were closed.
async fn join_writers(writers: Vec<tokio::task::JoinHandle<Result<(), String>>>) {
    for w in writers {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT * 2, w).await;
    }
}

async fn shutdown_signal(rx: &mut Option<watch::Receiver<bool>>) {
    match rx {
        Some(rx) => {
            if rx.wait_for(|v| *v).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

fn blocking<F>(jobs: &mut JoinSet<Job>, f: F)
where
    F: FnOnce() -> Job + Send + 'static,
{
    let handle = tokio::task::spawn_blocking(f);
    jobs.spawn(async move {
        handle
            .await
            .unwrap_or_else(|e| Job::Read(Err(format!("worker thread failed: {e}"))))
    });
}

fn record_root(root: SnapshotId) {
    tracing::Span::current().record("root", root.short().as_str());
}

/// Read chunks from the files of a source tree (beneath its root, no
/// symlink followed). The session checks every chunk against its id.
pub fn read_chunks(
    root: &Root,
    locator: &ChunkLocator,
    ids: &[ChunkId],
) -> Result<Vec<(ChunkId, Vec<u8>)>, String> {
    let plan = locator
        .plan_reads(ids)
        .map_err(|id| format!("chunk {id} is not in the offered snapshot"))?;
    use std::io::{Read, Seek, SeekFrom};
    let mut out = Vec::with_capacity(ids.len());
    for fr in plan {
        let mut f = root
            .open_file(&fr.path)
            .map_err(|e| format!("cannot open {}: {e}", lossy(&fr.path)))?;
        for (id, off, len) in fr.spans {
            // Read into the buffer's spare capacity: no zeroing first (it
            // was 4% of a source's CPU in an initial sync).
            let mut buf = Vec::with_capacity(len as usize);
            let read = f
                .seek(SeekFrom::Start(off))
                .and_then(|_| (&mut f).take(len.into()).read_to_end(&mut buf));
            let whole = |n: usize| match n == len as usize {
                true => Ok(()),
                false => Err(std::io::ErrorKind::UnexpectedEof.into()),
            };
            if let Err(e) = read.and_then(whole) {
                return Err(format!(
                    "cannot read {} bytes of {} at {off} (changed since the scan?): {e}",
                    len,
                    lossy(&fr.path)
                ));
            }
            out.push((id, buf));
        }
    }
    Ok(out)
}

/// Drive the sending end of a session to its end.
pub async fn drive_source(
    mut session: SourceSession,
    io: SourceIo,
    link: Link,
    mut opts: DriveOptions,
) -> DriveOutcome {
    record_root(session.root());
    let (in_tx, mut in_rx) = mpsc::channel(INPUT_QUEUE);
    let _reader = Task(tokio::spawn(read_frames(
        link.control_recv,
        link.decoder,
        in_tx,
    )));
    let (ctl_tx, ctl_rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let limit = opts.rate_limit.clone();
    let mut writers = vec![tokio::spawn(write_frames(
        link.control_send,
        ctl_rx,
        limit.clone(),
    ))];
    let n = if opts.data_streams == 0 {
        DATA_STREAMS
    } else {
        opts.data_streams
    };
    let mut data_tx = Vec::with_capacity(n);
    let mut outcome: Option<Result<Summary, DriveError>> = None;
    for _ in 0..n {
        match link.conn.open_uni().await {
            Ok(s) => {
                let (tx, rx) = mpsc::channel::<Vec<Vec<u8>>>(WRITE_QUEUE);
                writers.push(tokio::spawn(write_frames(s, rx, limit.clone())));
                data_tx.push(tx);
            }
            Err(e) => {
                outcome = Some(Err(DriveError::Lost(e.to_string())));
                break;
            }
        }
    }
    let mut ctl_out: VecDeque<Vec<u8>> = VecDeque::new();
    let mut data_out: VecDeque<Vec<Vec<u8>>> = VecDeque::new();
    let mut to_read: VecDeque<ChunkId> = VecDeque::new();
    let mut reading = 0usize;
    let mut indexing = false;
    let mut rr = 0usize;
    let mut jobs: JoinSet<Job> = JoinSet::new();
    let mut peer_err: Option<DriveError> = None;
    let mut input_open = true;
    let mut marks = Marks::new(SOURCE_STEPS);
    loop {
        while let Some((ch, f)) = session.poll_transmit() {
            if outcome.is_some() {
                continue;
            }
            match ch {
                sync_core::session::Channel::Control => ctl_out.push_back(encode(&f)),
                sync_core::session::Channel::Data => data_out.push_back(encode_parts(f)),
            }
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                SourceEvent::ReadChunks(ids) => {
                    marks.set("wants");
                    to_read.extend(ids)
                }
                SourceEvent::Finished(s) => {
                    marks.set("finished");
                    tracing::debug!(phases = %marks, "source steps");
                    tracing::info!(chunks = s.chunks_sent, bytes = s.bytes_sent, "sent");
                    outcome = Some(Ok(s));
                }
                SourceEvent::Failed(code, message) => {
                    tracing::warn!(%code, %message, "source session failed");
                    data_out.clear();
                    to_read.clear();
                    outcome = Some(Err(peer_err
                        .take()
                        .unwrap_or(DriveError::Local { code, message })));
                }
            }
        }
        // Indexed once chunks are asked for, or as soon as the sink has
        // fetched every tree (an initial sync): it cannot ask for another,
        // and the index is built while it finds which chunks it lacks.
        let all_served = || session.trees_served().len() >= io.locator.manifest().tree_count();
        if outcome.is_none()
            && (!to_read.is_empty() || all_served())
            && io.locator.get().is_none()
            && !indexing
        {
            indexing = true;
            let locator = io.locator.clone();
            let fetched = session.trees_served().clone();
            blocking(&mut jobs, move || {
                Job::Indexed(locator.build_within(&fetched))
            });
        }
        if io.locator.get().is_some() {
            marks.set("indexed");
        }
        while let Some(locator) = io.locator.get().filter(|_| {
            outcome.is_none()
                && reading < READS_IN_FLIGHT
                && data_out.len() < 2 * data_tx.len().max(1)
                && !to_read.is_empty()
        }) {
            let mut ids = Vec::new();
            let mut bytes = 0u64;
            while let Some(id) = to_read.front() {
                let len = locator.get(id).map_or(0, |l| l.len as u64);
                if !ids.is_empty() && bytes + len > READ_BATCH {
                    break;
                }
                bytes += len;
                ids.push(*id);
                to_read.pop_front();
            }
            let (root, locator) = (io.root.clone(), io.locator.clone());
            reading += 1;
            blocking(&mut jobs, move || {
                // The partial index when it holds them all, else the whole.
                let r = locator
                    .covering(&ids)
                    .and_then(|l| read_chunks(&root, l, &ids));
                Job::Read(r)
            });
        }
        if let Some(p) = &opts.progress {
            let s = session.summary();
            p.set(s.chunks_sent, s.bytes_sent, session.pending_chunks() as u64);
        }
        if outcome.is_some() && ctl_out.is_empty() && data_out.is_empty() && jobs.is_empty() {
            break;
        }
        let data_free = !data_out.is_empty() && !data_tx.is_empty();
        let next = rr % data_tx.len().max(1);
        tokio::select! {
            Some(j) = jobs.join_next() => match j {
                Ok(Job::Read(r)) => {
                    // (A failed worker of any job reads as a failed read.)
                    reading = reading.saturating_sub(1);
                    marks.set("read");
                    if to_read.is_empty() && reading == 0 {
                        marks.last("last-read");
                    }
                    match r {
                        Ok(chunks) => { let _ = session.send_chunks(chunks); }
                        Err(m) => session.abort(ErrorCode::Internal, m),
                    }
                }
                Ok(Job::Indexed(Err(m))) => session.abort(ErrorCode::Internal, m),
                _ => {}
            },
            p = ctl_tx.reserve(), if !ctl_out.is_empty() => match p {
                Ok(p) => p.send(ctl_out.pop_front().expect("not empty")),
                Err(_) => lost(&mut outcome, &mut ctl_out, &mut data_out, "control stream writer failed"),
            },
            p = data_tx[next].reserve(), if data_free => match p {
                Ok(p) => {
                    p.send(data_out.pop_front().expect("not empty"));
                    rr += 1;
                    marks.last("last-sent");
                }
                Err(_) => lost(&mut outcome, &mut ctl_out, &mut data_out, "data stream writer failed"),
            },
            i = in_rx.recv(), if input_open && outcome.is_none() => match i {
                Some(Input::Frame(f)) => {
                    if let Err(SessionError::Peer { code, message }) = session.handle_frame(f, Instant::now()) {
                        peer_err = Some(DriveError::Peer { code, message });
                    }
                }
                Some(Input::Chunks(c)) => {
                    // Refused as the frame they came in is.
                    let chunks = c.into_iter().map(|(id, d)| (id, d.to_vec())).collect();
                    let _ = session.handle_frame(Frame::Chunks { chunks }, Instant::now());
                }
                Some(Input::Bad(e)) => session.abort(wire_code(&e), format!("bad frame: {e}")),
                Some(Input::Misplaced(n)) => session.abort(ErrorCode::Protocol, format!("{n} frame on a data stream")),
                Some(Input::TooManyStreams) => session.abort(ErrorCode::Protocol, "too many data streams"),
                Some(Input::ControlEnd) => lost(&mut outcome, &mut ctl_out, &mut data_out, "peer closed the control stream"),
                Some(Input::Lost(m)) => lost(&mut outcome, &mut ctl_out, &mut data_out, &m),
                None => input_open = false,
            },
            _ = shutdown_signal(&mut opts.shutdown), if outcome.is_none() => {
                session.abort(ErrorCode::Internal, "the agent is shutting down");
            }
            else => lost(&mut outcome, &mut ctl_out, &mut data_out, "session stalled"),
        }
    }
    tracing::debug!("source loop ended");
    drop(ctl_tx);
    drop(data_tx);
    // Lost, nothing more goes through; succeeded, the sink has confirmed
    // the result, so waiting for it to acknowledge the streams' last bytes
    // (up to its 25 ms ack delay) would only delay the end. After an error
    // the writers flush, so that the peer reads why.
    if matches!(outcome, Some(Err(DriveError::Lost(_))) | Some(Ok(_))) {
        for w in &writers {
            w.abort();
        }
    }
    join_writers(writers).await;
    tracing::debug!("source writers done");
    DriveOutcome {
        result: outcome.expect("loop ends with an outcome"),
        partial: session.summary(),
    }
}

fn lost<T, D>(
    outcome: &mut Option<Result<T, DriveError>>,
    a: &mut VecDeque<Vec<u8>>,
    b: &mut VecDeque<D>,
    msg: &str,
) {
    tracing::debug!("session cut: {msg}");
    a.clear();
    b.clear();
    if outcome.is_none() {
        *outcome = Some(Err(DriveError::Lost(msg.to_string())));
    }
}

/// Moments of a session, for the debug log: where its time went, in ms
/// from the start. A step is marked the first time it happens
/// ([`Marks::set`]) or, for the steps named last, each time
/// ([`Marks::last`]); steps are named as in the list given to
/// [`Marks::new`], which is also the order they are printed in.
struct Marks {
    start: Instant,
    steps: &'static [&'static str],
    at: Vec<Option<Instant>>,
}

impl Marks {
    fn new(steps: &'static [&'static str]) -> Marks {
        Marks {
            start: Instant::now(),
            steps,
            at: vec![None; steps.len()],
        }
    }

    fn slot(&mut self, step: &str) -> &mut Option<Instant> {
        let i = self.steps.iter().position(|s| *s == step);
        debug_assert!(i.is_some(), "unknown step {step}");
        &mut self.at[i.unwrap_or(0)]
    }

    fn set(&mut self, step: &str) {
        self.slot(step).get_or_insert_with(Instant::now);
    }

    fn last(&mut self, step: &str) {
        *self.slot(step) = Some(Instant::now());
    }
}

impl std::fmt::Display for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, at) in self.steps.iter().zip(&self.at) {
            if let Some(t) = at {
                write!(f, "{name}@{} ", (*t - self.start).as_millis())?;
            }
        }
        Ok(())
    }
}

/// The sink's steps: tree objects fetched (it asks which chunks it
/// lacks), chunk wants out, commit planned ahead, the new subtrees' inner
/// symlinks made ahead, first and last chunks
/// checked, last staging job done, commit started (every chunk staged),
/// committed.
const SINK_STEPS: &[&str] = &[
    "trees",
    "wants",
    "planned",
    "linked",
    "first-chunk",
    "last-chunk",
    "staged",
    "commit",
    "committed",
];

/// The source's steps: first chunk wants in, chunks located, first read
/// done, last read done, last frame handed to a stream, result confirmed.
const SOURCE_STEPS: &[&str] = &[
    "wants",
    "indexed",
    "read",
    "last-read",
    "last-sent",
    "finished",
];

/// Load tree objects an interrupted session kept in `state`.
pub fn load_fetched_trees(state: &std::path::Path) -> Vec<(TreeId, Arc<[u8]>)> {
    let p = state.join(FETCHED_TREES_FILE);
    let Ok(b) = std::fs::read(&p) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 36 <= b.len() {
        let id = TreeId(b[at..at + 32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(b[at + 32..at + 36].try_into().expect("4 bytes")) as usize;
        at += 36;
        if at + len > b.len() {
            break;
        }
        let bytes = &b[at..at + len];
        at += len;
        // The session re-checks; a damaged record is simply dropped here.
        if TreeId::of(bytes) == id {
            out.push((id, Arc::from(bytes)));
        }
    }
    out
}

fn store_fetched_trees(state: &std::path::Path, trees: &[(TreeId, Arc<[u8]>)]) {
    let mut buf = Vec::new();
    for (id, bytes) in trees {
        if buf.len() + 36 + bytes.len() > MAX_KEPT_TREE_BYTES {
            break;
        }
        buf.extend_from_slice(id.as_bytes());
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(bytes);
    }
    if let Err(e) = sync_core::state::write_atomic(state, FETCHED_TREES_FILE, &buf) {
        tracing::warn!("cannot keep fetched tree objects: {e}");
    }
}

fn clear_fetched_trees(state: &std::path::Path) {
    let _ = std::fs::remove_file(state.join(FETCHED_TREES_FILE));
}

/// Drive the receiving end of a session to its end: stage what arrives,
/// commit through the [`Receiver`] when all is staged.
pub async fn drive_sink(
    mut session: SinkSession,
    io: SinkIo,
    link: Link,
    mut opts: DriveOptions,
) -> DriveOutcome {
    let (in_tx, mut in_rx) = mpsc::channel(INPUT_QUEUE);
    let _reader = Task(tokio::spawn(read_frames(
        link.control_recv,
        link.decoder,
        in_tx.clone(),
    )));
    let _acceptor = Task(tokio::spawn(accept_data(link.conn.clone(), in_tx)));
    let (ctl_tx, ctl_rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let writer = tokio::spawn(write_frames(link.control_send, ctl_rx, None));
    let state_dir: PathBuf = io
        .recv
        .lock()
        .expect("receiver lock")
        .state_dir()
        .to_path_buf();
    let mut ctl_out: VecDeque<Vec<u8>> = VecDeque::new();
    let mut no_data: VecDeque<Vec<u8>> = VecDeque::new();
    let mut to_store: VecDeque<(ChunkId, ChunkBytes)> = VecDeque::new();
    let mut storing = 0usize;
    // Set once the receiver has planned the commit ahead.
    let prebuilder: Arc<Mutex<Option<Arc<Prebuilder>>>> = Arc::default();
    // A plan is being made ahead; a commit asked meanwhile waits here.
    let mut planning = false;
    // Chunk bytes staged with no plan to build their files yet.
    let mut unplanned = 0usize;
    let mut held_commit: Option<Box<dyn FnOnce() -> Job + Send>> = None;
    let mut jobs: JoinSet<Job> = JoinSet::new();
    let mut outcome: Option<Result<Summary, DriveError>> = None;
    let mut peer_err: Option<DriveError> = None;
    let mut input_open = true;
    let mut root_known = false;
    // Where the transfer's time went (debug log): the span from the first
    // chunk to the last, and the time the staging jobs took.
    let staging_ns = Arc::new(AtomicU64::new(0));
    let mut span: Option<(Instant, Instant)> = None;
    let mut marks = Marks::new(SINK_STEPS);
    loop {
        while let Some((_, f)) = session.poll_transmit() {
            if outcome.is_none() {
                ctl_out.push_back(encode(&f));
            }
        }
        if !root_known {
            if let Some(r) = session.offered() {
                record_root(r);
                root_known = true;
            }
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                SinkEvent::NeedChunkCheck(list) => {
                    marks.set("trees");
                    let recv = io.recv.clone();
                    blocking(&mut jobs, move || {
                        let r = recv.lock().expect("receiver lock");
                        Job::Missing(Ok(list
                            .into_iter()
                            .map(|c| c.0)
                            .filter(|id| !r.have(id))
                            .collect()))
                    });
                }
                SinkEvent::StoreChunks(chunks) => {
                    marks.set("first-chunk");
                    marks.last("last-chunk");
                    let now = Instant::now();
                    span = Some((span.map_or(now, |s| s.0), now));
                    to_store.extend(chunks)
                }
                SinkEvent::Commit { manifest, .. } => {
                    marks.set("commit");
                    let recv = io.recv.clone();
                    let copts = io.commit.clone();
                    let state = state_dir.clone();
                    let commit = move || {
                        let mut r = recv.lock().expect("receiver lock");
                        // Unreachable tree objects are dropped by the
                        // receiver's own amortized rewrite, not per commit.
                        let m = manifest;
                        let planned = match r.expected_plan(&m) {
                            Some(plan) => Ok(plan),
                            None => r.plan(&m).map(Arc::new),
                        };
                        // The answer goes out before the head's wait for
                        // the disk (the journal already decides the
                        // commit): `Job::Settled` follows.
                        r.settle_later(true);
                        let res = planned
                            .and_then(|plan| r.commit(&m, &plan, &copts))
                            .map(|s| {
                                tracing::info!(
                                    files = s.files_written,
                                    bytes = s.bytes_written,
                                    deleted = s.deleted,
                                    "committed"
                                );
                                clear_fetched_trees(&state);
                                m.snapshot()
                            })
                            .map_err(|e| e.to_string());
                        Job::Committed(res)
                    };
                    // A plan still being made ahead is waited for: the
                    // commit takes it (and its scratch space).
                    if planning {
                        held_commit = Some(Box::new(commit));
                    } else {
                        blocking(&mut jobs, commit);
                    }
                }
                SinkEvent::Finished(s) => {
                    tracing::debug!(
                        transfer_ms = span.map_or(0, |(a, b)| (b - a).as_millis() as u64),
                        staging_ms = staging_ns.load(Ordering::Relaxed) / 1_000_000,
                        phases = %marks,
                        "transfer"
                    );
                    tracing::info!(
                        chunks = s.chunks_received,
                        bytes = s.bytes_received,
                        local = s.chunks_local,
                        unchanged = s.unchanged,
                        "received"
                    );
                    outcome = Some(Ok(s));
                }
                SinkEvent::Failed(code, message) => {
                    tracing::warn!(%code, %message, "sink session failed");
                    outcome = Some(Err(peer_err
                        .take()
                        .unwrap_or(DriveError::Local { code, message })));
                }
            }
        }
        // While the plan is made, only a bounded amount is staged without
        // its files built: past it the sender waits for the plan (what
        // arrives before it is read back from staging to build its files,
        // or built by the commit, both slower than building as it comes).
        let plan_wait = planning && unplanned >= UNPLANNED_MAX;
        if storing < STORE_JOBS && !to_store.is_empty() && outcome.is_none() && !plan_wait {
            storing += 1;
            // Bounded jobs: a crash loses at most their chunks, which the
            // next session asks for again.
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            while let Some((id, data)) = to_store.pop_front() {
                bytes += data.len();
                batch.push((id, data));
                if bytes >= STORE_BATCH {
                    break;
                }
            }
            let builder = prebuilder.lock().expect("slot").clone();
            if builder.is_none() {
                unplanned += bytes;
            }
            let recv = io.recv.clone();
            let staging_ns = staging_ns.clone();
            blocking(&mut jobs, move || {
                let t = Instant::now();
                // Files that are one of these chunks get their temporary
                // first (not under the receiver's lock), and the larger of
                // those chunks are staged as a link to it: their bytes are
                // written once.
                let linked = builder.map_or_else(Vec::new, |b| b.build(&batch, true));
                let staged = stage_batch(&mut recv.lock().expect("receiver lock"), &batch, &linked);
                staging_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                Job::Stored(staged.map_err(|e| format!("staging failed: {e}")))
            });
        }
        if let Some(p) = &opts.progress {
            let s = session.summary();
            p.set(
                s.chunks_received,
                s.bytes_received,
                (session.outstanding_chunks() + session.queued_chunks()) as u64,
            );
        }
        if outcome.is_some() && ctl_out.is_empty() && jobs.is_empty() {
            break;
        }
        tokio::select! {
            Some(j) = jobs.join_next() => match j {
                Ok(Job::Missing(Ok(ids))) => {
                    marks.set("wants");
                    let fetching = !ids.is_empty();
                    let _ = session.chunks_missing(ids);
                    // Plan the commit while the first chunks are on their
                    // way, so that files are built as they arrive.
                    if let Some(m) = session.incoming().filter(|_| fetching).cloned() {
                        let (recv, copts) = (io.recv.clone(), io.commit.clone());
                        // The session's diff: not computed again.
                        let changes = session.take_changes();
                        planning = true;
                        blocking(&mut jobs, move || {
                            // The receiver is held only to start and to
                            // take the plan: staging goes on meanwhile.
                            let ahead = recv.lock().expect("receiver lock").plan_ahead(&copts);
                            let planned = ahead.and_then(|a| match a {
                                Some(a) => a.plan_from(&m, changes).map(|p| {
                                    recv.lock().expect("receiver lock").expect_planned(p)
                                }),
                                None => Ok(None),
                            });
                            Job::Planned(planned.unwrap_or_else(|e| {
                                tracing::warn!("planning ahead failed: {e}");
                                None
                            }))
                        });
                    }
                }
                Ok(Job::Stored(Ok(ids))) => {
                    storing -= 1;
                    marks.last("staged");
                    let _ = session.chunks_stored(ids);
                }
                Ok(Job::Committed(r)) => {
                    marks.set("committed");
                    let _ = session.commit_done(r);
                    let recv = io.recv.clone();
                    blocking(&mut jobs, move || {
                        let mut r = recv.lock().expect("receiver lock");
                        if let Err(e) = r.settle() {
                            // Finished by the journal when next opened.
                            tracing::warn!("storing the new head failed: {e}");
                        }
                        Job::Settled
                    });
                }
                Ok(Job::Settled) => {}
                Ok(Job::Stored(Err(m))) => { storing -= 1; session.abort(ErrorCode::Internal, m) }
                Ok(Job::Missing(Err(m)) | Job::Read(Err(m))) => session.abort(ErrorCode::Internal, m),
                Ok(Job::Prebuilt) => {}
                Ok(Job::Planned(builder)) => {
                    marks.set("planned");
                    planning = false;
                    *prebuilder.lock().expect("slot") = builder.clone();
                    if let Some(b) = builder {
                        // Files whose chunk was staged before the builder
                        // existed: read back a batch at a time, so staging
                        // goes on between.
                        let (b2, recv) = (b.clone(), io.recv.clone());
                        blocking(&mut jobs, move || {
                            let mut ids = b2.waiting();
                            while !ids.is_empty() && !b2.is_closed() {
                                let batch = recv
                                    .lock()
                                    .expect("receiver lock")
                                    .read_staged(&mut ids, CATCH_UP_READ);
                                b2.build(&batch, false);
                            }
                            Job::Prebuilt
                        });
                        // The new subtrees' inner symlinks need no chunk:
                        // made while the chunks come, and the plan's
                        // digest after them (the commit needs it).
                        blocking(&mut jobs, move || {
                            b.link();
                            b.digest();
                            Job::Linked
                        });
                    }
                    if let Some(commit) = held_commit.take() {
                        blocking(&mut jobs, commit);
                    }
                }
                Ok(Job::Linked) => marks.set("linked"),
                Ok(Job::Read(Ok(_)) | Job::Indexed(_)) => {}
                Err(e) => session.abort(ErrorCode::Internal, format!("worker failed: {e}")),
            },
            p = ctl_tx.reserve(), if !ctl_out.is_empty() => match p {
                Ok(p) => p.send(ctl_out.pop_front().expect("not empty")),
                Err(_) => lost(&mut outcome, &mut ctl_out, &mut no_data, "control stream writer failed"),
            },
            i = in_rx.recv(), if input_open && outcome.is_none() => match i {
                Some(Input::Frame(f)) => {
                    if let Err(SessionError::Peer { code, message }) = session.handle_frame(f, Instant::now()) {
                        peer_err = Some(DriveError::Peer { code, message });
                    }
                }
                Some(Input::Chunks(c)) => {
                    let _ = session.handle_chunks(c, Instant::now());
                }
                Some(Input::Bad(e)) => session.abort(wire_code(&e), format!("bad frame: {e}")),
                Some(Input::Misplaced(n)) => session.abort(ErrorCode::Protocol, format!("{n} frame on a data stream")),
                Some(Input::TooManyStreams) => session.abort(ErrorCode::Protocol, "too many data streams"),
                Some(Input::ControlEnd) => lost(&mut outcome, &mut ctl_out, &mut no_data, "peer closed the control stream"),
                Some(Input::Lost(m)) => lost(&mut outcome, &mut ctl_out, &mut no_data, &m),
                None => input_open = false,
            },
            _ = shutdown_signal(&mut opts.shutdown), if outcome.is_none() => {
                session.abort(ErrorCode::Internal, "the agent is shutting down");
            }
            else => lost(&mut outcome, &mut ctl_out, &mut no_data, "session stalled"),
        }
    }
    if !session.is_finished() {
        let mut trees = io.seeded;
        trees.extend(session.fetched_trees());
        if !trees.is_empty() {
            let state = state_dir.clone();
            let _ = tokio::task::spawn_blocking(move || store_fetched_trees(&state, &trees)).await;
        }
    }
    drop(ctl_tx);
    if matches!(outcome, Some(Err(DriveError::Lost(_)))) {
        writer.abort();
    }
    join_writers(vec![writer]).await;
    DriveOutcome {
        result: outcome.expect("loop ends with an outcome"),
        partial: session.summary(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads use the partial index while it holds every chunk asked for,
    /// and build the whole one only for a chunk outside the fetched trees.
    #[test]
    fn reads_use_the_partial_index_until_a_chunk_is_outside_it() {
        let t = tempfile::tempdir().unwrap();
        for d in ["new", "old"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("new/a"), b"fetched").unwrap();
        std::fs::write(t.path().join("old/b"), b"not fetched").unwrap();
        let opts = sync_core::scan::ScanOptions {
            cache: None,
            owners: false,
            ..Default::default()
        };
        let m = sync_core::scan::scan(t.path(), &opts).unwrap().manifest;
        let dir = |name: &[u8]| m.lookup(name).unwrap().unwrap().subtree().unwrap();
        let (a, b) = (ChunkId::of(b"fetched"), ChunkId::of(b"not fetched"));
        let l = LazyLocator::new(m.clone());
        l.build_within(&HashSet::from([dir(b"new")])).unwrap();
        let part = l.covering(&[a]).unwrap();
        assert!(part.get(&b).is_none(), "the partial index serves `a`");
        assert!(l.full.get().is_none(), "no whole index built");
        let whole = l.covering(&[a, b]).unwrap();
        assert!(whole.get(&b).is_some());
        assert!(l.full.get().is_some());
    }
}
