//! Measurements of one run: end-to-end latencies (HDR histogram), completions over time,
//! and each request's verdict. Times are offsets from the run's start.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::model::Verdict;

/// Width of one throughput-over-time bucket.
pub const TIMELINE_BUCKET: Duration = Duration::from_millis(250);
/// Largest latency the histogram holds; longer ones are clamped to it.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// How a request ended, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied.
    Approved,
    /// Refused.
    Rejected,
    /// Answered without a verdict (the broker echo).
    Echoed,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// The slowest.
    pub max_ms: f64,
    /// The mean.
    pub mean_ms: f64,
}

/// Everything recorded during one run.
pub struct Recorder {
    latencies_us: Histogram<u64>,
    /// Completions per [`TIMELINE_BUCKET`].
    timeline: Vec<u64>,
    /// Longest latency of the requests completed in each [`TIMELINE_BUCKET`], in µs.
    timeline_max_us: Vec<u64>,
    outcomes: Vec<Option<Outcome>>,
    completed: u64,
    approved: u64,
    rejected: u64,
    errors: u64,
    last_completion: Duration,
}

impl Recorder {
    /// A recorder for `requests` requests.
    pub fn new(requests: usize) -> Self {
        Recorder {
            // 1 µs to an hour at 3 significant digits: a few hundred KiB, fixed.
            latencies_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .unwrap_or_else(|_| unreachable!("the bounds are valid")),
            timeline: Vec::new(),
            timeline_max_us: Vec::new(),
            outcomes: vec![None; requests],
            completed: 0,
            approved: 0,
            rejected: 0,
            errors: 0,
            last_completion: Duration::ZERO,
        }
    }

    /// Records request `index` ending with `outcome` at `at`, `latency` after it was due.
    /// A second completion of the same request (a redelivered result) is ignored.
    pub fn complete(&mut self, index: usize, outcome: Outcome, latency: Duration, at: Duration) {
        let Some(slot) = self.outcomes.get_mut(index) else {
            return;
        };
        if slot.is_some() {
            return;
        }
        *slot = Some(outcome);
        match outcome {
            Outcome::Approved => self.approved += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::Echoed => {}
        }
        self.completed += 1;
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US).clamp(1, MAX_LATENCY_US);
        self.latencies_us.saturating_record(micros);
        let bucket = (at.as_millis() / TIMELINE_BUCKET.as_millis()) as usize;
        if self.timeline.len() <= bucket {
            self.timeline.resize(bucket + 1, 0);
            self.timeline_max_us.resize(bucket + 1, 0);
        }
        self.timeline[bucket] += 1;
        self.timeline_max_us[bucket] = self.timeline_max_us[bucket].max(micros);
        self.last_completion = self.last_completion.max(at);
    }

    /// Records that a request failed: its outcome stays unknown.
    pub fn fail(&mut self) {
        self.errors += 1;
    }

    /// Requests answered.
    pub fn completed(&self) -> u64 {
        self.completed
    }
    /// Requests applied.
    pub fn approved(&self) -> u64 {
        self.approved
    }
    /// Requests refused.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
    /// Requests that failed.
    pub fn errors(&self) -> u64 {
        self.errors
    }
    /// When the last request completed.
    pub fn elapsed(&self) -> Duration {
        self.last_completion
    }
    /// The verdict of every request, `None` when unknown or echoed.
    pub fn verdicts(&self) -> Vec<Option<Verdict>> {
        self.outcomes
            .iter()
            .map(|outcome| match outcome {
                Some(Outcome::Approved) => Some(Verdict::Approved),
                Some(Outcome::Rejected) => Some(Verdict::Rejected),
                Some(Outcome::Echoed) | None => None,
            })
            .collect()
    }

    /// Completed requests per second over the whole run.
    pub fn throughput_rps(&self) -> f64 {
        let seconds = self.last_completion.as_secs_f64();
        if seconds > 0.0 { self.completed as f64 / seconds } else { 0.0 }
    }

    /// Latency percentiles.
    pub fn latency(&self) -> LatencySummary {
        let h = &self.latencies_us;
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1_000.0;
        LatencySummary {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1_000.0,
        }
    }

    /// `(seconds since start, completions per second)` per bucket, empty buckets included.
    pub fn timeline_rps(&self) -> Vec<(f64, f64)> {
        let width = TIMELINE_BUCKET.as_secs_f64();
        self.timeline.iter().enumerate().map(|(i, n)| (i as f64 * width, *n as f64 / width)).collect()
    }

    /// `(seconds since start, longest latency ms)` of the requests completed in each bucket:
    /// shows whether the tail is a warm-up, a steady state or periodic stalls.
    pub fn timeline_max_latency(&self) -> Vec<(f64, f64)> {
        let width = TIMELINE_BUCKET.as_secs_f64();
        self.timeline_max_us.iter().enumerate().map(|(i, us)| (i as f64 * width, *us as f64 / 1_000.0)).collect()
    }

    /// `(percentile, latency ms)` points from 0 to the maximum, denser in the tail.
    pub fn latency_curve(&self) -> Vec<(f64, f64)> {
        if self.latencies_us.is_empty() {
            return Vec::new();
        }
        let mut points = Vec::new();
        for nines in 0..=50 {
            // 0, 0.9 … towards 1 - 10^-5: evenly spaced in "number of nines".
            let quantile = 1.0 - 10f64.powf(-(nines as f64) / 10.0);
            points.push((quantile * 100.0, self.latencies_us.value_at_quantile(quantile) as f64 / 1_000.0));
        }
        points.push((100.0, self.latencies_us.max() as f64 / 1_000.0));
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_and_throughput() {
        let mut recorder = Recorder::new(100);
        for i in 0..100 {
            let outcome = if i % 4 == 0 { Outcome::Rejected } else { Outcome::Approved };
            recorder.complete(i, outcome, ms(i as u64 + 1), ms(10 * i as u64 + 10));
        }
        let latency = recorder.latency();
        assert!((latency.p50_ms - 50.0).abs() < 0.1, "{latency:?}");
        assert!((latency.p99_ms - 99.0).abs() < 0.1, "{latency:?}");
        assert!((latency.max_ms - 100.0).abs() < 0.1, "{latency:?}");
        assert_eq!((recorder.approved(), recorder.rejected(), recorder.completed()), (75, 25, 100));
        // 100 completions in one second.
        assert!((recorder.throughput_rps() - 100.0).abs() < 1e-9);
        let timeline = recorder.timeline_rps();
        assert_eq!(timeline.len(), 5);
        assert_eq!(timeline[1], (0.25, 100.0));
        // Requests 24..=48 completed in the second bucket; the slowest of them took 49 ms.
        assert_eq!(recorder.timeline_max_latency()[1], (0.25, 49.0));
    }

    #[test]
    fn duplicates_and_strangers_are_ignored() {
        let mut recorder = Recorder::new(2);
        recorder.complete(0, Outcome::Approved, ms(1), ms(1));
        recorder.complete(0, Outcome::Rejected, ms(1), ms(2));
        recorder.complete(7, Outcome::Approved, ms(1), ms(3));
        assert_eq!(recorder.completed(), 1);
        assert_eq!(recorder.verdicts(), vec![Some(Verdict::Approved), None]);
        assert_eq!(recorder.elapsed(), ms(1));
    }

    #[test]
    fn the_latency_curve_is_monotonic_and_ends_at_the_max() {
        let mut recorder = Recorder::new(1_000);
        for i in 0..1_000 {
            recorder.complete(i, Outcome::Echoed, Duration::from_micros(100 + i as u64 * 7), ms(1));
        }
        let curve = recorder.latency_curve();
        assert!(curve.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(curve.last().map(|p| p.0), Some(100.0));
        assert_eq!(recorder.approved() + recorder.rejected(), 0);
    }
}
