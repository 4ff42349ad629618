//! The control socket: a Unix socket speaking one JSON request and one JSON
//! response per connection, used by `sync-cli status` and `sync-cli push
//! --wait`. Also renders the same figures as Prometheus text for the
//! opt-in metrics endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::source::{PublishRequest, SharedStatus, TreeStatus};

/// Where the agent listens and `sync-cli` connects unless told otherwise:
/// `/run/sync-agent.sock` for root, else `$XDG_RUNTIME_DIR/sync-agent.sock`,
/// else `/tmp/sync-agent-<uid>.sock`.
pub fn default_path() -> PathBuf {
    let uid = rustix_uid();
    if uid == 0 {
        return PathBuf::from("/run/sync-agent.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("sync-agent.sock"),
        None => PathBuf::from(format!("/tmp/sync-agent-{uid}.sock")),
    }
}

fn rustix_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// Largest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Rescan the tree now and publish; with `wait`, answer once every
    /// peer has committed the published root (or one failed).
    Publish {
        tree: String,
        wait: bool,
        timeout_secs: Option<u64>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Status {
        trees: Vec<serde_json::Value>,
    },
    Published {
        tree: String,
        root: String,
        peers: Vec<PeerOutcome>,
        ok: bool,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PeerOutcome {
    pub url: String,
    pub committed: bool,
    pub error: Option<String>,
}

/// A source tree reachable through the socket.
pub struct ControlledTree {
    pub status: SharedStatus,
    pub publish: mpsc::Sender<PublishRequest>,
}

/// Everything the control socket can see.
#[derive(Default)]
pub struct Control {
    pub sources: Vec<ControlledTree>,
    /// Sink trees: name -> a status snapshot producer.
    pub sinks: Vec<Arc<dyn Fn() -> serde_json::Value + Send + Sync>>,
}

impl Control {
    pub fn status(&self) -> Vec<serde_json::Value> {
        let mut out: Vec<serde_json::Value> = self
            .sources
            .iter()
            .map(|t| {
                let s = with_lag(&t.status.lock().unwrap());
                serde_json::to_value(s).unwrap_or_default()
            })
            .collect();
        out.extend(self.sinks.iter().map(|f| f()));
        out
    }

    async fn publish(&self, tree: &str, wait: bool, timeout: Duration) -> Response {
        let Some(t) = self
            .sources
            .iter()
            .find(|t| t.status.lock().unwrap().name == tree)
        else {
            return Response::Error {
                message: format!("no source tree named {tree:?} in this agent"),
            };
        };
        let failures_before: Vec<u64> = t
            .status
            .lock()
            .unwrap()
            .peers
            .iter()
            .map(|p| p.failures)
            .collect();
        let (tx, rx) = oneshot::channel();
        if t.publish.send(tx).await.is_err() {
            return Response::Error {
                message: "the tree's source loop has stopped".into(),
            };
        }
        let root = match rx.await {
            Ok(Ok(root)) => root.to_hex(),
            Ok(Err(e)) => return Response::Error { message: e },
            Err(_) => {
                return Response::Error {
                    message: "the agent is shutting down".into(),
                }
            }
        };
        let deadline = Instant::now() + timeout;
        loop {
            let peers: Vec<PeerOutcome> = t
                .status
                .lock()
                .unwrap()
                .peers
                .iter()
                .zip(&failures_before)
                .map(|(p, &before)| PeerOutcome {
                    url: p.url.clone(),
                    committed: p.committed_root.as_deref() == Some(root.as_str()),
                    error: (p.failures > before)
                        .then(|| p.last_error.clone())
                        .flatten(),
                })
                .collect();
            let settled = peers.iter().all(|p| p.committed || p.error.is_some());
            if !wait || settled || Instant::now() >= deadline {
                let ok = peers.iter().all(|p| p.committed);
                let mut peers = peers;
                if wait && !settled {
                    for p in peers
                        .iter_mut()
                        .filter(|p| !p.committed && p.error.is_none())
                    {
                        p.error = Some("timed out waiting for the peer to commit".into());
                    }
                }
                return Response::Published {
                    tree: tree.to_string(),
                    root,
                    ok: ok || !wait,
                    peers,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Status with lag computed now.
fn with_lag(s: &TreeStatus) -> TreeStatus {
    let mut s = s.clone();
    let now = SystemTime::now();
    let current = s.root.clone();
    for p in &mut s.peers {
        p.lag_seconds = if p.committed_root.is_some() && p.committed_root == current {
            0.0
        } else {
            // Behind since the newest snapshot it lacks was taken.
            s.snapshot_unix
                .map(|t| {
                    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(t);
                    now.duration_since(t)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0)
                })
                .unwrap_or(0.0)
        };
    }
    s
}

/// Bind the control socket at `path` (in place of one left by an agent
/// that died): it takes connections from the moment this returns, so an
/// agent binds it before it says it is running. Within a tokio runtime.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serve the control socket bound at `path` until shutdown.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: &Path,
    control: Arc<Control>,
    shutdown: watch::Receiver<bool>,
) {
    serve_live(listener, path, watch::channel(control).1, shutdown).await
}

/// [`serve`] for an agent whose trees change while it runs: each request
/// sees the latest `Control` sent on the channel. Removes the socket file
/// when it ends.
pub async fn serve_live(
    listener: tokio::net::UnixListener,
    path: &Path,
    control: watch::Receiver<Arc<Control>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                let control = control.borrow().clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &control).await {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(path);
}

async fn handle(stream: tokio::net::UnixStream, control: &Control) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST as u64));
    r.read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => Response::Status {
            trees: control.status(),
        },
        Ok(Request::Publish {
            tree,
            wait,
            timeout_secs,
        }) => {
            control
                .publish(
                    &tree,
                    wait,
                    Duration::from_secs(timeout_secs.unwrap_or(600)),
                )
                .await
        }
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// Send one request to an agent's control socket.
pub async fn request(path: &Path, req: &Request) -> std::io::Result<Response> {
    let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach the agent's control socket {}: {e}",
                path.display()
            ),
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// The figures of `status` in Prometheus text format.
pub fn prometheus(control: &Control) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP sync_peer_committed 1 when the peer holds the tree's current snapshot"
    );
    let _ = writeln!(o, "# TYPE sync_peer_committed gauge");
    let mut rows = Vec::new();
    for t in &control.sources {
        rows.push(with_lag(&t.status.lock().unwrap()));
    }
    for t in &rows {
        for p in &t.peers {
            let cur = (p.committed_root.is_some() && p.committed_root == t.root) as u8;
            let _ = writeln!(
                o,
                "sync_peer_committed{{tree=\"{}\",peer=\"{}\"}} {cur}",
                t.name, p.url
            );
        }
    }
    type Metric = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::source::PeerStatus) -> f64,
    );
    let metrics: [Metric; 5] = [
        (
            "sync_peer_lag_seconds",
            "gauge",
            "seconds the peer is behind the current snapshot",
            |p| p.lag_seconds,
        ),
        (
            "sync_peer_bytes_sent_total",
            "counter",
            "chunk bytes sent to the peer",
            |p| p.bytes_sent as f64,
        ),
        (
            "sync_peer_chunks_sent_total",
            "counter",
            "chunks sent to the peer",
            |p| p.chunks_sent as f64,
        ),
        (
            "sync_peer_syncs_total",
            "counter",
            "snapshots the peer committed",
            |p| p.syncs as f64,
        ),
        (
            "sync_peer_failures_total",
            "counter",
            "failed syncs to the peer",
            |p| p.failures as f64,
        ),
    ];
    for (name, kind, help, f) in metrics {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for t in &rows {
            for p in &t.peers {
                let _ = writeln!(
                    o,
                    "{name}{{tree=\"{}\",peer=\"{}\"}} {}",
                    t.name,
                    p.url,
                    f(p)
                );
            }
        }
    }
    let _ = writeln!(o, "# HELP sync_tree_scans_total scans of the source tree");
    let _ = writeln!(o, "# TYPE sync_tree_scans_total counter");
    for t in &rows {
        let _ = writeln!(
            o,
            "sync_tree_scans_total{{tree=\"{}\"}} {}",
            t.name, t.scans
        );
    }
    o
}

/// Bind the metrics endpoint at `addr`, before the agent says it runs
/// (as [`bind`] the control socket). Within a tokio runtime.
pub fn bind_metrics(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// Serve `GET /metrics` on `listener` until shutdown (opt-in).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    control: Arc<Control>,
    shutdown: watch::Receiver<bool>,
) {
    serve_metrics_live(listener, watch::channel(control).1, shutdown).await
}

/// [`serve_metrics`] of the latest `Control` sent on the channel.
pub async fn serve_metrics_live(
    listener: tokio::net::TcpListener,
    control: watch::Receiver<Arc<Control>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((mut s, _)) = r else { continue };
                let body = prometheus(&control.borrow().clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}
