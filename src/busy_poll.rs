//! Busy polling (`runtime.busy_poll`): while an event loop under load sleeps for its next
//! event, a spinner thread in the idle scheduling class keeps the loop's core awake, so the
//! event that ends the sleep finds a running core instead of a halted one.
//!
//! Sleeping is not free. A loop that sleeps in `epoll_wait` may leave its core with nothing
//! to run, and on a virtual machine such a core halts: the hypervisor takes the physical core
//! back, and the next byte for the loop (from an application or the relay) must first get
//! the hypervisor to schedule the virtual core again; the loop then resumes on cold caches.
//! Under load a loop sleeps a thousand times a second or more, for gaps of tens to hundreds
//! of microseconds, and when the host is busy those wake-ups decide the throughput. Measured
//! on a 2-core VM with one core per proxy (README, Performance): 50 000–58 000 requests a
//! second while the sidecar's core halted, 78 000–80 000 with it kept awake; nginx, which
//! sleeps for shorter gaps, lost little either way.
//!
//! The spinner takes nothing from anyone. In the idle class (`SCHED_IDLE`) it runs only when
//! no other thread wants the core, and any thread that wakes there (the loop itself, an
//! application, the relay) takes the core at once. So it needs no spare core and no
//! particular priority. Its CPU time is the sidecar's, and counts in every figure of it.
//!
//! It spins only while that pays:
//!
//! * only while the loop sleeps with at least [`MIN_IN_FLIGHT`] requests waiting for the
//!   relay's answers (the loop tells as it goes to sleep, [`before_park`]): answers are due
//!   any moment. A sidecar serving a few clients, or one client request after request,
//!   never spins;
//! * a spin lasts until the loop wakes, or at most one [`Window`]: the window adapts like a
//!   hypervisor's halt polling, doubling (up to `busy_poll`) when the loop woke soon after
//!   the window ran out, halving when it slept longer than `busy_poll` anyway;
//! * spins that run their window out are lost time; once they add up to
//!   [`MAX_MISSED_SHARE`] of a second, the spinner rests until the second is over. A relay
//!   that stalls with many requests in flight thus costs at most that share of a core;
//! * only while a [`Trial`] finds that it makes answers faster: one period of 100 ms in ten
//!   runs the other mode, and spinning stays in force only while the median of the last
//!   three probes says it takes more than 3% off the mean or the 99th percentile answer
//!   time (one probe that takes 7% off the mean turns it back on at once). On a slow host a
//!   halted core cost a third of the throughput (twentieth session); on a fast one nothing,
//!   while spinning cost 16% more CPU per request (twenty-sixth session). Off, the loop's
//!   sleeps wake nobody;
//! * all spinning in a second, caught or lost, stays below the loop's own running time in it
//!   (plus [`SPIN_SLACK`]): busy polling at most doubles what the loop costs. At full load
//!   the loop runs most of the time and the bound is never reached; at a moderate load whose
//!   events come less than `busy_poll` apart, spinning through every gap would hold the core
//!   at 100%.
//!
//! A spinning core is not idle to the scheduler in one respect: a core about to go idle
//! takes a waiting thread from a busier core at once (new-idle balancing), and one that runs
//! the spinner does not. Where threads wait for a core (more runnable threads than cores,
//! [`Crowding`]: an application, its load and the relay sharing two cores), that would keep
//! them waiting. So while it spins it looks, about once a millisecond, at how much of the
//! time threads waited for a core (the kernel's pressure stall information), and from 10%
//! it rests for [`CROWDED_REST`], 10 ms, and looks again (measured with wrk, the relay and
//! the sidecar on two cores, where threads wait 30–80% of the time: 12% fewer requests a
//! second without this check; with each proxy and the load on a core of their own, 1%).
//! The rest is short because most of what trips the check where cores are not shared is a
//! stall of the whole machine for a few milliseconds: resting 100 ms after each left the
//! loop's core halting between events for that long, and those rests, 5.6% of the time in
//! the pinned load harness, held 22% of the requests slower than p99 (p99 2.5 ms during a
//! rest against 1.0 ms outside). Where threads keep waiting, each look trips it again.
//!
//! Busy polling stands down under a cgroup CPU quota (a container's CPU limit,
//! [`cpu_quota`]): there every spin counts against the quota, idle class or not, and a loop
//! whose quota went to spinning is throttled.
//!
//! The spinner follows its loop: its affinity is the core the loop last went to sleep on,
//! and while the loop runs it waits behind it there.
//!
//! ```text
//!  loop:     run ─ sleep (8+ in flight) ─────── wake ─ run ─ sleep ─ ...
//!  spinner:  wait ─ spin (the core stays up) ── yield ─ wait ─ spin ─ ...
//!                   └─ window out, no wake-up: the spinner sleeps until the next sleep
//! ```

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::secret::sys;

/// Requests of a loop waiting for their answers from which its sleeps are spun through:
/// with fewer, the next event is rarely close enough to be worth a core's time.
pub const MIN_IN_FLIGHT: u32 = 8;

/// The most of each second ([`Window`]'s cap) that spins running their window out may
/// take: 10%.
pub const MAX_MISSED_SHARE: Duration = Duration::from_millis(100);

/// The window a spinner starts with, and the shortest it shrinks to.
pub const FIRST_WINDOW: Duration = Duration::from_micros(50);
pub const SHORTEST_WINDOW: Duration = Duration::from_micros(20);

/// Spinning a period may take beyond the loop's own work in it, so that a loop that has
/// just become busy can be spun for at once.
pub const SPIN_SLACK: Duration = Duration::from_millis(10);

/// The period over which spinning is capped.
const CAP_PERIOD: Duration = Duration::from_secs(1);

/// Spin iterations between two looks at whether threads wait for a core (each look reads
/// `/proc/loadavg`, about a microsecond; 16 iterations take about as long).
const CROWDING_EVERY: u32 = 16;

/// How long the spinner rests once it found threads waiting for a core, before it looks
/// again (see the module docs: short, so a stall of a few milliseconds costs no more).
const CROWDED_REST: Duration = Duration::from_millis(10);

/// How long the spinner waits behind a running loop before it sleeps: only a loop that moved
/// to another core keeps it waiting that long, and it must not spin there.
const RUNNING_LIMIT: Duration = Duration::from_millis(2);

// ---- the spin window (pure) -----------------------------------------------------------------

/// How long a spin may last, adapted to the loop's sleeps, and the caps on spinning: lost
/// spinning at most [`MAX_MISSED_SHARE`] of each period, all spinning at most the loop's own
/// work in the period plus [`SPIN_SLACK`].
#[derive(Debug, Clone)]
pub struct Window {
    /// `runtime.busy_poll`: the longest window.
    budget: Duration,
    current: Duration,
    period_start: Instant,
    missed: Duration,
    /// The spinner's CPU time so far ([`Window::record_spinning`]) and at the period's start.
    spun: Duration,
    spun_at_start: Duration,
    /// The loop's running time so far ([`Window::record_work`]) and at the period's start.
    work: Duration,
    work_at_start: Duration,
}

impl Window {
    /// Windows up to `budget`; a zero budget never spins.
    pub fn new(budget: Duration, now: Instant) -> Self {
        Window {
            budget,
            current: FIRST_WINDOW.min(budget),
            period_start: now,
            missed: Duration::ZERO,
            spun: Duration::ZERO,
            spun_at_start: Duration::ZERO,
            work: Duration::ZERO,
            work_at_start: Duration::ZERO,
        }
    }

    /// How long the next spin may last.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The loop has run for `total` so far (since busy polling started).
    pub fn record_work(&mut self, total: Duration) {
        self.work = self.work.max(total);
    }

    /// Whether a spin that has lasted `spinning_for` may go on (or start) at `now`: not with
    /// a zero budget, nor over either cap.
    pub fn may_spin(&mut self, now: Instant, spinning_for: Duration) -> bool {
        self.roll(now);
        let work = self.work.saturating_sub(self.work_at_start);
        let spun = self.spun.saturating_sub(self.spun_at_start);
        !self.budget.is_zero()
            && self.missed < MAX_MISSED_SHARE
            && spun + spinning_for < work + SPIN_SLACK
    }

    /// The spinner has used `total` CPU time so far (measured, not inferred: a spinner that
    /// sees its loop wake only when it runs again cannot tell when its spin ended).
    pub fn record_spinning(&mut self, total: Duration) {
        self.spun = self.spun.max(total);
    }

    /// A spin ran its window out at `now`, `lost` spent without the loop waking.
    pub fn missed(&mut self, now: Instant, lost: Duration) {
        self.roll(now);
        self.missed += lost;
    }

    /// After a spin ran its window out, the loop's sleep turned out to last `slept` in all:
    /// within `busy_poll`, a longer window would have caught it, so the window doubles;
    /// longer, spinning could not have, so it halves.
    pub fn settle(&mut self, slept: Duration) {
        self.current = if slept <= self.budget {
            (self.current * 2).min(self.budget)
        } else {
            (self.current / 2).max(SHORTEST_WINDOW.min(self.budget))
        };
    }

    /// How long until the cap's period ends.
    pub fn until_next_period(&self, now: Instant) -> Duration {
        (self.period_start + CAP_PERIOD).saturating_duration_since(now)
    }

    fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.period_start) >= CAP_PERIOD {
            self.period_start = now;
            self.missed = Duration::ZERO;
            self.spun_at_start = self.spun;
            self.work_at_start = self.work;
        }
    }
}

/// What the loop is doing (the low two bits of [`Shared::state`]; the rest counts changes,
/// so the spinner sees each one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopState {
    Running,
    /// Asleep with [`MIN_IN_FLIGHT`] or more requests waiting for answers.
    AsleepBusy,
    /// Asleep with fewer.
    AsleepIdle,
}

const KIND: u32 = 0b11;

impl LoopState {
    fn bits(self) -> u32 {
        match self {
            LoopState::Running => 0,
            LoopState::AsleepBusy => 1,
            LoopState::AsleepIdle => 2,
        }
    }

    fn of(word: u32) -> Self {
        match word & KIND {
            0 => LoopState::Running,
            1 => LoopState::AsleepBusy,
            _ => LoopState::AsleepIdle,
        }
    }
}

/// The spinner's next move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Keep spinning (or waiting behind the running loop).
    Spin,
    /// The window ran out with the loop still asleep, this long spun: sleep.
    Missed(Duration),
    /// Sleep until the loop next sleeps under load.
    Sleep,
    /// Over the cap, or threads wait for a core: rest this long, whatever the loop does.
    Rest(Duration),
}

/// The spinner's next move with the loop in `state` since `since` (when the spinner saw
/// it change).
pub fn next_step(state: LoopState, since: Instant, now: Instant, window: &mut Window) -> Step {
    let elapsed = now.saturating_duration_since(since);
    match state {
        LoopState::AsleepBusy if !window.may_spin(now, elapsed) => {
            Step::Rest(window.until_next_period(now))
        }
        LoopState::AsleepBusy if elapsed >= window.current() => {
            window.missed(now, elapsed);
            Step::Missed(elapsed)
        }
        LoopState::AsleepBusy => Step::Spin,
        LoopState::Running if elapsed < RUNNING_LIMIT => Step::Spin,
        LoopState::Running | LoopState::AsleepIdle => Step::Sleep,
    }
}

// ---- where it stands down -------------------------------------------------------------------

/// The CPU quota of this process's cgroup in cores (cgroup v2 `cpu.max`, or v1
/// `cpu.cfs_quota_us` over `cpu.cfs_period_us`), `None` when there is none. Under a quota
/// every spin counts against it, idle class or not, and a loop that spends its quota
/// spinning is throttled: busy polling stands down there.
pub fn cpu_quota() -> Option<f64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if let Some(path) = cgroup.lines().find_map(|line| line.strip_prefix("0::")) {
        let file = format!("/sys/fs/cgroup{}/cpu.max", path.trim_end_matches('/'));
        if let Ok(text) = std::fs::read_to_string(file) {
            return parse_cpu_max(&text);
        }
    }
    // cgroup v1: the hierarchy whose controllers include `cpu`.
    let path = cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let controllers = fields.nth(1)?;
        let path = fields.next()?;
        controllers.split(',').any(|c| c == "cpu").then_some(path)
    })?;
    let dir = format!("/sys/fs/cgroup/cpu{}", path.trim_end_matches('/'));
    let quota = std::fs::read_to_string(format!("{dir}/cpu.cfs_quota_us")).ok()?;
    let period = std::fs::read_to_string(format!("{dir}/cpu.cfs_period_us")).ok()?;
    parse_cpu_max(&format!("{} {}", quota.trim(), period.trim()))
}

/// A quota of cgroup v2's `cpu.max` form (`QUOTA PERIOD`, `max` or a negative quota for
/// none) in cores.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// Whether threads wait for a core. From the kernel's pressure stall information
/// (`/proc/pressure/cpu`, `some ... total=`): the share of time some thread waited for a
/// core since the last look, at least [`PRESSURE_SAMPLE`] ago, crowded from
/// [`CROWDED_STALL`]. Measured on two cores: 1% with each proxy and the load on a core of
/// their own, 30–80% with wrk, the relay and the proxy sharing both. Where the kernel has
/// no pressure information: more runnable threads in the machine (the spinner counts)
/// than cores online, from `/proc/loadavg` (which transient wake-ups also trip).
pub struct Crowding {
    source: Source,
    cores: usize,
    last: Option<(Instant, u64)>,
    buffer: [u8; 256],
}

enum Source {
    Pressure(std::fs::File),
    Loadavg(std::fs::File),
    Nothing,
}

/// The shortest span over which stall time is compared.
pub const PRESSURE_SAMPLE: Duration = Duration::from_millis(1);

/// The share of time with some thread waiting for a core from which the spinner rests.
pub const CROWDED_STALL: f64 = 0.10;

impl Crowding {
    /// Opens the pressure file (else `/proc/loadavg`) once; where neither can be read,
    /// never crowded.
    pub fn new() -> Self {
        let readable = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|_| std::fs::File::open(path).ok())
        };
        let source = match readable("/proc/pressure/cpu") {
            Some(file) => Source::Pressure(file),
            None => readable("/proc/loadavg").map_or(Source::Nothing, Source::Loadavg),
        };
        Crowding {
            source,
            cores: sys::online_cpus(),
            last: None,
            buffer: [0; 256],
        }
    }

    /// Whether some thread waits for a core, as of `now`.
    pub fn crowded(&mut self, now: Instant) -> bool {
        use std::os::unix::fs::FileExt;
        let file = match &self.source {
            Source::Pressure(file) | Source::Loadavg(file) => file,
            Source::Nothing => return false,
        };
        if let (Source::Pressure(_), Some((at, _))) = (&self.source, self.last)
            && now.saturating_duration_since(at) < PRESSURE_SAMPLE
        {
            return false;
        }
        let Ok(len) = file.read_at(&mut self.buffer, 0) else {
            return false;
        };
        let Ok(text) = std::str::from_utf8(&self.buffer[..len]) else {
            return false;
        };
        match self.source {
            Source::Pressure(_) => {
                let Some(total) = stalled_micros(text) else {
                    return false;
                };
                let previous = self.last.replace((now, total));
                previous.is_some_and(|(at, before)| {
                    stall_share(before, total, now.saturating_duration_since(at)) >= CROWDED_STALL
                })
            }
            _ => runnable_threads(text).is_some_and(|runnable| runnable > self.cores),
        }
    }
}

impl Default for Crowding {
    fn default() -> Self {
        Self::new()
    }
}

/// The share of `span` that stall time grew by, from `before` to `after` microseconds.
pub fn stall_share(before: u64, after: u64, span: Duration) -> f64 {
    let span = span.as_secs_f64() * 1e6;
    if span <= 0.0 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / span
}

/// The `some` line's `total=` (microseconds some thread waited for a core, since boot) of
/// `/proc/pressure/cpu` text.
pub fn stalled_micros(pressure: &str) -> Option<u64> {
    pressure
        .lines()
        .find(|line| line.starts_with("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The runnable threads in `/proc/loadavg` text (`0.52 0.58 0.59 3/467 12345`: 3).
pub fn runnable_threads(loadavg: &str) -> Option<usize> {
    let (runnable, _) = loadavg.split_whitespace().nth(3)?.split_once('/')?;
    runnable.parse().ok()
}

// ---- requests in flight ---------------------------------------------------------------------

thread_local! {
    /// Requests of this thread's loop waiting for their answers.
    static IN_FLIGHT: Cell<u32> = const { Cell::new(0) };
}

/// A request of this thread's loop waiting for its answer, from [`InFlight::start`] until
/// dropped (answered, failed or given up). A thread-local count each way.
#[derive(Debug)]
#[must_use = "the request counts as answered when the guard drops"]
pub struct InFlight(());

impl InFlight {
    /// Counts a request as started.
    pub fn start() -> InFlight {
        IN_FLIGHT.with(|n| n.set(n.get().saturating_add(1)));
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Requests of this thread's loop waiting for their answers.
pub fn in_flight() -> u32 {
    IN_FLIGHT.with(Cell::get)
}

// ---- whether spinning pays: a trial (pure) --------------------------------------------------

/// How long each period of the [`Trial`] lasts.
pub const TRIAL_PERIOD: Duration = Duration::from_millis(100);

/// One period in this many runs the mode not in force (a probe).
pub const PROBE_EVERY: u32 = 10;

/// Answers a period needs for its answer times to count.
pub const TRIAL_MIN_ANSWERS: u64 = 200;

/// How much shorter spinning must make the mean or the 99th percentile answer time to be
/// kept on: 3%.
pub const SPIN_MARGIN: f64 = 0.03;

/// Probes whose median decides ([`Trial`]).
pub const VERDICTS: usize = 3;

/// How much shorter one probe that spun must make the mean answer time to turn spinning
/// back on at once, without waiting for [`VERDICTS`] probes: 7%. The mean of a period's
/// thousands of answers varies by a percent or two from one period to the next, so this
/// is a host that has turned slow (in the pinned harness a phase of it took a quarter of
/// the throughput of a sidecar that did not spin, within a 3 s round).
pub const QUICK_MARGIN: f64 = 0.07;

// The trial's own histogram rather than `latency::Histogram` (the per-connection one): that
// one's buckets are a quarter of an octave (19%) and it reads a percentile as a bucket's
// middle, too coarse for a 3% margin; changing it would change what ejection and the p95
// metrics see.

/// Sub-buckets per octave of [`AnswerCounts`] (each about 9% wide).
const SUB_BUCKETS: usize = 8;
/// The octaves [`AnswerCounts`] tells apart: from 2^10 ns (1 µs) to 2^27 ns (134 ms); shorter
/// and longer answers count in the first and last bucket.
const FIRST_OCTAVE: u32 = 10;
const OCTAVES: usize = 17;
/// Buckets of [`AnswerCounts`].
pub const ANSWER_BUCKETS: usize = OCTAVES * SUB_BUCKETS;

/// The bucket of an answer time of `nanos`: an eighth of an octave wide.
pub fn answer_bucket(nanos: u64) -> usize {
    let nanos = nanos.max(1);
    let octave = 63 - nanos.leading_zeros();
    if octave < FIRST_OCTAVE {
        return 0;
    }
    let sub = (nanos >> (octave - 3)) as usize & (SUB_BUCKETS - 1);
    ((octave - FIRST_OCTAVE) as usize * SUB_BUCKETS + sub).min(ANSWER_BUCKETS - 1)
}

/// The shortest answer time in nanoseconds that falls in `bucket` (its lower bound).
pub fn bucket_floor(bucket: usize) -> f64 {
    let octave = (bucket / SUB_BUCKETS) as i32 + FIRST_OCTAVE as i32;
    let sub = (bucket % SUB_BUCKETS) as f64;
    2f64.powi(octave) * (1.0 + sub / SUB_BUCKETS as f64)
}

/// The loop's answers so far: how many fell in each bucket of [`answer_bucket`], and their
/// total answer time in nanoseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerCounts {
    pub buckets: [u64; ANSWER_BUCKETS],
    pub total_ns: u64,
}

impl Default for AnswerCounts {
    fn default() -> Self {
        AnswerCounts {
            buckets: [0; ANSWER_BUCKETS],
            total_ns: 0,
        }
    }
}

impl AnswerCounts {
    /// Counts one answer of `nanos` (for tests and benchmarks; the loop counts into
    /// [`Shared`]'s atomics).
    pub fn record(&mut self, nanos: u64) {
        self.buckets[answer_bucket(nanos)] += 1;
        self.total_ns = self.total_ns.wrapping_add(nanos);
    }
}

/// One period's answers: how many, their mean and their 99th percentile, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeriodAnswers {
    pub count: u64,
    pub mean_ns: f64,
    pub p99_ns: f64,
}

impl PeriodAnswers {
    /// The answers between two readings of the counts; `None` with fewer than
    /// [`TRIAL_MIN_ANSWERS`].
    pub fn between(before: &AnswerCounts, after: &AnswerCounts) -> Option<PeriodAnswers> {
        let mut deltas = [0u64; ANSWER_BUCKETS];
        for (delta, (a, b)) in deltas
            .iter_mut()
            .zip(after.buckets.iter().zip(&before.buckets))
        {
            *delta = a.wrapping_sub(*b);
        }
        let count: u64 = deltas.iter().sum();
        if count < TRIAL_MIN_ANSWERS {
            return None;
        }
        let mean_ns = after.total_ns.wrapping_sub(before.total_ns) as f64 / count as f64;
        // The answer below which 99% fall, interpolated within its bucket.
        let rank = count as f64 * 0.99;
        let mut below = 0.0;
        let mut p99_ns = bucket_floor(ANSWER_BUCKETS - 1);
        for (bucket, &n) in deltas.iter().enumerate() {
            let n = n as f64;
            if n > 0.0 && below + n >= rank {
                let (floor, ceiling) = (bucket_floor(bucket), bucket_floor(bucket + 1));
                p99_ns = floor + (ceiling - floor) * ((rank - below) / n);
                break;
            }
            below += n;
        }
        Some(PeriodAnswers {
            count,
            mean_ns,
            p99_ns,
        })
    }
}

/// Whether spinning pays where the sidecar runs now, found by trying: a halted core costs a
/// slow host a third of the throughput and a fast one nothing (the history, twentieth and
/// twenty-sixth sessions), and which the host is changes by the hour.
///
/// Time runs in [`TRIAL_PERIOD`]s. One period in [`PROBE_EVERY`] (a probe) runs the mode not
/// in force, and its answer times (from a request's head to its answer's head, over the
/// loop's answers in the period: the mean, which in a closed loop of clients sets the
/// throughput, and the 99th percentile) are compared with those of the periods just before
/// and after it, which ran the mode in force. Spinning costs CPU, so it stays on only while
/// the median of the last [`VERDICTS`] probes says it makes the mean or the 99th percentile
/// more than [`SPIN_MARGIN`] shorter: with spinning on, probes (off) whose medians are no
/// slower than that in both turn it off; with it off, probes (on) whose median is that much
/// faster in either turn it on, and so does a single probe whose mean is [`QUICK_MARGIN`]
/// faster (a host turning slow must not wait three seconds). Periods with fewer than
/// [`TRIAL_MIN_ANSWERS`] answers decide nothing. Spinning starts on, the mode that is safe
/// for throughput.
#[derive(Debug, Clone)]
pub struct Trial {
    /// The mode in force: spinning allowed.
    spin: bool,
    /// The running period is the probe.
    probing: bool,
    period_end: Instant,
    /// Periods in the mode in force since the last probe.
    settled: u32,
    /// The last period in force before the probe, and the probe (once it is over).
    before: Option<PeriodAnswers>,
    probe: Option<Option<PeriodAnswers>>,
    /// The last probes' mean and 99th percentile over those of the mode in force around them.
    verdicts: [(f64, f64); VERDICTS],
    verdict_count: usize,
}

impl Trial {
    /// A trial from `now`, spinning on.
    pub fn new(now: Instant) -> Self {
        Trial {
            spin: true,
            probing: false,
            period_end: now + TRIAL_PERIOD,
            settled: 0,
            before: None,
            probe: None,
            verdicts: [(0.0, 0.0); VERDICTS],
            verdict_count: 0,
        }
    }

    /// Whether the loop may be spun for in the running period.
    pub fn spinning(&self) -> bool {
        self.spin != self.probing
    }

    /// Whether the running period is a probe of the mode not in force.
    pub fn probing(&self) -> bool {
        self.probing
    }

    /// The mode in force (not counting a probe).
    pub fn in_force(&self) -> bool {
        self.spin
    }

    /// When the running period ends ([`Trial::tick`] is due).
    pub fn period_end(&self) -> Instant {
        self.period_end
    }

    /// Closes the running period at `now` (due from [`Trial::period_end`]) with its answers
    /// (`None`: too few to tell); returns whether the mode in force changed.
    pub fn tick(&mut self, now: Instant, answers: Option<PeriodAnswers>) -> bool {
        // A loop that stood still for a while starts afresh rather than catching up.
        self.period_end = (self.period_end + TRIAL_PERIOD).max(now + TRIAL_PERIOD / 2);
        let mut changed = false;
        if self.probing {
            self.probing = false;
            self.probe = Some(answers);
        } else if let Some(probe) = self.probe.take() {
            // The period after a probe: the probe is judged against both neighbours.
            if let (Some(before), Some(probe), Some(after)) = (self.before, probe, answers) {
                let mean = probe.mean_ns / ((before.mean_ns + after.mean_ns) / 2.0);
                let p99 = probe.p99_ns / ((before.p99_ns + after.p99_ns) / 2.0);
                self.verdict(mean, p99);
                changed = self.decide();
            }
            self.before = answers;
            self.settled = 1;
        } else {
            self.before = answers;
            self.settled += 1;
            if self.settled + 1 >= PROBE_EVERY {
                self.probing = true;
                self.settled = 0;
            }
        }
        changed
    }

    fn verdict(&mut self, mean: f64, p99: f64) {
        if !mean.is_finite() || !p99.is_finite() {
            return;
        }
        self.verdicts.rotate_right(1);
        self.verdicts[0] = (mean, p99);
        self.verdict_count = (self.verdict_count + 1).min(VERDICTS);
    }

    /// Changes the mode in force when the medians of the last probes say so, or, to turn
    /// spinning back on, when the last probe alone does by [`QUICK_MARGIN`].
    fn decide(&mut self) -> bool {
        let quick =
            !self.spin && self.verdict_count > 0 && self.verdicts[0].0 < 1.0 / (1.0 + QUICK_MARGIN);
        if self.verdict_count < VERDICTS && !quick {
            return false;
        }
        let median = |pick: fn(&(f64, f64)) -> f64| {
            let mut values = self.verdicts.map(|v| pick(&v));
            values.sort_by(f64::total_cmp);
            values[VERDICTS / 2]
        };
        let (mean, p99) = (median(|v| v.0), median(|v| v.1));
        let switch = if self.spin {
            // The probes ran without spinning: off unless spinning was clearly faster.
            mean <= 1.0 + SPIN_MARGIN && p99 <= 1.0 + SPIN_MARGIN
        } else {
            // The probes spun: on when spinning was clearly faster.
            let faster = 1.0 / (1.0 + SPIN_MARGIN);
            quick || mean < faster || p99 < faster
        };
        if switch {
            self.spin = !self.spin;
            self.verdict_count = 0;
            self.before = None;
        }
        switch
    }
}

// ---- the loop's side: runtime hooks ---------------------------------------------------------

/// What a loop and its spinner share.
#[derive(Debug)]
struct Shared {
    /// [`LoopState`] in the low bits, a change count above.
    state: AtomicU32,
    /// The core the loop last went to sleep on.
    cpu: AtomicUsize,
    /// How long the loop's last finished sleep lasted, in nanoseconds.
    last_sleep_ns: AtomicU64,
    /// How long the loop has run (been awake) in all, in nanoseconds.
    work_ns: AtomicU64,
    /// The spinner sleeps and must be woken for the next spin.
    spinner_asleep: AtomicBool,
    /// The [`Trial`] lets the loop be spun for: without it the loop's sleeps wake nobody.
    spin_allowed: AtomicBool,
    /// The loop's answers by [`answer_bucket`], and their answer times in nanoseconds
    /// ([`answered`]).
    answer_buckets: [AtomicU64; ANSWER_BUCKETS],
    answer_ns: AtomicU64,
    stop: AtomicBool,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            state: AtomicU32::new(0),
            cpu: AtomicUsize::new(0),
            last_sleep_ns: AtomicU64::new(0),
            work_ns: AtomicU64::new(0),
            spinner_asleep: AtomicBool::new(false),
            spin_allowed: AtomicBool::new(true),
            answer_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            answer_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }
}

impl Shared {
    /// Reads the loop's answers so far into `counts`, for the [`Trial`].
    fn read_answers(&self, counts: &mut AnswerCounts) {
        for (count, bucket) in counts.buckets.iter_mut().zip(&self.answer_buckets) {
            *count = bucket.load(Ordering::Relaxed);
        }
        counts.total_ns = self.answer_ns.load(Ordering::Relaxed);
    }

    /// Sets the loop's state (only the loop writes it).
    fn set(&self, state: LoopState) {
        let next = (self.state.load(Ordering::Relaxed) & !KIND).wrapping_add(KIND + 1);
        self.state.store(next | state.bits(), Ordering::SeqCst);
    }
}

/// The spinner of the loop this thread runs.
struct Registered {
    shared: Arc<Shared>,
    spinner: Thread,
}

thread_local! {
    static REGISTERED: RefCell<Option<Registered>> = const { RefCell::new(None) };
    /// When this thread's loop went to sleep.
    static ASLEEP_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// When this thread's loop last woke up.
    static AWAKE_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's loop's spinner, if it has one (and it is not being set up or
/// taken down right now).
fn with_registered(f: impl FnOnce(&Registered)) {
    REGISTERED.with(|r| {
        if let Ok(registered) = r.try_borrow()
            && let Some(registered) = registered.as_ref()
        {
            f(registered);
        }
    });
}

/// A duration in nanoseconds, saturating (at 584 years).
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The runtime hook run as an event loop goes to sleep (`on_thread_park`): tells its spinner,
/// and wakes it when the sleep is worth spinning through.
pub fn before_park() {
    with_registered(|Registered { shared, spinner }| {
        let now = Instant::now();
        ASLEEP_SINCE.with(|t| t.set(Some(now)));
        if let Some(since) = AWAKE_SINCE.with(Cell::take) {
            let ran = nanos(now.saturating_duration_since(since));
            shared.work_ns.fetch_add(ran, Ordering::Relaxed);
        }
        if in_flight() < MIN_IN_FLIGHT || !shared.spin_allowed.load(Ordering::Relaxed) {
            shared.set(LoopState::AsleepIdle);
            return;
        }
        if let Some(cpu) = sys::current_cpu() {
            shared.cpu.store(cpu, Ordering::Relaxed);
        }
        shared.set(LoopState::AsleepBusy);
        if shared.spinner_asleep.swap(false, Ordering::SeqCst) {
            spinner.unpark();
        }
    });
}

/// A request of this thread's loop was answered `elapsed` after its head arrived: counted
/// for the [`Trial`] of the loop's spinner (nothing without busy polling).
pub fn answered(elapsed: Duration) {
    with_registered(|Registered { shared, .. }| {
        let nanos = nanos(elapsed);
        shared.answer_buckets[answer_bucket(nanos)].fetch_add(1, Ordering::Relaxed);
        shared.answer_ns.fetch_add(nanos, Ordering::Relaxed);
    });
}

/// The runtime hook run as an event loop wakes up (`on_thread_unpark`).
pub fn after_unpark() {
    with_registered(|Registered { shared, .. }| {
        shared.set(LoopState::Running);
        let now = Instant::now();
        AWAKE_SINCE.with(|t| t.set(Some(now)));
        if let Some(since) = ASLEEP_SINCE.with(Cell::take) {
            let slept = nanos(now.saturating_duration_since(since));
            shared.last_sleep_ns.store(slept, Ordering::Relaxed);
        }
    });
}

/// A builder of an event loop's runtime (single-threaded), with the hooks of busy polling
/// and of handing the core over ([`crate::loop_yield`]).
pub fn loop_runtime() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder
        .enable_all()
        .on_thread_park(|| {
            crate::loop_yield::before_park();
            before_park();
        })
        .on_thread_unpark(after_unpark);
    builder
}

/// Busy-polls for the event loop this task runs on (spawn it there, on a runtime built by
/// [`loop_runtime`]) until `stop` turns true. A zero `budget` returns at once.
pub async fn run(budget: Duration, metrics: Metrics, mut stop: watch::Receiver<bool>) {
    if budget.is_zero() {
        return;
    }
    let shared = Arc::new(Shared::default());
    let started = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("sidecar-spin".to_owned())
            .spawn(move || spinner(&shared, budget, &metrics))
    };
    let thread = match started {
        Ok(handle) => handle.thread().clone(),
        Err(e) => {
            tracing::warn!(error = %e, "busy polling is off: cannot start its thread");
            return;
        }
    };
    REGISTERED.with(|r| {
        *r.borrow_mut() = Some(Registered {
            shared: shared.clone(),
            spinner: thread.clone(),
        });
    });
    crate::shutdown::triggered(&mut stop).await;
    REGISTERED.with(|r| r.borrow_mut().take());
    shared.stop.store(true, Ordering::SeqCst);
    thread.unpark();
}

// ---- the spinner thread ---------------------------------------------------------------------

/// The spinner: in the idle class, follows the loop's state (module documentation).
fn spinner(shared: &Shared, budget: Duration, metrics: &Metrics) {
    if let Err(e) = sys::set_idle_scheduling() {
        tracing::warn!(error = %e, "busy polling is off: cannot enter the idle scheduling class");
        return;
    }
    let mut window = Window::new(budget, Instant::now());
    let mut trial = Trial::new(Instant::now());
    let mut answers_before = AnswerCounts::default();
    let mut answers_now = AnswerCounts::default();
    shared.read_answers(&mut answers_before);
    metrics.busy_poll_in_force(true);
    let mut pinned: Option<usize> = None;
    let mut crowding = Crowding::new();
    let mut iterations: u32 = 0;
    let mut seen = 0;
    let mut since = Instant::now();
    let mut spinning = false;
    // Take the loop's state afresh (at the start, and after each sleep or rest of this
    // thread, whatever the loop did meanwhile).
    let mut resync = true;
    while !shared.stop.load(Ordering::Relaxed) {
        let word = shared.state.load(Ordering::SeqCst);
        let now = Instant::now();
        if now >= trial.period_end() {
            let was_probing = trial.probing();
            shared.read_answers(&mut answers_now);
            let period = PeriodAnswers::between(&answers_before, &answers_now);
            std::mem::swap(&mut answers_before, &mut answers_now);
            if trial.tick(now, period) {
                metrics.busy_poll_in_force(trial.in_force());
                tracing::debug!(
                    spinning = trial.in_force(),
                    "busy polling: the trial changed the mode in force"
                );
            }
            if trial.probing() && !was_probing {
                metrics.busy_poll_probe();
            }
            shared
                .spin_allowed
                .store(trial.spinning(), Ordering::Relaxed);
        }
        // Not spun for in this period of the trial: nothing to spin through or wait behind,
        // whatever the loop does.
        let state = if trial.spinning() {
            LoopState::of(word)
        } else {
            LoopState::AsleepIdle
        };
        if !trial.spinning() {
            spinning = false;
        }
        if resync || word != seen {
            if spinning {
                // The loop woke within the window: a sleep spun through.
                window.record_spinning(sys::thread_cpu_time());
                metrics.busy_poll_spin(Duration::ZERO);
            }
            seen = word;
            since = now;
            resync = false;
            spinning = state == LoopState::AsleepBusy;
            let cpu = shared.cpu.load(Ordering::Relaxed);
            if spinning && pinned != Some(cpu) && sys::pin_thread_to(cpu).is_ok() {
                pinned = Some(cpu);
            }
        }
        window.record_work(Duration::from_nanos(shared.work_ns.load(Ordering::Relaxed)));
        let mut step = next_step(state, since, now, &mut window);
        if step == Step::Spin {
            iterations = iterations.wrapping_add(1);
            if iterations.is_multiple_of(CROWDING_EVERY) && crowding.crowded(now) {
                // A thread waits for a core: let this one go idle so it takes it, and stay
                // out of the way for a while (a crowded machine tends to stay so).
                step = Step::Rest(CROWDED_REST);
            }
        }
        let rest = match step {
            Step::Spin => {
                std::hint::spin_loop();
                continue;
            }
            Step::Missed(lost) => {
                window.record_spinning(sys::thread_cpu_time());
                metrics.busy_poll_spin(lost);
                None
            }
            Step::Sleep => None,
            Step::Rest(period) => Some(period),
        };
        let missed = matches!(step, Step::Missed(_));
        // Every sleep ends by the trial's next period at the latest, to close it.
        let until_tick = trial
            .period_end()
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match rest {
            // A rest is not announced: the loop must not cut it short.
            Some(period) => std::thread::park_timeout(period.min(until_tick)),
            None => {
                // Announce the sleep, then look once more, so the loop's next sleep under
                // load cannot pass unseen (it wakes this thread when it sees the
                // announcement).
                shared.spinner_asleep.store(true, Ordering::SeqCst);
                if shared.state.load(Ordering::SeqCst) == seen {
                    std::thread::park_timeout(until_tick);
                }
                shared.spinner_asleep.store(false, Ordering::SeqCst);
            }
        }
        if missed {
            // The sleep that ran the window out has ended by now (the loop slept again
            // since): it tells whether a longer window would have caught it.
            window.settle(Duration::from_nanos(
                shared.last_sleep_ns.load(Ordering::Relaxed),
            ));
        }
        spinning = false;
        resync = true;
    }
    if trial.in_force() {
        metrics.busy_poll_in_force(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_millis(1);

    /// Runs `periods` periods of `trial` from `t0`, each answered with the mean and 99th
    /// percentile answer times `times(spinning)` (microseconds; `None`: too few answers);
    /// returns (periods spun for, mode changes).
    fn run_trial(
        trial: &mut Trial,
        t0: &mut Instant,
        periods: u32,
        mut times: impl FnMut(bool) -> Option<(u64, u64)>,
    ) -> (u32, u32) {
        let (mut spun, mut changes) = (0, 0);
        for _ in 0..periods {
            let spinning = trial.spinning();
            spun += u32::from(spinning);
            let answers = times(spinning).map(|(mean, p99)| PeriodAnswers {
                count: 1_000,
                mean_ns: mean as f64 * 1e3,
                p99_ns: p99 as f64 * 1e3,
            });
            *t0 = trial.period_end();
            changes += u32::from(trial.tick(*t0, answers));
        }
        (spun, changes)
    }

    /// Runs `trial` on a fast host (spinning or not, the same answer times) until the
    /// probes turn spinning off: within 31 periods of the last verdict.
    fn turn_off(trial: &mut Trial, t0: &mut Instant) {
        let (_, changes) = run_trial(trial, t0, 31, |_| Some((700, 1_000)));
        assert_eq!(changes, 1);
        assert!(!trial.in_force());
    }

    #[test]
    fn the_trial_turns_spinning_off_when_it_makes_answers_no_faster() {
        let mut t = Instant::now();
        let mut trial = Trial::new(t);
        assert!(trial.spinning() && trial.in_force(), "it starts on");
        // Off as fast as on (within the margin), mean and tail: probes in periods 10, 20 and
        // 30, each judged with the period after it; then off.
        let same = |on: bool| Some(if on { (700, 1_000) } else { (710, 1_020) });
        let (spun, changes) = run_trial(&mut trial, &mut t, 30, same);
        assert_eq!(changes, 0, "two verdicts so far");
        assert_eq!(spun, 27, "one period in ten was a probe without spinning");
        assert_eq!(run_trial(&mut trial, &mut t, 1, same), (1, 1));
        assert!(!trial.in_force());
        // Off stays off while spinning is not clearly faster; its probes spin.
        let (spun, changes) = run_trial(&mut trial, &mut t, 100, |on| {
            Some(if on { (695, 990) } else { (700, 1_000) })
        });
        assert_eq!((spun, changes), (10, 0));
    }

    #[test]
    fn the_trial_keeps_spinning_while_it_makes_answers_faster_and_turns_it_back_on() {
        let mut t = Instant::now();
        let mut trial = Trial::new(t);
        // A slow host: a halted core costs a third.
        let slow = |on: bool| Some(if on { (700, 1_000) } else { (1_000, 1_500) });
        assert_eq!(run_trial(&mut trial, &mut t, 200, slow), (180, 0));
        assert!(trial.in_force());
        // The host becomes fast: off after the median of three probes says so.
        let (_, changes) = run_trial(&mut trial, &mut t, 30, |_| Some((700, 1_000)));
        assert_eq!(changes, 1);
        assert!(!trial.in_force());
        // Slow again: the probes spin, are faster, and after three spinning is back on.
        let (_, changes) = run_trial(&mut trial, &mut t, 30, slow);
        assert_eq!(changes, 1);
        assert!(trial.in_force());
        // One probe out of line does not change the mode (the median of three decides).
        let mut n = 0;
        let (_, changes) = run_trial(&mut trial, &mut t, 30, |on| {
            n += u32::from(!on);
            Some(if on || n == 1 {
                (700, 1_000)
            } else {
                (1_000, 1_500)
            })
        });
        assert_eq!(changes, 0);
        assert!(trial.in_force());
    }

    #[test]
    fn the_trial_keeps_spinning_for_the_tail_alone() {
        let mut t = Instant::now();
        let mut trial = Trial::new(t);
        // Off: the same mean, a 99th percentile 10% longer. Spinning stays.
        let tail = |on: bool| Some(if on { (700, 1_000) } else { (700, 1_100) });
        assert_eq!(run_trial(&mut trial, &mut t, 100, tail), (90, 0));
        assert!(trial.in_force());
        // Off in force (the host was fast), then the tail alone turns it back on.
        turn_off(&mut trial, &mut t);
        assert_eq!(run_trial(&mut trial, &mut t, 40, tail).1, 1);
        assert!(trial.in_force());
    }

    #[test]
    fn one_probe_turns_spinning_back_on_when_the_host_turned_slow() {
        let mut t = Instant::now();
        let mut trial = Trial::new(t);
        turn_off(&mut trial, &mut t);
        // 5% faster with spinning, in one probe (period 40, judged in 41): not yet.
        let a_little = |on: bool| Some(if on { (665, 1_000) } else { (700, 1_000) });
        assert_eq!(run_trial(&mut trial, &mut t, 10, a_little), (1, 0));
        // 10% faster: the next probe (period 50) turns it on at once, judged in period 51.
        let slow = |on: bool| Some(if on { (700, 1_000) } else { (780, 1_000) });
        assert_eq!(run_trial(&mut trial, &mut t, 9, slow).1, 0);
        assert!(!trial.in_force());
        assert_eq!(run_trial(&mut trial, &mut t, 1, slow).1, 1);
        assert!(trial.in_force());
    }

    #[test]
    fn the_trial_decides_nothing_on_periods_with_few_answers_or_late_ticks() {
        let mut t = Instant::now();
        let mut trial = Trial::new(t);
        assert_eq!(run_trial(&mut trial, &mut t, 100, |_| None).1, 0);
        assert!(trial.in_force(), "too few answers per period to tell");
        // A spinner that looks again only after a long pause starts a period afresh.
        let late = trial.period_end() + Duration::from_secs(5);
        trial.tick(late, None);
        assert!(trial.period_end() > late);
        assert!(trial.period_end() <= late + TRIAL_PERIOD);
    }

    #[test]
    fn answer_times_fall_in_buckets_an_eighth_of_an_octave_wide() {
        assert_eq!(answer_bucket(0), 0);
        assert_eq!(answer_bucket(1_023), 0);
        assert_eq!(answer_bucket(1_024), 0);
        assert_eq!(answer_bucket(1_024 + 128), 1);
        assert_eq!(answer_bucket(2_048), SUB_BUCKETS);
        assert_eq!(answer_bucket(u64::MAX), ANSWER_BUCKETS - 1);
        for nanos in [1_500, 70_000, 1_000_000, 9_999_999, 100_000_000] {
            let bucket = answer_bucket(nanos);
            assert!(bucket_floor(bucket) <= nanos as f64, "{nanos}");
            assert!(bucket_floor(bucket + 1) > nanos as f64, "{nanos}");
        }
        // A period's percentile within a bucket's width (9%) of the exact one (interpolated
        // as if the bucket's answers were spread evenly over it).
        let before = AnswerCounts::default();
        let mut after = AnswerCounts::default();
        for i in 0..10_000u64 {
            // 500 µs to 1.5 ms, evenly: the 99th percentile is 1.49 ms, the mean 1 ms.
            after.record(500_000 + i * 100);
        }
        let period = PeriodAnswers::between(&before, &after).expect("enough answers");
        assert_eq!(period.count, 10_000);
        assert!((period.mean_ns - 1_000_000.0).abs() < 100.0, "{period:?}");
        assert!(
            (period.p99_ns / 1_490_000.0 - 1.0).abs() < 0.09,
            "{period:?}"
        );
        let mut few = AnswerCounts::default();
        for _ in 0..TRIAL_MIN_ANSWERS - 1 {
            few.record(1_000_000);
        }
        assert_eq!(PeriodAnswers::between(&before, &few), None);
    }

    #[test]
    fn a_window_doubles_for_sleeps_it_nearly_caught_and_halves_for_long_ones() {
        let t0 = Instant::now();
        let mut w = Window::new(BUDGET, t0);
        assert_eq!(w.current(), FIRST_WINDOW);
        w.settle(Duration::from_micros(80));
        assert_eq!(
            w.current(),
            FIRST_WINDOW * 2,
            "a longer window would have caught it"
        );
        for _ in 0..10 {
            w.settle(Duration::from_micros(900));
        }
        assert_eq!(w.current(), BUDGET, "never past runtime.busy_poll");
        w.settle(Duration::from_millis(5));
        assert_eq!(
            w.current(),
            BUDGET / 2,
            "no window would have caught that one"
        );
        for _ in 0..20 {
            w.settle(Duration::from_millis(5));
        }
        assert_eq!(w.current(), SHORTEST_WINDOW);
        let small = Window::new(Duration::from_micros(10), t0);
        assert_eq!(
            small.current(),
            Duration::from_micros(10),
            "the budget bounds the first window"
        );
    }

    #[test]
    fn a_zero_budget_never_spins() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::ZERO, t0);
        assert!(!w.may_spin(t0, Duration::ZERO));
        assert_eq!(
            next_step(LoopState::AsleepBusy, t0, t0, &mut w),
            Step::Rest(CAP_PERIOD)
        );
    }

    #[test]
    fn lost_spinning_is_capped_per_period_and_the_cap_resets() {
        let t0 = Instant::now();
        let mut w = Window::new(BUDGET, t0);
        let misses = (MAX_MISSED_SHARE.as_micros() / BUDGET.as_micros()) as u32;
        w.record_work(Duration::from_secs(1));
        for i in 0..misses {
            assert!(w.may_spin(t0, Duration::ZERO), "miss {i} is within the cap");
            w.missed(t0, BUDGET);
        }
        assert!(!w.may_spin(t0, Duration::ZERO), "the cap is reached");
        let half = t0 + CAP_PERIOD / 2;
        assert_eq!(
            next_step(LoopState::AsleepBusy, half, half, &mut w),
            Step::Rest(CAP_PERIOD / 2)
        );
        assert!(w.may_spin(t0 + CAP_PERIOD, Duration::ZERO), "a new period");
    }

    #[test]
    fn spinning_never_outgrows_the_loops_own_work() {
        let t0 = Instant::now();
        let mut w = Window::new(BUDGET, t0);
        // A moderate load: the loop ran 2 ms so far, and every gap is caught.
        w.record_work(Duration::from_millis(2));
        let allowed = Duration::from_millis(2) + SPIN_SLACK;
        assert!(w.may_spin(t0, allowed - Duration::from_micros(1)));
        assert!(!w.may_spin(t0, allowed), "a spin stops at the bound");
        w.record_spinning(allowed);
        assert_eq!(
            next_step(LoopState::AsleepBusy, t0, t0, &mut w),
            Step::Rest(CAP_PERIOD),
            "all spinning counts, caught or lost"
        );
        w.record_work(Duration::from_millis(20));
        assert!(w.may_spin(t0, Duration::ZERO), "more work, more room");
        let next = t0 + CAP_PERIOD;
        w.record_work(Duration::from_millis(21));
        assert!(
            w.may_spin(next, Duration::ZERO),
            "a new period starts afresh"
        );
        w.record_spinning(allowed + Duration::from_millis(5));
        assert!(
            w.may_spin(next, Duration::ZERO),
            "5 ms spun in this period, within the slack"
        );
        assert!(
            !w.may_spin(next, Duration::from_millis(1) + SPIN_SLACK),
            "the new period counts only its own work"
        );
    }

    #[test]
    fn the_spinner_spins_through_busy_sleeps_only_and_for_one_window() {
        let t0 = Instant::now();
        let mut w = Window::new(BUDGET, t0);
        let within = t0 + FIRST_WINDOW / 2;
        let past = t0 + FIRST_WINDOW;
        assert_eq!(
            next_step(LoopState::AsleepBusy, t0, within, &mut w),
            Step::Spin
        );
        assert_eq!(
            next_step(LoopState::AsleepBusy, t0, past, &mut w),
            Step::Missed(FIRST_WINDOW)
        );
        assert_eq!(
            next_step(LoopState::AsleepIdle, t0, t0, &mut w),
            Step::Sleep,
            "too few requests in flight: no spinning"
        );
        assert_eq!(
            next_step(LoopState::Running, t0, within, &mut w),
            Step::Spin,
            "waits behind the running loop"
        );
        assert_eq!(
            next_step(LoopState::Running, t0, t0 + RUNNING_LIMIT, &mut w),
            Step::Sleep,
            "a loop running that long has moved away"
        );
    }

    #[test]
    fn the_loop_state_survives_the_change_count() {
        for state in [
            LoopState::Running,
            LoopState::AsleepBusy,
            LoopState::AsleepIdle,
        ] {
            for count in [0u32, 1, 7, u32::MAX >> 2] {
                assert_eq!(LoopState::of((count << 2) | state.bits()), state);
            }
        }
        let shared = Shared::default();
        let before = shared.state.load(Ordering::SeqCst);
        shared.set(LoopState::Running);
        let after = shared.state.load(Ordering::SeqCst);
        assert_ne!(before, after, "the same state again is still a change");
        assert_eq!(LoopState::of(after), LoopState::Running);
    }

    #[test]
    fn runnable_threads_are_read_from_loadavg() {
        assert_eq!(runnable_threads("0.52 0.58 0.59 3/467 12345\n"), Some(3));
        assert_eq!(runnable_threads("2.49 2.52 2.13 1/86 29229"), Some(1));
        assert_eq!(runnable_threads("0.52 0.58 0.59"), None);
        assert_eq!(runnable_threads("0.52 0.58 0.59 x/467 1"), None);
        let mut crowding = Crowding::new();
        assert!(
            !matches!(crowding.source, Source::Nothing),
            "/proc/pressure/cpu or /proc/loadavg is readable here"
        );
        let _ = crowding.crowded(Instant::now());
    }

    #[test]
    fn stall_time_is_read_from_pressure_and_compared_as_a_share() {
        let text = "some avg10=4.19 avg60=8.80 avg300=22.01 total=8758889171\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(stalled_micros(text), Some(8_758_889_171));
        assert_eq!(stalled_micros("full avg10=0.00 total=5\n"), None);
        assert_eq!(stalled_micros("some avg10=0.00 total=x\n"), None);
        let ms = Duration::from_millis(1);
        assert!((stall_share(1_000, 1_100, ms) - 0.10).abs() < 1e-9);
        assert_eq!(stall_share(1_000, 1_000, ms), 0.0);
        assert_eq!(
            stall_share(1_000, 900, ms),
            0.0,
            "a counter never goes back"
        );
        assert_eq!(stall_share(0, 100, Duration::ZERO), 0.0);
    }

    #[test]
    fn crowding_follows_the_stall_time_of_the_machine() {
        let mut crowding = Crowding::new();
        if !matches!(crowding.source, Source::Pressure(_)) {
            return;
        }
        let t0 = Instant::now();
        assert!(!crowding.crowded(t0), "the first look only takes a sample");
        assert!(
            !crowding.crowded(t0 + PRESSURE_SAMPLE / 2),
            "too soon for a second sample"
        );
        // Two threads per core spinning for a while: each waits for a core half the time.
        let stop = Arc::new(AtomicBool::new(false));
        let spinners: Vec<_> = (0..2 * sys::online_cpus())
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let crowded = crowding.crowded(Instant::now());
        stop.store(true, Ordering::Relaxed);
        for spinner in spinners {
            spinner.join().expect("no panic");
        }
        assert!(crowded, "threads waited for cores for 300 ms");
    }

    #[test]
    fn a_cpu_quota_is_read_in_cores_and_none_is_none() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("50000 100000\n"), Some(0.5));
        assert_eq!(parse_cpu_max("200000 100000"), Some(2.0));
        assert_eq!(parse_cpu_max("-1 100000"), None, "cgroup v1: no quota");
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("lots 100000"), None);
    }

    #[test]
    fn requests_in_flight_are_counted_per_thread() {
        let start = in_flight();
        let requests: Vec<InFlight> = (0..MIN_IN_FLIGHT).map(|_| InFlight::start()).collect();
        assert_eq!(in_flight(), start + MIN_IN_FLIGHT);
        let other = std::thread::spawn(in_flight).join().expect("no panic");
        assert_eq!(other, 0, "another loop's count is its own");
        drop(requests);
        assert_eq!(in_flight(), start);
    }
}
