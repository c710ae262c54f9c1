//! Three-axis rotary position embedding (caption position, image row, image column).
//!
//! Each axis has its own frequency table, computed once when the model is built
//! (in f64, as diffusers does, stored as f32 cos/sin). A forward gathers the rows
//! its position ids need and concatenates the axes: the head dimension is split
//! as `axes_dim_rope`, and each consecutive pair of channels is rotated as one
//! complex number (the "interleaved" RoPE layout).

use candle_core::{Device, Tensor};

use crate::error::{invalid_input, Result};
use lumina2_kernels::ops;
use lumina2_kernels::profile::{groups, span};

/// Per-position rotation factors for a batch: `cos` and `sin` of shape `[B, S, head_dim/2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `cos(angle)`, `[B, S, head_dim/2]`, f32.
    pub cos: Tensor,
    /// `sin(angle)`, `[B, S, head_dim/2]`, f32.
    pub sin: Tensor,
}

impl Rope {
    /// Rotates `x` of shape `[B, H, S, head_dim]`. The rotation is done in f32
    /// and rounded once to `x`'s dtype, as diffusers' complex product.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _span = span(groups::ROPE);
        ops::rope::interleaved(x, &self.cos, &self.sin)
    }

    /// Rotates `x` of shape `[B, S, H, head_dim]` and returns it as
    /// `[B, H, S, head_dim]` (contiguous): [`Self::apply`] on the transposed
    /// `x`, in one pass where the CPU allows.
    pub fn apply_to_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _span = span(groups::ROPE);
        ops::rope::interleaved_to_heads(x, &self.cos, &self.sin)
    }
}

/// One position of the joint sequence: `[caption index, row, column]`, or
/// [`Position::Zero`] for the caption padding that diffusers multiplies by 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// A real position on the three axes.
    At([u32; 3]),
    /// A zero rotation factor (diffusers' zero-filled `cap_freqs_cis` rows).
    Zero,
}

/// How a RoPE table's angles become cos and sin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeAngles {
    /// cos and sin of the f64 angle, rounded to f32 (Lumina2's
    /// `get_1d_rotary_pos_embed(freqs_dtype=float64)`).
    F64,
    /// The f64 angle rounded to f32 first, then its cos and sin (Z-Image's
    /// `torch.outer(...).float()` before `torch.polar`).
    F32,
}

/// The precomputed frequency tables of the three axes.
#[derive(Debug, Clone)]
pub struct RopeEmbedder {
    axes_dim: Vec<usize>,
    axes_lens: Vec<usize>,
    /// Per axis: `[len, dim/2]` cos and sin tables, f32, on the model device.
    cos: Vec<Tensor>,
    sin: Vec<Tensor>,
    device: Device,
}

impl RopeEmbedder {
    /// Builds the tables `angle[p, k] = p / theta^(2k/d)` for each axis, cos
    /// and sin of the f64 angle ([`RopeAngles::F64`]).
    pub fn new(
        theta: f64,
        axes_dim: &[usize],
        axes_lens: &[usize],
        device: &Device,
    ) -> Result<Self> {
        Self::with_angles(theta, axes_dim, axes_lens, RopeAngles::F64, device)
    }

    /// [`Self::new`] with the angle rounding `angles`.
    pub fn with_angles(
        theta: f64,
        axes_dim: &[usize],
        axes_lens: &[usize],
        angles: RopeAngles,
        device: &Device,
    ) -> Result<Self> {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for (&d, &len) in axes_dim.iter().zip(axes_lens) {
            let half = d / 2;
            let inv: Vec<f64> = (0..half)
                .map(|k| 1.0 / theta.powf((2 * k) as f64 / d as f64))
                .collect();
            let mut c = Vec::with_capacity(len * half);
            let mut s = Vec::with_capacity(len * half);
            for p in 0..len {
                for f in &inv {
                    let a = match angles {
                        RopeAngles::F64 => p as f64 * f,
                        // cos and sin of the f32 angle, computed in f64 and
                        // rounded once (torch's f32 cos is within an ulp of it).
                        RopeAngles::F32 => (p as f64 * f) as f32 as f64,
                    };
                    c.push(a.cos() as f32);
                    s.push(a.sin() as f32);
                }
            }
            cos.push(Tensor::from_vec(c, (len, half), device)?);
            sin.push(Tensor::from_vec(s, (len, half), device)?);
        }
        Ok(Self {
            axes_dim: axes_dim.to_vec(),
            axes_lens: axes_lens.to_vec(),
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// Rotation factors for `positions[b][s]`, shape `[B, S, head_dim/2]`.
    /// Every row of `positions` must have the same length.
    pub fn gather(&self, positions: &[Vec<Position>]) -> Result<Rope> {
        let b = positions.len();
        let s = positions.first().map_or(0, |p| p.len());
        if positions.iter().any(|p| p.len() != s) {
            return Err(invalid_input("positions", "rows of different lengths"));
        }
        let half_total: usize = self.axes_dim.iter().map(|d| d / 2).sum();
        let mut cos_axes = Vec::with_capacity(3);
        let mut sin_axes = Vec::with_capacity(3);
        for axis in 0..self.axes_dim.len() {
            let mut idx = Vec::with_capacity(b * s);
            let mut keep = Vec::with_capacity(b * s);
            for row in positions {
                for p in row {
                    match p {
                        Position::At(ids) => {
                            let id = ids[axis] as usize;
                            if id >= self.axes_lens[axis] {
                                return Err(invalid_input(
                                    "positions",
                                    format!(
                                        "position {id} on RoPE axis {axis} is beyond the table \
                                         length {} (axes_lens); the caption is too long or the \
                                         image too large for this model",
                                        self.axes_lens[axis]
                                    ),
                                ));
                            }
                            idx.push(id as u32);
                            keep.push(1f32);
                        }
                        Position::Zero => {
                            idx.push(0);
                            keep.push(0f32);
                        }
                    }
                }
            }
            let idx = Tensor::from_vec(idx, b * s, &self.device)?;
            let keep = Tensor::from_vec(keep, (b * s, 1), &self.device)?;
            cos_axes.push(self.cos[axis].index_select(&idx, 0)?.broadcast_mul(&keep)?);
            sin_axes.push(self.sin[axis].index_select(&idx, 0)?.broadcast_mul(&keep)?);
        }
        let cos = Tensor::cat(&cos_axes, 1)?.reshape((b, s, half_total))?;
        let sin = Tensor::cat(&sin_axes, 1)?.reshape((b, s, half_total))?;
        Ok(Rope { cos, sin })
    }
}
