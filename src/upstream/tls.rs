//! The one rustls client configuration every upstream connection shares.
//!
//! Certificates are always verified: against the Mozilla roots compiled in
//! (webpki-roots), or against the CA certificates of `--ca-file`. There is
//! deliberately no way to turn verification off (RFC 8310 strict profile).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let roots = roots(ca_file)?;
    // ring: pure Rust plus a little C/asm that builds with musl-gcc, small
    // and without the cmake/Go toolchain that aws-lc-rs needs.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Offer ALPN "dot" (RFC 7858 has none; it mitigates cross-protocol
    // attacks such as ALPACA), without requiring the server to pick it.
    config.alpn_protocols = vec![b"dot".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration for an upstream with SPKI pins: the shared roots
/// still check the name when there is one, and the server's key must be
/// one of the pins (RFC 7858 §4.2; the getdns semantics of name + pin).
pub fn pinned_config(
    base: &Arc<ClientConfig>,
    ca_file: Option<&Path>,
    pins: &[[u8; 32]],
    check_name: bool,
) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = if check_name {
        let roots = roots(ca_file)?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| format!("TLS verifier: {e}"))?;
        Some(v)
    } else {
        None
    };
    let verifier = PinVerifier {
        inner,
        pins: pins.to_vec(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = (**base).clone();
    config.dangerous().set_certificate_verifier(Arc::new(verifier));
    // A separate session cache: a ticket from a connection checked
    // without these pins must never resume this one.
    config.resumption = rustls::client::Resumption::default();
    Ok(Arc::new(config))
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("--ca-file {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
            let (added, ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("--ca-file {}: no usable CA certificate in it", path.display()));
            }
            if ignored > 0 {
                log::warn!(
                    "--ca-file {}: ignored {ignored} unusable certificate(s)",
                    path.display()
                );
            }
        }
    }
    Ok(roots)
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo, the RFC 7469 pin.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = ee.subject_public_key_info();
    let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
    digest.as_ref().try_into().ok()
}

#[derive(Debug)]
struct PinVerifier {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    pins: Vec<[u8; 32]>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(inner) = &self.inner {
            inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        }
        match spki_sha256(end_entity) {
            Some(pin) if self.pins.contains(&pin) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            Some(_) => Err(rustls::Error::General(
                "server key matches no configured SPKI pin".into(),
            )),
            None => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)),
        }
    }

    // The handshake signatures prove the server holds the pinned key; they
    // must be checked by the provider, never assumed.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The configuration one upstream uses: the shared one, unless it has its
/// own CA file or pins.
pub fn for_upstream(
    shared: &Arc<ClientConfig>,
    default_ca: Option<&Path>,
    u: &crate::config::Upstream,
) -> Result<Arc<ClientConfig>, String> {
    let ca = u.ca_file.as_deref().or(default_ca);
    if !u.pins.is_empty() {
        let named = matches!(u.name, rustls::pki_types::ServerName::DnsName(_));
        return pinned_config(shared, ca, &u.pins, named);
    }
    match &u.ca_file {
        Some(path) => client_config(Some(path)),
        None => Ok(Arc::clone(shared)),
    }
}
