//! The wire codec of the sync protocol: length-prefixed, typed, bounded
//! frames. Each frame is `u32 LE payload length | u8 frame type | payload`,
//! the payload being bincode 2 (serde) of the message body. [`encode`] turns
//! a [`Frame`] into bytes; [`FrameDecoder`] takes bytes as they arrive and
//! yields whole frames, refusing an oversized length or an unknown type as
//! soon as the 5-byte header is in, before any payload is buffered. Every
//! decoded frame is checked against the limits below. No IO.

use std::fmt;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

use crate::chunk::{ChunkBytes, MAX_CHUNK};
use crate::hash::{ChunkId, SnapshotId, TreeId};

/// Version spoken in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length prefix (4) and frame type (1).
pub const HEADER_LEN: usize = 5;
/// Largest payload a frame may carry.
pub const MAX_FRAME: usize = 16 << 20;
/// Chunk data per `Chunks` frame a sender packs (well below [`MAX_FRAME`]).
pub const MAX_CHUNK_BATCH: usize = 4 << 20;
/// Tree object bytes per `Trees` frame a sender packs.
pub const MAX_TREE_BATCH: usize = 4 << 20;
/// Ids (or objects) in one message.
pub const MAX_IDS_PER_MESSAGE: usize = 65536;
/// Longest tree name in `Hello`.
pub const MAX_TREE_NAME: usize = 255;
/// Longest client agent string in `Hello`.
pub const MAX_AGENT: usize = 255;
/// Longest message in an `Error` frame; longer ones are cut by [`Frame::error`].
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Which way the tree flows, from the client's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// The client is the source, the server the sink.
    Push,
    /// The client is the sink (restore), the server the source.
    Pull,
}

/// Typed reason carried by an `Error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A frame out of order, not asked for, or of another version.
    Protocol,
    Unauthorized,
    UnknownTree,
    TooLarge,
    /// A tree object or chunk that does not match its id or is invalid.
    BadData,
    CommitFailed,
    Busy,
    Internal,
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Protocol => 1,
            ErrorCode::Unauthorized => 2,
            ErrorCode::UnknownTree => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::BadData => 5,
            ErrorCode::CommitFailed => 6,
            ErrorCode::Busy => 7,
            ErrorCode::Internal => 8,
        }
    }

    /// A code from a newer peer that we do not know reads as `Internal`.
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Unauthorized,
            3 => ErrorCode::UnknownTree,
            4 => ErrorCode::TooLarge,
            5 => ErrorCode::BadData,
            6 => ErrorCode::CommitFailed,
            7 => ErrorCode::Busy,
            _ => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::Protocol => "protocol error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownTree => "unknown tree",
            ErrorCode::TooLarge => "too large",
            ErrorCode::BadData => "bad data",
            ErrorCode::CommitFailed => "commit failed",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal error",
        };
        f.write_str(s)
    }
}

/// The frame type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    Welcome = 2,
    SinkState = 3,
    Offer = 4,
    WantTrees = 5,
    Trees = 6,
    WantChunks = 7,
    Chunks = 8,
    Done = 9,
    Committed = 10,
    Error = 11,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            1 => FrameType::Hello,
            2 => FrameType::Welcome,
            3 => FrameType::SinkState,
            4 => FrameType::Offer,
            5 => FrameType::WantTrees,
            6 => FrameType::Trees,
            7 => FrameType::WantChunks,
            8 => FrameType::Chunks,
            9 => FrameType::Done,
            10 => FrameType::Committed,
            11 => FrameType::Error,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "Hello",
            FrameType::Welcome => "Welcome",
            FrameType::SinkState => "SinkState",
            FrameType::Offer => "Offer",
            FrameType::WantTrees => "WantTrees",
            FrameType::Trees => "Trees",
            FrameType::WantChunks => "WantChunks",
            FrameType::Chunks => "Chunks",
            FrameType::Done => "Done",
            FrameType::Committed => "Committed",
            FrameType::Error => "Error",
        }
    }
}

/// One protocol message.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client -> server, first frame on the control stream.
    Hello {
        version: u16,
        tree: String,
        direction: Direction,
        client_agent: String,
    },
    /// Server -> client. For a push the server is the sink and tells its
    /// committed root; for a pull it sends `None`.
    Welcome {
        version: u16,
        sink_root: Option<SnapshotId>,
    },
    /// Pull client (the sink) -> server: the root it has committed.
    SinkState { root: Option<SnapshotId> },
    /// Source -> sink: the snapshot to sync.
    Offer { root: SnapshotId },
    /// Sink -> source: tree objects it lacks.
    WantTrees { ids: Vec<TreeId> },
    /// Source -> sink: encoded tree objects, each under its id.
    Trees { trees: Vec<(TreeId, Vec<u8>)> },
    /// Sink -> source: chunks it lacks. An empty list means "no more wants".
    WantChunks { ids: Vec<ChunkId> },
    /// Source -> sink, on a data stream: chunk contents.
    Chunks { chunks: Vec<(ChunkId, Vec<u8>)> },
    /// Source -> sink: every wanted chunk has been sent.
    Done { root: SnapshotId },
    /// Sink -> source: the root is committed (or was already).
    Committed { root: SnapshotId },
    /// Either way: the session is over because of `code`.
    Error { code: ErrorCode, message: String },
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::Welcome { .. } => FrameType::Welcome,
            Frame::SinkState { .. } => FrameType::SinkState,
            Frame::Offer { .. } => FrameType::Offer,
            Frame::WantTrees { .. } => FrameType::WantTrees,
            Frame::Trees { .. } => FrameType::Trees,
            Frame::WantChunks { .. } => FrameType::WantChunks,
            Frame::Chunks { .. } => FrameType::Chunks,
            Frame::Done { .. } => FrameType::Done,
            Frame::Committed { .. } => FrameType::Committed,
            Frame::Error { .. } => FrameType::Error,
        }
    }

    pub fn name(&self) -> &'static str {
        self.frame_type().name()
    }

    /// An `Error` frame, its message cut to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Frame::Error { code, message }
    }

    /// Check the limits a decoder enforces (also used before sending).
    pub fn validate(&self) -> Result<(), WireError> {
        let kind = self.name();
        let limit = |what: String| Err(WireError::Limit { kind, what });
        match self {
            Frame::Hello {
                tree, client_agent, ..
            } => {
                if tree.is_empty() || tree.len() > MAX_TREE_NAME {
                    return limit(format!("tree name of {} bytes", tree.len()));
                }
                if client_agent.len() > MAX_AGENT {
                    return limit(format!("client agent of {} bytes", client_agent.len()));
                }
            }
            Frame::WantTrees { ids } if ids.len() > MAX_IDS_PER_MESSAGE => {
                return limit(format!("{} ids", ids.len()));
            }
            Frame::WantChunks { ids } if ids.len() > MAX_IDS_PER_MESSAGE => {
                return limit(format!("{} ids", ids.len()));
            }
            Frame::Trees { trees } if trees.len() > MAX_IDS_PER_MESSAGE => {
                return limit(format!("{} tree objects", trees.len()));
            }
            Frame::Chunks { chunks } => {
                if chunks.len() > MAX_IDS_PER_MESSAGE {
                    return limit(format!("{} chunks", chunks.len()));
                }
                if let Some((id, data)) = chunks
                    .iter()
                    .find(|(_, d)| d.is_empty() || d.len() > MAX_CHUNK)
                {
                    return limit(format!("chunk {id} of {} bytes", data.len()));
                }
            }
            Frame::Error { message, .. } if message.len() > MAX_ERROR_MESSAGE => {
                return limit(format!("error message of {} bytes", message.len()));
            }
            _ => {}
        }
        Ok(())
    }
}

impl fmt::Debug for Frame {
    /// Summarises byte payloads instead of dumping megabytes into logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Hello {
                version,
                tree,
                direction,
                client_agent,
            } => f
                .debug_struct("Hello")
                .field("version", version)
                .field("tree", tree)
                .field("direction", direction)
                .field("client_agent", client_agent)
                .finish(),
            Frame::Welcome { version, sink_root } => f
                .debug_struct("Welcome")
                .field("version", version)
                .field("sink_root", sink_root)
                .finish(),
            Frame::SinkState { root } => f.debug_struct("SinkState").field("root", root).finish(),
            Frame::Offer { root } => f.debug_struct("Offer").field("root", root).finish(),
            Frame::WantTrees { ids } => write!(f, "WantTrees({} ids)", ids.len()),
            Frame::Trees { trees } => write!(
                f,
                "Trees({} objects, {} bytes)",
                trees.len(),
                trees.iter().map(|t| t.1.len()).sum::<usize>()
            ),
            Frame::WantChunks { ids } => write!(f, "WantChunks({} ids)", ids.len()),
            Frame::Chunks { chunks } => write!(
                f,
                "Chunks({} chunks, {} bytes)",
                chunks.len(),
                chunks.iter().map(|c| c.1.len()).sum::<usize>()
            ),
            Frame::Done { root } => f.debug_struct("Done").field("root", root).finish(),
            Frame::Committed { root } => f.debug_struct("Committed").field("root", root).finish(),
            Frame::Error { code, message } => f
                .debug_struct("Error")
                .field("code", code)
                .field("message", message)
                .finish(),
        }
    }
}

/// Why bytes from a peer were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{kind} frame does not decode: {reason}")]
    BadPayload { kind: &'static str, reason: String },
    #[error("{kind} frame has {extra} trailing bytes")]
    TrailingBytes { kind: &'static str, extra: usize },
    #[error("{kind} frame exceeds a limit: {what}")]
    Limit { kind: &'static str, what: String },
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
    #[error("{0} frame on a data stream")]
    Misplaced(&'static str),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Serialises `[(K, Vec<u8>)]` with each byte vector written raw.
struct BytePairs<'a, K>(&'a [(K, Vec<u8>)]);

impl<K: Serialize> Serialize for BytePairs<'_, K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(k, v)| (k, serde_bytes::Bytes::new(v))))
    }
}

fn unpairs<K>(v: Vec<(K, serde_bytes::ByteBuf)>) -> Vec<(K, Vec<u8>)> {
    v.into_iter().map(|(k, b)| (k, b.into_vec())).collect()
}

/// Encode one frame. The sessions never build a frame beyond the limits;
/// use [`try_encode`] for frames of other origin.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(frame, &mut out);
    out
}

/// Append the encoding of `frame` to `out`.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, frame.frame_type() as u8]);
    let cfg = bincode::config::standard();
    let w = &mut *out;
    let r = match frame {
        Frame::Hello {
            version,
            tree,
            direction,
            client_agent,
        } => {
            bincode::serde::encode_into_std_write((version, tree, direction, client_agent), w, cfg)
        }
        Frame::Welcome { version, sink_root } => {
            bincode::serde::encode_into_std_write((version, sink_root), w, cfg)
        }
        Frame::SinkState { root } => bincode::serde::encode_into_std_write(root, w, cfg),
        Frame::Offer { root } | Frame::Done { root } | Frame::Committed { root } => {
            bincode::serde::encode_into_std_write(root, w, cfg)
        }
        Frame::WantTrees { ids } => bincode::serde::encode_into_std_write(ids, w, cfg),
        Frame::WantChunks { ids } => bincode::serde::encode_into_std_write(ids, w, cfg),
        Frame::Trees { trees } => bincode::serde::encode_into_std_write(BytePairs(trees), w, cfg),
        Frame::Chunks { chunks } => {
            bincode::serde::encode_into_std_write(BytePairs(chunks), w, cfg)
        }
        Frame::Error { code, message } => {
            bincode::serde::encode_into_std_write((code.to_u16(), message), w, cfg)
        }
    };
    r.expect("encoding into a Vec cannot fail");
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Encode after checking every limit the peer's decoder will apply.
pub fn try_encode(frame: &Frame) -> Result<Vec<u8>, WireError> {
    frame.validate()?;
    let out = encode(frame);
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(out)
}

/// Raw byte vectors at least this long travel as their own part in
/// [`encode_parts`]; shorter ones are copied in beside their prefix.
const PART_MIN: usize = 4 << 10;

/// The encoding of `frame` as buffers whose concatenation is exactly
/// [`encode`]'s, taking the frame by value: the chunk contents of a
/// `Chunks` frame (and the objects of a `Trees` frame) of at least 4 KiB
/// become parts of their own, moved instead of copied into one buffer.
pub fn encode_parts(frame: Frame) -> Vec<Vec<u8>> {
    let ty = frame.frame_type();
    match frame {
        Frame::Chunks { chunks } => pairs_parts(ty, chunks),
        Frame::Trees { trees } => pairs_parts(ty, trees),
        other => vec![encode(&other)],
    }
}

fn pairs_parts<K: Serialize>(ty: FrameType, pairs: Vec<(K, Vec<u8>)>) -> Vec<Vec<u8>> {
    fn put<T: Serialize>(v: &T, out: &mut Vec<u8>) {
        bincode::serde::encode_into_std_write(v, out, bincode::config::standard())
            .expect("encoding into a Vec cannot fail");
    }
    let mut parts = Vec::new();
    let mut cur = vec![0, 0, 0, 0, ty as u8];
    put(&(pairs.len() as u64), &mut cur);
    for (key, data) in pairs {
        // What `BytePairs` writes: the key, the byte length, the bytes.
        put(&key, &mut cur);
        put(&(data.len() as u64), &mut cur);
        if data.len() >= PART_MIN {
            parts.push(std::mem::take(&mut cur));
            parts.push(data);
        } else {
            cur.extend_from_slice(&data);
        }
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    let len = (parts.iter().map(Vec::len).sum::<usize>() - HEADER_LEN) as u32;
    parts[0][..4].copy_from_slice(&len.to_le_bytes());
    parts
}

fn body<T: DeserializeOwned>(kind: &'static str, payload: &[u8]) -> Result<T, WireError> {
    let (v, used): (T, usize) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| {
            WireError::BadPayload {
                kind,
                reason: e.to_string(),
            }
        })?;
    if used != payload.len() {
        return Err(WireError::TrailingBytes {
            kind,
            extra: payload.len() - used,
        });
    }
    Ok(v)
}

/// Decode the payload of a frame of type `ty` and check its limits.
pub fn decode_payload(ty: FrameType, payload: &[u8]) -> Result<Frame, WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME,
        });
    }
    let k = ty.name();
    let frame = match ty {
        FrameType::Hello => {
            let (version, tree, direction, client_agent) = body(k, payload)?;
            Frame::Hello {
                version,
                tree,
                direction,
                client_agent,
            }
        }
        FrameType::Welcome => {
            let (version, sink_root) = body(k, payload)?;
            Frame::Welcome { version, sink_root }
        }
        FrameType::SinkState => Frame::SinkState {
            root: body(k, payload)?,
        },
        FrameType::Offer => Frame::Offer {
            root: body(k, payload)?,
        },
        FrameType::Done => Frame::Done {
            root: body(k, payload)?,
        },
        FrameType::Committed => Frame::Committed {
            root: body(k, payload)?,
        },
        FrameType::WantTrees => Frame::WantTrees {
            ids: body(k, payload)?,
        },
        FrameType::WantChunks => Frame::WantChunks {
            ids: body(k, payload)?,
        },
        FrameType::Trees => Frame::Trees {
            trees: unpairs(body(k, payload)?),
        },
        FrameType::Chunks => Frame::Chunks {
            chunks: unpairs(body(k, payload)?),
        },
        FrameType::Error => {
            let (code, message): (u16, String) = body(k, payload)?;
            Frame::Error {
                code: ErrorCode::from_u16(code),
                message,
            }
        }
    };
    frame.validate()?;
    Ok(frame)
}

/// Check a header: `Ok(Some((type, payload_len)))` once 5 bytes are in.
fn parse_header(bytes: &[u8]) -> Result<Option<(FrameType, usize)>, WireError> {
    if bytes.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let ty = FrameType::from_u8(bytes[4]).ok_or(WireError::UnknownType(bytes[4]))?;
    Ok(Some((ty, len)))
}

/// Decode the first frame of `bytes`: `Ok(None)` if it is not all there
/// yet, else the frame and the bytes it used.
pub fn decode(bytes: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some((ty, len)) = parse_header(bytes)? else {
        return Ok(None);
    };
    let end = HEADER_LEN + len;
    if bytes.len() < end {
        return Ok(None);
    }
    let frame = decode_payload(ty, &bytes[HEADER_LEN..end])?;
    Ok(Some((frame, end)))
}

/// Streaming decoder for one byte stream: push bytes in as they arrive,
/// pop whole frames out. After an error it stays failed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    failed: Option<WireError>,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Append received bytes. The header of a pending frame is checked at
    /// once, so a bad length fails before its payload is buffered.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // Take what completes the pending header first, check it, then the rest.
        let pending = self.buf.len() - self.start;
        if pending < HEADER_LEN {
            let take = (HEADER_LEN - pending).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            if let Err(e) = parse_header(&self.buf[self.start..]) {
                self.failed = Some(e.clone());
                return Err(e);
            }
            self.buf.extend_from_slice(&bytes[take..]);
        } else {
            self.buf.extend_from_slice(bytes);
        }
        Ok(())
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match decode(&self.buf[self.start..]) {
            Ok(Some((frame, used))) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Bytes held that do not yet make a whole frame (after `next_frame`
    /// returned `None`).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Call at the end of the stream: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            n => Err(WireError::Truncated(n)),
        }
    }
}

/// Streaming decoder for a data stream, which carries only `Chunks`
/// frames. A chunk's bytes stay in the received buffers where they arrive
/// in pieces of at least [`SHARE_MIN`] bytes (no copy); smaller pieces
/// are copied, each run of them into one buffer of the chunk's own, sized
/// from its length prefix (checked against the frame's remaining length
/// first). [`FrameDecoder`] instead gathers the whole frame and then
/// copies every chunk out of it. The frames, limits and refusals are
/// [`FrameDecoder`]'s; a frame of another type fails as
/// [`WireError::Misplaced`] once its header is in.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    step: ChunkStep,
    /// Header, count or chunk prefix bytes gathered so far.
    hold: Vec<u8>,
    /// Payload length of the current frame, and its bytes not consumed yet.
    frame_len: usize,
    frame_left: usize,
    /// Chunks of the current frame not started yet.
    count_left: u64,
    chunks: Vec<(ChunkId, ChunkBytes)>,
    ready: std::collections::VecDeque<Vec<(ChunkId, ChunkBytes)>>,
    failed: Option<WireError>,
}

#[derive(Debug, Default)]
enum ChunkStep {
    #[default]
    Header,
    Count,
    Prefix,
    Data(ChunkId, Gather, usize),
}

/// A chunk's bytes as they come in: shared pieces, and the small pieces
/// since the last shared one copied into `copied`.
#[derive(Debug, Default)]
struct Gather {
    parts: ChunkBytes,
    copied: Vec<u8>,
}

impl Gather {
    fn len(&self) -> usize {
        self.parts.len() + self.copied.len()
    }

    fn add(&mut self, buf: &Bytes, range: std::ops::Range<usize>, chunk_len: usize) {
        if range.len() >= SHARE_MIN {
            self.end_copied();
            self.parts.push(buf.slice(range));
        } else {
            // Room for the rest of the chunk (as over a path of 1500-byte
            // packets, where every piece is small), up to a datagram's.
            if self.copied.capacity() == 0 {
                self.copied.reserve((chunk_len - self.len()).min(64 << 10));
            }
            self.copied.extend_from_slice(&buf[range]);
        }
    }

    fn end_copied(&mut self) {
        if !self.copied.is_empty() {
            let mut v = std::mem::take(&mut self.copied);
            if v.capacity() > 2 * v.len() {
                v.shrink_to_fit();
            }
            self.parts.push(Bytes::from(v));
        }
    }

    fn finish(mut self) -> ChunkBytes {
        self.end_copied();
        self.parts
    }
}

/// Received pieces from this size are kept in the buffers they came in,
/// smaller ones copied. A kept piece holds on to its whole buffer (quinn
/// receives each datagram, or each batch the kernel coalesced, into one
/// of at most 64 KiB), so what the chunks in a sink's window pin stays
/// within 4 times their size, however a peer cuts its stream frames.
pub const SHARE_MIN: usize = 16 << 10;

const CHUNKS: &str = "Chunks";

/// Bytes of a bincode varint that starts with `first` (see bincode's
/// specification: one byte below 251, else a marker and 2, 4 or 8 bytes).
fn varint_len(first: u8) -> Option<usize> {
    match first {
        0..=250 => Some(1),
        251 => Some(3),
        252 => Some(5),
        253 => Some(9),
        _ => None,
    }
}

impl ChunkDecoder {
    pub fn new() -> ChunkDecoder {
        ChunkDecoder::default()
    }

    /// Take in received bytes (the chunks they carry keep slices of
    /// them); whole frames' chunks wait in [`Self::next_chunks`]. After
    /// an error the decoder stays failed.
    pub fn push_bytes(&mut self, bytes: Bytes) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.consume(bytes)
            .inspect_err(|e| self.failed = Some(e.clone()))
    }

    /// [`Self::push_bytes`] of a copy of `bytes`.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.push_bytes(Bytes::copy_from_slice(bytes))
    }

    /// The chunks of the next whole frame, `None` if more bytes are needed.
    pub fn next_chunks(&mut self) -> Option<Vec<(ChunkId, ChunkBytes)>> {
        self.ready.pop_front()
    }

    /// Call at the end of the stream: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match (&self.step, self.hold.len()) {
            (ChunkStep::Header, 0) => Ok(()),
            (ChunkStep::Header, n) => Err(WireError::Truncated(n)),
            // The bytes of the cut frame that arrived, as FrameDecoder
            // reports them (held prefix bytes are not yet deducted).
            _ => Err(WireError::Truncated(
                HEADER_LEN + self.frame_len - self.frame_left + self.hold.len(),
            )),
        }
    }

    fn consume(&mut self, bytes: Bytes) -> Result<(), WireError> {
        let bad = |reason: &str| WireError::BadPayload {
            kind: CHUNKS,
            reason: reason.to_string(),
        };
        let mut rest: &[u8] = &bytes;
        loop {
            match &mut self.step {
                ChunkStep::Header => {
                    if rest.is_empty() {
                        return Ok(());
                    }
                    if !self.take_hold(&mut rest, HEADER_LEN) {
                        return Ok(());
                    }
                    let (ty, len) = parse_header(&self.hold)?.expect("a whole header");
                    if ty != FrameType::Chunks {
                        return Err(WireError::Misplaced(ty.name()));
                    }
                    self.hold.clear();
                    self.frame_len = len;
                    self.frame_left = len;
                    self.step = ChunkStep::Count;
                }
                ChunkStep::Count => {
                    let Some(n) = self.varint_prefix(&mut rest, 0)? else {
                        return Ok(());
                    };
                    let count: u64 = decode_exact(&self.hold)?;
                    self.frame_left -= n;
                    self.hold.clear();
                    if count > MAX_IDS_PER_MESSAGE as u64 {
                        return Err(WireError::Limit {
                            kind: CHUNKS,
                            what: format!("{count} chunks"),
                        });
                    }
                    self.count_left = count;
                    self.chunks = Vec::with_capacity((count as usize).min(1024));
                    self.step = ChunkStep::Prefix;
                    self.end_of_chunk()?;
                }
                ChunkStep::Prefix => {
                    let Some(n) = self.varint_prefix(&mut rest, 32)? else {
                        return Ok(());
                    };
                    let (id, len): (ChunkId, u64) = decode_exact(&self.hold)?;
                    self.frame_left -= n;
                    self.hold.clear();
                    if len == 0 || len > MAX_CHUNK as u64 {
                        return Err(WireError::Limit {
                            kind: CHUNKS,
                            what: format!("chunk {id} of {len} bytes"),
                        });
                    }
                    let len = len as usize;
                    if len > self.frame_left {
                        return Err(bad("a chunk runs past the end of the frame"));
                    }
                    self.step = ChunkStep::Data(id, Gather::default(), len);
                }
                ChunkStep::Data(id, gather, len) => {
                    let take = (*len - gather.len()).min(rest.len());
                    let at = bytes.len() - rest.len();
                    gather.add(&bytes, at..at + take, *len);
                    rest = &rest[take..];
                    self.frame_left -= take;
                    if gather.len() < *len {
                        return Ok(());
                    }
                    let data = std::mem::take(gather).finish();
                    self.chunks.push((*id, data));
                    self.count_left -= 1;
                    self.step = ChunkStep::Prefix;
                    self.end_of_chunk()?;
                }
            }
        }
    }

    /// Move bytes into `hold` until it holds `want`; whether it does.
    fn take_hold(&mut self, bytes: &mut &[u8], want: usize) -> bool {
        let take = want.saturating_sub(self.hold.len()).min(bytes.len());
        self.hold.extend_from_slice(&bytes[..take]);
        *bytes = &bytes[take..];
        self.hold.len() >= want
    }

    /// Gather `fixed` bytes and then a varint into `hold`, within the
    /// frame's remaining payload: `Some(length)` once all of it is in.
    fn varint_prefix(
        &mut self,
        bytes: &mut &[u8],
        fixed: usize,
    ) -> Result<Option<usize>, WireError> {
        let cut = || WireError::BadPayload {
            kind: CHUNKS,
            reason: "the frame ends inside a length".into(),
        };
        if self.frame_left <= fixed {
            return Err(cut());
        }
        if !self.take_hold(bytes, fixed + 1) {
            return Ok(None);
        }
        let want = fixed
            + varint_len(self.hold[fixed]).ok_or_else(|| WireError::BadPayload {
                kind: CHUNKS,
                reason: format!("bad length marker {}", self.hold[fixed]),
            })?;
        if want > self.frame_left {
            return Err(cut());
        }
        Ok(self.take_hold(bytes, want).then_some(want))
    }

    /// After a count or a chunk: once the frame's chunks are all in, check
    /// that nothing is left over and queue its chunks (their count and
    /// lengths were checked as they came).
    fn end_of_chunk(&mut self) -> Result<(), WireError> {
        if self.count_left > 0 {
            return Ok(());
        }
        if self.frame_left > 0 {
            return Err(WireError::TrailingBytes {
                kind: CHUNKS,
                extra: self.frame_left,
            });
        }
        self.ready.push_back(std::mem::take(&mut self.chunks));
        self.step = ChunkStep::Header;
        Ok(())
    }
}

/// Decode `bytes` as one `T`, all of them used.
fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    body(CHUNKS, bytes)
}

/// Frames of `bytes` pushed `step` at a time into a [`FrameDecoder`]
/// (`true`: every byte decoded and the stream ended cleanly) and into a
/// [`ChunkDecoder`] (frames delivered up to its first error).
fn decode_with_both(bytes: &[u8], step: usize) -> ((Vec<Frame>, bool), (Vec<Frame>, bool)) {
    let mut r = FrameDecoder::new();
    let mut reference = Vec::new();
    let ref_ok = 'r: {
        for piece in bytes.chunks(step.max(1)) {
            if r.push(piece).is_err() {
                break 'r false;
            }
            loop {
                match r.next_frame() {
                    Ok(Some(f)) => reference.push(f),
                    Ok(None) => break,
                    Err(_) => break 'r false,
                }
            }
        }
        r.finish().is_ok()
    };
    let mut c = ChunkDecoder::new();
    let mut ours = Vec::new();
    let ours_ok = 'c: {
        for piece in bytes.chunks(step.max(1)) {
            let pushed = c.push(piece);
            ours.extend(
                std::iter::from_fn(|| c.next_chunks()).map(|chunks| Frame::Chunks {
                    chunks: chunks.into_iter().map(|(id, d)| (id, d.to_vec())).collect(),
                }),
            );
            if pushed.is_err() {
                break 'c false;
            }
        }
        c.finish().is_ok()
    };
    ((reference, ref_ok), (ours, ours_ok))
}

/// What a [`ChunkDecoder`] must make of a stream, given what a
/// [`FrameDecoder`] makes of it: the same `Chunks` frames, and a
/// failure where the reference fails or meets another frame type. Panics
/// otherwise; returns the reference's frames. The oracle of the decoder's
/// property test and of the `wire_frame` fuzz target.
#[doc(hidden)]
pub fn assert_chunk_decoder_agrees(bytes: &[u8], step: usize) -> Vec<Frame> {
    let ((reference, ref_ok), (ours, ours_ok)) = decode_with_both(bytes, step);
    match reference
        .iter()
        .position(|f| !matches!(f, Frame::Chunks { .. }))
    {
        Some(k) => {
            assert_eq!(ours, reference[..k], "frames before a misplaced one");
            assert!(!ours_ok, "a misplaced frame fails");
        }
        None => {
            assert_eq!(ours, reference);
            assert_eq!(ours_ok, ref_ok);
        }
    }
    reference
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_bytes32() -> impl Strategy<Value = [u8; 32]> + Clone {
        any::<[u8; 32]>()
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        (1u16..=8).prop_map(ErrorCode::from_u16)
    }

    pub fn arb_frame() -> impl Strategy<Value = Frame> {
        let snap = arb_bytes32().prop_map(SnapshotId);
        let tree_ids = proptest::collection::vec(arb_bytes32().prop_map(TreeId), 0..20);
        let chunk_ids = proptest::collection::vec(arb_bytes32().prop_map(ChunkId), 0..20);
        let blob = proptest::collection::vec(any::<u8>(), 1..300);
        prop_oneof![
            (
                any::<u16>(),
                "[a-z0-9_./-]{1,40}",
                prop_oneof![Just(Direction::Push), Just(Direction::Pull)],
                ".{0,40}"
            )
                .prop_filter("short agent", |t| t.3.len() <= MAX_AGENT)
                .prop_map(|(version, tree, direction, client_agent)| Frame::Hello {
                    version,
                    tree,
                    direction,
                    client_agent
                }),
            (any::<u16>(), proptest::option::of(snap.clone()))
                .prop_map(|(version, sink_root)| Frame::Welcome { version, sink_root }),
            proptest::option::of(snap.clone()).prop_map(|root| Frame::SinkState { root }),
            snap.clone().prop_map(|root| Frame::Offer { root }),
            tree_ids.prop_map(|ids| Frame::WantTrees { ids }),
            proptest::collection::vec((arb_bytes32().prop_map(TreeId), blob.clone()), 0..8)
                .prop_map(|trees| Frame::Trees { trees }),
            chunk_ids.prop_map(|ids| Frame::WantChunks { ids }),
            proptest::collection::vec((arb_bytes32().prop_map(ChunkId), blob), 0..8)
                .prop_map(|chunks| Frame::Chunks { chunks }),
            snap.clone().prop_map(|root| Frame::Done { root }),
            snap.prop_map(|root| Frame::Committed { root }),
            (arb_code(), ".{0,80}").prop_map(|(code, message)| Frame::error(code, message)),
        ]
    }

    fn decode_all(bytes: &[u8], step: usize) -> Result<Vec<Frame>, WireError> {
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            d.push(piece)?;
            while let Some(f) = d.next_frame()? {
                out.push(f);
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn every_variant_round_trips() {
        let id = [7u8; 32];
        let frames = vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
                tree: "repo".into(),
                direction: Direction::Push,
                client_agent: "sync-agent/0.1".into(),
            },
            Frame::Welcome {
                version: PROTOCOL_VERSION,
                sink_root: None,
            },
            Frame::SinkState {
                root: Some(SnapshotId(id)),
            },
            Frame::Offer {
                root: SnapshotId(id),
            },
            Frame::WantTrees {
                ids: vec![TreeId(id)],
            },
            Frame::Trees {
                trees: vec![(TreeId(id), b"tree".to_vec())],
            },
            Frame::WantChunks { ids: vec![] },
            Frame::Chunks {
                chunks: vec![(ChunkId(id), vec![1; 1000])],
            },
            Frame::Done {
                root: SnapshotId(id),
            },
            Frame::Committed {
                root: SnapshotId(id),
            },
            Frame::error(ErrorCode::Busy, "another sync is running"),
        ];
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend(try_encode(f).unwrap());
        }
        assert_eq!(decode_all(&stream, 1).unwrap(), frames);
        assert_eq!(decode_all(&stream, 4096).unwrap(), frames);
    }

    #[test]
    fn byte_vectors_are_written_raw() {
        let f = Frame::Chunks {
            chunks: vec![(ChunkId([1; 32]), vec![0xAB; 5000])],
        };
        let enc = encode(&f);
        // header, seq len (1), id (32), byte len (3), bytes
        assert_eq!(enc.len(), HEADER_LEN + 1 + 32 + 3 + 5000);
    }

    #[test]
    fn oversized_length_fails_on_the_header() {
        let mut d = FrameDecoder::new();
        let mut hdr = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        hdr.push(FrameType::Chunks as u8);
        assert!(matches!(d.push(&hdr), Err(WireError::TooLarge { .. })));
        assert!(d.next_frame().is_err(), "a failed decoder stays failed");
        assert!(d.buffered() <= HEADER_LEN);
    }

    #[test]
    fn unknown_type_trailing_bytes_and_truncation() {
        assert_eq!(
            decode(&[0, 0, 0, 0, 99]).unwrap_err(),
            WireError::UnknownType(99)
        );
        let mut enc = encode(&Frame::Offer {
            root: SnapshotId([3; 32]),
        });
        enc.push(0);
        let n = (enc.len() - HEADER_LEN) as u32;
        enc[..4].copy_from_slice(&n.to_le_bytes());
        assert!(matches!(
            decode(&enc),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
        let enc = encode(&Frame::Done {
            root: SnapshotId([3; 32]),
        });
        let mut d = FrameDecoder::new();
        d.push(&enc[..enc.len() - 1]).unwrap();
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.finish(), Err(WireError::Truncated(enc.len() - 1)));
    }

    #[test]
    fn limits_are_enforced_on_decode() {
        let too_many = Frame::WantChunks {
            ids: vec![ChunkId([0; 32]); MAX_IDS_PER_MESSAGE + 1],
        };
        assert!(matches!(
            try_encode(&too_many),
            Err(WireError::Limit { .. })
        ));
        assert!(matches!(
            decode(&encode(&too_many)),
            Err(WireError::Limit { .. })
        ));
        let big_chunk = Frame::Chunks {
            chunks: vec![(ChunkId([0; 32]), vec![0; MAX_CHUNK + 1])],
        };
        assert!(matches!(
            decode(&encode(&big_chunk)),
            Err(WireError::Limit { .. })
        ));
        let long_name = Frame::Hello {
            version: 1,
            tree: "x".repeat(MAX_TREE_NAME + 1),
            direction: Direction::Pull,
            client_agent: String::new(),
        };
        assert!(decode(&encode(&long_name)).is_err());
        // A byte length claiming more than the payload holds.
        let mut enc = encode(&Frame::Trees {
            trees: vec![(TreeId([0; 32]), vec![1, 2, 3])],
        });
        enc[HEADER_LEN + 1 + 32] = 0xfb; // varint u16 marker, then a huge length
        assert!(decode(&enc).is_err());
    }

    fn chunk_stream(sizes: &[Vec<usize>]) -> (Vec<Frame>, Vec<u8>) {
        let mut frames = Vec::new();
        let mut stream = Vec::new();
        for (n, frame) in sizes.iter().enumerate() {
            let chunks = frame
                .iter()
                .enumerate()
                .map(|(i, &len)| (ChunkId([(n * 31 + i) as u8; 32]), vec![(i + n) as u8; len]))
                .collect();
            let f = Frame::Chunks { chunks };
            stream.extend(try_encode(&f).unwrap());
            frames.push(f);
        }
        (frames, stream)
    }

    #[test]
    fn chunk_decoder_keeps_large_pieces_in_the_received_buffers() {
        let (frames, stream) = chunk_stream(&[vec![100, 100_000, 40_000, 300_000]]);
        let Frame::Chunks { chunks: sent } = &frames[0] else {
            unreachable!()
        };
        // Reads of 65,000 bytes, then of 1,000 (a peer cutting its
        // frames small): only pieces of at least SHARE_MIN are kept.
        for read in [65_000, 1_000, 20_000] {
            let mut pushed = Vec::new();
            let mut c = ChunkDecoder::new();
            for piece in stream.chunks(read) {
                let b = Bytes::copy_from_slice(piece);
                pushed.push(b.as_ptr_range());
                c.push_bytes(b).unwrap();
            }
            c.finish().unwrap();
            let got = c.next_chunks().expect("one frame");
            let kept = |p: &[u8]| pushed.iter().any(|r| r.contains(&p.as_ptr()));
            let mut any_kept = false;
            for ((id, data), (sent_id, bytes)) in got.iter().zip(sent) {
                assert_eq!((id, data), (sent_id, &ChunkBytes::from(bytes.clone())));
                for p in data.parts() {
                    if kept(p) {
                        assert!(p.len() >= SHARE_MIN, "a kept piece of {} bytes", p.len());
                        any_kept = true;
                    }
                }
                // Copied pieces in a row share one buffer.
                assert!(data.parts().len() <= 2 * (bytes.len() / SHARE_MIN + 1));
            }
            assert_eq!(any_kept, read >= SHARE_MIN, "reads of {read}");
        }
        // One byte per read: the chunk comes out in one buffer.
        let mut c = ChunkDecoder::new();
        for b in &stream {
            c.push(std::slice::from_ref(b)).unwrap();
        }
        let got = c.next_chunks().unwrap();
        assert!(got.iter().all(|(_, d)| d.parts().len() == 1));
    }

    #[test]
    fn parts_are_the_encoding_with_large_contents_moved() {
        let (frames, _) = chunk_stream(&[vec![10, PART_MIN, 70_000, 1, PART_MIN - 1], vec![]]);
        for f in frames {
            let whole = encode(&f);
            let Frame::Chunks { chunks } = &f else {
                unreachable!()
            };
            let big: Vec<*const u8> = chunks
                .iter()
                .filter(|c| c.1.len() >= PART_MIN)
                .map(|c| c.1.as_ptr())
                .collect();
            let parts = encode_parts(f);
            assert_eq!(parts.concat(), whole);
            // The large contents are the frame's own buffers, not copies.
            let moved = parts.iter().filter(|p| big.contains(&p.as_ptr())).count();
            assert_eq!(moved, big.len());
        }
        let hello = Frame::Offer {
            root: SnapshotId([1; 32]),
        };
        assert_eq!(encode_parts(hello.clone()), vec![encode(&hello)]);
    }

    #[test]
    fn chunk_decoder_reads_chunk_frames_and_refuses_others() {
        let (frames, stream) = chunk_stream(&[vec![3, 70_000, 5], vec![], vec![MAX_CHUNK]]);
        for step in [1, 7, 41, 4096, 1 << 20] {
            let (_, (ours, ok)) = decode_with_both(&stream, step);
            assert!(ok);
            assert_eq!(ours, frames);
        }
        // A control frame on a data stream fails at its header.
        let mut c = ChunkDecoder::new();
        let done = encode(&Frame::Done {
            root: SnapshotId([2; 32]),
        });
        assert_eq!(
            c.push(&done[..HEADER_LEN]),
            Err(WireError::Misplaced("Done"))
        );
        assert!(c.push(&stream).is_err(), "a failed decoder stays failed");
        // Cut off inside a chunk: the same count as FrameDecoder's.
        for cut in [3, 40, 100] {
            let mut c = ChunkDecoder::new();
            c.push(&stream[..cut]).unwrap();
            assert_eq!(c.finish(), Err(WireError::Truncated(cut)));
        }
        // A length claiming more than the frame holds fails before any
        // buffer of that size exists.
        let mut bad = encode(&Frame::Chunks {
            chunks: vec![(ChunkId([0; 32]), vec![1, 2, 3])],
        });
        bad[HEADER_LEN + 1 + 32] = 0xfb;
        let mut c = ChunkDecoder::new();
        assert!(matches!(c.push(&bad), Err(WireError::BadPayload { .. })));
        assert_chunk_decoder_agrees(&bad, 3);
    }

    #[test]
    fn error_message_is_cut_at_a_char_boundary() {
        let f = Frame::error(ErrorCode::Internal, "é".repeat(MAX_ERROR_MESSAGE));
        let Frame::Error { message, .. } = &f else {
            unreachable!()
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE);
        assert!(try_encode(&f).is_ok());
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Internal);
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(arb_frame(), 1..6), step in 1usize..64) {
            let mut stream = Vec::new();
            for f in &frames {
                stream.extend(try_encode(f).unwrap());
            }
            prop_assert_eq!(decode_all(&stream, step).unwrap(), frames.clone());
            prop_assert_eq!(decode_all(&stream, 1).unwrap(), frames);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), step in 1usize..50) {
            let _ = decode_all(&bytes, step);
        }

        #[test]
        fn chunk_decoder_agrees_with_the_frame_decoder(
            sizes in proptest::collection::vec(proptest::collection::vec(1usize..3000, 0..5), 1..4),
            edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 0..4),
            tail in proptest::option::of(arb_frame()),
            step in 1usize..100,
        ) {
            let (_, mut stream) = chunk_stream(&sizes);
            if let Some(f) = tail {
                stream.extend(encode(&f));
            }
            // Overwrite, insert or delete a few bytes anywhere.
            for (at, byte, how) in edits {
                let at = at as usize % (stream.len() + 1);
                match how {
                    0 if at < stream.len() => stream[at] = byte,
                    1 => stream.insert(at, byte),
                    _ if at < stream.len() => { stream.remove(at); }
                    _ => {}
                }
            }
            assert_chunk_decoder_agrees(&stream, step);
        }

        #[test]
        fn random_payloads_never_panic(ty in 1u8..=11, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_payload(FrameType::from_u8(ty).unwrap(), &payload);
        }
    }
}
