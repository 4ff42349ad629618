//! The receiver's state directory: committed manifest, commit journal,
//! staging area, temporary files under construction and trash, plus the
//! exclusive lock that keeps two pushes to one tree from interleaving.
//!
//! By default it is the sibling `<parent>/.<name>.sync-state/` of the tree
//! (same filesystem, so renames from it into the tree are atomic, and
//! outside what a web server serving the tree shows), found again by every
//! later command without a flag. Layout:
//! ```text
//! lock        flock(LOCK_EX) held while open
//! dest        the canonical tree path this state belongs to
//! manifest    committed manifest (Manifest::encode), replaced atomically
//! journal     intent of a commit in progress (see Journal), atomic
//! staging/    pack + index of received chunks (store::Staging)
//! tmp/        files and symlinks under construction
//! trash/      removed subtrees awaiting deletion
//! ```
//! Blocking IO.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::crashpoint;
use crate::hash::SnapshotId;
use crate::manifest::{Manifest, ManifestError};

/// The committed manifest in the state directory `path`, read without
/// taking the lock or creating anything (for `--dry-run`); an empty tree
/// if nothing was committed there.
pub fn peek_manifest(path: &Path) -> Result<Manifest, StateError> {
    let p = path.join("manifest");
    match std::fs::read(&p) {
        Ok(b) => Manifest::decode(&b).map_err(|source| StateError::Manifest { path: p, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Manifest::empty()),
        Err(e) => Err(ioe("read", &p)(e)),
    }
}

/// The root of the committed manifest in the state directory `path`, read
/// from its header alone, if there is one and no commit is pending (no
/// journal): lets an unchanged push stop after comparing roots.
pub fn peek_committed_root(path: &Path) -> Option<crate::hash::TreeId> {
    if path.join("journal").exists() {
        return None;
    }
    let mut head = [0u8; 38];
    let mut f = File::open(path.join("manifest")).ok()?;
    std::io::Read::read_exact(&mut f, &mut head).ok()?;
    Manifest::header_root(&head)
}

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is locked by another sync process (a push or restore to this tree is running)")]
    Locked(PathBuf),
    #[error("{path} belongs to tree {owner}, not {dest}; pass the right --state")]
    WrongTree {
        path: PathBuf,
        owner: String,
        dest: String,
    },
    #[error("cannot derive a state directory for {0}; pass --state")]
    NoDefault(PathBuf),
    #[error("{path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("stored manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
}

fn ioe(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

/// The default state directory of the (canonical) tree path `dest`.
pub fn default_state_dir(dest: &Path) -> Result<PathBuf, StateError> {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(StateError::NoDefault(dest.to_path_buf()));
    };
    let mut n = std::ffi::OsString::from(".");
    n.push(name);
    n.push(".sync-state");
    Ok(parent.join(n))
}

/// Write `data` to `dir/name` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), StateError> {
    let tmp = dir.join(format!("{name}.new"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(ioe("create", &tmp))?;
    crashpoint::check_write().map_err(ioe("write", &tmp))?;
    f.write_all(data).map_err(ioe("write", &tmp))?;
    f.sync_all().map_err(ioe("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &dst).map_err(ioe("rename", &dst))?;
    sync_dir(dir)
}

/// fsync a directory so that renames in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ioe("fsync", dir))
}

const JOURNAL_MAGIC: [u8; 4] = *b"SYJN";
const JOURNAL_VERSION: u16 = 1;

/// The intent of a commit, durable before the tree is touched: the
/// snapshot committed before, the snapshot being committed (its whole
/// manifest) and the digest of the plan between them. The plan itself is
/// recomputed on roll-forward (it is a pure function of the two manifests)
/// and checked against the digest.
#[derive(Clone, Debug)]
pub struct Journal {
    pub from: SnapshotId,
    pub to: SnapshotId,
    pub plan_digest: [u8; 32],
    pub manifest: Manifest,
}

impl Journal {
    pub fn encode(&self) -> Vec<u8> {
        let m = self.manifest.encode();
        let mut out = Vec::with_capacity(m.len() + 150);
        out.extend_from_slice(&JOURNAL_MAGIC);
        out.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
        out.extend_from_slice(self.from.as_bytes());
        out.extend_from_slice(self.to.as_bytes());
        out.extend_from_slice(&self.plan_digest);
        out.extend_from_slice(&(m.len() as u64).to_le_bytes());
        out.extend_from_slice(&m);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Journal, String> {
        if b.len() < 4 + 2 + 96 + 8 + 32 {
            return Err("truncated".into());
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err("checksum mismatch".into());
        }
        if body[..4] != JOURNAL_MAGIC {
            return Err("bad magic".into());
        }
        let version = u16::from_le_bytes([body[4], body[5]]);
        if version != JOURNAL_VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let id = |at: usize| -> [u8; 32] { body[at..at + 32].try_into().expect("32 bytes") };
        let len = u64::from_le_bytes(body[102..110].try_into().expect("8 bytes"));
        if len != (body.len() - 110) as u64 {
            return Err("length mismatch".into());
        }
        let manifest = Manifest::decode(&body[110..]).map_err(|e| e.to_string())?;
        let j = Journal {
            from: SnapshotId(id(6)),
            to: SnapshotId(id(38)),
            plan_digest: id(70),
            manifest,
        };
        if j.manifest.snapshot() != j.to {
            return Err("manifest does not match the journaled root".into());
        }
        Ok(j)
    }
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Create (if needed) and lock the state directory `path` of the tree
    /// `dest` (canonical). Fails at once if another process holds the lock.
    pub fn open(path: &Path, dest: &Path) -> Result<StateDir, StateError> {
        std::fs::create_dir_all(path).map_err(ioe("create", path))?;
        let lp = path.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lp)
            .map_err(ioe("open", &lp))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(StateError::Locked(path.into())),
            Err(e) => return Err(ioe("lock", &lp)(e.into())),
        }
        let me = StateDir {
            path: path.to_path_buf(),
            _lock: lock,
        };
        let dp = path.join("dest");
        let want = dest.as_os_str().as_bytes();
        match std::fs::read(&dp) {
            Ok(owner) if owner == want => {}
            Ok(owner) => {
                return Err(StateError::WrongTree {
                    path: path.into(),
                    owner: String::from_utf8_lossy(&owner).into(),
                    dest: dest.display().to_string(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomic(path, "dest", want)?,
            Err(e) => return Err(ioe("read", &dp)(e)),
        }
        for sub in ["staging", "tmp", "trash"] {
            let p = path.join(sub);
            std::fs::create_dir_all(&p).map_err(ioe("create", &p))?;
        }
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn staging_dir(&self) -> PathBuf {
        self.path.join("staging")
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.path.join("tmp")
    }
    pub fn trash_dir(&self) -> PathBuf {
        self.path.join("trash")
    }

    /// The committed manifest; an empty tree if nothing was committed yet.
    pub fn load_manifest(&self) -> Result<Manifest, StateError> {
        peek_manifest(&self.path)
    }

    pub fn store_manifest(&self, m: &Manifest) -> Result<(), StateError> {
        write_atomic(&self.path, "manifest", &m.encode())
    }

    /// The journal of an interrupted commit. A damaged journal cannot come
    /// from us (it is written atomically), so it is an error, not ignored.
    pub fn read_journal(&self) -> Result<Option<Journal>, StateError> {
        let p = self.path.join("journal");
        match std::fs::read(&p) {
            Ok(b) => Journal::decode(&b)
                .map(Some)
                .map_err(|why| StateError::Damaged { path: p, why }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ioe("read", &p)(e)),
        }
    }

    pub fn write_journal(&self, j: &Journal) -> Result<(), StateError> {
        write_atomic(&self.path, "journal", &j.encode())
    }

    pub fn remove_journal(&self) -> Result<(), StateError> {
        let p = self.path.join("journal");
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ioe("remove", &p)(e)),
        }
        sync_dir(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_a_hidden_sibling() {
        assert_eq!(
            default_state_dir(Path::new("/srv/mirror")).unwrap(),
            Path::new("/srv/.mirror.sync-state")
        );
        assert!(default_state_dir(Path::new("/")).is_err());
    }

    #[test]
    fn lock_is_exclusive_and_state_is_tied_to_its_tree() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("st");
        let a = StateDir::open(&s, Path::new("/x/a")).unwrap();
        assert!(matches!(
            StateDir::open(&s, Path::new("/x/a")),
            Err(StateError::Locked(_))
        ));
        drop(a);
        assert!(matches!(
            StateDir::open(&s, Path::new("/x/b")),
            Err(StateError::WrongTree { .. })
        ));
        StateDir::open(&s, Path::new("/x/a")).unwrap();
    }

    #[test]
    fn journal_round_trip_and_damage() {
        let m = Manifest::empty();
        let j = Journal {
            from: SnapshotId([1; 32]),
            to: m.snapshot(),
            plan_digest: [2; 32],
            manifest: m,
        };
        let b = j.encode();
        let back = Journal::decode(&b).unwrap();
        assert_eq!(
            (back.from, back.to, back.plan_digest),
            (j.from, j.to, j.plan_digest)
        );
        for cut in [0, 10, b.len() - 1] {
            assert!(Journal::decode(&b[..cut]).is_err());
        }
        let mut bad = b.clone();
        bad[50] ^= 1;
        assert!(Journal::decode(&bad).is_err());
    }
}
