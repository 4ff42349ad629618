//! The scanner: walks a tree and builds its [`Manifest`]. Directories are
//! read with `getdents` and entries stat'ed relative to their directory fd
//! (no path resolution per entry, no symlink ever followed); files are
//! hashed in parallel on rayon, and a file whose (dev, inode, size, mtime,
//! ctime) matches the hash cache is not read at all. A file that changes
//! while it is read is retried and, if it keeps changing, reported: it is
//! never recorded half-read. Fifos, sockets and devices are skipped with a
//! warning. Blocking IO only.
//!
//! `walkdir` is not used for the walk itself: it resolves a full path per
//! entry and walks one directory at a time, while this walk fans out across
//! directories and stats through directory fds.

use std::collections::HashMap;
use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::cache::{self, HashCache, LinkRecord, StatKey};
use crate::chunk::{chunk_reader, ChunkRef, Content};
use crate::hash::{FileHash, TreeId};
use crate::manifest::{join, Entry, Kind, Manifest, ManifestError, Tree, MAX_DEPTH};

/// Larger files get a sequential read-ahead hint.
const READ_AHEAD_MIN: u64 = 1 << 20;
/// How often a file that changes while being hashed is re-read.
const HASH_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} kept changing while it was hashed; retry when the writer is done")]
    Changing { path: String },
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("tree nests deeper than {MAX_DEPTH} levels at {0}")]
    TooDeep(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

#[derive(Clone, Debug)]
pub struct ScanOptions {
    /// Hash cache file; `None` disables the cache.
    pub cache: Option<PathBuf>,
    /// Record owners (uid/gid); when false both are recorded as 0, so that
    /// trees owned by different users on different hosts compare equal.
    pub owners: bool,
    /// Hold the manifest's trees compressed (see [`crate::manifest::pack`]):
    /// for a manifest kept in memory. A one-shot scan (a push that exits
    /// after) spares the compression of every directory; its trees are
    /// compressed only if they are stored.
    pub pack: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            cache: None,
            owners: true,
            pack: true,
        }
    }
}

#[derive(Debug)]
pub struct ScanOutcome {
    pub manifest: Manifest,
    pub warnings: Vec<String>,
    /// Files whose content was read and hashed.
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    /// Files whose hash came from the cache.
    pub cache_hits: u64,
    /// Stamps of every directory, for an incremental [`rescan`].
    pub dirs: DirIndex,
    /// Directories listed by this scan (all of them for a full scan).
    pub dirs_listed: u64,
    /// Directories a [`rescan`] found that the previous scan did not have.
    /// A watcher may have started watching them only after some of their
    /// entries were written, so they should be rescanned once more.
    pub new_dirs: Vec<Vec<u8>>,
    /// Tree objects of `manifest` right after its last garbage collection:
    /// a rescan starts from every tree of the previous scan (reused
    /// subtrees then cost nothing) and collects the replaced ones only
    /// once they could have doubled the count, so its cost follows the
    /// change, not the tree.
    pub live_trees: usize,
}

/// What identifies a directory's listing: its entry set changes only with
/// its mtime (and a directory moved in has another inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirStamp {
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// The stamp of every directory of a scanned tree, by relative path.
pub type DirIndex = std::collections::BTreeMap<Vec<u8>, DirStamp>;

/// What an incremental rescan may take from the previous scan.
struct Reuse<'a> {
    prev: &'a Manifest,
    dirs: &'a DirIndex,
    /// Directories to list again, and every ancestor of one.
    descend: std::collections::HashSet<Vec<u8>>,
    /// Previous trees of the directories listed again, decoded once: the
    /// children they did not change are found in them.
    parents: Mutex<HashMap<Vec<u8>, Option<Arc<crate::manifest::Tree>>>>,
    /// Trees of `prev` when it was last collected (see [`ScanOutcome::live_trees`]).
    live_trees: usize,
}

type CacheRecord = (StatKey, FileHash, Box<[ChunkRef]>);
/// Paths of each multiply-linked inode, by (dev, inode).
type LinkGroups = HashMap<(u64, u64), Vec<Vec<u8>>>;

struct Ctx<'a> {
    root: PathBuf,
    reuse: Option<Reuse<'a>>,
    dirs: Mutex<DirIndex>,
    new_dirs: Mutex<Vec<Vec<u8>>>,
    listed: AtomicU64,
    cache: HashCache,
    save_cache: bool,
    /// Records of the files hashed by this scan.
    new_cache: Mutex<Vec<CacheRecord>>,
    /// (dev, inode) of the cache hits to keep in the saved cache.
    kept: Mutex<Vec<(u64, u64)>>,
    /// Symlinks read by this scan, and (dev, inode) of the ones found in
    /// the cache, to keep.
    new_links: Mutex<Vec<LinkRecord>>,
    kept_links: Mutex<Vec<(u64, u64)>>,
    trees: Mutex<HashMap<TreeId, Arc<[u8]>>>,
    links: Mutex<LinkGroups>,
    warnings: Mutex<Vec<String>>,
    hashed: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    owners: bool,
    pack: bool,
    racy_after_ns: i64,
}

impl Ctx<'_> {
    fn show(&self, rel: &[u8]) -> String {
        let p = self.root.join(std::ffi::OsStr::from_bytes(rel));
        p.display().to_string()
    }

    fn io(&self, rel: &[u8], e: impl Into<std::io::Error>) -> ScanError {
        ScanError::Io {
            path: self.show(rel),
            source: e.into(),
        }
    }

    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        self.warnings.lock().unwrap().push(msg);
    }
}

/// Scan the tree under `root` into a manifest.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<ScanOutcome, ScanError> {
    scan_with(root, opts, None)
}

/// Rescan after changes under the `dirty` directories (relative paths,
/// `b""` for the root): only those directories and their ancestors are
/// listed again; every other directory whose stamp is unchanged keeps its
/// subtree from `prev`, so the cost follows the change, not the tree.
/// Files in a listed directory are stat'ed (their content comes from the
/// hash cache when unchanged). A directory whose stamp changed behind the
/// watcher's back is listed too. Hard links between a rescanned and a
/// reused part are resolved by the next full scan.
pub fn rescan(
    root: &Path,
    opts: &ScanOptions,
    prev: &ScanOutcome,
    dirty: &[Vec<u8>],
) -> Result<ScanOutcome, ScanError> {
    let mut descend = std::collections::HashSet::new();
    for d in dirty {
        let mut p = d.as_slice();
        loop {
            if !descend.insert(p.to_vec()) {
                break;
            }
            match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p = &p[..i],
                None if !p.is_empty() => p = b"",
                None => break,
            }
        }
    }
    let reuse = Reuse {
        prev: &prev.manifest,
        dirs: &prev.dirs,
        descend,
        parents: Mutex::new(HashMap::new()),
        live_trees: prev.live_trees,
    };
    scan_with(root, opts, Some(reuse))
}

fn scan_with(
    root: &Path,
    opts: &ScanOptions,
    reuse: Option<Reuse<'_>>,
) -> Result<ScanOutcome, ScanError> {
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(i64::MAX);
    let start_trees = reuse
        .as_ref()
        .map(|r| r.prev.packed().clone())
        .unwrap_or_default();
    let ctx = Ctx {
        root: root.to_path_buf(),
        reuse,
        dirs: Mutex::new(DirIndex::new()),
        new_dirs: Mutex::new(Vec::new()),
        listed: AtomicU64::new(0),
        cache: opts
            .cache
            .as_deref()
            .map(HashCache::load)
            .unwrap_or_default(),
        save_cache: opts.cache.is_some(),
        new_cache: Mutex::new(Vec::new()),
        kept: Mutex::new(Vec::new()),
        new_links: Mutex::new(Vec::new()),
        kept_links: Mutex::new(Vec::new()),
        trees: Mutex::new(start_trees),
        links: Mutex::new(HashMap::new()),
        warnings: Mutex::new(Vec::new()),
        hashed: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        hits: AtomicU64::new(0),
        owners: opts.owners,
        pack: opts.pack,
        racy_after_ns: now_ns.saturating_sub(cache::RACY_WINDOW_NS),
    };
    let fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOTDIR => ScanError::NotADirectory(root.display().to_string()),
        e => ctx.io(b"", e),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| ctx.io(b"", e))?;
    ctx.dirs.lock().unwrap().insert(Vec::new(), dir_stamp(&st));
    let root_id = scan_dir(&ctx, fd, b"", 0)?;
    let trees = std::mem::take(&mut *ctx.trees.lock().unwrap());
    let mut manifest = Manifest::from_parts(root_id, trees)?;
    let edited = resolve_hard_links(&mut manifest, ctx.links.into_inner().unwrap())?;
    // A full scan holds only live trees; a rescan also the ones it replaced.
    let live_trees = match &ctx.reuse {
        Some(r) if !edited && manifest.tree_count() <= 2 * r.live_trees.max(64) => r.live_trees,
        _ => {
            if edited || ctx.reuse.is_some() {
                manifest.gc();
            }
            manifest.tree_count()
        }
    };

    if let (Some(path), true) = (&opts.cache, ctx.save_cache) {
        let mut update = CacheUpdate {
            files: ctx.new_cache.into_inner().unwrap(),
            kept: ctx.kept.into_inner().unwrap(),
            links: ctx.new_links.into_inner().unwrap(),
            kept_links: ctx.kept_links.into_inner().unwrap(),
        };
        if ctx.reuse.is_none() && update.unchanged(&ctx.cache) {
            // The file already holds exactly these records.
        } else if let Err(e) = update.save(&ctx.cache, path, ctx.reuse.is_some()) {
            tracing::warn!(path = %path.display(), "cannot save the hash cache: {e}");
        }
    }
    Ok(ScanOutcome {
        manifest,
        warnings: ctx.warnings.into_inner().unwrap(),
        files_hashed: ctx.hashed.into_inner(),
        bytes_hashed: ctx.bytes.into_inner(),
        cache_hits: ctx.hits.into_inner(),
        dirs: ctx.dirs.into_inner().unwrap(),
        dirs_listed: ctx.listed.into_inner(),
        new_dirs: ctx.new_dirs.into_inner().unwrap(),
        live_trees,
    })
}

/// What a scan found for the hash cache.
struct CacheUpdate {
    /// Records of the files hashed by this scan.
    files: Vec<CacheRecord>,
    /// (dev, inode) of the loaded file records hit.
    kept: Vec<(u64, u64)>,
    /// Symlinks read by this scan.
    links: Vec<LinkRecord>,
    /// (dev, inode) of the loaded symlinks hit.
    kept_links: Vec<(u64, u64)>,
}

impl CacheUpdate {
    /// True if the cache to save is the loaded one: every loaded record
    /// was hit (and kept) exactly once and nothing else was read. A warm
    /// scan of an unchanged tree then writes nothing.
    fn unchanged(&mut self, cache: &HashCache) -> bool {
        let once = |kept: &mut Vec<(u64, u64)>, loaded: usize| {
            // Hits are distinct loaded records unless an inode was seen twice.
            kept.sort_unstable();
            kept.len() == loaded && kept.windows(2).all(|w| w[0] != w[1])
        };
        cache.loaded()
            && !cache.old_format()
            && self.files.is_empty()
            && self.links.is_empty()
            && once(&mut self.kept, cache.len())
            && once(&mut self.kept_links, cache.link_count())
    }

    /// Write the new cache: the records read by this scan, the loaded
    /// records of the hits and, for a rescan, the loaded records of the
    /// entries in reused subtrees (they were not visited).
    fn save(mut self, cache: &HashCache, path: &Path, rescan: bool) -> std::io::Result<()> {
        let files = &mut self.files;
        files.extend(
            self.kept
                .iter()
                .filter_map(|&(dev, ino)| cache.record(dev, ino)),
        );
        let links = &mut self.links;
        links.extend(
            self.kept_links
                .iter()
                .filter_map(|&(dev, ino)| cache.link_record(dev, ino)),
        );
        if rescan {
            let seen: std::collections::HashSet<(u64, u64)> = files
                .iter()
                .map(|(k, ..)| (k.dev, k.ino))
                .chain(links.iter().map(|(k, _)| (k.dev, k.ino)))
                .collect();
            let unseen = |k: &StatKey| !seen.contains(&(k.dev, k.ino));
            files.extend(cache.records().filter(|(k, ..)| unseen(k)));
            links.extend(cache.link_records().filter(|(k, _)| unseen(k)));
        }
        cache::save(path, files, links)
    }
}

#[allow(clippy::unnecessary_cast)]
fn dir_stamp(st: &rustix::fs::Stat) -> DirStamp {
    let k = stat_key(st);
    DirStamp {
        dev: k.dev,
        ino: k.ino,
        mtime_ns: k.mtime_ns,
        ctime_ns: k.ctime_ns,
    }
}

/// The previous subtree of `rel`, if it may be reused as it is; its trees
/// and directory stamps are carried over into this scan.
fn reused_subtree(ctx: &Ctx, rel: &[u8], stamp: DirStamp) -> Option<TreeId> {
    let reuse = ctx.reuse.as_ref()?;
    if reuse.descend.contains(rel) || reuse.dirs.get(rel) != Some(&stamp) {
        return None;
    }
    let id = if rel.is_empty() {
        reuse.prev.root()
    } else {
        let (parent, name) = crate::safefs::split(rel);
        let tree = {
            let mut parents = reuse.parents.lock().unwrap();
            parents
                .entry(parent.to_vec())
                .or_insert_with(|| {
                    let id = if parent.is_empty() {
                        Some(reuse.prev.root())
                    } else {
                        reuse.prev.lookup(parent).ok()??.subtree()
                    };
                    id.and_then(|id| reuse.prev.tree(&id).ok()).map(Arc::new)
                })
                .clone()?
        };
        tree.get(name)?.subtree()?
    };
    // Its trees are here already: the scan started from all of prev's.
    if !ctx.trees.lock().unwrap().contains_key(&id) {
        return None;
    }
    let prefix = join(rel, b"");
    let mut dirs = ctx.dirs.lock().unwrap();
    dirs.insert(rel.to_vec(), stamp);
    for (p, s) in reuse
        .dirs
        .range(prefix.clone()..)
        .take_while(|(p, _)| p.starts_with(&prefix))
    {
        dirs.insert(p.clone(), *s);
    }
    Some(id)
}

/// Bytes of directory entries read per `getdents64` call.
const DIRENT_BUF: usize = 64 << 10;

/// The names in a directory (without `.` and `..`), read with `getdents64`
/// straight from `dirfd` into a per-thread buffer: one allocation per name,
/// which later becomes the entry's name.
fn list_names(dirfd: &OwnedFd) -> rustix::io::Result<Vec<std::ffi::CString>> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<std::mem::MaybeUninit<u8>>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        if buf.len() < DIRENT_BUF {
            buf.resize(DIRENT_BUF, std::mem::MaybeUninit::uninit());
        }
        let mut names = Vec::new();
        let mut dir = rustix::fs::RawDir::new(dirfd, &mut buf[..]);
        while let Some(ent) = dir.next() {
            let ent = ent?;
            let name = ent.file_name();
            let b = name.to_bytes();
            if b != b"." && b != b".." {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    })
}

fn scan_dir(ctx: &Ctx, dirfd: OwnedFd, rel: &[u8], depth: usize) -> Result<TreeId, ScanError> {
    if depth > MAX_DEPTH {
        return Err(ScanError::TooDeep(ctx.show(rel)));
    }
    ctx.listed.fetch_add(1, Relaxed);
    let mut names = list_names(&dirfd).map_err(|e| ctx.io(rel, e))?;
    // Sorted here, where the items are small, so the entries come out in
    // canonical order (the tree's own sort then only checks a sorted run).
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let entries: Vec<Option<Entry>> = names
        .into_par_iter()
        .with_min_len(16)
        .map(|name| scan_entry(ctx, &dirfd, rel, name, depth))
        .collect::<Result<_, _>>()?;
    drop(dirfd);
    let mut tree = Tree {
        entries: entries.into_iter().flatten().collect(),
    };
    tree.sort();
    let bytes = tree.encode();
    drop(tree);
    let id = TreeId::of(&bytes);
    // Compress outside the lock: the other threads keep walking meanwhile.
    let packed = match ctx.pack {
        true => crate::manifest::pack(&bytes),
        false => crate::manifest::hold(&bytes),
    };
    ctx.trees.lock().unwrap().entry(id).or_insert(packed);
    Ok(id)
}

struct Meta {
    mode: u32,
    mtime_ns: i64,
    uid: u32,
    gid: u32,
}

#[allow(clippy::unnecessary_cast)]
fn stat_key(st: &rustix::fs::Stat) -> StatKey {
    StatKey {
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        size: st.st_size as u64,
        mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
        ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
    }
}

#[allow(clippy::unnecessary_cast)]
fn meta(ctx: &Ctx, st: &rustix::fs::Stat) -> Meta {
    Meta {
        mode: st.st_mode as u32 & 0o7777,
        mtime_ns: stat_key(st).mtime_ns,
        uid: if ctx.owners { st.st_uid as u32 } else { 0 },
        gid: if ctx.owners { st.st_gid as u32 } else { 0 },
    }
}

fn entry(name: Vec<u8>, m: Meta, kind: Kind) -> Entry {
    Entry {
        name,
        mode: m.mode,
        mtime_ns: m.mtime_ns,
        uid: m.uid,
        gid: m.gid,
        kind,
    }
}

/// The target of the symlink `name` in `dirfd`, read into a stack buffer
/// (one exact allocation for the result).
fn read_link(dirfd: &OwnedFd, name: &CStr) -> rustix::io::Result<Vec<u8>> {
    // Not zeroed: that would cost more than the call for short targets.
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let (target, rest) = rustix::fs::readlinkat_raw(dirfd, name, &mut buf)?;
    if !rest.is_empty() {
        Ok(target.to_vec())
    } else {
        // Possibly truncated: let rustix grow a buffer until it fits.
        Ok(rustix::fs::readlinkat(dirfd, name, Vec::new())?.into_bytes())
    }
}

fn scan_entry(
    ctx: &Ctx,
    dirfd: &OwnedFd,
    parent: &[u8],
    cname: std::ffi::CString,
    depth: usize,
) -> Result<Option<Entry>, ScanError> {
    // The relative path is only needed for directories, hard links and
    // messages: built on demand, not per entry.
    let rel = || join(parent, cname.as_bytes());
    let st = match rustix::fs::statat(dirfd, &cname, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        // Deleted between listing and stat: it is simply not in this snapshot.
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(ctx.io(&rel(), e)),
    };
    let ft = FileType::from_raw_mode(st.st_mode as _);
    match ft {
        FileType::Directory => {
            let rel = rel();
            let fd = match rustix::fs::openat(
                dirfd,
                &cname,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => return Ok(None),
                Err(e) => return Err(ctx.io(&rel, e)),
            };
            // Metadata from the opened directory, so it matches its content.
            let st = rustix::fs::fstat(&fd).map_err(|e| ctx.io(&rel, e))?;
            let stamp = dir_stamp(&st);
            let tree = match reused_subtree(ctx, &rel, stamp) {
                Some(tree) => tree,
                None => {
                    if ctx
                        .reuse
                        .as_ref()
                        .is_some_and(|r| !r.dirs.contains_key(&rel))
                    {
                        ctx.new_dirs.lock().unwrap().push(rel.clone());
                    }
                    ctx.dirs.lock().unwrap().insert(rel.clone(), stamp);
                    scan_dir(ctx, fd, &rel, depth + 1)?
                }
            };
            Ok(Some(entry(
                cname.into_bytes(),
                meta(ctx, &st),
                Kind::Dir { tree },
            )))
        }
        FileType::Symlink => {
            let Some(target) =
                link_target(ctx, dirfd, &cname, &st).map_err(|e| ctx.io(&rel(), e))?
            else {
                return Ok(None);
            };
            Ok(Some(entry(
                cname.into_bytes(),
                meta(ctx, &st),
                Kind::Symlink { target },
            )))
        }
        FileType::RegularFile => {
            let Some((st, content)) = file_content(ctx, dirfd, &cname, &rel, &st)? else {
                return Ok(None);
            };
            if st.st_nlink > 1 {
                let key = stat_key(&st);
                ctx.links
                    .lock()
                    .unwrap()
                    .entry((key.dev, key.ino))
                    .or_default()
                    .push(rel());
            }
            Ok(Some(entry(
                cname.into_bytes(),
                meta(ctx, &st),
                Kind::File {
                    size: content.size,
                    hash: content.hash,
                    chunks: content.chunks,
                },
            )))
        }
        other => {
            ctx.warn(format!(
                "skipping {} ({other:?}): only files, directories and symlinks are mirrored",
                ctx.show(&rel())
            ));
            Ok(None)
        }
    }
}

/// The target of a symlink, from the cache or by reading it; `None` if it
/// was deleted meanwhile.
fn link_target(
    ctx: &Ctx,
    dirfd: &OwnedFd,
    cname: &CStr,
    st: &rustix::fs::Stat,
) -> rustix::io::Result<Option<Vec<u8>>> {
    let key = stat_key(st);
    let keep = ctx.save_cache && !racy(ctx, &key);
    if let Some(target) = ctx.cache.get_link(&key) {
        if keep {
            ctx.kept_links.lock().unwrap().push((key.dev, key.ino));
        }
        return Ok(Some(target.to_vec()));
    }
    let target = match read_link(dirfd, cname) {
        Ok(t) => t,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Read after the stat: a symlink replaced meanwhile is another inode,
    // whose target must not be kept under this one's key.
    if keep && target.len() as u64 == key.size {
        ctx.new_links
            .lock()
            .unwrap()
            .push((key, target.clone().into()));
    }
    Ok(Some(target))
}

/// The content of one regular file, from the cache or by reading it; the
/// returned stat is the one the content belongs to.
fn file_content(
    ctx: &Ctx,
    dirfd: &OwnedFd,
    cname: &CStr,
    rel: &dyn Fn() -> Vec<u8>,
    st: &rustix::fs::Stat,
) -> Result<Option<(rustix::fs::Stat, Content)>, ScanError> {
    let key = stat_key(st);
    if let Some(c) = ctx.cache.get(&key) {
        ctx.hits.fetch_add(1, Relaxed);
        let content = Content {
            size: c.size,
            hash: c.hash,
            chunks: c.chunks.to_vec(),
        };
        if ctx.save_cache && !racy(ctx, &key) {
            // The loaded record stays as it is: only its key is kept.
            ctx.kept.lock().unwrap().push((key.dev, key.ino));
        }
        return Ok(Some((*st, content)));
    }
    for _ in 0..HASH_ATTEMPTS {
        let fd = match rustix::fs::openat(
            dirfd,
            cname,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            // Replaced by a symlink between stat and open: rescan later.
            Err(rustix::io::Errno::LOOP) => continue,
            Err(e) => return Err(ctx.io(&rel(), e)),
        };
        let before = rustix::fs::fstat(&fd).map_err(|e| ctx.io(&rel(), e))?;
        if FileType::from_raw_mode(before.st_mode as _) != FileType::RegularFile {
            continue;
        }
        let size = stat_key(&before).size;
        let content = read_content(fd.as_fd(), size).map_err(|e| ctx.io(&rel(), e))?;
        let after = rustix::fs::fstat(&fd).map_err(|e| ctx.io(&rel(), e))?;
        let (b, a) = (stat_key(&before), stat_key(&after));
        let Some(content) = content else { continue };
        if b != a || content.size != a.size {
            continue;
        }
        // Writes within one timestamp tick leave mtime and ctime as they
        // were, so the stat check cannot see them. A file changed that
        // recently is read a second time and must hash the same.
        if a.mtime_ns >= ctx.racy_after_ns || a.ctime_ns >= ctx.racy_after_ns {
            let again = read_content(fd.as_fd(), size).map_err(|e| ctx.io(&rel(), e))?;
            let after2 = rustix::fs::fstat(&fd).map_err(|e| ctx.io(&rel(), e))?;
            if again.as_ref().map(|c| c.hash) != Some(content.hash) || stat_key(&after2) != a {
                continue;
            }
        }
        {
            ctx.hashed.fetch_add(1, Relaxed);
            ctx.bytes.fetch_add(a.size, Relaxed);
            remember(ctx, a, &content);
            return Ok(Some((after, content)));
        }
    }
    Err(ScanError::Changing {
        path: ctx.show(&rel()),
    })
}

fn racy(ctx: &Ctx, key: &StatKey) -> bool {
    key.mtime_ns >= ctx.racy_after_ns || key.ctime_ns >= ctx.racy_after_ns
}

fn remember(ctx: &Ctx, key: StatKey, content: &Content) {
    if ctx.save_cache && !racy(ctx, &key) {
        ctx.new_cache
            .lock()
            .unwrap()
            .push((key, content.hash, content.chunks.clone().into()));
    }
}

/// Hash `size` bytes of an open file; `None` if the file's length is not
/// `size` (it changed under us). Reads with one reused buffer per thread
/// rather than mapping: resident memory stays flat whatever the file sizes.
fn read_content(fd: std::os::fd::BorrowedFd<'_>, size: u64) -> std::io::Result<Option<Content>> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut file = std::fs::File::from(fd.try_clone_to_owned()?);
    // The duplicate shares the offset: a second read starts over.
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
    if size > READ_AHEAD_MIN {
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
    }
    BUF.with_borrow_mut(|buf| chunk_reader(file, size, buf))
}

/// Canonical order of relative paths: component by component, bytewise.
pub fn canonical_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// Turn every name but the first (in canonical order) of a multiply-linked
/// inode into a [`Kind::HardLink`] to the first.
/// Turns every path but the first of a multiply-linked inode into a hard
/// link entry; true if it changed anything (the replaced trees are then
/// garbage).
fn resolve_hard_links(m: &mut Manifest, links: LinkGroups) -> Result<bool, ScanError> {
    let mut edited = false;
    for (_, mut paths) in links {
        if paths.len() < 2 {
            continue;
        }
        paths.sort_by(|a, b| canonical_cmp(a, b));
        let primary = paths[0].clone();
        let Some(first) = m.lookup(&primary)? else {
            continue;
        };
        let Kind::File { size, hash, .. } = first.kind else {
            continue;
        };
        for p in &paths[1..] {
            if let Some(mut e) = m.lookup(p)? {
                e.kind = Kind::HardLink {
                    path: primary.clone(),
                    size,
                    hash,
                };
                m.set_entry(p, Some(e))?;
                edited = true;
            }
        }
    }
    Ok(edited)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn scan_root(p: &Path) -> Manifest {
        scan(p, &ScanOptions::default()).unwrap().manifest
    }

    #[test]
    fn root_reacts_to_every_kind_of_change_and_not_to_a_rescan() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/b/f"), b"hello").unwrap();
        symlink("b/f", r.join("a/l")).unwrap();
        let base = scan_root(r).root();
        assert_eq!(scan_root(r).root(), base, "rescan is stable");

        let mut seen = vec![base];
        let mut check = |what: &str| {
            let now = scan_root(r).root();
            assert!(!seen.contains(&now), "{what} did not change the root");
            seen.push(now);
        };
        std::fs::write(r.join("a/b/f"), b"hellp").unwrap();
        check("content");
        std::fs::set_permissions(r.join("a/b/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        check("mode");
        let f = std::fs::File::options()
            .write(true)
            .open(r.join("a/b/f"))
            .unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(123_456_789))
            .unwrap();
        check("mtime");
        std::fs::rename(r.join("a/b/f"), r.join("a/b/g")).unwrap();
        check("name");
        std::fs::remove_file(r.join("a/l")).unwrap();
        symlink("b/g", r.join("a/l")).unwrap();
        check("symlink target");
    }

    #[test]
    fn cache_avoids_reading_unchanged_files() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("t");
        std::fs::create_dir(&tree).unwrap();
        for i in 0..20 {
            let p = tree.join(format!("f{i}"));
            std::fs::write(&p, vec![i as u8; 1000 + i * 50_000]).unwrap();
            // Old enough not to be "racy".
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
                .unwrap();
        }
        let opts = ScanOptions {
            cache: Some(d.path().join("cache")),
            ..Default::default()
        };
        let first = scan(&tree, &opts).unwrap();
        assert_eq!(first.files_hashed, 20);
        // Just-written files have a recent ctime: too "racy" to cache yet.
        std::thread::sleep(std::time::Duration::from_nanos(
            cache::RACY_WINDOW_NS as u64 + 100_000_000,
        ));
        let second = scan(&tree, &opts).unwrap();
        assert_eq!(second.files_hashed, 20);
        let third = scan(&tree, &opts).unwrap();
        assert_eq!((third.files_hashed, third.cache_hits), (0, 20));
        assert_eq!(third.manifest.root(), first.manifest.root());
        // A changed file is read again, the others are not.
        std::fs::write(tree.join("f3"), b"new content").unwrap();
        let fourth = scan(&tree, &opts).unwrap();
        assert_eq!((fourth.files_hashed, fourth.cache_hits), (1, 19));
        assert_ne!(fourth.manifest.root(), first.manifest.root());
    }

    #[test]
    fn symlink_targets_come_from_the_cache_while_the_link_is_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("t");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink("target-one", tree.join("l")).unwrap();
        // Just-made links have a recent ctime: too "racy" to cache yet.
        std::thread::sleep(std::time::Duration::from_nanos(
            cache::RACY_WINDOW_NS as u64 + 100_000_000,
        ));
        let path = d.path().join("cache");
        let opts = ScanOptions {
            cache: Some(path.clone()),
            ..Default::default()
        };
        let target = |m: &Manifest| match m.lookup(b"l").unwrap().unwrap().kind {
            Kind::Symlink { target } => target,
            other => panic!("{other:?}"),
        };
        let first = scan(&tree, &opts).unwrap();
        assert_eq!(target(&first.manifest), b"target-one");
        let key = stat_key(&rustix::fs::lstat(tree.join("l")).unwrap());
        assert_eq!(
            HashCache::load(&path).get_link(&key),
            Some(&b"target-one"[..])
        );
        // The scan takes the target from the cache (shown by a record under
        // the link's very stat that says something else)...
        cache::save(&path, &[], &[(key, b"target-two"[..].into())]).unwrap();
        assert_eq!(target(&scan(&tree, &opts).unwrap().manifest), b"target-two");
        // ...and reads it again once the link is another one.
        std::fs::remove_file(tree.join("l")).unwrap();
        std::os::unix::fs::symlink("target-3", tree.join("l")).unwrap();
        assert_eq!(target(&scan(&tree, &opts).unwrap().manifest), b"target-3");
    }

    #[test]
    fn hard_links_name_the_first_path() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir(r.join("z")).unwrap();
        std::fs::write(r.join("z/orig"), b"data").unwrap();
        std::fs::hard_link(r.join("z/orig"), r.join("a")).unwrap();
        let m = scan_root(r);
        assert!(matches!(
            m.lookup(b"a").unwrap().unwrap().kind,
            Kind::File { .. }
        ));
        match m.lookup(b"z/orig").unwrap().unwrap().kind {
            Kind::HardLink { path, .. } => assert_eq!(path, b"a"),
            k => panic!("{k:?}"),
        }
        assert_eq!(m.stats().unwrap().hardlinks, 1);
    }

    #[test]
    fn special_files_are_skipped_with_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let _l = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let out = scan(d.path(), &ScanOptions::default()).unwrap();
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert_eq!(out.manifest.stats().unwrap().files, 1);
    }

    /// Many rescans in a row: each equals a full scan, and the trees the
    /// changes replaced are collected before they pile up.
    #[test]
    fn repeated_rescans_stay_equal_to_a_full_scan_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for a in 0..8 {
            for b in 0..8 {
                let dir = r.join(format!("a{a}/b{b}"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("f"), format!("{a}{b}")).unwrap();
            }
        }
        let mut prev = scan(r, &ScanOptions::default()).unwrap();
        let live = prev.manifest.tree_count();
        assert_eq!(prev.live_trees, live);
        for i in 0..200 {
            let (a, b) = (i % 8, (i / 8) % 8);
            std::fs::write(r.join(format!("a{a}/b{b}/f")), format!("v{i}")).unwrap();
            let dirty = vec![format!("a{a}/b{b}").into_bytes()];
            let next = rescan(r, &ScanOptions::default(), &prev, &dirty).unwrap();
            let full = scan(r, &ScanOptions::default()).unwrap();
            assert_eq!(next.manifest.root(), full.manifest.root(), "rescan {i}");
            assert_eq!(next.dirs_listed, 3, "root, a{a}, a{a}/b{b}");
            assert!(
                next.manifest.tree_count() <= 2 * live.max(64) + 3,
                "{} trees after {i} rescans",
                next.manifest.tree_count()
            );
            prev = next;
        }
        // What is left is the live tree plus garbage below the bound, and
        // every tree a walk needs is there.
        prev.manifest.walk(|_, _| true).unwrap();
    }

    #[test]
    fn rescan_lists_only_dirty_directories_and_matches_a_full_scan() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for a in 0..8 {
            for b in 0..8 {
                let dir = r.join(format!("repos/{a}/{b}"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("f.rpm"), format!("{a}{b}")).unwrap();
                symlink("f.rpm", dir.join("l")).unwrap();
            }
        }
        let opts = ScanOptions::default();
        let full = scan(r, &opts).unwrap();
        assert_eq!(full.manifest.stats().unwrap().dirs, 1 + 8 + 64);
        assert_eq!(full.dirs.len(), 1 + 1 + 8 + 64);
        assert_eq!(full.dirs_listed, 1 + 1 + 8 + 64);

        // A change the watcher saw.
        std::fs::write(r.join("repos/3/4/f.rpm"), b"rebuilt").unwrap();
        std::fs::create_dir(r.join("repos/3/4/new")).unwrap();
        std::fs::write(r.join("repos/3/4/new/g"), b"g").unwrap();
        let inc = rescan(r, &opts, &full, &[b"repos/3/4".to_vec()]).unwrap();
        let again = scan(r, &opts).unwrap();
        assert_eq!(inc.manifest.root(), again.manifest.root());
        // root, repos, repos/3, repos/3/4 and the new directory.
        assert_eq!(inc.dirs_listed, 5);
        assert_eq!(inc.dirs.len(), again.dirs.len());
        assert_eq!(inc.new_dirs, vec![b"repos/3/4/new".to_vec()]);
        assert!(again.new_dirs.is_empty(), "a full scan reports none");

        // A directory whose listing changed without an event is noticed
        // when its parent is listed.
        std::fs::write(r.join("repos/5/extra"), b"x").unwrap();
        let inc2 = rescan(r, &opts, &inc, &[b"repos/3/4".to_vec()]).unwrap();
        assert_eq!(
            inc2.manifest.root(),
            scan(r, &opts).unwrap().manifest.root()
        );
        assert_eq!(
            inc2.dirs_listed, 5,
            "root, repos, repos/3, repos/3/4, repos/5"
        );

        // Nothing dirty: only the root is listed, and nothing changes.
        let idle = rescan(r, &opts, &inc2, &[]).unwrap();
        assert_eq!(idle.manifest.root(), inc2.manifest.root());
        assert_eq!(idle.dirs_listed, 1);
    }

    #[test]
    fn a_file_rewritten_during_the_scan_is_never_recorded_half_read() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("busy");
        let len = 16 << 10;
        let (a, b) = (vec![b'a'; len], vec![b'b'; len]);
        std::fs::write(&path, &a).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, path, a, b) = (stop.clone(), path.clone(), a.clone(), b.clone());
            std::thread::spawn(move || {
                let f = std::fs::File::options().write(true).open(&path).unwrap();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Rewrite in place with one call: the file rests
                    // between rewrites or, if the writer is preempted, at a
                    // page boundary of one rewrite.
                    let src = if n.is_multiple_of(2) { &b } else { &a };
                    f.write_all_at(src, 0).unwrap();
                    n += 1;
                }
                n
            })
        };
        // The states the file can rest in: one rewrite, stopped anywhere
        // (a writer preempted inside its copy leaves a page half-written,
        // and readers do not wait for it). A read torn across rewrites has
        // more than one boundary.
        let mut valid = std::collections::HashSet::new();
        for k in 0..=len {
            for (x, y) in [(&a, &b), (&b, &a)] {
                let mut v = x[..k].to_vec();
                v.extend_from_slice(&y[k..]);
                valid.insert(FileHash::of(&v));
            }
        }
        let (mut ok, mut changing) = (0, 0);
        for _ in 0..40 {
            match scan(d.path(), &ScanOptions::default()) {
                Ok(out) => {
                    let e = out.manifest.lookup(b"busy").unwrap().unwrap();
                    let Kind::File { hash, .. } = e.kind else {
                        panic!()
                    };
                    assert!(valid.contains(&hash), "a mixed read was recorded");
                    ok += 1;
                }
                Err(ScanError::Changing { .. }) => changing += 1,
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rewrites = writer.join().unwrap();
        assert!(rewrites > 0);
        assert_eq!(ok + changing, 40);
    }

    /// `Tree::encode` is written by hand: it must be exactly bincode's
    /// standard encoding of the entries, or tree ids would change.
    #[test]
    fn tree_encoding_is_bincode_standard() {
        use crate::chunk::ChunkRef;
        use crate::hash::ChunkId;
        let edges: [u64; 12] = [
            0,
            1,
            250,
            251,
            255,
            65_535,
            65_536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            1 << 40,
            i64::MAX as u64,
            u64::MAX,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let mut entries = Vec::new();
            for i in 0..(round % 40) {
                let mut pick = || {
                    let r = next();
                    if r % 3 == 0 {
                        edges[(r >> 8) as usize % edges.len()]
                    } else {
                        r >> (r % 64)
                    }
                };
                let blob = |n: u64| -> Vec<u8> {
                    (0..n % 300)
                        .map(|k| k.wrapping_mul(7).wrapping_add(n) as u8)
                        .collect()
                };
                let kind = match pick() % 4 {
                    0 => Kind::File {
                        size: pick(),
                        hash: FileHash([pick() as u8; 32]),
                        chunks: (0..pick() % 4)
                            .map(|_| ChunkRef {
                                id: ChunkId([pick() as u8; 32]),
                                len: pick() as u32,
                            })
                            .collect(),
                    },
                    1 => Kind::Dir {
                        tree: TreeId([pick() as u8; 32]),
                    },
                    2 => Kind::Symlink {
                        target: blob(pick()),
                    },
                    _ => Kind::HardLink {
                        path: blob(pick()),
                        size: pick(),
                        hash: FileHash([pick() as u8; 32]),
                    },
                };
                entries.push(Entry {
                    name: format!("n{i}-{}", pick()).into_bytes(),
                    mode: pick() as u32,
                    mtime_ns: pick() as i64,
                    uid: pick() as u32,
                    gid: pick() as u32,
                    kind,
                });
            }
            let tree = Tree { entries };
            let mut want = crate::manifest::TREE_MAGIC.to_vec();
            want.extend_from_slice(&crate::manifest::TREE_VERSION.to_le_bytes());
            want.extend(
                bincode::serde::encode_to_vec(&tree.entries, bincode::config::standard()).unwrap(),
            );
            assert_eq!(tree.encode(), want, "round {round}");
        }
    }

    #[test]
    fn canonical_order_is_by_component() {
        use std::cmp::Ordering::*;
        assert_eq!(canonical_cmp(b"a/b", b"a-b"), Less); // '/' splits, "a" < "a-b"
        assert_eq!(canonical_cmp(b"a/b", b"a/b"), Equal);
        assert_eq!(canonical_cmp(b"b", b"a/z"), Greater);
    }
}
