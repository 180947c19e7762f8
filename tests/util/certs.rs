//! Certificate factory: a throw-away CA and leaves (ECDSA P-256), generated
//! with rcgen at test time and written under a unique temp directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{RootCertStore, ServerConfig};

/// The crypto provider every test config is built with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A unique directory under `std::env::temp_dir()`, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Bounded: a handful of attempts with different names.
        for attempt in 0..16 {
            let path = std::env::temp_dir().join(format!(
                "dotproxy-test-{tag}-{}-{}-{nanos}-{attempt}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed),
            ));
            if fs::create_dir(&path).is_ok() {
                return TempDir { path };
            }
        }
        panic!("could not create a temp dir under {:?}", std::env::temp_dir());
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Validity window of a generated leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// 1975 .. 4096 (rcgen's default).
    Valid,
    /// 2000-01-01 .. 2001-01-01.
    Expired,
    /// 2090-01-01 .. 2091-01-01.
    NotYetValid,
}

/// Parameters of a CA certificate (root or intermediate) named `common_name`.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A test certificate authority. Its PEM is written to `pem_path()` (pass it
/// to the proxy as `--ca-file`). The directory goes away on drop.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem_path: PathBuf,
    dir: TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let key = KeyPair::generate().expect("CA key");
        let mut params = ca_params(&format!("dotproxy test CA {n}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "dotproxy tests");
        let cert = params.self_signed(&key).expect("CA self-sign");
        TestCa::with_pem_file(cert, key, "ca")
    }

    /// An intermediate CA issued by this one. Its leaves carry only
    /// themselves in `chain`; push `sub.der()` to send the intermediate.
    /// Its own `pem_path()` holds the intermediate alone.
    pub fn sub_ca(&self) -> TestCa {
        let key = KeyPair::generate().expect("intermediate key");
        let mut params = ca_params("dotproxy test intermediate");
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign intermediate");
        TestCa::with_pem_file(cert, key, "subca")
    }

    /// Writes `cert` to `ca.pem` in a fresh temporary directory.
    fn with_pem_file(cert: rcgen::Certificate, key: KeyPair, dir_prefix: &str) -> TestCa {
        let dir = TempDir::new(dir_prefix);
        let pem_path = dir.path().join("ca.pem");
        fs::write(&pem_path, cert.pem()).expect("write CA pem");
        TestCa {
            cert,
            key,
            pem_path,
            dir,
        }
    }

    /// Path of the CA certificate PEM file.
    pub fn pem_path(&self) -> &Path {
        &self.pem_path
    }

    /// `pem_path()` as &str, for command lines.
    pub fn pem_path_str(&self) -> &str {
        self.pem_path.to_str().expect("utf-8 temp path")
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The directory holding the CA files (free for other test files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Root store with just this CA (for rustls test clients).
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der()).expect("add CA root");
        roots
    }

    /// A valid leaf for the given SAN names (DNS names or IP literals).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, Validity::Valid)
    }

    pub fn expired_leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, Validity::Expired)
    }

    pub fn not_yet_valid_leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, Validity::NotYetValid)
    }

    /// A leaf whose subject CN is `cn` but whose SANs are `sans` (names
    /// are checked against the SANs only).
    pub fn leaf_cn_san(&self, cn: &str, sans: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = leaf_params(sans, Validity::Valid);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        Leaf::from_parts(&cert, &key)
    }

    pub fn leaf_with(&self, names: &[&str], validity: Validity) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let params = leaf_params(names, validity);
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        Leaf::from_parts(&cert, &key)
    }
}

impl TestCa {
    /// A client certificate (ClientAuth) issued by this CA, for mutual TLS.
    pub fn client_leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().expect("client key");
        let mut params = leaf_params(&[name], Validity::Valid);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign client leaf");
        Leaf::from_parts(&cert, &key)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

fn leaf_params(names: &[&str], validity: Validity) -> CertificateParams {
    let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("dotproxy test leaf"),
    );
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    match validity {
        Validity::Valid => {}
        Validity::Expired => {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        }
        Validity::NotYetValid => {
            params.not_before = date_time_ymd(2090, 1, 1);
            params.not_after = date_time_ymd(2091, 1, 1);
        }
    }
    params
}

/// A server certificate chain (leaf first) and its private key.
#[derive(Clone)]
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub cert_pem: String,
    pub key_der: Vec<u8>,
    pub key_pem: String,
}

impl Leaf {
    /// A leaf chain of just `cert`, with its key.
    fn from_parts(cert: &rcgen::Certificate, key: &KeyPair) -> Leaf {
        Leaf {
            chain: vec![cert.der().clone()],
            cert_pem: cert.pem(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A self-signed leaf (no CA at all).
    pub fn self_signed(names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let params = leaf_params(names, Validity::Valid);
        let cert = params.self_signed(&key).expect("self-sign leaf");
        Leaf::from_parts(&cert, &key)
    }

    /// A leaf issued by a fresh CA that nobody trusts.
    pub fn from_unknown_ca(names: &[&str]) -> Leaf {
        TestCa::new().leaf(names)
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A rustls server config (ring provider, TLS 1.2 + 1.3, no client auth,
    /// default in-memory session cache, TLS 1.3 tickets sent).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::new(self.server_config_raw())
    }

    /// Same, but lets the caller adjust it (e.g. a ticketer, ALPN).
    pub fn server_config_with(&self, f: impl FnOnce(&mut ServerConfig)) -> Arc<ServerConfig> {
        let mut cfg = self.server_config_raw();
        f(&mut cfg);
        Arc::new(cfg)
    }

    fn server_config_raw(&self) -> ServerConfig {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key())
            .expect("server cert")
    }

    /// Writes `cert.pem` and `key.pem` into `dir`; returns their paths.
    pub fn write_pem(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let c = dir.join("cert.pem");
        let k = dir.join("key.pem");
        fs::write(&c, &self.cert_pem).expect("write cert pem");
        fs::write(&k, &self.key_pem).expect("write key pem");
        (c, k)
    }
}
