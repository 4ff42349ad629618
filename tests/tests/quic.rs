//! End-to-end tests of push and restore over QUIC on 127.0.0.1 with the
//! real `sync-agent` and `sync-cli` binaries, real certificates and fresh
//! temp dirs: trees compared with `diff -r` and by lstat, ACLs and pinned
//! fingerprints, hostile raw QUIC clients, and resume after a SIGKILL.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sync_agent::client::connect;
use sync_agent::identity::{Fingerprint, Identity};
use sync_core::chunk::chunk_spans;
use sync_core::manifest::{Entry, Kind, Tree};
use sync_core::wire::{encode, Direction, ErrorCode, Frame, FrameDecoder, FrameType, MAX_FRAME};
use sync_core::TreeId;
use sync_tests::bins;
use sync_tests::edge::create_edge_tree;
use sync_tests::gen::{DlrnSpec, DlrnTree};

const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// The nested `cargo build` of [`bins`] must not inherit the variables
/// cargo set for this test: ring's build script tracks
/// `CARGO_MANIFEST_DIR`, so an inherited one rebuilds the TLS stack and
/// everything above it on every run (a minute or two).
fn clean_cargo_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let keep = ["CARGO", "CARGO_HOME", "CARGO_TARGET_DIR"];
        for (k, _) in std::env::vars_os() {
            let Some(k) = k.to_str() else { continue };
            if k.starts_with("CARGO_") && !keep.contains(&k) {
                std::env::remove_var(k);
            }
        }
    });
}

fn sync_cli() -> PathBuf {
    clean_cargo_env();
    bins::sync_cli()
}

fn sync_agent() -> PathBuf {
    clean_cargo_env();
    bins::sync_agent()
}

// ------------------------------------------------------------ processes

/// A running agent, killed when dropped.
struct Agent {
    child: Child,
    addr: String,
    fp: String,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(work: &Path, args: &[OsString]) -> Agent {
        let log = work.join(format!("agent-{}.log", rand_suffix()));
        let mut child = Command::new(sync_agent())
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sync-agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let parts: Vec<&str> = line.split_whitespace().collect();
        let mut agent = Agent {
            child,
            addr: String::new(),
            fp: String::new(),
            log,
        };
        match parts.as_slice() {
            ["listening", "on", addr, "fingerprint", fp] => {
                agent.addr = addr.to_string();
                agent.fp = fp.to_string();
            }
            _ => panic!(
                "agent did not get ready: {line:?}\n{}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            ),
        }
        agent
    }

    fn url(&self, tree: &str) -> String {
        format!("quic://{}/{tree}", self.addr)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Run a command with a deadline, killing it if it overruns.
fn run(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command {cmd:?} timed out\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(work: &Path, args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new(sync_cli());
    cmd.args(args).env("XDG_CACHE_HOME", work.join("cache"));
    run(cmd)
}

/// `sync-cli keygen --out DIR --json` -> fingerprint.
fn keygen(work: &Path, name: &str) -> (PathBuf, String) {
    let dir = work.join(name);
    let fp = sync_tests::bins::keygen(&dir);
    (dir, fp)
}

struct Client<'a> {
    work: &'a Path,
    id: &'a Path,
    peer: &'a str,
}

impl Client<'_> {
    fn push(&self, src: &Path, url: &str) -> Output {
        cli(
            self.work,
            &[
                "push".as_ref(),
                src.as_os_str(),
                url.as_ref(),
                "--identity".as_ref(),
                self.id.as_os_str(),
                "--peer".as_ref(),
                self.peer.as_ref(),
                "--json".as_ref(),
            ],
        )
    }

    fn restore(&self, url: &str, dest: &Path) -> Output {
        cli(
            self.work,
            &[
                "restore".as_ref(),
                url.as_ref(),
                dest.as_os_str(),
                "--identity".as_ref(),
                self.id.as_os_str(),
                "--peer".as_ref(),
                self.peer.as_ref(),
                "--json".as_ref(),
            ],
        )
    }
}

fn ok_json(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: bad json: {e}"))
}

fn serve_args(id: &Path, trees: &[(&str, &Path)], allow: &[String]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--identity".into(),
        id.into(),
    ];
    for (name, path) in trees {
        let mut t = OsString::from(format!("{name}="));
        t.push(path.as_os_str());
        a.push("--tree".into());
        a.push(t);
    }
    for al in allow {
        a.push("--allow".into());
        a.push(al.into());
    }
    a
}

// ------------------------------------------------------------ comparing

/// What lstat says about one path (the hard-link group is compared apart).
#[derive(Debug, PartialEq, Eq)]
enum Node {
    File { mode: u32, mtime_ns: i64, size: u64 },
    Dir { mode: u32, mtime_ns: i64 },
    Symlink { target: Vec<u8>, mtime_ns: i64 },
    Other { mode: u32 },
}

/// Every path's node, and the hard-link groups (paths sharing an inode).
type Listing = (BTreeMap<Vec<u8>, Node>, BTreeSet<BTreeSet<Vec<u8>>>);

fn walk(root: &Path) -> Listing {
    let mut nodes = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), BTreeSet<Vec<u8>>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let mtime_ns = m.mtime() * 1_000_000_000 + m.mtime_nsec();
            let ft = m.file_type();
            let node = if ft.is_symlink() {
                Node::Symlink {
                    target: std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                    mtime_ns,
                }
            } else if ft.is_dir() {
                stack.push(p.clone());
                Node::Dir {
                    mode: m.mode(),
                    mtime_ns,
                }
            } else if ft.is_file() {
                inodes
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .insert(rel.clone());
                Node::File {
                    mode: m.mode(),
                    mtime_ns,
                    size: m.len(),
                }
            } else {
                Node::Other { mode: m.mode() }
            };
            nodes.insert(rel, node);
        }
    }
    let groups = inodes.into_values().filter(|g| g.len() > 1).collect();
    (nodes, groups)
}

fn assert_same(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(a)
        .arg(b)
        .output()
        .expect("diff");
    assert!(
        out.status.success(),
        "diff -r {} {}:\n{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    let (na, ga) = walk(a);
    let (nb, gb) = walk(b);
    assert!(!na.is_empty(), "{} is empty", a.display());
    for (k, v) in &na {
        assert_eq!(
            Some(v),
            nb.get(k),
            "{} differs between {} and {}",
            String::from_utf8_lossy(k),
            a.display(),
            b.display()
        );
    }
    assert_eq!(na.len(), nb.len(), "entry counts differ");
    assert_eq!(ga, gb, "hard-link groups differ");
}

/// Distinct chunk bytes of a tree, as the sync engine cuts it.
fn unique_bytes(root: &Path) -> u64 {
    let m = sync_core::scan::scan(root, &sync_core::scan::ScanOptions::default())
        .unwrap()
        .manifest;
    let mut seen = HashSet::new();
    let mut total = 0u64;
    m.walk(|_, e| {
        if let Kind::File { size, hash, chunks } = &e.kind {
            for (id, _, len) in chunk_spans(*size, *hash, chunks) {
                if seen.insert(id) {
                    total += len as u64;
                }
            }
        }
        true
    })
    .unwrap();
    total
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none())
}

// ------------------------------------------------------------ tests

#[test]
fn push_and_restore_dlrn_and_edge_trees() {
    clean_cargo_env();
    let t = tempfile::tempdir().unwrap();
    let w = t.path();
    let (srv, _) = keygen(w, "srv");
    let (cid, cfp) = keygen(w, "cli");
    let (src, mirror, restored) = (w.join("src"), w.join("mirror"), w.join("restored"));
    let (esrc, emirror, erestored) = (w.join("esrc"), w.join("emirror"), w.join("erestored"));
    let agent = Agent::start(
        w,
        &serve_args(&srv, &[("dlrn", &mirror), ("edge", &emirror)], &[cfp]),
    );
    let c = Client {
        work: w,
        id: &cid,
        peer: &agent.fp,
    };

    let mut tree = DlrnTree::create(&src, DlrnSpec::quick()).unwrap();
    let mut prev_sent = u64::MAX;
    for step in 0..3 {
        if step > 0 {
            tree.evolve(2).unwrap();
        }
        let p = ok_json(&c.push(&src, &agent.url("dlrn")), "push");
        assert_eq!(p["ok"], true);
        assert!(p["wire_bytes"].as_u64().unwrap() > 0);
        let sent = p["bytes_sent"].as_u64().unwrap();
        if step > 0 {
            assert!(
                sent < prev_sent,
                "step {step}: an evolve resent {sent} bytes"
            );
        }
        prev_sent = sent;
        assert_same(&src, &mirror);
        let r = ok_json(&c.restore(&agent.url("dlrn"), &restored), "restore");
        assert_eq!(r["root"], p["root"]);
        assert_same(&src, &restored);
        assert_same(&mirror, &restored);
    }
    // Nothing changed: nothing moves.
    let again = ok_json(&c.push(&src, &agent.url("dlrn")), "push again");
    assert_eq!(again["unchanged"], true);
    assert_eq!(again["bytes_sent"], 0);

    create_edge_tree(&esrc).unwrap();
    let p = ok_json(&c.push(&esrc, &agent.url("edge")), "edge push");
    // Regular files, each hard-linked name counted, as `scan` counts them.
    let scanned = ok_json(
        &cli(
            c.work,
            &["scan".as_ref(), "--json".as_ref(), esrc.as_os_str()],
        ),
        "edge scan",
    );
    assert!(scanned["hardlinks"].as_u64().unwrap() > 0, "{scanned}");
    assert_eq!(p["files"], scanned["files"], "{p}");
    assert_same(&esrc, &emirror);
    let r = ok_json(&c.restore(&agent.url("edge"), &erestored), "edge restore");
    assert_eq!(r["root"], p["root"]);
    assert!(r["bytes_received"].as_u64().unwrap() > 0);
    assert_same(&esrc, &erestored);
    assert_same(&emirror, &erestored);
}

#[test]
fn certificates_and_acls_are_enforced() {
    clean_cargo_env();
    let t = tempfile::tempdir().unwrap();
    let w = t.path();
    let (srv, _) = keygen(w, "srv");
    let (a_id, a_fp) = keygen(w, "a");
    let (b_id, b_fp) = keygen(w, "b");
    let (x_id, x_fp) = keygen(w, "stranger");
    let src = w.join("src");
    let mirror = w.join("mirror");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/file"), b"payload".repeat(1000)).unwrap();
    std::os::unix::fs::symlink("d/file", src.join("link")).unwrap();
    let agent = Agent::start(
        w,
        &serve_args(
            &srv,
            &[("t", &mirror)],
            &[a_fp.clone(), format!("{b_fp}:pull")],
        ),
    );

    // An unknown certificate is refused in the handshake: nothing arrives.
    let stranger = Client {
        work: w,
        id: &x_id,
        peer: &agent.fp,
    };
    let out = stranger.push(&src, &agent.url("t"));
    assert!(!out.status.success());
    assert!(dir_is_empty(&mirror), "a stranger's push changed the tree");
    let out = stranger.restore(&agent.url("t"), &w.join("stolen"));
    assert!(!out.status.success());
    assert!(dir_is_empty(&w.join("stolen")));

    // Pinning the wrong server fingerprint: the client refuses to talk.
    let wrong = Client {
        work: w,
        id: &a_id,
        peer: &x_fp,
    };
    let out = wrong.push(&src, &agent.url("t"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    assert!(dir_is_empty(&mirror));

    // Allowed to push.
    let a = Client {
        work: w,
        id: &a_id,
        peer: &agent.fp,
    };
    ok_json(&a.push(&src, &agent.url("t")), "push by a");
    assert_same(&src, &mirror);

    // Pull-only: may not push (typed refusal, exit 1), may restore.
    let b = Client {
        work: w,
        id: &b_id,
        peer: &agent.fp,
    };
    std::fs::write(src.join("d/new"), b"new").unwrap();
    let out = b.push(&src, &agent.url("t"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unauthorized"), "{err}");
    assert!(!mirror.join("d/new").exists());
    std::fs::remove_file(src.join("d/new")).unwrap();
    ok_json(
        &b.restore(&agent.url("t"), &w.join("restored")),
        "restore by b",
    );
    assert_same(&mirror, &w.join("restored"));

    // An unknown tree is named as such.
    let out = a.push(&src, &agent.url("nope"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown tree"));
}

/// What a raw client answers to the server's first frame.
type Reply = Box<dyn FnOnce(Frame) -> Option<Vec<u8>> + Send>;

/// A raw QUIC client with an allowed identity: sends `frames` bytes on a
/// fresh control stream and returns the first frame the server answers
/// with (None if the stream or connection just ended).
async fn raw_exchange(
    addr: std::net::SocketAddr,
    id: &Identity,
    server: Fingerprint,
    script: impl FnOnce(Vec<u8>) -> Vec<u8>,
    then: Option<Reply>,
) -> Vec<Frame> {
    let (endpoint, conn) = connect(addr, id, server).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&script(Vec::new())).await.unwrap();
    let mut then = then;
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        while let Ok(Some(f)) = dec.next_frame() {
            let is_error = matches!(f, Frame::Error { .. });
            if let Some(t) = then.take() {
                if let Some(bytes) = t(f.clone()) {
                    let _ = send.write_all(&bytes).await;
                }
            }
            got.push(f);
            if is_error {
                conn.close(0u32.into(), b"");
                endpoint.wait_idle().await;
                return got;
            }
        }
        match tokio::time::timeout_at(deadline, recv.read_chunk(1 << 20, true)).await {
            Ok(Ok(Some(c))) => {
                if dec.push(&c.bytes).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    conn.close(0u32.into(), b"");
    endpoint.wait_idle().await;
    got
}

fn hello(tree: &str) -> Frame {
    Frame::Hello {
        version: sync_core::wire::PROTOCOL_VERSION,
        tree: tree.into(),
        direction: Direction::Push,
        client_agent: "raw-test".into(),
    }
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error { code, .. } => Some(*code),
        _ => None,
    })
}

#[test]
fn hostile_clients_get_typed_errors_and_the_server_keeps_serving() {
    clean_cargo_env();
    let t = tempfile::tempdir().unwrap();
    let w = t.path();
    let (srv, _) = keygen(w, "srv");
    let (cid, cfp) = keygen(w, "cli");
    let src = w.join("src");
    let mirror = w.join("mirror");
    std::fs::create_dir_all(&src).unwrap();
    let agent = Agent::start(w, &serve_args(&srv, &[("t", &mirror)], &[cfp]));
    let c = Client {
        work: w,
        id: &cid,
        peer: &agent.fp,
    };
    let id = Identity::load(&cid).unwrap();
    let server: Fingerprint = agent.fp.parse().unwrap();
    let addr: std::net::SocketAddr = agent.addr.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut round = 0;
    let mut normal_push = |tag: &str| {
        round += 1;
        std::fs::write(src.join(format!("f{round}")), format!("{tag} {round}")).unwrap();
        ok_json(&c.push(&src, &agent.url("t")), tag);
        assert_same(&src, &mirror);
    };

    // Unknown frame type.
    let got = rt.block_on(raw_exchange(
        addr,
        &id,
        server,
        |_| vec![0, 0, 0, 0, 99],
        None,
    ));
    assert_eq!(error_code(&got), Some(ErrorCode::Protocol), "{got:?}");
    normal_push("after an unknown frame type");

    // A length beyond the limit, refused on the header.
    let got = rt.block_on(raw_exchange(
        addr,
        &id,
        server,
        |_| {
            let mut b = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
            b.push(FrameType::Hello as u8);
            b
        },
        None,
    ));
    assert_eq!(error_code(&got), Some(ErrorCode::TooLarge), "{got:?}");
    normal_push("after an oversized length");

    // Chunks before the Offer.
    let got = rt.block_on(raw_exchange(
        addr,
        &id,
        server,
        |_| {
            let mut b = encode(&hello("t"));
            b.extend(encode(&Frame::Chunks {
                chunks: vec![(sync_core::ChunkId::of(b"x"), b"x".to_vec())],
            }));
            b
        },
        None,
    ));
    assert_eq!(error_code(&got), Some(ErrorCode::Protocol), "{got:?}");
    normal_push("after chunks before the offer");

    // A manifest naming `..` (its id matches its bytes).
    let tree = Tree {
        entries: vec![Entry {
            name: b"..".to_vec(),
            mode: 0o777,
            mtime_ns: 0,
            uid: 0,
            gid: 0,
            kind: Kind::Symlink {
                target: b"/etc".to_vec(),
            },
        }],
    };
    let bytes = tree.encode();
    let tid = TreeId::of(&bytes);
    let got = rt.block_on(raw_exchange(
        addr,
        &id,
        server,
        move |_| {
            let mut b = encode(&hello("t"));
            b.extend(encode(&Frame::Offer { root: tid.into() }));
            b
        },
        Some(Box::new(move |f| match f {
            Frame::Welcome { .. } => Some(encode(&Frame::Trees {
                trees: vec![(tid, bytes)],
            })),
            _ => None,
        })),
    ));
    assert_eq!(error_code(&got), Some(ErrorCode::BadData), "{got:?}");
    assert!(!w.join("etc").exists() && !mirror.join("..").join("etc").exists());
    normal_push("after a `..` manifest");

    // Busy: a raw client holds the tree (Hello + Offer, then silence) while
    // a normal push arrives.
    let (endpoint, conn) = rt.block_on(connect(addr, &id, server)).unwrap();
    let (mut send, mut recv) = rt.block_on(conn.open_bi()).unwrap();
    let mut b = encode(&hello("t"));
    b.extend(encode(&Frame::Offer {
        root: sync_core::SnapshotId([7; 32]),
    }));
    rt.block_on(send.write_all(&b)).unwrap();
    // Wait for the Welcome: the lock is taken by then.
    let mut dec = FrameDecoder::new();
    let welcome = rt.block_on(async {
        loop {
            if let Ok(Some(f)) = dec.next_frame() {
                return f;
            }
            let c = recv.read_chunk(1 << 16, true).await.unwrap().unwrap();
            dec.push(&c.bytes).unwrap();
        }
    });
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    std::fs::write(src.join("busy"), b"b").unwrap();
    let out = c.push(&src, &agent.url("t"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    conn.close(0u32.into(), b"");
    rt.block_on(endpoint.wait_idle());
    // The lock is released once the server notices the close.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = c.push(&src, &agent.url("t"));
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "tree stayed busy");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_same(&src, &mirror);
    drop(agent);
}

#[test]
fn a_killed_receiver_resumes_without_resending() {
    clean_cargo_env();
    let t = tempfile::tempdir().unwrap();
    let w = t.path();
    let (srv, _) = keygen(w, "srv");
    let (cid, cfp) = keygen(w, "cli");
    let src = w.join("src");
    let mirror = w.join("mirror");
    let spec = DlrnSpec {
        scale: 1.0,
        ..DlrnSpec::quick()
    };
    DlrnTree::create(&src, spec).unwrap();
    let unique = unique_bytes(&src);
    assert!(unique > 10 << 20, "tree too small: {unique}");
    let args = serve_args(&srv, &[("t", &mirror)], &[cfp]);
    let mut agent = Agent::start(w, &args);
    // Staged bytes: the pack, and the chunks that are whole files, linked
    // beside it.
    let staging = w.join(".mirror.sync-state/staging");
    let staged = || {
        let linked: u64 = std::fs::read_dir(staging.join("linked"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        std::fs::metadata(staging.join("pack")).map_or(0, |m| m.len()) + linked
    };

    // Push in the background; kill the agent once a third has been staged.
    let mut cmd = Command::new(sync_cli());
    cmd.args(["push".as_ref(), src.as_os_str(), agent.url("t").as_ref()])
        .arg("--identity")
        .arg(&cid)
        .args(["--peer", &agent.fp, "--json"])
        .env("XDG_CACHE_HOME", w.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let first = cmd.spawn().unwrap();
    let deadline = Instant::now() + CMD_TIMEOUT;
    let staged_at_kill = loop {
        if staged() >= unique / 3 {
            agent.kill();
            break staged();
        }
        assert!(Instant::now() < deadline, "the push never got a third in");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(dir_is_empty(&mirror) || !mirror.join("current").exists());
    let killed = Instant::now();
    // Restart on the same tree and state; push again.
    let agent = Agent::start(w, &args);
    let c = Client {
        work: w,
        id: &cid,
        peer: &agent.fp,
    };
    let p = ok_json(&c.push(&src, &agent.url("t")), "resumed push");
    let resent = p["bytes_sent"].as_u64().unwrap();
    assert!(
        resent + staged_at_kill < unique + unique / 10,
        "staged {staged_at_kill} before the kill, sent {resent} after, for {unique} unique bytes"
    );
    assert!(
        resent < unique - unique / 4,
        "nothing was reused: {resent} of {unique}"
    );
    assert_same(&src, &mirror);

    // The cut client notices the dead agent by the QUIC idle timeout and
    // still reports its counters. Under loss that can take longer than
    // this test wants to wait: then it is killed and not judged.
    let mut first = first;
    while first.try_wait().unwrap().is_none() && killed.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if first.try_wait().unwrap().is_none() {
        eprintln!("note: the cut client had not noticed the dead agent after 25 s");
        let _ = first.kill();
        let _ = first.wait();
        return;
    }
    let out = first.wait_with_output().unwrap();
    assert!(!out.status.success(), "the cut push reported success");
    let partial: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(partial["ok"], false);
    assert!(partial["bytes_sent"].as_u64().unwrap() >= staged_at_kill / 2);
}
