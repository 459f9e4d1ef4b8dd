//! `sprint-sidecar check-config` (and `run`) against the real binary: the effective
//! configuration is printed with secrets redacted; precedence is built-in < file < env <
//! flag; every bad input exits 2 with one line naming the key (SPEC §3–§4, issue 2 item 1).

mod support;

use std::sync::Arc;

use support::{CommandOutput, Pki, SidecarBuilder};

/// A valid config: an existing CA file, loopback listeners.
fn valid(pki: &Arc<Pki>) -> SidecarBuilder {
    SidecarBuilder::new()
        .endpoint("127.0.0.1:9443")
        .server_name("relay.test")
        .pki(pki.clone())
}

/// Reads `pool.size` from the printed effective configuration (TOML, as `sidecar.toml`).
fn printed_pool_size(output: &CommandOutput) -> i64 {
    let table: toml::Table = toml::from_str(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "check-config must print the effective config as TOML: {error}\n{}",
            output.stdout
        )
    });
    table
        .get("pool")
        .and_then(|pool| pool.get("size"))
        .and_then(toml::Value::as_integer)
        .unwrap_or_else(|| panic!("no pool.size in the printed config:\n{}", output.stdout))
}

fn assert_accepted(output: &CommandOutput) {
    assert_eq!(
        output.code,
        Some(0),
        "expected exit 0; stdout:\n{}\nstderr:\n{}",
        output.stdout,
        output.stderr
    );
}

/// Exit 2 and exactly one non-empty stderr line that contains every one of `needles`.
fn assert_rejected(output: &CommandOutput, needles: &[&str]) -> String {
    assert_eq!(
        output.code,
        Some(2),
        "expected exit 2; stdout:\n{}\nstderr:\n{}",
        output.stdout,
        output.stderr
    );
    let lines = output.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "one clear line on stderr, got:\n{}",
        output.stderr
    );
    let line = lines[0].to_owned();
    for needle in needles {
        assert!(
            line.contains(needle),
            "the error must name {needle:?}: {line}"
        );
    }
    line
}

// ---- effective configuration ----

#[tokio::test(flavor = "multi_thread")]
async fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let pki = Pki::new();
    let builder = valid(&pki);
    let token = builder.write_file("relay.token", b"Bearer s3cr3t-token-value-9f8e7d\n", 0o600);
    let output = builder
        .set_str("upstream", "auth_token_file", &token.display().to_string())
        .set("pool", "size", "3")
        .run_command("check-config")
        .await;
    assert_accepted(&output);
    assert!(
        !output.stdout.contains("s3cr3t-token-value")
            && !output.stderr.contains("s3cr3t-token-value"),
        "the token's content must never be printed:\n{}{}",
        output.stdout,
        output.stderr
    );
    assert!(
        output.stdout.contains("127.0.0.1:9443"),
        "the endpoint is shown:\n{}",
        output.stdout
    );
    assert_eq!(printed_pool_size(&output), 3);
    // Defaults appear too: it is the *effective* configuration.
    let table: toml::Table = toml::from_str(&output.stdout).expect("TOML output");
    for section in [
        "listener", "admin", "upstream", "pool", "breaker", "retry", "memory", "log", "runtime",
    ] {
        assert!(
            table.contains_key(section),
            "section [{section}] missing:\n{}",
            output.stdout
        );
    }
    assert_eq!(
        table["pool"]["connect_timeout"].as_str(),
        Some("3s"),
        "an unset key shows its documented default"
    );
    assert!(
        output
            .stdout
            .contains("# event loops: 1 (runtime.worker_threads = 1)"),
        "{}",
        output.stdout
    );
    let busy_polling = "# busy polling: on (runtime.busy_poll = 1ms): while an event loop \
                        sleeps with 8+ requests in flight, an idle-class thread keeps its core \
                        awake for up to that long, as long as a trial (one period of 100 ms \
                        in ten without it) finds that this makes answers faster";
    assert!(output.stdout.contains(busy_polling), "{}", output.stdout);
    assert!(
        output
            .stdout
            .contains("# handing the core over: at most every 400us (runtime.yield_every = auto)"),
        "{}",
        output.stdout
    );
    assert_eq!(table["runtime"]["yield_every"].as_str(), Some("auto"));
}

/// `runtime.busy_poll = "0s"` is reported as off.
#[tokio::test(flavor = "multi_thread")]
async fn check_config_reports_busy_polling_off() {
    let pki = Pki::new();
    let output = valid(&pki)
        .set_str("runtime", "busy_poll", "0s")
        .run_command("check-config")
        .await;
    assert_accepted(&output);
    assert!(
        output
            .stdout
            .contains("# busy polling: off (runtime.busy_poll = 0s)"),
        "{}",
        output.stdout
    );
}

/// `worker_threads = 0` is resolved in the output: one loop per core, at most `pool.size`.
#[tokio::test(flavor = "multi_thread")]
async fn check_config_prints_how_many_event_loops_will_run() {
    let pki = Pki::new();
    let output = valid(&pki)
        .set("runtime", "worker_threads", "0")
        .set("pool", "size", "1")
        .run_command("check-config")
        .await;
    assert_accepted(&output);
    assert!(
        output.stdout.contains(
            "# event loops: 1 (runtime.worker_threads = 0: one per core this process may use, \
             at most pool.size)"
        ),
        "{}",
        output.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn precedence_is_defaults_then_file_then_env_then_flag() {
    let pki = Pki::new();

    let defaults = valid(&pki).run_command("check-config").await;
    assert_accepted(&defaults);
    assert_eq!(printed_pool_size(&defaults), 4, "built-in default");

    let file = valid(&pki)
        .set("pool", "size", "3")
        .run_command("check-config")
        .await;
    assert_accepted(&file);
    assert_eq!(printed_pool_size(&file), 3, "the file beats the default");

    let env = valid(&pki)
        .set("pool", "size", "3")
        .env("SPRINT_SIDECAR_POOL_SIZE", "5")
        .run_command("check-config")
        .await;
    assert_accepted(&env);
    assert_eq!(printed_pool_size(&env), 5, "the environment beats the file");

    let flag = valid(&pki)
        .set("pool", "size", "3")
        .env("SPRINT_SIDECAR_POOL_SIZE", "5")
        .arg("--pool-size")
        .arg("6")
        .run_command("check-config")
        .await;
    assert_accepted(&flag);
    assert_eq!(
        printed_pool_size(&flag),
        6,
        "the flag beats the environment"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_environment_keys_override_the_file() {
    let pki = Pki::new();
    let output = valid(&pki)
        .env("SPRINT_SIDECAR_UPSTREAM_ENDPOINT", "127.0.0.1:7443")
        .run_command("check-config")
        .await;
    assert_accepted(&output);
    let table: toml::Table = toml::from_str(&output.stdout).expect("TOML output");
    assert_eq!(
        table["upstream"]["endpoint"].as_str(),
        Some("127.0.0.1:7443")
    );
}

// ---- bad input: exit 2, one line naming the key ----

#[tokio::test(flavor = "multi_thread")]
async fn unknown_key_is_named() {
    let pki = Pki::new();
    let output = valid(&pki)
        .set("pool", "sizee", "3")
        .run_command("check-config")
        .await;
    assert_rejected(&output, &["sizee"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_section_is_named() {
    let pki = Pki::new();
    let output = valid(&pki)
        .extra_toml("[poool]\nsize = 3")
        .run_command("check-config")
        .await;
    assert_rejected(&output, &["poool"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_type_names_the_key() {
    let pki = Pki::new();
    let output = valid(&pki)
        .set("pool", "size", "\"four\"")
        .run_command("check-config")
        .await;
    assert_rejected(&output, &["pool.size"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_duration_names_the_key() {
    let pki = Pki::new();
    let output = valid(&pki)
        .set_str("pool", "connect_timeout", "5 parsecs")
        .run_command("check-config")
        .await;
    assert_rejected(&output, &["pool.connect_timeout"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_pool_size_is_refused() {
    let pki = Pki::new();
    let output = valid(&pki)
        .set("pool", "size", "0")
        .run_command("check-config")
        .await;
    assert_rejected(&output, &["pool.size"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_pool_size_flag_is_refused() {
    let pki = Pki::new();
    let output = valid(&pki)
        .arg("--pool-size")
        .arg("0")
        .run_command("check-config")
        .await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    assert!(
        output.stderr.contains("pool.size") || output.stderr.contains("--pool-size"),
        "{}",
        output.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_address_names_the_key() {
    let pki = Pki::new();
    let output = valid(&pki)
        .set_str("listener", "address", "not-an-address")
        .run_command("check-config")
        .await;
    assert_rejected(&output, &["listener.address"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_environment_value_names_the_variable() {
    let pki = Pki::new();
    let output = valid(&pki)
        .env("SPRINT_SIDECAR_POOL_SIZE", "many")
        .run_command("check-config")
        .await;
    assert_rejected(&output, &["SPRINT_SIDECAR_POOL_SIZE"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn toml_syntax_error_names_the_line() {
    let pki = Pki::new();
    let builder = SidecarBuilder::new();
    // Written by hand so the line number is known: the error is on line 3.
    let config = builder.write_file(
        "broken.toml",
        format!(
            "[upstream]\nca_file = \"{}\"\n[pool\nsize = 3\n",
            pki.ca_file().display()
        )
        .as_bytes(),
        0o644,
    );
    let output = builder
        .run_args(&[
            "check-config".into(),
            "--config".into(),
            config.display().to_string(),
        ])
        .await;
    let line = assert_rejected(&output, &[]);
    assert!(
        line.contains("line 3") || line.contains(":3:") || line.contains(":3 "),
        "the error must name line 3: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_file_given_as_the_configuration_is_never_printed() {
    let builder = SidecarBuilder::new();
    let cases: [(&str, &str, &str); 4] = [
        (
            "relay.token",
            "Bearer SECRET-first-line-42\n",
            "SECRET-first-line-42",
        ),
        (
            "client.key",
            "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGSECRETKEYBYTES\n-----END PRIVATE KEY-----\n",
            "SECRETKEYBYTES",
        ),
        (
            "dotenv",
            "RELAY_TOKEN=SECRET-unquoted-7\n",
            "SECRET-unquoted-7",
        ),
        (
            "typed.toml",
            "[pool]\nsize = \"SECRET-quoted-9\"\n",
            "SECRET-quoted-9",
        ),
    ];
    for (name, contents, secret) in cases {
        let file = builder.write_file(name, contents.as_bytes(), 0o600);
        for command in ["check-config", "run"] {
            let output = builder
                .run_args(&[
                    command.into(),
                    "--config".into(),
                    file.display().to_string(),
                ])
                .await;
            let line = assert_rejected(&output, &[name]);
            for shown in [&line, &output.stdout] {
                assert!(!shown.contains(secret), "{command} printed {name}: {shown}");
                assert!(!shown.contains("PRIVATE KEY"), "{command}: {shown}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_ca_file_names_the_path() {
    let builder = SidecarBuilder::new().endpoint("127.0.0.1:9443").set_str(
        "upstream",
        "ca_file",
        "/nonexistent/sprint-sidecar-test/ca.pem",
    );
    let output = builder.run_command("check-config").await;
    assert_rejected(&output, &["/nonexistent/sprint-sidecar-test/ca.pem"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_config_file_names_the_path() {
    let builder = SidecarBuilder::new();
    let output = builder
        .run_args(&[
            "check-config".into(),
            "--config".into(),
            "/nonexistent/sprint-sidecar-test/sidecar.toml".into(),
        ])
        .await;
    assert_rejected(&output, &["/nonexistent/sprint-sidecar-test/sidecar.toml"]);
}

// ---- secret file permissions ----

fn with_world_readable_token(pki: &Arc<Pki>) -> SidecarBuilder {
    let builder = valid(pki);
    let token = builder.write_file("relay.token", b"Bearer world-readable-0644\n", 0o644);
    builder.set_str("upstream", "auth_token_file", &token.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn world_readable_token_file_is_refused_by_check_config() {
    let pki = Pki::new();
    let output = with_world_readable_token(&pki)
        .run_command("check-config")
        .await;
    let line = assert_rejected(&output, &["relay.token"]);
    assert!(
        !line.contains("world-readable-0644"),
        "never print the secret: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn world_readable_token_file_is_refused_by_run() {
    let pki = Pki::new();
    let output = with_world_readable_token(&pki).run_command("run").await;
    assert_eq!(
        output.code,
        Some(2),
        "run must refuse to start; stdout:\n{}\nstderr:\n{}",
        output.stdout,
        output.stderr
    );
    assert!(
        output.stderr.contains("relay.token"),
        "names the file: {}",
        output.stderr
    );
    assert!(
        !output.stderr.contains("world-readable-0644")
            && !output.stdout.contains("world-readable-0644")
    );
    assert!(
        !output.stdout.contains("sprint-sidecar listening"),
        "it never started serving"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_refuses_the_admin_token_files_run_refuses() {
    let pki = Pki::new();
    for (name, contents, mode) in [
        ("open.token", &b"admin-open-0644\n"[..], 0o644),
        ("empty.token", &b""[..], 0o600),
    ] {
        let builder = valid(&pki);
        let file = builder.write_file(name, contents, mode);
        let builder = builder.set_str("admin", "token_file", &file.display().to_string());
        for command in ["check-config", "run"] {
            let output = builder.run_command(command).await;
            let line = assert_rejected(&output, &["admin.token_file", name]);
            assert!(
                !line.contains("admin-open-0644") && !output.stdout.contains("admin-open-0644"),
                "never print the secret: {line}"
            );
        }
    }
    let builder = valid(&pki);
    let file = builder.write_file("good.token", b"admin-good\n", 0o600);
    let output = builder
        .set_str("admin", "token_file", &file.display().to_string())
        .run_command("check-config")
        .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(
        output
            .stdout
            .contains("# admin token: readable and private")
    );
    assert!(!output.stdout.contains("admin-good"), "{}", output.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_permissions_can_be_allowed_explicitly() {
    let pki = Pki::new();
    let output = with_world_readable_token(&pki)
        .set("upstream", "allow_insecure_permissions", "true")
        .run_command("check-config")
        .await;
    assert_accepted(&output);
}

// ---- scheduling priority (runtime.nice) ----

/// Whether this process may raise its priority (root, or `CAP_SYS_NICE` in effect).
fn may_raise_priority() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        // CAP_SYS_NICE is capability 23.
        .is_some_and(|effective| effective & (1 << 23) != 0)
}

/// Runs the binary without `CAP_SYS_NICE` (and with `RLIMIT_NICE` 0), so that it cannot
/// raise its priority even as root.
const WITHOUT_SYS_NICE: [&str; 5] = [
    "prlimit",
    "--nice=0:0",
    "setpriv",
    "--bounding-set=-sys_nice",
    "--",
];

/// The nice value of each thread of process `pid` (`/proc/PID/task/*/stat`, field 19).
fn thread_nice_values(pid: u32) -> Vec<i64> {
    let mut values = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's tasks") {
        let stat = std::fs::read_to_string(task.expect("a task").path().join("stat"))
            .expect("a task's stat");
        // Fields after the command name (which may hold spaces) start at field 3.
        let after_name = &stat[stat.rfind(')').expect("stat has the name in parentheses") + 2..];
        let nice = after_name
            .split_whitespace()
            .nth(19 - 3)
            .and_then(|field| field.parse().ok())
            .expect("field 19 is the nice value");
        values.push(nice);
    }
    values
}

/// The value of one sample line of the sidecar's Prometheus text (panics when absent).
async fn metric(sidecar: &support::Sidecar, name: &str) -> f64 {
    let text = sidecar.metrics_text().await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// check-config tries the priority for real and says whether `run` would get it here.
#[tokio::test(flavor = "multi_thread")]
async fn check_config_says_whether_the_priority_can_be_raised_here() {
    let pki = Pki::new();
    let refused = valid(&pki)
        .wrapper(&WITHOUT_SYS_NICE)
        .run_command("check-config")
        .await;
    assert_accepted(&refused);
    assert!(
        refused.stdout.contains(
            "# scheduling priority: nice -5 (runtime.nice); NOT permitted here (needs root, \
             CAP_SYS_NICE or RLIMIT_NICE): would run at nice 0"
        ),
        "{}",
        refused.stdout
    );
    assert!(
        refused
            .stdout
            .contains("# busy polling: on (runtime.busy_poll = 1ms)"),
        "busy polling does not depend on the priority: {}",
        refused.stdout
    );
    // Lowering the priority is always permitted.
    let lowered = valid(&pki)
        .set("runtime", "nice", "7")
        .run_command("check-config")
        .await;
    assert_accepted(&lowered);
    assert!(
        lowered
            .stdout
            .contains("# scheduling priority: nice 7 (runtime.nice); permitted here"),
        "{}",
        lowered.stdout
    );
    if may_raise_priority() {
        let raised = valid(&pki).run_command("check-config").await;
        assert!(
            raised
                .stdout
                .contains("# scheduling priority: nice -5 (runtime.nice); permitted here"),
            "{}",
            raised.stdout
        );
    }
}

/// Every thread of the running sidecar, the event loops it starts included, runs at
/// `runtime.nice`; the metric says so.
#[tokio::test(flavor = "multi_thread")]
async fn every_thread_runs_at_runtime_nice() {
    let relay = support::Relay::builder().start().await;
    // Lowering the priority needs no privilege, so this part runs anywhere; raising it
    // (the default, -5) needs root or CAP_SYS_NICE.
    let mut cases: Vec<i32> = vec![7];
    if may_raise_priority() {
        cases.push(-5);
    }
    for nice in cases {
        let mut builder = support::Sidecar::builder()
            .relay(&relay)
            .set("runtime", "worker_threads", "2")
            .set("pool", "size", "2");
        if nice != -5 {
            builder = builder.set("runtime", "nice", &nice.to_string());
        }
        let sidecar = builder.start().await;
        sidecar.wait_ready().await;
        let pid = sidecar.pid().expect("the sidecar runs");
        let values = thread_nice_values(pid);
        assert!(
            values.len() >= 2,
            "the main thread and a second event loop: {values:?}"
        );
        assert!(
            values.iter().all(|&value| value == i64::from(nice)),
            "every thread at nice {nice}: {values:?}"
        );
        assert_eq!(
            metric(&sidecar, "sprint_sidecar_scheduling_nice").await,
            f64::from(nice)
        );
        assert!(sidecar.logs_contain("scheduling priority set (runtime.nice)"));
    }
}

/// Where the priority cannot be raised the sidecar starts anyway, at the nice it was given,
/// serves, and says why once.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_priority_costs_nothing_but_a_log_line() {
    let relay = support::Relay::builder().start().await;
    let sidecar = support::Sidecar::builder()
        .relay(&relay)
        .wrapper(&WITHOUT_SYS_NICE)
        .start()
        .await;
    sidecar.wait_ready().await;
    let answer = sidecar
        .client()
        .post(sidecar.data_url("/"))
        .body(r#"{"jsonrpc":"2.0","id":1}"#)
        .send()
        .await
        .expect("the sidecar answers");
    assert_eq!(answer.status(), 200);
    let pid = sidecar.pid().expect("the sidecar runs");
    assert!(
        thread_nice_values(pid).iter().all(|&value| value == 0),
        "{:?}",
        thread_nice_values(pid)
    );
    assert_eq!(
        metric(&sidecar, "sprint_sidecar_scheduling_nice").await,
        0.0
    );
    assert!(
        sidecar.logs_contain("runtime.nice not applied"),
        "{}",
        sidecar.logs().join("\n")
    );
}
