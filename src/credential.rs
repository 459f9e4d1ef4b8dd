//! The relay credential: read into a [`SecureBuffer`] from `upstream.auth_token_file` (re-read
//! when the file changes) or `upstream.auth_token_env` (scrubbed from the environment), and
//! handed to the upstream facade as a sensitive header value per request.
//!
//! The header value points into the buffer's locked pages (no heap copy of the token is made
//! here) and is shared by the requests of a burst: the pages are readable while traffic
//! flows and sealed (`PROT_NONE`) again once no request has asked for the token for one
//! [`SEAL_AFTER_IDLE`] period. Sealing per request instead cost two `mprotect` calls, each
//! with a TLB shootdown, on every request — about a tenth of the proxy's CPU at load — while
//! leaving the pages readable nearly all the time under load anyway.
//!
//! Given the header's name ([`TokenCredential::with_header_name`]), each burst also encodes
//! the whole field once as HTTP/2 sends it (a never-indexed HPACK literal, the token
//! Huffman-coded) into a locked buffer of its own, which HTTP/2 relay connections send as it
//! is: the per-request Huffman coding of the token was about 2% of the proxy's instructions.
//! That buffer is released (wiped) when the burst's last request is done.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::secret::{self, FileStamp, Reload, SecretError, SecureBuffer, file_stamp};
use crate::upstream::{Credential, CredentialSource};

/// How often the token file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The shared header value is dropped (and the token's pages sealed once in-flight requests
/// finish) when no request used it during one such period: sealed 250–500 ms after traffic
/// stops.
pub const SEAL_AFTER_IDLE: Duration = Duration::from_millis(250);

/// The credential currently injected into upstream requests.
pub struct TokenCredential {
    current: RwLock<Current>,
    /// Set by every request; cleared by the idle sweep.
    used: AtomicBool,
    file: Option<(PathBuf, bool)>,
    stamp: RwLock<Option<FileStamp>>,
    /// The header the token is sent in, for the HTTP/2 field encoded per burst (none: no
    /// such field, the value is encoded per request).
    name: Option<HeaderName>,
}

/// The token and, while traffic flows, the forms requests share: the header value that
/// borrows its pages, and the HTTP/2 field encoded from it.
struct Current {
    buffer: Arc<SecureBuffer>,
    shared: Option<Credential>,
}

impl Current {
    fn new(buffer: SecureBuffer) -> RwLock<Current> {
        RwLock::new(Current {
            buffer: Arc::new(buffer),
            shared: None,
        })
    }
}

/// `name: value` as HTTP/2 sends it, encoded into a locked buffer of its own; the returned
/// field borrows that buffer's pages, which are wiped and released with its last clone.
fn encoded_field(name: &HeaderName, value: &HeaderValue) -> Option<h2::ext::EncodedField> {
    let field = h2::ext::EncodedField::encode(name, value, |encoded| {
        SecureBuffer::build(
            "relay token field (HTTP/2, HPACK-encoded)",
            encoded.len(),
            |buffer| {
                buffer.copy_from_slice(encoded);
                Ok::<_, SecretError>(encoded.len())
            },
        )
        .map(|buffer| buffer.shared_bytes())
    });
    match field {
        Ok(field) => Some(field),
        Err(e) => {
            // Requests still carry the token, HPACK-encoded per request as before.
            warn!(error = %e, "cannot keep the relay token's HTTP/2 field in locked memory");
            None
        }
    }
}

impl std::fmt::Debug for TokenCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCredential([redacted])")
    }
}

impl TokenCredential {
    /// Loads the token from its file (mode checked unless `allow_insecure_permissions`).
    ///
    /// # Errors
    /// The file is missing, empty, too open or not a valid header value.
    pub fn from_file(path: PathBuf, allow_insecure_permissions: bool) -> Result<Self, SecretError> {
        let before = file_stamp(&path);
        let buffer = SecureBuffer::from_file(&path, allow_insecure_permissions)?;
        secret::header_value(&buffer)?;
        Ok(TokenCredential {
            current: Current::new(buffer),
            used: AtomicBool::new(false),
            file: Some((path, allow_insecure_permissions)),
            stamp: RwLock::new(before),
            name: None,
        })
    }

    /// Moves the token out of environment variable `var` (which is then removed).
    ///
    /// # Errors
    /// The variable is unset, empty or not a valid header value.
    pub fn from_env(var: &str) -> Result<Self, SecretError> {
        let buffer = SecureBuffer::from_env(var)?;
        secret::header_value(&buffer)?;
        Ok(TokenCredential {
            current: Current::new(buffer),
            used: AtomicBool::new(false),
            file: None,
            stamp: RwLock::new(None),
            name: None,
        })
    }

    /// Also keeps, per burst of traffic, the field `name: token` encoded as HTTP/2 sends it
    /// (see the module's documentation); `name` must be the header the token is sent in.
    #[must_use]
    pub fn with_header_name(mut self, name: HeaderName) -> Self {
        self.name = Some(name);
        self
    }

    /// Re-reads the token file if it changed. A bad new file is logged and the old token
    /// kept, so no request fails.
    pub fn reload_if_changed(&self) -> Reload {
        let Some((path, allow)) = &self.file else {
            return Reload::Unchanged;
        };
        let now = file_stamp(path);
        if now.is_none() || self.stamp.read().is_ok_and(|s| *s == now) {
            return Reload::Unchanged;
        }
        match SecureBuffer::from_file(path, *allow)
            .and_then(|b| secret::header_value(&b).map(|_| b))
        {
            Ok(buffer) => {
                if let Ok(mut c) = self.current.write() {
                    // The old buffer is wiped when its last in-flight user drops it.
                    *c = Current {
                        buffer: Arc::new(buffer),
                        shared: None,
                    };
                }
                if let Ok(mut s) = self.stamp.write() {
                    *s = now;
                }
                info!(path = %path.display(), "relay token reloaded");
                Reload::Reloaded
            }
            Err(e) => {
                warn!(error = %e, "relay token file changed but cannot be used; keeping the previous token");
                if let Ok(mut s) = self.stamp.write() {
                    *s = now;
                }
                Reload::Rejected
            }
        }
    }

    /// Drops the shared header value when no request used it since the last call, so the
    /// token's pages are sealed once in-flight requests release it; true when it did.
    pub fn seal_if_idle(&self) -> bool {
        if self.used.swap(false, Ordering::Relaxed) {
            return false;
        }
        match self.current.write() {
            Ok(mut c) => c.shared.take().is_some(),
            Err(_) => false,
        }
    }

    /// Until shutdown: seals the token after [`SEAL_AFTER_IDLE`] without requests, and
    /// re-reads the token file every [`RELOAD_INTERVAL`], telling `on_change` what a change
    /// of the file came to.
    pub async fn watch(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        on_change: impl Fn(Reload) + Send + 'static,
    ) {
        let mut ticks = tokio::time::interval(SEAL_AFTER_IDLE);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reload = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    self.seal_if_idle();
                    if last_reload.elapsed() >= RELOAD_INTERVAL {
                        last_reload = tokio::time::Instant::now();
                        match self.reload_if_changed() {
                            Reload::Unchanged => {}
                            outcome => on_change(outcome),
                        }
                    }
                }
                _ = crate::shutdown::triggered(&mut shutdown) => return,
            }
        }
    }
}

impl CredentialSource for TokenCredential {
    fn header_value(&self) -> Option<HeaderValue> {
        self.credential().map(|c| c.value)
    }

    fn credential(&self) -> Option<Credential> {
        // Load first: a store on every request would bounce the cache line between cores.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        if let Some(shared) = self.current.read().ok()?.shared.as_ref() {
            return Some(shared.clone());
        }
        let mut current = self.current.write().ok()?;
        if current.shared.is_none() {
            let value = secret::shared_header_value(&current.buffer).ok()?;
            let h2_field = self
                .name
                .as_ref()
                .and_then(|name| encoded_field(name, &value));
            current.shared = Some(Credential { value, h2_field });
        }
        current.shared.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn is_open(credential: &TokenCredential) -> bool {
        credential.current.read().unwrap().buffer.region().is_open
    }

    fn token_file(dir: &tempfile::TempDir, token: &str) -> PathBuf {
        let path = dir.path().join("token");
        std::fs::write(&path, token).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    #[test]
    fn requests_share_one_value_in_the_pages_which_seal_after_an_idle_period() {
        let dir = tempfile::tempdir().unwrap();
        let credential =
            TokenCredential::from_file(token_file(&dir, "Bearer one\n"), false).unwrap();
        assert!(!is_open(&credential), "sealed before the first request");
        let first = credential.header_value().unwrap();
        let second = credential.header_value().unwrap();
        assert_eq!(first.as_bytes(), b"Bearer one");
        assert!(first.is_sensitive());
        assert_eq!(
            first.as_bytes().as_ptr(),
            second.as_bytes().as_ptr(),
            "shared, not copied"
        );
        assert!(is_open(&credential));
        assert!(
            !credential.seal_if_idle(),
            "used since the last sweep: stays open"
        );
        assert!(
            credential.seal_if_idle(),
            "idle for a whole period: dropped"
        );
        assert!(
            is_open(&credential),
            "in-flight requests still hold the value"
        );
        drop((first, second));
        assert!(
            !is_open(&credential),
            "sealed when the last request is done"
        );
        assert_eq!(credential.header_value().unwrap().as_bytes(), b"Bearer one");
    }

    #[test]
    fn each_burst_keeps_the_http2_field_in_a_locked_buffer_of_its_own_released_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let plain = TokenCredential::from_file(token_file(&dir, "Bearer one"), false).unwrap();
        assert!(
            plain.credential().unwrap().h2_field.is_none(),
            "no header name, no field"
        );
        let credential = TokenCredential::from_file(token_file(&dir, "Bearer one"), false)
            .unwrap()
            .with_header_name(HeaderName::from_static("authorization"));
        let first = credential.credential().unwrap();
        assert_eq!(first.value.as_bytes(), b"Bearer one");
        let field = first.h2_field.clone().expect("a field encoded for HTTP/2");
        // A literal never indexed (0001xxxx) naming static-table entry 23 (`authorization`):
        // 0x1f 0x08; then the value, Huffman-coded (H bit): 56 bits, 7 bytes, for these 10.
        assert_eq!(&field.as_bytes()[..3], &[0x1f, 0x08, 0x80 | 7]);
        assert_eq!(field.as_bytes().len(), 3 + 7);
        assert!(!format!("{first:?}{field:?}").contains("one"));
        let at = field.as_bytes().as_ptr() as usize;
        let region = crate::secret::registry()
            .regions
            .into_iter()
            .find(|r| r.data.contains(&at))
            .expect("the field lies in a secure buffer");
        assert!(region.label.contains("HTTP/2"), "{}", region.label);
        assert!(region.is_open, "readable while the burst lasts");
        let second = credential.credential().unwrap();
        assert_eq!(
            second.h2_field.as_ref().map(|f| f.as_bytes().as_ptr()),
            Some(field.as_bytes().as_ptr()),
            "requests of a burst share one field"
        );
        assert!(!credential.seal_if_idle());
        assert!(credential.seal_if_idle(), "idle: the burst's forms dropped");
        let alive = |id| crate::secret::registry().regions.iter().any(|r| r.id == id);
        assert!(alive(region.id), "in-flight requests still hold the field");
        drop((first, second, field));
        assert!(!alive(region.id), "released with its last request");
        let next = credential.credential().unwrap();
        assert_eq!(
            next.h2_field.map(|f| f.as_bytes()[..3].to_vec()),
            Some(vec![0x1f, 0x08, 0x80 | 7]),
            "the next burst encodes it again"
        );
    }

    #[test]
    fn a_reload_replaces_the_shared_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_file(&dir, "Bearer one");
        let credential = TokenCredential::from_file(path.clone(), false).unwrap();
        let old = credential.header_value().unwrap();
        std::fs::write(dir.path().join("next"), "Bearer two").unwrap();
        std::fs::set_permissions(
            dir.path().join("next"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::rename(dir.path().join("next"), &path).unwrap();
        assert_eq!(credential.reload_if_changed(), Reload::Reloaded);
        assert_eq!(credential.header_value().unwrap().as_bytes(), b"Bearer two");
        assert_eq!(
            old.as_bytes(),
            b"Bearer one",
            "an in-flight request keeps its value"
        );
    }
}
