//! The rustls server configuration of the DNS-over-TLS listener
//! (`--listen-tls`): its certificate chain and key, and with
//! `--client-ca` the CA that client certificates must chain to.
//!
//! Built at start and again on SIGHUP (certificate rotation); a broken
//! file fails the build, and the caller keeps the configuration it has.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::ServerTls;

pub fn server_config(t: &ServerTls) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(&t.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", t.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("--tls-cert {}: no certificate in it", t.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key).map_err(|e| format!("--tls-key {}: {e}", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let builder = match &t.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let cas = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--client-ca {}: {e}", path.display()))?;
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(format!(
                    "--client-ca {}: no usable CA certificate in it",
                    path.display()
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    // RFC 7858 names no ALPN; "dot" is what clients that send one offer
    // (and what guards against cross-protocol attacks such as ALPACA).
    // Clients that offer none are served too.
    config.alpn_protocols = vec![b"dot".to_vec()];
    Ok(Arc::new(config))
}
