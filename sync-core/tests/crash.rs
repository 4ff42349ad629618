//! Crash safety: a push of a DLRN-like snapshot is SIGKILLed at every crash
//! point in turn (the test binary re-runs itself as the child, with
//! `SYNC_CRASH_AT=N`). At each kill point, every symlink in DEST must lead
//! to a complete old or new subtree, a kill before the journal must leave
//! DEST untouched, and a re-run must finish with DEST equal to SRC.
//! Also: injected ENOSPC at several writes fails cleanly, and a real small
//! tmpfs (when this runs as root and may mount) does too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sync_core::commit::{push_local, push_local_staged, CommitOptions, Receiver};
use sync_core::verify::VerifyOptions;

const T: i64 = 1_650_000_000_000_000_000;

/// The child: push `SYNC_CHILD_SRC` into `SYNC_CHILD_DEST` through staging.
/// Run only by the tests below (it is ignored in a normal run).
#[test]
#[ignore = "child process of the crash tests"]
fn crash_child() {
    let (Some(src), Some(dest)) = (
        std::env::var_os("SYNC_CHILD_SRC"),
        std::env::var_os("SYNC_CHILD_DEST"),
    ) else {
        return;
    };
    let (src, dest) = (PathBuf::from(src), PathBuf::from(dest));
    let m = scan_tree(&src);
    let r = Receiver::open(&dest, None)
        .and_then(|mut recv| push_local_staged(&m, &src, &mut recv, &CommitOptions::default()));
    if let Err(e) = r {
        eprintln!("CHILD-ERROR: {e}");
        std::process::exit(3);
    }
}

struct Child {
    code: Option<i32>,
    stderr: String,
}

fn run_child(src: &Path, dest: &Path, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "crash_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("SYNC_CHILD_SRC", src)
    .env("SYNC_CHILD_DEST", dest)
    .env_remove("SYNC_CRASH_AT")
    .env_remove("SYNC_CRASH_LIST")
    .env_remove("SYNC_FAIL_ENOSPC_AT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Child {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Old snapshot: two repositories, `current` and `old` pointing at them.
fn build_v1(src: &Path) {
    for (repo, seed) in [("repos/aa/r1", 10), ("repos/bb/r2", 20)] {
        write(src, &format!("{repo}/a.rpm"), &noise(3000, seed));
        write(src, &format!("{repo}/b.rpm"), &noise(5000, seed + 1));
        write(src, &format!("{repo}/repodata/repomd.xml"), repo.as_bytes());
        write(
            src,
            &format!("{repo}/repodata/primary.xml"),
            &noise(700, seed + 2),
        );
        ln_s("a.rpm", src, &format!("{repo}/link.rpm"));
    }
    write(src, "README", b"v1\n");
    write(src, "big.bin", &noise(700_000, 5));
    write(src, "dir-to-link/inside", b"inside");
    ln_s("README", src, "link-to-dir");
    ln_s("repos/aa/r1", src, "current");
    ln_s("repos/aa/r1", src, "consistent");
    ln_s("repos/bb/r2", src, "old");
    ln_s("../../README", src, "repos/aa/readme");
    fix_mtimes(src, T);
}

/// New snapshot: a third repository that `current` flips to, `old` and its
/// repository gone, kind changes, a grown big file, hard links.
fn build_v2(src: &Path) {
    build_v1(src);
    std::fs::remove_dir_all(src.join("repos/bb")).unwrap();
    std::fs::remove_file(src.join("old")).unwrap();
    let repo = "repos/cc/r3";
    write(src, &format!("{repo}/a.rpm"), &noise(3000, 10)); // same as r1
    for i in 0..12 {
        write(
            src,
            &format!("{repo}/pkg{i:02}.rpm"),
            &noise(2000 + i * 10, 30 + i as u64),
        );
    }
    write(src, &format!("{repo}/repodata/repomd.xml"), repo.as_bytes());
    std::fs::hard_link(
        src.join(format!("{repo}/pkg00.rpm")),
        src.join(format!("{repo}/pkg00-hard.rpm")),
    )
    .unwrap();
    ln_s("a.rpm", src, &format!("{repo}/link.rpm"));
    std::fs::remove_file(src.join("current")).unwrap();
    ln_s(repo, src, "current");
    write(src, "README", b"v2\n");
    let mut big = noise(700_000, 5);
    big.extend_from_slice(&noise(100_000, 6));
    write(src, "big.bin", &big);
    std::fs::remove_dir_all(src.join("dir-to-link")).unwrap();
    ln_s("repos/cc/r3", src, "dir-to-link");
    std::fs::remove_file(src.join("link-to-dir")).unwrap();
    write(src, "link-to-dir/now", b"a dir");
    // What did not change keeps its mtime, as on a real build server.
    let fs = read_fs(src);
    for (k, n) in fs.iter().rev() {
        let mt = match n {
            Node::File { mtime_ns, .. }
            | Node::Dir { mtime_ns, .. }
            | Node::Symlink { mtime_ns, .. } => *mtime_ns,
        };
        if mt != T {
            set_mtime(&p(src, k), T + 1_000_000_000);
        }
    }
}

/// The subtree at `at` (content only), `None` if absent.
fn subtree(fs: &Fs, at: &[u8]) -> Option<Vec<(Vec<u8>, Node)>> {
    let top = fs.get(at)?;
    let mut out = vec![(Vec::new(), top.content_only())];
    let mut prefix = at.to_vec();
    prefix.push(b'/');
    for (k, n) in fs.range(prefix.clone()..) {
        if !k.starts_with(&prefix) {
            break;
        }
        out.push((k[prefix.len()..].to_vec(), n.content_only()));
    }
    Some(out)
}

/// Every symlink in `now` must be one of old or new (same path, same
/// target) and lead to exactly what it led to in that snapshot.
fn check_symlinks(now: &Fs, old: &Fs, new: &Fs, point: u64) {
    for (path, node) in now {
        let Node::Symlink { target, .. } = node else {
            continue;
        };
        let name = String::from_utf8_lossy(path);
        let owners: Vec<&Fs> = [old, new]
            .into_iter()
            .filter(
                |fs| matches!(fs.get(path), Some(Node::Symlink { target: t, .. }) if t == target),
            )
            .collect();
        assert!(
            !owners.is_empty(),
            "point {point}: symlink {name} is in neither snapshot"
        );
        let Some(to) = sync_core::plan::resolve_target(path, target) else {
            continue;
        };
        let here = subtree(now, &to);
        assert!(
            owners.iter().any(|fs| subtree(fs, &to) == here),
            "point {point}: symlink {name} -> {} leads to an incomplete tree",
            String::from_utf8_lossy(target)
        );
    }
}

/// A new repository appears whole: once `at` exists in `now`, every
/// directory and file of `new` below it is there with its content (hard
/// links and symlinks pointing out of it come later, in their phases).
fn check_whole(now: &Fs, new: &Fs, at: &[u8], point: u64) {
    let Some(here) = subtree(now, at) else {
        return;
    };
    let here: std::collections::BTreeMap<_, _> = here.into_iter().collect();
    for (path, node) in subtree(new, at).expect("in the new snapshot") {
        // pkg00.rpm and pkg00-hard.rpm are one file: the later name is a
        // hard link to the first.
        if matches!(node, Node::Symlink { .. }) || path.starts_with(b"r3/pkg00") {
            continue;
        }
        assert_eq!(
            here.get(&path),
            Some(&node),
            "point {point}: {}/{} missing or incomplete in a new repository",
            String::from_utf8_lossy(at),
            String::from_utf8_lossy(&path)
        );
    }
}

fn reset_to(dest: &Path, src: &Path) {
    let mut recv = Receiver::open(dest, None).unwrap();
    push_local(&scan_tree(src), src, &mut recv, &CommitOptions::default()).unwrap();
}

/// The old and new snapshots built under `dir`, and where DEST goes.
fn two_versions(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (v1, v2) = (dir.join("v1"), dir.join("v2"));
    build_v1(&v1);
    build_v2(&v2);
    (v1, v2, dir.join("dest"))
}

/// The crash points of one push from `v1` to `v2` (name of each, in order).
fn crash_points(v1: &Path, v2: &Path, dest: &Path) -> Vec<String> {
    reset_to(dest, v1);
    let listed = run_child(v2, dest, &[("SYNC_CRASH_LIST", "1".into())]);
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    assert_same_fs(&read_fs(dest), &read_fs(v2));
    listed
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("crashpoint "))
        .map(|l| l.split_once(' ').map_or("", |(_, name)| name).to_string())
        .collect()
}

/// Kill the push from `v1` to `v2` at each of `points`, check what a
/// consumer would see, re-run it, and count (untouched, rolled forward).
fn kill_at(v1: &Path, v2: &Path, dest: &Path, points: &[u64]) -> (u32, u32) {
    let (fs1, fs2) = (read_fs(v1), read_fs(v2));
    let state = dest.with_file_name(".dest.sync-state");
    let mut untouched = 0;
    let mut rolled = 0;
    for &n in points {
        reset_to(dest, v1);
        assert_same_fs(&read_fs(dest), &fs1);
        let c = run_child(v2, dest, &[("SYNC_CRASH_AT", n.to_string())]);
        assert_eq!(
            c.code, None,
            "point {n}: the child was not killed: {}",
            c.stderr
        );
        let now = read_fs(dest);
        check_symlinks(&now, &fs1, &fs2, n);
        check_whole(&now, &fs2, b"repos/cc", n);
        let head = sync_core::state::read_head(&state).unwrap();
        if sync_core::state::unfinished_journal(&state, head.as_ref())
            .unwrap()
            .is_none()
        {
            let committed = sync_core::state::peek_committed_root(&state).unwrap();
            if committed == scan_tree(v1).root() {
                // Killed before the journal: the tree was not touched at all.
                assert_same_fs(&now, &fs1);
                untouched += 1;
            }
        } else {
            rolled += 1;
        }
        // Whatever happened, a plain re-run finishes the job.
        let c = run_child(v2, dest, &[]);
        assert_eq!(c.code, Some(0), "point {n}: re-run failed: {}", c.stderr);
        assert_same_fs(&read_fs(dest), &fs2);
        let recv = Receiver::open(dest, None).unwrap();
        assert!(recv.verify(&VerifyOptions::default()).unwrap().is_clean());
    }
    (untouched, rolled)
}

#[test]
fn sigkill_at_every_crash_point_rolls_forward_or_leaves_the_old_tree() {
    let t = tempfile::tempdir().unwrap();
    let (v1, v2, dest) = two_versions(t.path());
    let total = crash_points(&v1, &v2, &dest).len() as u64;
    assert!(total >= 50, "only {total} crash points");
    eprintln!("{total} crash points in one push");
    let all: Vec<u64> = (1..=total).collect();
    let (untouched, rolled) = kill_at(&v1, &v2, &dest, &all);
    assert!(
        untouched > 10 && rolled > 10,
        "untouched {untouched}, rolled {rolled}"
    );
}

/// A new repository with a farm of symlinks big enough to be made on
/// several threads (and `current` flipped to it only after the farm):
/// killed at points spread over the symlink phase, each symlink still
/// leads to a complete old or new subtree, and a re-run finishes.
#[test]
fn sigkill_during_a_parallel_symlink_wave() {
    let t = tempfile::tempdir().unwrap();
    let (v1, v2, dest) = two_versions(t.path());
    // A quarter point inside the new repository and a quarter at a
    // package this snapshot leaves alone (both made with the repository,
    // before the journal), half at the README it changes (made in the
    // tree, after the repository is in place).
    for i in 0..3000 {
        let to = match i % 4 {
            0 => format!("../../pkg{:02}.rpm", i % 12),
            1 => "../../../../aa/r1/a.rpm".to_string(),
            _ => "../../../../../README".to_string(),
        };
        ln_s(&to, &v2, &format!("repos/cc/r3/farm/{:02}/l{i:04}", i % 7));
    }
    ln_s("repos/cc/r3/farm/03", &v2, "farm-current");
    let names = crash_points(&v1, &v2, &dest);
    let flips: Vec<u64> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| n.as_str() == "symlink-flipped")
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert!(flips.len() > 100, "{} symlink crash points", flips.len());
    let picked: Vec<u64> = flips.iter().step_by(flips.len() / 16).copied().collect();
    let (_, rolled) = kill_at(&v1, &v2, &dest, &picked);
    assert_eq!(rolled as usize, picked.len(), "all after the journal");
}

#[test]
fn injected_enospc_fails_cleanly_and_keeps_the_old_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let (v1, v2, dest) = two_versions(t.path());
    let fs1 = read_fs(&v1);
    let root1 = scan_tree(&v1).root();
    reset_to(&dest, &v1);
    for n in [1, 2, 3, 5, 8] {
        let c = run_child(&v2, &dest, &[("SYNC_FAIL_ENOSPC_AT", n.to_string())]);
        assert_eq!(c.code, Some(3), "write {n}: {}", c.stderr);
        assert!(c.stderr.contains("No space left on device"), "{}", c.stderr);
        assert_same_fs(&read_fs(&dest), &fs1);
        assert_eq!(scan_tree(&dest).root(), root1);
        let recv = Receiver::open(&dest, None).unwrap();
        assert_eq!(recv.committed().root(), root1);
        assert!(recv.verify(&VerifyOptions::default()).unwrap().is_clean());
    }
    let c = run_child(&v2, &dest, &[]);
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert_same_fs(&read_fs(&dest), &read_fs(&v2));
}

#[test]
fn a_real_full_tmpfs_fails_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = rustix::process::geteuid().is_root()
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("note: not root or cannot mount tmpfs; real disk-full variant skipped");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&mnt);
    let (v1, v2, dest) = (t.path().join("v1"), t.path().join("v2"), mnt.join("dest"));
    write(&v1, "small", b"fits");
    write(&v1, "link-target/x", b"x");
    ln_s("link-target", &v1, "current");
    std::fs::create_dir(&v2).unwrap();
    copy_tree(&v1.join("small"), &v2.join("small"));
    // Fits the preflight estimate but not staging plus temporaries.
    for i in 0..3 {
        write(&v2, &format!("new/f{i}"), &noise(300_000, 40 + i));
    }
    ln_s("new", &v2, "current");
    let fs1 = read_fs(&v1);
    let mut recv = Receiver::open(&dest, None).unwrap();
    push_local(&scan_tree(&v1), &v1, &mut recv, &CommitOptions::default()).unwrap();
    let m2 = scan_tree(&v2);
    let err = push_local_staged(&m2, &v2, &mut recv, &CommitOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("No space left") || msg.contains("not enough space"),
        "{msg}"
    );
    drop(recv);
    assert_same_fs(&read_fs(&dest), &fs1);
    let recv = Receiver::open(&dest, None).unwrap();
    assert_eq!(recv.committed().root(), scan_tree(&v1).root());
    assert!(recv.verify(&VerifyOptions::default()).unwrap().is_clean());
}
