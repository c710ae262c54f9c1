//! Grouped-query self-attention with query/key RMS norm and RoPE.

use candle_core::Tensor;

use crate::error::Result;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::{Linear, Weights};
use lumina2_kernels::ops;
use lumina2_kernels::profile::{groups, span};

/// Upper bound, in bytes, of the f32 score block one query chunk may allocate.
/// Attention memory is bounded by `B * heads * chunk * S_kv * 4` bytes, not by
/// `heads * S * S` (at 1024x1024 the joint sequence is over 4096 tokens).
pub const DEFAULT_SCORE_BUDGET: usize = 64 << 20;

/// The largest score block of one query chunk on the packed bf16 path (see
/// [`lumina2_kernels::ops::attention::PACKED_SCORE_BUDGET`]).
pub const PACKED_SCORE_BUDGET: usize = ops::attention::PACKED_SCORE_BUDGET;

/// A key mask for one attention call: `bias` is `[B, 1, 1, S_kv]`, 0 for keys to
/// attend to and `-inf` for padding.
#[derive(Debug, Clone)]
pub struct KeyMask {
    bias: Tensor,
    /// Each item's count of attended keys where they are its first keys
    /// (the form GPU flash attention takes), `None` otherwise.
    prefix: Option<Vec<usize>>,
}

impl KeyMask {
    /// From per-batch key validity (`valid[b][j]`: key `j` of item `b` is attended to).
    pub fn from_valid(valid: &[Vec<bool>], device: &candle_core::Device) -> Result<Self> {
        let b = valid.len();
        let s = valid.first().map_or(0, |v| v.len());
        let data: Vec<f32> = valid
            .iter()
            .flat_map(|row| row.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        if data.len() != b * s {
            return Err(crate::error::invalid_input(
                "mask",
                "rows of different lengths",
            ));
        }
        // A prefix: no attended key after the first padded one.
        let prefix = valid
            .iter()
            .map(|row| {
                let n = row.iter().take_while(|&&v| v).count();
                row[n..].iter().all(|&v| !v).then_some(n)
            })
            .collect();
        Ok(Self {
            bias: Tensor::from_vec(data, (b, 1, 1, s), device)?,
            prefix,
        })
    }
}

/// diffusers' `Attention` with `Lumina2AttnProcessor2_0` (and Z-Image's
/// `ZSingleStreamAttnProcessor`): q/k/v projections without bias, RMS norm
/// (eps 1e-5) on each query and key head, RoPE, grouped-query attention,
/// output projection without bias.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    score_budget: usize,
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0`, `norm_q`, `norm_k`.
    pub fn load(w: &Weights, dim: usize, n_heads: usize, n_kv_heads: usize) -> Result<Self> {
        Self::load_with(w, dim, n_heads, n_kv_heads, true)
    }

    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0` and, with `qk_norm`,
    /// `norm_q` and `norm_k` (diffusers' `qk_norm="rms_norm"`; without it
    /// queries and keys are not normalised).
    pub fn load_with(
        w: &Weights,
        dim: usize,
        n_heads: usize,
        n_kv_heads: usize,
        qk_norm: bool,
    ) -> Result<Self> {
        let head_dim = dim / n_heads;
        let qk = |name: &str| -> Result<Option<RmsNorm>> {
            // The block builds its Attention with eps=1e-5 whatever norm_eps says.
            Ok(if qk_norm {
                Some(RmsNorm::load(w, name, head_dim, 1e-5)?)
            } else {
                None
            })
        };
        let kv_dim = head_dim * n_kv_heads;
        Ok(Self {
            to_q: w.linear("to_q", dim, dim, false)?,
            to_k: w.linear("to_k", dim, kv_dim, false)?,
            to_v: w.linear("to_v", dim, kv_dim, false)?,
            to_out: w.linear("to_out.0", dim, dim, false)?,
            norm_q: qk("norm_q")?,
            norm_k: qk("norm_k")?,
            n_heads,
            n_kv_heads,
            head_dim,
            score_budget: DEFAULT_SCORE_BUDGET,
        })
    }

    /// Sets the byte budget of one query chunk's score block.
    pub fn set_score_budget(&mut self, bytes: usize) {
        self.score_budget = bytes.max(1);
    }

    /// `x`: `[B, S, dim]`, `rope`: factors for the `S` positions, `mask`: optional
    /// key padding mask -> `[B, S, dim]`.
    pub fn forward(&self, x: &Tensor, rope: &Rope, mask: Option<&KeyMask>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);

        let q = self.to_q.forward(x)?.reshape((b, s, h, hd))?;
        let k = self.to_k.forward(x)?.reshape((b, s, kv, hd))?;
        let v = self.to_v.forward(x)?.reshape((b, s, kv, hd))?;
        let q = match &self.norm_q {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.norm_k {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        // RoPE in f32, rounded back to the compute dtype as diffusers does,
        // and the heads moved before the sequence ([B, H, S, hd]).
        let q = rope.apply_to_heads(&q)?;
        let k = rope.apply_to_heads(&k)?;

        let v = v.transpose(1, 2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let keys = mask.map(|m| ops::attention::KeyBias {
            bias: &m.bias,
            prefix: m.prefix.as_deref(),
        });
        let out = ops::attention::sdpa(&q, &k, &v, keys, scale, self.score_budget)?;
        // [B, H, S, hd] -> [B, S, H*hd]
        let out = {
            let _span = span(groups::COPY);
            out.transpose(1, 2)?.reshape((b, s, h * hd))?
        };
        Ok(self.to_out.forward(&out)?)
    }
}

/// Softmax attention on candle's matmul without repeating keys and values
/// per query head ([`ops::attention::grouped`]).
///
/// `q`: `[B, H, S_q, d]` (already scaled), `k`, `v`: `[B, KV, S_kv, d]` with `H`
/// a multiple of `KV`; query head `i` uses key/value head `i / (H / KV)`, as
/// diffusers' `repeat(...).flatten(2, 3)`. Queries are processed in chunks so
/// that the score block stays within `score_budget` bytes. Returns `[B, H, S_q, d]`.
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    score_budget: usize,
) -> candle_core::Result<Tensor> {
    ops::attention::grouped(q, k, v, mask.map(|m| &m.bias), score_budget)
}

/// [`grouped_attention`] for bf16 `q`, `k`, `v` on the CPU's packed bf16
/// kernel ([`ops::attention::grouped_packed`]): `scale * q k^T` in f32, the
/// key mask, the softmax in f32, the probabilities rounded to bf16 times the
/// values (f32 sums, one rounding). Same shapes as [`grouped_attention`] (`q`
/// not scaled).
pub fn grouped_attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    score_budget: usize,
    scale: f32,
) -> candle_core::Result<Tensor> {
    ops::attention::grouped_packed(q, k, v, mask.map(|m| &m.bias), score_budget, scale)
}
