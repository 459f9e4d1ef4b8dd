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
    fn header_value_rejects_control_characters_without_echoing_them() {
        let token = SecureBuffer::from_slice(b"Bearer a\x01b-s3cr3t").unwrap();
        let error = header_value(&token).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert!(error.to_string().contains("header"), "{error}");
    }
}
