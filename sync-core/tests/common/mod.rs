//! Helpers shared by the commit-engine integration tests: building trees on
//! disk, scanning, and comparing trees at the lstat level (not with our
//! own manifest code).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sync_core::scan::{scan, ScanOptions};
use sync_core::Manifest;

/// One node of a tree as `lstat` and `read` see it.
#[derive(Clone, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        mtime_ns: i64,
        content: Vec<u8>,
        ino: u64,
    },
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
    Symlink {
        target: Vec<u8>,
        mtime_ns: i64,
    },
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::File {
                mode,
                mtime_ns,
                content,
                ino,
            } => write!(
                f,
                "File {{ mode: {mode:o}, mtime_ns: {mtime_ns}, len: {}, head: {:?}, ino: {ino} }}",
                content.len(),
                String::from_utf8_lossy(&content[..content.len().min(16)])
            ),
            Node::Dir { mode, mtime_ns } => {
                write!(f, "Dir {{ mode: {mode:o}, mtime_ns: {mtime_ns} }}")
            }
            Node::Symlink { target, mtime_ns } => write!(
                f,
                "Symlink {{ target: {:?}, mtime_ns: {mtime_ns} }}",
                String::from_utf8_lossy(target)
            ),
        }
    }
}

impl Node {
    /// The node without inode numbers (which differ between trees).
    pub fn portable(&self) -> Node {
        match self {
            Node::File {
                mode,
                mtime_ns,
                content,
                ..
            } => Node::File {
                mode: *mode,
                mtime_ns: *mtime_ns,
                content: content.clone(),
                ino: 0,
            },
            n => n.clone(),
        }
    }

    /// Content and kind only: what a reader following a symlink depends on
    /// (directory modes and mtimes are set last and are not compared).
    pub fn content_only(&self) -> Node {
        match self {
            Node::Dir { .. } => Node::Dir {
                mode: 0,
                mtime_ns: 0,
            },
            n => n.portable(),
        }
    }
}

pub type Fs = BTreeMap<Vec<u8>, Node>;

/// Every entry below `root` (not the root itself), keyed by relative path.
pub fn read_fs(root: &Path) -> Fs {
    let mut out = BTreeMap::new();
    walk(root, Vec::new(), &mut out);
    out
}

fn walk(dir: &Path, prefix: Vec<u8>, out: &mut Fs) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let mut rel = prefix.clone();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let md = std::fs::symlink_metadata(&p).unwrap();
        let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        let node = if md.file_type().is_symlink() {
            Node::Symlink {
                target: std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
                mtime_ns,
            }
        } else if md.is_dir() {
            walk(&p, rel.clone(), out);
            Node::Dir {
                mode: md.mode() & 0o7777,
                mtime_ns,
            }
        } else {
            Node::File {
                mode: md.mode() & 0o7777,
                mtime_ns,
                content: std::fs::read(&p).unwrap(),
                ino: md.ino(),
            }
        };
        out.insert(rel, node);
    }
}

/// Compare two trees node by node; hard links must be hard links on both
/// sides (same grouping of inodes).
pub fn assert_same_fs(a: &Fs, b: &Fs) {
    let pa: Vec<_> = a.keys().map(|k| String::from_utf8_lossy(k)).collect();
    let pb: Vec<_> = b.keys().map(|k| String::from_utf8_lossy(k)).collect();
    assert_eq!(pa, pb, "the trees hold different paths");
    for (k, na) in a {
        let nb = &b[k];
        assert_eq!(
            na.portable(),
            nb.portable(),
            "{} differs",
            String::from_utf8_lossy(k)
        );
    }
    assert_eq!(link_groups(a), link_groups(b), "hard-link groups differ");
}

fn link_groups(fs: &Fs) -> Vec<Vec<Vec<u8>>> {
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (k, n) in fs {
        if let Node::File { ino, .. } = n {
            by_ino.entry(*ino).or_default().push(k.clone());
        }
    }
    let mut g: Vec<_> = by_ino.into_values().filter(|v| v.len() > 1).collect();
    g.sort();
    g
}

pub fn scan_tree(root: &Path) -> Manifest {
    scan(
        root,
        &ScanOptions {
            cache: None,
            owners: false,
            ..Default::default()
        },
    )
    .unwrap()
    .manifest
}

pub fn p(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Set the mtime (and atime) of `path` itself, never following a symlink.
pub fn set_mtime(path: &Path, ns: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// Give every entry below `root` a fixed mtime, deepest first, so that
/// directory mtimes are not disturbed afterwards.
pub fn fix_mtimes(root: &Path, ns: i64) {
    let fs = read_fs(root);
    for k in fs.keys().rev() {
        set_mtime(&p(root, k), ns);
    }
}

pub fn ln_s(target: &str, root: &Path, rel: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    symlink(target, path).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut ctr = seed << 32;
    while out.len() < len {
        out.extend_from_slice(blake3::hash(&ctr.to_le_bytes()).as_bytes());
        ctr += 1;
    }
    out.truncate(len);
    out
}

/// Run `cp -a` (keeps hard links, modes, times, symlinks).
pub fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}
