//! Benchmarks that put Quantix beside its comparisons in one run, and the small statistics they share.
//!
//! `cargo bench` runs `benches/vm_start.rs`: VM start latency of raw QEMU (the floor) and qx-node, interleaved,
//! plus qx-node's memory and binary size. Figures are printed as ratios against the comparison measured in the same
//! run; there are no stored baselines.
//!
//! ```
//! use std::time::Duration;
//! let summary = qx_benches::Summary::of(&[Duration::from_millis(3), Duration::from_millis(1), Duration::from_millis(2)]);
//! assert_eq!(summary.median, Duration::from_millis(2));
//! ```

use std::time::Duration;

/// Median, extremes and p99 of a set of timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
    pub p99: Duration,
}

impl Summary {
    /// Summarises `samples`; all zero when there are none.
    pub fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let at = |q: f64| -> Duration {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            let index = ((sorted.len() - 1) as f64 * q).round() as usize;
            sorted[index]
        };
        Self {
            median: at(0.5),
            min: sorted.first().copied().unwrap_or_default(),
            max: sorted.last().copied().unwrap_or_default(),
            p99: at(0.99),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        serde_json::json!({ "median_ms": ms(self.median), "min_ms": ms(self.min), "max_ms": ms(self.max), "p99_ms": ms(self.p99) })
    }
}

/// `a / b` as a ratio of medians, for printing.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        return f64::NAN;
    }
    a.as_secs_f64() / b.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_nothing_is_zero() {
        assert_eq!(Summary::of(&[]).median, Duration::ZERO);
    }

    #[test]
    fn p99_of_a_small_set_is_its_maximum() {
        let samples: Vec<Duration> = (1..=16).map(Duration::from_millis).collect();
        let summary = Summary::of(&samples);
        assert_eq!(summary.p99, Duration::from_millis(16));
        assert_eq!(summary.min, Duration::from_millis(1));
    }
}
