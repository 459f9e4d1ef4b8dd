//! The load generator's own HTTP/1.1 client (`LOAD_CLIENT=wire`, the default): a request is
//! one prepared byte string written with one `write`, an answer is read into one reused
//! buffer and framed with `httparse` (Content-Length or chunked). Nothing is allocated per
//! request. It shares the load core with the relay, so every microsecond it spends there
//! is one the relay lacks: hyper's client (`LOAD_CLIENT=hyper`) costs that core about as
//! much as the relay does, and with it the harness measured the load core more than the
//! proxies (README, Performance).
//!
//! ```text
//!  request bytes ──write──▶ proxy ──▶ … ──▶ answer bytes ──read──▶ buffer ──▶ httparse
//!                                                                   (head, length, chunks)
//! ```

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A byte stream the client can talk over: TCP, or TLS for the direct reference.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The first read buffer; it grows (to [`MAX_BUFFER`]) only for an answer that needs it.
const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 4 * 1024 * 1024;

/// Most header fields an answer may carry.
const MAX_HEADERS: usize = 64;

/// What the client needs from one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `x-relay-connection-id` (0 when absent): which relay connection carried it.
    pub relay_connection: u32,
    /// The answer said `Connection: close`: the connection is done after it.
    pub close: bool,
}

/// The prepared bytes of the harness's request: `POST /` with a JSON body.
pub fn request_bytes(host: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST / HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One keep-alive connection.
pub struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Conn {
    pub fn new(io: Box<dyn Io>) -> Self {
        Conn {
            io,
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// Writes `request` and reads its answer to the end.
    pub async fn exchange(&mut self, request: &[u8]) -> io::Result<Answer> {
        self.io.write_all(request).await?;
        self.io.flush().await?;
        loop {
            match parse(&self.buf[self.start..self.end]).map_err(invalid)? {
                Parsed::Answer { consumed, answer } => {
                    self.start += consumed;
                    if self.start == self.end {
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok(answer);
                }
                Parsed::Interim { consumed } => self.start += consumed,
                Parsed::Partial => self.fill().await?,
            }
        }
    }

    /// Reads more bytes after `end`, making room first.
    async fn fill(&mut self) -> io::Result<()> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_BUFFER {
                let grown = (self.buf.len() * 2).min(MAX_BUFFER);
                self.buf.resize(grown, 0);
            } else {
                return Err(invalid(format!(
                    "an answer needs more than {MAX_BUFFER} bytes of buffer"
                )));
            }
        }
        let read = self.io.read(&mut self.buf[self.end..]).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before the answer ended",
            ));
        }
        self.end += read;
        Ok(())
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// What the bytes at hand hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole answer yet.
    Partial,
    /// A 1xx head to skip (not 101), `consumed` bytes long.
    Interim { consumed: usize },
    /// A whole answer, `consumed` bytes long (head and body).
    Answer { consumed: usize, answer: Answer },
}

/// Frames one answer at the start of `bytes` (RFC 9112 §6: Content-Length or chunked; an
/// answer whose length only the connection's end would tell is refused, as no proxy here
/// sends one).
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(error) => return Err(format!("invalid answer head: {error}")),
    };
    let status = response.code.unwrap_or(0);
    if (100..200).contains(&status) && status != 101 {
        return Ok(Parsed::Interim { consumed: head_len });
    }
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    let mut relay_connection = 0;
    for field in response.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(field.value)
                .ok()
                .and_then(|text| text.trim().parse::<usize>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|known| known != value) {
                return Err("conflicting Content-Length fields".to_owned());
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = field
                .value
                .rsplit(|byte| *byte == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            close = field
                .value
                .split(|byte| *byte == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("x-relay-connection-id") {
            relay_connection = std::str::from_utf8(field.value)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    let answer = Answer {
        status,
        relay_connection,
        close,
    };
    let body = &bytes[head_len..];
    let body_len = if status == 204 || status == 304 {
        Some(0)
    } else if chunked {
        chunked_length(body)?
    } else if let Some(length) = length {
        (body.len() >= length).then_some(length)
    } else {
        return Err(format!(
            "a {status} answer without Content-Length or chunked coding"
        ));
    };
    Ok(match body_len {
        Some(body_len) => Parsed::Answer {
            consumed: head_len + body_len,
            answer,
        },
        None => Parsed::Partial,
    })
}

/// The length of the chunked body at the start of `body` (its last chunk and trailer
/// section included), or None while it is incomplete.
fn chunked_length(body: &[u8]) -> Result<Option<usize>, String> {
    let mut at = 0;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&body[at..]) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("invalid chunk size".to_owned()),
        };
        at += size_len;
        if size == 0 {
            // Trailer fields, if any, then an empty line.
            let rest = &body[at..];
            if rest.starts_with(b"\r\n") {
                return Ok(Some(at + 2));
            }
            return Ok(rest
                .windows(4)
                .position(|window| window == b"\r\n\r\n")
                .map(|end| at + end + 4));
        }
        let size = usize::try_from(size).map_err(|_| "a chunk too large".to_owned())?;
        let Some(after) = at.checked_add(size).and_then(|end| end.checked_add(2)) else {
            return Err("a chunk too large".to_owned());
        };
        if body.len() < after {
            return Ok(None);
        }
        if &body[after - 2..after] != b"\r\n" {
            return Err("a chunk not followed by CRLF".to_owned());
        }
        at = after;
    }
}
