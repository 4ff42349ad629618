//! The agent's QUIC server: accepts connections from allowed fingerprints
//! (TLS refuses everyone else in the handshake), reads the `Hello`,
//! authorizes the tree and direction, and drives one session per
//! connection: a push into the tree's [`Receiver`], or a pull of its
//! committed snapshot. Graceful shutdown: stop accepting, abort running
//! sessions (they tell their peers), close the endpoint, wait idle. The
//! served trees can be replaced while it runs ([`ServerHandle::reconfigure`]):
//! a removed or changed tree has its sessions stopped as at shutdown, the
//! others are not touched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use sync_core::commit::{CommitError, CommitOptions, Receiver, ReceiverCache};
use sync_core::safefs::Root;
use sync_core::session::{accept, reject, SinkOptions, SinkSession, SourceOptions, SourceSession};
use sync_core::state::{default_state_dir, StateError};
use sync_core::wire::{encode, Direction, ErrorCode, Frame, FrameDecoder};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::{AgentConfig, TreeConfig};
use crate::driver::{
    drive_sink, drive_source, load_fetched_trees, read_frame, DriveOptions, LazyLocator, Link,
    SinkIo, SourceIo,
};
use crate::identity::{Fingerprint, Identity};
use crate::tls;

/// Time a client has to open its control stream and send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to close the connection after its session ended.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time running sessions get to wind down at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("identity {path}: {source}")]
    Identity {
        path: PathBuf,
        source: crate::identity::IdentityError,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tree {name} at {path}: {source}")]
    Tree {
        name: String,
        path: PathBuf,
        source: Box<CommitError>,
    },
    #[error("tree {name}: {message}")]
    Worker { name: String, message: String },
}

struct ServedTree {
    cfg: TreeConfig,
    /// Canonical tree path and its state directory.
    dest: PathBuf,
    state: PathBuf,
    /// Turns true when the tree is removed or the server shuts down: its
    /// sessions abort.
    stop: watch::Sender<bool>,
    /// Sessions running on the tree.
    sessions: watch::Sender<usize>,
    /// The committed manifest and chunk index, kept between sessions.
    cache: Arc<ReceiverCache>,
}

type Trees = Arc<RwLock<HashMap<String, Arc<ServedTree>>>>;
/// The identity new handshakes present (a reload may replace it).
type SharedIdentity = Arc<RwLock<Arc<Identity>>>;

/// Counts a session on its tree while alive.
struct SessionGuard(Arc<ServedTree>);

impl SessionGuard {
    fn new(tree: Arc<ServedTree>) -> SessionGuard {
        tree.sessions.send_modify(|n| *n += 1);
        SessionGuard(tree)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.send_modify(|n| *n -= 1);
    }
}

/// Check a tree (finishing any interrupted commit). Blocking.
fn open_tree(t: &TreeConfig) -> Result<ServedTree, ServerError> {
    let err = |source| ServerError::Tree {
        name: t.name.clone(),
        path: t.path.clone(),
        source: Box::new(source),
    };
    // Opening rolls forward a commit a crash interrupted; the manifest and
    // chunk index it loads stay in the cache for the first session.
    let cache = Arc::<ReceiverCache>::default();
    let recv = Receiver::open_cached(&t.path, t.state.as_deref(), &cache).map_err(err)?;
    recv.index_tree();
    if let Some(r) = recv.recovered() {
        tracing::warn!(tree = %t.name, files = r.files_written, "finished an interrupted commit");
    }
    Ok(ServedTree {
        cfg: t.clone(),
        dest: recv.dest().to_path_buf(),
        state: recv.state_dir().to_path_buf(),
        stop: watch::channel(false).0,
        sessions: watch::channel(0).0,
        cache,
    })
}

/// A bound, ready server.
pub struct Server {
    endpoint: Endpoint,
    trees: Trees,
    identity: SharedIdentity,
    tls: SharedTls,
}

/// The server config new connections are accepted with (replaced on reload).
type SharedTls = Arc<RwLock<quinn::ServerConfig>>;

/// Changes the trees of a running [`Server`].
#[derive(Clone)]
pub struct ServerHandle {
    endpoint: Endpoint,
    trees: Trees,
    identity: SharedIdentity,
    tls: SharedTls,
}

/// A served tree as status shows it.
#[derive(Clone, Debug)]
pub struct ServedInfo {
    pub name: String,
    pub path: PathBuf,
    pub state: PathBuf,
}

impl Server {
    /// Load the identity, check every tree (finishing any interrupted
    /// commit), and bind. Needs a tokio runtime.
    pub fn bind(cfg: &AgentConfig) -> Result<Server, ServerError> {
        let id = Identity::load(&cfg.identity).map_err(|source| ServerError::Identity {
            path: cfg.identity.clone(),
            source,
        })?;
        Server::bind_with(Arc::new(id), cfg)
    }

    /// [`Server::bind`] with an identity already loaded.
    pub fn bind_with(identity: Arc<Identity>, cfg: &AgentConfig) -> Result<Server, ServerError> {
        let mut trees = HashMap::new();
        for t in &cfg.trees {
            trees.insert(t.name.clone(), Arc::new(open_tree(t)?));
        }
        let server_cfg = tls::server_config(&identity, cfg.allowed())?;
        let tls = Arc::new(RwLock::new(server_cfg.clone()));
        let endpoint = crate::tls::endpoint(cfg.listen, Some(server_cfg)).map_err(|source| {
            ServerError::Bind {
                addr: cfg.listen,
                source,
            }
        })?;
        Ok(Server {
            endpoint,
            trees: Arc::new(RwLock::new(trees)),
            identity: Arc::new(RwLock::new(identity)),
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.read().expect("identity lock").fingerprint()
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            endpoint: self.endpoint.clone(),
            trees: self.trees.clone(),
            identity: self.identity.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Serve until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let trees = self.trees.clone();
                    let mut tls = self.tls.read().expect("tls lock").clone();
                    conns.spawn(async move {
                        let remote = incoming.remote_address();
                        tls.transport_config(tls::transport(tls::route_payload(remote)));
                        let accepted = match incoming.accept_with(Arc::new(tls)) {
                            Ok(connecting) => connecting.await,
                            Err(e) => Err(e),
                        };
                        let conn = match accepted {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::info!(peer = %remote, "handshake refused: {e}");
                                return;
                            }
                        };
                        let fp = tls::peer_fingerprint(&conn);
                        let short = fp.map(|f| f.to_string()[..12].to_string()).unwrap_or_default();
                        let span = tracing::info_span!("conn", peer = %remote, fp = %short);
                        serve_conn(conn, fp, trees).instrument(span).await;
                    });
                }
                Some(_) = conns.join_next() => {}
                _ = shutdown.wait_for(|v| *v) => break,
            }
        }
        tracing::info!("shutting down: no new connections");
        for t in self.trees.read().expect("trees lock").values() {
            let _ = t.stop.send(true);
        }
        let grace = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, grace).await.is_err() {
            conns.abort_all();
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
    }
}

/// Send `frame` as the only answer, then let the client close.
async fn refuse(conn: &Connection, mut send: SendStream, frame: Frame) {
    if let Frame::Error { code, message } = &frame {
        tracing::info!(%code, %message, "refused");
    }
    let _ = send.write_all(&encode(&frame)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, send.stopped()).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.closed()).await;
    conn.close(1u32.into(), b"refused");
}

async fn serve_conn(conn: Connection, fp: Option<Fingerprint>, trees: Trees) {
    let (send, mut recv): (SendStream, RecvStream) =
        match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!("connection ended before a session: {e}");
                return;
            }
            Err(_) => {
                conn.close(1u32.into(), b"no control stream");
                return;
            }
        };
    let mut dec = FrameDecoder::new();
    let first = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv, &mut dec)).await {
        Ok(Ok(f)) => f,
        Ok(Err((code, m))) => {
            return refuse(&conn, send, reject(code, format!("bad first frame: {m}"))).await;
        }
        Err(_) => {
            return refuse(
                &conn,
                send,
                reject(ErrorCode::Protocol, "no Hello within the timeout"),
            )
            .await
        }
    };
    let hello = match accept(first) {
        Ok(h) => h,
        Err(e) => return refuse(&conn, send, e.to_frame()).await,
    };
    let tree = trees.read().expect("trees lock").get(&hello.tree).cloned();
    let Some(tree) = tree else {
        let f = reject(
            ErrorCode::UnknownTree,
            format!("this agent serves no tree named {:?}", hello.tree),
        );
        return refuse(&conn, send, f).await;
    };
    let access = fp
        .and_then(|fp| tree.cfg.allow.get(&fp).copied())
        .unwrap_or_default();
    let allowed = match hello.direction {
        Direction::Push => access.push,
        Direction::Pull => access.pull,
    };
    if !allowed {
        let what = match hello.direction {
            Direction::Push => "push to",
            Direction::Pull => "pull",
        };
        let f = reject(
            ErrorCode::Unauthorized,
            format!("unauthorized: this peer may not {what} tree {}", hello.tree),
        );
        return refuse(&conn, send, f).await;
    }
    let span = tracing::info_span!(
        "session",
        tree = %hello.tree,
        dir = ?hello.direction,
        agent = %hello.client_agent,
        root = tracing::field::Empty
    );
    let link = Link {
        conn: conn.clone(),
        control_send: send,
        control_recv: recv,
        decoder: dec,
    };
    let opts = DriveOptions {
        shutdown: Some(tree.stop.subscribe()),
        ..DriveOptions::default()
    };
    let started = Instant::now();
    let guard = SessionGuard::new(tree.clone());
    let outcome = match hello.direction {
        Direction::Push => serve_push(&tree, link, opts).instrument(span.clone()).await,
        Direction::Pull => serve_pull(&tree, link, opts).instrument(span.clone()).await,
    };
    drop(guard);
    let _g = span.enter();
    match outcome {
        Ok(()) => tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "session done"
        ),
        Err(m) => tracing::warn!("session failed: {m}"),
    }
    drop(_g);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.closed()).await;
    conn.close(0u32.into(), b"done");
}

async fn serve_push(tree: &ServedTree, link: Link, opts: DriveOptions) -> Result<(), String> {
    let (dest, state) = (tree.dest.clone(), tree.cfg.state.clone());
    let cache = tree.cache.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let r = Receiver::open_cached(&dest, state.as_deref(), &cache)?;
        let seeds = load_fetched_trees(r.state_dir());
        Ok::<_, CommitError>((r, seeds))
    })
    .await
    .map_err(|e| e.to_string())?;
    let (recv, seeds) = match opened {
        Ok(v) => v,
        Err(CommitError::State(StateError::Locked(p))) => {
            let f = reject(
                ErrorCode::Busy,
                format!(
                    "busy: another sync of tree {} is running ({} is locked)",
                    tree.cfg.name,
                    p.display()
                ),
            );
            refuse_link(link, f).await;
            return Err("busy".into());
        }
        Err(e) => {
            let f = reject(ErrorCode::Internal, format!("cannot open the tree: {e}"));
            refuse_link(link, f).await;
            return Err(e.to_string());
        }
    };
    let mut session = SinkSession::server(
        Some(recv.committed().clone()),
        SinkOptions::default(),
        Instant::now(),
    );
    if !seeds.is_empty() {
        tracing::info!(trees = seeds.len(), "resuming a tree fetch");
        session.seed_trees(seeds.clone());
    }
    let io = SinkIo {
        recv: Arc::new(Mutex::new(recv)),
        commit: CommitOptions::default(),
        seeded: seeds,
    };
    let out = drive_sink(session, io, link, opts).await;
    out.result.map(|_| ()).map_err(|e| e.to_string())
}

async fn refuse_link(link: Link, frame: Frame) {
    let Link {
        conn, control_send, ..
    } = link;
    let mut send = control_send;
    let _ = send.write_all(&encode(&frame)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, send.stopped()).await;
    drop(conn);
}

/// The committed manifest, read without taking the tree's lock (the file
/// is replaced atomically, so a running push cannot tear it).
async fn serve_pull(tree: &ServedTree, link: Link, opts: DriveOptions) -> Result<(), String> {
    let (dest, state) = (tree.dest.clone(), tree.state.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        let m = sync_core::state::peek_manifest(&state).map_err(|e| e.to_string())?;
        let root = Root::open(&dest).map_err(|e| e.to_string())?;
        Ok::<_, String>((m, root))
    })
    .await
    .map_err(|e| e.to_string())?;
    let (manifest, root) = match loaded {
        Ok(v) => v,
        Err(m) => {
            refuse_link(link, reject(ErrorCode::Internal, m.clone())).await;
            return Err(m);
        }
    };
    let session = SourceSession::server(manifest.clone(), SourceOptions::default(), Instant::now());
    let io = SourceIo {
        root: Arc::new(root),
        locator: Arc::new(LazyLocator::new(manifest)),
    };
    let out = drive_source(session, io, link, opts).await;
    out.result.map(|_| ()).map_err(|e| e.to_string())
}

impl ServerHandle {
    /// The trees served now, by name.
    pub fn trees(&self) -> Vec<ServedInfo> {
        let mut v: Vec<ServedInfo> = self
            .trees
            .read()
            .expect("trees lock")
            .values()
            .map(|t| ServedInfo {
                name: t.cfg.name.clone(),
                path: t.cfg.path.clone(),
                state: t.state.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Serve `trees` from now on (same listen address; `identity` may be
    /// new). Trees absent from `trees`, or configured differently, stop
    /// first: new connections no longer reach them and their sessions
    /// abort as at shutdown (a commit under way finishes), waited for up
    /// to the shutdown grace. Then new and changed trees are opened; one
    /// that cannot be is reported and left out, the others are served.
    /// With the same identity, unchanged trees and their sessions are not
    /// touched; a new identity restarts every tree.
    pub async fn reconfigure(
        &self,
        identity: Arc<Identity>,
        trees: &[TreeConfig],
    ) -> Vec<(String, Result<(), ServerError>)> {
        let old_fp = self.identity.read().expect("identity lock").fingerprint();
        let same_id = identity.fingerprint() == old_fp;
        let mut stopped = Vec::new();
        {
            let mut map = self.trees.write().expect("trees lock");
            let keep: Vec<String> = map
                .iter()
                .filter(|(name, t)| {
                    same_id && trees.iter().any(|n| &n.name == *name && *n == t.cfg)
                })
                .map(|(name, _)| name.clone())
                .collect();
            let gone: Vec<String> = map.keys().filter(|n| !keep.contains(n)).cloned().collect();
            for name in gone {
                if let Some(t) = map.remove(&name) {
                    let _ = t.stop.send(true);
                    stopped.push(t);
                }
            }
        }
        for t in stopped {
            let mut n = t.sessions.subscribe();
            let idle = n.wait_for(|n| *n == 0);
            if tokio::time::timeout(SHUTDOWN_GRACE, idle).await.is_err() {
                tracing::warn!(tree = %t.cfg.name, "sessions still running after the grace period");
            }
        }
        let mut results = Vec::new();
        let current: Vec<String> = self
            .trees
            .read()
            .expect("trees lock")
            .keys()
            .cloned()
            .collect();
        for t in trees.iter().filter(|t| !current.contains(&t.name)) {
            let cfg = t.clone();
            let opened = tokio::task::spawn_blocking(move || open_tree(&cfg)).await;
            let r = match opened {
                Ok(Ok(served)) => {
                    self.trees
                        .write()
                        .expect("trees lock")
                        .insert(t.name.clone(), Arc::new(served));
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(ServerError::Worker {
                    name: t.name.clone(),
                    message: e.to_string(),
                }),
            };
            results.push((t.name.clone(), r));
        }
        let allowed: std::collections::BTreeSet<Fingerprint> =
            trees.iter().flat_map(|t| t.allow.keys().copied()).collect();
        match tls::server_config(&identity, allowed) {
            Ok(c) => {
                *self.tls.write().expect("tls lock") = c.clone();
                self.endpoint.set_server_config(Some(c));
                *self.identity.write().expect("identity lock") = identity;
            }
            Err(e) => results.push(("*".into(), Err(e.into()))),
        }
        results
    }
}

/// The default state directory a tree would use (for messages and tests).
pub fn state_dir_of(tree: &TreeConfig) -> Option<PathBuf> {
    tree.state.clone().or_else(|| {
        tree.path
            .canonicalize()
            .ok()
            .and_then(|p| default_state_dir(&p).ok())
    })
}
