//! Timing one child process: wall time, exit status, output, and its own
//! peak RSS (from `wait4`'s rusage, so only that child is counted).

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// One finished child.
#[derive(Debug)]
pub struct Run {
    pub secs: f64,
    /// Peak resident set of the child, in bytes.
    pub max_rss: u64,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Run {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.stdout).with_context(|| {
            format!(
                "expected JSON on stdout, got {:?}",
                String::from_utf8_lossy(&self.stdout)
            )
        })
    }
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured) and
/// fails unless it exits 0.
pub fn run(mut cmd: impl std::borrow::BorrowMut<Command>) -> Result<Run> {
    let cmd = cmd.borrow_mut();
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let pid = child.id() as libc::pid_t;
    let mut err_pipe = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_end(&mut stdout)?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unreaped child; the pointers are valid.
    // Reaping it here means `child` must not be waited on again.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let secs = start.elapsed().as_secs_f64();
    if r != pid {
        return Err(std::io::Error::last_os_error()).context("wait4");
    }
    std::mem::forget(child);
    let stderr = err_thread.join().unwrap_or_default();
    let run = Run {
        secs,
        max_rss: ru.ru_maxrss as u64 * 1024,
        status: ExitStatus::from_raw(status),
        stdout,
        stderr,
    };
    if !run.status.success() {
        bail!(
            "{what} failed ({}): {}",
            run.status,
            String::from_utf8_lossy(&run.stderr).trim()
        );
    }
    Ok(run)
}

/// `sh -c SCRIPT` with positional arguments `$1...`.
pub fn run_shell(script: &str, args: &[&std::ffi::OsStr]) -> Result<Run> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).arg("sh").args(args);
    run(&mut cmd)
}

/// Flush dirty pages so one write-heavy run does not pay for the last.
pub fn sync() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Seconds a `sync` takes now: what the last run left to make durable.
pub fn timed_sync() -> f64 {
    let t = Instant::now();
    sync();
    t.elapsed().as_secs_f64()
}

/// Seconds of several runs of one case.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, secs: f64) {
        self.0.push(secs);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Samples(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!(s.median(), 2.5);
        assert_eq!(s.min(), 1.0);
        assert_eq!(s.max(), 10.0);
        assert_eq!(Samples(vec![5.0, 1.0, 3.0]).median(), 3.0);
        assert!(Samples::default().median().is_nan());
    }

    #[test]
    fn run_reports_status_output_and_rss() {
        let r = run(Command::new("sh").args(["-c", "echo hi; echo err >&2"])).unwrap();
        assert_eq!(r.stdout, b"hi\n");
        assert_eq!(r.stderr, b"err\n");
        assert!(r.max_rss > 0);
        assert!(r.secs > 0.0);
        let e = run(Command::new("sh").args(["-c", "echo boom >&2; exit 4"])).unwrap_err();
        assert!(format!("{e:#}").contains("boom"), "{e:#}");
    }
}
