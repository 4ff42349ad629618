//! A power cut right after a commit's flush (see `sync_core::flush`),
//! on a real ext4 with a journal: the push is killed at that point, the
//! filesystem's image is copied as its disk holds it then (the kernel's
//! dirty pages are not in it), and the copy, mounted (its journal
//! replayed), must hold every temporary that the commit's journal would
//! name, whole: files with their bytes, symlinks with their targets.
//! Without the flush's data pass the small files come back empty; without
//! its journal commit they are not there at all. Needs root (loop devices);
//! skipped with a note elsewhere.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sync_core::flush::Flush;
use sync_tests::bench::freshfs::FreshFs;
use sync_tests::bins;

/// Everything in `root`, by path below it: file contents and symlink
/// targets (directories only as the paths of what they hold).
fn contents(root: &Path) -> BTreeMap<Vec<u8>, (bool, Vec<u8>)> {
    fn walk(dir: &Path, prefix: &[u8], out: &mut BTreeMap<Vec<u8>, (bool, Vec<u8>)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let e = e.unwrap();
            let mut rel = prefix.to_vec();
            rel.extend_from_slice(e.file_name().as_bytes());
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                out.insert(rel, (true, t.as_os_str().as_bytes().to_vec()));
            } else if ft.is_file() {
                out.insert(rel, (false, std::fs::read(e.path()).unwrap()));
            } else if ft.is_dir() {
                rel.push(b'/');
                walk(&e.path(), &rel, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, b"", &mut out);
    out
}

/// A tree of small files (all under 64 KiB but a few), symlinks whose
/// targets are too long to sit in the inode, and files at its top (which
/// are built outside the fresh subtree).
fn make_tree(src: &Path) {
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    for d in 0..12 {
        let dir = src.join(format!("repos/{d:02}/build-{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..30 {
            let len = if f == 0 { 200_000 } else { 500 + 997 * f };
            std::fs::write(dir.join(format!("pkg-{f}.rpm")), noise(len)).unwrap();
            // More than 60 bytes: a block of its own, through the journal.
            let next = (d + 1) % 12;
            let target = format!(
                "../../{next:02}/build-{next}/pkg-{f}.rpm/{}",
                "x".repeat(40)
            );
            let name = format!("link-to-the-package-of-the-next-build-{f}.rpm");
            std::os::unix::fs::symlink(target, dir.join(name)).unwrap();
        }
    }
    for f in 0..5 {
        std::fs::write(src.join(format!("top-{f}")), noise(3000 + f)).unwrap();
    }
    std::os::unix::fs::symlink("repos/03/build-3", src.join("current")).unwrap();
}

fn push(src: &Path, dest: &Path, cache: &Path, env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(bins::sync_cli());
    cmd.arg("push")
        .arg(src)
        .arg(dest)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("RUST_LOG")
        .env_remove("SYNC_FLUSH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sync-cli")
}

/// A copy of an image, attached and mounted; detached on drop.
struct Mounted {
    dev: PathBuf,
    at: PathBuf,
}

impl Mounted {
    /// `None` (with a note) where no second loop device can be had: some
    /// containers allow one.
    fn new(image: &Path, at: &Path) -> Option<Mounted> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "note: power-cut test skipped: no second loop device: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let st = Command::new("mount").arg(&dev).arg(at).status().unwrap();
        if !st.success() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            panic!("mount of the copied image failed");
        }
        Some(Mounted {
            dev,
            at: at.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn a_power_cut_after_the_flush_loses_no_temporary() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("note: power-cut test skipped: needs root for a loop device");
        return;
    }
    // On disk: the image is filled with O_DIRECT, which tmpfs lacks.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let Some(mut fs) = FreshFs::try_with_journal(dir.path(), 96 << 20, None) else {
        eprintln!("note: power-cut test skipped: no loop-mounted ext4 here");
        return;
    };
    let src = dir.path().join("src");
    make_tree(&src);
    let cache = dir.path().join("cache");

    // Where the crash points are (counted the same in every run).
    let mnt = fs.mount_point().to_path_buf();
    let mnt_dir = std::fs::File::open(&mnt).unwrap();
    assert_eq!(
        Flush::for_fds(&[mnt_dir.as_fd()]),
        Flush::Journal,
        "a fresh ext4 has its journal: the flush under test is the journal commit"
    );
    drop(mnt_dir);
    let listed = push(
        &src,
        &mnt.join("probe"),
        &cache,
        &[("SYNC_CRASH_LIST", "1".into())],
    );
    assert!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8_lossy(&listed.stderr).to_string();
    let point = |name: &str| {
        listed
            .lines()
            .find_map(|l| {
                let (n, at) = l.strip_prefix("crashpoint ")?.split_once(' ')?;
                (at == name).then(|| n.to_string())
            })
            .unwrap_or_else(|| panic!("the commit passes {name}"))
    };
    let mut k = 0;
    let mut cut_at = |name: &str| -> Option<Mounted> {
        // The push killed there, on a new filesystem, and the disk as it
        // is then, copied and mounted.
        let mnt = fs.remake().unwrap().to_path_buf();
        let killed = push(
            &src,
            &mnt.join("dest"),
            &cache,
            &[("SYNC_CRASH_AT", point(name))],
        );
        assert!(!killed.status.success(), "killed at {name}: {killed:?}");
        k += 1;
        let copy = dir.path().join(format!("cut-{k}.img"));
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg(fs.image())
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success());
        Mounted::new(&copy, &dir.path().join(format!("cut-{k}")))
    };
    let want = contents(&src);

    // After the flush before the journal: every temporary, whole.
    let Some(cut) = cut_at("after-flush") else {
        return;
    };
    let tmp = cut.at.join(".dest.sync-state/tmp");
    let fresh = contents(&tmp.join("t"));
    let mut top_files = Vec::new();
    for (path, (link, data)) in &want {
        if !path.contains(&b'/') && !link {
            top_files.push(data.clone());
            continue;
        }
        if path.as_slice() == b"current" {
            continue; // made at the apply, in the tree itself
        }
        let got = fresh.get(path);
        assert!(
            got.is_some_and(|(l, d)| l == link && d == data),
            "{}: after the power cut {} (len {} of {})",
            String::from_utf8_lossy(path),
            match got {
                None => "missing".to_string(),
                Some((l, _)) if l != link => "of another kind".to_string(),
                Some(_) => "differs".to_string(),
            },
            got.map_or(0, |g| g.1.len()),
            data.len()
        );
    }
    // The top's files are numbered temporaries beside the fresh subtree.
    let mut numbered: Vec<Vec<u8>> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.is_symlink())
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    numbered.sort();
    top_files.sort();
    assert_eq!(numbered.len(), top_files.len());
    assert!(numbered == top_files, "the top's files after the power cut");
    drop(cut);

    // After the flush that settles the commit: the new snapshot, whole,
    // in the tree, and the head naming it staged.
    let Some(cut) = cut_at("before-manifest-store") else {
        return;
    };
    assert_eq!(
        bins::tree_diff(&src, &cut.at.join("dest")),
        None,
        "the tree after the power cut"
    );
    let head = cut.at.join(".dest.sync-state/head.new");
    assert!(
        std::fs::metadata(&head).is_ok_and(|m| m.len() > 0),
        "the staged head"
    );
}
