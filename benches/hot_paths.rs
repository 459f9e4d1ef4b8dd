//! Criterion micro-benches of the per-request hot paths, each beside the alternative it
//! teaches something against (STYLE habit 15), with a ratio summary printed at the end.
//!
//! ```text
//!  latency_record   LatencyWindow::record (relaxed atomics) vs a Mutex<Vec<Duration>> ring,
//!                   1 thread and 4 threads recording into the same window
//!  latency_read     Histogram::quantile_ms, the ejector's histogram()+p95, vs sorting the ring
//!  breaker          Breaker::admit + on_success, bare and behind the Mutex the pool uses
//!  retry_budget     RetryBudget::record_request (every request) and try_withdraw (failures)
//!  hop_by_hop       proxy::strip_hop_by_hop on typical request/response header maps
//!  host_check       proxy::valid_host (a byte table, every HTTP/1.1 request) vs parsing the
//!                   value as an http::uri::Authority
//!  credential       TokenCredential::header_value (what each request pays: a clone of the
//!                   value shared from the locked pages) vs secret::header_value (expose:
//!                   two mprotect calls and a copy, what it paid before), from_slice +
//!                   header_value, a plain Vec
//!  wiping_alloc     alloc + free through the WipingAllocator, wipe on vs off
//! ```
//!
//! Run: `cargo bench --bench hot_paths` (append `-- <filter>` for one group). The binary
//! installs the same global allocator as `sprint-sidecar`; wiping is switched on only where a
//! bench says so (the `credential` group runs with it on, as the default config does).

use std::hint::black_box;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use sprint_sidecar::config::BreakerConfig;
use sprint_sidecar::credential::TokenCredential;
use sprint_sidecar::latency::{Histogram, LatencyWindow};
use sprint_sidecar::proxy::{strip_hop_by_hop, valid_host};
use sprint_sidecar::secret::{self, SecureBuffer, WipingAllocator};
use sprint_sidecar::upstream::CredentialSource;
use sprint_sidecar::upstream::breaker::Breaker;
use sprint_sidecar::upstream::retry::RetryBudget;

#[global_allocator]
static GLOBAL: WipingAllocator = WipingAllocator;

/// Threads recording into one window in the contended benches (the machine these figures
/// were taken on has 2 cores, so 4 threads also measure preemption of a lock holder).
const CONTENDED_THREADS: usize = 4;

/// Samples the naive ring keeps (a bounded baseline: 4096 × 16 bytes).
const RING_CAPACITY: usize = 4096;

/// A representative token: `Bearer ` and 64 characters.
const TOKEN: &[u8] = b"Bearer 3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a";

/// Latencies cycled through by the recording benches (0.1 ms .. ~50 ms, spread over buckets).
fn sample_latencies() -> Vec<Duration> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..1024)
        .map(|_| Duration::from_micros(100 + rng.u64(0..50_000)))
        .collect()
}

// ---- the naive baseline ----------------------------------------------------------------

/// The obvious alternative to `LatencyWindow`: the last N samples in a `Vec` behind a lock.
struct NaiveRing {
    samples: Vec<Duration>,
    next: usize,
}

impl NaiveRing {
    fn new() -> Mutex<Self> {
        Mutex::new(NaiveRing {
            samples: Vec::with_capacity(RING_CAPACITY),
            next: 0,
        })
    }

    fn record(ring: &Mutex<Self>, latency: Duration) {
        let mut ring = ring
            .lock()
            .expect("bench threads never panic holding the ring");
        if ring.samples.len() < RING_CAPACITY {
            ring.samples.push(latency);
        } else {
            let at = ring.next;
            ring.samples[at] = latency;
        }
        ring.next = (ring.next + 1) % RING_CAPACITY;
    }

    /// Quantile the naive way: copy out under the lock, sort, index.
    fn quantile_ms(ring: &Mutex<Self>, q: f64) -> f64 {
        let mut copy = ring
            .lock()
            .expect("bench threads never panic holding the ring")
            .samples
            .clone();
        if copy.is_empty() {
            return 0.0;
        }
        copy.sort_unstable();
        let rank = ((q * copy.len() as f64).ceil() as usize).clamp(1, copy.len());
        copy[rank - 1].as_secs_f64() * 1000.0
    }
}

/// Runs `per_thread(thread_index, iterations)` on `threads` threads released together by a
/// barrier and returns the wall time from the first thread's start to the last thread's
/// finish (spawning excluded). The `iters` of criterion are split between the threads, so
/// the reported time is wall time per operation of the whole group: the inverse of
/// aggregate throughput (lower than single-threaded only if the work scales).
fn contended(threads: usize, iters: u64, per_thread: impl Fn(usize, u64) + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    let share = iters.div_ceil(threads as u64).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|index| {
                let barrier = &barrier;
                let per_thread = &per_thread;
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    per_thread(index, share);
                    (start, Instant::now())
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> = handles
            .into_iter()
            .map(|handle| handle.join().expect("bench threads never panic"))
            .collect();
        let first = spans.iter().map(|span| span.0).min().expect("one thread");
        let last = spans.iter().map(|span| span.1).max().expect("one thread");
        // Scale back to `iters` operations when the split rounded up.
        (last - first).mul_f64(iters as f64 / (share * threads as u64) as f64)
    })
}

// ---- latency ---------------------------------------------------------------------------

fn latency_record(c: &mut Criterion) {
    let latencies = sample_latencies();
    let mut group = c.benchmark_group("latency_record");

    let window = LatencyWindow::new();
    group.bench_function("atomic_window_1_thread", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            window.record(5_000, latencies[i & 1023]);
        })
    });

    let ring = NaiveRing::new();
    group.bench_function("mutex_ring_1_thread", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            NaiveRing::record(&ring, latencies[i & 1023]);
        })
    });

    let window = LatencyWindow::new();
    group.bench_function("atomic_window_4_threads", |b| {
        b.iter_custom(|iters| {
            contended(CONTENDED_THREADS, iters, |thread, n| {
                for i in 0..n as usize {
                    window.record(5_000, latencies[(i + thread * 17) & 1023]);
                }
            })
        })
    });

    let ring = NaiveRing::new();
    group.bench_function("mutex_ring_4_threads", |b| {
        b.iter_custom(|iters| {
            contended(CONTENDED_THREADS, iters, |thread, n| {
                for i in 0..n as usize {
                    NaiveRing::record(&ring, latencies[(i + thread * 17) & 1023]);
                }
            })
        })
    });
    group.finish();
}

fn latency_read(c: &mut Criterion) {
    let latencies = sample_latencies();
    let window = LatencyWindow::new();
    let ring = NaiveRing::new();
    for i in 0..10_000 {
        let latency = latencies[i & 1023];
        window.record(5_000, latency);
        NaiveRing::record(&ring, latency);
    }
    let histogram: Histogram = window.histogram(5_000);
    let mut group = c.benchmark_group("latency_read");
    group.bench_function("histogram_quantile_p99", |b| {
        b.iter(|| black_box(&histogram).quantile_ms(black_box(0.99)))
    });
    // What the slow-connection ejector and the admin API do per connection: merge the six
    // slices of the window into a histogram, then read a quantile.
    group.bench_function("window_histogram_then_p95", |b| {
        b.iter(|| black_box(&window).histogram(5_000).quantile_ms(0.95))
    });
    group.bench_function("mutex_ring_sort_p99", |b| {
        b.iter(|| NaiveRing::quantile_ms(black_box(&ring), 0.99))
    });
    group.finish();
}

// ---- breaker and retry budget -----------------------------------------------------------

fn breaker_config() -> BreakerConfig {
    // The defaults of sidecar.toml.
    BreakerConfig {
        consecutive_failures: 5,
        failure_rate: 0.5,
        min_requests: 20,
        window: Duration::from_secs(10),
        open_duration: Duration::from_secs(5),
        max_open_duration: Duration::from_secs(60),
    }
}

fn breaker(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker");
    let origin = tokio::time::Instant::now();

    // Time advances 1 µs per request, so the failure-rate window rotates its slices as in
    // a busy proxy.
    let mut bare = Breaker::new(breaker_config(), origin);
    group.bench_function("admit_on_success", |b| {
        let mut micros = 0u64;
        b.iter(|| {
            micros += 1;
            let now = origin + Duration::from_micros(micros);
            let (admission, _) = bare
                .admit(black_box(now))
                .expect("a closed breaker admits every request");
            black_box(bare.on_success(admission, now))
        })
    });

    // How the pool calls it: `Slot::with_breaker` locks a std Mutex for each of the two.
    let locked = Mutex::new(Breaker::new(breaker_config(), origin));
    group.bench_function("mutex_admit_on_success", |b| {
        let mut micros = 0u64;
        b.iter(|| {
            micros += 1;
            let now = origin + Duration::from_micros(micros);
            let (admission, _) = locked
                .lock()
                .expect("no panics while locked")
                .admit(black_box(now))
                .expect("a closed breaker admits every request");
            black_box(
                locked
                    .lock()
                    .expect("no panics while locked")
                    .on_success(admission, now),
            )
        })
    });
    group.finish();
}

fn retry_budget(c: &mut Criterion) {
    let mut group = c.benchmark_group("retry_budget");
    let origin = tokio::time::Instant::now();

    let mut budget = RetryBudget::new(0.2, origin);
    group.bench_function("record_request", |b| {
        let mut micros = 0u64;
        b.iter(|| {
            micros += 1;
            budget.record_request(black_box(origin + Duration::from_micros(micros)));
        })
    });

    // `try_withdraw` alone, time fixed (it sums the window's slices either way): a budget
    // that always grants (each grant also counts the retry), and one already exhausted.
    let now = origin + Duration::from_secs(1);
    let mut granting = RetryBudget::new(1e12, origin);
    granting.record_request(now);
    group.bench_function("try_withdraw_granted", |b| {
        b.iter(|| black_box(granting.try_withdraw(black_box(now))))
    });
    let mut exhausted = RetryBudget::new(0.0, origin);
    while exhausted.try_withdraw(now) {}
    group.bench_function("try_withdraw_refused", |b| {
        b.iter(|| black_box(exhausted.try_withdraw(black_box(now))))
    });
    group.finish();
}

// ---- header rewriting -------------------------------------------------------------------

/// Request headers of a typical JSON-RPC client (an HTTP/1.1 library with keep-alive).
fn typical_request_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9090"));
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("bitcoin-sprint-client/1.4 (rust; hyper)"),
    );
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("104"));
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("0f8e2d4c-6b1a-4e3f-9c7d-5a2b8e1f0c3d"),
    );
    headers
}

/// The same request as sent by a client that names extra hop-by-hop headers in
/// `Connection` and asks for trailers: the slow path (names parsed, more removals).
fn hop_heavy_request_headers() -> HeaderMap {
    let mut headers = typical_request_headers();
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-hop-trace, upgrade"),
    );
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    headers.insert("x-hop-trace", HeaderValue::from_static("abc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(
        header::PROXY_AUTHORIZATION,
        HeaderValue::from_static("Basic Zm9vOmJhcg=="),
    );
    headers
}

/// The relay's answer headers (what the sidecar strips on the way back).
fn typical_response_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("131"));
    headers.insert(
        header::DATE,
        HeaderValue::from_static("Tue, 02 Jun 2026 10:00:00 GMT"),
    );
    headers.insert("x-relay-connection-id", HeaderValue::from_static("3"));
    headers
}

/// The alternative measured beside `strip_hop_by_hop`: the first, naive version — collect
/// the names the `Connection` header lists, then remove each of eight fixed hop-by-hop names
/// whether present or not (eight hash lookups on every request and response). Same result.
fn strip_hop_by_hop_naive(headers: &mut HeaderMap) {
    let fixed = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ];
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &fixed {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// Host header values as apps send them, all valid.
const HOSTS: [&[u8]; 4] = [
    b"127.0.0.1:9090",
    b"localhost:9090",
    b"relay.bitcoin-sprint.inc:443",
    b"[::1]:9090",
];

/// The alternative measured beside `valid_host`: parse the value as a URI authority (which
/// also admits user info, so that is refused on top).
fn valid_host_by_authority(value: &[u8]) -> bool {
    !value.contains(&b'@') && http::uri::Authority::try_from(value).is_ok()
}

fn host_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_check");
    for host in HOSTS {
        assert!(valid_host(host) && valid_host_by_authority(host));
    }
    group.bench_function("byte_table", |b| {
        b.iter(|| HOSTS.iter().filter(|h| valid_host(black_box(h))).count())
    });
    group.bench_function("authority_parse", |b| {
        b.iter(|| {
            HOSTS
                .iter()
                .filter(|h| valid_host_by_authority(black_box(h)))
                .count()
        })
    });
    group.finish();
}

fn hop_by_hop(c: &mut Criterion) {
    let mut group = c.benchmark_group("hop_by_hop");
    for (name, make) in [
        (
            "strip_typical_request",
            typical_request_headers as fn() -> HeaderMap,
        ),
        ("strip_hop_heavy_request", hop_heavy_request_headers),
        ("strip_typical_response", typical_response_headers),
    ] {
        let template = make();
        let (mut ours, mut naive) = (template.clone(), template.clone());
        strip_hop_by_hop(&mut ours);
        strip_hop_by_hop_naive(&mut naive);
        assert_eq!(
            ours, naive,
            "the naive alternative must strip exactly the same headers"
        );
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || template.clone(),
                |headers| strip_hop_by_hop(black_box(headers)),
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("{name}_naive_alternative"), |b| {
            b.iter_batched_ref(
                || template.clone(),
                |headers| strip_hop_by_hop_naive(black_box(headers)),
                BatchSize::SmallInput,
            )
        });
    }
    // For scale: what the clone of the header map costs that `Upstream::attempt` makes per
    // attempt (`*req.headers_mut() = head.headers.clone()`).
    let template = typical_request_headers();
    group.bench_function("clone_typical_request", |b| {
        b.iter(|| black_box(&template).clone())
    });
    group.finish();
}

// ---- credential -------------------------------------------------------------------------

fn credential(c: &mut Criterion) {
    // As deployed: `memory.wipe_freed_memory = true` by default.
    secret::set_wipe_on_free(true);
    let mut group = c.benchmark_group("credential");

    let buffer = SecureBuffer::from_slice(TOKEN).expect("secure memory can be allocated");
    // Per request: expose (mprotect PROT_READ, copy into a HeaderValue, mprotect PROT_NONE).
    group.bench_function("header_value_live_buffer", |b| {
        b.iter(|| secret::header_value(black_box(&buffer)).expect("a valid token"))
    });

    // Per request as shipped: the credential's shared header value, cloned (the pages stay
    // readable while traffic flows; the idle sweep is not running here).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("token");
    std::fs::write(&path, TOKEN).expect("the token file can be written");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("the token file mode can be set");
    let live = TokenCredential::from_file(path, false).expect("a valid token file");
    group.bench_function("token_credential_path", |b| {
        b.iter(|| black_box(&live).header_value().expect("a valid token"))
    });
    // The same on two threads at once, as two tokio workers do.
    group.bench_function("token_credential_path_2_threads", |b| {
        b.iter_custom(|iters| {
            contended(2, iters, |_, n| {
                for _ in 0..n {
                    black_box(live.header_value().expect("a valid token"));
                }
            })
        })
    });

    // Two threads exposing the same buffer at once, as two tokio workers do: the readers
    // count serialises them and mprotect on a multi-threaded process shoots down TLBs.
    group.bench_function("header_value_live_buffer_2_threads", |b| {
        b.iter_custom(|iters| {
            contended(2, iters, |_, n| {
                for _ in 0..n {
                    black_box(secret::header_value(&buffer).expect("a valid token"));
                }
            })
        })
    });

    // The brief's figure: a fresh SecureBuffer (mmap, mlock, guard pages, registry) and its
    // header value, then both dropped (munlock, wipe, munmap).
    group.bench_function("from_slice_then_header_value", |b| {
        b.iter(|| {
            let buffer = SecureBuffer::from_slice(black_box(TOKEN)).expect("secure memory");
            secret::header_value(&buffer).expect("a valid token")
        })
    });

    // Baselines: the token in ordinary heap memory, and a cached sensitive HeaderValue
    // (a refcount bump; the copy then lives for the process lifetime, outside SecureBuffer).
    let plain = TOKEN.to_vec();
    group.bench_function("plain_vec_header_value", |b| {
        b.iter(|| {
            let mut value = HeaderValue::from_bytes(black_box(&plain)).expect("a valid token");
            value.set_sensitive(true);
            value
        })
    });
    let cached = secret::header_value(&buffer).expect("a valid token");
    group.bench_function("cached_header_value_clone", |b| {
        b.iter(|| black_box(&cached).clone())
    });
    group.finish();
    secret::set_wipe_on_free(false);
}

// ---- wiping allocator ----------------------------------------------------------------------

fn wiping_alloc(c: &mut Criterion) {
    let mut group = c.benchmark_group("wiping_alloc");
    for size in [64usize, 4096, 65536] {
        for wipe in [false, true] {
            let name = format!("alloc_free_{size}_wipe_{}", if wipe { "on" } else { "off" });
            group.bench_function(name.as_str(), |b| {
                secret::set_wipe_on_free(wipe);
                b.iter(|| {
                    let mut block = Vec::<u8>::with_capacity(black_box(size));
                    block.push(1);
                    black_box(&block);
                });
                secret::set_wipe_on_free(false);
            });
        }
    }
    group.finish();
}

// ---- summary --------------------------------------------------------------------------------

/// Mean ns/op of `group/bench` from criterion's `estimates.json` of this run.
fn mean_ns(root: &std::path::Path, group: &str, bench: &str) -> Option<f64> {
    let path = root.join(group).join(bench).join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let document: serde_json::Value = serde_json::from_str(&text).ok()?;
    document["mean"]["point_estimate"].as_f64()
}

fn criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion")
}

/// Prints the ratios the benches exist for (skipping pairs that were filtered out).
fn print_summary() {
    let root = criterion_dir();
    let pairs: [(&str, &str, &str, &str); 13] = [
        (
            "host_check",
            "authority_parse",
            "byte_table",
            "Host as a URI authority / byte table (4 values)",
        ),
        (
            "latency_record",
            "mutex_ring_1_thread",
            "atomic_window_1_thread",
            "naive Mutex ring / atomic LatencyWindow, 1 thread",
        ),
        (
            "latency_record",
            "mutex_ring_4_threads",
            "atomic_window_4_threads",
            "naive Mutex ring / atomic LatencyWindow, 4 threads",
        ),
        (
            "latency_read",
            "mutex_ring_sort_p99",
            "histogram_quantile_p99",
            "sorting the ring / Histogram::quantile_ms",
        ),
        (
            "breaker",
            "mutex_admit_on_success",
            "admit_on_success",
            "breaker behind a Mutex / bare",
        ),
        (
            "hop_by_hop",
            "strip_typical_request",
            "strip_typical_request_naive_alternative",
            "strip_hop_by_hop / naive alternative, request",
        ),
        (
            "hop_by_hop",
            "strip_typical_response",
            "strip_typical_response_naive_alternative",
            "strip_hop_by_hop / naive alternative, response",
        ),
        (
            "credential",
            "header_value_live_buffer",
            "token_credential_path",
            "expose per request / shared value (shipped)",
        ),
        (
            "credential",
            "token_credential_path",
            "cached_header_value_clone",
            "shared value (shipped) / bare HeaderValue clone",
        ),
        (
            "credential",
            "header_value_live_buffer",
            "plain_vec_header_value",
            "SecureBuffer header_value / plain Vec",
        ),
        (
            "credential",
            "header_value_live_buffer_2_threads",
            "header_value_live_buffer",
            "header_value 2 threads (wall/op) / 1 thread",
        ),
        (
            "credential",
            "from_slice_then_header_value",
            "header_value_live_buffer",
            "from_slice + header_value / header_value",
        ),
        (
            "wiping_alloc",
            "alloc_free_4096_wipe_on",
            "alloc_free_4096_wipe_off",
            "alloc+free 4 KiB, wipe on / off",
        ),
    ];
    println!(
        "\nratios of this run (mean ns/op, from {}):",
        root.display()
    );
    for (group, numerator, denominator, label) in pairs {
        if let (Some(a), Some(b)) = (
            mean_ns(&root, group, numerator),
            mean_ns(&root, group, denominator),
        ) {
            println!("  {label:<52} {a:>10.1} / {b:>8.1} ns = {:>6.2}x", a / b);
        }
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .configure_from_args();
    let groups: [fn(&mut Criterion); 8] = [
        latency_record,
        latency_read,
        breaker,
        retry_budget,
        hop_by_hop,
        host_check,
        credential,
        wiping_alloc,
    ];
    for group in groups {
        group(&mut criterion);
    }
    criterion.final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this in test mode, where
    // nothing is measured and there is nothing to summarise.
    if std::env::args().any(|arg| arg == "--bench") {
        print_summary();
    }
}
