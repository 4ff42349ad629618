//! The change watcher: inotify marks directories dirty in a shared
//! [`Debouncer`]; the watch loop wakes when a batch may be due. The watcher
//! is a hint, never the source of truth: queue overflow, a watch that
//! cannot be added (the inotify watch limit) or a lost watch turn the next
//! batch into a full rescan and are logged once with the fix, and a
//! periodic full rescan (driven by the caller) catches anything missed.
//!
//! We drive inotify ourselves (the `inotify` crate, as notify does under
//! the hood) rather than through notify's recursive watcher, for three
//! reasons met on DLRN-sized trees:
//! - notify watches `IN_OPEN`, so our own scan of the tree queues an event
//!   per file and directory it opens, enough to overflow the kernel queue
//!   (16384 events by default) on a big scan and force the next full one;
//! - notify follows symlinks when it adds watches for a new directory, and
//!   a build tree is full of them (`current`, symlink farms, absolute ones);
//! - [`Watch::sync`] needs an exact fence. The kernel queues an event
//!   before the syscall that caused it returns, so once the scan is over,
//!   draining the inotify descriptor until it is empty has seen every
//!   change made before that moment. A scan is judged torn on that, not on
//!   a guess at how late the hints may arrive.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use sync_core::debounce::Debouncer;

/// The sysctl an operator raises when the watch limit is hit.
pub const WATCH_LIMIT_FIX: &str =
    "raise the limit: sysctl -w fs.inotify.max_user_watches=1048576 (and persist it in \
     /etc/sysctl.d/; in a container, /proc/sys/user/max_inotify_watches of its user namespace)";

/// The longest time between full rescans while the hints are unreliable
/// (overflow, watch limit): what the watcher misses then arrives within it.
pub const DEGRADED_RESCAN: Duration = Duration::from_secs(30);

/// What each directory is watched for: anything that changes a listing or
/// an entry's content or metadata, never opens or reads.
fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::DONT_FOLLOW
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// Shared between the watcher thread and the watch loop.
pub struct Hints {
    root: PathBuf,
    pub debouncer: Mutex<Debouncer>,
    pub wake: tokio::sync::Notify,
    /// Counts every change hint: a scan during which it moved may have
    /// seen the tree half-written.
    pub changes: AtomicU64,
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
            changes: AtomicU64::new(0),
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
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.degraded.store(true, Ordering::Relaxed);
        self.debouncer.lock().unwrap().mark_full(now);
        self.wake.notify_one();
    }

    fn mark(&self, dir: Vec<u8>, now: Instant) {
        self.debouncer.lock().unwrap().mark(dir, now);
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// The kernel dropped events: only a full rescan is safe.
    fn overflowed(&self, now: Instant) {
        if !self.warned_overflow.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                root = %self.root.display(),
                "inotify queue overflowed: falling back to a full rescan; \
                 if this repeats, raise fs.inotify.max_queued_events"
            );
        }
        self.full(now);
    }

    /// A directory could not be watched.
    fn watch_failed(&self, path: &Path, e: &io::Error, now: Instant) {
        if e.raw_os_error() == Some(libc_enospc()) {
            if !self.warned_limit.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    root = %self.root.display(),
                    "inotify watch limit reached: changes in the directories left unwatched \
                     are found by rescans only (every {} s while degraded); {WATCH_LIMIT_FIX}",
                    DEGRADED_RESCAN.as_secs()
                );
            }
        } else {
            tracing::warn!(path = %path.display(), "cannot watch, rescanning: {e}");
        }
        self.full(now);
    }
}

fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
        p.extend_from_slice(dir);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

fn parent(dir: &[u8]) -> Vec<u8> {
    match dir.iter().rposition(|&b| b == b'/') {
        Some(i) => dir[..i].to_vec(),
        None => Vec::new(),
    }
}

/// The inotify descriptor and which directory each watch stands for.
struct Inner {
    hints: Arc<Hints>,
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, Vec<u8>>,
    wds: HashMap<Vec<u8>, WatchDescriptor>,
    buf: Vec<u8>,
}

/// One event, copied out of the read buffer.
struct Ev {
    wd: WatchDescriptor,
    mask: EventMask,
    name: Option<Vec<u8>>,
}

impl Inner {
    fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.hints.root.clone()
        } else {
            self.hints.root.join(OsStr::from_bytes(rel))
        }
    }

    /// Watch `rel` and every directory below it (symlinks are never
    /// followed). Returns the directories now watched.
    fn add_tree(&mut self, rel: &[u8], now: Instant) -> Vec<Vec<u8>> {
        let top = self.abs(rel);
        let mut added = Vec::new();
        let mut walk = walkdir::WalkDir::new(&top).follow_links(false).into_iter();
        while let Some(entry) = walk.next() {
            let entry = match entry {
                Ok(e) => e,
                // Vanished or unreadable: its parent's events cover it.
                Err(_) => continue,
            };
            if !entry.file_type().is_dir() {
                continue;
            }
            let sub = match entry.path().strip_prefix(&self.hints.root) {
                Ok(p) => p.as_os_str().as_bytes().to_vec(),
                Err(_) => continue,
            };
            match self.inotify.watches().add(entry.path(), mask()) {
                Ok(wd) => {
                    if let Some(old) = self.dirs.insert(wd.clone(), sub.clone()) {
                        if old != sub {
                            self.wds.remove(&old);
                        }
                    }
                    self.wds.insert(sub.clone(), wd);
                    added.push(sub);
                }
                // Gone, or replaced by something that is not a directory.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(c) if c == rustix::io::Errno::NOENT.raw_os_error()
                            || c == rustix::io::Errno::NOTDIR.raw_os_error()
                    ) =>
                {
                    walk.skip_current_dir();
                }
                Err(e) => {
                    self.hints.watch_failed(entry.path(), &e, now);
                    if e.raw_os_error() == Some(libc_enospc()) {
                        // No use trying the rest.
                        break;
                    }
                    walk.skip_current_dir();
                }
            }
        }
        added
    }

    /// Forget `rel` and everything below it (moved or deleted).
    fn forget_tree(&mut self, rel: &[u8]) {
        let gone: Vec<Vec<u8>> = self
            .wds
            .keys()
            .filter(|p| {
                p.as_slice() == rel
                    || (p.len() > rel.len() && p.starts_with(rel) && p[rel.len()] == b'/')
            })
            .cloned()
            .collect();
        for p in gone {
            if let Some(wd) = self.wds.remove(&p) {
                self.dirs.remove(&wd);
                let _ = self.inotify.watches().remove(wd);
            }
        }
    }

    /// Read and apply every event queued so far.
    fn drain(&mut self) {
        loop {
            let evs: Vec<Ev> = match self.inotify.read_events(&mut self.buf) {
                Ok(events) => events
                    .map(|e| Ev {
                        wd: e.wd,
                        mask: e.mask,
                        name: e.name.map(|n| n.as_bytes().to_vec()),
                    })
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("reading inotify events failed, rescanning: {e}");
                    self.hints.full(Instant::now());
                    return;
                }
            };
            if evs.is_empty() {
                return;
            }
            let now = Instant::now();
            for ev in evs {
                self.apply(ev, now);
            }
        }
    }

    fn apply(&mut self, ev: Ev, now: Instant) {
        if ev.mask.contains(EventMask::Q_OVERFLOW) {
            self.hints.overflowed(now);
            return;
        }
        let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
            // A watch we already dropped.
            return;
        };
        if ev.mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&ev.wd);
            if self.wds.get(&dir) == Some(&ev.wd) {
                self.wds.remove(&dir);
            }
            if dir.is_empty() {
                tracing::error!(
                    root = %self.hints.root.display(),
                    "the tree root itself was removed or unmounted"
                );
                self.hints.full(now);
            }
            return;
        }
        match ev.name {
            Some(name) => {
                // The entry lives in `dir`'s listing.
                self.hints.mark(dir.clone(), now);
                if ev.mask.contains(EventMask::ISDIR) {
                    let child = join(&dir, &name);
                    if ev.mask.contains(EventMask::MOVED_FROM) {
                        self.forget_tree(&child);
                    } else if ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                        // Entries made in it before its watch existed raised
                        // no event: list the new directories themselves too.
                        for sub in self.add_tree(&child, now) {
                            self.hints.mark(sub, now);
                        }
                    }
                }
            }
            None => {
                if dir.is_empty()
                    && ev
                        .mask
                        .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                {
                    tracing::error!(
                        root = %self.hints.root.display(),
                        "the tree root itself was moved or removed"
                    );
                    self.hints.full(now);
                } else if !ev
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                {
                    // The directory's own metadata sits in its parent's listing.
                    self.hints.mark(parent(&dir), now);
                }
            }
        }
    }
}

/// A running recursive watch; dropping it stops the watcher thread.
pub struct Watch {
    inner: Option<Arc<Mutex<Inner>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Watch `hints.root` recursively. If the watch cannot be set up, the
    /// error is logged (with the fix when it is the watch limit) and the
    /// caller keeps working on periodic full rescans.
    pub fn start(hints: Arc<Hints>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let inotify = match Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                hints.watch_failed(&hints.root, &e, Instant::now());
                return Watch {
                    inner: None,
                    stop,
                    thread: None,
                };
            }
        };
        let mut inner = Inner {
            hints,
            inotify,
            dirs: HashMap::new(),
            wds: HashMap::new(),
            buf: vec![0; 64 * 1024],
        };
        inner.add_tree(b"", Instant::now());
        let inner = Arc::new(Mutex::new(inner));
        let (i, s) = (inner.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("inotify".into())
            .spawn(move || run(i, s))
            .ok();
        Watch {
            inner: Some(inner),
            stop,
            thread,
        }
    }

    /// Fence: on return, every change made before the call has been turned
    /// into hints (see the module documentation).
    pub fn sync(&self) {
        if let Some(inner) = &self.inner {
            inner.lock().unwrap().drain();
        }
    }

    /// Directories currently watched.
    pub fn watched(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.lock().unwrap().dirs.len())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watcher thread: wait for the descriptor to be readable, then drain
/// it under the lock that [`Watch::sync`] also takes.
fn run(inner: Arc<Mutex<Inner>>, stop: Arc<AtomicBool>) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let fd = {
        let i = inner.lock().unwrap();
        match i.inotify.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                i.hints.watch_failed(&i.hints.root, &e, Instant::now());
                return;
            }
        }
    };
    // Short enough that dropping the watch does not linger.
    let tick = Duration::from_millis(200);
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: tick.as_nanos() as _,
    };
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => continue,
            Ok(_) => inner.lock().unwrap().drain(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                let i = inner.lock().unwrap();
                i.hints
                    .watch_failed(&i.hints.root, &e.into(), Instant::now());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn dirs(b: Batch) -> Vec<Vec<u8>> {
        match b {
            Batch::Dirs(d) => d.into_iter().collect(),
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn real_events_mark_the_parent_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        let h = hints(d.path());
        let _w = Watch::start(h.clone());
        std::fs::write(d.path().join("a/b/f"), b"x").unwrap();
        let got = dirs(wait_batch(&h));
        assert!(got.contains(&b"a/b".to_vec()), "{got:?}");
        assert!(!h.degraded());
    }

    #[test]
    fn sync_is_a_fence_and_reads_do_not_count() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/f"), b"x").unwrap();
        let h = hints(d.path());
        let w = Watch::start(h.clone());
        w.sync();
        let before = h.changes.load(Ordering::SeqCst);
        // Reading (what a scan does) raises nothing.
        for _ in 0..100 {
            std::fs::read(d.path().join("a/f")).unwrap();
            std::fs::read_dir(d.path().join("a"))
                .unwrap()
                .for_each(drop);
        }
        w.sync();
        assert_eq!(h.changes.load(Ordering::SeqCst), before);
        // A write is seen by the very next sync, with no waiting.
        for i in 0..50 {
            let c = h.changes.load(Ordering::SeqCst);
            std::fs::write(d.path().join("a/f"), format!("{i}")).unwrap();
            w.sync();
            assert!(h.changes.load(Ordering::SeqCst) > c, "write {i} not fenced");
        }
    }

    #[test]
    fn new_moved_and_symlinked_directories() {
        let d = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(out.path().join("elsewhere/deep")).unwrap();
        let h = hints(d.path());
        let w = Watch::start(h.clone());
        assert_eq!(w.watched(), 1);
        // A symlink to a directory is never followed.
        std::os::unix::fs::symlink(out.path().join("elsewhere"), d.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/", d.path().join("slash")).unwrap();
        // A directory tree made in one go, then written into.
        std::fs::create_dir_all(d.path().join("n/m/k")).unwrap();
        w.sync();
        assert_eq!(w.watched(), 4, "root, n, n/m, n/m/k");
        let _ = wait_batch(&h);
        std::fs::write(d.path().join("n/m/k/f"), b"x").unwrap();
        w.sync();
        let got = dirs(wait_batch(&h));
        assert!(got.contains(&b"n/m/k".to_vec()), "{got:?}");
        // Moved within the tree: its watches follow the new name.
        std::fs::rename(d.path().join("n"), d.path().join("r")).unwrap();
        w.sync();
        let _ = wait_batch(&h);
        std::fs::write(d.path().join("r/m/g"), b"y").unwrap();
        w.sync();
        let got = dirs(wait_batch(&h));
        assert!(got.contains(&b"r/m".to_vec()), "{got:?}");
        assert!(!got.contains(&b"n/m".to_vec()), "{got:?}");
        // Moved out: its watches are dropped.
        std::fs::rename(d.path().join("r"), out.path().join("r")).unwrap();
        w.sync();
        assert_eq!(w.watched(), 1);
        assert!(!h.degraded());
    }

    #[test]
    fn overflow_falls_back_to_a_full_rescan() {
        let d = tempfile::tempdir().unwrap();
        let h = hints(d.path());
        let now = Instant::now();
        h.mark(b"x".to_vec(), now);
        h.overflowed(now);
        assert!(h.degraded());
        assert_eq!(wait_batch(&h), Batch::Full);

        let h = hints(d.path());
        h.watch_failed(d.path(), &io::Error::from_raw_os_error(libc_enospc()), now);
        assert_eq!(wait_batch(&h), Batch::Full);
    }
}
