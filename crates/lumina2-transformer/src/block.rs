//! The transformer block shared by the refiners and the joint stack, and its
//! SwiGLU feed-forward.
//!
//! The block is the same computation in Lumina-Image 2.0 and Z-Image; a
//! [`BlockSpec`] gives its dimensions, the names of its weights
//! ([`BlockKeys`]) and what the modulation reads ([`ModulationInput`]).

use candle_core::Tensor;

use crate::attention::{Attention, KeyMask};
use crate::config::Config;
use crate::error::{invalid_input, Result};
use crate::norm::{silu, RmsNorm};
use crate::rope::Rope;
use crate::weights::{GateAct, Linear, Weights};
use lumina2_kernels::ops;
use lumina2_kernels::profile::{groups, span};

/// The weight names of a [`FeedForward`]: the gate (`dim -> inner`, through
/// SiLU), the output (`inner -> dim`) and the up projection (`dim -> inner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForwardKeys {
    /// The gate projection, `linear_1` / `w1`.
    pub gate: &'static str,
    /// The output projection, `linear_2` / `w2`.
    pub down: &'static str,
    /// The up projection, `linear_3` / `w3`.
    pub up: &'static str,
}

impl FeedForwardKeys {
    /// diffusers' `LuminaFeedForward`.
    pub const LUMINA2: Self = Self {
        gate: "linear_1",
        down: "linear_2",
        up: "linear_3",
    };
    /// Z-Image's `FeedForward`.
    pub const ZIMAGE: Self = Self {
        gate: "w1",
        down: "w2",
        up: "w3",
    };
}

/// The SwiGLU feed-forward `down(silu(gate(x)) * up(x))` (diffusers'
/// `LuminaFeedForward`, Z-Image's `FeedForward`), no biases.
#[derive(Debug, Clone)]
pub struct FeedForward {
    linear_1: Linear,
    linear_2: Linear,
    linear_3: Linear,
}

impl FeedForward {
    /// Loads `linear_1`, `linear_3` (`dim -> inner`) and `linear_2` (`inner -> dim`).
    pub fn load(w: &Weights, dim: usize, inner: usize) -> Result<Self> {
        Self::load_with(w, dim, inner, FeedForwardKeys::LUMINA2)
    }

    /// Loads the three projections under the names `keys`.
    pub fn load_with(w: &Weights, dim: usize, inner: usize, keys: FeedForwardKeys) -> Result<Self> {
        Ok(Self {
            linear_1: w.linear(keys.gate, dim, inner, false)?,
            linear_2: w.linear(keys.down, inner, dim, false)?,
            linear_3: w.linear(keys.up, dim, inner, false)?,
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

/// What a block's modulation layer reads from the conditioning vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModulationInput {
    /// `linear(silu(temb))` (Lumina2's `LuminaRMSNormZero`).
    Silu,
    /// `linear(temb)`, no activation (Z-Image's `adaLN_modulation`, a
    /// `Sequential` of one `Linear`).
    Identity,
}

/// The adaLN modulation of a block (diffusers' `LuminaRMSNormZero.linear`,
/// Z-Image's `adaLN_modulation.0`): `linear(silu(temb))` or `linear(temb)`
/// split into four `[B, dim]` vectors.
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
    input: ModulationInput,
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
        Self::load_with(w, "linear", temb_dim, dim, ModulationInput::Silu)
    }

    /// Loads the linear layer `name` (`temb_dim -> 4 * dim`) reading `input`.
    pub fn load_with(
        w: &Weights,
        name: &str,
        temb_dim: usize,
        dim: usize,
        input: ModulationInput,
    ) -> Result<Self> {
        let w = w.clone().with_int8_linears(false);
        Ok(Self {
            linear: w.linear(name, temb_dim, 4 * dim, true)?,
            input,
        })
    }

    /// `temb`: `[B, temb_dim]`.
    pub fn forward(&self, temb: &Tensor) -> candle_core::Result<ModulationOut> {
        let emb = match self.input {
            ModulationInput::Silu => self.linear.forward(&silu(temb)?)?,
            ModulationInput::Identity => self.linear.forward(temb)?,
        };
        let emb = emb.unsqueeze(1)?;
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

/// The weight names of a [`TransformerBlock`], relative to the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockKeys {
    /// The attention layer (`attn` / `attention`).
    pub attention: &'static str,
    /// The attention input norm of an unmodulated block (`norm1` / `attention_norm1`).
    pub norm1: &'static str,
    /// The attention input norm of a modulated block (`norm1.norm` / `attention_norm1`).
    pub modulated_norm1: &'static str,
    /// The modulation's linear layer (`norm1.linear` / `adaLN_modulation.0`).
    pub modulation: &'static str,
    /// The attention output norm (`norm2` / `attention_norm2`).
    pub norm2: &'static str,
    /// The feed-forward input norm (`ffn_norm1`).
    pub ffn_norm1: &'static str,
    /// The feed-forward output norm (`ffn_norm2`).
    pub ffn_norm2: &'static str,
    /// The feed-forward (`feed_forward`).
    pub feed_forward: &'static str,
    /// The feed-forward's projections.
    pub ffn: FeedForwardKeys,
}

impl BlockKeys {
    /// diffusers' `Lumina2TransformerBlock`.
    pub const LUMINA2: Self = Self {
        attention: "attn",
        norm1: "norm1",
        modulated_norm1: "norm1.norm",
        modulation: "norm1.linear",
        norm2: "norm2",
        ffn_norm1: "ffn_norm1",
        ffn_norm2: "ffn_norm2",
        feed_forward: "feed_forward",
        ffn: FeedForwardKeys::LUMINA2,
    };
    /// diffusers' `ZImageTransformerBlock`.
    pub const ZIMAGE: Self = Self {
        attention: "attention",
        norm1: "attention_norm1",
        modulated_norm1: "attention_norm1",
        modulation: "adaLN_modulation.0",
        norm2: "attention_norm2",
        ffn_norm1: "ffn_norm1",
        ffn_norm2: "ffn_norm2",
        feed_forward: "feed_forward",
        ffn: FeedForwardKeys::ZIMAGE,
    };
}

/// Everything a [`TransformerBlock`] is built from besides its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    /// Model width.
    pub dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (a divisor of `n_heads`).
    pub n_kv_heads: usize,
    /// Epsilon of the four block norms (the q/k norms use 1e-5).
    pub norm_eps: f64,
    /// Inner width of the feed-forward.
    pub ffn_inner: usize,
    /// Width of the conditioning vector the modulation reads.
    pub temb_dim: usize,
    /// Whether the attention has q/k RMS norms.
    pub qk_norm: bool,
    /// What the modulation reads.
    pub modulation_input: ModulationInput,
    /// The weight names.
    pub keys: BlockKeys,
}

impl BlockSpec {
    /// Every weight of one block under `prefix`, with its shape (modulated
    /// blocks: with the modulation layer).
    pub fn weight_shapes(&self, prefix: &str, modulated: bool) -> Vec<(String, Vec<usize>)> {
        let (h, k) = (self.dim, &self.keys);
        let hd = h / self.n_heads.max(1);
        let kv = self.n_kv_heads * hd;
        let ff = self.ffn_inner;
        let (a, f) = (k.attention, k.feed_forward);
        let mut v: Vec<(String, Vec<usize>)> = vec![
            (format!("{prefix}.{a}.to_q.weight"), vec![h, h]),
            (format!("{prefix}.{a}.to_k.weight"), vec![kv, h]),
            (format!("{prefix}.{a}.to_v.weight"), vec![kv, h]),
            (format!("{prefix}.{a}.to_out.0.weight"), vec![h, h]),
        ];
        if self.qk_norm {
            v.push((format!("{prefix}.{a}.norm_q.weight"), vec![hd]));
            v.push((format!("{prefix}.{a}.norm_k.weight"), vec![hd]));
        }
        v.push((format!("{prefix}.{f}.{}.weight", k.ffn.gate), vec![ff, h]));
        v.push((format!("{prefix}.{f}.{}.weight", k.ffn.down), vec![h, ff]));
        v.push((format!("{prefix}.{f}.{}.weight", k.ffn.up), vec![ff, h]));
        if modulated {
            let m = k.modulation;
            v.push((format!("{prefix}.{m}.weight"), vec![4 * h, self.temb_dim]));
            v.push((format!("{prefix}.{m}.bias"), vec![4 * h]));
            v.push((format!("{prefix}.{}.weight", k.modulated_norm1), vec![h]));
        } else {
            v.push((format!("{prefix}.{}.weight", k.norm1), vec![h]));
        }
        for n in [k.ffn_norm1, k.norm2, k.ffn_norm2] {
            v.push((format!("{prefix}.{n}.weight"), vec![h]));
        }
        v
    }
}

/// diffusers' `Lumina2TransformerBlock` and `ZImageTransformerBlock`:
/// sandwich-normed attention and feed-forward, modulated by the timestep
/// embedding (noise refiner and joint blocks) or not (context refiner).
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
        Self::load_spec(w, &cfg.block_spec(), modulated)
    }

    /// Loads one block as `spec` describes it.
    pub fn load_spec(w: &Weights, spec: &BlockSpec, modulated: bool) -> Result<Self> {
        let (dim, eps, k) = (spec.dim, spec.norm_eps, &spec.keys);
        let (norm1, modulation) = if modulated {
            (
                RmsNorm::load(w, k.modulated_norm1, dim, eps)?,
                Some(Modulation::load_with(
                    w,
                    k.modulation,
                    spec.temb_dim,
                    dim,
                    spec.modulation_input,
                )?),
            )
        } else {
            (RmsNorm::load(w, k.norm1, dim, eps)?, None)
        };
        Ok(Self {
            attn: Attention::load_with(
                &w.pp(k.attention),
                dim,
                spec.n_heads,
                spec.n_kv_heads,
                spec.qk_norm,
            )?,
            feed_forward: FeedForward::load_with(
                &w.pp(k.feed_forward),
                dim,
                spec.ffn_inner,
                k.ffn,
            )?,
            norm1,
            modulation,
            ffn_norm1: RmsNorm::load(w, k.ffn_norm1, dim, eps)?,
            norm2: RmsNorm::load(w, k.norm2, dim, eps)?,
            ffn_norm2: RmsNorm::load(w, k.ffn_norm2, dim, eps)?,
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
