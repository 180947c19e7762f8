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
