//! Paths of the workspace's binaries for end-to-end tests and the benchmark
//! harness. A test in this crate cannot use `CARGO_BIN_EXE_*` for another
//! package's binary, so the first call builds them with cargo (once per
//! process, in the profile the caller was built with) and returns their
//! paths in the caller's own target directory. Does IO (spawns cargo).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `release` when the calling binary was built without debug assertions.
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// `.../target/<profile>/` derived from the running executable: a test
/// binary lives in `target/<profile>/deps/`, a `[[bin]]` in `target/<profile>/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable has a parent dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn workspace_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .join("Cargo.toml")
}

/// Runs `cargo build -p <pkgs>` in the caller's profile, into the caller's
/// target directory; panics with cargo's exit status if it fails.
fn cargo_build(pkgs: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = profile_dir()
        .parent()
        .expect("profile dir has a parent")
        .to_path_buf();
    let mut cmd = Command::new(cargo);
    // Variables cargo sets for this test crate would otherwise reach build
    // scripts (ring tracks CARGO_MANIFEST_DIR) and force a rebuild.
    for (k, _) in std::env::vars_os() {
        let per_package = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ];
        if k.to_str()
            .is_some_and(|k| per_package.iter().any(|p| k.starts_with(p)))
        {
            cmd.env_remove(k);
        }
    }
    cmd.arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(workspace_manifest())
        .arg("--target-dir")
        .arg(&target_dir);
    for p in pkgs {
        cmd.arg("-p").arg(p);
    }
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {pkgs:?}: {e}"));
    assert!(st.success(), "cargo build -p {pkgs:?} failed: {st}");
}

fn built(once: &'static OnceLock<()>, pkgs: &[&str], name: &str) -> PathBuf {
    once.get_or_init(|| cargo_build(pkgs));
    let p = profile_dir().join(name);
    assert!(p.is_file(), "{} missing after cargo build", p.display());
    p
}

/// `target/<profile>/sync-cli` (also builds `gen-tree`).
pub fn sync_cli() -> PathBuf {
    static ONCE: OnceLock<()> = OnceLock::new();
    built(&ONCE, &["sync-cli", "sync-tests"], "sync-cli")
}

/// `target/<profile>/gen-tree`.
pub fn gen_tree() -> PathBuf {
    sync_cli();
    profile_dir().join("gen-tree")
}

/// `target/<profile>/sync-agent`.
pub fn sync_agent() -> PathBuf {
    static ONCE: OnceLock<()> = OnceLock::new();
    built(&ONCE, &["sync-agent"], "sync-agent")
}

/// `sync-cli keygen --json --out DIR`: a fresh identity in `dir`; returns
/// its fingerprint (panics with sync-cli's message if it fails).
pub fn keygen(dir: &std::path::Path) -> String {
    let out = Command::new(sync_cli())
        .args(["keygen", "--json", "--out"])
        .arg(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run sync-cli keygen");
    assert!(
        out.status.success(),
        "sync-cli keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("keygen JSON");
    v["fingerprint"]
        .as_str()
        .expect("a fingerprint")
        .to_string()
}

/// `diff -r --no-dereference a b`: `None` when the trees are equal, else
/// what diff printed.
pub fn tree_diff(a: &std::path::Path, b: &std::path::Path) -> Option<String> {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run diff");
    (!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Whether `tool` runs (`tool --version` exits 0).
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
