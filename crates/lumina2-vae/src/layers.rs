//! Building blocks: weight loading with shape checks, convolution, group norm,
//! linear layers and activations, with the precision rules PyTorch follows.
//!
//! Precision: convolutions and linear layers on the CPU run in f32 when the
//! model dtype is a half type (candle has no half-precision CPU convolution;
//! PyTorch accumulates half products in f32 too) and round their output to the
//! model dtype. Group norms and activations compute in f32 and round to the
//! model dtype, as PyTorch's CPU kernels do.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::{Result, VaeError};

/// Loads `name` under `vb`'s prefix with exactly `shape`, with typed errors.
pub(crate) fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    let key = if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    };
    if !vb.contains_tensor(name) {
        return Err(VaeError::MissingWeight { key });
    }
    let t = vb
        .get_unchecked(name)
        .map_err(|source| VaeError::WeightLoad {
            key: key.clone(),
            source,
        })?;
    if t.dims() != shape {
        return Err(VaeError::WeightShape {
            key,
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(t)
}

/// The dtype matmul-like work runs in: f32 on the CPU for half dtypes.
fn compute_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && dtype != DType::F64 {
        DType::F32
    } else {
        dtype
    }
}

/// Rounds an f32 tensor through `dtype` and back (what storing a PyTorch
/// intermediate in a half dtype does); a no-op for f32.
pub(crate) fn round_through(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == x.dtype() {
        Ok(x.clone())
    } else {
        Ok(x.to_dtype(dtype)?.to_dtype(x.dtype())?)
    }
}

/// A 2D convolution with bias (`nn.Conv2d`).
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    dtype: DType,
}

impl Conv2d {
    /// Loads `weight` [out, in, k, k] and `bias` [out].
    pub(crate) fn load(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let dtype = vb.dtype();
        let cdt = compute_dtype(dtype, vb.device());
        let weight = get(vb, &[c_out, c_in, kernel, kernel], "weight")?.to_dtype(cdt)?;
        let bias = get(vb, &[c_out], "bias")?
            .to_dtype(cdt)?
            .reshape((1, c_out, 1, 1))?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            dtype,
        })
    }

    /// Applies the convolution; the output has the model dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.weight.dtype())?;
        let y = x
            .conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias)?;
        Ok(y.to_dtype(self.dtype)?)
    }
}

/// A linear layer with bias (`nn.Linear`), applied to the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight_t: Tensor,
    bias: Tensor,
    dtype: DType,
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out].
    pub(crate) fn load(vb: &VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        let dtype = vb.dtype();
        let cdt = compute_dtype(dtype, vb.device());
        let weight_t = get(vb, &[c_out, c_in], "weight")?
            .to_dtype(cdt)?
            .t()?
            .contiguous()?;
        let bias = get(vb, &[c_out], "bias")?.to_dtype(cdt)?;
        Ok(Self {
            weight_t,
            bias,
            dtype,
        })
    }

    /// `x @ W^T + b` for `x` [b, n, in]; output in the model dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.weight_t.dtype())?;
        let y = x
            .broadcast_matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?;
        Ok(y.to_dtype(self.dtype)?)
    }
}

/// `nn.GroupNorm` with affine parameters, computed in f32 (statistics summed
/// in two levels, rows in f32 and their sums in f64, so that millions of
/// elements per group stay accurate).
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` [c] and `bias` [c].
    pub(crate) fn load(vb: &VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let weight = get(vb, &[channels], "weight")?
            .to_dtype(DType::F32)?
            .reshape((1, channels, 1, 1))?;
        let bias = get(vb, &[channels], "bias")?
            .to_dtype(DType::F32)?
            .reshape((1, channels, 1, 1))?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Normalises `x` [b, c, h, w]; the output is f32.
    pub(crate) fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
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
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// The residual blocks' nonlinearity (diffusers' `get_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    Relu,
    Gelu,
    Mish,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            "mish" => Ok(Self::Mish),
            other => Err(VaeError::Config(format!(
                "act_fn `{other}` is not supported"
            ))),
        }
    }

    /// Applies the activation to an f32 tensor.
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => candle_nn::ops::silu(x)?,
            Self::Relu => x.relu()?,
            Self::Gelu => x.gelu_erf()?,
            // x * tanh(softplus(x)); softplus as PyTorch: x above 20 stays x.
            Self::Mish => {
                let sp = x.exp()?.affine(1.0, 1.0)?.log()?;
                let big = x.ge(20f64)?;
                let sp = big.where_cond(x, &sp)?;
                (x * sp.tanh()?)?
            }
        })
    }
}

/// Group norm then activation, rounding as PyTorch does in a half dtype:
/// the norm's output is stored in `dtype`, the activation reads it in f32 and
/// its output is stored in `dtype`.
pub(crate) fn norm_act(
    norm: &GroupNorm,
    act: Activation,
    x: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let y = round_through(&norm.forward_f32(x)?, dtype)?;
    Ok(act.apply(&y)?.to_dtype(dtype)?)
}
