//! The rustls client configuration for the relay: verification always on (the public web
//! roots, or `upstream.ca_file` instead), SNI and certificate name from `server_name`, ALPN
//! `h2` then `http/1.1`, the aws-lc-rs provider installed explicitly. Key material is read
//! through `secret`.

pub mod identity;
pub mod tickets;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use crate::config::UpstreamConfig;
use crate::metrics::WatchedFile;
use crate::secret::{FileStamp, Reload, file_stamp};

/// Why the TLS client could not be configured. Names the file, never secret content.
#[derive(Debug)]
pub struct TlsSetupError(String);

impl fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsSetupError {}

/// What dialing needs: the client configuration in force and the name to verify, plus what
/// is re-read when its files change (the trust anchors, the mTLS identity).
#[derive(Clone)]
pub struct TlsSetup {
    pub server_name: ServerName<'static>,
    /// The configuration new handshakes use; replaced when `upstream.ca_file` changes.
    active: Arc<RwLock<Arc<ClientConfig>>>,
    alpn: Vec<Vec<u8>>,
    /// `upstream.ca_file` and its stamp when last read (none: the public web roots).
    ca_file: Option<Arc<(PathBuf, Mutex<Option<FileStamp>>)>>,
    /// The bounded session-ticket store, when resumption is on.
    pub tickets: Option<Arc<tickets::TicketStore>>,
    /// The mTLS identity, when one is configured (re-read when its files change).
    pub identity: Option<Arc<identity::ClientIdentity>>,
}

impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The crypto provider every TLS object of the process uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide default provider (idempotent).
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Longest a session ticket is kept for resumption.
pub const TICKET_MAX_AGE: Duration = Duration::from_secs(600);

/// Builds the client configuration from `[upstream]`; `pool_size` bounds the ticket store
/// (at most one ticket per connection slot).
///
/// # Errors
/// The CA file cannot be read or holds no certificate; the mTLS identity cannot be loaded;
/// the server name is invalid. Messages name the key and file, never secret content.
pub fn setup(cfg: &UpstreamConfig, pool_size: usize) -> Result<TlsSetup, TlsSetupError> {
    let roots = match &cfg.ca_file {
        Some(path) => read_roots(path)?,
        None => rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    let ca_file = cfg
        .ca_file
        .as_ref()
        .map(|path| Arc::new((path.clone(), Mutex::new(file_stamp(path)))));
    let identity = match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(cert), Some(key)) => Some(
            identity::load_client_identity(cert, key, cfg.allow_insecure_permissions, &provider())
                .map_err(|e| TlsSetupError(format!("{}: {e}", e.key())))?,
        ),
        _ => None,
    };
    let tickets = cfg
        .session_resumption
        .then(|| tickets::TicketStore::new(pool_size, TICKET_MAX_AGE));
    let server_name = ServerName::try_from(cfg.server_name.clone()).map_err(|_| {
        TlsSetupError(format!(
            "upstream.server_name: {:?} is not a valid DNS name or IP address",
            cfg.server_name
        ))
    })?;
    let alpn: Vec<Vec<u8>> = cfg.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let config = build_config(roots, identity.as_ref(), &alpn, tickets.as_ref())?;
    Ok(TlsSetup {
        server_name,
        active: Arc::new(RwLock::new(Arc::new(config))),
        alpn,
        ca_file,
        tickets,
        identity,
    })
}

/// The trust anchors of a PEM file: at least one certificate that parses.
fn read_roots(path: &Path) -> Result<rustls::RootCertStore, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsSetupError(format!("upstream.ca_file: {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError(format!("upstream.ca_file: {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!(
            "upstream.ca_file: {} holds no PEM certificate",
            path.display()
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError(format!(
            "upstream.ca_file: none of the {ignored} certificates in {} could be parsed",
            path.display()
        )));
    }
    Ok(roots)
}

/// A client configuration: verification against `roots`, the identity (if any), ALPN in
/// order, resumption through the ticket store (or off).
fn build_config(
    roots: rustls::RootCertStore,
    identity: Option<&Arc<identity::ClientIdentity>>,
    alpn: &[Vec<u8>],
    tickets: Option<&Arc<tickets::TicketStore>>,
) -> Result<ClientConfig, TlsSetupError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(format!("TLS provider: {e}")))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(resolver) => builder.with_client_cert_resolver(resolver.clone()),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    config.resumption = match tickets {
        Some(store) => rustls::client::Resumption::store(store.clone()),
        None => rustls::client::Resumption::disabled(),
    };
    Ok(config)
}

impl TlsSetup {
    /// The configuration new handshakes use now.
    pub fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.active.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The connector for one dial. With resumption on, the dial sees the ticket store
    /// through its own generation ([`tickets::TicketStore::for_dial`]), so a handshake made
    /// with an identity or trust anchors replaced meanwhile leaves no session to resume.
    /// (A configuration clone per dial: dials are rare, a few per thousand requests.)
    pub fn connector_for_dial(&self) -> tokio_rustls::TlsConnector {
        let config = self.config();
        match &self.tickets {
            Some(store) => {
                let mut config = (*config).clone();
                config.resumption = rustls::client::Resumption::store(store.for_dial());
                tokio_rustls::TlsConnector::from(Arc::new(config))
            }
            None => tokio_rustls::TlsConnector::from(config),
        }
    }

    /// Until shutdown: checks the trust anchors' and the mTLS identity's files every
    /// `every`. New trust anchors apply to the handshakes that follow; the connections open
    /// now stay (a bundle that no longer trusts the relay's current certificate must not
    /// take the pool down). Each change is told to `on_change`; after a new identity the
    /// pool replaces its connections gracefully. Returns at once when neither file is set.
    pub async fn watch_files(
        self,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        on_change: impl Fn(WatchedFile, Reload) + Send + 'static,
    ) {
        if self.identity.is_none() && self.ca_file.is_none() {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    for (file, outcome) in [
                        (WatchedFile::CaFile, self.reload_ca_if_changed()),
                        (WatchedFile::ClientIdentity, self.reload_identity_if_changed()),
                    ] {
                        if outcome != Reload::Unchanged {
                            on_change(file, outcome);
                        }
                    }
                }
                _ = crate::shutdown::triggered(&mut shutdown) => return,
            }
        }
    }

    /// Re-reads `upstream.ca_file` when it changed. Stored sessions go with the old anchors
    /// (resuming one skips certificate verification). A file that cannot be used is logged
    /// and the anchors in force kept.
    pub fn reload_ca_if_changed(&self) -> Reload {
        let Some(ca) = &self.ca_file else {
            return Reload::Unchanged;
        };
        let (path, stamp) = &**ca;
        let now = file_stamp(path);
        {
            let mut last = stamp.lock().unwrap_or_else(|p| p.into_inner());
            if now.is_none() || *last == now {
                return Reload::Unchanged;
            }
            *last = now;
        }
        let built = read_roots(path).and_then(|roots| {
            build_config(
                roots,
                self.identity.as_ref(),
                &self.alpn,
                self.tickets.as_ref(),
            )
        });
        match built {
            Ok(config) => {
                *self.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
                if let Some(tickets) = &self.tickets {
                    tickets.clear();
                }
                tracing::info!(path = %path.display(), "trust anchors (upstream.ca_file) reloaded");
                Reload::Reloaded
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream.ca_file changed but cannot be used; keeping the trust anchors in force");
                Reload::Rejected
            }
        }
    }

    /// Re-reads the mTLS identity when its files changed. Once a new one is in use, the
    /// stored session tickets are dropped too: a resumed session carries the client
    /// authentication of the handshake that made it, so resuming one would present the old
    /// identity on a new connection. A pair that cannot be used is logged (naming the files,
    /// never their content) and the previous one kept, so no handshake fails over it.
    pub fn reload_identity_if_changed(&self) -> Reload {
        let Some(identity) = &self.identity else {
            return Reload::Unchanged;
        };
        match identity.reload_if_changed() {
            Ok(false) => Reload::Unchanged,
            Ok(true) => {
                if let Some(tickets) = &self.tickets {
                    tickets.clear();
                }
                let (cert, key) = identity.files();
                tracing::info!(cert = %cert.display(), key = %key.display(), "mTLS identity reloaded");
                Reload::Reloaded
            }
            Err(e) => {
                tracing::warn!(error = %e, "mTLS identity files changed but cannot be used; keeping the previous identity");
                Reload::Rejected
            }
        }
    }
}

/// A short, human reason for a failed handshake: the certificate problem when there is one.
pub fn describe_handshake_error(err: &std::io::Error) -> (bool, String) {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::InvalidCertificate(c) => (
                true,
                format!("relay certificate rejected: {}", certificate_reason(c)),
            ),
            other => (false, format!("TLS handshake failed: {other}")),
        };
    }
    (false, format!("TLS handshake failed: {err}"))
}

fn certificate_reason(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer => "unknown issuer (not signed by a trusted CA)".into(),
        C::Expired | C::ExpiredContext { .. } => "certificate expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "certificate not valid yet".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "certificate not valid for the configured server_name".into()
        }
        C::Revoked => "certificate revoked".into(),
        C::BadSignature => "bad signature".into(),
        other if format!("{other:?}").contains("UnsupportedCertVersion") => {
            "an X.509 v1 certificate (TLS needs v3)".into()
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn an_x509_v1_relay_certificate_is_named_as_such() {
        // A v1 certificate (what `openssl x509 -req` issues without `-extfile`).
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/x509-v1-client.pem"
        );
        let cert = CertificateDer::from_pem_file(fixture).unwrap();
        let roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let error = verifier
            .verify_server_cert(
                &cert,
                &[],
                &ServerName::try_from("relay.test").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap_err();
        let rustls::Error::InvalidCertificate(reason) = error else {
            panic!("not a certificate error: {error:?}");
        };
        assert_eq!(
            certificate_reason(&reason),
            "an X.509 v1 certificate (TLS needs v3)"
        );
    }
}
