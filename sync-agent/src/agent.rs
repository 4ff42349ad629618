//! The agent of `sync-agent --config FILE`: every tree of one configuration
//! file in one process, sink trees through one QUIC [`Server`], each source
//! tree through its own [`source::run`] loop, all behind one control socket
//! (and one optional metrics endpoint). SIGHUP re-reads the file: an
//! invalid file is reported in full and changes nothing; a valid one is
//! applied against what runs (trees added start, removed ones stop as at
//! shutdown, changed ones restart, unchanged ones are not touched).
//! SIGINT/SIGTERM shut everything down gracefully. Does IO: sockets,
//! signals, the configuration and identity files.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::{AgentConfig, Config, ConfigError, Severity, SourceTreeConfig, TreeConfig};
use crate::control::{self, Control, ControlledTree};
use crate::identity::Identity;
use crate::server::{Server, ServerHandle};
use crate::source::{self, Downstream, PublishRequest, SharedStatus, SourceConfig};

/// How long a stopping tree or server may take before it is aborted (its
/// own grace periods are shorter; this only bounds a stuck task).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of one run that are not in the file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Print the readiness lines as JSON.
    pub json: bool,
}

/// Run `config` (read from `path`) until SIGINT or SIGTERM, reloading
/// `path` on SIGHUP. Fails only when the first start fails.
pub async fn run(path: PathBuf, config: Config, opts: RunOptions) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Before anything starts: a SIGHUP must never hit the default action.
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let mut agent = Agent::start(path, config, opts, exits_tx).await?;
    loop {
        tokio::select! {
            _ = hup.recv() => agent.reload().await,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(e) = exits.recv() => agent.ended(e),
        }
    }
    tracing::info!("signal received, shutting down");
    agent.shutdown().await;
    Ok(())
}

/// A source loop that returned: its tree, its generation, its error.
type Exit = (String, u64, Option<String>);

struct RunningSource {
    cfg: SourceTreeConfig,
    generation: u64,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    status: SharedStatus,
    publish: mpsc::Sender<PublishRequest>,
    /// The loop returned without being asked to.
    ended: bool,
}

struct RunningServer {
    listen: SocketAddr,
    /// The sink trees as configured (some may have failed to open).
    trees: Vec<TreeConfig>,
    handle: ServerHandle,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A background task keyed by the setting it was started with.
struct Aux<K> {
    key: K,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Agent {
    path: PathBuf,
    opts: RunOptions,
    identity_path: PathBuf,
    identity: Arc<Identity>,
    /// Source trees in file order.
    sources: Vec<RunningSource>,
    server: Option<RunningServer>,
    control: watch::Sender<Arc<Control>>,
    control_socket: Option<Aux<PathBuf>>,
    metrics: Option<Aux<SocketAddr>>,
    exits: mpsc::UnboundedSender<Exit>,
    generation: u64,
}

fn say(line: &str) {
    // A closed stdout (the parent went away) must not stop the agent.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn load_identity(path: &Path) -> anyhow::Result<Arc<Identity>> {
    Ok(Arc::new(Identity::load(path).with_context(|| {
        format!("loading the identity in {}", path.display())
    })?))
}

async fn stop_task(stop: &watch::Sender<bool>, task: JoinHandle<()>, what: &str) {
    let _ = stop.send(true);
    let abort = task.abort_handle();
    if tokio::time::timeout(STOP_TIMEOUT, task).await.is_err() {
        tracing::warn!("{what} did not stop within {STOP_TIMEOUT:?}; aborted");
        abort.abort();
    }
}

impl Agent {
    async fn start(
        path: PathBuf,
        config: Config,
        opts: RunOptions,
        exits: mpsc::UnboundedSender<Exit>,
    ) -> anyhow::Result<Agent> {
        let identity = load_identity(&config.identity)?;
        let mut agent = Agent {
            path,
            opts,
            identity_path: config.identity.clone(),
            identity,
            sources: Vec::new(),
            server: None,
            control: watch::channel(Arc::new(Control::default())).0,
            control_socket: None,
            metrics: None,
            exits,
            generation: 0,
        };
        if let Some(sinks) = config.server() {
            let s = agent.start_server(&sinks)?;
            agent.server = Some(s);
        }
        for s in config.sources() {
            agent.start_source(s.clone());
        }
        agent.apply_aux(&config);
        agent.publish_control();
        let control = agent
            .control_socket
            .as_ref()
            .map(|c| c.key.display().to_string())
            .unwrap_or_default();
        tracing::info!(config = %agent.path.display(), "running {}", config.summary());
        let n = config.trees.len();
        let src = config
            .trees
            .iter()
            .filter(|t| matches!(t, crate::config::Tree::Source(_)))
            .count();
        if agent.opts.json {
            say(&serde_json::json!({"running": n, "sources": src, "sinks": n - src, "control": control})
                .to_string());
        } else {
            say(&format!(
                "running {n} tree{} ({src} source, {} sink) control {control}",
                if n == 1 { "" } else { "s" },
                n - src
            ));
        }
        Ok(agent)
    }

    fn start_server(&self, cfg: &AgentConfig) -> anyhow::Result<RunningServer> {
        let server = Server::bind_with(self.identity.clone(), cfg)
            .with_context(|| format!("serving the sink trees on {}", cfg.listen))?;
        let addr = server.local_addr().context("bound address")?;
        let fp = server.fingerprint();
        if self.opts.json {
            say(
                &serde_json::json!({"listening": addr.to_string(), "fingerprint": fp.to_string()})
                    .to_string(),
            );
        } else {
            say(&format!("listening on {addr} fingerprint {fp}"));
        }
        tracing::info!(%addr, %fp, trees = cfg.trees.len(), "serving");
        let handle = server.handle();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(server.run(rx));
        Ok(RunningServer {
            listen: cfg.listen,
            trees: cfg.trees.clone(),
            handle,
            stop,
            task,
        })
    }

    fn start_source(&mut self, cfg: SourceTreeConfig) {
        self.generation += 1;
        let generation = self.generation;
        let scfg = SourceConfig {
            root: cfg.path.clone(),
            name: cfg.name.clone(),
            downstream: cfg
                .peers
                .iter()
                .map(|p| Downstream {
                    url: p.url.clone(),
                    peer: p.fingerprint,
                })
                .collect(),
            quiet: cfg.quiet,
            max_delay: cfg.max_delay,
            rescan_interval: cfg.rescan,
            cache: cfg.cache_path(),
            bandwidth_limit: cfg.bandwidth_limit,
        };
        let status = SharedStatus::default();
        {
            // Named before the loop runs, so that `push --wait NAME` finds it.
            let mut s = status.lock().unwrap();
            s.name = cfg.name.clone();
            s.path = cfg.path.display().to_string();
            s.role = if cfg.relay { "relay" } else { "source" };
        }
        if let Some(r) = cfg.bandwidth_limit {
            tracing::info!(tree = %cfg.name, bytes_per_sec = r, "bandwidth limit");
        }
        let (publish, publish_rx) = mpsc::channel(16);
        let (stop, stop_rx) = watch::channel(false);
        let exits = self.exits.clone();
        let name = cfg.name.clone();
        let span = tracing::info_span!("tree", name = %cfg.name);
        let fut: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>> =
            if cfg.relay {
                // The sink's state directory, as the server found it.
                let state = cfg.state.clone().or_else(|| {
                    cfg.path
                        .canonicalize()
                        .ok()
                        .and_then(|p| sync_core::state::default_state_dir(&p).ok())
                });
                match state {
                    Some(state) => Box::pin(source::run_relay(
                        source::RelayConfig {
                            name: scfg.name,
                            root: scfg.root,
                            state,
                            downstream: scfg.downstream,
                            bandwidth_limit: scfg.bandwidth_limit,
                        },
                        self.identity.clone(),
                        status.clone(),
                        publish_rx,
                        stop_rx,
                    )),
                    None => {
                        let path = cfg.path.display().to_string();
                        Box::pin(async move {
                            anyhow::bail!("no state directory for the relay of {path}")
                        })
                    }
                }
            } else {
                Box::pin(source::run(
                    scfg,
                    self.identity.clone(),
                    status.clone(),
                    publish_rx,
                    stop_rx,
                ))
            };
        let task = tokio::spawn(
            async move {
                let r = fut.await;
                let _ = exits.send((name, generation, r.err().map(|e| format!("{e:#}"))));
            }
            .instrument(span),
        );
        self.sources.push(RunningSource {
            cfg,
            generation,
            stop,
            task,
            status,
            publish,
            ended: false,
        });
    }

    /// A source loop returned: expected when it was stopped, else an error
    /// shown in status (the next reload restarts it).
    fn ended(&mut self, (name, generation, err): Exit) {
        let Some(s) = self
            .sources
            .iter_mut()
            .find(|s| s.cfg.name == name && s.generation == generation)
        else {
            return;
        };
        if *s.stop.borrow() {
            return;
        }
        s.ended = true;
        let why = err.unwrap_or_else(|| "the source loop ended".into());
        tracing::error!(tree = %name, "source tree stopped: {why}; a reload (SIGHUP) restarts it");
        s.status.lock().unwrap().last_scan_error = Some(format!("stopped: {why}"));
    }

    /// Start, restart or stop the control socket and metrics endpoint to
    /// match `config`.
    fn apply_aux(&mut self, config: &Config) {
        let path = config.control.clone().unwrap_or_else(control::default_path);
        if self.control_socket.as_ref().map(|c| &c.key) != Some(&path) {
            if let Some(old) = self.control_socket.take() {
                tracing::info!(from = %old.key.display(), to = %path.display(), "control socket moved");
                // Its task removes the old socket file as it ends.
                let _ = old.stop.send(true);
            }
            let (stop, rx) = watch::channel(false);
            let live = self.control.subscribe();
            let p = path.clone();
            let task = match control::bind(&p) {
                Ok(listener) => tokio::spawn(async move {
                    control::serve_live(listener, &p, live, rx).await;
                }),
                Err(e) => {
                    tracing::error!(path = %p.display(), "control socket: {e}");
                    tokio::spawn(async {})
                }
            };
            self.control_socket = Some(Aux {
                key: path,
                stop,
                task,
            });
        }
        let want = config.metrics;
        if self.metrics.as_ref().map(|m| m.key) != want {
            if let Some(old) = self.metrics.take() {
                tracing::info!(addr = %old.key, "metrics endpoint stopped");
                let _ = old.stop.send(true);
            }
            if let Some(addr) = want {
                let (stop, rx) = watch::channel(false);
                let live = self.control.subscribe();
                let task = match control::bind_metrics(addr) {
                    Ok(listener) => tokio::spawn(async move {
                        control::serve_metrics_live(listener, live, rx).await;
                    }),
                    Err(e) => {
                        tracing::error!(%addr, "metrics endpoint: {e}");
                        tokio::spawn(async {})
                    }
                };
                self.metrics = Some(Aux {
                    key: addr,
                    stop,
                    task,
                });
            }
        }
    }

    /// Give the control socket and metrics the trees running now.
    fn publish_control(&self) {
        let sources = self
            .sources
            .iter()
            .map(|s| ControlledTree {
                status: s.status.clone(),
                publish: s.publish.clone(),
            })
            .collect();
        let mut sinks: Vec<Arc<dyn Fn() -> serde_json::Value + Send + Sync>> = Vec::new();
        if let Some(server) = &self.server {
            for t in server.handle.trees() {
                sinks.push(Arc::new(move || {
                    let root = sync_core::state::peek_committed_root(&t.state).map(|r| r.to_hex());
                    serde_json::json!({
                        "name": t.name,
                        "path": t.path.display().to_string(),
                        "role": "sink",
                        "state": t.state.display().to_string(),
                        "root": root,
                        "peers": [],
                    })
                }));
            }
        }
        let _ = self.control.send(Arc::new(Control { sources, sinks }));
    }

    /// SIGHUP: re-read the file; apply it only if it is valid.
    async fn reload(&mut self) {
        let path = self.path.clone();
        tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
        let config = match Config::load(&path) {
            Ok((c, warnings)) => {
                for w in warnings {
                    tracing::warn!("{}", w.in_file(&path));
                }
                c
            }
            Err(ConfigError::File { diagnostics, .. }) => {
                let mut n = 0;
                for d in &diagnostics {
                    if d.severity == Severity::Error {
                        n += 1;
                        tracing::error!("{}", d.in_file(&path));
                    } else {
                        tracing::warn!("{}", d.in_file(&path));
                    }
                }
                tracing::error!(
                    "configuration not reloaded: {n} error{} in {}; still running the previous one",
                    if n == 1 { "" } else { "s" },
                    path.display()
                );
                return;
            }
            Err(e) => {
                tracing::error!("configuration not reloaded: {e}; still running the previous one");
                return;
            }
        };
        // The identity is read again even from the same place: a rotated
        // key is picked up, and restarts every tree.
        let identity = match load_identity(&config.identity) {
            Ok(id) => id,
            Err(e) if config.identity == self.identity_path => {
                tracing::warn!("{e:#}; keeping the identity loaded before");
                self.identity.clone()
            }
            Err(e) => {
                tracing::error!(
                    "configuration not reloaded: {e:#}; still running the previous one"
                );
                return;
            }
        };
        let new_identity = identity.fingerprint() != self.identity.fingerprint();
        if new_identity {
            tracing::info!(fingerprint = %identity.fingerprint(), "new identity: every tree restarts");
        }
        self.identity = identity;
        self.identity_path = config.identity.clone();
        let mut changes = Vec::new();
        self.reload_server(&config, new_identity, &mut changes)
            .await;
        self.reload_sources(&config, new_identity, &mut changes)
            .await;
        self.apply_aux(&config);
        self.publish_control();
        for c in &changes {
            tracing::info!("reload: {c}");
        }
        tracing::info!(
            changes = changes.len(),
            "configuration reloaded: {}",
            config.summary()
        );
    }

    async fn reload_server(&mut self, config: &Config, new_identity: bool, out: &mut Vec<String>) {
        let want = config.server();
        let Some(running) = self.server.as_mut() else {
            if let Some(c) = want {
                match self.start_server(&c) {
                    Ok(s) => {
                        for t in &s.trees {
                            out.push(format!("tree {} (sink): added", t.name));
                        }
                        self.server = Some(s);
                    }
                    Err(e) => tracing::error!("sink trees not served: {e:#}"),
                }
            }
            return;
        };
        let Some(want) = want else {
            let s = self.server.take().expect("checked above");
            stop_task(&s.stop, s.task, "the server").await;
            for t in &s.trees {
                out.push(format!("tree {} (sink): removed", t.name));
            }
            out.push(format!("stopped listening on {}", s.listen));
            return;
        };
        let listening = running.listen;
        if listening != want.listen {
            // Bind the new address first: if it fails, the old one stays.
            match self.start_server(&want) {
                Ok(s) => {
                    let old = self.server.replace(s).expect("checked above");
                    stop_task(&old.stop, old.task, "the server").await;
                    out.push(format!(
                        "listen moved from {listening} to {}: every sink tree restarted",
                        want.listen
                    ));
                }
                Err(e) => tracing::error!(
                    "{e:#}; still listening on {listening} with the previous sink trees"
                ),
            }
            return;
        }
        let running = self.server.as_mut().expect("checked above");
        for t in &running.trees {
            match want.trees.iter().find(|n| n.name == t.name) {
                None => out.push(format!("tree {} (sink): removed", t.name)),
                Some(n) if n != t || new_identity => {
                    out.push(format!("tree {} (sink): changed, restarted", t.name))
                }
                Some(_) => {}
            }
        }
        for n in &want.trees {
            if !running.trees.iter().any(|t| t.name == n.name) {
                out.push(format!("tree {} (sink): added", n.name));
            }
        }
        let results = running
            .handle
            .reconfigure(self.identity.clone(), &want.trees)
            .await;
        for (name, r) in results {
            if let Err(e) = r {
                tracing::error!(tree = %name, "sink tree not served: {e}");
            }
        }
        running.trees = want.trees;
    }

    async fn reload_sources(&mut self, config: &Config, new_identity: bool, out: &mut Vec<String>) {
        let want: Vec<&SourceTreeConfig> = config.sources().collect();
        let mut keep = Vec::new();
        let mut stopping = Vec::new();
        for s in std::mem::take(&mut self.sources) {
            let name = &s.cfg.name;
            match want.iter().find(|w| &w.name == name) {
                Some(w) if **w == s.cfg && !new_identity && !s.ended => keep.push(s),
                Some(_) if s.ended => {
                    out.push(format!("tree {name} (source): had stopped, restarted"));
                    stopping.push(s);
                }
                Some(_) => {
                    out.push(format!("tree {name} (source): changed, restarted"));
                    stopping.push(s);
                }
                None => {
                    out.push(format!("tree {name} (source): removed"));
                    stopping.push(s);
                }
            }
        }
        // Stop together: each in-flight push is aborted as at shutdown
        // (the mirror keeps what it staged, and resumes from it).
        for s in &stopping {
            let _ = s.stop.send(true);
        }
        let restarted: Vec<String> = stopping.iter().map(|s| s.cfg.name.clone()).collect();
        for s in stopping {
            stop_task(&s.stop, s.task, &format!("source tree {}", s.cfg.name)).await;
        }
        for w in want {
            if let Some(i) = keep.iter().position(|k| k.cfg.name == w.name) {
                self.sources.push(keep.remove(i));
                continue;
            }
            if !restarted.contains(&w.name) {
                out.push(format!("tree {} (source): added", w.name));
            }
            self.start_source(w.clone());
        }
    }

    async fn shutdown(mut self) {
        for s in &self.sources {
            let _ = s.stop.send(true);
        }
        if let Some(s) = &self.server {
            let _ = s.stop.send(true);
        }
        for s in std::mem::take(&mut self.sources) {
            stop_task(&s.stop, s.task, &format!("source tree {}", s.cfg.name)).await;
        }
        if let Some(s) = self.server.take() {
            stop_task(&s.stop, s.task, "the server").await;
        }
        if let Some(a) = self.control_socket.take() {
            stop_task(&a.stop, a.task, "the control socket").await;
        }
        if let Some(a) = self.metrics.take() {
            stop_task(&a.stop, a.task, "the metrics endpoint").await;
        }
    }
}
