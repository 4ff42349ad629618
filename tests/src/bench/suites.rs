//! The suites. Each generates its tree under the work dir, warms what a
//! real deployment would have warm (page cache, the builder's hash cache),
//! then runs ours and the peer alternately for every round.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::freshfs::{fresh_dest, image_size, FreshFs};
use super::measure::{run, run_shell, sync, timed_sync, Run, Samples};
use super::report::{Check, Row, Table};
use super::{BenchOptions, Suite};
use crate::bins;
use crate::gen::{tree_stats, DlrnSpec, DlrnTree, TreeStats};

/// Files changed within this long before a scan are not cached (racy).
const RACY: Duration = Duration::from_millis(2100);
/// `find` printing what a stat-only walk needs: size and mtime.
const FIND_WALK: &str = "find \"$1\" -printf '%s %T@\\n' > /dev/null";

struct Ctx<'a> {
    o: &'a BenchOptions,
    cli: PathBuf,
}

impl Ctx<'_> {
    /// `sync-cli ARGS` with the hash cache under the work dir.
    fn cli<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Command {
        let mut c = Command::new(&self.cli);
        c.args(args)
            .env("XDG_CACHE_HOME", self.o.dir.join("xdg-cache"))
            .env_remove("RUST_LOG");
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.o.dir.join(name)
    }

    fn generate(&self, name: &str) -> Result<(DlrnTree, TreeStats)> {
        let root = self.path(name);
        remove(&root)?;
        let _ = std::fs::remove_file(crate::gen::sidecar_path(&root));
        let mut spec = DlrnSpec::entries_target(self.o.entries);
        spec.scale = self.o.scale;
        let t0 = Instant::now();
        eprintln!(
            "bench: generating {} ({} projects, {} builds, scale {})",
            root.display(),
            spec.projects,
            spec.builds,
            spec.scale
        );
        let tree = DlrnTree::create(&root, spec)?;
        let stats = tree_stats(&root)?;
        eprintln!(
            "bench: {} entries, {} files, {:.2} GB in {:.1} s",
            stats.entries(),
            stats.files,
            stats.bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        );
        // On the disk before any timed run, as a builder's tree is: its
        // gigabytes otherwise go on being written back under the first
        // rounds.
        sync();
        std::thread::sleep(RACY);
        Ok((tree, stats))
    }

    /// Scan twice with the default cache so the next push finds it warm.
    fn warm_cache(&self, tree: &Path) -> Result<()> {
        std::thread::sleep(RACY);
        for _ in 0..2 {
            run(self.cli([OsStr::new("scan"), OsStr::new("--json"), tree.as_os_str()]))?;
        }
        Ok(())
    }
}

/// Inodes, dentries and page cache of the source warm: a walk, then every
/// file read. Also before each timed initial and 5-build run of the QUIC
/// suite (the 5-build rounds first copy mirrors of the tree's size): a tree
/// read once sits on the inactive list, and the runs' own writes (and each
/// new filesystem's mkfs) push it out, so that whichever side ran first
/// read part of its source from disk (ours 21 s, 8 s, then 3.2-3.5 s in
/// the rounds after generating the tree).
fn warm_source(src: &Path) -> Result<()> {
    run_shell(FIND_WALK, &[src.as_os_str()])?;
    run_shell(
        "find \"$1\" -type f -print0 | xargs -0 cat > /dev/null",
        &[src.as_os_str()],
    )?;
    Ok(())
}

pub fn remove(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(p).with_context(|| format!("rm -rf {}", p.display()))
        }
        Ok(_) => std::fs::remove_file(p).with_context(|| format!("rm {}", p.display())),
        Err(_) => Ok(()),
    }
}

/// `.NAME.sync-state` beside DEST (the CLI's default state dir).
pub fn state_of(dest: &Path) -> PathBuf {
    let mut n = std::ffi::OsString::from(".");
    n.push(dest.file_name().expect("dest has a name"));
    n.push(".sync-state");
    dest.with_file_name(n)
}

/// `SRC/`: rsync copies the directory's content, not the directory.
fn with_slash(p: &Path) -> std::ffi::OsString {
    let mut s = p.as_os_str().to_os_string();
    s.push("/");
    s
}

fn cp_a(from: &Path, to: &Path) -> Result<Run> {
    run(Command::new("cp").arg("-a").arg(from).arg(to))
}

/// Every regular file below `root` (symlinks not followed).
fn regular_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                files.push(e.path());
            }
        }
    }
    Ok(files)
}

/// Every regular file below `root`, as a NUL-separated list in `out`.
fn file_list(root: &Path, out: &Path) -> Result<usize> {
    let files = regular_files(root)?;
    let mut buf = Vec::new();
    for f in &files {
        buf.extend_from_slice(f.as_os_str().as_bytes());
        buf.push(0);
    }
    std::fs::write(out, buf)?;
    Ok(files.len())
}

fn num(v: &serde_json::Value, k: &str) -> Result<u64> {
    v[k].as_u64()
        .with_context(|| format!("JSON lacks numeric {k}: {v}"))
}

fn machine_context(o: &BenchOptions, stats: &TreeStats) -> Vec<(String, String)> {
    let first_line = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "missing".into())
    };
    let fs = Command::new("df")
        .arg("--output=fstype")
        .arg(&o.dir)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).map(|l| l.trim().to_string()))
        .unwrap_or_default();
    vec![
        (
            "tree".into(),
            format!(
                "{} entries ({} files, {} dirs, {} symlinks), {:.2} GB, --entries {} --scale {}",
                stats.entries(),
                stats.files,
                stats.dirs,
                stats.symlinks,
                stats.bytes as f64 / 1e9,
                o.entries,
                o.scale
            ),
        ),
        ("rounds".into(), o.rounds.to_string()),
        ("rounds (unchanged tree)".into(), o.quick_rounds.to_string()),
        (
            "rounds (QUIC 5 new builds)".into(),
            o.build_rounds.to_string(),
        ),
        (
            "machine".into(),
            format!(
                "{} CPUs, kernel {}, {} on {}",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                first_line("uname", "-r"),
                fs,
                o.dir.display()
            ),
        ),
        (
            "peers".into(),
            format!(
                "{}; {}",
                first_line("rsync", "--version"),
                first_line("b3sum", "--version")
            ),
        ),
    ]
}

pub fn run_suite(suite: Suite, o: &BenchOptions) -> Result<Table> {
    std::fs::create_dir_all(&o.dir)?;
    let ctx = Ctx {
        o,
        cli: bins::sync_cli(),
    };
    match suite {
        Suite::Scan => scan_suite(&ctx),
        Suite::PushLocal => push_local_suite(&ctx),
        Suite::Quic => quic_suite(&ctx),
    }
}

fn scan_suite(ctx: &Ctx) -> Result<Table> {
    ensure!(bins::have("b3sum"), "b3sum is needed for the scan suite");
    let (_tree, stats) = ctx.generate("scan-src")?;
    let src = ctx.path("scan-src");
    let list = ctx.path("scan-files.list");
    let files = file_list(&src, &list)?;
    let b3 = "xargs -0 -a \"$1\" b3sum --no-names > /dev/null";
    let b3_par = "xargs -0 -a \"$1\" -P \"$2\" -n 2000 b3sum --no-names > /dev/null";
    let ncpu = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    // Page cache warm for both sides: this measures hashing, not the disk.
    run_shell(b3, &[list.as_os_str()])?;

    let scan_cold = || run(ctx.cli(["scan", "--no-cache", "--json"]).arg(&src));
    let (mut cold, mut b3s, mut b3p) = (Samples::default(), Samples::default(), Samples::default());
    let mut rss = Samples::default();
    for r in 0..ctx.o.rounds {
        eprintln!("bench: scan round {}/{}", r + 1, ctx.o.rounds);
        let mut ours = || -> Result<()> {
            let run = scan_cold()?;
            let v = run.json()?;
            ensure!(num(&v, "files")? as usize == stats.files, "file count: {v}");
            cold.push(run.secs);
            rss.push(run.max_rss as f64);
            Ok(())
        };
        if r % 2 == 0 {
            ours()?;
            b3s.push(run_shell(b3, &[list.as_os_str()])?.secs);
            b3p.push(run_shell(b3_par, &[list.as_os_str(), OsStr::new(&ncpu)])?.secs);
        } else {
            b3p.push(run_shell(b3_par, &[list.as_os_str(), OsStr::new(&ncpu)])?.secs);
            b3s.push(run_shell(b3, &[list.as_os_str()])?.secs);
            ours()?;
        }
    }

    let cache = ctx.path("scan.hcache");
    let _ = std::fs::remove_file(&cache);
    let cache_arg = format!("--cache={}", cache.display());
    let scan_warm = || run(ctx.cli(["scan", "--json", &cache_arg]).arg(&src));
    scan_warm()?;
    let v = scan_warm()?.json()?;
    ensure!(
        num(&v, "cache_hits")? as usize == files && num(&v, "files_hashed")? == 0,
        "the cache did not warm: {v}"
    );
    let (mut warm, mut find, mut warm_rss) =
        (Samples::default(), Samples::default(), Samples::default());
    for r in 0..ctx.o.rounds {
        let mut ours = || -> Result<()> {
            let run = scan_warm()?;
            ensure!(num(&run.json()?, "files_hashed")? == 0, "warm scan hashed");
            warm.push(run.secs);
            warm_rss.push(run.max_rss as f64);
            Ok(())
        };
        if r % 2 == 0 {
            ours()?;
            find.push(run_shell(FIND_WALK, &[src.as_os_str()])?.secs);
        } else {
            find.push(run_shell(FIND_WALK, &[src.as_os_str()])?.secs);
            ours()?;
        }
    }

    let entries = stats.entries() as f64;
    let mut t = Table {
        suite: "scan".into(),
        context: machine_context(ctx.o, &stats),
        rows: vec![
            Row {
                case: "cold scan (`scan --no-cache`)".into(),
                ours: cold.clone(),
                peer_name: "b3sum (xargs -0)".into(),
                peer: b3s,
                target: Some(1.3),
                note: format!("{:.0} MB/s ours", stats.bytes as f64 / cold.median() / 1e6),
            },
            Row {
                case: "cold scan (`scan --no-cache`)".into(),
                ours: cold,
                peer_name: format!("b3sum (xargs -0 -P {ncpu})"),
                peer: b3p,
                target: None,
                note: String::new(),
            },
            Row {
                case: "warm rescan (`scan --cache`, all hits)".into(),
                ours: warm,
                peer_name: "find -printf '%s %T@'".into(),
                peer: find,
                target: Some(2.0),
                note: String::new(),
            },
        ],
        checks: Vec::new(),
        cleanup: Vec::new(),
    };
    t.checks.push(Check::at_most(
        "peak RSS, cold scan",
        rss.median() / entries,
        "B/entry",
        200.0,
        format!("{:.1} MiB", rss.median() / 1048576.0),
    ));
    t.checks.push(Check::at_most(
        "peak RSS, warm rescan",
        warm_rss.median() / entries,
        "B/entry",
        200.0,
        format!("{:.1} MiB", warm_rss.median() / 1048576.0),
    ));
    if !ctx.o.keep {
        let side = crate::gen::sidecar_path(&src);
        t.cleanup.extend([src, side, list, cache]);
    }
    Ok(t)
}

/// The three ways to make a copy, run into fresh destinations.
#[derive(Clone, Copy)]
enum Copier {
    Ours,
    OursNoCache,
    Rsync,
    CpA,
}

fn push_local_suite(ctx: &Ctx) -> Result<Table> {
    ensure!(
        bins::have("rsync"),
        "rsync is needed for the push-local suite"
    );
    let (mut tree, stats) = ctx.generate("push-src")?;
    let src = ctx.path("push-src");
    let src_slash = with_slash(&src);
    let d_ours = ctx.path("dst-ours");
    let d_rsync = ctx.path("dst-rsync");
    let d_cp = ctx.path("dst-cp");
    ctx.warm_cache(&src)?;
    warm_source(&src)?;

    // One timed copy into `dest` (empty, its state dir absent).
    let copy_into = |c: Copier, dest: &Path| -> Result<f64> {
        let secs = match c {
            Copier::Ours | Copier::OursNoCache => {
                let mut cmd = ctx.cli(["push", "--json"]);
                if matches!(c, Copier::OursNoCache) {
                    cmd.arg("--no-cache");
                }
                let r = run(cmd.arg(&src).arg(dest))?;
                let v = r.json()?;
                ensure!(num(&v, "files_written")? as usize == stats.files, "{v}");
                r.secs
            }
            Copier::Rsync => run(Command::new("rsync").arg("-a").arg(&src_slash).arg(dest))?.secs,
            Copier::CpA => cp_a(&src, dest)?.secs,
        };
        Ok(secs)
    };
    let dest_of = |c: Copier| match c {
        Copier::Ours | Copier::OursNoCache => &d_ours,
        Copier::Rsync => &d_rsync,
        Copier::CpA => &d_cp,
    };
    // Empty `dest` and its state dir in the work directory.
    let clear = |dest: &Path| -> Result<()> {
        remove(dest)?;
        remove(&state_of(dest))?;
        sync();
        Ok(())
    };
    let fresh = |c: Copier| -> Result<f64> {
        clear(dest_of(c))?;
        copy_into(c, dest_of(c))
    };
    let size = image_size(stats.bytes, stats.entries(), 3);
    let mut disk = FreshFs::try_new(&ctx.o.dir, size);
    let where_initial = initial_place(disk.is_some());
    // Timed initial runs: each on a new filesystem where one can be made.
    let mut initial = |c: Copier| -> Result<f64> {
        let dest = fresh_dest(disk.as_mut(), dest_of(c), || clear(dest_of(c)))?;
        copy_into(c, &dest)
    };
    let (mut ours, mut ours_nc) = (Samples::default(), Samples::default());
    let (mut rsync, mut cp) = (Samples::default(), Samples::default());
    // Each copy plus the `sync` that makes it durable (ours already is;
    // rsync and cp leave their writes in the page cache).
    let (mut ours_d, mut rsync_d) = (Samples::default(), Samples::default());
    for r in 0..ctx.o.rounds {
        eprintln!("bench: push-local initial round {}/{}", r + 1, ctx.o.rounds);
        let mut order = [
            Copier::Ours,
            Copier::Rsync,
            Copier::CpA,
            Copier::OursNoCache,
        ];
        if r % 2 == 1 {
            order.reverse();
        }
        for c in order {
            let s = initial(c)?;
            let durable = s + timed_sync();
            match c {
                Copier::Ours => {
                    ours.push(s);
                    ours_d.push(durable);
                }
                Copier::Rsync => {
                    rsync.push(s);
                    rsync_d.push(durable);
                }
                Copier::OursNoCache => ours_nc.push(s),
                Copier::CpA => cp.push(s),
            }
        }
    }
    drop(disk);
    remove(&d_cp)?;
    // Whichever ran last, leave both destinations holding the tree.
    fresh(Copier::Ours)?;
    fresh(Copier::Rsync)?;
    sync();

    // Unchanged: nothing to do but prove it.
    let (mut un_ours, mut un_rsync, mut un_find) =
        (Samples::default(), Samples::default(), Samples::default());
    let push = |check: &dyn Fn(&serde_json::Value) -> Result<()>| -> Result<f64> {
        let r = run(ctx.cli(["push", "--json"]).arg(&src).arg(&d_ours))?;
        check(&r.json()?)?;
        Ok(r.secs)
    };
    let unchanged = |v: &serde_json::Value| -> Result<()> {
        ensure!(v["unchanged"] == true, "not unchanged: {v}");
        Ok(())
    };
    let rsync_run = || -> Result<f64> {
        Ok(run(Command::new("rsync")
            .arg("-a")
            .arg(&src_slash)
            .arg(&d_rsync))?
        .secs)
    };
    for r in 0..ctx.o.quick_rounds {
        eprintln!(
            "bench: push-local unchanged round {}/{}",
            r + 1,
            ctx.o.quick_rounds
        );
        let find = || run_shell(FIND_WALK, &[src.as_os_str()]).map(|r| r.secs);
        if r % 2 == 0 {
            un_ours.push(push(&unchanged)?);
            un_rsync.push(rsync_run()?);
            un_find.push(find()?);
        } else {
            un_find.push(find()?);
            un_rsync.push(rsync_run()?);
            un_ours.push(push(&unchanged)?);
        }
    }

    // Incremental: 5 new builds; each round starts from the old mirrors.
    let base = ctx.path("base");
    remove(&base)?;
    std::fs::create_dir_all(&base)?;
    for d in [&d_ours, &state_of(&d_ours), &d_rsync] {
        run(Command::new("mv").arg(d).arg(&base))?;
    }
    let restore = || -> Result<()> {
        for d in [&d_ours, &state_of(&d_ours), &d_rsync] {
            remove(d)?;
            cp_a(&base.join(d.file_name().unwrap()), d)?;
        }
        sync();
        Ok(())
    };
    for _ in 0..5 {
        tree.evolve(1)?;
    }
    let after = tree_stats(&src)?;
    ctx.warm_cache(&src)?;
    let (mut inc_ours, mut inc_rsync) = (Samples::default(), Samples::default());
    let mut written = 0;
    let changed = |v: &serde_json::Value| -> Result<()> {
        ensure!(
            v["unchanged"] == false && num(v, "files_written")? > 0,
            "{v}"
        );
        Ok(())
    };
    for r in 0..ctx.o.rounds {
        eprintln!(
            "bench: push-local incremental round {}/{}",
            r + 1,
            ctx.o.rounds
        );
        if r % 2 == 0 {
            restore()?;
            inc_ours.push(push(&changed)?);
            sync();
            inc_rsync.push(rsync_run()?);
        } else {
            restore()?;
            inc_rsync.push(rsync_run()?);
            sync();
            inc_ours.push(push(&changed)?);
        }
        written = run(ctx.cli(["scan", "--json", "--no-cache"]).arg(&d_ours))
            .and_then(|r| r.json())
            .and_then(|v| num(&v, "files"))?;
    }
    ensure!(
        written as usize == after.files,
        "incremental push left a different tree"
    );

    let mut context = machine_context(ctx.o, &stats);
    context.push(("initial runs".into(), where_initial.into()));
    context.push((
        "incremental".into(),
        format!(
            "evolve 5 → {} entries; source hash cache warm (as the builder's agent keeps it)",
            after.entries()
        ),
    ));
    let rows = vec![
        Row {
            case: "initial push (hash cache warm)".into(),
            ours: ours.clone(),
            peer_name: "rsync -a".into(),
            peer: rsync.clone(),
            target: Some(1.0),
            note: String::new(),
        },
        Row {
            case: "initial push (hash cache warm)".into(),
            ours,
            peer_name: "cp -a".into(),
            peer: cp.clone(),
            target: Some(1.3),
            note: String::new(),
        },
        Row {
            case: "initial push, then sync".into(),
            ours: ours_d,
            peer_name: "rsync -a, then sync".into(),
            peer: rsync_d,
            target: None,
            note: String::new(),
        },
        Row {
            case: "initial push --no-cache".into(),
            ours: ours_nc.clone(),
            peer_name: "rsync -a".into(),
            peer: rsync,
            target: None,
            note: String::new(),
        },
        Row {
            case: "initial push --no-cache".into(),
            ours: ours_nc,
            peer_name: "cp -a".into(),
            peer: cp,
            target: None,
            note: String::new(),
        },
        Row {
            case: "unchanged push".into(),
            ours: un_ours.clone(),
            peer_name: "find -printf walk".into(),
            peer: un_find,
            target: Some(1.5),
            note: String::new(),
        },
        Row {
            case: "unchanged push".into(),
            ours: un_ours,
            peer_name: "rsync -a (unchanged)".into(),
            peer: un_rsync,
            target: None,
            note: String::new(),
        },
        Row {
            case: "incremental push after evolve 5".into(),
            ours: inc_ours,
            peer_name: "rsync -a".into(),
            peer: inc_rsync,
            target: None,
            note: String::new(),
        },
    ];
    let cleanup = if ctx.o.keep {
        Vec::new()
    } else {
        let side = crate::gen::sidecar_path(&src);
        vec![state_of(&d_ours), d_ours, d_rsync, base, src, side]
    };
    Ok(Table {
        suite: "push-local".into(),
        context,
        rows,
        checks: Vec::new(),
        cleanup,
    })
}

/// Where the timed initial runs happened, for the report.
fn initial_place(fresh_fs: bool) -> &'static str {
    if fresh_fs {
        "each on a new ext4 (mkfs + loop mount of an image before every run)"
    } else {
        "in the work directory, after rm -rf of the last copy and sync"
    }
}

/// A child process killed when dropped (agents and daemons).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keygen(ctx: &Ctx, dir: &Path) -> Result<String> {
    remove(dir)?;
    let v = run(ctx.cli(["keygen", "--json", "--out"]).arg(dir))?.json()?;
    Ok(v["fingerprint"]
        .as_str()
        .context("keygen printed no fingerprint")?
        .to_string())
}

/// `sync-agent serve` for one tree on 127.0.0.1; returns it and its address.
fn start_agent(ctx: &Ctx, dest: &Path, ident: &Path, allow: &str) -> Result<(Daemon, String)> {
    use std::io::BufRead;
    // Appended run after run; `BENCH_AGENT_LOG` is the agent's RUST_LOG
    // (none by default: logging is work the peer does not do).
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.path("agent.log"))?;
    let mut child = Command::new(bins::sync_agent());
    match std::env::var_os("BENCH_AGENT_LOG") {
        Some(level) => child.env("RUST_LOG", level),
        None => child.env_remove("RUST_LOG"),
    };
    let mut child = child
        .args(["serve", "--listen", "127.0.0.1:0", "--allow", allow])
        .arg("--identity")
        .arg(ident)
        .arg("--tree")
        .arg(format!("rdo={}", dest.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .context("spawn sync-agent")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let d = Daemon(child);
    let addr = line
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("sync-agent did not start: {line:?}"))?
        .to_string();
    Ok((d, addr))
}

/// An rsync daemon on 127.0.0.1 serving `module` (writable) at `path`.
fn start_rsyncd(ctx: &Ctx, path: &Path) -> Result<(Daemon, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = ctx.path("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nmax connections = 4\npid file = {}\n[mirror]\n  path = {}\n  read only = no\n  uid = 0\n  gid = 0\n",
            ctx.path("rsyncd.pid").display(),
            path.display()
        ),
    )?;
    let _ = std::fs::remove_file(ctx.path("rsyncd.pid"));
    let child = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address", "127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .arg(format!("--log-file={}", ctx.path("rsyncd.log").display()))
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("spawn rsync --daemon")?;
    let d = Daemon(child);
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(
            Instant::now() < end,
            "rsync daemon did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((d, port))
}

/// `Total bytes sent: 1,234` and `... received: ...` of `rsync --stats`.
fn rsync_wire(stdout: &[u8]) -> Result<u64> {
    let text = String::from_utf8_lossy(stdout);
    let mut total = 0;
    let mut found = 0;
    for line in text.lines() {
        for key in ["Total bytes sent:", "Total bytes received:"] {
            if let Some(v) = line.strip_prefix(key) {
                total += v.trim().replace(',', "").parse::<u64>()?;
                found += 1;
            }
        }
    }
    ensure!(
        found == 2,
        "no byte totals in rsync --stats output:\n{text}"
    );
    Ok(total)
}

/// Size of every distinct file content (by BLAKE3) below `root`.
fn contents(root: &Path) -> Result<std::collections::HashMap<[u8; 32], u64>> {
    let mut m = std::collections::HashMap::new();
    for f in regular_files(root)? {
        let mut h = blake3::Hasher::new();
        h.update_mmap(&f)?;
        m.insert(*h.finalize().as_bytes(), std::fs::metadata(&f)?.len());
    }
    Ok(m)
}

/// Samples of wire bytes, reported beside the times.
fn bytes_note(ours: &[u64], peer: &[u64]) -> String {
    let med = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    format!(
        "wire: ours {}, rsync {}",
        human(med(ours)),
        human(med(peer))
    )
}

fn human(b: u64) -> String {
    if b >= 10 << 20 {
        format!("{:.1} MB", b as f64 / 1e6)
    } else if b >= 10 << 10 {
        format!("{:.1} KB", b as f64 / 1e3)
    } else {
        format!("{b} B")
    }
}

/// Push over QUIC to a `sync-agent serve` vs `rsync -a` to an rsync daemon,
/// both on 127.0.0.1 and both into a fresh process per run (started
/// outside the timing): initial sync, 5 new builds, unchanged tree.
fn quic_suite(ctx: &Ctx) -> Result<Table> {
    ensure!(bins::have("rsync"), "rsync is needed for the quic suite");
    let (mut tree, stats) = ctx.generate("quic-src")?;
    let src = ctx.path("quic-src");
    let src_slash = with_slash(&src);
    let d_ours = ctx.path("quic-dst-ours");
    let d_rsync = ctx.path("quic-dst-rsync");
    let (b_id, m_id) = (ctx.path("id-builder"), ctx.path("id-mirror"));
    let builder_fp = keygen(ctx, &b_id)?;
    let mirror_fp = keygen(ctx, &m_id)?;
    let allow = format!("{builder_fp}:push");
    ctx.warm_cache(&src)?;
    warm_source(&src)?;

    // One run of each side; the receiver is started before the clock.
    let ours = |dest: &Path| -> Result<(f64, u64, serde_json::Value)> {
        let (_agent, addr) = start_agent(ctx, dest, &m_id, &allow)?;
        let r = run(ctx
            .cli(["push", "--json"])
            .arg(&src)
            .arg(format!("quic://{addr}/rdo"))
            .arg("--identity")
            .arg(&b_id)
            .args(["--peer", &mirror_fp]))?;
        let v = r.json()?;
        let wire = num(&v, "wire_bytes")? + num(&v, "wire_rx_bytes")?;
        Ok((r.secs, wire, v))
    };
    let rsync = |dest: &Path| -> Result<(f64, u64)> {
        std::fs::create_dir_all(dest)?;
        let (_d, port) = start_rsyncd(ctx, dest)?;
        let r = run(Command::new("rsync")
            .args(["-a", "--stats"])
            .arg(&src_slash)
            .arg(format!("rsync://127.0.0.1:{port}/mirror/")))?;
        Ok((r.secs, rsync_wire(&r.stdout)?))
    };
    let fresh = || -> Result<()> {
        for d in [&d_ours, &state_of(&d_ours), &d_rsync] {
            remove(d)?;
        }
        sync();
        Ok(())
    };

    // Initial runs each on a new filesystem where one can be made (staging
    // and temporaries need about twice the tree), else in the work dir.
    let size = image_size(stats.bytes, stats.entries(), 4);
    let mut disk = FreshFs::try_new(&ctx.o.dir, size);
    let where_initial = initial_place(disk.is_some());
    let (mut init_o, mut init_r) = (Samples::default(), Samples::default());
    let (mut init_ob, mut init_rb) = (Vec::new(), Vec::new());
    // Each initial run plus the `sync` that makes it durable.
    let (mut init_od, mut init_rd) = (Samples::default(), Samples::default());
    // One untimed run of each side first: the first write-heavy run after
    // the image is made ran 2-4x slower than the next ones (20.4 s and
    // 38.0 s against 9.1-11.5 s at 302k entries), and that run was always
    // ours, first in the first round.
    eprintln!("bench: quic initial warm-up (untimed)");
    for is_ours in [true, false] {
        let default = if is_ours { &d_ours } else { &d_rsync };
        let dest = fresh_dest(disk.as_mut(), default, fresh)?;
        warm_source(&src)?;
        match is_ours {
            true => drop(ours(&dest)?),
            false => drop(rsync(&dest)?),
        }
    }
    for r in 0..ctx.o.rounds {
        eprintln!("bench: quic initial round {}/{}", r + 1, ctx.o.rounds);
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_ours in order {
            let default = if is_ours { &d_ours } else { &d_rsync };
            let dest = fresh_dest(disk.as_mut(), default, fresh)?;
            warm_source(&src)?;
            if is_ours {
                let (t, w, v) = ours(&dest)?;
                ensure!(num(&v, "files")? as usize == stats.files, "{v}");
                init_o.push(t);
                init_od.push(t + timed_sync());
                init_ob.push(w);
            } else {
                let (t, w) = rsync(&dest)?;
                init_r.push(t);
                init_rd.push(t + timed_sync());
                init_rb.push(w);
            }
        }
    }
    // Both mirrors hold the tree: on a new filesystem too where one can be
    // made, so that the 5-build runs can start from copies on a new one.
    let on_disk = |fs: &mut FreshFs, d: &Path| -> Result<PathBuf> {
        Ok(fs
            .mount_point()
            .join(d.file_name().context("a mirror name")?))
    };
    let (d_ours, d_rsync) = match disk.as_mut() {
        Some(fs) => {
            fs.remake()?;
            (on_disk(fs, &d_ours)?, on_disk(fs, &d_rsync)?)
        }
        None => {
            fresh()?;
            (d_ours, d_rsync)
        }
    };
    ours(&d_ours)?;
    rsync(&d_rsync)?;
    let check = run(Command::new("diff")
        .args(["-r", "--no-dereference", "-q"])
        .arg(&src)
        .arg(&d_ours));
    ensure!(check.is_ok(), "our mirror differs from the source");
    sync();

    // Unchanged tree.
    let (mut un_o, mut un_r, mut un_f) =
        (Samples::default(), Samples::default(), Samples::default());
    let (mut un_ob, mut un_rb) = (Vec::new(), Vec::new());
    for r in 0..ctx.o.quick_rounds {
        eprintln!(
            "bench: quic unchanged round {}/{}",
            r + 1,
            ctx.o.quick_rounds
        );
        let mut steps: [u8; 3] = [0, 1, 2];
        if r % 2 == 1 {
            steps.reverse();
        }
        for s in steps {
            match s {
                0 => {
                    let (t, w, v) = ours(&d_ours)?;
                    ensure!(v["unchanged"] == true, "not unchanged: {v}");
                    un_o.push(t);
                    un_ob.push(w);
                }
                1 => {
                    let (t, w) = rsync(&d_rsync)?;
                    un_r.push(t);
                    un_rb.push(w);
                }
                _ => un_f.push(run_shell(FIND_WALK, &[src.as_os_str()])?.secs),
            }
        }
    }

    // 5 new builds; every round starts from copies of the old mirrors, on
    // a new filesystem where one can be made (the work dir otherwise).
    let base = ctx.path("quic-base");
    remove(&base)?;
    std::fs::create_dir_all(&base)?;
    let mirrors = [d_ours.clone(), state_of(&d_ours), d_rsync.clone()];
    for d in &mirrors {
        cp_a(d, &base.join(d.file_name().context("a mirror name")?))?;
    }
    // Only the side about to run is restored: a new filesystem loses the
    // other's, which is restored before its own run.
    let mut restore = |dirs: &[&PathBuf]| -> Result<()> {
        match disk.as_mut() {
            Some(fs) => {
                fs.remake()?;
            }
            None => {
                for d in dirs {
                    remove(d)?;
                }
            }
        }
        for d in dirs {
            cp_a(&base.join(d.file_name().context("a mirror name")?), d)?;
        }
        sync();
        Ok(())
    };
    let same_as_src = |dest: &Path| -> Result<()> {
        let check = run(Command::new("diff")
            .args(["-r", "--no-dereference", "-q"])
            .arg(&src)
            .arg(dest));
        ensure!(check.is_ok(), "{} differs from the source", dest.display());
        Ok(())
    };
    let before = contents(&src)?;
    for _ in 0..5 {
        tree.evolve(1)?;
    }
    let after_stats = tree_stats(&src)?;
    let after = contents(&src)?;
    let new_unique: u64 = after
        .iter()
        .filter(|(h, _)| !before.contains_key(*h))
        .map(|(_, s)| s)
        .sum();
    ctx.warm_cache(&src)?;
    let (mut inc_o, mut inc_r) = (Samples::default(), Samples::default());
    let (mut inc_ob, mut inc_rb) = (Vec::new(), Vec::new());
    for r in 0..ctx.o.build_rounds {
        eprintln!(
            "bench: quic 5 new builds round {}/{}",
            r + 1,
            ctx.o.build_rounds
        );
        let mut steps = [0u8, 1];
        if r % 2 == 1 {
            steps.reverse();
        }
        for s in steps {
            if s == 0 {
                restore(&[&mirrors[0], &mirrors[1]])?;
                warm_source(&src)?;
                let (t, w, v) = ours(&d_ours)?;
                ensure!(v["unchanged"] == false, "{v}");
                inc_o.push(t);
                inc_ob.push(w);
                same_as_src(&d_ours)?;
            } else {
                restore(&[&mirrors[2]])?;
                warm_source(&src)?;
                let (t, w) = rsync(&d_rsync)?;
                inc_r.push(t);
                inc_rb.push(w);
            }
        }
    }
    let on_fresh = disk.is_some();
    drop(disk);

    let max_of = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64;
    let mut context = machine_context(ctx.o, &stats);
    context.push((
        "initial runs".into(),
        format!("{where_initial}; one untimed run of each side first"),
    ));
    context.push((
        "transport".into(),
        "sync-cli push quic://127.0.0.1 to sync-agent serve (mutual TLS) vs rsync -a to rsync --daemon on 127.0.0.1; a fresh receiver process per run, started before the clock; wire bytes: QUIC UDP payload both ways vs rsync's --stats totals".into(),
    ));
    context.push((
        "5 new builds".into(),
        format!(
            "evolve 5 → {} entries; {} of new unique file content; source hash cache warm; {}",
            after_stats.entries(),
            human(new_unique),
            match on_fresh {
                true => "each run from a copy of the synced mirror on a new ext4",
                false => "each run from a copy of the synced mirror in the work dir",
            }
        ),
    ));
    let rows = vec![
        Row {
            case: "initial sync".into(),
            note: bytes_note(&init_ob, &init_rb),
            ours: init_o,
            peer_name: "rsync -a to rsync daemon".into(),
            peer: init_r,
            target: Some(1.0),
        },
        Row {
            case: "initial sync, then sync".into(),
            note: String::new(),
            ours: init_od,
            peer_name: "rsync daemon, then sync".into(),
            peer: init_rd,
            target: None,
        },
        Row {
            case: "5 new builds".into(),
            note: bytes_note(&inc_ob, &inc_rb),
            ours: inc_o,
            peer_name: "rsync -a to rsync daemon".into(),
            peer: inc_r,
            target: Some(0.3),
        },
        Row {
            case: "unchanged tree".into(),
            note: bytes_note(&un_ob, &un_rb),
            ours: un_o.clone(),
            peer_name: "rsync -a to rsync daemon".into(),
            peer: un_r,
            target: Some(0.25),
        },
        Row {
            case: "unchanged tree".into(),
            note: "the stat walk every one-shot push must do".into(),
            ours: un_o,
            peer_name: "find -printf walk".into(),
            peer: un_f,
            target: None,
        },
    ];
    let checks = vec![
        Check::at_most(
            "wire bytes, 5 new builds (max of rounds)",
            max_of(&inc_ob),
            "B",
            1.2 * new_unique as f64 + 65536.0,
            format!(
                "limit 1.2 x {} new unique + 64 KiB; rsync sent {}",
                human(new_unique),
                human(inc_rb.iter().copied().max().unwrap_or(0))
            ),
        ),
        Check::at_most(
            "wire bytes, unchanged tree (max of rounds)",
            max_of(&un_ob),
            "B",
            16384.0,
            format!("rsync: {}", human(un_rb.iter().copied().max().unwrap_or(0))),
        ),
    ];
    let cleanup = if ctx.o.keep {
        Vec::new()
    } else {
        let side = crate::gen::sidecar_path(&src);
        let mut c = mirrors.to_vec();
        c.extend([base, src, side, b_id, m_id]);
        c
    };
    Ok(Table {
        suite: "quic".into(),
        context,
        rows,
        checks,
        cleanup,
    })
}
