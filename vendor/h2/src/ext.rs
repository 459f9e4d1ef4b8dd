//! Extensions specific to the HTTP/2 protocol.

use crate::hpack::BytesStr;

use bytes::Bytes;
use std::fmt;

/// Represents the `:protocol` pseudo-header used by
/// the [Extended CONNECT Protocol].
///
/// [Extended CONNECT Protocol]: https://datatracker.ietf.org/doc/html/rfc8441#section-4
#[derive(Clone, Eq, PartialEq)]
pub struct Protocol {
    value: BytesStr,
}

impl Protocol {
    /// Converts a static string to a protocol name.
    pub const fn from_static(value: &'static str) -> Self {
        Self {
            value: BytesStr::from_static(value),
        }
    }

    /// Returns a str representation of the header.
    pub fn as_str(&self) -> &str {
        self.value.as_str()
    }

    pub(crate) fn try_from(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        Ok(Self {
            value: BytesStr::try_from(bytes)?,
        })
    }
}

impl<'a> From<&'a str> for Protocol {
    fn from(value: &'a str) -> Self {
        Self {
            value: BytesStr::from(value),
        }
    }
}

impl AsRef<[u8]> for Protocol {
    fn as_ref(&self) -> &[u8] {
        self.value.as_ref()
    }
}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.value.fmt(f)
    }
}

/// A request header field HPACK-encoded once, for a value sent with many requests
/// (sprint-sidecar patch 6, PATCHES.md).
///
/// The field is encoded exactly as h2 encodes a sensitive value: a literal never indexed
/// (RFC 7541 §6.2.3), the name by its static-table index or as a Huffman-coded literal, the
/// value Huffman-coded. Such a field neither reads nor changes the dynamic table, so its
/// bytes are the same in any header block and can be appended to each one as they are.
/// [`SendRequest::send_request_with_field`](crate::client::SendRequest::send_request_with_field)
/// sends them after the request's other fields.
///
/// The bytes live wherever [`EncodedField::encode`]'s `store` put them (the sidecar: locked
/// memory), and `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedField {
    bytes: Bytes,
    /// The field's size in a header list (RFC 9113 §6.5.2: name, value and 32).
    list_size: usize,
}

impl EncodedField {
    /// Encodes `name: value` as a never-indexed literal and hands the bytes to `store`, which
    /// must return the same bytes (e.g. copied into memory of its choosing). The scratch
    /// buffer the encoding was made in is zeroed before it is freed.
    ///
    /// # Errors
    /// Whatever `store` returns.
    pub fn encode<E>(
        name: &http::header::HeaderName,
        value: &http::HeaderValue,
        store: impl FnOnce(&[u8]) -> Result<Bytes, E>,
    ) -> Result<EncodedField, E> {
        let mut value = value.clone();
        value.set_sensitive(true);
        let list_size = name.as_str().len() + value.len() + 32;
        // A fresh encoder: no table size update pending, an empty dynamic table.
        let mut scratch = bytes::BytesMut::with_capacity(list_size * 2);
        crate::hpack::Encoder::default().encode(
            std::iter::once(crate::hpack::Header::Field {
                name: Some(name.clone()),
                value,
            }),
            &mut scratch,
        );
        let stored = store(&scratch);
        scratch.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&scratch);
        Ok(EncodedField {
            bytes: stored?,
            list_size,
        })
    }

    /// The encoded field, as it goes into a header block (as secret as the value it holds).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn list_size(&self) -> usize {
        self.list_size
    }
}

impl fmt::Debug for EncodedField {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("EncodedField([redacted])")
    }
}
