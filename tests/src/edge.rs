//! Deterministic edge-case tree for scanner / manifest / commit tests.
//!
//! Owns [`create_edge_tree`] (awkward names, deep and empty dirs, every kind of
//! symlink, hard links, unusual modes, a sparse file, fixed mtimes including
//! 1970 and nanoseconds) and [`create_special_files`] (fifo and socket, kept
//! apart because the scanner skips them with a warning).

use crate::gen::set_times;
use anyhow::{Context, Result};
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// Base of the edge tree's timestamps (2020-09-13T12:26:40Z).
pub const EDGE_T0: i64 = 1_600_000_000;
/// mtime of `times/epoch-1970` (1970-01-01T03:25:45Z).
pub const EDGE_1970: i64 = 12_345;
/// Nanoseconds of `times/nanos`.
pub const EDGE_NANOS: i64 = 123_456_789;
/// Apparent size of `files/sparse`.
pub const SPARSE_LEN: u64 = 10 * 1024 * 1024;
/// Offset of the only data in `files/sparse`.
pub const SPARSE_DATA_AT: u64 = 1024 * 1024;

/// Name of the non-UTF-8 file (`files/caf\xe9.txt`).
pub fn non_utf8_file() -> &'static OsStr {
    OsStr::from_bytes(b"caf\xe9.txt")
}

/// Name of the non-UTF-8 directory (`names/dir\xff\xfe`).
pub fn non_utf8_dir() -> &'static OsStr {
    OsStr::from_bytes(b"dir\xff\xfe")
}

/// A 255-byte file name (the usual NAME_MAX).
pub fn long_name() -> String {
    format!("{}.txt", "n".repeat(251))
}

/// Relative path of the deepest directory (30 levels below `deep`).
pub fn deep_dir() -> PathBuf {
    let mut p = PathBuf::from("deep");
    for i in 1..=30 {
        p.push(format!("d{i:02}"));
    }
    p
}

struct Edge<'a> {
    root: &'a Path,
    /// (relative path, mtime seconds, nanoseconds, is symlink), applied at the end.
    times: Vec<(PathBuf, i64, i64, bool)>,
    next: i64,
}

impl Edge<'_> {
    fn tick(&mut self) -> i64 {
        self.next += 1;
        EDGE_T0 + self.next
    }

    fn dir(&mut self, rel: impl AsRef<Path>, mode: u32) -> Result<()> {
        let p = self.root.join(rel.as_ref());
        fs::create_dir_all(&p).with_context(|| format!("mkdir {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    fn file(&mut self, rel: impl AsRef<Path>, data: &[u8], mode: u32) -> Result<()> {
        let rel = rel.as_ref();
        let p = self.root.join(rel);
        fs::write(&p, data).with_context(|| format!("write {}", p.display()))?;
        // After writing: a write would clear setuid.
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        let t = self.tick();
        self.times.push((rel.to_path_buf(), t, 0, false));
        Ok(())
    }

    fn link(&mut self, target: impl AsRef<Path>, rel: impl AsRef<Path>) -> Result<()> {
        let rel = rel.as_ref();
        let p = self.root.join(rel);
        symlink(target.as_ref(), &p).with_context(|| format!("symlink {}", p.display()))?;
        let t = self.tick();
        self.times.push((rel.to_path_buf(), t, 0, true));
        Ok(())
    }
}

/// Creates the edge-case tree under `root` (created if missing; should be empty).
pub fn create_edge_tree(root: &Path) -> Result<()> {
    fs::create_dir_all(root)?;
    let mut e = Edge {
        root,
        times: Vec::new(),
        next: 0,
    };

    // Plain and empty files.
    e.dir("files", 0o755)?;
    e.file("files/plain.txt", b"hello edge tree\n", 0o644)?;
    e.file("files/empty", b"", 0o644)?;
    e.file("files/empty2", b"", 0o644)?;
    e.file(
        Path::new("files").join(non_utf8_file()),
        b"latin-1 name\n",
        0o644,
    )?;

    // Sparse: a few bytes at 1 MiB, apparent size 10 MiB.
    {
        let p = root.join("files/sparse");
        let mut f = OpenOptions::new().write(true).create_new(true).open(&p)?;
        f.seek(SeekFrom::Start(SPARSE_DATA_AT))?;
        f.write_all(b"sparse data")?;
        f.set_len(SPARSE_LEN)?;
        drop(f);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        let t = e.tick();
        e.times.push(("files/sparse".into(), t, 0, false));
    }

    // Awkward names.
    e.dir("names", 0o755)?;
    e.file(
        Path::new("names").join(long_name()),
        b"255 bytes of name\n",
        0o644,
    )?;
    for n in [
        "with space.txt",
        "new\nline",
        "back\\slash",
        "tab\there",
        "-leading-dash",
        "ünïcödé",
        "*?[glob]",
    ] {
        e.file(Path::new("names").join(n), n.as_bytes(), 0o644)?;
    }
    let bad_dir = Path::new("names").join(non_utf8_dir());
    e.dir(&bad_dir, 0o755)?;
    e.file(
        bad_dir.join(OsStr::from_bytes(b"inner\x80")),
        b"inside a non-UTF-8 dir\n",
        0o644,
    )?;

    // Deep path.
    let deep = deep_dir();
    e.dir(&deep, 0o755)?;
    e.file(deep.join("leaf.txt"), b"30 levels down\n", 0o644)?;

    // Empty directories, nested too.
    e.dir("empty", 0o755)?;
    e.dir("nested-empty/a/b/c", 0o755)?;

    // Symlinks of every kind.
    e.dir("links", 0o755)?;
    e.link("../files/plain.txt", "links/to_file")?;
    e.link("../does/not/exist", "links/dangling")?;
    e.link("/etc/hostname", "links/absolute")?;
    e.link("../nested-empty/a", "links/to_dir")?;
    e.link(
        OsStr::from_bytes(b"../files/caf\xe9.txt"),
        "links/non_utf8_target",
    )?;
    e.link(
        OsStr::from_bytes(b"nowhere\xff"),
        OsStr::from_bytes(b"links/bad\xfename"),
    )?;
    e.link(".", "links/self_dir")?;
    e.link("loop_b", "links/loop_a")?;
    e.link("loop_a", "links/loop_b")?;

    // Hard links: same dir, and across dirs.
    e.dir("hardlinks", 0o755)?;
    e.dir("hardlinks/other", 0o755)?;
    e.file("hardlinks/a", b"one inode, two names in one dir\n", 0o644)?;
    fs::hard_link(root.join("hardlinks/a"), root.join("hardlinks/b"))?;
    e.file("hardlinks/x", b"one inode, two names in two dirs\n", 0o644)?;
    fs::hard_link(root.join("hardlinks/x"), root.join("hardlinks/other/x2"))?;

    // Modes.
    e.dir("modes", 0o755)?;
    e.file("modes/private", b"0600\n", 0o600)?;
    e.file("modes/exec", b"#!/bin/sh\necho hi\n", 0o755)?;
    e.file("modes/setuid", b"#!/bin/sh\n", 0o4755)?;
    e.file("modes/readonly", b"0444\n", 0o444)?;
    e.dir("modes/sticky", 0o1777)?;
    e.file("modes/sticky/inside", b"in a sticky dir\n", 0o644)?;
    e.dir("modes/private-dir", 0o700)?;
    e.file("modes/private-dir/inside", b"in a 0700 dir\n", 0o644)?;

    // Special timestamps.
    e.dir("times", 0o755)?;
    e.file("times/epoch-1970", b"old\n", 0o644)?;
    e.file("times/nanos", b"precise\n", 0o644)?;
    e.file("times/future", b"2100\n", 0o644)?;
    for (rel, t, ns) in [
        ("times/epoch-1970", EDGE_1970, 0),
        ("times/nanos", EDGE_T0 + 500, EDGE_NANOS),
        ("times/future", 4_102_444_800, 0),
    ] {
        if let Some(x) = e.times.iter_mut().find(|x| x.0 == Path::new(rel)) {
            x.1 = t;
            x.2 = ns;
        }
    }

    for (rel, t, ns, nofollow) in &e.times {
        set_times(&root.join(rel), *t, *ns, *nofollow)?;
    }
    // Directory mtimes last, deepest first, so creating children cannot disturb them.
    let mut dirs = Vec::new();
    collect_dirs(root, PathBuf::new(), &mut dirs)?;
    dirs.sort_by(|a, b| {
        b.components()
            .count()
            .cmp(&a.components().count())
            .then(a.cmp(b))
    });
    for (i, d) in dirs.iter().enumerate() {
        set_times(&root.join(d), EDGE_T0 + 10_000 + i as i64, 0, false)?;
    }
    set_times(root, EDGE_T0 + 20_000, 0, false)?;
    Ok(())
}

fn collect_dirs(root: &Path, rel: PathBuf, out: &mut Vec<PathBuf>) -> Result<()> {
    for ent in fs::read_dir(root.join(&rel))? {
        let ent = ent?;
        if ent.file_type()?.is_dir() {
            let r = rel.join(ent.file_name());
            collect_dirs(root, r.clone(), out)?;
            out.push(r);
        }
    }
    Ok(())
}

/// Creates `root/fifo` (a named pipe) and `root/socket` (a unix socket file).
pub fn create_special_files(root: &Path) -> Result<()> {
    fs::create_dir_all(root)?;
    let fifo = root.join("fifo");
    let c = CString::new(fifo.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o644) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mkfifo {}", fifo.display()));
    }
    let sock = root.join("socket");
    let l = std::os::unix::net::UnixListener::bind(&sock)
        .with_context(|| format!("bind {}", sock.display()))?;
    // Dropping the listener leaves the socket file behind, which is what the tests need.
    drop(l);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn edge_tree_has_everything() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("edge");
        create_edge_tree(&root).unwrap();

        assert!(root.join("files").join(non_utf8_file()).is_file());
        assert!(root.join("names").join(non_utf8_dir()).is_dir());
        assert_eq!(long_name().len(), 255);
        assert!(root.join("names").join(long_name()).is_file());
        assert!(root.join("names/new\nline").is_file());
        assert!(root.join(deep_dir()).join("leaf.txt").is_file());
        assert_eq!(fs::read_dir(root.join("empty")).unwrap().count(), 0);

        let a = fs::metadata(root.join("hardlinks/a")).unwrap();
        let b = fs::metadata(root.join("hardlinks/b")).unwrap();
        assert_eq!(a.nlink(), 2);
        assert_eq!(a.ino(), b.ino());
        let x = fs::metadata(root.join("hardlinks/x")).unwrap();
        assert_eq!(x.nlink(), 2);
        assert_eq!(
            x.ino(),
            fs::metadata(root.join("hardlinks/other/x2")).unwrap().ino()
        );

        let sp = fs::metadata(root.join("files/sparse")).unwrap();
        assert_eq!(sp.len(), SPARSE_LEN);
        assert!(sp.blocks() * 512 < SPARSE_LEN, "sparse file is not sparse");

        let mode = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("modes/setuid"), 0o4755);
        assert_eq!(mode("modes/sticky"), 0o1777);
        assert_eq!(mode("modes/readonly"), 0o444);
        assert_eq!(mode("modes/private-dir"), 0o700);

        let t = fs::metadata(root.join("times/epoch-1970")).unwrap();
        assert_eq!(t.mtime(), EDGE_1970);
        let t = fs::metadata(root.join("times/nanos")).unwrap();
        assert_eq!(t.mtime_nsec(), EDGE_NANOS);
        let l = fs::symlink_metadata(root.join("links/dangling")).unwrap();
        assert!(l.file_type().is_symlink());
        assert!(l.mtime() > EDGE_T0 && l.mtime() < EDGE_T0 + 1000);
        assert!(!root.join("links/dangling").exists());
        assert_eq!(
            fs::read_link(root.join("links/non_utf8_target"))
                .unwrap()
                .as_os_str()
                .as_bytes(),
            b"../files/caf\xe9.txt"
        );
        assert!(root.join("links/to_dir").is_dir());
        assert!(fs::metadata(root.join("deep")).unwrap().mtime() >= EDGE_T0 + 10_000);
    }

    #[test]
    fn edge_tree_is_deterministic() {
        let d = tempfile::tempdir().unwrap();
        create_edge_tree(&d.path().join("a")).unwrap();
        create_edge_tree(&d.path().join("b")).unwrap();
        let list = |root: &Path| {
            let mut v = Vec::new();
            let mut stack = vec![PathBuf::new()];
            while let Some(rel) = stack.pop() {
                for ent in fs::read_dir(root.join(&rel)).unwrap() {
                    let ent = ent.unwrap();
                    let r = rel.join(ent.file_name());
                    let md = fs::symlink_metadata(root.join(&r)).unwrap();
                    if md.is_dir() {
                        stack.push(r.clone());
                    }
                    v.push((
                        r,
                        md.mode(),
                        md.len(),
                        md.mtime(),
                        md.mtime_nsec(),
                        md.nlink(),
                    ));
                }
            }
            v.sort();
            v
        };
        assert_eq!(list(&d.path().join("a")), list(&d.path().join("b")));
    }

    #[test]
    fn special_files() {
        use std::os::unix::fs::FileTypeExt;
        let d = tempfile::tempdir().unwrap();
        create_special_files(d.path()).unwrap();
        assert!(fs::symlink_metadata(d.path().join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(fs::symlink_metadata(d.path().join("socket"))
            .unwrap()
            .file_type()
            .is_socket());
    }
}
