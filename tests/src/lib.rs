//! Test support for the sync engine: deterministic DLRN-like tree generator
//! ([`gen`]), an edge-case tree ([`edge`]), and the `gen-tree` binary built on them.
pub mod edge;
pub mod gen;
