//! Timestep, caption and patch embeddings.

use candle_core::{DType, Device, Tensor};

use crate::error::{invalid_input, Result};
use crate::norm::{silu, RmsNorm};
use crate::weights::{Linear, Weights};

/// Width of the sinusoidal timestep features (diffusers' `frequency_embedding_size`).
pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;

/// Sinusoidal timestep features as diffusers' `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`: `[cos(t f_k), sin(t f_k)]` with `f_k = 10000^(-k/half)`.
///
/// Computed in f32, as diffusers does, whatever the compute dtype.
pub fn timestep_features(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let t = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let ln_period = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-ln_period * k as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &ti in &t {
        let args: Vec<f32> = freqs.iter().map(|f| ti * f).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
        // diffusers pads odd widths with one zero.
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Tensor::from_vec(out, (t.len(), dim), &Device::Cpu)
}

/// diffusers' `TimestepEmbedding` (Lumina2) and Z-Image's `TimestepEmbedder`:
/// `linear_2(silu(linear_1(features)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedder {
    /// Loads `linear_1` (`256 -> out_dim`) and `linear_2` (`out_dim -> out_dim`).
    pub fn load(w: &Weights, out_dim: usize) -> Result<Self> {
        Self::load_with(w, ("linear_1", "linear_2"), out_dim, out_dim)
    }

    /// Loads `names.0` (`256 -> mid_dim`) and `names.1` (`mid_dim -> out_dim`).
    pub fn load_with(
        w: &Weights,
        names: (&str, &str),
        mid_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: w.linear(names.0, FREQUENCY_EMBEDDING_SIZE, mid_dim, true)?,
            linear_2: w.linear(names.1, mid_dim, out_dim, true)?,
        })
    }

    /// `t`: `[B]` times as the sinusoid reads them (Lumina2: model times,
    /// 0 = noise, 1 = image) -> `[B, out_dim]` in `dtype` on `device`.
    pub fn forward(
        &self,
        t: &Tensor,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let feats = timestep_features(t, FREQUENCY_EMBEDDING_SIZE)?
            .to_device(device)?
            .to_dtype(dtype)?;
        let h = silu(&self.linear_1.forward(&feats)?)?;
        self.linear_2.forward(&h)
    }
}

/// The caption embedder: RMS norm of the text features, then a linear map to the model width.
#[derive(Debug, Clone)]
pub struct CaptionEmbedder {
    norm: RmsNorm,
    linear: Linear,
}

impl CaptionEmbedder {
    /// Loads `0.weight` (norm over `cap_feat_dim`) and `1` (`cap_feat_dim -> hidden`).
    pub fn load(w: &Weights, cap_feat_dim: usize, hidden: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::load(w, "0", cap_feat_dim, eps)?,
            linear: w.linear("1", cap_feat_dim, hidden, true)?,
        })
    }

    /// `[B, L, cap_feat_dim]` -> `[B, L, hidden]`.
    pub fn forward(&self, caption: &Tensor) -> candle_core::Result<Tensor> {
        self.linear.forward(&self.norm.forward(caption)?)
    }
}

/// Cuts `[B, C, H, W]` latents into `[B, (H/p)(W/p), p*p*C]` patch tokens, row-major
/// over patches, each patch ordered `(dy, dx, c)` as diffusers does.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % p != 0 || w % p != 0 {
        return Err(invalid_input(
            "hidden_states",
            format!("latent size {h}x{w} is not a multiple of the patch size {p}"),
        ));
    }
    let (hp, wp) = (h / p, w / p);
    Ok(x.reshape((b, c, hp, p, wp, p))?
        .permute((0, 2, 4, 3, 5, 1))?
        .reshape((b, hp * wp, p * p * c))?)
}

/// Inverse of [`patchify`] for one image: `[(H/p)(W/p), p*p*C]` -> `[C, H, W]`.
pub fn unpatchify(tokens: &Tensor, p: usize, c: usize, h: usize, w: usize) -> Result<Tensor> {
    let (hp, wp) = (h / p, w / p);
    Ok(tokens
        .reshape((hp, wp, p, p, c))?
        .permute((4, 0, 2, 1, 3))?
        .reshape((c, h, w))?)
}
