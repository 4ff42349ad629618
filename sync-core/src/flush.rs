//! How a commit makes what it wrote durable.
//!
//! The portable way is one `syncfs` of the filesystem ([`Flush::Syncfs`]):
//! every dirty page is written and the filesystem's journal committed. But
//! `syncfs` also writes every metadata block that the journal already
//! holds back to its home on the disk, which durability does not need: a
//! crash replays the journal. On ext4 that is most of the work of a
//! symlink farm, where each symlink of more than 60 bytes is a 4 KiB block
//! (84.5k of them: 300 ms of `syncfs` on the benchmark's disk, against
//! 40 ms for the journal commit alone).
//!
//! On ext4 with a journal, a commit therefore writes out and waits for the
//! data of each file it wrote (`sync_file_range`), then forces one commit
//! of the filesystem's journal ([`Flush::Journal`]): an `fsync` of a file
//! changed after everything else. jbd2 commits its transactions in order,
//! so that commit carries every change made before it (new inodes,
//! directory entries, symlinks, the extents of the data just written), and
//! its cache flush makes the data written before it durable. Git's
//! `core.fsyncMethod=batch` rests on the same. Other filesystems, or a
//! file that cannot be opened for it, get `syncfs`; `SYNC_FLUSH=syncfs` in
//! the environment forces it everywhere.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::fs::{Mode, OFlags};

/// How the commits of one receiver make their writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// One `syncfs` per filesystem.
    Syncfs,
    /// Each written file's data written out, then one journal commit (ext4
    /// with a journal only).
    Journal,
}

/// The magic number of ext2, ext3 and ext4 in `statfs`.
const EXT4_SUPER_MAGIC: u64 = 0xEF53;

/// The file in a directory that [`commit_journal`] changes and syncs.
pub const MARKER: &str = "flush";

impl Flush {
    /// The way for files under all of `fds`: [`Flush::Journal`] when they
    /// lie on one ext4 filesystem that has a journal (and `SYNC_FLUSH` is
    /// not `syncfs`), else [`Flush::Syncfs`].
    pub fn for_fds(fds: &[BorrowedFd<'_>]) -> Flush {
        if std::env::var_os("SYNC_FLUSH").is_some_and(|v| v == "syncfs") {
            return Flush::Syncfs;
        }
        let devs: Option<Vec<u64>> = fds
            .iter()
            .map(|fd| rustix::fs::fstat(fd).ok().map(|s| s.st_dev))
            .collect();
        match devs.as_deref() {
            Some([first, rest @ ..]) if rest.iter().all(|d| d == first) => {
                match ext4_with_journal(fds[0]) {
                    true => Flush::Journal,
                    false => Flush::Syncfs,
                }
            }
            _ => Flush::Syncfs,
        }
    }
}

/// Whether `fd` lies on ext4 with its journal loaded: the filesystem's
/// `journal_task` in sysfs names the journal's thread (0 without one).
/// Anything unreadable on the way answers no.
fn ext4_with_journal(fd: BorrowedFd<'_>) -> bool {
    let Ok(fs) = rustix::fs::fstatfs(fd) else {
        return false;
    };
    #[allow(clippy::unnecessary_cast)] // the type of f_type differs by arch
    if fs.f_type as u64 != EXT4_SUPER_MAGIC {
        return false;
    }
    let Ok(st) = rustix::fs::fstat(fd) else {
        return false;
    };
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let Ok(uevent) = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
    else {
        return false;
    };
    let Some(name) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) else {
        return false;
    };
    if name.is_empty() || name.contains("..") {
        return false;
    }
    std::fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .is_some_and(|pid| pid > 0)
}

/// Start writing `fd`'s dirty pages to disk, without waiting. Its failure
/// only loses the head start, so it is ignored.
pub fn start_write(fd: BorrowedFd<'_>) {
    // SAFETY: a plain syscall on a descriptor the caller holds open; no
    // memory is passed.
    unsafe {
        libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Write out `fd`'s dirty pages and wait until the disk has them (not its
/// cache: the journal commit that follows flushes that).
pub fn write_and_wait(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: as in `start_write`.
    match unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, flags) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Commit the journal of the filesystem of `dir` ([`Flush::Journal`]):
/// [`MARKER`] in `dir` is truncated and written, which starts a change in
/// the journal's running transaction whatever happened before, then
/// synced, which commits that transaction and every one before it.
pub fn commit_journal(dir: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        MARKER,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    rustix::io::write(&fd, b"1")?;
    rustix::fs::fsync(&fd)?;
    Ok(())
}

/// `syncfs` each filesystem that one of `fds` lies on, once.
pub fn sync_filesystems(fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut done = Vec::with_capacity(fds.len());
    for fd in fds {
        let dev = rustix::fs::fstat(fd)?.st_dev;
        if !done.contains(&dev) {
            rustix::fs::syncfs(fd)?;
            done.push(dev);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// tmpfs (no journal, not ext4) gets `syncfs`; so do directories on
    /// two filesystems.
    #[test]
    fn only_one_journaled_ext4_gets_the_journal_commit() {
        let shm = std::fs::File::open("/dev/shm");
        let here = std::fs::File::open(".").unwrap();
        if let Ok(shm) = &shm {
            assert_eq!(Flush::for_fds(&[shm.as_fd()]), Flush::Syncfs);
            assert_eq!(Flush::for_fds(&[here.as_fd(), shm.as_fd()]), Flush::Syncfs);
        }
        let proc = std::fs::File::open("/proc").unwrap();
        assert_eq!(Flush::for_fds(&[proc.as_fd()]), Flush::Syncfs);
        assert!(!ext4_with_journal(proc.as_fd()));
    }

    #[test]
    fn the_marker_is_rewritten_and_synced() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        commit_journal(d.as_fd()).unwrap();
        std::fs::write(dir.path().join(MARKER), b"longer than one byte").unwrap();
        commit_journal(d.as_fd()).unwrap();
        assert_eq!(std::fs::read(dir.path().join(MARKER)).unwrap(), b"1");
        let f = std::fs::File::open(dir.path().join(MARKER)).unwrap();
        write_and_wait(f.as_fd()).unwrap();
    }
}
