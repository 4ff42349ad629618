//! The commit plan: what turning the committed snapshot into a new one
//! must create, write, link, flip and delete, as plain data, in the order
//! the commit engine applies it. Built from [`crate::diff::diff`]; easy to
//! print for `--dry-run`, to test and to fuzz. No IO.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::rc::Rc;

// Paths come from the peer: a fast hash with a per-process seed.
use foldhash::{HashMap, HashSet, HashSetExt};
use serde::Serialize;

use crate::chunk::chunk_spans;
use crate::diff::{diff, Change};
use crate::hash::{ChunkId, SnapshotId, TreeId};
use crate::manifest::{lossy, Entry, Kind, Manifest, ManifestError, Tree};
use crate::safefs::split;

/// Why a plan could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("hard link {path:?} names {primary:?}, which is not the same file in the snapshot")]
    BadHardLink { path: String, primary: String },
}

/// The kind of an entry, without its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    HardLink,
}

impl NodeKind {
    pub fn of(e: &Entry) -> NodeKind {
        match e.kind {
            Kind::File { .. } => NodeKind::File,
            Kind::Dir { .. } => NodeKind::Dir,
            Kind::Symlink { .. } => NodeKind::Symlink,
            Kind::HardLink { .. } => NodeKind::HardLink,
        }
    }
}

/// Create, write, link or flip `path` to `entry`. `replaces` is the kind
/// of the old entry at that path when the kind changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Op {
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub entry: Entry,
    pub replaces: Option<NodeKind>,
}

/// Remove `path` (recursively for a directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deletion {
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub kind: NodeKind,
}

/// Everything a commit does, section by section in the order applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyncPlan {
    pub from: SnapshotId,
    pub to: SnapshotId,
    /// New directories, parents first.
    pub mkdirs: Vec<Op>,
    /// New or changed regular files (built in temporaries, then renamed).
    pub files: Vec<Op>,
    /// Files and symlinks whose content is unchanged but metadata differs.
    pub meta: Vec<Op>,
    /// Hard links (`entry.kind` is `HardLink`), after their primaries.
    pub hardlinks: Vec<Op>,
    /// New or retargeted symlinks, flipped after everything else is in place.
    pub symlinks: Vec<Op>,
    /// Where each wave of `symlinks` ends: a symlink depends only on those
    /// of earlier waves (derived from `symlinks`, so not in the digest).
    #[serde(skip)]
    pub symlink_waves: Vec<usize>,
    /// What is built whole outside the tree and moved in by one rename
    /// per subtree (derived from the sections, so not in the digest).
    #[serde(skip)]
    pub fresh: Fresh,
    /// Removals: symlinks first, then children before parents.
    pub deletions: Vec<Deletion>,
    /// Directories whose mode and mtime are (re)set last, deepest first.
    pub dir_meta: Vec<Op>,
    /// Distinct chunks the files need, in first-use order.
    pub chunks: Vec<(ChunkId, u32)>,
    /// Those of `chunks` the receiver did not have when planning.
    pub missing: Vec<(ChunkId, u32)>,
}

impl SyncPlan {
    /// The plan from `old` to `new`; `have` tells which chunks are local.
    pub fn build(
        old: &Manifest,
        new: &Manifest,
        have: impl FnMut(&ChunkId) -> bool,
    ) -> Result<SyncPlan, PlanError> {
        SyncPlan::build_from(old, new, diff(old, new)?, have)
    }

    /// [`SyncPlan::build`] from `changes`, which must be `diff(old, new)`
    /// (as a sink session computed them: see
    /// [`crate::session::SinkSession::take_changes`]).
    pub fn build_from(
        old: &Manifest,
        new: &Manifest,
        changes: Vec<Change>,
        mut have: impl FnMut(&ChunkId) -> bool,
    ) -> Result<SyncPlan, PlanError> {
        // Taken by value: the plan's operations move the diff's paths and
        // entries instead of copying them (an initial sync has one change
        // per entry).
        let mut changes = changes.into_iter().peekable();
        let mut p = SyncPlan {
            from: old.snapshot(),
            to: new.snapshot(),
            mkdirs: Vec::new(),
            files: Vec::new(),
            meta: Vec::new(),
            hardlinks: Vec::new(),
            symlinks: Vec::new(),
            symlink_waves: Vec::new(),
            fresh: Fresh::default(),
            deletions: Vec::new(),
            dir_meta: Vec::new(),
            chunks: Vec::new(),
            missing: Vec::new(),
        };
        let mut touched: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut dir_entries: Vec<Op> = Vec::new();
        let mut deletions = Vec::new();
        // Changes come in path order: most share the previous one's parent.
        let mut last_parent: Option<Vec<u8>> = None;
        while let Some(c) = changes.next() {
            let parent = split(c.path()).0;
            if last_parent.as_deref() != Some(parent) {
                if !touched.contains(parent) {
                    touched.insert(parent.to_vec());
                }
                last_parent = Some(parent.to_vec());
            }
            match c {
                Change::Removed { path, entry } => {
                    let replaced = matches!(changes.peek(),
                        Some(Change::Added { path: p2, .. }) if *p2 == path);
                    if !replaced {
                        deletions.push(Deletion {
                            path,
                            kind: NodeKind::of(&entry),
                        });
                    } else {
                        let Some(Change::Added { entry: new_e, .. }) = changes.next() else {
                            unreachable!("checked above")
                        };
                        p.add(path, new_e, Some(NodeKind::of(&entry)), &mut dir_entries);
                    }
                }
                Change::Added { path, entry } => p.add(path, entry, None, &mut dir_entries),
                Change::Modified { path, old, new: e } => {
                    let same_content = match (&old.kind, &e.kind) {
                        (Kind::Dir { .. }, _) => None,
                        (
                            Kind::File { size, hash, chunks },
                            Kind::File {
                                size: s2,
                                hash: h2,
                                chunks: c2,
                            },
                        ) => Some((size, hash, chunks) == (s2, h2, c2)),
                        (Kind::Symlink { target }, Kind::Symlink { target: t2 }) => {
                            Some(target == t2)
                        }
                        _ => Some(false),
                    };
                    let op = Op {
                        path,
                        entry: e,
                        replaces: None,
                    };
                    match same_content {
                        None => dir_entries.push(op),
                        Some(true) => p.meta.push(op),
                        Some(false) => p.add(op.path, op.entry, None, &mut dir_entries),
                    }
                }
            }
        }
        for l in &p.hardlinks {
            let Kind::HardLink { path, size, hash } = &l.entry.kind else {
                continue;
            };
            let ok = matches!(new.lookup(path), Ok(Some(Entry { kind: Kind::File { size: s, hash: h, .. }, .. }))
                if s == *size && h == *hash);
            if !ok {
                return Err(PlanError::BadHardLink {
                    path: lossy(&l.path),
                    primary: lossy(path),
                });
            }
        }
        let roots = fresh_roots(&p.mkdirs);
        // A symlink in a fresh subtree is made there (visible with the
        // subtree, before the apply) when what it points at is complete
        // from then on: inside the same subtree, or an entry that the plan
        // leaves alone (as a build's links to other builds' packages).
        let untouched = Untouched::new(old, new);
        let (waves, inside) = order_symlinks(&mut p.symlinks, |link, to| {
            let k = root_of(&roots, split(link).0);
            k.is_some() && (k == root_of(&roots, to) || untouched.check(to))
        });
        p.symlink_waves = waves;
        // Symlinks go first so none is left pointing into a removed subtree.
        deletions.reverse();
        deletions.sort_by_key(|d| d.kind != NodeKind::Symlink);
        p.deletions = deletions;

        // Every directory whose listing changed gets its mtime back.
        let listed: HashSet<&[u8]> = dir_entries.iter().map(|o| o.path.as_slice()).collect();
        touched.remove(&Vec::new());
        let touched: Vec<Vec<u8>> = touched
            .into_iter()
            .filter(|d| !listed.contains(d.as_slice()))
            .collect();
        drop(listed);
        for dir in touched {
            if let Some(e) = new.lookup(&dir)? {
                if e.is_dir() {
                    dir_entries.push(Op {
                        path: dir,
                        entry: e,
                        replaces: None,
                    });
                }
            }
        }
        dir_entries.sort_by(|a, b| {
            let depth = |p: &[u8]| p.iter().filter(|&&c| c == b'/').count();
            depth(&b.path)
                .cmp(&depth(&a.path))
                .then(a.path.cmp(&b.path))
        });
        p.dir_meta = dir_entries;
        p.fresh = Fresh::of(&p, &roots, inside);

        let mut seen = HashSet::new();
        for f in &p.files {
            if let Kind::File { size, hash, chunks } = &f.entry.kind {
                for (id, _, len) in chunk_spans(*size, *hash, chunks) {
                    if seen.insert(id) {
                        p.chunks.push((id, len));
                    }
                }
            }
        }
        p.missing = p
            .chunks
            .iter()
            .copied()
            .filter(|(id, _)| !have(id))
            .collect();
        Ok(p)
    }

    /// The plan that builds `new` from nothing.
    pub fn full(new: &Manifest, have: impl FnMut(&ChunkId) -> bool) -> Result<SyncPlan, PlanError> {
        SyncPlan::build(&Manifest::empty(), new, have)
    }

    fn add(&mut self, path: Vec<u8>, e: Entry, replaces: Option<NodeKind>, dirs: &mut Vec<Op>) {
        let op = Op {
            path,
            entry: e,
            replaces,
        };
        match op.entry.kind {
            Kind::Dir { .. } => {
                dirs.push(op.clone());
                self.mkdirs.push(op);
            }
            Kind::File { .. } => self.files.push(op),
            Kind::Symlink { .. } => self.symlinks.push(op),
            Kind::HardLink { .. } => self.hardlinks.push(op),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.mkdirs.is_empty()
            && self.files.is_empty()
            && self.meta.is_empty()
            && self.hardlinks.is_empty()
            && self.symlinks.is_empty()
            && self.deletions.is_empty()
            && self.dir_meta.is_empty()
    }

    /// Bytes of the regular files to write.
    pub fn file_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|o| match o.entry.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// Bytes of the chunks that were missing when planned.
    pub fn missing_bytes(&self) -> u64 {
        self.missing.iter().map(|&(_, l)| l as u64).sum()
    }

    /// A digest of everything the plan does (journaled, and checked when a
    /// commit is rolled forward).
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        let cfg = bincode::config::standard();
        let mut b = Vec::new();
        let mut section = |tag: &[u8], ops: &[Op]| {
            h.update(tag);
            h.update(&(ops.len() as u64).to_le_bytes());
            for o in ops {
                b.clear();
                bincode::serde::encode_into_std_write(o, &mut b, cfg).expect("plain data encodes");
                h.update(&(b.len() as u64).to_le_bytes());
                h.update(&b);
            }
        };
        section(b"mkdirs", &self.mkdirs);
        section(b"files", &self.files);
        section(b"meta", &self.meta);
        section(b"links", &self.hardlinks);
        section(b"symlinks", &self.symlinks);
        section(b"dirmeta", &self.dir_meta);
        h.update(b"deletions");
        for d in &self.deletions {
            h.update(&(d.path.len() as u64).to_le_bytes());
            h.update(&d.path);
            h.update(&[d.kind as u8]);
        }
        h.update(self.from.as_bytes());
        h.update(self.to.as_bytes());
        *h.finalize().as_bytes()
    }
}

/// Where a new directory is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// In the tree, at its turn in the apply.
    Tree,
    /// Built in the state directory, moved into the tree whole: the root
    /// of a fresh subtree (its parent was there before, nothing at its path).
    Root,
    /// Built inside a fresh subtree, moved in with its root.
    Inside,
}

/// The parts of a plan that are built whole in the state directory, before
/// the journal, and appear in the tree with one rename per subtree: every
/// new directory whose parent was there already, with the directories and
/// files below it and the symlinks below it that point only inside it.
/// A new repository then appears complete in one step, and the apply
/// renames a few directories instead of every new file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fresh {
    /// Per entry of `mkdirs`.
    pub mkdirs: Vec<Place>,
    /// Per entry of `files`: built inside a fresh subtree.
    pub files: Vec<bool>,
    /// Per entry of `symlinks`: made inside a fresh subtree (its target,
    /// the way to it and every new symlink these lead to lie in the same
    /// subtree).
    pub symlinks: Vec<bool>,
    /// Per entry of `dir_meta`: set inside a fresh subtree, for a
    /// directory below a root that nothing made later goes into and whose
    /// mode lets its owner add entries (others are set in the tree, last).
    pub dir_meta: Vec<bool>,
}

impl Fresh {
    fn of(p: &SyncPlan, roots: &HashMap<&[u8], usize>, symlinks: Vec<bool>) -> Fresh {
        let inside = |path: &[u8]| root_of(roots, split(path).0).is_some();
        let mkdirs = p
            .mkdirs
            .iter()
            .map(|o| {
                if roots.contains_key(o.path.as_slice()) {
                    Place::Root
                } else if inside(&o.path) {
                    Place::Inside
                } else {
                    Place::Tree
                }
            })
            .collect();
        let files = p.files.iter().map(|o| inside(&o.path)).collect();
        // Directories that get entries after their subtree is in place.
        let later: HashSet<&[u8]> = p
            .hardlinks
            .iter()
            .chain(
                p.symlinks
                    .iter()
                    .zip(&symlinks)
                    .filter(|(_, &i)| !i)
                    .map(|(o, _)| o),
            )
            .map(|o| split(&o.path).0)
            .collect();
        let dir_meta = p
            .dir_meta
            .iter()
            .map(|o| {
                inside(&o.path)
                    && o.entry.mode & 0o300 == 0o300
                    && !later.contains(o.path.as_slice())
            })
            .collect();
        Fresh {
            mkdirs,
            files,
            symlinks,
            dir_meta,
        }
    }

    /// Indexes (in `mkdirs`) of the subtree roots.
    pub fn roots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.mkdirs.len()).filter(|&i| self.mkdirs[i] == Place::Root)
    }

    pub fn file(&self, i: usize) -> bool {
        self.files.get(i).copied().unwrap_or(false)
    }

    pub fn symlink(&self, i: usize) -> bool {
        self.symlinks.get(i).copied().unwrap_or(false)
    }

    pub fn dir_meta(&self, i: usize) -> bool {
        self.dir_meta.get(i).copied().unwrap_or(false)
    }

    pub fn mkdir(&self, i: usize) -> Place {
        self.mkdirs.get(i).copied().unwrap_or(Place::Tree)
    }
}

/// The roots of fresh subtrees among `mkdirs` (parents first), by path.
fn fresh_roots(mkdirs: &[Op]) -> HashMap<&[u8], usize> {
    let made: HashSet<&[u8]> = mkdirs.iter().map(|o| o.path.as_slice()).collect();
    mkdirs
        .iter()
        .enumerate()
        .filter(|(_, o)| o.replaces.is_none() && !made.contains(split(&o.path).0))
        .map(|(i, o)| (o.path.as_slice(), i))
        .collect()
}

/// The fresh subtree root that is `path` or one of its ancestors.
fn root_of(roots: &HashMap<&[u8], usize>, mut path: &[u8]) -> Option<usize> {
    if roots.is_empty() {
        return None;
    }
    while !path.is_empty() {
        if let Some(&i) = roots.get(path) {
            return Some(i);
        }
        path = split(path).0;
    }
    None
}

/// The tree path a relative symlink at `link` names, resolved lexically;
/// `None` for an absolute target or one that leaves the tree.
pub fn resolve_target(link: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    if target.first() == Some(&b'/') {
        return None;
    }
    let mut out = Vec::with_capacity(link.len() + target.len());
    out.extend_from_slice(split(link).0);
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.is_empty() {
                    return None;
                }
                out.truncate(out.iter().rposition(|&b| b == b'/').unwrap_or(0));
            }
            n => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(n);
            }
        }
    }
    Some(out)
}

/// Tells whether a path names the same file or directory (with all of
/// its subtree) in `old` and `new`, reached through directories only in
/// both: nothing a plan between them does changes what it names. Each tree
/// object is decoded once, and below a directory the two snapshots share
/// only one of them is read.
struct Untouched<'a> {
    old: &'a Manifest,
    new: &'a Manifest,
    /// Decoded tree objects, by id (content-addressed: one id is one tree
    /// in either snapshot).
    trees: RefCell<HashMap<TreeId, Rc<Tree>>>,
}

impl<'a> Untouched<'a> {
    fn new(old: &'a Manifest, new: &'a Manifest) -> Untouched<'a> {
        Untouched {
            old,
            new,
            trees: RefCell::default(),
        }
    }

    fn tree(&self, id: TreeId) -> Option<Rc<Tree>> {
        if let Some(t) = self.trees.borrow().get(&id) {
            return Some(t.clone());
        }
        let t = Rc::new(self.new.tree(&id).or_else(|_| self.old.tree(&id)).ok()?);
        self.trees.borrow_mut().insert(id, t.clone());
        Some(t)
    }

    fn check(&self, path: &[u8]) -> bool {
        if path.is_empty() {
            return false;
        }
        let (mut old, mut new) = (self.old.root(), self.new.root());
        let mut comps = path.split(|&c| c == b'/').peekable();
        while let Some(name) = comps.next() {
            let shared = old == new;
            let Some(n) = self.tree(new) else {
                return false;
            };
            let Some(e) = n.get(name) else {
                return false;
            };
            if !shared {
                let Some(o) = self.tree(old) else {
                    return false;
                };
                let Some(eo) = o.get(name) else {
                    return false;
                };
                if comps.peek().is_none() && eo != e {
                    return false;
                }
                match eo.kind {
                    Kind::Dir { tree } => old = tree,
                    _ if comps.peek().is_some() => return false,
                    _ => {}
                }
            }
            match e.kind {
                Kind::Dir { tree } => {
                    new = tree;
                    if shared {
                        old = tree;
                    }
                }
                Kind::Symlink { .. } => return false,
                _ if comps.peek().is_some() => return false,
                _ => {}
            }
        }
        true
    }
}

/// Order symlink flips so that a symlink comes after every new symlink
/// inside the tree it points at (so `current -> repo` flips only once the
/// symlinks inside `repo` are in place) and after any new symlink on the
/// way to its target. Returns where each wave ends (the symlinks of a
/// wave depend on none of each other, only on those of earlier waves) and,
/// per symlink in the new order, whether it and every symlink it waits
/// for (transitively) are `local(link path, resolved target)`.
fn order_symlinks(
    ops: &mut Vec<Op>,
    local: impl Fn(&[u8], &[u8]) -> bool,
) -> (Vec<usize>, Vec<bool>) {
    // Exact lookups by hash; "every path under a prefix" in a sorted list.
    let at: HashMap<&[u8], usize> = ops
        .iter()
        .enumerate()
        .map(|(i, o)| (o.path.as_slice(), i))
        .collect();
    let mut sorted: Vec<(&[u8], usize)> = at.iter().map(|(&p, &i)| (p, i)).collect();
    sorted.sort_unstable();
    // The directories holding new symlinks: only a target among them can
    // have new symlinks inside (most targets are files).
    let mut holders: HashSet<&[u8]> = HashSet::new();
    for o in ops.iter() {
        let mut dir = crate::safefs::split(&o.path).0;
        while holders.insert(dir) && !dir.is_empty() {
            dir = crate::safefs::split(dir).0;
        }
    }
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); ops.len()];
    let mut ok = vec![false; ops.len()];
    let mut indeg = vec![0usize; ops.len()];
    let mut before: Vec<usize> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        let Kind::Symlink { target } = &o.entry.kind else {
            continue;
        };
        let Some(mut r) = resolve_target(&o.path, target) else {
            continue;
        };
        ok[i] = local(&o.path, &r);
        before.clear();
        // New symlinks on the way to the target, and the target itself.
        for end in (0..=r.len()).filter(|&e| e == r.len() || r[e] == b'/') {
            if let Some(&j) = at.get(&r[..end]) {
                before.push(j);
            }
        }
        // New symlinks inside the target.
        if holders.contains(r.as_slice()) {
            if !r.is_empty() {
                r.push(b'/');
            }
            let prefix = r.as_slice();
            let from = sorted.partition_point(|(k, _)| *k < prefix);
            for &(_, j) in sorted[from..]
                .iter()
                .take_while(|(k, _)| k.starts_with(prefix))
            {
                before.push(j);
            }
        }
        for &j in &before {
            if j != i {
                after[j].push(i);
                indeg[i] += 1;
            }
        }
    }
    // Kahn's algorithm by layers: a wave holds every symlink whose
    // predecessors are all in earlier waves, in canonical order, so the
    // symlinks of one wave may be made in any order (or at once).
    let mut wave: Vec<usize> = (0..ops.len()).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(ops.len());
    let mut ends = Vec::new();
    let mut done = vec![false; ops.len()];
    while !wave.is_empty() {
        let mut next = Vec::new();
        for &i in &wave {
            done[i] = true;
            for &k in &after[i] {
                ok[k] &= ok[i];
                indeg[k] -= 1;
                if indeg[k] == 0 {
                    next.push(k);
                }
            }
        }
        order.append(&mut wave);
        ends.push(order.len());
        next.sort_unstable();
        wave = next;
    }
    // Symlinks in a cycle can't all come after each other: one last wave.
    let before = order.len();
    order.extend((0..ops.len()).filter(|&i| !done[i]));
    if order.len() > before {
        ends.push(order.len());
    }
    let inside = order.iter().map(|&i| ok[i] && done[i]).collect();
    let mut old: Vec<Option<Op>> = std::mem::take(ops).into_iter().map(Some).collect();
    ops.extend(order.into_iter().filter_map(|i| old[i].take()));
    (ends, inside)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for SyncPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan {} -> {}: {} dirs, {} files ({}), {} hard links, {} symlinks, {} metadata, {} deletions; {} chunks needed, {} missing ({})",
            self.from.short(),
            self.to.short(),
            self.mkdirs.len(),
            self.files.len(),
            human(self.file_bytes()),
            self.hardlinks.len(),
            self.symlinks.len(),
            self.meta.len(),
            self.deletions.len(),
            self.chunks.len(),
            self.missing.len(),
            human(self.missing_bytes()),
        )?;
        let repl = |o: &Op| match o.replaces {
            Some(k) => format!(" (replaces {k:?})"),
            None => String::new(),
        };
        for o in &self.mkdirs {
            writeln!(f, "mkdir    {}/{}", lossy(&o.path), repl(o))?;
        }
        for o in &self.files {
            let size = match o.entry.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            };
            writeln!(
                f,
                "write    {} ({}){}",
                lossy(&o.path),
                human(size),
                repl(o)
            )?;
        }
        for o in &self.meta {
            writeln!(f, "meta     {} (mode {:o})", lossy(&o.path), o.entry.mode)?;
        }
        for o in &self.hardlinks {
            if let Kind::HardLink { path, .. } = &o.entry.kind {
                writeln!(
                    f,
                    "link     {} => {}{}",
                    lossy(&o.path),
                    lossy(path),
                    repl(o)
                )?;
            }
        }
        for o in &self.symlinks {
            if let Kind::Symlink { target } = &o.entry.kind {
                writeln!(
                    f,
                    "symlink  {} -> {}{}",
                    lossy(&o.path),
                    lossy(target),
                    repl(o)
                )?;
            }
        }
        for d in &self.deletions {
            let slash = if d.kind == NodeKind::Dir { "/" } else { "" };
            writeln!(f, "delete   {}{slash}", lossy(&d.path))?;
        }
        for o in &self.dir_meta {
            writeln!(f, "dirmeta  {}/ (mode {:o})", lossy(&o.path), o.entry.mode)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::FileHash;
    use crate::manifest::Tree;

    fn e(name: &[u8], kind: Kind) -> Entry {
        Entry {
            name: name.to_vec(),
            mode: 0o644,
            mtime_ns: 1,
            uid: 0,
            gid: 0,
            kind,
        }
    }
    fn file(name: &[u8], c: &[u8]) -> Entry {
        e(
            name,
            Kind::File {
                size: c.len() as u64,
                hash: FileHash::of(c),
                chunks: vec![],
            },
        )
    }
    fn dir(name: &[u8]) -> Entry {
        e(
            name,
            Kind::Dir {
                tree: Tree::default().id(),
            },
        )
    }
    fn link(name: &[u8], t: &[u8]) -> Entry {
        e(name, Kind::Symlink { target: t.to_vec() })
    }

    #[test]
    fn sections_and_order() {
        let mut a = Manifest::empty();
        a.set_entry(b"d", Some(dir(b"d"))).unwrap();
        a.set_entry(b"d/x", Some(file(b"x", b"1"))).unwrap();
        a.set_entry(b"d/sub", Some(dir(b"sub"))).unwrap();
        a.set_entry(b"d/sub/y", Some(file(b"y", b"2"))).unwrap();
        a.set_entry(b"cur", Some(link(b"cur", b"d"))).unwrap();
        a.set_entry(b"old", Some(link(b"old", b"d/sub"))).unwrap();
        a.set_entry(b"k", Some(file(b"k", b"k"))).unwrap();

        let mut b = a.clone();
        b.set_entry(b"n", Some(dir(b"n"))).unwrap();
        b.set_entry(b"n/f", Some(file(b"f", b"new"))).unwrap();
        b.set_entry(b"n/g", Some(file(b"g", b"new"))).unwrap();
        b.set_entry(b"cur", Some(link(b"cur", b"n"))).unwrap();
        b.set_entry(b"old", None).unwrap();
        b.set_entry(b"d/sub", None).unwrap();
        b.set_entry(
            b"k",
            Some(Entry {
                mode: 0o600,
                ..file(b"k", b"k")
            }),
        )
        .unwrap();
        b.set_entry(b"d/x", Some(link(b"x", b"elsewhere"))).unwrap();

        let p = SyncPlan::build(&a, &b, |_| false).unwrap();
        let paths = |ops: &[Op]| ops.iter().map(|o| lossy(&o.path)).collect::<Vec<_>>();
        assert_eq!(paths(&p.mkdirs), ["n"]);
        assert_eq!(paths(&p.files), ["n/f", "n/g"]);
        assert_eq!(paths(&p.meta), ["k"]);
        assert_eq!(paths(&p.symlinks), ["cur", "d/x"]);
        assert_eq!(p.symlinks[1].replaces, Some(NodeKind::File));
        let dels: Vec<_> = p.deletions.iter().map(|d| lossy(&d.path)).collect();
        assert_eq!(dels, ["old", "d/sub"], "symlinks are removed first");
        assert_eq!(paths(&p.dir_meta), ["d", "n"]);
        assert_eq!(p.chunks.len(), 1, "two files of one content share a chunk");
        assert_eq!(p.missing, p.chunks);
        assert!(SyncPlan::build(&a, &b, |_| true)
            .unwrap()
            .missing
            .is_empty());
        let text = p.to_string();
        assert!(text.contains("symlink  cur -> n"), "{text}");
        assert!(text.contains("2 files (6 B)"), "{text}");
        assert_ne!(
            p.digest(),
            SyncPlan::build(&b, &a, |_| false).unwrap().digest()
        );
        assert!(SyncPlan::build(&b, &b, |_| false).unwrap().is_empty());
        assert_eq!(SyncPlan::full(&b, |_| false).unwrap().mkdirs.len(), 2);
    }

    #[test]
    fn a_symlink_flips_after_the_symlinks_inside_its_target() {
        let mut a = Manifest::empty();
        a.set_entry(b"r", Some(dir(b"r"))).unwrap();
        let mut b = a.clone();
        b.set_entry(b"a-cur", Some(link(b"a-cur", b"r"))).unwrap();
        b.set_entry(b"b-via", Some(link(b"b-via", b"a-cur/x")))
            .unwrap();
        b.set_entry(b"r/in", Some(link(b"in", b"../zz"))).unwrap();
        b.set_entry(b"zz", Some(link(b"zz", b"/abs"))).unwrap();
        let p = SyncPlan::build(&a, &b, |_| false).unwrap();
        let order: Vec<_> = p.symlinks.iter().map(|o| lossy(&o.path)).collect();
        assert_eq!(order, ["zz", "r/in", "a-cur", "b-via"]);
        assert_eq!(
            p.symlink_waves,
            [1, 2, 3, 4],
            "each waits for the one before"
        );
        // Links that point at no new link all go in the first wave.
        let mut c = b.clone();
        for i in 0..5 {
            let name = format!("r/l{i}");
            c.set_entry(name.as_bytes(), Some(link(&name.as_bytes()[2..], b"../zz")))
                .unwrap();
        }
        let p = SyncPlan::build(&b, &c, |_| false).unwrap();
        assert_eq!(p.symlink_waves, [5]);
        assert_eq!(
            resolve_target(b"a/b/l", b"../c/./d"),
            Some(b"a/c/d".to_vec())
        );
        assert_eq!(resolve_target(b"l", b"../x"), None);
        assert_eq!(resolve_target(b"l", b"/x"), None);
    }

    /// Lexical resolution spelled out on lists of components: what
    /// `resolve_target` computes in one buffer.
    fn resolve_by_parts(link: &[u8], target: &[u8]) -> Option<Vec<u8>> {
        if target.first() == Some(&b'/') {
            return None;
        }
        let mut parts: Vec<&[u8]> = link.split(|&b| b == b'/').collect();
        parts.pop();
        for c in target.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    parts.pop()?;
                }
                n => parts.push(n),
            }
        }
        Some(parts.join(&b'/'))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn resolve_target_agrees_with_resolution_by_parts(
            link in proptest::collection::vec(proptest::sample::select(
                vec![&b"a"[..], b"bc", b"d\xff", b"..x"]), 1..5),
            target in proptest::collection::vec(proptest::sample::select(
                vec![&b""[..], b".", b"..", b"a", b"bc", b"d\xff"]), 0..7),
            absolute in proptest::bool::weighted(0.1),
        ) {
            let link = link.join(&b'/');
            let mut target = target.join(&b'/');
            if absolute {
                target.insert(0, b'/');
            }
            proptest::prop_assert_eq!(
                resolve_target(&link, &target),
                resolve_by_parts(&link, &target)
            );
        }
    }

    /// New directories whose parent was there are built whole: their
    /// contents are `Inside`, symlinks only when all they lead to is too
    /// or is left alone by the plan (reached through directories only),
    /// and directory metadata only when nothing comes into it later.
    #[test]
    fn fresh_subtrees_and_what_is_built_inside_them() {
        let d = |name: &[u8], mode| Entry { mode, ..dir(name) };
        let mut a = Manifest::empty();
        a.set_entry(b"r", Some(d(b"r", 0o755))).unwrap();
        a.set_entry(b"k", Some(file(b"k", b"was a file"))).unwrap();
        let add =
            |m: &mut Manifest, path: &str, e: Entry| m.set_entry(path.as_bytes(), Some(e)).unwrap();
        // Entries the new subtree's links may point at.
        add(&mut a, "pkgs", d(b"pkgs", 0o755));
        add(&mut a, "pkgs/p.rpm", file(b"p.rpm", b"kept"));
        add(&mut a, "grows", d(b"grows", 0o755));
        add(&mut a, "grows/old.rpm", file(b"old.rpm", b"old"));
        add(&mut a, "lnk", link(b"lnk", b"pkgs"));
        add(&mut a, "ch", file(b"ch", b"before"));
        let mut b = a.clone();
        add(&mut b, "grows/new.rpm", file(b"new.rpm", b"new"));
        add(&mut b, "ch", file(b"ch", b"after"));
        add(&mut b, "r/new", d(b"new", 0o755));
        for (name, to) in [
            ("keep", "../../pkgs/p.rpm"),
            ("keepdir", "../../pkgs"),
            ("inchanged", "../../grows/old.rpm"),
            ("grown", "../../grows"),
            ("changed", "../../ch"),
            ("tosym", "../../lnk"),
            ("viasym", "../../lnk/p.rpm"),
            ("missing", "../../nothere"),
        ] {
            add(
                &mut b,
                &format!("r/new/{name}"),
                link(name.as_bytes(), to.as_bytes()),
            );
        }
        add(&mut b, "r/new/f", file(b"f", b"f"));
        add(&mut b, "r/new/sub", d(b"sub", 0o755));
        add(&mut b, "r/new/sub/g", file(b"g", b"g"));
        add(&mut b, "r/new/sub2", d(b"sub2", 0o755));
        add(&mut b, "r/new/ro", d(b"ro", 0o555));
        add(&mut b, "r/new/in", link(b"in", b"sub/g"));
        add(&mut b, "r/new/sub/l2", link(b"l2", b"../in"));
        add(&mut b, "r/new/out", link(b"out", b"../x"));
        add(&mut b, "r/new/sub2/chain", link(b"chain", b"../out"));
        add(&mut b, "top", file(b"top", b"t"));
        add(&mut b, "k", d(b"k", 0o755));
        add(&mut b, "k/f", file(b"f", b"in a replaced path"));
        let p = SyncPlan::build(&a, &b, |_| false).unwrap();
        let by = |ops: &[Op], flags: Vec<String>| -> Vec<String> {
            ops.iter()
                .zip(flags)
                .map(|(o, f)| format!("{} {f}", lossy(&o.path)))
                .collect()
        };
        let s = |v: &[bool]| v.iter().map(|b| b.to_string()).collect::<Vec<_>>();
        let places = p.fresh.mkdirs.iter().map(|pl| format!("{pl:?}")).collect();
        assert_eq!(
            by(&p.mkdirs, places),
            [
                "k Tree",
                "r/new Root",
                "r/new/ro Inside",
                "r/new/sub Inside",
                "r/new/sub2 Inside"
            ]
        );
        assert_eq!(
            by(&p.files, s(&p.fresh.files)),
            [
                "ch false",
                "grows/new.rpm false",
                "k/f false",
                "r/new/f true",
                "r/new/sub/g true",
                "top false"
            ]
        );
        let mut links = by(&p.symlinks, s(&p.fresh.symlinks));
        links.sort();
        assert_eq!(
            links,
            [
                "r/new/changed false",
                "r/new/grown false",
                "r/new/in true",
                "r/new/inchanged true",
                "r/new/keep true",
                "r/new/keepdir true",
                "r/new/missing false",
                "r/new/out false",
                "r/new/sub/l2 true",
                "r/new/sub2/chain false",
                "r/new/tosym false",
                "r/new/viasym false"
            ]
        );
        let mut meta = by(&p.dir_meta, s(&p.fresh.dir_meta));
        meta.sort();
        assert_eq!(
            meta,
            [
                "grows false",
                "k false",
                "r false",
                "r/new false",
                "r/new/ro false",
                "r/new/sub true",
                "r/new/sub2 false"
            ]
        );
        assert_eq!(p.fresh.roots().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn refuses_a_hard_link_to_nothing() {
        let mut m = Manifest::empty();
        let bad = e(
            b"h",
            Kind::HardLink {
                path: b"nothere".to_vec(),
                size: 1,
                hash: FileHash::of(b"x"),
            },
        );
        m.set_entry(b"h", Some(bad)).unwrap();
        assert!(matches!(
            SyncPlan::full(&m, |_| false),
            Err(PlanError::BadHardLink { .. })
        ));
    }
}
