//! Configuration: built-in defaults < `sidecar.toml` < `SPRINT_SIDECAR_<SECTION>_<KEY>`
//! environment variables < command-line flags, parsed once into typed values. Every error
//! names the key it is about (and the file line for TOML syntax errors).

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "SPRINT_SIDECAR_";

/// Fully validated configuration of one sidecar process.
#[derive(Debug, Clone)]
pub struct Config {
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub pool: PoolConfig,
    pub breaker: BreakerConfig,
    pub retry: RetryConfig,
    pub memory: MemoryConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    /// The merged raw values, kept for `check-config`.
    raw: RawConfig,
    warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub max_connections: NonZeroUsize,
    pub header_read_timeout: Duration,
    /// How long a kept-alive client connection may wait, with no request in progress, for
    /// its next request; also how long a client may take no byte of its answer before it
    /// is cut off.
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// Overall deadline of one client request until response headers, over all attempts.
    pub request_deadline: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub ready_requires_upstream: bool,
    pub allow_insecure_permissions: bool,
    /// Origins allowed to read the admin API cross-origin; empty: none.
    pub cors_allowed_origins: Vec<String>,
}

/// Where the relay is: a host name or IP literal and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub endpoint: Endpoint,
    /// SNI and certificate name (defaults to the endpoint host).
    pub server_name: String,
    pub ca_file: Option<PathBuf>,
    pub alpn: Vec<String>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub auth_header: http::HeaderName,
    pub auth_token_file: Option<PathBuf>,
    pub auth_token_env: Option<String>,
    pub allow_insecure_permissions: bool,
    /// TLS session resumption through the bounded ticket store.
    pub session_resumption: bool,
    /// The largest request header field (name + value) sent to the relay; larger: 431.
    pub max_header_field_bytes: usize,
    /// The largest request header list (all fields, path and method) sent to the relay.
    pub max_header_list_bytes: usize,
    /// How much of one HTTP/1.1 answer is read ahead of a slow client (0: none).
    pub http1_read_ahead_bytes: usize,
    /// How much all HTTP/1.1 answers together may hold read ahead (0: none).
    pub http1_read_ahead_total_bytes: usize,
}

impl UpstreamConfig {
    /// The `Host` / `:authority` value sent to the relay: the server name, plus the port
    /// when it is not 443.
    pub fn authority(&self) -> String {
        let host = if self.server_name.contains(':') {
            format!("[{}]", self.server_name)
        } else {
            self.server_name.clone()
        };
        if self.endpoint.port == 443 {
            host
        } else {
            format!("{host}:{}", self.endpoint.port)
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub size: NonZeroUsize,
    pub max_streams_per_connection: NonZeroUsize,
    pub connect_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Per attempt, until response headers; then also the longest pause between two pieces
    /// of a response body.
    pub request_timeout: Duration,
    pub max_connection_age: Duration,
    pub reconnect_backoff_initial: Duration,
    pub reconnect_backoff_max: Duration,
    /// Idle HTTP/2 connections are PINGed this often.
    pub ping_interval: Duration,
    /// A connection whose p95 exceeds this multiple of the pool median is ejected.
    pub slow_ejection_ratio: f64,
}

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub open_duration: Duration,
    pub max_open_duration: Duration,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub budget_ratio: f64,
}

#[derive(Debug, Clone)]
pub struct MemoryConfig {
    pub require_lock: bool,
    pub lock_all: bool,
    pub disable_core_dumps: bool,
    pub wipe_freed_memory: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// The event loops the data plane runs on (see `event_loops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Event loops, one thread each; 0 = one per available core, at most one per pool
    /// connection.
    pub worker_threads: usize,
    /// The longest an idle-class thread keeps an event loop's core awake while the loop
    /// sleeps under load; zero: never (see `busy_poll`).
    pub busy_poll: Duration,
    /// The scheduling priority (nice value, -20 to 19) the sidecar sets for itself at start;
    /// applied when permitted (see `app::apply_priority`).
    pub nice: i32,
    /// How often at most a loop that has run out of tasks gives its core to other waiting
    /// threads before it looks for events; `None` ("auto"): [`AUTO_YIELD_EVERY`] with one
    /// event loop that shares cores, never otherwise (see [`RuntimeConfig::yield_interval`],
    /// `loop_yield`).
    pub yield_every: Option<Duration>,
}

impl RuntimeConfig {
    /// How loops hand their core over: `yield_every` as given, or for "auto"
    /// [`AUTO_YIELD_EVERY`] when `loops` is 1, and then only while the process may run on
    /// more than one core (its affinity mask, looked at when a hand-over is due); never with
    /// several loops. Measured with wrk, the relay and the sidecar on two shared cores: one
    /// loop's p99 fell by half at 3–4% of its throughput; a loop per core lost a quarter of
    /// its throughput. A loop confined to a core of its own (the pinned load harness) has
    /// nobody worth yielding to: p99 no better, p99.9 worse.
    pub fn yield_policy(&self, loops: usize) -> crate::loop_yield::Policy {
        match self.yield_every {
            Some(every) => crate::loop_yield::Policy {
                every,
                only_when_sharing: false,
            },
            None => crate::loop_yield::Policy {
                every: if loops == 1 {
                    AUTO_YIELD_EVERY
                } else {
                    Duration::ZERO
                },
                only_when_sharing: true,
            },
        }
    }

    /// The number of event loops to run: `worker_threads`, or with 0 one per core the process
    /// may use (`available_parallelism` counts the CPU affinity mask and the cgroup CPU
    /// quota), but no more than `pool_size`, so that every loop owns a relay connection.
    pub fn event_loops(&self, pool_size: usize) -> usize {
        match self.worker_threads {
            0 => crate::event_loops::available_cores().min(pool_size).max(1),
            n => n,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: DEFAULT_WORKER_THREADS,
            busy_poll: DEFAULT_BUSY_POLL,
            nice: DEFAULT_NICE,
            yield_every: None,
        }
    }
}

/// One event loop: a sidecar shares its pod's cores with the application it serves, and one
/// loop on one core proxies tens of thousands of requests per second without cross-thread
/// hand-offs (README, Performance).
const DEFAULT_WORKER_THREADS: usize = 1;

/// Spins of 0.2 ms: long enough to bridge the wait for the relay's next answers under load
/// (README, Performance), short against the sleeps of a lightly loaded loop.
const DEFAULT_BUSY_POLL: Duration = Duration::from_millis(1);

/// A longer spin than this is a typo: it would be a sleep that burns a core.
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// With one event loop, "auto" hands its core over at most every 400 µs (`loop_yield`); the
/// interval mattered little between every sleep and 1 ms.
pub const AUTO_YIELD_EVERY: Duration = Duration::from_micros(400);

/// Longer than a scheduler tick (4 ms at `HZ=250`) would not shorten the waits it is for.
const MAX_YIELD_EVERY: Duration = Duration::from_millis(10);

/// Nice -5 (three times the CPU weight of a nice-0 thread): a preempted proxy stalls every
/// request in flight through it, a preempted client only its own, so the sidecar goes before
/// the applications it serves when they share cores (README, Performance). Applied only where
/// the process may raise its priority.
const DEFAULT_NICE: i32 = -5;

/// The range of nice values Linux has.
const NICE_RANGE: std::ops::RangeInclusive<i64> = -20..=19;

/// More event loops than this is a typo, not a deployment.
const MAX_WORKER_THREADS: i64 = 1024;

// ---------------------------------------------------------------------------------------
// Raw layer: what files, environment and flags can say, with the documented defaults.

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
struct RawConfig {
    listener: RawListener,
    admin: RawAdmin,
    upstream: RawUpstream,
    pool: RawPool,
    breaker: RawBreaker,
    retry: RawRetry,
    memory: RawMemory,
    log: RawLog,
    runtime: RawRuntime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListener {
    address: String,
    max_connections: i64,
    header_read_timeout: String,
    idle_timeout: String,
    max_header_bytes: i64,
    max_body_bytes: i64,
    request_deadline: String,
    drain_timeout: String,
}

impl Default for RawListener {
    fn default() -> Self {
        RawListener {
            address: "127.0.0.1:9090".into(),
            max_connections: 4096,
            header_read_timeout: "10s".into(),
            idle_timeout: "75s".into(),
            max_header_bytes: 65536,
            max_body_bytes: 16 * 1024 * 1024,
            request_deadline: "30s".into(),
            drain_timeout: "20s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    address: String,
    token_file: String,
    ready_requires_upstream: bool,
    allow_insecure_permissions: bool,
    cors_allowed_origins: Vec<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            address: "127.0.0.1:9091".into(),
            token_file: String::new(),
            ready_requires_upstream: true,
            allow_insecure_permissions: false,
            cors_allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    endpoint: String,
    server_name: String,
    ca_file: String,
    alpn: Vec<String>,
    client_cert_file: String,
    client_key_file: String,
    auth_header: String,
    auth_token_file: String,
    auth_token_env: String,
    allow_insecure_permissions: bool,
    session_resumption: bool,
    max_header_field_bytes: i64,
    max_header_list_bytes: i64,
    http1_read_ahead_bytes: i64,
    http1_read_ahead_total_bytes: i64,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            endpoint: "relay.bitcoin-sprint.inc:443".into(),
            server_name: String::new(),
            ca_file: String::new(),
            alpn: vec!["h2".into(), "http/1.1".into()],
            client_cert_file: String::new(),
            client_key_file: String::new(),
            auth_header: "authorization".into(),
            auth_token_file: String::new(),
            auth_token_env: String::new(),
            allow_insecure_permissions: false,
            session_resumption: true,
            max_header_field_bytes: 8192,
            max_header_list_bytes: 32768,
            http1_read_ahead_bytes: 8 << 20,
            http1_read_ahead_total_bytes: 32 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    size: i64,
    max_streams_per_connection: i64,
    connect_timeout: String,
    tls_handshake_timeout: String,
    request_timeout: String,
    max_connection_age: String,
    reconnect_backoff_initial: String,
    reconnect_backoff_max: String,
    ping_interval: String,
    slow_ejection_ratio: f64,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            size: 4,
            max_streams_per_connection: 100,
            connect_timeout: "3s".into(),
            tls_handshake_timeout: "5s".into(),
            request_timeout: "15s".into(),
            max_connection_age: "30m".into(),
            reconnect_backoff_initial: "100ms".into(),
            reconnect_backoff_max: "10s".into(),
            ping_interval: "10s".into(),
            slow_ejection_ratio: 3.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBreaker {
    consecutive_failures: i64,
    failure_rate: f64,
    min_requests: i64,
    window: String,
    open_duration: String,
    max_open_duration: String,
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window: "10s".into(),
            open_duration: "5s".into(),
            max_open_duration: "60s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    max_attempts: i64,
    budget_ratio: f64,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_attempts: 2,
            budget_ratio: 0.2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMemory {
    require_lock: bool,
    lock_all: bool,
    disable_core_dumps: bool,
    wipe_freed_memory: bool,
}

impl Default for RawMemory {
    fn default() -> Self {
        RawMemory {
            require_lock: true,
            lock_all: false,
            disable_core_dumps: true,
            wipe_freed_memory: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRuntime {
    worker_threads: i64,
    busy_poll: String,
    nice: i64,
    yield_every: String,
}

impl Default for RawRuntime {
    fn default() -> Self {
        RawRuntime {
            worker_threads: DEFAULT_WORKER_THREADS as i64,
            busy_poll: "1ms".into(),
            nice: i64::from(DEFAULT_NICE),
            yield_every: "auto".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// A configuration that cannot be used: every problem found, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![problem.into()],
        }
    }

    /// Each problem, one per key.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.problems.join("; "))
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// Loading

/// Values given on the command line; each maps to one `section.key`.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
    pub server_name: Option<String>,
    pub ca_file: Option<String>,
    pub pool_size: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
}

impl Overrides {
    fn entries(&self) -> Vec<(&'static str, &'static str, &str)> {
        let pairs: [(&'static str, &'static str, &Option<String>); 8] = [
            ("listener", "address", &self.listen),
            ("admin", "address", &self.admin_listen),
            ("upstream", "endpoint", &self.upstream),
            ("upstream", "server_name", &self.server_name),
            ("upstream", "ca_file", &self.ca_file),
            ("pool", "size", &self.pool_size),
            ("log", "format", &self.log_format),
            ("log", "level", &self.log_level),
        ];
        pairs
            .into_iter()
            .filter_map(|(s, k, v)| v.as_deref().map(|v| (s, k, v)))
            .collect()
    }
}

impl Config {
    /// Loads the configuration from an optional file, the process environment and flags.
    ///
    /// # Errors
    /// A [`ConfigError`] naming every bad key (and the file line for TOML syntax errors).
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Self::load_from(file, &env, overrides)
    }

    /// Like [`Config::load`] with the environment passed in (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::one(format!("config file {}: {e}", path.display()))
                })?;
                parse_file(path, &text)?
            }
            None => toml::Table::new(),
        };
        let defaults = default_table();
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        // Where each key set outside the file came from (the last setting wins), so that a
        // value refused below names the variable or flag to fix, not only the key.
        let mut origins: Vec<(String, String)> = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if rest == "CONFIG" {
                continue;
            }
            match find_key(&defaults, rest) {
                Some((section, key)) => {
                    let typed = typed_value(&defaults, section, key, value).map_err(|why| {
                        format!("{section}.{key} (from environment variable {name}): {why}")
                    });
                    match typed {
                        Ok(v) => {
                            set(&mut table, section, key, v);
                            origins.push((
                                format!("{section}.{key}"),
                                format!("environment variable {name}"),
                            ));
                        }
                        Err(p) => problems.push(p),
                    }
                }
                // Not fatal: Kubernetes injects `<SERVICE>_SERVICE_HOST`-style variables that
                // can share the prefix (a Service named `sprint-sidecar-admin`), as can the
                // variable `auth_token_env` names. Reported as a warning instead.
                None => warnings.push(format!(
                    "environment variable {name} names no configuration key; ignored"
                )),
            }
        }
        for (section, key, value) in overrides.entries() {
            match typed_value(&defaults, section, key, value) {
                Ok(v) => {
                    set(&mut table, section, key, v);
                    origins.push((format!("{section}.{key}"), "command line".to_string()));
                }
                Err(why) => problems.push(format!("{section}.{key} (from command line): {why}")),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let raw = RawConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::one(e.message().trim().to_string()))?;
        let mut config = raw.validate().map_err(|mut e| {
            for problem in &mut e.problems {
                let origin = origins.iter().rev().find(|(key, _)| {
                    problem
                        .strip_prefix(key.as_str())
                        .is_some_and(|rest| rest.starts_with(':'))
                });
                if let Some((key, origin)) = origin {
                    *problem = format!("{key} (from {origin}){}", &problem[key.len()..]);
                }
            }
            e
        })?;
        warnings.extend(config.inconsistencies());
        config.warnings = warnings;
        Ok(config)
    }

    /// Settings that are each valid but defeat one another: worth a warning, not a refusal.
    fn inconsistencies(&self) -> Vec<String> {
        let mut found = Vec::new();
        let human = |d: Duration| humantime::format_duration(d).to_string();
        if self.pool.request_timeout > self.listener.request_deadline {
            found.push(format!(
                "pool.request_timeout ({}) is longer than listener.request_deadline ({}): every \
                 attempt is cut at the deadline and a retry never has time",
                human(self.pool.request_timeout),
                human(self.listener.request_deadline)
            ));
        }
        let u = &self.upstream;
        if u.max_header_field_bytes > u.max_header_list_bytes {
            found.push(format!(
                "upstream.max_header_field_bytes ({}) is larger than \
                 upstream.max_header_list_bytes ({}): no field can reach its own limit",
                u.max_header_field_bytes, u.max_header_list_bytes
            ));
        }
        if u.http1_read_ahead_total_bytes > 0
            && u.http1_read_ahead_bytes > u.http1_read_ahead_total_bytes
        {
            found.push(format!(
                "upstream.http1_read_ahead_bytes ({}) is larger than \
                 upstream.http1_read_ahead_total_bytes ({}): one answer is held to the total",
                u.http1_read_ahead_bytes, u.http1_read_ahead_total_bytes
            ));
        }
        let (loops, size) = (self.runtime.worker_threads, self.pool.size.get());
        if loops > size {
            found.push(format!(
                "runtime.worker_threads ({loops}) is above pool.size ({size}): {} event loop(s) \
                 own no relay connection and send every request on another loop's",
                loops - size
            ));
        }
        found
    }

    /// Things worth telling the operator that do not stop the sidecar (e.g. an unknown
    /// `SPRINT_SIDECAR_*` variable).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The effective configuration as TOML, for `check-config`. Secret values never appear
    /// in the configuration itself (only paths and variable names), so nothing is elided.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Parses the file text; syntax and type errors name the key and the line, never the text
/// written there: a secret file given as the configuration by mistake must not be printed.
fn parse_file(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let located = |e: &toml::de::Error| -> String {
        let msg = without_quoted_values(e.message().trim());
        match e.span() {
            Some(span) => {
                let (line, col) = line_col(text, span.start);
                match key_at(text, span.start) {
                    Some(key) => format!("{key}: {msg} ({}:{line}:{col})", path.display()),
                    None => format!("{}:{line}:{col}: {msg}", path.display()),
                }
            }
            None => format!("{}: {msg}", path.display()),
        }
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::one(located(&e)))?;
    // Type and unknown-key errors, with the file position while we still have it.
    toml::from_str::<RawConfig>(text).map_err(|e| ConfigError::one(located(&e)))?;
    Ok(table)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// `message` with the content of each double-quoted string replaced by `…`: the TOML and
/// serde messages quote the value they could not use (`invalid type: string "…"`).
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '"' {
            let mut escaped = false;
            for inner in chars.by_ref() {
                if inner == '"' && !escaped {
                    out.push('…');
                    out.push('"');
                    break;
                }
                escaped = inner == '\\' && !escaped;
            }
        }
    }
    out
}

/// Whether `name` can be a TOML key as this file would write it (bare or dotted, maybe
/// quoted), so that a line of some other text is never echoed as a key.
fn looks_like_key(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The dotted `section.key` written at `offset` of a TOML text, found from the line's key
/// and the nearest `[section]` header above it; `None` when the line is not `key = ...` or
/// a `[section]` header.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let trimmed = line.trim();
    if trimmed.starts_with('[') {
        let name = trimmed.trim_matches(|c| c == '[' || c == ']').trim();
        return looks_like_key(name).then(|| format!("[{name}]"));
    }
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if !looks_like_key(key) {
        return None;
    }
    let section = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']'))
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
            .filter(|name| looks_like_key(name))
    });
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

fn default_table() -> toml::Table {
    toml::Table::try_from(RawConfig::default()).unwrap_or_default()
}

/// Maps `POOL_SIZE` to `("pool", "size")` against the known keys.
fn find_key<'a>(defaults: &'a toml::Table, rest: &str) -> Option<(&'a str, &'a str)> {
    for (section, keys) in defaults {
        let Some(keys) = keys.as_table() else {
            continue;
        };
        for key in keys.keys() {
            let name = format!("{section}_{key}").to_ascii_uppercase();
            if name == rest {
                return Some((section.as_str(), key.as_str()));
            }
        }
    }
    None
}

/// Header names `upstream.auth_header` may not name: the credential would replace the
/// request's framing (length, coding), its connection handling or its target.
const RESERVED_AUTH_HEADERS: [&str; 10] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
];

/// Converts a string from the environment or a flag to the TOML type of the key's default.
fn typed_value(
    defaults: &toml::Table,
    section: &str,
    key: &str,
    value: &str,
) -> Result<toml::Value, String> {
    let default = defaults
        .get(section)
        .and_then(|s| s.get(key))
        .ok_or_else(|| "unknown key".to_string())?;
    let v = value.trim();
    Ok(match default {
        toml::Value::Integer(_) => toml::Value::Integer(
            v.parse()
                .map_err(|_| format!("expected an integer, got {v:?}"))?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            v.parse()
                .map_err(|_| format!("expected a number, got {v:?}"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(format!("expected true or false, got {v:?}")),
        }),
        toml::Value::Array(_) => {
            let items: Vec<&str> = v.split(',').map(str::trim).collect();
            if items.iter().any(|s| s.is_empty()) {
                return Err(format!(
                    "expected a comma-separated list such as \"h2,http/1.1\" with no empty \
                     item, got {v:?}"
                ));
            }
            toml::Value::Array(
                items
                    .into_iter()
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            )
        }
        _ => toml::Value::String(value.to_string()),
    })
}

fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    if let Some(t) = entry.as_table_mut() {
        t.insert(key.to_string(), value);
    }
}

// ---------------------------------------------------------------------------------------
// Validation: raw → typed, collecting every problem.

/// Parses a duration such as `"250ms"`, `"5s"`, `"10m"`, `"1h30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration (expected e.g. \"250ms\", \"5s\", \"10m\")".into());
    }
    humantime::parse_duration(t).map_err(|_| {
        format!("invalid duration {text:?} (expected e.g. \"250ms\", \"5s\", \"10m\")")
    })
}

struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn duration(&mut self, key: &str, text: &str, allow_zero: bool) -> Duration {
        match parse_duration(text) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.problems
                    .push(format!("{key}: must be greater than zero"));
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(e) => {
                self.problems.push(format!("{key}: {e}"));
                Duration::from_secs(1)
            }
        }
    }

    fn address(&mut self, key: &str, text: &str) -> SocketAddr {
        match text.trim().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problems.push(format!(
                    "{key}: invalid address {text:?} (expected IP:PORT, e.g. \"127.0.0.1:9090\")"
                ));
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    fn positive(&mut self, key: &str, value: i64, max: i64) -> usize {
        if value < 1 || value > max {
            self.problems
                .push(format!("{key}: must be between 1 and {max}, got {value}"));
            1
        } else {
            value as usize
        }
    }

    fn at_most(&mut self, key: &str, value: i64, max: i64) -> usize {
        match usize::try_from(value) {
            Ok(v) if value <= max => v,
            _ => {
                self.problems
                    .push(format!("{key}: must be between 0 and {max}, got {value}"));
                0
            }
        }
    }

    fn ratio(&mut self, key: &str, value: f64, min: f64, max: f64) -> f64 {
        if !(value.is_finite() && value >= min && value <= max) {
            self.problems.push(format!(
                "{key}: must be between {min} and {max}, got {value}"
            ));
            min
        } else {
            value
        }
    }

    fn path(&mut self, key: &str, text: &str, must_exist: bool) -> Option<PathBuf> {
        if text.trim().is_empty() {
            return None;
        }
        let path = PathBuf::from(text);
        if must_exist {
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => self
                    .problems
                    .push(format!("{key}: {} is not a regular file", path.display())),
                Err(e) => self
                    .problems
                    .push(format!("{key}: cannot read {}: {e}", path.display())),
            }
        }
        Some(path)
    }
}

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let t = text.trim();
    let t = t
        .strip_prefix("https://")
        .unwrap_or(t)
        .trim_end_matches('/');
    let err = || {
        format!(
            "invalid endpoint {text:?} (expected HOST:PORT, e.g. \"relay.bitcoin-sprint.inc:443\")"
        )
    };
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(err)?;
        (h, p)
    } else {
        t.rsplit_once(':').ok_or_else(err)?
    };
    let port: u16 = port.parse().map_err(|_| err())?;
    if host.is_empty() || port == 0 || host.contains('/') || host.contains(' ') {
        return Err(err());
    }
    Ok(Endpoint {
        host: host.to_string(),
        port,
    })
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut c = Checker {
            problems: Vec::new(),
        };
        let l = &self.listener;
        let listener = ListenerConfig {
            address: c.address("listener.address", &l.address),
            max_connections: NonZeroUsize::new(c.positive(
                "listener.max_connections",
                l.max_connections,
                1 << 20,
            ))
            .unwrap_or(NonZeroUsize::MIN),
            header_read_timeout: c.duration(
                "listener.header_read_timeout",
                &l.header_read_timeout,
                false,
            ),
            idle_timeout: c.duration("listener.idle_timeout", &l.idle_timeout, false),
            max_header_bytes: c.positive("listener.max_header_bytes", l.max_header_bytes, 16 << 20),
            max_body_bytes: c.positive("listener.max_body_bytes", l.max_body_bytes, i64::MAX)
                as u64,
            request_deadline: c.duration("listener.request_deadline", &l.request_deadline, false),
            drain_timeout: c.duration("listener.drain_timeout", &l.drain_timeout, true),
        };
        let a = &self.admin;
        let admin = AdminConfig {
            address: c.address("admin.address", &a.address),
            token_file: c.path("admin.token_file", &a.token_file, true),
            ready_requires_upstream: a.ready_requires_upstream,
            allow_insecure_permissions: a.allow_insecure_permissions,
            cors_allowed_origins: a.cors_allowed_origins.clone(),
        };
        if listeners_overlap(listener.address, admin.address) {
            c.problems.push(format!(
                "admin.address: {} would share its port with listener.address {}; give the \
                 admin listener its own port",
                admin.address, listener.address
            ));
        }
        let u = &self.upstream;
        let endpoint = parse_endpoint(&u.endpoint).unwrap_or_else(|e| {
            c.problems.push(format!("upstream.endpoint: {e}"));
            Endpoint {
                host: "invalid".into(),
                port: 443,
            }
        });
        let server_name = if u.server_name.trim().is_empty() {
            endpoint.host.clone()
        } else {
            u.server_name.trim().to_string()
        };
        if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            c.problems.push(format!(
                "upstream.server_name: {server_name:?} is not a valid DNS name or IP address"
            ));
        }
        let alpn: Vec<String> = u.alpn.iter().map(|s| s.trim().to_string()).collect();
        if alpn.is_empty() {
            c.problems
                .push("upstream.alpn: must name at least one of \"h2\", \"http/1.1\"".into());
        }
        for (i, p) in alpn.iter().enumerate() {
            if p != "h2" && p != "http/1.1" {
                c.problems.push(format!(
                    "upstream.alpn: unsupported protocol {p:?} (supported: \"h2\", \"http/1.1\")"
                ));
            } else if alpn[..i].contains(p) {
                c.problems.push(format!(
                    "upstream.alpn: {p:?} is named twice; name each once"
                ));
            }
        }
        let auth_header = match http::HeaderName::from_bytes(u.auth_header.trim().as_bytes()) {
            Ok(h) if RESERVED_AUTH_HEADERS.contains(&h.as_str()) => {
                c.problems.push(format!(
                    "upstream.auth_header: {:?} frames or routes the request (hop-by-hop, \
                     length or host); name a header that only carries the credential, such \
                     as \"authorization\"",
                    h.as_str()
                ));
                http::header::AUTHORIZATION
            }
            Ok(h) => h,
            Err(_) => {
                c.problems.push(format!(
                    "upstream.auth_header: {:?} is not a valid header name",
                    u.auth_header
                ));
                http::header::AUTHORIZATION
            }
        };
        let client_cert_file = c.path("upstream.client_cert_file", &u.client_cert_file, true);
        let client_key_file = c.path("upstream.client_key_file", &u.client_key_file, true);
        if client_cert_file.is_some() != client_key_file.is_some() {
            c.problems.push(
                "upstream.client_key_file: client_cert_file and client_key_file must be set together"
                    .into(),
            );
        }
        let auth_token_file = c.path("upstream.auth_token_file", &u.auth_token_file, true);
        let auth_token_env =
            (!u.auth_token_env.trim().is_empty()).then(|| u.auth_token_env.trim().to_string());
        if auth_token_file.is_some() && auth_token_env.is_some() {
            c.problems.push(
                "upstream.auth_token_env: set either auth_token_file or auth_token_env, not both"
                    .into(),
            );
        }
        let upstream = UpstreamConfig {
            ca_file: c.path("upstream.ca_file", &u.ca_file, true),
            endpoint,
            server_name,
            alpn,
            client_cert_file,
            client_key_file,
            auth_header,
            auth_token_file,
            auth_token_env,
            allow_insecure_permissions: u.allow_insecure_permissions,
            session_resumption: u.session_resumption,
            max_header_field_bytes: c.positive(
                "upstream.max_header_field_bytes",
                u.max_header_field_bytes,
                16 << 20,
            ),
            max_header_list_bytes: c.positive(
                "upstream.max_header_list_bytes",
                u.max_header_list_bytes,
                16 << 20,
            ),
            http1_read_ahead_bytes: c.at_most(
                "upstream.http1_read_ahead_bytes",
                u.http1_read_ahead_bytes,
                1 << 30,
            ),
            http1_read_ahead_total_bytes: c.at_most(
                "upstream.http1_read_ahead_total_bytes",
                u.http1_read_ahead_total_bytes,
                1 << 32,
            ),
        };
        let p = &self.pool;
        let pool = PoolConfig {
            size: NonZeroUsize::new(c.positive("pool.size", p.size, 256))
                .unwrap_or(NonZeroUsize::MIN),
            max_streams_per_connection: NonZeroUsize::new(c.positive(
                "pool.max_streams_per_connection",
                p.max_streams_per_connection,
                10_000,
            ))
            .unwrap_or(NonZeroUsize::MIN),
            connect_timeout: c.duration("pool.connect_timeout", &p.connect_timeout, false),
            tls_handshake_timeout: c.duration(
                "pool.tls_handshake_timeout",
                &p.tls_handshake_timeout,
                false,
            ),
            request_timeout: c.duration("pool.request_timeout", &p.request_timeout, false),
            max_connection_age: c.duration("pool.max_connection_age", &p.max_connection_age, false),
            reconnect_backoff_initial: c.duration(
                "pool.reconnect_backoff_initial",
                &p.reconnect_backoff_initial,
                false,
            ),
            reconnect_backoff_max: c.duration(
                "pool.reconnect_backoff_max",
                &p.reconnect_backoff_max,
                false,
            ),
            ping_interval: c.duration("pool.ping_interval", &p.ping_interval, false),
            slow_ejection_ratio: c.ratio(
                "pool.slow_ejection_ratio",
                p.slow_ejection_ratio,
                1.0,
                1000.0,
            ),
        };
        if pool.reconnect_backoff_max < pool.reconnect_backoff_initial {
            c.problems.push(
                "pool.reconnect_backoff_max: must not be less than reconnect_backoff_initial"
                    .into(),
            );
        }
        let b = &self.breaker;
        let breaker = BreakerConfig {
            consecutive_failures: c.positive(
                "breaker.consecutive_failures",
                b.consecutive_failures,
                1_000_000,
            ) as u32,
            failure_rate: c.ratio("breaker.failure_rate", b.failure_rate, 0.0, 1.0),
            min_requests: c.positive("breaker.min_requests", b.min_requests, 1_000_000) as u32,
            window: c.duration("breaker.window", &b.window, false),
            open_duration: c.duration("breaker.open_duration", &b.open_duration, false),
            max_open_duration: c.duration("breaker.max_open_duration", &b.max_open_duration, false),
        };
        if breaker.max_open_duration < breaker.open_duration {
            c.problems
                .push("breaker.max_open_duration: must not be less than open_duration".into());
        }
        let r = &self.retry;
        let retry = RetryConfig {
            max_attempts: c.positive("retry.max_attempts", r.max_attempts, 10) as u32,
            budget_ratio: c.ratio("retry.budget_ratio", r.budget_ratio, 0.0, 1.0),
        };
        let memory = MemoryConfig {
            require_lock: self.memory.require_lock,
            lock_all: self.memory.lock_all,
            disable_core_dumps: self.memory.disable_core_dumps,
            wipe_freed_memory: self.memory.wipe_freed_memory,
        };
        let format = match self.log.format.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                c.problems.push(format!(
                    "log.format: expected \"text\" or \"json\", got {other:?}"
                ));
                LogFormat::Text
            }
        };
        let level = self.log.level.trim().to_string();
        if tracing_subscriber::EnvFilter::try_new(log_filter_for_this_build(&level).as_ref())
            .is_err()
            || level.is_empty()
            || !bare_words_are_levels(&level)
        {
            c.problems.push(format!(
                "log.level: invalid level {level:?} (expected error, warn, info, debug, trace \
                 or off, or a filter such as \"info,sprint_sidecar=debug\")"
            ));
        }
        let log = LogConfig { format, level };
        let threads = self.runtime.worker_threads;
        if !(0..=MAX_WORKER_THREADS).contains(&threads) {
            c.problems.push(format!(
                "runtime.worker_threads: must be 0 (one per core) or between 1 and \
                 {MAX_WORKER_THREADS}, got {threads}"
            ));
        }
        let busy_poll = c.duration("runtime.busy_poll", &self.runtime.busy_poll, true);
        if busy_poll > MAX_BUSY_POLL && parse_duration(&self.runtime.busy_poll).is_ok() {
            c.problems.push(format!(
                "runtime.busy_poll: at most {} (a spin, not a sleep), got {}",
                humantime::format_duration(MAX_BUSY_POLL),
                self.runtime.busy_poll.trim()
            ));
        }
        let yield_text = self.runtime.yield_every.trim();
        let yield_every = (yield_text != "auto").then(|| match parse_duration(yield_text) {
            Ok(d) if d > MAX_YIELD_EVERY => {
                c.problems.push(format!(
                    "runtime.yield_every: at most {} (longer than a scheduler tick shortens no \
                     wait), got {yield_text}",
                    humantime::format_duration(MAX_YIELD_EVERY),
                ));
                d
            }
            Ok(d) => d,
            Err(e) => {
                c.problems
                    .push(format!("runtime.yield_every: {e}, or \"auto\""));
                Duration::ZERO
            }
        });
        let nice = self.runtime.nice;
        if !NICE_RANGE.contains(&nice) {
            c.problems.push(format!(
                "runtime.nice: must be between {} and {} (a Linux nice value), got {nice}",
                NICE_RANGE.start(),
                NICE_RANGE.end()
            ));
        }
        let runtime = RuntimeConfig {
            worker_threads: threads.clamp(0, MAX_WORKER_THREADS) as usize,
            busy_poll,
            nice: nice.clamp(*NICE_RANGE.start(), *NICE_RANGE.end()) as i32,
            yield_every,
        };
        if !c.problems.is_empty() {
            return Err(ConfigError {
                problems: c.problems,
            });
        }
        Ok(Config {
            listener,
            admin,
            upstream,
            pool,
            breaker,
            retry,
            memory,
            log,
            runtime,
            raw: self,
            warnings: Vec::new(),
        })
    }
}

/// Whether two listen addresses would take the same port: the same address, or the same
/// port with one of them the unspecified address of the same family. Port 0 (the system
/// picks one) never clashes.
fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `filter` as this build can record it: [`log_filter_capped`] at the build's most detailed
/// level (`tracing`'s `STATIC_MAX_LEVEL`).
pub fn log_filter_for_this_build(filter: &str) -> Cow<'_, str> {
    log_filter_capped(filter, tracing::level_filters::STATIC_MAX_LEVEL)
}

/// `filter` with every level above `max` lowered to `max`. Release builds compile
/// trace-level events out (Cargo.toml: `release_max_level_debug`, about 2% of the CPU per
/// request in the libraries' per-frame checks), and tracing-subscriber prints a raw warning
/// of its own for a filter that asks for more; the sidecar logs one line instead.
pub fn log_filter_capped(filter: &str, max: tracing::level_filters::LevelFilter) -> Cow<'_, str> {
    use tracing::level_filters::LevelFilter;
    let above = |level: &str| level.trim().parse::<LevelFilter>().is_ok_and(|l| l > max);
    let capped = |level: &str| {
        if above(level) {
            max.to_string().to_lowercase()
        } else {
            level.to_string()
        }
    };
    if !filter
        .split(',')
        .any(|d| above(d.rsplit_once('=').map_or(d, |(_, l)| l)))
    {
        return Cow::Borrowed(filter);
    }
    let directives: Vec<String> = filter
        .split(',')
        .map(|d| match d.rsplit_once('=') {
            Some((target, level)) => format!("{target}={}", capped(level)),
            None => capped(d),
        })
        .collect();
    Cow::Owned(directives.join(","))
}

/// Whether every directive of a log filter without `=` is a level. A tracing filter would
/// read a lone word such as `"debgu"` as a target name and log nothing of it; a target
/// filter is written `target=level`.
fn bare_words_are_levels(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('='))
        .all(|d| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_text(text: &str, env: &[(&str, &str)], o: &Overrides) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(Some(f.path()), &env, o)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::load_from(None, &[], &Overrides::default()).expect("defaults load");
        assert_eq!(c.listener.address.to_string(), "127.0.0.1:9090");
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:9091");
        assert_eq!(
            c.upstream.endpoint.to_string(),
            "relay.bitcoin-sprint.inc:443"
        );
        assert_eq!(c.upstream.server_name, "relay.bitcoin-sprint.inc");
        assert_eq!(c.upstream.authority(), "relay.bitcoin-sprint.inc");
        assert_eq!(c.pool.size.get(), 4);
        assert_eq!(c.pool.request_timeout, Duration::from_secs(15));
        assert_eq!(c.pool.max_connection_age, Duration::from_secs(1800));
        assert_eq!(c.breaker.consecutive_failures, 5);
        assert_eq!(c.retry.max_attempts, 2);
        assert!(c.memory.require_lock);
    }

    #[test]
    fn the_shipped_sidecar_toml_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecar.toml");
        let shipped =
            Config::load_from(Some(&path), &[], &Overrides::default()).expect("sidecar.toml loads");
        let defaults = Config::load_from(None, &[], &Overrides::default()).expect("defaults");
        assert_eq!(shipped.to_toml(), defaults.to_toml());
    }

    #[test]
    fn precedence_is_file_then_env_then_flag() {
        let text = "[pool]\nsize = 3\n";
        assert_eq!(
            load_text(text, &[], &Overrides::default())
                .unwrap()
                .pool
                .size
                .get(),
            3
        );
        let env = [("SPRINT_SIDECAR_POOL_SIZE", "5")];
        assert_eq!(
            load_text(text, &env, &Overrides::default())
                .unwrap()
                .pool
                .size
                .get(),
            5
        );
        let flags = Overrides {
            pool_size: Some("7".into()),
            ..Overrides::default()
        };
        assert_eq!(load_text(text, &env, &flags).unwrap().pool.size.get(), 7);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            load_text("[pool]\nsize = 2\nsise = 3\n", &[], &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("pool.sise"), "{msg}");
        assert!(msg.contains(":3:"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = load_text("[pool]\nsize = \"four\"\n", &[], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("pool.size"), "{err}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = load_text("[pool]\nsize = = 2\n", &[], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains(":2:"), "{err}");
    }

    #[test]
    fn every_bad_key_is_reported_at_once() {
        let text = "[pool]\nsize = 0\nconnect_timeout = \"5 parsecs\"\n[listener]\naddress = \"nowhere\"\n";
        let err = load_text(text, &[], &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        for key in ["pool.size", "pool.connect_timeout", "listener.address"] {
            assert!(msg.contains(key), "{key} missing in {msg}");
        }
        assert_eq!(err.problems().len(), 3);
    }

    #[test]
    fn admin_listener_must_not_take_the_data_listeners_port() {
        let load = |listener: &str, admin: &str| {
            let text =
                format!("[listener]\naddress = \"{listener}\"\n[admin]\naddress = \"{admin}\"\n");
            load_text(&text, &[], &Overrides::default()).map_err(|e| e.to_string())
        };
        for (listener, admin) in [
            ("127.0.0.1:9090", "127.0.0.1:9090"),
            ("127.0.0.1:9090", "0.0.0.0:9090"),
            ("0.0.0.0:9090", "127.0.0.1:9090"),
            ("[::1]:9090", "[::]:9090"),
        ] {
            let msg = load(listener, admin).expect_err(admin);
            assert!(
                msg.contains("admin.address") && msg.contains("own port"),
                "{listener} / {admin}: {msg}"
            );
        }
        for (listener, admin) in [
            ("127.0.0.1:9090", "127.0.0.1:9091"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:9090", "127.0.0.2:9090"),
            ("127.0.0.1:9090", "[::1]:9090"),
        ] {
            assert!(load(listener, admin).is_ok(), "{listener} / {admin}");
        }
    }

    #[test]
    fn log_filter_capped_lowers_only_levels_above_the_build() {
        use tracing::level_filters::LevelFilter;
        let debug = LevelFilter::DEBUG;
        for (filter, expected) in [
            ("trace", "debug"),
            ("TRACE", "debug"),
            ("info,h2=trace", "info,h2=debug"),
            ("trace,sprint_sidecar=info", "debug,sprint_sidecar=info"),
            ("h2[send]=trace,hyper=5", "h2[send]=debug,hyper=debug"),
        ] {
            assert_eq!(log_filter_capped(filter, debug), expected, "{filter}");
        }
        for unchanged in [
            "info",
            "debug",
            "off",
            "info,sprint_sidecar=debug",
            "warn,h2=error",
        ] {
            assert!(
                matches!(log_filter_capped(unchanged, debug), Cow::Borrowed(f) if f == unchanged),
                "{unchanged}"
            );
        }
        // A build that records everything changes nothing.
        assert_eq!(
            log_filter_capped("info,h2=trace", LevelFilter::TRACE),
            "info,h2=trace"
        );
        // And one that stops at info lowers debug too.
        assert_eq!(
            log_filter_capped("debug,h2=trace", LevelFilter::INFO),
            "info,h2=info"
        );
    }

    #[test]
    fn log_level_words_must_be_levels() {
        let load = |level: &str| {
            load_text(
                &format!("[log]\nlevel = \"{level}\"\n"),
                &[],
                &Overrides::default(),
            )
            .map(|c| c.log.level)
            .map_err(|e| e.to_string())
        };
        for good in [
            "info",
            "DEBUG",
            "off",
            "warn,sprint_sidecar=debug",
            "h2=info,trace",
        ] {
            assert_eq!(load(good).as_deref(), Ok(good));
        }
        for bad in ["loud", "debgu", "info,sprint_sidecar", "", "info=="] {
            let msg = load(bad).expect_err(bad);
            assert!(msg.contains("log.level: invalid level"), "{bad}: {msg}");
        }
    }

    #[test]
    fn read_ahead_bounds_accept_zero_and_refuse_negatives() {
        let c = Config::load_from(None, &[], &Overrides::default()).expect("defaults");
        assert_eq!(c.upstream.http1_read_ahead_bytes, 8 << 20);
        assert_eq!(c.upstream.http1_read_ahead_total_bytes, 32 << 20);
        let off = "[upstream]\nhttp1_read_ahead_bytes = 0\nhttp1_read_ahead_total_bytes = 0\n";
        let c = load_text(off, &[], &Overrides::default()).expect("0 turns reading ahead off");
        assert_eq!(c.upstream.http1_read_ahead_bytes, 0);
        let bad = "[upstream]\nhttp1_read_ahead_bytes = -1\nhttp1_read_ahead_total_bytes = 9999999999999\n";
        let msg = load_text(bad, &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(
                "upstream.http1_read_ahead_bytes: must be between 0 and 1073741824, got -1"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("upstream.http1_read_ahead_total_bytes: must be between 0 and"),
            "{msg}"
        );
    }

    #[test]
    fn missing_ca_file_names_the_path() {
        let err = load_text(
            "[upstream]\nca_file = \"/nonexistent/ca.pem\"\n",
            &[],
            &Overrides::default(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("upstream.ca_file") && msg.contains("/nonexistent/ca.pem"),
            "{msg}"
        );
    }

    #[test]
    fn env_values_are_typed_and_checked() {
        let env = [("SPRINT_SIDECAR_POOL_SIZE", "many")];
        let err = load_text("", &env, &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("SPRINT_SIDECAR_POOL_SIZE"),
            "{err}"
        );
        let env = [("SPRINT_SIDECAR_UPSTREAM_ALPN", "http/1.1")];
        let c = load_text("", &env, &Overrides::default()).unwrap();
        assert_eq!(c.upstream.alpn, vec!["http/1.1".to_string()]);
        let env = [("SPRINT_SIDECAR_ADMIN_SERVICE_HOST", "10.0.0.1")];
        let c =
            load_text("", &env, &Overrides::default()).expect("unknown variables are not fatal");
        assert!(c.warnings()[0].contains("SPRINT_SIDECAR_ADMIN_SERVICE_HOST"));
        // A value that has the key's type but fails its check names the variable too.
        for (name, value, key) in [
            (
                "SPRINT_SIDECAR_POOL_CONNECT_TIMEOUT",
                "10",
                "pool.connect_timeout",
            ),
            ("SPRINT_SIDECAR_POOL_SIZE", "0", "pool.size"),
            ("SPRINT_SIDECAR_UPSTREAM_ALPN", "h3", "upstream.alpn"),
        ] {
            let err = load_text("", &[(name, value)], &Overrides::default()).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("{key} (from environment variable {name}):")),
                "{msg}"
            );
        }
        // Booleans in any case; lists without empty items; each protocol once.
        let env = [("SPRINT_SIDECAR_MEMORY_LOCK_ALL", "TRUE")];
        assert!(
            load_text("", &env, &Overrides::default())
                .unwrap()
                .memory
                .lock_all
        );
        for alpn in ["h2,,http/1.1", "h2,", "h2,h2"] {
            let env = [("SPRINT_SIDECAR_UPSTREAM_ALPN", alpn)];
            let msg = load_text("", &env, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("SPRINT_SIDECAR_UPSTREAM_ALPN"),
                "{alpn}: {msg}"
            );
        }
    }

    #[test]
    fn settings_that_defeat_one_another_are_warned_about() {
        let c = Config::load_from(None, &[], &Overrides::default()).expect("defaults");
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let text = "[listener]\nrequest_deadline = \"1s\"\n[pool]\nrequest_timeout = \"5s\"\n\
                    [upstream]\nmax_header_field_bytes = 40000\nmax_header_list_bytes = 100\n\
                    http1_read_ahead_bytes = 100\nhttp1_read_ahead_total_bytes = 10\n\
                    [runtime]\nworker_threads = 5\n";
        let c = load_text(text, &[], &Overrides::default()).expect("valid, with warnings");
        let all = c.warnings().join("\n");
        for key in [
            "pool.request_timeout",
            "upstream.max_header_field_bytes",
            "upstream.http1_read_ahead_bytes",
            "runtime.worker_threads (5) is above pool.size (4): 1 event loop",
        ] {
            assert!(all.contains(key), "{key}: {all}");
        }
    }

    #[test]
    fn auth_header_may_not_name_a_framing_or_routing_header() {
        for name in [
            "content-length",
            "Transfer-Encoding",
            "connection",
            "host",
            "te",
        ] {
            let text = format!("[upstream]\nauth_header = \"{name}\"\n");
            let msg = load_text(&text, &[], &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(msg.contains("upstream.auth_header"), "{name}: {msg}");
        }
        let text = "[upstream]\nauth_header = \"x-relay-key\"\n";
        let c = load_text(text, &[], &Overrides::default()).expect("a custom header");
        assert_eq!(c.upstream.auth_header.as_str(), "x-relay-key");
    }

    #[test]
    fn worker_threads_default_to_one_event_loop_and_zero_means_one_per_core_up_to_the_pool() {
        let c = Config::load_from(None, &[], &Overrides::default()).expect("defaults");
        assert_eq!(c.runtime.worker_threads, 1);
        assert_eq!(c.runtime.event_loops(4), 1);
        let env = [("SPRINT_SIDECAR_RUNTIME_WORKER_THREADS", "0")];
        let c = load_text("", &env, &Overrides::default()).expect("0 is valid");
        assert_eq!(c.runtime.worker_threads, 0);
        let cores = crate::event_loops::available_cores();
        assert_eq!(c.runtime.event_loops(1024), cores);
        assert_eq!(
            c.runtime.event_loops(1),
            1,
            "no more loops than pool connections"
        );
        let c = load_text(
            "[runtime]\nworker_threads = 3\n",
            &[],
            &Overrides::default(),
        )
        .expect("3 is valid");
        assert_eq!(c.runtime.event_loops(2), 3, "as many as asked for");
        for bad in ["-1", "5000"] {
            let text = format!("[runtime]\nworker_threads = {bad}\n");
            let err = load_text(&text, &[], &Overrides::default()).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("runtime.worker_threads") && msg.contains(bad),
                "{msg}"
            );
        }
    }

    /// `[runtime] key = "bad"` is refused with one problem naming the key and the value.
    fn assert_runtime_value_refused(key: &str, bad: &str) {
        let text = format!("[runtime]\n{key} = \"{bad}\"\n");
        let err = load_text(&text, &[], &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        let name = format!("runtime.{key}");
        assert!(msg.contains(&name) && msg.contains(bad), "{msg}");
        assert_eq!(msg.matches(&name).count(), 1, "one problem: {msg}");
    }

    #[test]
    fn yield_every_defaults_to_auto_zero_turns_it_off_and_long_or_bad_values_are_refused() {
        let c = Config::load_from(None, &[], &Overrides::default()).expect("defaults");
        assert_eq!(c.runtime.yield_every, None, "auto");
        let auto = c.runtime.yield_policy(1);
        assert_eq!(auto.every, Duration::from_micros(400));
        assert!(auto.only_when_sharing, "auto: not on a core of its own");
        assert_eq!(
            c.runtime.yield_policy(2).every,
            Duration::ZERO,
            "auto: off with two loops"
        );
        let env = [("SPRINT_SIDECAR_RUNTIME_YIELD_EVERY", "0s")];
        let c = load_text("", &env, &Overrides::default()).expect("0s is valid");
        assert_eq!(c.runtime.yield_every, Some(Duration::ZERO));
        assert_eq!(c.runtime.yield_policy(1).every, Duration::ZERO);
        let c = load_text(
            "[runtime]\nyield_every = \"2ms\"\n",
            &[],
            &Overrides::default(),
        )
        .expect("2ms is valid");
        assert_eq!(c.runtime.yield_every, Some(Duration::from_millis(2)));
        let given = c.runtime.yield_policy(4);
        assert_eq!(given.every, Duration::from_millis(2), "as given");
        assert!(!given.only_when_sharing, "as given, wherever it runs");
        for bad in ["11ms", "often"] {
            assert_runtime_value_refused("yield_every", bad);
        }
        let err = load_text(
            "[runtime]\nyield_every = \"Auto\"\n",
            &[],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("or \"auto\""), "{err}");
    }

    #[test]
    fn busy_poll_defaults_to_1ms_zero_turns_it_off_and_long_or_bad_values_are_refused() {
        let c = Config::load_from(None, &[], &Overrides::default()).expect("defaults");
        assert_eq!(c.runtime.busy_poll, Duration::from_millis(1));
        let env = [("SPRINT_SIDECAR_RUNTIME_BUSY_POLL", "0s")];
        let c = load_text("", &env, &Overrides::default()).expect("0s is valid");
        assert_eq!(c.runtime.busy_poll, Duration::ZERO);
        let c = load_text(
            "[runtime]\nbusy_poll = \"200us\"\n",
            &[],
            &Overrides::default(),
        )
        .expect("200us is valid");
        assert_eq!(c.runtime.busy_poll, Duration::from_micros(200));
        for bad in ["20ms", "soon"] {
            assert_runtime_value_refused("busy_poll", bad);
        }
    }

    #[test]
    fn nice_defaults_to_minus_five_takes_the_linux_range_and_refuses_the_rest() {
        let c = Config::load_from(None, &[], &Overrides::default()).expect("defaults");
        assert_eq!(c.runtime.nice, -5);
        let env = [("SPRINT_SIDECAR_RUNTIME_NICE", "0")];
        let c = load_text("", &env, &Overrides::default()).expect("0 is valid");
        assert_eq!(c.runtime.nice, 0);
        for (text, nice) in [("-20", -20), ("19", 19)] {
            let c = load_text(
                &format!("[runtime]\nnice = {text}\n"),
                &[],
                &Overrides::default(),
            )
            .expect("the ends of the range are valid");
            assert_eq!(c.runtime.nice, nice);
        }
        for bad in ["-21", "20", "1000"] {
            let text = format!("[runtime]\nnice = {bad}\n");
            let err = load_text(&text, &[], &Overrides::default()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("runtime.nice") && msg.contains(bad), "{msg}");
            assert_eq!(msg.matches("runtime.nice").count(), 1, "one problem: {msg}");
        }
        let err =
            load_text("[runtime]\nnice = \"high\"\n", &[], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("nice"), "{err}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn authority_keeps_a_non_default_port() {
        let o = Overrides {
            upstream: Some("127.0.0.1:8443".into()),
            server_name: Some("relay.test".into()),
            ..Overrides::default()
        };
        let c = Config::load_from(None, &[], &o).unwrap();
        assert_eq!(c.upstream.authority(), "relay.test:8443");
    }
}
