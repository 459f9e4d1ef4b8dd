//! The admin pages in a real browser: the real `sprint-sidecar demo` binary serves them, Debian's
//! headless `chromium` loads them, and the tests read the DOM Chromium produced after the page's
//! scripts ran. A screenshot of the dashboard is written to `target/test-output/dashboard.png`.
//!
//! Chromium is required: a missing browser fails these tests rather than skipping them (CI
//! installs the Debian package `chromium`; `SPRINT_SIDECAR_CHROMIUM` names another binary).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long the binary may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the demo pool may take to report its connection slots.
const POOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Wall-clock limit of one Chromium run (its virtual time budget is far shorter).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// Virtual time Chromium gives the page's timers before dumping the DOM: about five polls.
const DOM_TIME_BUDGET_MS: u32 = 5_000;
/// Virtual time before the screenshot: enough polls for the sparklines to show a trend.
const SCREENSHOT_TIME_BUDGET_MS: u32 = 20_000;
/// A rendered dashboard screenshot is tens of KiB; a blank page is a few.
const MIN_SCREENSHOT_BYTES: u64 = 15_000;

#[test]
fn dashboard_renders_one_row_per_connection_in_chromium() {
    let sidecar = Sidecar::start(&[]);
    let ids = sidecar.wait_for_connection_ids(None);

    let dom = chromium_dump_dom(&format!("http://{}/dashboard", sidecar.admin));
    let rows = rendered_connection_ids(&dom);
    assert_eq!(
        rows,
        ids,
        "the dashboard rows follow the pool's connection_ids; stderr:\n{}",
        sidecar.stderr_tail()
    );
    assert!(
        attribute_of(&dom, "pool-status", "data-status").is_some_and(|s| s != "unknown"),
        "the pool banner shows a status: {}",
        element_snippet(&dom, "pool-status")
    );
    assert!(
        tag_of(&dom, "error-banner").is_some_and(|tag| tag.contains(" hidden")),
        "no API error is shown: {}",
        element_snippet(&dom, "error-banner")
    );
    for id in ["request-rate", "error-rate"] {
        let text = text_of(&dom, id).unwrap_or_default();
        assert!(
            text.chars().any(|c| c.is_ascii_digit()),
            "#{id} shows a number, got {text:?}"
        );
    }
    assert!(
        dom.matches("<polyline").count() >= ids.len(),
        "every row has a latency sparkline"
    );

    let screenshot = output_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(
        SCREENSHOT_TIME_BUDGET_MS,
        &[
            "--window-size=1400,900".to_owned(),
            format!("--screenshot={}", screenshot.display()),
            format!("http://{}/dashboard", sidecar.admin),
        ],
    );
    let bytes = std::fs::read(&screenshot).unwrap_or_else(|e| {
        panic!(
            "chromium wrote no screenshot at {}: {e}",
            screenshot.display()
        )
    });
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is a PNG",
        screenshot.display()
    );
    assert!(
        bytes.len() as u64 >= MIN_SCREENSHOT_BYTES,
        "the screenshot ({} bytes) is more than a blank page",
        bytes.len()
    );
}

#[test]
fn docs_page_loads_without_external_assets() {
    let sidecar = Sidecar::start(&[]);

    let (status, headers, body) = http_get(sidecar.admin, "/docs", None);
    assert_eq!(status, 200, "GET /docs");
    assert!(
        header_value(&headers, "content-type").is_some_and(|v| v.starts_with("text/html")),
        "/docs is HTML: {headers:?}"
    );
    let html = String::from_utf8(body).expect("/docs is UTF-8");
    assert_no_external_assets("/docs", &html);

    let dom = chromium_dump_dom(&format!("http://{}/docs", sidecar.admin));
    for heading in ["SecureChannel", "SecureBuffer", "Admin API", "Limits"] {
        assert!(
            dom.contains(heading),
            "the rendered /docs has a {heading} section"
        );
    }
    for path in [
        "/api/v1/secure-channel/status",
        "/api/v1/memory-protection/self-check",
        "/openapi.json",
        "/dashboard",
    ] {
        assert!(dom.contains(path), "the rendered /docs documents {path}");
    }

    let (status, _, dashboard) = http_get(sidecar.admin, "/dashboard", None);
    assert_eq!(status, 200, "GET /dashboard");
    assert_no_external_assets("/dashboard", &String::from_utf8_lossy(&dashboard));
}

#[test]
fn dashboard_reads_the_admin_token_from_the_url_fragment() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let token = "dashboard-test-token-0123456789";
    let token_file = dir.path().join("admin-token");
    write_private_file(&token_file, token);
    let token_file = token_file.to_str().expect("a UTF-8 temp path").to_owned();
    let sidecar = Sidecar::start(&[("SPRINT_SIDECAR_ADMIN_TOKEN_FILE", token_file.as_str())]);

    let (status, _, _) = http_get(sidecar.admin, "/api/v1/secure-channel/status", None);
    assert_eq!(
        status, 401,
        "the token file is in force: /api/v1/* needs the token"
    );
    let ids = sidecar.wait_for_connection_ids(Some(token));

    let without = chromium_dump_dom(&format!("http://{}/dashboard", sidecar.admin));
    assert!(
        rendered_connection_ids(&without).is_empty(),
        "no rows without a token"
    );
    assert!(
        tag_of(&without, "error-banner").is_some_and(|tag| !tag.contains(" hidden")),
        "the error banner asks for a token: {}",
        element_snippet(&without, "error-banner")
    );

    let with = chromium_dump_dom(&format!("http://{}/dashboard#token={token}", sidecar.admin));
    assert_eq!(
        rendered_connection_ids(&with),
        ids,
        "rows render with the token from the fragment"
    );
}

#[test]
fn demo_takes_the_operators_configuration_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let token = "demo-config-test-token-42";
    let token_file = dir.path().join("admin-token");
    write_private_file(&token_file, token);
    let config = dir.path().join("demo.toml");
    // The file names another relay and an env token; the demo's own relay and token win.
    write_private_file(
        &config,
        &format!(
            "[admin]\ntoken_file = {:?}\n[upstream]\nendpoint = \"127.0.0.1:1\"\n\
             auth_token_env = \"NO_SUCH_VARIABLE\"\n",
            token_file.display().to_string()
        ),
    );
    let config = config.to_str().expect("a UTF-8 temp path").to_owned();
    let sidecar = Sidecar::start(&[("SPRINT_SIDECAR_CONFIG", config.as_str())]);
    let (status, _, _) = http_get(sidecar.admin, "/api/v1/secure-channel/status", None);
    assert_eq!(status, 401, "the file's admin token is in force");
    let ids = sidecar.wait_for_connection_ids(Some(token));
    assert!(!ids.is_empty(), "the pool lists its connections");
    let (status, _, body) = http_get(sidecar.admin, "/api/v1/secure-channel/status", Some(token));
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).expect("the pool status is JSON");
    assert_ne!(
        doc["endpoint"], "127.0.0.1:1",
        "the demo's relay wins: {doc}"
    );
    assert!(
        doc["active_connections"].as_u64().unwrap_or(0) > 0,
        "connected to the demo's relay: {doc}"
    );
}

// ---------------------------------------------------------------------------------------
// The sidecar process

/// A running `sprint-sidecar demo`; killed when dropped, whatever the test's outcome.
struct Sidecar {
    child: Child,
    admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Sidecar {
    fn start(env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sprint-sidecar"));
        command
            .args([
                "demo",
                "--admin-listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the sprint-sidecar binary starts");

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let err_pipe = child.stderr.take().expect("stderr is piped");
        thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut lines = sink.lock().expect("the stderr buffer is never poisoned");
                lines.push(line);
                if lines.len() > 200 {
                    lines.remove(0);
                }
            }
        });

        // Read stdout on a thread until the listening line, then keep draining it so that the
        // demo never blocks on a full pipe.
        let (found, listening) = mpsc::channel();
        let out_pipe = child.stdout.take().expect("stdout is piped");
        thread::spawn(move || {
            let mut found = Some(found);
            for line in BufReader::new(out_pipe).lines().map_while(Result::ok) {
                if line.starts_with("sprint-sidecar listening")
                    && let Some(sender) = found.take()
                {
                    let _ = sender.send(line);
                }
            }
        });

        let mut sidecar = Self {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
        };
        let line = listening.recv_timeout(STARTUP_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "no `sprint-sidecar listening` line within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                sidecar.stderr_tail()
            )
        });
        sidecar.admin = parse_admin_address(&line)
            .unwrap_or_else(|| panic!("malformed listening line: {line:?}"));
        sidecar
    }

    /// Polls the pool status until it lists its connection slots, and returns their ids; then
    /// waits (without failing) a little for a first usable connection, so the page shows traffic.
    fn wait_for_connection_ids(&self, token: Option<&str>) -> BTreeSet<u64> {
        let deadline = Instant::now() + POOL_TIMEOUT;
        let mut ids = BTreeSet::new();
        loop {
            let (status, _, body) = http_get(self.admin, "/api/v1/secure-channel/status", token);
            if status == 200 {
                let doc: serde_json::Value =
                    serde_json::from_slice(&body).expect("the pool status is JSON");
                ids = doc["connections"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .filter_map(|c| c["connection_id"].as_u64())
                            .collect()
                    })
                    .unwrap_or_default();
                let active = doc["active_connections"].as_u64().unwrap_or(0);
                if !ids.is_empty() && active > 0 {
                    return ids;
                }
            }
            if Instant::now() > deadline {
                assert!(
                    !ids.is_empty(),
                    "the pool listed no connections within {POOL_TIMEOUT:?} (last status {status}); stderr:\n{}",
                    self.stderr_tail()
                );
                return ids;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn stderr_tail(&self) -> String {
        self.stderr
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sprint-sidecar listening data=http://ADDR admin=http://ADDR` → the admin address.
fn parse_admin_address(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix("admin=http://"))
        .and_then(|address| address.trim_end_matches('/').parse().ok())
}

// ---------------------------------------------------------------------------------------
// Plain HTTP/1.0 over std: enough for a few GETs, and no chunked bodies to decode.

fn http_get(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the admin listener {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout can be set on a connected socket");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nAccept: */*\r\n{auth}\r\n"
    )
    .expect("send the request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read the answer to GET {path}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: no end of headers in {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: malformed status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body)
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------
// Chromium

fn chromium_binary() -> String {
    if let Ok(path) = std::env::var("SPRINT_SIDECAR_CHROMIUM") {
        return path;
    }
    for candidate in ["chromium", "chromium-browser"] {
        let found = Command::new(candidate)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return candidate.to_owned();
        }
    }
    panic!(
        "headless Chromium is required for the dashboard tests and was not found: install the \
         Debian package `chromium` (apt-get install -y chromium) or set SPRINT_SIDECAR_CHROMIUM"
    );
}

/// Runs headless Chromium with a fresh profile, `budget_ms` of virtual time for the page's
/// timers, and `args`; fails the test on a non-zero exit or when it outlives `BROWSER_TIMEOUT`.
fn chromium(budget_ms: u32, args: &[String]) -> Output {
    let profile = tempfile::tempdir().expect("a temporary Chromium profile");
    let mut child = Command::new(chromium_binary())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");

    let mut out_pipe = child.stdout.take().expect("stdout is piped");
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let stdout = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let stderr = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });

    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {BROWSER_TIMEOUT:?}: {args:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let output = Output {
        status,
        stdout: stdout.join().expect("the stdout reader does not panic"),
        stderr: stderr.join().expect("the stderr reader does not panic"),
    };
    assert!(
        output.status.success(),
        "chromium {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The DOM after the page's scripts ran for `DOM_TIME_BUDGET_MS` of virtual time.
fn chromium_dump_dom(url: &str) -> String {
    let output = chromium(
        DOM_TIME_BUDGET_MS,
        &["--dump-dom".to_owned(), url.to_owned()],
    );
    String::from_utf8(output.stdout).expect("chromium dumps UTF-8")
}

/// Where screenshots go: `target/test-output/`.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is target/tmp")
        .join("test-output");
    std::fs::create_dir_all(&dir).expect("create target/test-output");
    dir
}

// ---------------------------------------------------------------------------------------
// Reading the dumped DOM (serialised by Chromium, so attribute quoting is regular)

/// The `data-connection-id` of every `<tr>` the dashboard rendered.
fn rendered_connection_ids(dom: &str) -> BTreeSet<u64> {
    dom.match_indices("<tr ")
        .filter_map(|(at, _)| {
            let tag = &dom[at..at + dom[at..].find('>')?];
            let value = tag.split("data-connection-id=\"").nth(1)?;
            value[..value.find('"')?].parse().ok()
        })
        .collect()
}

/// The opening tag of the element with `id`, e.g. `<div id="x" class="y" hidden="">`.
fn tag_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

fn attribute_of(dom: &str, id: &str, attribute: &str) -> Option<String> {
    let tag = tag_of(dom, id)?;
    let value = tag.split(&format!(" {attribute}=\"")).nth(1)?;
    Some(value[..value.find('"')?].to_owned())
}

/// The text directly inside the element with `id` (up to its first child tag).
fn text_of(dom: &str, id: &str) -> Option<String> {
    let tag = tag_of(dom, id)?;
    let after = &dom[dom.find(tag)? + tag.len()..];
    Some(after[..after.find('<')?].trim().to_owned())
}

fn element_snippet(dom: &str, id: &str) -> String {
    match dom.find(&format!("id=\"{id}\"")) {
        Some(at) => dom[at.saturating_sub(20)..(at + 400).min(dom.len())].to_owned(),
        None => format!("(no element #{id})"),
    }
}

/// Fails when `html` loads anything from another origin: `src`/`href`/`action` attributes,
/// CSS `url()` or `@import` pointing at `http(s)://` or a protocol-relative `//host`.
/// Plain text that mentions a URL (an example command, a namespace string) is fine.
fn assert_no_external_assets(page: &str, html: &str) {
    let lower = html.to_ascii_lowercase();
    let compact: String = lower.chars().filter(|c| !c.is_whitespace()).collect();
    for attribute in ["src=", "href=", "action=", "srcset=", "poster=", "data="] {
        for quote in ["\"", "'", ""] {
            for scheme in ["http://", "https://", "//"] {
                let needle = format!(" {attribute}{quote}{scheme}");
                assert!(
                    !lower.contains(&needle),
                    "{page} references an external asset ({needle:?})"
                );
            }
        }
    }
    for needle in [
        "url(http",
        "url(\"http",
        "url('http",
        "url(//",
        "url(\"//",
        "url('//",
        "@import",
    ] {
        assert!(
            !compact.contains(needle),
            "{page} references an external asset ({needle:?})"
        );
    }
    assert!(
        !lower.contains("<link rel=\"stylesheet\"") && !lower.contains("<script src"),
        "{page} is self-contained: no linked stylesheets or scripts"
    );
}

fn write_private_file(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(content.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn external_asset_check_catches_remote_references_only() {
    let ok = r#"<a href="docs">x</a><pre>curl http://127.0.0.1:9091/openapi.json</pre><script>var NS = "http://www.w3.org/2000/svg";</script>"#;
    assert_no_external_assets("ok", ok);
    for bad in [
        r#"<img src="https://cdn.example/x.png">"#,
        r#"<link rel="stylesheet" href="//fonts.example/f.css">"#,
        "<style>body { background: url( https://x/y.png ) }</style>",
        "<style>@import 'x.css';</style>",
    ] {
        let caught = std::panic::catch_unwind(|| assert_no_external_assets("bad", bad)).is_err();
        assert!(caught, "not caught: {bad}");
    }
}

#[test]
fn dom_helpers_read_chromium_serialisation() {
    let dom = r#"<div id="pool-status" class="banner healthy" data-status="healthy"><span id="request-rate">12.5</span></div>
<div id="error-banner" class="banner error" role="alert" hidden=""></div>
<tbody><tr data-connection-id="1" class=""><td>#1</td></tr><tr class="unhealthy" data-connection-id="3"><td>#3</td></tr><tr class="empty"><td>none</td></tr></tbody>"#;
    assert_eq!(rendered_connection_ids(dom), BTreeSet::from([1, 3]));
    assert_eq!(
        attribute_of(dom, "pool-status", "data-status").as_deref(),
        Some("healthy")
    );
    assert_eq!(text_of(dom, "request-rate").as_deref(), Some("12.5"));
    assert!(tag_of(dom, "error-banner").is_some_and(|t| t.contains(" hidden")));
    assert_eq!(
        parse_admin_address(
            "sprint-sidecar listening data=http://127.0.0.1:4000 admin=http://127.0.0.1:4001"
        ),
        Some(SocketAddr::from(([127, 0, 0, 1], 4001)))
    );
}
