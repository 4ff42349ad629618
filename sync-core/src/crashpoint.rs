//! Deterministic fault injection for the crash-safety and disk-full tests.
//!
//! [`hit`] marks an interesting step of staging or commit. With
//! `SYNC_CRASH_AT=N` in the environment the process SIGKILLs itself at the
//! N-th hit (1-based), so a test can re-run a push with N = 1, 2, … and
//! check what a crash at each step leaves behind. `SYNC_CRASH_LIST=1`
//! prints `crashpoint N NAME` to stderr at every hit. [`check_write`] is
//! called before every data write of the engine; with
//! `SYNC_FAIL_ENOSPC_AT=N` the N-th call returns an `ENOSPC` error.
//! The environment is read once per process. Unset, each call costs one
//! atomic increment. No IO besides the optional stderr line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Config {
    crash_at: Option<u64>,
    list: bool,
    enospc_at: Option<u64>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);

fn config() -> &'static Config {
    CONFIG.get_or_init(|| {
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Config {
            crash_at: num("SYNC_CRASH_AT").filter(|&n| n > 0),
            list: std::env::var_os("SYNC_CRASH_LIST").is_some_and(|v| v != "0"),
            enospc_at: num("SYNC_FAIL_ENOSPC_AT").filter(|&n| n > 0),
        }
    })
}

/// Mark the crash point `name`; kills the process if it is the chosen one.
pub fn hit(name: &str) {
    let cfg = config();
    if cfg.crash_at.is_none() && !cfg.list {
        return;
    }
    let n = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if cfg.list {
        eprintln!("crashpoint {n} {name}");
    }
    if cfg.crash_at == Some(n) {
        eprintln!("crashpoint {n} {name}: SIGKILL");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is never reached.
        std::process::abort();
    }
}

/// How many crash points were hit so far (counted only when enabled).
pub fn hits() -> u64 {
    HITS.load(Ordering::SeqCst)
}

/// Call before each data write: fails with `ENOSPC` at the chosen write.
pub fn check_write() -> std::io::Result<()> {
    let Some(at) = config().enospc_at else {
        return Ok(());
    };
    let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
    if n >= at {
        // Once the disk is full it stays full.
        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
    }
    Ok(())
}
