//! TLS for the TCP (WebSocket) channel to the server.
//!
//! The server's TCP port presents the same self-signed certificate as its
//! QUIC endpoint, so agents pin it by the same fingerprint. Behind a
//! TLS-terminating front (Cloud Run, an ingress, nginx) the agent sees the
//! front's certificate instead, checked against the system roots or a given
//! CA; the server itself is then authenticated inside the channel by a
//! signature over both sides' nonces (see `punch_protocol::ws`).

use crate::{ct_eq, fingerprint_of, key_from_cert, provider, Identity, TlsError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// A rustls server config for the TCP port: the server's own certificate,
/// no client certificate (agents prove their keys inside the channel),
/// HTTP/1.1 for the WebSocket upgrade.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = identity.certified()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The trust anchors for a front: the certificates in `ca_file` (PEM), or
/// the system's roots when no file is given.
pub fn load_roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let mut n = 0;
            for cert in rustls_pemfile_certs(&pem, path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Cert(format!("{}: {e}", path.display())))?;
                n += 1;
            }
            if n == 0 {
                return Err(TlsError::Cert(format!(
                    "{}: no PEM certificate in the file",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system store may hold certificates rustls cannot use.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::Cert(
                    "no system root certificates found; pass --server-ca FILE".into(),
                ));
            }
        }
    }
    Ok(roots)
}

fn rustls_pemfile_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(format!("{}: {e}", path.display())))
}

/// Accepts the server's own pinned key, or (when `roots` are given) any
/// certificate that chains to them: the agent may talk to the server
/// directly or through a TLS-terminating front.
#[derive(Debug)]
pub struct FrontVerifier {
    fingerprint: String,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl FrontVerifier {
    /// A verifier for the pinned `fingerprint`, and for fronts certified by
    /// `roots` when given.
    pub fn new(fingerprint: &str, roots: Option<RootCertStore>) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let webpki = match roots {
            Some(r) => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(r), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Arc::new(FrontVerifier {
            fingerprint: fingerprint.to_string(),
            webpki,
            provider,
        }))
    }
}

impl ServerCertVerifier for FrontVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(key) = key_from_cert(end_entity) {
            if ct_eq(fingerprint_of(&key).as_bytes(), self.fingerprint.as_bytes()) {
                return Ok(ServerCertVerified::assertion());
            }
        }
        match &self.webpki {
            Some(w) => {
                w.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::General(
                "the server's key does not match the pinned fingerprint".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// A rustls client config for the TCP channel.
pub fn client_config(verifier: Arc<FrontVerifier>) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

impl Identity {
    /// An Ed25519 signature of `msg` with this identity's key.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, TlsError> {
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&self.pkcs8)
            .map_err(|e| TlsError::Cert(format!("cannot sign: {e}")))?;
        Ok(kp.sign(msg).as_ref().to_vec())
    }
}

/// Does `signature` by `key` verify over `msg`?
pub fn verify_signature(key: &crate::PublicKey, msg: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(msg, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_key_and_message() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let sig = a.sign(b"hello").unwrap();
        assert!(verify_signature(&a.public_key(), b"hello", &sig));
        assert!(!verify_signature(&a.public_key(), b"hellO", &sig));
        assert!(!verify_signature(&b.public_key(), b"hello", &sig));
        assert!(!verify_signature(&a.public_key(), b"hello", &sig[..10]));
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error() {
        let dir = std::env::temp_dir().join(format!("punch-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ca.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        assert!(load_roots(Some(&f)).is_err());
        assert!(load_roots(Some(&dir.join("missing.pem"))).is_err());
        let id = Identity::generate().unwrap();
        let (certs, _) = id.certified().unwrap();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64_lines(&certs[0])
        );
        std::fs::write(&f, pem).unwrap();
        assert_eq!(load_roots(Some(&f)).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn base64_lines(d: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in d.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    s.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }
}
