//! The Merkle manifest: one content-addressed tree object per directory.
//!
//! A [`Tree`] holds the entries of one directory sorted by raw name bytes;
//! its canonical encoding (magic, format version, bincode 2) is hashed into
//! its [`TreeId`], and the root tree id is the [`SnapshotId`]. A
//! [`Manifest`] is a root plus the encoded tree objects it reaches. Every
//! decoder here treats its input as hostile: sizes are bounded and every
//! name, target and chunk list is validated. No IO.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkRef, CDC_MAX, SINGLE_CHUNK_MAX};
use crate::hash::{ChunkId, FileHash, SnapshotId, TreeId};

/// Magic and format version at the start of every encoded tree object.
pub const TREE_MAGIC: [u8; 4] = *b"SYTR";
pub const TREE_VERSION: u16 = 1;
/// Magic and format version of a whole stored manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"SYMF";
pub const MANIFEST_VERSION: u16 = 1;

/// Limits on what a decoder accepts.
pub const MAX_NAME: usize = 255;
pub const MAX_TARGET: usize = 4095;
pub const MAX_TREE_BYTES: usize = 256 << 20;
pub const MAX_ENTRIES_PER_TREE: usize = 4 << 20;
pub const MAX_TREES: usize = 64 << 20;
pub const MAX_DEPTH: usize = 1024;
/// Largest file the engine accepts (a chunk list is bounded by it).
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// Why a tree object or manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("tree object is not in our format (bad magic)")]
    BadMagic,
    #[error("tree object format version {0} is not supported (want {TREE_VERSION})")]
    BadVersion(u16),
    #[error("tree object of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("tree object does not decode: {0}")]
    Decode(String),
    #[error("invalid name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("entries of a tree are not strictly sorted by name at {0:?}")]
    Unsorted(String),
    #[error("entry {name:?}: {why}")]
    BadEntry { name: String, why: &'static str },
    #[error("tree {0} is missing from the manifest")]
    MissingTree(TreeId),
    #[error("tree {0} does not match its hash")]
    HashMismatch(TreeId),
    #[error("path {0:?} does not exist in the manifest")]
    NoSuchPath(String),
    #[error("path {0:?} crosses a non-directory")]
    NotADirectory(String),
    #[error("manifest nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    pub uid: u32,
    pub gid: u32,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File {
        size: u64,
        hash: FileHash,
        /// Empty when the file is a single chunk named by `hash`.
        chunks: Vec<ChunkRef>,
    },
    Dir {
        tree: TreeId,
    },
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// Another name for the file at `path` (relative to the root), which
    /// comes first in canonical order. Size and hash are repeated so that a
    /// content change of the file changes this entry's tree too.
    HardLink {
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        size: u64,
        hash: FileHash,
    },
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir { .. })
    }
    pub fn subtree(&self) -> Option<TreeId> {
        match self.kind {
            Kind::Dir { tree } => Some(tree),
            _ => None,
        }
    }
    /// Same kind and metadata, ignoring the content of a directory.
    pub fn same_meta(&self, other: &Entry) -> bool {
        self.mode == other.mode
            && self.mtime_ns == other.mtime_ns
            && self.uid == other.uid
            && self.gid == other.gid
    }
}

/// The entries of one directory, sorted by name bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: Vec<Entry>,
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_TREE_BYTES>()
}

impl Tree {
    /// Sort entries into canonical order. Names must be unique.
    pub fn sort(&mut self) {
        self.entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    }

    /// Canonical encoding: magic, version, bincode of the entries.
    ///
    /// Written by hand, byte for byte what bincode's standard config makes
    /// of `entries` through serde (varint integers, zigzag for signed ones,
    /// u32 variant indexes, length-prefixed byte strings, hashes as 32 raw
    /// bytes): this runs for every directory of every scan and for every
    /// decode's canonical check. A test compares both encodings.
    pub fn encode(&self) -> Vec<u8> {
        fn uint(out: &mut Vec<u8>, v: u64) {
            if v <= 250 {
                out.push(v as u8);
            } else if v <= u16::MAX as u64 {
                out.push(251);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            } else if v <= u32::MAX as u64 {
                out.push(252);
                out.extend_from_slice(&(v as u32).to_le_bytes());
            } else {
                out.push(253);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            uint(out, b.len() as u64);
            out.extend_from_slice(b);
        }
        let size: usize = self
            .entries
            .iter()
            .map(|e| {
                48 + e.name.len()
                    + match &e.kind {
                        Kind::File { chunks, .. } => 48 + chunks.len() * 40,
                        Kind::Dir { .. } => 33,
                        Kind::Symlink { target } => 4 + target.len(),
                        Kind::HardLink { path, .. } => 52 + path.len(),
                    }
            })
            .sum();
        let mut out = Vec::with_capacity(16 + size);
        out.extend_from_slice(&TREE_MAGIC);
        out.extend_from_slice(&TREE_VERSION.to_le_bytes());
        uint(&mut out, self.entries.len() as u64);
        for e in &self.entries {
            bytes(&mut out, &e.name);
            uint(&mut out, e.mode as u64);
            let t = e.mtime_ns;
            uint(
                &mut out,
                if t < 0 {
                    !(t as u64) * 2 + 1
                } else {
                    (t as u64) * 2
                },
            );
            uint(&mut out, e.uid as u64);
            uint(&mut out, e.gid as u64);
            match &e.kind {
                Kind::File { size, hash, chunks } => {
                    uint(&mut out, 0);
                    uint(&mut out, *size);
                    out.extend_from_slice(&hash.0);
                    uint(&mut out, chunks.len() as u64);
                    for c in chunks {
                        out.extend_from_slice(&c.id.0);
                        uint(&mut out, c.len as u64);
                    }
                }
                Kind::Dir { tree } => {
                    uint(&mut out, 1);
                    out.extend_from_slice(&tree.0);
                }
                Kind::Symlink { target } => {
                    uint(&mut out, 2);
                    bytes(&mut out, target);
                }
                Kind::HardLink { path, size, hash } => {
                    uint(&mut out, 3);
                    bytes(&mut out, path);
                    uint(&mut out, *size);
                    out.extend_from_slice(&hash.0);
                }
            }
        }
        out
    }

    pub fn id(&self) -> TreeId {
        TreeId::of(&self.encode())
    }

    /// Decode and validate untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Tree, ManifestError> {
        if bytes.len() > MAX_TREE_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        if bytes.len() < 6 || bytes[..4] != TREE_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != TREE_VERSION {
            return Err(ManifestError::BadVersion(version));
        }
        let (entries, used): (Vec<Entry>, usize) =
            bincode::serde::decode_from_slice(&bytes[6..], codec())
                .map_err(|e| ManifestError::Decode(e.to_string()))?;
        if used != bytes.len() - 6 {
            return Err(ManifestError::Decode("trailing bytes".into()));
        }
        let tree = Tree { entries };
        tree.validate()?;
        // bincode accepts over-long varints; one tree must have one id.
        if tree.encode() != bytes {
            return Err(ManifestError::Decode("non-canonical encoding".into()));
        }
        Ok(tree)
    }

    /// Check every rule a peer's tree object must follow.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.entries.len() > MAX_ENTRIES_PER_TREE {
            return Err(ManifestError::TooLarge(self.entries.len()));
        }
        for (i, e) in self.entries.iter().enumerate() {
            validate_name(&e.name)?;
            if i > 0 && self.entries[i - 1].name >= e.name {
                return Err(ManifestError::Unsorted(lossy(&e.name)));
            }
            validate_entry(e)?;
        }
        Ok(())
    }

    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.position(name).ok().map(|i| &self.entries[i])
    }

    fn position(&self, name: &[u8]) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
    }

    /// Insert or replace (`Some`) or remove (`None`) the entry `name`.
    pub fn set(&mut self, name: &[u8], entry: Option<Entry>) {
        match (self.position(name), entry) {
            (Ok(i), Some(e)) => self.entries[i] = e,
            (Ok(i), None) => {
                self.entries.remove(i);
            }
            (Err(i), Some(e)) => self.entries.insert(i, e),
            (Err(_), None) => {}
        }
    }
}

/// A single path component from an untrusted source.
pub fn validate_name(name: &[u8]) -> Result<(), ManifestError> {
    let why = if name.is_empty() {
        "empty name"
    } else if name == b"." || name == b".." {
        "dot or dot-dot"
    } else if name.contains(&b'/') {
        "contains '/'"
    } else if name.contains(&0) {
        "contains NUL"
    } else if name.len() > MAX_NAME {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(ManifestError::BadName {
        name: lossy(name),
        why,
    })
}

/// A relative path of valid components joined by '/'.
pub fn validate_rel_path(path: &[u8]) -> Result<(), ManifestError> {
    if path.is_empty() || path.len() > MAX_TARGET {
        return Err(ManifestError::BadName {
            name: lossy(path),
            why: "empty or overlong path",
        });
    }
    path.split(|&b| b == b'/').try_for_each(validate_name)
}

fn validate_entry(e: &Entry) -> Result<(), ManifestError> {
    let bad = |why| {
        Err(ManifestError::BadEntry {
            name: lossy(&e.name),
            why,
        })
    };
    if e.mode & !0o7777 != 0 {
        return bad("mode has bits beyond 0o7777");
    }
    match &e.kind {
        Kind::File { size, chunks, .. } => {
            if *size > MAX_FILE_SIZE {
                return bad("file size beyond the limit");
            }
            if *size <= SINGLE_CHUNK_MAX {
                if !chunks.is_empty() {
                    return bad("small file with a chunk list");
                }
            } else {
                let mut total = 0u64;
                for c in chunks {
                    if c.len == 0 || c.len as usize > CDC_MAX {
                        return bad("chunk length out of range");
                    }
                    total += c.len as u64;
                }
                if total != *size {
                    return bad("chunk lengths do not add up to the size");
                }
            }
        }
        Kind::Dir { .. } => {}
        Kind::Symlink { target } => {
            if target.is_empty() || target.len() > MAX_TARGET || target.contains(&0) {
                return bad("symlink target empty, overlong or with NUL");
            }
        }
        Kind::HardLink { path, size, .. } => {
            validate_rel_path(path)?;
            if *size > MAX_FILE_SIZE {
                return bad("file size beyond the limit");
            }
        }
    }
    Ok(())
}

/// Show raw name bytes for humans (invalid UTF-8 replaced).
pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Join a parent path and a name with '/'.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Counts over a snapshot (the root directory itself is not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of regular files, each inode once.
    pub bytes: u64,
    /// Distinct chunks.
    pub chunks: u64,
}

/// A snapshot: a root tree and the encoded tree objects it reaches.
///
/// Tree objects are held zstd-compressed: symlink farms are repetitive, and
/// a manifest of a million entries must fit in well under 200 bytes each.
#[derive(Clone, Debug)]
pub struct Manifest {
    root: TreeId,
    trees: HashMap<TreeId, Arc<[u8]>>,
}

impl Default for Manifest {
    fn default() -> Self {
        Self::empty()
    }
}

impl Manifest {
    /// The manifest of an empty directory.
    pub fn empty() -> Manifest {
        let mut m = Manifest {
            root: TreeId([0; 32]),
            trees: HashMap::new(),
        };
        m.root = m.insert(&Tree::default());
        m
    }

    /// Build from a root and tree objects; checks the root is present.
    pub fn from_parts(
        root: TreeId,
        trees: HashMap<TreeId, Arc<[u8]>>,
    ) -> Result<Self, ManifestError> {
        if !trees.contains_key(&root) {
            return Err(ManifestError::MissingTree(root));
        }
        Ok(Manifest { root, trees })
    }

    pub fn root(&self) -> TreeId {
        self.root
    }

    pub fn snapshot(&self) -> SnapshotId {
        self.root.into()
    }

    pub fn tree_count(&self) -> usize {
        self.trees.len()
    }

    /// Bytes of all tree objects held (compressed, as kept in memory).
    pub fn held_bytes(&self) -> usize {
        self.trees.values().map(|t| t.len()).sum()
    }

    pub fn contains_tree(&self, id: &TreeId) -> bool {
        self.trees.contains_key(id)
    }

    /// The encoded bytes of one tree object.
    pub fn raw(&self, id: &TreeId) -> Option<Vec<u8>> {
        self.trees.get(id).and_then(|p| unpack(p).ok())
    }

    /// The length of a tree object's encoding ([`Manifest::raw`]'s), read
    /// from how it is held, without decompressing it.
    pub fn raw_len(&self, id: &TreeId) -> Option<usize> {
        Some(held_form(self.trees.get(id)?)?.0)
    }

    /// Decode a tree object of this manifest.
    pub fn tree(&self, id: &TreeId) -> Result<Tree, ManifestError> {
        Tree::decode(&unpack(
            self.trees.get(id).ok_or(ManifestError::MissingTree(*id))?,
        )?)
    }

    pub fn root_tree(&self) -> Result<Tree, ManifestError> {
        self.tree(&self.root)
    }

    /// Store a tree object and return its id.
    pub fn insert(&mut self, tree: &Tree) -> TreeId {
        let bytes = tree.encode();
        let id = TreeId::of(&bytes);
        self.trees.entry(id).or_insert_with(|| pack(&bytes));
        id
    }

    /// Store encoded bytes received from a peer after checking them.
    pub fn insert_raw(&mut self, expect: TreeId, bytes: &[u8]) -> Result<Tree, ManifestError> {
        Ok(self.insert_checked(Manifest::check_raw(expect, bytes)?))
    }

    /// Check encoded bytes received from a peer against `expect`, decode
    /// and compress them for [`Manifest::insert_checked`]: without the
    /// manifest, so that a batch of them can be checked on several threads.
    pub fn check_raw(expect: TreeId, bytes: &[u8]) -> Result<CheckedTree, ManifestError> {
        if TreeId::of(bytes) != expect {
            return Err(ManifestError::HashMismatch(expect));
        }
        let tree = Tree::decode(bytes)?;
        Ok(CheckedTree {
            id: expect,
            tree,
            held: pack(bytes),
        })
    }

    /// Store a tree object [`Manifest::check_raw`] checked; its decoded
    /// form is handed back.
    pub fn insert_checked(&mut self, t: CheckedTree) -> Tree {
        self.trees.entry(t.id).or_insert(t.held);
        t.tree
    }

    /// Store a tree object in its packed form (as [`Manifest::packed`]
    /// hands it out), after checking it unpacks to bytes of hash `id`.
    pub fn insert_packed(&mut self, id: TreeId, packed: Arc<[u8]>) -> Result<(), ManifestError> {
        if TreeId::of(&unpack(&packed)?) != id {
            return Err(ManifestError::HashMismatch(id));
        }
        self.trees.entry(id).or_insert(packed);
        Ok(())
    }

    /// Point the manifest at a new root (which must be stored).
    pub fn set_root(&mut self, root: TreeId) -> Result<(), ManifestError> {
        if !self.trees.contains_key(&root) {
            return Err(ManifestError::MissingTree(root));
        }
        self.root = root;
        Ok(())
    }

    /// Copy a tree and everything below it from `other`.
    pub fn import(&mut self, other: &Manifest, id: TreeId) -> Result<(), ManifestError> {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            if self.trees.contains_key(&id) {
                continue;
            }
            let packed = other.trees.get(&id).ok_or(ManifestError::MissingTree(id))?;
            let tree = Tree::decode(&unpack(packed)?)?;
            self.trees.insert(id, packed.clone());
            stack.extend(tree.entries.iter().filter_map(Entry::subtree));
        }
        Ok(())
    }

    /// The entry at a relative path ('/'-separated); `None` if absent.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<Entry>, ManifestError> {
        let mut tree = self.root_tree()?;
        let mut comps = path.split(|&b| b == b'/').peekable();
        while let Some(name) = comps.next() {
            let Some(entry) = tree.get(name) else {
                return Ok(None);
            };
            if comps.peek().is_none() {
                return Ok(Some(entry.clone()));
            }
            match entry.kind {
                Kind::Dir { tree: t } => tree = self.tree(&t)?,
                _ => return Err(ManifestError::NotADirectory(lossy(path))),
            }
        }
        Ok(None)
    }

    /// Set (`Some`) or remove (`None`) the entry at `path`, re-encoding only
    /// the trees on the path to the root. Missing parents are an error.
    pub fn set_entry(&mut self, path: &[u8], entry: Option<Entry>) -> Result<(), ManifestError> {
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        let root = self.root;
        self.root = self.set_in(root, &comps, entry, path)?;
        Ok(())
    }

    fn set_in(
        &mut self,
        at: TreeId,
        comps: &[&[u8]],
        entry: Option<Entry>,
        path: &[u8],
    ) -> Result<TreeId, ManifestError> {
        let mut tree = self.tree(&at)?;
        let (name, rest) = comps.split_first().expect("paths have a component");
        if rest.is_empty() {
            if let Some(e) = &entry {
                debug_assert_eq!(e.name.as_slice(), *name);
            }
            tree.set(name, entry);
        } else {
            let mut child = tree
                .get(name)
                .cloned()
                .ok_or_else(|| ManifestError::NoSuchPath(lossy(path)))?;
            let Kind::Dir { tree: sub } = child.kind else {
                return Err(ManifestError::NotADirectory(lossy(path)));
            };
            child.kind = Kind::Dir {
                tree: self.set_in(sub, rest, entry, path)?,
            };
            tree.set(name, Some(child));
        }
        Ok(self.insert(&tree))
    }

    /// The held tree objects, for merging into another manifest's parts.
    /// Every tree object held, packed (shared, not copied).
    pub fn packed(&self) -> &HashMap<TreeId, Arc<[u8]>> {
        &self.trees
    }

    pub fn into_packed(self) -> impl Iterator<Item = (TreeId, Arc<[u8]>)> {
        self.trees.into_iter()
    }

    /// Drop tree objects the root no longer reaches.
    pub fn gc(&mut self) {
        let mut keep = HashMap::with_capacity(self.trees.len());
        let mut stack = vec![self.root];
        while let Some(id) = stack.pop() {
            if keep.contains_key(&id) {
                continue;
            }
            if let Some(bytes) = self.trees.get(&id) {
                if let Ok(tree) = unpack(bytes).and_then(|b| Tree::decode(&b)) {
                    stack.extend(tree.entries.iter().filter_map(Entry::subtree));
                }
                keep.insert(id, bytes.clone());
            }
        }
        self.trees = keep;
    }

    /// Visit every entry in canonical (depth-first, name-sorted) order with
    /// its relative path. The visitor returns `false` to skip a directory's
    /// children.
    pub fn walk(&self, mut visit: impl FnMut(&[u8], &Entry) -> bool) -> Result<(), ManifestError> {
        self.walk_from(self.root, Vec::new(), &mut visit, 0)
    }

    /// Like [`Manifest::walk`] over the subtree `id` found at `prefix`.
    pub fn walk_tree(
        &self,
        id: TreeId,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &Entry) -> bool,
    ) -> Result<(), ManifestError> {
        self.walk_from(id, prefix.to_vec(), &mut visit, 0)
    }

    fn walk_from(
        &self,
        id: TreeId,
        prefix: Vec<u8>,
        visit: &mut impl FnMut(&[u8], &Entry) -> bool,
        depth: usize,
    ) -> Result<(), ManifestError> {
        if depth > MAX_DEPTH {
            return Err(ManifestError::TooDeep);
        }
        let tree = self.tree(&id)?;
        for e in &tree.entries {
            let path = join(&prefix, &e.name);
            if visit(&path, e) {
                if let Kind::Dir { tree } = e.kind {
                    self.walk_from(tree, path, visit, depth + 1)?;
                }
            }
        }
        Ok(())
    }

    /// Count entries, bytes and distinct chunks.
    pub fn stats(&self) -> Result<Stats, ManifestError> {
        let mut s = Stats::default();
        let mut chunks = std::collections::HashSet::new();
        self.walk(|_, e| {
            match &e.kind {
                Kind::File {
                    size,
                    hash,
                    chunks: c,
                } => {
                    s.files += 1;
                    s.bytes += size;
                    if c.is_empty() {
                        if *size > 0 {
                            chunks.insert(ChunkId::from(*hash));
                        }
                    } else {
                        chunks.extend(c.iter().map(|c| c.id));
                    }
                }
                Kind::Dir { .. } => s.dirs += 1,
                Kind::Symlink { .. } => s.symlinks += 1,
                Kind::HardLink { .. } => s.hardlinks += 1,
            }
            true
        })?;
        s.chunks = chunks.len() as u64;
        Ok(s)
    }

    /// Encode the reachable trees into one blob (for the state directory).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(self.root.as_bytes());
        let mut ids: Vec<&TreeId> = self.trees.keys().collect();
        ids.sort_unstable();
        out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        for id in ids {
            let bytes = unpack(&self.trees[id]).expect("held trees were packed by us");
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        out
    }

    /// The root named by the first 38 bytes of a stored manifest.
    pub fn header_root(head: &[u8]) -> Option<TreeId> {
        let version = u16::from_le_bytes(head.get(4..6)?.try_into().ok()?);
        (head.get(..4)? == MANIFEST_MAGIC && version == MANIFEST_VERSION)
            .then(|| Some(TreeId(head.get(6..38)?.try_into().ok()?)))
            .flatten()
    }

    /// Decode a stored manifest, checking every tree against its id.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let mut r = Reader(bytes);
        if r.take(4)? != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u16::from_le_bytes(r.take(2)?.try_into().unwrap());
        if version != MANIFEST_VERSION {
            return Err(ManifestError::BadVersion(version));
        }
        let root = TreeId(r.take(32)?.try_into().unwrap());
        let count = u64::from_le_bytes(r.take(8)?.try_into().unwrap()) as usize;
        if count > MAX_TREES || count > bytes.len() / 10 {
            return Err(ManifestError::TooLarge(count));
        }
        let mut trees = HashMap::with_capacity(count);
        for _ in 0..count {
            let len = u32::from_le_bytes(r.take(4)?.try_into().unwrap()) as usize;
            if len > MAX_TREE_BYTES {
                return Err(ManifestError::TooLarge(len));
            }
            let raw = r.take(len)?;
            Tree::decode(raw)?;
            trees.insert(TreeId::of(raw), pack(raw));
        }
        if !r.0.is_empty() {
            return Err(ManifestError::Decode("trailing bytes".into()));
        }
        Manifest::from_parts(root, trees)
    }
}

/// A tree object from a peer that [`Manifest::check_raw`] checked against
/// its id and decoded, ready to be stored.
#[derive(Debug)]
pub struct CheckedTree {
    id: TreeId,
    tree: Tree,
    held: Arc<[u8]>,
}

/// Smaller trees are held as they are: compression would not pay (on a
/// symlink farm, trees under 512 bytes shrink by about 1%, and each costs a
/// compression context reset and, for every decode, a decompression).
const PACK_MIN: usize = 512;
/// Largest packing buffer a thread keeps between trees.
const SCRATCH_KEEP: usize = 1 << 20;
/// zstd level of held trees (any level decodes the same way).
const PACK_LEVEL: i32 = 1;

/// The in-memory form of an encoded tree: a one-byte tag, then the bytes
/// as they are (0) or a u32 length and zstd frame (1).
pub fn pack(encoded: &[u8]) -> Arc<[u8]> {
    // One compression context and output buffer per thread: creating a
    // context per tree costs about as much as compressing a small one.
    thread_local! {
        static PACKER: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
            const { std::cell::RefCell::new(None) };
    }
    if encoded.len() >= PACK_MIN {
        let packed = PACKER.with_borrow_mut(|p| {
            if p.is_none() {
                *p = Some((zstd::bulk::Compressor::new(PACK_LEVEL).ok()?, Vec::new()));
            }
            let (zc, out) = p.as_mut()?;
            out.clear();
            out.reserve(5 + zstd::zstd_safe::compress_bound(encoded.len()));
            out.push(1);
            out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
            let mut cur = std::io::Cursor::new(&mut *out);
            cur.set_position(5);
            let n = zc.compress_to_buffer(encoded, &mut cur);
            let packed = match n {
                Ok(n) if n + 5 < encoded.len() => Some(Arc::from(&out[..5 + n])),
                _ => None,
            };
            // A long-lived thread keeps no buffer sized for one huge tree.
            if out.capacity() > SCRATCH_KEEP {
                *out = Vec::new();
            }
            packed
        });
        if let Some(packed) = packed {
            return packed;
        }
    }
    hold(encoded)
}

/// The in-memory form of an encoded tree, uncompressed: for a manifest
/// held only briefly (a one-shot push), where compressing every directory
/// would cost more than the memory it saves.
pub fn hold(encoded: &[u8]) -> Arc<[u8]> {
    let mut out = Vec::with_capacity(encoded.len() + 1);
    out.push(0);
    out.extend_from_slice(encoded);
    out.into()
}

/// A held tree as it is stored on disk: compressed if it was held
/// uncompressed (by [`hold`]) and compression pays.
pub fn for_storage(held: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match held.split_first() {
        Some((0, raw)) if raw.len() >= PACK_MIN => std::borrow::Cow::Owned(pack(raw).to_vec()),
        _ => std::borrow::Cow::Borrowed(held),
    }
}

/// A held tree's encoded length, and its bytes past the header: the
/// encoding itself (`None`), or compressed (`Some`).
fn held_form(held: &[u8]) -> Option<(usize, Option<&[u8]>)> {
    match held.split_first()? {
        (0, raw) => Some((raw.len(), None)),
        (1, rest) if rest.len() >= 4 => {
            let (len, packed) = rest.split_at(4);
            Some((
                u32::from_le_bytes(len.try_into().ok()?) as usize,
                Some(packed),
            ))
        }
        _ => None,
    }
}

fn unpack(held: &[u8]) -> Result<Vec<u8>, ManifestError> {
    let bad = || ManifestError::Decode("damaged in-memory tree".into());
    match held_form(held).ok_or_else(bad)? {
        (_, None) => Ok(held[1..].to_vec()),
        (len, Some(packed)) => {
            if len > MAX_TREE_BYTES {
                return Err(bad());
            }
            // One decompression context per thread, as `pack` keeps one
            // for compression: creating one per tree cost more than the
            // decompression of a small tree.
            thread_local! {
                static UNPACKER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            UNPACKER
                .with_borrow_mut(|d| {
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new().ok()?);
                    }
                    d.as_mut()?.decompress(packed, len).ok()
                })
                .ok_or_else(bad)
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if self.0.len() < n {
            return Err(ManifestError::Decode("truncated".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tree held uncompressed is stored compressed, and both forms
    /// unpack to the same bytes; a small one is stored as it is.
    #[test]
    fn held_trees_are_compressed_for_storage() {
        let big: Vec<u8> = (0..4000u32).flat_map(|i| (i % 7).to_le_bytes()).collect();
        let held = hold(&big);
        let stored = for_storage(&held);
        assert_eq!(stored[0], 1);
        assert!(stored.len() < big.len() / 4);
        assert_eq!(unpack(&stored).unwrap(), big);
        assert_eq!(unpack(&held).unwrap(), big);
        assert_eq!(for_storage(&pack(&big))[..], pack(&big)[..]);
        let small = hold(b"small");
        assert!(matches!(for_storage(&small), std::borrow::Cow::Borrowed(b) if b == &small[..]));
    }

    /// A tree's length is read from how it is held, compressed or not.
    #[test]
    fn raw_len_is_the_length_of_the_encoding() {
        let mut m = Manifest::empty();
        let small = Tree {
            entries: vec![file(b"a", b"1")],
        };
        let big = Tree {
            entries: (0..100u32)
                .map(|i| file(format!("file-{i:03}").as_bytes(), &i.to_le_bytes()))
                .collect(),
        };
        for t in [small, big] {
            let id = m.insert(&t);
            assert_eq!(m.raw_len(&id), Some(t.encode().len()));
            assert_eq!(m.raw(&id).map(|r| r.len()), m.raw_len(&id));
        }
        assert!(
            m.trees.values().any(|p| p[0] == 1),
            "one is held compressed"
        );
        assert_eq!(m.raw_len(&TreeId::of(b"absent")), None);
    }

    use proptest::prelude::*;

    pub fn file(name: &[u8], content: &[u8]) -> Entry {
        Entry {
            name: name.to_vec(),
            mode: 0o644,
            mtime_ns: 1_700_000_000_000_000_000,
            uid: 0,
            gid: 0,
            kind: Kind::File {
                size: content.len() as u64,
                hash: FileHash::of(content),
                chunks: vec![],
            },
        }
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        validate_name(b"caf\xe9").unwrap();
        validate_name(&[b'x'; 255]).unwrap();
        assert!(validate_rel_path(b"a/../b").is_err());
        assert!(validate_rel_path(b"/a").is_err());
    }

    #[test]
    fn decoder_refuses_unsorted_and_garbage() {
        let t = Tree {
            entries: vec![file(b"b", b"1"), file(b"a", b"2")],
        };
        assert!(matches!(
            Tree::decode(&t.encode()),
            Err(ManifestError::Unsorted(_))
        ));
        assert!(Tree::decode(b"nope").is_err());
        let mut enc = Tree::default().encode();
        enc[4] = 9;
        assert!(matches!(
            Tree::decode(&enc),
            Err(ManifestError::BadVersion(_))
        ));
    }

    #[test]
    fn over_long_varints_are_refused() {
        // 0xfb announces a u16 varint: a second spelling of "no entries".
        let mut b = TREE_MAGIC.to_vec();
        b.extend_from_slice(&TREE_VERSION.to_le_bytes());
        b.extend_from_slice(&[0xfb, 0, 0]);
        assert!(Tree::decode(&b).is_err());
        assert!(Tree::decode(&Tree::default().encode()).is_ok());
    }

    #[test]
    fn set_entry_rebuilds_only_the_path() {
        let mut m = Manifest::empty();
        let dir = Entry {
            kind: Kind::Dir {
                tree: Tree::default().id(),
            },
            ..file(b"d", b"")
        };
        m.set_entry(b"d", Some(dir)).unwrap();
        m.set_entry(b"d/f", Some(file(b"f", b"x"))).unwrap();
        assert_eq!(m.lookup(b"d/f").unwrap().unwrap(), file(b"f", b"x"));
        let before = m.root();
        m.set_entry(b"d/f", Some(file(b"f", b"y"))).unwrap();
        assert_ne!(m.root(), before);
        m.set_entry(b"d/f", Some(file(b"f", b"x"))).unwrap();
        assert_eq!(
            m.root(),
            before,
            "content addressing gives the same root back"
        );
        assert!(m.set_entry(b"d/f/g", None).is_err());
        m.gc();
        assert_eq!(m.tree_count(), 2);
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back.root(), m.root());
    }

    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 1..40)
            .prop_filter("valid name", |n| validate_name(n).is_ok())
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let kind = prop_oneof![
            (
                any::<u64>().prop_map(|s| s % SINGLE_CHUNK_MAX),
                any::<[u8; 32]>()
            )
                .prop_map(|(size, h)| Kind::File {
                    size,
                    hash: FileHash(h),
                    chunks: vec![]
                }),
            any::<[u8; 32]>().prop_map(|t| Kind::Dir { tree: TreeId(t) }),
            proptest::collection::vec(1u8..=255, 1..100)
                .prop_map(|target| Kind::Symlink { target }),
        ];
        (
            arb_name(),
            0u32..0o7777,
            any::<i64>(),
            any::<u32>(),
            any::<u32>(),
            kind,
        )
            .prop_map(|(name, mode, mtime_ns, uid, gid, kind)| Entry {
                name,
                mode,
                mtime_ns,
                uid,
                gid,
                kind,
            })
    }

    proptest! {
        #[test]
        fn tree_encode_decode_round_trip(entries in proptest::collection::vec(arb_entry(), 0..30)) {
            let mut t = Tree { entries };
            t.sort();
            t.entries.dedup_by(|a, b| a.name == b.name);
            let enc = t.encode();
            prop_assert_eq!(Tree::decode(&enc).unwrap(), t.clone());
            prop_assert_eq!(TreeId::of(&enc), t.id());
        }

        #[test]
        fn tree_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = TREE_MAGIC.to_vec();
            b.extend_from_slice(&TREE_VERSION.to_le_bytes());
            b.extend_from_slice(&bytes);
            let _ = Tree::decode(&b);
            let _ = Manifest::decode(&bytes);
        }
    }
}
