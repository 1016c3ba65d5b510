//! Identities and key pinning for punch.
//!
//! Every server and agent owns a persistent Ed25519 key. Its TLS certificate
//! is self-signed and derived from that key, so trust is in the key, not in
//! a CA: agents pin the server by the SHA-256 fingerprint of its public key,
//! and peers pin each other by the raw key that the server vouched for in
//! the offer. The verifiers here still check the TLS handshake signature, so
//! a certificate that merely names a key proves nothing without the key.

use hmac::{Hmac, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub mod tcp;

/// Raw Ed25519 public key.
pub type PublicKey = [u8; 32];

/// Errors from identities and TLS set-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is not a valid Ed25519 PKCS#8 PEM key: {reason}")]
    BadKey { path: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Cert(String),
    #[error("TLS configuration failed: {0}")]
    Config(String),
    #[error("invalid fingerprint {0:?}: expected 64 hex digits (SHA-256)")]
    BadFingerprint(String),
}

/// Label for the TLS exporter that binds the token proof to one connection.
pub const TOKEN_PROOF_LABEL: &[u8] = b"EXPORTER-punch-token-proof";

/// A persistent Ed25519 identity.
pub struct Identity {
    pkcs8: Vec<u8>,
    public: PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            pkcs8: self.pkcs8.clone(),
            public: self.public,
        }
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Result<Self, TlsError> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| TlsError::Cert(e.to_string()))?;
        Self::from_keypair(&kp)
    }

    fn from_keypair(kp: &rcgen::KeyPair) -> Result<Self, TlsError> {
        let raw = kp.public_key_raw();
        let public: PublicKey = raw
            .try_into()
            .map_err(|_| TlsError::Cert("not an Ed25519 key".into()))?;
        Ok(Identity {
            pkcs8: kp.serialize_der(),
            public,
        })
    }

    /// The identity in PEM text (PKCS#8, Ed25519), as
    /// [`Identity::to_pem`] or a key file holds it.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let bad = |reason: String| TlsError::BadKey {
            path: "(in memory)".into(),
            reason,
        };
        let kp = rcgen::KeyPair::from_pem(pem).map_err(|e| bad(e.to_string()))?;
        if kp.algorithm() != &rcgen::PKCS_ED25519 {
            return Err(bad("not an Ed25519 key".into()));
        }
        Self::from_keypair(&kp)
    }

    /// The private key as PEM text, to keep where the application keeps
    /// its secrets.
    pub fn to_pem(&self) -> Result<String, TlsError> {
        Ok(self.keypair()?.serialize_pem())
    }

    /// Loads the identity stored at `path`, or creates one there (mode 0600,
    /// parent directories included) when the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, TlsError> {
        let p = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(pem) => {
                let kp = rcgen::KeyPair::from_pem(&pem).map_err(|e| TlsError::BadKey {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
                if kp.algorithm() != &rcgen::PKCS_ED25519 {
                    return Err(TlsError::BadKey {
                        path: p,
                        reason: "not an Ed25519 key".into(),
                    });
                }
                Self::from_keypair(&kp)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate()?;
                if let Some(dir) = path.parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
                            path: p.clone(),
                            source,
                        })?;
                    }
                }
                let kp = id.keypair()?;
                write_private(path, kp.serialize_pem().as_bytes())
                    .map_err(|source| TlsError::Write { path: p, source })?;
                Ok(id)
            }
            Err(source) => Err(TlsError::Read { path: p, source }),
        }
    }

    fn keypair(&self) -> Result<rcgen::KeyPair, TlsError> {
        let der = PrivatePkcs8KeyDer::from(self.pkcs8.clone());
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
            .map_err(|e| TlsError::Cert(e.to_string()))
    }

    /// A secret derived from the private key for another purpose (e.g. the
    /// QUIC stateless-reset key, which must survive restarts).
    pub fn derive_secret(&self, label: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"punch derive ");
        h.update(label.as_bytes());
        h.update([0]);
        h.update(&self.pkcs8);
        h.finalize().into()
    }

    /// The raw public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// SHA-256 of the public key, lowercase hex: what others pin.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.public)
    }

    /// A self-signed certificate for this key and the matching private key.
    pub fn certified(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let kp = self.keypair()?;
        let params = rcgen::CertificateParams::new(vec!["punch".to_string()])
            .map_err(|e| TlsError::Cert(e.to_string()))?;
        let cert = params
            .self_signed(&kp)
            .map_err(|e| TlsError::Cert(e.to_string()))?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone())),
        ))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

/// SHA-256 of a raw public key, lowercase hex.
pub fn fingerprint_of(key: &PublicKey) -> String {
    hex::encode(Sha256::digest(key))
}

/// Normalises a user-supplied fingerprint: optional `sha256:` prefix, any
/// case, optional `:` separators.
pub fn parse_fingerprint(s: &str) -> Result<String, TlsError> {
    let t = s.trim();
    let t = t.strip_prefix("sha256:").unwrap_or(t);
    let hexed: String = t
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hexed.len() != 64 || !hexed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::BadFingerprint(s.to_string()));
    }
    Ok(hexed)
}

/// HMAC-SHA256 of the connection's exporter value under the token.
pub fn token_proof(token: &str, exporter: &[u8; 32]) -> [u8; 32] {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes()).expect("HMAC takes any key");
    m.update(exporter);
    m.finalize().into_bytes().into()
}

pub use punch_protocol::ct_eq;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The Ed25519 key of a certificate, read from its parsed SubjectPublicKeyInfo.
pub fn key_from_cert(cert: &CertificateDer<'_>) -> Result<PublicKey, rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    let spki = parsed.subject_public_key_info();
    let spki: &[u8] = spki.as_ref();
    if spki.len() != 44 || spki[..12] != ED25519_SPKI_PREFIX {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ));
    }
    Ok(spki[12..].try_into().expect("32 bytes"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn app_failure(msg: &str) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(std::io::Error::other(msg.to_string())),
    )))
}

/// What a verifier accepts.
#[derive(Clone)]
pub enum Expect {
    /// Exactly this key (a peer vouched for by the server).
    Key(PublicKey),
    /// A key whose fingerprint is this (the pinned server).
    Fingerprint(String),
    /// Any key; the caller decides after the handshake.
    AnyKey,
    /// Keys the predicate accepts.
    Allowed(Arc<dyn Fn(&PublicKey) -> bool + Send + Sync>),
}

impl fmt::Debug for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Key(k) => write!(f, "Key({})", fingerprint_of(k)),
            Expect::Fingerprint(fp) => write!(f, "Fingerprint({fp})"),
            Expect::AnyKey => write!(f, "AnyKey"),
            Expect::Allowed(_) => write!(f, "Allowed(..)"),
        }
    }
}

/// Verifies the other side's certificate by its key, and its handshake
/// signature with the crypto provider. Remembers the key it saw, so a
/// caller can say which fingerprint it got when pinning fails.
#[derive(Debug)]
pub struct KeyVerifier {
    expect: Expect,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<PublicKey>>,
}

impl KeyVerifier {
    /// A verifier accepting what `expect` says.
    pub fn new(expect: Expect) -> Arc<Self> {
        Arc::new(KeyVerifier {
            expect,
            provider: provider(),
            seen: Mutex::new(None),
        })
    }

    /// The key of the last certificate presented, accepted or not.
    pub fn seen_key(&self) -> Option<PublicKey> {
        *self.seen.lock().expect("not poisoned")
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let key = key_from_cert(cert)?;
        *self.seen.lock().expect("not poisoned") = Some(key);
        let ok = match &self.expect {
            Expect::Key(k) => ct_eq(k, &key),
            Expect::Fingerprint(fp) => ct_eq(fp.as_bytes(), fingerprint_of(&key).as_bytes()),
            Expect::AnyKey => true,
            Expect::Allowed(f) => f(&key),
        };
        if ok {
            Ok(())
        } else {
            Err(app_failure("key does not match the pinned key"))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for KeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for KeyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A quinn client config presenting `identity` and verifying with `verifier`.
pub fn client_config(
    identity: &Identity,
    verifier: Arc<KeyVerifier>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let (certs, key) = identity.certified()?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// A quinn server config presenting `identity` and requiring a client
/// certificate that `verifier` accepts.
pub fn server_config(
    identity: &Identity,
    verifier: Arc<KeyVerifier>,
    alpn: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let (certs, key) = identity.certified()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The peer's key on an established connection, read from its certificate.
pub fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    key_from_cert(certs.first()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_roundtrips_through_certificate_and_file() {
        let dir = std::env::temp_dir().join(format!("punch-tls-test-{}", std::process::id()));
        let path = dir.join("sub/key.pem");
        let _ = std::fs::remove_dir_all(&dir);
        let a = Identity::load_or_create(&path).unwrap();
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let (certs, _) = a.certified().unwrap();
        assert_eq!(key_from_cert(&certs[0]).unwrap(), a.public_key());
        std::fs::write(dir.join("bad.pem"), "garbage").unwrap();
        assert!(matches!(
            Identity::load_or_create(&dir.join("bad.pem")),
            Err(TlsError::BadKey { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_in_memory_roundtrips_through_pem() {
        let a = Identity::generate().unwrap();
        let b = Identity::from_pem(&a.to_pem().unwrap()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(matches!(
            Identity::from_pem("not a key"),
            Err(TlsError::BadKey { .. })
        ));
    }

    #[test]
    fn fingerprints_parse_leniently() {
        let id = Identity::generate().unwrap();
        let fp = id.fingerprint();
        assert_eq!(parse_fingerprint(&fp.to_uppercase()).unwrap(), fp);
        assert_eq!(parse_fingerprint(&format!("sha256:{fp}")).unwrap(), fp);
        assert!(parse_fingerprint("abc").is_err());
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        assert!(key_from_cert(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
