//! Mutual TLS on pinned certificates: a server accepts only clients whose
//! certificate fingerprint is allowed by some tree's ACL, and a client talks
//! only to the server fingerprint it pinned. Signatures are still verified
//! with the provider's algorithms, so possession of the key is proven.
//! Builds rustls and quinn configs, and the UDP sockets they run on
//! (sized to the route to the peer).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{Fingerprint, Identity};

/// ALPN of protocol version 1.
pub const ALPN: &[u8] = b"sync/1";
/// The name the client asks for; identity comes from the pinned fingerprint.
pub const SERVER_NAME: &str = "sync-agent";

/// The ring provider with TLS 1.3 AES-128-GCM first (ring's default puts
/// AES-256-GCM first): 10 AES rounds instead of 14 per block of every byte
/// either side sends, at 128-bit security. Both ends use this order, so it
/// is what they agree on; a peer that prefers another suite still gets it.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256.suite());
    Arc::new(p)
}

#[derive(Debug)]
struct Pinned {
    allowed: HashSet<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.allowed.contains(&Fingerprint::of(cert)) {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
    fn tls12(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn tls13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("quic crypto configuration: {0}")]
    Quic(String),
}

pub fn transport(payload: Option<u16>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Loopback and LAN mirrors move bulk data: allow deep windows.
    t.stream_receive_window((32u32 << 20).into());
    t.receive_window((128u32 << 20).into());
    t.send_window(128 << 20);
    t.max_concurrent_uni_streams(64u32.into());
    // Path MTU discovery: one probe straight at the usual 1452-byte upper
    // bound instead of a binary search from 1200 (four probes each way,
    // which alone were ~70% of the bytes of an unchanged sync). A path that
    // drops it stays at 1200.
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.minimum_change(200);
    // Like TCP's MSS, start at what the route to the peer carries and
    // never probe beyond it: a loopback or jumbo-frame link then takes far
    // fewer, larger packets (each costs a syscall, a header protection and
    // its share of acks). A narrower hop further on is found by black hole
    // detection, which falls back to 1200 and probes again.
    if let Some(p) = payload {
        t.initial_mtu(p);
        mtud.upper_bound(p);
        // Cubic's default first window (14,720 bytes) would not let one
        // such packet out: ten packets, as TCP's initial window.
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(10 * u64::from(p).max(1472));
        t.congestion_controller_factory(Arc::new(cubic));
        // quinn hands the kernel up to 10 datagrams per segmentation
        // offload send, which takes at most 64 KiB: a larger batch is
        // dropped whole (every one of its packets then counts as lost).
        if usize::from(p) * GSO_BATCH > GSO_MAX_BYTES {
            t.enable_segmentation_offload(false);
        }
    }
    t.mtu_discovery_config(Some(mtud));
    // A peer that died (SIGKILL, power loss) sends no close: notice it
    // within the idle timeout; keep-alives hold a quiet but healthy
    // connection (e.g. during a long commit) open.
    t.keep_alive_interval(Some(std::time::Duration::from_secs(4)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(20)).expect("in range"),
    ));
    Arc::new(t)
}

/// A server config that requires a client certificate in `allowed`.
pub fn server_config(
    id: &Identity,
    allowed: impl IntoIterator<Item = Fingerprint>,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        allowed: allowed.into_iter().collect(),
        provider: provider.clone(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(None));
    Ok(cfg)
}

/// A client config that presents `id` and trusts only `server`.
/// `payload`: the UDP payload the route to the server carries ([`route_payload`]).
pub fn client_config(
    id: &Identity,
    server: Fingerprint,
    payload: Option<u16>,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        allowed: [server].into_iter().collect(),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(payload));
    Ok(cfg)
}

/// The fingerprint of the certificate the peer presented.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(Fingerprint::of)
}

/// The largest UDP payload that the kernel's route to `peer` carries in one
/// IP packet (the interface's MTU or a path MTU it learnt, less the IP and
/// UDP headers), within QUIC's bounds; `None` when the kernel does not say.
pub fn route_payload(peer: SocketAddr) -> Option<u16> {
    use rustix::net::sockopt;
    let any: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(peer).ok()?;
    let (mtu, headers) = if peer.is_ipv4() {
        (sockopt::ip_mtu(&probe).ok()?, 28)
    } else {
        (sockopt::ipv6_mtu(&probe).ok()?, 48)
    };
    let payload = mtu.checked_sub(headers)?.min(u32::from(MAX_PAYLOAD));
    u16::try_from(payload).ok().filter(|&p| p >= 1200)
}

/// The largest UDP payload QUIC allows, which endpoints accept.
const MAX_PAYLOAD: u16 = 65_527;
/// Datagrams quinn puts in one segmentation offload send.
const GSO_BATCH: usize = 10;
/// The most UDP payload bytes one such send may carry (IPv4's limit).
const GSO_MAX_BYTES: usize = 65_507;

/// Socket buffers asked for on every QUIC endpoint: bulk transfers arrive
/// faster than one poll drains the default 208 KiB, and every datagram the
/// kernel drops is a loss to QUIC (retransmitted bytes, a halved window).
const UDP_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with large buffers (forced past
/// `net.core.rmem_max` when running as root; else as large as allowed).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(addr)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, UDP_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&socket, UDP_BUFFER);
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, UDP_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&socket, UDP_BUFFER);
    }
    Ok(socket)
}

/// A quinn endpoint on [`udp_socket`].
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_PAYLOAD)
        .expect("within QUIC's bounds");
    quinn::Endpoint::new(
        config,
        server,
        udp_socket(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_offered_first_and_the_rest_kept() {
        use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let ours = provider();
        let theirs = rustls::crypto::ring::default_provider();
        assert_eq!(
            ours.cipher_suites[0].suite(),
            TLS13_AES_128_GCM_SHA256.suite()
        );
        assert_eq!(ours.cipher_suites.len(), theirs.cipher_suites.len());
    }

    #[test]
    fn loopback_route_carries_large_datagrams() {
        let p = route_payload("127.0.0.1:9".parse().unwrap()).expect("loopback MTU known");
        // Loopback's MTU is 64 KiB on Linux (less IP and UDP headers).
        assert!(p > 16_000 && p <= MAX_PAYLOAD, "{p}");
    }

    /// A bulk transfer over loopback uses the route's packet size from the
    /// start and loses nothing: batches of segmentation offload larger than
    /// a send may carry would be dropped whole and end in black hole
    /// detection (back to 1200-byte packets).
    #[tokio::test]
    async fn bulk_data_goes_in_route_sized_packets_without_loss() {
        let d = tempfile::tempdir().unwrap();
        let server_id = Identity::generate(&d.path().join("s"), "s").unwrap();
        let client_id = Identity::generate(&d.path().join("c"), "c").unwrap();
        let server = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(server_config(&server_id, [client_id.fingerprint()]).unwrap()),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let payload = route_payload(addr);
        let mut client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        client.set_default_client_config(
            client_config(&client_id, server_id.fingerprint(), payload).unwrap(),
        );
        const LEN: usize = 32 << 20;
        let receiver = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut recv = conn.accept_uni().await.unwrap();
            let got = recv.read_to_end(LEN + 1).await.unwrap();
            (got.len(), conn)
        });
        let conn = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        let mut send = conn.open_uni().await.unwrap();
        let data = vec![7u8; LEN];
        for part in data.chunks(1 << 20) {
            send.write_all(part).await.unwrap();
        }
        send.finish().unwrap();
        let (got, server_conn) = receiver.await.unwrap();
        assert_eq!(got, LEN);
        let path = conn.stats().path;
        server_conn.close(0u32.into(), b"done");
        assert_eq!(path.black_holes_detected, 0, "{path:?}");
        assert_eq!(
            u32::from(path.current_mtu),
            u32::from(payload.unwrap()),
            "{path:?}"
        );
        let datagrams = conn.stats().udp_tx.datagrams;
        assert!(datagrams < (LEN / 8_000) as u64, "{datagrams} datagrams");
    }
}
