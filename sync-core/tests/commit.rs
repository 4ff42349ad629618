//! Round trips through the commit engine: a tree with every awkward kind of
//! entry is committed into an empty DEST, re-committed unchanged, changed
//! in every way a snapshot can change and committed again; each time DEST
//! is compared with SRC at the lstat level and by re-scanning.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use common::*;
use sync_core::commit::{push_local, push_local_staged, CommitOptions, Receiver};
use sync_core::verify::{Problem, VerifyOptions};

const T: i64 = 1_600_000_000_123_456_789;

fn build_src(src: &Path) {
    write(src, "a.txt", b"hello\n");
    write(src, "same1", b"shared content");
    write(src, "d1/same2", b"shared content");
    write(src, "d1/d2/deep.txt", b"deep");
    write(src, "d1/d2/big.bin", &noise(4_900_000, 1));
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::create_dir_all(src.join("sticky")).unwrap();
    write(src, "sticky/x", b"x");
    write(src, "suid", b"#!/bin/sh\n");
    write(src, "ro", b"read only");
    write(src, "zero", b"");
    std::fs::hard_link(src.join("a.txt"), src.join("d1/hard")).unwrap();
    std::fs::create_dir_all(src.join("names")).unwrap();
    std::fs::write(p(src, b"names/caf\xe9"), b"latin-1 name").unwrap();
    let long = "n".repeat(255);
    write(src, &format!("names/{long}"), b"long name");
    ln_s("nowhere/at/all", src, "dangling");
    ln_s("/etc/passwd", src, "absolute");
    ln_s("d1", src, "todir");
    ln_s("d1/d2/deep.txt", src, "tofile");
    ln_s("a.txt", src, "swap-me");
    std::fs::create_dir_all(src.join("becomes-link")).unwrap();
    write(src, "becomes-link/inner", b"inner");
    fix_mtimes(src, T);
    set_mtime(&src.join("d1/d2/deep.txt"), 1_234_567_891);
    set_mtime(&src.join("zero"), -1_500_000_000);
    chmod(&src.join("suid"), 0o4755);
    chmod(&src.join("ro"), 0o444);
    chmod(&src.join("sticky"), 0o1777);
    set_mtime(&src.join("sticky"), T + 7);
}

fn check(src: &Path, dest: &Path) {
    assert_same_fs(&read_fs(src), &read_fs(dest));
    assert_eq!(scan_tree(src).root(), scan_tree(dest).root());
}

#[test]
fn round_trip_then_every_kind_of_change() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    std::fs::create_dir(&src).unwrap();
    build_src(&src);
    let opts = CommitOptions::default();

    let m1 = scan_tree(&src);
    let mut recv = Receiver::open(&dest, None).unwrap();
    assert_eq!(
        recv.state_dir(),
        t.path().canonicalize().unwrap().join(".dest.sync-state")
    );
    let s = push_local(&m1, &src, &mut recv, &opts).unwrap();
    assert!(s.files_written >= 10, "{s:?}");
    assert_eq!(s.root, Some(m1.snapshot()));
    check(&src, &dest);
    assert!(recv.verify(&VerifyOptions::default()).unwrap().is_clean());

    // Unchanged: an empty plan, nothing touched.
    let before = read_fs(&dest);
    let plan = recv.plan(&m1).unwrap();
    assert!(plan.is_empty(), "{plan}");
    push_local(&m1, &src, &mut recv, &opts).unwrap();
    assert_eq!(read_fs(&dest), before, "a no-op commit changed the tree");
    drop(recv);

    // Every kind of change.
    write(&src, "a.txt", b"hello again\n");
    std::fs::remove_dir_all(src.join("d1/d2")).unwrap();
    std::fs::remove_dir_all(src.join("becomes-link")).unwrap();
    ln_s("sticky", &src, "becomes-link");
    std::fs::remove_file(src.join("swap-me")).unwrap();
    write(&src, "swap-me/now-a-dir", b"was a symlink");
    std::fs::remove_file(src.join("todir")).unwrap();
    ln_s("names", &src, "todir");
    write(&src, "d1/new/file", &noise(5_000_000, 2));
    chmod(&src.join("ro"), 0o400);
    set_mtime(&src.join("same1"), T + 99);
    std::fs::remove_file(src.join("zero")).unwrap();
    std::fs::rename(src.join("suid"), src.join("suid2")).unwrap();
    set_mtime(&src.join("d1"), T + 5);
    set_mtime(&src, T);

    let m2 = scan_tree(&src);
    let mut recv = Receiver::open(&dest, None).unwrap();
    assert_eq!(
        recv.committed().root(),
        m1.root(),
        "state found without a flag"
    );
    let plan = recv.plan(&m2).unwrap();
    let text = plan.to_string();
    assert!(
        text.contains("symlink  becomes-link -> sticky (replaces Dir)"),
        "{text}"
    );
    assert!(
        text.contains("mkdir    swap-me/ (replaces Symlink)"),
        "{text}"
    );
    assert!(text.contains("delete   d1/d2/"), "{text}");
    assert!(
        recv.missing_chunks(&plan).len() < plan.chunks.len(),
        "moved content is found in the tree"
    );
    push_local_staged(&m2, &src, &mut recv, &opts).unwrap();
    check(&src, &dest);
    assert!(recv.verify(&VerifyOptions::default()).unwrap().is_clean());

    // And back to the first snapshot's shape from a fresh copy of SRC.
    let src2 = t.path().join("src2");
    std::fs::create_dir(&src2).unwrap();
    build_src(&src2);
    let m3 = scan_tree(&src2);
    assert_eq!(m3.root(), m1.root());
    push_local(&m3, &src2, &mut recv, &opts).unwrap();
    check(&src2, &dest);
}

#[test]
fn a_second_receiver_is_refused_while_one_is_open() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("dest");
    let state = t.path().join("elsewhere");
    let _a = Receiver::open(&dest, Some(&state)).unwrap();
    let err = Receiver::open(&dest, Some(&state)).unwrap_err();
    assert!(err.to_string().contains("locked"), "{err}");
}

#[test]
fn chunks_come_from_staging_or_the_tree_only_once() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    write(&src, "x/big", &noise(6_000_000, 3));
    write(&src, "small", b"small");
    let m1 = scan_tree(&src);
    let mut recv = Receiver::open(&dest, None).unwrap();
    let plan = recv.plan(&m1).unwrap();
    assert_eq!(recv.missing_chunks(&plan).len(), plan.chunks.len());
    // Stage half, "crash" (drop without commit), reopen: the staged half
    // is not asked for again.
    let missing = recv.missing_chunks(&plan);
    let src_bytes = std::fs::read(src.join("x/big")).unwrap();
    let mut staged = 0;
    let file = m1.lookup(b"x/big").unwrap().unwrap();
    if let sync_core::Kind::File { size, hash, chunks } = &file.kind {
        for (id, off, len) in sync_core::chunk::chunk_spans(*size, *hash, chunks).take(5) {
            recv.stage(id, &src_bytes[off as usize..(off + len as u64) as usize])
                .unwrap();
            staged += 1;
        }
    }
    assert!(recv
        .stage(missing[0].0, b"wrong bytes")
        .unwrap_err()
        .to_string()
        .contains("does not match"));
    recv.sync_staging().unwrap();
    drop(recv);
    let mut recv = Receiver::open(&dest, None).unwrap();
    assert_eq!(recv.missing_chunks(&plan).len(), plan.chunks.len() - staged);
    push_local_staged(&m1, &src, &mut recv, &CommitOptions::default()).unwrap();
    check(&src, &dest);

    // The same big file copied elsewhere: every chunk is in the tree.
    std::fs::copy(src.join("x/big"), src.join("copy")).unwrap();
    let m2 = scan_tree(&src);
    let plan = recv.plan(&m2).unwrap();
    assert!(!plan.chunks.is_empty());
    assert!(recv.missing_chunks(&plan).is_empty());
    // Changed behind our back: the tree copy no longer verifies.
    let mut bytes = std::fs::read(dest.join("x/big")).unwrap();
    bytes[10] ^= 1;
    std::fs::write(dest.join("x/big"), &bytes).unwrap();
    let err = recv
        .commit(&m2, &plan, &CommitOptions::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("neither staged nor found"),
        "{err}"
    );
    assert_eq!(
        read_fs(&dest).len(),
        3,
        "a failed commit left the tree alone"
    );
    // A local push reads what the tree cannot give from the source.
    push_local(&m2, &src, &mut recv, &CommitOptions::default()).unwrap();
    assert_eq!(
        std::fs::read(dest.join("copy")).unwrap(),
        std::fs::read(src.join("x/big")).unwrap()
    );
    // The damaged file is not part of the change, so it stays damaged, and
    // verify says so.
    let r = recv.verify(&VerifyOptions::default()).unwrap();
    assert_eq!(r.modified, 1, "{r}");
    assert!(r
        .examples
        .iter()
        .any(|i| i.path == "x/big" && i.problem == Problem::Content));
}

#[test]
fn verify_detects_each_kind_of_damage() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    write(&src, "f", b"content");
    write(&src, "g", b"other");
    write(&src, "h", b"third");
    write(&src, "gone", b"will vanish");
    ln_s("f", &src, "l");
    fix_mtimes(&src, T);
    let m = scan_tree(&src);
    let mut recv = Receiver::open(&dest, None).unwrap();
    push_local(&m, &src, &mut recv, &CommitOptions::default()).unwrap();
    assert!(recv.verify(&VerifyOptions::default()).unwrap().is_clean());

    std::fs::write(dest.join("f"), b"cOntent").unwrap();
    set_mtime(&dest.join("f"), T);
    chmod(&dest.join("g"), 0o600);
    set_mtime(&dest.join("h"), T + 1);
    std::fs::remove_file(dest.join("l")).unwrap();
    symlink("g", dest.join("l")).unwrap();
    set_mtime(&dest.join("l"), T);
    std::fs::write(dest.join("extra"), b"x").unwrap();
    std::fs::remove_file(dest.join("gone")).unwrap();
    let r = recv.verify(&VerifyOptions::default()).unwrap();
    let problems: Vec<(String, Problem)> = r
        .examples
        .iter()
        .map(|i| (i.path.clone(), i.problem))
        .collect();
    for want in [
        ("f", Problem::Content),
        ("g", Problem::Mode),
        ("h", Problem::Mtime),
        ("l", Problem::Target),
        ("extra", Problem::Extra),
        ("gone", Problem::Missing),
    ] {
        assert!(
            problems.contains(&(want.0.to_string(), want.1)),
            "{want:?} not in {problems:?}"
        );
    }
    assert_eq!((r.missing, r.extra, r.modified), (1, 1, 4), "{r}");
    // The fast mode trusts size and mtime: the byte flip goes unseen.
    let fast = recv
        .verify(&VerifyOptions {
            content: false,
            ..VerifyOptions::default()
        })
        .unwrap();
    assert_eq!(fast.modified, 3);
}

/// Staged chunks are only handed to the page cache before they are
/// acknowledged; if a power loss damaged one anyway, the commit fails
/// cleanly, the tree keeps its snapshot, and the receiver asks for the
/// chunk again instead of trusting its staging forever.
#[test]
fn a_damaged_staged_chunk_is_asked_for_again() {
    use sync_core::hash::ChunkId;
    let t = tempfile::tempdir().unwrap();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    std::fs::create_dir(&src).unwrap();
    write(&src, "a", &noise(100_000, 7));
    write(&src, "b", &noise(200_000, 8));
    fix_mtimes(&src, T);
    let m = scan_tree(&src);
    let data = |id: &ChunkId| {
        for name in ["a", "b"] {
            let bytes = std::fs::read(src.join(name)).unwrap();
            if ChunkId::of(&bytes) == *id {
                return bytes;
            }
        }
        panic!("no file holds {id}");
    };

    let mut recv = Receiver::open(&dest, None).unwrap();
    let plan = recv.plan(&m).unwrap();
    let missing = recv.missing_chunks(&plan);
    assert_eq!(missing.len(), 2);
    for (id, _) in &missing {
        recv.stage(*id, &data(id)).unwrap();
    }
    recv.persist_staging().unwrap();
    let state = recv.state_dir().to_path_buf();
    drop(recv);

    // Flip one byte of the pack, as a lost write would leave it.
    let pack = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("pack"))
        .find(|p| p.exists())
        .or_else(|| Some(state.join("pack")).filter(|p| p.exists()))
        .expect("a staging pack");
    let mut bytes = std::fs::read(&pack).unwrap();
    assert_eq!(bytes.len(), 300_000, "both chunks reached the pack");
    bytes[150_000] ^= 0xff;
    std::fs::write(&pack, &bytes).unwrap();

    let mut recv = Receiver::open(&dest, None).unwrap();
    let plan = recv.plan(&m).unwrap();
    assert!(
        recv.missing_chunks(&plan).is_empty(),
        "staging survived the restart"
    );
    let err = recv
        .commit(&m, &plan, &CommitOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("chunk"), "{err}");
    assert_eq!(
        std::fs::read_dir(&dest).unwrap().count(),
        0,
        "tree untouched"
    );
    // Asked again, and then the commit goes through.
    let again = recv.missing_chunks(&plan);
    assert!(!again.is_empty());
    for (id, _) in &again {
        recv.stage(*id, &data(id)).unwrap();
    }
    recv.commit(&m, &plan, &CommitOptions::default()).unwrap();
    check(&src, &dest);
}
