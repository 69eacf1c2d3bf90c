//! QUIC endpoints (quinn on tokio) for the control plane and the CPU data plane.
//!
//! Trust model: every server (the coordinator, and each worker's data-plane endpoint) makes a
//! fresh self-signed certificate; clients pin its SHA-256 fingerprint instead of trusting a CA,
//! so a peer with another certificate is refused during the handshake. Clients prove membership
//! of the job by presenting the job token as their first message. Keep-alives and an idle timeout
//! turn a dead or cut-off peer into a connection error within `Timeouts::idle`.

use crate::wire::ALPN;
use crate::{Error, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Name the certificates are issued for; not checked (the fingerprint is).
const SERVER_NAME: &str = "fsmerge";

/// A self-signed certificate, its key and its fingerprint.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    pub fingerprint: String,
}

impl Identity {
    pub fn generate() -> Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| Error::Protocol(format!("generating a certificate: {e}")))?;
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der());
        let fingerprint = fingerprint(&cert);
        Ok(Self {
            cert,
            key,
            fingerprint,
        })
    }
}

/// SHA-256 of a certificate's DER, lower-case hex.
pub fn fingerprint(cert: &[u8]) -> String {
    hex(&Sha256::digest(cert))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random 128-bit job token, hex.
pub fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    hex(&bytes)
}

/// Compare tokens in time independent of where they differ.
pub fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Liveness settings of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A connection with no packet for this long is dead.
    pub idle: Duration,
    /// Keep-alive interval (well under `idle`).
    pub keep_alive: Duration,
}

fn transport(t: Timeouts) -> Result<Arc<quinn::TransportConfig>> {
    let mut tc = quinn::TransportConfig::default();
    tc.max_idle_timeout(Some(
        t.idle
            .try_into()
            .map_err(|e| Error::Protocol(format!("idle timeout {:?}: {e}", t.idle)))?,
    ));
    tc.keep_alive_interval(Some(t.keep_alive));
    // Gradients and activations are sent as single large frames; open the windows wide.
    tc.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    tc.receive_window(quinn::VarInt::from_u32(256 << 20));
    tc.send_window(256 << 20);
    Ok(Arc::new(tc))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// UDP socket buffer size requested (bytes).
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP endpoint on `bind` with large socket buffers.
fn endpoint(bind: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let err = |msg: String| Error::Peer {
        peer: bind.to_string(),
        msg,
    };
    let cfg = quinn::EndpointConfig::default();
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| err(format!("cannot bind: {e}")))?;
    // A gradient exchange is a burst of hundreds of KB; with the default ~200 KB socket buffers
    // the burst overflows them and QUIC's loss recovery costs milliseconds. The kernel caps the
    // request at net.core.{r,w}mem_max.
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| err("no async runtime (QUIC needs tokio)".into()))?;
    quinn::Endpoint::new(cfg, server, socket, runtime)
        .map_err(|e| err(format!("cannot open a QUIC endpoint: {e}")))
}

/// An endpoint that accepts connections (and can also dial out) on `bind`.
pub fn server(bind: SocketAddr, id: &Identity, t: Timeouts) -> Result<quinn::Endpoint> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Protocol(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(
            vec![id.cert.clone()],
            PrivateKeyDer::Pkcs8(id.key.clone_key()),
        )
        .map_err(|e| Error::Protocol(format!("TLS certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Protocol(format!("QUIC server config: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(t)?);
    endpoint(bind, Some(cfg))
}

/// An endpoint that only dials out.
pub fn client() -> Result<quinn::Endpoint> {
    endpoint(SocketAddr::from(([0, 0, 0, 0], 0)), None)
}

/// Dial `addr` from `endpoint`, accepting only a server whose certificate has `fingerprint`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    fingerprint: &str,
    t: Timeouts,
) -> Result<quinn::Connection> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Protocol(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert {
            fingerprint: fingerprint.to_ascii_lowercase(),
            provider: provider(),
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Protocol(format!("QUIC client config: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(t)?);
    let peer = |msg: String| Error::Peer {
        peer: addr.to_string(),
        msg,
    };
    endpoint
        .connect_with(cfg, addr, SERVER_NAME)
        .map_err(|e| peer(format!("cannot connect: {e}")))?
        .await
        .map_err(|e| peer(format!("connection failed: {e}")))
}

/// Accepts exactly the certificate with the pinned fingerprint (and checks its handshake
/// signatures, so the peer must hold the matching key).
#[derive(Debug)]
struct PinnedCert {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if token_matches(&got, &self.fingerprint) {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(
                "refused a peer whose certificate fingerprint {got} is not the expected {}",
                self.fingerprint
            );
            Err(rustls::Error::General(format!(
                "certificate fingerprint {got} does not match the expected {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Resolve `host:port` (names included) to one socket address.
pub fn resolve_addr(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| Error::Peer {
            peer: addr.to_string(),
            msg: format!("cannot resolve: {e}"),
        })?
        .next()
        .ok_or_else(|| Error::Peer {
            peer: addr.to_string(),
            msg: "resolves to no address".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, Message};

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(5),
        keep_alive: Duration::from_millis(500),
    };

    #[tokio::test]
    async fn pinned_connection_works_and_a_wrong_fingerprint_is_refused() {
        let id = Identity::generate().unwrap();
        let server = server("127.0.0.1:0".parse().unwrap(), &id, T).unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
            let m = wire::recv(&mut rx).await.unwrap().unwrap();
            wire::send(&mut tx, &m).await.unwrap();
            tx.finish().unwrap();
            conn.closed().await;
        });
        let ep = client().unwrap();
        let conn = connect(&ep, addr, &id.fingerprint, T).await.unwrap();
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        wire::send(&mut tx, &Message::Shutdown).await.unwrap();
        assert_eq!(wire::recv(&mut rx).await.unwrap(), Some(Message::Shutdown));
        conn.close(0u32.into(), b"done");

        let other = Identity::generate().unwrap();
        let e = connect(&ep, addr, &other.fingerprint, T)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("fingerprint") || e.contains("failed"), "{e}");
        accept.abort();
    }

    #[test]
    fn tokens_compare() {
        let t = random_token();
        assert_eq!(t.len(), 32);
        assert!(token_matches(&t, &t.clone()));
        assert!(!token_matches(&t, &random_token()));
        assert!(!token_matches("ab", "abc"));
    }
}
