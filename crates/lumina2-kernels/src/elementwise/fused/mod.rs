//! Fused bf16 element-wise kernels for the hot spots of a bf16 forward.
//!
//! candle computes a bf16 op by widening each element to f32 and back, one op
//! per pass over memory; the feed-forward's `silu(a) * b` and an RMS norm are
//! four to seven such passes. These kernels do each in one pass with AVX-512,
//! keeping PyTorch's roundings: every intermediate that PyTorch stores in bf16
//! is rounded to bf16 here too, so the results are those of the unfused ops
//! (up to the last bit of `exp` inside SiLU, and subnormal results below
//! 1.2e-38, which the bf16 conversion instruction flushes to zero, as
//! PyTorch's AVX512-BF16 conversions do). Other dtypes, devices and CPUs
//! without AVX512-BF16 fall back to the unfused candle ops.

use candle_core::{DType, Tensor, D};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{map_rows, CpuView};
use crate::simd::has_avx512_bf16;

/// `t` made contiguous when it is a bf16 CPU tensor (a no-op when it already
/// is), else `None`: the fast paths take such tensors only.
fn bf16_cpu(t: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !t.device().is_cpu() || t.dtype() != DType::BF16 {
        return Ok(None);
    }
    Ok(Some(t.contiguous()?))
}

/// The elements of a tensor from [`bf16_cpu`], borrowed.
fn elems<'a>(view: &'a Option<CpuView<'_>>) -> Option<&'a [bf16]> {
    view.as_ref()?.slice::<bf16>()
}

/// `silu(a) * b` for bf16 `a`, `b` of the same shape, as diffusers'
/// feed-forward computes it: SiLU in f32 rounded to bf16, then the product
/// rounded to bf16. f32 tensors: the same in one parallel pass, unrounded.
/// Other dtypes: `silu` in f32 and a multiply in the dtype.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    act_mul::<false>(a, b)
}

/// `gelu_tanh(a) * b` (PyTorch's `gelu(approximate="tanh")`, Gemma-2's MLP)
/// for bf16 `a`, `b` of the same shape: the activation in f32 rounded to
/// bf16, then the product rounded to bf16, as transformers computes it.
/// Evaluated as PyTorch writes it, `0.5 a (1 + tanh(u))` with `u =
/// sqrt(2/pi) (a + 0.044715 a^3)`, `tanh(u) = 1 - 2 / (exp(2u) + 1)` (a few
/// f32 ulps from PyTorch's tanh, so a bf16 result can differ in its last
/// bit; very negative `a` saturate to 0 as in PyTorch). f32 tensors: the same
/// in one parallel pass, unrounded. Other dtypes: candle's `gelu` in f32 and
/// a multiply in the dtype.
pub fn gelu_tanh_mul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    act_mul::<true>(a, b)
}

/// `a + b` for tensors of the same shape. bf16 and f32 CPU tensors: in
/// parallel (candle's runs on one thread), in bf16 each sum in f32 rounded
/// once (PyTorch's bf16 `add`). Other dtypes and devices: candle's `a + b`.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dims() == b.dims() && has_avx512_bf16() && a.device().is_cpu() && a.dtype() == b.dtype() {
        #[cfg(target_arch = "x86_64")]
        match a.dtype() {
            // SAFETY (both): the features were checked; `map2` passes
            // slices of one length.
            DType::BF16 => return map2::<bf16>(a, b, |x, y, o| unsafe { avx512::add(x, y, o) }),
            DType::F32 => return map2::<f32>(a, b, |x, y, o| unsafe { avx512::add(x, y, o) }),
            _ => {}
        }
    }
    a + b
}

/// Rotary embedding in the "rotate half" form (Gemma's, transformers'
/// `apply_rotary_pos_emb`): `x * cos + rotate_half(x) * sin` for `x`
/// `[..., L, D]` and `cos`, `sin` `[L, D]`, with `rotate_half(x) = cat(-x2,
/// x1)` over the two halves of the last dimension. bf16 and f32 CPU tensors:
/// one parallel pass, in bf16 with PyTorch's three roundings (each product,
/// then the sum). Other dtypes and devices: the same ops in candle.
pub fn rope_rotate_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (l, d) = cos.dims2()?;
    let fast = x.rank() >= 2
        && x.dims()[x.rank() - 2..] == [l, d]
        && sin.dims() == cos.dims()
        && d % 2 == 0
        && has_avx512_bf16()
        && x.device().is_cpu()
        && x.dtype() == cos.dtype()
        && x.dtype() == sin.dtype();
    if fast {
        #[cfg(target_arch = "x86_64")]
        match x.dtype() {
            DType::BF16 => return rope_fast::<bf16>(x, cos, sin),
            DType::F32 => return rope_fast::<f32>(x, cos, sin),
            _ => {}
        }
    }
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

#[cfg(target_arch = "x86_64")]
fn rope_fast<E>(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor>
where
    E: candle_core::WithDType + Lanes,
{
    let (l, d) = cos.dims2()?;
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let views = (CpuView::of(&x), CpuView::of(&cos), CpuView::of(&sin));
    let (Some(xs), Some(cs), Some(ss)) = (
        views.0.as_ref().and_then(|v| v.slice::<E>()),
        views.1.as_ref().and_then(|v| v.slice::<E>()),
        views.2.as_ref().and_then(|v| v.slice::<E>()),
    ) else {
        return Err(candle_core::Error::Msg(
            "rope: tensors not on the CPU".into(),
        ));
    };
    let mut out = vec![E::zero(); xs.len()];
    out.par_chunks_mut(l * d)
        .zip(xs.par_chunks(l * d))
        .for_each(|(o, x)| {
            for (p, (o, x)) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                let (c, s) = (&cs[p * d..(p + 1) * d], &ss[p * d..(p + 1) * d]);
                // SAFETY: `rope_rotate_half` checked the features; every
                // slice has `d` elements.
                unsafe { avx512::rope_row(x, c, s, o) };
            }
        });
    Tensor::from_vec(out, x.dims(), x.device())
}

/// Interleaved RoPE with the head transpose folded in: `x` `[B, S, H, d]`
/// (contiguous, bf16 or f32, as the q/k projections give it), `cos`, `sin`
/// `[B, S, d/2]` f32; returns `[B, H, S, d]` with each channel pair of each
/// head rotated in f32 and rounded once to `x`'s dtype (diffusers' complex
/// product; the bits of candle's `rope_i` on the transposed `x`). One
/// parallel pass instead of a transpose copy, two casts and candle's
/// `rope_i`. `None` where the fast path does not apply (no AVX512-BF16,
/// other dtypes or devices, other shapes): the caller runs the unfused ops.
pub fn rope_pairs_to_heads(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let Ok((b, s, _, d)) = x.dims4() else {
        return Ok(None);
    };
    let applies = has_avx512_bf16()
        && x.device().is_cpu()
        && d % 2 == 0
        && cos.dims() == [b, s, d / 2]
        && sin.dims() == cos.dims()
        && cos.dtype() == DType::F32
        && sin.dtype() == DType::F32;
    if !applies {
        return Ok(None);
    }
    #[cfg(target_arch = "x86_64")]
    match x.dtype() {
        DType::BF16 => return rope_pairs_fast::<bf16>(x, cos, sin).map(Some),
        DType::F32 => return rope_pairs_fast::<f32>(x, cos, sin).map(Some),
        _ => {}
    }
    Ok(None)
}

#[cfg(target_arch = "x86_64")]
fn rope_pairs_fast<E>(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor>
where
    E: candle_core::WithDType + Lanes,
{
    let (b, s, h, d) = x.dims4()?;
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let views = (CpuView::of(&x), CpuView::of(&cos), CpuView::of(&sin));
    let (Some(xs), Some(cs), Some(ss)) = (
        views.0.as_ref().and_then(|v| v.slice::<E>()),
        views.1.as_ref().and_then(|v| v.slice::<f32>()),
        views.2.as_ref().and_then(|v| v.slice::<f32>()),
    ) else {
        return Err(candle_core::Error::Msg(
            "rope: tensors not on the CPU".into(),
        ));
    };
    let half = d / 2;
    let mut out = vec![E::zero(); xs.len()];
    // Tasks over (item, head): each writes its own [S, d] block of the
    // output, reading its head's row at every position.
    out.par_chunks_mut((s * d).max(1))
        .enumerate()
        .for_each(|(bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            for (p, o) in o.chunks_exact_mut(d).enumerate() {
                let row = (bi * s + p) * h + hi;
                let at = (bi * s + p) * half;
                // SAFETY: the features were checked; the row has `d`
                // elements and the factors `d / 2`.
                unsafe {
                    avx512::rope_pairs_row(
                        &xs[row * d..(row + 1) * d],
                        &cs[at..at + half],
                        &ss[at..at + half],
                        o,
                    )
                };
            }
        });
    Tensor::from_vec(out, (b, h, s, d), x.device())
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
/// `f` over chunks of two CPU tensors of the same shape and dtype `E`, in
/// parallel, into a new tensor.
fn map2<E>(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(&[E], &[E], &mut [E]) + Sync,
) -> candle_core::Result<Tensor>
where
    E: candle_core::WithDType,
{
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (va, vb) = (CpuView::of(&a), CpuView::of(&b));
    let (Some(x), Some(y)) = (
        va.as_ref().and_then(|v| v.slice::<E>()),
        vb.as_ref().and_then(|v| v.slice::<E>()),
    ) else {
        return Err(candle_core::Error::Msg(
            "fused element-wise op: tensors not on the CPU".into(),
        ));
    };
    let mut out = vec![E::zero(); x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14).zip(y.par_chunks(1 << 14)))
        .for_each(|(o, (x, y))| f(x, y, o));
    Tensor::from_vec(out, a.dims(), a.device())
}

/// [`silu_mul`] (`GELU = false`) or [`gelu_tanh_mul`].
fn act_mul<const GELU: bool>(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dims() == b.dims() && has_avx512_bf16() && a.device().is_cpu() && a.dtype() == b.dtype() {
        #[cfg(target_arch = "x86_64")]
        match a.dtype() {
            // SAFETY (both): the features were checked; `map2` passes
            // slices of one length.
            DType::BF16 => {
                return map2::<bf16>(a, b, |x, y, o| unsafe {
                    avx512::act_mul::<_, GELU>(x, y, o)
                })
            }
            DType::F32 => {
                return map2::<f32>(a, b, |x, y, o| unsafe {
                    avx512::act_mul::<_, GELU>(x, y, o)
                })
            }
            _ => {}
        }
    }
    let dtype = a.dtype();
    let act = |t: &Tensor| match GELU {
        true => t.gelu(),
        false => candle_nn::ops::silu(t),
    };
    let s = match dtype {
        DType::F32 | DType::F64 => act(a)?,
        _ => act(&a.to_dtype(DType::F32)?)?.to_dtype(dtype)?,
    };
    s * b
}

/// Element types of the fused kernels: how 16 lanes are loaded, stored and
/// rounded as the element type stores them.
pub(crate) trait Lanes: Copy {
    /// Loads `len <= 16` elements as f32.
    ///
    /// # Safety
    /// AVX-512F/BW/VL/BF16 are available; `len` elements are readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, len: usize) -> std::arch::x86_64::__m512;
    /// Stores the first `len <= 16` lanes, rounded to the element type.
    ///
    /// # Safety
    /// As [`Lanes::load16`], `len` elements writable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store16(p: *mut Self, v: std::arch::x86_64::__m512, len: usize);
    /// `v` rounded to the element type and widened back (identity for f32).
    ///
    /// # Safety
    /// As [`Lanes::load16`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn round(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512;
}

/// RMS norm over the last dimension of a bf16 tensor, as diffusers'
/// `RMSNorm` for bf16 inputs: `y = bf16(x * rsqrt(mean(x^2) + eps))` in f32,
/// then `bf16(y * w)` when a bf16 `weight` is given. `None` when the fast path
/// does not apply (the caller computes it unfused).
pub fn rms_norm_bf16(
    x: &Tensor,
    weight: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    if n == 0 || !has_avx512_bf16() {
        return Ok(None);
    }
    if weight.is_some_and(|w| w.dims() != [n]) {
        return Ok(None);
    }
    let xc = bf16_cpu(x)?;
    let wc = weight.map(bf16_cpu).transpose()?.flatten();
    let (vx, vw) = (
        xc.as_ref().and_then(CpuView::of),
        wc.as_ref().and_then(CpuView::of),
    );
    let Some(xs) = elems(&vx) else {
        return Ok(None);
    };
    let w = match (weight, elems(&vw)) {
        (Some(_), None) => return Ok(None),
        (_, w) => w,
    };
    let out = map_rows(xs, n, |_, x, o: &mut [bf16]| {
        // SAFETY: the CPU has the features; `x`, `o` (and `w`) have `n`
        // elements.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::rms_norm_row(x, w, eps as f32, o)
        };
    });
    Ok(Some(Tensor::from_vec(out, x.dims(), x.device())?))
}

/// `x * v` (when `y` is `None`) or `x + v * y`, for bf16 `x`, `y` of shape
/// `[B, S, D]` and `v` of shape `[B, 1, D]` broadcast over `S`, with the
/// product rounded to bf16 before the sum as the unfused ops round it: the
/// adaLN scale (`norm(x) * (1 + scale)`) and the gated residual
/// (`x + tanh(gate) * y`). Other shapes, dtypes or CPUs: candle's ops.
pub fn mul_bcast(x: &Tensor, v: &Tensor, y: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let unfused = || match y {
        None => x.broadcast_mul(v),
        Some(y) => x + y.broadcast_mul(v)?,
    };
    let (b, s, d) = match x.dims3() {
        Ok(dims) => dims,
        Err(_) => return unfused(),
    };
    let shapes_fit = v.dims() == [b, 1, d] && y.is_none_or(|y| y.dims() == x.dims());
    if !shapes_fit || d == 0 || !has_avx512_bf16() {
        return unfused();
    }
    let (xc, vc) = (bf16_cpu(x)?, bf16_cpu(v)?);
    let yc = y.map(bf16_cpu).transpose()?.flatten();
    let (vx, vv) = (
        xc.as_ref().and_then(CpuView::of),
        vc.as_ref().and_then(CpuView::of),
    );
    let vy = yc.as_ref().and_then(CpuView::of);
    let (Some(xs), Some(vs)) = (elems(&vx), elems(&vv)) else {
        return unfused();
    };
    let ys = match (y, elems(&vy)) {
        (Some(_), None) => return unfused(),
        (_, ys) => ys,
    };
    let mut out = vec![bf16::ZERO; xs.len()];
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let vrow = &vs[(row / s.max(1)) * d..(row / s.max(1) + 1) * d];
        let xrow = &xs[row * d..(row + 1) * d];
        let yrow = ys.map(|ys| &ys[row * d..(row + 1) * d]);
        // SAFETY: the CPU has the features; every row has `d` elements.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::mul_bcast_row(xrow, vrow, yrow, o)
        };
    });
    Tensor::from_vec(out, (b, s, d), x.device())
}

/// The activation-times-gate kernel on slices, for [`crate::gemm::packed`]'s
/// gated feed-forward.
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::act_mul as act_mul_slices;

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u16> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap()
            .into_iter()
            .map(bf16::to_bits)
            .collect()
    }

    /// The fused kernels against the unfused candle ops: equal bits, except a
    /// last-bit difference where SiLU's exp rounds the other way.
    #[test]
    fn match_unfused_ops() -> candle_core::Result<()> {
        crate::report_paths("match_unfused_ops");
        if !has_avx512_bf16() {
            return Ok(());
        }
        let dev = Device::Cpu;
        for shape in [(3usize, 37usize), (2, 2304)] {
            let a = (Tensor::randn(0f32, 3., shape, &dev)?).to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(DType::BF16)?;
            let fused = silu_mul(&a, &b)?;
            let s = candle_nn::ops::silu(&a.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?;
            let unfused = (s * &b)?;
            let (f, u) = (bits(&fused), bits(&unfused));
            let off = f.iter().zip(&u).filter(|(x, y)| x != y).count();
            let worst = f
                .iter()
                .zip(&u)
                .map(|(x, y)| (*x as i32 - *y as i32).abs())
                .max()
                .unwrap_or(0);
            assert!(
                worst <= 1 && off * 100 <= f.len(),
                "silu_mul: {off} differ, worst {worst} ulp"
            );

            // GELU (tanh): against PyTorch's f32 arithmetic, 0.5 a (1 +
            // tanh(u)) with a correctly rounded tanh, rounded as the unfused
            // ops round. Our tanh is a few f32 ulps off, and 1 + tanh(u)
            // cancels for negative a (in PyTorch too): that absolute error is
            // |a b| 2^-21. It can move the rounded activation by one bf16 ulp
            // (at most 2^-7 of it, so 2^-7 |a b|), and the product is then
            // rounded on each side, which adds one ulp of the result (found
            // at a = -3.5, b = -1.16: the results two ulps apart).
            let mut av = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            av[..4].copy_from_slice(&[-20.0, 20.0, 0.0, -0.0]);
            let a2 = Tensor::from_vec(av, shape, &dev)?.to_dtype(DType::BF16)?;
            let fused = gelu_tanh_mul(&a2, &b)?
                .to_dtype(DType::F32)?
                .flatten_all()?;
            let fused = fused.to_vec1::<f32>()?;
            let bv = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let av = a2.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for ((&x, &y), &got) in av.iter().zip(&bv).zip(&fused) {
                let u = 0.797_884_6f32 * (x + 0.044_715f32 * (x * x * x));
                let t = (u as f64).tanh() as f32;
                let g = bf16::from_f32(0.5 * x * (1.0 + t)).to_f32();
                let want = bf16::from_f32(g * y).to_f32();
                let ulp = if want == 0.0 {
                    0.0
                } else {
                    2f32.powi(want.abs().log2().floor() as i32 - 7)
                };
                let tol = 2f32.powi(-7) * want.abs() + ulp + (x * y).abs() * 2f32.powi(-21);
                assert!(
                    (got - want).abs() <= tol,
                    "gelu_tanh_mul({x}, {y}): {got} vs {want}"
                );
            }

            let w = Tensor::randn(0f32, 1., shape.1, &dev)?.to_dtype(DType::BF16)?;
            for weight in [None, Some(&w)] {
                let fused = rms_norm_bf16(&a, weight, 1e-5)?.unwrap();
                let xf = a.to_dtype(DType::F32)?;
                let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
                let mut y = xf
                    .broadcast_mul(&(ms + 1e-5)?.sqrt()?.recip()?)?
                    .to_dtype(DType::BF16)?;
                if let Some(w) = weight {
                    y = y.broadcast_mul(w)?;
                }
                let (f, u) = (bits(&fused), bits(&y));
                let worst = f
                    .iter()
                    .zip(&u)
                    .map(|(x, y)| (*x as i32 - *y as i32).abs())
                    .max()
                    .unwrap_or(0);
                // The mean's summation order and 1/sqrt may flip a last bit.
                assert!(worst <= 1, "rms_norm: worst {worst} ulp");
            }

            // Broadcast scale and gated residual: exactly the unfused ops.
            let x3 = a.reshape((1, shape.0, shape.1))?;
            let y3 = b.reshape((1, shape.0, shape.1))?;
            let v = w.reshape((1, 1, shape.1))?;
            let scaled = mul_bcast(&x3, &v, None)?;
            assert_eq!(bits(&scaled), bits(&x3.broadcast_mul(&v)?));
            let gated = mul_bcast(&x3, &v, Some(&y3))?;
            assert_eq!(bits(&gated), bits(&(&x3 + y3.broadcast_mul(&v)?)?));

            // The rotary embedding: the unfused candle ops' bits, bf16 and f32.
            let (l, d) = (shape.0, 64);
            let x4 = Tensor::randn(0f32, 2., (2, 3, l, d), &dev)?;
            let cs = Tensor::randn(0f32, 1., (l, d), &dev)?;
            let sn = Tensor::randn(0f32, 1., (l, d), &dev)?;
            for dt in [DType::BF16, DType::F32] {
                let (x4, cs, sn) = (x4.to_dtype(dt)?, cs.to_dtype(dt)?, sn.to_dtype(dt)?);
                let fused = rope_rotate_half(&x4, &cs, &sn)?;
                let x1 = x4.narrow(D::Minus1, 0, d / 2)?;
                let x2 = x4.narrow(D::Minus1, d / 2, d / 2)?;
                let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                let unfused = (x4.broadcast_mul(&cs)? + rot.broadcast_mul(&sn)?)?;
                let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                assert_eq!(f32s(&fused)?, f32s(&unfused)?, "rope {dt:?}");
            }

            // The parallel add: candle's bits, bf16 and f32.
            assert_eq!(bits(&add(&a, &b)?), bits(&(&a + &b)?));
            let (af, bf) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            let sum = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(sum(add(&af, &bf)?)?, sum((&af + &bf)?)?);
        }
        Ok(())
    }

    /// The f32 activations against f64 evaluations of the same formulas:
    /// within a few f32 ulps of the result (our exp is a few ulps off libm's;
    /// for GELU, 1 + tanh(u) cancels for negative a, in PyTorch too, hence the
    /// absolute term).
    #[test]
    fn f32_activations_match_f64() -> candle_core::Result<()> {
        crate::report_paths("f32_activations_match_f64");
        // Off AVX512-BF16 the activations are candle's ops: the portable path.
        let path = if has_avx512_bf16() {
            "avx512"
        } else {
            "candle ops"
        };
        eprintln!("f32_activations_match_f64: path {path}");
        let dev = Device::Cpu;
        let mut av = Tensor::randn(0f32, 4., 3 * 1000 + 7, &dev)?.to_vec1::<f32>()?;
        av[..6].copy_from_slice(&[-100.0, 100.0, 0.0, -0.0, -20.0, 20.0]);
        let n = av.len();
        let a = Tensor::from_vec(av.clone(), n, &dev)?;
        let bv = Tensor::randn(0f32, 1., n, &dev)?.to_vec1::<f32>()?;
        let b = Tensor::from_vec(bv.clone(), n, &dev)?;
        let silu = silu_mul(&a, &b)?.to_vec1::<f32>()?;
        let gelu = gelu_tanh_mul(&a, &b)?.to_vec1::<f32>()?;
        for i in 0..n {
            let (x, y) = (av[i] as f64, bv[i] as f64);
            let want = x / (1.0 + (-x).exp()) * y;
            let tol = 8.0 * f32::EPSILON as f64 * want.abs() + 1e-37;
            assert!(
                (silu[i] as f64 - want).abs() <= tol,
                "silu_mul({x}, {y}): {} vs {want}",
                silu[i]
            );
            let u = 0.797_884_6f64 * (x + 0.044_715 * x * x * x);
            let want = 0.5 * x * (1.0 + u.tanh()) * y;
            let tol = 8.0 * f32::EPSILON as f64 * (want.abs() + (x * y).abs());
            assert!(
                (gelu[i] as f64 - want).abs() <= tol,
                "gelu_tanh_mul({x}, {y}): {} vs {want}",
                gelu[i]
            );
        }
        Ok(())
    }
}
