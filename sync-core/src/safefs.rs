//! Filesystem access confined beneath a root directory.
//!
//! Every path the engine writes comes from an untrusted manifest. [`Root`]
//! holds an `O_DIRECTORY` fd of the tree root and resolves relative paths
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the kernel
//! has it, else by an `openat(O_NOFOLLOW | O_DIRECTORY)` walk, one component
//! at a time. Callers then act with `*at` calls on the parent fd and the
//! final name, so no symlink on disk (even one planted in the same
//! snapshot) can redirect a write outside the root. Blocking IO.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::fs::{openat, openat2, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::manifest::{lossy, validate_rel_path};

/// Why a path could not be used safely.
#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    #[error("unsafe path {path:?}: {why}")]
    Unsafe { path: String, why: String },
    #[error("cannot {op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl SafeFsError {
    pub fn io(op: &'static str, path: &[u8], source: impl Into<io::Error>) -> Self {
        SafeFsError::Io {
            op,
            path: lossy(path),
            source: source.into(),
        }
    }

    /// The OS error behind this failure, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SafeFsError::Io { source, .. } => source.raw_os_error(),
            SafeFsError::Unsafe { .. } => None,
        }
    }
}

/// The most one `write` hands the kernel at a time (see [`write_all_at`]).
pub const WRITE_PIECE: usize = 64 << 10;

/// Write all of `data` at `off`, at most [`WRITE_PIECE`] bytes per call.
///
/// The page cache sizes the folios of a file by the length of the write
/// that creates them: one multi-megabyte write asks for large folios, which
/// come from the free lists' high-order blocks, the blocks a virtual
/// machine's free page reporting has handed back to its host. Each first
/// touch of such a block then waits for the host. Measured here, 1.48 GB
/// written as one call per file took 0.9-3.4 s; the same in 64 KiB pieces
/// 0.54-0.57 s. The extra calls cost nothing beside that.
pub fn write_all_at(file: &File, data: &[u8], off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = off;
    for piece in data.chunks(WRITE_PIECE) {
        file.write_all_at(piece, at)?;
        at += piece.len() as u64;
    }
    Ok(())
}

/// Refuse empty, absolute, `..`, NUL-holding or overlong relative paths.
pub fn check_path(rel: &[u8]) -> Result<(), SafeFsError> {
    validate_rel_path(rel).map_err(|e| SafeFsError::Unsafe {
        path: lossy(rel),
        why: e.to_string(),
    })
}

/// Split `a/b/c` into (`a/b`, `c`); a top-level name has an empty parent.
pub fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

// 0 = untested, 1 = openat2 works, 2 = use the walk.
static OPENAT2: AtomicU8 = AtomicU8::new(0);

/// Force the component-by-component walk (for tests of the fallback).
pub fn disable_openat2() {
    OPENAT2.store(2, Ordering::Relaxed);
}

/// An open directory that every relative path is resolved beneath.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    /// Open `path` (trusted, from the operator) as a root directory.
    pub fn open(path: &Path) -> Result<Root, SafeFsError> {
        let fd = openat(
            rustix::fs::CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SafeFsError::io("open", path.as_os_str().as_encoded_bytes(), e))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the directory `rel` (empty = the root) beneath the root, never
    /// following a symlink. `flags` adds e.g. `OFlags::PATH` or `RDONLY`.
    pub fn open_dir(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, SafeFsError> {
        let flags = flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if rel.is_empty() {
            return openat(self.fd(), c".", flags, Mode::empty())
                .map_err(|e| SafeFsError::io("open", b".", e));
        }
        check_path(rel)?;
        self.resolve(rel, flags, Mode::empty())
            .map_err(|e| SafeFsError::io("open directory", rel, e))
    }

    /// Open the parent directory of `rel` and return it with the final name.
    pub fn parent<'a>(&self, rel: &'a [u8]) -> Result<(OwnedFd, &'a [u8]), SafeFsError> {
        check_path(rel)?;
        let (parent, name) = split(rel);
        Ok((self.open_dir(parent, OFlags::PATH)?, name))
    }

    /// Open the regular file `rel` read-only, refusing symlinks anywhere.
    pub fn open_file(&self, rel: &[u8]) -> Result<File, SafeFsError> {
        check_path(rel)?;
        let fd = self
            .resolve(
                rel,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| SafeFsError::io("open", rel, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| SafeFsError::io("stat", rel, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(SafeFsError::Unsafe {
                path: lossy(rel),
                why: "not a regular file".into(),
            });
        }
        Ok(File::from(fd))
    }

    /// `lstat` of `rel` beneath the root; `None` if it does not exist.
    pub fn lstat(&self, rel: &[u8]) -> Result<Option<Stat>, SafeFsError> {
        let (dir, name) = self.parent(rel)?;
        lstat_at(&dir, name).map_err(|e| SafeFsError::io("stat", rel, e))
    }

    fn resolve(&self, rel: &[u8], flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
        if OPENAT2.load(Ordering::Relaxed) != 2 {
            let how =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match openat2(self.fd(), rel, flags, mode, how) {
                Err(Errno::NOSYS) | Err(Errno::PERM) if OPENAT2.load(Ordering::Relaxed) == 0 => {
                    OPENAT2.store(2, Ordering::Relaxed);
                }
                // EAGAIN: a concurrent rename raced the lookup; the walk is
                // immune to that and equally safe.
                Err(Errno::AGAIN) => {}
                r => {
                    OPENAT2.store(1, Ordering::Relaxed);
                    return r;
                }
            }
        }
        walk(self.fd(), rel, flags, mode)
    }
}

/// Resolve `rel` one component at a time with `O_NOFOLLOW`.
fn walk(root: BorrowedFd<'_>, rel: &[u8], flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let (last, dirs) = comps.split_last().ok_or(Errno::INVAL)?;
    let mut cur: Option<OwnedFd> = None;
    for comp in dirs {
        let base = cur.as_ref().map_or(root, |f| f.as_fd());
        let next = openat(
            base,
            *comp,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| if e == Errno::NOTDIR { Errno::LOOP } else { e })?;
        cur = Some(next);
    }
    let base = cur.as_ref().map_or(root, |f| f.as_fd());
    openat(base, *last, flags | OFlags::NOFOLLOW, mode)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`, `None` when absent.
pub fn lstat_at(dir: impl AsFd, name: &[u8]) -> Result<Option<Stat>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file type of a stat result.
pub fn kind_of(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Remove `name` in `dir` and, if it is a directory, everything below it,
/// never following a symlink (a symlink is unlinked, not entered).
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let sub = match openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    clear_dir(&sub)?;
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove every entry of the open directory `dir` (not `dir` itself).
pub fn clear_dir(dir: &OwnedFd) -> Result<(), Errno> {
    loop {
        let names = list_dir(dir)?;
        if names.is_empty() {
            return Ok(());
        }
        for n in &names {
            remove_all_at(dir.as_fd(), n)?;
        }
    }
}

/// Names in an open directory, without `.` and `..`.
pub fn list_dir(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let mut out = Vec::new();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn writes_in_pieces_land_where_one_write_would() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        let data: Vec<u8> = (0..WRITE_PIECE * 3 + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        write_all_at(&f, b"head", 0).unwrap();
        write_all_at(&f, &data, 4).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..4], b"head");
        assert_eq!(&back[4..], &data[..]);
    }

    #[test]
    fn refuses_symlinks_and_escapes_on_both_paths() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::fs::write(root.path().join("d/f"), b"x").unwrap();
        symlink(outside.path(), root.path().join("out")).unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let r = Root::open(root.path()).unwrap();
        assert!(r.open_file(b"d/f").is_ok());
        assert!(r.open_file(b"out/secret").is_err());
        assert!(r.open_dir(b"out", OFlags::PATH).is_err());
        assert!(r.parent(b"out/secret").is_err());
        assert!(r.open_file(b"../x").is_err());
        assert!(r.open_file(b"/etc/passwd").is_err());
        assert!(r.lstat(b"out").unwrap().is_some());
        assert!(r.lstat(b"nope").unwrap().is_none());
        // The fallback walk refuses the same things.
        assert!(walk(r.fd(), b"out/secret", OFlags::RDONLY, Mode::empty()).is_err());
        assert!(walk(r.fd(), b"out", OFlags::DIRECTORY, Mode::empty()).is_err());
        assert!(walk(r.fd(), b"d/f", OFlags::RDONLY, Mode::empty()).is_ok());
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
    }

    #[test]
    fn remove_all_does_not_follow_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        std::fs::create_dir_all(root.path().join("t/a/b")).unwrap();
        std::fs::write(root.path().join("t/a/b/f"), b"x").unwrap();
        symlink(outside.path(), root.path().join("t/a/link")).unwrap();
        let r = Root::open(root.path()).unwrap();
        remove_all_at(r.fd(), b"t").unwrap();
        assert!(!root.path().join("t").exists());
        assert!(outside.path().join("keep").exists());
    }
}
