//! `sync-agent`: the long-running sync daemon.
fn main() {
    eprintln!("sync-agent: the QUIC receiver is not built yet");
    std::process::exit(2);
}
