//! The change watcher: inotify (via notify) marks directories dirty in a
//! shared [`Debouncer`]; the watch loop wakes when a batch may be due. The
//! watcher is a hint, never the source of truth: queue overflow, a watch
//! that cannot be added (the inotify watch limit) or a lost watch turn the
//! next batch into a full rescan and are logged once with the fix, and a
//! periodic full rescan (driven by the caller) catches anything missed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use notify::event::{EventKind, Flag};
use notify::{ErrorKind, RecursiveMode, Watcher as _};
use sync_core::debounce::Debouncer;

/// The sysctl an operator raises when the watch limit is hit.
pub const WATCH_LIMIT_FIX: &str =
    "raise the limit: sysctl -w fs.inotify.max_user_watches=1048576 (and persist it in /etc/sysctl.d/)";

/// Shared between the notify thread and the watch loop.
pub struct Hints {
    root: PathBuf,
    pub debouncer: Mutex<Debouncer>,
    pub wake: tokio::sync::Notify,
    /// Counts every change hint: a scan during which it moved may have
    /// seen the tree half-written.
    pub changes: std::sync::atomic::AtomicU64,
    /// Set once the hints became unreliable (overflow, watch limit).
    degraded: AtomicBool,
    warned_limit: AtomicBool,
    warned_overflow: AtomicBool,
}

impl Hints {
    pub fn new(root: PathBuf, debouncer: Debouncer) -> Arc<Hints> {
        Arc::new(Hints {
            root,
            debouncer: Mutex::new(debouncer),
            wake: tokio::sync::Notify::new(),
            changes: std::sync::atomic::AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            warned_limit: AtomicBool::new(false),
            warned_overflow: AtomicBool::new(false),
        })
    }

    /// True once some change may have gone unreported since the start.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn full(&self, now: Instant) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.degraded.store(true, Ordering::Relaxed);
        self.debouncer.lock().unwrap().mark_full(now);
        self.wake.notify_one();
    }

    /// The directory to rescan for a change at `path`: its parent, whose
    /// listing holds the entry (a changed directory is listed through it).
    fn dirty_dir(&self, path: &Path) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let rel = path.strip_prefix(&self.root).ok()?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Some(parent.as_os_str().as_bytes().to_vec())
    }

    /// Take one notify result (called on notify's thread, and by tests).
    pub fn handle(&self, res: notify::Result<notify::Event>, now: Instant) {
        match res {
            Ok(ev) if ev.flag() == Some(Flag::Rescan) => {
                if !self.warned_overflow.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        root = %self.root.display(),
                        "inotify queue overflowed: falling back to a full rescan; \
                         if this repeats, raise fs.inotify.max_queued_events"
                    );
                }
                self.full(now);
            }
            Ok(ev) => {
                if matches!(ev.kind, EventKind::Access(_)) {
                    return;
                }
                let mut d = self.debouncer.lock().unwrap();
                let mut any = false;
                for p in &ev.paths {
                    match self.dirty_dir(p) {
                        Some(dir) => {
                            d.mark(dir, now);
                            any = true;
                        }
                        None if p == &self.root => {
                            d.mark(Vec::new(), now);
                            any = true;
                        }
                        None => {}
                    }
                }
                if any {
                    drop(d);
                    self.changes.fetch_add(1, Ordering::Relaxed);
                    self.wake.notify_one();
                }
            }
            Err(e) => {
                if matches!(e.kind, ErrorKind::MaxFilesWatch) {
                    if !self.warned_limit.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            root = %self.root.display(),
                            "inotify watch limit reached: changes in new directories are found \
                             by rescans only; {WATCH_LIMIT_FIX}"
                        );
                    }
                } else {
                    tracing::warn!(root = %self.root.display(), "watch error, rescanning: {e}");
                }
                self.full(now);
            }
        }
    }
}

/// A running recursive watch; dropping it stops the notify thread.
pub struct Watch {
    _inner: Option<notify::RecommendedWatcher>,
}

impl Watch {
    /// Watch `hints.root` recursively. If the watch cannot be set up (for
    /// instance the watch limit), the error is logged with the fix and the
    /// caller keeps working on periodic full rescans.
    pub fn start(hints: Arc<Hints>) -> Watch {
        let h = hints.clone();
        let watcher = notify::recommended_watcher(move |res| h.handle(res, Instant::now()));
        let inner = match watcher {
            Ok(mut w) => match w.watch(&hints.root, RecursiveMode::Recursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    hints.handle(Err(e), Instant::now());
                    None
                }
            },
            Err(e) => {
                hints.handle(Err(e), Instant::now());
                None
            }
        };
        Watch { _inner: inner }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use sync_core::debounce::Batch;

    fn hints(root: &Path) -> Arc<Hints> {
        Hints::new(
            root.to_path_buf(),
            Debouncer::new(Duration::from_millis(50), Duration::from_millis(500)),
        )
    }

    fn wait_batch(h: &Hints) -> Batch {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(b) = h.debouncer.lock().unwrap().poll(Instant::now()) {
                return b;
            }
            assert!(Instant::now() < end, "no batch");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn real_events_mark_the_parent_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        let h = hints(d.path());
        let _w = Watch::start(h.clone());
        std::fs::write(d.path().join("a/b/f"), b"x").unwrap();
        match wait_batch(&h) {
            Batch::Dirs(dirs) => assert!(dirs.contains(&b"a/b".to_vec()), "{dirs:?}"),
            b => panic!("{b:?}"),
        }
        assert!(!h.degraded());
    }

    #[test]
    fn injected_overflow_and_watch_limit_fall_back_to_a_full_rescan() {
        let d = tempfile::tempdir().unwrap();
        let h = hints(d.path());
        let now = Instant::now();
        h.handle(
            Ok(notify::Event::new(EventKind::Any).add_path(d.path().join("x/y"))),
            now,
        );
        h.handle(
            Ok(notify::Event::new(EventKind::Other).set_flag(Flag::Rescan)),
            now,
        );
        assert!(h.degraded());
        assert_eq!(wait_batch(&h), Batch::Full);

        let h = hints(d.path());
        h.handle(Err(notify::Error::new(ErrorKind::MaxFilesWatch)), now);
        assert_eq!(wait_batch(&h), Batch::Full);
    }
}
