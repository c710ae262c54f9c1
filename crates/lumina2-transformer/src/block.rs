//! The transformer block shared by the refiners and the joint stack, and its
//! SwiGLU feed-forward.

use candle_core::Tensor;

use crate::attention::{Attention, KeyMask};
use crate::config::Config;
use crate::error::{invalid_input, Result};
use crate::norm::{silu, RmsNorm};
use crate::rope::Rope;
use crate::weights::{GateAct, Linear, Weights};
use lumina2_kernels::ops;
use lumina2_kernels::profile::{groups, span};

/// diffusers' `LuminaFeedForward`: `linear_2(silu(linear_1(x)) * linear_3(x))`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    linear_1: Linear,
    linear_2: Linear,
    linear_3: Linear,
}

impl FeedForward {
    /// Loads `linear_1`, `linear_3` (`dim -> inner`) and `linear_2` (`inner -> dim`).
    pub fn load(w: &Weights, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            linear_1: w.linear("linear_1", dim, inner, false)?,
            linear_2: w.linear("linear_2", inner, dim, false)?,
            linear_3: w.linear("linear_3", dim, inner, false)?,
        })
    }

    /// `[..., dim]` -> `[..., dim]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // SiLU in f32 rounded to the dtype, then the product, then the last
        // layer; for GGUF weights on AMX without the two [tokens, inner]
        // intermediates, the product written once, in the layout the last
        // matmul reads (the forward's peak memory is here).
        self.linear_1
            .feed_forward(&self.linear_3, &self.linear_2, x, GateAct::Silu)
    }
}

/// The adaLN modulation of a block (diffusers' `LuminaRMSNormZero.linear`):
/// `linear(silu(temb))` split into four `[B, dim]` vectors.
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
}

/// The four modulation vectors of one block, each `[B, 1, dim]`.
#[derive(Debug, Clone)]
pub struct ModulationOut {
    /// Scales the normalised attention input: `norm(x) * (1 + scale_msa)`.
    pub scale_msa: Tensor,
    /// Gates the attention branch through `tanh`.
    pub gate_msa: Tensor,
    /// Scales the normalised feed-forward input.
    pub scale_mlp: Tensor,
    /// Gates the feed-forward branch through `tanh`.
    pub gate_mlp: Tensor,
}

impl Modulation {
    /// Loads `linear` (`temb_dim -> 4 * dim`). Never quantised to int8
    /// ([`Weights::with_int8_linears`]): it runs on one row per image, so
    /// int8 would save nothing, and its outputs scale every activation of
    /// the block.
    pub fn load(w: &Weights, temb_dim: usize, dim: usize) -> Result<Self> {
        let w = w.clone().with_int8_linears(false);
        Ok(Self {
            linear: w.linear("linear", temb_dim, 4 * dim, true)?,
        })
    }

    /// `temb`: `[B, temb_dim]`.
    pub fn forward(&self, temb: &Tensor) -> candle_core::Result<ModulationOut> {
        let emb = self.linear.forward(&silu(temb)?)?.unsqueeze(1)?;
        let c = emb.chunk(4, 2)?;
        Ok(ModulationOut {
            scale_msa: c[0].clone(),
            gate_msa: c[1].clone(),
            scale_mlp: c[2].clone(),
            gate_mlp: c[3].clone(),
        })
    }
}

/// `x * (1 + scale)` with `scale` broadcast over the sequence (one fused pass
/// for bf16 on CPUs with AVX512-BF16).
fn scale(x: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    let _span = span(groups::ELEMENTWISE);
    ops::elementwise::mul_broadcast(x, &(scale + 1.0)?)
}

/// The gated residual `x + tanh(gate) * y`, `gate` broadcast over the
/// sequence (one fused pass for bf16 on CPUs with AVX512-BF16).
fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let _span = span(groups::ELEMENTWISE);
    ops::elementwise::add_mul_broadcast(x, &gate.tanh()?, y)
}

/// The residual addition `x + y`.
fn residual(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let _span = span(groups::ELEMENTWISE);
    x + y
}

/// diffusers' `Lumina2TransformerBlock`: sandwich-normed attention and
/// feed-forward, modulated by the timestep embedding (noise refiner and joint
/// blocks) or not (context refiner).
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    attn: Attention,
    feed_forward: FeedForward,
    norm1: RmsNorm,
    modulation: Option<Modulation>,
    ffn_norm1: RmsNorm,
    norm2: RmsNorm,
    ffn_norm2: RmsNorm,
}

impl TransformerBlock {
    /// Loads one block; `modulated` selects the adaLN variant (`norm1.linear`,
    /// `norm1.norm.weight`) over the plain one (`norm1.weight`).
    pub fn load(w: &Weights, cfg: &Config, modulated: bool) -> Result<Self> {
        let dim = cfg.hidden_size;
        let eps = cfg.norm_eps;
        let (norm1, modulation) = if modulated {
            let n = w.pp("norm1");
            (
                RmsNorm::load(&n, "norm", dim, eps)?,
                Some(Modulation::load(&n, cfg.temb_dim(), dim)?),
            )
        } else {
            (RmsNorm::load(w, "norm1", dim, eps)?, None)
        };
        Ok(Self {
            attn: Attention::load(
                &w.pp("attn"),
                dim,
                cfg.num_attention_heads,
                cfg.num_kv_heads,
            )?,
            feed_forward: FeedForward::load(&w.pp("feed_forward"), dim, cfg.ffn_inner_dim())?,
            norm1,
            modulation,
            ffn_norm1: RmsNorm::load(w, "ffn_norm1", dim, eps)?,
            norm2: RmsNorm::load(w, "norm2", dim, eps)?,
            ffn_norm2: RmsNorm::load(w, "ffn_norm2", dim, eps)?,
        })
    }

    /// Whether the block is modulated by the timestep embedding.
    pub fn is_modulated(&self) -> bool {
        self.modulation.is_some()
    }

    /// The attention layer (for callers that tune its chunking).
    pub fn attn_mut(&mut self) -> &mut Attention {
        &mut self.attn
    }

    /// The modulated attention input `norm1(x) * (1 + scale_msa)` (diffusers'
    /// `norm1(x, temb)[0]`); `None` for an unmodulated block.
    pub fn modulated_input(&self, x: &Tensor, temb: &Tensor) -> Result<Option<Tensor>> {
        match &self.modulation {
            Some(m) => {
                let m = m.forward(temb)?;
                Ok(Some(scale(&self.norm1.forward(x)?, &m.scale_msa)?))
            }
            None => Ok(None),
        }
    }

    /// `x`: `[B, S, dim]`; `temb`: `[B, temb_dim]`, required by modulated blocks.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&KeyMask>,
        temb: Option<&Tensor>,
    ) -> Result<Tensor> {
        match &self.modulation {
            Some(m) => {
                let temb = temb.ok_or_else(|| {
                    invalid_input("temb", "a modulated block needs the timestep embedding")
                })?;
                let m = m.forward(temb)?;
                let h = scale(&self.norm1.forward(x)?, &m.scale_msa)?;
                let a = self.attn.forward(&h, rope, mask)?;
                let x = gated_residual(x, &m.gate_msa, &self.norm2.forward(&a)?)?;
                let h = scale(&self.ffn_norm1.forward(&x)?, &m.scale_mlp)?;
                let f = self.feed_forward.forward(&h)?;
                Ok(gated_residual(
                    &x,
                    &m.gate_mlp,
                    &self.ffn_norm2.forward(&f)?,
                )?)
            }
            None => {
                let a = self.attn.forward(&self.norm1.forward(x)?, rope, mask)?;
                let x = residual(x, &self.norm2.forward(&a)?)?;
                let f = self.feed_forward.forward(&self.ffn_norm1.forward(&x)?)?;
                Ok(residual(&x, &self.ffn_norm2.forward(&f)?)?)
            }
        }
    }
}
