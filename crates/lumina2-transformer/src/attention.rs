//! Grouped-query self-attention with query/key RMS norm and RoPE.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::{Linear, Weights};
use lumina2_kernels::profile::{groups, span};

/// Upper bound, in bytes, of the f32 score block one query chunk may allocate.
/// Attention memory is bounded by `B * heads * chunk * S_kv * 4` bytes, not by
/// `heads * S * S` (at 1024x1024 the joint sequence is over 4096 tokens).
pub const DEFAULT_SCORE_BUDGET: usize = 64 << 20;

/// The largest score block of one query chunk on the packed bf16 path. Its
/// chunks are one key head's queries, and they stay in cache: measured at
/// 1024x1024 (4352 keys), the attention of a bf16 forward took 13.7 s with
/// 64 MiB chunks, 5.7 s with 4 MiB and 7.4 s with 1 MiB. (The f32 path is the
/// other way round: 1 MiB chunks made it 3x slower, so it keeps
/// [`DEFAULT_SCORE_BUDGET`].)
pub const PACKED_SCORE_BUDGET: usize = 4 << 20;

/// A key mask for one attention call: `bias` is `[B, 1, 1, S_kv]`, 0 for keys to
/// attend to and `-inf` for padding.
#[derive(Debug, Clone)]
pub struct KeyMask {
    bias: Tensor,
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
        Ok(Self {
            bias: Tensor::from_vec(data, (b, 1, 1, s), device)?,
        })
    }
}

/// diffusers' `Attention` with `Lumina2AttnProcessor2_0`: q/k/v projections
/// without bias, RMS norm (eps 1e-5) on each query and key head, RoPE,
/// grouped-query attention, output projection without bias.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    score_budget: usize,
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0`, `norm_q`, `norm_k`.
    pub fn load(w: &Weights, dim: usize, n_heads: usize, n_kv_heads: usize) -> Result<Self> {
        let head_dim = dim / n_heads;
        let kv_dim = head_dim * n_kv_heads;
        Ok(Self {
            to_q: w.linear("to_q", dim, dim, false)?,
            to_k: w.linear("to_k", dim, kv_dim, false)?,
            to_v: w.linear("to_v", dim, kv_dim, false)?,
            to_out: w.linear("to_out.0", dim, dim, false)?,
            // The block builds its Attention with eps=1e-5 whatever norm_eps says.
            norm_q: RmsNorm::load(w, "norm_q", head_dim, 1e-5)?,
            norm_k: RmsNorm::load(w, "norm_k", head_dim, 1e-5)?,
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
        let dtype = x.dtype();
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);

        let q = self.to_q.forward(x)?.reshape((b, s, h, hd))?;
        let k = self.to_k.forward(x)?.reshape((b, s, kv, hd))?;
        let v = self.to_v.forward(x)?.reshape((b, s, kv, hd))?;
        let q = self.norm_q.forward(&q)?;
        let k = self.norm_k.forward(&k)?;
        let (q, k) = {
            let _span = span(groups::COPY);
            (
                q.transpose(1, 2)?.contiguous()?,
                k.transpose(1, 2)?.contiguous()?,
            )
        };
        // RoPE in f32, rounded back to the compute dtype as diffusers does.
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;

        let scale = 1.0 / (hd as f64).sqrt();
        if lumina2_kernels::ops::attention_bf16_packed(x.device(), dtype) {
            // bf16 products on the packed kernel, as PyTorch's CPU flash
            // attention multiplies bf16 blocks: scores summed and scaled in
            // f32, softmax in f32, probabilities rounded to bf16 for the
            // weighted sum, which is summed in f32 and rounded once.
            let v = {
                let _span = span(groups::COPY);
                v.transpose(1, 2)?.contiguous()?
            };
            let out = {
                let _span = span(groups::ATTENTION);
                // Fused on AMX (scores never leave the core's caches: 2-2.4x
                // the unfused path, `xtask/examples/attention_probe.rs`), else
                // query chunks through the packed matmul.
                let bias = match mask {
                    Some(m) => Some(m.bias.reshape((b, ()))?),
                    None => None,
                };
                match lumina2_kernels::attention::flash::attention_bf16(
                    &q,
                    &k,
                    &v,
                    bias.as_ref(),
                    scale as f32,
                )? {
                    Some(out) => out,
                    None => {
                        let budget = self.score_budget.min(PACKED_SCORE_BUDGET);
                        grouped_attention_packed(&q, &k, &v, mask, budget, scale as f32)?
                    }
                }
            };
            let out = {
                let _span = span(groups::COPY);
                out.transpose(1, 2)?.reshape((b, s, h * hd))?
            };
            return Ok(self.to_out.forward(&out)?);
        }
        // Scores, softmax and the weighted sum in f32 (PyTorch's CPU attention
        // kernels accumulate in f32 for bf16/f16 inputs too). The scale is folded
        // into the queries.
        let (q, k, v) = {
            let _span = span(groups::COPY);
            (
                q.to_dtype(DType::F32)?,
                k.to_dtype(DType::F32)?,
                v.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?,
            )
        };
        let out = {
            let _span = span(groups::ATTENTION);
            // Fused on AVX-512 (the score matrix never exists; 2.8-3.5x the
            // unfused path, `xtask/examples/attention_probe.rs`), else query chunks
            // through candle's matmul.
            let bias = match mask {
                Some(m) => Some(m.bias.reshape((b, ()))?),
                None => None,
            };
            match lumina2_kernels::attention::flash::attention_f32(
                &q,
                &k,
                &v,
                bias.as_ref(),
                scale as f32,
            )? {
                Some(out) => out,
                None => grouped_attention(&(q * scale)?, &k, &v, mask, self.score_budget)?,
            }
        };
        // [B, H, S, hd] -> [B, S, H*hd]
        let out = {
            let _span = span(groups::COPY);
            out.transpose(1, 2)?
                .reshape((b, s, h * hd))?
                .to_dtype(dtype)?
        };
        Ok(self.to_out.forward(&out)?)
    }
}

/// Softmax attention without repeating keys and values per query head.
///
/// `q`: `[B, H, S_q, d]` (already scaled), `k`, `v`: `[B, KV, S_kv, d]` with `H`
/// a multiple of `KV`; query head `i` uses key/value head `i / (H / KV)`, as
/// diffusers' `repeat(...).flatten(2, 3)`. The query heads sharing a key head are
/// stacked into one matrix, and queries are processed in chunks so that the
/// score block stays within `score_budget` bytes. Returns `[B, H, S_q, d]`.
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    score_budget: usize,
) -> candle_core::Result<Tensor> {
    let (b, h, s_q, d) = q.dims4()?;
    let (_, kv, s_kv, _) = k.dims4()?;
    let rep = h / kv;
    let q = q.reshape((b, kv, rep, s_q, d))?;
    let kt = k.transpose(2, 3)?; // [B, KV, d, S_kv]
    let row_bytes = b * h * s_kv * 4;
    let chunk = (score_budget / row_bytes.max(1)).clamp(1, s_q.max(1));
    let mut outs = Vec::with_capacity(s_q.div_ceil(chunk));
    let mut start = 0;
    while start < s_q {
        let len = chunk.min(s_q - start);
        let qc = q.narrow(3, start, len)?.reshape((b, kv, rep * len, d))?;
        let mut scores = qc.matmul(&kt)?; // [B, KV, rep*len, S_kv]
        if let Some(m) = mask {
            scores = scores.broadcast_add(&m.bias)?;
        }
        let probs = lumina2_kernels::attention::softmax::softmax_last_dim(&scores)?;
        drop(scores);
        let o = probs.matmul(v)?; // [B, KV, rep*len, d]
        outs.push(o.reshape((b, h, len, d))?);
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 2)
    }
}

/// [`grouped_attention`] for bf16 `q`, `k`, `v` on a CPU with bf16
/// dot-product hardware ([`lumina2_kernels::gemm::packed`]): per batch item and key
/// head, the keys and the transposed values are packed once; each query chunk
/// takes `scale * q k^T` in f32, the key mask, the softmax in f32, and the
/// probabilities rounded to bf16 times the values (f32 sums, one rounding).
/// Same shapes as [`grouped_attention`]; the score block of a chunk stays
/// within `score_budget` bytes.
pub fn grouped_attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    score_budget: usize,
    scale: f32,
) -> candle_core::Result<Tensor> {
    use lumina2_kernels::gemm::packed::PackedBf16;
    let (b, h, s_q, d) = q.dims4()?;
    let (_, kv, s_kv, _) = k.dims4()?;
    let rep = h / kv.max(1);
    let chunk = (score_budget / (rep * s_kv * 4).max(1)).clamp(1, s_q.max(1));
    let mut items = Vec::with_capacity(b);
    for bi in 0..b {
        let bias = match mask {
            Some(m) => Some(m.bias.get(bi)?.reshape((1, s_kv))?),
            None => None,
        };
        let mut heads = Vec::with_capacity(kv);
        for g in 0..kv {
            let keys = PackedBf16::pack(&k.get(bi)?.get(g)?)?; // [S_kv, d]
            let values = PackedBf16::pack(&v.get(bi)?.get(g)?.t()?)?; // [d, S_kv]
            let qg = q.get(bi)?.narrow(0, g * rep, rep)?; // [rep, S_q, d]
            let mut outs = Vec::with_capacity(s_q.div_ceil(chunk));
            let mut start = 0;
            while start < s_q {
                let len = chunk.min(s_q - start);
                let qc = qg.narrow(1, start, len)?.reshape((rep * len, d))?;
                let mut scores = keys.matmul_f32(&qc, scale)?; // [rep*len, S_kv]
                if let Some(bias) = &bias {
                    scores = scores.broadcast_add(bias)?;
                }
                let probs = lumina2_kernels::attention::softmax::softmax_last_dim_to_bf16(&scores)?;
                drop(scores);
                let o = values.matmul(&probs, None)?; // [rep*len, d]
                outs.push(o.reshape((rep, len, d))?);
                start += len;
            }
            heads.push(Tensor::cat(&outs, 1)?);
        }
        items.push(Tensor::cat(&heads, 0)?);
    }
    Tensor::stack(&items, 0)
}
