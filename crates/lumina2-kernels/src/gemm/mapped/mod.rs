//! A bf16 linear layer `y = x W^T + b` that multiplies the weight where it
//! lies in its file: a row-major `[out, in]` bf16 matrix inside a memory
//! map, never copied.
//!
//! [`crate::gemm::packed`] repacks every weight at load into its panel
//! layout, which writes a fresh copy of the whole model (about 10 GB for
//! Lumina-Image 2.0 and its text encoder, most of that cost the first
//! touch of new pages). Here the product is computed transposed,
//! `y^T = W x^T`, so that the weight is AMX's A operand: a tile of 16 rows
//! x 32 values is read with the file's row stride, as stored. The inputs
//! (`rows x in`, small next to the weight) are packed once per call into
//! the B layout (pairs of consecutive inputs per 32-bit lane,
//! [`PackedBf16`]'s panels with tokens for outputs), and each 32x32 block
//! of sums is transposed on its way out, the bias added in f32 and rounded
//! once to bf16, as the packed kernel does. The depth is accumulated in
//! the same order and chunks as the packed AMX kernel: the two give the
//! same bits.
//!
//! The edges that a tile would read past the weight are copied when the
//! handle is made (small): the last partial block of 32 rows, zero-padded,
//! and the columns past the last whole 32 of the other rows.
//!
//! # Memory maps and truncated files
//!
//! [`MappedFile`] maps a file read-only. If another process truncates the
//! file while it is mapped, reading the lost pages raises SIGBUS and the
//! process dies (PyTorch's and candle's safetensors loaders, which map
//! files too, have the same exposure). `LUMINA2_NO_MMAP=1` turns the
//! mapping off: weights are then copied into the packed layout at load.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{Aligned, CpuView};
use crate::gemm::packed::{self, bf16_elems, check_operands, PackedBf16, BLOCK_PANELS, PANEL};

#[cfg(target_arch = "x86_64")]
mod amx;

/// Whether bf16 weights are multiplied in place from a memory map: AMX-BF16
/// usable, packed bf16 layers on ([`packed::available`], which
/// [`packed::set_enabled`] turns off too), and not `LUMINA2_NO_MMAP=1`.
pub fn available() -> bool {
    crate::caps().mapped_bf16 && packed::available()
}

/// Whether files may be memory-mapped at all (not `LUMINA2_NO_MMAP=1`):
/// bf16 tables are then read in place on any CPU ([`RowMajorBf16::gather_rows`]).
pub fn allowed() -> bool {
    !crate::caps().overrides.no_mmap
}

/// A file mapped read-only into memory, shared by the weights that borrow
/// from it (see the module's note on truncated files).
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `file` read-only.
    pub fn open(file: &std::fs::File) -> std::io::Result<Arc<Self>> {
        // SAFETY: the map is read-only and never handed out mutably; the
        // file changing under it is the documented risk of memory-mapped
        // weights (a truncation raises SIGBUS), which `LUMINA2_NO_MMAP=1`
        // avoids.
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Arc::new(Self { map }))
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// The bytes a [`RowMajorBf16`] borrows from: a [`MappedFile`], or any
/// buffer (tests).
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A row-major `[out, in]` bf16 weight borrowed from `bytes` (kept alive by
/// its `Arc`), multiplied in place on AMX.
pub struct RowMajorBf16 {
    bytes: Bytes,
    offset: usize,
    out_dim: usize,
    in_dim: usize,
    /// The columns past `in / 32 * 32` of rows `0..out / 32 * 32`, 32 a row,
    /// zero-padded (empty when `in` is a multiple of 32).
    tail: Aligned<u16>,
    /// Rows `out / 32 * 32..out`, as 32 rows of `ceil(in / 32) * 32` values,
    /// zero-padded (empty when `out` is a multiple of 32).
    edge: Aligned<u16>,
}

impl std::fmt::Debug for RowMajorBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RowMajorBf16([{}, {}] at byte {})",
            self.out_dim, self.in_dim, self.offset
        )
    }
}

impl RowMajorBf16 {
    /// The `[out_dim, in_dim]` bf16 weight at byte `offset` of `bytes`
    /// (little-endian, row-major). `None` when it does not lie inside
    /// `bytes` or is not 2-byte aligned (the safetensors format does not
    /// promise alignment; the caller then copies the weight instead).
    pub fn new(bytes: Bytes, offset: usize, out_dim: usize, in_dim: usize) -> Option<Self> {
        let len = out_dim.checked_mul(in_dim)?.checked_mul(2)?;
        let all: &[u8] = (*bytes).as_ref();
        let raw = all.get(offset..offset.checked_add(len)?)?;
        let w: &[u16] = bytemuck::try_cast_slice(raw).ok()?;
        let full = out_dim / 32 * 32;
        let in_full = in_dim / 32 * 32;
        let in_pad = in_dim.div_ceil(32) * 32;
        let mut tail = Aligned::<u16>::zeroed(if in_full < in_dim { full * 32 } else { 0 });
        for n in 0..tail.len() / 32 {
            let src = &w[n * in_dim + in_full..(n + 1) * in_dim];
            tail[n * 32..n * 32 + src.len()].copy_from_slice(src);
        }
        let mut edge = Aligned::<u16>::zeroed(if full < out_dim { 32 * in_pad } else { 0 });
        for n in full..out_dim {
            let at = (n - full) * in_pad;
            edge[at..at + in_dim].copy_from_slice(&w[n * in_dim..(n + 1) * in_dim]);
        }
        Some(Self {
            bytes,
            offset,
            out_dim,
            in_dim,
            tail,
            edge,
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.out_dim, self.in_dim]
    }

    /// The weight's bf16 bits, row-major.
    fn bits(&self) -> &[u16] {
        let all: &[u8] = (*self.bytes).as_ref();
        let raw = &all[self.offset..self.offset + self.out_dim * self.in_dim * 2];
        // Checked in `new`: in bounds and 2-byte aligned.
        bytemuck::cast_slice(raw)
    }

    /// Whether any value is NaN or infinite (reads the whole weight, in
    /// parallel).
    pub fn any_non_finite(&self) -> bool {
        self.bits()
            .par_chunks(1 << 20)
            .any(crate::bf16_bits_non_finite)
    }

    /// Rows `ids` as an `[ids.len(), in]` bf16 tensor: an embedding lookup
    /// that reads only the rows asked for (a table used this way is never
    /// copied whole). An id past the last row is an error naming it.
    pub fn gather_rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let w = self.bits();
        let mut v = Vec::with_capacity(ids.len() * self.in_dim);
        for &id in ids {
            let r = id as usize;
            let row = w
                .get(r * self.in_dim..(r + 1) * self.in_dim)
                .filter(|_| r < self.out_dim)
                .ok_or_else(|| {
                    candle_core::Error::msg(format!(
                        "row {id} is past the {} rows of the table",
                        self.out_dim
                    ))
                })?;
            v.extend(row.iter().map(|&b| bf16::from_bits(b)));
        }
        Tensor::from_vec(v, (ids.len(), self.in_dim), &Device::Cpu)
    }

    /// The dense `[out, in]` bf16 weight (a copy).
    pub fn to_dense(&self) -> candle_core::Result<Tensor> {
        let v: Vec<bf16> = self.bits().iter().map(|&b| bf16::from_bits(b)).collect();
        Tensor::from_vec(v, (self.out_dim, self.in_dim), &Device::Cpu)
    }

    /// The weight copied into the packed layout.
    pub fn to_packed(&self) -> PackedBf16 {
        let w = self.bits();
        let in_dim = self.in_dim;
        PackedBf16::from_rows(self.out_dim, in_dim, |n, k0, out| {
            out.copy_from_slice(&w[n * in_dim + k0..n * in_dim + k0 + out.len()]);
        })
    }

    /// `x W^T + bias` for `x` of shape `[rows, in]` (made contiguous bf16)
    /// and an optional f32 `bias` of `out` values, as a `[rows, out]` bf16
    /// tensor. Without AMX (a handle made on a machine that lacks it, in
    /// tests) the weight is packed for the call.
    pub fn matmul(&self, x: &Tensor, bias: Option<&[f32]>) -> candle_core::Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        check_operands("mapped", in_dim, bias, self.dims())?;
        if !packed::use_amx() {
            return self.to_packed().matmul(x, bias);
        }
        let x = x.to_dtype(DType::BF16)?.contiguous()?;
        let view = CpuView::of(&x);
        let xs = &*bf16_elems(&view, &x)?;
        // The inputs as B tiles: 32 tokens a panel, pairs per lane.
        let xp = PackedBf16::from_rows(rows, in_dim, |n, k0, out| {
            let src = &xs[n * in_dim + k0..n * in_dim + k0 + out.len()];
            out.copy_from_slice(bytemuck::cast_slice(src));
        });
        let blocks = self.out_dim.div_ceil(32);
        let mut bias_pad = vec![0f32; blocks * 32];
        if let Some(b) = bias {
            bias_pad[..b.len()].copy_from_slice(b);
        }
        let mut out = vec![bf16::ZERO; rows * self.out_dim];
        self.run(&xp, rows, &bias_pad, OutPtr(out.as_mut_ptr().cast()));
        Tensor::from_vec(out, (rows, self.out_dim), &Device::Cpu)
    }

    /// Spreads (token group, output group) tasks over the pool: output
    /// groups of the packed kernel's size, and as few token groups as give
    /// every thread two tasks, since each task copies its weight rows once
    /// and reuses them for all its tokens.
    #[cfg(target_arch = "x86_64")]
    fn run(&self, xp: &PackedBf16, rows: usize, bias: &[f32], out: OutPtr) {
        let operand = self.operand();
        let token_panels = rows.div_ceil(PANEL);
        let blocks = self.out_dim.div_ceil(32);
        let threads = rayon::current_num_threads().max(1);
        // Output groups of at most `BLOCK_PANELS` blocks, as many as a whole
        // number of rounds over the threads: 2304 outputs in 9 groups of 8
        // left one of two threads idle for the last ninth of the call.
        let mut block_groups = blocks.div_ceil(BLOCK_PANELS);
        if block_groups > threads {
            block_groups = block_groups.next_multiple_of(threads).min(blocks);
        }
        let token_groups = (2 * threads)
            .div_ceil(block_groups)
            .clamp(1, token_panels.max(1));
        let per_task = token_panels.div_ceil(token_groups).max(1);
        let groups = token_panels.div_ceil(per_task);
        let out = &out;
        (0..groups * block_groups).into_par_iter().for_each(|t| {
            let (g, bg) = (t / block_groups, t % block_groups);
            let t0 = g * per_task;
            let t1 = (t0 + per_task).min(token_panels);
            // Group `bg`'s blocks: an even share, at most `BLOCK_PANELS`.
            let (b0, b1) = (bg * blocks / block_groups, (bg + 1) * blocks / block_groups);
            // SAFETY: AMX is usable (checked by `matmul`); `operand`'s
            // pointers stay valid while `self` lives; `xp` holds the
            // inputs' panels, `bias` `blocks * 32` values; tasks write
            // disjoint (token, output) blocks of `out`, `rows * out_dim`.
            unsafe {
                amx::block(
                    &operand,
                    xp.data(),
                    xp.pairs(),
                    rows,
                    (t0, t1),
                    (b0, b1),
                    bias.as_ptr(),
                    out.0,
                )
            };
        });
    }

    /// Never called off x86-64 (`use_amx` is false there).
    #[cfg(not(target_arch = "x86_64"))]
    fn run(&self, _xp: &PackedBf16, _rows: usize, _bias: &[f32], _out: OutPtr) {}

    /// Where the kernel reads the weight's tiles.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn operand(&self) -> Operand {
        let all: &[u8] = (*self.bytes).as_ref();
        Operand {
            base: all[self.offset..].as_ptr(),
            ld: self.in_dim * 2,
            out_dim: self.out_dim,
            full_blocks: self.out_dim / 32,
            full_steps: self.in_dim / 32,
            tail: self.tail.as_ptr().cast(),
            edge: self.edge.as_ptr().cast(),
            edge_ld: self.in_dim.div_ceil(32) * 64,
        }
    }
}

/// The output rows, written by tasks at disjoint places.
struct OutPtr(*mut u16);
// SAFETY: only used for disjoint writes inside one `run` call.
unsafe impl Sync for OutPtr {}

/// The weight's tiles as the kernel reads them: 32 rows of block `ob` at
/// depth step `s` (32 values) come from the mapped rows, from the tail
/// copy (the last, partial step of a whole block) or from the edge copy
/// (the last, partial block).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Operand {
    base: *const u8,
    /// Bytes between rows of the weight.
    ld: usize,
    out_dim: usize,
    full_blocks: usize,
    full_steps: usize,
    tail: *const u8,
    edge: *const u8,
    edge_ld: usize,
}

// SAFETY: read-only pointers into buffers that outlive the call that
// shares the operand.
unsafe impl Sync for Operand {}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Operand {
    /// The first byte of the 32x32 tile pair of block `ob`, step `s`, and
    /// the bytes between its rows.
    #[inline(always)]
    fn a_tiles(&self, ob: usize, s: usize) -> (*const u8, usize) {
        if ob >= self.full_blocks {
            (self.edge.wrapping_add(s * 64), self.edge_ld)
        } else if s >= self.full_steps {
            (self.tail.wrapping_add(ob * 32 * 64), 64)
        } else {
            (self.base.wrapping_add(ob * 32 * self.ld + s * 64), self.ld)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u16> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<bf16>())
            .map(|v| v.iter().map(|b| b.to_bits()).collect())
            .unwrap_or_default()
    }

    /// A weight handle on `w`'s bytes placed at byte `offset` of a buffer.
    fn mapped(w: &Tensor, offset: usize) -> Option<RowMajorBf16> {
        let (out, inp) = w.dims2().ok()?;
        let mut buf = vec![0xffu8; offset];
        for b in bits(w) {
            buf.extend_from_slice(&b.to_le_bytes());
        }
        // Poison past the end: NaN bf16s a tile must never read.
        buf.extend_from_slice(&[0xff; 256]);
        RowMajorBf16::new(Arc::new(buf), offset, out, inp)
    }

    /// The in-place product equals the packed kernel's bit for bit on
    /// AMX (same depth order), and an f64 reference within one bf16
    /// rounding everywhere, for widths that are not multiples of 32,
    /// output counts that are not multiples of 16, 1 to 100 tokens, a
    /// bias, and a depth split into chunks; the bytes around the weight
    /// (NaN) are never read.
    #[test]
    fn matches_packed_kernel() -> candle_core::Result<()> {
        crate::report_paths("mapped::matches_packed_kernel");
        eprintln!("mapped: amx {}", packed::use_amx());
        let dev = Device::Cpu;
        let shapes = [
            (1usize, 2usize, 1usize),
            (5, 7, 33),
            (17, 64, 32),
            (33, 130, 70),
            (64, 257, 100),
            (100, 96, 8),
            (97, 2304, 48),
            (40, 5000, 40),
            // Several output groups, split unevenly over the threads, with
            // a partial last block (and below, several depth chunks).
            (70, 96, 600),
            (40, 2600, 300),
        ];
        for (i, &(rows, inp, out)) in shapes.iter().enumerate() {
            let x = Tensor::randn(0f32, 1., (rows, inp), &dev)?.to_dtype(DType::BF16)?;
            let w = Tensor::randn(0f32, 1., (out, inp), &dev)?.to_dtype(DType::BF16)?;
            let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.25 - 3.0).collect();
            let m = mapped(&w, 2 * (i % 3)).ok_or_else(|| candle_core::Error::msg("new"))?;
            assert_eq!(bits(&m.to_dense()?), bits(&w));
            let b = (i % 2 == 0).then_some(&bias[..]);
            let y = m.matmul(&x, b)?;
            let p = PackedBf16::pack(&w)?.matmul(&x, b)?;
            if packed::use_amx() {
                assert_eq!(bits(&y), bits(&p), "({rows},{inp},{out})");
            }
            let y = y.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let xs = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let ws = w.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for r in 0..rows {
                for n in 0..out {
                    let mut s = b.map_or(0.0, |b| b[n] as f64);
                    for k in 0..inp {
                        s += xs[r][k] as f64 * ws[n][k] as f64;
                    }
                    let tol = s.abs() * 2f64.powi(-8) + 1e-4 * (inp as f64).sqrt();
                    let d = (y[r][n] as f64 - s).abs();
                    assert!(
                        d <= tol,
                        "({rows},{inp},{out}) [{r},{n}]: {} vs {s}",
                        y[r][n]
                    );
                }
            }
        }
        Ok(())
    }

    /// Misaligned or out-of-range weights are refused (the caller copies).
    #[test]
    fn refuses_misaligned_and_short() {
        let buf: Bytes = Arc::new(Aligned::<u8>::zeroed(64).to_vec());
        assert!(RowMajorBf16::new(buf.clone(), 1, 2, 2).is_none());
        assert!(RowMajorBf16::new(buf.clone(), 0, 4, 9).is_none());
        assert!(RowMajorBf16::new(buf.clone(), 0, usize::MAX, 2).is_none());
        assert!(RowMajorBf16::new(buf, 32, 4, 4).is_some());
    }

    /// A gather returns exactly the table's rows, and refuses an id past it.
    #[test]
    fn gathers_rows() -> candle_core::Result<()> {
        let w = Tensor::randn(0f32, 1., (40, 70), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let m = mapped(&w, 0).ok_or_else(|| candle_core::Error::msg("new"))?;
        let ids = [39u32, 0, 7, 7];
        let got = m.gather_rows(&ids)?;
        let want = w.index_select(&Tensor::new(&ids, &Device::Cpu)?, 0)?;
        let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert!(m.gather_rows(&[40]).is_err());
        Ok(())
    }

    /// The non-finite scan finds one NaN among finite values.
    #[test]
    fn finds_non_finite() -> candle_core::Result<()> {
        let w = Tensor::randn(0f32, 1., (40, 70), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let m = mapped(&w, 0).ok_or_else(|| candle_core::Error::msg("new"))?;
        assert!(!m.any_non_finite());
        let mut v = w.flatten_all()?.to_vec1::<bf16>()?;
        v[1234] = bf16::NAN;
        let w = Tensor::from_vec(v, (40, 70), &Device::Cpu)?;
        let m = mapped(&w, 0).ok_or_else(|| candle_core::Error::msg("new"))?;
        assert!(m.any_non_finite());
        Ok(())
    }
}
