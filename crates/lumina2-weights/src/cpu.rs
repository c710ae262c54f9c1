//! Borrowing the elements of a CPU tensor without copying them, for the
//! kernels of [`crate::softmax`], [`crate::fused`] and [`crate::packed`].

use candle_core::{Storage, Tensor, WithDType};
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
/// lines, and four tile loads took 4x as long on this project's machine.
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

#[cfg(test)]
mod tests {
    use super::Aligned;

    /// Every size and element type starts on a cache line, zeroed, with the
    /// asked length.
    #[test]
    fn aligned_buffers_start_on_a_line() {
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
}
