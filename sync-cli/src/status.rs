//! `sync-cli status` and `sync-cli push --wait NAME`: talk to a running
//! agent through its control socket.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sync_agent::control::{self, Request, Response};

use crate::exit::{Outcome, FAILURE};

fn socket(control: Option<&Path>) -> PathBuf {
    control
        .map(Path::to_path_buf)
        .unwrap_or_else(control::default_path)
}

fn ask(path: &Path, req: Request) -> anyhow::Result<Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    Ok(rt.block_on(control::request(path, &req))?)
}

pub fn status(control: Option<&Path>, json: bool) -> Outcome {
    let path = socket(control);
    let Response::Status { trees } = ask(&path, Request::Status)? else {
        bail!("unexpected reply from the agent at {}", path.display());
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &serde_json::json!({ "trees": trees }))?;
        writeln!(out)?;
        return Ok(0);
    }
    for t in &trees {
        let s = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
        let root = s("root");
        writeln!(out, "tree {} ({}) {}", s("name"), s("role"), s("path"))?;
        writeln!(out, "  root      {}", root)?;
        if let Some(e) = t.get("last_scan_error").and_then(|v| v.as_str()) {
            writeln!(out, "  scan      error: {e}")?;
        }
        for p in t
            .get("peers")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let g = |k: &str| p.get(k).cloned().unwrap_or_default();
            let committed = g("committed_root").as_str().unwrap_or("-").to_string();
            let state = if committed == root {
                "current"
            } else {
                "behind"
            };
            writeln!(
                out,
                "  peer {}  {state}  lag {:.1} s  sent {} bytes / {} chunks  syncs {} failures {}",
                g("url").as_str().unwrap_or("?"),
                g("lag_seconds").as_f64().unwrap_or(0.0),
                g("bytes_sent"),
                g("chunks_sent"),
                g("syncs"),
                g("failures"),
            )?;
            if let Some(e) = p.get("last_error").and_then(|v| v.as_str()) {
                writeln!(out, "       last error: {e}")?;
            }
        }
    }
    Ok(0)
}

/// Publish now and wait until every peer committed: exit 0 only if all did.
pub fn push_wait(control: Option<&Path>, tree: &str, json: bool, timeout: u64) -> Outcome {
    let path = socket(control);
    let resp = ask(
        &path,
        Request::Publish {
            tree: tree.to_string(),
            wait: true,
            timeout_secs: Some(timeout),
        },
    )?;
    let mut out = std::io::stdout().lock();
    match resp {
        Response::Published {
            tree,
            root,
            peers,
            ok,
        } => {
            if json {
                serde_json::to_writer(
                    &mut out,
                    &serde_json::json!({"tree": tree, "root": root, "ok": ok, "peers": peers}),
                )?;
                writeln!(out)?;
            } else {
                writeln!(out, "published {tree} {root}")?;
                for p in &peers {
                    match &p.error {
                        None if p.committed => writeln!(out, "  {}  committed", p.url)?,
                        Some(e) => writeln!(out, "  {}  FAILED: {e}", p.url)?,
                        None => writeln!(out, "  {}  pending", p.url)?,
                    }
                }
            }
            Ok(if ok { 0 } else { FAILURE })
        }
        Response::Error { message } => bail!("the agent refused: {message}"),
        Response::Status { .. } => bail!("unexpected reply from the agent at {}", path.display()),
    }
}
