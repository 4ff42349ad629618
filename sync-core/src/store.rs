//! Where the receiver finds chunk bytes: the durable staging area of chunks
//! that arrived for the next commit ([`Staging`]: one pack file plus an
//! index in the state directory, and hard links to the temporaries built
//! from chunks that are whole files) and the files of the committed tree
//! ([`TreeChunks`]: a chunk-location index derived from the committed
//! manifest). A chunk in either is never asked for again. Every read is
//! checked against the chunk id; a mismatch reads as "missing". Blocking IO.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chunk::{ChunkBytes, MAX_CHUNK};
use crate::crashpoint;
use crate::hash::ChunkId;
use crate::manifest::{Manifest, ManifestError};
use crate::safefs::Root;
use crate::session::ChunkLocator;

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {id} does not match its hash")]
    HashMismatch { id: ChunkId },
    #[error("chunk {id} of {len} bytes exceeds the {MAX_CHUNK}-byte limit")]
    TooLarge { id: ChunkId, len: usize },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Anything chunks can be read from.
pub trait ChunkSource: Sync {
    /// Whether `id` is (probably) here; [`ChunkSource::read`] has the
    /// final word because the bytes are checked when read.
    fn have(&self, id: &ChunkId) -> bool;
    /// The verified bytes of `id`, or `None` if absent or damaged
    /// (borrowed where the source holds them in memory).
    fn read(&self, id: &ChunkId) -> Option<Cow<'_, [u8]>>;
    /// [`ChunkSource::read`] as the pieces the source holds the bytes in
    /// (one, unless it keeps them as received: see [`ChunkBytes`]).
    fn read_parts(&self, id: &ChunkId) -> Option<Vec<Cow<'_, [u8]>>> {
        self.read(id).map(|d| vec![d])
    }
}

const INDEX_RECORD: usize = 48;
/// The `off` of an index record whose chunk is the file `linked/<id>`:
/// written by the previous version, skipped on open (the directory alone
/// tells which chunks are linked).
const LINKED: u64 = u64::MAX;
/// Where chunks that are a whole file are kept, as a hard link to the
/// temporary built from them (see [`Staging::put_linked`]).
const LINKED_DIR: &str = "linked";
/// What [`Staging::clear`] moves `linked` to, removed by [`Staging::purge`].
const LINKED_GONE: &str = "linked.gone";
/// Unsynced bytes buffered in memory before they are written to the pack.
const WRITE_BUFFER: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Offset in the pack, or [`LINKED`].
    off: u64,
    len: u32,
    /// Put by this process, after its hash was checked: it reads back
    /// from the page cache without a second check. Chunks found in the
    /// index on open (an earlier process wrote them, maybe before a power
    /// loss) are checked on every read.
    checked: bool,
}

fn record(id: &ChunkId, slot: Slot) -> [u8; INDEX_RECORD] {
    let mut r = [0u8; INDEX_RECORD];
    r[..32].copy_from_slice(id.as_bytes());
    r[32..40].copy_from_slice(&slot.off.to_le_bytes());
    r[40..44].copy_from_slice(&slot.len.to_le_bytes());
    let check = blake3::hash(&r[..44]);
    r[44..].copy_from_slice(&check.as_bytes()[..4]);
    r
}

fn parse_record(r: &[u8]) -> Option<(ChunkId, Slot)> {
    let check = blake3::hash(&r[..44]);
    if r[44..48] != check.as_bytes()[..4] {
        return None;
    }
    let id = ChunkId(r[..32].try_into().ok()?);
    let off = u64::from_le_bytes(r[32..40].try_into().ok()?);
    let len = u32::from_le_bytes(r[40..44].try_into().ok()?);
    Some((
        id,
        Slot {
            off,
            len,
            checked: false,
        },
    ))
}

/// The staging area: chunks appended to `pack`, located by fixed-size
/// checksummed records in `index`. An index record is written only after
/// the pack bytes it points at: [`Staging::sync`] fsyncs the pack first, so
/// after a power loss the index never points at lost data;
/// [`Staging::persist`] only hands both to the page cache, which survives a
/// crash of the process (the case resume is for) and leaves a power loss to
/// the filesystem's ordering (a record past the pack's end is cut off on
/// open, and a damaged chunk reads as missing: the receiver then drops its
/// staging and asks again). A torn tail is cut off on open. Chunks that are
/// a whole file may instead be hard links in `linked/` (see
/// [`Staging::put_linked`]), each named by its id: the directory is their
/// record.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    pack: File,
    index: File,
    slots: HashMap<ChunkId, Slot>,
    /// Bytes of the pack already written to the file.
    written: u64,
    /// Bytes appended after `written`, not yet written.
    buf: Vec<u8>,
    /// Index records of chunks not yet fsynced.
    pending: Vec<(ChunkId, Slot)>,
    /// Index bytes on disk (whole records).
    index_len: u64,
    /// Chunks were written out since the last fsync.
    unsynced: bool,
}

impl Staging {
    /// Open (creating) the staging area in `dir`, dropping a torn tail.
    pub fn open(dir: &Path) -> Result<Staging, StoreError> {
        let io = |op, p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError::Io {
                op,
                path: p,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let (pp, ip) = (dir.join("pack"), dir.join("index"));
        let opts = || {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create(true).truncate(false);
            o
        };
        let pack = opts().open(&pp).map_err(io("open", &pp))?;
        let mut index = opts().open(&ip).map_err(io("open", &ip))?;
        let pack_len = pack.metadata().map_err(io("stat", &pp))?.len();
        let mut raw = Vec::new();
        index.read_to_end(&mut raw).map_err(io("read", &ip))?;
        let linked = dir.join(LINKED_DIR);
        std::fs::create_dir_all(&linked).map_err(io("create", &linked))?;
        let mut slots = HashMap::new();
        let mut good = 0usize;
        let mut end = 0u64;
        for r in raw.chunks_exact(INDEX_RECORD) {
            let Some((id, slot)) = parse_record(r) else {
                break;
            };
            if slot.off == LINKED {
                // Found below by its name, if its file is still there.
                good += INDEX_RECORD;
                continue;
            }
            let slot_end = slot.off.saturating_add(slot.len as u64);
            if slot_end > pack_len || slot.len as usize > MAX_CHUNK {
                break;
            }
            slots.insert(id, slot);
            end = end.max(slot_end);
            good += INDEX_RECORD;
        }
        // Linked chunks: every file of `linked/` is one, named by its id
        // and checked when read.
        for e in std::fs::read_dir(&linked)
            .map_err(io("list", &linked))?
            .flatten()
        {
            let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ChunkId>().ok())
            else {
                continue;
            };
            let Ok(m) = e.metadata() else { continue };
            if m.is_file() && m.len() <= MAX_CHUNK as u64 {
                slots.entry(id).or_insert(Slot {
                    off: LINKED,
                    len: m.len() as u32,
                    checked: false,
                });
            }
        }
        if good != raw.len() {
            tracing::warn!(dropped = raw.len() - good, "staging index had a torn tail");
            index.set_len(good as u64).map_err(io("truncate", &ip))?;
            index.sync_all().map_err(io("fsync", &ip))?;
        }
        if end != pack_len {
            pack.set_len(end).map_err(io("truncate", &pp))?;
        }
        let st = Staging {
            dir: dir.to_path_buf(),
            pack,
            index,
            slots,
            written: end,
            buf: Vec::new(),
            pending: Vec::new(),
            index_len: good as u64,
            unsynced: false,
        };
        st.purge();
        Ok(st)
    }

    /// The directory chunks are linked into by [`Staging::put_linked`].
    pub fn linked_dir(&self) -> PathBuf {
        self.dir.join(LINKED_DIR)
    }

    /// The name in [`Staging::linked_dir`] of chunk `id`.
    pub fn linked_name(id: &ChunkId) -> String {
        id.to_hex()
    }

    /// Stage chunk `id` of `len` bytes (checked by the caller), which the
    /// caller has hard-linked as [`Staging::linked_name`] into
    /// [`Staging::linked_dir`] from the temporary it built from it: a chunk
    /// that is a whole file is then written to disk once, as that file,
    /// and staged all the same (a restarted receiver finds the link by its
    /// name and reads it back). A chunk already staged is a no-op.
    pub fn put_linked(&mut self, id: ChunkId, len: u32) -> Result<(), StoreError> {
        if len as usize > MAX_CHUNK {
            return Err(StoreError::TooLarge {
                id,
                len: len as usize,
            });
        }
        if self.slots.contains_key(&id) {
            return Ok(());
        }
        let slot = Slot {
            off: LINKED,
            len,
            checked: true,
        };
        self.slots.insert(id, slot);
        Ok(())
    }

    /// Remove the links a [`Staging::clear`] set aside (not needed to
    /// clear: the commit that cleared has their data in its temporaries).
    pub fn purge(&self) {
        let gone = self.dir.join(LINKED_GONE);
        if let Err(e) = std::fs::remove_dir_all(&gone) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %gone.display(), "cannot remove: {e}");
            }
        }
    }

    fn pack_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
        let path = self.dir.join("pack");
        move |source| StoreError::Io { op, path, source }
    }

    fn index_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
        let path = self.dir.join("index");
        move |source| StoreError::Io { op, path, source }
    }

    /// Verify and append one chunk; a chunk already staged is a no-op.
    pub fn put(&mut self, id: ChunkId, data: &[u8]) -> Result<(), StoreError> {
        if ChunkId::of(data) != id {
            return Err(StoreError::HashMismatch { id });
        }
        self.put_checked(id, data)
    }

    /// Append one chunk whose hash the caller has just checked (a sink
    /// session checks every chunk it receives): hashing it again would
    /// only cost time.
    pub fn put_checked(&mut self, id: ChunkId, data: &[u8]) -> Result<(), StoreError> {
        self.put_pieces(id, data.len(), std::iter::once(data))
    }

    /// [`Staging::put_checked`] of bytes held in pieces.
    pub fn put_checked_parts(&mut self, id: ChunkId, data: &ChunkBytes) -> Result<(), StoreError> {
        self.put_pieces(id, data.len(), data.parts())
    }

    fn put_pieces<'a>(
        &mut self,
        id: ChunkId,
        len: usize,
        pieces: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), StoreError> {
        if len > MAX_CHUNK {
            return Err(StoreError::TooLarge { id, len });
        }
        if self.slots.contains_key(&id) {
            return Ok(());
        }
        let slot = Slot {
            off: self.written + self.buf.len() as u64,
            len: len as u32,
            checked: true,
        };
        pieces.for_each(|p| self.buf.extend_from_slice(p));
        self.slots.insert(id, slot);
        self.pending.push((id, slot));
        if self.buf.len() >= WRITE_BUFFER {
            // The index follows the pack at once: a process killed between
            // two batches' ends loses at most this write's chunks.
            self.write_out(false)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        crashpoint::check_write().map_err(self.pack_err("write"))?;
        crate::safefs::write_all_at(&self.pack, &self.buf, self.written)
            .map_err(self.pack_err("write"))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Make every staged chunk durable: fsync the pack, then append and
    /// fsync the index records that point at it.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.write_out(true)
    }

    /// Hand every staged chunk and its index record to the kernel, without
    /// waiting for the disk: they survive the process, not a power loss.
    pub fn persist(&mut self) -> Result<(), StoreError> {
        self.write_out(false)
    }

    /// Write the buffered chunks, then the index records pointing at them
    /// (each fsynced first when `durable`).
    fn write_out(&mut self, durable: bool) -> Result<(), StoreError> {
        if self.pending.is_empty() && !(durable && self.unsynced) {
            return Ok(());
        }
        self.flush()?;
        if durable {
            self.pack.sync_data().map_err(self.pack_err("fsync"))?;
            crashpoint::hit("staging-pack-synced");
        }
        let mut out = Vec::with_capacity(self.pending.len() * INDEX_RECORD);
        for (id, slot) in &self.pending {
            out.extend_from_slice(&record(id, *slot));
        }
        crashpoint::check_write().map_err(self.index_err("write"))?;
        self.index
            .write_all_at(&out, self.index_len)
            .map_err(self.index_err("write"))?;
        if durable {
            self.index.sync_data().map_err(self.index_err("fsync"))?;
        }
        self.index_len += out.len() as u64;
        self.pending.clear();
        self.unsynced = !durable;
        if durable {
            crashpoint::hit("staging-index-synced");
        }
        Ok(())
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.slots.contains_key(id)
    }

    /// Number of staged chunks.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The verified bytes of a staged chunk.
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let slot = *self.slots.get(id)?;
        if slot.off == LINKED {
            let f = self.linked_dir().join(Self::linked_name(id));
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(f)
                .ok()?;
            let mut data = Vec::with_capacity(slot.len as usize);
            file.take(slot.len as u64 + 1).read_to_end(&mut data).ok()?;
            return (data.len() == slot.len as usize
                && (slot.checked || ChunkId::of(&data) == *id))
                .then_some(data);
        }
        let mut data = vec![0u8; slot.len as usize];
        if slot.off >= self.written {
            let start = (slot.off - self.written) as usize;
            data.copy_from_slice(self.buf.get(start..start + slot.len as usize)?);
        } else {
            self.pack.read_exact_at(&mut data, slot.off).ok()?;
        }
        (slot.checked || ChunkId::of(&data) == *id).then_some(data)
    }

    /// Drop every staged chunk (after a successful commit).
    pub fn clear(&mut self) -> Result<(), StoreError> {
        if self.index_len == 0 && self.written == 0 && self.slots.is_empty() {
            return Ok(());
        }
        // Not synced: an index that comes back longer after a power loss
        // points past the pack's end (cut off on open) or at chunks still
        // whole, and read back they are checked.
        self.index.set_len(0).map_err(self.index_err("truncate"))?;
        self.pack.set_len(0).map_err(self.pack_err("truncate"))?;
        let linked_dir = self.linked_dir();
        if std::fs::read_dir(&linked_dir).is_ok_and(|mut d| d.next().is_some()) {
            // One rename now; the links go in `purge`, after the commit.
            let (linked, gone) = (linked_dir, self.dir.join(LINKED_GONE));
            self.purge();
            std::fs::rename(&linked, &gone).map_err(|source| StoreError::Io {
                op: "rename",
                path: linked.clone(),
                source,
            })?;
            std::fs::create_dir(&linked).map_err(|source| StoreError::Io {
                op: "create",
                path: linked,
                source,
            })?;
        }
        self.slots.clear();
        self.pending.clear();
        self.buf.clear();
        self.written = 0;
        self.index_len = 0;
        self.unsynced = false;
        Ok(())
    }
}

impl ChunkSource for Staging {
    fn have(&self, id: &ChunkId) -> bool {
        self.contains(id)
    }
    fn read(&self, id: &ChunkId) -> Option<Cow<'_, [u8]>> {
        self.get(id).map(Cow::Owned)
    }
}

/// Where each chunk of a manifest lives in the tree that the manifest
/// describes: (path, offset, length), first file in canonical order wins.
pub struct TreeChunks {
    root: Arc<Root>,
    index: ChunkLocator,
}

impl TreeChunks {
    /// Index every chunk of the regular files of `manifest`, in `root`.
    pub fn build(root: Arc<Root>, manifest: &Manifest) -> Result<TreeChunks, ManifestError> {
        let index = ChunkLocator::build(manifest)?;
        Ok(TreeChunks { root, index })
    }

    /// An index built earlier (e.g. kept across sessions) over `root`.
    pub fn from_index(root: Arc<Root>, index: ChunkLocator) -> TreeChunks {
        TreeChunks { root, index }
    }

    pub fn index(&self) -> &ChunkLocator {
        &self.index
    }

    pub fn into_index(self) -> ChunkLocator {
        self.index
    }

    /// Follow the tree from `old` to `new` (see [`ChunkLocator::update`]).
    pub fn update(&mut self, old: &Manifest, new: &Manifest) -> Result<(), ManifestError> {
        self.index.update(old, new)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.index.get(id).is_some()
    }

    /// Path, offset and length of a chunk.
    pub fn locate(&self, id: &ChunkId) -> Option<(&[u8], u64, u32)> {
        let l = self.index.get(id)?;
        Some((&l.path, l.offset, l.len))
    }
}

impl ChunkSource for TreeChunks {
    fn have(&self, id: &ChunkId) -> bool {
        self.contains(id)
    }
    fn read(&self, id: &ChunkId) -> Option<Cow<'_, [u8]>> {
        let (path, off, len) = self.locate(id)?;
        let file = self.root.open_file(path).ok()?;
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, off).ok()?;
        if ChunkId::of(&data) == *id {
            Some(Cow::Owned(data))
        } else {
            tracing::debug!(chunk = %id.short(), path = %crate::manifest::lossy(path),
                "tree file changed behind our back; chunk treated as missing");
            None
        }
    }
}

/// Several sources, asked in order.
pub struct Sources<'a>(pub Vec<&'a dyn ChunkSource>);

impl ChunkSource for Sources<'_> {
    fn have(&self, id: &ChunkId) -> bool {
        self.0.iter().any(|s| s.have(id))
    }
    fn read(&self, id: &ChunkId) -> Option<Cow<'_, [u8]>> {
        self.0
            .iter()
            .find_map(|s| if s.have(id) { s.read(id) } else { None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A chunk that is a whole file is staged as a link to that file: it
    /// survives a restart (read back and checked), a lost or damaged link
    /// reads as missing, and clearing sets the links aside for `purge`.
    #[test]
    fn linked_chunks_survive_reopen_and_are_purged_after_clear() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vec![3u8; 70_000], vec![4u8; 80_000]);
        let (ia, ib) = (ChunkId::of(&a), ChunkId::of(&b));
        let elsewhere = dir.path().join("built");
        {
            let mut s = Staging::open(dir.path()).unwrap();
            for (id, data) in [(ia, &a), (ib, &b)] {
                let f = elsewhere.with_extension(id.to_hex());
                std::fs::write(&f, data).unwrap();
                std::fs::hard_link(&f, s.linked_dir().join(Staging::linked_name(&id))).unwrap();
                s.put_linked(id, data.len() as u32).unwrap();
            }
            assert_eq!(s.get(&ia).unwrap(), a);
            s.put(ChunkId::of(b"small"), b"small").unwrap();
            s.persist().unwrap();
        }
        // One link damaged behind our back: read as missing, not as data.
        std::fs::write(s_path(dir.path(), &ib), vec![5u8; 80_000]).unwrap();
        let s = Staging::open(dir.path()).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.get(&ia).unwrap(), a, "checked on read after reopen");
        assert!(s.get(&ib).is_none());
        // A link whose record was never written is kept (checked on read).
        let c = vec![6u8; 90_000];
        std::fs::write(s_path(dir.path(), &ChunkId::of(&c)), &c).unwrap();
        drop(s);
        let s = Staging::open(dir.path()).unwrap();
        assert_eq!(s.get(&ChunkId::of(&c)).unwrap(), c);
        // A link record of the previous version is skipped: the directory
        // alone tells what is linked (no torn tail either).
        let gone = ChunkId::of(b"gone");
        let rec = |id| {
            record(
                &id,
                Slot {
                    off: LINKED,
                    len: 4,
                    checked: false,
                },
            )
        };
        let mut idx = OpenOptions::new()
            .append(true)
            .open(dir.path().join("index"))
            .unwrap();
        idx.write_all(&rec(gone)).unwrap();
        idx.write_all(&rec(ia)).unwrap();
        drop((idx, s));
        let s = Staging::open(dir.path()).unwrap();
        assert!(!s.contains(&gone));
        assert_eq!(s.get(&ia).unwrap(), a);
        assert!(s.contains(&ChunkId::of(b"small")));
        // A lost link drops its record on open.
        std::fs::remove_file(s_path(dir.path(), &ia)).unwrap();
        drop(s);
        let mut s = Staging::open(dir.path()).unwrap();
        assert!(!s.contains(&ia));
        assert!(s.contains(&ChunkId::of(b"small")));
        s.clear().unwrap();
        assert!(s.is_empty());
        assert!(dir.path().join(LINKED_GONE).exists(), "set aside by clear");
        assert_eq!(std::fs::read_dir(s.linked_dir()).unwrap().count(), 0);
        s.purge();
        assert!(!dir.path().join(LINKED_GONE).exists());
        // The built files themselves are untouched.
        assert_eq!(
            std::fs::read(elsewhere.with_extension(ia.to_hex())).unwrap(),
            a
        );
    }

    fn s_path(dir: &Path, id: &ChunkId) -> PathBuf {
        dir.join(LINKED_DIR).join(Staging::linked_name(id))
    }

    #[test]
    fn staging_survives_reopen_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let a = b"alpha".to_vec();
        let b = vec![7u8; 100_000];
        {
            let mut s = Staging::open(dir.path()).unwrap();
            s.put(ChunkId::of(&a), &a).unwrap();
            s.put(ChunkId::of(&b), &b).unwrap();
            assert_eq!(s.get(&ChunkId::of(&a)).unwrap(), a, "readable before sync");
            assert!(matches!(
                s.put(ChunkId::of(b"x"), b"y"),
                Err(StoreError::HashMismatch { .. })
            ));
            let big = vec![1u8; MAX_CHUNK + 1];
            assert!(matches!(
                s.put(ChunkId::of(&big), &big),
                Err(StoreError::TooLarge { .. })
            ));
            s.sync().unwrap();
            // Unsynced: must not survive as an index entry.
            s.put(ChunkId::of(b"lost"), b"lost").unwrap();
            s.flush().unwrap();
        }
        // A torn index tail.
        let mut idx = OpenOptions::new()
            .append(true)
            .open(dir.path().join("index"))
            .unwrap();
        idx.write_all(&[9u8; 20]).unwrap();
        drop(idx);
        let mut s = Staging::open(dir.path()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(&ChunkId::of(&b)).unwrap(), b);
        assert!(!s.contains(&ChunkId::of(b"lost")));
        assert_eq!(
            std::fs::metadata(dir.path().join("index")).unwrap().len(),
            2 * INDEX_RECORD as u64
        );
        s.put(ChunkId::of(b"more"), b"more").unwrap();
        s.sync().unwrap();
        assert_eq!(Staging::open(dir.path()).unwrap().len(), 3);
        s.clear().unwrap();
        assert!(Staging::open(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_pack_reads_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::open(dir.path()).unwrap();
        s.put(ChunkId::of(b"hello"), b"hello").unwrap();
        s.sync().unwrap();
        drop(s);
        // Written by an earlier process: checked when read.
        std::fs::write(dir.path().join("pack"), b"jello").unwrap();
        let s = Staging::open(dir.path()).unwrap();
        assert!(s.contains(&ChunkId::of(b"hello")));
        assert!(s.get(&ChunkId::of(b"hello")).is_none());
    }
}
