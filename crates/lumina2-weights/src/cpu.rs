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
