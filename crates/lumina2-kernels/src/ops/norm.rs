//! Normalisations: diffusers' RMS norm ([`rms_norm`]), Gemma's RMS norm
//! ([`rms_norm_f32`]), and group norm with an optional fused activation
//! ([`GroupNorm`]).

use candle_core::{DType, Device, Tensor, WithDType, D};

use crate::cpu::CpuView;
use crate::elementwise::fused;
use crate::norm::group::{self, FusedAct, NormShape};

/// Where an RMS norm or a group norm runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// One pass of this crate's kernel ([`fused::rms_norm_bf16`],
    /// [`group::group_norm_act`]).
    Kernel,
    /// candle's ops.
    Candle,
}

/// diffusers' `RMSNorm` over the last dimension: the mean square taken in
/// f32, the normalised value cast back to `x`'s dtype and only then
/// multiplied by `weight` (two roundings in bf16, as PyTorch does);
/// `weight: None` normalises only.
///
/// f32 with a weight: candle's fused `rms_norm` (in f32 the rounding order
/// does not matter). bf16: one pass of [`fused::rms_norm_bf16`] where it
/// applies. Otherwise candle's ops.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if let (Some(w), DType::F32) = (weight, dtype) {
        return candle_nn::ops::rms_norm(x, w, eps as f32);
    }
    if dtype == DType::BF16 {
        if let Some(y) = fused::rms_norm_bf16(x, weight, eps)? {
            return Ok(y);
        }
    }
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?;
    let y = y.to_dtype(dtype)?;
    match weight {
        Some(w) => y.broadcast_mul(w),
        None => Ok(y),
    }
}

/// The path [`rms_norm`] takes for a `dtype` tensor on `device` (a weighted
/// f32 norm is candle's fused op, counted as candle).
pub fn rms_norm_path(device: &Device, dtype: DType) -> Path {
    if dtype == DType::BF16 && device.is_cpu() && crate::caps().avx512_bf16 {
        Path::Kernel
    } else {
        Path::Candle
    }
}

/// An RMS norm computed in f32 throughout, as Gemma's: `x / sqrt(mean(x^2) +
/// eps) * weight` with an f32 `weight` (Gemma passes `1 + w`), the result
/// rounded once to `x`'s dtype.
pub fn rms_norm_f32(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&inv)?.broadcast_mul(weight)?;
    y.to_dtype(dtype)
}

/// `nn.GroupNorm` with affine parameters over `[B, C, H, W]`, computed in
/// f32 (statistics summed in two levels, rows in f32 and their sums in f64,
/// so that millions of elements per group stay accurate), optionally fused
/// with its activation.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// `[1, C, 1, 1]` f32, for candle's path.
    weight: Tensor,
    bias: Tensor,
    /// The same values, for the kernel.
    weight_v: Vec<f32>,
    bias_v: Vec<f32>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// From `weight` and `bias` of `C` values (any float dtype; kept in f32).
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        let weight = weight.to_dtype(DType::F32)?;
        let bias = bias.to_dtype(DType::F32)?;
        let c = weight.elem_count();
        Ok(Self {
            weight_v: weight.flatten_all()?.to_vec1()?,
            bias_v: bias.flatten_all()?.to_vec1()?,
            weight: weight.reshape((1, c, 1, 1))?,
            bias: bias.reshape((1, c, 1, 1))?,
            groups,
            eps,
        })
    }

    /// The path a `[B, C, H, W]` input on `device` takes (where the kernel
    /// accepts its sizes).
    pub fn path(device: &Device) -> Path {
        if device.is_cpu() {
            Path::Kernel
        } else {
            Path::Candle
        }
    }

    /// Normalises `x` `[B, C, H, W]`; the output is f32.
    pub fn forward_f32(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_act(x, FusedAct::None, DType::F32)? {
            return Ok(y);
        }
        let (b, c, h, w) = x.dims4()?;
        let g = self.groups;
        let n = (c / g * h * w) as f64;
        let x = x.to_dtype(DType::F32)?;
        let grouped = x.reshape((b, g, c / g * h, w))?;
        let mean = (grouped.sum(D::Minus1)?.to_dtype(DType::F64)?.sum(2)? / n)?;
        let mean = mean.to_dtype(DType::F32)?.reshape((b, g, 1, 1))?;
        let centered = grouped.broadcast_sub(&mean)?;
        let var = (centered
            .sqr()?
            .sum(D::Minus1)?
            .to_dtype(DType::F64)?
            .sum(2)?
            / n)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let rstd = rstd.to_dtype(DType::F32)?.reshape((b, g, 1, 1))?;
        let y = centered.broadcast_mul(&rstd)?.reshape((b, c, h, w))?;
        y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }

    /// `act(round(norm(x)))` in f32 in one pass per statistic and one for
    /// the output, where `round` stores in `dtype` as PyTorch does: bf16 read
    /// and written as bf16, f16 rounded through f16 (output f32), f32 as is.
    /// `None` where the kernel does not run (off the CPU, or sizes it does
    /// not take): the caller composes candle's ops ([`Self::forward_f32`],
    /// then the activation).
    pub fn forward_act(
        &self,
        x: &Tensor,
        act: FusedAct,
        dtype: DType,
    ) -> candle_core::Result<Option<Tensor>> {
        if Self::path(x.device()) != Path::Kernel {
            return Ok(None);
        }
        let (b, c, h, w) = x.dims4()?;
        let shape = NormShape {
            batch: b,
            channels: c,
            hw: h * w,
            groups: self.groups,
        };
        let (wv, bv, eps) = (&self.weight_v, &self.bias_v, self.eps);
        let dims = (b, c, h, w);
        // bf16 in and out: read and written as bf16, computed in f32.
        if dtype == DType::BF16 {
            let x = crate::cast(&x.contiguous()?, DType::BF16)?;
            return on_cpu(&x, dims, |xs: &[half::bf16]| {
                group::group_norm_act::<_, half::bf16, _>(
                    xs,
                    shape,
                    eps,
                    wv,
                    bv,
                    act,
                    group::round_bf16,
                )
            });
        }
        let x = crate::cast(&x.contiguous()?, DType::F32)?;
        on_cpu(&x, dims, |xs: &[f32]| match dtype {
            DType::F16 => group::group_norm_act::<_, f32, _>(xs, shape, eps, wv, bv, act, |v| {
                half::f16::from_f32(v).to_f32()
            }),
            _ => group::group_norm_act::<_, f32, _>(xs, shape, eps, wv, bv, act, |v| v),
        })
    }
}

/// `f` on the elements of the contiguous CPU tensor `x` of element type `I`,
/// its output as a `dims` tensor; `None` when `x` is not such a tensor or
/// `f` declines.
fn on_cpu<I: WithDType, O: WithDType>(
    x: &Tensor,
    dims: (usize, usize, usize, usize),
    f: impl FnOnce(&[I]) -> Option<Vec<O>>,
) -> candle_core::Result<Option<Tensor>> {
    let view = CpuView::of(x);
    let y = view.as_ref().and_then(|v| v.slice::<I>()).and_then(f);
    drop(view);
    y.map(|y| Tensor::from_vec(y, dims, x.device())).transpose()
}
