//! Agent configuration: the identity, listen address, control socket and
//! metrics address of one agent, and the trees it runs: sink trees it
//! receives pushes into (each with the fingerprints that may push to or
//! pull it) and source trees it watches and pushes to its peers. Built from
//! a TOML file ([`Config`], checked in full: every error is reported with
//! its line and column, not only the first) or from `serve` flags
//! ([`AgentConfig`]). File IO only to read the file.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use crate::client::RemoteUrl;
use crate::identity::Fingerprint;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file has errors; `diagnostics` holds all of them (and warnings).
    #[error("{}", render(path, diagnostics))]
    File {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn render(path: &Path, diagnostics: &[Diagnostic]) -> String {
    let lines: Vec<String> = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.in_file(path))
        .collect();
    lines.join("\n")
}

/// What one peer may do with one tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub push: bool,
    pub pull: bool,
}

/// One sink tree: served to the peers its allow list names.
#[derive(Clone, Debug, PartialEq)]
pub struct TreeConfig {
    pub name: String,
    pub path: PathBuf,
    /// State directory (default: `.<name>.sync-state` beside the tree).
    pub state: Option<PathBuf>,
    pub allow: HashMap<Fingerprint, Access>,
    /// Peers this sink relays each committed snapshot to (a relay: the
    /// builder's snapshot travels on with the same root, only after this
    /// tree committed it).
    pub relay: Option<SourceTreeConfig>,
}

/// What the QUIC server runs: the agent's sink trees.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub identity: PathBuf,
    pub listen: SocketAddr,
    pub trees: Vec<TreeConfig>,
}

/// A mirror a source tree keeps current.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerConfig {
    pub url: RemoteUrl,
    pub fingerprint: Fingerprint,
}

/// One source tree: watched, rescanned when quiet, pushed to every peer.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceTreeConfig {
    pub name: String,
    pub path: PathBuf,
    /// Where the hash cache goes when `cache` is not set.
    pub state: Option<PathBuf>,
    pub peers: Vec<PeerConfig>,
    pub quiet: Duration,
    pub max_delay: Duration,
    pub rescan: Duration,
    pub cache: Option<PathBuf>,
    /// Bytes per second this tree may send, over all its peers.
    pub bandwidth_limit: Option<u64>,
    /// A sink's relay: snapshots are the sink's commits, read from its
    /// state directory, instead of scans (debounce and cache unused).
    pub relay: bool,
}

impl SourceTreeConfig {
    /// The hash cache file: `cache`, else `hash.cache` in `state`, else
    /// the per-user default.
    pub fn cache_path(&self) -> Option<PathBuf> {
        self.cache
            .clone()
            .or_else(|| self.state.as_ref().map(|s| s.join("hash.cache")))
            .or_else(|| sync_core::cache::default_path(&self.path))
    }
}

/// A tree of the agent, by role.
#[derive(Clone, Debug, PartialEq)]
pub enum Tree {
    Source(SourceTreeConfig),
    Sink(TreeConfig),
}

impl Tree {
    pub fn name(&self) -> &str {
        match self {
            Tree::Source(t) => &t.name,
            Tree::Sink(t) => &t.name,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Tree::Source(t) => &t.path,
            Tree::Sink(t) => &t.path,
        }
    }

    pub fn role(&self) -> &'static str {
        match self {
            Tree::Source(_) => "source",
            Tree::Sink(_) => "sink",
        }
    }
}

/// The whole agent, as `sync-agent --config FILE` runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub identity: PathBuf,
    /// Required when there is a sink tree.
    pub listen: Option<SocketAddr>,
    /// Control socket (default: [`crate::control::default_path`]).
    pub control: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub trees: Vec<Tree>,
}

/// Limits of the debounce and rescan settings: zero is meaningless and
/// anything beyond these is a typo, not a choice.
pub const QUIET_MS: Range<u64> = 1..60_001;
pub const MAX_DELAY_MS: Range<u64> = 1..3_600_001;
pub const RESCAN_SECS: Range<u64> = 1..2_592_001;
/// Slowest accepted bandwidth limit, bytes per second.
pub const MIN_RATE: u64 = 1024;

impl Config {
    /// The sink trees, as the QUIC server takes them (`None` when the
    /// agent has none).
    pub fn server(&self) -> Option<AgentConfig> {
        let trees: Vec<TreeConfig> = self
            .trees
            .iter()
            .filter_map(|t| match t {
                Tree::Sink(s) => Some(s.clone()),
                Tree::Source(_) => None,
            })
            .collect();
        let listen = self.listen?;
        (!trees.is_empty()).then(|| AgentConfig {
            identity: self.identity.clone(),
            listen,
            trees,
        })
    }

    /// Every tree that pushes: source trees, and the relays of sink trees.
    pub fn sources(&self) -> impl Iterator<Item = &SourceTreeConfig> {
        self.trees.iter().filter_map(|t| match t {
            Tree::Source(s) => Some(s),
            Tree::Sink(s) => s.relay.as_ref(),
        })
    }

    /// One line: the trees by role, for `check-config` and the start log.
    pub fn summary(&self) -> String {
        let (src, sink) = self.trees.iter().fold((0, 0), |(a, b), t| match t {
            Tree::Source(_) => (a + 1, b),
            Tree::Sink(_) => (a, b + 1),
        });
        let list: Vec<String> = self
            .trees
            .iter()
            .map(|t| match t {
                Tree::Source(s) => format!(
                    "{} (source, {} peer{})",
                    s.name,
                    s.peers.len(),
                    if s.peers.len() == 1 { "" } else { "s" }
                ),
                Tree::Sink(s) => format!(
                    "{} (sink, {} allowed peer{}{})",
                    s.name,
                    s.allow.len(),
                    if s.allow.len() == 1 { "" } else { "s" },
                    match &s.relay {
                        Some(r) => format!(", relaying to {}", r.peers.len()),
                        None => String::new(),
                    }
                ),
            })
            .collect();
        format!(
            "{} tree{} ({src} source, {sink} sink): {}",
            self.trees.len(),
            if self.trees.len() == 1 { "" } else { "s" },
            list.join(", ")
        )
    }

    /// Parse and check `text`: the configuration when it has no error, and
    /// every error and warning found, in file order.
    pub fn check(text: &str) -> Checked {
        let (doc, syntax) = DeTable::parse_recoverable(text);
        let mut c = Checker {
            text,
            diagnostics: Vec::new(),
        };
        let syntax_spans: Vec<Range<usize>> =
            syntax.iter().map(|e| e.span().unwrap_or(0..0)).collect();
        for (e, span) in syntax.iter().zip(&syntax_spans) {
            c.error(span.clone(), e.message().to_string());
        }
        let root_span = doc.span();
        let config = c.root(doc.get_ref(), root_span);
        // Recovery after a syntax error can leave a value that is wrong
        // only because of it: one message per place is enough.
        let mut diagnostics: Vec<Diagnostic> = Vec::new();
        for (i, d) in c.diagnostics.into_iter().enumerate() {
            let semantic = i >= syntax_spans.len();
            if semantic && syntax_spans.iter().any(|s| overlaps(s, &d.span)) {
                continue;
            }
            diagnostics.push(d);
        }
        diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
        let ok = !diagnostics.iter().any(|d| d.severity == Severity::Error);
        Checked {
            config: config.filter(|_| ok),
            diagnostics,
        }
    }

    /// Read and check `path`; the warnings come with the configuration.
    pub fn load(path: &Path) -> Result<(Config, Vec<Diagnostic>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let checked = Config::check(&text);
        match checked.config {
            Some(c) => Ok((c, checked.diagnostics)),
            None => Err(ConfigError::File {
                path: path.to_path_buf(),
                diagnostics: checked.diagnostics,
            }),
        }
    }
}

/// What [`Config::check`] found.
#[derive(Debug)]
pub struct Checked {
    /// `Some` when no error was found (warnings allowed).
    pub config: Option<Config>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    pub fn errors(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, located in the file (1-based line and column, in chars).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub line: usize,
    pub column: usize,
    /// Byte range in the file.
    pub span: Range<usize>,
    pub message: String,
}

impl Diagnostic {
    /// `FILE:LINE:COL: message` (warnings say so).
    pub fn in_file(&self, file: &Path) -> String {
        format!("{}:{self}", file.display())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        f.write_str(&self.message)
    }
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    // An empty span (end of input, a missing token) covers its position.
    let (a0, a1) = (a.start, a.end.max(a.start + 1));
    let (b0, b1) = (b.start, b.end.max(b.start + 1));
    a0 < b1 && b0 < a1
}

/// 1-based line and column (in chars) of byte `offset` in `text`.
pub fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut at = offset.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

type Value<'i> = Spanned<DeValue<'i>>;

const ROOT_KEYS: &[&str] = &["identity", "listen", "control", "metrics", "tree"];
const TREE_KEYS: &[&str] = &["name", "path", "state", "role"];
const SOURCE_KEYS: &[&str] = &["quiet_ms", "max_delay_ms", "rescan_secs", "cache"];
const SINK_KEYS: &[&str] = &["allow"];
/// Both roles: a source's mirrors, or the further mirrors a sink relays
/// each committed snapshot to.
const PUSH_KEYS: &[&str] = &["peer", "bandwidth_limit"];
const PEER_KEYS: &[&str] = &["url", "fingerprint"];
const ALLOW_KEYS: &[&str] = &["fingerprint", "push", "pull"];

/// Walks the parsed document, collecting every problem instead of
/// stopping at the first.
struct Checker<'t> {
    text: &'t str,
    diagnostics: Vec<Diagnostic>,
}

/// A tree as read, with the spans the cross-tree checks point at; `tree`
/// is `None` when the tree itself has an error.
struct ReadTree {
    header: Range<usize>,
    name: Option<(String, Range<usize>)>,
    path: Option<(PathBuf, Range<usize>)>,
    role: Option<&'static str>,
    tree: Option<Tree>,
}

fn field<'a, 'i>(t: &'a DeTable<'i>, key: &str) -> Option<&'a Value<'i>> {
    t.iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
}

fn keys<'a, 'i>(t: &'a DeTable<'i>) -> impl Iterator<Item = &'a Spanned<DeString<'i>>> {
    t.iter().map(|(k, _)| k)
}

impl Checker<'_> {
    fn push(&mut self, severity: Severity, span: Range<usize>, message: String) {
        let (line, column) = position(self.text, span.start);
        self.diagnostics.push(Diagnostic {
            severity,
            line,
            column,
            span,
            message,
        });
    }

    fn error(&mut self, span: Range<usize>, message: String) {
        self.push(Severity::Error, span, message);
    }

    fn warn(&mut self, span: Range<usize>, message: String) {
        self.push(Severity::Warning, span, message);
    }

    /// Keys neither in `allowed` nor in `elsewhere` (keys reported by
    /// another check) are errors.
    fn unknown_keys(
        &mut self,
        t: &DeTable<'_>,
        allowed: &[&[&str]],
        elsewhere: &[&str],
        ctx: &str,
    ) {
        for k in keys(t) {
            let name = k.get_ref().as_ref();
            if !allowed.iter().any(|set| set.contains(&name)) && !elsewhere.contains(&name) {
                let expected: Vec<&str> = allowed.iter().flat_map(|s| s.iter().copied()).collect();
                self.error(
                    k.span(),
                    format!(
                        "{ctx}unknown key {name:?} (expected one of: {})",
                        expected.join(", ")
                    ),
                );
            }
        }
    }

    fn wrong_type(&mut self, v: &Value<'_>, key: &str, want: &str, ctx: &str) {
        self.error(
            v.span(),
            format!(
                "{ctx}{key} must be {want}, not {} {}",
                article(v.get_ref().type_str()),
                v.get_ref().type_str()
            ),
        );
    }

    fn string(&mut self, t: &DeTable<'_>, key: &str, ctx: &str) -> Option<(String, Range<usize>)> {
        let v = field(t, key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.to_string(), v.span())),
            _ => {
                self.wrong_type(v, key, "a string", ctx);
                None
            }
        }
    }

    fn path(&mut self, t: &DeTable<'_>, key: &str, ctx: &str) -> Option<(PathBuf, Range<usize>)> {
        let (s, span) = self.string(t, key, ctx)?;
        if s.is_empty() {
            self.error(span, format!("{ctx}{key} is empty"));
            return None;
        }
        let p = PathBuf::from(s);
        if p.is_relative() {
            self.warn(
                span.clone(),
                format!(
                    "{ctx}{key} {} is relative: it is resolved against the agent's working \
                     directory (/ under systemd)",
                    p.display()
                ),
            );
        }
        Some((p, span))
    }

    fn addr(&mut self, t: &DeTable<'_>, key: &str) -> Option<(SocketAddr, Range<usize>)> {
        let (s, span) = self.string(t, key, "")?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some((a, span)),
            Err(_) => {
                self.error(
                    span,
                    format!("{key} {s:?} is not an address (IP:PORT, e.g. 0.0.0.0:7443)"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, t: &DeTable<'_>, key: &str, ctx: &str) -> Option<bool> {
        let v = field(t, key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(v, key, "true or false", ctx);
                None
            }
        }
    }

    /// An integer setting in `range` (`unit` names it in messages).
    fn bounded(
        &mut self,
        t: &DeTable<'_>,
        key: &str,
        range: Range<u64>,
        unit: &str,
        ctx: &str,
    ) -> Option<(u64, Range<usize>)> {
        let v = field(t, key)?;
        let DeValue::Integer(i) = v.get_ref() else {
            self.wrong_type(v, key, &format!("an integer ({unit})"), ctx);
            return None;
        };
        let n = i128::from_str_radix(i.as_str(), i.radix()).ok();
        match n {
            Some(n) if n >= range.start as i128 && n < range.end as i128 => {
                Some((n as u64, v.span()))
            }
            _ => {
                self.error(
                    v.span(),
                    format!(
                        "{ctx}{key} = {} is out of range ({} to {} {unit})",
                        i.as_str(),
                        range.start,
                        range.end - 1
                    ),
                );
                None
            }
        }
    }

    /// An array of tables (`[[key]]` or `key = [{...}]`).
    fn tables<'a, 'i>(
        &mut self,
        t: &'a DeTable<'i>,
        key: &str,
        ctx: &str,
    ) -> Vec<(&'a DeTable<'i>, Range<usize>)> {
        let Some(v) = field(t, key) else {
            return Vec::new();
        };
        let DeValue::Array(a) = v.get_ref() else {
            self.wrong_type(v, key, &format!("an array of tables ([[{key}]])"), ctx);
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in a.iter() {
            match item.get_ref() {
                DeValue::Table(t) => out.push((t, item.span())),
                _ => self.wrong_type(item, &format!("each {key}"), "a table", ctx),
            }
        }
        out
    }

    fn fingerprint(&mut self, t: &DeTable<'_>, ctx: &str, what: &str) -> Option<Fingerprint> {
        let (s, span) = self.string(t, "fingerprint", ctx)?;
        match s.parse::<Fingerprint>() {
            Ok(fp) => Some(fp),
            Err(_) => {
                self.error(
                    span,
                    format!("{ctx}{what} fingerprint is not 64 hex digits"),
                );
                None
            }
        }
    }

    fn missing(&mut self, span: Range<usize>, ctx: &str, key: &str, what: &str) {
        self.error(span, format!("{ctx}missing key {key:?} ({what})"));
    }

    fn root(&mut self, doc: &DeTable<'_>, span: Range<usize>) -> Option<Config> {
        self.unknown_keys(doc, &[ROOT_KEYS], &[], "");
        let identity = self.path(doc, "identity", "");
        if field(doc, "identity").is_none() {
            self.missing(
                span.start..span.start,
                "",
                "identity",
                "the directory holding this agent's cert.pem and key.pem",
            );
        }
        let listen = self.addr(doc, "listen");
        let control = self.path(doc, "control", "").map(|p| p.0);
        let metrics = self.addr(doc, "metrics").map(|a| a.0);
        let mut read = Vec::new();
        let tables = self.tables(doc, "tree", "");
        if tables.is_empty() && field(doc, "tree").is_none() {
            self.error(
                span.start..span.start,
                "no [[tree]] table: the agent would have nothing to run".into(),
            );
        }
        for (i, (t, header)) in tables.into_iter().enumerate() {
            read.push(self.tree(i + 1, t, header));
        }
        self.across_trees(&read, listen.as_ref());
        let identity = identity?.0;
        let trees = read
            .into_iter()
            .map(|r| r.tree)
            .collect::<Option<Vec<Tree>>>()?;
        Some(Config {
            identity,
            listen: listen.map(|l| l.0),
            control,
            metrics,
            trees,
        })
    }

    fn tree(&mut self, index: usize, t: &DeTable<'_>, header: Range<usize>) -> ReadTree {
        let numbered = format!("tree #{index}: ");
        let name = self.string(t, "name", &numbered);
        let ctx = match &name {
            Some((n, _)) => format!("tree {n:?}: "),
            None => numbered,
        };
        if let Some((n, span)) = &name {
            if n.is_empty() || n.len() > sync_core::wire::MAX_TREE_NAME || n.contains('/') {
                self.error(
                    span.clone(),
                    format!(
                        "{ctx}name must be 1 to {} bytes without '/'",
                        sync_core::wire::MAX_TREE_NAME
                    ),
                );
            }
        } else if field(t, "name").is_none() {
            self.missing(
                header.clone(),
                &ctx,
                "name",
                "how peers and status name the tree",
            );
        }
        let path = self.path(t, "path", &ctx);
        if field(t, "path").is_none() {
            self.missing(header.clone(), &ctx, "path", "the tree's directory");
        }
        let state = self.path(t, "state", &ctx).map(|s| s.0);
        let role = match self.string(t, "role", &ctx) {
            None => Some("sink"),
            Some((r, _)) if r == "sink" => Some("sink"),
            Some((r, _)) if r == "source" => Some("source"),
            Some((r, span)) => {
                self.error(span, format!("{ctx}unknown role {r:?} (source or sink)"));
                None
            }
        };
        let partial = match role {
            Some("source") => {
                self.unknown_keys(t, &[TREE_KEYS, SOURCE_KEYS, PUSH_KEYS], SINK_KEYS, &ctx);
                self.wrong_role(t, SINK_KEYS, "sink", &ctx);
                self.source(t, &header, &ctx)
            }
            Some(_) => {
                self.unknown_keys(t, &[TREE_KEYS, SINK_KEYS, PUSH_KEYS], SOURCE_KEYS, &ctx);
                self.wrong_role(t, SOURCE_KEYS, "source", &ctx);
                self.sink(t, &header, &ctx)
            }
            None => {
                self.unknown_keys(
                    t,
                    &[TREE_KEYS, SOURCE_KEYS, SINK_KEYS, PUSH_KEYS],
                    &[],
                    &ctx,
                );
                None
            }
        };
        let tree = match (partial, &name, &path) {
            (Some(Partial::Source(mut s)), Some((n, _)), Some((p, _))) => {
                s.name = n.clone();
                s.path = p.clone();
                s.state = state;
                Some(Tree::Source(s))
            }
            (Some(Partial::Sink(allow, relay)), Some((n, _)), Some((p, _))) => {
                let relay = relay.map(|mut r| {
                    r.name = n.clone();
                    r.path = p.clone();
                    r.state = state.clone();
                    r
                });
                Some(Tree::Sink(TreeConfig {
                    name: n.clone(),
                    path: p.clone(),
                    state,
                    allow,
                    relay,
                }))
            }
            _ => None,
        };
        ReadTree {
            header,
            name,
            path,
            role,
            tree,
        }
    }

    /// Keys of the other role are an error of their own (not "unknown").
    fn wrong_role(&mut self, t: &DeTable<'_>, other: &[&str], role: &str, ctx: &str) {
        for k in keys(t) {
            let name = k.get_ref().as_ref();
            if other.contains(&name) {
                self.error(
                    k.span(),
                    format!(
                        "{ctx}{name} applies to {role} trees only (set role = {role:?} or remove it)"
                    ),
                );
            }
        }
    }

    fn source(&mut self, t: &DeTable<'_>, header: &Range<usize>, ctx: &str) -> Option<Partial> {
        let (peers, mut ok) = self.peers(t, header, ctx, true);
        let quiet = self.bounded(t, "quiet_ms", QUIET_MS, "ms", ctx);
        let max_delay = self.bounded(t, "max_delay_ms", MAX_DELAY_MS, "ms", ctx);
        let rescan = self.bounded(t, "rescan_secs", RESCAN_SECS, "s", ctx);
        let quiet_ms = quiet.as_ref().map_or(100, |q| q.0);
        let max_delay_ms = max_delay.as_ref().map_or(2000, |m| m.0);
        if max_delay_ms < quiet_ms {
            let span = max_delay
                .as_ref()
                .or(quiet.as_ref())
                .map_or(header.clone(), |v| v.1.clone());
            self.error(
                span,
                format!(
                    "{ctx}max_delay_ms ({max_delay_ms}) is shorter than quiet_ms ({quiet_ms}): \
                     a rescan would never wait for quiet"
                ),
            );
            ok = false;
        }
        for (v, key) in [
            (&quiet, "quiet_ms"),
            (&max_delay, "max_delay_ms"),
            (&rescan, "rescan_secs"),
        ] {
            if v.is_none() && field(t, key).is_some() {
                ok = false;
            }
        }
        let cache = self.path(t, "cache", ctx).map(|c| c.0);
        let (bandwidth_limit, bw_ok) = self.bandwidth(t, ctx);
        ok &= bw_ok;
        ok.then(|| {
            Partial::Source(SourceTreeConfig {
                name: String::new(),
                path: PathBuf::new(),
                state: None,
                peers,
                quiet: Duration::from_millis(quiet_ms),
                max_delay: Duration::from_millis(max_delay_ms),
                rescan: Duration::from_secs(rescan.map_or(3600, |r| r.0)),
                cache,
                bandwidth_limit,
                relay: false,
            })
        })
    }

    /// `[[tree.peer]]` entries; `required` for a source tree.
    fn peers(
        &mut self,
        t: &DeTable<'_>,
        header: &Range<usize>,
        ctx: &str,
        required: bool,
    ) -> (Vec<PeerConfig>, bool) {
        let mut ok = true;
        let mut peers: Vec<PeerConfig> = Vec::new();
        let tables = self.tables(t, "peer", ctx);
        if tables.is_empty() && required {
            self.error(
                header.clone(),
                format!("{ctx}a source tree needs at least one [[tree.peer]] (url, fingerprint)"),
            );
            ok = false;
        }
        for (i, (p, span)) in tables.into_iter().enumerate() {
            let pctx = format!("{ctx}peer #{}: ", i + 1);
            self.unknown_keys(p, &[PEER_KEYS], &[], &pctx);
            let url = match self.string(p, "url", ctx) {
                Some((u, uspan)) => match RemoteUrl::parse(&u) {
                    Ok(url) => {
                        if peers.iter().any(|q| q.url == url) {
                            self.error(uspan, format!("{ctx}peer {u} is listed twice"));
                        }
                        Some(url)
                    }
                    Err(_) => {
                        self.error(
                            uspan,
                            format!("{ctx}peer url {u:?} is not quic://HOST:PORT/NAME"),
                        );
                        None
                    }
                },
                None => {
                    if field(p, "url").is_none() {
                        self.missing(span.clone(), &pctx, "url", "quic://HOST:PORT/NAME");
                    }
                    None
                }
            };
            let fp = self.fingerprint(p, ctx, "peer");
            if field(p, "fingerprint").is_none() {
                self.missing(span, &pctx, "fingerprint", "the peer's 64 hex digits");
            }
            match (url, fp) {
                (Some(url), Some(fingerprint)) => peers.push(PeerConfig { url, fingerprint }),
                _ => ok = false,
            }
        }
        (peers, ok)
    }

    /// `bandwidth_limit`: bytes per second over all peers of the tree.
    fn bandwidth(&mut self, t: &DeTable<'_>, ctx: &str) -> (Option<u64>, bool) {
        let Some(v) = field(t, "bandwidth_limit") else {
            return (None, true);
        };
        let parsed = match v.get_ref() {
            DeValue::String(s) => parse_rate(s),
            DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
                .ok()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| format!("{} is not a byte rate", i.as_str()))
                .and_then(check_rate),
            other => Err(format!(
                "must be a string such as \"50MiB\" (per second), not {} {}",
                article(other.type_str()),
                other.type_str()
            )),
        };
        match parsed {
            Ok(r) => (Some(r), true),
            Err(m) => {
                self.error(v.span(), format!("{ctx}bandwidth_limit {m}"));
                (None, false)
            }
        }
    }

    fn sink(&mut self, t: &DeTable<'_>, header: &Range<usize>, ctx: &str) -> Option<Partial> {
        let mut ok = true;
        let mut allow: HashMap<Fingerprint, Access> = HashMap::new();
        let tables = self.tables(t, "allow", ctx);
        if tables.is_empty() {
            self.warn(
                header.clone(),
                format!(
                    "{ctx}no [[tree.allow]] entry: no peer may push to this sink tree or pull it"
                ),
            );
        }
        for (i, (a, span)) in tables.into_iter().enumerate() {
            let actx = format!("{ctx}allow #{}: ", i + 1);
            self.unknown_keys(a, &[ALLOW_KEYS], &[], &actx);
            let fp = self.fingerprint(a, ctx, "allow");
            if field(a, "fingerprint").is_none() {
                self.missing(
                    span.clone(),
                    &actx,
                    "fingerprint",
                    "the peer's 64 hex digits",
                );
            }
            let push = self.boolean(a, "push", &actx);
            let pull = self.boolean(a, "pull", &actx);
            let bad_flag = (push.is_none() && field(a, "push").is_some())
                || (pull.is_none() && field(a, "pull").is_some());
            let (push, pull) = (push.unwrap_or(false), pull.unwrap_or(false));
            if !push && !pull && !bad_flag {
                self.warn(
                    span,
                    format!("{actx}grants nothing (set push = true and/or pull = true)"),
                );
            }
            match fp {
                Some(fp) if !bad_flag => {
                    let e = allow.entry(fp).or_default();
                    e.push |= push;
                    e.pull |= pull;
                }
                _ => ok = false,
            }
        }
        // Peers make it a relay: each committed snapshot goes on to them.
        let (peers, peers_ok) = self.peers(t, header, ctx, false);
        let (bandwidth_limit, bw_ok) = self.bandwidth(t, ctx);
        if !peers_ok || !bw_ok {
            ok = false;
        }
        if peers.is_empty() && bandwidth_limit.is_some() {
            self.warn(
                header.clone(),
                format!("{ctx}bandwidth_limit without [[tree.peer]]: nothing is relayed"),
            );
        }
        let relay = (!peers.is_empty()).then(|| SourceTreeConfig {
            name: String::new(),
            path: PathBuf::new(),
            state: None,
            peers,
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_millis(2000),
            rescan: Duration::from_secs(3600),
            cache: None,
            bandwidth_limit,
            relay: true,
        });
        ok.then_some(Partial::Sink(allow, relay))
    }

    fn across_trees(&mut self, read: &[ReadTree], listen: Option<&(SocketAddr, Range<usize>)>) {
        let line = |c: &Checker<'_>, t: &ReadTree| position(c.text, t.header.start).0;
        for (i, t) in read.iter().enumerate() {
            if let Some((name, span)) = &t.name {
                let first = read[..i]
                    .iter()
                    .find(|o| o.name.as_ref().is_some_and(|(n, _)| n == name));
                if let Some(first) = first {
                    let msg = format!(
                        "tree {name:?}: the name is already used by the tree at line {}",
                        line(self, first)
                    );
                    self.error(span.clone(), msg);
                }
            }
            let Some((path, span)) = &t.path else {
                continue;
            };
            let who = t.name.as_ref().map_or("?", |n| n.0.as_str());
            let mine = normalize(path);
            for o in &read[..i] {
                let Some((opath, _)) = &o.path else { continue };
                let other = o.name.as_ref().map_or("?", |n| n.0.as_str());
                let theirs = normalize(opath);
                if mine == theirs {
                    let msg = format!(
                        "tree {who:?}: path {} is already used by tree {other:?} (line {})",
                        path.display(),
                        line(self, o)
                    );
                    self.error(span.clone(), msg);
                } else if mine.starts_with(&theirs) || theirs.starts_with(&mine) {
                    self.warn(
                        span.clone(),
                        format!(
                            "tree {who:?}: path {} and tree {other:?}'s path {} are nested",
                            path.display(),
                            opath.display()
                        ),
                    );
                }
            }
        }
        let sinks: Vec<&ReadTree> = read.iter().filter(|t| t.role == Some("sink")).collect();
        match (listen, sinks.first()) {
            (None, Some(first)) => self.error(
                first.header.clone(),
                format!(
                    "tree {:?} is a sink, but no listen address is set \
                     (listen = \"0.0.0.0:7443\" at the top of the file)",
                    first.name.as_ref().map_or("?", |n| n.0.as_str())
                ),
            ),
            (Some((_, span)), None) if !read.is_empty() => self.warn(
                span.clone(),
                "listen is set but there is no sink tree: nothing will listen".into(),
            ),
            _ => {}
        }
        // Judged only when every sink tree could be read.
        let allows: Option<Vec<bool>> = sinks
            .iter()
            .map(|t| match &t.tree {
                Some(Tree::Sink(s)) => Some(!s.allow.is_empty()),
                _ => None,
            })
            .collect();
        if let (Some(first), Some(allows)) = (sinks.first(), allows) {
            if !allows.contains(&true) {
                self.error(
                    first.header.clone(),
                    "no sink tree allows any peer: the agent would refuse every connection".into(),
                );
            }
        }
    }
}

/// A tree's role-specific part, before its name and path are attached.
enum Partial {
    Source(SourceTreeConfig),
    /// The allow list, and the relay when the sink has peers.
    Sink(HashMap<Fingerprint, Access>, Option<SourceTreeConfig>),
}

fn article(type_name: &str) -> &'static str {
    match type_name.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'u') => "an",
        _ => "a",
    }
}

/// `a/./b/../c/` -> `a/c`, without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn check_rate(bytes: u64) -> Result<u64, String> {
    if bytes < MIN_RATE {
        return Err(format!(
            "{bytes} bytes per second is below the minimum of {MIN_RATE} (remove the key for no limit)"
        ));
    }
    Ok(bytes)
}

/// Parse a rate in bytes per second: `50MiB`, `1.5 GiB/s`, `800KB`,
/// `1048576`. `K`, `M`, `G`, `T` and `KiB`.. are powers of 1024, `KB`..
/// powers of 1000. Bits are not accepted.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate such as \"50MiB\" (bytes per second)"))?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "K" | "k" | "KiB" => 1024.0,
        "KB" | "kB" => 1e3,
        "M" | "MiB" => 1048576.0,
        "MB" => 1e6,
        "G" | "GiB" => 1073741824.0,
        "GB" => 1e9,
        "T" | "TiB" => 1099511627776.0,
        "TB" => 1e12,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (B, KiB, MiB, GiB, KB, MB, GB; bytes per second)"
            ))
        }
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    check_rate(bytes.round() as u64)
}

/// Parse `FINGERPRINT[:push|:pull]`; no suffix allows both.
pub fn parse_allow(s: &str) -> Result<(Fingerprint, Access), ConfigError> {
    let (fp, access) = match s.split_once(':') {
        None => (
            s,
            Access {
                push: true,
                pull: true,
            },
        ),
        Some((fp, "push")) => (
            fp,
            Access {
                push: true,
                pull: false,
            },
        ),
        Some((fp, "pull")) => (
            fp,
            Access {
                push: false,
                pull: true,
            },
        ),
        Some((_, other)) => {
            return Err(ConfigError::Invalid(format!(
                "--allow {s}: unknown access {other:?} (push or pull)"
            )))
        }
    };
    let fp = fp
        .parse::<Fingerprint>()
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Ok((fp, access))
}

/// Parse `NAME=PATH`.
pub fn parse_tree(s: &str) -> Result<(String, PathBuf), ConfigError> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
        _ => Err(ConfigError::Invalid(format!(
            "--tree {s}: expected NAME=PATH"
        ))),
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.trees.is_empty() {
            return Err(ConfigError::Invalid("no tree to serve".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.trees {
            if t.name.is_empty() || t.name.len() > sync_core::wire::MAX_TREE_NAME {
                return Err(ConfigError::Invalid(format!(
                    "tree name {:?} must be 1 to {} bytes",
                    t.name,
                    sync_core::wire::MAX_TREE_NAME
                )));
            }
            if !seen.insert(&t.name) {
                return Err(ConfigError::Invalid(format!(
                    "tree {} is listed twice",
                    t.name
                )));
            }
        }
        if self.allowed().is_empty() {
            return Err(ConfigError::Invalid(
                "no peer is allowed (--allow or allow = [...])".into(),
            ));
        }
        Ok(())
    }

    /// Every fingerprint some tree allows: the TLS layer admits only these.
    pub fn allowed(&self) -> Vec<Fingerprint> {
        let mut v: Vec<Fingerprint> = self
            .trees
            .iter()
            .flat_map(|t| t.allow.keys().copied())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";
    const FP2: &str = "cd34cd34cd34cd34cd34cd34cd34cd34cd34cd34cd34cd34cd34cd34cd34cd34";

    fn ok(text: &str) -> Config {
        let c = Config::check(text);
        match c.config {
            Some(cfg) => cfg,
            None => panic!("unexpected errors: {:#?}", c.diagnostics),
        }
    }

    /// `(line, column, message)` of every error.
    fn errors(text: &str) -> Vec<(usize, usize, String)> {
        let c = Config::check(text);
        assert!(c.config.is_none(), "expected errors in:\n{text}");
        c.diagnostics
            .into_iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| (d.line, d.column, d.message))
            .collect()
    }

    fn has(errs: &[(usize, usize, String)], line: usize, col: usize, needle: &str) {
        assert!(
            errs.iter()
                .any(|(l, c, m)| *l == line && *c == col && m.contains(needle)),
            "no error at {line}:{col} containing {needle:?} in {errs:#?}"
        );
    }

    /// Today's `serve --config` files (sink trees, inline allow arrays, no
    /// role) keep parsing, to the same server configuration.
    #[test]
    fn parses_the_documented_serve_file() {
        let text = format!(
            r#"
identity = "/etc/sync/identity"
listen = "0.0.0.0:7443"
[[tree]]
name = "rdo"
path = "/srv/mirror/rdo"
allow = [ {{ fingerprint = "{FP}", push = true, pull = true }} ]
[[tree]]
name = "other"
path = "/srv/other"
state = "/var/lib/sync/other"
allow = [ {{ fingerprint = "{FP}", pull = true }} ]
"#
        );
        let c = ok(&text).server().unwrap();
        assert_eq!(c.trees.len(), 2);
        let fp: Fingerprint = FP.parse().unwrap();
        assert_eq!(
            c.trees[1].allow[&fp],
            Access {
                push: false,
                pull: true
            }
        );
        assert_eq!(
            c.trees[1].state.as_deref(),
            Some(Path::new("/var/lib/sync/other"))
        );
        assert_eq!(c.allowed(), vec![fp]);
        has(&errors("identity = 1"), 1, 12, "identity must be a string");
    }

    #[test]
    fn parses_both_roles() {
        let text = format!(
            r#"identity = "/etc/sync/identity"
listen = "127.0.0.1:7443"
control = "/run/sync-agent/sync-agent.sock"
metrics = "127.0.0.1:9464"

[[tree]]
name = "rdo"
path = "/srv/dlrn/repos"
role = "source"
quiet_ms = 250
max_delay_ms = 5_000
rescan_secs = 600
cache = "/var/cache/sync/rdo.hcache"
bandwidth_limit = "50MiB"
[[tree.peer]]
url = "quic://mirror1:7443/rdo"
fingerprint = "{FP}"
[[tree.peer]]
url = "quic://[::1]:7443/rdo"
fingerprint = "{FP2}"

[[tree]]
name = "in"
path = "/srv/in"
role = "sink"
[[tree.allow]]
fingerprint = "{FP}"
push = true
"#
        );
        let c = ok(&text);
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        let s: Vec<&SourceTreeConfig> = c.sources().collect();
        assert_eq!(s.len(), 1);
        let s = s[0];
        assert_eq!(s.peers.len(), 2);
        assert_eq!(s.peers[1].url.host, "::1");
        assert_eq!(s.quiet, Duration::from_millis(250));
        assert_eq!(s.max_delay, Duration::from_secs(5));
        assert_eq!(s.rescan, Duration::from_secs(600));
        assert_eq!(s.bandwidth_limit, Some(50 << 20));
        assert_eq!(
            s.cache_path().as_deref(),
            Some(Path::new("/var/cache/sync/rdo.hcache"))
        );
        let server = c.server().unwrap();
        assert_eq!(server.trees.len(), 1);
        assert_eq!(server.trees[0].name, "in");
        assert!(c.summary().contains("2 trees (1 source, 1 sink)"));
    }

    #[test]
    fn a_source_only_agent_needs_no_listen_address() {
        let c = ok(&format!(
            r#"identity = "/id"
[[tree]]
name = "a"
path = "/a"
role = "source"
state = "/var/lib/a"
[[tree.peer]]
url = "quic://m:1/a"
fingerprint = "{FP}"
"#
        ));
        assert!(c.server().is_none());
        let s = c.sources().next().unwrap();
        assert_eq!(s.quiet, Duration::from_millis(100));
        assert_eq!(s.max_delay, Duration::from_secs(2));
        assert_eq!(s.rescan, Duration::from_secs(3600));
        assert_eq!(
            s.cache_path().as_deref(),
            Some(Path::new("/var/lib/a/hash.cache"))
        );
    }

    /// Many distinct mistakes in one file: each is reported, at its line
    /// and column, and none hides another.
    #[test]
    fn reports_every_error_with_its_position() {
        let text = format!(
            r#"identity = "/id"
colour = "blue"

[[tree]]
name = "rdo"
path = "/srv/a"
role = "source"
quiet_ms = 0
max_delay_ms = 99999999
[[tree.peer]]
url = "http://m:1/rdo"
fingerprint = "{FP}"
[[tree.peer]]
url = "quic://m:1/rdo"
fingerprint = "abc"

[[tree]]
name = "rdo"
path = "/srv/a/"
role = "mirror"

[[tree]]
name = "lonely"
path = "/srv/lonely"
role = "source"
bandwidth_limit = "50Mb"
allow = []

[[tree]]
name = "in"
path = "/srv/in"
quiet_ms = 5
[[tree.allow]]
fingerprint = "{FP}"
push = "yes"
"#
        );
        let errs = errors(&text);
        has(&errs, 2, 1, "unknown key \"colour\"");
        has(&errs, 8, 12, "quiet_ms = 0 is out of range");
        has(&errs, 9, 16, "max_delay_ms = 99999999 is out of range");
        has(&errs, 11, 7, "tree \"rdo\": peer url \"http://m:1/rdo\"");
        has(
            &errs,
            15,
            15,
            "tree \"rdo\": peer fingerprint is not 64 hex digits",
        );
        has(&errs, 18, 8, "already used by the tree at line 4");
        has(&errs, 19, 8, "path /srv/a/ is already used by tree \"rdo\"");
        has(&errs, 20, 8, "unknown role \"mirror\"");
        has(
            &errs,
            22,
            1,
            "tree \"lonely\": a source tree needs at least one [[tree.peer]]",
        );
        has(&errs, 26, 19, "unknown unit \"Mb\"");
        has(&errs, 27, 1, "allow applies to sink trees only");
        has(&errs, 29, 1, "is a sink, but no listen address is set");
        has(&errs, 32, 1, "quiet_ms applies to source trees only");
        has(&errs, 35, 8, "push must be true or false");
        assert_eq!(errs.len(), 14, "{errs:#?}");
        let d = Config::check(&text).diagnostics;
        let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
        assert!(lines.windows(2).all(|w| w[0] <= w[1]), "in file order");
    }

    #[test]
    fn syntax_errors_are_all_reported_with_positions() {
        let errs = errors(
            "identity = \"/x\nlisten = 1.2.3\n[[tree]]\nname = \"a\"\nname = \"b\"\npath = /srv\n",
        );
        has(&errs, 1, 15, "");
        has(&errs, 2, 13, "");
        has(&errs, 5, 1, "duplicate key");
        has(&errs, 6, 8, "");
        // The recovered `listen` float is not reported a second time.
        assert!(
            !errs.iter().any(|e| e.2.contains("listen must be")),
            "{errs:#?}"
        );
    }

    #[test]
    fn warnings_do_not_fail_the_check() {
        let text = format!(
            r#"identity = "id"
listen = "0.0.0.0:1"
[[tree]]
name = "a"
path = "/a"
[[tree.allow]]
fingerprint = "{FP}"
push = true
[[tree]]
name = "b"
path = "/b"
[[tree.allow]]
fingerprint = "{FP2}"
"#
        );
        let c = Config::check(&text);
        assert!(c.config.is_some(), "{:#?}", c.diagnostics);
        let w: Vec<String> = c.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(c.errors(), 0);
        assert!(
            w[0].starts_with("1:12: warning: identity id is relative"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("12:1: warning: tree \"b\": allow #1: grants nothing"),
            "{w:?}"
        );
        // A sink tree nobody may reach is only a warning while another
        // sink tree admits someone; with none, it is an error.
        let lone =
            "identity = \"/id\"\nlisten = \"0.0.0.0:1\"\n[[tree]]\nname = \"a\"\npath = \"/a\"\n";
        let c = Config::check(lone);
        assert_eq!(c.errors(), 1, "{:#?}", c.diagnostics);
        assert!(c
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Warning
                && d.message.contains("no [[tree.allow]] entry")));
    }

    #[test]
    fn missing_keys_and_empty_files() {
        let errs = errors("");
        has(&errs, 1, 1, "missing key \"identity\"");
        has(&errs, 1, 1, "no [[tree]] table");
        let errs = errors("identity = \"/i\"\n[[tree]]\nrole = \"sink\"\n");
        has(&errs, 2, 1, "tree #1: missing key \"name\"");
        has(&errs, 2, 1, "tree #1: missing key \"path\"");
        let errs = errors(
            "identity = \"/i\"\n[[tree]]\nname = \"s\"\npath = \"/s\"\nrole = \"source\"\n[[tree.peer]]\nurl = \"quic://h:1/s\"\n",
        );
        has(
            &errs,
            6,
            1,
            "tree \"s\": peer #1: missing key \"fingerprint\"",
        );
    }

    /// dist/agent.example.toml documents every key: it must stay valid and
    /// hold both roles with every setting.
    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../../dist/agent.example.toml");
        let c = Config::check(text);
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let c = c.config.unwrap();
        assert!(c.listen.is_some() && c.control.is_some() && c.metrics.is_some());
        let s = c.sources().next().unwrap();
        assert!(s.state.is_some() && s.cache.is_some() && s.bandwidth_limit.is_some());
        let sink = &c.server().unwrap().trees[0];
        assert!(sink.state.is_some() && sink.allow.len() == 2);
        for key in ROOT_KEYS
            .iter()
            .chain(TREE_KEYS)
            .chain(SOURCE_KEYS)
            .chain(SINK_KEYS)
            .chain(PEER_KEYS)
            .chain(ALLOW_KEYS)
        {
            let set = text.lines().any(|l| {
                l.starts_with(&format!("{key} ="))
                    || l == format!("[[{key}]]")
                    || l == format!("[[tree.{key}]]")
            });
            assert!(set, "the example does not show {key}");
        }
    }

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("50MiB"), Ok(50 << 20));
        assert_eq!(parse_rate("50 MiB/s"), Ok(50 << 20));
        assert_eq!(parse_rate("1.5G"), Ok(3 << 29));
        assert_eq!(parse_rate("800KB"), Ok(800_000));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("10B").is_err());
        assert!(parse_rate("10Mbit").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1e400").is_err());
    }

    #[test]
    fn positions_count_chars() {
        assert_eq!(position("a\nbé c", 6), (2, 4));
        assert_eq!(position("", 0), (1, 1));
        assert_eq!(position("ab", 99), (1, 3));
    }

    #[test]
    fn parses_flags() {
        let (_, a) = parse_allow(&format!("{FP}:pull")).unwrap();
        assert!(a.pull && !a.push);
        let (_, a) = parse_allow(FP).unwrap();
        assert!(a.pull && a.push);
        assert!(parse_allow(&format!("{FP}:write")).is_err());
        assert!(parse_allow("xyz").is_err());
        assert_eq!(parse_tree("a=/x").unwrap().0, "a");
        assert!(parse_tree("a").is_err());
    }
}
