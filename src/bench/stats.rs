//! Latency histograms and the arithmetic that turns counts into rates.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Highest latency tracked exactly (60 s); longer ones saturate at this value.
const MAX_TRACKED_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds with 3 significant digits.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram covering 1 ns to 60 s.
    pub fn new() -> Self {
        // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3)
            .expect("constant histogram bounds are valid");
        Self { hist }
    }

    /// Records `count` operations that each took `latency`.
    pub fn record(&mut self, latency: Duration, count: u64) {
        if count == 0 {
            return;
        }
        let ns = u64::try_from(latency.as_nanos())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_TRACKED_NS);
        self.hist.saturating_record_n(ns, count);
    }

    /// Adds every sample of `other` to `self`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Both histograms have identical bounds, so adding cannot go out of range; if it
        // ever did, fall back to re-recording bucket by bucket with saturation.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Number of recorded operations.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The latency at quantile `q` (0.0..=1.0) in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.value_at_quantile(q.clamp(0.0, 1.0)) as f64 / 1000.0
    }
}

/// Counts and latencies of one run, merged over all clients.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Latency of every successful operation.
    pub latency: LatencyHistogram,
    /// Successful operations in the measured window.
    pub ops: u64,
    /// Failed operations in the measured window.
    pub errors: u64,
    /// Length of the measured window (the longest of the clients').
    pub elapsed: Duration,
    /// First error message seen, if any.
    pub first_error: Option<String>,
}

impl Tally {
    /// Merges another client's tally into this one.
    pub fn merge(&mut self, other: &Tally) {
        self.latency.merge(&other.latency);
        self.ops += other.ops;
        self.errors += other.errors;
        self.elapsed = self.elapsed.max(other.elapsed);
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    /// Rates and percentiles, with `payload_bytes` moved by each operation.
    pub fn summary(&self, payload_bytes: u64) -> Summary {
        let secs = self.elapsed.as_secs_f64();
        let ops_per_sec = if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        };
        Summary {
            ops: self.ops,
            errors: self.errors,
            duration_s: secs,
            ops_per_sec,
            mib_per_sec: ops_per_sec * payload_bytes as f64 / (1u64 << 20) as f64,
            p50_us: self.latency.quantile_us(0.50),
            p99_us: self.latency.quantile_us(0.99),
            p999_us: self.latency.quantile_us(0.999),
        }
    }
}

/// The numbers reported for one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Successful operations.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Payload MiB per second.
    pub mib_per_sec: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
}

/// Median of `values` (mean of the two middle values for an even count); `None` when
/// empty. NaNs sort last.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: f64, expected: f64, rel: f64) -> bool {
        (actual - expected).abs() <= expected * rel
    }

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us), 1);
        }
        assert_eq!(h.count(), 1000);
        assert!(within(h.quantile_us(0.5), 500.0, 0.01));
        assert!(within(h.quantile_us(0.99), 990.0, 0.01));
        assert!(within(h.quantile_us(0.999), 999.0, 0.01));
    }

    #[test]
    fn batch_records_count_once_per_op() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_micros(10), 16);
        h.record(Duration::from_micros(20), 0);
        assert_eq!(h.count(), 16);
        assert!(within(h.quantile_us(0.99), 10.0, 0.01));
    }

    #[test]
    fn merge_combines_threads() {
        let mut a = Tally::default();
        a.latency.record(Duration::from_micros(100), 90);
        a.ops = 90;
        a.elapsed = Duration::from_secs(2);
        let mut b = Tally::default();
        b.latency.record(Duration::from_micros(1000), 10);
        b.ops = 10;
        b.errors = 3;
        b.elapsed = Duration::from_millis(2100);
        b.first_error = Some("boom".into());
        a.merge(&b);
        assert_eq!(a.ops, 100);
        assert_eq!(a.errors, 3);
        assert_eq!(a.elapsed, Duration::from_millis(2100));
        assert_eq!(a.first_error.as_deref(), Some("boom"));
        let s = a.summary(4096);
        assert!(within(s.p50_us, 100.0, 0.01));
        assert!(within(s.p99_us, 1000.0, 0.01));
        assert!(within(s.ops_per_sec, 100.0 / 2.1, 1e-9));
        assert!(within(
            s.mib_per_sec,
            s.ops_per_sec * 4096.0 / 1048576.0,
            1e-9
        ));
    }

    #[test]
    fn empty_and_saturating() {
        let t = Tally::default();
        let s = t.summary(8);
        assert_eq!(s.ops_per_sec, 0.0);
        assert_eq!(s.p99_us, 0.0);
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_secs(3600), 1);
        h.record(Duration::ZERO, 1);
        assert_eq!(h.count(), 2);
        assert!(h.quantile_us(1.0) >= 59_000_000.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
