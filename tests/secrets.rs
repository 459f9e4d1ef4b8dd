//! End to end, real binary, real TLS: SPEC §7. The relay credential reaches the relay and
//! nowhere else — not the app, the logs, the admin API, the metrics or `/proc/PID/environ` —;
//! in memory it lives in locked pages, and after a rotation no copy of the old one is left; the
//! self-check passes as root and tells the truth in a degraded run; secret files that are too
//! open and mismatched mTLS pairs are refused with exit status 2.
//!
//! The memory scans read `/proc/PID/smaps` and `/proc/PID/mem` of the running sidecar. The
//! sidecar makes itself non-dumpable, so only a process with `CAP_SYS_PTRACE` (root) may read
//! them: those tests, and the ones that switch to an unprivileged user, are skipped with a
//! message when the tests do not run as root.
//!
//! What a scan asserts, and why (decided here, see each test):
//! - Every mapping with resident or swapped pages is read, *including* `PROT_NONE` ones:
//!   `/proc/PID/mem` reads through page protections (FOLL_FORCE), so a sealed SecureBuffer is
//!   visible to the scan. A page that is neither resident nor swapped holds zeroes or the
//!   unmodified file it maps (binary, libraries), never a token, so it is skipped.
//! - The current token must be found at least once, in a mapping that is sealed (`---p`),
//!   locked (`lo`) and excluded from dumps (`dd`): the SecureBuffer, as the kernel sees it.
//!   This also proves that the scan can see sealed memory, so "not found" means something.
//! - With `memory.lock_all = true` every copy of the current token must be in a locked mapping
//!   (`VmFlags` has `lo`, or `Locked:` equals `Rss:`).
//! - After rotation and traffic no copy of the old token may remain anywhere: neither its raw
//!   bytes (HTTP/1.1 header buffers, `HeaderValue`s) nor its HPACK Huffman encoding (what the
//!   h2 encoder writes for a never-indexed header value), each also searched by halves because
//!   malloc overwrites the first 16 bytes of a freed block. "After" means once every relay
//!   connection that carried the old token is closed (the pool rotates them on reload): a
//!   live connection's reused write buffer legitimately holds the last header it sent.
//!
//! Limits, written down: a scan is a snapshot, so a copy that lives only while a request is
//! in flight is not judged (the claim is about what remains); CPU registers and kernel memory
//! (socket buffers) are out of reach; `/proc/PID/environ` is the process's initial
//! environment block, which can be overwritten but not shrunk, so after `auth_token_env` the
//! variable's name stays visible there with an empty value — its value must be gone.

mod support;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::pki::write_with_mode;
use support::{Proto, Relay, Sidecar, SidecarBuilder};
use tokio::task::JoinSet;

/// The uid/gid the unprivileged runs switch to (`nobody`/`nogroup` on Debian).
const NOBODY: u32 = 65534;

/// Requests sent after a rotation before the old token must be gone.
const TRAFFIC_AFTER_ROTATION: usize = 200;

// ---- tokens ----

/// A relay token: 48 random lowercase hex digits, unique to one test, so a match in memory
/// or output cannot be a coincidence.
#[derive(Clone)]
struct Token(String);

impl Token {
    fn new() -> Self {
        let mut random = [0u8; 24];
        fs::File::open("/dev/urandom")
            .and_then(|mut file| file.read_exact(&mut random))
            .expect("/dev/urandom is readable");
        Token(random.iter().map(|byte| format!("{byte:02x}")).collect())
    }

    fn as_str(&self) -> &str {
        &self.0
    }

    /// The forms the token takes in the sidecar's memory: its bytes, and the whole bytes of
    /// its HPACK Huffman encoding (RFC 7541 §5.2, Appendix B), which is how the h2 crate
    /// writes every header string literal, sensitive or not. Each also by halves: malloc
    /// overwrites the first 16 bytes of a freed block with its list pointers, so a copy in
    /// freed memory is only visible by its tail.
    fn needles(&self) -> Vec<Needle> {
        let raw = self.0.as_bytes().to_vec();
        let huffman = huffman_full_bytes(&raw);
        let half = |bytes: &[u8], head: bool| {
            let middle = bytes.len() / 2;
            if head {
                bytes[..middle].to_vec()
            } else {
                bytes[middle..].to_vec()
            }
        };
        vec![
            Needle {
                form: "raw",
                bytes: raw.clone(),
            },
            Needle {
                form: "raw first half",
                bytes: half(&raw, true),
            },
            Needle {
                form: "raw second half",
                bytes: half(&raw, false),
            },
            Needle {
                form: "hpack-huffman",
                bytes: huffman.clone(),
            },
            Needle {
                form: "hpack-huffman first half",
                bytes: half(&huffman, true),
            },
            Needle {
                form: "hpack-huffman second half",
                bytes: half(&huffman, false),
            },
        ]
    }

    /// The needle of one form (see [`Token::needles`]).
    fn needle(&self, form: &str) -> Needle {
        self.needles()
            .into_iter()
            .find(|needle| needle.form == form)
            .unwrap_or_else(|| panic!("no needle form {form:?}"))
    }

    /// 16-byte windows of the token: a log line or document holding a truncated token leaks too.
    fn windows(&self) -> impl Iterator<Item = &str> {
        (0..=self.0.len() - 16).map(move |start| &self.0[start..start + 16])
    }
}

/// The HPACK Huffman code (code, bit length) of a lowercase hex digit (RFC 7541 Appendix B).
fn huffman_code(byte: u8) -> (u32, u32) {
    match byte {
        b'0' => (0x0, 5),
        b'1' => (0x1, 5),
        b'2' => (0x2, 5),
        b'3' => (0x19, 6),
        b'4' => (0x1a, 6),
        b'5' => (0x1b, 6),
        b'6' => (0x1c, 6),
        b'7' => (0x1d, 6),
        b'8' => (0x1e, 6),
        b'9' => (0x1f, 6),
        b'a' => (0x3, 5),
        b'b' => (0x23, 6),
        b'c' => (0x4, 5),
        b'd' => (0x24, 6),
        b'e' => (0x5, 5),
        b'f' => (0x25, 6),
        other => panic!("test tokens are lowercase hex, not {other:#x}"),
    }
}

/// The whole bytes of the Huffman encoding of `value` (the last, padded byte left out: its
/// padding bits are not part of the value).
fn huffman_full_bytes(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u64, 0u32);
    for &byte in value {
        let (code, length) = huffman_code(byte);
        bits = (bits << length) | u64::from(code);
        count += length;
        while count >= 8 {
            out.push((bits >> (count - 8)) as u8);
            count -= 8;
        }
    }
    out
}

#[test]
fn huffman_encoding_of_the_hex_alphabet_matches_rfc_7541() {
    // 00000 00001 00010 011001 011010 011011 011100 011101 011110 011111 00011 100011 00100
    // 100100 00101 100101: 90 bits, 11 whole bytes.
    assert_eq!(
        huffman_full_bytes(b"0123456789abcdef"),
        vec![
            0x00, 0x44, 0xcb, 0x4d, 0xb8, 0xeb, 0xcf, 0x8e, 0x32, 0x48, 0x59
        ],
    );
}

/// The needle is what the h2 crate really writes: a request with the token as a sensitive
/// `authorization` value, captured on the wire of an in-memory connection.
#[tokio::test]
async fn huffman_needle_is_what_h2_writes_for_a_sensitive_header() {
    use tokio::io::AsyncReadExt;
    let token = Token::new();
    let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
    let (sender, connection) = h2::client::handshake(client_io)
        .await
        .expect("an h2 handshake over a duplex pipe");
    let driver = tokio::spawn(connection);
    let mut value = http::HeaderValue::from_str(token.as_str()).expect("hex is a header value");
    value.set_sensitive(true);
    let request = http::Request::get("https://relay.test/")
        .header("authorization", value)
        .body(())
        .expect("a valid request");
    let mut sender = sender.ready().await.expect("the connection is ready");
    let _response = sender
        .send_request(request, true)
        .expect("the request is queued");
    let mut wire = Vec::new();
    let huffman = token.needle("hpack-huffman");
    let raw_tail = token.needle("raw second half");
    let deadline = Instant::now() + Duration::from_secs(5);
    while find_all(&wire, &huffman.bytes).is_empty() && Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(500), server_io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => wire.extend_from_slice(&chunk[..n]),
            _ => {}
        }
    }
    driver.abort();
    assert!(
        !find_all(&wire, &huffman.bytes).is_empty(),
        "h2 wrote the token's Huffman form"
    );
    assert!(
        find_all(&wire, &raw_tail.bytes).is_empty(),
        "h2 does not write the raw token"
    );
}

// ---- starting things ----

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Skips the calling test (returns true) when it cannot run here.
fn skip_unless_root(what: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("skipped: {what} needs root (CAP_SYS_PTRACE to read a non-dumpable process)");
    true
}

/// Writes `token` (with a trailing newline, as editors and `echo` leave it) to
/// `<dir>/relay.token` with `mode` and returns the path.
fn write_token(builder: &SidecarBuilder, token: &Token, mode: u32) -> PathBuf {
    builder.write_file(
        "relay.token",
        format!("{}\n", token.as_str()).as_bytes(),
        mode,
    )
}

/// Replaces the token file atomically, as Kubernetes and `mv` do: write a new file, rename
/// it over the old one.
fn rotate(path: &Path, token: &Token) {
    let staging = path.with_extension("staging");
    write_with_mode(&staging, format!("{}\n", token.as_str()).as_bytes(), 0o600);
    fs::rename(&staging, path).expect("the new token file can be renamed over the old one");
}

/// A relay speaking `protocol` and a ready sidecar in front of it, injecting a token read
/// from a 0600 file. Returns the token file's path too.
async fn start_with_token_file(
    protocol: Proto,
    token: &Token,
    configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) -> (Relay, Sidecar, PathBuf) {
    let relay = Relay::builder().protocol(protocol).start().await;
    let builder = Sidecar::builder().relay(&relay);
    let path = write_token(&builder, token, 0o600);
    let sidecar =
        configure(builder.set_str("upstream", "auth_token_file", &path.display().to_string()))
            .start()
            .await;
    sidecar.wait_ready().await;
    (relay, sidecar, path)
}

// ---- traffic ----

/// Sends `count` requests through the sidecar, 8 at a time, alternating `GET /status/200`
/// and a JSON-RPC `POST /`, each with the app's own `Authorization`, which must not reach
/// the relay. The relay's answers never echo headers, so the token does not come back.
async fn traffic(sidecar: &Sidecar, count: usize) {
    let client = support::client();
    let mut tasks = JoinSet::new();
    let mut failures = Vec::new();
    for i in 0..count {
        if tasks.len() >= 8
            && let Some(outcome) = tasks.join_next().await
            && let Err(error) = outcome.expect("request task does not panic")
        {
            failures.push(error);
        }
        let client = client.clone();
        let get_url = sidecar.data_url(&format!("/status/200?n={i}"));
        let rpc_url = sidecar.data_url("/");
        tasks.spawn(async move {
            let request = if i % 2 == 0 {
                client.get(get_url)
            } else {
                client.post(rpc_url).json(&serde_json::json!({
                    "jsonrpc": "2.0", "id": i, "method": "getblockcount", "params": []
                }))
            };
            let response = request
                .header("authorization", "Bearer app-credential")
                .send()
                .await
                .map_err(|error| format!("request {i}: {error}"))?;
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            if status == 200 {
                Ok(())
            } else {
                Err(format!("request {i}: status {status}"))
            }
        });
    }
    while let Some(outcome) = tasks.join_next().await {
        if let Err(error) = outcome.expect("request task does not panic") {
            failures.push(error);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// Sends probe requests until one reaches the relay carrying `token`; returns how many it took.
async fn wait_until_relay_sees(relay: &Relay, sidecar: &Sidecar, token: &Token) -> usize {
    let client = support::client();
    let mut probe = 0usize;
    support::eventually(
        support::EVENTUALLY,
        "the relay to see the new token",
        || {
            probe += 1;
            let target = format!("/status/200?probe={probe}");
            let url = sidecar.data_url(&target);
            let client = client.clone();
            async move {
                let response = client.get(url).send().await.ok()?;
                if response.status() != 200 {
                    return None;
                }
                let seen = relay
                    .requests()
                    .into_iter()
                    .rev()
                    .find(|record| record.target == target)?;
                (seen.header("authorization") == Some(token.as_str())).then_some(())
            }
        },
    )
    .await;
    probe
}

// ---- memory scan ----

/// One form of a token to look for.
struct Needle {
    form: &'static str,
    bytes: Vec<u8>,
}

/// One mapping of `/proc/PID/smaps`.
#[derive(Clone, Debug)]
struct Mapping {
    start: u64,
    end: u64,
    /// The header line: range, permissions, offset, device, inode, path.
    header: String,
    permissions: String,
    rss_kb: u64,
    swap_kb: u64,
    locked_kb: u64,
    vm_flags: Vec<String>,
}

impl Mapping {
    fn has_flag(&self, flag: &str) -> bool {
        self.vm_flags.iter().any(|f| f == flag)
    }

    /// Locked in RAM as the kernel accounts it.
    fn is_locked(&self) -> bool {
        self.has_flag("lo") || (self.rss_kb > 0 && self.locked_kb == self.rss_kb)
    }

    /// Sealed, locked and dump-excluded: what a SecureBuffer's data pages look like at rest.
    fn is_sealed_secure_buffer(&self) -> bool {
        self.permissions.starts_with("---") && self.has_flag("lo") && self.has_flag("dd")
    }

    fn describe(&self) -> String {
        format!(
            "{} [Rss {} kB, Locked {} kB, Swap {} kB, VmFlags {}]",
            self.header.trim(),
            self.rss_kb,
            self.locked_kb,
            self.swap_kb,
            self.vm_flags.join(" ")
        )
    }
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/smaps: {error}"));
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            mappings.push(Mapping {
                start,
                end,
                header: line.to_owned(),
                permissions: line.split_whitespace().nth(1).unwrap_or("").to_owned(),
                rss_kb: 0,
                swap_kb: 0,
                locked_kb: 0,
                vm_flags: Vec::new(),
            });
            continue;
        }
        let Some(mapping) = mappings.last_mut() else {
            continue;
        };
        let kb = |rest: &str| {
            rest.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        if let Some(rest) = line.strip_prefix("Rss:") {
            mapping.rss_kb = kb(rest);
        } else if let Some(rest) = line.strip_prefix("Swap:") {
            mapping.swap_kb = kb(rest);
        } else if let Some(rest) = line.strip_prefix("Locked:") {
            mapping.locked_kb = kb(rest);
        } else if let Some(rest) = line.strip_prefix("VmFlags:") {
            mapping.vm_flags = rest.split_whitespace().map(str::to_owned).collect();
        }
    }
    mappings
}

/// One place a needle was found.
struct Hit {
    form: &'static str,
    address: u64,
    mapping: Mapping,
    /// Up to 32 bytes either side, for the report.
    context: Vec<u8>,
    context_start: u64,
}

impl Hit {
    fn describe(&self) -> String {
        let mut text = format!(
            "  {} copy at {:#x} (+{:#x} into {})\n    context from {:#x}: ",
            self.form,
            self.address,
            self.address - self.mapping.start,
            self.mapping.describe(),
            self.context_start
        );
        for byte in &self.context {
            let _ = write!(text, "{byte:02x}");
        }
        text.push_str("\n    as text: ");
        for &byte in &self.context {
            text.push(if byte.is_ascii_graphic() {
                byte as char
            } else {
                '.'
            });
        }
        text
    }
}

/// What one scan of the process found.
struct Scan {
    hits: Vec<Hit>,
    mappings_read: usize,
    bytes_read: u64,
    unreadable_pages: u64,
}

impl Scan {
    fn describe(&self) -> String {
        let mut text = format!(
            "{} hit(s) in {} mappings ({} MiB read, {} pages unreadable)",
            self.hits.len(),
            self.mappings_read,
            self.bytes_read / (1024 * 1024),
            self.unreadable_pages
        );
        for hit in &self.hits {
            text.push('\n');
            text.push_str(&hit.describe());
        }
        text
    }
}

/// Reads every mapping of `pid` that has resident or swapped pages through `/proc/PID/mem`
/// (which ignores page protections) and finds every occurrence of each needle.
fn scan_memory(pid: u32, needles: &[Needle]) -> Scan {
    const PAGE: u64 = 4096;
    const CHUNK: u64 = 1 << 20;
    let mem = fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|error| panic!("open /proc/{pid}/mem: {error}"));
    let mut scan = Scan {
        hits: Vec::new(),
        mappings_read: 0,
        bytes_read: 0,
        unreadable_pages: 0,
    };
    for mapping in smaps(pid) {
        if mapping.rss_kb == 0 && mapping.swap_kb == 0 {
            continue;
        }
        if mapping.header.ends_with("[vsyscall]") {
            continue;
        }
        let len = (mapping.end - mapping.start) as usize;
        let mut memory = vec![0u8; len];
        let mut offset = 0u64;
        while offset < len as u64 {
            let take = CHUNK.min(len as u64 - offset) as usize;
            let chunk = &mut memory[offset as usize..offset as usize + take];
            if mem.read_exact_at(chunk, mapping.start + offset).is_err() {
                // Page by page: some pages of a mapping may be unreadable (e.g. unmapped
                // meanwhile); they stay zero and are counted.
                for page in chunk.chunks_mut(PAGE as usize).enumerate() {
                    let (index, bytes) = page;
                    let address = mapping.start + offset + index as u64 * PAGE;
                    if mem.read_exact_at(bytes, address).is_err() {
                        bytes.fill(0);
                        scan.unreadable_pages += 1;
                    }
                }
            }
            offset += take as u64;
        }
        scan.mappings_read += 1;
        scan.bytes_read += len as u64;
        for needle in needles {
            for at in find_all(&memory, &needle.bytes) {
                let from = at.saturating_sub(32);
                let to = (at + needle.bytes.len() + 32).min(memory.len());
                scan.hits.push(Hit {
                    form: needle.form,
                    address: mapping.start + at as u64,
                    mapping: mapping.clone(),
                    context: memory[from..to].to_vec(),
                    context_start: mapping.start + from as u64,
                });
            }
        }
    }
    scan
}

/// Every offset of `needle` in `haystack`.
fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    let Some((&first, rest)) = needle.split_first() else {
        return found;
    };
    if haystack.len() < needle.len() {
        return found;
    }
    let last_start = haystack.len() - needle.len();
    let mut at = 0;
    while at <= last_start {
        if haystack[at] == first && &haystack[at + 1..at + needle.len()] == rest {
            found.push(at);
        }
        at += 1;
    }
    found
}

/// Scans `pid` until a raw copy of the token sits in a sealed SecureBuffer, or for at most
/// 5 s, and returns the last scan. While requests flow the token's pages are readable; they
/// are sealed 250–500 ms after the last request (`credential::SEAL_AFTER_IDLE`).
fn scan_until_sealed(pid: u32, token: &Token) -> Scan {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let scan = scan_memory(pid, &token.needles());
        let sealed = scan
            .hits
            .iter()
            .any(|hit| hit.form == "raw" && hit.mapping.is_sealed_secure_buffer());
        if sealed || Instant::now() >= give_up {
            return scan;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts what a scan of `pid` finds for the current `token`: at least one copy in a
/// sealed, locked, dump-excluded mapping (its SecureBuffer) once traffic has paused; with
/// `lock_all`, every copy in locked pages.
fn assert_current_token_protected(pid: u32, token: &Token, lock_all: bool) {
    let scan = scan_until_sealed(pid, token);
    assert!(
        scan.hits
            .iter()
            .any(|hit| hit.form == "raw" && hit.mapping.is_sealed_secure_buffer()),
        "the current token must be found in its SecureBuffer: a sealed (---p), locked (lo), \
         dump-excluded (dd) mapping; scan: {}",
        scan.describe()
    );
    if lock_all {
        let unlocked: Vec<&Hit> = scan
            .hits
            .iter()
            .filter(|hit| !hit.mapping.is_locked())
            .collect();
        assert!(
            unlocked.is_empty(),
            "with memory.lock_all = true every copy of the token must be in locked pages; \
             unlocked copies:\n{}\nfull scan: {}",
            unlocked
                .iter()
                .map(|hit| hit.describe())
                .collect::<Vec<_>>()
                .join("\n"),
            scan.describe()
        );
    }
}

/// Polls (bounded) until no copy of `token` is found in `pid`'s memory; panics with every
/// copy of the last scan. The bound only absorbs the moment between the relay seeing a
/// connection close and the sidecar's task for it releasing its buffers.
async fn assert_no_copy_remains(pid: u32, token: &Token, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let scan = scan_memory(pid, &token.needles());
        if scan.hits.is_empty() {
            assert!(
                scan.bytes_read > 0 && scan.mappings_read > 0,
                "the scan read nothing"
            );
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: copies remain in the sidecar's memory: {}",
                scan.describe()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The relay connections that carried a request with `token`.
fn connections_that_carried(relay: &Relay, token: &Token) -> HashSet<u64> {
    relay
        .requests()
        .iter()
        .filter(|record| record.header("authorization") == Some(token.as_str()))
        .map(|record| record.connection_id)
        .collect()
}

/// Rotation scenario: traffic with the old token, rotate the file, wait until the relay sees
/// the new one, 200 more requests, wait until every connection that carried the old token is
/// closed, then no copy of the old token may remain anywhere in the process.
async fn rotation_leaves_no_copy_of_the_old_token(protocol: Proto, lock_all: bool) {
    let old = Token::new();
    let new = Token::new();
    let (relay, sidecar, path) = start_with_token_file(protocol, &old, |builder| {
        builder.pool_size(2).set(
            "memory",
            "lock_all",
            if lock_all { "true" } else { "false" },
        )
    })
    .await;
    let pid = sidecar.pid().expect("the sidecar runs");

    traffic(&sidecar, 50).await;
    assert_eq!(
        relay.protocol().name(),
        relay.connections()[0].alpn.as_deref().unwrap_or("none"),
        "the sidecar speaks the relay's protocol"
    );
    assert_current_token_protected(pid, &old, lock_all);

    rotate(&path, &new);
    wait_until_relay_sees(&relay, &sidecar, &new).await;
    traffic(&sidecar, TRAFFIC_AFTER_ROTATION).await;
    let old_connections = connections_that_carried(&relay, &old);
    assert!(!old_connections.is_empty(), "the old token was used");
    support::eventually(
        support::EVENTUALLY,
        "every connection that carried the old token to close (pool rotation)",
        || {
            let open: Vec<u64> = relay.open_connection_ids();
            let still_open = old_connections.iter().any(|id| open.contains(id));
            async move { (!still_open).then_some(()) }
        },
    )
    .await;
    let late = relay
        .requests()
        .iter()
        .skip_while(|record| record.header("authorization") != Some(new.as_str()))
        .filter(|record| record.header("authorization") != Some(new.as_str()))
        .count();
    assert_eq!(
        late, 0,
        "after the first request with the new token, only it is sent"
    );

    assert_no_copy_remains(pid, &old, "after rotation and traffic").await;
    assert_current_token_protected(pid, &new, lock_all);

    let (_, memory) = sidecar.get_json("/api/v1/memory-protection/status").await;
    assert_eq!(
        memory["secure_buffers"], 1,
        "the old token's buffer was released: {memory:#}"
    );
    assert_eq!(memory["lock_all"], lock_all, "{memory:#}");
    let (code, report) = sidecar
        .get_json("/api/v1/memory-protection/self-check")
        .await;
    // As root every check passes, lock_all (in force or not configured) included.
    assert_eq!(code, 200, "{report:#}");
    assert_eq!(check(&report, "lock_all")["ok"], true, "{report:#}");
    assert!(
        sidecar.logs_contain("relay token reloaded"),
        "the reload is logged: {:?}",
        sidecar.logs()
    );
}

// ---- 1. the relay sees the configured token, never the app's ----

async fn relay_sees_only_the_configured_token(protocol: Proto) {
    let token = Token::new();
    let (relay, sidecar, _) = start_with_token_file(protocol, &token, |builder| builder).await;

    // Without a credential of its own, with one, and with two: the relay sees exactly one
    // value, the configured token.
    let client = support::client();
    for (case, app_values) in [
        ("none", vec![]),
        ("one", vec!["Bearer app-credential-1"]),
        ("two", vec!["Bearer app-credential-1", "Basic YXBwOmNyZWQ="]),
    ] {
        let mut request = client.get(sidecar.data_url(&format!("/status/200?case={case}")));
        for value in &app_values {
            request = request.header("authorization", *value);
        }
        let response = request.send().await.expect("the sidecar answers");
        assert_eq!(response.status(), 200, "case {case}");
        let body = response.bytes().await.expect("the body can be read");
        assert!(
            !String::from_utf8_lossy(&body).contains(token.as_str()),
            "the app never sees the token (case {case})"
        );
        let seen = relay
            .requests()
            .into_iter()
            .find(|record| record.target == format!("/status/200?case={case}"))
            .expect("the relay saw the request");
        let values: Vec<&[u8]> = seen
            .headers
            .get_all("authorization")
            .iter()
            .map(|value| value.as_bytes())
            .collect();
        assert_eq!(
            values,
            vec![token.as_str().as_bytes()],
            "case {case}: the relay sees exactly the configured token"
        );
        for (name, value) in &seen.headers {
            assert!(
                !value.as_bytes().windows(14).any(|w| w == b"app-credential")
                    && value.as_bytes() != b"Basic YXBwOmNyZWQ=",
                "case {case}: the app's credential reached the relay in {name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_sees_the_configured_token_and_never_the_apps_over_h2() {
    relay_sees_only_the_configured_token(Proto::H2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_sees_the_configured_token_and_never_the_apps_over_http1() {
    relay_sees_only_the_configured_token(Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_auth_header_carries_the_token_and_replaces_the_apps_value() {
    let token = Token::new();
    let (relay, sidecar, _) = start_with_token_file(Proto::H2, &token, |builder| {
        builder.set_str("upstream", "auth_header", "x-relay-token")
    })
    .await;
    let response = support::client()
        .get(sidecar.data_url("/status/200?custom"))
        .header("x-relay-token", "app-forged-token")
        .send()
        .await
        .expect("the sidecar answers");
    assert_eq!(response.status(), 200);
    let seen = relay
        .requests()
        .into_iter()
        .find(|record| record.target == "/status/200?custom")
        .expect("the relay saw the request");
    let values: Vec<&[u8]> = seen
        .headers
        .get_all("x-relay-token")
        .iter()
        .map(|value| value.as_bytes())
        .collect();
    assert_eq!(values, vec![token.as_str().as_bytes()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_from_the_environment_is_honoured_and_gone_from_proc_environ() {
    let token = Token::new();
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let sidecar = Sidecar::builder()
        .relay(&relay)
        .set_str("upstream", "auth_token_env", "RELAY_TOKEN_UNDER_TEST")
        .env("RELAY_TOKEN_UNDER_TEST", &format!("{}\n", token.as_str()))
        .start()
        .await;
    sidecar.wait_ready().await;

    let response = support::client()
        .get(sidecar.data_url("/status/200?env"))
        .header("authorization", "Bearer app-credential")
        .send()
        .await
        .expect("the sidecar answers");
    assert_eq!(response.status(), 200);
    let seen = relay
        .requests()
        .into_iter()
        .find(|record| record.target == "/status/200?env")
        .expect("the relay saw the request");
    assert_eq!(seen.header("authorization"), Some(token.as_str()));

    let pid = sidecar.pid().expect("the sidecar runs");
    let environ = fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/environ: {error}"));
    assert!(
        find_all(&environ, token.as_str().as_bytes()).is_empty()
            && find_all(&environ, &token.as_str().as_bytes()[..16]).is_empty(),
        "the token is still in /proc/{pid}/environ"
    );
    let entries: Vec<String> = environ
        .split(|&byte| byte == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect();
    let left: Vec<&String> = entries
        .iter()
        .filter(|entry| entry.starts_with("RELAY_TOKEN_UNDER_TEST="))
        .collect();
    assert!(
        left.iter()
            .all(|entry| entry.trim_end() == "RELAY_TOKEN_UNDER_TEST="),
        "the variable's value must be gone from /proc/{pid}/environ: {left:?}"
    );
}

// ---- 2. no log line, admin answer or metric holds the token ----

/// Fails if `text` holds the token or any 16-character piece of it.
fn assert_no_token_in(text: &str, tokens: &[&Token], place: &str) {
    for token in tokens {
        if let Some(piece) = token.windows().find(|piece| text.contains(piece)) {
            let at = text.find(piece).unwrap_or(0);
            let from = text[..at]
                .char_indices()
                .rev()
                .nth(80)
                .map_or(0, |(i, _)| i);
            panic!(
                "{place} holds (part of) the token {piece:?}: …{}…",
                &text[from..(at + 100).min(text.len())]
            );
        }
    }
}

/// Every GET path of the admin API as `/openapi.json` lists them, `{id}` filled in.
async fn admin_paths(sidecar: &Sidecar) -> Vec<String> {
    let (status, openapi) = sidecar.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    let (_, connections) = sidecar.get_json("/api/v1/secure-channel/connections").await;
    let id = connections["connections"][0]["connection_id"]
        .as_u64()
        .unwrap_or(1);
    let paths: Vec<String> = openapi["paths"]
        .as_object()
        .expect("openapi.json has paths")
        .iter()
        .filter(|(_, operations)| operations.get("get").is_some())
        .map(|(path, _)| path.replace("{id}", &id.to_string()))
        .collect();
    assert!(
        paths.len() >= 10,
        "the OpenAPI document lists the admin API: {paths:?}"
    );
    paths
}

async fn token_appears_in_no_output(protocol: Proto, level: &str) {
    let old = Token::new();
    let new = Token::new();
    let (relay, sidecar, path) = start_with_token_file(protocol, &old, |builder| {
        builder.set_str("log", "level", level)
    })
    .await;
    traffic(&sidecar, 20).await;
    rotate(&path, &new);
    wait_until_relay_sees(&relay, &sidecar, &new).await;
    traffic(&sidecar, 20).await;
    // A request the relay fails, and one the sidecar refuses, log more paths.
    let _ = support::client()
        .get(sidecar.data_url("/status/503"))
        .send()
        .await;

    let client = support::client();
    let mut checked = Vec::new();
    for path in admin_paths(&sidecar).await {
        let response = client
            .get(sidecar.admin_url(&path))
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {path}: {error}"));
        let status = response.status();
        let headers = format!("{:?}", response.headers());
        let body = response.text().await.expect("the admin body can be read");
        assert_no_token_in(&headers, &[&old, &new], &format!("GET {path} headers"));
        assert_no_token_in(&body, &[&old, &new], &format!("GET {path} ({status})"));
        checked.push(path);
    }
    for path in ["/metrics", "/api/v1/secure-channel/metrics"] {
        assert!(checked.iter().any(|p| p == path), "{path} was checked");
    }

    let lines = sidecar.logs();
    assert!(
        lines.len() >= 5,
        "log.level = {level} produced output: {lines:?}"
    );
    for line in &lines {
        assert_no_token_in(line, &[&old, &new], &format!("log line (level {level})"));
    }
    assert!(
        sidecar.logs_contain("relay token reloaded"),
        "the reload is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_appears_in_no_log_line_admin_answer_or_metric_at_debug_over_h2() {
    token_appears_in_no_output(Proto::H2, "debug").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_appears_in_no_log_line_admin_answer_or_metric_at_trace_over_h2() {
    token_appears_in_no_output(Proto::H2, "trace").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_appears_in_no_log_line_admin_answer_or_metric_at_trace_over_http1() {
    token_appears_in_no_output(Proto::Http1, "trace").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_never_prints_the_token() {
    let token = Token::new();
    let relay = Relay::builder().start().await;
    let builder = Sidecar::builder().relay(&relay);
    let path = write_token(&builder, &token, 0o600);
    let output = builder
        .set_str("upstream", "auth_token_file", &path.display().to_string())
        .run_command("check-config")
        .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert_no_token_in(&output.stdout, &[&token], "check-config stdout");
    assert_no_token_in(&output.stderr, &[&token], "check-config stderr");
}

// ---- 3. memory: locked at rest, no copy left after rotation ----

#[tokio::test(flavor = "multi_thread")]
async fn with_lock_all_the_token_is_only_in_locked_pages_and_the_old_one_is_wiped_over_h2() {
    if skip_unless_root("a memory scan") {
        return;
    }
    rotation_leaves_no_copy_of_the_old_token(Proto::H2, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_lock_all_the_token_is_only_in_locked_pages_and_the_old_one_is_wiped_over_http1() {
    if skip_unless_root("a memory scan") {
        return;
    }
    rotation_leaves_no_copy_of_the_old_token(Proto::Http1, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_copy_of_the_old_token_remains_after_rotation_and_traffic_over_h2() {
    if skip_unless_root("a memory scan") {
        return;
    }
    rotation_leaves_no_copy_of_the_old_token(Proto::H2, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_copy_of_the_old_token_remains_after_rotation_and_traffic_over_http1() {
    if skip_unless_root("a memory scan") {
        return;
    }
    rotation_leaves_no_copy_of_the_old_token(Proto::Http1, false).await;
}

/// The variable's value is copied into a SecureBuffer and wiped where it was; no other copy
/// of it may exist once the sidecar is serving (over h2 no per-connection buffer holds the
/// raw token: the encoder writes its Huffman form).
#[tokio::test(flavor = "multi_thread")]
async fn token_from_the_environment_leaves_no_raw_copy_outside_its_secure_buffer() {
    if skip_unless_root("a memory scan") {
        return;
    }
    let token = Token::new();
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let sidecar = Sidecar::builder()
        .relay(&relay)
        .set_str("upstream", "auth_token_env", "RELAY_TOKEN_UNDER_TEST")
        .env("RELAY_TOKEN_UNDER_TEST", token.as_str())
        .start()
        .await;
    sidecar.wait_ready().await;
    traffic(&sidecar, 20).await;
    let pid = sidecar.pid().expect("the sidecar runs");
    let scan = scan_until_sealed(pid, &token);
    let outside: Vec<&Hit> = scan
        .hits
        .iter()
        .filter(|hit| hit.form.starts_with("raw") && !hit.mapping.is_sealed_secure_buffer())
        .collect();
    assert!(
        scan.hits
            .iter()
            .any(|hit| hit.mapping.is_sealed_secure_buffer()),
        "the token is in its SecureBuffer: {}",
        scan.describe()
    );
    assert!(
        outside.is_empty(),
        "raw copies of the token outside its SecureBuffer:\n{}",
        outside
            .iter()
            .map(|hit| hit.describe())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---- 4. the self-check ----

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .expect("the self-check has a checks array")
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("the self-check has no check {name:?}: {report:#}"))
}

fn failing_checks(report: &serde_json::Value) -> Vec<&serde_json::Value> {
    report["checks"]
        .as_array()
        .expect("the self-check has a checks array")
        .iter()
        .filter(|check| check["ok"] != true)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn self_check_passes_as_root_with_defaults() {
    if skip_unless_root("the passing self-check") {
        return;
    }
    let token = Token::new();
    // Defaults: require_lock = true (the builder's test default removed), lock_all = false.
    let (_relay, sidecar, _) = start_with_token_file(Proto::H2, &token, |builder| {
        builder.unset("memory", "require_lock")
    })
    .await;
    let (status, report) = sidecar
        .get_json("/api/v1/memory-protection/self-check")
        .await;
    assert_eq!(status, 200, "self-check as root: {report:#}");
    assert_eq!(report["passed"], true, "{report:#}");
    assert!(
        failing_checks(&report).is_empty(),
        "every check passes: {report:#}"
    );
    for name in [
        "secure_buffers_locked",
        "secure_buffers_excluded_from_dumps",
        "guard_pages_no_access",
        "secure_buffers_sealed",
        "canaries_intact",
        "wipe_round_trip",
        "vm_locked",
        "not_dumpable",
        "core_limit_zero",
        "mlock_headroom",
        "cap_ipc_lock",
        "lock_all",
    ] {
        let check = check(&report, name);
        assert!(
            check["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{name} explains itself: {check}"
        );
    }
    let (status, memory) = sidecar.get_json("/api/v1/memory-protection/status").await;
    assert_eq!(status, 200);
    assert_eq!(memory["enabled"], true, "{memory:#}");
    assert_eq!(memory["degraded"], false, "{memory:#}");
    assert_eq!(memory["self_check"], true, "{memory:#}");
    assert_eq!(memory["dumpable"], false, "{memory:#}");
    assert_eq!(memory["core_dumps_disabled"], true, "{memory:#}");
    assert_eq!(memory["wipe_freed_memory"], true, "{memory:#}");
    assert!(
        memory["secure_buffers"].as_u64() >= Some(1),
        "the token's buffer counts: {memory:#}"
    );
    assert!(
        memory["locked_bytes"].as_u64() >= Some(4096),
        "at least a page is locked: {memory:#}"
    );
}

/// A temporary directory, the binary and a token file an unprivileged user can use: `dir`
/// (0755) holds the config; the token is 0600 and owned by `nobody`; the PKI's directory is
/// opened to others too (it holds only public certificates).
struct Unprivileged {
    builder: SidecarBuilder,
    _relay: Relay,
    _binary_dir: Option<tempfile::TempDir>,
}

/// Whether `nobody` can reach and execute `path` (every ancestor searchable by others).
fn others_can_execute(path: &Path) -> bool {
    let executable = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
    executable
        && path
            .ancestors()
            .skip(1)
            .all(|dir| fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

async fn unprivileged(token: &Token, require_lock: bool) -> Unprivileged {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let open = fs::Permissions::from_mode(0o755);
    fs::set_permissions(relay.pki().dir(), open.clone()).expect("chmod the PKI directory");
    let mut builder = Sidecar::builder()
        .relay(&relay)
        .set(
            "memory",
            "require_lock",
            if require_lock { "true" } else { "false" },
        )
        .wrapper(&[
            "prlimit",
            "--memlock=0:0",
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ]);
    fs::set_permissions(builder.dir(), open).expect("chmod the sidecar's directory");
    let path = write_token(&builder, token, 0o600);
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown the token file");
    builder = builder.set_str("upstream", "auth_token_file", &path.display().to_string());

    let binary = Path::new(support::sidecar::BINARY);
    let binary_dir = if others_can_execute(binary) {
        None
    } else {
        let dir = tempfile::tempdir().expect("a temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let copy = dir.path().join("sprint-sidecar");
        fs::copy(binary, &copy).expect("copy the binary");
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
        builder = builder.binary(&copy);
        Some(dir)
    };
    Unprivileged {
        builder,
        _relay: relay,
        _binary_dir: binary_dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn self_check_reports_the_lock_failure_in_a_degraded_unprivileged_run() {
    if skip_unless_root("switching to an unprivileged user") {
        return;
    }
    let token = Token::new();
    let setting = unprivileged(&token, false).await;
    let sidecar = setting.builder.start().await;
    sidecar.wait_ready().await;
    let pid = sidecar.pid().expect("the sidecar runs");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    assert!(
        status
            .lines()
            .any(|line| line.starts_with("Uid:") && line.contains("65534")),
        "the sidecar runs as nobody: {status}"
    );

    // Degraded, not broken: traffic still carries the token.
    traffic(&sidecar, 4).await;

    let (code, report) = sidecar
        .get_json("/api/v1/memory-protection/self-check")
        .await;
    assert_eq!(code, 503, "a degraded self-check answers 503: {report:#}");
    assert_eq!(report["passed"], false, "{report:#}");
    let failing = failing_checks(&report);
    // The kernel's view of the lock failure: the token's region lacks `lo`, VmLck is short,
    // and the limit leaves no headroom — each check says so in its detail.
    for (name, says) in [
        ("secure_buffers_locked", "relay.token"),
        ("vm_locked", "VmLck"),
        ("mlock_headroom", "RLIMIT_MEMLOCK 0"),
    ] {
        let check = check(&report, name);
        assert_eq!(check["ok"], false, "{name} fails: {report:#}");
        assert!(
            check["detail"].as_str().is_some_and(|d| d.contains(says)),
            "{name} says {says:?}: {check}"
        );
    }
    for check in &failing {
        assert!(
            check["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "a failing check says why: {check}"
        );
    }
    // The checks that do not depend on locking still pass.
    for name in [
        "not_dumpable",
        "core_limit_zero",
        "canaries_intact",
        "wipe_round_trip",
    ] {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {report:#}");
    }

    let (_, memory) = sidecar.get_json("/api/v1/memory-protection/status").await;
    assert_eq!(memory["degraded"], true, "{memory:#}");
    assert_eq!(memory["enabled"], false, "{memory:#}");
    assert_eq!(memory["self_check"], false, "{memory:#}");
    assert_eq!(memory["mlock_limit_bytes"], 0, "{memory:#}");

    let warnings: Vec<String> = sidecar
        .logs()
        .into_iter()
        .filter(|line| line.contains("memory protection degraded"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "the degraded state is logged once: {:?}",
        sidecar.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unprivileged_start_without_memlock_exits_2_when_lock_is_required() {
    if skip_unless_root("switching to an unprivileged user") {
        return;
    }
    let token = Token::new();
    for lock_all in [false, true] {
        let setting = unprivileged(&token, true).await;
        let output = setting
            .builder
            .set(
                "memory",
                "lock_all",
                if lock_all { "true" } else { "false" },
            )
            .run_command("run")
            .await;
        assert_eq!(output.code, Some(2), "lock_all = {lock_all}: {output:?}");
        let message = output.stderr.clone();
        for needle in [
            "RLIMIT_MEMLOCK",
            "CAP_IPC_LOCK",
            "setcap cap_ipc_lock=+ep",
            "ulimit -l",
            "memory.require_lock",
        ] {
            assert!(
                message.contains(needle),
                "lock_all = {lock_all}: the refusal names {needle:?}: {message}"
            );
        }
        assert!(
            !message.contains("panicked"),
            "a refusal, not a crash: {message}"
        );
        if lock_all {
            assert!(message.contains("mlockall"), "{message}");
        }
        assert_no_token_in(&message, &[&token], "the refusal");
        assert!(
            !output.stdout.contains("listening"),
            "nothing was served: {output:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_refuses_as_run_does_when_memory_cannot_be_locked() {
    if skip_unless_root("switching to an unprivileged user") {
        return;
    }
    let token = Token::new();
    let required = unprivileged(&token, true).await;
    let output = required.builder.run_command("check-config").await;
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(
        output.stderr.contains("RLIMIT_MEMLOCK") && output.stderr.contains("memory.require_lock"),
        "{output:?}"
    );
    assert!(
        !output.stdout.contains("configuration is valid"),
        "{output:?}"
    );
    assert_no_token_in(&output.stderr, &[&token], "the refusal");

    // Not required: valid, and it says the token is not locked rather than claiming it is.
    let allowed = unprivileged(&token, false).await;
    let output = allowed.builder.run_command("check-config").await;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(
        output.stdout.contains("NOT in locked memory")
            && !output.stdout.contains("loaded into locked memory"),
        "{}",
        output.stdout
    );
    assert_no_token_in(&output.stdout, &[&token], "check-config");
}

// ---- 5. file permissions ----

#[tokio::test(flavor = "multi_thread")]
async fn world_readable_token_file_is_refused_naming_the_file_and_mode() {
    let token = Token::new();
    let relay = Relay::builder().start().await;
    for mode in [0o644, 0o640, 0o604] {
        let builder = Sidecar::builder().relay(&relay);
        let path = write_token(&builder, &token, mode);
        let output = builder
            .set_str("upstream", "auth_token_file", &path.display().to_string())
            .run_command("run")
            .await;
        assert_eq!(output.code, Some(2), "mode {mode:o}: {output:?}");
        let stderr = &output.stderr;
        assert!(
            stderr.contains(&path.display().to_string()),
            "the refusal names the file: {stderr}"
        );
        assert!(
            stderr.contains(&format!("{mode:04o}")),
            "the refusal names the mode {mode:04o}: {stderr}"
        );
        assert!(
            stderr.contains("upstream.auth_token_file"),
            "the refusal names the key: {stderr}"
        );
        assert!(
            stderr.contains("allow_insecure_permissions"),
            "the refusal says how to accept it: {stderr}"
        );
        assert_no_token_in(stderr, &[&token], "the refusal");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn world_readable_client_key_file_is_refused_naming_the_file_and_mode() {
    let relay = Relay::builder().start().await;
    let identity = relay.pki().client_identity("sidecar");
    let builder = Sidecar::builder().relay(&relay);
    let cert = builder.write_file("client.crt", identity.cert_pem.as_bytes(), 0o644);
    let key = builder.write_file("client.key", identity.key_pem.as_bytes(), 0o644);
    let output = builder
        .set_str("upstream", "client_cert_file", &cert.display().to_string())
        .set_str("upstream", "client_key_file", &key.display().to_string())
        .run_command("run")
        .await;
    assert_eq!(output.code, Some(2), "{output:?}");
    let stderr = &output.stderr;
    assert!(
        stderr.contains(&key.display().to_string()),
        "the refusal names the key file: {stderr}"
    );
    assert!(
        stderr.contains("0644"),
        "the refusal names the mode: {stderr}"
    );
    assert!(
        stderr.contains("upstream.client_key_file"),
        "the refusal names the key: {stderr}"
    );
    let key_body: String = identity
        .key_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    assert!(
        !stderr.contains(&key_body[..24]),
        "the refusal does not print the key: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_permissions_are_accepted_when_allowed() {
    let token = Token::new();
    let relay = Relay::builder()
        .protocol(Proto::H2)
        .require_client_certificate(true)
        .start()
        .await;
    let identity = relay.pki().client_identity("sidecar");
    let builder = Sidecar::builder().relay(&relay);
    let cert = builder.write_file("client.crt", identity.cert_pem.as_bytes(), 0o644);
    let key = builder.write_file("client.key", identity.key_pem.as_bytes(), 0o644);
    let path = write_token(&builder, &token, 0o644);
    let sidecar = builder
        .set_str("upstream", "auth_token_file", &path.display().to_string())
        .set_str("upstream", "client_cert_file", &cert.display().to_string())
        .set_str("upstream", "client_key_file", &key.display().to_string())
        .set("upstream", "allow_insecure_permissions", "true")
        .start()
        .await;
    sidecar.wait_ready().await;
    let response = support::client()
        .get(sidecar.data_url("/status/200?insecure"))
        .send()
        .await
        .expect("the sidecar answers");
    assert_eq!(response.status(), 200);
    let seen = relay
        .requests()
        .into_iter()
        .find(|record| record.target == "/status/200?insecure")
        .expect("the relay saw the request");
    assert_eq!(seen.header("authorization"), Some(token.as_str()));
}

// ---- 6. mTLS ----

#[tokio::test(flavor = "multi_thread")]
async fn relay_requiring_client_certificates_sees_the_sidecars() {
    for protocol in [Proto::H2, Proto::Http1] {
        let relay = Relay::builder()
            .protocol(protocol)
            .require_client_certificate(true)
            .start()
            .await;
        let (cert, key) = relay.pki().write_client_identity("sidecar");
        // The certificate is public: a 0644 file is fine; the key is 0600.
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o644)).expect("chmod");
        let sidecar = Sidecar::builder()
            .relay(&relay)
            .set_str("upstream", "client_cert_file", &cert.display().to_string())
            .set_str("upstream", "client_key_file", &key.display().to_string())
            .start()
            .await;
        sidecar.wait_ready().await;
        traffic(&sidecar, 20).await;
        let connections = relay.connections();
        assert!(
            !connections.is_empty()
                && connections
                    .iter()
                    .filter(|c| c.tls_established)
                    .all(|c| c.client_certificate),
            "{protocol:?}: every TLS connection presented the client certificate: {connections:?}"
        );
        assert_eq!(relay.handshake_failures(), 0, "{protocol:?}");
    }
}

/// A sidecar without a client identity in front of a relay that requires one: no request
/// ever reaches the relay, and the app gets a JSON error instead.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_client_certificate_no_request_reaches_the_relay() {
    let relay = Relay::builder()
        .protocol(Proto::H2)
        .require_client_certificate(true)
        .start()
        .await;
    let sidecar = Sidecar::builder().relay(&relay).pool_size(2).start().await;
    support::eventually(support::EVENTUALLY, "a refused handshake", || {
        let refused = relay.handshake_failures() > 0;
        async move { refused.then_some(()) }
    })
    .await;
    let response = support::client()
        .get(sidecar.data_url("/status/200"))
        .send()
        .await
        .expect("the sidecar answers");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("the body can be read");
    assert!(status >= 500, "the request fails: {status}");
    support::assert_json_error(status, &body);
    assert_eq!(relay.request_count(), 0, "no request reached the relay");
    assert_eq!(relay.tls_accepted(), 0, "the relay accepted no handshake");
}

/// Under TLS 1.3 a relay rejects a missing client certificate only after the client has
/// finished its side of the handshake. The sidecar must not count such a connection as
/// connected (readiness stays false) and must keep backing off instead of re-dialing at
/// the initial backoff forever (the bug this guards against made ~120 handshakes in 2 s).
/// Time is the subject: readiness is sampled for two seconds.
#[tokio::test(flavor = "multi_thread")]
async fn refused_client_authentication_keeps_readiness_false_and_backs_off() {
    let relay = Relay::builder()
        .protocol(Proto::H2)
        .require_client_certificate(true)
        .start()
        .await;
    let sidecar = Sidecar::builder().relay(&relay).pool_size(2).start().await;
    let sampling = Instant::now();
    let mut ready = 0;
    let mut samples = 0;
    while sampling.elapsed() < Duration::from_secs(2) {
        samples += 1;
        if sidecar.admin_status("/ready").await == Some(200) {
            ready += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let handshakes = relay.handshake_failures();
    assert_eq!(
        ready, 0,
        "/ready answered 200 in {ready} of {samples} samples ({handshakes} refused handshakes)"
    );
    // Two slots backing off with full jitter (mean delay half the doubling ceiling) try
    // about ten times each in 2 s; a backoff that never grows makes several times more.
    assert!(
        handshakes <= 40,
        "{handshakes} handshakes in 2 s from 2 slots: the backoff does not grow"
    );
}

/// Replaces a file atomically (write a new one, rename it over), as Kubernetes and `mv` do.
fn replace_file(path: &Path, contents: &[u8], mode: u32) {
    let staging = path.with_extension("staging");
    write_with_mode(&staging, contents, mode);
    fs::rename(&staging, path).expect("the new file can be renamed over the old one");
}

/// SPEC §7: the mTLS certificate and key are re-read when they change, without failing a
/// request. A pair that lands one file at a time (the new certificate beside the old key)
/// is refused with a warning and the old pair stays in use until the key follows; then the
/// pool replaces its connections, which present the new certificate, and resumption cannot
/// bring the old identity back (the session tickets are dropped with it).
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_client_identity_is_presented_without_failing_a_request() {
    for protocol in [Proto::H2, Proto::Http1] {
        let relay = Relay::builder()
            .protocol(protocol)
            .require_client_certificate(true)
            .start()
            .await;
        let first = relay.pki().client_identity("first");
        let second = relay.pki().client_identity("second");
        let leaf = |identity: &support::pki::Identity| identity.chain()[0].as_ref().to_vec();
        let builder = Sidecar::builder().relay(&relay).pool_size(2);
        let cert = builder.write_file("client.crt", first.cert_pem.as_bytes(), 0o644);
        let key = builder.write_file("client.key", first.key_pem.as_bytes(), 0o600);
        let sidecar = builder
            .set_str("upstream", "client_cert_file", &cert.display().to_string())
            .set_str("upstream", "client_key_file", &key.display().to_string())
            .start()
            .await;
        sidecar.wait_ready().await;
        traffic(&sidecar, 20).await;
        let presented = |relay: &Relay, open_only: bool| -> Vec<Option<Vec<u8>>> {
            let open = relay.open_connection_ids();
            relay
                .connections()
                .into_iter()
                .filter(|c| c.tls_established && (!open_only || open.contains(&c.id)))
                .map(|c| c.client_certificate_der)
                .collect()
        };
        assert!(
            presented(&relay, false)
                .iter()
                .all(|der| der.as_deref() == Some(&leaf(&first)[..])),
            "{protocol:?}: the first identity is presented"
        );

        let rotation = async {
            // The new certificate lands first: it does not match the old key.
            replace_file(&cert, second.cert_pem.as_bytes(), 0o644);
            support::eventually(
                support::EVENTUALLY,
                "a warning that the changed pair cannot be used",
                || {
                    let warned = sidecar.logs_contain("keeping the previous identity");
                    async move { warned.then_some(()) }
                },
            )
            .await;
            assert!(
                presented(&relay, false)
                    .iter()
                    .all(|der| der.as_deref() == Some(&leaf(&first)[..])),
                "{protocol:?}: the half-written pair is not used"
            );
            replace_file(&key, second.key_pem.as_bytes(), 0o600);
            support::eventually(
                support::EVENTUALLY,
                "every open relay connection to present the second identity",
                || {
                    let open = presented(&relay, true);
                    let done = !open.is_empty()
                        && open
                            .iter()
                            .all(|der| der.as_deref() == Some(&leaf(&second)[..]));
                    async move { done.then_some(()) }
                },
            )
            .await;
        };
        // Requests flow all through the rotation; none may fail.
        tokio::join!(traffic(&sidecar, 400), rotation);
        traffic(&sidecar, 40).await;
        let all = presented(&relay, false);
        let first_at = all
            .iter()
            .position(|der| der.as_deref() == Some(&leaf(&second)[..]))
            .expect("the second identity was presented");
        assert!(
            all[first_at..]
                .iter()
                .all(|der| der.as_deref() == Some(&leaf(&second)[..])),
            "{protocol:?}: once the second identity is in use, no connection presents the \
             first again (nor resumes a session of it): {} connections",
            all.len()
        );
        assert_eq!(relay.handshake_failures(), 0, "{protocol:?}");
        assert!(
            !sidecar
                .logs()
                .iter()
                .any(|line| line.contains("PRIVATE KEY")),
            "no key material in the logs"
        );
        for (outcome, count) in [("rejected", 1.0), ("reloaded", 1.0)] {
            let sample = format!(
                "sprint_sidecar_secret_reloads_total{{file=\"client_identity\",outcome=\"{outcome}\"}}"
            );
            assert_eq!(
                sidecar.metric(&sample).await,
                count,
                "{protocol:?}: {sample}"
            );
        }
    }
}

/// `openssl x509 -req` without `-extfile` issues an X.509 v1 certificate, which TLS
/// libraries refuse; the refusal says so and how to issue a v3 one, naming the file.
/// (The fixture is such a certificate, made once with openssl. Any key will do: the
/// certificate is refused before the pair is compared.)
#[tokio::test(flavor = "multi_thread")]
async fn an_x509_v1_client_certificate_is_refused_saying_how_to_fix_it() {
    let relay = Relay::builder().start().await;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let v1 = fs::read(fixtures.join("x509-v1-client.pem")).expect("the fixture is readable");
    let builder = Sidecar::builder().relay(&relay);
    let cert = builder.write_file("v1.crt", &v1, 0o644);
    let any_key = relay.pki().client_identity("any").key_pem;
    let key = builder.write_file("v1.key", any_key.as_bytes(), 0o600);
    let output = builder
        .set_str("upstream", "client_cert_file", &cert.display().to_string())
        .set_str("upstream", "client_key_file", &key.display().to_string())
        .run_command("run")
        .await;
    assert_eq!(output.code, Some(2), "{output:?}");
    let stderr = &output.stderr;
    assert!(stderr.contains(&cert.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("upstream.client_cert_file") && !stderr.contains("client_key_file"),
        "the certificate's key is named: {stderr}"
    );
    assert!(
        stderr.contains("X.509 v1") && stderr.contains("v3"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("PRIVATE KEY") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mismatched_client_key_and_certificate_are_refused_naming_both_files() {
    let relay = Relay::builder().start().await;
    let first = relay.pki().client_identity("first");
    let second = relay.pki().client_identity("second");
    let builder = Sidecar::builder().relay(&relay);
    let cert = builder.write_file("first.crt", first.cert_pem.as_bytes(), 0o600);
    let key = builder.write_file("second.key", second.key_pem.as_bytes(), 0o600);
    let output = builder
        .set_str("upstream", "client_cert_file", &cert.display().to_string())
        .set_str("upstream", "client_key_file", &key.display().to_string())
        .run_command("run")
        .await;
    assert_eq!(output.code, Some(2), "{output:?}");
    let stderr = &output.stderr;
    for path in [&cert, &key] {
        assert!(
            stderr.contains(&path.display().to_string()),
            "the refusal names {}: {stderr}",
            path.display()
        );
    }
    assert!(
        stderr.to_lowercase().contains("match"),
        "the refusal says the pair does not match: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Where the mTLS key is after start and handshakes: its PEM text nowhere (read into a
/// SecureBuffer, decoded, wiped); its DER and its private scalar only in the sealed, locked,
/// dump-excluded SecureBuffer — the parsed copy the crypto provider makes per handshake is
/// cleansed once the handshake is done.
async fn client_key_material_is_only_in_its_secure_buffer(lock_all: bool) {
    let relay = Relay::builder()
        .protocol(Proto::H2)
        .require_client_certificate(true)
        .start()
        .await;
    let identity = relay.pki().client_identity("sidecar");
    let builder = Sidecar::builder().relay(&relay);
    let cert = builder.write_file("client.crt", identity.cert_pem.as_bytes(), 0o644);
    let key = builder.write_file("client.key", identity.key_pem.as_bytes(), 0o600);
    let sidecar = builder
        .set_str("upstream", "client_cert_file", &cert.display().to_string())
        .set_str("upstream", "client_key_file", &key.display().to_string())
        .pool_size(2)
        .set(
            "memory",
            "lock_all",
            if lock_all { "true" } else { "false" },
        )
        .start()
        .await;
    sidecar.wait_ready().await;
    traffic(&sidecar, 20).await;
    // More handshakes: a new pool, so the per-handshake key parse happens again.
    relay.close_connections();
    support::eventually(support::EVENTUALLY, "the pool to reconnect", || {
        let handshakes = relay.tls_accepted();
        async move { (handshakes >= 4).then_some(()) }
    })
    .await;
    sidecar.wait_ready().await;
    traffic(&sidecar, 20).await;
    let pid = sidecar.pid().expect("the sidecar runs");

    let der = match identity.key() {
        rustls_pki_types::PrivateKeyDer::Pkcs8(der) => der.secret_pkcs8_der().to_vec(),
        _ => unreachable!("rcgen writes PKCS#8"),
    };
    // The private scalar of a P-256 key: the 32-byte OCTET STRING after `version 1` in the
    // ECPrivateKey inside the PKCS#8 document.
    let scalar_at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an ECPrivateKey with a 32-byte scalar")
        + 5;
    let mut needles = vec![
        Needle {
            form: "pkcs8-der",
            bytes: der.clone(),
        },
        Needle {
            form: "private-scalar",
            bytes: der[scalar_at..scalar_at + 32].to_vec(),
        },
    ];
    for line in identity
        .key_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
    {
        needles.push(Needle {
            form: "pem-base64",
            bytes: line.as_bytes()[..line.len().min(40)].to_vec(),
        });
    }
    let scan = scan_memory(pid, &needles);
    assert!(
        scan.hits
            .iter()
            .any(|hit| hit.form == "pkcs8-der" && hit.mapping.is_sealed_secure_buffer()),
        "the key's DER is in a sealed SecureBuffer: {}",
        scan.describe()
    );
    let elsewhere: Vec<&Hit> = scan
        .hits
        .iter()
        .filter(|hit| hit.form == "pem-base64" || !hit.mapping.is_sealed_secure_buffer())
        .collect();
    assert!(
        elsewhere.is_empty(),
        "key material outside its sealed SecureBuffer (lock_all = {lock_all}):\n{}",
        elsewhere
            .iter()
            .map(|hit| hit.describe())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_key_material_is_only_in_its_secure_buffer_after_handshakes() {
    if skip_unless_root("a memory scan") {
        return;
    }
    client_key_material_is_only_in_its_secure_buffer(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_key_material_is_only_in_its_secure_buffer_with_lock_all() {
    if skip_unless_root("a memory scan") {
        return;
    }
    client_key_material_is_only_in_its_secure_buffer(true).await;
}
