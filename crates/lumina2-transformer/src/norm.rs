//! Normalisation layers and activations with diffusers' numerics.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::weights::{Linear, Weights};
use lumina2_kernels::ops;
use lumina2_kernels::profile::{groups, span};

/// diffusers' `RMSNorm`: the mean square is taken in f32, the normalised value
/// is cast back to the compute dtype and only then multiplied by the weight
/// (two roundings in bf16, as PyTorch does).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    /// An RMS norm over `dim` with a learnt weight (`name.weight`).
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Some(w.get(&format!("{name}.weight"), &[dim])?),
            eps,
        })
    }

    /// An RMS norm from its parts; `weight: None` normalises only.
    pub fn new(weight: Option<Tensor>, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _span = span(groups::NORM);
        ops::norm::rms_norm(x, self.weight.as_ref(), self.eps)
    }
}

/// Layer norm without affine parameters, computed in f32 (PyTorch's
/// `nn.LayerNorm(elementwise_affine=False)` accumulates in f32 for bf16 inputs too).
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let _span = span(groups::NORM);
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?
        .to_dtype(dtype)
}

/// SiLU computed in f32 and rounded once to the input dtype (diffusers'
/// `FP32SiLU`; PyTorch's `nn.SiLU` on bf16 rounds once as well).
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    let _span = span(groups::ELEMENTWISE);
    match x.dtype() {
        DType::F32 | DType::F64 => candle_nn::ops::silu(x),
        dtype => candle_nn::ops::silu(&x.to_dtype(DType::F32)?)?.to_dtype(dtype),
    }
}

/// diffusers' `LuminaLayerNormContinuous`, the output norm of the model:
/// `linear_2(layer_norm(x) * (1 + linear_1(silu(temb))))`, without the
/// affine layer-norm parameters and without a gate (Z-Image's `FinalLayer`
/// is the same computation: `linear(norm_final(x) * (1 + adaLN_modulation(temb)))`
/// with `adaLN_modulation = [SiLU, Linear]`).
#[derive(Debug, Clone)]
pub struct OutputNorm {
    linear_1: Linear,
    linear_2: Linear,
    eps: f64,
}

impl OutputNorm {
    /// Loads `linear_1` (`temb_dim -> hidden`) and `linear_2` (`hidden -> out_dim`).
    pub fn load(w: &Weights, temb_dim: usize, hidden: usize, out_dim: usize) -> Result<Self> {
        Self::load_with(w, ("linear_1", "linear_2"), temb_dim, hidden, out_dim)
    }

    /// Loads the scale layer `names.0` (`temb_dim -> hidden`) and the output
    /// layer `names.1` (`hidden -> out_dim`).
    pub fn load_with(
        w: &Weights,
        names: (&str, &str),
        temb_dim: usize,
        hidden: usize,
        out_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: w.linear(names.0, temb_dim, hidden, true)?,
            linear_2: w.linear(names.1, hidden, out_dim, true)?,
            // diffusers constructs it with eps=1e-6, independent of the config.
            eps: 1e-6,
        })
    }

    /// `x`: `[B, S, hidden]`, `temb`: `[B, temb_dim]` -> `[B, S, out_dim]`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        let scale = self.linear_1.forward(&silu(temb)?)?;
        let x = layer_norm_no_affine(x, self.eps)?;
        let x = x.broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?;
        self.linear_2.forward(&x)
    }
}
