//! Borrowing the elements of a CPU tensor without copying them, for the
//! kernels of [`crate::attention::softmax`], [`crate::elementwise::fused`] and [`crate::gemm::packed`].

use candle_core::{DType, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// The storage of a contiguous CPU tensor, held for reading.
pub(crate) struct CpuView<'a> {
    /// candle's read guard (its lock type is not nameable from here).
    storage: Box<dyn std::ops::Deref<Target = Storage> + 'a>,
    start: usize,
    end: usize,
}

impl<'a> CpuView<'a> {
    /// `None` when `t` is not on the CPU or not contiguous.
    pub(crate) fn of(t: &'a Tensor) -> Option<Self> {
        let (storage, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(&*storage, Storage::Cpu(_)).then(|| Self {
            storage: Box::new(storage),
            start,
            end,
        })
    }

    /// The elements, `None` when the dtype is not `T`.
    pub(crate) fn slice<T: WithDType>(&self) -> Option<&[T]> {
        match &**self.storage {
            Storage::Cpu(cpu) => cpu.as_slice::<T>().ok()?.get(self.start..self.end),
            _ => None,
        }
    }
}

/// `f(scratch, row, out_row)` over the rows (last dimension, `n` wide) of
/// the contiguous `src`, in parallel tasks of about 64 KiB; `scratch` is an
/// `n`-long f32 buffer per task. Returns the output rows.
pub(crate) fn map_rows<I: Sync, O: Copy + Default + Send>(
    src: &[I],
    n: usize,
    f: impl Fn(&mut [f32], &[I], &mut [O]) + Sync,
) -> Vec<O> {
    let mut out = vec![O::default(); src.len()];
    let rows_per_task = (16384 / n.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * n.max(1))
        .zip(src.par_chunks(rows_per_task * n.max(1)))
        .for_each_init(
            || vec![0f32; n],
            |scratch, (dst, src)| {
                for (d, s) in dst
                    .chunks_exact_mut(n.max(1))
                    .zip(src.chunks_exact(n.max(1)))
                {
                    f(scratch, s, d);
                }
            },
        );
    out
}

/// A zero-initialised buffer whose first element sits on a 64-byte (cache
/// line) boundary. AMX tile loads read 64-byte rows: from an unaligned
/// buffer (the allocator gives 16-byte alignment) every row straddles two
/// lines, and four tile loads took about 4x as long on this project's
/// machine (an uncommitted micro-benchmark; `xtask/examples/gemm_probe.rs` shows
/// the packed kernel's gain).
pub(crate) struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    pub(crate) fn zeroed(len: usize) -> Self {
        let extra = 64usize.div_ceil(std::mem::size_of::<T>().max(1));
        let buf = vec![T::default(); len + extra];
        // `align_offset` counts elements; for a 1-, 2- or 4-byte `T` it is
        // always found within `extra` elements.
        let off = buf.as_ptr().align_offset(64).min(extra);
        Self { buf, off, len }
    }
}

impl<T> Aligned<T> {
    /// A buffer of `len` elements, made from `old` when it holds enough
    /// (contents left as they were: the caller overwrites every element),
    /// else a new zeroed one.
    pub(crate) fn reuse_unzeroed(old: Option<Self>, len: usize) -> Self
    where
        T: Copy + Default,
    {
        match old {
            Some(mut a) if a.buf.len() - a.off >= len => {
                a.len = len;
                a
            }
            _ => Self::zeroed(len),
        }
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

impl<T> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned({} elements)", self.len)
    }
}

/// `o[i] = s[i]` as f32: exact (a bf16 is the upper half of an f32's bits,
/// NaN payloads included), as `half` converts it.
pub fn widen_bf16(s: &[half::bf16], o: &mut [f32]) {
    for (o, v) in o.iter_mut().zip(s) {
        *o = f32::from_bits(u32::from(v.to_bits()) << 16);
    }
}

/// `o[i] = s[i]` as f32 (exact), as `half` converts it.
pub fn widen_f16(s: &[half::f16], o: &mut [f32]) {
    for (o, v) in o.iter_mut().zip(s) {
        *o = v.to_f32();
    }
}

/// `x.to_dtype(dtype)`, with f32 <-> bf16 conversions of contiguous CPU
/// tensors done in parallel with bit operations (candle converts one value at
/// a time through `half`, on one thread: 1.2 s of a 2.75 GB checkpoint's
/// load). Same bits: bf16 -> f32 is exact, f32 -> bf16 rounds to nearest even
/// with NaN kept NaN, as `half` does.
pub fn cast(x: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    const CHUNK: usize = 1 << 16;
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    if let Some(view) = CpuView::of(x) {
        match (view.slice::<f32>(), view.slice::<half::bf16>(), dtype) {
            (Some(s), _, DType::BF16) => {
                let mut o = vec![half::bf16::ZERO; s.len()];
                o.par_chunks_mut(CHUNK)
                    .zip(s.par_chunks(CHUNK))
                    .for_each(|(o, s)| {
                        for (o, &v) in o.iter_mut().zip(s) {
                            *o = half::bf16::from_bits(crate::gemm::packed::round_bf16(v));
                        }
                    });
                return Tensor::from_vec(o, x.dims(), x.device());
            }
            (_, Some(s), DType::F32) => {
                let mut o = vec![0f32; s.len()];
                o.par_chunks_mut(CHUNK)
                    .zip(s.par_chunks(CHUNK))
                    .for_each(|(o, s)| widen_bf16(s, o));
                return Tensor::from_vec(o, x.dims(), x.device());
            }
            _ => {}
        }
    }
    x.to_dtype(dtype)
}

/// Whether any of these bf16 values (as bits) is NaN or infinite: the
/// exponent bits, as [`any_non_finite`] tests them.
pub fn bf16_bits_non_finite(bits: &[u16]) -> bool {
    bits.iter().any(|&b| b & 0x7f80 == 0x7f80)
}

/// Whether any of these f32 values is NaN or infinite, by the exponent
/// bits (a branch-free fold, which the compiler vectorises).
pub fn f32_non_finite(values: &[f32]) -> bool {
    values.iter().fold(false, |bad, v| {
        bad | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
    })
}

/// Whether a contiguous float CPU tensor holds NaN or infinity, by the
/// exponent bits of each value (all ones), in parallel chunks that stop at
/// the first hit. `None` where `x` is not a contiguous f32/bf16/f16 CPU
/// tensor (the caller falls back to arithmetic). Loading scans every weight:
/// converting each slice to f32 and summing it on one thread cost seconds
/// per model.
pub fn any_non_finite(x: &Tensor) -> Option<bool> {
    const CHUNK: usize = 1 << 16;
    fn scan<T: Sync + Copy>(s: &[T], bad: impl Fn(T) -> bool + Sync) -> bool {
        s.par_chunks(CHUNK).any(|c| c.iter().any(|&v| bad(v)))
    }
    let view = CpuView::of(x)?;
    if let Some(s) = view.slice::<f32>() {
        return Some(scan(s, |v: f32| v.to_bits() & 0x7f80_0000 == 0x7f80_0000));
    }
    if let Some(s) = view.slice::<half::bf16>() {
        return Some(scan(s, |v: half::bf16| v.to_bits() & 0x7f80 == 0x7f80));
    }
    if let Some(s) = view.slice::<half::f16>() {
        return Some(scan(s, |v: half::f16| v.to_bits() & 0x7c00 == 0x7c00));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::Aligned;

    /// The bit test agrees with `is_finite` on special and ordinary values
    /// of each float type, wherever the bad value sits.
    #[test]
    fn non_finite_values_are_found_by_their_exponent() -> candle_core::Result<()> {
        use candle_core::{DType, Device, Tensor};
        crate::report_paths("non_finite_values_are_found_by_their_exponent");
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let ordinary = [
            0.0f32,
            -0.0,
            1.5,
            -3.0e38,
            3.0e38,
            1e-45,
            f32::MAX,
            f32::MIN,
        ];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let n = 200_003;
            for &v in &ordinary {
                let mut data = vec![0.25f32; n];
                data[n - 1] = v;
                let t = Tensor::from_vec(data, n, &Device::Cpu)?.to_dtype(dtype)?;
                let expect = !t.to_dtype(DType::F32)?.to_vec1::<f32>()?[n - 1].is_finite();
                assert_eq!(super::any_non_finite(&t), Some(expect), "{v} in {dtype:?}");
            }
            for &v in &specials {
                for at in [0, 65_536, n - 1] {
                    let mut data = vec![0.25f32; n];
                    data[at] = v;
                    let t = Tensor::from_vec(data, n, &Device::Cpu)?.to_dtype(dtype)?;
                    assert_eq!(
                        super::any_non_finite(&t),
                        Some(true),
                        "{v} at {at} in {dtype:?}"
                    );
                }
            }
        }
        // The slice test on f32 values.
        for &v in ordinary.iter().chain(&specials) {
            let mut data = vec![0.25f32; 1000];
            data[999] = v;
            assert_eq!(super::f32_non_finite(&data), !v.is_finite(), "{v}");
        }
        assert!(!super::f32_non_finite(&[]));
        // Not contiguous: the caller's fallback.
        let t = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?.t()?;
        assert_eq!(super::any_non_finite(&t), None);
        Ok(())
    }

    /// Every size and element type starts on a cache line, zeroed, with the
    /// asked length.
    #[test]
    fn aligned_buffers_start_on_a_line() {
        crate::report_paths("aligned_buffers_start_on_a_line");
        for len in [0usize, 1, 3, 64, 1000, 1 << 20] {
            let a = Aligned::<u16>::zeroed(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert!(a.iter().all(|&v| v == 0));
            let b = Aligned::<u32>::zeroed(len);
            assert_eq!((b.len(), b.as_ptr() as usize % 64), (len, 0));
            let c = Aligned::<half::bf16>::zeroed(len);
            assert_eq!((c.len(), c.as_ptr() as usize % 64), (len, 0));
        }
    }

    /// The parallel casts give candle's conversions bit for bit, special
    /// values included, and leave other pairs to candle.
    #[test]
    fn cast_is_to_dtype() -> candle_core::Result<()> {
        crate::report_paths("cast_is_to_dtype");
        use candle_core::{DType, Device, Tensor};
        let mut v: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .filter(|v| !v.is_nan())
            .collect();
        v.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e-40]);
        let n = v.len();
        let x = Tensor::from_vec(v, n, &Device::Cpu)?;
        let bits = |t: &Tensor| -> candle_core::Result<Vec<u16>> {
            Ok(t.to_vec1::<half::bf16>()?
                .iter()
                .map(|b| b.to_bits())
                .collect())
        };
        let ours = super::cast(&x, DType::BF16)?;
        let theirs = x.to_dtype(DType::BF16)?;
        assert_eq!(bits(&ours)?, bits(&theirs)?);
        let back = super::cast(&ours, DType::F32)?;
        assert_eq!(
            back.to_vec1::<f32>()?,
            theirs.to_dtype(DType::F32)?.to_vec1::<f32>()?
        );
        let h = super::cast(&x, DType::F16)?;
        assert_eq!(
            h.to_vec1::<half::f16>()?,
            x.to_dtype(DType::F16)?.to_vec1::<half::f16>()?
        );
        Ok(())
    }
}
