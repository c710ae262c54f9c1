//! The pieces that transformers' decoder-only language models share, as the
//! Gemma-2 and Qwen3 encoders use them: RMS norms of both conventions, the
//! grouped-query self-attention (with optional per-head q/k norms and
//! soft-capping), the gated MLP, the rotary tables, the causal/padding/
//! sliding-window mask and the checks of `input_ids` and `attention_mask`.
//!
//! Every op keeps PyTorch's roundings in bf16/f16 (through
//! `lumina2_kernels::ops`), so either model matches transformers' eager path.

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::ops;
use lumina2_kernels::profile::{groups, span};

use crate::config::{Activation, LayerType};
use crate::error::{invalid_input, Result};
use crate::weights::{Linear, Weights};

/// The most negative finite value of `dtype` (`torch.finfo(dtype).min`), as f32.
pub(crate) fn dtype_min(dtype: DType) -> f32 {
    match dtype {
        // bf16 0xFF7F: -3.3895314e38, exactly representable in f32.
        DType::BF16 => f32::from_bits(0xFF7F_0000),
        DType::F16 => -65504.0,
        _ => f32::MIN,
    }
}

/// The two RMSNorm conventions of transformers' decoders.
#[derive(Debug, Clone)]
pub(crate) enum RmsNorm {
    /// Gemma: `x / sqrt(mean(x^2) + eps) * (1 + w)`, all in float32 (`1 + w`
    /// precomputed at load), rounded once to the input dtype.
    OnePlus { one_plus_w: Tensor, eps: f64 },
    /// Llama/Qwen3: `w * (x / sqrt(mean(x^2) + eps))` with the normalised
    /// value rounded to the input dtype before the product by the weight
    /// (stored in the compute dtype): two roundings in a half dtype.
    Weighted { weight: Tensor, eps: f64 },
}

impl RmsNorm {
    /// Gemma's norm from `name.weight` of `[dim]`.
    pub(crate) fn one_plus(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get_as(&format!("{name}.weight"), &[dim], DType::F32)?;
        Ok(Self::OnePlus {
            one_plus_w: (weight + 1.0)?,
            eps,
        })
    }

    /// The Llama/Qwen3 norm from `name.weight` of `[dim]`.
    pub(crate) fn weighted(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::Weighted {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
            eps,
        })
    }

    /// Normalises over the last dimension (of any rank).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = span(groups::NORM);
        Ok(match self {
            Self::OnePlus { one_plus_w, eps } => ops::norm::rms_norm_f32(x, one_plus_w, *eps)?,
            Self::Weighted { weight, eps } => ops::norm::rms_norm(x, Some(weight), *eps)?,
        })
    }
}

/// The dimensions and options of a grouped-query self-attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionSpec {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub bias: bool,
    /// Scores are multiplied by this before the mask.
    pub scaling: f64,
    /// `cap * tanh(s / cap)` on the scores (Gemma-2).
    pub softcap: Option<f64>,
    /// Per-head RMS norms `q_norm`/`k_norm` on q and k before RoPE (Qwen3),
    /// with this epsilon.
    pub qk_norm_eps: Option<f64>,
}

/// transformers' eager self-attention: projections, (q/k norms), RoPE
/// (half-split rotation), GQA, masked softmax in float32, output projection.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    spec: AttentionSpec,
}

impl Attention {
    /// `{q,k,v,o}_proj` (and `q_norm`, `k_norm`) under `w`.
    pub(crate) fn load(w: &Weights, spec: AttentionSpec) -> Result<Self> {
        let (h, kv, hd, d, bias) = (
            spec.heads,
            spec.kv_heads,
            spec.head_dim,
            spec.hidden,
            spec.bias,
        );
        let qk_norm = match spec.qk_norm_eps {
            Some(eps) => Some((
                RmsNorm::weighted(w, "q_norm", hd, eps)?,
                RmsNorm::weighted(w, "k_norm", hd, eps)?,
            )),
            None => None,
        };
        Ok(Self {
            q: w.linear("q_proj", d, h * hd, bias)?,
            k: w.linear("k_proj", d, kv * hd, bias)?,
            v: w.linear("v_proj", d, kv * hd, bias)?,
            o: w.linear("o_proj", h * hd, d, bias)?,
            qk_norm,
            spec,
        })
    }

    /// `x`: `[B, L, hidden]`; `cos`, `sin`: `[L, head_dim]`; `mask`: additive
    /// float32 `[B, 1, L, L]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hd = self.spec.head_dim;
        // [B, L, n * hd] -> [B, L, n, hd]; the q/k norms act on the last dim.
        let heads = |t: Tensor, n: usize| t.reshape((b, l, n, hd));
        let mut q = heads(self.q.forward(x)?, self.spec.heads)?;
        let mut k = heads(self.k.forward(x)?, self.spec.kv_heads)?;
        let v = heads(self.v.forward(x)?, self.spec.kv_heads)?;
        if let Some((qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let to_bhld = |t: Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (to_bhld(q)?, to_bhld(k)?, to_bhld(v)?);
        let (q, k) = {
            let _span = span(groups::ROPE);
            (
                ops::rope::rotate_half(&q, cos, sin)?,
                ops::rope::rotate_half(&k, cos, sin)?,
            )
        };
        let _span = span(groups::ATTENTION);
        // transformers' eager attention, every op rounded in a half dtype.
        let out = ops::attention::eager(&q, &k, &v, mask, self.spec.scaling, self.spec.softcap)?;
        let out = out.transpose(1, 2)?.reshape((b, l, self.spec.heads * hd))?;
        drop(_span);
        Ok(self.o.forward(&out)?)
    }
}

/// The gated MLP `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    /// `{gate,up,down}_proj` under `w` (no biases).
    pub(crate) fn load(
        w: &Weights,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Self> {
        let (d, i) = (hidden, intermediate);
        Ok(Self {
            gate: w.linear("gate_proj", d, i, false)?,
            up: w.linear("up_proj", d, i, false)?,
            down: w.linear("down_proj", i, d, false)?,
            act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // GELU tanh and SiLU: one parallel pass for bf16 and f32 (the
        // activation in float32 rounded once, then the product rounded, as
        // below; GGUF weights on AMX without the two intermediates).
        let fused = match self.act {
            Activation::GeluTanh => Some(lumina2_weights::GateAct::GeluTanh),
            Activation::Silu => Some(lumina2_weights::GateAct::Silu),
            Activation::GeluErf | Activation::Relu => None,
        };
        if let Some(act) = fused {
            return Ok(self.gate.feed_forward(&self.up, &self.down, x, act)?);
        }
        // The activation in float32, rounded once, as PyTorch does for bf16/f16.
        let dtype = x.dtype();
        let g = self.gate.forward(x)?.to_dtype(DType::F32)?;
        let g = match self.act {
            Activation::GeluTanh => g.gelu()?,
            Activation::GeluErf => g.gelu_erf()?,
            Activation::Silu => g.silu()?,
            Activation::Relu => g.relu()?,
        }
        .to_dtype(dtype)?;
        let h = (g * self.up.forward(x)?)?;
        Ok(self.down.forward(&h)?)
    }
}

/// `x + h`, rounded once in a half dtype (PyTorch's `add`).
pub(crate) fn residual(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let _span = span(groups::ELEMENTWISE);
    Ok(ops::elementwise::add(x, h)?)
}

/// transformers' default (or `linear`) RoPE inverse frequencies:
/// `1 / theta ** (arange(0, dim, 2).float() / dim)` in float32, divided by
/// the linear factor.
pub(crate) fn inv_freq(theta: f64, linear_factor: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            let f = 1.0f32 / (theta as f32).powf(e);
            if linear_factor == 1.0 {
                f
            } else {
                f / linear_factor as f32
            }
        })
        .collect()
}

/// cos, sin: `[L, head_dim]` for positions `0..L` in `dtype` (computed in
/// float32, as transformers' rotary embedding does, then cast).
pub(crate) fn rope_tables(
    inv_freq: &[f32],
    l: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut freqs = Vec::with_capacity(l * half * 2);
    for p in 0..l {
        let row: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
        freqs.extend_from_slice(&row);
        freqs.extend_from_slice(&row);
    }
    let emb = Tensor::from_vec(freqs, (l, half * 2), device)?;
    Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
}

/// Additive float32 mask `[B, 1, L, L]`: 0 where query q may see key k
/// (k <= q, k not padding, and within the window: k > q - window), else
/// `dtype`'s most negative value (transformers' `eager_mask`). A query row
/// with every key masked gets all scores equal, so a uniform softmax over all
/// positions, as in PyTorch.
pub(crate) fn causal_mask(
    keep: &[bool],
    b: usize,
    l: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let neg = dtype_min(dtype);
    let mut m = vec![0f32; b * l * l];
    for bi in 0..b {
        for q in 0..l {
            for k in 0..l {
                let in_window = window.is_none_or(|w| k + w > q);
                let ok = k <= q && keep[bi * l + k] && in_window;
                if !ok {
                    m[(bi * l + q) * l + k] = neg;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, l, l), device)?)
}

/// `input_ids` `[B, L]` of an integer dtype, every id below `vocab_size`:
/// `(B, L, ids)`.
pub(crate) fn check_ids(input_ids: &Tensor, vocab_size: usize) -> Result<(usize, usize, Vec<u32>)> {
    let (b, l) = input_ids.dims2().map_err(|_| {
        invalid_input(
            "input_ids",
            format!("shape {:?}, expected [B, L]", input_ids.dims()),
        )
    })?;
    if b == 0 || l == 0 {
        return Err(invalid_input("input_ids", "empty batch or sequence"));
    }
    let vals: Vec<i64> = match input_ids.dtype() {
        DType::U8 | DType::U32 | DType::I64 | DType::I32 | DType::I16 => input_ids
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?,
        other => {
            return Err(invalid_input(
                "input_ids",
                format!("dtype {other:?}, expected an integer dtype"),
            ))
        }
    };
    let mut ids = Vec::with_capacity(vals.len());
    for v in vals {
        if v < 0 || v as u64 >= vocab_size as u64 {
            return Err(invalid_input(
                "input_ids",
                format!("token id {v} outside the vocabulary [0, {vocab_size})"),
            ));
        }
        ids.push(v as u32);
    }
    Ok((b, l, ids))
}

/// `attention_mask` `[B, L]` (nonzero: token, 0: padding; `None`: no
/// padding) as one flag per position.
pub(crate) fn check_mask(mask: Option<&Tensor>, b: usize, l: usize) -> Result<Vec<bool>> {
    let Some(m) = mask else {
        return Ok(vec![true; b * l]);
    };
    if m.dims() != [b, l] {
        return Err(invalid_input(
            "attention_mask",
            format!("shape {:?}, expected [{b}, {l}] as input_ids", m.dims()),
        ));
    }
    let v = m
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(v.into_iter().map(|x| x != 0.0).collect())
}

/// The masks of one forward: the causal (+ padding) mask, and the
/// sliding-window one when a layer that runs needs it.
pub(crate) struct Masks {
    full: Tensor,
    sliding: Option<Tensor>,
}

impl Masks {
    /// `window`: the sliding window, used only when `any_sliding`.
    pub(crate) fn new(
        keep: &[bool],
        (b, l): (usize, usize),
        window: Option<usize>,
        any_sliding: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let full = causal_mask(keep, b, l, None, dtype, device)?;
        let sliding = match window {
            Some(w) if any_sliding => Some(causal_mask(keep, b, l, Some(w), dtype, device)?),
            _ => None,
        };
        Ok(Self { full, sliding })
    }

    /// The mask of a layer of type `t`.
    pub(crate) fn for_layer(&self, t: LayerType) -> &Tensor {
        match (t, &self.sliding) {
            (LayerType::Sliding, Some(m)) => m,
            _ => &self.full,
        }
    }
}

/// The weights under transformers' `model.` prefix when the checkpoint is a
/// `*ForCausalLM` one (`model.embed_tokens.weight`), else as they are (a
/// bare `*Model` checkpoint).
pub(crate) fn without_model_prefix(weights: &Weights) -> Weights {
    if !weights.contains("embed_tokens.weight") && weights.contains("model.embed_tokens.weight") {
        weights.pp("model")
    } else {
        weights.clone()
    }
}
