//! Once a second, samples the client request and error counters and the process CPU time,
//! so the status document can give rates over the last minute from live figures.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// How far back the rates look.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Linux reports process times in USER_HZ ticks, 100 per second on every architecture.
const USER_HZ: f64 = 100.0;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    requests: u64,
    errors: u64,
    cpu_ticks: u64,
}

/// Rates over the recent window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recent {
    /// Fraction (0..=1) of answered requests that were 5xx.
    pub error_rate: f64,
    pub requests_per_second: f64,
    /// Percent of one core.
    pub cpu_percent: f64,
    pub retries: u64,
    pub retry_budget_exhausted: u64,
}

#[derive(Debug)]
pub struct Sampler {
    metrics: Metrics,
    samples: Mutex<VecDeque<Sample>>,
}

impl Sampler {
    pub fn new(metrics: Metrics) -> Arc<Sampler> {
        let s = Arc::new(Sampler {
            metrics,
            samples: Mutex::new(VecDeque::with_capacity(64)),
        });
        s.sample();
        s
    }

    fn sample(&self) {
        let (requests, errors) = self.metrics.answered();
        let sample = Sample {
            at: Instant::now(),
            requests,
            errors,
            cpu_ticks: cpu_ticks().unwrap_or(0),
        };
        if let Ok(mut q) = self.samples.lock() {
            q.push_back(sample);
            while q.len() > 2
                && q.front()
                    .is_some_and(|f| sample.at.saturating_duration_since(f.at) > WINDOW)
            {
                q.pop_front();
            }
        }
    }

    /// Samples every second until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.sample(),
                _ = crate::shutdown::triggered(&mut shutdown) => return,
            }
        }
    }

    /// Rates between the oldest kept sample and now.
    pub fn recent(&self) -> Recent {
        let (retries, retry_budget_exhausted) = self.metrics.retries_total();
        let (requests, errors) = self.metrics.answered();
        let now = Instant::now();
        let ticks = cpu_ticks().unwrap_or(0);
        let first = self.samples.lock().ok().and_then(|q| q.front().copied());
        let Some(first) = first else {
            return Recent {
                retries,
                retry_budget_exhausted,
                ..Recent::default()
            };
        };
        let secs = now
            .saturating_duration_since(first.at)
            .as_secs_f64()
            .max(0.001);
        let dr = requests.saturating_sub(first.requests);
        let de = errors.saturating_sub(first.errors);
        let dcpu = ticks.saturating_sub(first.cpu_ticks) as f64 / USER_HZ;
        Recent {
            error_rate: if dr == 0 { 0.0 } else { de as f64 / dr as f64 },
            requests_per_second: dr as f64 / secs,
            cpu_percent: if secs < 0.5 { 0.0 } else { dcpu * 100.0 / secs },
            retries,
            retry_budget_exhausted,
        }
    }
}

/// utime + stime of this process from /proc/self/stat, in USER_HZ ticks.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size from /proc/self/status.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_come_from_proc() {
        assert!(rss_bytes() > 1024 * 1024);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_ticks().is_some());
    }

    #[tokio::test]
    async fn rates_follow_the_counters() {
        let m = Metrics::new(1);
        let s = Sampler::new(m.clone());
        for _ in 0..8 {
            m.request_finished(&http::Method::GET, 200, Duration::from_millis(1));
        }
        for _ in 0..2 {
            m.request_finished(&http::Method::GET, 503, Duration::from_millis(1));
        }
        let r = s.recent();
        assert!((r.error_rate - 0.2).abs() < 1e-9, "{r:?}");
        assert!(r.requests_per_second > 0.0);
    }
}
