//! The sync agent as a library: identities, mutual TLS over QUIC, the
//! session driver, the server and one-shot clients, the source loop, the
//! configuration file and the agent that runs one, shared by the
//! `sync-agent` daemon and by `sync-cli` for push and restore.

pub mod agent;
pub mod client;
pub mod config;
pub mod control;
pub mod driver;
pub mod identity;
pub mod ratelimit;
pub mod server;
pub mod source;
pub mod tls;
pub mod watcher;

/// Keep the buffers of chunk data (up to a few MiB each, allocated and
/// freed all through a transfer) in the heap for reuse: by default glibc
/// maps each one anew, or trims the heap under it, and every page then
/// costs a fault and a zeroing when touched again. A source's initial
/// sync of 1.2 GB took 91k page faults, 24-29k with this. An idle process
/// keeps at most 32 MiB free at the top of each heap.
pub fn tune_allocator() {
    // SAFETY: mallopt only sets glibc allocator parameters, before any
    // thread is started; a refused value leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Install the `tracing` subscriber of a binary: stderr, `RUST_LOG` if set,
/// else warn / info (`-v`) / debug (`-vv`).
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
