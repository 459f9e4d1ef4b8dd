//! Secrets in locked, guarded, wiped memory (SPEC §7): [`SecureBuffer`], the registry the
//! self-check reads, the wiping global allocator, and every raw syscall the crate makes.
//!
//! This is the only module allowed `unsafe`; each block carries a `// SAFETY:` note.
//!
//! ```text
//!  key/token file ──read(2)──▶ SecureBuffer ──expose(|bytes| …)──▶ header value / key parse
//!  env variable ──copy, wipe original, unset──▶ SecureBuffer
//!                               │
//!                registry ◀─────┘  (regions, lock state) ──▶ hardening::self_check, metrics
//! ```
//!
//! Layout of one buffer (memsec 0.7 allocation, page size P, capacity rounded up to pages):
//!
//! ```text
//!  [ size page r-- ][ guard --- ][ canary | slack | bytes… ][ guard --- ]
//!                                 └── data region: mlock + MADV_DONTDUMP, PROT_NONE while sealed
//! ```
//!
//! What this module cannot protect, honestly: copies made outside it. `expose` hands out a
//! borrowed slice; whatever the closure copies (a `HeaderValue`, a DER copy handed to the TLS
//! library) lives in ordinary heap memory until freed — the [`WipingAllocator`] zeroes it then,
//! and `hardening`'s `lock_all` keeps it out of swap meanwhile.

#![allow(unsafe_code)]

mod allocator;
mod buffer;
mod error;
pub mod procfs;
pub mod sys;

pub use allocator::{WipingAllocator, set_wipe_on_free, wipe_on_free};
pub use buffer::{
    BufferRegion, CanaryStatus, MAX_SECRET_BYTES, PinnedRegistry, RegistryStats, SecureBuffer,
    check_canaries, pin_registry, registry,
};
pub use error::SecretError;

/// Identity of one version of a file: (modified, length, inode). A changed stamp means the
/// file was rewritten or replaced (Kubernetes swaps a Secret's files by renaming a symlink).
pub type FileStamp = (Option<std::time::SystemTime>, u64, u64);

/// What checking a watched file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The file did not change.
    Unchanged,
    /// The file changed and its new content is in use.
    Reloaded,
    /// The file changed but cannot be used; the previous content stays in use.
    Rejected,
}

/// The stamp of `path` now (following symlinks), or `None` when it cannot be read.
pub fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len(), m.ino()))
}

/// Builds the per-request credential header from `secret`: the bytes are copied into a
/// `HeaderValue` marked sensitive, so HTTP/2 never adds it to the HPACK table and `Debug`
/// prints `Sensitive`. The copy is transient; the wiping allocator zeroes it when freed.
///
/// # Errors
/// When the secret contains bytes not allowed in a header value (control characters); the
/// message names the secret's origin, never its content.
pub fn header_value(secret: &SecureBuffer) -> Result<http::HeaderValue, SecretError> {
    let mut value = secret
        .expose(http::HeaderValue::from_bytes)
        .map_err(|_| SecretError::invalid_header_value(secret.label()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Like [`header_value`], without the copy: the value points into the buffer's own pages
/// (see [`SecureBuffer::shared_bytes`]), which stay readable while any clone of it lives and
/// are sealed again when the last one drops. Cloning it per request costs a reference count,
/// not two `mprotect` calls and an allocation.
///
/// # Errors
/// As [`header_value`].
pub fn shared_header_value(secret: &SecureBuffer) -> Result<http::HeaderValue, SecretError> {
    let mut value = http::HeaderValue::from_maybe_shared(secret.shared_bytes())
        .map_err(|_| SecretError::invalid_header_value(secret.label()))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_value_is_sensitive_and_debug_hides_it() {
        let token = SecureBuffer::from_slice(b"Bearer s3cr3t-token").unwrap();
        let value = header_value(&token).unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.as_bytes(), b"Bearer s3cr3t-token");
        assert!(!format!("{value:?}").contains("s3cr3t"));
    }

    #[test]
    fn shared_header_value_borrows_the_pages_and_seals_them_when_the_last_clone_drops() {
        let mut token = SecureBuffer::from_slice(b"Bearer s3cr3t-token").unwrap();
        assert!(!token.region().is_open);
        let value = shared_header_value(&token).unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.as_bytes(), b"Bearer s3cr3t-token");
        let data = token.region().data;
        assert!(
            data.contains(&(value.as_bytes().as_ptr() as usize)),
            "no copy was made"
        );
        assert!(token.region().is_open);
        assert!(!format!("{value:?}").contains("s3cr3t"));
        let clone = value.clone();
        drop(value);
        assert!(token.region().is_open, "a clone still reads the pages");
        assert!(!token.wipe(), "no wipe under a live view");
        assert_eq!(clone.as_bytes(), b"Bearer s3cr3t-token");
        drop(clone);
        assert!(
            !token.region().is_open,
            "sealed once the last clone is gone"
        );
        assert!(token.wipe());
    }

    #[test]
    fn shared_header_value_rejects_control_characters_without_echoing_them() {
        let token = SecureBuffer::from_slice(b"Bearer a\x01b-s3cr3t").unwrap();
        let error = shared_header_value(&token).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert!(!token.region().is_open, "the rejected view was dropped");
    }

    #[test]
    fn header_value_rejects_control_characters_without_echoing_them() {
        let token = SecureBuffer::from_slice(b"Bearer a\x01b-s3cr3t").unwrap();
        let error = header_value(&token).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert!(error.to_string().contains("header"), "{error}");
    }
}
