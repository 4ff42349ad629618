//! The sync agent as a library: the parts that `sync-cli` reuses for one-shot
//! push and restore. The QUIC transport and daemon land here.
