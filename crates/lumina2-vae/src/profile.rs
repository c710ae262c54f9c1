//! Optional wall-clock accounting per op group, to see where a decode's time
//! goes (`cargo run -p xtask --release --example decode_time -- MODEL_DIR --profile`). Off by default; when off, a span
//! costs one relaxed atomic load. candle's CPU ops are synchronous, so a span's
//! wall time is the op's time; on GPUs spans only measure the launch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The op groups a decode or encode is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// 3x3 convolutions (any stride), bias included.
    Conv3x3,
    /// 1x1 convolutions (the resnets' shortcuts), bias included.
    Conv1x1,
    /// Group norms (statistics and affine), alone or fused with the activation.
    GroupNorm,
    /// The activation after a group norm, when not fused.
    Activation,
    /// Nearest 2x upsampling (with the following convolution when fused).
    Upsample,
    /// The middle block's attention (its norm, projections, scores, softmax).
    Attention,
    /// The residual additions.
    Residual,
    /// Everything else: dtype conversions, padding, tiling's blends and copies.
    Other,
}

/// Every group, in report order.
pub const OPS: [Op; 8] = [
    Op::Conv3x3,
    Op::Conv1x1,
    Op::GroupNorm,
    Op::Activation,
    Op::Upsample,
    Op::Attention,
    Op::Residual,
    Op::Other,
];

impl Op {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::Conv3x3 => "conv 3x3",
            Op::Conv1x1 => "conv 1x1",
            Op::GroupNorm => "group norm",
            Op::Activation => "activation",
            Op::Upsample => "upsample",
            Op::Attention => "attention",
            Op::Residual => "residual add",
            Op::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static CALLS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Turns accounting on or off (process-wide).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the accumulated times.
pub fn reset() {
    for (n, c) in NANOS.iter().zip(CALLS.iter()) {
        n.store(0, Ordering::Relaxed);
        c.store(0, Ordering::Relaxed);
    }
}

/// (group, seconds, calls) accumulated since the last [`reset`].
pub fn report() -> Vec<(Op, f64, u64)> {
    OPS.iter()
        .map(|&op| {
            let i = op.index();
            (
                op,
                NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                CALLS[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Adds the time until it is dropped to its group (when accounting is on).
pub(crate) struct Span {
    start: Option<(Op, Instant)>,
}

/// Starts timing `op`; nested spans are counted in both groups, so the
/// callers only open spans around leaves.
pub(crate) fn span(op: Op) -> Span {
    Span {
        start: ENABLED
            .load(Ordering::Relaxed)
            .then(|| (op, Instant::now())),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((op, t0)) = self.start {
            let i = op.index();
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            NANOS[i].fetch_add(ns, Ordering::Relaxed);
            CALLS[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}
