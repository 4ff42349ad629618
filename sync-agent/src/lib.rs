//! The sync agent as a library: identities, mutual TLS over QUIC, and the
//! session driver, shared by the `sync-agent` daemon and by `sync-cli` for
//! one-shot push and restore.

pub mod identity;
pub mod tls;
pub mod watcher;
