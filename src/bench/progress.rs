//! Live progress display on stderr (only when stderr is a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often the live rate is recomputed.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// A progress bar showing elapsed/total time and the live operation rate.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    warmup: Duration,
    window_start: Instant,
    window_ops: u64,
}

impl Progress {
    /// A display for one run of `total` (warm-up included); hidden unless `enabled` and
    /// stderr is a terminal.
    pub(crate) fn new(enabled: bool, label: String, warmup: Duration, total: Duration) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(total.as_millis().try_into().unwrap_or(u64::MAX)),
                ProgressDrawTarget::stderr_with_hz(10),
            );
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix:.bold} [{elapsed_precise}] {bar:30.cyan/blue} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label);
            bar.set_message("warming up");
            bar
        });
        Self {
            bar,
            warmup,
            window_start: Instant::now(),
            window_ops: 0,
        }
    }

    /// Updates the display: `elapsed` since the start (warm-up included) and the count of
    /// measured operations completed so far.
    pub(crate) fn tick(&mut self, elapsed: Duration, measured_ops: u64) {
        let Some(bar) = &self.bar else { return };
        bar.set_position(elapsed.as_millis().try_into().unwrap_or(u64::MAX));
        if elapsed < self.warmup {
            return;
        }
        let now = Instant::now();
        let window = now.duration_since(self.window_start);
        if window >= RATE_WINDOW {
            let rate = measured_ops.saturating_sub(self.window_ops) as f64 / window.as_secs_f64();
            bar.set_message(format!("{} ops/s", human_rate(rate)));
            self.window_start = now;
            self.window_ops = measured_ops;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `1234567.0` → `1.23M`, `5400.0` → `5.40k`, `12.0` → `12`.
pub(crate) fn human_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_abbreviated() {
        assert_eq!(human_rate(1_234_567.0), "1.23M");
        assert_eq!(human_rate(5_400.0), "5.40k");
        assert_eq!(human_rate(12.2), "12");
    }

    #[test]
    fn hidden_progress_is_inert() {
        let mut p = Progress::new(false, "x".into(), Duration::ZERO, Duration::from_secs(1));
        p.tick(Duration::from_millis(700), 10);
    }
}
