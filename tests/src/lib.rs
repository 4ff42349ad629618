//! Test support for the sync engine: deterministic DLRN-like tree generator
//! ([`gen`]), an edge-case tree ([`edge`]), the `gen-tree` binary built on
//! them, paths of the workspace's binaries ([`bins`]) and the benchmark
//! harness ([`bench`], run by the `bench` binary).
pub mod bench;
pub mod bins;
pub mod edge;
pub mod gen;
pub mod latency;
