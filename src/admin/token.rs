//! The admin bearer token (`admin.token_file`): held in a [`SecureBuffer`], compared in
//! constant time, and re-read when its file changes (SPEC §7), so a rotated Secret takes
//! effect without a restart.

use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::metrics::{Metrics, WatchedFile};
use crate::secret::{FileStamp, Reload, SecretError, SecureBuffer, file_stamp};

/// How often, at most, a request makes the token file be checked for a change.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The admin token now in force.
pub struct AdminToken {
    path: PathBuf,
    allow_insecure_permissions: bool,
    current: RwLock<SecureBuffer>,
    /// When the file was last checked, and its stamp then.
    checked: Mutex<(Instant, Option<FileStamp>)>,
    metrics: Metrics,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AdminToken {
    /// Reads the token file.
    ///
    /// # Errors
    /// Missing, empty, too large or too open a file (see [`SecureBuffer::from_file`]).
    pub fn load(
        path: PathBuf,
        allow_insecure_permissions: bool,
        metrics: Metrics,
    ) -> Result<Self, SecretError> {
        let stamp = file_stamp(&path);
        let buffer = SecureBuffer::from_file(&path, allow_insecure_permissions)?;
        Ok(AdminToken {
            path,
            allow_insecure_permissions,
            current: RwLock::new(buffer),
            checked: Mutex::new((Instant::now(), stamp)),
            metrics,
        })
    }

    /// Whether `given` is the token, in constant time. Re-reads the file first when it
    /// changed and the last check is [`CHECK_INTERVAL`] old, so an old token stops working
    /// within that time; a token that does not match makes the file be checked at once, so
    /// a new token works from its first use. A changed file that cannot be used is logged
    /// and the previous token kept.
    pub fn matches(&self, given: &[u8]) -> bool {
        self.reload_if_changed(false);
        if self.compare(given) {
            return true;
        }
        self.reload_if_changed(true) && self.compare(given)
    }

    fn compare(&self, given: &[u8]) -> bool {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current.expose(|expected| expected.ct_eq(given).into())
    }

    /// Re-reads the file if it changed (when `now` is false, only if the last check is
    /// [`CHECK_INTERVAL`] old); true when a new token took over.
    fn reload_if_changed(&self, now: bool) -> bool {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if !now && checked.0.elapsed() < CHECK_INTERVAL {
            return false;
        }
        checked.0 = Instant::now();
        let stamp = file_stamp(&self.path);
        if stamp.is_none() || stamp == checked.1 {
            return false;
        }
        checked.1 = stamp;
        match SecureBuffer::from_file(&self.path, self.allow_insecure_permissions) {
            Ok(buffer) => {
                // The previous buffer is wiped as it drops here.
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = buffer;
                info!(path = %self.path.display(), "admin token reloaded");
                self.metrics
                    .secret_reload(WatchedFile::AdminToken, Reload::Reloaded);
                true
            }
            Err(e) => {
                warn!(error = %e, "admin token file changed but cannot be used; keeping the previous token");
                self.metrics
                    .secret_reload(WatchedFile::AdminToken, Reload::Rejected);
                false
            }
        }
    }

    #[cfg(test)]
    fn check_now(&self) {
        self.checked.lock().unwrap().0 = Instant::now() - CHECK_INTERVAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn write(path: &std::path::Path, contents: &[u8]) {
        let staging = path.with_extension("staging");
        let mut file = std::fs::File::create(&staging).unwrap();
        file.write_all(contents).unwrap();
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&staging, path).unwrap();
    }

    #[test]
    fn a_rotated_token_replaces_the_old_one_and_a_bad_file_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        write(&path, b"first-admin-token");
        let metrics = Metrics::new(1);
        let token = AdminToken::load(path.clone(), false, metrics.clone()).unwrap();
        assert!(token.matches(b"first-admin-token"));
        assert!(!token.matches(b"second-admin-token"));
        write(&path, b"second-admin-token");
        // The new token works from its first use: a token that does not match makes the
        // file be checked at once.
        assert!(token.matches(b"second-admin-token"));
        assert!(
            !token.matches(b"first-admin-token"),
            "the old token is refused"
        );
        // An empty file cannot be a token: the one in force stays.
        write(&path, b"");
        token.check_now();
        assert!(token.matches(b"second-admin-token"));
        assert!(!token.matches(b""));
        // Nor can a file that others may read.
        write(&path, b"third-admin-token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        token.check_now();
        assert!(token.matches(b"second-admin-token"));
        assert!(
            !format!("{token:?}").contains("second"),
            "Debug shows no token"
        );
        let text = metrics.encode(&crate::metrics::ScrapeValues::default(), false);
        for (outcome, count) in [("reloaded", 1), ("rejected", 2)] {
            let line = format!(
                "sprint_sidecar_secret_reloads_total{{file=\"admin_token\",outcome=\"{outcome}\"}} {count}"
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
    }
}
