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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::secret::{self, FileStamp, Reload, SecretError, SecureBuffer, file_stamp};
use crate::upstream::CredentialSource;

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
}

/// The token and, while traffic flows, the header value that borrows its pages.
struct Current {
    buffer: Arc<SecureBuffer>,
    header: Option<HeaderValue>,
}

impl Current {
    fn new(buffer: SecureBuffer) -> RwLock<Current> {
        RwLock::new(Current {
            buffer: Arc::new(buffer),
            header: None,
        })
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
        })
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
                        header: None,
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
            Ok(mut c) => c.header.take().is_some(),
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
        // Load first: a store on every request would bounce the cache line between cores.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        if let Some(value) = self.current.read().ok()?.header.as_ref() {
            return Some(value.clone());
        }
        let mut current = self.current.write().ok()?;
        if current.header.is_none() {
            current.header = Some(secret::shared_header_value(&current.buffer).ok()?);
        }
        current.header.clone()
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
