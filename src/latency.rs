//! Per-connection latency: a sliding window of log-linear histograms (60 s in six rotating
//! slices) plus an EWMA. Recording is a few relaxed atomic operations — no lock, no
//! allocation — so it stays off the contention path. Pure: time is passed in as
//! milliseconds since an origin the caller chooses.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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

struct Slice {
    epoch: AtomicU64,
    counts: [AtomicU32; BUCKETS],
}

impl Slice {
    fn new() -> Self {
        Slice {
            epoch: AtomicU64::new(u64::MAX),
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
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

    fn slice_for(&self, now_ms: u64) -> &Slice {
        let epoch = now_ms / SLICE.as_millis() as u64;
        let slice = &self.slices[(epoch % SLICES as u64) as usize];
        let seen = slice.epoch.load(Ordering::Acquire);
        if seen != epoch
            && slice
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This slice last held data from a full window ago: clear it for reuse.
            for c in &slice.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        slice
    }

    /// Records one request's time to response headers.
    pub fn record(&self, now_ms: u64, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        self.slice_for(now_ms).counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
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
        let epoch = now_ms / SLICE.as_millis() as u64;
        for s in &self.slices {
            let e = s.epoch.load(Ordering::Acquire);
            if e <= epoch && e + (SLICES as u64) > epoch {
                for (i, c) in s.counts.iter().enumerate() {
                    into.counts[i] += c.load(Ordering::Relaxed) as u64;
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
}
