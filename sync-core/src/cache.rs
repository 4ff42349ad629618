//! The persistent hash cache: what each file hashed to last time, keyed by
//! (dev, inode) and trusted only while size, mtime and ctime are unchanged,
//! so that a rescan of an unchanged tree reads no file content. Symlink
//! targets are kept the same way (a target is never changed in place: a new
//! one is a new inode, or at least a new ctime), which spares the scan a
//! `readlink` per symlink, as costly as its stat when the target is longer
//! than fits in the inode. Blocking file IO only (load and save); a damaged
//! cache is ignored, never fatal.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::chunk::{ChunkRef, CDC_MAX};
use crate::hash::{ChunkId, FileHash};

const MAGIC: [u8; 4] = *b"SYHC";
/// Version 2 added symlink targets, version 3 the table that finds them
/// (see [`LinkIndex`]); files of versions 1 and 2 are still read.
const VERSION: u16 = 3;
const MAX_RECORDS: usize = 256 << 20;
/// Entries modified this close to the scan are not cached: a write within
/// the filesystem's timestamp granularity could go unnoticed.
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// The stat fields that must be unchanged for a cached hash to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cached {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub hash: FileHash,
    pub chunks: Box<[ChunkRef]>,
}

/// Longest symlink target kept (`PATH_MAX`, with its NUL).
pub const MAX_TARGET: usize = 4096;

/// One symlink as [`save`] takes it.
pub type LinkRecord = (StatKey, Box<[u8]>);

/// Hashes from the last scan and the ones gathered by this scan.
#[derive(Debug, Default)]
pub struct HashCache {
    old: rustc_hash::FxHashMap<(u64, u64), Cached>,
    /// Symlinks: the loaded file, and where in it each record starts (read
    /// in place: no allocation per link when loading or dropping).
    bytes: Loaded,
    links: LinkIndex,
    /// Read intact from a file (an empty cache may also be one).
    loaded: bool,
    /// The file is of an older version (rewritten by the next save).
    old_format: bool,
}

/// Where each symlink record of a loaded file starts.
#[derive(Debug)]
enum LinkIndex {
    /// Built when loading a version 2 file.
    Map(LinkMap),
    /// Version 3: the records' section and an open-addressing table of
    /// their offsets (plus one; 0 is a free slot), both read in place: a
    /// cache of 85k symlinks loads without building anything (a map of
    /// them took ~6 ms, before the walk could start). Every offset is
    /// checked when followed; one that leads nowhere is a miss.
    Table {
        n: usize,
        records: std::ops::Range<usize>,
        table: std::ops::Range<usize>,
    },
}

impl Default for LinkIndex {
    fn default() -> Self {
        LinkIndex::Map(Default::default())
    }
}

/// The slot of (dev, inode) in a table of `2^bits` slots.
fn slot_of(dev: u64, ino: u64, bits: u32) -> usize {
    let h = (ino ^ dev.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    match bits {
        0 => 0,
        b => (h >> (64 - b)) as usize,
    }
}

/// The bytes of a loaded cache file: mapped (the page cache's own pages,
/// ~0.5 ms for a 15 MB file of 100k entries, where reading it into fresh
/// memory took ~8 ms of a 130 ms unchanged push), or read where mapping
/// fails.
#[derive(Default)]
enum Loaded {
    #[default]
    Empty,
    Read(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Loaded {
    fn open(path: &Path) -> std::io::Result<Loaded> {
        let f = std::fs::File::open(path)?;
        // SAFETY: the mapping is read-only and private. The cache is
        // replaced only by renaming a new file over it (see [`save`]), so
        // the mapped inode keeps its contents while mapped; only a file
        // truncated in place by hand could fault on access.
        match unsafe { memmap2::MmapOptions::new().populate().map(&f) } {
            Ok(m) => Ok(Loaded::Mapped(m)),
            Err(_) => std::fs::read(path).map(Loaded::Read),
        }
    }
}

impl std::ops::Deref for Loaded {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Loaded::Empty => &[],
            Loaded::Read(v) => v,
            Loaded::Mapped(m) => m,
        }
    }
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.len())
    }
}

impl HashCache {
    /// Load a cache file; a missing or damaged file gives an empty cache.
    pub fn load(path: &Path) -> HashCache {
        match Loaded::open(path) {
            Ok(bytes) => match decode(&bytes) {
                Some((old, links)) => HashCache {
                    old_format: bytes.get(4..6) != Some(&VERSION.to_le_bytes()[..]),
                    old,
                    bytes,
                    links,
                    loaded: true,
                },
                None => {
                    tracing::warn!(path = %path.display(), "hash cache is damaged; rescanning all content");
                    HashCache::default()
                }
            },
            Err(_) => HashCache::default(),
        }
    }

    /// True if this cache was read intact from its file.
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// True if its file is of an older format: worth saving even when no
    /// record changed.
    pub fn old_format(&self) -> bool {
        self.old_format
    }

    pub fn len(&self) -> usize {
        self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.old.is_empty()
    }

    /// Symlinks held.
    pub fn link_count(&self) -> usize {
        match &self.links {
            LinkIndex::Map(m) => m.len(),
            LinkIndex::Table { n, .. } => *n,
        }
    }

    /// The cached target of a symlink whose stat matches exactly.
    pub fn get_link(&self, key: &StatKey) -> Option<&[u8]> {
        let (k, target) = self.find_link(key.dev, key.ino)?;
        (k == *key).then_some(target)
    }

    /// Every symlink, as [`save`] takes them.
    pub fn link_records(&self) -> Box<dyn Iterator<Item = LinkRecord> + '_> {
        let record = |(k, target): (StatKey, &[u8])| (k, target.into());
        match &self.links {
            LinkIndex::Map(m) => Box::new(
                m.values()
                    .filter_map(move |&at| self.link_at(at))
                    .map(record),
            ),
            LinkIndex::Table { records, .. } => {
                let mut at = records.start;
                let end = records.end;
                Box::new(
                    std::iter::from_fn(move || {
                        let (k, target) = self.link_at(at).filter(|_| at < end)?;
                        at += LINK_HEAD + target.len();
                        Some((k, target))
                    })
                    .map(record),
                )
            }
        }
    }

    /// The symlink of one (dev, inode), as [`save`] takes it.
    pub fn link_record(&self, dev: u64, ino: u64) -> Option<LinkRecord> {
        let (k, target) = self.find_link(dev, ino)?;
        Some((k, target.into()))
    }

    /// The link record of (dev, inode), if held.
    fn find_link(&self, dev: u64, ino: u64) -> Option<(StatKey, &[u8])> {
        match &self.links {
            LinkIndex::Map(m) => self.link_at(*m.get(&(dev, ino))?),
            LinkIndex::Table { records, table, .. } => {
                let slots = (table.end - table.start) / 4;
                let bits = slots.trailing_zeros();
                let mut i = slot_of(dev, ino, bits);
                // Bounded: a damaged table full of taken slots ends too.
                for _ in 0..slots {
                    let e = table.start + i * 4;
                    let v = u32::from_le_bytes(self.bytes[e..e + 4].try_into().expect("4 bytes"));
                    if v == 0 {
                        return None;
                    }
                    let at = v as usize - 1;
                    if records.contains(&at) {
                        if let Some((k, target)) = self.link_at(at) {
                            if (k.dev, k.ino) == (dev, ino) {
                                return Some((k, target));
                            }
                        }
                    }
                    i = (i + 1) & (slots - 1);
                }
                None
            }
        }
    }

    /// The link record at `at` in the loaded file, if one fits there.
    fn link_at(&self, at: usize) -> Option<(StatKey, &[u8])> {
        let b = self.bytes.get(at..)?;
        let head = b.get(..LINK_HEAD)?;
        let v = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let len = u16::from_le_bytes([head[40], head[41]]) as usize;
        if len == 0 || len > MAX_TARGET {
            return None;
        }
        let key = StatKey {
            dev: v(0),
            ino: v(1),
            size: v(2),
            mtime_ns: v(3) as i64,
            ctime_ns: v(4) as i64,
        };
        Some((key, b.get(LINK_HEAD..LINK_HEAD + len)?))
    }

    /// Every record, as [`save`] takes them.
    pub fn records(&self) -> impl Iterator<Item = (StatKey, FileHash, Box<[ChunkRef]>)> + '_ {
        self.old.iter().map(|(&key, c)| as_record(key, c))
    }

    /// The record of one (dev, inode), as [`save`] takes it.
    pub fn record(&self, dev: u64, ino: u64) -> Option<(StatKey, FileHash, Box<[ChunkRef]>)> {
        self.old.get(&(dev, ino)).map(|c| as_record((dev, ino), c))
    }

    /// The cached hash for a file whose stat matches exactly.
    pub fn get(&self, key: &StatKey) -> Option<&Cached> {
        self.old.get(&(key.dev, key.ino)).filter(|c| {
            c.size == key.size && c.mtime_ns == key.mtime_ns && c.ctime_ns == key.ctime_ns
        })
    }
}

fn as_record((dev, ino): (u64, u64), c: &Cached) -> (StatKey, FileHash, Box<[ChunkRef]>) {
    (
        StatKey {
            dev,
            ino,
            size: c.size,
            mtime_ns: c.mtime_ns,
            ctime_ns: c.ctime_ns,
        },
        c.hash,
        c.chunks.clone(),
    )
}

/// Bytes of a link record before its target: five u64 and the target's
/// length as a u16.
const LINK_HEAD: usize = 42;

/// Write `records` and `links` as the new cache, atomically (temp file and
/// rename). Targets longer than [`MAX_TARGET`] are left out.
pub fn save(
    path: &Path,
    records: &[(StatKey, FileHash, Box<[ChunkRef]>)],
    links: &[LinkRecord],
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = Vec::with_capacity(16 + records.len() * 84);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    for (k, hash, chunks) in records {
        for v in [k.dev, k.ino, k.size, k.mtime_ns as u64, k.ctime_ns as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(hash.as_bytes());
        out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        for c in chunks.iter() {
            out.extend_from_slice(c.id.as_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
        }
    }
    let links: Vec<_> = links
        .iter()
        .filter(|(_, t)| !t.is_empty() && t.len() <= MAX_TARGET)
        .collect();
    out.extend_from_slice(&(links.len() as u64).to_le_bytes());
    let section_len: usize = links.iter().map(|(_, t)| LINK_HEAD + t.len()).sum();
    out.extend_from_slice(&(section_len as u64).to_le_bytes());
    let start = out.len();
    let mut at = Vec::with_capacity(links.len());
    for (k, target) in &links {
        at.push((k.dev, k.ino, out.len()));
        for v in [k.dev, k.ino, k.size, k.mtime_ns as u64, k.ctime_ns as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(target.len() as u16).to_le_bytes());
        out.extend_from_slice(target);
    }
    debug_assert_eq!(out.len() - start, section_len);
    // The table: twice as many slots as links, a power of two; none if an
    // offset would not fit its u32 (the loader then builds a map).
    let slots = match out.len() < u32::MAX as usize {
        true if !at.is_empty() => (2 * at.len()).next_power_of_two(),
        _ => 0,
    };
    let mut table = vec![0u32; slots];
    if slots > 0 {
        let bits = slots.trailing_zeros();
        for (dev, ino, off) in at {
            let mut i = slot_of(dev, ino, bits);
            while table[i] != 0 {
                i = (i + 1) & (slots - 1);
            }
            table[i] = off as u32 + 1;
        }
    }
    out.extend_from_slice(&(slots as u64).to_le_bytes());
    for v in table {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let tmp = tmp_name(path);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&out)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// File records, and where the link records are.
type Decoded = (rustc_hash::FxHashMap<(u64, u64), Cached>, LinkIndex);

fn decode(bytes: &[u8]) -> Option<Decoded> {
    fn take<'b>(r: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
        if r.len() < n {
            return None;
        }
        let (a, b) = r.split_at(n);
        *r = b;
        Some(a)
    }
    let mut r = bytes;
    if take(&mut r, 4)? != MAGIC {
        return None;
    }
    let version = u16::from_le_bytes(take(&mut r, 2)?.try_into().ok()?);
    if !(1..=VERSION).contains(&version) {
        return None;
    }
    let n = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?) as usize;
    if n > MAX_RECORDS || n > bytes.len() / 76 {
        return None;
    }
    let mut map = rustc_hash::FxHashMap::default();
    map.reserve(n);
    for _ in 0..n {
        let mut v = [0u64; 5];
        for x in &mut v {
            *x = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        }
        let hash = FileHash(take(&mut r, 32)?.try_into().ok()?);
        let nchunks = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?) as usize;
        if nchunks > bytes.len() / 36 {
            return None;
        }
        let mut chunks = Vec::with_capacity(nchunks);
        for _ in 0..nchunks {
            let id = ChunkId(take(&mut r, 32)?.try_into().ok()?);
            let len = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?);
            if len == 0 || len as usize > CDC_MAX {
                return None;
            }
            chunks.push(ChunkRef { id, len });
        }
        map.insert(
            (v[0], v[1]),
            Cached {
                size: v[2],
                mtime_ns: v[3] as i64,
                ctime_ns: v[4] as i64,
                hash,
                chunks: chunks.into(),
            },
        );
    }
    if version >= 3 {
        let n = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?) as usize;
        let len = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?) as usize;
        if n > MAX_RECORDS || n.checked_mul(LINK_HEAD + 1)? > len || (n == 0) != (len == 0) {
            return None;
        }
        let start = bytes.len() - r.len();
        take(&mut r, len)?;
        let slots = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?) as usize;
        let table_start = bytes.len() - r.len();
        if !(slots == 0 || slots.is_power_of_two() && slots >= n)
            || r.len() != slots.checked_mul(4)?
        {
            return None;
        }
        if slots == 0 && n > 0 {
            // Too large a file for u32 offsets: find them by reading.
            let (m, end) = map_links(bytes, start, n)?;
            return (end == start + len).then_some((map, LinkIndex::Map(m)));
        }
        return Some((
            map,
            LinkIndex::Table {
                n,
                records: start..start + len,
                table: table_start..bytes.len(),
            },
        ));
    }
    let mut links = rustc_hash::FxHashMap::default();
    if version >= 2 {
        let n = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?) as usize;
        if n > MAX_RECORDS || n > bytes.len() / (LINK_HEAD + 1) {
            return None;
        }
        let start = bytes.len() - r.len();
        let end;
        (links, end) = map_links(bytes, start, n)?;
        take(&mut r, end - start)?;
    }
    r.is_empty().then_some((map, LinkIndex::Map(links)))
}

/// Where each link record starts, by (dev, inode).
type LinkMap = rustc_hash::FxHashMap<(u64, u64), usize>;

/// The offset of each of the `n` link records from `start` in `bytes`,
/// every one checked to fit, and where they end.
fn map_links(bytes: &[u8], start: usize, n: usize) -> Option<(LinkMap, usize)> {
    let mut m = rustc_hash::FxHashMap::default();
    m.reserve(n);
    let mut at = start;
    for _ in 0..n {
        let head = bytes.get(at..at.checked_add(LINK_HEAD)?)?;
        let len = u16::from_le_bytes([head[40], head[41]]) as usize;
        if len == 0 || len > MAX_TARGET || at + LINK_HEAD + len > bytes.len() {
            return None;
        }
        let dev = u64::from_le_bytes(head[..8].try_into().ok()?);
        let ino = u64::from_le_bytes(head[8..16].try_into().ok()?);
        m.insert((dev, ino), at);
        at += LINK_HEAD + len;
    }
    Some((m, at))
}

/// Where `sync-cli scan` keeps the cache of a tree by default:
/// `$XDG_CACHE_HOME/sync-engine/` (or `~/.cache/sync-engine/`), one file
/// per canonical tree path.
pub fn default_path(root: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let canon = std::fs::canonicalize(root).ok()?;
    let key = blake3::hash(canon.as_os_str().as_encoded_bytes());
    Some(
        base.join("sync-engine")
            .join(format!("{}.hcache", &key.to_hex()[..24])),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many symlinks: each is found through the table, none is invented.
    #[test]
    fn link_table_finds_every_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let links: Vec<LinkRecord> = (0..5000u64)
            .map(|i| {
                let t = format!("../../target/{i}").into_bytes();
                let k = StatKey {
                    dev: 7 + i % 3,
                    ino: i * 31,
                    size: t.len() as u64,
                    mtime_ns: i as i64,
                    ctime_ns: 1,
                };
                (k, t.into())
            })
            .collect();
        save(&path, &[], &links).unwrap();
        let c = HashCache::load(&path);
        assert_eq!(c.link_count(), links.len());
        for (k, t) in &links {
            assert_eq!(c.get_link(k), Some(&t[..]));
            assert_eq!(c.link_record(k.dev, k.ino).unwrap().1, *t);
            assert_eq!(c.get_link(&StatKey { mtime_ns: -1, ..*k }), None);
        }
        assert_eq!(c.link_record(99, 31), None);
        let mut all: Vec<_> = c.link_records().collect();
        all.sort_by_key(|(k, _)| k.ino);
        assert_eq!(all, links);
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let key = StatKey {
            dev: 1,
            ino: 2,
            size: 300_000,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        let chunks: Box<[ChunkRef]> = vec![ChunkRef {
            id: ChunkId([7; 32]),
            len: 300_000 - 100_000,
        }]
        .into();
        let link = StatKey {
            ino: 3,
            size: 9,
            ..key
        };
        let target: Box<[u8]> = b"../a/\xffb/c"[..].into();
        save(
            &path,
            &[(key, FileHash([9; 32]), chunks.clone())],
            &[(link, target.clone())],
        )
        .unwrap();
        let c = HashCache::load(&path);
        assert!(!c.old_format());
        assert_eq!(c.get(&key).unwrap().chunks, chunks);
        assert!(c.get(&StatKey { ctime_ns: 6, ..key }).is_none());
        assert_eq!(c.get_link(&link), Some(&target[..]));
        assert_eq!(
            c.get_link(&StatKey {
                ctime_ns: 6,
                ..link
            }),
            None
        );
        assert_eq!(c.get_link(&key), None, "a file is no link");
        assert_eq!(c.link_records().count(), 1);
        // Version 3: counts, the records (42 + 9 bytes), the table (2 slots).
        let v3 = std::fs::read(&path).unwrap();
        let links_at = v3.len() - (8 + 8 + 51 + 8 + 2 * 4);
        // A version 2 file (no section length, no table) still loads.
        let mut v2 = v3[..links_at + 8].to_vec();
        v2.extend_from_slice(&v3[links_at + 16..links_at + 16 + 51]);
        v2[4..6].copy_from_slice(&2u16.to_le_bytes());
        std::fs::write(&path, &v2).unwrap();
        let c = HashCache::load(&path);
        assert_eq!(c.get_link(&link), Some(&target[..]), "version 2");
        assert!(c.old_format(), "rewritten by the next save");
        // A version 1 file (no links) still loads.
        let mut v1 = v3[..links_at].to_vec();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        std::fs::write(&path, &v1).unwrap();
        let c = HashCache::load(&path);
        assert!(c.loaded() && c.get(&key).is_some() && c.link_count() == 0);
        // Table slots that lead anywhere else are misses, never a panic.
        for bad in [1u32, 2, 60, u32::MAX, (links_at + 16 + 2) as u32] {
            let mut b = v3.clone();
            let table = b.len() - 8;
            for slot in 0..2 {
                b[table + slot * 4..table + slot * 4 + 4].copy_from_slice(&bad.to_le_bytes());
            }
            std::fs::write(&path, &b).unwrap();
            let c = HashCache::load(&path);
            assert_eq!(c.get_link(&link), None, "offset {bad}");
            assert_eq!(c.get_link(&StatKey { ino: 77, ..link }), None);
        }
        save(
            &path,
            &[(key, FileHash([9; 32]), chunks.clone())],
            &[(link, target)],
        )
        .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, bytes).unwrap();
        assert!(HashCache::load(&path).is_empty());
    }
}
