//! End to end, real binary, real TLS: what the app sends to the data listener reaches the
//! relay as SPEC §5 says (path and query unchanged, Host rewritten, hop-by-hop headers gone,
//! bodies byte-exact both ways), and bad input or a bad relay certificate gets a JSON error.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use support::{
    PatternBody, Proto, Relay, Sidecar, SidecarBuilder, assert_json_error, pattern_mismatch,
};
use tokio::task::JoinSet;

const TEN_MIB: u64 = 10 * 1024 * 1024;

/// A relay speaking `protocol` and a ready sidecar in front of it.
async fn start(
    protocol: Proto,
    configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) -> (Relay, Sidecar) {
    let relay = Relay::builder().protocol(protocol).start().await;
    let sidecar = configure(Sidecar::builder().relay(&relay)).start().await;
    sidecar.wait_ready().await;
    (relay, sidecar)
}

/// Checks that an authority (`relay.test` or `relay.test:PORT`) names the relay.
fn assert_names_relay(authority: Option<&str>, relay: &Relay) {
    let authority = authority.expect("the relay saw an authority (Host or :authority)");
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    assert_eq!(
        host,
        relay.server_name(),
        "Host/:authority must be the relay's name: {authority:?}"
    );
    if let Some(port) = port {
        assert_eq!(
            port,
            relay.addr().port().to_string(),
            "port of {authority:?}"
        );
    }
}

// ---- concurrency ----

async fn answers_hundreds_of_concurrent_requests(protocol: Proto, workers: Option<&str>) {
    // Correctness under concurrency, not latency: on a loaded CI machine 400 requests over
    // four HTTP/1.1 connections can queue for longer than the default request_timeout.
    let (relay, sidecar) = start(protocol, |sidecar| {
        let sidecar = sidecar
            .pool_size(4)
            .set_str("pool", "request_timeout", "60s");
        match workers {
            Some(n) => sidecar.set("runtime", "worker_threads", n),
            None => sidecar,
        }
    })
    .await;
    let client = support::client();
    let mut tasks = JoinSet::new();
    for i in 0..400u64 {
        let client = client.clone();
        let rpc_url = sidecar.data_url("/");
        let get_url = sidecar.data_url(&format!("/items/{i}?n={i}"));
        tasks.spawn(async move {
            if i % 2 == 0 {
                let call = serde_json::json!({
                    "jsonrpc": "2.0", "id": i, "method": "getblock", "params": [i]
                });
                let response = client.post(rpc_url).json(&call).send().await?;
                let status = response.status().as_u16();
                let answer: serde_json::Value = response.json().await?;
                if status != 200 || answer["id"] != i || answer["result"]["params"][0] != i {
                    return Err(format!("POST {i}: {status} {answer}").into());
                }
            } else {
                let response = client.get(get_url).send().await?;
                let status = response.status().as_u16();
                let seen: serde_json::Value = response.json().await?;
                let expected = format!("/items/{i}?n={i}");
                if status != 200 || seen["target"] != expected.as_str() {
                    return Err(format!("GET {i}: {status} {seen}").into());
                }
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        });
    }
    let mut failures = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        if let Err(error) = outcome.expect("request task does not panic") {
            failures.push(error.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 400 failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        relay.request_count(),
        400,
        "each request reached the relay exactly once"
    );
    assert!(
        relay.tls_accepted() <= 4,
        "the relay saw {} TLS connections for pool.size = 4",
        relay.tls_accepted()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_hundreds_of_concurrent_requests_over_h2() {
    answers_hundreds_of_concurrent_requests(Proto::H2, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_hundreds_of_concurrent_requests_over_http1() {
    answers_hundreds_of_concurrent_requests(Proto::Http1, None).await;
}

/// `runtime.worker_threads = 4`: four event loops (more than this machine may have cores),
/// each with its share of the clients and one of the four relay connections; a loop whose
/// connection is busy borrows another loop's.
#[tokio::test(flavor = "multi_thread")]
async fn answers_hundreds_of_concurrent_requests_on_four_worker_threads_over_h2() {
    answers_hundreds_of_concurrent_requests(Proto::H2, Some("4")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_hundreds_of_concurrent_requests_on_four_worker_threads_over_http1() {
    answers_hundreds_of_concurrent_requests(Proto::Http1, Some("4")).await;
}

/// Starts a sidecar configured by `configure`, proxies one request through it and returns
/// the threads its process has then: those that run event loops (every thread but the
/// spinners) and busy polling's spinners (`sidecar-spin`).
async fn threads_after_a_request(
    configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) -> (usize, usize) {
    let (_relay, sidecar) = start(Proto::H2, configure).await;
    let answer = sidecar
        .client()
        .get(sidecar.data_url("/threads"))
        .send()
        .await
        .expect("answered");
    assert_eq!(answer.status(), 200);
    let threads = thread_policies(sidecar.pid().expect("running"));
    let spinners = spinner_count(&threads);
    (threads.len() - spinners, spinners)
}

/// The `Max open files` soft and hard limits of a process, from `/proc/PID/limits`.
fn open_files_limits(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// Started with a soft open-files limit of 64 (a shell's `ulimit -n` is often 1024), the
/// sidecar raises it to the hard limit so `listener.max_connections` clients fit.
#[tokio::test(flavor = "multi_thread")]
async fn a_low_open_files_limit_is_raised_for_max_connections() {
    let (_, hard) = open_files_limits("self");
    let nofile = format!("--nofile=64:{hard}");
    let (_relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar
            .set("listener", "max_connections", "1000")
            .wrapper(&["prlimit", nofile.as_str()])
    })
    .await;
    let pid = sidecar.pid().expect("the sidecar runs").to_string();
    let (soft, _) = open_files_limits(&pid);
    if hard >= 1000 + 2 * 4 + 256 {
        assert_eq!(
            soft,
            hard.min(1 << 20),
            "raised to the hard limit:\n{}",
            sidecar.logs().join("\n")
        );
        assert!(sidecar.logs_contain("raised the open-files limit"));
    } else {
        assert!(sidecar.logs_contain("open-files limit is below listener.max_connections"));
    }
    let status = sidecar
        .client()
        .get(sidecar.data_url("/after-raise"))
        .send()
        .await
        .expect("answered")
        .status();
    assert_eq!(status, 200);
}

/// `runtime.worker_threads = N` runs N event loops: the main thread's and N - 1 threads.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_worker_threads_decides_the_threads_of_the_process() {
    assert_eq!(
        threads_after_a_request(|sidecar| sidecar).await,
        (1, 1),
        "one event loop on the main thread, and its busy-polling spinner"
    );
    assert_eq!(
        threads_after_a_request(|sidecar| sidecar.set("runtime", "worker_threads", "3")).await,
        (3, 3),
        "the main thread's loop and two more, a spinner each"
    );
    assert_eq!(
        threads_after_a_request(|sidecar| sidecar.set_str("runtime", "busy_poll", "0s")).await,
        (1, 0),
        "without busy polling the whole process is one thread"
    );
}

/// CPU time (user + system) the process has used, in clock ticks, from `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').expect("a stat line").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The share of one core the process used over `window`, in percent.
async fn cpu_percent_over(pid: u32, window: Duration) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(pid);
    tokio::time::sleep(window).await;
    (cpu_ticks(pid) - before) as f64 / ticks_per_second / window.as_secs_f64() * 100.0
}

/// Sends `n` GETs at once and asserts that every one is answered 200.
async fn concurrent_gets_all_answered_200(sidecar: &Sidecar, n: usize) {
    let client = support::client();
    let mut burst = JoinSet::new();
    for _ in 0..n {
        let (client, url) = (client.clone(), sidecar.data_url("/"));
        burst.spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(done) = burst.join_next().await {
        assert_eq!(done.expect("no panic").expect("answered"), 200);
    }
}

/// Bursts of 200 concurrent requests until the sidecar's loop has spun through a sleep
/// (its spinner runs only on an otherwise idle core, so a machine busy with other tests may
/// take a few bursts); returns the spin count.
async fn load_until_spun(sidecar: &Sidecar) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        concurrent_gets_all_answered_200(sidecar, 200).await;
        let spins = sidecar.metric("sprint_sidecar_busy_poll_spins_total").await;
        if spins > 0.0 {
            return spins;
        }
        assert!(
            Instant::now() < deadline,
            "30 s of bursts of 200 concurrent requests and busy polling never spun"
        );
    }
}

/// The scheduling policies of a process's threads by name (`/proc/PID/task/*/stat`, field
/// 41: 0 normal, 5 idle).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the sidecar runs") {
        let path = task.expect("a task").path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
        // Fields from the state (3rd) on: the policy (41st) is at index 38.
        let policy = after_name
            .split(' ')
            .nth(38)
            .and_then(|p| p.parse().ok())
            .expect("a policy field");
        threads.push((name.trim().to_owned(), policy));
    }
    threads
}

/// Busy polling's spinner threads (`sidecar-spin`) among `threads`.
fn spinner_count(threads: &[(String, u32)]) -> usize {
    threads
        .iter()
        .filter(|(name, _)| name == SPINNER_THREAD)
        .count()
}

const SPINNER_THREAD: &str = "sidecar-spin";

/// Busy polling (`runtime.busy_poll`, on by default) spins in a thread of the idle
/// scheduling class, so it takes no CPU that anything else wants: whatever the priority
/// (`runtime.nice` -5 by default, in effect where it may be raised) and however many cores,
/// a loaded loop's sleeps are spun through, and every other thread keeps the normal class.
#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_spins_in_the_idle_class_at_any_priority() {
    let (_relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let pid = sidecar.pid().expect("running");
    let threads = thread_policies(pid);
    let spinners: Vec<&(String, u32)> = threads
        .iter()
        .filter(|(name, _)| name == SPINNER_THREAD)
        .collect();
    assert_eq!(
        spinners.len(),
        1,
        "one spinner for one event loop: {threads:?}"
    );
    assert_eq!(spinners[0].1, 5, "the spinner is SCHED_IDLE: {threads:?}");
    assert!(
        threads
            .iter()
            .filter(|(name, _)| name != SPINNER_THREAD)
            .all(|(_, policy)| *policy == 0),
        "the event loop and the rest stay SCHED_OTHER: {threads:?}"
    );
    let spins = load_until_spun(&sidecar).await;
    assert!(spins > 0.0);
}

/// Busy polling is on trial: it starts in force, and one period of 100 ms in ten runs the
/// other mode (a probe), counted; whether the trial keeps spinning depends on the host (a
/// halted core costs a slow one a third of the throughput, a fast one nothing), so the
/// gauge may read either way afterwards, but never anything else for one loop.
#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_is_on_trial_with_probes_of_the_other_mode() {
    let (_relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    assert_eq!(
        sidecar.metric("sprint_sidecar_busy_poll_in_force").await,
        1.0,
        "busy polling starts in force"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let probes = loop {
        concurrent_gets_all_answered_200(&sidecar, 200).await;
        let probes = sidecar
            .metric("sprint_sidecar_busy_poll_probes_total")
            .await;
        if probes >= 2.0 {
            break probes;
        }
        assert!(
            Instant::now() < deadline,
            "30 s of bursts and fewer than two probes: {probes}"
        );
    };
    assert!(probes >= 2.0);
    let in_force = sidecar.metric("sprint_sidecar_busy_poll_in_force").await;
    assert!(in_force == 0.0 || in_force == 1.0, "one loop: {in_force}");
}

/// `runtime.busy_poll = "0s"` turns busy polling off: no spinner thread, no spins.
#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_off_starts_no_spinner() {
    let (_relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set_str("runtime", "busy_poll", "0s")
    })
    .await;
    let pid = sidecar.pid().expect("running");
    concurrent_gets_all_answered_200(&sidecar, 200).await;
    let threads = thread_policies(pid);
    assert_eq!(spinner_count(&threads), 0, "{threads:?}");
    let spins = sidecar.metric("sprint_sidecar_busy_poll_spins_total").await;
    assert_eq!(spins, 0.0);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        sidecar.metric("sprint_sidecar_busy_poll_in_force").await,
        0.0
    );
    assert_eq!(
        sidecar
            .metric("sprint_sidecar_busy_poll_probes_total")
            .await,
        0.0,
        "no trial without busy polling"
    );
}

/// `runtime.yield_every`: a loop that runs out of tasks hands its core over (counted in
/// `sprint_sidecar_loop_yields_total`); `"0s"` never does.
#[tokio::test(flavor = "multi_thread")]
async fn loops_hand_their_core_over_unless_yield_every_is_zero() {
    let (_relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    concurrent_gets_all_answered_200(&sidecar, 200).await;
    let yields = sidecar.metric("sprint_sidecar_loop_yields_total").await;
    assert!(yields >= 1.0, "the default yields: {yields}");
    let (_relay, never) = start(Proto::H2, |sidecar| {
        sidecar.set_str("runtime", "yield_every", "0s")
    })
    .await;
    concurrent_gets_all_answered_200(&never, 200).await;
    let yields = never.metric("sprint_sidecar_loop_yields_total").await;
    assert_eq!(yields, 0.0);
}

/// A CPU cgroup with a quota of half a core (cgroup v2 `cpu.max` or v1
/// `cpu.cfs_quota_us`), removed on drop; `None` where this process may not make one.
struct QuotaCgroup {
    dir: std::path::PathBuf,
    procs: String,
}

impl QuotaCgroup {
    fn new() -> Option<QuotaCgroup> {
        let name = format!("sprint-sidecar-test-{}", std::process::id());
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.subtree_control");
        let (dir, file, value) = if std::fs::read_to_string(v2).is_ok_and(|c| c.contains("cpu")) {
            (
                std::path::Path::new("/sys/fs/cgroup").join(&name),
                "cpu.max",
                "50000 100000",
            )
        } else {
            (
                std::path::Path::new("/sys/fs/cgroup/cpu").join(&name),
                "cpu.cfs_quota_us",
                "50000",
            )
        };
        std::fs::create_dir(&dir).ok()?;
        let cgroup = QuotaCgroup {
            procs: dir.join("cgroup.procs").display().to_string(),
            dir,
        };
        std::fs::write(cgroup.dir.join(file), value).ok()?;
        Some(cgroup)
    }
}

impl Drop for QuotaCgroup {
    fn drop(&mut self) {
        // Empty once the sidecar has exited; retried briefly while it exits.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Under a CPU quota (a container's CPU limit) busy polling stands down, since its spins
/// would count against the quota: no spinner thread, a log line, and `check-config` says so.
#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_stands_down_under_a_cpu_quota() {
    let Some(cgroup) = QuotaCgroup::new() else {
        eprintln!("skipped: this process cannot create a CPU cgroup with a quota here");
        return;
    };
    let join = format!("echo $$ > {} && exec \"$@\"", cgroup.procs);
    let wrapper = ["sh", "-c", join.as_str(), "sh"];
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let checked = Sidecar::builder()
        .relay(&relay)
        .wrapper(&wrapper)
        .run_command("check-config")
        .await;
    assert!(
        checked.stdout.contains(
            "# busy polling: stands down here, a CPU quota of 0.50 core(s) applies \
             (runtime.busy_poll = 1ms)"
        ),
        "{}\n{}",
        checked.stdout,
        checked.stderr
    );
    let sidecar = Sidecar::builder()
        .relay(&relay)
        .wrapper(&wrapper)
        .start()
        .await;
    sidecar.wait_ready().await;
    concurrent_gets_all_answered_200(&sidecar, 200).await;
    let pid = sidecar.pid().expect("running");
    let threads = thread_policies(pid);
    assert_eq!(spinner_count(&threads), 0, "{threads:?}");
    assert_eq!(
        sidecar.metric("sprint_sidecar_busy_poll_spins_total").await,
        0.0
    );
    assert!(
        sidecar.logs_contain("busy polling stands down: a CPU quota applies"),
        "{}",
        sidecar.logs().join("\n")
    );
    drop(sidecar);
    drop(cgroup);
}

/// Busy polling (`runtime.busy_poll`, on by default) spins only while answers are due: with
/// 32 requests held by a relay that never answers, spins that find nothing stop at their cap
/// (10% of a core), and once the load is gone the loop and its spinner sleep. A spinner that
/// kept going would hold a core at 100%.
#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_stops_when_answers_stop_coming_and_when_the_load_is_gone() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set_str("pool", "request_timeout", "30s")
    })
    .await;
    let pid = sidecar.pid().expect("running");
    let client = support::client();
    // Load first, so the loop spins, then a relay that holds every request.
    load_until_spun(&sidecar).await;
    let answered = relay.request_count();
    let missed_before = sidecar
        .metric("sprint_sidecar_busy_poll_missed_seconds_total")
        .await;
    let started = Instant::now();
    relay.set_fault(support::Fault::Stall);
    let mut held = JoinSet::new();
    for _ in 0..32 {
        let (client, url) = (client.clone(), sidecar.data_url("/"));
        held.spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
    }
    for _ in 0..100 {
        if relay.request_count() >= answered + 32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        relay.request_count(),
        answered + 32,
        "all 32 requests are held by the relay"
    );
    let stalled = cpu_percent_over(pid, Duration::from_secs(2)).await;
    assert!(
        stalled < 25.0,
        "with 32 requests in flight and no answers the sidecar used {stalled:.0}% of a core"
    );
    let missed = sidecar
        .metric("sprint_sidecar_busy_poll_missed_seconds_total")
        .await
        - missed_before;
    let allowed = 0.10 * (started.elapsed().as_secs_f64() + 2.0) + 0.05;
    assert!(
        missed <= allowed,
        "spinning for answers that never came: {missed:.3} s, the cap allows {allowed:.3} s"
    );
    held.abort_all();
    relay.set_fault(support::Fault::None);
    let status = client
        .get(sidecar.data_url("/"))
        .send()
        .await
        .expect("answered")
        .status();
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = cpu_percent_over(pid, Duration::from_secs(2)).await;
    assert!(
        idle < 25.0,
        "after the load the sidecar used {idle:.0}% of a core"
    );
}

// ---- bodies ----

/// Reads a streamed response, comparing every byte with the pattern; returns the length.
async fn read_pattern(mut response: reqwest::Response) -> u64 {
    let mut offset = 0u64;
    while let Some(chunk) = response.chunk().await.expect("the response body streams") {
        if let Some(at) = pattern_mismatch(offset, &chunk) {
            panic!("byte {at} of the body differs from what was sent");
        }
        offset += chunk.len() as u64;
    }
    offset
}

async fn ten_mebibytes_each_way(protocol: Proto, chunked_upload: bool) {
    let (relay, sidecar) = start(protocol, |sidecar| sidecar).await;
    let client = support::client();

    let body = if chunked_upload {
        PatternBody::chunked(TEN_MIB, 100_000)
    } else {
        PatternBody::sized(TEN_MIB)
    };
    let response = client
        .post(sidecar.data_url("/echo"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap(body))
        .send()
        .await
        .expect("the upload is answered");
    assert_eq!(response.status(), 200);
    assert_eq!(read_pattern(response).await, TEN_MIB, "echoed length");
    let upload = relay
        .requests()
        .into_iter()
        .find(|record| record.path == "/echo")
        .expect("the relay saw the upload");
    assert_eq!(upload.body_len, TEN_MIB, "bytes that reached the relay");
    assert!(upload.body_complete);
    assert_eq!(pattern_mismatch(0, &upload.body), None);

    let response = client
        .get(sidecar.data_url(&format!("/bytes/{TEN_MIB}")))
        .send()
        .await
        .expect("the download is answered");
    assert_eq!(response.status(), 200);
    assert_eq!(read_pattern(response).await, TEN_MIB, "downloaded length");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_mebibyte_bodies_are_byte_exact_both_ways_over_h2() {
    ten_mebibytes_each_way(Proto::H2, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_mebibyte_bodies_are_byte_exact_both_ways_over_http1() {
    ten_mebibytes_each_way(Proto::Http1, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_mebibyte_chunked_upload_is_byte_exact() {
    ten_mebibytes_each_way(Proto::H2, true).await;
}

// ---- headers and targets ----

async fn host_is_rewritten(protocol: Proto) {
    let (relay, sidecar) = start(protocol, |sidecar| sidecar).await;
    let request = Request::get("/who?x=1")
        .header("host", "app.example:8080")
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    let (parts, _) = support::http1_request(sidecar.data_addr(), request)
        .await
        .expect("the sidecar answers");
    assert_eq!(parts.status, 200);
    let record = relay.requests().pop().expect("the relay saw the request");
    assert_names_relay(record.authority.as_deref(), &relay);
    if let Some(host) = record.header("host") {
        assert_names_relay(Some(host), &relay);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn host_is_rewritten_to_the_relay_name_over_http1() {
    host_is_rewritten(Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn authority_is_rewritten_to_the_relay_name_over_h2() {
    host_is_rewritten(Proto::H2).await;
}

async fn hop_by_hop_headers_are_removed(protocol: Proto) {
    let (relay, sidecar) = start(protocol, |sidecar| sidecar).await;
    let request = Request::post("/hop?keep=1")
        .header("host", "app.example")
        .header("connection", "keep-alive, X-Custom-Hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers, deflate")
        .header("transfer-encoding", "chunked")
        .header("upgrade", "websocket")
        .header("x-custom-hop", "drop-me")
        .header("x-end-to-end", "keep-me")
        .body(PatternBody::chunked(1000, 300))
        .expect("valid request");
    let (parts, body) = support::http1_request(sidecar.data_addr(), request)
        .await
        .expect("the sidecar answers");
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));

    let record = relay.requests().pop().expect("the relay saw the request");
    assert_eq!(record.target, "/hop?keep=1");
    assert_eq!(
        record.header("x-end-to-end"),
        Some("keep-me"),
        "end-to-end headers stay"
    );
    assert_eq!(record.body_len, 1000);
    assert!(record.body_complete);
    for name in ["keep-alive", "proxy-connection", "upgrade", "x-custom-hop"] {
        assert!(
            !record.headers.contains_key(name),
            "{name} must not reach the relay: {:?}",
            record.headers
        );
    }
    for te in record.headers.get_all("te") {
        assert_eq!(
            te, "trailers",
            "only `TE: trailers` may pass: {:?}",
            record.headers
        );
    }
    if protocol == Proto::H2 {
        for name in ["connection", "transfer-encoding"] {
            assert!(
                !record.headers.contains_key(name),
                "{name} must not reach an h2 relay"
            );
        }
    } else {
        // The sidecar's own HTTP/1.1 framing may use these, but not the client's values.
        for value in record.headers.get_all("connection") {
            let value = value.to_str().unwrap_or_default().to_ascii_lowercase();
            assert!(
                !value.contains("x-custom-hop"),
                "client Connection leaked: {value}"
            );
        }
        for value in record.headers.get_all("transfer-encoding") {
            assert_eq!(value, "chunked", "only the sidecar's own framing");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_removed_before_an_h2_relay() {
    hop_by_hop_headers_are_removed(Proto::H2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_removed_before_an_http1_relay() {
    hop_by_hop_headers_are_removed(Proto::Http1).await;
}

async fn path_and_query_are_unchanged(protocol: Proto) {
    let (relay, sidecar) = start(protocol, |sidecar| sidecar).await;
    // Over h2 the last path is reused when the next is the same (vendor/h2, PATCHES.md):
    // repeats, a path and its prefix in turn, and long paths check that it only ever is.
    let long = format!("/{}", "p".repeat(300));
    let targets = [
        "/",
        "/",
        "/a/b/c?x=1&y=2",
        "/a/b/c?x=1&y=2",
        "/a/b/c",
        "/a/b",
        "/a/b/c",
        "/with%20space/%7Euser?q=a%2Bb&q=c&empty=&flag",
        "/json-rpc/v1;matrix=param?ids=1,2,3",
        "//double//slashes/?a=/b&c=%2F",
        "/unicode/%E2%82%BF?sym=%E2%82%BF",
        &long,
        &long,
        &long[..257],
        "/",
    ];
    for target in targets {
        let request = Request::get(target)
            .header("host", "app.example")
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let (parts, _) = support::http1_request(sidecar.data_addr(), request)
            .await
            .unwrap_or_else(|error| panic!("GET {target}: {error}"));
        assert_eq!(parts.status, 200, "GET {target}");
        let record = relay.requests().pop().expect("the relay saw the request");
        assert_eq!(
            record.target, target,
            "the relay must see the target unchanged"
        );
    }
}

/// Absolute-form targets reach the relay as origin-form (a query without a path gets the
/// path "/", RFC 9112 §3.2.2); the asterisk-form is refused unless the method is OPTIONS.
async fn request_target_forms(protocol: Proto) {
    let (relay, sidecar) = start(protocol, |sidecar| sidecar).await;
    for (target, expected) in [
        ("http://app.example?x=1", "/?x=1"),
        ("http://app.example/a?x=1", "/a?x=1"),
        ("http://app.example", "/"),
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n\r\n");
        let (_stream, status) = first_exchange(sidecar.data_addr(), request.as_bytes()).await;
        assert_eq!(status, Some(200), "GET {target}");
        let record = relay.requests().pop().expect("the relay saw the request");
        assert_eq!(record.target, expected, "GET {target}");
    }
    relay.clear_requests();
    let (_stream, status) =
        first_exchange(sidecar.data_addr(), b"GET * HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(status, Some(400), "GET * is refused here");
    assert!(relay.requests().is_empty(), "GET * never reaches the relay");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_target_forms_reach_an_h2_relay_as_origin_form() {
    request_target_forms(Proto::H2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_target_forms_reach_an_http1_relay_as_origin_form() {
    request_target_forms(Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn path_and_query_reach_an_h2_relay_unchanged() {
    path_and_query_are_unchanged(Proto::H2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn path_and_query_reach_an_http1_relay_unchanged() {
    path_and_query_are_unchanged(Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_credential_replaces_the_client_authorization() {
    let relay = Relay::builder().start().await;
    let builder = Sidecar::builder().relay(&relay);
    let token = builder.write_file("relay.token", b"Bearer relay-credential-42\n", 0o600);
    let sidecar = builder
        .set_str("upstream", "auth_token_file", &token.display().to_string())
        .start()
        .await;
    sidecar.wait_ready().await;
    let response = support::client()
        .get(sidecar.data_url("/authed"))
        .header("authorization", "Bearer from-the-app")
        .send()
        .await
        .expect("the sidecar answers");
    assert_eq!(response.status(), 200);
    let record = relay.requests().pop().expect("the relay saw the request");
    let values: Vec<_> = record.headers.get_all("authorization").iter().collect();
    assert_eq!(values.len(), 1, "exactly one credential: {values:?}");
    assert_eq!(values[0], "Bearer relay-credential-42");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificate_is_presented_to_an_mtls_relay() {
    let pki = support::Pki::new();
    let relay = Relay::builder()
        .pki(pki.clone())
        .require_client_certificate(true)
        .start()
        .await;
    let (cert, key) = pki.write_client_identity("sidecar");
    let sidecar = Sidecar::builder()
        .relay(&relay)
        .set_str("upstream", "client_cert_file", &cert.display().to_string())
        .set_str("upstream", "client_key_file", &key.display().to_string())
        .start()
        .await;
    sidecar.wait_ready().await;
    let response = support::client()
        .get(sidecar.data_url("/mtls"))
        .send()
        .await
        .expect("the sidecar answers");
    assert_eq!(response.status(), 200);
    assert!(
        relay
            .connections()
            .iter()
            .filter(|info| info.tls_established)
            .all(|info| info.client_certificate),
        "every TLS connection presented the client certificate"
    );
}

// ---- h2c ----

/// A relay speaking h2 and a sidecar whose `listener.idle_timeout` is 500 ms.
async fn start_with_short_idle_timeout() -> (Relay, Sidecar) {
    start(Proto::H2, |sidecar| {
        sidecar.set_str("listener", "idle_timeout", "500ms")
    })
    .await
}

/// An h2c connection with no stream in flight that reads and writes nothing for
/// `listener.idle_timeout` is closed, also one whose preface never completes, so idle or
/// stuck h2c clients cannot fill `max_connections` (before, they were kept for ever).
#[tokio::test(flavor = "multi_thread")]
async fn idle_and_half_open_h2c_connections_are_closed_after_idle_timeout() {
    let (_relay, sidecar) = start_with_short_idle_timeout().await;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let empty_settings: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    // A connection past its preface is told before it is closed (GOAWAY); a half preface
    // has no HTTP/2 session to tell.
    for (what, bytes, told) in [
        (
            "preface and SETTINGS",
            [PREFACE, empty_settings].concat(),
            true,
        ),
        ("half a preface", PREFACE[..16].to_vec(), false),
    ] {
        let started = Instant::now();
        let answer = exchange_until_closed(sidecar.data_addr(), &bytes).await;
        let open_for = started.elapsed();
        assert!(
            open_for >= Duration::from_millis(450),
            "{what}: closed after {open_for:?}, before listener.idle_timeout"
        );
        assert!(
            !answer.starts_with(b"HTTP/1.1"),
            "{what}: no HTTP/1.1 answer on an h2 connection: {:?}",
            String::from_utf8_lossy(&answer)
        );
        if told {
            let frames = support::h2_frames(&answer);
            let goaway = frames
                .iter()
                .find(|(kind, _)| *kind == 7)
                .unwrap_or_else(|| panic!("{what}: a GOAWAY frame before the close: {frames:?}"));
            assert_eq!(
                goaway.1.get(4..8),
                Some(&[0u8, 0, 0, 0][..]),
                "{what}: GOAWAY with NO_ERROR: {frames:?}"
            );
        }
    }
}

/// An h2c request that repeats one `Content-Length` value reaches the relay with it once,
/// as an HTTP/1.1 request does (an h2 relay such as nginx refuses the repeat); values that
/// disagree make the request malformed (a stream reset, RFC 9113 §8.1.1) and never reach it.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_h2c_content_length_is_sent_once_and_disagreeing_ones_are_refused() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let tcp = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(connection);
    for (values, agree) in [(["5", "5"], true), (["5", "6"], false)] {
        let mut client = client.clone().ready().await.expect("ready for a stream");
        let mut request = http::Request::post(sidecar.data_url("/repeated-length"))
            .body(())
            .expect("request");
        for value in values {
            request.headers_mut().append(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from_static(value),
            );
        }
        relay.clear_requests();
        let (response, mut send) = client.send_request(request, false).expect("sent");
        send.send_data(Bytes::from_static(b"hello"), true)
            .expect("body sent");
        let response = response.await;
        if agree {
            let response = response.expect("answered");
            assert_eq!(response.status(), 200, "content-length {values:?}");
            let record = relay.requests().pop().expect("the relay saw the request");
            let lengths: Vec<_> = record.headers.get_all("content-length").iter().collect();
            assert_eq!(lengths, ["5"], "content-length {values:?}");
            assert_eq!(&record.body[..], b"hello");
        } else {
            match response {
                Ok(response) => assert_eq!(response.status(), 400, "{values:?}"),
                Err(e) => assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{e:?}"),
            }
            assert!(relay.requests().is_empty(), "content-length {values:?}");
        }
    }
}

/// An h2c head over `listener.max_header_bytes` gets the same JSON 431 as an HTTP/1.1 one
/// (h2 itself would answer a bare 431 with no body at its own limit), and never reaches the
/// relay; the connection serves the next request.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_h2c_head_gets_a_json_431_and_the_connection_goes_on() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set("listener", "max_header_bytes", "16384")
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(connection);
    let send = |path: &str, filler: usize| {
        let client = client.clone();
        let request = http::Request::get(sidecar.data_url(path))
            .header("x-filler", "f".repeat(filler))
            .body(())
            .expect("request");
        async move {
            let mut client = client.ready().await.expect("ready for a stream");
            let (response, _) = client.send_request(request, true).expect("sent");
            let response = response.await.expect("answered");
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("body chunk");
                body.flow_control()
                    .release_capacity(chunk.len())
                    .expect("capacity released");
                bytes.extend_from_slice(&chunk);
            }
            (status, bytes)
        }
    };
    for filler in [20 * 1024, 40 * 1024] {
        let (status, body) = send("/h2c-big", filler).await;
        assert_eq!(status, 431, "{filler}: {}", String::from_utf8_lossy(&body));
        let (error, detail) = assert_json_error(431, &body);
        assert_eq!(error, "headers_too_large");
        assert!(
            detail.contains("listener.max_header_bytes (16384)"),
            "{detail}"
        );
    }
    assert_eq!(relay.count_path("/h2c-big"), 0);
    let (status, _) = send("/h2c-small", 1024).await;
    assert_eq!(status, 200, "the connection serves the next request");
}

/// A real HTTP/2 client that stays idle past `idle_timeout` is sent GOAWAY (NO_ERROR): its
/// connection ends cleanly and it knows why, rather than meeting a bare TCP close.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_h2c_client_is_sent_goaway_and_its_connection_ends_cleanly() {
    let (relay, sidecar) = start_with_short_idle_timeout().await;
    let tcp = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready for a stream");
    let request = http::Request::get(sidecar.data_url("/before-idle"))
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("sent");
    let response = response.await.expect("answered");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the idle connection ends")
        .expect("connection task");
    assert!(
        ended.is_ok(),
        "the connection ends without an error: {ended:?}"
    );
    let refused = client
        .ready()
        .await
        .expect_err("no new stream after the sidecar's GOAWAY");
    assert!(
        refused.is_go_away() && refused.is_remote(),
        "the sidecar said GOAWAY: {refused:?}"
    );
    assert_eq!(refused.reason(), Some(h2::Reason::NO_ERROR), "{refused:?}");
    assert_eq!(relay.request_count(), 1);
}

/// A stream in flight keeps its h2c connection past `idle_timeout`, and the connection
/// serves on afterwards while it is used.
#[tokio::test(flavor = "multi_thread")]
async fn an_h2c_stream_in_flight_outlasts_idle_timeout() {
    let (relay, sidecar) = start_with_short_idle_timeout().await;
    relay.set_fault(support::Fault::Delay(Duration::from_millis(1500)));
    let client = support::h2c_client();
    let response = client
        .get(sidecar.data_url("/slow-h2c"))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    relay.set_fault(support::Fault::None);
    let again = client
        .get(sidecar.data_url("/again-h2c"))
        .send()
        .await
        .expect("answered");
    assert_eq!(again.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge_clients_are_served() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let client = support::h2c_client();
    let mut tasks = JoinSet::new();
    for i in 0..50u64 {
        let client = client.clone();
        let url = sidecar.data_url(&format!("/h2c/{i}?q={i}"));
        tasks.spawn(async move {
            let response = client.get(url).send().await.expect("h2c request answered");
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            assert_eq!(response.status(), 200);
            let seen: serde_json::Value = response.json().await.expect("JSON answer");
            assert_eq!(seen["target"], format!("/h2c/{i}?q={i}"));
        });
    }
    while let Some(outcome) = tasks.join_next().await {
        outcome.expect("h2c request task");
    }
    let response = client
        .post(sidecar.data_url("/"))
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": "h2c", "method": "ping"}))
        .send()
        .await
        .expect("h2c POST answered");
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.expect("JSON-RPC answer");
    assert_eq!(answer["id"], "h2c");
    assert_eq!(relay.request_count(), 51);
}

// ---- bad client input ----

#[tokio::test(flavor = "multi_thread")]
async fn body_over_max_body_bytes_with_content_length_gets_413() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set("listener", "max_body_bytes", "1024")
    })
    .await;
    let client = support::client();

    let response = client
        .post(sidecar.data_url("/limit/exact"))
        .body(vec![b'a'; 1024])
        .send()
        .await
        .expect("answered");
    assert_eq!(
        response.status(),
        200,
        "a body of exactly max_body_bytes passes"
    );

    let response = client
        .post(sidecar.data_url("/limit/over"))
        .body(vec![b'a'; 2048])
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert_json_error(status, &body);
    assert_eq!(
        relay.count_path("/limit/over"),
        0,
        "a declared oversize body is refused before anything is sent upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_body_growing_past_max_body_bytes_gets_413() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set("listener", "max_body_bytes", "1024")
    })
    .await;
    let request = Request::post("/limit/chunked")
        .header("host", "app.example")
        .body(PatternBody::chunked(8 * 1024, 256))
        .expect("valid request");
    let (parts, body) = support::http1_request(sidecar.data_addr(), request)
        .await
        .expect("the sidecar answers");
    assert_eq!(parts.status, 413, "{}", String::from_utf8_lossy(&body));
    assert_json_error(413, &body);
    assert!(
        relay
            .requests()
            .iter()
            .all(|record| !(record.body_complete && record.body_len > 1024)),
        "no body over the limit may reach the relay whole"
    );
}

/// A client's streamed body that fails (bad chunked framing) or grows past
/// `listener.max_body_bytes` is answered as the client's error, 400 or 413, and is not held
/// against the relay connection: with `consecutive_failures = 1` and one connection, a single
/// such failure would otherwise open the only breaker, and a local client could make the
/// sidecar answer 503 to everyone (it did, before the fix: 20 malformed bodies opened all
/// four breakers of the default pool).
async fn client_body_faults_are_not_the_relays(protocol: Proto) {
    let (relay, sidecar) = start(protocol, |sidecar| {
        sidecar
            .pool_size(1)
            .set("listener", "max_body_bytes", "1024")
            .set("breaker", "consecutive_failures", "1")
    })
    .await;
    for round in 0..2 {
        let answer = exchange_until_closed(
            sidecar.data_addr(),
            b"POST /bad-chunks HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        )
        .await;
        let (error, detail) = assert_json_error(400, support::raw_body(&answer));
        assert_eq!(
            error,
            "bad_request",
            "round {round} over {}",
            protocol.name()
        );
        assert!(
            detail.contains("request body") && detail.contains("chunk"),
            "{detail}"
        );

        let request = Request::post("/too-big/chunked")
            .header("host", "app.example")
            .body(PatternBody::chunked(8 * 1024, 256))
            .expect("valid request");
        let (parts, body) = support::http1_request(sidecar.data_addr(), request)
            .await
            .expect("the sidecar answers");
        assert_eq!(parts.status, 413, "{}", String::from_utf8_lossy(&body));
        let (error, detail) = assert_json_error(413, &body);
        assert_eq!(error, "body_too_large");
        assert!(
            detail.contains("listener.max_body_bytes (1024 bytes)"),
            "{detail}"
        );
    }
    if protocol == Proto::H2 {
        // Only the streams were cancelled: the one TLS connection carried everything.
        assert_eq!(relay.connections().len(), 1, "no connection was replaced");
    }
    // Over HTTP/1.1 a connection stopped mid-body cannot go on; it is replaced at once (no
    // backoff), so readiness comes back within the re-dial. (The bad chunks above arrive with
    // their head and are refused before the relay; the 413 body streams in pieces.)
    let mut ready = 0;
    for _ in 0..40 {
        ready = sidecar
            .client()
            .get(sidecar.admin_url("/ready"))
            .send()
            .await
            .expect("answered")
            .status()
            .as_u16();
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, 200, "ready again within 2 s");
    assert_connection_unharmed(&relay, &sidecar).await;
}

/// The pool's one connection has no error and a closed breaker, and serves `/after`.
async fn assert_connection_unharmed(relay: &Relay, sidecar: &Sidecar) {
    let (_, status) = sidecar.get_json("/api/v1/secure-channel/status").await;
    let connection = &status["connections"][0];
    assert_eq!(connection["errors"], 0, "{connection}");
    assert_eq!(connection["circuit_breaker"], "closed", "{connection}");
    let after = sidecar
        .client()
        .get(sidecar.data_url("/after"))
        .send()
        .await
        .expect("answered");
    assert_eq!(after.status(), 200, "the pool still serves");
    assert_eq!(relay.count_path("/after"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_body_faults_cost_an_h2_relay_connection_nothing() {
    client_body_faults_are_not_the_relays(Proto::H2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_body_faults_cost_an_http1_relay_connection_nothing() {
    client_body_faults_are_not_the_relays(Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set("listener", "max_header_bytes", "16384")
    })
    .await;
    let small = Request::get("/headers/small")
        .header("host", "app.example")
        .header("x-filler", "f".repeat(4 * 1024))
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    let (parts, _) = support::http1_request(sidecar.data_addr(), small)
        .await
        .expect("answered");
    assert_eq!(parts.status, 200, "headers under the limit pass");

    let big = Request::get("/headers/big")
        .header("host", "app.example")
        .header("x-filler", "f".repeat(32 * 1024))
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    let (parts, body) = support::http1_request(sidecar.data_addr(), big)
        .await
        .expect("answered");
    assert_eq!(parts.status, 431, "{}", String::from_utf8_lossy(&body));
    assert_json_error(431, &body);
    assert_eq!(relay.count_path("/headers/big"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_client_headers_are_cut_off() {
    // Time is the subject here: header_read_timeout = 300ms, the client never finishes.
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set_str("listener", "header_read_timeout", "300ms")
    })
    .await;
    let started = Instant::now();
    let answer = support::raw_exchange(
        sidecar.data_addr(),
        b"GET /slow HTTP/1.1\r\nHost: app.example\r\nX-Partial: ",
        Duration::from_secs(5),
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(4),
        "the connection must be cut off, took {elapsed:?}"
    );
    assert_eq!(
        support::raw_status(&answer),
        Some(408),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (error, detail) = assert_json_error(408, support::raw_body(&answer));
    assert_eq!(error, "request_timeout");
    assert!(detail.contains("listener.header_read_timeout"), "{detail}");
    assert_eq!(relay.count_path("/slow"), 0);
}

/// Writes `raw` on a new connection and reads until the sidecar closes it, which must happen
/// within 5 s (unlike `support::raw_exchange`, a timeout fails the test).
async fn exchange_until_closed(addr: std::net::SocketAddr, raw: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the data listener accepts connections");
    stream.write_all(raw).await.expect("sent");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed within 5 s")
        .expect("read");
    answer
}

/// Opens a connection to `addr`, sends `request` and reads the first answer (one read, for
/// answers that fit in it); returns the still open connection and the answer's status.
async fn first_exchange(
    addr: std::net::SocketAddr,
    request: &[u8],
) -> (tokio::net::TcpStream, Option<u16>) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the data listener accepts connections");
    let answer = send_and_read_once(&mut stream, request).await;
    (stream, support::raw_status(&answer))
}

/// Sends `request` on `stream` and reads once (within 5 s), for answers that fit in one read.
async fn send_and_read_once(stream: &mut tokio::net::TcpStream, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(request)
        .await
        .expect("the request is sent");
    let mut answer = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered within 5 s")
        .expect("the answer is read");
    answer.truncate(n);
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed_silently_after_idle_timeout() {
    use tokio::io::AsyncReadExt;
    // Between requests nothing is half read: when listener.idle_timeout closes a kept-alive
    // connection that waits for its next request, no 408 (or other stray bytes) is written.
    let (_relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set_str("listener", "idle_timeout", "300ms")
    })
    .await;
    let (mut stream, status) = first_exchange(
        sidecar.data_addr(),
        b"GET /idle HTTP/1.1\r\nHost: app.example\r\n\r\n",
    )
    .await;
    assert_eq!(status, Some(200));
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed within 5 s")
        .expect("read");
    assert!(
        rest.is_empty(),
        "an idle connection is closed silently, got {}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_connection_may_wait_longer_than_the_header_timeout() {
    // The header clock runs from a head's first byte, not while the connection waits for
    // its next request (that is listener.idle_timeout, 75 s by default).
    serves_again_after_idling(Duration::from_millis(900), |sidecar| {
        sidecar.set_str("listener", "header_read_timeout", "300ms")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_connection_stays_open_past_30_s_with_the_default_idle_timeout() {
    // hyper arms a 30 s header timer of its own (running between requests too) whenever it
    // has a timer, unless told not to: an idle kept-alive connection must last until
    // listener.idle_timeout (75 s by default), not 30 s.
    serves_again_after_idling(Duration::from_secs(32), |sidecar| sidecar).await;
}

/// A kept-alive connection that waited `idle` for its next request serves it.
async fn serves_again_after_idling(
    idle: Duration,
    configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) {
    let (_relay, sidecar) = start(Proto::H2, configure).await;
    let request = b"GET /again HTTP/1.1\r\nHost: app.example\r\n\r\n";
    let (mut stream, status) = first_exchange(sidecar.data_addr(), request).await;
    assert_eq!(status, Some(200));
    tokio::time::sleep(idle).await;
    let answer = send_and_read_once(&mut stream, request).await;
    assert_eq!(
        support::raw_status(&answer),
        Some(200),
        "the connection idle for {idle:?} serves the second request: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// Header fields a relay would refuse (nginx: over 8 KiB, or 32 KiB in all) get 431 from the
/// sidecar and never reach the relay, where one such head could close a connection that other
/// requests share. The limits are configuration, for relays that accept more.
#[tokio::test(flavor = "multi_thread")]
async fn header_fields_a_relay_would_refuse_get_431_and_never_reach_it() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let client = support::client();
    let send = |path: &'static str, fields: Vec<(String, String)>| {
        let mut request = client.get(sidecar.data_url(path));
        for (name, value) in fields {
            request = request.header(name, value);
        }
        async move {
            let answer = request.send().await.expect("the sidecar answers");
            let status = answer.status().as_u16();
            (status, answer.bytes().await.expect("a whole answer"))
        }
    };
    let secret = "s3cr3t-".repeat(1500);
    let (status, body) = send("/big", vec![("x-big".into(), secret.clone())]).await;
    assert_eq!(status, 431, "{}", String::from_utf8_lossy(&body));
    let (error, detail) = assert_json_error(431, &body);
    assert_eq!(error, "headers_too_large");
    assert!(
        detail.contains("\"x-big\"") && detail.contains("upstream.max_header_field_bytes (8192)"),
        "{detail}"
    );
    assert!(
        !detail.contains("s3cr3t"),
        "the value is never echoed: {detail}"
    );

    let many: Vec<_> = (0..5)
        .map(|i| (format!("x-part-{i}"), "p".repeat(7000)))
        .collect();
    let (status, body) = send("/many", many).await;
    assert_eq!(status, 431, "{}", String::from_utf8_lossy(&body));
    let (_, detail) = assert_json_error(431, &body);
    assert!(
        detail.contains("upstream.max_header_list_bytes (32768)"),
        "{detail}"
    );
    assert_eq!(relay.count_path("/big") + relay.count_path("/many"), 0);

    let long_path: &'static str = format!("/{}", "t".repeat(9000)).leak();
    let (status, body) = send(long_path, vec![]).await;
    assert_eq!(status, 414, "{}", String::from_utf8_lossy(&body));
    let (error, detail) = assert_json_error(414, &body);
    assert_eq!(error, "uri_too_long");
    assert!(
        detail.contains("request target") && detail.contains("max_header_field_bytes (8192)"),
        "{detail}"
    );
    assert_eq!(relay.count_path(long_path), 0);

    let (status, _) = send("/fits", vec![("x-big".into(), "f".repeat(8000))]).await;
    assert_eq!(status, 200, "a field under the limit goes through");
    assert_eq!(relay.count_path("/fits"), 1);

    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar
            .set("upstream", "max_header_field_bytes", "65536")
            .set("upstream", "max_header_list_bytes", "65536")
    })
    .await;
    let answer = client
        .get(sidecar.data_url("/raised"))
        .header("x-big", "r".repeat(12_000))
        .send()
        .await
        .expect("the sidecar answers");
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{body}");
    let seen = relay.requests();
    let raised = seen
        .iter()
        .find(|record| record.path == "/raised")
        .expect("the relay saw /raised");
    assert_eq!(raised.header("x-big").map(str::len), Some(12_000));
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_hyper_cannot_parse_get_json_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set("listener", "max_header_bytes", "16384")
    })
    .await;
    let cases: [(&str, Vec<u8>, u16, &str); 5] = [
        ("garbage", b"GARBAGE\r\n\r\n".to_vec(), 400, "bad_request"),
        (
            // starts like the HTTP/2 preface but is not one: hyper reads it as HTTP/1.1
            "a broken HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "a space in a header name",
            b"GET /bad HTTP/1.1\r\nHost: app.example\r\nBad Header: x\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "two different Content-Lengths",
            b"POST /bad HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n\
              Content-Length: 6\r\n\r\nhello"
                .to_vec(),
            400,
            "bad_request",
        ),
        (
            // past hyper's own buffer (4 x max_header_bytes), so hyper, not the handler, sees it
            "a head of 256 KiB",
            [
                &b"GET /bad HTTP/1.1\r\nHost: app.example\r\nX-Filler: "[..],
                &vec![b'f'; 256 * 1024],
                b"\r\n\r\n",
            ]
            .concat(),
            431,
            "headers_too_large",
        ),
    ];
    for (what, raw, status, code) in cases {
        let answer = support::raw_exchange(sidecar.data_addr(), &raw, Duration::from_secs(5)).await;
        assert_eq!(
            support::raw_status(&answer),
            Some(status),
            "{what}: {}",
            String::from_utf8_lossy(&answer)
        );
        let (error, _) = assert_json_error(status, support::raw_body(&answer));
        assert_eq!(error, code, "{what}");
        let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(
            text.contains("content-type: application/json\r\n"),
            "{what}: {text}"
        );
    }
    assert_eq!(
        relay.count_path("/bad"),
        0,
        "nothing malformed reaches the relay"
    );

    // On a kept-alive connection: a good request, its answer, then a malformed one.
    let (mut stream, status) = first_exchange(
        sidecar.data_addr(),
        b"POST /good HTTP/1.1\r\nHost: app.example\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(status, Some(200));
    stream
        .write_all(b"GET /bad HTTP/1.1\r\nHo st: x\r\n\r\n")
        .await
        .expect("sent");
    let mut second = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut second))
        .await
        .expect("answered and closed within 5 s")
        .expect("read");
    assert_eq!(
        support::raw_status(&second),
        Some(400),
        "{}",
        String::from_utf8_lossy(&second)
    );
    assert_json_error(400, support::raw_body(&second));
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_with_a_bad_host_or_transfer_coding_are_refused_and_never_reach_the_relay() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let refused: [(&str, &[u8], u16, &str); 5] = [
        (
            "HTTP/1.1 without Host",
            b"GET /refused HTTP/1.1\r\nConnection: close\r\n\r\n",
            400,
            "Host",
        ),
        (
            "two Host headers",
            b"GET /refused HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            400,
            "Host",
        ),
        (
            "user info in Host",
            b"GET /refused HTTP/1.1\r\nHost: user@app\r\nConnection: close\r\n\r\n",
            400,
            "Host",
        ),
        (
            "a port that is not a number",
            b"GET /refused HTTP/1.1\r\nHost: app:http\r\nConnection: close\r\n\r\n",
            400,
            "Host",
        ),
        (
            // hyper decodes the chunks and would hand over gzip bytes as the plain body
            "gzip under chunked",
            b"POST /refused HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n\
              Connection: close\r\n\r\n\
              2\r\n{}\r\n0\r\n\r\n",
            501,
            "transfer coding",
        ),
    ];
    for (what, raw, status, named) in refused {
        let answer = support::raw_exchange(sidecar.data_addr(), raw, Duration::from_secs(2)).await;
        assert_eq!(
            support::raw_status(&answer),
            Some(status),
            "{what}: {}",
            String::from_utf8_lossy(&answer)
        );
        let (_, detail) = assert_json_error(status, support::raw_body(&answer));
        assert!(detail.contains(named), "{what}: {detail}");
    }
    assert_eq!(
        relay.count_path("/refused"),
        0,
        "nothing refused reaches the relay"
    );

    // What the same checks let through.
    let accepted: [(&str, &[u8]); 4] = [
        ("HTTP/1.0 without Host", b"GET /accepted HTTP/1.0\r\n\r\n"),
        (
            "an IPv6 Host with a port",
            b"GET /accepted HTTP/1.1\r\nHost: [::1]:9090\r\nConnection: close\r\n\r\n",
        ),
        (
            "an empty Host",
            b"GET /accepted HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        ),
        (
            "chunked alone",
            b"POST /accepted HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        ),
    ];
    for (what, raw) in accepted {
        let answer = support::raw_exchange(sidecar.data_addr(), raw, Duration::from_secs(5)).await;
        assert_eq!(
            support::raw_status(&answer),
            Some(200),
            "{what}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(relay.count_path("/accepted"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_1_0_clients_get_keep_alive_when_they_ask_and_a_close_when_they_do_not() {
    // `ab -k` and other HTTP/1.0 clients: an HTTP/1.0 connection stays open only when the
    // answer says `Connection: keep-alive`, whatever protocol the relay spoke.
    for proto in [Proto::H2, Proto::Http1] {
        let (relay, sidecar) = start(proto, |sidecar| sidecar).await;
        let mut stream = tokio::net::TcpStream::connect(sidecar.data_addr())
            .await
            .expect("the data listener accepts connections");
        for round in 0..2 {
            let answer = send_and_read_once(
                &mut stream,
                b"POST /ten HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}",
            )
            .await;
            let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            assert_eq!(support::raw_status(&answer), Some(200), "{proto:?}: {text}");
            assert!(
                text.starts_with("http/1.0 200") || text.starts_with("http/1.1 200"),
                "{proto:?}: {text}"
            );
            assert!(
                text.contains("\r\nconnection: keep-alive\r\n"),
                "{proto:?} round {round}: keep-alive announced: {text}"
            );
        }
        assert_eq!(
            relay.count_path("/ten"),
            2,
            "{proto:?}: both on one connection"
        );

        // Without the header, the connection closes after the answer.
        let answer = exchange_until_closed(
            sidecar.data_addr(),
            b"POST /ten HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
        let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert_eq!(support::raw_status(&answer), Some(200), "{proto:?}: {text}");
        assert!(!text.contains("keep-alive"), "{proto:?}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_request_pipelined_behind_a_good_one_gets_json_400() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    // Both in one write, so hyper reads them together: the good one is answered first, then
    // hyper finds the second one malformed.
    let answers = exchange_until_closed(
        sidecar.data_addr(),
        b"POST /good HTTP/1.1\r\nHost: app.example\r\nContent-Length: 2\r\n\r\n{}\
          GET /bad HTTP/1.1\r\nHo st: x\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&answers).into_owned();
    assert_eq!(support::raw_status(&answers), Some(200), "{text}");
    let second = text
        .match_indices("HTTP/1.1 ")
        .nth(1)
        .map(|(at, _)| &answers[at..])
        .unwrap_or_else(|| panic!("two answers: {text}"));
    assert_eq!(support::raw_status(second), Some(400), "{text}");
    let (error, _) = assert_json_error(400, support::raw_body(second));
    assert_eq!(error, "bad_request");
    assert!(
        String::from_utf8_lossy(second)
            .to_ascii_lowercase()
            .contains("content-type: application/json\r\n"),
        "{text}"
    );
    assert_eq!(relay.count_path("/good"), 1);
    assert_eq!(
        relay.count_path("/bad"),
        0,
        "nothing malformed reaches the relay"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_body_that_looks_like_hypers_error_head_is_passed_through_unchanged() {
    // The socket wrapper replaces hyper's bare error head with JSON; an answer body with the
    // very same bytes, pipelined or not, must reach the client as the relay sent it.
    let (_relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let lookalike: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                             date: Fri, 04 Dec 2026 21:05:47 GMT\r\n\r\n";
    let request = |last: bool| {
        [
            format!(
                "POST /echo HTTP/1.1\r\nHost: app.example\r\nContent-Length: {}\r\n{}\r\n",
                lookalike.len(),
                if last { "Connection: close\r\n" } else { "" }
            )
            .into_bytes(),
            lookalike.to_vec(),
        ]
        .concat()
    };
    let answers = exchange_until_closed(
        sidecar.data_addr(),
        &[request(false), request(true)].concat(),
    )
    .await;
    let text = String::from_utf8_lossy(&answers).into_owned();
    assert_eq!(
        text.matches("HTTP/1.1 200 OK").count(),
        2,
        "both echoes answered: {text}"
    );
    assert_eq!(
        text.matches(std::str::from_utf8(lookalike).expect("ascii"))
            .count(),
        2,
        "both bodies intact: {text}"
    );
    assert!(!text.contains("bad_request"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // `printf 'POST ...' | nc -N`: the request, then the client's write side is shut while
    // the relay takes its time; the answer must still arrive whole.
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let mut stream = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    stream
        .write_all(
            b"POST /delay/300 HTTP/1.1\r\nHost: app.example\r\nContent-Type: application/json\r\n\
              Content-Length: 13\r\n\r\n{\"half\":true}",
        )
        .await
        .expect("the request is sent");
    stream.shutdown().await.expect("the write side closes");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the sidecar answers and closes within 10 s")
        .expect("the answer is read");
    assert_eq!(
        support::raw_status(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let seen: serde_json::Value =
        serde_json::from_slice(support::raw_body(&answer)).expect("the relay's JSON answer");
    assert_eq!(seen["path"], "/delay/300", "{seen}");
    assert_eq!(relay.count_path("/delay/300"), 1);
}

// ---- bad relay certificate ----

/// Sends GET `path` until the sidecar answers 502 (the pool has tried the relay), and returns
/// the JSON error's detail.
async fn eventually_502_detail(sidecar: &Sidecar, path: &str, what: &str) -> String {
    let client = support::client();
    let (status, body) = support::eventually(support::EVENTUALLY, what, || async {
        let response = client.get(sidecar.data_url(path)).send().await.ok()?;
        let status = response.status().as_u16();
        let body = response.bytes().await.ok()?;
        (status == 502).then_some((status, body))
    })
    .await;
    assert_json_error(status, &body).1
}

async fn bad_certificate_gets_502(identity: support::Identity, problem_words: &[&str]) {
    let pki = support::Pki::new();
    let relay = Relay::builder()
        .pki(pki.clone())
        .identity(identity)
        .start()
        .await;
    let sidecar = Sidecar::builder().relay(&relay).start().await;
    let detail = eventually_502_detail(&sidecar, "/never", "a 502 for the bad certificate").await;
    let detail = detail.to_lowercase();
    assert!(
        detail.contains("certificate"),
        "the detail must name the certificate problem: {detail}"
    );
    assert!(
        problem_words.iter().any(|word| detail.contains(word)),
        "the detail must say what is wrong ({problem_words:?}): {detail}"
    );
    assert_eq!(
        relay.request_count(),
        0,
        "nothing may be sent over an unverified connection"
    );
    assert!(
        relay.handshake_failures() >= 1,
        "the sidecar aborted the handshake"
    );
    assert_eq!(
        sidecar.admin_status("/ready").await,
        Some(503),
        "not ready without a verified connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_relay_certificate_gets_502_naming_the_problem() {
    let pki = support::Pki::new();
    bad_certificate_gets_502(
        pki.untrusted_server_identity(),
        &["unknownissuer", "unknown issuer", "issuer", "trust"],
    )
    .await;
}

/// `upstream.ca_file` is re-read when it changes: a sidecar that does not trust the relay
/// (502, not ready) starts trusting it once the file holds the relay's CA, without a
/// restart; a file that then turns to garbage keeps the anchors in force.
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_ca_file_is_trusted_without_a_restart() {
    let relay = Relay::builder().start().await;
    let other = support::Pki::new();
    let builder = Sidecar::builder().relay(&relay).pool_size(2).set_str(
        "pool",
        "reconnect_backoff_max",
        "300ms",
    );
    let ca_file = builder.write_file("ca.pem", other.ca_pem().as_bytes(), 0o644);
    let sidecar = builder.ca_file(&ca_file).start().await;
    let detail =
        eventually_502_detail(&sidecar, "/x", "a 502 while the relay is not trusted").await;
    // Another CA of the same name: the relay's certificate fails its signature check.
    assert!(detail.contains("relay certificate rejected"), "{detail}");
    assert_eq!(sidecar.admin_status("/ready").await, Some(503));

    let replace = |contents: &[u8]| {
        let staging = ca_file.with_extension("staging");
        support::pki::write_with_mode(&staging, contents, 0o644);
        std::fs::rename(&staging, &ca_file).expect("rename");
    };
    replace(relay.pki().ca_pem().as_bytes());
    sidecar.wait_admin_status("/ready", 200).await;
    let client = support::client();
    let answer = client
        .get(sidecar.data_url("/status/200"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 200);

    // Garbage in the file: a warning, and the anchors in force stay (new handshakes too).
    replace(b"not a certificate\n");
    support::eventually(
        support::EVENTUALLY,
        "a warning about the unusable file",
        || {
            let warned = sidecar.logs_contain("keeping the trust anchors in force");
            async move { warned.then_some(()) }
        },
    )
    .await;
    relay.close_connections();
    support::eventually(
        support::EVENTUALLY,
        "new connections under the anchors in force",
        || async {
            let response = client
                .get(sidecar.data_url("/status/200"))
                .send()
                .await
                .ok()?;
            (response.status() == 200 && relay.tls_accepted() > 2).then_some(())
        },
    )
    .await;
    assert!(sidecar.logs_contain("trust anchors (upstream.ca_file) reloaded"));
    for (outcome, count) in [("reloaded", 1.0), ("rejected", 1.0)] {
        let sample = format!(
            "sprint_sidecar_secret_reloads_total{{file=\"ca_file\",outcome=\"{outcome}\"}}"
        );
        assert_eq!(sidecar.metric(&sample).await, count, "{sample}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_certificate_for_another_name_gets_502_naming_the_problem() {
    // Issued by the trusted CA, but for the wrong name.
    let relay_pki = support::Pki::new();
    let relay = Relay::builder()
        .pki(relay_pki.clone())
        .identity(relay_pki.server_identity_for(&["other.test"]))
        .start()
        .await;
    let sidecar = Sidecar::builder().relay(&relay).start().await;
    let detail = eventually_502_detail(&sidecar, "/never", "a 502 for the wrong name").await;
    let detail = detail.to_lowercase();
    assert!(detail.contains("certificate"), "{detail}");
    assert!(
        detail.contains("name"),
        "the detail must say the name does not match: {detail}"
    );
    assert_eq!(relay.request_count(), 0);
}

// ---- errors are JSON ----

#[tokio::test(flavor = "multi_thread")]
async fn relay_answers_pass_through_unchanged() {
    // A relay's own 4xx/5xx is its answer, not a sidecar error: status and body unchanged.
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let client = support::client();
    let response = client
        .get(sidecar.data_url("/status/404"))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 404);
    assert!(
        response.headers().contains_key("x-relay-connection-id"),
        "the relay's own response headers come through"
    );
    let body: serde_json::Value = response.json().await.expect("the relay's JSON");
    assert_eq!(body["status"], 404);
    assert_eq!(relay.count_path("/status/404"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_down_gets_a_json_error() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    relay.go_down().await;
    let client = support::client();
    let response = client
        .post(sidecar.data_url("/"))
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"x"}"#)
        .send()
        .await
        .expect("the sidecar answers even with the relay down");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    assert!(
        (502..=504).contains(&status),
        "relay down must be a 502/503/504, got {status}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_json_error(status, &body);
    // The operator sees it in the log (at most one such line a second).
    support::eventually(Duration::from_secs(3), "the failure in the log", || async {
        sidecar
            .logs_contain("a client was answered with an upstream error")
            .then_some(())
    })
    .await;
}

// ---- a relay that fails in the middle of a body ----

/// The relay answers 200 with `Content-Length: 1000`, sends a few bytes, then `fault` (a
/// stall or a failed body). The client must see a failed body, never a complete-looking
/// short one, within `pool.request_timeout` for a stall; the failure is counted on the
/// connection, and the next request is served normally.
async fn body_failure_is_not_a_short_answer(protocol: Proto, fault: support::Fault) {
    let idle = Duration::from_millis(800);
    let (relay, sidecar) = start(protocol, |sidecar| {
        sidecar
            .pool_size(1)
            .set_str("pool", "request_timeout", "800ms")
    })
    .await;
    relay.set_fault(fault.clone());
    let started = Instant::now();
    let response = sidecar
        .client()
        .get(sidecar.data_url("/blocks/latest"))
        .send()
        .await
        .expect("the relay's head reaches the client");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some("1000")
    );
    let body = response.bytes().await;
    let waited = started.elapsed();
    assert!(
        body.is_err(),
        "{fault:?} over {}: the client got a body that looks complete: {body:?}",
        protocol.name()
    );
    if fault == support::Fault::StallBody {
        assert!(
            waited >= idle && waited < support::EVENTUALLY,
            "a stalled body is cut after pool.request_timeout ({idle:?}), took {waited:?}"
        );
    }
    relay.heal();
    support::eventually(
        support::EVENTUALLY,
        "the failed body counted on the connection",
        || async {
            let (_, status) = sidecar.get_json("/api/v1/secure-channel/status").await;
            let errors = status["connections"][0]["errors"].as_u64()?;
            (errors >= 1).then_some(())
        },
    )
    .await;
    // The cut is logged, with the connection and why.
    let logged = sidecar
        .logs()
        .into_iter()
        .find(|line| line.contains("the client's connection was cut"));
    let logged = logged.unwrap_or_else(|| {
        panic!(
            "{fault:?}: the cut body is not logged:\n{}",
            sidecar.logs().join("\n")
        )
    });
    assert!(
        logged.contains("WARN") && logged.contains("connection_id=1"),
        "{logged}"
    );
    let after = sidecar
        .client()
        .get(sidecar.data_url("/blocks/latest"))
        .send()
        .await
        .expect("answered after the failure");
    assert_eq!(
        after.status(),
        200,
        "the pool serves again after a failed body"
    );
    assert!(after.bytes().await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_stalling_mid_body_over_h2_is_cut_after_request_timeout() {
    body_failure_is_not_a_short_answer(Proto::H2, support::Fault::StallBody).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_stalling_mid_body_over_http1_is_cut_after_request_timeout() {
    body_failure_is_not_a_short_answer(Proto::Http1, support::Fault::StallBody).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_cutting_a_body_short_over_h2_fails_the_client_body() {
    body_failure_is_not_a_short_answer(Proto::H2, support::Fault::TruncateBody).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_cutting_a_body_short_over_http1_fails_the_client_body() {
    body_failure_is_not_a_short_answer(Proto::Http1, support::Fault::TruncateBody).await;
}

// ---- a client that stops sending its body ----

/// A client streams part of a large upload (more than the 64 KiB the sidecar buffers), then
/// sends nothing more. The relay waits for the rest, so no answer can come: after
/// `pool.request_timeout` the client gets 408 `request_timeout`, not a 504 blaming the relay,
/// and the connection is not judged (with `consecutive_failures = 1` one failure would open
/// its breaker).
async fn stalled_upload_is_the_clients_fault(protocol: Proto) {
    let (relay, sidecar) = start(protocol, |sidecar| {
        sidecar
            .pool_size(1)
            .set_str("pool", "request_timeout", "800ms")
            .set("breaker", "consecutive_failures", "1")
    })
    .await;
    let mut head = b"POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Type: application/octet-stream\r\nContent-Length: 200000\r\n\r\n".to_vec();
    head.extend_from_slice(&[b'x'; 70_000]);
    let started = Instant::now();
    let (mut connection, status) = first_exchange(sidecar.data_addr(), &head).await;
    let waited = started.elapsed();
    assert_eq!(
        status,
        Some(408),
        "over {}: a stalled upload is the client's fault",
        protocol.name()
    );
    assert!(
        waited >= Duration::from_millis(800),
        "answered before pool.request_timeout: {waited:?}"
    );
    // The rest of the body could still come, so the connection carries nothing more.
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut connection, &mut rest),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the client connection is closed after the 408: {closed:?}"
    );
    assert_connection_unharmed(&relay, &sidecar).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_upload_over_h2_gets_408_and_no_breaker_failure() {
    stalled_upload_is_the_clients_fault(Proto::H2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_upload_over_http1_gets_408_and_no_breaker_failure() {
    stalled_upload_is_the_clients_fault(Proto::Http1).await;
}

// ---- a client that stops reading its answer ----

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_off_after_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    // 64 MiB cannot fit in the loopback socket buffers: the sidecar's writes block once the
    // client stops reading. After listener.idle_timeout with no progress the client is cut
    // off and the relay stream is released (in_flight back to 0), instead of being held for
    // as long as the client keeps its connection open.
    let (_relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar
            .pool_size(1)
            .set_str("listener", "idle_timeout", "500ms")
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    stream
        .write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .expect("the request is sent");
    let in_flight = || async {
        let (_, status) = sidecar.get_json("/api/v1/secure-channel/status").await;
        status["connections"][0]["in_flight"].as_u64()
    };
    support::eventually(support::EVENTUALLY, "the download in flight", || async {
        (in_flight().await? == 1).then_some(())
    })
    .await;
    let stuck = Instant::now();
    support::eventually(
        support::EVENTUALLY,
        "the relay stream released after the client stopped reading",
        || async { (in_flight().await? == 0).then_some(()) },
    )
    .await;
    assert!(
        stuck.elapsed() >= Duration::from_millis(300),
        "released before the write clock could run out: {:?}",
        stuck.elapsed()
    );
    drop(stream);
}

// ---- a relay that lies ----

/// A TLS relay on `127.0.0.1:0` (the PKI's certificate, ALPN `http/1.1`) that reads each
/// request head and writes `answer` in reply, whatever was asked; it keeps the connection.
async fn lying_http1_relay(pki: &support::Pki, answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let identity = pki.server_identity();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(identity.chain(), identity.key())
        .expect("an rcgen identity is a valid rustls server identity");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    // One lie per request head (the sidecar's GETs carry no body).
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if tls.write_all(answer).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A ready sidecar with one connection to a [`lying_http1_relay`] that answers `lie`.
async fn behind_lying_http1_relay(lie: &'static [u8]) -> Sidecar {
    let pki = support::Pki::new();
    let addr = lying_http1_relay(&pki, lie).await;
    let sidecar = Sidecar::builder()
        .endpoint(&addr.to_string())
        .server_name("relay.test")
        .pki(pki.clone())
        .pool_size(1)
        .start()
        .await;
    sidecar.wait_ready().await;
    sidecar
}

/// A relay whose answers are not valid HTTP (a status line that is not one, a
/// `Content-Length` that is not a number, two lengths that disagree) costs the client a
/// 502 JSON error that says the relay's answer was bad, never a hang, a crash or a
/// forwarded lie; the sidecar stays healthy and keeps serving its admin API.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_answering_invalid_http_gets_a_502_naming_the_bad_answer() {
    for (what, lie) in [
        ("not HTTP at all", &b"SPRINT OK\r\n\r\n"[..]),
        (
            "a Content-Length that is not a number",
            &b"HTTP/1.1 200 OK\r\ncontent-length: lots\r\n\r\n{}"[..],
        ),
        (
            "two Content-Lengths that disagree",
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 9\r\n\r\n{}"[..],
        ),
    ] {
        let sidecar = behind_lying_http1_relay(lie).await;
        // A GET is retried (idempotent); with the one connection gone, the client is told
        // what the relay did, not that no connection was left. A POST is not retried.
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            // The lie cost the connection; its replacement is dialed after a backoff step.
            sidecar.wait_ready().await;
            let response = support::client()
                .request(method.clone(), sidecar.data_url("/lie"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{what}, {method}: the client gets an answer: {e}"));
            let status = response.status().as_u16();
            let body = response.bytes().await.expect("body");
            let (error, detail) = assert_json_error(status, &body);
            assert_eq!(status, 502, "{what}, {method}: {error}: {detail}");
            assert_eq!(error, "upstream_failed", "{what}, {method}: {detail}");
            assert!(
                detail.contains("relay connection failed: invalid"),
                "{what}, {method}: the detail says the relay's answer was invalid: {detail}"
            );
        }
        assert_eq!(sidecar.admin_status("/health").await, Some(200), "{what}");
    }
}

/// Two relay answers a client cannot use as they are: a 101 to a request that asked for no
/// upgrade is a 502, and an answer with both `Transfer-Encoding: chunked` and a
/// `Content-Length` is forwarded with its chunks' length, never the wrong one (RFC 9112 §6.3).
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_upgrade_nobody_asked_for_is_a_502_and_a_chunked_length_wins() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (what, lie) in [
        (
            "101",
            &b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"[..],
        ),
        (
            "chunked with a content-length",
            &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
        ),
    ] {
        let sidecar = behind_lying_http1_relay(lie).await;
        for client_version in ["HTTP/1.1", "HTTP/1.0"] {
            sidecar.wait_ready().await;
            let mut stream = tokio::net::TcpStream::connect(sidecar.data_addr())
                .await
                .expect("the data listener accepts connections");
            let request = format!(
                "GET /lie HTTP/{v}\r\nHost: app\r\nConnection: {c}\r\n\r\n",
                v = &client_version[5..],
                // An HTTP/1.0 client asking for keep-alive is told `close` when the answer
                // can only end with the connection; a 502 with a length keeps it open.
                c = if client_version == "HTTP/1.0" && what != "101" {
                    "keep-alive"
                } else {
                    "close"
                }
            );
            stream.write_all(request.as_bytes()).await.expect("sent");
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await
                .unwrap_or_else(|_| panic!("{what}, {client_version}: answered and closed"))
                .expect("read");
            let text = String::from_utf8_lossy(&answer).to_lowercase();
            if what == "101" {
                let (error, detail) =
                    assert_json_error(502, support::raw_body(&answer));
                assert_eq!(error, "upstream_failed", "{detail}");
                assert!(detail.contains("101"), "{detail}");
            } else {
                assert_eq!(support::raw_status(&answer), Some(200), "{text}");
                assert!(!text.contains("content-length: 100"), "{text}");
                assert!(text.ends_with("abc") || text.ends_with("abc\r\n0\r\n\r\n"), "{text}");
                if client_version == "HTTP/1.0" {
                    // Read until close: an HTTP/1.0 client must not be promised keep-alive.
                    assert!(text.contains("connection: close"), "{text}");
                    assert!(!text.contains("keep-alive"), "{text}");
                }
            }
        }
        assert_eq!(sidecar.admin_status("/health").await, Some(200), "{what}");
    }
}

/// Relay answers a client cannot use from an h2 relay: a status HTTP does not define, and an
/// answer head larger than `listener.max_header_bytes` (h2's own limit is 16 MiB) are 502s;
/// a head under the limit passes. The relay serves again afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn an_h2_relay_status_past_599_or_an_oversized_answer_head_is_a_502() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set("listener", "max_header_bytes", "16384")
    })
    .await;
    for (fault, expected, mention) in [
        (support::Fault::Status(999), 502, "999"),
        (support::Fault::HugeHeader(40_000), 502, "max_header_bytes"),
        (support::Fault::HugeHeader(4_000), 200, ""),
    ] {
        relay.set_fault(fault.clone());
        let response = support::client()
            .post(sidecar.data_url("/odd-answer"))
            .body("{}")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: an answer: {e}"));
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body");
        assert_eq!(
            status,
            expected,
            "{fault:?}: {}",
            String::from_utf8_lossy(&body)
        );
        if expected == 502 {
            let (error, detail) = assert_json_error(502, &body);
            assert_eq!(error, "upstream_failed", "{fault:?}");
            assert!(detail.contains(mention), "{fault:?}: {detail}");
        }
    }
    relay.set_fault(support::Fault::None);
    sidecar.wait_ready().await;
    let ok = support::client()
        .get(sidecar.data_url("/after"))
        .send()
        .await
        .expect("answered");
    assert_eq!(ok.status(), 200);
}

/// A small body with a declared length is read whole before it is sent (so it can be sent
/// again on a retry): one that arrives in pieces is joined, and one that stops arriving gets
/// 408 at `listener.request_deadline`, with nothing sent to the relay.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_body_arriving_in_pieces_is_joined_and_one_that_stops_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (relay, sidecar) = start(Proto::H2, |sidecar| {
        sidecar.set("listener", "request_deadline", "\"1s\"")
    })
    .await;

    let mut stream = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    stream
        .write_all(b"POST /pieces HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello")
        .await
        .expect("sent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.write_all(b"world").await.expect("sent");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered within 5 s")
        .expect("read");
    assert_eq!(
        support::raw_status(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let record = relay.requests().pop().expect("the relay saw /pieces");
    assert_eq!(&record.body[..], b"helloworld");
    assert!(record.body_complete);

    let mut stream = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    let started = Instant::now();
    stream
        .write_all(b"POST /stops HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .expect("sent");
    let mut answer = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered within 5 s")
        .expect("read");
    let (error, detail) = assert_json_error(408, support::raw_body(&answer[..n]));
    assert_eq!(support::raw_status(&answer[..n]), Some(408));
    assert_eq!(error, "request_timeout");
    assert!(detail.contains("listener.request_deadline"), "{detail}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered at the deadline, not before: {:?}",
        started.elapsed()
    );
    assert_eq!(
        relay.count_path("/stops"),
        0,
        "nothing was sent to the relay"
    );
}

// ---- a request its client gives up on ----

/// An h2c client that resets its stream while the relay has not answered yet: hyper drops
/// the request's future at its `.await`, and the in-flight gauge must still count it out
/// (it used to be taken back only after the `.await`, so each such request stayed counted),
/// and count it as abandoned, not as answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_its_h2c_client_resets_leaves_the_in_flight_gauge() {
    let (relay, sidecar) = start(Proto::H2, |sidecar| sidecar).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an h2c client");
    let gauge = "sprint_sidecar_in_flight_requests";
    for _ in 0..3 {
        let request = client.get(sidecar.data_url("/delay/3000")).send();
        // Dropping the pending response resets the stream (RST_STREAM CANCEL).
        let gave_up = tokio::time::timeout(Duration::from_millis(300), request).await;
        assert!(gave_up.is_err(), "the relay answers only after 3 s");
    }
    assert_eq!(relay.requests().len(), 3, "all three reached the relay");
    support::eventually(
        support::EVENTUALLY,
        "no request counted in flight once their clients gave up",
        || async { (sidecar.metric(gauge).await == 0.0).then_some(()) },
    )
    .await;
    assert_eq!(
        sidecar
            .metric("sprint_sidecar_requests_abandoned_total")
            .await,
        3.0
    );
    let answered_series = "sprint_sidecar_requests_total{method=\"GET\",status_class=\"2xx\"}";
    assert!(
        !sidecar.metrics_text().await.contains(answered_series),
        "no abandoned request counted as answered"
    );
    // And one that is answered is counted out as before, and not as abandoned.
    let answered = client
        .get(sidecar.data_url("/"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(answered.status(), 200);
    assert_eq!(sidecar.metric(gauge).await, 0.0);
    assert_eq!(sidecar.metric(answered_series).await, 1.0);
    assert_eq!(
        sidecar
            .metric("sprint_sidecar_requests_abandoned_total")
            .await,
        3.0
    );
}
