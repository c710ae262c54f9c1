//! Softmax attention: the transformer's scaled dot-product attention with
//! grouped key heads ([`sdpa`]), Gemma-2's eager attention ([`eager`]), and
//! whether the VAE's single-head attention runs on its kernel
//! ([`vae_kernel`]).
//!
//! Grouped-query attention never repeats keys and values: the `H / KV`
//! query heads that read one key head are stacked into one matrix of rows.
//! On the packed bf16 kernel both the transformer's and the text encoder's
//! attention go through one implementation of that (`PackedHeads`).

use candle_core::{DType, Device, Tensor};

use crate::attention::{flash, softmax};
use crate::gemm::packed::{self, PackedBf16};
use crate::profile::{groups, span};

/// The largest score block of one query chunk on the packed bf16 path. Its
/// chunks are one key head's queries, and they stay in cache: measured at
/// 1024x1024 (4352 keys), the attention of a bf16 forward took 13.7 s with
/// 64 MiB chunks, 5.7 s with 4 MiB and 7.4 s with 1 MiB. (The f32 path is the
/// other way round: 1 MiB chunks made it 3x slower, so it keeps the caller's
/// budget.)
pub const PACKED_SCORE_BUDGET: usize = 4 << 20;

/// Where an attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// bf16, fused on AMX tiles ([`flash::attention_bf16`]).
    FlashBf16,
    /// bf16, query chunks through the packed bf16 GEMM (`PackedHeads`).
    PackedBf16,
    /// f32 (any input dtype, computed in f32), fused on AVX-512
    /// ([`flash::attention_f32`]).
    FlashF32,
    /// bf16/f16 on a CUDA GPU, fused by candle-flash-attn (the `flash-attn`
    /// feature; [`gpu_flash`]).
    FlashGpu,
    /// candle's matmul and this crate's softmax (the portable and GPU path).
    Candle,
}

/// The keys each batch item attends to.
#[derive(Debug, Clone, Copy)]
pub struct KeyBias<'a> {
    /// `B * S_kv` f32 values (`[B, S_kv]` or `[B, 1, 1, S_kv]`): 0 for keys
    /// to attend to, `-inf` for padding.
    pub bias: &'a Tensor,
    /// Where each item's attended keys are its first `n` (the bias is 0 then
    /// `-inf`), those counts: the form a GPU flash kernel takes instead of a
    /// bias. `None` for any other pattern.
    pub prefix: Option<&'a [usize]>,
}

/// Whether [`sdpa`] of `dtype` tensors on `device` runs on the GPU flash
/// kernel: CUDA, bf16 or f16, and this crate built with `flash-attn`.
fn gpu_flash(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "flash-attn") && device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16)
}

/// Whether bf16 attention multiplies on the packed bf16 kernel: bf16 on the
/// CPU with [`packed::available`].
fn packed_bf16(device: &Device, dtype: DType) -> bool {
    dtype == DType::BF16 && device.is_cpu() && packed::available()
}

/// The path [`sdpa`] takes for `dtype` tensors on `device`.
pub fn sdpa_path(device: &Device, dtype: DType) -> Path {
    if gpu_flash(device, dtype) {
        Path::FlashGpu
    } else if packed_bf16(device, dtype) {
        if packed::use_amx() {
            Path::FlashBf16
        } else {
            Path::PackedBf16
        }
    } else if device.is_cpu() && crate::caps().avx512f_fma {
        Path::FlashF32
    } else {
        Path::Candle
    }
}

/// The path [`eager`] takes for `dtype` tensors on `device`: the packed
/// bf16 kernel or candle's ops.
pub fn eager_path(device: &Device, dtype: DType) -> Path {
    if packed_bf16(device, dtype) {
        Path::PackedBf16
    } else {
        Path::Candle
    }
}

/// `softmax(scale q k^T + key_bias) v` with grouped key heads, as PyTorch's
/// CPU `scaled_dot_product_attention` computes it.
///
/// `q`: `[B, H, S_q, d]`, `k`, `v`: `[B, KV, S_kv, d]` (any layout), `H` a
/// multiple of `KV`: query head `i` reads key head `i / (H / KV)` (diffusers'
/// `repeat(...).flatten(2, 3)`, without the copies). `key_bias`: `B * S_kv`
/// f32 values (`[B, S_kv]` or `[B, 1, 1, S_kv]`), 0 for keys to attend to and
/// `-inf` for padding ([`KeyBias`]). The score block of one query chunk stays within
/// `score_budget` bytes. Returns `[B, H, S_q, d]` in `q`'s dtype.
///
/// bf16 on a CPU with the packed kernel: bf16 products summed and scaled in
/// f32, softmax in f32, probabilities rounded to bf16 for the weighted sum,
/// which is summed in f32 and rounded once (PyTorch's CPU flash attention
/// multiplies bf16 blocks the same way). Otherwise scores, softmax and the
/// weighted sum in f32 (PyTorch's CPU attention accumulates in f32 for
/// bf16/f16 inputs too), the output rounded once to the input dtype.
/// bf16/f16 on CUDA with the `flash-attn` feature: candle-flash-attn's fused
/// kernel, where there is no mask or each item's keys are a prefix.
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keys: Option<KeyBias<'_>>,
    scale: f64,
    score_budget: usize,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let b = q.dim(0)?;
    let path = sdpa_path(q.device(), dtype);
    if path == Path::FlashGpu {
        let _span = span(groups::ATTENTION);
        if let Some(out) = flash_gpu(q, k, v, keys, scale)? {
            return Ok(out);
        }
    }
    let bias = keys.map(|m| m.bias.reshape((b, ()))).transpose()?;
    if matches!(path, Path::FlashBf16 | Path::PackedBf16) {
        let v = {
            let _span = span(groups::COPY);
            v.contiguous()?
        };
        let _span = span(groups::ATTENTION);
        // Fused on AMX (scores never leave the core's caches: 2-2.4x the
        // unfused path, `xtask/examples/attention_probe.rs`),
        // else query chunks through the packed matmul.
        if path == Path::FlashBf16 {
            if let Some(out) = flash::attention_bf16(q, k, &v, bias.as_ref(), scale as f32)? {
                return Ok(out);
            }
        }
        let budget = score_budget.min(PACKED_SCORE_BUDGET);
        return grouped_packed(q, k, &v, bias.as_ref(), budget, scale as f32);
    }
    // The scale is folded into the queries on candle's path.
    let (q, k, v) = {
        let _span = span(groups::COPY);
        (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?.contiguous()?,
        )
    };
    let out = {
        let _span = span(groups::ATTENTION);
        // Fused on AVX-512 (the score matrix never exists; 2.8-3.5x the
        // unfused path), else query chunks through candle's matmul.
        let fused = match path {
            Path::FlashF32 => flash::attention_f32(&q, &k, &v, bias.as_ref(), scale as f32)?,
            _ => None,
        };
        match fused {
            Some(out) => out,
            None => grouped(&(q * scale)?, &k, &v, bias.as_ref(), score_budget)?,
        }
    };
    let _span = span(groups::COPY);
    out.to_dtype(dtype)
}

/// candle-flash-attn's fused attention (flash-attention 2 on CUDA, grouped
/// key heads native) for `[B, H, S, d]` tensors: with no mask over every
/// key, with prefix masks item by item over its first `n` keys (the padded
/// query rows attend to the same keys as with the bias); `None` for other
/// masks or an item with no key, which take candle's path.
#[cfg(feature = "flash-attn")]
fn flash_gpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keys: Option<KeyBias<'_>>,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    // The kernel takes [B, S, H, d].
    let bshd = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    let (qs, ks, vs) = (bshd(q)?, bshd(k)?, bshd(v)?);
    let out = match keys {
        None => candle_flash_attn::flash_attn(&qs, &ks, &vs, scale as f32, false)?,
        Some(KeyBias {
            prefix: Some(lens), ..
        }) if lens.len() == q.dim(0)? && lens.iter().all(|&n| n > 0) => {
            let mut items = Vec::with_capacity(lens.len());
            for (i, &n) in lens.iter().enumerate() {
                let n = n.min(ks.dim(1)?);
                let ki = ks.narrow(0, i, 1)?.narrow(1, 0, n)?.contiguous()?;
                let vi = vs.narrow(0, i, 1)?.narrow(1, 0, n)?.contiguous()?;
                let qi = qs.narrow(0, i, 1)?;
                items.push(candle_flash_attn::flash_attn(
                    &qi,
                    &ki,
                    &vi,
                    scale as f32,
                    false,
                )?);
            }
            Tensor::cat(&items, 0)?
        }
        Some(_) => return Ok(None),
    };
    Ok(Some(out.transpose(1, 2)?))
}

/// Without the `flash-attn` feature there is no GPU flash kernel.
#[cfg(not(feature = "flash-attn"))]
fn flash_gpu(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _keys: Option<KeyBias<'_>>,
    _scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    Ok(None)
}

/// Softmax attention on candle's matmul without repeating keys and values
/// per query head.
///
/// `q`: `[B, H, S_q, d]` (already scaled), `k`, `v`: `[B, KV, S_kv, d]` with
/// `H` a multiple of `KV` (as [`sdpa`]); `key_bias`: `B * S_kv` additive
/// values. The query heads sharing a key head are stacked into one matrix,
/// and queries are processed in chunks so that the score block stays within
/// `score_budget` bytes. Returns `[B, H, S_q, d]`.
pub fn grouped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    score_budget: usize,
) -> candle_core::Result<Tensor> {
    let (b, h, s_q, d) = q.dims4()?;
    let (_, kv, s_kv, _) = k.dims4()?;
    let rep = h / kv;
    let bias = key_bias.map(|m| m.reshape((b, 1, 1, s_kv))).transpose()?;
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
        if let Some(bias) = &bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = softmax::softmax_last_dim(&scores)?;
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

/// [`grouped`] for bf16 `q`, `k`, `v` on the packed bf16 kernel
/// (`PackedHeads`): each query chunk takes `scale * q k^T` in f32, the key
/// bias, the softmax in f32, and the probabilities rounded to bf16 times the
/// values (f32 sums, one rounding). Same shapes as [`grouped`] (`q` not
/// scaled); the score block of a chunk stays within `score_budget` bytes.
/// The tensors must be on the CPU.
pub fn grouped_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    score_budget: usize,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let (b, h, s_q, d) = q.dims4()?;
    let heads = PackedHeads::pack(k, v, h)?;
    let (rep, s_kv) = (heads.rep, heads.s_kv);
    let bias = key_bias.map(|m| m.reshape((b, s_kv))).transpose()?;
    let chunk = (score_budget / (rep * s_kv * 4).max(1)).clamp(1, s_q.max(1));
    heads.map(b, |bi, g| {
        let bias = bias
            .as_ref()
            .map(|m| m.get(bi)?.reshape((1, s_kv)))
            .transpose()?;
        let qg = heads.queries(q, bi, g)?; // [rep, S_q, d]
        let mut outs = Vec::with_capacity(s_q.div_ceil(chunk));
        let mut start = 0;
        while start < s_q {
            let len = chunk.min(s_q - start);
            let qc = qg.narrow(1, start, len)?.reshape((rep * len, d))?;
            let mut scores = heads.key(bi, g).matmul_f32(&qc, scale)?; // [rep*len, S_kv]
            if let Some(bias) = &bias {
                scores = scores.broadcast_add(bias)?;
            }
            let probs = softmax::softmax_last_dim_to_bf16(&scores)?;
            drop(scores);
            let o = heads.value(bi, g).matmul(&probs, None)?; // [rep*len, d]
            outs.push(o.reshape((rep, len, d))?);
            start += len;
        }
        Tensor::cat(&outs, 1)
    })
}

/// Eager attention op by op (transformers' `eager_attention_forward`, as
/// Gemma-2 runs it), every intermediate rounded to the input dtype as
/// PyTorch stores it: `s = q k^T`, `s * scaling`, with a soft cap `c`
/// `c * tanh(s / c)` (each op rounded), `+ mask`, softmax in f32 rounded,
/// then the product with `v`.
///
/// `q`: `[B, H, L, d]`, `k`, `v`: `[B, KV, L, d]` (`H` a multiple of `KV`),
/// `mask`: additive f32 `[B, 1, L, L]`. Returns `[B, H, L, d]`.
///
/// bf16 on a CPU with the packed kernel: the same roundings without
/// repeated keys (`PackedHeads`), `q k^T` rounded to bf16, the scaling,
/// soft cap, mask and softmax in one pass per row
/// ([`softmax::softcapped_softmax_bf16`]), the weighted sum rounded once.
/// Otherwise candle's ops, keys and values repeated per query head.
pub fn eager(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scaling: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    if eager_path(q.device(), q.dtype()) == Path::PackedBf16 {
        if let Some(out) = eager_packed(q, k, v, mask, scaling, softcap)? {
            return Ok(out);
        }
    }
    eager_candle(q, k, v, mask, scaling, softcap)
}

/// [`eager`] on the packed bf16 kernel; `None` where the one-pass softmax
/// does not apply (the caller computes it op by op).
fn eager_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scaling: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    let (b, h, l, hd) = q.dims4()?;
    let heads = PackedHeads::pack(k, v, h)?;
    let (rep, s) = (heads.rep, heads.s_kv);
    let scores = heads.map(b, |bi, g| {
        let qg = heads.queries(q, bi, g)?.reshape((rep * l, hd))?;
        heads.key(bi, g).matmul(&qg, None)?.reshape((rep, l, s))
    })?;
    let cap = softcap.map(|c| c as f32);
    let Some(p) = softmax::softcapped_softmax_bf16(&scores, scaling as f32, cap, mask)? else {
        return Ok(None);
    };
    drop(scores);
    let out = heads.map(b, |bi, g| {
        let pg = p.get(bi)?.narrow(0, g * rep, rep)?.reshape((rep * l, s))?;
        heads.value(bi, g).matmul(&pg, None)?.reshape((rep, l, hd))
    })?;
    Ok(Some(out))
}

/// [`eager`] on candle's ops, keys and values repeated per query head.
fn eager_candle(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scaling: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let rep = q.dim(1)? / k.dim(1)?.max(1);
    let k = repeat_kv(k, rep)?.contiguous()?;
    let v = repeat_kv(v, rep)?.contiguous()?;
    let scores = q.matmul(&k.t()?.contiguous()?)?.to_dtype(DType::F32)?;
    let mut s = round_to((scores * scaling)?, dtype)?;
    if let Some(cap) = softcap {
        s = round_to((s / cap)?, dtype)?;
        s = round_to(s.tanh()?, dtype)?;
        s = round_to((s * cap)?, dtype)?;
    }
    let s = round_to(s.broadcast_add(mask)?, dtype)?;
    let p = softmax::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    p.matmul(&v)
}

/// `[B, KV, L, d]` -> `[B, KV * rep, L, d]`, each key head repeated for the
/// `rep` query heads that read it (transformers' `repeat_kv`).
fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, l, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, rep, l, hd))?
        .reshape((b, kv * rep, l, hd))
}

/// Rounds `t` (f32) to `dtype` and back, as PyTorch rounds the result of
/// every operation it computes in f32 "opmath" for a bf16/f16 tensor.
fn round_to(t: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if dtype == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(dtype)?.to_dtype(DType::F32)
    }
}

/// Grouped-query attention over the packed bf16 kernel: per batch item and
/// key head, the keys `[S_kv, d]` and the transposed values `[d, S_kv]`
/// packed once; the `rep = H / KV` query heads that read a key head are
/// taken together as rows, so neither keys nor values are repeated.
struct PackedHeads {
    kv: usize,
    rep: usize,
    s_kv: usize,
    /// Item `bi`, key head `g` at `bi * kv + g`.
    keys: Vec<PackedBf16>,
    values: Vec<PackedBf16>,
}

impl PackedHeads {
    /// Packs `k`, `v` (`[B, KV, S_kv, d]`) for `h` query heads.
    fn pack(k: &Tensor, v: &Tensor, h: usize) -> candle_core::Result<Self> {
        let (b, kv, s_kv, _) = k.dims4()?;
        let mut keys = Vec::with_capacity(b * kv);
        let mut values = Vec::with_capacity(b * kv);
        for bi in 0..b {
            for g in 0..kv {
                keys.push(PackedBf16::pack(&k.get(bi)?.get(g)?)?); // [S_kv, d]
                values.push(PackedBf16::pack(&v.get(bi)?.get(g)?.t()?)?); // [d, S_kv]
            }
        }
        Ok(Self {
            kv,
            rep: h / kv.max(1),
            s_kv,
            keys,
            values,
        })
    }

    /// The query heads of item `bi` that read key head `g`: `[rep, S_q, d]`.
    fn queries(&self, q: &Tensor, bi: usize, g: usize) -> candle_core::Result<Tensor> {
        q.get(bi)?.narrow(0, g * self.rep, self.rep)
    }

    fn key(&self, bi: usize, g: usize) -> &PackedBf16 {
        &self.keys[bi * self.kv + g]
    }

    fn value(&self, bi: usize, g: usize) -> &PackedBf16 {
        &self.values[bi * self.kv + g]
    }

    /// `f(bi, g)` (each `[rep, ..]`) for the `b` items and every key head,
    /// stacked as `[B, H, ..]`.
    fn map(
        &self,
        b: usize,
        f: impl Fn(usize, usize) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut items = Vec::with_capacity(b);
        for bi in 0..b {
            let heads = (0..self.kv)
                .map(|g| f(bi, g))
                .collect::<candle_core::Result<Vec<_>>>()?;
            items.push(Tensor::cat(&heads, 0)?);
        }
        Tensor::stack(&items, 0)
    }
}

/// Whether the VAE's single-head f32 attention runs on
/// [`crate::attention::vae`] for a model of `dtype` on `device` (the kernel
/// shares the f32 convolution's requirements); otherwise candle's ops.
pub fn vae_kernel(device: &Device, dtype: DType) -> bool {
    super::conv::f32_kernel(device, dtype)
}
