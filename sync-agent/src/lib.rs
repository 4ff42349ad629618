//! The sync agent as a library: identities, mutual TLS over QUIC, the
//! session driver, the server and one-shot clients, shared by the
//! `sync-agent` daemon and by `sync-cli` for push and restore.

pub mod client;
pub mod config;
pub mod control;
pub mod driver;
pub mod identity;
pub mod server;
pub mod source;
pub mod tls;
pub mod watcher;
