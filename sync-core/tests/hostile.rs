//! Hostile snapshots: bad names, symlinks planted to redirect writes,
//! kind changes that swap a directory for a symlink, absurd sizes. The
//! commit must refuse or stay inside DEST; nothing may appear outside.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use common::*;
use sync_core::chunk::ChunkRef;
use sync_core::commit::{push_local, CommitOptions, Receiver};
use sync_core::verify::VerifyOptions;
use sync_core::{ChunkId, Entry, FileHash, Kind, Manifest, Tree};

fn entry(name: &[u8], kind: Kind) -> Entry {
    Entry {
        name: name.to_vec(),
        mode: 0o644,
        mtime_ns: 1_700_000_000_000_000_000,
        uid: 0,
        gid: 0,
        kind,
    }
}

fn file(name: &[u8], content: &[u8]) -> Entry {
    entry(
        name,
        Kind::File {
            size: content.len() as u64,
            hash: FileHash::of(content),
            chunks: vec![],
        },
    )
}

fn dir(name: &[u8], tree: &Tree, m: &mut Manifest) -> Entry {
    Entry {
        mode: 0o755,
        ..entry(
            name,
            Kind::Dir {
                tree: m.insert(tree),
            },
        )
    }
}

fn empty_listing(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn bad_names_are_refused_by_decode_and_by_the_commit_path() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let dest = t.path().join("dest");
    for bad in [&b".."[..], b"a/b", b"x\0y", b".", b""] {
        let mut tree = Tree {
            entries: vec![file(bad, b"evil")],
        };
        tree.sort();
        assert!(Tree::decode(&tree.encode()).is_err(), "{bad:?} decoded");
        // Built by hand, bypassing every decoder.
        let mut m = Manifest::empty();
        let id = m.insert(&tree);
        m.set_root(id).unwrap();
        assert!(Manifest::decode(&m.encode()).is_err(), "{bad:?} decoded");
        let mut recv = Receiver::open(&dest, None).unwrap();
        assert!(recv.plan(&m).is_err(), "{bad:?} planned");
        let err = push_local(&m, &outside, &mut recv, &CommitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("invalid name"), "{err}");
    }
    // A hard link naming a path outside the tree.
    let mut m = Manifest::empty();
    let id = m.insert(&Tree {
        entries: vec![entry(
            b"h",
            Kind::HardLink {
                path: b"../../etc/passwd".to_vec(),
                size: 1,
                hash: FileHash::of(b"x"),
            },
        )],
    });
    m.set_root(id).unwrap();
    let recv = Receiver::open(&dest, None).unwrap();
    assert!(recv.plan(&m).is_err());
    assert!(empty_listing(&outside).is_empty());
    assert!(empty_listing(&dest).is_empty());
}

#[test]
fn a_tampered_plan_is_refused_before_anything_is_written() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    write(&src, "d/f", b"content");
    let m = scan_tree(&src);
    let mut recv = Receiver::open(&dest, None).unwrap();
    let mut plan = recv.plan(&m).unwrap();
    plan.files[0].path = b"../escaped".to_vec();
    let f = std::fs::read(src.join("d/f")).unwrap();
    recv.stage(ChunkId::of(&f), &f).unwrap();
    let err = recv
        .commit(&m, &plan, &CommitOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("plan does not lead"), "{err}");
    assert!(!t.path().join("escaped").exists());
    assert!(empty_listing(&dest).is_empty());
}

#[test]
fn symlinks_never_redirect_a_write() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let dest = t.path().join("dest");
    let evil = b"evil bytes";

    // Snapshot 1: x -> <outside> (absolute), committed as a plain symlink.
    let mut m1 = Manifest::empty();
    let target = outside.as_os_str().as_encoded_bytes().to_vec();
    m1.set_entry(b"x", Some(entry(b"x", Kind::Symlink { target })))
        .unwrap();
    let mut recv = Receiver::open(&dest, None).unwrap();
    let plan = recv.plan(&m1).unwrap();
    recv.commit(&m1, &plan, &CommitOptions::default()).unwrap();
    assert!(std::fs::symlink_metadata(dest.join("x"))
        .unwrap()
        .is_symlink());

    // Snapshot 2: x becomes a directory holding a file.
    let mut m2 = Manifest::empty();
    let inner = Tree {
        entries: vec![file(b"evil", evil)],
    };
    let x = dir(b"x", &inner, &mut m2);
    m2.set_entry(b"x", Some(x)).unwrap();
    let plan = recv.plan(&m2).unwrap();
    recv.stage(ChunkId::of(evil), evil).unwrap();
    recv.commit(&m2, &plan, &CommitOptions::default()).unwrap();
    assert!(
        empty_listing(&outside).is_empty(),
        "wrote through the symlink"
    );
    assert_eq!(std::fs::read(dest.join("x/evil")).unwrap(), evil);

    // A symlink planted behind our back where the snapshot has a directory:
    // a new file below it must fail, not land outside.
    std::fs::remove_dir_all(dest.join("x")).unwrap();
    symlink(&outside, dest.join("x")).unwrap();
    let mut m3 = m2.clone();
    m3.set_entry(b"x/more", Some(file(b"more", b"more")))
        .unwrap();
    let plan = recv.plan(&m3).unwrap();
    recv.stage(ChunkId::of(b"more"), b"more").unwrap();
    let err = recv
        .commit(&m3, &plan, &CommitOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("\"x\""), "{err}");
    let state = t.path().join(".dest.sync-state");
    let head = sync_core::state::read_head(&state).unwrap();
    assert!(
        sync_core::state::unfinished_journal(&state, head.as_ref())
            .unwrap()
            .is_none(),
        "failed before the journal"
    );
    assert!(
        empty_listing(&outside).is_empty(),
        "wrote through the symlink"
    );

    // A planted symlink where the plan creates a directory is replaced,
    // never entered.
    std::fs::remove_file(dest.join("x")).unwrap();
    drop(recv);
    let mut recv = Receiver::open(&dest, None).unwrap();
    let mut m4 = Manifest::empty();
    let y = dir(b"y", &inner, &mut m4);
    m4.set_entry(b"y", Some(y)).unwrap();
    symlink(&outside, dest.join("y")).unwrap();
    let plan = recv.plan(&m4).unwrap();
    recv.stage(ChunkId::of(evil), evil).unwrap();
    recv.commit(&m4, &plan, &CommitOptions::default()).unwrap();
    assert!(empty_listing(&outside).is_empty());
    assert!(std::fs::symlink_metadata(dest.join("y")).unwrap().is_dir());
}

#[test]
fn a_directory_replaced_by_a_symlink_is_removed_without_following_links() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"keep me").unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    write(&src, "d/f", b"f");
    symlink(&outside, src.join("d/escape")).unwrap();
    write(&src, "d/sub/g", b"g");
    let mut recv = Receiver::open(&dest, None).unwrap();
    push_local(&scan_tree(&src), &src, &mut recv, &CommitOptions::default()).unwrap();
    std::fs::remove_dir_all(src.join("d")).unwrap();
    symlink(&outside, src.join("d")).unwrap();
    push_local(&scan_tree(&src), &src, &mut recv, &CommitOptions::default()).unwrap();
    assert_same_fs(&read_fs(&src), &read_fs(&dest));
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep me");
    assert!(recv.verify(&VerifyOptions::default()).unwrap().is_clean());
}

#[test]
fn absurd_sizes_are_refused_without_touching_the_tree() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("dest");
    let bogus = ChunkId::of(b"bogus");
    // Chunk lengths that do not add up to the claimed 2^40 bytes.
    let mut m = Manifest::empty();
    let huge = entry(
        b"huge",
        Kind::File {
            size: 1 << 40,
            hash: FileHash::of(b"x"),
            chunks: vec![
                ChunkRef {
                    id: bogus,
                    len: 1 << 18
                };
                4
            ],
        },
    );
    let id = m.insert(&Tree {
        entries: vec![huge],
    });
    m.set_root(id).unwrap();
    let mut recv = Receiver::open(&dest, None).unwrap();
    assert!(recv.plan(&m).is_err());

    // A well-formed claim of 2^34 bytes made of one repeated bogus chunk.
    let mut m = Manifest::empty();
    let big = entry(
        b"big",
        Kind::File {
            size: 1 << 34,
            hash: FileHash::of(b"x"),
            chunks: vec![
                ChunkRef {
                    id: bogus,
                    len: 1 << 18
                };
                1 << 16
            ],
        },
    );
    m.set_entry(b"big", Some(big)).unwrap();
    let plan = recv.plan(&m).unwrap();
    assert_eq!(plan.missing.len(), 1, "one distinct chunk");
    let err = recv
        .commit(&m, &plan, &CommitOptions::default())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not enough space") || msg.contains("neither staged"),
        "{msg}"
    );
    assert!(empty_listing(&dest).is_empty());
    // Even with the chunk staged, the whole-file hash cannot match.
    let data = vec![0u8; 1 << 18];
    assert!(recv.stage(bogus, &data).is_err(), "wrong bytes for the id");
}
