//! The load harness's own HTTP/1.1 client (`benches/load/wire.rs`): its framing tests run
//! here, because bench targets are not test targets.

#[allow(dead_code)]
#[path = "../benches/load/wire.rs"]
mod wire;

use wire::{Answer, Parsed, parse, request_bytes};

fn answer(consumed: usize, status: u16, relay_connection: u32, close: bool) -> Parsed {
    Parsed::Answer {
        consumed,
        answer: Answer {
            status,
            relay_connection,
            close,
        },
    }
}

#[test]
fn content_length_frames_the_answer_and_leaves_what_follows() {
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nx-relay-connection-id: 7\r\n\r\n";
    let mut bytes = head.to_vec();
    bytes.extend_from_slice(b"hello");
    assert_eq!(parse(&bytes[..bytes.len() - 1]), Ok(Parsed::Partial));
    assert_eq!(parse(&bytes), Ok(answer(bytes.len(), 200, 7, false)));
    bytes.extend_from_slice(b"HTTP/1.1 200 OK");
    assert_eq!(parse(&bytes), Ok(answer(head.len() + 5, 200, 7, false)));
}

#[test]
fn chunked_answers_end_at_the_last_chunk_and_trailers() {
    let bytes = b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    for cut in 0..bytes.len() {
        assert_eq!(parse(&bytes[..cut]), Ok(Parsed::Partial), "cut at {cut}");
    }
    assert_eq!(parse(bytes), Ok(answer(bytes.len(), 502, 0, true)));
    let trailers = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: 1\r\n\r\n";
    assert_eq!(parse(trailers), Ok(answer(trailers.len(), 200, 0, false)));
}

#[test]
fn interim_heads_are_skipped_and_bad_framing_is_refused() {
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    assert_eq!(
        parse(interim),
        Ok(Parsed::Interim {
            consumed: interim.len()
        })
    );
    assert!(parse(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err());
    assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err());
    assert!(parse(b"NOT HTTP\r\n\r\n").is_err());
    assert_eq!(
        parse(b"HTTP/1.1 204 No Content\r\n\r\n"),
        Ok(answer(27, 204, 0, false))
    );
}

#[test]
fn the_request_is_a_complete_post() {
    let bytes = request_bytes("127.0.0.1:80", b"{}");
    assert_eq!(
        bytes,
        b"POST / HTTP/1.1\r\nhost: 127.0.0.1:80\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    );
}
