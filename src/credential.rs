//! The relay credential: read into a [`SecureBuffer`] from `upstream.auth_token_file` (re-read
//! when the file changes) or `upstream.auth_token_env` (scrubbed from the environment), and
//! handed to the upstream facade as a sensitive header value per request.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::secret::{self, SecretError, SecureBuffer};
use crate::upstream::CredentialSource;

/// How often the token file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Identity of a file version: (modified, length, inode).
type FileStamp = (Option<SystemTime>, u64, u64);

fn stamp(path: &PathBuf) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len(), m.ino()))
}

/// The credential currently injected into upstream requests.
pub struct TokenCredential {
    current: RwLock<Arc<SecureBuffer>>,
    file: Option<(PathBuf, bool)>,
    stamp: RwLock<Option<FileStamp>>,
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
        let before = stamp(&path);
        let buffer = SecureBuffer::from_file(&path, allow_insecure_permissions)?;
        secret::header_value(&buffer)?;
        Ok(TokenCredential {
            current: RwLock::new(Arc::new(buffer)),
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
            current: RwLock::new(Arc::new(buffer)),
            file: None,
            stamp: RwLock::new(None),
        })
    }

    /// Re-reads the token file if it changed; true when a new token was installed. A bad
    /// new file is logged and the old token kept, so no request fails.
    pub fn reload_if_changed(&self) -> bool {
        let Some((path, allow)) = &self.file else {
            return false;
        };
        let now = stamp(path);
        if now.is_none() || self.stamp.read().is_ok_and(|s| *s == now) {
            return false;
        }
        match SecureBuffer::from_file(path, *allow)
            .and_then(|b| secret::header_value(&b).map(|_| b))
        {
            Ok(buffer) => {
                if let Ok(mut c) = self.current.write() {
                    // The old buffer is wiped when its last in-flight user drops it.
                    *c = Arc::new(buffer);
                }
                if let Ok(mut s) = self.stamp.write() {
                    *s = now;
                }
                info!(path = %path.display(), "relay token reloaded");
                true
            }
            Err(e) => {
                warn!(error = %e, "relay token file changed but cannot be used; keeping the previous token");
                if let Ok(mut s) = self.stamp.write() {
                    *s = now;
                }
                false
            }
        }
    }

    /// Watches the token file until shutdown; calls `on_change` after each reload.
    pub async fn watch(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        on_change: impl Fn() + Send + 'static,
    ) {
        if self.file.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {
                    if self.reload_if_changed() {
                        on_change();
                    }
                }
                _ = crate::shutdown::triggered(&mut shutdown) => return,
            }
        }
    }
}

impl CredentialSource for TokenCredential {
    fn header_value(&self) -> Option<HeaderValue> {
        let buffer = self.current.read().ok()?.clone();
        secret::header_value(&buffer).ok()
    }
}
