//! One-shot client sessions against an agent: push a scanned tree to it,
//! or pull (restore) its committed snapshot into a local [`Receiver`].
//! Used by `sync-cli`; connects with a pinned server fingerprint.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint};
use sync_core::commit::{CommitOptions, Receiver};
use sync_core::safefs::Root;
use sync_core::session::{SinkOptions, SinkSession, SourceOptions, SourceSession, Summary};
use sync_core::wire::FrameDecoder;

use crate::driver::{
    drive_sink, drive_source, load_fetched_trees, DriveError, DriveOptions, LazyLocator, Link,
    SinkIo, SourceIo,
};
use crate::identity::{Fingerprint, Identity};
use crate::tls;

/// The agent string sent in `Hello`.
pub const CLIENT_AGENT: &str = concat!("sync-cli/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid address {0}: expected quic://HOST:PORT/TREE")]
    BadUrl(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot open a local UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// A parsed `quic://HOST:PORT/TREE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteUrl {
    pub host: String,
    pub port: u16,
    pub tree: String,
}

impl RemoteUrl {
    pub fn parse(s: &str) -> Result<RemoteUrl, ClientError> {
        let bad = || ClientError::BadUrl(s.to_string());
        let rest = s.strip_prefix("quic://").ok_or_else(bad)?;
        let (hostport, tree) = rest.split_once('/').ok_or_else(bad)?;
        let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || tree.is_empty() || tree.contains('/') {
            return Err(bad());
        }
        Ok(RemoteUrl {
            host: host.to_string(),
            port,
            tree: tree.to_string(),
        })
    }

    /// Resolve (blocking DNS) to the first address.
    pub fn resolve(&self) -> Result<SocketAddr, ClientError> {
        use std::net::ToSocketAddrs;
        let err = |source| ClientError::Resolve {
            host: self.host.clone(),
            source,
        };
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(std::io::Error::other("no address")))
    }
}

/// How a client session went, with the transport's byte counts.
#[derive(Debug)]
pub struct RemoteOutcome {
    pub result: Result<Summary, DriveError>,
    pub partial: Summary,
    /// UDP payload bytes sent and received by this end.
    pub wire_tx: u64,
    pub wire_rx: u64,
}

/// Connect with `id`, trusting only `peer`.
pub async fn connect(
    addr: SocketAddr,
    id: &Identity,
    peer: Fingerprint,
) -> Result<(Endpoint, Connection), ClientError> {
    connect_with(addr, config(addr, id, peer)?).await
}

/// The client config for `addr` (see [`tls::client_config`]).
pub fn config(
    addr: SocketAddr,
    id: &Identity,
    peer: Fingerprint,
) -> Result<quinn::ClientConfig, ClientError> {
    Ok(tls::client_config(id, peer, tls::route_payload(addr))?)
}

/// Connect with a config made by [`config`] (owned: can be spawned, e.g.
/// to shake hands while the source is scanned).
pub async fn connect_with(
    addr: SocketAddr,
    cfg: quinn::ClientConfig,
) -> Result<(Endpoint, Connection), ClientError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let mut endpoint = tls::endpoint(bind, None).map_err(ClientError::Socket)?;
    endpoint.set_default_client_config(cfg);
    let connecting =
        endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| ClientError::Connect {
                addr,
                reason: e.to_string(),
            })?;
    let conn = connecting.await.map_err(|e| ClientError::Connect {
        addr,
        reason: explain(&e.to_string()),
    })?;
    Ok((endpoint, conn))
}

/// How long a finished client lets its connection close go out.
const CLOSE_GRACE: Duration = Duration::from_millis(20);

fn explain(reason: &str) -> String {
    if reason.contains("certificate") || reason.contains("Certificate") {
        format!("{reason} (the server's certificate does not match --peer, or the server does not know this client's certificate)")
    } else {
        reason.to_string()
    }
}

async fn finish(
    endpoint: Endpoint,
    conn: Connection,
    outcome: crate::driver::DriveOutcome,
) -> RemoteOutcome {
    let stats = conn.stats();
    conn.close(0u32.into(), b"done");
    tracing::debug!(?stats, "connection closed");
    // Wait until the close packet is out (the connection's driver sends it
    // on its next turn), not for the whole draining period (3 PTO: ~80 ms
    // even on loopback), which only delayed the exit. A closed connection
    // sends nothing else: the first datagram counted after `stats` is it.
    let deadline = Instant::now() + CLOSE_GRACE;
    while conn.stats().udp_tx.datagrams == stats.udp_tx.datagrams && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(endpoint);
    let result = outcome.result.map_err(|e| match e {
        DriveError::Lost(m) => DriveError::Lost(explain(&m)),
        other => other,
    });
    RemoteOutcome {
        result,
        partial: outcome.partial,
        wire_tx: stats.udp_tx.bytes,
        wire_rx: stats.udp_rx.bytes,
    }
}

/// Push the snapshot `locator` describes (a scan of `src`) to the agent's
/// tree `tree`.
pub async fn push(
    addr: SocketAddr,
    tree: &str,
    id: &Identity,
    peer: Fingerprint,
    locator: Arc<LazyLocator>,
    src: &Path,
    opts: DriveOptions,
) -> Result<RemoteOutcome, ClientError> {
    let (endpoint, conn) = connect(addr, id, peer).await?;
    push_on(endpoint, conn, addr, tree, locator, src, opts).await
}

/// [`push`] on a connection already made (by [`connect_with`]).
pub async fn push_on(
    endpoint: Endpoint,
    conn: Connection,
    addr: SocketAddr,
    tree: &str,
    locator: Arc<LazyLocator>,
    src: &Path,
    opts: DriveOptions,
) -> Result<RemoteOutcome, ClientError> {
    let session = SourceSession::client(
        tree,
        CLIENT_AGENT,
        locator.manifest().clone(),
        SourceOptions::default(),
        Instant::now(),
    )
    .map_err(|e| ClientError::Setup(e.to_string()))?;
    let root = Root::open(src).map_err(|e| ClientError::Setup(e.to_string()))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| ClientError::Connect {
        addr,
        reason: explain(&e.to_string()),
    })?;
    let span = tracing::info_span!("session", %tree, dir = "push", root = tracing::field::Empty);
    let io = SourceIo {
        root: Arc::new(root),
        locator,
    };
    let link = Link {
        conn: conn.clone(),
        control_send: send,
        control_recv: recv,
        decoder: FrameDecoder::new(),
    };
    let out = tracing::Instrument::instrument(drive_source(session, io, link, opts), span).await;
    Ok(finish(endpoint, conn, out).await)
}

/// Pull the agent's tree `tree` into `recv` (restore).
pub async fn pull(
    addr: SocketAddr,
    tree: &str,
    id: &Identity,
    peer: Fingerprint,
    recv: Receiver,
    commit: CommitOptions,
    opts: DriveOptions,
) -> Result<RemoteOutcome, ClientError> {
    let state = recv.state_dir().to_path_buf();
    let seeds = tokio::task::spawn_blocking(move || load_fetched_trees(&state))
        .await
        .unwrap_or_default();
    let mut session = SinkSession::client(
        tree,
        CLIENT_AGENT,
        Some(recv.committed().clone()),
        SinkOptions::default(),
        Instant::now(),
    )
    .map_err(|e| ClientError::Setup(e.to_string()))?;
    session.seed_trees(seeds.clone());
    let (endpoint, conn) = connect(addr, id, peer).await?;
    let (send, crecv) = conn.open_bi().await.map_err(|e| ClientError::Connect {
        addr,
        reason: explain(&e.to_string()),
    })?;
    let span = tracing::info_span!("session", %tree, dir = "pull", root = tracing::field::Empty);
    let io = SinkIo {
        recv: Arc::new(Mutex::new(recv)),
        commit,
        seeded: seeds,
    };
    let link = Link {
        conn: conn.clone(),
        control_send: send,
        control_recv: crecv,
        decoder: FrameDecoder::new(),
    };
    let out = tracing::Instrument::instrument(drive_sink(session, io, link, opts), span).await;
    Ok(finish(endpoint, conn, out).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = RemoteUrl::parse("quic://127.0.0.1:7443/rdo").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tree.as_str()),
            ("127.0.0.1", 7443, "rdo")
        );
        let u = RemoteUrl::parse("quic://[::1]:9/t").unwrap();
        assert_eq!(u.host, "::1");
        for bad in [
            "127.0.0.1:1/t",
            "quic://h/t",
            "quic://h:1/",
            "quic://h:x/t",
            "quic://h:1/a/b",
        ] {
            assert!(RemoteUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
