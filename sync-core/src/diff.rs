//! Differences between two manifests, found by walking both and skipping
//! every subtree whose id is equal on both sides: the cost follows the
//! change, not the tree. No IO.

use std::collections::{HashMap, HashSet};

use crate::chunk::chunk_spans;
use crate::hash::{ChunkId, TreeId};
use crate::manifest::{join, Entry, Kind, Manifest, ManifestError, Tree};

/// One change, in pre-order: a directory comes before its children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new entry; an added directory is followed by all of its contents.
    Added { path: Vec<u8>, entry: Entry },
    /// An entry that is gone; a removed directory implies its contents.
    Removed { path: Vec<u8>, entry: Entry },
    /// Same name and kind, other content or metadata. For a directory only
    /// its own metadata changed; its children are listed on their own.
    Modified {
        path: Vec<u8>,
        old: Entry,
        new: Entry,
    },
}

impl Change {
    pub fn path(&self) -> &[u8] {
        match self {
            Change::Added { path, .. }
            | Change::Removed { path, .. }
            | Change::Modified { path, .. } => path,
        }
    }
}

/// Every change that turns `old` into `new`.
pub fn diff(old: &Manifest, new: &Manifest) -> Result<Vec<Change>, ManifestError> {
    diff_decoded(old, new, HashMap::new())
}

/// [`diff`], given trees of `new` already decoded (as a sink session has
/// them from checking what it received): those are not decoded again.
pub fn diff_decoded(
    old: &Manifest,
    new: &Manifest,
    decoded: HashMap<TreeId, Tree>,
) -> Result<Vec<Change>, ManifestError> {
    let mut out = Vec::new();
    let mut w = Walk { old, new, decoded };
    diff_trees(&mut w, Some(old.root()), new.root(), &[], &mut out, 0)?;
    Ok(out)
}

/// Both snapshots of a [`diff`], and trees of the new one decoded before.
struct Walk<'a> {
    old: &'a Manifest,
    new: &'a Manifest,
    decoded: HashMap<TreeId, Tree>,
}

impl Walk<'_> {
    /// A tree of the new snapshot: the one decoded before, the first time
    /// (a subtree found at several paths is decoded again after).
    fn new_tree(&mut self, id: TreeId) -> Result<Tree, ManifestError> {
        match self.decoded.remove(&id) {
            Some(t) => Ok(t),
            None => self.new.tree(&id),
        }
    }
}

fn same_kind(a: &Entry, b: &Entry) -> bool {
    std::mem::discriminant(&a.kind) == std::mem::discriminant(&b.kind)
}

fn diff_trees(
    w: &mut Walk<'_>,
    old_id: Option<TreeId>,
    new_id: TreeId,
    prefix: &[u8],
    out: &mut Vec<Change>,
    depth: usize,
) -> Result<(), ManifestError> {
    if old_id == Some(new_id) {
        return Ok(());
    }
    if depth > crate::manifest::MAX_DEPTH {
        return Err(ManifestError::TooDeep);
    }
    let a = match old_id {
        Some(id) => w.old.tree(&id)?,
        None => Tree::default(),
    };
    let b = w.new_tree(new_id)?;
    // Both trees are decoded for this walk alone: their entries are moved
    // into the changes, not copied.
    let (mut a, mut b) = (
        a.entries.into_iter().peekable(),
        b.entries.into_iter().peekable(),
    );
    loop {
        let ord = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => break,
        };
        match ord {
            std::cmp::Ordering::Less => {
                let e = a.next().expect("peeked");
                out.push(Change::Removed {
                    path: join(prefix, &e.name),
                    entry: e,
                });
            }
            std::cmp::Ordering::Greater => {
                let e = b.next().expect("peeked");
                added(w, prefix, e, out, depth)?;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (a.next().expect("peeked"), b.next().expect("peeked"));
                let path = join(prefix, &x.name);
                if !same_kind(&x, &y) {
                    out.push(Change::Removed {
                        path: path.clone(),
                        entry: x,
                    });
                    added(w, prefix, y, out, depth)?;
                } else if let (Kind::Dir { tree: ta }, Kind::Dir { tree: tb }) = (&x.kind, &y.kind)
                {
                    let (ta, tb) = (*ta, *tb);
                    if !x.same_meta(&y) {
                        out.push(Change::Modified {
                            path: path.clone(),
                            old: x,
                            new: y,
                        });
                    }
                    diff_trees(w, Some(ta), tb, &path, out, depth + 1)?;
                } else if x != y {
                    out.push(Change::Modified {
                        path,
                        old: x,
                        new: y,
                    });
                }
            }
        }
    }
    Ok(())
}

/// An entry of `new` with no counterpart in `old`, and all of its
/// contents if it is a directory.
fn added(
    w: &mut Walk<'_>,
    prefix: &[u8],
    e: Entry,
    out: &mut Vec<Change>,
    depth: usize,
) -> Result<(), ManifestError> {
    let path = join(prefix, &e.name);
    match e.kind {
        Kind::Dir { tree } => {
            out.push(Change::Added {
                path: path.clone(),
                entry: e,
            });
            diff_trees(w, None, tree, &path, out, depth + 1)
        }
        _ => {
            out.push(Change::Added { path, entry: e });
            Ok(())
        }
    }
}

/// Apply changes from [`diff`] to `base`, taking nothing else from the new
/// side: added directories start empty and are filled by the changes that
/// follow them, so a missing change shows as a different root.
pub fn apply(base: &Manifest, changes: &[Change]) -> Result<Manifest, ManifestError> {
    let mut m = base.clone();
    let empty = m.insert(&Tree::default());
    for c in changes {
        match c {
            Change::Removed { path, .. } => {
                // A kind change removes then re-adds under the same path.
                m.set_entry(path, None)?;
            }
            Change::Added { path, entry } => {
                let mut e = entry.clone();
                if e.is_dir() {
                    e.kind = Kind::Dir { tree: empty };
                }
                m.set_entry(path, Some(e))?;
            }
            Change::Modified { path, new, .. } => {
                let mut e = new.clone();
                if e.is_dir() {
                    let cur = m
                        .lookup(path)?
                        .and_then(|c| c.subtree())
                        .ok_or_else(|| ManifestError::NoSuchPath(crate::manifest::lossy(path)))?;
                    e.kind = Kind::Dir { tree: cur };
                }
                m.set_entry(path, Some(e))?;
            }
        }
    }
    m.gc();
    Ok(m)
}

/// The distinct chunks that the entries added or modified by `changes`
/// need, less those `have` already holds, in first-use order.
pub fn missing_chunks(
    changes: &[Change],
    mut have: impl FnMut(&ChunkId) -> bool,
) -> Vec<(ChunkId, u32)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for c in changes {
        let e = match c {
            Change::Added { entry, .. } => entry,
            Change::Modified { new, .. } => new,
            Change::Removed { .. } => continue,
        };
        if let Kind::File { size, hash, chunks } = &e.kind {
            for (id, _, len) in chunk_spans(*size, *hash, chunks) {
                if seen.insert(id) && !have(&id) {
                    out.push((id, len));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::FileHash;
    use crate::manifest::tests::file;
    use proptest::prelude::*;

    /// A random small tree description: path -> content, dirs implied.
    fn build(spec: &[(Vec<u8>, u8, u8)]) -> Manifest {
        let mut m = Manifest::empty();
        let empty = Tree::default().id();
        for (path, kind, val) in spec {
            // Make sure each parent exists as a directory first.
            let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
            let mut prefix = Vec::new();
            let mut ok = true;
            for (k, name) in comps.iter().enumerate() {
                let p = join(&prefix, name);
                let last = k + 1 == comps.len();
                match m.lookup(&p) {
                    Ok(Some(e)) if e.is_dir() && !last => {}
                    Ok(Some(_)) => {
                        ok = false;
                        break;
                    }
                    Ok(None) if !last => {
                        let d = Entry {
                            kind: Kind::Dir { tree: empty },
                            mode: 0o755,
                            ..file(name, b"")
                        };
                        m.set_entry(&p, Some(d)).unwrap();
                    }
                    Ok(None) => {}
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
                prefix = p;
            }
            if !ok {
                continue;
            }
            let name = comps.last().unwrap();
            let e = match kind % 3 {
                0 => file(name, &[*val]),
                1 => Entry {
                    kind: Kind::Symlink {
                        target: vec![b'a' + val % 26],
                    },
                    ..file(name, b"")
                },
                _ => Entry {
                    kind: Kind::Dir { tree: empty },
                    mode: 0o700 + (*val as u32 % 2),
                    ..file(name, b"")
                },
            };
            m.set_entry(path, Some(e)).unwrap();
        }
        m.gc();
        m
    }

    fn arb_spec() -> impl Strategy<Value = Vec<(Vec<u8>, u8, u8)>> {
        let comp = prop_oneof![
            Just(b"a".to_vec()),
            Just(b"b".to_vec()),
            Just(b"c\xff".to_vec())
        ];
        let path = proptest::collection::vec(comp, 1..7).prop_map(|c| c.join(&b'/'));
        proptest::collection::vec((path, any::<u8>(), 0u8..4), 0..20)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn diff_then_apply_gives_the_new_tree(a in arb_spec(), b in arb_spec()) {
            let (ma, mb) = (build(&a), build(&b));
            let changes = diff(&ma, &mb).unwrap();
            // Pre-order: paths ascend component by component (a removal
            // and an addition share a path when an entry changes kind).
            let comps = |c: &Change| {
                c.path().split(|&b| b == b'/').map(<[u8]>::to_vec).collect::<Vec<_>>()
            };
            for w in changes.windows(2) {
                let (x, y) = (comps(&w[0]), comps(&w[1]));
                let replaced = matches!((&w[0], &w[1]), (Change::Removed { .. }, Change::Added { .. }));
                prop_assert!(x < y || (x == y && replaced), "{:?} before {:?}", w[0].path(), w[1].path());
            }
            // Trees decoded before are used as they are.
            let decoded = mb.packed().keys().map(|id| (*id, mb.tree(id).unwrap())).collect();
            prop_assert_eq!(&diff_decoded(&ma, &mb, decoded).unwrap(), &changes);
            let applied = apply(&ma, &changes).unwrap();
            prop_assert_eq!(applied.root(), mb.root());
            prop_assert_eq!(changes.is_empty(), ma.root() == mb.root());
        }
    }

    #[test]
    fn equal_subtrees_are_skipped() {
        let spec: Vec<(Vec<u8>, u8, u8)> = (0..50u8)
            .map(|i| (format!("big/d{i}/f").into_bytes(), 0, i))
            .chain([(b"small/x".to_vec(), 0, 1)])
            .collect();
        let a = build(&spec);
        let mut b = a.clone();
        b.set_entry(b"small/x", Some(file(b"x", b"changed")))
            .unwrap();
        let changes = diff(&a, &b).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].path(), b"small/x");
        let missing = missing_chunks(&changes, |_| false);
        assert_eq!(missing, vec![(ChunkId::from(FileHash::of(b"changed")), 7)]);
        assert!(missing_chunks(&changes, |_| true).is_empty());
    }
}
