//! The load harness (issues 2 and 3): in one run it starts the test relay (the in-process
//! TLS relay of `tests/support`, ALPN h2 and http/1.1), Debian's nginx as the peer proxy and
//! the release `sprint-sidecar` in front of it, drives the same closed-loop load through each
//! (64 HTTP/1.1 keep-alive clients, a ~100-byte JSON-RPC POST to `/`), and prints requests/s,
//! p50/p99 latency, proxy CPU seconds per 10 000 requests and peak RSS, with the ratios
//! sidecar/nginx. The sidecar also runs with `memory.wipe_freed_memory` off to price the
//! wiping allocator. Then slow relay connections (+50 ms), to show the sidecar's
//! per-connection ejection:
//!
//! * `slow-*`: one relay connection is slow (the test relay's per-connection fault on the
//!   first connection the proxy opens); a re-dial gets a healthy one.
//! * `slowpath-*`: every relay connection whose id is a multiple of 4 is slow, so one in four
//!   of any set of connections (a slow relay instance behind a balancer); a re-dial may land
//!   on a slow one again.
//!
//! ```text
//!  core 1: this process, one thread ─ load generator (64 clients) ─┐   ┌─ test relay (or nginx,
//!                                                                  │   │  one worker, LOAD_RELAY)
//!  core 0: proxy under test ◀── plain HTTP/1.1 ────────────────────┘   │
//!          nginx: worker_processes 1          ── TLS (verify, SNI relay.test) ──┘
//!          sprint-sidecar: runtime.worker_threads 1
//!  reference: the load generator speaks TLS to the relay itself (no proxy)
//! ```
//!
//! Fairness: each proxy gets exactly one core (`taskset -c 0`: nginx with one worker
//! process, the sidecar with one tokio worker thread); the load generator and the relay share
//! the other core, so they are the same for both proxies. Both proxies add the same
//! `Authorization` header, verify the relay certificate, offer TLS 1.3 and resume sessions;
//! nginx gets `keepalive_requests 100000` (client and upstream side) so it never closes a
//! connection the sidecar would keep. nginx runs with `keepalive 16` (as specified) and
//! `keepalive 64` (= the client count: no upstream connection churn, its best case).
//!
//! The load core is the scarce one: the load generator and the relay must not cost it more
//! than the proxy costs its own core, or the figures measure the load core. So the load
//! generator is lean: its own HTTP/1.1 client ([`wire`]: prepared request bytes, one reused
//! buffer, httparse) on one thread (`current_thread` runtime) that it shares with the test
//! relay, pinned or not. hyper's client (`LOAD_CLIENT=hyper`) costs that core a quarter to
//! a third more per request; on the work-stealing runtime the harness used before, it
//! saturated that core. Even so the load core stays near its limit, and what a proxy's
//! traffic costs the relay there shows in the throughput: the test relay (hyper) serves the
//! sidecar's multiplexed h2 for less than nginx's 64 HTTP/1.1 connections; an nginx relay
//! (`LOAD_RELAY=nginx`, a separate process on the load core) serves h2 for more (it writes
//! each answer's HEADERS and DATA separately), and there the kernel's scheduler,
//! arbitrating the load core between the load generator and the relay process, sets the
//! latency tail (`LOAD_RELAY_NICE` shows how much). The `gen/10k` and `rly/10k` columns
//! show the load core's share per request.
//!
//! Run: `cargo bench --bench load` (builds `target/release/sprint-sidecar` first). Plain
//! `cargo test`/`cargo nextest run` never run it: bench targets are not test targets, and
//! without cargo bench's `--bench` flag this program only prints how to run it.
//!
//! Environment: `LOAD_SECONDS` (measured seconds per healthy scenario, 10, split over the
//! rounds), `LOAD_WARMUP` (2, before the first window; later windows 0.5 s),
//! `LOAD_SLOW_SECONDS` (6), `LOAD_SLOW_WARMUP` (4: time for the sidecar to find and eject a
//! slow connection), `LOAD_CLIENTS` (64), `LOAD_MAX_REQUESTS` (per scenario,
//! 5 000 000), `LOAD_SLOW_MS` (50), `NGINX_KEEPALIVE` (comma list, `16,64`),
//! `NGINX_SLOW_KEEPALIVE` (comma list, `4`), `LOAD_ROUNDS` (5: every healthy scenario's proxy
//! runs at once, idle but for the one under load, and the load visits each in turn for
//! `LOAD_SECONDS / LOAD_ROUNDS`, round after round, so drift of a shared machine hits all of
//! them alike; the summary pools the rounds), `LOAD_SCENARIOS` (comma
//! list; default `direct, nginx,sidecar,sidecar-nowipe,slow-nginx,slow-sidecar,slowpath-nginx,
//! slowpath-sidecar`;
//! `sidecar-http1`, the sidecar speaking HTTP/1.1 to the relay over one pool connection per
//! client, and `sidecar-alt`, the default sidecar with the extra environment `LOAD_ALT_ENV`
//! (`KEY=VALUE,...`, e.g. `SPRINT_SIDECAR_POOL_SIZE=8`; `;` separates variants) to compare
//! settings side by side; `BIN=path` in a variant runs it from another build, e.g. a copy
//! of the binary before a change; both run only when named), `LOAD_PIN` (1: pin as above; 0: let the scheduler place
//! everything), `NGINX` (default `/usr/sbin/nginx`), `SIDECAR_BIN` (must be the binary Cargo
//! built for this bench), `LOAD_STEAL_LIMIT` (2: a healthy window in which the hypervisor stole
//! more than this percentage of either core, `/proc/stat` steal, is measured again, at most
//! `LOAD_STEAL_RETRIES` (3) times, keeping the least disturbed), `LOAD_RELAY` (`support`, the
//! default: the test relay; or `nginx`: Debian's nginx as the relay of the healthy
//! scenarios, one worker on the load core), `LOAD_RELAY_NICE` (0: the nginx relay's
//! `worker_priority`), `LOAD_RELAY_KEEPALIVE_REQUESTS` (10 000 000: requests per connection
//! before the nginx relay rotates it; nginx's own default is 1000), `LOAD_PROFILE` (a
//! directory: each healthy window's answered requests are appended to
//! `<scenario>.samples` there, one `completion-µs latency-µs relay-connection` line each, in
//! completion order, and each scenario's latency quantiles from p1 to p99.9 are printed; to
//! tell a tail of rare stalls, which hit every request in flight at once, from a wider
//! spread), `LOAD_CLIENT` (`wire`, the default, or `hyper`: the load generator's
//! HTTP/1.1 client).

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "load/wire.rs"]
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

use support::{Fault, Pki, Proto, Relay, Sidecar};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The token both proxies add to every upstream request.
const TOKEN: &str = "Bearer 3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a";

/// One request may take this long before the client counts an error and reconnects.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The core of the proxy under test, and of this process, when pinning.
const PROXY_CORE: usize = 0;
const LOAD_CORE: usize = 1;

/// A JSON-RPC call of 100 bytes.
fn request_body() -> Bytes {
    let body = br#"{"jsonrpc":"2.0","id":42,"method":"getblockheader","params":["00000000000000000002a7c4c1e48d76c5a3"]}"#;
    Bytes::from_static(body)
}

// ---- settings ---------------------------------------------------------------------------

struct Settings {
    seconds: f64,
    warmup: f64,
    slow_seconds: f64,
    slow_warmup: f64,
    clients: usize,
    /// Healthy scenarios run this many times, interleaved; the tables show per-field medians.
    rounds: usize,
    max_requests: u64,
    slow_delay: Duration,
    nginx_keepalives: Vec<u32>,
    nginx_slow_keepalives: Vec<u32>,
    scenarios: Vec<String>,
    pin: bool,
    nginx: PathBuf,
    sidecar: PathBuf,
    /// `LOAD_STEAL_LIMIT` (percent): a healthy window with more steal is measured again,
    /// at most `LOAD_STEAL_RETRIES` times.
    steal_limit: f64,
    steal_retries: usize,
    /// `LOAD_RELAY`: the relay of the healthy scenarios.
    relay: RelayChoice,
    /// `LOAD_ALT_ENV`: the environments of the `sidecar-alt` variants (`KEY=VALUE,...;...`).
    alt_envs: Vec<Vec<(String, String)>>,
    /// `LOAD_CLIENT`: the load generator's HTTP/1.1 client.
    client: ClientKind,
    /// `LOAD_RELAY_NICE`: the nginx relay's `worker_priority`.
    relay_nice: i32,
    /// `LOAD_RELAY_KEEPALIVE_REQUESTS`: requests per connection before the nginx relay
    /// rotates it (GOAWAY, or `Connection: close` over HTTP/1.1).
    relay_keepalive_requests: u64,
    /// `LOAD_PROFILE`: a directory for every healthy window's samples, and a latency profile
    /// per scenario on stderr.
    profile: Option<PathBuf>,
}

/// The HTTP/1.1 client of the load generator (`LOAD_CLIENT`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// `wire`: prepared request bytes, one reused read buffer, httparse ([`wire`]).
    Wire,
    /// `hyper`: hyper's client connection, a `Request` and a collected body per request.
    Hyper,
}

impl ClientKind {
    fn describe(self) -> &'static str {
        match self {
            ClientKind::Wire => {
                "wire (prepared bytes, httparse; LOAD_CLIENT=hyper for hyper's client)"
            }
            ClientKind::Hyper => "hyper's client (LOAD_CLIENT=hyper)",
        }
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T, String> {
    match std::env::var(key) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{key}={text:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

/// The value of the choice the environment names (`key`), or of `default`'s.
fn env_choice<T: Copy>(key: &str, default: &str, choices: &[(&str, T)]) -> Result<T, String> {
    let name = env_or(key, default.to_owned())?;
    choices
        .iter()
        .find(|(choice, _)| *choice == name)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<String> = choices
                .iter()
                .map(|(choice, _)| format!("{choice:?}"))
                .collect();
            format!("{key}: {name:?} is not one of {}", names.join(", "))
        })
}

/// A comma-separated list from the environment, or `default`.
fn env_list(key: &str, default: &str) -> Vec<String> {
    std::env::var(key)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect()
}

const ALL_SCENARIOS: [&str; 10] = [
    "direct",
    "nginx",
    "sidecar",
    "sidecar-nowipe",
    "sidecar-http1",
    "sidecar-alt",
    "slow-nginx",
    "slow-sidecar",
    "slowpath-nginx",
    "slowpath-sidecar",
];

impl Settings {
    fn from_env() -> Result<Self, String> {
        // `sidecar-http1` (HTTP/1.1 to the relay, one pool connection per client) is an
        // extra, run on request: it separates h2's cost from the rest of the data path.
        let default: Vec<&str> = ALL_SCENARIOS
            .iter()
            .copied()
            .filter(|name| !matches!(*name, "sidecar-http1" | "sidecar-alt"))
            .collect();
        let scenarios = env_list("LOAD_SCENARIOS", &default.join(","));
        if let Some(unknown) = scenarios
            .iter()
            .find(|name| !ALL_SCENARIOS.contains(&name.as_str()))
        {
            return Err(format!(
                "LOAD_SCENARIOS: unknown scenario {unknown:?} (known: {})",
                ALL_SCENARIOS.join(",")
            ));
        }
        let keepalives = |key: &str, default: &str| {
            env_list(key, default)
                .iter()
                .map(|item| {
                    item.parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("{key}: {item:?} is not a positive number"))
                })
                .collect::<Result<Vec<u32>, String>>()
        };
        let nginx_keepalives = keepalives("NGINX_KEEPALIVE", "16,64")?;
        let nginx_slow_keepalives = keepalives("NGINX_SLOW_KEEPALIVE", "4")?;
        let alt_envs = std::env::var("LOAD_ALT_ENV")
            .unwrap_or_default()
            .split(';')
            .map(|variant| {
                variant
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| {
                        item.split_once('=')
                            .map(|(key, value)| (key.to_owned(), value.to_owned()))
                            .ok_or_else(|| format!("LOAD_ALT_ENV: {item:?} is not KEY=VALUE"))
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map(|mut pairs| {
                        // `BIN` first, so the environment is the slice after it.
                        pairs.sort_by_key(|(key, _)| key != "BIN");
                        pairs
                    })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let settings = Settings {
            seconds: env_or("LOAD_SECONDS", 10.0)?,
            warmup: env_or("LOAD_WARMUP", 2.0)?,
            slow_seconds: env_or("LOAD_SLOW_SECONDS", 6.0)?,
            slow_warmup: env_or("LOAD_SLOW_WARMUP", 4.0)?,
            clients: env_or("LOAD_CLIENTS", 64)?,
            rounds: env_or("LOAD_ROUNDS", 5)?,
            max_requests: env_or("LOAD_MAX_REQUESTS", 5_000_000)?,
            slow_delay: Duration::from_millis(env_or("LOAD_SLOW_MS", 50)?),
            nginx_keepalives,
            nginx_slow_keepalives,
            scenarios,
            pin: env_or("LOAD_PIN", 1u8)? == 1,
            nginx: PathBuf::from(env_or("NGINX", "/usr/sbin/nginx".to_owned())?),
            sidecar: PathBuf::from(env_or("SIDECAR_BIN", support::sidecar::BINARY.to_owned())?),
            alt_envs,
            steal_limit: env_or("LOAD_STEAL_LIMIT", 2.0)? / 100.0,
            steal_retries: env_or("LOAD_STEAL_RETRIES", 3)?,
            relay_nice: env_or("LOAD_RELAY_NICE", 0)?,
            relay_keepalive_requests: env_or("LOAD_RELAY_KEEPALIVE_REQUESTS", 10_000_000)?,
            profile: std::env::var_os("LOAD_PROFILE").map(PathBuf::from),
            client: env_choice(
                "LOAD_CLIENT",
                "wire",
                &[("wire", ClientKind::Wire), ("hyper", ClientKind::Hyper)],
            )?,
            relay: env_choice(
                "LOAD_RELAY",
                "support",
                &[
                    ("support", RelayChoice::Support),
                    ("nginx", RelayChoice::Nginx),
                ],
            )?,
        };
        let durations = [
            settings.seconds,
            settings.warmup,
            settings.slow_seconds,
            settings.slow_warmup,
        ];
        if durations
            .iter()
            .any(|seconds| !seconds.is_finite() || *seconds < 0.0)
            || settings.seconds == 0.0
            || settings.slow_seconds == 0.0
        {
            return Err("LOAD_SECONDS and LOAD_SLOW_SECONDS must be > 0, warm-ups >= 0".to_owned());
        }
        if settings.rounds == 0 {
            return Err("LOAD_ROUNDS must be at least 1".to_owned());
        }
        if settings.clients == 0 {
            return Err("LOAD_CLIENTS must be at least 1".to_owned());
        }
        if !(-20..=19).contains(&settings.relay_nice) {
            return Err("LOAD_RELAY_NICE must be within -20..19".to_owned());
        }
        if settings.relay_keepalive_requests == 0 {
            return Err("LOAD_RELAY_KEEPALIVE_REQUESTS must be at least 1".to_owned());
        }
        Ok(settings)
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|name| name == scenario)
    }
}

// ---- /proc accounting ---------------------------------------------------------------------

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Steal ticks of every core (`/proc/stat` `cpuN` lines, 8th value): time the hypervisor
/// gave this VM's virtual CPU to someone else.
fn steal_ticks() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(|line| {
            line.split_whitespace()
                .nth(8)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// utime + stime of process `pid` (all its threads) in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // After the name: state(3) ... utime(14) stime(15), so indexes 11 and 12 here.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A `kB` field (`VmHWM`, `VmRSS`) of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Direct children of `pid` (nginx's workers).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|child| child.parse().ok())
        .collect()
}

/// The processes that make up a proxy: the sidecar, or nginx's master and workers.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    all.extend(children(pid));
    all
}

/// Read-type plus write-type system calls of process `pid` so far (`/proc/PID/io`).
fn io_syscalls(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> Option<u64> {
        io.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
    };
    Some(field("syscr:")? + field("syscw:")?)
}

/// Voluntary context switches (the thread went to sleep waiting for work) of every thread of
/// process `pid` so far (`/proc/PID/task/*/status`).
fn sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("voluntary_ctxt_switches:")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .sum()
}

fn tree_sleeps(pid: u32) -> u64 {
    process_tree(pid).into_iter().map(sleeps).sum()
}

fn tree_io_syscalls(pid: u32) -> u64 {
    process_tree(pid).into_iter().filter_map(io_syscalls).sum()
}

fn tree_ticks(pid: u32) -> u64 {
    process_tree(pid).into_iter().filter_map(cpu_ticks).sum()
}

/// Sum of peak RSS over the tree (for nginx, shared pages of master and worker are counted
/// in both: an upper bound, as `ps` would show it).
fn tree_peak_rss_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|pid| status_kib(pid, "VmHWM"))
        .sum()
}

/// Pins every thread of `pid` to `core` (threads created later inherit it).
fn pin(pid: u32, core: usize) -> Result<(), String> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .map_err(|error| format!("taskset: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("taskset -a -p -c {core} {pid} failed: {status}"))
    }
}

// ---- the load generator -------------------------------------------------------------------

/// Where the clients connect: a proxy's plain listener, or the relay itself over TLS.
#[derive(Clone)]
enum Target {
    Plain(SocketAddr),
    Tls {
        addr: SocketAddr,
        connector: TlsConnector,
        name: ServerName<'static>,
    },
}

impl Target {
    fn host(&self) -> HeaderValue {
        let addr = match self {
            Target::Plain(addr) | Target::Tls { addr, .. } => addr,
        };
        HeaderValue::from_str(&addr.to_string()).expect("a socket address is a valid Host")
    }

    /// A connection of the load generator's kind to the target.
    async fn session(&self, kind: ClientKind) -> Result<Session, BoxError> {
        let io = self.connect_io().await?;
        Ok(match kind {
            ClientKind::Wire => Session::Wire(wire::Conn::new(io)),
            ClientKind::Hyper => Session::Hyper(handshake(io).await?),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, BoxError> {
        handshake(self.connect_io().await?).await
    }

    async fn connect_io(&self) -> Result<Box<dyn wire::Io>, BoxError> {
        match self {
            Target::Plain(addr) => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream))
            }
            Target::Tls {
                addr,
                connector,
                name,
            } => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(Box::new(connector.connect(name.clone(), stream).await?))
            }
        }
    }
}

/// One client's connection: hyper's, or the wire client's.
enum Session {
    Hyper(SendRequest<Full<Bytes>>),
    Wire(wire::Conn),
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One finished request.
#[derive(Clone, Copy)]
struct Sample {
    /// Completion time, µs since the run started.
    done_us: u64,
    latency_us: u32,
    /// `x-relay-connection-id` of the answer (0 when absent).
    relay_connection: u32,
    ok: bool,
}

/// Runs `clients` closed-loop clients against `target` for `duration` (or until
/// `max_requests` were issued) and returns every sample.
async fn generate(
    target: Target,
    kind: ClientKind,
    clients: usize,
    started: Instant,
    duration: Duration,
    max_requests: u64,
) -> Vec<Sample> {
    let issued = Arc::new(AtomicU64::new(0));
    let end = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let target = target.clone();
            let issued = issued.clone();
            tokio::spawn(client(target, kind, started, end, issued, max_requests))
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("a client task never panics"));
    }
    samples
}

async fn client(
    target: Target,
    kind: ClientKind,
    started: Instant,
    end: Instant,
    issued: Arc<AtomicU64>,
    max_requests: u64,
) -> Vec<Sample> {
    let host = target.host();
    let body = request_body();
    let wire_request = wire::request_bytes(host.to_str().unwrap_or_default(), &body);
    let mut samples = Vec::with_capacity(16 * 1024);
    let mut session: Option<Session> = None;
    while Instant::now() < end && issued.fetch_add(1, Ordering::Relaxed) < max_requests {
        let begin = Instant::now();
        let mut current = match session.take() {
            Some(session) => session,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, target.session(kind)).await {
                Ok(Ok(session)) => session,
                _ => {
                    samples.push(sample(started, begin, 0, false));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let begin = Instant::now();
        let exchange = async {
            match &mut current {
                Session::Wire(conn) => {
                    let answer = conn.exchange(&wire_request).await?;
                    Ok::<_, BoxError>((
                        answer.status == 200,
                        answer.relay_connection,
                        !answer.close,
                    ))
                }
                Session::Hyper(sender) => {
                    let request = Request::builder()
                        .method(Method::POST)
                        .uri("/")
                        .header(header::HOST, host.clone())
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(body.clone()))
                        .expect("a static request is valid");
                    sender.ready().await?;
                    let response = sender.send_request(request).await?;
                    let ok = response.status() == http::StatusCode::OK;
                    let relay_connection = response
                        .headers()
                        .get("x-relay-connection-id")
                        .and_then(|value| value.to_str().ok()?.parse().ok())
                        .unwrap_or(0);
                    response.into_body().collect().await?;
                    Ok((ok, relay_connection, true))
                }
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok((ok, relay_connection, reusable))) => {
                samples.push(sample(started, begin, relay_connection, ok));
                if reusable {
                    session = Some(current);
                }
            }
            // Error or timeout: count it, drop the connection, reconnect.
            _ => samples.push(sample(started, begin, 0, false)),
        }
    }
    samples
}

fn sample(started: Instant, begin: Instant, relay_connection: u32, ok: bool) -> Sample {
    let now = Instant::now();
    Sample {
        done_us: now.duration_since(started).as_micros() as u64,
        latency_us: now.duration_since(begin).as_micros().min(u32::MAX as u128) as u32,
        relay_connection,
        ok,
    }
}

// ---- statistics -----------------------------------------------------------------------------

/// The `q` quantile of sorted latencies, in ms.
fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us[rank - 1] as f64 / 1000.0
}

fn sorted_latencies<'a>(samples: impl Iterator<Item = &'a Sample>) -> Vec<u32> {
    let mut latencies: Vec<u32> = samples.map(|sample| sample.latency_us).collect();
    latencies.sort_unstable();
    latencies
}

/// Which relay connections are slow in a scenario.
#[derive(Clone, Copy)]
enum SlowSet {
    /// Exactly this connection.
    One(u32),
    /// Every connection with an id >= `from` that is a multiple of 4.
    EveryFourth { from: u32 },
}

impl SlowSet {
    fn contains(self, id: u32) -> bool {
        match self {
            SlowSet::One(slow) => id == slow,
            SlowSet::EveryFourth { from } => id >= from && id.is_multiple_of(4),
        }
    }

    fn describe(self) -> String {
        match self {
            SlowSet::One(id) => format!("relay connection #{id}"),
            SlowSet::EveryFourth { .. } => "every 4th relay connection".to_owned(),
        }
    }
}

/// What one scenario measured.
struct Measured {
    name: String,
    requests: u64,
    errors: u64,
    window_seconds: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Every answered request's latency in the window, sorted (for pooling rounds).
    latencies_us: Vec<u32>,
    /// Proxy CPU over the measured window (None for the direct reference).
    proxy_cpu_s: Option<f64>,
    peak_rss_kib: Option<u64>,
    /// CPU of this process (load generator + relay) over the window, as a share of a core.
    load_core_busy: f64,
    /// CPU seconds of the load generator (this process, with the in-process relay when that
    /// one answers) and of the nginx relay's processes over the window: what each proxy's
    /// way of talking costs the other side.
    generator_cpu_s: f64,
    relay_cpu_s: Option<f64>,
    /// Time the hypervisor took from the two cores during the window (`/proc/stat` steal),
    /// as a share of the window, the larger of the two.
    steal: f64,
    /// TLS handshakes the relay completed (the in-process relay only: nginx does not say).
    relay_handshakes: Option<u64>,
    /// Read and write system calls of the proxy during the window.
    proxy_io_syscalls: Option<u64>,
    /// Times the proxy's threads, and this process's, went to sleep for want of work.
    proxy_sleeps: Option<u64>,
    generator_sleeps: u64,
    slow: Option<SlowView>,
}

impl Measured {
    fn cpu_per_10k(&self) -> Option<f64> {
        self.proxy_cpu_s
            .map(|cpu| cpu / self.requests.max(1) as f64 * 10_000.0)
    }

    /// CPU seconds per 10 000 answered requests.
    fn per_10k(&self, cpu_s: f64) -> f64 {
        cpu_s / self.requests.max(1) as f64 * 10_000.0
    }

    /// Several rounds of one scenario as one: requests, CPU, system calls and handshakes
    /// summed (so CPU per request is total CPU over total requests), latency percentiles
    /// over every request of every round, peak RSS the largest.
    fn pooled(name: &str, rounds: &[&Measured]) -> Measured {
        let window_seconds: f64 = rounds.iter().map(|m| m.window_seconds).sum();
        let mut latencies: Vec<u32> = rounds
            .iter()
            .flat_map(|m| m.latencies_us.iter().copied())
            .collect();
        latencies.sort_unstable();
        let requests: u64 = rounds.iter().map(|m| m.requests).sum();
        let all = |f: &dyn Fn(&Measured) -> Option<f64>| -> Option<Vec<f64>> {
            rounds.iter().map(|m| f(m)).collect()
        };
        Measured {
            name: name.to_owned(),
            requests,
            errors: rounds.iter().map(|m| m.errors).sum(),
            window_seconds,
            rps: requests as f64 / window_seconds.max(f64::EPSILON),
            p50_ms: quantile_ms(&latencies, 0.50),
            p99_ms: quantile_ms(&latencies, 0.99),
            p999_ms: quantile_ms(&latencies, 0.999),
            latencies_us: latencies,
            proxy_cpu_s: all(&|m| m.proxy_cpu_s).map(|cpu| cpu.iter().sum()),
            peak_rss_kib: rounds.iter().filter_map(|m| m.peak_rss_kib).max(),
            load_core_busy: rounds
                .iter()
                .map(|m| m.load_core_busy * m.window_seconds)
                .sum::<f64>()
                / window_seconds.max(f64::EPSILON),
            generator_cpu_s: rounds.iter().map(|m| m.generator_cpu_s).sum(),
            relay_cpu_s: all(&|m| m.relay_cpu_s).map(|cpu| cpu.iter().sum()),
            relay_handshakes: rounds
                .iter()
                .map(|m| m.relay_handshakes)
                .sum::<Option<u64>>(),
            proxy_io_syscalls: all(&|m| m.proxy_io_syscalls.map(|n| n as f64))
                .map(|counts| counts.iter().sum::<f64>() as u64),
            proxy_sleeps: all(&|m| m.proxy_sleeps.map(|n| n as f64))
                .map(|counts| counts.iter().sum::<f64>() as u64),
            generator_sleeps: rounds.iter().map(|m| m.generator_sleeps).sum(),
            steal: rounds
                .iter()
                .map(|m| m.steal * m.window_seconds)
                .sum::<f64>()
                / window_seconds.max(f64::EPSILON),
            slow: None,
        }
    }
}

/// The slow-connection view of a scenario.
struct SlowView {
    set: SlowSet,
    p99_healthy_ms: f64,
    p99_slow_ms: f64,
    /// Share of measured requests answered through a slow connection.
    slow_share: f64,
    /// Per second of the whole run (warm-up included): (p99 ms, share on slow connections).
    timeline: Vec<(f64, f64)>,
    /// Distinct relay connections that answered during the window.
    distinct_connections: usize,
    /// For [`SlowSet::One`]: whether it was still open at the end of the window.
    slow_open_at_end: Option<bool>,
    ejections: Option<usize>,
}

struct Window {
    from_us: u64,
    to_us: u64,
    seconds: f64,
}

impl Window {
    fn contains(&self, sample: &Sample) -> bool {
        sample.done_us >= self.from_us && sample.done_us < self.to_us
    }
}

/// `LOAD_PROFILE`: appends a window's answered requests to `<dir>/<scenario>.samples`, in
/// completion order.
fn append_samples(dir: &Path, name: &str, samples: &[Sample], window: &Window) {
    use std::io::Write;
    let file_name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{file_name}.samples"));
    let mut answered: Vec<&Sample> = samples
        .iter()
        .filter(|sample| sample.ok && window.contains(sample))
        .collect();
    answered.sort_unstable_by_key(|sample| sample.done_us);
    let mut out = String::with_capacity(answered.len() * 20);
    for sample in answered {
        out.push_str(&format!(
            "{} {} {}\n",
            sample.done_us, sample.latency_us, sample.relay_connection
        ));
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(out.as_bytes()));
    if let Err(error) = written {
        eprintln!(
            "[load] LOAD_PROFILE: cannot write {}: {error}",
            path.display()
        );
    }
}

/// `LOAD_PROFILE`: a scenario's latency quantiles over all its rounds.
fn print_profile(m: &Measured) {
    let quantiles = [
        0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999,
    ];
    let profile: Vec<String> = quantiles
        .iter()
        .map(|&q| format!("p{}={:.2}", q * 100.0, quantile_ms(&m.latencies_us, q)))
        .collect();
    eprintln!("[profile] {}: {} ms", m.name, profile.join(" "));
}

fn summarise(samples: &[Sample], window: &Window) -> (u64, u64, Vec<u32>) {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|sample| window.contains(sample))
        .collect();
    let ok: Vec<&Sample> = inside.iter().copied().filter(|sample| sample.ok).collect();
    let errors = (inside.len() - ok.len()) as u64;
    (ok.len() as u64, errors, sorted_latencies(ok.into_iter()))
}

fn slow_view(samples: &[Sample], window: &Window, set: SlowSet) -> SlowView {
    let measured: Vec<&Sample> = samples
        .iter()
        .filter(|sample| sample.ok && window.contains(sample))
        .collect();
    let healthy = sorted_latencies(
        measured
            .iter()
            .copied()
            .filter(|sample| !set.contains(sample.relay_connection)),
    );
    let slow = sorted_latencies(
        measured
            .iter()
            .copied()
            .filter(|sample| set.contains(sample.relay_connection)),
    );
    // Whole seconds only: the last partial one holds just the stragglers.
    let seconds = (window.to_us / 1_000_000) as usize;
    let mut timeline = Vec::with_capacity(seconds);
    for second in 0..seconds as u64 {
        let from = second * 1_000_000;
        let in_second: Vec<&Sample> = samples
            .iter()
            .filter(|sample| {
                sample.ok && sample.done_us >= from && sample.done_us < from + 1_000_000
            })
            .collect();
        let on_slow = in_second
            .iter()
            .filter(|sample| set.contains(sample.relay_connection))
            .count();
        let share = on_slow as f64 / in_second.len().max(1) as f64;
        let p99 = quantile_ms(&sorted_latencies(in_second.into_iter()), 0.99);
        timeline.push((p99, share));
    }
    let distinct_connections = measured
        .iter()
        .map(|sample| sample.relay_connection)
        .collect::<std::collections::HashSet<_>>()
        .len();
    SlowView {
        set,
        p99_healthy_ms: quantile_ms(&healthy, 0.99),
        p99_slow_ms: quantile_ms(&slow, 0.99),
        slow_share: slow.len() as f64 / measured.len().max(1) as f64,
        timeline,
        distinct_connections,
        slow_open_at_end: None,
        ejections: None,
    }
}

// ---- one scenario ---------------------------------------------------------------------------

/// A proxy process as the harness sees it.
struct ProxyProcess {
    pid: u32,
    addr: SocketAddr,
}

/// How long a scenario runs.
#[derive(Clone, Copy)]
struct Phases {
    warmup: f64,
    seconds: f64,
}

/// Drives the load at `target`, snapshots CPU at the window's edges, and summarises.
/// What a window can learn from the relay: the in-process one counts handshakes and knows
/// its connections; the nginx relay's process adds to the load core's CPU.
#[derive(Clone, Copy)]
struct RelaySide<'a> {
    recorded: Option<&'a Relay>,
    process: Option<u32>,
}

async fn measure(
    name: &str,
    settings: &Settings,
    relay_side: RelaySide<'_>,
    target: Target,
    proxy: Option<&ProxyProcess>,
    phases: Phases,
    slow: Option<SlowSet>,
) -> Measured {
    let RelaySide {
        recorded: relay,
        process: relay_process,
    } = relay_side;
    let ticks_per_second = clock_ticks();
    let started = Instant::now();
    let warmup = Duration::from_secs_f64(phases.warmup);
    let seconds = Duration::from_secs_f64(phases.seconds);
    let load = tokio::spawn(generate(
        target,
        settings.client,
        settings.clients,
        started,
        warmup + seconds,
        settings.max_requests,
    ));

    tokio::time::sleep_until((started + warmup).into()).await;
    let window_start = Instant::now();
    let proxy_before = proxy.map(|proxy| tree_ticks(proxy.pid));
    let io_before = proxy.map(|proxy| tree_io_syscalls(proxy.pid));
    let sleeps_before = proxy.map(|proxy| tree_sleeps(proxy.pid));
    let generator_sleeps_before = sleeps(std::process::id());
    // The load core's work: this process, and the nginx relay when it answers.
    let generator_ticks = || cpu_ticks(std::process::id()).unwrap_or(0);
    let relay_ticks = || relay_process.map(tree_ticks);
    let generator_before = generator_ticks();
    let relay_before = relay_ticks();
    let steal_before = steal_ticks();
    let handshakes_before = relay.map(Relay::tls_accepted);

    tokio::time::sleep_until((started + warmup + seconds).into()).await;
    let window_seconds = window_start.elapsed().as_secs_f64();
    let proxy_after = proxy.map(|proxy| tree_ticks(proxy.pid));
    let io_after = proxy.map(|proxy| tree_io_syscalls(proxy.pid));
    let sleeps_after = proxy.map(|proxy| tree_sleeps(proxy.pid));
    let generator_sleeps_after = sleeps(std::process::id());
    let generator_after = generator_ticks();
    let relay_after = relay_ticks();
    let steal_after = steal_ticks();
    let relay_handshakes = relay
        .map(Relay::tls_accepted)
        .zip(handshakes_before)
        .map(|(after, before)| after - before);
    let peak_rss_kib = proxy.map(|proxy| tree_peak_rss_kib(proxy.pid));
    let slow_open_at_end = match slow {
        Some(SlowSet::One(id)) => {
            relay.map(|relay| relay.open_connection_ids().contains(&u64::from(id)))
        }
        _ => None,
    };

    let samples = load.await.expect("the load generator never panics");
    let from = window_start.duration_since(started);
    let window = Window {
        from_us: from.as_micros() as u64,
        to_us: (from + Duration::from_secs_f64(window_seconds)).as_micros() as u64,
        seconds: window_seconds,
    };
    let (requests, errors, latencies) = summarise(&samples, &window);
    if let Some(dir) = &settings.profile {
        append_samples(dir, name, &samples, &window);
    }
    Measured {
        name: name.to_owned(),
        requests,
        errors,
        window_seconds,
        rps: requests as f64 / window.seconds,
        p50_ms: quantile_ms(&latencies, 0.50),
        p99_ms: quantile_ms(&latencies, 0.99),
        p999_ms: quantile_ms(&latencies, 0.999),
        latencies_us: latencies,
        proxy_cpu_s: proxy_before
            .zip(proxy_after)
            .map(|(before, after)| after.saturating_sub(before) as f64 / ticks_per_second),
        peak_rss_kib,
        steal: steal_after
            .iter()
            .zip(&steal_before)
            .map(|(after, before)| after.saturating_sub(*before))
            .max()
            .unwrap_or(0) as f64
            / ticks_per_second
            / window_seconds,
        load_core_busy: (generator_after.saturating_sub(generator_before)
            + relay_after
                .zip(relay_before)
                .map_or(0, |(after, before)| after.saturating_sub(before)))
            as f64
            / ticks_per_second
            / window_seconds,
        generator_cpu_s: generator_after.saturating_sub(generator_before) as f64 / ticks_per_second,
        relay_cpu_s: relay_after
            .zip(relay_before)
            .map(|(after, before)| after.saturating_sub(before) as f64 / ticks_per_second),
        relay_handshakes,
        proxy_io_syscalls: io_before
            .zip(io_after)
            .map(|(before, after)| after.saturating_sub(before)),
        proxy_sleeps: sleeps_before
            .zip(sleeps_after)
            .map(|(before, after)| after.saturating_sub(before)),
        generator_sleeps: generator_sleeps_after.saturating_sub(generator_sleeps_before),
        slow: slow.map(|set| SlowView {
            slow_open_at_end,
            ..slow_view(&samples, &window, set)
        }),
    }
}

/// Waits until the relay has no open connection left from the previous scenario, then
/// clears every injected fault.
async fn wait_relay_idle(relay: &Relay) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.open_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.heal();
}

/// The id the relay will give the next connection it accepts.
fn next_connection_id(relay: &Relay) -> u64 {
    relay.connections().last().map_or(1, |info| info.id + 1)
}

/// Makes every future connection whose id is a multiple of 4 slow (ids are assigned in
/// accept order, so the fault is in place before the connection's first request).
fn slow_every_fourth(relay: &Relay, from: u64, delay: Duration) -> SlowSet {
    // Far more connections than even a churning nginx opens in one scenario.
    for id in (from..from + 400_000).filter(|id| id.is_multiple_of(4)) {
        relay.set_connection_fault(id, Fault::Delay(delay));
    }
    SlowSet::EveryFourth { from: from as u32 }
}

/// One request through `addr`; Ok when the relay answered 200.
async fn probe(addr: SocketAddr) -> Result<(), String> {
    let target = Target::Plain(addr);
    let mut sender = target.connect().await.map_err(|error| error.to_string())?;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/")
        .header(header::HOST, target.host())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(request_body()))
        .expect("a static request is valid");
    let response = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| error.to_string())?
        .to_bytes();
    if status == http::StatusCode::OK {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
    }
}

// ---- nginx ----------------------------------------------------------------------------------

/// A foreground nginx (master + one worker) with its config, pid file and logs in a tempdir.
struct Nginx {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    dir: TempDir,
}

fn free_port() -> SocketAddr {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("an ephemeral port can be bound");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// The relay the proxies under test forward to: its address, certificate name and CA.
#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    name: &'static str,
    pki: Arc<Pki>,
}

impl Upstream {
    fn of(relay: &Relay) -> Upstream {
        Upstream {
            addr: relay.addr(),
            name: relay.server_name(),
            pki: relay.pki().clone(),
        }
    }
}

/// Which relay answers in the healthy scenarios (`LOAD_RELAY`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RelayChoice {
    /// The test relay: the in-process relay of `tests/support` (rustls + hyper), on the
    /// load generator's thread. The default, as the issue names it.
    Support,
    /// Debian's nginx as the relay (TLS, ALPN h2 and http/1.1, a fixed JSON answer), one
    /// worker process on the load core: a production-grade h2 server, which serves h2 for
    /// more CPU than HTTP/1.1 (module docs).
    Nginx,
}

/// The answer of the nginx relay: the size and shape of the in-process relay's JSON-RPC
/// answer to the load's request. Like a production relay, and unlike the in-process one, it
/// adds no `x-relay-connection-id` header: only the slow scenarios (in-process relay) need it.
const NGINX_RELAY_ANSWER: &str =
    r#"{"jsonrpc":"2.0","id":1,"result":{"method":"getblockcount","params":[],"connection_id":1}}"#;

/// Debian's nginx as a TLS relay (see [`RelayChoice::Nginx`]).
struct NginxRelay {
    child: Child,
    upstream: Upstream,
    dir: TempDir,
}

impl NginxRelay {
    async fn start(settings: &Settings, pki: Arc<Pki>, name: &'static str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        let addr = free_port();
        let identity = pki.server_identity();
        let cert = dir.path().join("relay.crt");
        let key = dir.path().join("relay.key");
        std::fs::write(&cert, &identity.cert_pem).map_err(|error| error.to_string())?;
        support::pki::write_private(&key, identity.key_pem.as_bytes());
        let config = format!(
            r#"# Written by benches/load.rs: nginx as the relay, one worker on the load core.
worker_priority {priority};
{preamble}
    keepalive_requests {keepalive_requests};
    keepalive_timeout 300s;
    http2_max_requests {keepalive_requests};
    http2_max_concurrent_streams 256;
    server {{
        listen {addr} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            default_type application/json;
            return 200 '{NGINX_RELAY_ANSWER}';
        }}
    }}
}}
"#,
            preamble = nginx_preamble(dir.path()),
            cert = cert.display(),
            key = key.display(),
            priority = settings.relay_nice,
            keepalive_requests = settings.relay_keepalive_requests,
        );
        let path = dir.path().join("relay.conf");
        std::fs::write(&path, config).map_err(|error| error.to_string())?;
        let mut child = spawn_nginx(settings, LOAD_CORE, dir.path(), &path)
            .map_err(|error| format!("cannot start the nginx relay: {error}"))?;
        let upstream = Upstream { addr, name, pki };
        let deadline = Instant::now() + Duration::from_secs(10);
        let error_log = |dir: &TempDir| {
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the nginx relay exited ({status}); error.log:\n{}",
                    error_log(&dir)
                ));
            }
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(NginxRelay {
                    child,
                    upstream,
                    dir,
                });
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the nginx relay did not listen within 10 s; error.log:\n{}",
                    error_log(&dir)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            stop_nginx(&mut self.child, pid).await;
        }
        drop(self.dir);
    }
}

/// The part of an nginx configuration both nginx instances share: one worker in the
/// foreground, every file under `dir`, then the opening of the `http` block.
fn nginx_preamble(dir: &Path) -> String {
    let user = if is_root() { "user root;\n" } else { "" };
    let dir = dir.display();
    format!(
        r#"{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;"#
    )
}

/// Starts nginx in the foreground with `config`, its prefix and error log in `dir`, pinned
/// to `core` when pinning.
fn spawn_nginx(
    settings: &Settings,
    core: usize,
    dir: &Path,
    config: &Path,
) -> Result<Child, String> {
    let mut command = if settings.pin {
        let mut command = Command::new("taskset");
        command.args(["-c", &core.to_string()]).arg(&settings.nginx);
        command
    } else {
        Command::new(&settings.nginx)
    };
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(config)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
        .spawn()
        .map_err(|error| format!("{}: {error}", settings.nginx.display()))
}

/// SIGTERM (fast shutdown of master and workers), then waits; SIGKILL if it lingers.
async fn stop_nginx(child: &mut Child, pid: u32) {
    let workers = children(pid);
    signal("TERM", pid);
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        signal("KILL", pid);
        let _ = child.wait().await;
    }
    for worker in workers {
        if Path::new(&format!("/proc/{worker}")).exists() {
            signal("KILL", worker);
        }
    }
}

fn nginx_config(dir: &Path, listen: SocketAddr, upstream: &Upstream, keepalive: u32) -> String {
    let ca = upstream.pki.ca_file().display().to_string();
    format!(
        r#"# Written by benches/load.rs; nginx runs in the foreground on one core.
{preamble}
    keepalive_requests 100000;
    upstream relay_upstream {{
        server {relay};
        keepalive {keepalive};
        keepalive_requests 100000;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass https://relay_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{TOKEN}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
        }}
    }}
}}
"#,
        preamble = nginx_preamble(dir),
        relay = upstream.addr,
        name = upstream.name,
    )
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .is_some_and(|output| output.stdout.starts_with(b"0\n"))
}

impl Nginx {
    async fn start(
        settings: &Settings,
        upstream: &Upstream,
        keepalive: u32,
    ) -> Result<Nginx, String> {
        let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        let addr = free_port();
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, nginx_config(dir.path(), addr, upstream, keepalive))
            .map_err(|error| error.to_string())?;
        let child = spawn_nginx(settings, PROXY_CORE, dir.path(), &config)
            .map_err(|error| format!("cannot start {error}"))?;
        let pid = child.id().ok_or("nginx exited at once")?;
        let mut nginx = Nginx {
            child,
            pid,
            addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                return Err(format!(
                    "nginx exited ({status}); error.log:\n{}",
                    nginx.error_log()
                ));
            }
            if !children(pid).is_empty() && probe(addr).await.is_ok() {
                return Ok(nginx);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nginx did not answer within 10 s; error.log:\n{}",
                    nginx.error_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn process(&self) -> ProxyProcess {
        ProxyProcess {
            pid: self.pid,
            addr: self.addr,
        }
    }

    async fn stop(mut self) {
        stop_nginx(&mut self.child, self.pid).await;
    }
}

/// `kill -NAME pid` (through the command: the benches hold no `unsafe`).
fn signal(name: &str, pid: u32) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---- the sidecar ----------------------------------------------------------------------------

async fn start_sidecar(
    settings: &Settings,
    upstream: &Upstream,
    token_file: &Path,
    wipe: bool,
    http1_pool: Option<usize>,
    extra_env: &[(String, String)],
    binary: Option<&Path>,
) -> Result<Sidecar, String> {
    let mut builder = Sidecar::builder()
        .endpoint(&upstream.addr.to_string())
        .server_name(upstream.name)
        .pki(upstream.pki.clone())
        .set_str("pool", "reconnect_backoff_initial", "50ms")
        .set_str("pool", "reconnect_backoff_max", "500ms")
        .pool_size(4);
    if let Some(size) = http1_pool {
        // One request per connection at a time: as many connections as clients.
        builder = builder
            .pool_size(size)
            .set("upstream", "alpn", "[\"http/1.1\"]");
    }
    for (key, value) in extra_env {
        builder = builder.env(key, value);
    }
    if let Some(binary) = binary {
        builder = builder.binary(binary);
    }
    let sidecar = builder
        .set_str(
            "upstream",
            "auth_token_file",
            &token_file.display().to_string(),
        )
        .set(
            "memory",
            "wipe_freed_memory",
            if wipe { "true" } else { "false" },
        )
        // One event loop (the default, said here so the comparison does not depend on it):
        // the same single core nginx's one worker process gets.
        .set("runtime", "worker_threads", "1")
        .start()
        .await;
    let pid = sidecar.pid().ok_or("the sidecar exited at once")?;
    if settings.pin {
        pin(pid, PROXY_CORE)?;
    }
    sidecar.wait_ready().await;
    probe(sidecar.data_addr()).await.map_err(|error| {
        format!(
            "a request through the sidecar failed: {error}; logs:\n{}",
            sidecar.logs().join("\n")
        )
    })?;
    Ok(sidecar)
}

fn sidecar_process(sidecar: &Sidecar) -> ProxyProcess {
    ProxyProcess {
        pid: sidecar.pid().expect("the sidecar is running"),
        addr: sidecar.data_addr(),
    }
}

/// Slow ejections the sidecar logged so far.
fn ejections(sidecar: &Sidecar) -> usize {
    sidecar
        .logs()
        .iter()
        .filter(|line| line.contains("latency outlier"))
        .count()
}

// ---- report ---------------------------------------------------------------------------------

fn print_table(results: &[Measured]) {
    println!(
        "\n{:<44} {:>7} {:>7} {:>7} {:>8} {:>6} {:>9} {:>5} {:>8} {:>5} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>5}",
        "scenario",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "CPU s/10k",
        "proxy",
        "peak RSS",
        "load",
        "gen/10k",
        "rly/10k",
        "TLS hs",
        "sc/req",
        "px/slp",
        "ld/slp",
        "steal",
    );
    for m in results {
        let cpu_10k = m
            .cpu_per_10k()
            .map_or("-".to_owned(), |cpu| format!("{cpu:.3}"));
        let proxy_busy = m.proxy_cpu_s.map_or("-".to_owned(), |cpu| {
            format!("{:.0}%", cpu / m.window_seconds * 100.0)
        });
        let syscalls = m.proxy_io_syscalls.map_or("-".to_owned(), |count| {
            format!("{:.2}", count as f64 / m.requests.max(1) as f64)
        });
        let per_sleep = |sleeps: u64| format!("{:.1}", m.requests as f64 / sleeps.max(1) as f64);
        let proxy_per_sleep = m.proxy_sleeps.map_or("-".to_owned(), per_sleep);
        let rss = m.peak_rss_kib.map_or("-".to_owned(), |kib| {
            format!("{:.1}MiB", kib as f64 / 1024.0)
        });
        println!(
            "{:<44} {:>7.0} {:>7.2} {:>7.2} {:>8.2} {:>6} {:>9} {:>5} {:>8} {:>4.0}% {:>7.3} {:>7} {:>6} {:>6} {:>6} {:>6} {:>4.1}%",
            m.name,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.p999_ms,
            m.errors,
            cpu_10k,
            proxy_busy,
            rss,
            m.load_core_busy * 100.0,
            m.per_10k(m.generator_cpu_s),
            m.relay_cpu_s
                .map_or("-".to_owned(), |cpu| format!("{:.3}", m.per_10k(cpu))),
            m.relay_handshakes
                .map_or("-".to_owned(), |count| count.to_string()),
            syscalls,
            proxy_per_sleep,
            per_sleep(m.generator_sleeps),
            m.steal * 100.0,
        );
    }
}

fn ratio_line(label: &str, numerator: Option<&Measured>, denominator: Option<&Measured>) {
    let (Some(a), Some(b)) = (numerator, denominator) else {
        return;
    };
    let ratio = |x: f64, y: f64| format!("{:.2}", x / y);
    let cpu = match (a.cpu_per_10k(), b.cpu_per_10k()) {
        (Some(x), Some(y)) => ratio(x, y),
        _ => "-".to_owned(),
    };
    let rss = match (a.peak_rss_kib, b.peak_rss_kib) {
        (Some(x), Some(y)) => ratio(x as f64, y as f64),
        _ => "-".to_owned(),
    };
    println!(
        "  {label:<44} req/s {}  p50 {}  p99 {}  CPU/10k {}  peak RSS {}",
        ratio(a.rps, b.rps),
        ratio(a.p50_ms, b.p50_ms),
        ratio(a.p99_ms, b.p99_ms),
        cpu,
        rss
    );
}

fn print_slow(m: &Measured) {
    let Some(slow) = &m.slow else { return };
    println!(
        "  {}: slow = {}; {:.1}% of measured requests on slow connections; p99 all {:.2} ms, \
         healthy connections {:.2} ms, slow connections {:.2} ms",
        m.name,
        slow.set.describe(),
        slow.slow_share * 100.0,
        m.p99_ms,
        slow.p99_healthy_ms,
        slow.p99_slow_ms,
    );
    let mut facts = vec![format!(
        "{} relay connections answered during the window",
        slow.distinct_connections
    )];
    if let Some(open) = slow.slow_open_at_end {
        facts.push(format!(
            "the slow connection was {} at its end",
            if open { "still open" } else { "closed" }
        ));
    }
    if let Some(count) = slow.ejections {
        facts.push(format!("slow ejections logged by the sidecar: {count}"));
    }
    println!("    {}", facts.join("; "));
    let timeline: Vec<String> = slow
        .timeline
        .iter()
        .enumerate()
        .map(|(second, (p99, share))| format!("{second}s:{p99:.1}/{:.0}%", share * 100.0))
        .collect();
    println!(
        "    per second, warm-up included (p99 ms / share on slow): {}",
        timeline.join(" ")
    );
}

// ---- main -----------------------------------------------------------------------------------

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --benches` and friends do not.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("load harness: run it with `cargo bench --bench load` (skipped)");
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("load: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = preflight(&settings) {
        eprintln!("load: {error}");
        return ExitCode::from(2);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = settings.pin && cores >= 2;
    if pinned {
        // Before the runtime exists: every thread of this process inherits the mask.
        if let Err(error) = pin(std::process::id(), LOAD_CORE) {
            eprintln!("load: cannot pin the load generator: {error}");
            return ExitCode::from(2);
        }
    }
    let settings = Settings {
        pin: pinned,
        ..settings
    };
    // One thread runs the load generator and the in-process relay, pinned or not: no
    // work-stealing scheduler to pay for (it cost them a fifth more CPU per request and, not
    // pinned, let them crowd the proxy's core from two threads).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    match runtime.block_on(run(settings, cores)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("load: {error}");
            ExitCode::FAILURE
        }
    }
}

fn preflight(settings: &Settings) -> Result<(), String> {
    if !settings.sidecar.is_file() {
        return Err(format!(
            "the release binary {} is missing: build it first with `cargo build --release` \
             (or run through `cargo bench --bench load`, which builds it)",
            settings.sidecar.display()
        ));
    }
    if settings.sidecar != Path::new(support::sidecar::BINARY) {
        return Err(format!(
            "SIDECAR_BIN={} differs from the binary this bench was built with ({}); the \
             support harness starts the latter",
            settings.sidecar.display(),
            support::sidecar::BINARY
        ));
    }
    let wants_nginx = settings.scenarios.iter().any(|name| name.contains("nginx"));
    if wants_nginx && !settings.nginx.is_file() {
        return Err(format!(
            "nginx not found at {}: `apt-get install -y nginx` (or set NGINX=/path/to/nginx)",
            settings.nginx.display()
        ));
    }
    Ok(())
}

/// Everything a scenario needs besides its own proxy.
struct Bench {
    settings: Settings,
    relay: Arc<Relay>,
    token_file: PathBuf,
    slow: Phases,
}

/// Which relay connections a slow scenario slows down.
#[derive(Clone, Copy)]
enum Slow {
    /// The first connection the proxy opens (`slow-*`).
    One,
    /// Every fourth connection, re-dials included (`slowpath-*`).
    EveryFourth,
}

impl Bench {
    /// One slow-relay scenario through nginx with `keepalive`.
    async fn slow_nginx(&self, keepalive: u32, slow: Slow) -> Result<Measured, String> {
        let relay = &*self.relay;
        wait_relay_idle(relay).await;
        let first_id = next_connection_id(relay);
        let nginx = Nginx::start(&self.settings, &Upstream::of(relay), keepalive).await?;
        let (name, set) = match slow {
            Slow::One => {
                // Nginx::start's probe opened nginx's first upstream connection: make it slow.
                let id = relay
                    .open_connection_ids()
                    .into_iter()
                    .find(|id| *id >= first_id)
                    .ok_or("nginx holds no relay connection after its probe")?;
                relay.set_connection_fault(id, Fault::Delay(self.settings.slow_delay));
                let name = format!("slow: nginx (keepalive {keepalive})");
                (name, SlowSet::One(id as u32))
            }
            Slow::EveryFourth => {
                let set =
                    slow_every_fourth(relay, next_connection_id(relay), self.settings.slow_delay);
                let name = format!("slowpath: nginx (keepalive {keepalive})");
                (name, set)
            }
        };
        let process = nginx.process();
        eprintln!("[load] {name} (pid {})", process.pid);
        let target = Target::Plain(process.addr);
        let measured = measure(
            &name,
            &self.settings,
            RelaySide {
                recorded: Some(relay),
                process: None,
            },
            target,
            Some(&process),
            self.slow,
            Some(set),
        )
        .await;
        nginx.stop().await;
        Ok(measured)
    }

    /// One slow-relay scenario through the sidecar (pool 4, h2, wiping on).
    async fn slow_sidecar(&self, slow: Slow) -> Result<Measured, String> {
        let relay = &*self.relay;
        wait_relay_idle(relay).await;
        let first_id = next_connection_id(relay);
        let (name, set) = match slow {
            // The fault must be in place before the pool dials.
            Slow::EveryFourth => {
                let set = slow_every_fourth(relay, first_id, self.settings.slow_delay);
                ("slowpath: sprint-sidecar (pool 4)".to_owned(), Some(set))
            }
            Slow::One => ("slow: sprint-sidecar (pool 4)".to_owned(), None),
        };
        let sidecar = start_sidecar(
            &self.settings,
            &Upstream::of(relay),
            &self.token_file,
            true,
            None,
            &[],
            None,
        )
        .await?;
        let set = match (slow, set) {
            (Slow::One, _) => {
                let pool = relay
                    .wait_for_open_connections(4, Duration::from_secs(10))
                    .await;
                let id = pool
                    .into_iter()
                    .find(|id| *id >= first_id)
                    .ok_or("the sidecar opened no relay connection")?;
                relay.set_connection_fault(id, Fault::Delay(self.settings.slow_delay));
                Some(SlowSet::One(id as u32))
            }
            (Slow::EveryFourth, set) => set,
        };
        let process = sidecar_process(&sidecar);
        eprintln!("[load] {name} (pid {})", process.pid);
        let target = Target::Plain(process.addr);
        let mut measured = measure(
            &name,
            &self.settings,
            RelaySide {
                recorded: Some(relay),
                process: None,
            },
            target,
            Some(&process),
            self.slow,
            set,
        )
        .await;
        if let Some(view) = &mut measured.slow {
            view.ejections = Some(ejections(&sidecar));
        }
        drop(sidecar);
        Ok(measured)
    }

    /// Starts every wanted healthy scenario's proxy, then measures them in turn, one short
    /// window each, `LOAD_ROUNDS` times; returns every window (named by scenario).
    async fn healthy_rounds(&self) -> Result<Vec<Measured>, String> {
        let settings = &self.settings;
        let relay = &*self.relay;
        wait_relay_idle(relay).await;
        let nginx_relay = match settings.relay {
            RelayChoice::Nginx => {
                Some(NginxRelay::start(settings, relay.pki().clone(), relay.server_name()).await?)
            }
            RelayChoice::Support => None,
        };
        let upstream = match &nginx_relay {
            Some(nginx_relay) => nginx_relay.upstream.clone(),
            None => Upstream::of(relay),
        };
        // Handshake counts come from the in-process relay only.
        let counted = nginx_relay.is_none().then_some(relay);
        let mut nginxes = Vec::new();
        let mut sidecars = Vec::new();
        let mut targets: Vec<(String, Option<ProxyProcess>)> = Vec::new();
        if settings.wants("direct") {
            targets.push(("direct to relay (reference)".to_owned(), None));
        }
        if settings.wants("nginx") {
            for keepalive in &settings.nginx_keepalives {
                let nginx = Nginx::start(settings, &upstream, *keepalive).await?;
                targets.push((
                    format!("nginx (keepalive {keepalive})"),
                    Some(nginx.process()),
                ));
                nginxes.push(nginx);
            }
        }
        let mut variants = Vec::new();
        if settings.wants("sidecar") {
            variants.push((
                "sprint-sidecar (wipe on, default)".to_owned(),
                true,
                None,
                &[][..],
                None,
            ));
        }
        if settings.wants("sidecar-nowipe") {
            variants.push((
                "sprint-sidecar (wipe off)".to_owned(),
                false,
                None,
                &[][..],
                None,
            ));
        }
        if settings.wants("sidecar-alt") {
            for alt_env in &settings.alt_envs {
                let described: Vec<String> = alt_env
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                // `BIN=path` in a variant picks its binary; the rest is its environment.
                let binary = alt_env
                    .iter()
                    .find(|(key, _)| key == "BIN")
                    .map(|(_, path)| Path::new(path.as_str()));
                let env_start = alt_env.partition_point(|(key, _)| key == "BIN");
                variants.push((
                    format!("sprint-sidecar alt ({})", described.join(" ")),
                    true,
                    None,
                    &alt_env[env_start..],
                    binary,
                ));
            }
        }
        if settings.wants("sidecar-http1") {
            let pool = settings.clients.min(256);
            variants.push((
                format!("sprint-sidecar (HTTP/1.1 upstream, pool {pool})"),
                true,
                Some(pool),
                &[][..],
                None,
            ));
        }
        for (name, wipe, http1_pool, extra_env, binary) in variants {
            let sidecar = start_sidecar(
                settings,
                &upstream,
                &self.token_file,
                wipe,
                http1_pool,
                extra_env,
                binary,
            )
            .await?;
            targets.push((name, Some(sidecar_process(&sidecar))));
            sidecars.push(sidecar);
        }
        for (name, process) in &targets {
            if let Some(process) = process {
                eprintln!("[load] {name} (pid {})", process.pid);
            }
        }
        let window = settings.seconds / settings.rounds as f64;
        let mut runs = Vec::new();
        if targets.is_empty() {
            return Ok(runs);
        }
        for round in 1..=settings.rounds {
            eprintln!("[load] round {round} of {}", settings.rounds);
            for (name, process) in &targets {
                // The first window warms connections and caches; later ones only let the
                // clients connect.
                let phases = Phases {
                    warmup: if round == 1 { settings.warmup } else { 0.5 },
                    seconds: window,
                };
                let target = match process {
                    Some(process) => Target::Plain(process.addr),
                    None => direct_target(&upstream),
                };
                let process = process.as_ref().map(|p| ProxyProcess {
                    pid: p.pid,
                    addr: p.addr,
                });
                // A window the hypervisor disturbed (steal on either core) says more about
                // the neighbours than about the proxy: measure it again, a bounded number of
                // times, and keep the least disturbed.
                let mut best: Option<Measured> = None;
                for attempt in 0..=settings.steal_retries {
                    let measured = measure(
                        name,
                        settings,
                        RelaySide {
                            recorded: counted,
                            process: nginx_relay.as_ref().and_then(|relay| relay.child.id()),
                        },
                        target.clone(),
                        process.as_ref(),
                        phases,
                        None,
                    )
                    .await;
                    let steal = measured.steal;
                    if best.as_ref().is_none_or(|b| steal < b.steal) {
                        best = Some(measured);
                    }
                    if steal <= settings.steal_limit {
                        break;
                    }
                    if attempt < settings.steal_retries {
                        eprintln!(
                            "[load] {name}: {:.1}% steal in the window, measuring it again",
                            steal * 100.0
                        );
                    }
                }
                runs.extend(best);
            }
        }
        for nginx in nginxes {
            nginx.stop().await;
        }
        drop(sidecars);
        if let Some(nginx_relay) = nginx_relay {
            nginx_relay.stop().await;
        }
        Ok(runs)
    }
}

/// The load generator speaking TLS (HTTP/1.1) to the relay itself: the reference.
fn direct_target(upstream: &Upstream) -> Target {
    Target::Tls {
        addr: upstream.addr,
        connector: TlsConnector::from(Arc::new(upstream.pki.client_config(&[b"http/1.1"]))),
        name: ServerName::try_from(upstream.name)
            .expect("the relay's name is a valid DNS name")
            .to_owned(),
    }
}

fn find<'a>(list: &'a [Measured], prefix: &str) -> Option<&'a Measured> {
    list.iter().find(|m| m.name.starts_with(prefix))
}

async fn run(settings: Settings, cores: usize) -> Result<(), String> {
    let relay = Arc::new(Relay::builder().protocol(Proto::Both).start().await);
    // Millions of requests: the relay keeps none of them.
    relay.set_recording(false);
    let token_dir = tempfile::tempdir().map_err(|error| error.to_string())?;
    let token_file = token_dir.path().join("relay-token");
    support::pki::write_private(&token_file, TOKEN.as_bytes());

    let nginx_version = std::process::Command::new(&settings.nginx)
        .arg("-v")
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stderr).trim().to_owned())
        .unwrap_or_else(|| "nginx (version unknown)".to_owned());
    println!("sprint-sidecar load harness");
    println!(
        "  {cores} cores; {}",
        if settings.pin {
            "proxy pinned to core 0 (nginx worker_processes 1 / sidecar runtime.worker_threads 1), \
             load generator + relay pinned to core 1"
        } else {
            "no pinning"
        }
    );
    println!(
        "  {} closed-loop clients, HTTP/1.1 keep-alive, POST / of {} bytes; warm-up {} s + {} s \
         measured (slow scenarios {} s + {} s, +{} ms per slow answer)",
        settings.clients,
        request_body().len(),
        settings.warmup,
        settings.seconds,
        settings.slow_warmup,
        settings.slow_seconds,
        settings.slow_delay.as_millis(),
    );
    println!(
        "  relay: {} (ALPN h2,http/1.1: the sidecar negotiates h2 on pool.size 4, nginx speaks \
         HTTP/1.1); slow scenarios: the in-process relay (per-connection delays)",
        match settings.relay {
            RelayChoice::Nginx =>
                "healthy scenarios: nginx, one worker on the load core (LOAD_RELAY=nginx)",
            RelayChoice::Support =>
                "healthy scenarios: the test relay, in-process rustls + hyper on the load \
                 generator's thread",
        }
    );
    println!("  load generator client: {}", settings.client.describe());
    println!("  sidecar: {}", settings.sidecar.display());
    println!("  peer: {nginx_version}");

    let bench = Bench {
        slow: Phases {
            warmup: settings.slow_warmup,
            seconds: settings.slow_seconds,
        },
        settings,
        relay,
        token_file,
    };
    let settings = &bench.settings;

    // Healthy scenarios: every proxy runs at once (idle ones cost nothing), and the load
    // moves from one to the next in short windows, round after round, so that the machine's
    // drift (other tenants, frequency) hits all of them alike.
    let runs = bench.healthy_rounds().await?;
    let mut slow: Vec<Measured> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for m in &runs {
        if !names.contains(&m.name.as_str()) {
            names.push(&m.name);
        }
    }
    let healthy: Vec<Measured> = names
        .iter()
        .map(|name| {
            let rounds: Vec<&Measured> = runs.iter().filter(|m| m.name == *name).collect();
            let pooled = Measured::pooled(name, &rounds);
            if settings.profile.is_some() {
                print_profile(&pooled);
            }
            pooled
        })
        .collect();
    for keepalive in &settings.nginx_slow_keepalives {
        if settings.wants("slow-nginx") {
            slow.push(bench.slow_nginx(*keepalive, Slow::One).await?);
        }
    }
    if settings.wants("slow-sidecar") {
        slow.push(bench.slow_sidecar(Slow::One).await?);
    }
    for keepalive in &settings.nginx_slow_keepalives {
        if settings.wants("slowpath-nginx") {
            slow.push(bench.slow_nginx(*keepalive, Slow::EveryFourth).await?);
        }
    }
    if settings.wants("slowpath-sidecar") {
        slow.push(bench.slow_sidecar(Slow::EveryFourth).await?);
    }
    wait_relay_idle(&bench.relay).await;

    if !healthy.is_empty() {
        if settings.rounds > 1 {
            println!("\n== healthy relay, each round ==");
            print_table(&runs);
        }
        println!(
            "\n== healthy relay{} ==",
            if settings.rounds > 1 {
                format!(
                    ", {} rounds pooled (CPU, requests and latencies of all rounds together)",
                    settings.rounds
                )
            } else {
                String::new()
            }
        );
        print_table(&healthy);
        println!("\nratios:");
        let sidecar = find(&healthy, "sprint-sidecar (wipe on");
        let nowipe = find(&healthy, "sprint-sidecar (wipe off");
        for keepalive in &settings.nginx_keepalives {
            let nginx = find(&healthy, &format!("nginx (keepalive {keepalive})"));
            ratio_line(
                &format!("sidecar / nginx keepalive {keepalive}"),
                sidecar,
                nginx,
            );
        }
        ratio_line("sidecar wipe on / wipe off (wipe cost)", sidecar, nowipe);
        if let Some(direct) = find(&healthy, "direct") {
            for m in healthy.iter().filter(|m| m.proxy_cpu_s.is_some()) {
                println!(
                    "  {:<44} req/s {:.2} of direct; p50 +{:.2} ms over direct",
                    m.name,
                    m.rps / direct.rps,
                    m.p50_ms - direct.p50_ms
                );
            }
        }
    }

    if !slow.is_empty() {
        println!(
            "\n== slow relay connections (+{} ms per answer) ==",
            settings.slow_delay.as_millis()
        );
        print_table(&slow);
        println!();
        for m in &slow {
            print_slow(m);
        }
        println!("\nratios:");
        for kind in ["slow", "slowpath"] {
            ratio_line(
                &format!("{kind}: sidecar / nginx"),
                find(&slow, &format!("{kind}: sprint-sidecar")),
                find(&slow, &format!("{kind}: nginx")),
            );
        }
    }
    println!(
        "\ncolumns: CPU s/10k = proxy utime+stime (/proc/PID/stat; nginx master+worker) per \
         10 000 answered requests; proxy = its CPU as a share of its one core; peak RSS = \
         VmHWM (nginx: master+worker summed); load = this process (clients + relay) on its \
         core; gen/10k and rly/10k = the load core's CPU s/10k split: the load generator \
         (with the in-process relay when that one answers) and the nginx relay; TLS hs = handshakes the relay completed during the window; sc/req = the \
         proxy's read+write system calls (/proc/PID/io syscr+syscw) per answered request; \
         px/slp and ld/slp = answered requests per time the proxy's threads (ld: this process's) \
         went to sleep waiting for work (voluntary context switches); steal = time the hypervisor took from the busier core (/proc/stat)"
    );
    Ok(())
}
