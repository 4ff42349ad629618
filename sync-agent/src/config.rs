//! Agent configuration: the trees an agent serves, where their state
//! lives, and which peer fingerprints may push to or pull each one. Built
//! from a TOML file or from `serve` flags. File IO only to read the file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::Fingerprint;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// What one peer may do with one tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub push: bool,
    pub pull: bool,
}

/// One served tree.
#[derive(Clone, Debug)]
pub struct TreeConfig {
    pub name: String,
    pub path: PathBuf,
    /// State directory (default: `.<name>.sync-state` beside the tree).
    pub state: Option<PathBuf>,
    pub allow: HashMap<Fingerprint, Access>,
}

/// The whole agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub identity: PathBuf,
    pub listen: SocketAddr,
    pub trees: Vec<TreeConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    identity: PathBuf,
    listen: SocketAddr,
    #[serde(default, rename = "tree")]
    trees: Vec<FileTree>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTree {
    name: String,
    path: PathBuf,
    state: Option<PathBuf>,
    #[serde(default)]
    allow: Vec<FileAllow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAllow {
    fingerprint: String,
    #[serde(default)]
    push: bool,
    #[serde(default)]
    pull: bool,
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
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let f: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut trees = Vec::new();
        for t in f.trees {
            let mut allow = HashMap::new();
            for a in t.allow {
                let fp = a
                    .fingerprint
                    .parse::<Fingerprint>()
                    .map_err(|e| ConfigError::Invalid(format!("tree {}: {e}", t.name)))?;
                let e: &mut Access = allow.entry(fp).or_default();
                e.push |= a.push;
                e.pull |= a.pull;
            }
            trees.push(TreeConfig {
                name: t.name,
                path: t.path,
                state: t.state,
                allow,
            });
        }
        let c = AgentConfig {
            identity: f.identity,
            listen: f.listen,
            trees,
        };
        c.validate()?;
        Ok(c)
    }

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

    #[test]
    fn parses_the_documented_file() {
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
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(c.trees.len(), 2);
        let fp: Fingerprint = FP.parse().unwrap();
        assert_eq!(
            c.trees[1].allow[&fp],
            Access {
                push: false,
                pull: true
            }
        );
        assert_eq!(c.allowed(), vec![fp]);
        assert!(AgentConfig::parse("identity = 1").is_err());
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
