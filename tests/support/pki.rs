//! Test PKI generated at run time with rcgen: no certificate files in the repository, nothing
//! that expires. One trusted CA (written to `ca.pem` in a temporary directory, which is what
//! the sidecar's `upstream.ca_file` points at), a server certificate for the relay, client
//! identities for mTLS, and certificates from a second CA that nobody trusts.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;

/// The name the relay's certificate is issued for; the sidecar's `upstream.server_name`.
pub const RELAY_SERVER_NAME: &str = "relay.test";

/// Subject alternative names of the relay's certificate.
pub const RELAY_SANS: [&str; 3] = [RELAY_SERVER_NAME, "localhost", "127.0.0.1"];

/// A certificate chain and its private key, as rustls wants them and as PEM text.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Identity {
    /// The certificate chain, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    /// A fresh copy of the private key (rustls consumes it).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A certificate authority that can issue server and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert: rcgen::Certificate,
}

impl CertificateAuthority {
    /// A new self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Self {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).expect("no SANs is always valid");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("rcgen generates an ECDSA P-256 key");
        let cert = params
            .self_signed(&key)
            .expect("a CA with valid params self-signs");
        Self {
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    /// The CA certificate as PEM (what a trust store file holds).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn server_identity(&self, names: &[&str]) -> Identity {
        self.issue(names, names.first().copied().unwrap_or("server"), true)
    }

    /// A client certificate with `common_name`, signed by this CA (for mTLS).
    pub fn client_identity(&self, common_name: &str) -> Identity {
        self.issue(&[], common_name, false)
    }

    fn issue(&self, names: &[&str], common_name: &str, server: bool) -> Identity {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("test SANs are valid names");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("rcgen generates an ECDSA P-256 key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("the CA signs a leaf with valid params");
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }
}

/// The PKI of one test: a trusted CA written to `ca.pem`, and the relay's server identity.
pub struct Pki {
    dir: TempDir,
    ca: CertificateAuthority,
    ca_file: PathBuf,
    server: Identity,
}

impl Pki {
    /// A new CA, its `ca.pem` in a fresh temporary directory, and a relay certificate for
    /// [`RELAY_SANS`].
    pub fn new() -> Arc<Self> {
        let dir = tempfile::tempdir().expect("a temporary directory can be created");
        let ca = CertificateAuthority::new("sprint-sidecar test CA");
        let ca_file = dir.path().join("ca.pem");
        fs::write(&ca_file, ca.cert_pem()).expect("ca.pem can be written");
        let server = ca.server_identity(&RELAY_SANS);
        Arc::new(Self {
            dir,
            ca,
            ca_file,
            server,
        })
    }

    /// Path of the trusted CA's PEM file (`upstream.ca_file`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The trusted CA certificate as PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// The directory holding this PKI's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The trusted CA.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The relay's certificate, issued by the trusted CA for [`RELAY_SANS`].
    pub fn server_identity(&self) -> &Identity {
        &self.server
    }

    /// A certificate for `names` issued by the trusted CA (e.g. a wrong name).
    pub fn server_identity_for(&self, names: &[&str]) -> Identity {
        self.ca.server_identity(names)
    }

    /// A relay certificate with the right names but issued by a second CA that nobody
    /// trusts: verification must fail with an unknown issuer.
    pub fn untrusted_server_identity(&self) -> Identity {
        CertificateAuthority::new("untrusted test CA").server_identity(&RELAY_SANS)
    }

    /// A client identity for mTLS, issued by the trusted CA.
    pub fn client_identity(&self, common_name: &str) -> Identity {
        self.ca.client_identity(common_name)
    }

    /// Writes a client identity as `<name>.crt` / `<name>.key` (mode 0600) into this PKI's
    /// directory and returns `(cert_path, key_path)`, for `client_cert_file`/`client_key_file`.
    pub fn write_client_identity(&self, name: &str) -> (PathBuf, PathBuf) {
        let identity = self.client_identity(name);
        let cert_path = self.dir().join(format!("{name}.crt"));
        let key_path = self.dir().join(format!("{name}.key"));
        write_private(&cert_path, identity.cert_pem.as_bytes());
        write_private(&key_path, identity.key_pem.as_bytes());
        (cert_path, key_path)
    }

    /// A trust store holding only the trusted CA.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.cert_der())
            .expect("an rcgen CA certificate parses");
        roots
    }

    /// A rustls client configuration trusting only this PKI, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        config
    }

    /// Like [`Pki::client_config`], presenting `identity` as a client certificate.
    pub fn client_config_with_identity(
        &self,
        alpn: &[&[u8]],
        identity: &Identity,
    ) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(identity.chain(), identity.key())
            .expect("an rcgen client identity is a valid rustls identity");
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        config
    }
}

/// Writes `contents` to `path` with mode 0600 (secret files must not be group/world readable).
pub fn write_private(path: &Path, contents: &[u8]) {
    write_with_mode(path, contents, 0o600);
}

/// Writes `contents` to `path` and sets its permission bits to `mode`.
pub fn write_with_mode(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("chmod {}: {error}", path.display()));
}
