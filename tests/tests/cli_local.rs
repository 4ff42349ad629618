//! End-to-end tests of `sync-cli push SRC DEST` (local) and `sync-cli
//! verify`: after every push DEST equals SRC for `diff -r`, at the lstat
//! level (modes, ns mtimes, symlink targets, sizes, hard-link groups) and
//! by scan root; unchanged pushes write nothing; `--dry-run` changes
//! nothing; verify exits 3 on any drift; a full disk fails cleanly and
//! keeps the previous snapshot.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sync_tests::edge::create_edge_tree;
use sync_tests::gen::{DlrnSpec, DlrnTree};

mod common;
use common::Env;

impl Env {
    /// `sync-cli push --json <extra> SRC DEST`, which must succeed.
    fn push(&self, src: &Path, dest: &Path, extra: &[&str]) -> Value {
        let mut args: Vec<OsString> = vec!["push".into(), "--json".into()];
        args.extend(extra.iter().map(OsString::from));
        args.push(src.into());
        args.push(dest.into());
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "push {} -> {} failed ({}): {}",
            src.display(),
            dest.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        json(&out)
    }

    fn scan_root(&self, tree: &Path) -> String {
        let out = self.cli([
            OsStr::new("scan"),
            OsStr::new("--json"),
            OsStr::new("--no-cache"),
            tree.as_os_str(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&out)["root"].as_str().unwrap().to_string()
    }

    /// `sync-cli verify --json DEST`: (exit code, report).
    fn verify(&self, dest: &Path) -> (i32, Value) {
        let out = self.cli([OsStr::new("verify"), OsStr::new("--json"), dest.as_os_str()]);
        let code = out.status.code().expect("verify exited");
        assert!(
            code == 0 || code == 3,
            "verify failed ({code}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code, json(&out))
    }
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "expected one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("JSON lacks numeric {k}: {v}"))
}

/// One entry as `lstat` (and `read`/`readlink`) sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File {
        mode: u32,
        mtime_ns: i64,
        size: u64,
        content: Vec<u8>,
    },
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
    Symlink {
        target: Vec<u8>,
        mtime_ns: i64,
    },
}

/// What a tree looks like: nodes by relative path, plus the raw identity
/// (inode, ctime) of each path, for "nothing was written" checks.
struct Lstat {
    nodes: BTreeMap<Vec<u8>, Node>,
    ino: BTreeMap<Vec<u8>, (u64, i64)>,
}

fn lstat_tree(root: &Path) -> Lstat {
    let mut t = Lstat {
        nodes: BTreeMap::new(),
        ino: BTreeMap::new(),
    };
    let md = std::fs::symlink_metadata(root).unwrap();
    t.ino.insert(Vec::new(), (md.ino(), ctime_ns(&md)));
    walk(root, &[], &mut t);
    t
}

fn ctime_ns(md: &std::fs::Metadata) -> i64 {
    md.ctime() * 1_000_000_000 + md.ctime_nsec()
}

fn walk(dir: &Path, prefix: &[u8], t: &mut Lstat) {
    for ent in std::fs::read_dir(dir).unwrap() {
        let name = ent.unwrap().file_name();
        let p = dir.join(&name);
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let md = std::fs::symlink_metadata(&p).unwrap();
        let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        let mode = md.mode() & 0o7777;
        let node = if md.file_type().is_symlink() {
            Node::Symlink {
                target: std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
                mtime_ns,
            }
        } else if md.is_dir() {
            walk(&p, &rel, t);
            Node::Dir { mode, mtime_ns }
        } else {
            assert!(md.is_file(), "{} is not a file", p.display());
            Node::File {
                mode,
                mtime_ns,
                size: md.len(),
                content: std::fs::read(&p).unwrap(),
            }
        };
        t.ino.insert(rel.clone(), (md.ino(), ctime_ns(&md)));
        t.nodes.insert(rel, node);
    }
}

/// Paths grouped by inode, for regular files with more than one name.
fn link_groups(t: &Lstat) -> Vec<Vec<Vec<u8>>> {
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (k, n) in &t.nodes {
        if matches!(n, Node::File { .. }) {
            by_ino.entry(t.ino[k].0).or_default().push(k.clone());
        }
    }
    let mut g: Vec<_> = by_ino.into_values().filter(|v| v.len() > 1).collect();
    g.sort();
    g
}

fn show(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

/// DEST equals SRC: same paths, same node by lstat, same hard-link groups.
fn assert_same_lstat(src: &Path, dest: &Path) {
    let a = lstat_tree(src);
    let b = lstat_tree(dest);
    let pa: Vec<_> = a.nodes.keys().map(|k| show(k)).collect();
    let pb: Vec<_> = b.nodes.keys().map(|k| show(k)).collect();
    assert_eq!(pa, pb, "SRC and DEST hold different paths");
    for (k, na) in &a.nodes {
        assert_eq!(na, &b.nodes[k], "{} differs", show(k));
    }
    assert_eq!(link_groups(&a), link_groups(&b), "hard-link groups differ");
}

fn assert_diff_clean(src: &Path, dest: &Path) {
    if let Some(d) = sync_tests::bins::tree_diff(src, dest) {
        panic!(
            "diff -r --no-dereference {} {} is not clean:\n{d}",
            src.display(),
            dest.display()
        );
    }
}

/// Every way of checking that DEST mirrors SRC.
fn assert_mirrored(env: &Env, src: &Path, dest: &Path, report: &Value) {
    assert_diff_clean(src, dest);
    assert_same_lstat(src, dest);
    let root = env.scan_root(src);
    assert_eq!(root, env.scan_root(dest), "scan roots differ");
    assert_eq!(report["root"].as_str(), Some(root.as_str()), "{report}");
    let (code, v) = env.verify(dest);
    assert_eq!(code, 0, "verify after push: {v}");
    assert_eq!(v["clean"], Value::Bool(true));
}

fn check_report_fields(r: &Value) {
    for k in ["root", "previous_root", "state_dir"] {
        assert!(r[k].is_string(), "{k} missing: {r}");
    }
    for k in [
        "files_written",
        "bytes_written",
        "deleted",
        "dirs_created",
        "symlinks",
    ] {
        num(r, k);
    }
    assert!(
        r["unchanged"].is_boolean() && r["dry_run"].is_boolean(),
        "{r}"
    );
}

#[test]
fn push_dlrn_tree_through_evolve_steps() {
    let env = Env::new();
    let src = env.path("src");
    let dest = env.path("dest");
    // Keep 12 builds so that evolving purges old ones (deletions on DEST).
    let spec = DlrnSpec {
        keep_builds: 12,
        ..DlrnSpec::quick()
    };
    let mut tree = DlrnTree::create(&src, spec).unwrap();

    let r = env.push(&src, &dest, &[]);
    check_report_fields(&r);
    assert_eq!(r["unchanged"], Value::Bool(false));
    assert_eq!(r["dry_run"], Value::Bool(false));
    let stats = sync_tests::gen::tree_stats(&src).unwrap();
    assert_eq!(
        num(&r, "files_written"),
        stats.files as u64,
        "initial push writes every file: {r}"
    );
    assert_eq!(num(&r, "bytes_written"), stats.bytes, "{r}");
    assert_eq!(num(&r, "deleted"), 0, "{r}");
    assert_eq!(num(&r, "symlinks"), stats.symlinks as u64, "{r}");
    assert!(dest.join("current").is_symlink());
    assert_mirrored(&env, &src, &dest, &r);

    let mut deleted = 0;
    for (step, k) in [1usize, 1, 2, 3].into_iter().enumerate() {
        let before = sync_tests::gen::tree_stats(&src).unwrap();
        tree.evolve(k).unwrap();
        let r = env.push(&src, &dest, &[]);
        check_report_fields(&r);
        assert_eq!(r["unchanged"], Value::Bool(false), "step {step}: {r}");
        let written = num(&r, "files_written");
        assert!(
            written > 0 && written < before.files as u64,
            "step {step}: an evolve writes the new builds only: {r}"
        );
        let bytes = num(&r, "bytes_written");
        assert!(bytes > 0 && bytes < before.bytes, "step {step}: {r}");
        deleted += num(&r, "deleted");
        assert_mirrored(&env, &src, &dest, &r);
    }
    assert!(deleted > 0, "purged builds were deleted on DEST");
}

#[test]
fn push_edge_tree_and_its_mutations() {
    let env = Env::new();
    let src = env.path("src");
    let dest = env.path("dest");
    create_edge_tree(&src).unwrap();
    let r = env.push(&src, &dest, &[]);
    assert_eq!(num(&r, "hardlinks"), 2, "{r}");
    assert_mirrored(&env, &src, &dest, &r);

    // Content change of a hard-linked file (both names), a symlink flipped,
    // a mode change, a directory replaced by a file, a file by a symlink,
    // a removed subtree, a new directory.
    let old = std::fs::metadata(src.join("hardlinks/a")).unwrap();
    std::fs::write(src.join("hardlinks/a"), b"changed through one name\n").unwrap();
    let t = filetime::FileTime::from_last_modification_time(&old);
    filetime::set_file_times(src.join("hardlinks/a"), t, t).unwrap();
    std::fs::remove_file(src.join("links/to_file")).unwrap();
    std::os::unix::fs::symlink("../modes/exec", src.join("links/to_file")).unwrap();
    std::fs::set_permissions(
        src.join("modes/private"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::remove_dir_all(src.join("nested-empty")).unwrap();
    std::fs::write(src.join("nested-empty"), b"now a file\n").unwrap();
    std::fs::remove_file(src.join("files/plain.txt")).unwrap();
    std::os::unix::fs::symlink("empty", src.join("files/plain.txt")).unwrap();
    std::fs::remove_dir_all(src.join("deep/d01/d02")).unwrap();
    std::fs::create_dir_all(src.join("new/dir")).unwrap();
    std::fs::write(src.join("new/dir/file"), b"new\n").unwrap();

    let r = env.push(&src, &dest, &[]);
    assert!(num(&r, "deleted") > 0, "{r}");
    assert_mirrored(&env, &src, &dest, &r);
    assert_eq!(
        std::fs::metadata(dest.join("hardlinks/a")).unwrap().ino(),
        std::fs::metadata(dest.join("hardlinks/b")).unwrap().ino()
    );
}

#[test]
fn unchanged_push_writes_nothing() {
    let env = Env::new();
    let src = env.path("src");
    let dest = env.path("dest");
    DlrnTree::create(&src, DlrnSpec::quick()).unwrap();
    let first = env.push(&src, &dest, &[]);
    let before = lstat_tree(&dest);
    for extra in [&[][..], &["--no-cache"][..]] {
        let r = env.push(&src, &dest, extra);
        assert_eq!(r["unchanged"], Value::Bool(true), "{r}");
        assert_eq!(num(&r, "files_written"), 0, "{r}");
        assert_eq!(num(&r, "bytes_written"), 0, "{r}");
        assert_eq!(num(&r, "deleted"), 0, "{r}");
        assert_eq!(r["root"], first["root"]);
        assert_eq!(r["previous_root"], first["root"]);
    }
    let after = lstat_tree(&dest);
    assert_eq!(before.nodes, after.nodes);
    assert_eq!(
        before.ino, after.ino,
        "an unchanged push must not touch any inode (ctime moved)"
    );
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let env = Env::new();
    let src = env.path("src");
    let dest = env.path("dest");
    let mut tree = DlrnTree::create(
        &src,
        DlrnSpec {
            keep_builds: 12,
            ..DlrnSpec::quick()
        },
    )
    .unwrap();
    env.push(&src, &dest, &[]);
    let snapshot = env.path("snapshot");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&snapshot)
        .status();
    assert!(st.unwrap().success());
    tree.evolve(3).unwrap();
    let before = lstat_tree(&dest);
    let state = env.path(".dest.sync-state");
    let state_before = lstat_tree(&state);

    // Text: the plan, naming the new builds.
    let out = env.cli([
        OsStr::new("push"),
        OsStr::new("--dry-run"),
        src.as_os_str(),
        dest.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("plan "), "{text}");
    assert!(text.contains("would write"), "{text}");
    let newest = tree.current_target();
    assert!(
        text.contains(newest.to_str().unwrap()),
        "the plan names the new build {}:\n{text}",
        newest.display()
    );

    // JSON: the counts the real push will then report.
    let dry = env.push(&src, &dest, &["--dry-run"]);
    assert_eq!(dry["dry_run"], Value::Bool(true));
    assert!(num(&dry, "files_written") > 0, "{dry}");

    let after = lstat_tree(&dest);
    assert_eq!(before.nodes, after.nodes, "dry run changed DEST");
    assert_eq!(before.ino, after.ino, "dry run touched DEST");
    assert_same_lstat(&snapshot, &dest);
    assert_eq!(
        state_before.nodes,
        lstat_tree(&state).nodes,
        "dry run changed the state dir"
    );
    assert_eq!(env.verify(&dest).0, 0);

    let real = env.push(&src, &dest, &[]);
    for k in ["files_written", "bytes_written", "deleted"] {
        assert_eq!(num(&real, k), num(&dry, k), "{k}: dry {dry} real {real}");
    }
    assert_eq!(real["root"], dry["root"]);
    assert_mirrored(&env, &src, &dest, &real);
}

#[test]

fn dry_run_into_a_missing_dest_creates_nothing() {
    let env = Env::new();
    let src = env.path("src");
    let dest = env.path("dest");
    create_edge_tree(&src).unwrap();
    let r = env.push(&src, &dest, &["--dry-run"]);
    assert!(num(&r, "files_written") > 0, "{r}");
    assert!(!dest.exists(), "dry run created DEST");
    assert!(
        !env.path(".dest.sync-state").exists(),
        "dry run created the state dir"
    );
}

/// A pushed copy of the quick DLRN tree in a fresh DEST under `env`.
fn pushed(env: &Env, src: &Path, name: &str) -> PathBuf {
    let dest = env.path(name);
    env.push(src, &dest, &[]);
    assert_eq!(env.verify(&dest).0, 0);
    dest
}

fn first_file(root: &Path) -> PathBuf {
    let t = lstat_tree(root);
    let (k, _) = t
        .nodes
        .iter()
        .find(|(_, n)| matches!(n, Node::File { size, .. } if *size > 0))
        .expect("a non-empty file");
    root.join(OsStr::from_bytes(k))
}

fn has_example(v: &Value, path_part: &str) -> bool {
    v["examples"].as_array().is_some_and(|a| {
        a.iter()
            .any(|e| e["path"].as_str().is_some_and(|p| p.contains(path_part)))
    })
}

#[test]
fn verify_reports_drift_with_exit_3() {
    let env = Env::new();
    let src = env.path("src");
    DlrnTree::create(&src, DlrnSpec::quick()).unwrap();

    // Clean.
    let dest = pushed(&env, &src, "clean");
    let (code, v) = env.verify(&dest);
    assert_eq!(code, 0);
    assert_eq!(v["clean"], Value::Bool(true), "{v}");
    assert!(num(&v, "entries") > 0);
    assert_eq!(
        num(&v, "missing") + num(&v, "extra") + num(&v, "modified"),
        0
    );
    let text = env.cli([OsStr::new("verify"), dest.as_os_str()]);
    assert_eq!(text.status.code(), Some(0));

    // One byte changed, size and mtime kept: only the content shows it.
    let dest = pushed(&env, &src, "byte");
    let f = first_file(&dest);
    let md = std::fs::metadata(&f).unwrap();
    let mut data = std::fs::read(&f).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    std::fs::write(&f, &data).unwrap();
    let t = filetime::FileTime::from_last_modification_time(&md);
    filetime::set_file_times(&f, t, t).unwrap();
    let (code, v) = env.verify(&dest);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["clean"], Value::Bool(false));
    assert_eq!(num(&v, "modified"), 1, "{v}");
    let name = f.file_name().unwrap().to_str().unwrap();
    assert!(has_example(&v, name), "{v}");
    let text = env.cli([OsStr::new("verify"), dest.as_os_str()]);
    assert_eq!(text.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&text.stdout).contains(name));

    // A mode change.
    let dest = pushed(&env, &src, "chmod");
    let f = first_file(&dest);
    let mode = std::fs::metadata(&f).unwrap().mode() & 0o7777;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode ^ 0o100)).unwrap();
    let (code, v) = env.verify(&dest);
    assert_eq!(code, 3, "{v}");
    assert_eq!(num(&v, "modified"), 1, "{v}");
    assert!(
        has_example(&v, f.file_name().unwrap().to_str().unwrap()),
        "{v}"
    );

    // An extra file.
    let dest = pushed(&env, &src, "extra");
    std::fs::write(dest.join("stray-file"), b"not in the manifest\n").unwrap();
    let (code, v) = env.verify(&dest);
    assert_eq!(code, 3, "{v}");
    assert!(num(&v, "extra") >= 1, "{v}");
    assert!(has_example(&v, "stray-file"), "{v}");

    // A missing file.
    let dest = pushed(&env, &src, "missing");
    let f = first_file(&dest);
    std::fs::remove_file(&f).unwrap();
    let (code, v) = env.verify(&dest);
    assert_eq!(code, 3, "{v}");
    assert!(num(&v, "missing") >= 1, "{v}");
}

/// A tmpfs mounted for one test, unmounted on drop (also on panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Tmpfs(dir.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn noise_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

#[test]
fn disk_full_fails_cleanly_and_keeps_the_previous_snapshot() {
    let env = Env::new();
    if !is_root() {
        eprintln!("note: disk-full test skipped: needs root to mount a tmpfs");
        return;
    }
    let mnt = env.path("mnt");
    let _guard = match Tmpfs::mount(&mnt, "2m") {
        Ok(g) => g,
        Err(e) => {
            eprintln!("note: disk-full test skipped: mount -t tmpfs failed: {e}");
            return;
        }
    };
    let dest = mnt.join("dest");

    // A small tree fits.
    let small = env.path("small");
    noise_file(&small.join("a/one"), 100_000, 1);
    noise_file(&small.join("a/two"), 50_000, 2);
    std::os::unix::fs::symlink("a/one", small.join("current")).unwrap();
    let first = env.push(&small, &dest, &[]);
    assert_mirrored(&env, &small, &dest, &first);

    // The next snapshot does not: 4 MiB of new content into 2 MiB.
    let big = env.path("big");
    let st = Command::new("cp").arg("-a").arg(&small).arg(&big).status();
    assert!(st.unwrap().success());
    for i in 0..8 {
        noise_file(&big.join(format!("b/part{i}")), 512 * 1024, 10 + i);
    }
    std::fs::remove_file(big.join("current")).unwrap();
    std::os::unix::fs::symlink("b/part0", big.join("current")).unwrap();
    let out = env.cli([
        OsStr::new("push"),
        OsStr::new("--json"),
        big.as_os_str(),
        dest.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "push into a full disk: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("space"),
        "the error names the lack of space: {stderr}"
    );
    assert!(out.stdout.is_empty(), "no report on failure");

    // DEST still holds the previous snapshot, and verify agrees.
    assert_same_lstat(&small, &dest);
    assert_diff_clean(&small, &dest);
    let (code, v) = env.verify(&dest);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["root"], first["root"]);

    // After space is freed (a smaller big tree), the push goes through.
    for i in 2..8 {
        std::fs::remove_file(big.join(format!("b/part{i}"))).unwrap();
    }
    let r = env.push(&big, &dest, &[]);
    assert_mirrored(&env, &big, &dest, &r);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
