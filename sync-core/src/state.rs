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
//! head        the committed root and where its tree objects are (Head),
//!             replaced atomically
//! trees.<gen> append-only log of packed tree objects; the committed
//!             snapshot's are in its first `Head::len` bytes; rewritten to
//!             the next generation when mostly garbage
//! journal     intent of the last commit (see Journal): one sealed record
//!             of fixed length, made once by a rename, then rewritten in
//!             place (one sector: a write is whole or not at all)
//! staging/    pack + index of received chunks, and linked/: chunks that
//!             are whole files, as hard links to them (store::Staging)
//! tmp/        files and symlinks under construction; tmp/t/ holds the
//!             new subtrees built whole, each at its path in the tree
//! trash/      removed subtrees awaiting deletion
//! ```
//!
//! A commit appends only the tree objects that are new, so what it writes
//! here follows the change, not the size of the tree (an older `manifest`
//! file, the whole snapshot in one blob, is still read and migrated).
//! Blocking IO.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::crashpoint;
use crate::hash::{SnapshotId, TreeId};
use crate::manifest::{Manifest, ManifestError};

/// The committed manifest in the state directory `path`, read without
/// taking the lock or creating anything (for `--dry-run`, a pull, a relay);
/// an empty tree if nothing was committed there. A commit running beside
/// it only appends past the head's length, and a compaction that removes
/// the log being read makes it start over.
pub fn peek_manifest(path: &Path) -> Result<Manifest, StateError> {
    let mut tries = 0;
    loop {
        let Some(head) = read_head(path)? else {
            return read_v1_manifest(path).map(|m| m.unwrap_or_default());
        };
        match load_trees(path, &head) {
            Err(StateError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && tries < 3 =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// The committed root in the state directory `path`, from its head alone,
/// if there is one and no commit is unfinished (see
/// [`unfinished_journal`]): lets an unchanged push stop after comparing
/// roots.
pub fn peek_committed_root(path: &Path) -> Option<crate::hash::TreeId> {
    let head = read_head(path).ok()?;
    if unfinished_journal(path, head.as_ref()).ok()?.is_some() {
        return None;
    }
    match head {
        Some(h) => Some(h.root),
        None => {
            let mut head = [0u8; 38];
            let mut f = File::open(path.join(V1_MANIFEST)).ok()?;
            std::io::Read::read_exact(&mut f, &mut head).ok()?;
            Manifest::header_root(&head)
        }
    }
}

/// The whole-snapshot manifest file of the first state format.
const V1_MANIFEST: &str = "manifest";
const HEAD_FILE: &str = "head";
const HEAD_MAGIC: [u8; 4] = *b"SYHD";
const HEAD_VERSION: u16 = 1;
const HEAD_LEN: usize = 4 + 2 + 32 + 3 * 8 + 32;
/// Largest record in a tree log: a packed tree is its encoding plus a tag.
const MAX_RECORD: usize = crate::manifest::MAX_TREE_BYTES + 16;

/// The committed snapshot: its root, and where its tree objects are (the
/// first `len` bytes of the log `trees.<gen>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub root: TreeId,
    pub gen: u64,
    pub len: u64,
    /// The log's length right after it was last rewritten: it is rewritten
    /// again once it has grown well past it (garbage is then bounded by the
    /// live size, and the rewrite's cost by what was appended since).
    pub base: u64,
}

impl Head {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(HEAD_LEN);
        body.extend_from_slice(self.root.as_bytes());
        for n in [self.gen, self.len, self.base] {
            body.extend_from_slice(&n.to_le_bytes());
        }
        seal(HEAD_MAGIC, HEAD_VERSION, body)
    }

    pub fn decode(b: &[u8]) -> Result<Head, String> {
        let body = unseal(b, HEAD_MAGIC, HEAD_VERSION, HEAD_LEN)?;
        let head = Head {
            root: TreeId(field(body, 0)),
            gen: u64::from_le_bytes(field(body, 32)),
            len: u64::from_le_bytes(field(body, 40)),
            base: u64::from_le_bytes(field(body, 48)),
        };
        if head.base > head.len {
            return Err("base beyond length".into());
        }
        Ok(head)
    }

    fn log_name(gen: u64) -> String {
        format!("trees.{gen}")
    }
}

/// The journal in the state directory `path` if it is of a commit not
/// finished yet: one leading to another snapshot than `head` (the one on
/// disk). The last finished commit's own journal stays until the next
/// commit's replaces it: removing it could become durable before the
/// head's rename, which is not synced.
pub fn unfinished_journal(path: &Path, head: Option<&Head>) -> Result<Option<Journal>, StateError> {
    Ok(read_journal(path)?
        .filter(|j| head.is_none_or(|h| h.root != crate::hash::TreeId::from(j.to))))
}

fn read_journal(path: &Path) -> Result<Option<Journal>, StateError> {
    read_sealed(path, JOURNAL_FILE, Journal::decode)
}

/// The head of the state directory `path`, if one was written.
pub fn read_head(path: &Path) -> Result<Option<Head>, StateError> {
    read_sealed(path, HEAD_FILE, Head::decode)
}

/// Read and decode the state file `name` of `path` (`None` if absent).
fn read_sealed<T>(
    path: &Path,
    name: &str,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, StateError> {
    let p = path.join(name);
    match std::fs::read(&p) {
        Ok(b) => decode(&b)
            .map(Some)
            .map_err(|why| StateError::Damaged { path: p, why }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ioe("read", &p)(e)),
    }
}

fn read_v1_manifest(path: &Path) -> Result<Option<Manifest>, StateError> {
    let p = path.join(V1_MANIFEST);
    match std::fs::read(&p) {
        Ok(b) => Manifest::decode(&b)
            .map(Some)
            .map_err(|source| StateError::Manifest { path: p, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ioe("read", &p)(e)),
    }
}

/// The committed manifest named by `head`.
fn load_trees(path: &Path, head: &Head) -> Result<Manifest, StateError> {
    let mut m = Manifest::empty();
    read_log(path, head.gen, 0, head.len, &mut m)?;
    m.set_root(head.root)
        .map_err(|source| StateError::Manifest {
            path: path.join(Head::log_name(head.gen)),
            source,
        })?;
    Ok(m)
}

/// Add the tree objects in bytes `from..to` of log `gen` to `m`.
fn read_log(path: &Path, gen: u64, from: u64, to: u64, m: &mut Manifest) -> Result<(), StateError> {
    if to <= from {
        return Ok(());
    }
    let p = path.join(Head::log_name(gen));
    let f = File::open(&p).map_err(ioe("open", &p))?;
    let mut buf = vec![0u8; (to - from) as usize];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, from).map_err(ioe("read", &p))?;
    for (id, packed) in decode_log(&buf).map_err(|why| StateError::Damaged {
        path: p.clone(),
        why,
    })? {
        m.insert_packed(id, packed.into())
            .map_err(|source| StateError::Manifest {
                path: p.clone(),
                source,
            })?;
    }
    Ok(())
}

/// One record of a tree log: id, length, packed tree object.
pub fn encode_log_record(out: &mut Vec<u8>, id: &TreeId, packed: &[u8]) {
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
    out.extend_from_slice(packed);
}

/// Split a run of whole tree-log records (each tree is checked against its
/// id when inserted into a manifest).
pub fn decode_log(mut b: &[u8]) -> Result<Vec<(TreeId, &[u8])>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 36 {
            return Err("truncated record".into());
        }
        let id = TreeId(b[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD || len > b.len() - 36 {
            return Err(format!("record of {len} bytes out of bounds"));
        }
        out.push((id, &b[36..36 + len]));
        b = &b[36 + len..];
    }
    Ok(out)
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

const JOURNAL_FILE: &str = "journal";
const JOURNAL_MAGIC: [u8; 4] = *b"SYJN";
const JOURNAL_VERSION: u16 = 2;
const JOURNAL_LEN: usize = 4 + 2 + 3 * 32 + 2 * 8 + 32;

/// The intent of a commit, durable before the tree is touched: the
/// snapshot committed before, the snapshot being committed, the digest of
/// the plan between them, and the tree log holding the new snapshot's tree
/// objects (log `gen` up to `len`, appended before the journal is written).
/// The plan itself is recomputed on roll-forward (it is a pure function of
/// the two manifests) and checked against the digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Journal {
    pub from: SnapshotId,
    pub to: SnapshotId,
    pub plan_digest: [u8; 32],
    pub gen: u64,
    pub len: u64,
}

impl Journal {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(JOURNAL_LEN);
        body.extend_from_slice(self.from.as_bytes());
        body.extend_from_slice(self.to.as_bytes());
        body.extend_from_slice(&self.plan_digest);
        body.extend_from_slice(&self.gen.to_le_bytes());
        body.extend_from_slice(&self.len.to_le_bytes());
        seal(JOURNAL_MAGIC, JOURNAL_VERSION, body)
    }

    pub fn decode(b: &[u8]) -> Result<Journal, String> {
        let body = unseal(b, JOURNAL_MAGIC, JOURNAL_VERSION, JOURNAL_LEN)?;
        Ok(Journal {
            from: SnapshotId(field(body, 0)),
            to: SnapshotId(field(body, 32)),
            plan_digest: field(body, 64),
            gen: u64::from_le_bytes(field(body, 96)),
            len: u64::from_le_bytes(field(body, 104)),
        })
    }
}

/// A small state file: magic, version, `body`, BLAKE3 of all before it.
fn seal(magic: [u8; 4], version: u16, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 38);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The body of a file made by [`seal`] of exactly `len` bytes.
fn unseal(b: &[u8], magic: [u8; 4], version: u16, len: usize) -> Result<&[u8], String> {
    if b.len() != len {
        return Err(format!("{} bytes, want {len}", b.len()));
    }
    let (sealed, sum) = b.split_at(len - 32);
    if blake3::hash(sealed).as_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    if sealed[..4] != magic {
        return Err("bad magic".into());
    }
    let found = u16::from_le_bytes([sealed[4], sealed[5]]);
    if found != version {
        return Err(format!("unsupported version {found}"));
    }
    Ok(&sealed[6..])
}

/// `N` bytes of a sealed body at `at` (the length was checked).
fn field<const N: usize>(body: &[u8], at: usize) -> [u8; N] {
    body[at..at + N]
        .try_into()
        .expect("length checked by unseal")
}

/// Take the exclusive lock on `lock`, waiting at most `LOCK_WAIT` for it.
///
/// A holder that goes away within that time is not a conflict: when another
/// thread of this process forks a child, the child holds a copy of every
/// descriptor until its `exec` closes it, and with it the lock of a state
/// directory this process has just closed.
fn lock_briefly(lock: &File) -> Result<(), rustix::io::Errno> {
    use rustix::fs::{flock, FlockOperation::NonBlockingLockExclusive};
    let start = std::time::Instant::now();
    loop {
        match flock(lock, NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// How long opening a state directory waits for a lock held elsewhere.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Create (if needed) and lock the state directory `path` of the tree
    /// `dest` (canonical). Fails, after at most `LOCK_WAIT`, if another
    /// process holds the lock.
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
        lock_briefly(&lock).map_err(|e| match e {
            rustix::io::Errno::WOULDBLOCK => StateError::Locked(path.into()),
            e => ioe("lock", &lp)(e.into()),
        })?;
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

    /// The committed manifest and its head (`None` if nothing was
    /// committed yet). A state directory of the first format is migrated:
    /// its manifest is written as a tree log and a head.
    /// `head` is the one on disk now (see [`StateDir::head`]).
    pub fn load_committed(
        &self,
        head: Option<Head>,
    ) -> Result<(Manifest, Option<Head>), StateError> {
        if let Some(head) = head {
            return Ok((load_trees(&self.path, &head)?, Some(head)));
        }
        let Some(m) = read_v1_manifest(&self.path)? else {
            return Ok((Manifest::empty(), None));
        };
        let head = self.rewrite_log(&m, 1)?;
        self.store_head(&head)?;
        let p = self.path.join(V1_MANIFEST);
        std::fs::remove_file(&p).map_err(ioe("remove", &p))?;
        Ok((m, Some(head)))
    }

    /// The head on disk now.
    pub fn head(&self) -> Result<Option<Head>, StateError> {
        read_head(&self.path)
    }

    pub fn store_head(&self, head: &Head) -> Result<(), StateError> {
        write_atomic(&self.path, HEAD_FILE, &head.encode())
    }

    /// Append tree objects to log `gen` after its first `at` bytes (a torn
    /// tail of an interrupted commit is cut off first) and make them
    /// durable. Returns the log's new length.
    pub fn append_trees<'a>(
        &self,
        gen: u64,
        at: u64,
        trees: impl IntoIterator<Item = (&'a TreeId, &'a [u8])>,
    ) -> Result<u64, StateError> {
        let (f, len) = self.write_log(gen, at, trees)?;
        let p = self.path.join(Head::log_name(gen));
        f.sync_data().map_err(ioe("fsync", &p))?;
        if at == 0 {
            sync_dir(&self.path)?;
        }
        Ok(len)
    }

    /// [`StateDir::append_trees`] without making them durable: a commit
    /// syncs the whole filesystem once for its temporaries and these trees
    /// (a new log's name included) before it writes the journal naming
    /// them. Returns the log's new length.
    pub fn write_trees<'a>(
        &self,
        gen: u64,
        at: u64,
        trees: impl IntoIterator<Item = (&'a TreeId, &'a [u8])>,
    ) -> Result<u64, StateError> {
        Ok(self.write_log(gen, at, trees)?.1)
    }

    fn write_log<'a>(
        &self,
        gen: u64,
        at: u64,
        trees: impl IntoIterator<Item = (&'a TreeId, &'a [u8])>,
    ) -> Result<(File, u64), StateError> {
        let p = self.path.join(Head::log_name(gen));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(ioe("open", &p))?;
        f.set_len(at).map_err(ioe("truncate", &p))?;
        // Trees held uncompressed are compressed here, on every core.
        let trees: Vec<(&TreeId, &[u8])> = trees.into_iter().collect();
        let stored: Vec<_> = {
            use rayon::prelude::*;
            trees
                .par_iter()
                .with_min_len(64)
                .map(|&(id, packed)| (id, crate::manifest::for_storage(packed)))
                .collect()
        };
        let mut buf = Vec::new();
        for (id, packed) in &stored {
            encode_log_record(&mut buf, id, packed);
        }
        crashpoint::check_write().map_err(ioe("write", &p))?;
        crate::safefs::write_all_at(&f, &buf, at).map_err(ioe("write", &p))?;
        Ok((f, at + buf.len() as u64))
    }

    /// Add the tree objects in bytes `from..to` of log `gen` to `m`.
    pub fn read_trees(
        &self,
        gen: u64,
        from: u64,
        to: u64,
        m: &mut Manifest,
    ) -> Result<(), StateError> {
        read_log(&self.path, gen, from, to, m)
    }

    /// Write every tree object of `m` (garbage-collected by the caller) to
    /// the fresh log `gen`; the head naming it is the caller's to store,
    /// after which [`StateDir::remove_other_logs`] drops the old one.
    pub fn rewrite_log(&self, m: &Manifest, gen: u64) -> Result<Head, StateError> {
        let mut ids: Vec<(&TreeId, &[u8])> =
            m.packed().iter().map(|(id, p)| (id, &p[..])).collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        let len = self.append_trees(gen, 0, ids)?;
        Ok(Head {
            root: m.root(),
            gen,
            len,
            base: len,
        })
    }

    /// Remove tree logs other than the head's (left by a crash during a
    /// rewrite, or replaced by one).
    pub fn remove_other_logs(&self, head: Option<&Head>) -> Result<(), StateError> {
        let keep = head.map(|h| Head::log_name(h.gen));
        let dir = std::fs::read_dir(&self.path).map_err(ioe("list", &self.path))?;
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("trees.") && Some(name.as_ref()) != keep.as_deref() {
                std::fs::remove_file(e.path()).map_err(ioe("remove", &e.path()))?;
            }
        }
        Ok(())
    }

    /// The journal on disk: an unfinished commit's or the last finished
    /// one's (see [`unfinished_journal`]). A damaged journal cannot come
    /// from us (a record within one sector is written whole or not at
    /// all), so it is an error, not ignored.
    pub fn read_journal(&self) -> Result<Option<Journal>, StateError> {
        read_journal(&self.path)
    }

    /// Put `j` in force, durably. The journal file is written in place
    /// once it exists (it is kept between commits, always of one length):
    /// one block overwritten and `fdatasync`, which waits for that block
    /// alone, where a new file's rename waits for a commit of the
    /// filesystem's own journal. The caller has made what `j` names (and
    /// the previous head) durable first: the record it overwrites is then
    /// no longer needed. The first time, it is made beside and renamed in.
    pub fn write_journal(&self, j: &Journal) -> Result<(), StateError> {
        let data = j.encode();
        let p = self.path.join(JOURNAL_FILE);
        let existing = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p);
        match existing {
            Ok(f)
                if f.metadata()
                    .is_ok_and(|m| m.is_file() && m.len() == data.len() as u64) =>
            {
                crashpoint::check_write().map_err(ioe("write", &p))?;
                f.write_all_at(&data, 0).map_err(ioe("write", &p))?;
                f.sync_data().map_err(ioe("fsync", &p))
            }
            Ok(_) => self.publish_new(JOURNAL_FILE, &data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.publish_new(JOURNAL_FILE, &data),
            Err(e) => Err(ioe("open", &p)(e)),
        }
    }

    /// Write `name.new` durably and rename it over `name`, durably.
    fn publish_new(&self, name: &str, data: &[u8]) -> Result<(), StateError> {
        self.stage_file(name, data)?;
        let tmp = self.path.join(format!("{name}.new"));
        File::open(&tmp)
            .and_then(|f| f.sync_data())
            .map_err(ioe("fsync", &tmp))?;
        self.rename_in(name)?;
        sync_dir(&self.path)
    }

    /// Write `head` as `head.new`, not yet synced nor in force: the caller
    /// makes it durable with the tree it names, then publishes it with
    /// [`StateDir::publish_head`].
    pub fn stage_head(&self, head: &Head) -> Result<(), StateError> {
        self.stage_file(HEAD_FILE, &head.encode())
    }

    /// Put the staged head in force, by a rename that is not synced: the
    /// caller keeps the journal that leads to it until a later sync.
    pub fn publish_head(&self) -> Result<(), StateError> {
        self.rename_in(HEAD_FILE)
    }

    fn stage_file(&self, name: &str, data: &[u8]) -> Result<(), StateError> {
        let tmp = self.path.join(format!("{name}.new"));
        let mut f = File::create(&tmp).map_err(ioe("create", &tmp))?;
        crashpoint::check_write().map_err(ioe("write", &tmp))?;
        f.write_all(data).map_err(ioe("write", &tmp))
    }

    fn rename_in(&self, name: &str) -> Result<(), StateError> {
        let dst = self.path.join(name);
        std::fs::rename(self.path.join(format!("{name}.new")), &dst).map_err(ioe("rename", &dst))
    }

    /// Write out the tree log `gen` and wait for the disk to have it (for
    /// a journal commit that follows: see [`crate::flush`]).
    pub fn write_out_log(&self, gen: u64) -> Result<(), StateError> {
        self.write_out(&Head::log_name(gen))
    }

    /// Write out the head staged by [`StateDir::stage_head`] and wait for
    /// the disk to have it (as [`StateDir::write_out_log`]).
    pub fn write_out_staged_head(&self) -> Result<(), StateError> {
        self.write_out(&format!("{HEAD_FILE}.new"))
    }

    fn write_out(&self, name: &str) -> Result<(), StateError> {
        use std::os::fd::AsFd;
        let p = self.path.join(name);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(ioe("open", &p))?;
        crate::flush::write_and_wait(f.as_fd()).map_err(ioe("write out", &p))
    }

    /// The state directory itself, opened (to sync its filesystem).
    pub fn open_dir(&self) -> Result<File, StateError> {
        File::open(&self.path).map_err(ioe("open", &self.path))
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

    /// A copy of the lock's descriptor that outlives the state directory
    /// for a moment (a child forked by another thread, before its exec)
    /// does not make the next open fail.
    #[test]
    fn a_lock_released_within_the_wait_is_taken() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("st");
        let a = StateDir::open(&s, Path::new("/x/a")).unwrap();
        let copy = a._lock.try_clone().unwrap();
        drop(a);
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            drop(copy);
        });
        StateDir::open(&s, Path::new("/x/a")).unwrap();
        closer.join().unwrap();
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
    fn journal_and_head_round_trip_and_damage() {
        let j = Journal {
            from: SnapshotId([1; 32]),
            to: SnapshotId([3; 32]),
            plan_digest: [2; 32],
            gen: 4,
            len: 5,
        };
        let b = j.encode();
        assert_eq!(Journal::decode(&b).unwrap(), j);
        for cut in [0, 10, b.len() - 1] {
            assert!(Journal::decode(&b[..cut]).is_err());
        }
        let mut bad = b.clone();
        bad[50] ^= 1;
        assert!(Journal::decode(&bad).is_err());
        let h = Head {
            root: TreeId([9; 32]),
            gen: 2,
            len: 100,
            base: 50,
        };
        let b = h.encode();
        assert_eq!(Head::decode(&b).unwrap(), h);
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(Head::decode(&bad).is_err());
        assert!(Head::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn tree_log_appends_cuts_torn_tails_and_rewrites() {
        use crate::manifest::tests::file;
        let d = tempfile::tempdir().unwrap();
        let st = StateDir::open(&d.path().join("st"), Path::new("/x/a")).unwrap();
        let mut m = Manifest::empty();
        m.set_entry(b"a", Some(file(b"a", b"1"))).unwrap();
        m.gc();
        let head = st.rewrite_log(&m, 1).unwrap();
        st.store_head(&head).unwrap();
        assert_eq!(peek_manifest(st.path()).unwrap().root(), m.root());

        // A second snapshot appends only its new tree; a torn tail left by
        // an interrupted append is cut off by the next one.
        let mut n = m.clone();
        n.set_entry(b"b", Some(file(b"b", b"2"))).unwrap();
        let new: Vec<_> = n
            .packed()
            .iter()
            .filter(|(id, _)| !m.contains_tree(id))
            .map(|(id, p)| (id, &p[..]))
            .collect();
        assert_eq!(new.len(), 1);
        st.append_trees(1, head.len, [(&TreeId([7; 32]), &b"junk"[..])])
            .unwrap();
        let len = st.append_trees(1, head.len, new).unwrap();
        let log = std::fs::read(st.path().join("trees.1")).unwrap();
        assert_eq!(log.len() as u64, len);
        let mut back = peek_manifest(st.path()).unwrap();
        st.read_trees(1, head.len, len, &mut back).unwrap();
        back.set_root(n.root()).unwrap();
        assert_eq!(back.lookup(b"b").unwrap().unwrap(), file(b"b", b"2"));

        // Damage is an error, not a different tree.
        let mut bad = log.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(st.path().join("trees.1"), &bad).unwrap();
        let mut m2 = Manifest::empty();
        assert!(st.read_trees(1, head.len, len, &mut m2).is_err());
        assert!(decode_log(&bad[..bad.len() - 1]).is_err());

        // A rewrite to the next generation drops the old log.
        n.gc();
        let h2 = st.rewrite_log(&n, 2).unwrap();
        st.store_head(&h2).unwrap();
        st.remove_other_logs(Some(&h2)).unwrap();
        assert!(!st.path().join("trees.1").exists());
        assert_eq!(peek_manifest(st.path()).unwrap().root(), n.root());
        assert_eq!(peek_committed_root(st.path()), Some(n.root()));
    }

    #[test]
    fn a_first_format_manifest_is_migrated() {
        use crate::manifest::tests::file;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("st");
        let st = StateDir::open(&p, Path::new("/x/a")).unwrap();
        let mut m = Manifest::empty();
        m.set_entry(b"a", Some(file(b"a", b"1"))).unwrap();
        std::fs::write(p.join("manifest"), m.encode()).unwrap();
        assert_eq!(peek_committed_root(&p), Some(m.root()));
        assert_eq!(peek_manifest(&p).unwrap().root(), m.root());
        let (back, head) = st.load_committed(st.head().unwrap()).unwrap();
        assert_eq!(back.root(), m.root());
        assert_eq!(head.unwrap().root, m.root());
        assert!(!p.join("manifest").exists());
        assert_eq!(peek_manifest(&p).unwrap().root(), m.root());
    }
}
