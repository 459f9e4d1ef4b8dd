//! Runs the real `sprint-sidecar` binary as a child process: writes a TOML config (SPEC §4
//! keys) into a temporary directory, starts `run --config FILE`, waits for the one stdout line
//! `sprint-sidecar listening data=http://ADDR admin=http://ADDR`, and captures every other
//! output line (the logs) for assertions. The child is killed when the [`Sidecar`] drops.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::pki::{Pki, write_with_mode};
use super::relay::Relay;

/// The path of the binary under test, built by Cargo for integration tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_sprint-sidecar");

/// How long the binary may take to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Prefix of the one stdout line the binary prints once both listeners are bound.
pub const LISTENING_PREFIX: &str = "sprint-sidecar listening";

/// Builder of a sidecar configuration and process.
pub struct SidecarBuilder {
    /// `section -> key -> raw TOML value` (strings already quoted).
    settings: BTreeMap<String, BTreeMap<String, String>>,
    extra_toml: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    dir: TempDir,
    /// Keeps the PKI (and its ca.pem) alive as long as the sidecar.
    pki: Option<Arc<Pki>>,
    /// Programs that exec the binary (`prlimit …`, `setpriv …`); empty: run it directly.
    wrapper: Vec<String>,
    /// The binary to run instead of [`BINARY`] (e.g. a copy another user may execute).
    binary: Option<PathBuf>,
}

impl Default for SidecarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl SidecarBuilder {
    /// Loopback listeners on ephemeral ports, `[memory] require_lock = false` (test machines
    /// rarely allow mlock), no upstream yet (see [`SidecarBuilder::relay`]).
    pub fn new() -> Self {
        let mut builder = Self {
            settings: BTreeMap::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            args: Vec::new(),
            dir: tempfile::tempdir().expect("a temporary directory can be created"),
            pki: None,
            wrapper: Vec::new(),
            binary: None,
        };
        builder = builder
            .set_str("listener", "address", "127.0.0.1:0")
            .set_str("admin", "address", "127.0.0.1:0")
            .set("memory", "require_lock", "false");
        builder
    }

    /// Points the upstream at `relay`: endpoint `127.0.0.1:<port>`, server name `relay.test`,
    /// `ca_file` the relay PKI's `ca.pem`. Short reconnect backoff so tests recover fast.
    pub fn relay(self, relay: &Relay) -> Self {
        self.endpoint(&relay.endpoint())
            .server_name(relay.server_name())
            .pki(relay.pki().clone())
            .set_str("pool", "reconnect_backoff_initial", "50ms")
            .set_str("pool", "reconnect_backoff_max", "500ms")
    }

    /// `upstream.ca_file` from `pki` (and keeps the PKI alive).
    pub fn pki(mut self, pki: Arc<Pki>) -> Self {
        let path = pki.ca_file().to_path_buf();
        self.pki = Some(pki);
        self.ca_file(&path)
    }

    pub fn endpoint(self, endpoint: &str) -> Self {
        self.set_str("upstream", "endpoint", endpoint)
    }

    pub fn server_name(self, name: &str) -> Self {
        self.set_str("upstream", "server_name", name)
    }

    pub fn ca_file(self, path: &Path) -> Self {
        self.set_str("upstream", "ca_file", &path.display().to_string())
    }

    pub fn pool_size(self, size: usize) -> Self {
        self.set("pool", "size", &size.to_string())
    }

    /// Sets `section.key` to a raw TOML value (`"2"`, `"true"`, `"\"5s\""`, `"[\"h2\"]"`).
    pub fn set(mut self, section: &str, key: &str, raw_toml: &str) -> Self {
        self.settings
            .entry(section.to_owned())
            .or_default()
            .insert(key.to_owned(), raw_toml.to_owned());
        self
    }

    /// Sets `section.key` to a TOML string (quoted and escaped here).
    pub fn set_str(self, section: &str, key: &str, value: &str) -> Self {
        let quoted = toml_string(value);
        self.set(section, key, &quoted)
    }

    /// Removes `section.key` from the written config (e.g. a default of this builder).
    pub fn unset(mut self, section: &str, key: &str) -> Self {
        if let Some(keys) = self.settings.get_mut(section) {
            keys.remove(key);
        }
        self
    }

    /// Raw TOML appended after the generated sections. It must not repeat a table header
    /// that [`SidecarBuilder::set`] already wrote (TOML forbids that); use `set` for those.
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    /// An environment variable for the child (`SPRINT_SIDECAR_*` of the test process are
    /// never inherited).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// An extra command-line argument after `--config FILE`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Runs the binary through `wrapper` (a program and its arguments that end by exec'ing
    /// the binary, such as `prlimit --memlock=0:0 setpriv --reuid=65534 …`); the process id
    /// stays the binary's as long as every wrapper execs.
    pub fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|part| part.to_string()).collect();
        self
    }

    /// Runs `path` instead of the binary Cargo built (a copy in a directory another user can
    /// reach).
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    /// The temporary directory holding the config (and any file written with
    /// [`SidecarBuilder::write_file`]).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` to `<dir>/<name>` with permission bits `mode`; returns the path.
    pub fn write_file(&self, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = self.dir.path().join(name);
        write_with_mode(&path, contents, mode);
        path
    }

    /// The TOML text that [`SidecarBuilder::write_config`] writes.
    pub fn config_toml(&self) -> String {
        let mut text = String::new();
        for (section, keys) in &self.settings {
            text.push_str(&format!("[{section}]\n"));
            for (key, value) in keys {
                text.push_str(&format!("{key} = {value}\n"));
            }
            text.push('\n');
        }
        text.push_str(&self.extra_toml);
        text
    }

    /// Writes the config to `<dir>/sidecar.toml` and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("sidecar.toml");
        std::fs::write(&path, self.config_toml()).expect("the config file can be written");
        path
    }

    fn command(&self, args: &[String]) -> Command {
        let binary = self.binary.clone().unwrap_or_else(|| PathBuf::from(BINARY));
        let mut command = match self.wrapper.split_first() {
            None => Command::new(&binary),
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(&binary);
                command
            }
        };
        command.args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("SPRINT_SIDECAR_") {
                command.env_remove(&key);
            }
        }
        // `SIDECAR_TEST_EXTRA_ENV=KEY=VALUE,...` adds environment to every sidecar a test
        // starts, to run the whole suite under another setting, e.g.
        // `SPRINT_SIDECAR_RUNTIME_WORKER_THREADS=2` (several event loops). It overrides the
        // test's configuration file, so a test about that setting itself then fails.
        if let Ok(extra) = std::env::var("SIDECAR_TEST_EXTRA_ENV") {
            for pair in extra.split(',') {
                if let Some((key, value)) = pair.split_once('=') {
                    command.env(key, value);
                }
            }
        }
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs `<subcommand> --config <written config> <extra args>` to completion (bounded by
    /// 20 s) and returns its exit code and output. For `check-config`, and for `run` with a
    /// config that must be refused.
    pub async fn run_command(&self, subcommand: &str) -> CommandOutput {
        let config = self.write_config();
        let mut args = vec![
            subcommand.to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        self.run_args(&args).await
    }

    /// Runs the binary with exactly `args` (bounded by 20 s).
    pub async fn run_args(&self, args: &[String]) -> CommandOutput {
        let child = self
            .command(args)
            .spawn()
            .expect("the sprint-sidecar binary can be spawned");
        match tokio::time::timeout(START_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(output)) => CommandOutput {
                code: output.status.code(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            },
            Ok(Err(error)) => panic!("waiting for sprint-sidecar {args:?} failed: {error}"),
            // kill_on_drop ended the child when the future was dropped.
            Err(_) => panic!("sprint-sidecar {args:?} did not exit within {START_TIMEOUT:?}"),
        }
    }

    /// Starts `run --config FILE` and waits for the listening line.
    ///
    /// Panics (with the captured output) if the line does not come within 20 s or the
    /// process exits first.
    pub async fn start(self) -> Sidecar {
        let config_path = self.write_config();
        let mut args = vec![
            "run".to_owned(),
            "--config".to_owned(),
            config_path.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        let mut child = self
            .command(&args)
            .spawn()
            .expect("the sprint-sidecar binary can be spawned");

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (line_sender, mut line_receiver) = oneshot::channel::<String>();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        tokio::spawn(capture(stdout, logs.clone(), Some(line_sender)));
        tokio::spawn(capture(stderr, logs.clone(), None));

        let deadline = Instant::now() + START_TIMEOUT;
        let line = loop {
            match line_receiver.try_recv() {
                Ok(line) => break line,
                Err(oneshot::error::TryRecvError::Closed) => {
                    // stdout closed without the line: the process is exiting.
                    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    panic!(
                        "sprint-sidecar closed stdout without printing {LISTENING_PREFIX:?} \
                         (exit: {status:?}); config:\n{}\noutput:\n{}",
                        self.config_toml(),
                        snapshot(&logs).join("\n")
                    );
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "sprint-sidecar exited ({status}) before printing {LISTENING_PREFIX:?}; \
                     config:\n{}\noutput:\n{}",
                    self.config_toml(),
                    snapshot(&logs).join("\n")
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "sprint-sidecar did not print {LISTENING_PREFIX:?} within {START_TIMEOUT:?}; \
                     config:\n{}\noutput:\n{}",
                    self.config_toml(),
                    snapshot(&logs).join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (data, admin) = parse_listening_line(&line)
            .unwrap_or_else(|| panic!("malformed listening line: {line:?}"));

        Sidecar {
            child,
            data,
            admin,
            logs,
            client: super::client(),
            config_path,
            config_toml: self.config_toml(),
            _pki: self.pki,
            _dir: self.dir,
        }
    }
}

/// Exit code and output of a finished command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect()
    }
}

/// A running sidecar process.
pub struct Sidecar {
    child: Child,
    data: SocketAddr,
    admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
    config_path: PathBuf,
    config_toml: String,
    _pki: Option<Arc<Pki>>,
    _dir: TempDir,
}

impl Sidecar {
    pub fn builder() -> SidecarBuilder {
        SidecarBuilder::new()
    }

    /// The data listener's bound address.
    pub fn data_addr(&self) -> SocketAddr {
        self.data
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://<data>/<path>` (`path` starts with `/`).
    pub fn data_url(&self, path: &str) -> String {
        format!("http://{}{}", self.data, path)
    }

    /// `http://<admin>/<path>` (`path` starts with `/`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// A shared plain-HTTP client (connection reuse across calls).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// GET an admin path; returns the status and the body parsed as JSON (panics if the
    /// body is not JSON: every admin answer of SPEC §6 except /metrics and HTML is).
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .client
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {path} on the admin listener failed: {error}"));
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("the admin body can be read");
        let document = serde_json::from_slice(&body).unwrap_or_else(|error| {
            panic!(
                "GET {path} answered {status} with a non-JSON body {:?}: {error}",
                String::from_utf8_lossy(&body)
            )
        });
        (status, document)
    }

    /// `/metrics` in the Prometheus text format.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.admin_url("/metrics"))
            .header("accept", "text/plain")
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("the metrics text")
    }

    /// The value of one sample of `/metrics` in the Prometheus text format, named with its
    /// labels as exposed (`name{label="v"}`); panics when it is missing.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    }

    /// The status code of an admin GET (connection errors count as `None`).
    pub async fn admin_status(&self, path: &str) -> Option<u16> {
        self.client
            .get(self.admin_url(path))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()
            .map(|response| response.status().as_u16())
    }

    /// Polls `/ready` until it answers 200 (bounded by 10 s; panics with the logs).
    pub async fn wait_ready(&self) {
        self.wait_admin_status("/ready", 200).await;
    }

    /// Polls an admin path until it answers `status` (bounded by 10 s; panics with the logs).
    pub async fn wait_admin_status(&self, path: &str, status: u16) {
        let deadline = Instant::now() + super::EVENTUALLY;
        let mut last = None;
        loop {
            last = self.admin_status(path).await.or(last);
            if last == Some(status) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "GET {path} did not answer {status} within {:?} (last: {last:?}); logs:\n{}",
                    super::EVENTUALLY,
                    self.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every output line captured so far (stderr and stdout, interleaved as read).
    pub fn logs(&self) -> Vec<String> {
        snapshot(&self.logs)
    }

    /// True when some captured line contains `needle`.
    pub fn logs_contain(&self, needle: &str) -> bool {
        snapshot(&self.logs)
            .iter()
            .any(|line| line.contains(needle))
    }

    /// The config text the process was started with.
    pub fn config_toml(&self) -> &str {
        &self.config_toml
    }

    /// Sends SIGTERM (through the `kill` command: the tests hold no `unsafe`).
    pub async fn terminate(&self) {
        self.signal("TERM").await;
    }

    /// Sends SIG`name` (e.g. "INT", "TERM").
    pub async fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the sidecar is still running");
        let status = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .await
            .expect("the kill command runs");
        assert!(status.success(), "kill -{name} {pid} failed: {status}");
    }

    /// Waits (bounded) for the process to exit; panics with the logs if it does not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => panic!("waiting for the sidecar failed: {error}"),
            Err(_) => panic!(
                "the sidecar did not exit within {timeout:?}; logs:\n{}",
                self.logs().join("\n")
            ),
        }
    }

    /// Returns the exit status if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Reads `stream` line by line into `logs`; the first line with [`LISTENING_PREFIX`] goes
/// to `listening` instead (once).
async fn capture<R>(
    stream: R,
    logs: Arc<Mutex<Vec<String>>>,
    mut listening: Option<oneshot::Sender<String>>,
) where
    R: AsyncRead + Unpin,
{
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim_start().starts_with(LISTENING_PREFIX)
            && let Some(sender) = listening.take()
        {
            let _ = sender.send(line.clone());
        }
        logs.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(line);
    }
}

fn snapshot(logs: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    logs.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Parses `sprint-sidecar listening data=http://ADDR admin=http://ADDR`.
pub fn parse_listening_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut data = None;
    let mut admin = None;
    for token in line.split_whitespace() {
        if let Some(address) = token.strip_prefix("data=http://") {
            data = address.trim_end_matches('/').parse().ok();
        } else if let Some(address) = token.strip_prefix("admin=http://") {
            admin = address.trim_end_matches('/').parse().ok();
        }
    }
    Some((data?, admin?))
}

/// A TOML basic string with `value` escaped.
pub fn toml_string(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for character in value.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            control if control.is_control() => {
                quoted.push_str(&format!("\\u{:04X}", control as u32));
            }
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}
