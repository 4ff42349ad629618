//! What the CLI end-to-end tests share: a temp dir with a private
//! hash-cache home, so tests never touch `~/.cache`.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

use sync_tests::bins;

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `sync-cli ARGS` with the private cache home.
    pub fn cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command::new(bins::sync_cli())
            .args(args)
            .env("XDG_CACHE_HOME", self.path("xdg-cache"))
            .env_remove("RUST_LOG")
            .output()
            .expect("run sync-cli")
    }
}
