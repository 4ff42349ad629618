//! The inotify watch-limit fallback end to end with the real binaries on
//! 127.0.0.1: a `sync-agent watch` source runs in a new user namespace
//! whose `max_inotify_watches` is tiny (inotify limits are per user
//! namespace, so the host's sysctls are never touched), over a tree with
//! far more directories than that. It must log the fix once and still
//! mirror every change, those in directories it could not watch included,
//! found by its periodic rescans.

mod common;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use sync_tests::bins::{keygen, sync_agent};

/// The watch limit inside the source's user namespace.
const LIMIT: usize = 8;
/// Top-level directories of the source tree, each with a `deep` one below.
const DIRS: usize = 30;
/// What the agent logs when the limit is hit (see `WATCH_LIMIT_FIX`).
const FIX: &str = "fs.inotify.max_user_watches";

/// Lowers the namespace's watch limit, then runs `"$0" "$@"` in its place.
fn limit_script() -> String {
    format!("echo {LIMIT} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"")
}

/// Killed (and reaped) on drop, whatever path the test takes.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a new user namespace can lower its own watch limit here.
fn userns_limit_works() -> Result<(), String> {
    let check = format!(
        "echo {LIMIT} > /proc/sys/user/max_inotify_watches && \
         test \"$(cat /proc/sys/user/max_inotify_watches)\" = {LIMIT}"
    );
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "sh", "-c", &check])
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "unshare --user --map-root-user failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The first line an agent prints on stdout once it is up.
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Inodes of the directories the process's inotify instances watch, from
/// `/proc/PID/fdinfo` (`inotify wd:N ino:HEX ...` per watch).
fn watched_inodes(pid: u32) -> HashSet<u64> {
    let mut inos = HashSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return inos;
    };
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
            let ino = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ino:"))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            if let Some(ino) = ino {
                inos.insert(ino);
            }
        }
    }
    inos
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

/// Wait until `mirror` equals `src`; panics with the difference and the
/// source's log after `timeout`. Returns how long it took.
fn wait_mirrored(src: &Path, mirror: &Path, log: &Path, what: &str) {
    let timeout = Duration::from_secs(20);
    let start = Instant::now();
    loop {
        let Some(diff) = sync_tests::bins::tree_diff(src, mirror) else {
            eprintln!("{what}: mirrored in {:?}", start.elapsed());
            return;
        };
        assert!(
            start.elapsed() < timeout,
            "{what}: the mirror did not catch up in {timeout:?}:\n{diff}\nsource log:\n{}",
            read_log(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn at_the_watch_limit_the_fix_is_logged_once_and_rescans_mirror_every_change() {
    if let Err(why) = userns_limit_works() {
        eprintln!("skipping: no user namespace with its own inotify limits: {why}");
        return;
    }
    let began = Instant::now();
    let env = Env::new();
    let src = env.path("src");
    let mirror = env.path("mirror");
    // 1 + 2 * DIRS directories, against a limit of LIMIT watches.
    for i in 0..DIRS {
        let deep = src.join(format!("d{i:02}/deep"));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), format!("file {i}\n")).unwrap();
    }
    let src_fp = keygen(&env.path("src-id"));
    let sink_fp = keygen(&env.path("sink-id"));

    let mut sink = Command::new(sync_agent())
        .args(["serve", "--listen", "127.0.0.1:0", "--allow"])
        .arg(format!("{src_fp}:push"))
        .arg("--identity")
        .arg(env.path("sink-id"))
        .arg("--tree")
        .arg(format!("t={}", mirror.display()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(env.path("sink.log")).unwrap())
        .spawn()
        .unwrap();
    let line = first_line(&mut sink);
    let _sink = Proc(sink);
    let addr = line
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("sink not ready: {line:?}"))
        .to_string();

    // unshare execs sh, which execs the agent: the child's pid is the agent's.
    let log = env.path("source.log");
    let ctl = env.path("ctl.sock");
    let mut source = Command::new("unshare")
        .args(["--user", "--map-root-user", "sh", "-c", &limit_script()])
        .arg(sync_agent())
        .arg("watch")
        .arg(&src)
        .arg("--to")
        .arg(format!("quic://{addr}/t"))
        .arg("--peer")
        .arg(&sink_fp)
        .arg("--identity")
        .arg(env.path("src-id"))
        .arg("--control")
        .arg(&ctl)
        .arg("--cache")
        .arg(env.path("hash.cache"))
        .args(["--rescan-secs", "1"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("XDG_CACHE_HOME", env.path("xdg-cache"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let line = first_line(&mut source);
    let pid = source.id();
    let mut source = Proc(source);
    assert!(
        line.starts_with("watching "),
        "source not ready: {line:?}\n{}",
        read_log(&log)
    );

    // The kernel stops the agent at exactly LIMIT watches.
    let end = Instant::now() + Duration::from_secs(10);
    let watched = loop {
        let w = watched_inodes(pid);
        if w.len() >= LIMIT {
            break w;
        }
        if let Ok(Some(st)) = source.0.try_wait() {
            panic!("the source exited ({st}):\n{}", read_log(&log));
        }
        assert!(
            Instant::now() < end,
            "the source watches {} directories, expected {LIMIT}:\n{}",
            w.len(),
            read_log(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(watched.len(), LIMIT, "watches beyond the namespace's limit");
    assert!(
        watched.contains(&ino(&src)),
        "the root itself is not watched"
    );

    wait_mirrored(&src, &mirror, &log, "first sync");

    // Changes deep in a directory without a watch raise no event at all:
    // only a rescan can find them.
    let unwatched = (0..DIRS)
        .map(|i| src.join(format!("d{i:02}/deep")))
        .find(|d| !watched.contains(&ino(d)))
        .expect("some deep directory is unwatched");
    std::fs::write(unwatched.join("new"), "a new file\n").unwrap();
    std::fs::write(unwatched.join("f"), "modified, and longer than before\n").unwrap();
    std::fs::create_dir(unwatched.join("sub")).unwrap();
    std::fs::write(unwatched.join("sub/g"), "in a new subdirectory\n").unwrap();
    let what = format!("changes in unwatched {}", unwatched.display());
    wait_mirrored(&src, &mirror, &log, &what);

    // A new directory in a watched one hits the limit again: still one log line.
    let watched_dir = (0..DIRS)
        .flat_map(|i| {
            let d = src.join(format!("d{i:02}"));
            [d.join("deep"), d]
        })
        .find(|d| watched.contains(&ino(d)))
        .expect("some directory below the root is watched");
    std::fs::create_dir(watched_dir.join("fresh")).unwrap();
    std::fs::write(watched_dir.join("fresh/h"), "in a fresh directory\n").unwrap();
    let what = format!("a new directory in watched {}", watched_dir.display());
    wait_mirrored(&src, &mirror, &log, &what);

    // The status says the watcher is degraded.
    let out = env.cli([
        OsStr::new("--control"),
        ctl.as_os_str(),
        OsStr::new("status"),
        OsStr::new("--json"),
    ]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        status["trees"][0]["watcher_degraded"],
        serde_json::Value::Bool(true),
        "{status}"
    );

    // The fix is logged, once.
    let text = read_log(&log);
    let fixes: Vec<&str> = text.lines().filter(|l| l.contains(FIX)).collect();
    assert_eq!(
        fixes.len(),
        1,
        "the fix must be logged exactly once:\n{text}"
    );
    assert!(
        fixes[0].contains("inotify watch limit reached"),
        "{}",
        fixes[0]
    );
    eprintln!("logged: {}", fixes[0]);
    eprintln!("total {:?}", began.elapsed());
}
