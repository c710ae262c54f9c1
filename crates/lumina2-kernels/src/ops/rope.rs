//! Rotary position embeddings, in the two layouts the models use.

use candle_core::{DType, Tensor};

use crate::elementwise::fused;

/// Interleaved RoPE (diffusers' Lumina2 complex product): each consecutive
/// pair of channels of `x` `[B, H, S, d]` rotated by the f32 factors `cos`,
/// `sin` `[B, S, d/2]`, computed in f32 and rounded once to `x`'s dtype.
/// candle's `rope_i` in f32 on every path; the casts around it run in
/// parallel on the CPU ([`crate::cast`]: candle's are one thread, at
/// 1024x1024 most of RoPE's time in a bf16 forward), same bits.
pub fn interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = crate::cast(&x.contiguous()?, DType::F32)?;
    crate::cast(&candle_nn::rotary_emb::rope_i(&xf, cos, sin)?, dtype)
}

/// [`interleaved`] applied to `x` `[B, S, H, d]` transposed to `[B, H, S, d]`
/// (the layout attention needs), contiguous: one fused pass on CPUs with
/// AVX512-BF16 for bf16 and f32 ([`fused::rope_pairs_to_heads`]), else the
/// transpose copy and [`interleaved`]; the same bits either way.
pub fn interleaved_to_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = fused::rope_pairs_to_heads(x, cos, sin)? {
        return Ok(y);
    }
    interleaved(&x.transpose(1, 2)?.contiguous()?, cos, sin)
}

/// Rotate-half RoPE (transformers' `apply_rotary_pos_emb`, Gemma's):
/// `x * cos + rotate_half(x) * sin` for `x` `[..., L, D]` and `cos`, `sin`
/// `[L, D]` in `x`'s dtype, each op rounded in a half dtype as PyTorch
/// computes it. One parallel pass on CPUs with AVX512-BF16
/// ([`fused::rope_rotate_half`]), else candle's ops.
pub fn rotate_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    fused::rope_rotate_half(x, cos, sin)
}
