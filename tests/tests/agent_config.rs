//! The agent's configuration file end to end, with the real binaries on
//! 127.0.0.1: `sync-agent check-config` on good and bad files, then one
//! `sync-agent --config` process holding a sink tree fed by a second one
//! holding a source tree, and SIGHUP reloads of both (a tree added on each
//! side, a broken file that changes nothing, a tree removed). Every wait is
//! bounded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sync_tests::bins::{keygen, sync_agent, sync_cli};
use sync_tests::gen::{DlrnSpec, DlrnTree};

/// A running `sync-agent --config`, killed when dropped.
struct Agent {
    child: Child,
    /// Its stdout lines (drained for its whole life, so it never blocks).
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(config: &Path, log: &Path) -> Agent {
        let mut child = Command::new(sync_agent())
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Agent {
            child,
            lines,
            log: log.to_path_buf(),
        }
    }

    /// Readiness: the stdout lines up to `running ...`.
    fn ready(&mut self) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("running ") => {
                    seen.push(l);
                    return seen;
                }
                Ok(l) => seen.push(l),
                Err(_) => panic!(
                    "agent not ready after {seen:?}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the agent exited; log:\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log holds `needle` `count` times; returns the log.
    fn wait_log(&self, needle: &str, count: usize) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log_text();
            if log.matches(needle).count() >= count {
                return log;
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} (x{count}) in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then a clean exit (status 0) within the bound.
    fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "exit after SIGTERM: {st}\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(Instant::now() < end, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Run `cmd` to its end, killing it if it takes longer than `limit`.
fn bounded(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on a child that has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} took more than {limit:?}");
        }
    }
}

fn check_config(file: &Path) -> (i32, String, String) {
    let out = bounded(
        Command::new(sync_agent()).arg("check-config").arg(file),
        Duration::from_secs(30),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(ctl: &Path) -> serde_json::Value {
    let out = bounded(
        Command::new(sync_cli())
            .arg("--control")
            .arg(ctl)
            .args(["status", "--json"]),
        Duration::from_secs(30),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn tree<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    s["trees"]
        .as_array()?
        .iter()
        .find(|t| t["name"].as_str() == Some(name))
}

fn names(ctl: &Path) -> Vec<String> {
    let s = status(ctl);
    let mut v: Vec<String> = s["trees"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Wait until the agent at `ctl` runs exactly the trees `want`.
fn wait_trees(ctl: &Path, want: &[&str]) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let have = names(ctl);
        if have == want {
            return;
        }
        assert!(Instant::now() < end, "trees {have:?}, expected {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sync-cli push --wait NAME`: publish now, wait for every mirror.
fn push_wait(ctl: &Path, name: &str) -> Output {
    bounded(
        Command::new(sync_cli()).arg("--control").arg(ctl).args([
            "push",
            "--wait",
            name,
            "--timeout",
            "90",
        ]),
        Duration::from_secs(120),
    )
}

fn push_ok(ctl: &Path, name: &str) {
    let out = push_wait(ctl, name);
    assert!(
        out.status.success(),
        "push --wait {name} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn diff_clean(a: &Path, b: &Path) {
    let out = bounded(
        Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(a)
            .arg(b),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{} and {} differ:\n{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("dist/agent.example.toml")
}

#[test]
fn check_config_accepts_the_example_and_locates_every_error() {
    let (code, out, err) = check_config(&example());
    assert_eq!(code, 0, "the example must stay valid:\n{err}");
    assert!(
        out.contains(
            "ok: 3 trees (1 source, 2 sink): rdo (source, 2 peers), ci-logs (sink, 2 allowed peers), rdo-relay (sink, 1 allowed peer, relaying to 1)"
        ),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let fp = "ab".repeat(32);
    let bad = dir.path().join("agent.toml");
    // Errors on lines 3, 8, 11, 15 and 19, none hiding another.
    std::fs::write(
        &bad,
        format!(
            r#"identity = "/etc/sync/identity"
control = "/run/sync-agent/sync-agent.sock"
colour = "blue"

[[tree]]
name = "rdo"
path = "/srv/dlrn/repos"
role = "sorce"

[[tree]]
name = "rdo"
path = "/srv/other"
role = "source"
[[tree.peer]]
url = "quic://mirror:7443"
fingerprint = "{fp}"
[[tree.peer]]
url = "quic://mirror2:7443/rdo"
fingerprint = "0123"
"#
        ),
    )
    .unwrap();
    let (code, out, err) = check_config(&bad);
    assert_eq!(code, 2, "{out}{err}");
    let f = bad.display().to_string();
    for expected in [
        format!("{f}:3:1: unknown key \"colour\""),
        format!("{f}:8:8: tree \"rdo\": unknown role \"sorce\" (source or sink)"),
        format!("{f}:11:8: tree \"rdo\": the name is already used by the tree at line 5"),
        format!(
            "{f}:15:7: tree \"rdo\": peer url \"quic://mirror:7443\" is not quic://HOST:PORT/NAME"
        ),
        format!("{f}:19:15: tree \"rdo\": peer fingerprint is not 64 hex digits"),
        format!("{f}: 5 errors"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    assert!(out.is_empty(), "no summary for a bad file: {out}");

    // A syntax error is located too, and a missing file is a usage error.
    std::fs::write(&bad, "identity = \"/x\"\nlisten = 0.0.0.0:7443\n").unwrap();
    let (code, _, err) = check_config(&bad);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("{f}:2:")), "{err}");
    let (code, _, _) = check_config(&dir.path().join("absent.toml"));
    assert_eq!(code, 2);
}

fn sink_config(work: &Path, fp: &str, trees: &[&str]) -> String {
    let mut s = format!(
        "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol = \"{}\"\n",
        work.join("mirror-id").display(),
        work.join("mirror.sock").display()
    );
    for t in trees {
        s += &format!(
            "\n[[tree]]\nname = \"{t}\"\npath = \"{}\"\n[[tree.allow]]\nfingerprint = \"{fp}\"\npush = true\n",
            work.join("mirror").join(t).display()
        );
    }
    s
}

/// `(name, extra settings)` per source tree.
fn source_config(work: &Path, addr: &str, fp: &str, trees: &[(&str, &str)]) -> String {
    let mut s = format!(
        "identity = \"{}\"\ncontrol = \"{}\"\n",
        work.join("builder-id").display(),
        work.join("builder.sock").display()
    );
    for (t, extra) in trees {
        s += &format!(
            "\n[[tree]]\nname = \"{t}\"\npath = \"{}\"\nrole = \"source\"\nquiet_ms = 50\n\
             cache = \"{}\"\n{extra}\n[[tree.peer]]\nurl = \"quic://{addr}/{t}\"\nfingerprint = \"{fp}\"\n",
            work.join("builder").join(t).display(),
            work.join("cache").join(t).display()
        );
    }
    s
}

fn peer_syncs(ctl: &Path, name: &str) -> u64 {
    let s = status(ctl);
    tree(&s, name).expect("tree in status")["peers"][0]["syncs"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn one_config_file_runs_both_roles_and_sighup_reloads_it() {
    let work_dir = tempfile::tempdir().unwrap();
    let work = work_dir.path();
    std::fs::create_dir_all(work.join("builder")).unwrap();
    std::fs::create_dir_all(work.join("mirror")).unwrap();
    let builder_fp = keygen(&work.join("builder-id"));
    let mirror_fp = keygen(&work.join("mirror-id"));

    // The mirror: one sink tree.
    let mirror_toml = work.join("mirror.toml");
    std::fs::write(&mirror_toml, sink_config(work, &builder_fp, &["rdo"])).unwrap();
    let mut mirror = Agent::start(&mirror_toml, &work.join("mirror.log"));
    let ready = mirror.ready();
    let addr = ready
        .iter()
        .find_map(|l| l.strip_prefix("listening on "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no listening line in {ready:?}"))
        .to_string();
    assert!(
        ready
            .last()
            .unwrap()
            .starts_with("running 1 tree (0 source, 1 sink)"),
        "{ready:?}"
    );

    // The builder: one source tree pushing to it.
    let src = work.join("builder/rdo");
    let mut dlrn = DlrnTree::create(
        &src,
        DlrnSpec {
            seed: 11,
            projects: 8,
            builds: 8,
            keep_builds: 6,
            scale: 0.01,
        },
    )
    .unwrap();
    let builder_toml = work.join("builder.toml");
    std::fs::write(
        &builder_toml,
        source_config(work, &addr, &mirror_fp, &[("rdo", "")]),
    )
    .unwrap();
    let mut builder = Agent::start(&builder_toml, &work.join("builder.log"));
    builder.ready();
    let (bctl, mctl) = (work.join("builder.sock"), work.join("mirror.sock"));
    // An agent that says it is running takes control requests already.
    for ctl in [&bctl, &mctl] {
        assert!(
            std::os::unix::net::UnixStream::connect(ctl).is_ok(),
            "{} not accepting when the agent said it was running",
            ctl.display()
        );
    }
    push_ok(&bctl, "rdo");
    diff_clean(&src, &work.join("mirror/rdo"));
    for _ in 0..4 {
        dlrn.evolve(1).unwrap();
        std::thread::sleep(Duration::from_millis(80));
    }
    push_ok(&bctl, "rdo");
    diff_clean(&src, &work.join("mirror/rdo"));
    // Both agents' status lists their trees; the sink's committed root is
    // the source's.
    let (b, m) = (status(&bctl), status(&mctl));
    let (bt, mt) = (tree(&b, "rdo").unwrap(), tree(&m, "rdo").unwrap());
    assert_eq!(
        (bt["role"].as_str(), mt["role"].as_str()),
        (Some("source"), Some("sink"))
    );
    assert!(bt["root"].is_string());
    assert_eq!(bt["root"], mt["root"], "{b}\n{m}");

    // SIGHUP on the mirror: a second sink tree starts, rdo is untouched.
    std::fs::write(&mirror_toml, sink_config(work, &builder_fp, &["rdo", "ci"])).unwrap();
    mirror.signal(libc::SIGHUP);
    wait_trees(&mctl, &["ci", "rdo"]);
    let log = mirror.wait_log("configuration reloaded", 1);
    assert!(log.contains("reload: tree ci (sink): added"), "{log}");
    assert!(
        !log.contains("tree rdo (sink)"),
        "rdo must not restart:\n{log}"
    );

    // SIGHUP on the builder: a second source tree, with a bandwidth limit
    // that a 3 MiB incompressible file must respect (>= 2.75 s at 1 MiB/s
    // after the 256 KiB burst; unlimited it takes a fraction of that).
    let ci = work.join("builder/ci");
    std::fs::create_dir_all(ci.join("logs")).unwrap();
    let mut noise = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(ci.join("logs/big.bin"), &noise).unwrap();
    std::fs::write(ci.join("logs/console.txt"), "build ok\n").unwrap();
    std::os::unix::fs::symlink("logs/console.txt", ci.join("latest")).unwrap();
    let rdo_syncs = peer_syncs(&bctl, "rdo");
    assert!(rdo_syncs >= 2, "{rdo_syncs}");
    std::fs::write(
        &builder_toml,
        source_config(
            work,
            &addr,
            &mirror_fp,
            &[("rdo", ""), ("ci", "bandwidth_limit = \"1MiB\"")],
        ),
    )
    .unwrap();
    let hup = Instant::now();
    builder.signal(libc::SIGHUP);
    wait_trees(&bctl, &["ci", "rdo"]);
    push_ok(&bctl, "ci");
    let took = hup.elapsed();
    diff_clean(&ci, &work.join("mirror/ci"));
    assert!(
        took >= Duration::from_millis(2500),
        "3 MiB under a 1 MiB/s limit arrived in {took:?}"
    );
    let log = builder.wait_log("configuration reloaded", 1);
    assert!(log.contains("reload: tree ci (source): added"), "{log}");
    assert!(
        !log.contains("tree rdo (source)"),
        "rdo must not restart:\n{log}"
    );
    // rdo's loop kept running: its counters were not reset by the reload.
    assert!(peer_syncs(&bctl, "rdo") >= rdo_syncs);
    dlrn.evolve(2).unwrap();
    push_ok(&bctl, "rdo");
    diff_clean(&src, &work.join("mirror/rdo"));

    // A broken file and SIGHUP: every error logged with its line, nothing
    // changes, both trees keep mirroring.
    let good = std::fs::read_to_string(&builder_toml).unwrap();
    let broken = "speed = 3\n".to_string()
        + &good
            .replacen("quiet_ms = 50", "quiet_ms = 0", 1)
            .replace(&mirror_fp, "not-a-fingerprint");
    std::fs::write(&builder_toml, &broken).unwrap();
    let line_of = |needle: &str| broken.lines().position(|l| l.contains(needle)).unwrap() + 1;
    builder.signal(libc::SIGHUP);
    let log = builder.wait_log("configuration not reloaded", 1);
    let f = builder_toml.display().to_string();
    for expected in [
        format!(
            "{f}:{}:12: tree \"rdo\": quiet_ms = 0 is out of range",
            line_of("quiet_ms = 0")
        ),
        format!(
            "{f}:{}:15: tree \"rdo\": peer fingerprint is not 64 hex digits",
            line_of("not-a-fingerprint")
        ),
        format!("{f}:{}:1: unknown key \"speed\"", line_of("speed = 3")),
        "4 errors".to_string(),
    ] {
        assert!(log.contains(&expected), "missing {expected:?} in:\n{log}");
    }
    builder.assert_running();
    assert_eq!(names(&bctl), ["ci", "rdo"]);
    dlrn.evolve(2).unwrap();
    std::fs::write(ci.join("logs/console.txt"), "build ok\nrebuilt\n").unwrap();
    push_ok(&bctl, "rdo");
    push_ok(&bctl, "ci");
    diff_clean(&src, &work.join("mirror/rdo"));
    diff_clean(&ci, &work.join("mirror/ci"));

    // A valid file without ci: that tree stops, rdo goes on...
    std::fs::write(
        &builder_toml,
        source_config(work, &addr, &mirror_fp, &[("rdo", "")]),
    )
    .unwrap();
    builder.signal(libc::SIGHUP);
    wait_trees(&bctl, &["rdo"]);
    builder.wait_log("reload: tree ci (source): removed", 1);
    assert!(!push_wait(&bctl, "ci").status.success());
    // ... and on the mirror too: its sink tree ci stops, rdo goes on.
    std::fs::write(&mirror_toml, sink_config(work, &builder_fp, &["rdo"])).unwrap();
    mirror.signal(libc::SIGHUP);
    wait_trees(&mctl, &["rdo"]);
    mirror.wait_log("reload: tree ci (sink): removed", 1);
    dlrn.evolve(1).unwrap();
    push_ok(&bctl, "rdo");
    diff_clean(&src, &work.join("mirror/rdo"));

    builder.stop();
    mirror.stop();
}
