//! The latency benchmark of issue 5, behind the `latency` binary: how long
//! after the builder's last write of a new build a mirror's `current`
//! points at it, for our watching agent (`sync-agent watch` → `sync-agent
//! serve` over QUIC on 127.0.0.1, default debounce) and for lsyncd
//! (`default.rsync` to a local directory, `delay = 1`), both mirroring the
//! same generated DLRN-like tree, while a reader thread on each mirror
//! counts broken repositories behind `current`.
//!
//! Both mirrors watch the same source from the start. By default they take
//! turns in blocks of builds ([`Schedule::Alternate`]): the idle one is
//! frozen with SIGSTOP, so that on a two-core machine neither one's work
//! lands in the other's latency, and it catches up, untimed, before its
//! next turn. [`Schedule::Concurrent`] times every build on both at once
//! instead. Per build: `evolve(1)`, then one poller thread per timed mirror
//! reads `current` every millisecond; builds are spaced by a seeded random
//! 1–2 s pause after the flip, so that each build is its own event.
//!
//! Does IO: writes trees, spawns the agents and lsyncd (and lsyncd spawns
//! rsync), talks to 127.0.0.1 only.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::bench::Samples;
use crate::bins;
use crate::gen::{sidecar_path, tree_stats, DlrnSpec, DlrnTree, TreeStats};

/// The issue's target for our median, with default settings.
pub const TARGET_MEDIAN: Duration = Duration::from_millis(500);
/// Builds the issue asks for, at least, per size.
pub const MIN_BUILDS: usize = 30;
/// Broken-read reasons kept per mirror for the report.
const EXAMPLES: usize = 5;

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Progress on stderr, stamped with the seconds since the first line.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!(
            "latency [{:7.1} s]: {}",
            START.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

/// Which mirrors to run (`--peer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerChoice {
    Ours,
    Lsyncd,
    Both,
}

impl PeerChoice {
    pub fn mirrors(self) -> Vec<Mirror> {
        match self {
            PeerChoice::Ours => vec![Mirror::Ours],
            PeerChoice::Lsyncd => vec![Mirror::Lsyncd],
            PeerChoice::Both => vec![Mirror::Ours, Mirror::Lsyncd],
        }
    }
}

/// One kind of mirror under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mirror {
    Ours,
    Lsyncd,
}

impl Mirror {
    pub fn name(self) -> &'static str {
        match self {
            Mirror::Ours => "ours",
            Mirror::Lsyncd => "lsyncd",
        }
    }
}

/// How several mirrors share the builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// Mirrors take turns in blocks of builds; the others are frozen
    /// (SIGSTOP) meanwhile and catch up, untimed, before their next turn.
    Alternate,
    /// Every mirror times every build, all of them running at once.
    Concurrent,
}

/// The turns of a run: which mirrors (by index) are timed, for how many
/// builds. Each mirror gets `builds` builds.
pub fn turns(
    mirrors: usize,
    schedule: Schedule,
    builds: usize,
    block: usize,
) -> Vec<(Vec<usize>, usize)> {
    if mirrors <= 1 || schedule == Schedule::Concurrent {
        return vec![((0..mirrors).collect(), builds)];
    }
    let block = block.max(1);
    let mut out = Vec::new();
    let mut done = 0;
    while done < builds {
        let n = block.min(builds - done);
        for i in 0..mirrors {
            out.push((vec![i], n));
        }
        done += n;
    }
    out
}

/// Options of one run at one tree size.
#[derive(Clone, Debug)]
pub struct LatencyOptions {
    /// Entries (files + dirs + symlinks) of the generated tree, about.
    pub entries: usize,
    /// File-size multiplier of the generator (1.0 = realistic).
    pub scale: f64,
    /// Builds to time.
    pub builds: usize,
    /// Work directory of this size: tree, mirrors, keys, logs.
    pub dir: PathBuf,
    pub mirrors: Vec<Mirror>,
    pub schedule: Schedule,
    /// Builds per turn with [`Schedule::Alternate`].
    pub block: usize,
    /// Seeds the pauses between builds.
    pub seed: u64,
    /// Longest wait for one build to show on a mirror.
    pub timeout: Duration,
    /// Longest wait for a mirror's initial full copy.
    pub initial_timeout: Duration,
    /// Pause of a reader between two reads.
    pub read_pause: Duration,
    /// lsyncd's `delay`, in seconds.
    pub lsyncd_delay: u32,
    /// Keep the trees afterwards.
    pub keep: bool,
    pub bins: Binaries,
    /// `RUST_LOG` of the agents (their logs go to the work dir).
    pub agent_log: String,
}

/// The `sync-agent` and `sync-cli` to run.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub agent: PathBuf,
    pub cli: PathBuf,
}

impl Binaries {
    /// Those in `dir`, else the workspace's (built by [`bins`] on first use).
    pub fn new(dir: Option<&Path>) -> Binaries {
        match dir {
            Some(d) => Binaries {
                agent: d.join("sync-agent"),
                cli: d.join("sync-cli"),
            },
            None => Binaries {
                agent: bins::sync_agent(),
                cli: bins::sync_cli(),
            },
        }
    }
}

/// What one mirror did over the run.
#[derive(Clone, Debug, Default)]
pub struct PeerResult {
    pub peer: String,
    /// Seconds from the end of `evolve` to `current` flipped, per build
    /// that made it in time.
    pub latencies: Samples,
    pub timeouts: usize,
    pub reads: u64,
    pub broken: u64,
    pub inconclusive: u64,
    /// Builds during whose timing (or the pause after it) a read was broken.
    pub broken_builds: usize,
    pub broken_examples: Vec<String>,
    pub notes: Vec<String>,
}

impl PeerResult {
    pub fn median_ms(&self) -> f64 {
        self.latencies.median() * 1000.0
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies.0, p) * 1000.0
    }

    pub fn builds(&self) -> usize {
        self.latencies.0.len() + self.timeouts
    }
}

/// The result at one tree size.
#[derive(Clone, Debug)]
pub struct SizeReport {
    pub entries_asked: usize,
    pub stats: TreeStats,
    pub scale: f64,
    pub results: Vec<PeerResult>,
}

impl SizeReport {
    pub fn to_json(&self) -> Value {
        json!({
            "entries_asked": self.entries_asked,
            "entries": self.stats.entries(),
            "files": self.stats.files,
            "dirs": self.stats.dirs,
            "symlinks": self.stats.symlinks,
            "bytes": self.stats.bytes,
            "scale": self.scale,
            "peers": self.results.iter().map(|r| json!({
                "peer": r.peer,
                "builds": r.builds(),
                "latency_ms": {
                    "median": finite(r.median_ms()),
                    "p90": finite(r.percentile_ms(90.0)),
                    "p99": finite(r.percentile_ms(99.0)),
                    "min": finite(r.latencies.min() * 1000.0),
                    "max": finite(r.latencies.max() * 1000.0),
                    "samples": r.latencies.0.iter().map(|s| s * 1000.0).collect::<Vec<_>>(),
                },
                "timeouts": r.timeouts,
                "reads": r.reads,
                "broken_reads": r.broken,
                "inconclusive_reads": r.inconclusive,
                "broken_builds": r.broken_builds,
                "broken_examples": r.broken_examples,
                "notes": r.notes,
            })).collect::<Vec<_>>(),
        })
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of `samples`; NaN when empty.
/// With fewer than 100 samples p99 is the maximum.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "-".into()
    }
}

/// The markdown table of every size and peer, then the broken-read
/// examples and notes, then whether our targets hold.
pub fn markdown(reports: &[SizeReport]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| size (entries) | peer | builds | median ms | p90 ms | p99 ms | max ms | reads | broken reads | inconclusive | timeouts |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    for s in reports {
        for r in &s.results {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.stats.entries(),
                r.peer,
                r.builds(),
                ms(r.median_ms()),
                ms(r.percentile_ms(90.0)),
                ms(r.percentile_ms(99.0)),
                ms(r.latencies.max() * 1000.0),
                r.reads,
                r.broken,
                r.inconclusive,
                r.timeouts
            );
        }
    }
    let mut notes = String::new();
    for s in reports {
        for r in &s.results {
            if r.broken > 0 {
                let _ = writeln!(
                    notes,
                    "- {} at {} entries: {} broken reads during {} of {} builds (a build counts from its last write to the next one)",
                    r.peer,
                    s.stats.entries(),
                    r.broken,
                    r.broken_builds,
                    r.builds()
                );
            }
            for e in &r.broken_examples {
                let _ = writeln!(notes, "  - {e}");
            }
            for n in &r.notes {
                let _ = writeln!(notes, "- {} at {} entries: {n}", r.peer, s.stats.entries());
            }
        }
    }
    if !notes.is_empty() {
        let _ = write!(o, "\n{notes}");
    }
    let ours: Vec<(usize, &PeerResult)> = reports
        .iter()
        .flat_map(|s| {
            s.results
                .iter()
                .filter(|r| r.peer == Mirror::Ours.name())
                .map(move |r| (s.stats.entries(), r))
        })
        .collect();
    if !ours.is_empty() {
        let _ = writeln!(o);
        for (n, r) in &ours {
            let missed = missed_targets(r);
            let _ = writeln!(
                o,
                "- ours, target at {n} entries (median < {} ms, no broken read, no timeout, ≥ {MIN_BUILDS} builds): {}",
                TARGET_MEDIAN.as_millis(),
                if missed.is_empty() {
                    "pass".to_string()
                } else {
                    format!("**FAIL** ({})", missed.join(", "))
                }
            );
        }
        if let [(n1, a), .., (n2, b)] = ours.as_slice() {
            let _ = writeln!(
                o,
                "- ours, median at {n2} vs {n1} entries: {:.2}x",
                b.median_ms() / a.median_ms()
            );
        }
    }
    o
}

/// What keeps a result from meeting the issue's target; empty when it does.
pub fn missed_targets(r: &PeerResult) -> Vec<String> {
    let mut m = Vec::new();
    let median = r.median_ms();
    if median.is_nan() || median >= TARGET_MEDIAN.as_secs_f64() * 1000.0 {
        m.push(format!("median {} ms", ms(r.median_ms())));
    }
    if r.broken > 0 {
        m.push(format!("{} broken reads", r.broken));
    }
    if r.timeouts > 0 {
        m.push(format!("{} timeouts", r.timeouts));
    }
    if r.builds() < MIN_BUILDS {
        m.push(format!("only {} builds", r.builds()));
    }
    m
}

/// The files `repomd.xml` names, with the sizes it states. Errors on a
/// document that is cut short or a `<data>` entry lacking either.
pub fn parse_repomd(xml: &str) -> Result<Vec<(String, u64)>, String> {
    if !xml.trim_end().ends_with("</repomd>") {
        return Err("repomd.xml is cut short".into());
    }
    let mut out = Vec::new();
    for block in xml.split("<data ").skip(1) {
        let block = block.split("</data>").next().unwrap_or(block);
        let href = block
            .split_once("<location href=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(h, _)| h.to_string())
            .ok_or("a <data> entry has no location")?;
        let size = block
            .split_once("<size>")
            .and_then(|(_, rest)| rest.split_once("</size>"))
            .and_then(|(n, _)| n.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("{href} has no size"))?;
        out.push((href, size));
    }
    if out.is_empty() {
        return Err("repomd.xml names no file".into());
    }
    Ok(out)
}

/// One read of a mirror's `current`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Complete,
    Broken(String),
    /// Cannot be judged: the build was purged at the source meanwhile.
    Inconclusive,
}

enum Fault {
    Mirror(String),
    /// The source's copy could not be read (purged meanwhile).
    Source,
}

/// Is the repository behind `mirror/current` complete, as a dnf client
/// would see it? `repodata/repomd.xml` must exist and every file it names
/// must be there with the size it states, and every `*.rpm` the source's
/// copy of the build holds (build directories never change once written)
/// must be there with the same content. A missing `current` is broken. A
/// build purged at the source meanwhile makes the read inconclusive: a
/// mirror that catches up over several builds may flip `current` away from
/// a build and purge it between the reader's `readlink` and its reads,
/// exactly as the builder did.
pub fn judge_current(mirror: &Path, src: &Path) -> Verdict {
    let target = match std::fs::read_link(mirror.join("current")) {
        Ok(t) => t,
        Err(e) => return Verdict::Broken(format!("current unreadable: {e}")),
    };
    match check_build(mirror, src, &target) {
        Ok(()) => Verdict::Complete,
        Err(_) if !src.join(&target).is_dir() => Verdict::Inconclusive,
        Err(Fault::Source) => Verdict::Inconclusive,
        Err(Fault::Mirror(why)) => {
            Verdict::Broken(format!("current -> {}: {why}", target.display()))
        }
    }
}

fn check_build(mirror: &Path, src: &Path, target: &Path) -> Result<(), Fault> {
    let have = mirror.join(target);
    let repomd = std::fs::read_to_string(have.join("repodata/repomd.xml"))
        .map_err(|e| Fault::Mirror(format!("no repodata/repomd.xml ({e})")))?;
    for (href, size) in parse_repomd(&repomd).map_err(Fault::Mirror)? {
        match std::fs::metadata(have.join(&href)) {
            Ok(m) if m.len() == size => {}
            Ok(m) => {
                return Err(Fault::Mirror(format!(
                    "repomd.xml names {href} of {size} bytes, the mirror has {}",
                    m.len()
                )))
            }
            Err(_) => return Err(Fault::Mirror(format!("repomd.xml names {href}, missing"))),
        }
    }
    let dir = std::fs::read_dir(src.join(target)).map_err(|_| Fault::Source)?;
    for e in dir {
        let e = e.map_err(|_| Fault::Source)?;
        let name = e.file_name();
        if !name.to_string_lossy().ends_with(".rpm")
            || !e.file_type().map_err(|_| Fault::Source)?.is_file()
        {
            continue;
        }
        let want = std::fs::read(e.path()).map_err(|_| Fault::Source)?;
        match std::fs::read(have.join(&name)) {
            Ok(got) if got == want => {}
            Ok(_) => return Err(Fault::Mirror(format!("{} differs", name.to_string_lossy()))),
            Err(_) => return Err(Fault::Mirror(format!("{} missing", name.to_string_lossy()))),
        }
    }
    Ok(())
}

/// Counts of one reader thread.
#[derive(Default)]
struct ReadStats {
    reads: AtomicU64,
    broken: AtomicU64,
    inconclusive: AtomicU64,
    /// Per build being timed: broken reads and the first one's reason.
    per_build: Mutex<std::collections::BTreeMap<u64, (u64, String)>>,
    /// The build being timed (1-based; 0 before the first), for examples.
    build: AtomicU64,
    /// Off while the mirror is frozen or catching up.
    active: AtomicBool,
}

fn reader(
    mirror: PathBuf,
    src: PathBuf,
    pause: Duration,
    stop: Arc<AtomicBool>,
    st: Arc<ReadStats>,
) {
    while !stop.load(Ordering::Relaxed) {
        if !st.active.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        st.reads.fetch_add(1, Ordering::Relaxed);
        match judge_current(&mirror, &src) {
            Verdict::Complete => {}
            Verdict::Inconclusive => {
                st.inconclusive.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Broken(why) => {
                st.broken.fetch_add(1, Ordering::Relaxed);
                let b = st.build.load(Ordering::Relaxed);
                let mut per = st.per_build.lock().unwrap();
                per.entry(b).or_insert((0, why)).0 += 1;
            }
        }
        std::thread::sleep(pause);
    }
}

/// Polls `mirror/current` every millisecond until it reads `target`;
/// the time since `t0`, or `None` after `timeout`.
fn wait_flip(mirror: &Path, target: &Path, t0: Instant, timeout: Duration) -> Option<Duration> {
    let link = mirror.join("current");
    loop {
        if std::fs::read_link(&link).is_ok_and(|t| t == target) {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A child process (and, for lsyncd, its process group, which holds its
/// rsync runs) stopped with SIGTERM, then SIGKILL, when dropped.
struct Proc {
    child: Child,
    group: bool,
}

impl Proc {
    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        let pid = if self.group { -pid } else { pid };
        // SAFETY: kill(2) on our own child (or the group it leads).
        unsafe { libc::kill(pid, sig) };
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        // A frozen process handles SIGTERM only once it runs again.
        self.signal(libc::SIGCONT);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running mirror: what feeds it and where it is.
struct Running {
    mirror: Mirror,
    dest: PathBuf,
    procs: Vec<Proc>,
    logs: Vec<PathBuf>,
    /// Stopped with SIGSTOP while another mirror is timed.
    frozen: bool,
}

impl Running {
    fn freeze(&mut self) {
        for p in &self.procs {
            p.signal(libc::SIGSTOP);
        }
        self.frozen = true;
    }

    fn thaw(&mut self) {
        for p in &self.procs {
            p.signal(libc::SIGCONT);
        }
        self.frozen = false;
    }

    /// The first of its processes that exited, described.
    fn dead(&mut self) -> Option<String> {
        self.procs.iter_mut().find_map(|p| p.exited()).map(|s| {
            format!(
                "{} exited ({s}); see {}",
                self.mirror.name(),
                self.logs[0].display()
            )
        })
    }
}

fn keygen(b: &Binaries, dir: &Path) -> Result<String> {
    let out = Command::new(&b.cli)
        .args(["keygen", "--json", "--out"])
        .arg(dir)
        .output()?;
    ensure!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["fingerprint"]
        .as_str()
        .context("keygen printed no fingerprint")?
        .to_string())
}

fn status(b: &Binaries, ctl: &Path) -> Value {
    Command::new(&b.cli)
        .arg("--control")
        .arg(ctl)
        .args(["status", "--json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default()
}

fn current_is(dest: &Path, target: &Path) -> bool {
    std::fs::read_link(dest.join("current")).is_ok_and(|t| t == target)
}

/// `diff -rq --no-dereference`: `None` when clean, else its first lines.
fn diff(a: &Path, b: &Path) -> Result<Option<String>> {
    let out = Command::new("diff")
        .args(["-rq", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .context("running diff")?;
    if out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let n = text.lines().count();
    let head: Vec<&str> = text.lines().take(5).collect();
    Ok(Some(format!(
        "{n} differences, e.g. {}{}",
        head.join("; "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// `sync-agent serve` for the mirror and `sync-agent watch` on the source
/// with default debounce settings, both logging at info into `work`.
fn start_ours(b: &Binaries, log: &str, work: &Path, src: &Path, dest: &Path) -> Result<Running> {
    let keys = work.join("keys");
    remove(&keys)?;
    let builder = keygen(b, &keys.join("builder"))?;
    let mirror_fp = keygen(b, &keys.join("mirror"))?;
    std::fs::create_dir_all(dest)?;
    let serve_log = work.join("ours-serve.log");
    let mut serve = Command::new(&b.agent)
        .args(["serve", "--listen", "127.0.0.1:0", "--allow"])
        .arg(format!("{builder}:push"))
        .arg("--identity")
        .arg(keys.join("mirror"))
        .arg("--tree")
        .arg(format!("rdo={}", dest.display()))
        .env("RUST_LOG", log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&serve_log)?)
        .spawn()
        .context("starting sync-agent serve")?;
    let mut out = BufReader::new(serve.stdout.take().context("piped")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    // Keep draining its stdout so that a later line cannot fail on a closed pipe.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let serve = Proc {
        child: serve,
        group: false,
    };
    let Some(addr) = line.split_whitespace().nth(2).map(str::to_string) else {
        bail!(
            "sync-agent serve not ready: {line:?}; see {}",
            serve_log.display()
        );
    };
    let watch_log = work.join("ours-watch.log");
    let watch = Command::new(&b.agent)
        .arg("watch")
        .arg(src)
        .arg("--to")
        .arg(format!("quic://{addr}/rdo"))
        .arg("--peer")
        .arg(&mirror_fp)
        .arg("--identity")
        .arg(keys.join("builder"))
        .arg("--control")
        .arg(work.join("ctl.sock"))
        .arg("--cache")
        .arg(work.join("hash.cache"))
        .env("RUST_LOG", log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&watch_log)?)
        .spawn()
        .context("starting sync-agent watch")?;
    Ok(Running {
        mirror: Mirror::Ours,
        dest: dest.to_path_buf(),
        procs: vec![
            Proc {
                child: watch,
                group: false,
            },
            serve,
        ],
        logs: vec![watch_log, serve_log],
        frozen: false,
    })
}

fn lua_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `lsyncd -nodaemon CONF` with `default.rsync` into `dest`, in its own
/// process group so that stopping it stops its rsync too.
fn start_lsyncd(work: &Path, src: &Path, dest: &Path, delay: u32) -> Result<Running> {
    std::fs::create_dir_all(dest)?;
    let log = work.join("lsyncd.log");
    let conf = work.join("lsyncd.conf.lua");
    let text = format!(
        "settings {{\n    logfile = {},\n    statusFile = {},\n    nodaemon = true,\n}}\n\
         sync {{\n    default.rsync,\n    source = {},\n    target = {},\n    delay = {delay},\n}}\n",
        lua_str(&log),
        lua_str(&work.join("lsyncd.status")),
        lua_str(src),
        lua_str(dest),
    );
    std::fs::write(&conf, text)?;
    let out = work.join("lsyncd.out");
    let child = Command::new("lsyncd")
        .arg("-nodaemon")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(work.join("lsyncd.err"))?)
        .process_group(0)
        .spawn()
        .context("starting lsyncd")?;
    Ok(Running {
        mirror: Mirror::Lsyncd,
        dest: dest.to_path_buf(),
        procs: vec![Proc { child, group: true }],
        logs: vec![log, out],
        frozen: false,
    })
}

fn read_text(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Lines of lsyncd's log that tell of a failure (the watch limit first).
fn lsyncd_errors(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(" Error: ")
                || l.contains(" Warn: ")
                || l.contains("No space left")
                || l.contains("max_user_watches")
        })
        .take(EXAMPLES)
        .map(str::to_string)
        .collect()
}

/// Wait until the mirror holds the whole tree: for ours the agent reports
/// the source's root committed, for lsyncd its startup rsync finished;
/// then `current` must match and `diff -rq` be clean.
fn wait_initial(
    b: &Binaries,
    r: &mut Running,
    work: &Path,
    src: &Path,
    target: &Path,
    timeout: Duration,
) -> Result<()> {
    let t0 = Instant::now();
    let end = t0 + timeout;
    loop {
        if let Some(why) = r.dead() {
            let mut msg = why;
            if r.mirror == Mirror::Lsyncd {
                let errs = lsyncd_errors(&read_text(&r.logs[0]));
                if !errs.is_empty() {
                    let _ = write!(msg, ": {}", errs.join(" | "));
                }
            }
            bail!(msg);
        }
        let ready = match r.mirror {
            Mirror::Ours => {
                let s = status(b, &work.join("ctl.sock"));
                let t = &s["trees"][0];
                !t["root"].is_null() && t["peers"][0]["committed_root"] == t["root"]
            }
            Mirror::Lsyncd => read_text(&r.logs[0])
                .lines()
                .any(|l| l.contains("Startup of") && l.contains("finished")),
        };
        if ready && current_is(&r.dest, target) {
            match diff(src, &r.dest)? {
                None => break,
                Some(d) if Instant::now() > end => {
                    bail!("{} never matched the source: {d}", r.mirror.name())
                }
                Some(_) => {}
            }
        }
        ensure!(
            Instant::now() < end,
            "{}: no full copy after {} s; see {}",
            r.mirror.name(),
            timeout.as_secs(),
            r.logs[0].display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    say!(
        "{} holds the full tree after {:.1} s",
        r.mirror.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `text` without ANSI colour sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Medians of our source agent's scan times and counts from its log.
fn ours_log_notes(log: &str) -> Vec<String> {
    let mut scans = Vec::new();
    let mut warns = 0;
    for l in strip_ansi(log).lines() {
        if l.contains(" WARN ") || l.contains(" ERROR ") {
            warns += 1;
        }
        if l.contains("scanned") {
            if let Some(v) = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ms="))
                .and_then(|v| v.parse::<f64>().ok())
            {
                scans.push(v / 1000.0);
            }
        }
    }
    let mut notes = Vec::new();
    if !scans.is_empty() {
        let s = Samples(scans);
        notes.push(format!(
            "source agent: {} scans logged (the first one full; with --schedule alternate also the untimed catch-ups), median {:.0} ms, max {:.0} ms",
            s.0.len(),
            s.median() * 1000.0,
            s.max() * 1000.0
        ));
    }
    if warns > 0 {
        notes.push(format!("source agent logged {warns} warnings or errors"));
    }
    notes
}

/// Counts from lsyncd's log: how many rsync runs it started.
fn lsyncd_log_notes(log: &str) -> Vec<String> {
    let calls = log.lines().filter(|l| l.contains("Calling rsync")).count();
    let mut notes = vec![format!(
        "lsyncd started {calls} rsync runs after its startup sync (with --schedule alternate also the untimed catch-ups)"
    )];
    for e in lsyncd_errors(log) {
        notes.push(format!("lsyncd log: {e}"));
    }
    notes
}

pub use crate::bench::suites::remove;
use crate::bench::suites::state_of;

/// After a thaw: wait until the mirror holds the source's newest build
/// and stays settled (ours: the agent's root committed and unchanged over
/// a second; lsyncd: one `delay` more for its deletions).
fn catch_up(o: &LatencyOptions, r: &mut Running, target: &Path) -> Result<(), String> {
    let end = Instant::now() + o.initial_timeout.min(Duration::from_secs(300));
    let t0 = Instant::now();
    let ctl = o.dir.join("ctl.sock");
    let settled = |r: &Running| -> Option<Value> {
        if !current_is(&r.dest, target) {
            return None;
        }
        match r.mirror {
            Mirror::Ours => {
                let s = status(&o.bins, &ctl);
                let t = &s["trees"][0];
                (!t["root"].is_null() && t["peers"][0]["committed_root"] == t["root"])
                    .then(|| t["root"].clone())
            }
            Mirror::Lsyncd => Some(Value::Null),
        }
    };
    loop {
        if let Some(why) = r.dead() {
            return Err(why);
        }
        if let Some(root) = settled(r) {
            std::thread::sleep(Duration::from_secs(o.lsyncd_delay.max(1) as u64));
            if settled(r) == Some(root) {
                say!(
                    "{} caught up in {:.1} s",
                    r.mirror.name(),
                    t0.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
        if Instant::now() > end {
            return Err(format!("{} did not catch up after a thaw", r.mirror.name()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Generates the tree, starts the mirrors, waits for their full copies,
/// then times `o.builds` builds on every mirror at once.
pub fn run_size(o: &LatencyOptions) -> Result<SizeReport> {
    std::fs::create_dir_all(&o.dir)?;
    let src = o.dir.join("src");
    remove(&src)?;
    let _ = std::fs::remove_file(sidecar_path(&src));
    let mut spec = DlrnSpec::entries_target(o.entries);
    spec.scale = o.scale;
    // Purge as DLRN does, so that the tree stays at its size.
    spec.keep_builds = spec.builds;
    say!(
        "generating {} ({} projects, {} builds, scale {})",
        src.display(),
        spec.projects,
        spec.builds,
        spec.scale
    );
    let t = Instant::now();
    let mut tree = DlrnTree::create(&src, spec)?;
    let stats = tree_stats(&src)?;
    say!(
        "{} entries ({} dirs), {:.2} GB in {:.1} s",
        stats.entries(),
        stats.dirs,
        stats.bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );

    let mut running = Vec::new();
    for &m in &o.mirrors {
        let dest = o.dir.join(format!("{}-mirror", m.name()));
        remove(&dest)?;
        remove(&state_of(&dest))?;
        running.push(match m {
            Mirror::Ours => start_ours(&o.bins, &o.agent_log, &o.dir, &src, &dest)?,
            Mirror::Lsyncd => start_lsyncd(&o.dir, &src, &dest, o.lsyncd_delay)?,
        });
    }
    let target = tree.current_target();
    for r in &mut running {
        wait_initial(&o.bins, r, &o.dir, &src, &target, o.initial_timeout)?;
    }
    // Let any follow-up scan of the initial sync settle before timing.
    std::thread::sleep(Duration::from_secs(3));

    let stop = Arc::new(AtomicBool::new(false));
    let stats_of: Vec<Arc<ReadStats>> = running.iter().map(|_| Arc::default()).collect();
    let readers: Vec<_> = running
        .iter()
        .zip(&stats_of)
        .map(|(r, st)| {
            let (m, s, p, stop, st) = (
                r.dest.clone(),
                src.clone(),
                o.read_pause,
                stop.clone(),
                st.clone(),
            );
            std::thread::spawn(move || reader(m, s, p, stop, st))
        })
        .collect();

    let mut results: Vec<PeerResult> = running
        .iter()
        .map(|r| PeerResult {
            peer: r.mirror.name().to_string(),
            ..Default::default()
        })
        .collect();
    let turns = turns(running.len(), o.schedule, o.builds, o.block);
    let mut alive: Vec<bool> = vec![true; running.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let mut b = 0;
    let measure = (|| -> Result<()> {
        for (active, n) in &turns {
            // Only the mirrors of this turn run; the others are frozen.
            for (i, r) in running.iter_mut().enumerate() {
                let on = active.contains(&i);
                stats_of[i].active.store(false, Ordering::Relaxed);
                if !on && !r.frozen {
                    r.freeze();
                } else if on && r.frozen {
                    r.thaw();
                    let target = tree.current_target();
                    if alive[i] {
                        if let Err(why) = catch_up(o, r, &target) {
                            results[i]
                                .notes
                                .push(format!("before build {}: {why}", b + 1));
                            alive[i] = false;
                        }
                    }
                }
            }
            for &i in active {
                stats_of[i].active.store(alive[i], Ordering::Relaxed);
            }
            for _ in 0..*n {
                b += 1;
                for &i in active {
                    if alive[i] {
                        if let Some(why) = running[i].dead() {
                            results[i].notes.push(format!("before build {b}: {why}"));
                            alive[i] = false;
                        }
                    }
                }
                for st in &stats_of {
                    st.build.store(b as u64, Ordering::Relaxed);
                }
                tree.evolve(1)?;
                let t0 = Instant::now();
                let target = tree.current_target();
                let waits: Vec<(usize, Option<Duration>)> = std::thread::scope(|s| {
                    let hs: Vec<_> = active
                        .iter()
                        .map(|&i| {
                            let (dest, target, up) = (&running[i].dest, &target, alive[i]);
                            s.spawn(move || {
                                up.then(|| wait_flip(dest, target, t0, o.timeout)).flatten()
                            })
                        })
                        .collect();
                    active
                        .iter()
                        .zip(hs)
                        .map(|(&i, h)| (i, h.join().unwrap_or(None)))
                        .collect()
                });
                let mut line = format!("build {b}:");
                for (i, w) in waits {
                    let r = &mut results[i];
                    match w {
                        Some(d) => {
                            r.latencies.push(d.as_secs_f64());
                            let _ = write!(line, " {} {:.0} ms", r.peer, d.as_secs_f64() * 1000.0);
                        }
                        None => {
                            r.timeouts += 1;
                            let _ = write!(line, " {} TIMEOUT", r.peer);
                        }
                    }
                }
                say!("{line}");
                std::thread::sleep(Duration::from_secs_f64(1.0 + rng.random::<f64>()));
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for h in readers {
        let _ = h.join();
    }
    for r in &mut running {
        if r.frozen {
            r.thaw();
        }
    }
    measure?;

    say!("builds done; final check");
    // Afterwards every mirror should equal the source again.
    let target = tree.current_target();
    let end = Instant::now() + o.timeout;
    for (i, r) in running.iter_mut().enumerate() {
        while !current_is(&r.dest, &target) && Instant::now() < end && r.dead().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        // lsyncd may still be deleting the purged build a moment later.
        std::thread::sleep(Duration::from_secs(o.lsyncd_delay as u64 + 1));
        match diff(&src, &r.dest)? {
            None => results[i]
                .notes
                .push("final diff -rq against the source: clean".into()),
            Some(d) => results[i]
                .notes
                .push(format!("final diff -rq against the source: {d}")),
        }
    }
    say!("stopping the mirrors");
    for (i, r) in running.iter_mut().enumerate() {
        let st = &stats_of[i];
        let res = &mut results[i];
        res.reads = st.reads.load(Ordering::Relaxed);
        res.broken = st.broken.load(Ordering::Relaxed);
        res.inconclusive = st.inconclusive.load(Ordering::Relaxed);
        let per = st.per_build.lock().unwrap();
        res.broken_builds = per.len();
        res.broken_examples = per
            .iter()
            .take(EXAMPLES)
            .map(|(b, (n, why))| format!("build {b}: {n} broken reads, the first: {why}"))
            .collect();
        for p in &mut r.procs {
            p.stop();
        }
        let log = read_text(&r.logs[0]);
        res.notes.extend(match r.mirror {
            Mirror::Ours => ours_log_notes(&log),
            Mirror::Lsyncd => lsyncd_log_notes(&log),
        });
    }
    drop(running);
    say!("stopped");
    if !o.keep {
        say!("removing the trees under {} (logs stay)", o.dir.display());
        for m in &o.mirrors {
            let dest = o.dir.join(format!("{}-mirror", m.name()));
            remove(&dest)?;
            remove(&state_of(&dest))?;
        }
        remove(&src)?;
        let _ = std::fs::remove_file(sidecar_path(&src));
    }
    Ok(SizeReport {
        entries_asked: o.entries,
        stats,
        scale: o.scale,
        results,
    })
}

/// First line of `cmd arg`'s output, or "missing".
pub fn version_of(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .and_then(|s| {
            s.lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "missing".into())
}

/// Installs lsyncd with apt-get when it is missing and we are root;
/// `Err` says why it is not there.
pub fn ensure_lsyncd() -> Result<()> {
    let have = || {
        Command::new("lsyncd")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have() {
        return Ok(());
    }
    // SAFETY: geteuid(2) has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "lsyncd is missing and we are not root"
    );
    say!("installing lsyncd with apt-get");
    let quiet = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let _ = quiet(&["update", "-qq"]);
    let out = quiet(&["install", "-y", "-qq", "lsyncd"]).context("running apt-get")?;
    ensure!(
        out.status.success() && have(),
        "apt-get install lsyncd failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 15.0);
        assert_eq!(percentile(&v, 90.0), 27.0);
        assert_eq!(percentile(&v, 99.0), 30.0);
        assert_eq!(percentile(&v, 100.0), 30.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        let h: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        assert_eq!(percentile(&h, 99.0), 198.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn turns_alternate_in_blocks() {
        assert_eq!(turns(1, Schedule::Alternate, 7, 5), vec![(vec![0], 7)]);
        assert_eq!(turns(2, Schedule::Concurrent, 7, 5), vec![(vec![0, 1], 7)]);
        assert_eq!(
            turns(2, Schedule::Alternate, 7, 5),
            vec![(vec![0], 5), (vec![1], 5), (vec![0], 2), (vec![1], 2)]
        );
    }

    const REPOMD: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<repomd xmlns="http://linux.duke.edu/metadata/repo">
  <revision>1</revision>
  <data type="primary">
    <checksum type="sha256">ab</checksum>
    <location href="repodata/ab-primary.xml.gz"/>
    <timestamp>1</timestamp>
    <size>1234</size>
  </data>
  <data type="other_db">
    <location href="repodata/cd-other.sqlite.bz2"/>
    <size>7</size>
  </data>
</repomd>
"#;

    #[test]
    fn repomd_names_files_and_sizes() {
        assert_eq!(
            parse_repomd(REPOMD).unwrap(),
            vec![
                ("repodata/ab-primary.xml.gz".to_string(), 1234),
                ("repodata/cd-other.sqlite.bz2".to_string(), 7)
            ]
        );
        let cut = &REPOMD[..REPOMD.len() - 12];
        assert!(parse_repomd(cut).unwrap_err().contains("cut short"));
        let nosize = REPOMD.replace("<size>7</size>", "");
        assert!(parse_repomd(&nosize).unwrap_err().contains("cd-other"));
        assert!(parse_repomd("<repomd></repomd>").is_err());
    }

    #[test]
    fn a_generated_build_is_complete_and_a_partial_copy_is_broken() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let tree = DlrnTree::create(&src, DlrnSpec::quick()).unwrap();
        assert_eq!(judge_current(&src, &src), Verdict::Complete);

        // A mirror whose `current` is there but whose build lacks an RPM.
        let m = d.path().join("m");
        let cur = tree.current_target();
        std::fs::create_dir_all(m.join(&cur).join("repodata")).unwrap();
        std::os::unix::fs::symlink(&cur, m.join("current")).unwrap();
        for e in std::fs::read_dir(src.join(&cur).join("repodata")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), m.join(&cur).join("repodata").join(e.file_name())).unwrap();
        }
        match judge_current(&m, &src) {
            Verdict::Broken(why) => assert!(why.contains(".rpm missing"), "{why}"),
            v => panic!("{v:?}"),
        }
        // The same read is inconclusive once the source purged the build.
        std::fs::remove_dir_all(src.join(&cur)).unwrap();
        assert_eq!(judge_current(&m, &src), Verdict::Inconclusive);
        // No `current` at all is broken.
        std::fs::remove_file(m.join("current")).unwrap();
        assert!(matches!(judge_current(&m, &src), Verdict::Broken(_)));
    }
}
