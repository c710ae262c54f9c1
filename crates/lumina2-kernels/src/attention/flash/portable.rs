//! The plain-Rust form of the fused attention, for bf16 and f32 inputs: the
//! arithmetic of [`super::attention_bf16`] and [`super::attention_f32`]
//! (scores summed in f32, scaled, the key bias added, `exp(s - max)` in
//! f32, its sum kept unrounded, the probabilities rounded to bf16 for the
//! product with bf16 values, the output sums in f32 divided once at the
//! end and, for bf16, rounded once), a whole row at a time instead of
//! blocks of keys. It runs on every CPU; production keeps its unfused
//! attention (candle's or the packed kernel's matmuls) where the fused
//! kernels do not run, so this is the path the tests compare on every
//! machine.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::{operands, Operands};

/// Softmax attention of `q` `[B, H, S_q, d]` over `k`, `v` `[B, KV, S_kv,
/// d]` (bf16 or f32, all the same), as [`super::attention_bf16`]: the
/// `[B, H, S_q, d]` output in the inputs' dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    if dtype != DType::BF16 && dtype != DType::F32 {
        candle_core::bail!("flash attention: {dtype:?} inputs (bf16 or f32 only)");
    }
    let (
        Operands {
            b,
            h,
            s_q,
            d,
            kv,
            s_kv,
        },
        bias,
    ) = operands(q, k, v, key_bias, dtype)?;
    // bf16 widens to f32 exactly.
    let f = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    };
    let (qs, ks, vs) = (f(q)?, f(k)?, f(v)?);
    let rep = h / kv;
    let round = |x: f32| match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    };
    let mut out = vec![0f32; b * h * s_q * d];
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0f32; s_kv],
        |p, (row, o)| {
            let (bi, hi) = (row / (h * s_q), row / s_q % h);
            let item = bi * kv + hi / rep;
            let keys = &ks[item * s_kv * d..(item + 1) * s_kv * d];
            let values = &vs[item * s_kv * d..(item + 1) * s_kv * d];
            let qrow = &qs[row * d..(row + 1) * d];
            for (j, (s, key)) in p.iter_mut().zip(keys.chunks_exact(d)).enumerate() {
                let dot = qrow
                    .iter()
                    .zip(key)
                    .fold(0f32, |a, (x, y)| x.mul_add(*y, a));
                *s = dot * scale + bias.as_ref().map_or(0.0, |bv| bv[bi * s_kv + j]);
            }
            // All keys masked: max -inf, every `s - max` NaN, as PyTorch.
            let m = p.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let mut l = 0f32;
            o.fill(0.0);
            for (s, value) in p.iter().zip(values.chunks_exact(d)) {
                let e = (s - m).exp();
                l += e;
                let e = round(e);
                for (oc, vc) in o.iter_mut().zip(value) {
                    *oc = e.mul_add(*vc, *oc);
                }
            }
            for oc in o.iter_mut() {
                *oc /= l;
            }
        },
    );
    let out = Tensor::from_vec(out, (b, h, s_q, d), &Device::Cpu)?;
    out.to_dtype(dtype)
}
