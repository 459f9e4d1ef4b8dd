//! `SecretError`: why a secret could not be loaded or protected. Messages name where the
//! secret comes from and how to fix the problem; they never contain secret bytes.

use std::fmt;
use std::io;
use std::path::Path;

use super::sys;

/// A secret could not be read, stored or protected. Opaque; ask with the `is_*` predicates.
#[derive(Debug)]
pub struct SecretError {
    /// "secret file /run/secrets/token", "environment variable RELAY_TOKEN", or a label.
    origin: String,
    kind: ErrorKind,
}

/// What went wrong; shared with the sibling modules that construct errors.
#[derive(Debug)]
pub(super) enum ErrorKind {
    NotFound,
    InsecurePermissions { mode: u32, path: String },
    NotARegularFile,
    Empty,
    TooLarge { size: u64, limit: usize },
    ChangedWhileReading,
    InvalidVariableName,
    Io(io::Error),
    Alloc { bytes: usize },
    Protect(io::Error),
    LockFailed { bytes: usize, error: io::Error },
    InvalidHeaderValue,
}

impl SecretError {
    /// The file or environment variable does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.kind, ErrorKind::NotFound)
    }

    /// The file is readable or writable by group or others and that was not allowed.
    pub fn is_insecure_permissions(&self) -> bool {
        matches!(self.kind, ErrorKind::InsecurePermissions { .. })
    }

    /// The secret holds nothing but whitespace.
    pub fn is_empty(&self) -> bool {
        matches!(self.kind, ErrorKind::Empty)
    }

    /// The memory holding the secret could not be locked (see [`super::SecureBuffer::require_locked`]).
    pub fn is_lock_failed(&self) -> bool {
        matches!(self.kind, ErrorKind::LockFailed { .. })
    }

    pub(super) fn file(path: &Path) -> impl Fn(ErrorKind) -> SecretError + '_ {
        move |kind| SecretError {
            origin: format!("secret file {}", path.display()),
            kind,
        }
    }

    pub(super) fn env(var: &str, kind: ErrorKind) -> Self {
        SecretError {
            origin: format!("environment variable {var}"),
            kind,
        }
    }

    pub(super) fn labelled(label: &str, kind: ErrorKind) -> Self {
        SecretError {
            origin: label.to_owned(),
            kind,
        }
    }

    pub(crate) fn invalid_header_value(label: &str) -> Self {
        Self::labelled(label, ErrorKind::InvalidHeaderValue)
    }
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        match &self.kind {
            ErrorKind::NotFound => write!(f, "not found"),
            ErrorKind::InsecurePermissions { mode, path } => write!(
                f,
                "permission mode {mode:04o} is too open (group/others may access it); \
                 run `chmod 600 {path}`, or set allow_insecure_permissions = true to accept it \
                 (Kubernetes Secret volumes with fsGroup are 0440: the Helm chart sets it)"
            ),
            ErrorKind::NotARegularFile => write!(f, "not a regular file"),
            ErrorKind::Empty => write!(f, "is empty (nothing but whitespace)"),
            ErrorKind::TooLarge { size, limit } => {
                write!(f, "is too large ({size} bytes; the limit is {limit} bytes)")
            }
            ErrorKind::ChangedWhileReading => write!(f, "grew while it was being read; try again"),
            ErrorKind::InvalidVariableName => write!(f, "is not a valid variable name"),
            ErrorKind::Io(error) => write!(f, "cannot be read: {error}"),
            ErrorKind::Alloc { bytes } => {
                write!(f, "cannot allocate {bytes} bytes of secure memory")
            }
            ErrorKind::Protect(error) => write!(f, "cannot change memory protection: {error}"),
            ErrorKind::LockFailed { bytes, error } => {
                write!(f, "cannot lock {bytes} bytes in memory (mlock: {error})")?;
                match sys::memlock_limit() {
                    Ok(limit) => write!(
                        f,
                        "; RLIMIT_MEMLOCK is {} — raise it (`ulimit -l`, `prlimit --memlock`, \
                         systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK",
                        describe_limit(limit.soft)
                    ),
                    Err(_) => write!(f, "; raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK"),
                }
            }
            ErrorKind::InvalidHeaderValue => {
                write!(f, "is not a valid HTTP header value (control characters?)")
            }
        }
    }
}

impl std::error::Error for SecretError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io(error)
            | ErrorKind::Protect(error)
            | ErrorKind::LockFailed { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// "8388608 bytes" or "unlimited".
pub(crate) fn describe_limit(limit: Option<u64>) -> String {
    match limit {
        Some(bytes) => format!("{bytes} bytes"),
        None => "unlimited".to_owned(),
    }
}
