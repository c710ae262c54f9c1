//! Optional wall-clock accounting per op group, to see where a forward's time
//! goes (`cargo xtask bench --what transformer --profile`). Off by default;
//! when off, a span costs one relaxed atomic load. candle's CPU ops are
//! synchronous, so a span's wall time is the op's time (on GPUs it would only
//! measure the launch). Spans should wrap leaves only: nested spans count in
//! both groups.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// (group, nanoseconds, calls), in first-use order.
static TABLE: Mutex<Vec<(&'static str, u64, u64)>> = Mutex::new(Vec::new());

/// Turns accounting on or off (process-wide).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the accumulated times.
pub fn reset() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// (group, seconds, calls) accumulated since the last [`reset`], in the order
/// the groups were first seen.
pub fn report() -> Vec<(&'static str, f64, u64)> {
    TABLE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|&(g, ns, calls)| (g, ns as f64 * 1e-9, calls))
        .collect()
}

/// Adds the time until it is dropped to its group (when accounting is on).
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    start: Option<(&'static str, Instant)>,
}

/// Starts timing `group`.
pub fn span(group: &'static str) -> Span {
    Span {
        start: ENABLED
            .load(Ordering::Relaxed)
            .then(|| (group, Instant::now())),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((group, t0)) = self.start {
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|(g, _, _)| *g == group) {
                Some(e) => {
                    e.1 += ns;
                    e.2 += 1;
                }
                None => t.push((group, ns, 1)),
            }
        }
    }
}

/// Group names shared by the model crates.
pub mod groups {
    /// Linear layers (the matmul, its bias and LoRA factors, and the
    /// dequantisation of a quantised weight).
    pub const LINEAR: &str = "linear layers (matmul)";
    /// Attention scores, softmax and weighted sum.
    pub const ATTENTION: &str = "attention core (scores, softmax, sum)";
    /// RMS and layer norms.
    pub const NORM: &str = "norms";
    /// Rotary position embedding.
    pub const ROPE: &str = "rope";
    /// Elementwise work: activations, modulation, gates, residual additions.
    pub const ELEMENTWISE: &str = "elementwise (activations, modulation, gates, residuals)";
    /// Layout changes and dtype conversions.
    pub const COPY: &str = "copies and casts (transpose, contiguous, dtype)";
}
