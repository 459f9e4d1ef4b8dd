//! Per-connection latency: a sliding window of log-linear histograms (60 s in six rotating
//! slices) plus an EWMA. Recording is a few relaxed atomic operations — no lock, no
//! allocation — so it stays off the contention path. Pure: time is passed in as
//! milliseconds since an origin the caller chooses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Slices in the window.
pub const SLICES: usize = 6;
/// Length of one slice.
pub const SLICE: Duration = Duration::from_secs(10);
/// Sub-buckets per power of two (resolution about 19%).
const SUB: usize = 4;
/// Values are microseconds; 2^27 µs ≈ 134 s is the largest bucket.
const OCTAVES: usize = 28;
/// Number of histogram buckets.
pub const BUCKETS: usize = OCTAVES * SUB;
/// EWMA weight of a new sample.
const EWMA_ALPHA: f64 = 0.2;

/// Bucket index of a latency in microseconds.
fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros() as usize; // floor(log2)
    let sub = ((us >> (octave - 2)) & 0b11) as usize; // two bits below the leading one
    ((octave - 1) * SUB + sub).min(BUCKETS - 1)
}

/// Representative value (µs) of a bucket: the middle of its range.
fn bucket_value(index: usize) -> f64 {
    if index < SUB {
        return index as f64 + 0.5;
    }
    let octave = index / SUB + 1;
    let sub = (index % SUB) as u64;
    let low = (4 + sub) << (octave - 2);
    let high = (5 + sub) << (octave - 2);
    (low + high) as f64 / 2.0
}

/// One slice of the window: a counter per bucket. Each counter holds the epoch it counts
/// for (high 32 bits, as a [`tag`]) and its count in that epoch (low 32 bits), so reusing a
/// slice a full window later and counting in it are one atomic step per bucket: a sample
/// recorded while another thread starts the slice's new epoch is never cleared away.
struct Slice {
    counts: [AtomicU64; BUCKETS],
}

impl Slice {
    fn new() -> Self {
        Slice {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

const COUNT_MASK: u64 = 0xFFFF_FFFF;

/// The tag of a 10 s epoch: its number plus one, in 32 bits (0 marks a counter never used).
/// 32 bits of 10 s epochs wrap after about 1 361 years.
fn tag(epoch: u64) -> u64 {
    epoch.wrapping_add(1) & COUNT_MASK
}

/// How many epochs `older` lies before `newer` (both tags); huge when it lies after.
fn tag_age(newer: u64, older: u64) -> u64 {
    newer.wrapping_sub(older) & COUNT_MASK
}

/// The latency record of one connection.
pub struct LatencyWindow {
    slices: [Slice; SLICES],
    ewma_bits: AtomicU64,
    samples: AtomicU64,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LatencyWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyWindow")
            .field("samples", &self.samples.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl LatencyWindow {
    pub fn new() -> Self {
        LatencyWindow {
            slices: std::array::from_fn(|_| Slice::new()),
            ewma_bits: AtomicU64::new(f64::NAN.to_bits()),
            samples: AtomicU64::new(0),
        }
    }

    /// Counts one sample in `bucket` of the slice for `now_ms`. A counter still holding an
    /// older epoch starts again at 1 for this one; a sample older than the counter's epoch
    /// (a recorder that stalled for a whole window) is dropped, as it is out of the window.
    fn count(&self, now_ms: u64, bucket: usize) {
        let epoch = now_ms / SLICE.as_millis() as u64;
        let tag = tag(epoch);
        let counter = &self.slices[(epoch % SLICES as u64) as usize].counts[bucket];
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            let held = v >> 32;
            if held == tag {
                // Saturates rather than carrying into the tag.
                Some(if v & COUNT_MASK == COUNT_MASK {
                    v
                } else {
                    v + 1
                })
            } else if held == 0 || tag_age(tag, held) < 1 << 31 {
                Some(tag << 32 | 1)
            } else {
                None
            }
        });
    }

    /// Records one request's time to response headers.
    pub fn record(&self, now_ms: u64, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        self.count(now_ms, bucket(us));
        self.samples.fetch_add(1, Ordering::Relaxed);
        let ms = latency.as_secs_f64() * 1000.0;
        let _ = self
            .ewma_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if old.is_nan() {
                    ms
                } else {
                    old + EWMA_ALPHA * (ms - old)
                };
                Some(new.to_bits())
            });
    }

    /// Exponentially weighted moving average in ms (0 before the first sample).
    pub fn ewma_ms(&self) -> f64 {
        let v = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        if v.is_nan() { 0.0 } else { v }
    }

    /// Samples recorded since creation.
    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Adds this window's live buckets into `into`.
    pub fn merge_into(&self, now_ms: u64, into: &mut Histogram) {
        let now = tag(now_ms / SLICE.as_millis() as u64);
        for s in &self.slices {
            for (i, c) in s.counts.iter().enumerate() {
                let v = c.load(Ordering::Relaxed);
                let held = v >> 32;
                if held != 0 && tag_age(now, held) < SLICES as u64 {
                    into.counts[i] += v & COUNT_MASK;
                }
            }
        }
    }

    /// The window's histogram now.
    pub fn histogram(&self, now_ms: u64) -> Histogram {
        let mut h = Histogram::default();
        self.merge_into(now_ms, &mut h);
        h
    }
}

/// A plain (non-atomic) histogram for reading percentiles and merging connections.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: [u64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
        }
    }
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_value(i) / 1000.0;
            }
        }
        bucket_value(BUCKETS - 1) / 1000.0
    }

    /// Mean in milliseconds, from bucket midpoints; 0 when empty.
    pub fn mean_ms(&self) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let sum: f64 = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| *c as f64 * bucket_value(i))
            .sum();
        sum / total as f64 / 1000.0
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_the_range() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            100,
            1000,
            10_000,
            1_000_000,
            100_000_000,
            u64::MAX,
        ] {
            let b = bucket(us);
            assert!(b >= last, "{us} → {b} < {last}");
            assert!(b < BUCKETS);
            last = b;
        }
    }

    #[test]
    fn bucket_value_is_within_20_percent() {
        for us in [10u64, 77, 500, 1234, 45_000, 999_999, 30_000_000] {
            let v = bucket_value(bucket(us));
            let err = (v - us as f64).abs() / us as f64;
            assert!(err < 0.2, "{us}µs read as {v} ({err})");
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let w = LatencyWindow::new();
        for i in 1..=100u64 {
            w.record(0, Duration::from_millis(i));
        }
        let h = w.histogram(0);
        assert_eq!(h.count(), 100);
        let p50 = h.quantile_ms(0.50);
        let p95 = h.quantile_ms(0.95);
        let p99 = h.quantile_ms(0.99);
        assert!((p50 - 50.0).abs() / 50.0 < 0.2, "p50 {p50}");
        assert!((p95 - 95.0).abs() / 95.0 < 0.2, "p95 {p95}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.2, "p99 {p99}");
        assert!(p50 <= p95 && p95 <= p99);
    }

    #[test]
    fn samples_slide_out_after_the_window() {
        let w = LatencyWindow::new();
        w.record(0, Duration::from_millis(500));
        assert_eq!(w.histogram(59_000).count(), 1);
        assert_eq!(
            w.histogram(60_000).count(),
            0,
            "a full window later it is gone"
        );
        w.record(61_000, Duration::from_millis(5));
        let h = w.histogram(61_000);
        assert_eq!(h.count(), 1);
        assert!(h.quantile_ms(0.99) < 10.0);
    }

    #[test]
    fn reused_slice_is_cleared() {
        let w = LatencyWindow::new();
        for _ in 0..10 {
            w.record(5_000, Duration::from_millis(900));
        }
        // Same slice index, one full window later.
        w.record(65_000, Duration::from_millis(1));
        assert_eq!(w.histogram(65_000).count(), 1);
    }

    #[test]
    fn a_sample_a_window_late_does_not_clear_newer_counts() {
        let w = LatencyWindow::new();
        w.record(65_000, Duration::from_millis(3));
        w.record(65_000, Duration::from_millis(3));
        // Same slice and bucket, one full window earlier: out of the window, dropped.
        w.record(5_000, Duration::from_millis(3));
        assert_eq!(w.histogram(65_000).count(), 2);
        assert_eq!(
            w.histogram(5_000).count(),
            0,
            "epoch 0's view holds no epoch 6 data"
        );
    }

    #[test]
    fn tags_order_epochs_across_the_32_bit_wrap() {
        let last = (1u64 << 32) - 2; // the last epoch before the tag wraps to 0
        assert_eq!(tag(last), COUNT_MASK);
        assert_eq!(tag(last + 1), 0);
        assert_eq!(tag_age(tag(last + 2), tag(last)), 2);
        let w = LatencyWindow::new();
        let at = |epoch: u64| epoch * 10_000;
        w.record(at(last), Duration::from_millis(1));
        w.record(at(last + 2), Duration::from_millis(1));
        assert_eq!(w.histogram(at(last + 2)).count(), 2);
        assert_eq!(
            w.histogram(at(last + 6)).count(),
            1,
            "epoch `last` slid out"
        );
    }

    #[test]
    fn ewma_follows_recent_samples() {
        let w = LatencyWindow::new();
        assert_eq!(w.ewma_ms(), 0.0);
        w.record(0, Duration::from_millis(100));
        assert!((w.ewma_ms() - 100.0).abs() < 1e-9);
        for _ in 0..50 {
            w.record(0, Duration::from_millis(10));
        }
        assert!((w.ewma_ms() - 10.0).abs() < 1.0);
    }

    #[test]
    fn merged_histograms_give_pool_percentiles() {
        let fast = LatencyWindow::new();
        let slow = LatencyWindow::new();
        for _ in 0..90 {
            fast.record(0, Duration::from_millis(2));
        }
        for _ in 0..10 {
            slow.record(0, Duration::from_millis(200));
        }
        let mut pool = Histogram::default();
        fast.merge_into(0, &mut pool);
        slow.merge_into(0, &mut pool);
        assert!(pool.quantile_ms(0.5) < 3.0);
        assert!(pool.quantile_ms(0.95) > 150.0);
    }

    #[test]
    fn concurrent_recording_loses_nothing() {
        let w = std::sync::Arc::new(LatencyWindow::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        w.record(1_000, Duration::from_micros(i % 5000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recorder thread");
        }
        assert_eq!(w.histogram(1_000).count(), 40_000);
        assert_eq!(w.samples(), 40_000);
    }

    /// Every round starts a new slice with four threads recording at once, so the first
    /// samples of each slice race its reuse (clearing) 300 times. None may be lost.
    #[test]
    fn concurrent_recording_across_slice_reuse_loses_nothing() {
        const THREADS: usize = 4;
        const PER_ROUND: u64 = 200;
        const ROUNDS: u64 = 300;
        let w = std::sync::Arc::new(LatencyWindow::new());
        let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS + 1));
        let done = std::sync::Arc::new(std::sync::Barrier::new(THREADS + 1));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (w, start, done) = (w.clone(), start.clone(), done.clone());
                std::thread::spawn(move || {
                    for round in 0..ROUNDS {
                        start.wait();
                        for i in 0..PER_ROUND {
                            w.record(round * 10_000 + 1, Duration::from_micros(i * 7));
                        }
                        done.wait();
                    }
                })
            })
            .collect();
        for round in 0..ROUNDS {
            start.wait();
            done.wait();
            let live = (round + 1).min(SLICES as u64);
            assert_eq!(
                w.histogram(round * 10_000 + 1).count(),
                live * THREADS as u64 * PER_ROUND,
                "round {round}"
            );
        }
        for t in threads {
            t.join().expect("recorder thread");
        }
    }
}
