//! The mTLS client identity: a public certificate chain and a private key that lives in
//! locked memory and is parsed only for the duration of each handshake.
//!
//! Where the key is, honestly:
//! - the PEM text: read with `read(2)` into a [`SecureBuffer`], decoded, then wiped and freed;
//! - the DER: a [`SecureBuffer`] (locked, guarded, `PROT_NONE` between handshakes) for the
//!   life of the identity; our own base64 scan decodes into it directly, because
//!   `rustls-pki-types`' PEM reader leaves unwiped copies of the base64 behind;
//! - per handshake that asks for a client certificate: the DER is copied into one exact-size
//!   heap `Vec`, which the crypto provider parses and drops (aws-lc-rs wraps it in `Zeroizing`;
//!   the wiping allocator zeroes it too); the parsed key sits in aws-lc's own heap (libc
//!   malloc, not locked unless `lock_all`) until rustls has signed `CertificateVerify` and
//!   drops its `Signer`; aws-lc `OPENSSL_cleanse`s it on free. With the ring provider the
//!   parsed key would not be wiped.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    SubjectPublicKeyInfoDer,
};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::secret::{FileStamp, SecretError, SecureBuffer, file_stamp};

/// Loads the client certificate chain (`cert`, PEM) and private key (`key`, PEM: PKCS#8,
/// PKCS#1 or SEC1), checks that the key parses and belongs to the certificate, and returns
/// the resolver for `ClientConfig::with_client_cert_resolver`, which re-reads both files
/// when they change ([`ClientIdentity::reload_if_changed`]).
///
/// # Errors
/// A file is missing, unreadable, too open (mode; unless `allow_insecure_permissions`),
/// holds no certificate / no key, the key is encrypted or does not parse, or does not match
/// the certificate. Every message names the file.
pub fn load_client_identity(
    cert: &Path,
    key: &Path,
    allow_insecure_permissions: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<ClientIdentity>, IdentityError> {
    let stamps = (file_stamp(cert), file_stamp(key));
    let certified = load_certified_key(cert, key, allow_insecure_permissions, provider)?;
    Ok(Arc::new(ClientIdentity {
        current: RwLock::new(Arc::new(certified)),
        cert: cert.to_owned(),
        key: key.to_owned(),
        allow_insecure_permissions,
        provider: Arc::clone(provider),
        stamps: Mutex::new(stamps),
    }))
}

fn load_certified_key(
    cert: &Path,
    key: &Path,
    allow_insecure_permissions: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<CertifiedKey, IdentityError> {
    let chain = read_chain(cert)?;
    let (der, format) = {
        let pem = SecureBuffer::from_file(key, allow_insecure_permissions)?;
        decode_key_pem(&pem, key)?
        // `pem` is wiped and released here.
    };
    let signing_key = LockedSigningKey::new(der, format, key, Arc::clone(provider))?;
    let certified = CertifiedKey::new(chain, Arc::new(signing_key));
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(IdentityError::new(IdentityErrorKind::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }))
        }
        Err(error) => Err(IdentityError::new(IdentityErrorKind::Certificate {
            path: cert.to_owned(),
            reason: unusable_certificate_reason(&error),
        })),
    }
}

/// Why a client certificate cannot be used, in words an operator can act on.
fn unusable_certificate_reason(error: &rustls::Error) -> String {
    // webpki accepts only X.509 v3; `openssl x509 -req` without `-extfile` issues v1.
    if format!("{error:?}").contains("UnsupportedCertVersion") {
        return "it is an X.509 v1 certificate, and TLS needs v3: issue it with at least one \
                extension (e.g. `openssl x509 -req ... -extfile <(echo \
                extendedKeyUsage=clientAuth)`)"
            .to_owned();
    }
    format!("cannot compare it with the key: {error}")
}

/// The mTLS identity the relay connections present: one certificate chain and its key
/// (in a [`SecureBuffer`]), replaced as a whole when the files change.
pub struct ClientIdentity {
    current: RwLock<Arc<CertifiedKey>>,
    cert: PathBuf,
    key: PathBuf,
    allow_insecure_permissions: bool,
    provider: Arc<CryptoProvider>,
    /// The files' stamps when last read (or tried).
    stamps: Mutex<(Option<FileStamp>, Option<FileStamp>)>,
}

impl ClientIdentity {
    /// Re-reads the certificate and key when either file changed. `Ok(true)`: the new pair is
    /// what handshakes present from now on (connections already open keep theirs). An error
    /// leaves the previous pair in use and is returned once per change of the files, so a
    /// pair written one file at a time (a certificate that does not match the old key yet)
    /// is taken as soon as the second file lands.
    ///
    /// # Errors
    /// The changed files cannot be used (see [`load_client_identity`]).
    pub fn reload_if_changed(&self) -> Result<bool, IdentityError> {
        let now = (file_stamp(&self.cert), file_stamp(&self.key));
        {
            let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *stamps == now {
                return Ok(false);
            }
            *stamps = now;
        }
        let certified = load_certified_key(
            &self.cert,
            &self.key,
            self.allow_insecure_permissions,
            &self.provider,
        )?;
        // The previous key's SecureBuffer is wiped when the last handshake using it ends.
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
        Ok(true)
    }

    /// The certificate file and the key file.
    pub fn files(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }

    fn certified(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("signing_key", &self.certified().key)
            .finish_non_exhaustive()
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The identity could not be loaded. Opaque; ask with the `is_*` predicates.
#[derive(Debug)]
pub struct IdentityError {
    kind: IdentityErrorKind,
}

#[derive(Debug)]
enum IdentityErrorKind {
    Certificate { path: PathBuf, reason: String },
    CertificateNotFound { path: PathBuf },
    Key(SecretError),
    KeyPem { path: PathBuf, problem: PemProblem },
    KeyParse { path: PathBuf, reason: String },
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl IdentityError {
    fn new(kind: IdentityErrorKind) -> Self {
        IdentityError { kind }
    }

    /// The certificate or key file does not exist.
    pub fn is_not_found(&self) -> bool {
        match &self.kind {
            IdentityErrorKind::CertificateNotFound { .. } => true,
            IdentityErrorKind::Key(error) => error.is_not_found(),
            _ => false,
        }
    }

    /// The key file is accessible to group/others and that was not allowed.
    pub fn is_insecure_permissions(&self) -> bool {
        matches!(&self.kind, IdentityErrorKind::Key(error) if error.is_insecure_permissions())
    }

    /// The key is valid but belongs to another certificate.
    pub fn is_key_mismatch(&self) -> bool {
        matches!(self.kind, IdentityErrorKind::Mismatch { .. })
    }
}

impl From<SecretError> for IdentityError {
    fn from(error: SecretError) -> Self {
        IdentityError::new(IdentityErrorKind::Key(error))
    }
}

impl IdentityError {
    /// The configuration key whose file is at fault: `upstream.client_cert_file` for a
    /// certificate that cannot be read, `upstream.client_key_file` otherwise (a mismatch is
    /// reported against the key, as replacing the key is the usual fix).
    pub fn key(&self) -> &'static str {
        match self.kind {
            IdentityErrorKind::Certificate { .. }
            | IdentityErrorKind::CertificateNotFound { .. } => "upstream.client_cert_file",
            _ => "upstream.client_key_file",
        }
    }
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            IdentityErrorKind::Certificate { path, reason } => {
                write!(f, "client certificate {}: {reason}", path.display())
            }
            IdentityErrorKind::CertificateNotFound { path } => {
                write!(f, "client certificate {}: not found", path.display())
            }
            IdentityErrorKind::Key(error) => write!(f, "client key: {error}"),
            IdentityErrorKind::KeyPem { path, problem } => {
                write!(f, "client key {}: {problem}", path.display())
            }
            IdentityErrorKind::KeyParse { path, reason } => {
                write!(
                    f,
                    "client key {}: cannot be parsed: {reason}",
                    path.display()
                )
            }
            IdentityErrorKind::Mismatch { cert, key } => write!(
                f,
                "client key {} does not match client certificate {} (their public keys differ)",
                key.display(),
                cert.display()
            ),
        }
    }
}

impl std::error::Error for IdentityError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            IdentityErrorKind::Key(error) => Some(error),
            _ => None,
        }
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let error = |reason: String| {
        IdentityError::new(IdentityErrorKind::Certificate {
            path: path.to_owned(),
            reason,
        })
    };
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
            IdentityError::new(IdentityErrorKind::CertificateNotFound {
                path: path.to_owned(),
            })
        }
        other => error(format!("cannot be read: {other}")),
    })?;
    let chain = certs
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("invalid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(error("contains no CERTIFICATE block".to_owned()));
    }
    Ok(chain)
}

/// The DER encodings a PEM private-key block can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFormat {
    /// `-----BEGIN PRIVATE KEY-----`
    Pkcs8,
    /// `-----BEGIN RSA PRIVATE KEY-----`
    Pkcs1,
    /// `-----BEGIN EC PRIVATE KEY-----`
    Sec1,
}

const KEY_LABELS: [(&str, KeyFormat); 3] = [
    ("PRIVATE KEY", KeyFormat::Pkcs8),
    ("RSA PRIVATE KEY", KeyFormat::Pkcs1),
    ("EC PRIVATE KEY", KeyFormat::Sec1),
];

/// What is wrong with a key file's PEM (never quoting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PemProblem {
    NoKeyBlock,
    Encrypted,
    Unterminated,
    InvalidBase64,
}

impl fmt::Display for PemProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PemProblem::NoKeyBlock => {
                "no private key found (expected a PEM block 'PRIVATE KEY', 'RSA PRIVATE KEY' or 'EC PRIVATE KEY')"
            }
            PemProblem::Encrypted => {
                "the key is encrypted; provide it unencrypted (e.g. `openssl pkcs8 -topk8 -nocrypt`) with mode 0600"
            }
            PemProblem::Unterminated => "the private key block has no END line",
            PemProblem::InvalidBase64 => "the private key block is not valid base64",
        })
    }
}

/// Decodes the first private-key block of the PEM in `pem` into a new SecureBuffer, straight
/// from one locked buffer to the other.
fn decode_key_pem(
    pem: &SecureBuffer,
    path: &Path,
) -> Result<(SecureBuffer, KeyFormat), IdentityError> {
    let problem = |problem| {
        IdentityError::new(IdentityErrorKind::KeyPem {
            path: path.to_owned(),
            problem,
        })
    };
    pem.expose(|text| {
        let (format, body) = find_key_block(text).map_err(problem)?;
        let body = &text[body];
        let label = format!("client key {} (DER)", path.display());
        let der = SecureBuffer::build(&label, body.len() / 4 * 3 + 3, |out| {
            decode_base64(body, out).map_err(problem)
        })?;
        if der.is_empty() {
            return Err(problem(PemProblem::InvalidBase64));
        }
        Ok((der, format))
    })
}

/// Finds the first private-key block: its format and the byte range of its base64 body.
/// Other blocks (`EC PARAMETERS`, certificates) are skipped. Only the armour lines are
/// inspected as text.
fn find_key_block(pem: &[u8]) -> Result<(KeyFormat, Range<usize>), PemProblem> {
    let mut open: Option<(&str, KeyFormat, usize)> = None;
    let mut offset = 0;
    for raw_line in pem.split(|&b| b == b'\n') {
        let line_start = offset;
        offset += raw_line.len() + 1;
        let line = raw_line.trim_ascii();
        if let Some((label, format, body_start)) = open {
            if let Some(end_label) = armour(line, "-----END ") {
                if end_label == label.as_bytes() {
                    return Ok((format, body_start..line_start));
                }
                return Err(PemProblem::Unterminated);
            }
            continue;
        }
        let Some(begin_label) = armour(line, "-----BEGIN ") else {
            continue;
        };
        if begin_label == b"ENCRYPTED PRIVATE KEY" {
            return Err(PemProblem::Encrypted);
        }
        if let Some((label, format)) = KEY_LABELS
            .iter()
            .find(|(label, _)| label.as_bytes() == begin_label)
        {
            open = Some((label, *format, offset.min(pem.len())));
        }
    }
    Err(if open.is_some() {
        PemProblem::Unterminated
    } else {
        PemProblem::NoKeyBlock
    })
}

/// The label of an armour line `-----BEGIN LABEL-----` / `-----END LABEL-----`.
fn armour<'a>(line: &'a [u8], prefix: &str) -> Option<&'a [u8]> {
    line.strip_prefix(prefix.as_bytes())?.strip_suffix(b"-----")
}

/// Standard base64 (with optional `=` padding, whitespace ignored) from `input` into `out`;
/// returns the decoded length. Legacy PEM headers (`Proc-Type: 4,ENCRYPTED`) are refused.
/// Characters are mapped without branching on their value (see [`sextet`]).
fn decode_base64(input: &[u8], out: &mut [u8]) -> Result<usize, PemProblem> {
    if input.contains(&b':') {
        return Err(PemProblem::Encrypted);
    }
    let mut accumulator: u32 = 0;
    let mut pending = 0;
    let mut written = 0;
    let mut padding = 0;
    for &c in input {
        if c.is_ascii_whitespace() {
            continue;
        }
        if c == b'=' {
            padding += 1;
            continue;
        }
        let value = sextet(c).ok_or(PemProblem::InvalidBase64)?;
        if padding > 0 {
            return Err(PemProblem::InvalidBase64);
        }
        accumulator = (accumulator << 6) | u32::from(value);
        pending += 1;
        if pending == 4 {
            out[written..written + 3].copy_from_slice(&accumulator.to_be_bytes()[1..]);
            written += 3;
            pending = 0;
            accumulator = 0;
        }
    }
    let tail = match (pending, padding) {
        (0, 0) => 0,
        (2, 0..=2) => {
            out[written] = (accumulator >> 4) as u8;
            1
        }
        (3, 0..=1) => {
            out[written..written + 2].copy_from_slice(&((accumulator >> 2) as u16).to_be_bytes());
            2
        }
        _ => return Err(PemProblem::InvalidBase64),
    };
    Ok(written + tail)
}

/// The 6-bit value of one base64 character, computed with masks instead of branches or a
/// table lookup so its timing does not depend on the (secret) character.
fn sextet(c: u8) -> Option<u8> {
    let c = i16::from(c);
    // All ones when lo <= c <= hi, else zero.
    let within = |lo: i16, hi: i16| ((lo - 1 - c) & (c - hi - 1)) >> 15;
    let value = (within(b'A'.into(), b'Z'.into()) & (c - i16::from(b'A') + 1))
        | (within(b'a'.into(), b'z'.into()) & (c - i16::from(b'a') + 27))
        | (within(b'0'.into(), b'9'.into()) & (c - i16::from(b'0') + 53))
        | (within(b'+'.into(), b'+'.into()) & 63)
        | (within(b'/'.into(), b'/'.into()) & 64);
    // value is 1..=64 for a base64 character, 0 otherwise.
    u8::try_from(value - 1).ok()
}

/// A rustls signing key whose private key stays in a SecureBuffer; it is parsed anew, by the
/// crypto provider, each time rustls needs a signature (once per mTLS handshake).
struct LockedSigningKey {
    der: SecureBuffer,
    format: KeyFormat,
    provider: Arc<CryptoProvider>,
    /// Learnt from one parse at load time.
    algorithm: SignatureAlgorithm,
    /// The public half (SubjectPublicKeyInfo), for `keys_match`.
    public_key: Option<SubjectPublicKeyInfoDer<'static>>,
    path: PathBuf,
}

impl LockedSigningKey {
    /// Parses the key once to validate it and learn its algorithm and public key.
    fn new(
        der: SecureBuffer,
        format: KeyFormat,
        path: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, IdentityError> {
        let parsed = parse(&der, format, &provider).map_err(|e| {
            IdentityError::new(IdentityErrorKind::KeyParse {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        })?;
        let algorithm = parsed.algorithm();
        let public_key = parsed.public_key().map(SubjectPublicKeyInfoDer::into_owned);
        drop(parsed);
        Ok(LockedSigningKey {
            der,
            format,
            provider,
            algorithm,
            public_key,
            path: path.to_owned(),
        })
    }
}

/// Hands the provider a short-lived copy of the DER (the provider's `load_private_key` takes
/// ownership; aws-lc-rs zeroizes it after parsing).
fn parse(
    der: &SecureBuffer,
    format: KeyFormat,
    provider: &CryptoProvider,
) -> Result<Arc<dyn SigningKey>, rustls::Error> {
    let key = der.expose(|bytes| {
        let copy = bytes.to_vec();
        match format {
            KeyFormat::Pkcs8 => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(copy)),
            KeyFormat::Pkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(copy)),
            KeyFormat::Sec1 => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(copy)),
        }
    });
    provider.key_provider.load_private_key(key)
}

impl SigningKey for LockedSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        match parse(&self.der, self.format, &self.provider) {
            // The returned Signer holds the parsed key until rustls has signed with it.
            Ok(parsed) => parsed.choose_scheme(offered),
            Err(error) => {
                tracing::error!(key = %self.path.display(), %error, "cannot parse the client key for a handshake");
                None
            }
        }
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        self.public_key
            .as_ref()
            .map(|spki| SubjectPublicKeyInfoDer::from(spki.as_ref()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }
}

impl fmt::Debug for LockedSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockedSigningKey")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("algorithm", &self.algorithm)
            .field("der", &self.der)
            .finish()
    }
}

/// Test PKI and an in-memory TLS handshake, shared with `tickets` tests.
#[cfg(test)]
pub(super) mod test_support {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

    pub fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// A CA, a server certificate for `relay.test` and a client certificate, all PEM.
    pub struct Pki {
        pub ca_pem: String,
        pub server_cert_pem: String,
        pub server_key_pem: String,
        pub client_cert_pem: String,
        pub client_key_pem: String,
        /// A second client identity of the same CA.
        pub other_cert_pem: String,
        pub other_key_pem: String,
    }

    pub fn pki() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![name.to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert_pem, server_key_pem) = leaf("relay.test");
        let (client_cert_pem, client_key_pem) = leaf("client.test");
        let (other_cert_pem, other_key_pem) = leaf("other.test");
        Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            other_cert_pem,
            other_key_pem,
        }
    }

    pub fn write_file(
        dir: &std::path::Path,
        name: &str,
        contents: &str,
        mode: u32,
    ) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(contents.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn roots(ca_pem: &str) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert: CertificateDer<'static> = cert.unwrap();
            roots.add(cert).unwrap();
        }
        roots
    }

    /// A server for `relay.test`; with `require_client_auth`, it demands a certificate
    /// issued by the test CA. It sends `tickets` TLS 1.3 session tickets per handshake.
    pub fn server_config(
        pki: &Pki,
        require_client_auth: bool,
        tickets: usize,
    ) -> Arc<ServerConfig> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_auth {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(&pki.ca_pem)),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let chain = vec![CertificateDer::from_pem_slice(pki.server_cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).unwrap(),
        );
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.send_tls13_tickets = tickets;
        Arc::new(config)
    }

    /// A client trusting the test CA, with an optional client identity resolver.
    pub fn client_config(
        pki: &Pki,
        identity: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    ) -> ClientConfig {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&pki.ca_pem));
        match identity {
            Some(resolver) => builder.with_client_cert_resolver(resolver),
            None => builder.with_no_client_auth(),
        }
    }

    /// Runs a full handshake in memory, then lets the client read the server's post-handshake
    /// messages (session tickets). Returns the client connection.
    pub fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<ClientConnection, rustls::Error> {
        let name = ServerName::try_from("relay.test").unwrap();
        let mut client = ClientConnection::new(client, name)?;
        let mut server = ServerConnection::new(server)?;
        for _ in 0..20 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            if !wire.is_empty() {
                server.read_tls(&mut wire.as_slice()).unwrap();
                server.process_new_packets()?;
            }
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            if !wire.is_empty() {
                client.read_tls(&mut wire.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking()
                && !server.is_handshaking()
                && !server.wants_write()
                && !client.wants_write()
            {
                return Ok(client);
            }
        }
        panic!("handshake did not finish");
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn write_identity(
        pki: &Pki,
        key_pem: &str,
        key_mode: u32,
    ) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let cert = write_file(dir.path(), "client.crt", &pki.client_cert_pem, 0o644);
        let key = write_file(dir.path(), "client.key", key_pem, key_mode);
        (dir, cert, key)
    }

    #[test]
    fn loads_an_rcgen_identity_and_completes_an_mtls_handshake() {
        let pki = pki();
        let (_dir, cert, key) = write_identity(&pki, &pki.client_key_pem, 0o600);
        let identity = load_client_identity(&cert, &key, false, &provider()).unwrap();
        assert!(identity.has_certs());
        let client = Arc::new(client_config(&pki, Some(identity)));
        let connection = handshake(client, server_config(&pki, true, 0)).unwrap();
        assert!(!connection.is_handshaking());
    }

    #[test]
    fn server_rejects_the_handshake_without_the_identity() {
        let pki = pki();
        let client = Arc::new(client_config(&pki, None));
        assert!(handshake(client, server_config(&pki, true, 0)).is_err());
    }

    #[test]
    fn rejects_a_key_of_another_certificate_naming_both_files() {
        let pki = pki();
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let (_dir, cert, key) = write_identity(&pki, &other, 0o600);
        let error = load_client_identity(&cert, &key, false, &provider()).unwrap_err();
        assert!(error.is_key_mismatch(), "{error}");
        let message = error.to_string();
        assert!(message.contains(&key.display().to_string()), "{message}");
        assert!(message.contains(&cert.display().to_string()), "{message}");
    }

    #[test]
    fn refuses_a_world_readable_key() {
        let pki = pki();
        let (_dir, cert, key) = write_identity(&pki, &pki.client_key_pem, 0o644);
        let error = load_client_identity(&cert, &key, false, &provider()).unwrap_err();
        assert!(error.is_insecure_permissions(), "{error}");
        assert!(load_client_identity(&cert, &key, true, &provider()).is_ok());
    }

    #[test]
    fn reports_missing_files_and_bad_pem_by_name() {
        let pki = pki();
        let (dir, cert, key) = write_identity(&pki, &pki.client_key_pem, 0o600);
        let missing = dir.path().join("absent.crt");
        let error = load_client_identity(&missing, &key, false, &provider()).unwrap_err();
        assert!(
            error.is_not_found() && error.to_string().contains("absent.crt"),
            "{error}"
        );
        let no_key = write_file(dir.path(), "cert-as-key.pem", &pki.client_cert_pem, 0o600);
        let error = load_client_identity(&cert, &no_key, false, &provider()).unwrap_err();
        assert!(
            error.to_string().contains("no private key found"),
            "{error}"
        );
        let encrypted = write_file(
            dir.path(),
            "enc.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
            0o600,
        );
        let error = load_client_identity(&cert, &encrypted, false, &provider()).unwrap_err();
        assert!(error.to_string().contains("encrypted"), "{error}");
        let garbage = write_file(
            dir.path(),
            "garbage.key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            0o600,
        );
        let error = load_client_identity(&cert, &garbage, false, &provider()).unwrap_err();
        assert!(error.to_string().contains("cannot be parsed"), "{error}");
    }

    #[test]
    fn decodes_pem_like_pki_types() {
        let pki = pki();
        let pem = SecureBuffer::from_slice(
            format!(
                "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
                pki.client_key_pem
            )
            .as_bytes(),
        )
        .unwrap();
        let (der, format) = decode_key_pem(&pem, Path::new("client.key")).unwrap();
        assert_eq!(format, KeyFormat::Pkcs8);
        let expected = PrivatePkcs8KeyDer::from_pem_slice(pki.client_key_pem.as_bytes()).unwrap();
        der.expose(|bytes| assert_eq!(bytes, expected.secret_pkcs8_der()));
        assert!(der.is_locked());
    }

    #[test]
    fn base64_handles_padding_and_rejects_garbage() {
        let decode = |text: &str| {
            let mut out = [0u8; 16];
            decode_base64(text.as_bytes(), &mut out).map(|n| out[..n].to_vec())
        };
        assert_eq!(decode("TWFu").unwrap(), b"Man");
        assert_eq!(decode("TWE=").unwrap(), b"Ma");
        assert_eq!(decode("TQ==").unwrap(), b"M");
        assert_eq!(decode("TW\nFu\r\n").unwrap(), b"Man");
        assert_eq!(decode("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
        assert_eq!(decode("TQ=x"), Err(PemProblem::InvalidBase64));
        assert_eq!(decode("T$==="), Err(PemProblem::InvalidBase64));
        assert_eq!(decode("Proc-Type: 4,ENCRYPTED"), Err(PemProblem::Encrypted));
        for c in 0..=255u8 {
            let expected = match c {
                b'A'..=b'Z' => Some(c - b'A'),
                b'a'..=b'z' => Some(c - b'a' + 26),
                b'0'..=b'9' => Some(c - b'0' + 52),
                b'+' => Some(62),
                b'/' => Some(63),
                _ => None,
            };
            assert_eq!(sextet(c), expected, "{c}");
        }
    }

    /// Replaces `path` with `contents` the way a careful writer does: a new file renamed
    /// over the old one.
    fn replace_file(path: &Path, contents: &str) {
        let dir = path.parent().unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        let fresh = write_file(dir, &format!("{name}.new"), contents, 0o600);
        std::fs::rename(fresh, path).unwrap();
    }

    fn leaf_der(identity: &ClientIdentity) -> Vec<u8> {
        identity.resolve(&[], &[]).unwrap().cert[0]
            .as_ref()
            .to_vec()
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_changed_pair_is_taken_and_a_bad_one_leaves_the_old_in_use() {
        let pki = pki();
        let (_dir, cert, key) = write_identity(&pki, &pki.client_key_pem, 0o600);
        let identity = load_client_identity(&cert, &key, false, &provider()).unwrap();
        assert!(!identity.reload_if_changed().unwrap(), "nothing changed");
        // The certificate lands first: it does not match the old key yet.
        replace_file(&cert, &pki.other_cert_pem);
        let error = identity.reload_if_changed().unwrap_err();
        assert!(error.is_key_mismatch(), "{error}");
        assert_eq!(
            leaf_der(&identity),
            pem_der(&pki.client_cert_pem),
            "the old pair stays"
        );
        assert!(
            !identity.reload_if_changed().unwrap(),
            "reported once per change"
        );
        // Then the key: the new pair is taken and handshakes present it.
        replace_file(&key, &pki.other_key_pem);
        assert!(identity.reload_if_changed().unwrap());
        assert_eq!(leaf_der(&identity), pem_der(&pki.other_cert_pem));
        let client = Arc::new(client_config(&pki, Some(identity.clone())));
        let connection = handshake(client, server_config(&pki, true, 0)).unwrap();
        assert!(!connection.is_handshaking());
        // A key that cannot be parsed, or a missing file: the pair in use stays.
        replace_file(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        assert!(identity.reload_if_changed().is_err());
        std::fs::remove_file(&cert).unwrap();
        assert!(identity.reload_if_changed().unwrap_err().is_not_found());
        assert_eq!(leaf_der(&identity), pem_der(&pki.other_cert_pem));
    }

    #[test]
    fn debug_of_the_signing_key_is_redacted() {
        let pki = pki();
        let (_dir, cert, key) = write_identity(&pki, &pki.client_key_pem, 0o600);
        let identity = load_client_identity(&cert, &key, false, &provider()).unwrap();
        let debug = format!("{identity:?}");
        assert!(debug.contains("[redacted]"), "{debug}");
        let body: String = pki
            .client_key_pem
            .lines()
            .nth(1)
            .unwrap()
            .chars()
            .take(20)
            .collect();
        assert!(!debug.contains(&body), "{debug}");
    }
}
