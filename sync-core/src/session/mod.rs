//! Sans-IO sync sessions: the state machines of the two ends of one sync.
//! A [`SourceSession`] holds a manifest and sends tree objects and chunks;
//! a [`SinkSession`] holds its committed manifest, asks for what it lacks,
//! has the driver stage it, and commits. Either may be the QUIC client or
//! server: push is client = source, pull (restore) is client = sink.
//!
//! Shape (after quinn-proto): the driver feeds peer frames to
//! `handle_frame(frame, now)`, sends what `poll_transmit()` yields on the
//! named [`Channel`], does the IO that `poll_event()` asks for, and reports
//! back through the matching completion call. No IO, no clock, no threads.
//!
//! The flow, push shown (`>` client to server):
//! ```text
//! > Hello{Push} Offer{root}          (pipelined: one flight)
//! < Welcome{sink_root}
//! < Committed{root}                  if the sink already has `root`: done
//! < WantTrees  > Trees ...           top down, skipping subtrees it has
//! < WantChunks > Chunks (data) ...   bounded window; empty WantChunks = no more
//! > Done{root}
//! < Committed{root}                  after the driver committed
//! ```
//! A server reads the first frame itself with [`accept`], authorizes the
//! tree, then builds [`SinkSession::server`] (push) or
//! [`SourceSession::server`] (pull), or answers with [`reject`].

mod sink;
mod source;

use std::time::Duration;

pub use sink::{SinkEvent, SinkOptions, SinkSession};
pub use source::{
    ChunkLocation, ChunkLocator, FileReads, SourceEvent, SourceOptions, SourceSession,
};

use crate::hash::{ChunkId, SnapshotId, TreeId};
use crate::wire::{Direction, ErrorCode, Frame, MAX_AGENT, MAX_TREE_NAME, PROTOCOL_VERSION};

/// A batch of tree objects from this many on is decompressed (by a
/// source) or checked (by a sink) on rayon's threads.
const PARALLEL_TREES: usize = 8;

/// Where a frame goes: the ordered control stream, or any of the data
/// streams (only `Chunks`), which the transport may spread and which may
/// arrive in any order relative to each other and to control frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    Control,
    Data,
}

/// What one finished session did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub root: SnapshotId,
    /// The sink already had `root`: nothing was transferred.
    pub unchanged: bool,
    pub trees_sent: u64,
    pub trees_received: u64,
    pub chunks_sent: u64,
    pub chunks_received: u64,
    /// Chunk payload bytes (not wire bytes).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Sink: chunks the new snapshot needed that the driver already held
    /// (in the tree or in staging from an interrupted run).
    pub chunks_local: u64,
    /// Sink: files added or modified by the snapshot (0 on the source).
    pub files_changed: u64,
    /// From the session's start to its last input.
    pub elapsed: Duration,
}

/// Why a session failed. Every variant maps to an [`ErrorCode`] that is
/// sent to the peer, except [`SessionError::Peer`], which came from it.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("unexpected {frame} frame while {state}")]
    Unexpected {
        frame: &'static str,
        state: &'static str,
    },
    #[error("protocol version {theirs} is not supported (we speak {ours})")]
    Version { ours: u16, theirs: u16 },
    #[error("{what} {id} was not asked for")]
    NotRequested { what: &'static str, id: String },
    #[error("{what} {id} was asked for twice")]
    Duplicate { what: &'static str, id: String },
    #[error("peer named root {got}, the session is about {expected}")]
    WrongRoot {
        expected: SnapshotId,
        got: SnapshotId,
    },
    #[error("tree {id} is refused: {reason}")]
    BadTree { id: TreeId, reason: String },
    #[error("chunk {id} is refused: {reason}")]
    BadChunk { id: ChunkId, reason: String },
    #[error("tree {0} is not in this snapshot")]
    UnknownTree(TreeId),
    #[error("limit exceeded: {0}")]
    TooLarge(String),
    #[error("local manifest is unusable: {0}")]
    Manifest(String),
    #[error("commit failed: {0}")]
    CommitFailed(String),
    #[error("driver misuse: {0}")]
    Driver(String),
    #[error("aborted ({code}): {message}")]
    Aborted { code: ErrorCode, message: String },
    #[error("peer failed ({code}): {message}")]
    Peer { code: ErrorCode, message: String },
}

impl SessionError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Unexpected { .. }
            | SessionError::Version { .. }
            | SessionError::NotRequested { .. }
            | SessionError::Duplicate { .. }
            | SessionError::WrongRoot { .. } => ErrorCode::Protocol,
            SessionError::BadTree { .. } | SessionError::BadChunk { .. } => ErrorCode::BadData,
            SessionError::UnknownTree(_) => ErrorCode::UnknownTree,
            SessionError::TooLarge(_) => ErrorCode::TooLarge,
            SessionError::Manifest(_) | SessionError::Driver(_) => ErrorCode::Internal,
            SessionError::CommitFailed(_) => ErrorCode::CommitFailed,
            SessionError::Aborted { code, .. } | SessionError::Peer { code, .. } => *code,
        }
    }

    /// The `Error` frame that tells the peer about this failure.
    pub fn to_frame(&self) -> Frame {
        Frame::error(self.code(), self.to_string())
    }
}

/// A client's `Hello`, read by the server before it builds a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub version: u16,
    pub tree: String,
    pub direction: Direction,
    pub client_agent: String,
}

/// Read the first frame a server gets. On `Err`, send
/// [`SessionError::to_frame`] and close.
pub fn accept(frame: Frame) -> Result<Accepted, SessionError> {
    match frame {
        Frame::Hello {
            version,
            tree,
            direction,
            client_agent,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(SessionError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            Ok(Accepted {
                version,
                tree,
                direction,
                client_agent,
            })
        }
        other => Err(SessionError::Unexpected {
            frame: other.name(),
            state: "awaiting hello",
        }),
    }
}

/// The frame a server sends to turn a client away (unknown tree, not
/// authorized, busy).
pub fn reject(code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::error(code, message)
}

fn hello(tree: &str, client_agent: &str, direction: Direction) -> Result<Frame, SessionError> {
    if tree.is_empty() || tree.len() > MAX_TREE_NAME || client_agent.len() > MAX_AGENT {
        return Err(SessionError::TooLarge(format!(
            "tree name ({} bytes, 1 to {MAX_TREE_NAME}) or client agent ({} bytes, at most {MAX_AGENT})",
            tree.len(),
            client_agent.len()
        )));
    }
    Ok(Frame::Hello {
        version: PROTOCOL_VERSION,
        tree: tree.to_string(),
        direction,
        client_agent: client_agent.to_string(),
    })
}

fn check_version(version: u16) -> Result<(), SessionError> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(SessionError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        })
    }
}
