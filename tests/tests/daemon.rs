//! Continuous mirroring end to end with the real binaries on 127.0.0.1: a
//! `sync-agent watch` source feeding two `sync-agent serve` mirrors while
//! the tree evolves and readers poll each mirror's `current`; then one
//! mirror is stopped, misses builds, and catches up when it comes back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_tests::bins::{keygen, sync_agent, sync_cli};
use sync_tests::gen::{DlrnSpec, DlrnTree};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait for an agent's readiness line (`listening on ADDR ...`).
fn ready(mut child: Child) -> (Proc, String) {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("agent not ready: {line:?}"))
        .to_string();
    (Proc(child), addr)
}

/// Start a mirror agent; returns it and its address.
fn sink(work: &Path, name: &str, listen: &str, allow: &str) -> (Proc, String) {
    let child = Command::new(sync_agent())
        .args(["serve", "--listen", listen, "--allow", allow, "--identity"])
        .arg(work.join(name))
        .arg("--tree")
        .arg(format!(
            "rdo={}",
            work.join(format!("{name}-tree")).display()
        ))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(work.join(format!("{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    ready(child)
}

fn status(ctl: &Path) -> serde_json::Value {
    let out = Command::new(sync_cli())
        .arg("--control")
        .arg(ctl)
        .args(["status", "--json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Wait until every peer (or the one at `index`) holds the tree's root.
fn wait_current(ctl: &Path, index: Option<usize>, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let s = status(ctl);
        let t = &s["trees"][0];
        let root = &t["root"];
        let peers = t["peers"].as_array().cloned().unwrap_or_default();
        let ok = !root.is_null()
            && peers
                .iter()
                .enumerate()
                .filter(|(i, _)| index.is_none_or(|x| x == *i))
                .all(|(_, p)| &p["committed_root"] == root);
        if ok {
            return;
        }
        assert!(Instant::now() < end, "mirrors did not catch up: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Is the repository behind `mirror/current` complete, as a dnf client
/// would see it? `repodata/repomd.xml` must exist and every file it names
/// must be there with the size it states, and every file the source's copy
/// of the build holds (build directories never change once written) must
/// be there with the same content. `None` when it cannot be judged: in
/// particular when the build was purged at the source meanwhile (a mirror
/// that falls several builds behind catches up in one commit, which may
/// flip `current` away from a build and purge it between the reader's
/// `readlink` and its reads, exactly as the builder itself did).
fn current_is_complete(mirror: &Path, src: &Path) -> Option<bool> {
    let target = std::fs::read_link(mirror.join("current")).ok()?;
    match judge(mirror, src, &target)? {
        Ok(()) => Some(true),
        Err(_) if !src.join(&target).exists() => None,
        Err(why) => {
            eprintln!("current -> {}: {why}", target.display());
            Some(false)
        }
    }
}

fn judge(mirror: &Path, src: &Path, target: &Path) -> Option<Result<(), String>> {
    let have = mirror.join(target);
    let Ok(repomd) = std::fs::read_to_string(have.join("repodata/repomd.xml")) else {
        return Some(Err("no repodata/repomd.xml".into()));
    };
    let mut href = None;
    for line in repomd.lines() {
        let line = line.trim();
        if let Some(h) = line.strip_prefix("<location href=\"") {
            href = h.strip_suffix("\"/>").map(str::to_string);
        } else if let Some(n) = line.strip_prefix("<size>") {
            let size: u64 = n.strip_suffix("</size>")?.parse().ok()?;
            let h = href.take()?;
            if std::fs::metadata(have.join(&h)).map(|m| m.len()).ok() != Some(size) {
                return Some(Err(format!(
                    "repomd.xml names {h} but it is missing or short"
                )));
            }
        }
    }
    for e in std::fs::read_dir(src.join(target)).ok()?.flatten() {
        if e.file_type().ok()?.is_file() && e.file_name().to_string_lossy().ends_with(".rpm") {
            let exp = std::fs::read(e.path()).ok()?;
            match std::fs::read(have.join(e.file_name())) {
                Ok(got) if blake3::hash(&got) == blake3::hash(&exp) => {}
                _ => {
                    return Some(Err(format!(
                        "{} is missing or differs",
                        e.file_name().to_string_lossy()
                    )))
                }
            }
        }
    }
    Some(Ok(()))
}

/// One thread per mirror judging `current` again and again, as a dnf
/// client would see it, until stopped.
struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    broken: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn start(mirrors: &[PathBuf], src: &Path) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let broken = Arc::new(AtomicU64::new(0));
        let threads = mirrors
            .iter()
            .map(|m| {
                let (stop, reads, broken) = (stop.clone(), reads.clone(), broken.clone());
                let (m, src) = (m.clone(), src.to_path_buf());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match current_is_complete(&m, &src) {
                            Some(true) => reads.fetch_add(1, Ordering::Relaxed),
                            Some(false) => broken.fetch_add(1, Ordering::Relaxed),
                            None => 0,
                        };
                    }
                })
            })
            .collect();
        Readers {
            stop,
            reads,
            broken,
            threads,
        }
    }

    /// Stop, then require enough judged reads and no broken one.
    fn stop_and_check(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let reads = self.reads.load(Ordering::Relaxed);
        let broken = self.broken.load(Ordering::Relaxed);
        assert!(reads > 20, "readers judged only {reads} reads");
        assert_eq!(
            broken, 0,
            "{broken} of {reads} reads saw an incomplete current"
        );
    }
}

/// `sync-agent watch SRC` pushing tree `rdo` to each (address,
/// fingerprint), with the builder's identity and `ctl.sock` in `work`.
fn watch_source(work: &Path, src: &Path, peers: &[(&str, &str)], cache: Option<&Path>) -> Proc {
    let mut c = Command::new(sync_agent());
    c.arg("watch").arg(src);
    for (addr, fp) in peers {
        c.args(["--to", &format!("quic://{addr}/rdo"), "--peer", fp]);
    }
    c.arg("--identity")
        .arg(work.join("builder"))
        .arg("--control")
        .arg(work.join("ctl.sock"));
    if let Some(cache) = cache {
        c.arg("--cache").arg(cache);
    }
    c.env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("source.log")).unwrap());
    Proc(c.spawn().unwrap())
}

/// `n` builds `gap` apart, then `push --wait rdo`, which must succeed.
fn build_and_publish(tree: &mut DlrnTree, n: usize, gap: Duration, ctl: &Path) {
    for _ in 0..n {
        tree.evolve(1).unwrap();
        std::thread::sleep(gap);
    }
    let out = Command::new(sync_cli())
        .arg("--control")
        .arg(ctl)
        .args(["push", "--wait", "rdo"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push --wait failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn diff_clean(a: &Path, b: &Path) {
    if let Some(d) = sync_tests::bins::tree_diff(a, b) {
        panic!("{} and {} differ:\n{d}", a.display(), b.display());
    }
}

#[test]
fn a_watched_tree_reaches_two_mirrors_and_current_is_never_broken() {
    let work_dir = tempfile::tempdir().unwrap();
    let work = work_dir.path();
    let src: PathBuf = work.join("builder-tree");
    let mut tree = DlrnTree::create(
        &src,
        DlrnSpec {
            seed: 7,
            projects: 12,
            builds: 14,
            keep_builds: 10,
            scale: 0.01,
        },
    )
    .unwrap();
    let builder = keygen(&work.join("builder"));
    let fp1 = keygen(&work.join("m1"));
    let fp2 = keygen(&work.join("m2"));
    let allow = format!("{builder}:push");
    let (_m1, a1) = sink(work, "m1", "127.0.0.1:0", &allow);
    let (m2, a2) = sink(work, "m2", "127.0.0.1:0", &allow);
    let ctl = work.join("ctl.sock");
    let _source = watch_source(
        work,
        &src,
        &[(&a1, &fp1), (&a2, &fp2)],
        Some(&work.join("hash.cache")),
    );
    let (t1, t2) = (work.join("m1-tree"), work.join("m2-tree"));
    wait_current(&ctl, None, Duration::from_secs(60));
    diff_clean(&src, &t1);

    // Readers poll both mirrors while the builder keeps building.
    let readers = Readers::start(&[t1.clone(), t2.clone()], &src);
    build_and_publish(&mut tree, 12, Duration::from_millis(120), &ctl);
    readers.stop_and_check();
    diff_clean(&src, &t1);
    diff_clean(&src, &t2);

    // Mirror 2 goes away: mirror 1 stays current, push --wait says so.
    drop(m2);
    tree.evolve(3).unwrap();
    let out = Command::new(sync_cli())
        .arg("--control")
        .arg(&ctl)
        .args(["push", "--wait", "rdo", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a dead mirror must fail push --wait");
    wait_current(&ctl, Some(0), Duration::from_secs(30));
    diff_clean(&src, &t1);

    // It comes back on the same address and catches up with one sync.
    let (_m2, _) = sink(work, "m2", &a2, &allow);
    wait_current(&ctl, None, Duration::from_secs(90));
    diff_clean(&src, &t2);
}

/// Start `sync-agent --config FILE`; returns it and its listen address.
fn agent_with_config(work: &Path, name: &str, config: &str) -> (Proc, String) {
    let file = work.join(format!("{name}.toml"));
    std::fs::write(&file, config).unwrap();
    let child = Command::new(sync_agent())
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(work.join(format!("{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    ready(child)
}

/// The tree of `role` in a status answer.
fn tree_of(s: &serde_json::Value, role: &str) -> serde_json::Value {
    s["trees"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["role"] == role).cloned())
        .unwrap_or_default()
}

/// source -> A -> B: A commits each snapshot, then relays it to B with the
/// same root; readers on both mirrors never see an incomplete `current`.
#[test]
fn a_relay_chain_forwards_only_committed_snapshots() {
    let work_dir = tempfile::tempdir().unwrap();
    let work = work_dir.path();
    let src: PathBuf = work.join("builder-tree");
    let mut tree = DlrnTree::create(
        &src,
        DlrnSpec {
            seed: 11,
            projects: 10,
            builds: 12,
            keep_builds: 8,
            scale: 0.01,
        },
    )
    .unwrap();
    let builder = keygen(&work.join("builder"));
    let fp_a = keygen(&work.join("a"));
    let fp_b = keygen(&work.join("b"));
    let (_b, addr_b) = sink(work, "b", "127.0.0.1:0", &format!("{fp_a}:push"));
    let (ta, tb) = (work.join("a-tree"), work.join("b-tree"));
    let ctl_a = work.join("a.sock");
    let config = format!(
        r#"identity = "{id}"
listen = "127.0.0.1:0"
control = "{ctl}"

[[tree]]
name = "rdo"
path = "{path}"
role = "sink"

[[tree.allow]]
fingerprint = "{builder}"
push = true

[[tree.peer]]
url = "quic://{addr_b}/rdo"
fingerprint = "{fp_b}"
"#,
        id = work.join("a").display(),
        ctl = ctl_a.display(),
        path = ta.display(),
    );
    let (_a, addr_a) = agent_with_config(work, "a", &config);
    let ctl = work.join("ctl.sock");
    let _source = watch_source(work, &src, &[(&addr_a, &fp_a)], None);
    // B holds what the source published, via A.
    let relayed = |timeout: Duration| {
        let end = Instant::now() + timeout;
        loop {
            let root = status(&ctl)["trees"][0]["root"].clone();
            let relay = tree_of(&status(&ctl_a), "relay");
            if !root.is_null()
                && relay["root"] == root
                && relay["peers"][0]["committed_root"] == root
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "the relay did not catch up: source {} relay {relay}",
                status(&ctl)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    relayed(Duration::from_secs(60));
    diff_clean(&src, &tb);

    let readers = Readers::start(&[ta.clone(), tb.clone()], &src);
    build_and_publish(&mut tree, 8, Duration::from_millis(150), &ctl);
    relayed(Duration::from_secs(60));
    readers.stop_and_check();
    diff_clean(&src, &ta);
    diff_clean(&src, &tb);
    // `push --wait` on the relay answers with what B committed.
    let out = Command::new(sync_cli())
        .arg("--control")
        .arg(&ctl_a)
        .args(["push", "--wait", "rdo", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push --wait on the relay: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
