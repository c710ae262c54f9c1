//! Counters, gauges and histograms in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Default)]
struct HistogramState {
    /// Observations at or below each bound (not cumulative; summed on output).
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len()],
                ..Default::default()
            }),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            if let Some(c) = s.counts.get_mut(i) {
                *c += 1;
            }
        }
        s.count += 1;
        s.sum += secs;
    }

    /// The mean observation, if there was one.
    pub fn mean(&self) -> Option<f64> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (s.count > 0).then(|| s.sum / s.count as f64)
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&s.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}", s.sum);
        let _ = writeln!(out, "{name}_count {}", s.count);
    }
}

/// Request latency: a tiny model answers in tens of milliseconds, a large
/// image on a CPU in many minutes.
const REQUEST_BOUNDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Denoising step latency.
const STEP_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The server's metrics.
pub struct Metrics {
    /// Jobs waiting in the queue.
    pub queued: AtomicUsize,
    /// Jobs rendering (0 or 1).
    pub running: AtomicUsize,
    /// Jobs that produced their images.
    pub completed: AtomicU64,
    /// Jobs that failed.
    pub failed: AtomicU64,
    /// Jobs cancelled (DELETE, a client gone, shutdown).
    pub cancelled: AtomicU64,
    /// Requests refused because the queue was full or the server stopping.
    pub rejected: AtomicU64,
    /// Requests refused as invalid (400, 413).
    pub invalid: AtomicU64,
    /// Time from a generation request to its result.
    pub request_seconds: Histogram,
    /// Time of each denoising step.
    pub step_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            request_seconds: Histogram::new(REQUEST_BOUNDS),
            step_seconds: Histogram::new(STEP_BOUNDS),
        }
    }

    /// Everything, in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "lumina2_queue_depth",
            "Jobs waiting in the queue.",
            self.queued.load(Ordering::SeqCst) as u64,
        );
        gauge(
            "lumina2_jobs_running",
            "Jobs rendering now.",
            self.running.load(Ordering::SeqCst) as u64,
        );
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::SeqCst)
            );
        };
        counter(
            "lumina2_jobs_completed_total",
            "Jobs that produced their images.",
            &self.completed,
        );
        counter(
            "lumina2_jobs_failed_total",
            "Jobs that failed.",
            &self.failed,
        );
        counter(
            "lumina2_jobs_cancelled_total",
            "Jobs cancelled before they finished.",
            &self.cancelled,
        );
        counter(
            "lumina2_requests_rejected_total",
            "Requests refused because the queue was full or the server stopping.",
            &self.rejected,
        );
        counter(
            "lumina2_requests_invalid_total",
            "Requests refused as invalid (400, 413).",
            &self.invalid,
        );
        self.request_seconds.write(
            &mut out,
            "lumina2_request_duration_seconds",
            "Time from a generation request to its result (queue wait included).",
        );
        self.step_seconds.write(
            &mut out,
            "lumina2_step_duration_seconds",
            "Time of each denoising step.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::new();
        m.step_seconds.observe(Duration::from_millis(3));
        m.step_seconds.observe(Duration::from_millis(30));
        m.step_seconds.observe(Duration::from_secs(100));
        let text = m.render();
        assert!(text.contains("lumina2_step_duration_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("lumina2_step_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("lumina2_step_duration_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("lumina2_step_duration_seconds_bucket{le=\"60\"} 2\n"));
        assert!(text.contains("lumina2_step_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("lumina2_step_duration_seconds_count 3\n"));
        assert!(text.contains("lumina2_queue_depth 0\n"));
    }
}
