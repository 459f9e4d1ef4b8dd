//! The Helm chart (`charts/sprint-sidecar`) and the Dockerfile, checked offline.
//!
//! Tools come from `.tools/bin`, put there by `scripts/install-chart-tools.sh`: helm (v4),
//! kubernetes-validate (it ships the Kubernetes OpenAPI schemas), hadolint, and the tools' own
//! python3 with PyYAML, which turns `helm template` output into JSON for the assertions. A
//! missing tool fails the test with the command that installs it; nothing is skipped.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The oldest Kubernetes the chart supports (`kubeVersion: ">=1.29.0-0"`) and a recent one.
const KUBE_VERSIONS: [&str; 2] = ["1.29.0", "1.33.0"];

/// The values files every check runs over, besides the defaults.
const EXPECTED_CI_VALUES: [&str; 3] = [
    "classic-sidecar-values.yaml",
    "monitoring-on-values.yaml",
    "mtls-on-values.yaml",
];

const SIDECAR: &str = "sprint-sidecar";
const SECRET_MODE_0440: u64 = 0o440;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts").join("sprint-sidecar")
}

/// Scratch space under target/ (gitignored), shared by the tests of this file.
fn scratch_dir() -> PathBuf {
    let dir = repo().join("target").join("chart-test");
    fs::create_dir_all(&dir).expect("target/ is writable");
    dir
}

/// A tool from `.tools/bin`; a missing one fails with the fix.
fn tool(name: &str) -> PathBuf {
    let path = repo().join(".tools").join("bin").join(name);
    assert!(
        path.exists(),
        "{name} is missing at {}: run scripts/install-chart-tools.sh (.ci/run does) to install \
         helm, kubernetes-validate, hadolint and python3 with PyYAML into .tools/",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// helm with its config, cache and data directories under target/, so that the checks never
/// read or write the user's Helm setup, and with no kubeconfig, so that nothing can reach a
/// cluster.
fn helm() -> Command {
    let home = scratch_dir().join("helm-home");
    let mut cmd = Command::new(tool("helm"));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", home.join("no-kubeconfig"));
    cmd
}

/// The values variants: the defaults (None) and every `ci/*-values.yaml`.
fn variants() -> Vec<(String, Option<PathBuf>)> {
    let mut files: Vec<PathBuf> = fs::read_dir(chart_dir().join("ci"))
        .expect("charts/sprint-sidecar/ci exists")
        .map(|entry| entry.expect("ci/ is readable").path())
        .filter(|path| path.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    let names: BTreeSet<String> = files
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in EXPECTED_CI_VALUES {
        assert!(names.contains(expected), "ci/{expected} is missing");
    }
    let mut variants = vec![("default".to_owned(), None)];
    variants.extend(files.into_iter().map(|path| {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        (name, Some(path))
    }));
    variants
}

fn ci_values(name: &str) -> PathBuf {
    chart_dir().join("ci").join(name)
}

/// `helm template` of the chart: Ok(manifests) or Err(stderr).
fn helm_template(kube_version: &str, args: &[&str]) -> Result<String, String> {
    let output = run(helm()
        .args(["template", "demo"])
        .arg(chart_dir())
        .args(["--namespace", "demo", "--kube-version", kube_version])
        .args(args));
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        Err(text(&output.stderr))
    }
}

fn render(kube_version: &str, args: &[&str]) -> String {
    helm_template(kube_version, args)
        .unwrap_or_else(|stderr| panic!("helm template {args:?} failed:\n{stderr}"))
}

fn values_args(values: &Option<PathBuf>) -> Vec<String> {
    match values {
        Some(path) => vec!["--values".to_owned(), path.display().to_string()],
        None => Vec::new(),
    }
}

/// Multi-document YAML → JSON values, through PyYAML (the same parser kubernetes-validate uses).
fn yaml_documents(yaml: &str) -> Vec<Value> {
    const TO_JSON: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let mut child = Command::new(tool("python3"))
        .args(["-c", TO_JSON])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 from .tools starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(yaml.as_bytes())
        .expect("python3 reads the manifests");
    let output = child.wait_with_output().expect("python3 finishes");
    assert!(
        output.status.success(),
        "YAML did not parse:\n{}\n{yaml}",
        text(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout).expect("python3 printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// A rendered release, parsed.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    fn of(kube_version: &str, args: &[&str]) -> Self {
        Rendered {
            docs: yaml_documents(&render(kube_version, args)),
        }
    }

    fn variant(values: &Option<PathBuf>) -> Self {
        let args = values_args(values);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::of(KUBE_VERSIONS[0], &args)
    }

    fn kinds(&self) -> Vec<&str> {
        self.docs
            .iter()
            .map(|doc| doc["kind"].as_str().unwrap_or("?"))
            .collect()
    }

    fn find(&self, kind: &str) -> Option<&Value> {
        self.docs.iter().find(|doc| doc["kind"] == kind)
    }

    fn one(&self, kind: &str) -> &Value {
        self.find(kind)
            .unwrap_or_else(|| panic!("no {kind} rendered; kinds: {:?}", self.kinds()))
    }

    fn pod_spec(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["spec"]
    }

    fn pod_annotations(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    }

    fn sidecar_toml(&self) -> String {
        self.one("ConfigMap")["data"]["sidecar.toml"]
            .as_str()
            .expect("the ConfigMap has sidecar.toml")
            .to_owned()
    }
}

fn list<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {value}"))
}

fn named<'a>(items: &'a Value, name: &str) -> Option<&'a Value> {
    items
        .as_array()
        .and_then(|items| items.iter().find(|item| item["name"] == name))
}

/// The sidecar container wherever it is (initContainers or containers).
fn sidecar_container(pod: &Value) -> &Value {
    named(&pod["initContainers"], SIDECAR)
        .or_else(|| named(&pod["containers"], SIDECAR))
        .unwrap_or_else(|| panic!("no {SIDECAR} container in the pod: {pod}"))
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    named(&container["env"], name).and_then(|env| env["value"].as_str())
}

fn lines_of_toml_section(toml: &str, section: &str) -> Vec<String> {
    let header = format!("[{section}]");
    toml.lines()
        .skip_while(|line| line.trim() != header)
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with('['))
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

/// `key = value` in a TOML section, the value as written (an inline ` # comment` removed).
fn toml_value(toml: &str, section: &str, key: &str) -> Option<String> {
    lines_of_toml_section(toml, section)
        .into_iter()
        .find_map(|line| {
            let (k, v) = line.split_once('=')?;
            let v = v.split(" # ").next().unwrap_or_default();
            (k.trim() == key).then(|| v.trim().to_owned())
        })
}

#[test]
fn helm_lint_strict_passes_for_the_defaults_and_every_ci_values_file() {
    for (name, values) in variants() {
        let output = run(helm()
            .args(["lint", "--strict"])
            .arg(chart_dir())
            .args(values_args(&values)));
        assert!(
            output.status.success(),
            "helm lint --strict ({name}) failed:\n{}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
    }
}

#[test]
fn every_rendering_validates_strictly_against_kubernetes_1_29_and_1_33() {
    let out_dir = tempfile::tempdir_in(scratch_dir()).expect("temp dir");
    for kube_version in KUBE_VERSIONS {
        let mut files = Vec::new();
        for (name, values) in variants() {
            let args = values_args(&values);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let file = out_dir.path().join(format!("{kube_version}-{name}"));
            fs::write(&file, render(kube_version, &args)).expect("write the rendering");
            files.push(file);
        }
        let output = run(Command::new(tool("kubernetes-validate"))
            .args(["--strict", "-k", kube_version])
            .args(&files));
        let report = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(
            output.status.success() && !report.contains("ERROR"),
            "kubernetes-validate --strict -k {kube_version} failed:\n{report}"
        );
        for line in report.lines().filter(|line| line.starts_with("WARN")) {
            // Only the Prometheus Operator's CRD has no schema in kubernetes-validate; the
            // PodMonitor is checked by pod_monitor_scrapes_metrics_on_the_admin_port instead.
            assert!(
                line.contains("kind PodMonitor with api version monitoring.coreos.com/v1"),
                "unexpected warning from kubernetes-validate: {line}"
            );
        }
        let passed = report
            .lines()
            .filter(|line| line.starts_with("INFO") && line.contains("passed"))
            .count();
        let validated_deployments = report
            .lines()
            .filter(|line| line.contains("passed for resource deployment/"))
            .count();
        assert_eq!(
            validated_deployments,
            files.len(),
            "every variant's Deployment must be validated:\n{report}"
        );
        assert!(
            passed >= 2 * files.len(),
            "too little was validated:\n{report}"
        );
    }
}

#[test]
fn default_pod_runs_the_sidecar_as_a_native_init_container() {
    let rendered = Rendered::variant(&None);
    let pod = rendered.pod_spec();
    let init = named(&pod["initContainers"], SIDECAR).expect("sidecar in initContainers");
    assert_eq!(
        init["restartPolicy"], "Always",
        "a native sidecar restarts always"
    );
    assert!(
        named(&pod["containers"], SIDECAR).is_none(),
        "the native sidecar must not also be a regular container"
    );
    assert_eq!(
        init["args"],
        serde_json::json!(["run", "--config", "/etc/sprint-sidecar/config/sidecar.toml"])
    );
    assert_eq!(
        pod["enableServiceLinks"], false,
        "service links would inject SPRINT_SIDECAR_* variables"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace >= 30,
        "grace period {grace}s leaves no time for two drains"
    );
    assert!(
        init.get("lifecycle").is_none(),
        "a native sidecar stops after the app by itself; it needs no preStop delay"
    );
}

#[test]
fn classic_variant_runs_the_sidecar_as_a_second_container() {
    let values = Some(ci_values("classic-sidecar-values.yaml"));
    let rendered = Rendered::variant(&values);
    let pod = rendered.pod_spec();
    let sidecar = named(&pod["containers"], SIDECAR).expect("sidecar in containers");
    assert!(sidecar.get("restartPolicy").is_none());
    assert!(
        pod.get("initContainers").is_none() || named(&pod["initContainers"], SIDECAR).is_none(),
        "the classic sidecar must not be an init container"
    );
    assert!(named(&pod["containers"], "app").is_some());
    // The preStop sleep action exists from Kubernetes 1.30: none on 1.29, 15 s (the ci
    // values) on 1.33.
    assert!(
        sidecar.get("lifecycle").is_none(),
        "1.29 has no sleep action"
    );
    let args = ["--values", values.as_ref().unwrap().to_str().unwrap()];
    let newer = Rendered::of(KUBE_VERSIONS[1], &args);
    let sidecar = sidecar_container(newer.pod_spec());
    assert_eq!(sidecar["lifecycle"]["preStop"]["sleep"]["seconds"], 15);
}

#[test]
fn probes_hit_health_and_ready_on_the_admin_port() {
    for (name, values) in variants() {
        let rendered = Rendered::variant(&values);
        let sidecar = sidecar_container(rendered.pod_spec());
        let admin_port = named(&sidecar["ports"], "sidecar-admin")
            .unwrap_or_else(|| panic!("{name}: no sidecar-admin port"))["containerPort"]
            .as_u64()
            .unwrap();
        assert_eq!(admin_port, 9091, "{name}");
        for (probe, path) in [
            ("startupProbe", "/health"),
            ("livenessProbe", "/health"),
            ("readinessProbe", "/ready"),
        ] {
            let get = &sidecar[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name}: {probe}");
            assert_eq!(get["port"], admin_port, "{name}: {probe} port");
        }
        let ports = list(&sidecar["ports"], "ports");
        assert_eq!(
            ports.len(),
            1,
            "{name}: only the admin port is declared; the data port is loopback-only"
        );
    }
    // The probes follow the admin port.
    let moved = Rendered::of(KUBE_VERSIONS[0], &["--set", "sidecar.ports.admin=19091"]);
    let sidecar = sidecar_container(moved.pod_spec());
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["port"], 19091);
    assert_eq!(
        toml_value(&moved.sidecar_toml(), "admin", "address").as_deref(),
        Some("\"0.0.0.0:19091\"")
    );
}

#[test]
fn app_container_gets_rust_pool_url_pointing_at_the_data_port() {
    for (name, values) in variants() {
        let rendered = Rendered::variant(&values);
        let app = named(&rendered.pod_spec()["containers"], "app").expect("app container");
        assert_eq!(
            env_value(app, "RUST_POOL_URL"),
            Some("http://127.0.0.1:9090"),
            "{name}"
        );
        assert_eq!(
            toml_value(&rendered.sidecar_toml(), "listener", "address").as_deref(),
            Some("\"127.0.0.1:9090\""),
            "{name}: the data listener is loopback-only"
        );
    }
    let moved = Rendered::of(KUBE_VERSIONS[0], &["--set", "sidecar.ports.data=19090"]);
    let app = named(&moved.pod_spec()["containers"], "app").unwrap();
    assert_eq!(
        env_value(app, "RUST_POOL_URL"),
        Some("http://127.0.0.1:19090")
    );
    assert_eq!(
        toml_value(&moved.sidecar_toml(), "listener", "address").as_deref(),
        Some("\"127.0.0.1:19090\"")
    );
}

#[test]
fn secret_mounts_are_read_only_0440_and_readable_through_fs_group() {
    let rendered = Rendered::variant(&Some(ci_values("mtls-on-values.yaml")));
    let pod = rendered.pod_spec();
    let sidecar = sidecar_container(pod);
    let fs_group = pod["securityContext"]["fsGroup"].as_u64().expect("fsGroup");
    assert_eq!(
        fs_group, 65532,
        "Secret files are group-owned by fsGroup: the sidecar reads them through it"
    );

    let volumes = list(&pod["volumes"], "volumes");
    let secret_volumes: Vec<&Value> = volumes
        .iter()
        .filter(|v| v.get("secret").is_some())
        .collect();
    let names: BTreeSet<&str> = secret_volumes
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "sprint-sidecar-admin-token",
            "sprint-sidecar-client-tls",
            "sprint-sidecar-relay-token"
        ])
    );
    for volume in &secret_volumes {
        let name = volume["name"].as_str().unwrap();
        assert_eq!(
            volume["secret"]["defaultMode"], SECRET_MODE_0440,
            "{name}: 0440"
        );
        assert!(
            volume["secret"]["items"].is_array(),
            "{name}: only the named keys are projected"
        );
        let mount = named(&sidecar["volumeMounts"], name)
            .unwrap_or_else(|| panic!("{name} is not mounted in the sidecar"));
        assert_eq!(mount["readOnly"], true, "{name}");
        assert!(
            mount.get("subPath").is_none(),
            "{name}: subPath mounts never update"
        );
    }
    // Only the sidecar sees the secrets.
    let app = named(&pod["containers"], "app").unwrap();
    assert!(
        app.get("volumeMounts").is_none(),
        "the app mounts nothing: {app}"
    );
    for mount in list(&sidecar["volumeMounts"], "volumeMounts") {
        assert_eq!(mount["readOnly"], true, "{mount}");
    }

    // The paths in sidecar.toml are the mounted files, and the permission check is relaxed
    // exactly where group-readable Secret files are mounted.
    let toml = rendered.sidecar_toml();
    for (section, key, path) in [
        (
            "upstream",
            "auth_token_file",
            "/etc/sprint-sidecar/relay-token/token",
        ),
        (
            "upstream",
            "client_cert_file",
            "/etc/sprint-sidecar/client-tls/tls.crt",
        ),
        (
            "upstream",
            "client_key_file",
            "/etc/sprint-sidecar/client-tls/tls.key",
        ),
        ("upstream", "ca_file", "/etc/sprint-sidecar/ca/ca.crt"),
        (
            "admin",
            "token_file",
            "/etc/sprint-sidecar/admin-token/token",
        ),
    ] {
        assert_eq!(
            toml_value(&toml, section, key),
            Some(format!("\"{path}\"")),
            "[{section}] {key}\n{toml}"
        );
        let mount_dir = Path::new(path).parent().unwrap().to_str().unwrap();
        assert!(
            list(&sidecar["volumeMounts"], "volumeMounts")
                .iter()
                .any(|m| m["mountPath"] == mount_dir),
            "{path} is not under a mount"
        );
    }
    for section in ["upstream", "admin"] {
        assert_eq!(
            toml_value(&toml, section, "allow_insecure_permissions").as_deref(),
            Some("true"),
            "[{section}] mounts 0440 Secret files\n{toml}"
        );
    }
    let ca = named(&pod["volumes"], "sprint-sidecar-ca").expect("CA volume");
    assert_eq!(ca["configMap"]["name"], "relay-ca");

    // Without Secrets nothing is relaxed.
    let plain = Rendered::variant(&None).sidecar_toml();
    for section in ["upstream", "admin"] {
        assert_eq!(
            toml_value(&plain, section, "allow_insecure_permissions").as_deref(),
            Some("false"),
            "[{section}]\n{plain}"
        );
    }
    assert_eq!(toml_value(&plain, "upstream", "auth_token_file"), None);
}

#[test]
fn both_containers_run_with_a_hardened_security_context() {
    for (name, values) in variants() {
        let rendered = Rendered::variant(&values);
        let pod = rendered.pod_spec();
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        let app = named(&pod["containers"], "app").unwrap();
        for container in [sidecar_container(pod), app] {
            let who = format!("{name}: {}", container["name"]);
            let security = &container["securityContext"];
            assert_eq!(security["runAsNonRoot"], true, "{who}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{who}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{who}");
            assert_eq!(
                security["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{who}"
            );
            assert!(
                security["capabilities"].get("add").is_none(),
                "{who}: no capability added"
            );
            assert_eq!(
                security["seccompProfile"]["type"], "RuntimeDefault",
                "{who}"
            );
        }
        let sidecar = sidecar_container(pod);
        assert_eq!(sidecar["securityContext"]["runAsUser"], 65532, "{name}");
        assert!(
            sidecar["resources"]["requests"].is_object()
                && sidecar["resources"]["limits"]["memory"].is_string(),
            "{name}: sidecar resources"
        );
    }
}

#[test]
fn lock_all_adds_ipc_lock_and_allows_privilege_escalation() {
    let rendered = Rendered::of(
        KUBE_VERSIONS[0],
        &["--set", "sidecar.config.memory.lock_all=true"],
    );
    let pod = rendered.pod_spec();
    let security = &sidecar_container(pod)["securityContext"];
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["IPC_LOCK"])
    );
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["allowPrivilegeEscalation"], true,
        "file capabilities are ignored under no_new_privs"
    );
    assert_eq!(security["runAsNonRoot"], true);
    let app = named(&pod["containers"], "app").unwrap();
    assert!(
        app["securityContext"]["capabilities"].get("add").is_none(),
        "only the sidecar gets IPC_LOCK"
    );
    assert_eq!(
        toml_value(&rendered.sidecar_toml(), "memory", "lock_all").as_deref(),
        Some("true")
    );
}

#[test]
fn config_checksum_annotation_changes_with_the_config() {
    let checksum = |args: &[&str]| -> String {
        let rendered = Rendered::of(KUBE_VERSIONS[0], args);
        let sum = rendered.pod_annotations()["checksum/config"]
            .as_str()
            .expect("checksum/config annotation")
            .to_owned();
        assert!(
            sum.len() == 64 && sum.chars().all(|c| c.is_ascii_hexdigit()),
            "not a sha256: {sum}"
        );
        sum
    };
    let default = checksum(&[]);
    assert_eq!(default, checksum(&[]), "the checksum is stable");
    assert_ne!(default, checksum(&["--set", "sidecar.config.pool.size=8"]));
    assert_ne!(
        default,
        checksum(&["--set", "sidecar.secrets.relayToken.secretName=token"])
    );
    assert_eq!(
        default,
        checksum(&["--set", "example.replicas=3"]),
        "non-config values must not roll the pods"
    );
}

#[test]
fn rendered_sidecar_toml_has_every_section_and_the_values() {
    let rendered = Rendered::of(
        KUBE_VERSIONS[0],
        &[
            "--set",
            "sidecar.config.pool.size=7",
            "--set",
            "sidecar.config.upstream.server_name=relay.example",
            // --set turns only integers into numbers; a float needs --set-json.
            "--set-json",
            "sidecar.config.breaker.failure_rate=0.25",
        ],
    );
    let toml = rendered.sidecar_toml();
    for section in [
        "listener", "admin", "upstream", "pool", "breaker", "retry", "memory", "log", "runtime",
    ] {
        assert!(
            toml.lines()
                .any(|line| line.trim() == format!("[{section}]")),
            "[{section}] missing:\n{toml}"
        );
    }
    assert_eq!(toml_value(&toml, "pool", "size").as_deref(), Some("7"));
    assert_eq!(
        toml_value(&toml, "upstream", "server_name").as_deref(),
        Some("\"relay.example\"")
    );
    assert_eq!(
        toml_value(&toml, "breaker", "failure_rate").as_deref(),
        Some("0.25")
    );
    assert_eq!(
        toml_value(&toml, "listener", "max_body_bytes").as_deref(),
        Some("16777216"),
        "large integers stay integers"
    );
    assert_eq!(
        toml_value(&toml, "upstream", "alpn").as_deref(),
        Some("[\"h2\",\"http/1.1\"]")
    );
    assert_eq!(
        toml_value(&toml, "memory", "wipe_freed_memory").as_deref(),
        Some("true")
    );
    assert_eq!(
        toml_value(&toml, "admin", "ready_requires_upstream").as_deref(),
        Some("false")
    );
}

/// `sprint-sidecar check-config` on a rendered sidecar.toml, with the Secret files laid out the
/// way the kubelet mounts them (mode 0440) under `root` instead of /etc/sprint-sidecar.
fn check_config_in_simulated_pod(root: &Path, toml: &str, pem: &TestPki) -> Output {
    let toml = toml.replace("/etc/sprint-sidecar/", &format!("{}/", root.display()));
    for line in toml.lines() {
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        if !key.ends_with("_file") {
            continue;
        }
        let path = PathBuf::from(value.trim().trim_matches('"'));
        let content = match key {
            "auth_token_file" => "Bearer chart-test-relay-token\n",
            "token_file" => "chart-test-admin-token\n",
            "client_cert_file" | "ca_file" => pem.cert.as_str(),
            "client_key_file" => pem.key.as_str(),
            other => panic!("the chart renders a file key this test does not know: {other}"),
        };
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(SECRET_MODE_0440 as u32)).unwrap();
    }
    let config = root.join("sidecar.toml");
    fs::create_dir_all(root).unwrap();
    fs::write(&config, &toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sprint-sidecar"));
    cmd.arg("check-config").arg("--config").arg(&config);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SPRINT_SIDECAR_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd)
}

/// A self-signed certificate and its key, made at run time (no files, no expiry to rot).
struct TestPki {
    cert: String,
    key: String,
}

impl TestPki {
    fn new() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["relay.internal.example".into()])
            .expect("rcgen makes a self-signed certificate");
        TestPki {
            cert: certified.cert.pem(),
            key: certified.signing_key.serialize_pem(),
        }
    }
}

/// The binary itself accepts what the chart renders: every key known, every type and duration
/// right, and the mounted Secret files (0440, as the kubelet leaves them with fsGroup) accepted
/// because the chart renders allow_insecure_permissions = true for them.
#[test]
fn rendered_sidecar_toml_passes_check_config() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir_in(scratch_dir()).expect("temp dir");
    for (name, values) in variants() {
        let toml = Rendered::variant(&values).sidecar_toml();
        let output = check_config_in_simulated_pod(&dir.path().join(&name), &toml, &pki);
        assert!(
            output.status.success(),
            "sprint-sidecar check-config rejects the chart's sidecar.toml ({name}):\n{}{}\n{toml}",
            text(&output.stdout),
            text(&output.stderr)
        );
    }

    // Why the chart relaxes the check: the same files without it are refused.
    let toml = Rendered::variant(&Some(ci_values("mtls-on-values.yaml"))).sidecar_toml();
    let strict = toml.replace(
        "allow_insecure_permissions = true",
        "allow_insecure_permissions = false",
    );
    assert_ne!(strict, toml);
    let output = check_config_in_simulated_pod(&dir.path().join("strict"), &strict, &pki);
    assert!(
        !output.status.success(),
        "0440 secret files must be refused without allow_insecure_permissions"
    );
    assert!(
        text(&output.stderr).contains("allow_insecure_permissions"),
        "the refusal names the way out: {}",
        text(&output.stderr)
    );
}

#[test]
fn schema_rejects_bad_values() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "sidecar.ports.data=notaport"],
            "/sidecar/ports/data",
        ),
        (
            &["--set", "sidecar.ports.admin=70000"],
            "/sidecar/ports/admin",
        ),
        (&["--set", "sidecar.bogus=1"], "bogus"),
        (&["--set", "sidecar.config.pool.sise=4"], "sise"),
        (
            &["--set", "sidecar.config.listener.address=0.0.0.0:9090"],
            "address",
        ),
        (
            &["--set", "sidecar.config.pool.connect_timeout=3"],
            "connect_timeout",
        ),
        (
            &["--set", "sidecar.config.pool.connect_timeout=soon"],
            "connect_timeout",
        ),
        (
            &["--set", "sidecar.config.pool.size=0"],
            "/sidecar/config/pool/size",
        ),
        (&["--set", "sidecar.config.log.format=xml"], "format"),
        (&["--set", "sidecar.native=yes please"], "native"),
        (
            &[
                "--set",
                "sidecar.ca.configMapName=a",
                "--set",
                "sidecar.ca.secretName=b",
            ],
            "/sidecar/ca",
        ),
        (
            &["--set", "sidecar.secrets.relayToken.secretName=Not_A_Name"],
            "secretName",
        ),
        // Values the sidecar itself would refuse at start (check-config's ranges).
        (
            &["--set", "sidecar.config.pool.size=257"],
            "/sidecar/config/pool/size",
        ),
        (
            &["--set", "sidecar.config.retry.max_attempts=11"],
            "max_attempts",
        ),
        (
            &["--set", "sidecar.config.retry.budget_ratio=2"],
            "budget_ratio",
        ),
        (
            &["--set", "sidecar.config.pool.connect_timeout=0s"],
            "connect_timeout",
        ),
        (
            &["--set", "sidecar.config.upstream.endpoint=relay:0"],
            "endpoint",
        ),
        (
            &["--set", "sidecar.config.upstream.endpoint=relay:65536"],
            "endpoint",
        ),
        (&["--set", "sidecar.config.log.level=verbose"], "level"),
        (
            &[
                "--set",
                "sidecar.config.upstream.auth_header=content-length",
            ],
            "auth_header",
        ),
    ];
    for (args, mentions) in cases {
        let stderr = match helm_template(KUBE_VERSIONS[0], args) {
            Ok(_) => panic!("helm template {args:?} should fail the schema"),
            Err(stderr) => stderr,
        };
        assert!(
            stderr.contains("schema") && stderr.contains(mentions),
            "helm template {args:?}: expected a schema error naming {mentions:?}, got:\n{stderr}"
        );
    }
    // ... and accepts what the sidecar accepts.
    for args in [
        &["--set", "sidecar.config.listener.drain_timeout=0s"][..],
        &["--set", "sidecar.config.pool.connect_timeout=1.5s"],
        &["--set", "sidecar.config.log.level=DEBUG"],
        &[
            "--set",
            "sidecar.config.log.level=info\\,sprint_sidecar=debug",
        ],
        &["--set-json", "sidecar.config.breaker.failure_rate=0"],
        &["--set", "sidecar.config.pool.slow_ejection_ratio=1"],
        &["--set", "sidecar.config.upstream.endpoint=relay:65535"],
    ] {
        if let Err(stderr) = helm_template(KUBE_VERSIONS[0], args) {
            panic!("helm template {args:?} should pass the schema:\n{stderr}");
        }
    }
    // Same port twice passes the schema but not the chart, also without the example pod
    // (the ConfigMap alone would hold a configuration the sidecar refuses).
    for extra in [&[][..], &["--set", "example.enabled=false"]] {
        let mut args = vec!["--set", "sidecar.ports.admin=9090"];
        args.extend_from_slice(extra);
        let stderr = helm_template(KUBE_VERSIONS[0], &args).expect_err("equal ports must fail");
        assert!(stderr.contains("must be different ports"), "{stderr}");
    }
    // A token variable no env entry sets would stop the sidecar at start.
    let stderr = helm_template(
        KUBE_VERSIONS[0],
        &[
            "--set",
            "sidecar.config.upstream.auth_token_env=RELAY_TOKEN",
        ],
    )
    .expect_err("an unset token variable must fail");
    assert!(
        stderr.contains("auth_token_env") && stderr.contains("sidecar.env"),
        "{stderr}"
    );
    render(
        KUBE_VERSIONS[0],
        &[
            "--set",
            "sidecar.config.upstream.auth_token_env=RELAY_TOKEN",
            "--set",
            "sidecar.env[0].name=RELAY_TOKEN",
            "--set",
            "sidecar.env[0].valueFrom.secretKeyRef.name=relay",
            "--set",
            "sidecar.env[0].valueFrom.secretKeyRef.key=token",
        ],
    );
    // Kubernetes older than native sidecars is refused.
    let stderr = helm_template("1.28.0", &[]).expect_err("1.28 must be refused");
    assert!(stderr.contains("kubeVersion"), "{stderr}");
}

#[test]
fn pod_monitor_scrapes_metrics_on_the_admin_port() {
    let rendered = Rendered::variant(&Some(ci_values("monitoring-on-values.yaml")));
    let monitor = rendered.one("PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let endpoint = &list(
        &monitor["spec"]["podMetricsEndpoints"],
        "podMetricsEndpoints",
    )[0];
    assert_eq!(endpoint["port"], "sidecar-admin");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
    // It selects the pods that carry the port.
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let pod_labels = &rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector {
        assert_eq!(&pod_labels[key], value, "pod label {key}");
    }
    assert!(
        named(
            &sidecar_container(rendered.pod_spec())["ports"],
            "sidecar-admin"
        )
        .is_some()
    );
    let service = rendered.one("Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert!(
        Rendered::variant(&None).find("PodMonitor").is_none(),
        "off by default"
    );
}

/// The parent chart of README.md ("Use it in your own chart"), taken from the README itself,
/// renders and validates: the named templates work through `.Subcharts`.
#[test]
fn named_templates_work_from_a_parent_chart() {
    let readme = fs::read_to_string(chart_dir().join("README.md")).expect("chart README");
    let section = &readme[readme
        .find("## Use it in your own chart")
        .expect("README has the section")..];
    let block_after = |label: &str| -> String {
        let start = section
            .find(label)
            .unwrap_or_else(|| panic!("README section lacks {label}"));
        let rest = &section[start..];
        let open = rest.find("```yaml\n").expect("a yaml block follows") + "```yaml\n".len();
        let close = rest[open..].find("```").expect("the block ends");
        rest[open..open + close].to_owned()
    };

    let parent = tempfile::tempdir_in(scratch_dir()).expect("temp dir");
    let root = parent.path().join("my-app");
    fs::create_dir_all(root.join("templates")).unwrap();
    fs::write(
        root.join("Chart.yaml"),
        format!(
            "apiVersion: v2\nname: my-app\nversion: 1.0.0\n{}",
            block_after("`Chart.yaml`:")
        ),
    )
    .unwrap();
    fs::write(root.join("values.yaml"), block_after("`values.yaml`:")).unwrap();
    fs::write(
        root.join("templates").join("deployment.yaml"),
        block_after("`templates/deployment.yaml`:"),
    )
    .unwrap();
    copy_dir(&chart_dir(), &root.join("charts").join("sprint-sidecar"));

    let output = run(helm()
        .args(["template", "shop"])
        .arg(&root)
        .args(["--kube-version", KUBE_VERSIONS[0]]));
    assert!(
        output.status.success(),
        "the README's parent chart does not render:\n{}",
        text(&output.stderr)
    );
    let manifests = text(&output.stdout);
    let file = parent.path().join("rendered.yaml");
    fs::write(&file, &manifests).unwrap();
    for kube_version in KUBE_VERSIONS {
        let validation = run(Command::new(tool("kubernetes-validate"))
            .args(["--strict", "-k", kube_version])
            .arg(&file));
        assert!(
            validation.status.success(),
            "{}\n{manifests}",
            text(&validation.stdout)
        );
    }

    let docs = yaml_documents(&manifests);
    let deployments: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Deployment").collect();
    assert_eq!(
        deployments.len(),
        1,
        "only the parent's Deployment (example off)"
    );
    let deployment = deployments[0];
    assert_eq!(deployment["metadata"]["name"], "shop-my-app");
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = named(&pod["initContainers"], SIDECAR).expect("sidecar in initContainers");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(
        sidecar["image"], "registry.example/sprint-sidecar:0.1.0",
        "the tag defaults to the subchart's appVersion"
    );
    let app = named(&pod["containers"], "my-app").expect("the parent's app container");
    assert_eq!(
        env_value(app, "RUST_POOL_URL"),
        Some("http://127.0.0.1:9090")
    );
    let config_map = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the subchart still renders its ConfigMap");
    let config_volume = named(&pod["volumes"], "sprint-sidecar-config").unwrap();
    assert_eq!(
        config_volume["configMap"]["name"], config_map["metadata"]["name"],
        "the pod mounts the subchart's ConfigMap"
    );
    let token = named(&pod["volumes"], "sprint-sidecar-relay-token").expect("token volume");
    assert_eq!(token["secret"]["secretName"], "relay-token");
    assert_eq!(token["secret"]["defaultMode"], SECRET_MODE_0440);
    let checksum = &deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"];
    assert_eq!(checksum.as_str().map(str::len), Some(64));
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let dockerfile = repo().join("Dockerfile");
    let output = run(Command::new(tool("hadolint"))
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(&dockerfile));
    assert!(
        output.status.success(),
        "hadolint found problems:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );

    // What the issue asks of the image, which hadolint does not check.
    let text = fs::read_to_string(&dockerfile).unwrap();
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage build");
    assert!(
        !instructions.iter().any(|l| l.starts_with("HEALTHCHECK")),
        "no HEALTHCHECK: Kubernetes probes do that"
    );
    assert!(
        instructions.contains(&"USER 65532:65532"),
        "numeric non-root user"
    );
    assert!(
        instructions.contains(&"EXPOSE 9090 9091"),
        "both ports exposed"
    );
    assert!(
        instructions.contains(&"FROM scratch AS image-base"),
        "minimal final stage"
    );
    assert!(
        froms.last().unwrap().starts_with("FROM image-base"),
        "the default (last) stage is built on the scratch base"
    );
}

/// Every key of the repository's sidecar.toml can be set through the chart, either as a value
/// under `sidecar.config` (listed in values.yaml and allowed by the schema) or as a key the
/// chart derives itself; and the chart offers no key the binary does not know.
#[test]
fn chart_values_cover_every_sidecar_toml_key() {
    const CHART_OWNED: [(&str, &str); 9] = [
        ("listener", "address"),
        ("admin", "address"),
        ("admin", "token_file"),
        ("admin", "allow_insecure_permissions"),
        ("upstream", "ca_file"),
        ("upstream", "client_cert_file"),
        ("upstream", "client_key_file"),
        ("upstream", "auth_token_file"),
        ("upstream", "allow_insecure_permissions"),
    ];
    let documented = fs::read_to_string(repo().join("sidecar.toml")).expect("sidecar.toml");
    let mut binary_keys = BTreeSet::new();
    let mut section = String::new();
    for line in documented.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix('[') {
            section = rest.split(']').next().unwrap_or_default().trim().to_owned();
        } else if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !line.starts_with('#')
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                binary_keys.insert((section.clone(), key.to_owned()));
            }
        }
    }
    assert!(
        binary_keys.len() > 30,
        "sidecar.toml parsed to {binary_keys:?}"
    );

    let schema: Value = serde_json::from_str(
        &fs::read_to_string(chart_dir().join("values.schema.json")).expect("values.schema.json"),
    )
    .expect("values.schema.json is JSON");
    let sections = schema["properties"]["sidecar"]["properties"]["config"]["properties"]
        .as_object()
        .expect("the schema describes sidecar.config");
    let mut chart_keys: BTreeSet<(String, String)> = CHART_OWNED
        .iter()
        .map(|(s, k)| (s.to_string(), k.to_string()))
        .collect();
    for (section, spec) in sections {
        assert_eq!(
            spec["additionalProperties"], false,
            "[{section}] rejects typos"
        );
        for key in spec["properties"].as_object().expect("properties").keys() {
            chart_keys.insert((section.clone(), key.clone()));
        }
    }
    let missing: Vec<_> = binary_keys.difference(&chart_keys).collect();
    let unknown: Vec<_> = chart_keys.difference(&binary_keys).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "sidecar.toml and the chart disagree; add to values.yaml and values.schema.json: \
         {missing:?}; remove from them: {unknown:?}"
    );

    // values.yaml sets every key the schema allows, so it documents them all.
    let rendered = Rendered::variant(&None).sidecar_toml();
    for (section, key) in &chart_keys {
        let owned = CHART_OWNED.contains(&(section.as_str(), key.as_str()));
        let is_file_key = key.ends_with("_file");
        if !(owned && is_file_key) {
            assert!(
                toml_value(&rendered, section, key).is_some(),
                "the default rendering lacks [{section}] {key}"
            );
        }
    }
}
