//! `sync-core`: the content-addressed tree model and everything that decides
//! what to hash, send, write, rename or delete. Protocol decisions are
//! sans-IO; the filesystem-facing modules (`scan`, `store`, `commit`,
//! `verify`) do blocking IO only and never run an async reactor.

pub mod cache;
pub mod chunk;
pub mod commit;
pub mod crashpoint;
pub mod debounce;
pub mod diff;
pub mod flush;
pub mod hash;
pub mod manifest;
pub mod plan;
pub mod safefs;
pub mod scan;
pub mod session;
pub mod state;
pub mod store;
pub mod verify;
pub mod wire;

pub use hash::{ChunkId, FileHash, SnapshotId, TreeId};
pub use manifest::{Entry, Kind, Manifest, Tree};
