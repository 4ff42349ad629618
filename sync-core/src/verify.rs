//! Checking a tree on disk against a manifest: what is missing, extra or
//! different (kind, size, content, mode, mtime, owner, symlink target,
//! hard-link identity). Directories are checked in parallel (rayon) and
//! file contents are re-hashed unless the caller trusts size and mtime.
//! Nothing is ever followed through a symlink. Blocking IO.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use rayon::prelude::*;
use rustix::fs::{openat, FileType, Mode, OFlags, Stat};
use serde::Serialize;

use crate::hash::{FileHash, SnapshotId, TreeId};
use crate::manifest::{join, lossy, Entry, Kind, Manifest, ManifestError};
use crate::safefs::{kind_of, list_dir, lstat_at, Root, SafeFsError};

/// Why verification could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fs(#[from] SafeFsError),
}

/// What to check.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Re-hash file contents; `false` trusts size and mtime.
    pub content: bool,
    /// Compare uid and gid too.
    pub owners: bool,
    /// How many example issues to keep.
    pub max_examples: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            content: true,
            owners: false,
            max_examples: 20,
        }
    }
}

/// One kind of difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Problem {
    Missing,
    Extra,
    Kind,
    Size,
    Content,
    Mode,
    Mtime,
    Owner,
    Target,
    HardLink,
    Unreadable,
}

/// One difference at one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Issue {
    /// The path, lossily decoded for display.
    pub path: String,
    pub problem: Problem,
    pub detail: String,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub snapshot: Option<SnapshotId>,
    /// Entries of the manifest checked.
    pub entries: u64,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub missing: u64,
    pub extra: u64,
    /// Entries present with at least one difference.
    pub modified: u64,
    /// Up to `max_examples` issues.
    pub examples: Vec<Issue>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.modified == 0
    }

    fn merge(mut self, other: VerifyReport, max: usize) -> VerifyReport {
        self.entries += other.entries;
        self.files_hashed += other.files_hashed;
        self.bytes_hashed += other.bytes_hashed;
        self.missing += other.missing;
        self.extra += other.extra;
        self.modified += other.modified;
        let room = max.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
        self
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} entries checked, {} missing, {} extra, {} modified ({} files re-hashed)",
            self.entries, self.missing, self.extra, self.modified, self.files_hashed
        )?;
        for i in &self.examples {
            writeln!(f, "  {:?} {}: {}", i.problem, i.path, i.detail)?;
        }
        Ok(())
    }
}

/// Check the tree under `root` against `manifest`.
pub fn verify(
    root: &Root,
    manifest: &Manifest,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let mut dirs: Vec<(Vec<u8>, TreeId)> = vec![(Vec::new(), manifest.root())];
    manifest.walk(|path, e| {
        if let Kind::Dir { tree } = e.kind {
            dirs.push((path.to_vec(), tree));
        }
        true
    })?;
    // The root itself must open; a subdirectory that does not is reported
    // by its parent's check.
    root.open_dir(b"", OFlags::RDONLY)?;
    let max = opts.max_examples;
    let report = dirs
        .par_iter()
        .map(|(path, tree)| check_dir(root, manifest, path, *tree, opts))
        .try_reduce(VerifyReport::default, |a, b| Ok(a.merge(b, max)))?;
    Ok(VerifyReport {
        snapshot: Some(manifest.snapshot()),
        ..report
    })
}

struct DirCheck<'a> {
    report: VerifyReport,
    opts: &'a VerifyOptions,
}

impl DirCheck<'_> {
    fn issue(&mut self, path: &[u8], problem: Problem, detail: String) {
        if self.report.examples.len() < self.opts.max_examples {
            self.report.examples.push(Issue {
                path: lossy(path),
                problem,
                detail,
            });
        }
    }
}

fn check_dir(
    root: &Root,
    manifest: &Manifest,
    path: &[u8],
    tree: TreeId,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let tree = manifest.tree(&tree)?;
    let mut c = DirCheck {
        report: VerifyReport::default(),
        opts,
    };
    let Ok(dir) = root.open_dir(path, OFlags::RDONLY) else {
        return Ok(c.report);
    };
    let on_disk: HashSet<Vec<u8>> = list_dir(&dir)
        .map_err(|e| SafeFsError::io("list", path, e))?
        .into_iter()
        .collect();
    for e in &tree.entries {
        c.report.entries += 1;
        let p = join(path, &e.name);
        let mut problems = 0;
        match lstat_at(&dir, &e.name) {
            Ok(None) => {
                c.report.missing += 1;
                c.issue(&p, Problem::Missing, "not on disk".into());
                continue;
            }
            Err(err) => {
                c.report.modified += 1;
                c.issue(&p, Problem::Unreadable, err.to_string());
                continue;
            }
            Ok(Some(st)) => check_entry(root, &dir, &p, e, &st, &mut c, &mut problems),
        }
        if problems > 0 {
            c.report.modified += 1;
        }
    }
    let names: HashSet<&[u8]> = tree.entries.iter().map(|e| e.name.as_slice()).collect();
    let mut extra: Vec<&Vec<u8>> = on_disk
        .iter()
        .filter(|n| !names.contains(n.as_slice()))
        .collect();
    extra.sort();
    for n in extra {
        c.report.extra += 1;
        c.issue(&join(path, n), Problem::Extra, "not in the snapshot".into());
    }
    Ok(c.report)
}

// The casts are no-ops on 64-bit targets only.
#[allow(clippy::unnecessary_cast)]
fn mtime_ns(st: &Stat) -> i64 {
    (st.st_mtime as i64)
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec as i64)
}

fn check_entry(
    root: &Root,
    dir: &OwnedFd,
    p: &[u8],
    e: &Entry,
    st: &Stat,
    c: &mut DirCheck<'_>,
    problems: &mut u32,
) {
    let mut bad = |c: &mut DirCheck<'_>, problem: Problem, detail: String| {
        *problems += 1;
        c.issue(p, problem, detail);
    };
    let want = match e.kind {
        Kind::File { .. } | Kind::HardLink { .. } => FileType::RegularFile,
        Kind::Dir { .. } => FileType::Directory,
        Kind::Symlink { .. } => FileType::Symlink,
    };
    let have = kind_of(st);
    if have != want {
        bad(
            c,
            Problem::Kind,
            format!("{have:?} on disk, {want:?} in the snapshot"),
        );
        return;
    }
    if want != FileType::Symlink && st.st_mode & 0o7777 != e.mode {
        bad(
            c,
            Problem::Mode,
            format!(
                "mode {:o} on disk, {:o} in the snapshot",
                st.st_mode & 0o7777,
                e.mode
            ),
        );
    }
    let mt = mtime_ns(st);
    if mt != e.mtime_ns {
        bad(
            c,
            Problem::Mtime,
            format!("mtime {mt} on disk, {} in the snapshot", e.mtime_ns),
        );
    }
    if c.opts.owners && (st.st_uid != e.uid || st.st_gid != e.gid) {
        bad(
            c,
            Problem::Owner,
            format!(
                "{}:{} on disk, {}:{} in the snapshot",
                st.st_uid, st.st_gid, e.uid, e.gid
            ),
        );
    }
    let name = crate::safefs::split(p).1;
    match &e.kind {
        Kind::File { size, hash, .. } => {
            if st.st_size as u64 != *size {
                bad(
                    c,
                    Problem::Size,
                    format!("{} bytes on disk, {size} in the snapshot", st.st_size),
                );
            } else if c.opts.content {
                match hash_at(dir, name) {
                    Ok(h) => {
                        c.report.files_hashed += 1;
                        c.report.bytes_hashed += size;
                        if h != *hash {
                            bad(
                                c,
                                Problem::Content,
                                format!("content hashes to {}", h.short()),
                            );
                        }
                    }
                    Err(err) => bad(c, Problem::Unreadable, err.to_string()),
                }
            }
        }
        Kind::Symlink { target } => match rustix::fs::readlinkat(dir, name, Vec::new()) {
            Ok(t) if t.as_bytes() == target.as_slice() => {}
            Ok(t) => bad(
                c,
                Problem::Target,
                format!(
                    "points at {:?}, snapshot says {:?}",
                    lossy(t.as_bytes()),
                    lossy(target)
                ),
            ),
            Err(err) => bad(c, Problem::Unreadable, err.to_string()),
        },
        Kind::HardLink { path, size, .. } => {
            if st.st_size as u64 != *size {
                bad(
                    c,
                    Problem::Size,
                    format!("{} bytes on disk, {size} in the snapshot", st.st_size),
                );
            }
            match root.lstat(path) {
                Ok(Some(pst)) if pst.st_ino == st.st_ino && pst.st_dev == st.st_dev => {}
                _ => bad(
                    c,
                    Problem::HardLink,
                    format!("not a hard link of {:?}", lossy(path)),
                ),
            }
        }
        Kind::Dir { .. } => {}
    }
}

/// BLAKE3 of the regular file `name` in `dir`, never following a symlink.
fn hash_at(dir: &OwnedFd, name: &[u8]) -> std::io::Result<FileHash> {
    let fd = openat(
        dir.as_fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut f = File::from(fd);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(FileHash::from(h.finalize()))
}
