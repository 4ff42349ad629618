//! End-to-end tests of `sync-cli scan`: the root is a function of bytes and
//! metadata only (a `cp -a` copy scans the same), the counts match an
//! independent walk, every whole-file hash matches `b3sum`, the hash cache
//! is reused, and special files are skipped with a warning.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sync_core::scan::{scan, ScanOptions};
use sync_core::Kind;
use sync_tests::bins;
use sync_tests::edge::{create_edge_tree, create_special_files};
use sync_tests::gen::{DlrnSpec, DlrnTree};

mod common;
use common::Env;

impl Env {
    /// `sync-cli scan --json <extra> TREE`, which must succeed.
    fn scan_json(&self, tree: &Path, extra: &[&str]) -> Value {
        let mut args: Vec<OsString> = vec!["scan".into(), "--json".into()];
        args.extend(extra.iter().map(OsString::from));
        args.push(tree.into());
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "sync-cli scan {} failed ({}): {}",
            tree.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "scan --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

fn quick_tree(root: &Path) -> DlrnTree {
    DlrnTree::create(root, DlrnSpec::quick()).unwrap()
}

/// Counts of a tree by `lstat`, as `scan --json` should report them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    /// Regular file names (a hard link counts once per name).
    files: u64,
    dirs: u64,
    symlinks: u64,
    /// Names beyond the first of each multiply-linked inode.
    hardlinks: u64,
    /// Bytes of regular files, each inode once.
    bytes: u64,
    /// Every regular file path, relative.
    paths: Vec<PathBuf>,
}

fn walk_counts(root: &Path) -> Counts {
    let mut c = Counts::default();
    let mut inodes = HashSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for ent in std::fs::read_dir(root.join(&rel)).unwrap() {
            let ent = ent.unwrap();
            let r = rel.join(ent.file_name());
            let md = std::fs::symlink_metadata(root.join(&r)).unwrap();
            let ft = md.file_type();
            if ft.is_dir() {
                c.dirs += 1;
                stack.push(r);
            } else if ft.is_symlink() {
                c.symlinks += 1;
            } else if ft.is_file() {
                c.files += 1;
                if inodes.insert((md.dev(), md.ino())) {
                    c.bytes += md.len();
                } else {
                    c.hardlinks += 1;
                }
                c.paths.push(r);
            }
        }
    }
    c.paths.sort();
    c
}

/// `b3sum` of every file, in order; fails the test clearly if it is missing.
fn b3sum_all(root: &Path, paths: &[PathBuf]) -> Vec<String> {
    assert!(
        bins::have("b3sum"),
        "b3sum is not installed: the scanner's hashes are checked against it \
         (scripts/test installs it; or `apt-get install b3sum` / `cargo install b3sum`)"
    );
    let mut out = Vec::with_capacity(paths.len());
    for batch in paths.chunks(500) {
        let o = Command::new("b3sum")
            .arg("--no-names")
            .arg("--")
            .args(batch.iter().map(|p| root.join(p)))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "b3sum failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = String::from_utf8(o.stdout).unwrap();
        out.extend(text.lines().map(str::to_string));
    }
    assert_eq!(out.len(), paths.len(), "b3sum printed one line per file");
    out
}

fn assert_counts(json: &Value, c: &Counts, what: &str) {
    let n = |k: &str| {
        json[k]
            .as_u64()
            .unwrap_or_else(|| panic!("scan --json of {what} lacks {k}: {json}"))
    };
    assert_eq!(n("files"), c.files, "{what}: files");
    assert_eq!(n("dirs"), c.dirs, "{what}: dirs");
    assert_eq!(n("symlinks"), c.symlinks, "{what}: symlinks");
    assert_eq!(n("hardlinks"), c.hardlinks, "{what}: hardlinks");
    assert_eq!(n("bytes"), c.bytes, "{what}: bytes");
    let root = json["root"].as_str().expect("root is a string");
    assert_eq!(root.len(), 64, "{what}: root is 64 hex digits");
    assert!(root.bytes().all(|b| b.is_ascii_hexdigit()));
}

/// Distinct chunks a tree should have: one per distinct non-empty file of
/// at most 4 MiB (named by its whole-file hash), and at least one for each
/// larger file (content-defined chunks).
fn expected_chunks(root: &Path, c: &Counts, hashes: &[String]) -> (u64, u64) {
    let mut small = HashSet::new();
    let mut large = HashSet::new();
    for (p, h) in c.paths.iter().zip(hashes) {
        let len = std::fs::symlink_metadata(root.join(p)).unwrap().len();
        if len > 4 << 20 {
            large.insert(h.clone());
        } else if len > 0 {
            small.insert(h.clone());
        }
    }
    (small.len() as u64, large.len() as u64)
}

fn check_same_root_after_cp_a(env: &Env, a: &Path, what: &str) {
    let b = env.path(&format!("{what}-copy"));
    cp_a(a, &b);
    let ja = env.scan_json(a, &["--no-cache"]);
    let jb = env.scan_json(&b, &["--no-cache"]);
    assert_eq!(
        ja["root"], jb["root"],
        "{what}: a cp -a copy must scan to the same root"
    );
    let c = walk_counts(a);
    assert_counts(&ja, &c, what);
    assert_counts(&jb, &walk_counts(&b), what);
    let hashes = b3sum_all(a, &c.paths);
    let (small, large) = expected_chunks(a, &c, &hashes);
    let chunks = ja["chunks"].as_u64().expect("chunks");
    if large == 0 {
        assert_eq!(chunks, small, "{what}: one chunk per distinct small file");
    } else {
        assert!(
            chunks > small + large,
            "{what}: {chunks} chunks for {small} small and {large} chunked files"
        );
    }
    assert!(ja["warnings"].as_array().is_some_and(|w| w.is_empty()));

    // The root is sensitive to metadata: one mtime moved by 1 ns changes it.
    let p = b.join(&c.paths[0]);
    let md = std::fs::symlink_metadata(&p).unwrap();
    let t = filetime::FileTime::from_unix_time(md.mtime(), md.mtime_nsec() as u32 ^ 1);
    filetime::set_symlink_file_times(&p, t, t).unwrap();
    let jc = env.scan_json(&b, &["--no-cache"]);
    assert_ne!(
        ja["root"], jc["root"],
        "{what}: an mtime change must change the root"
    );
}

#[test]
fn dlrn_tree_scans_like_its_cp_a_copy() {
    let env = Env::new();
    let a = env.path("dlrn");
    quick_tree(&a);
    check_same_root_after_cp_a(&env, &a, "dlrn");
}

#[test]
fn edge_tree_scans_like_its_cp_a_copy() {
    let env = Env::new();
    let a = env.path("edge");
    create_edge_tree(&a).unwrap();
    check_same_root_after_cp_a(&env, &a, "edge");
}

/// Every whole-file hash in the manifest (hard links included) is what
/// `b3sum` prints for that file.
fn check_hashes_match_b3sum(root: &Path) {
    let out = scan(
        root,
        &ScanOptions {
            cache: None,
            owners: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut ours: BTreeMap<PathBuf, String> = BTreeMap::new();
    out.manifest
        .walk(|path, e| {
            let hash = match &e.kind {
                Kind::File { hash, .. } | Kind::HardLink { hash, .. } => Some(hash.to_hex()),
                _ => None,
            };
            if let Some(h) = hash {
                ours.insert(PathBuf::from(OsStr::from_bytes(path)), h);
            }
            true
        })
        .unwrap();
    let c = walk_counts(root);
    let paths: Vec<PathBuf> = ours.keys().cloned().collect();
    assert_eq!(
        paths.len(),
        c.paths.len(),
        "the manifest holds every regular file"
    );
    let theirs = b3sum_all(root, &paths);
    let mut mismatches = Vec::new();
    for ((p, h), b) in ours.iter().zip(&theirs) {
        if h != b {
            mismatches.push(format!("{}: ours {h}, b3sum {b}", p.display()));
        }
    }
    assert!(mismatches.is_empty(), "hash mismatches: {mismatches:#?}");
}

#[test]
fn file_hashes_match_b3sum_dlrn() {
    let env = Env::new();
    let a = env.path("dlrn");
    quick_tree(&a);
    check_hashes_match_b3sum(&a);
}

#[test]
fn file_hashes_match_b3sum_edge() {
    let env = Env::new();
    let a = env.path("edge");
    create_edge_tree(&a).unwrap();
    // Files around the single-chunk threshold and an empty-but-large one.
    for (name, len) in [
        ("at-threshold", 4 << 20),
        ("over-threshold", (4 << 20) + 1),
        ("big", 9 << 20),
    ] {
        let data: Vec<u8> = (0..len as u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(a.join("files").join(name), data).unwrap();
    }
    check_hashes_match_b3sum(&a);
}

#[test]
fn second_scan_reuses_the_hash_cache() {
    let env = Env::new();
    let a = env.path("dlrn");
    quick_tree(&a);
    // Files whose ctime is within 2 s of a scan are deliberately not cached
    // (their content could still change within the timestamp granularity).
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let cache = env.path("tree.hcache");
    let cache_arg = format!("--cache={}", cache.display());
    let files = walk_counts(&a).files;

    let first = env.scan_json(&a, &[&cache_arg]);
    assert_eq!(first["files_hashed"].as_u64(), Some(files), "{first}");
    assert_eq!(first["cache_hits"].as_u64(), Some(0), "{first}");
    assert!(cache.is_file(), "the cache file is written");

    let second = env.scan_json(&a, &[&cache_arg]);
    assert_eq!(second["cache_hits"].as_u64(), Some(files), "{second}");
    assert_eq!(second["files_hashed"].as_u64(), Some(0), "{second}");
    assert_eq!(second["bytes_hashed"].as_u64(), Some(0), "{second}");
    assert_eq!(first["root"], second["root"]);

    let nocache = env.scan_json(&a, &["--no-cache"]);
    assert_eq!(nocache["files_hashed"].as_u64(), Some(files), "{nocache}");
    assert_eq!(nocache["cache_hits"].as_u64(), Some(0), "{nocache}");
    assert!(nocache["cache"].is_null(), "{nocache}");
    assert_eq!(first["root"], nocache["root"]);

    // The default cache location honours XDG_CACHE_HOME.
    let default1 = env.scan_json(&a, &[]);
    let default2 = env.scan_json(&a, &[]);
    assert!(default1["cache"]
        .as_str()
        .is_some_and(|c| c.starts_with(env.path("xdg-cache").to_str().unwrap())));
    assert_eq!(default2["cache_hits"].as_u64(), Some(files), "{default2}");

    // A file rewritten with the same size and its old mtime is still
    // re-hashed (its ctime moved), and the root changes.
    let victim = a.join(&walk_counts(&a).paths[0]);
    let md = std::fs::metadata(&victim).unwrap();
    let mut data = std::fs::read(&victim).unwrap();
    data[0] ^= 0xff;
    std::fs::write(&victim, &data).unwrap();
    let t = filetime::FileTime::from_last_modification_time(&md);
    filetime::set_file_times(&victim, t, t).unwrap();
    let third = env.scan_json(&a, &[&cache_arg]);
    assert_eq!(third["files_hashed"].as_u64(), Some(1), "{third}");
    assert_eq!(third["cache_hits"].as_u64(), Some(files - 1), "{third}");
    assert_ne!(third["root"], first["root"]);
}

#[test]
fn special_files_are_skipped_with_a_warning() {
    let env = Env::new();
    let plain = env.path("plain");
    let special = env.path("special");
    create_edge_tree(&plain).unwrap();
    create_edge_tree(&special).unwrap();
    create_special_files(&special).unwrap();

    let jp = env.scan_json(&plain, &["--no-cache"]);
    let js = env.scan_json(&special, &["--no-cache"]);
    let warnings: Vec<&str> = js["warnings"]
        .as_array()
        .expect("warnings is an array")
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("fifo")), "{warnings:?}");
    assert!(
        warnings.iter().any(|w| w.contains("socket")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().all(|w| w.contains("skipping")),
        "{warnings:?}"
    );
    // Skipped entirely: same counts and root as the tree without them.
    assert_eq!(jp["root"], js["root"]);
    assert_eq!(jp["files"], js["files"]);

    // Text mode warns on stderr and still succeeds.
    let out = env.cli([
        OsStr::new("scan"),
        OsStr::new("--no-cache"),
        special.as_os_str(),
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fifo") && stderr.contains("socket"),
        "{stderr}"
    );
}

#[test]
fn scan_of_a_missing_tree_fails_with_exit_1() {
    let env = Env::new();
    let out = env.cli([OsStr::new("scan"), env.path("nope").as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope"), "{stderr}");
}
