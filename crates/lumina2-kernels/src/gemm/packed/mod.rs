//! A bf16 matrix multiply for linear layers on x86-64 CPUs with bf16
//! dot-product hardware: AMX tiles (`tdpbf16ps`) where the CPU and the OS
//! allow them, else AVX512-BF16 (`vdpbf16ps`).
//!
//! candle's CPU bf16 matmul widens both operands to f32 on every call, so bf16
//! runs slower than f32 there; PyTorch (oneDNN) multiplies bf16 pairs directly.
//! This module does the same for `y = x W^T + b`:
//!
//! - the weight is repacked once, at load time, into panels of 32 output
//!   columns in which each 32-bit lane holds two consecutive input elements:
//!   the operand layout of `vdpbf16ps`, and row by row the "VNNI" layout of an
//!   AMX B tile; the packed copy replaces the dense one (same size);
//! - a 32x32 block (four AMX tiles) or a 12x32 block (AVX-512 registers)
//!   accumulates in f32 over the whole input width, then adds the bias in f32
//!   and rounds once to bf16 (round to nearest even), as oneDNN's bf16 `addmm`
//!   does;
//! - tiles are spread over rayon's pool (so `RAYON_NUM_THREADS` applies).
//!
//! [`available`] says whether this CPU can run it (runtime detection); where it
//! cannot, `lumina2_weights::Linear` keeps the dense weight and candle's matmul.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{Aligned, CpuView};

/// Output columns per packed panel (two 16-lane registers).
pub const PANEL: usize = 32;
/// Columns per packing step (a multiple of every block size used: 32).
const SEGMENT: usize = 256;
/// Rows per register tile.
const TILE_ROWS: usize = 12;
/// Rows per parallel task (a multiple of the tile height).
pub(crate) const BLOCK_ROWS: usize = 8 * TILE_ROWS;
/// Panels per parallel task.
pub(crate) const BLOCK_PANELS: usize = 8;
/// Input pairs per depth chunk of the AMX kernel (2304 inputs: the text
/// encoder's and the transformer's width, which run in one chunk).
pub(crate) const CHUNK_PAIRS: usize = 1152;

static DISABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The panels [`PackedBf16::matmul_quantized`] packed last on this thread.
    static SCRATCH: std::cell::RefCell<Option<Aligned<u32>>> = const { std::cell::RefCell::new(None) };
}

/// Whether packed bf16 linear layers are used: the CPU has AVX512-BF16 (checked
/// at run time) and they were not turned off with [`set_enabled`] or the
/// environment variable `LUMINA2_NO_PACKED_BF16=1`.
pub fn available() -> bool {
    if DISABLED.load(Ordering::Relaxed) {
        return false;
    }
    crate::caps().packed_bf16
}

/// Turns packing of bf16 linear weights on or off for layers built from now on
/// (process-wide; for benchmarks and comparisons). Layers already built keep
/// their form.
pub fn set_enabled(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// `f32 -> bf16` bits, rounding to nearest even, NaN kept NaN: what
/// `half::bf16::from_f32` gives, without its per-value branching.
#[inline]
pub(crate) fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Which kernel runs: AMX when the CPU has AMX-BF16 and Linux granted the
/// process its tile state (asked once), else AVX512-BF16.
/// `LUMINA2_NO_AMX=1` forces the AVX512-BF16 kernel.
pub fn use_amx() -> bool {
    crate::caps().amx_bf16
}

/// Which kernel multiplies a packed weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AMX tiles (`amx.rs`), 32x32 blocks.
    Amx,
    /// AVX512-BF16 register tiles (`avx512.rs`), 12 rows a tile.
    Avx512,
    /// Plain Rust (`portable.rs`), the same tiles.
    Portable,
}

/// The fastest kernel this process may use.
fn best_kernel() -> Kernel {
    if use_amx() {
        Kernel::Amx
    } else if crate::simd::has_avx512_bf16() {
        Kernel::Avx512
    } else {
        Kernel::Portable
    }
}

/// An `[out, in]` bf16 weight in the panel layout of the kernels.
///
/// Element `(n, k)` lives in panel `n / 32`, pair `k / 2`, lane `n % 32`, half
/// `k % 2`; the last panel is padded with zero columns and the input width
/// with zeros to a multiple of 32 (one AMX tile's depth).
#[derive(Debug)]
pub struct PackedBf16 {
    out_dim: usize,
    in_dim: usize,
    /// `ceil(in_dim / 32) * 16`.
    pairs: usize,
    /// `ceil(out_dim / 32)`.
    panels: usize,
    /// `panels * pairs * 32` lanes, each two bf16 (low half = even `k`).
    data: Aligned<u32>,
}

impl PackedBf16 {
    /// Packs a dense `[out, in]` weight (any dtype; rounded to bf16 if it is
    /// not bf16 already). The tensor must be on the CPU.
    pub fn pack(weight: &Tensor) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        if !matches!(weight.device(), Device::Cpu) {
            candle_core::bail!("packed bf16 weights live on the CPU");
        }
        let w = crate::cpu::cast(weight, DType::BF16)?.contiguous()?;
        let view = CpuView::of(&w);
        let w = bf16_elems(&view, &w)?;
        Ok(Self::from_rows(out_dim, in_dim, |n, k0, out| {
            let src = &w[n * in_dim + k0..n * in_dim + k0 + out.len()];
            out.copy_from_slice(bytemuck::cast_slice(src));
        }))
    }

    /// Packs a quantised `[out, in]` weight: Q4_0 and Q8_0 blocks are decoded
    /// straight into the panels (in parallel, no dense copy), each value
    /// `bf16(f32(d) * q)`, bit for bit what dequantising to f32 and rounding
    /// gives; other types are dequantised with candle first.
    pub fn from_quantized(q: &QTensor) -> candle_core::Result<Self> {
        Self::from_quantized_in(q, None)
    }

    /// `x W^T + bias` ([`Self::matmul`]) for a quantised `W`, packed for this
    /// call only ([`Self::from_quantized`]) into a buffer that the calling
    /// thread keeps for its next call: a fresh 42 MB buffer for each of the
    /// real model's feed-forward weights cost more in page faults than the
    /// packing itself (9216 x 2304 Q4_0: 24 ms fresh, 10 ms reused). The
    /// thread holds one buffer, the size of the largest weight packed so far.
    pub fn matmul_quantized(
        q: &QTensor,
        x: &Tensor,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        if let Some(y) = Self::matmul_q4_0_streamed(q, x, bias)? {
            return Ok(y);
        }
        let buf = SCRATCH.with(|s| s.borrow_mut().take());
        let packed = Self::from_quantized_in(q, buf)?;
        let y = packed.matmul(x, bias);
        SCRATCH.with(|s| *s.borrow_mut() = Some(packed.data));
        y
    }

    /// Q4_0 weights on AMX: each task decodes a few panels into its own
    /// small buffer (at most about 1.2 MB, so it stays in L2) and multiplies
    /// every input row by them, so the weight is never unpacked whole. `None`
    /// where this path does not apply (other types, no AMX, shapes that are
    /// not whole blocks).
    #[cfg(target_arch = "x86_64")]
    fn matmul_q4_0_streamed(
        q: &QTensor,
        x: &Tensor,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, x_in) = x.dims2()?;
        if q.dtype() != GgmlDType::Q4_0 || !x.device().is_cpu() || !use_amx() || x_in % 32 != 0 {
            return Ok(None);
        }
        let Some(a) = tiled_cpu_input(x, rows, x_in)? else {
            return Ok(None);
        };
        Self::matmul_q4_0_tiled(q, &a, rows, x_in, bias)
    }

    /// [`Self::matmul_q4_0_streamed`] for inputs already tiled for AMX
    /// ([`tile_inputs`], `rows` rows of `in_dim`); `None` where it does not
    /// apply.
    #[cfg(target_arch = "x86_64")]
    fn matmul_q4_0_tiled(
        q: &QTensor,
        a: &[bf16],
        rows: usize,
        in_dim: usize,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (out_dim, w_in) = q.shape().dims2()?;
        let data = q.data()?;
        let row_bytes = in_dim / 32 * 18;
        if q.dtype() != GgmlDType::Q4_0
            || !use_amx()
            || w_in != in_dim
            || !in_dim.is_multiple_of(32)
            || a.len() < rows.div_ceil(32) * 32 * in_dim
            || data.len() != out_dim * row_bytes
            || bias.is_some_and(|b| b.len() != out_dim)
        {
            return Ok(None);
        }
        let pairs = in_dim / 2;
        let panels = out_dim.div_ceil(PANEL);
        let mut bias_pad = vec![0f32; panels * PANEL];
        if let Some(b) = bias {
            bias_pad[..b.len()].copy_from_slice(b);
        }
        let mut out = vec![bf16::ZERO; rows * out_dim];
        let dst = Out::Bf16(out.as_mut_ptr().cast());
        let per_task = (1_200_000 / (pairs * PANEL * 4).max(1)).clamp(1, BLOCK_PANELS);
        (0..panels.div_ceil(per_task))
            .into_par_iter()
            .for_each_init(
                || Aligned::<u32>::zeroed(per_task * pairs * PANEL),
                |buf, t| {
                    let (p0, p1) = (t * per_task, ((t + 1) * per_task).min(panels));
                    for p in p0..p1 {
                        let n = PANEL.min(out_dim - p * PANEL);
                        let src = &data[p * PANEL * row_bytes..(p * PANEL + n) * row_bytes];
                        let panel =
                            &mut buf[(p - p0) * pairs * PANEL..(p - p0 + 1) * pairs * PANEL];
                        // SAFETY: AVX-512F/BW/VL/BF16 come with AMX here; `src`
                        // holds `n` rows of whole blocks, `panel` `pairs * 32` lanes.
                        unsafe { avx512::pack_q4_0_panel(src, row_bytes, n, panel) };
                    }
                    // Row blocks inside the task, so that a block of inputs stays
                    // in cache across the task's panels.
                    let mut r0 = 0;
                    while r0 < rows {
                        let r1 = (r0 + BLOCK_ROWS).min(rows);
                        // SAFETY: AMX is usable; `a` is tiled in whole 32-row
                        // blocks; `buf` holds panels `p0..p1`; tasks write
                        // disjoint columns of `out` (`rows x out_dim`).
                        unsafe {
                            amx::amx_block(
                                a.as_ptr().cast::<u32>(),
                                pairs,
                                (r0, r1),
                                (buf, p0),
                                (p0, p1),
                                bias_pad.as_ptr(),
                                Dest::whole(dst, out_dim),
                            )
                        };
                        r0 = r1;
                    }
                },
            );
        Ok(Some(Tensor::from_vec(out, (rows, out_dim), &Device::Cpu)?))
    }

    /// [`Self::gated_q4_0_streamed`] as rows: `act(x g^T) * (x u^T)`, bf16
    /// `[rows, out]`, or `None` where that path does not apply.
    #[cfg(target_arch = "x86_64")]
    pub fn gated_q4_0_rows(
        g: &QTensor,
        u: &QTensor,
        x: &Tensor,
        gelu: bool,
    ) -> candle_core::Result<Option<Vec<bf16>>> {
        Ok(match Self::gated_q4_0_streamed(g, u, x, gelu, false)? {
            Some(Gated::Rows(y)) => Some(y),
            _ => None,
        })
    }

    /// `act(x G^T) * (x U^T)` for two Q4_0 weights `G`, `U` of the same
    /// shape without bias (a gated feed-forward: `gelu` picks GELU-tanh,
    /// else SiLU), on AMX: each task decodes the same panels of both
    /// weights, multiplies every input row by them into two small bf16
    /// blocks and writes the product; the two `[rows, out]` intermediates of
    /// the unfused form (47 MB at 1280 rows and 9216 outputs) never exist.
    /// The roundings are the unfused ops' (each product to bf16, the
    /// activation to bf16, the result to bf16). `None` where this path does
    /// not apply.
    ///
    /// With `tiled`, the result is written as AMX A tiles ([`tile_inputs`])
    /// for a following Q4_0 matmul ([`Self::feed_forward_q4_0`]) instead of
    /// rows (`out` must then be a multiple of 32).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn gated_q4_0_streamed(
        g: &QTensor,
        u: &QTensor,
        x: &Tensor,
        gelu: bool,
        tiled: bool,
    ) -> candle_core::Result<Option<Gated>> {
        let q4 = |q: &QTensor| q.dtype() == GgmlDType::Q4_0;
        if !q4(g) || !q4(u) || !x.device().is_cpu() || !use_amx() {
            return Ok(None);
        }
        let (out_dim, in_dim) = g.shape().dims2()?;
        let (rows, x_in) = x.dims2()?;
        let (gd, ud) = (g.data()?, u.data()?);
        let row_bytes = in_dim / 32 * 18;
        if u.shape().dims2()? != (out_dim, in_dim)
            || x_in != in_dim
            || in_dim % 32 != 0
            || (tiled && out_dim % 32 != 0)
            || gd.len() != out_dim * row_bytes
            || ud.len() != out_dim * row_bytes
        {
            return Ok(None);
        }
        let pairs = in_dim / 2;
        let panels = out_dim.div_ceil(PANEL);
        let Some(a) = tiled_cpu_input(x, rows, in_dim)? else {
            return Ok(None);
        };
        let zero_bias = vec![0f32; panels * PANEL];
        let mut out = match tiled {
            true => Gated::Tiled(Aligned::zeroed(rows.div_ceil(32) * 32 * out_dim)),
            false => Gated::Rows(vec![bf16::ZERO; rows * out_dim]),
        };
        let dst = OutRows(match &mut out {
            Gated::Tiled(t) => t.as_mut_ptr(),
            Gated::Rows(r) => r.as_mut_ptr(),
        });
        let dst = &dst;
        // Both weights' panels of a task in about 1.2 MB, as the ungated path.
        let per_task = (600_000 / (pairs * PANEL * 4).max(1)).clamp(1, BLOCK_PANELS);
        let len = pairs * PANEL;
        (0..panels.div_ceil(per_task))
            .into_par_iter()
            .for_each_init(
                || {
                    let w = Aligned::<u32>::zeroed(2 * per_task * len);
                    let blocks = vec![bf16::ZERO; 2 * BLOCK_ROWS * per_task * PANEL];
                    (w, blocks)
                },
                |(w, blocks), t| {
                    let (p0, p1) = (t * per_task, ((t + 1) * per_task).min(panels));
                    let (wg, wu) = w.split_at_mut(per_task * len);
                    for p in p0..p1 {
                        let n = PANEL.min(out_dim - p * PANEL);
                        let at = (p - p0) * len;
                        let bytes = p * PANEL * row_bytes..(p * PANEL + n) * row_bytes;
                        // SAFETY: as in `matmul_q4_0_streamed`.
                        unsafe {
                            avx512::pack_q4_0_panel(
                                &gd[bytes.clone()],
                                row_bytes,
                                n,
                                &mut wg[at..at + len],
                            );
                            avx512::pack_q4_0_panel(
                                &ud[bytes],
                                row_bytes,
                                n,
                                &mut wu[at..at + len],
                            );
                        }
                    }
                    let width = (p1 - p0) * PANEL;
                    let (c0, c1) = (p0 * PANEL, (p1 * PANEL).min(out_dim));
                    let (bg, bu) = blocks.split_at_mut(BLOCK_ROWS * width);
                    let mut r0 = 0;
                    while r0 < rows {
                        let r1 = (r0 + BLOCK_ROWS).min(rows);
                        let local = |b: &mut [bf16]| Dest {
                            out: Out::Bf16(b.as_mut_ptr().cast()),
                            ld: width,
                            cols: out_dim,
                            row0: r0,
                            col0: c0,
                        };
                        // SAFETY: AMX is usable; `a` is tiled in whole 32-row
                        // blocks; `wg`/`wu` hold panels `p0..p1`; the blocks
                        // hold rows r0..r1 of the task's columns. Each task
                        // writes only its own columns of `out`.
                        unsafe {
                            for (wt, b) in [(&*wg, &mut *bg), (&*wu, &mut *bu)] {
                                amx::amx_block(
                                    a.as_ptr().cast::<u32>(),
                                    pairs,
                                    (r0, r1),
                                    (wt, p0),
                                    (p0, p1),
                                    zero_bias.as_ptr(),
                                    local(b),
                                );
                            }
                            for r in r0..r1 {
                                let i = (r - r0) * width;
                                // Rows: one run of the task's columns. Tiles:
                                // one 32-value tile row per panel, at tile
                                // (r / 16, c / 32) of `tile_inputs`' layout.
                                let mut c = c0;
                                while c < c1 {
                                    let (n, at) = match tiled {
                                        true => {
                                            let tile = (r / 16) * (out_dim / 32) + c / 32;
                                            (PANEL, tile * 512 + (r % 16) * 32)
                                        }
                                        false => (c1 - c, r * out_dim + c),
                                    };
                                    let o = std::slice::from_raw_parts_mut(dst.0.add(at), n);
                                    let j = i + c - c0;
                                    let (gs, us) = (&bg[j..j + n], &bu[j..j + n]);
                                    match gelu {
                                        true => {
                                            crate::elementwise::fused::act_mul_slices::<bf16, true>(gs, us, o)
                                        }
                                        false => {
                                            crate::elementwise::fused::act_mul_slices::<bf16, false>(gs, us, o)
                                        }
                                    }
                                    c += n;
                                }
                            }
                        }
                        r0 = r1;
                    }
                },
            );
        Ok(Some(out))
    }

    /// `down(act(gate(x)) * up(x))` for three Q4_0 weights on AMX: the
    /// gated product ([`Self::gated_q4_0_streamed`]) is written straight in
    /// the tiled layout that the last matmul reads, so the `[rows, inner]`
    /// intermediate exists once (not as rows and again as tiles: 23.6 MB
    /// less at the transformer's peak at 512x512). `None` where this path
    /// does not apply.
    #[cfg(target_arch = "x86_64")]
    pub fn feed_forward_q4_0(
        (g, u, d): (&QTensor, &QTensor, &QTensor),
        x: &Tensor,
        gelu: bool,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, _) = x.dims2()?;
        let (inner, _) = g.shape().dims2()?;
        if d.dtype() != GgmlDType::Q4_0 || d.shape().dims2()?.1 != inner {
            return Ok(None);
        }
        match Self::gated_q4_0_streamed(g, u, x, gelu, true)? {
            Some(Gated::Tiled(h)) => Self::matmul_q4_0_tiled(d, &h, rows, inner, bias),
            _ => Ok(None),
        }
    }

    fn from_quantized_in(q: &QTensor, buf: Option<Aligned<u32>>) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let (block, bytes) = match q.dtype() {
            GgmlDType::Q4_0 => (32, 18),
            GgmlDType::Q8_0 => (32, 34),
            _ => return Self::pack(&q.dequantize(&Device::Cpu)?),
        };
        let data = q.data()?;
        let row_bytes = in_dim / block * bytes;
        if in_dim % block != 0 || data.len() != out_dim * row_bytes {
            return Self::pack(&q.dequantize(&Device::Cpu)?);
        }
        let q4 = q.dtype() == GgmlDType::Q4_0;
        let simd = q4 && crate::simd::has_avx512_bf16();
        #[cfg(target_arch = "x86_64")]
        if simd {
            // Straight into the panels: 32 rows of a block column decoded in
            // registers and transposed (5x the gather through `from_rows`).
            let pairs = in_dim / 2;
            let panels = out_dim.div_ceil(PANEL);
            // Every lane is written below: a reused buffer needs no zeroing.
            let mut packed = Aligned::<u32>::reuse_unzeroed(buf, panels * pairs * PANEL);
            packed
                .par_chunks_mut(pairs * PANEL)
                .enumerate()
                .for_each(|(p, panel)| {
                    let rows = PANEL.min(out_dim - p * PANEL);
                    let src = &data[p * PANEL * row_bytes..(p * PANEL + rows) * row_bytes];
                    // SAFETY: AVX-512F/BW/VL/BF16 were detected; `src` holds
                    // `rows` rows of `in_dim / 32` blocks, `panel` `pairs * 32`
                    // lanes.
                    unsafe { avx512::pack_q4_0_panel(src, row_bytes, rows, panel) };
                });
            return Ok(Self {
                out_dim,
                in_dim,
                pairs,
                panels,
                data: packed,
            });
        }
        Ok(Self::from_rows(out_dim, in_dim, |n, k0, seg| {
            let first = n * row_bytes + k0 / block * bytes;
            let src = &data[first..first + seg.len() / block * bytes];
            if simd {
                // SAFETY: AVX-512F/BW/VL/BF16 were detected; `src` holds
                // `seg.len() / 32` whole Q4_0 blocks.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::decode_q4_0(src, seg)
                };
                return;
            }
            for (blk, out) in src.chunks_exact(bytes).zip(seg.chunks_exact_mut(block)) {
                let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
                if q4 {
                    // Low nibbles are values 0..16, high nibbles 16..32.
                    for (j, &b) in blk[2..18].iter().enumerate() {
                        out[j] = round_bf16(d * ((b & 0xf) as i32 - 8) as f32);
                        out[j + 16] = round_bf16(d * ((b >> 4) as i32 - 8) as f32);
                    }
                } else {
                    for (o, &b) in out.iter_mut().zip(&blk[2..34]) {
                        *o = round_bf16(d * (b as i8) as f32);
                    }
                }
            }
        }))
    }

    /// Builds the panels from a function that writes the bf16 bits of row `n`,
    /// columns `k0..k0 + out.len()`, into `out` (`k0` a multiple of
    /// [`SEGMENT`]). Panels are filled in parallel, a segment of 32 rows at a
    /// time through a small buffer, so the panel is written sequentially.
    pub(crate) fn from_rows(
        out_dim: usize,
        in_dim: usize,
        seg_of: impl Fn(usize, usize, &mut [u16]) + Sync,
    ) -> Self {
        let pairs = in_dim.div_ceil(32) * 16;
        let panels = out_dim.div_ceil(PANEL);
        let mut data = Aligned::<u32>::zeroed(panels * pairs * PANEL);
        data.par_chunks_mut(pairs * PANEL)
            .enumerate()
            .for_each(|(p, panel)| fill_panel(panel, p, out_dim, in_dim, &seg_of));
        Self {
            out_dim,
            in_dim,
            pairs,
            panels,
            data,
        }
    }

    /// Packs a row-major bf16 `[out, in]` weight that `read` delivers a block
    /// of rows at a time: `read(first_row, block)` fills `block` (whole rows,
    /// `block.len() / in_dim` of them, at most 32) with the bf16 bits of rows
    /// `first_row..`. Each panel's rows are read into a buffer its thread
    /// reuses and packed from there, in parallel: a weight read from a file
    /// is never held whole outside its panels (a whole-tensor read first
    /// would write, then free, a second buffer of the weight's size, most of
    /// whose cost is the first touch of its pages). The first error stops
    /// the packing and is returned.
    pub fn from_row_blocks<E: Send>(
        out_dim: usize,
        in_dim: usize,
        read: impl Fn(usize, &mut [u16]) -> Result<(), E> + Sync,
    ) -> Result<Self, E> {
        let pairs = in_dim.div_ceil(32) * 16;
        let panels = out_dim.div_ceil(PANEL);
        let mut data = Aligned::<u32>::zeroed(panels * pairs * PANEL);
        data.par_chunks_mut(pairs * PANEL)
            .enumerate()
            .try_for_each_init(Vec::new, |rows, (p, panel)| {
                let first = p * PANEL;
                let n = PANEL.min(out_dim - first);
                rows.resize(n * in_dim, 0u16);
                read(first, &mut rows[..n * in_dim])?;
                let rows = &rows[..n * in_dim];
                fill_panel(panel, p, out_dim, in_dim, &|row, k0, seg: &mut [u16]| {
                    let at = (row - first) * in_dim + k0;
                    seg.copy_from_slice(&rows[at..at + seg.len()]);
                });
                Ok(())
            })?;
        Ok(Self {
            out_dim,
            in_dim,
            pairs,
            panels,
            data,
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.out_dim, self.in_dim]
    }

    /// Pairs per panel (`ceil(in / 32) * 16`).
    pub(crate) fn pairs(&self) -> usize {
        self.pairs
    }

    /// The panels, `ceil(out / 32) * pairs * 32` lanes from a 64-byte boundary.
    pub(crate) fn data(&self) -> &[u32] {
        &self.data
    }

    /// The dense `[out, in]` bf16 weight, rebuilt from the panels.
    pub fn to_dense(&self) -> candle_core::Result<Tensor> {
        let mut w = vec![bf16::ZERO; self.out_dim * self.in_dim];
        for (n, row) in w.chunks_mut(self.in_dim.max(1)).enumerate() {
            let (p, lane) = (n / PANEL, n % PANEL);
            for (k, v) in row.iter_mut().enumerate() {
                let lanes = self.data[(p * self.pairs + k / 2) * PANEL + lane];
                *v = bf16::from_bits((lanes >> (16 * (k % 2))) as u16);
            }
        }
        Tensor::from_vec(w, (self.out_dim, self.in_dim), &Device::Cpu)
    }

    /// `x W^T + bias` for `x` of shape `[rows, in]` (any layout; made
    /// contiguous bf16) and an optional f32 `bias` of `out` values, as a
    /// `[rows, out]` bf16 tensor.
    pub fn matmul(&self, x: &Tensor, bias: Option<&[f32]>) -> candle_core::Result<Tensor> {
        self.matmul_with(x, bias, None, best_kernel())
    }

    /// `scale * x W^T` for bf16 `x` of shape `[rows, in]`, as an f32
    /// `[rows, out]` tensor: the sums are not rounded to bf16 (attention
    /// scores, which the softmax takes in f32).
    pub fn matmul_f32(&self, x: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
        self.matmul_with(x, None, Some(scale), best_kernel())
    }

    /// [`Self::matmul`] with the kernel chosen by the caller (AMX and
    /// AVX512-BF16 only where [`crate::caps`] allows them).
    fn matmul_with(
        &self,
        x: &Tensor,
        bias: Option<&[f32]>,
        scale: Option<f32>,
        kernel: Kernel,
    ) -> candle_core::Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        check_operands("packed", in_dim, bias, [self.out_dim, self.in_dim])?;
        let amx = kernel == Kernel::Amx;
        // Rows padded with zeros to the packed width, matching the weight's
        // zero padding. For AMX, also to whole 32-row blocks, and laid out
        // tile by tile (16 rows x 32 values, 1 KiB contiguous, in the order
        // the kernel reads them) so that the inputs stream sequentially.
        let width = 2 * self.pairs;
        // Borrowed, not copied: the inputs are copied once, below, only when
        // they need padding or tiling.
        let x = x.to_dtype(DType::BF16)?.contiguous()?;
        let view = CpuView::of(&x);
        let x = &*bf16_elems(&view, &x)?;
        let (tiled, padded);
        let a: &[bf16] = if amx {
            tiled = tile_inputs(x, rows, in_dim, width);
            &tiled
        } else if width == in_dim {
            x
        } else {
            let mut a = vec![bf16::ZERO; rows * width];
            for (dst, src) in a.chunks_mut(width).zip(x.chunks(in_dim.max(1))) {
                dst[..in_dim].copy_from_slice(src);
            }
            padded = a;
            &padded
        };
        let mut bias_pad = vec![0f32; self.panels * PANEL];
        if let Some(b) = bias {
            bias_pad[..b.len()].copy_from_slice(b);
        }
        match scale {
            None => {
                let mut out = vec![bf16::ZERO; rows * self.out_dim];
                self.run(
                    a,
                    rows,
                    &bias_pad,
                    Out::Bf16(out.as_mut_ptr().cast()),
                    kernel,
                );
                Tensor::from_vec(out, (rows, self.out_dim), &Device::Cpu)
            }
            Some(scale) => {
                let mut out = vec![0f32; rows * self.out_dim];
                self.run(
                    a,
                    rows,
                    &bias_pad,
                    Out::F32(out.as_mut_ptr(), scale),
                    kernel,
                );
                Tensor::from_vec(out, (rows, self.out_dim), &Device::Cpu)
            }
        }
    }

    /// Spreads (row block, panel block) tasks over the pool.
    fn run(&self, a: &[bf16], rows: usize, bias: &[f32], out: Out, kernel: Kernel) {
        let row_blocks = rows.div_ceil(BLOCK_ROWS);
        let panel_blocks = self.panels.div_ceil(BLOCK_PANELS);
        (0..row_blocks * panel_blocks)
            .into_par_iter()
            .for_each(|t| {
                let (rb, pb) = (t / panel_blocks, t % panel_blocks);
                let r0 = rb * BLOCK_ROWS;
                let r1 = (r0 + BLOCK_ROWS).min(rows);
                let p0 = pb * BLOCK_PANELS;
                let p1 = (p0 + BLOCK_PANELS).min(self.panels);
                if kernel == Kernel::Amx {
                    // SAFETY: AMX is usable (`use_amx`); `a` holds the tiled
                    // inputs in whole 32-row blocks; the rest as below.
                    unsafe {
                        amx::amx_block(
                            a.as_ptr().cast::<u32>(),
                            self.pairs,
                            (r0, r1),
                            (&self.data, 0),
                            (p0, p1),
                            bias.as_ptr(),
                            Dest::whole(out, self.out_dim),
                        );
                    }
                    return;
                }
                for p in p0..p1 {
                    let cols = PANEL.min(self.out_dim - p * PANEL);
                    let panel = &self.data[p * self.pairs * PANEL..(p + 1) * self.pairs * PANEL];
                    let mut r = r0;
                    while r < r1 {
                        let h = TILE_ROWS.min(r1 - r);
                        // SAFETY: the CPU has the kernel's features (`kernel` is
                        // AVX512-BF16 only where `caps` allows it); `a` holds
                        // `rows` rows of `pairs` pairs, the panel `pairs * 32`
                        // lanes, `bias` 32 values from `p * 32`; tasks write
                        // disjoint (row, column) ranges of `out`, which has
                        // `rows * out_dim` elements.
                        unsafe {
                            let out = out.add(r * self.out_dim + p * PANEL);
                            let tile = match kernel {
                                #[cfg(target_arch = "x86_64")]
                                Kernel::Avx512 => avx512::tile,
                                _ => portable::tile,
                            };
                            tile(
                                h,
                                a.as_ptr().cast::<u32>().add(r * self.pairs),
                                self.pairs,
                                panel.as_ptr(),
                                self.pairs,
                                bias.as_ptr().add(p * PANEL),
                                out,
                                self.out_dim,
                                cols,
                            );
                        }
                        r += h;
                    }
                }
            });
    }
}

/// The elements of the contiguous bf16 tensor `t`: borrowed from `view`
/// (its CPU storage), else copied (a tensor on another device).
pub(crate) fn bf16_elems<'a>(
    view: &'a Option<CpuView<'_>>,
    t: &Tensor,
) -> candle_core::Result<Cow<'a, [bf16]>> {
    match view.as_ref().and_then(|v| v.slice::<bf16>()) {
        Some(x) => Ok(Cow::Borrowed(x)),
        None => Ok(Cow::Owned(t.flatten_all()?.to_vec1::<bf16>()?)),
    }
}

/// Checks a matmul's input width and bias length against an `[out, in]`
/// weight (`what` names the kernel in the error).
pub(crate) fn check_operands(
    what: &str,
    in_dim: usize,
    bias: Option<&[f32]>,
    [out_dim, weight_in]: [usize; 2],
) -> candle_core::Result<()> {
    if in_dim != weight_in {
        candle_core::bail!(
            "{what} matmul: input has {in_dim} features, the weight takes {weight_in}"
        );
    }
    if bias.is_some_and(|b| b.len() != out_dim) {
        candle_core::bail!("{what} matmul: bias must have {out_dim} values");
    }
    Ok(())
}

/// The CPU tensor `x` (`[rows, in_dim]`, `in_dim` a multiple of 32) in bf16,
/// tiled for AMX ([`tile_inputs`]); `None` if it is not on the CPU.
fn tiled_cpu_input(
    x: &Tensor,
    rows: usize,
    in_dim: usize,
) -> candle_core::Result<Option<Aligned<bf16>>> {
    let x = x.to_dtype(DType::BF16)?.contiguous()?;
    let view = CpuView::of(&x);
    Ok(view
        .as_ref()
        .and_then(|v| v.slice::<bf16>())
        .map(|xs| tile_inputs(xs, rows, in_dim, in_dim)))
}

/// `rows` rows of `in_dim` bf16 laid out as AMX A tiles: zero-padded to
/// `width` columns and whole 32-row blocks, tile (row tile `t`, step `s`) of
/// 16 rows x 32 values at element `(t * width / 32 + s) * 512`.
pub(crate) fn tile_inputs(x: &[bf16], rows: usize, in_dim: usize, width: usize) -> Aligned<bf16> {
    let mut a = Aligned::<bf16>::zeroed(rows.div_ceil(32) * 32 * width);
    a.par_chunks_mut(16 * width)
        .enumerate()
        .for_each(|(rt, tiles)| {
            for i in 0..16 {
                let r = rt * 16 + i;
                if r >= rows {
                    break;
                }
                let src = &x[r * in_dim..(r + 1) * in_dim];
                for (step, chunk) in src.chunks(32).enumerate() {
                    let at = step * 512 + i * 32;
                    tiles[at..at + chunk.len()].copy_from_slice(chunk);
                }
            }
        });
    a
}

/// Where a kernel writes: bf16 rows (the bias added, rounded once), or f32
/// rows multiplied by a scale (no bias). Shared by tasks that write disjoint
/// parts of it.
#[derive(Clone, Copy)]
pub(crate) enum Out {
    Bf16(*mut u16),
    F32(*mut f32, f32),
}
// SAFETY: only used for disjoint writes inside one `run` call.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The same destination `n` elements further.
    ///
    /// # Safety
    /// The result stays inside the output.
    unsafe fn add(self, n: usize) -> Self {
        unsafe {
            match self {
                Self::Bf16(p) => Self::Bf16(p.add(n)),
                Self::F32(p, s) => Self::F32(p.add(n), s),
            }
        }
    }
}

/// The result of [`PackedBf16::gated_q4_0_streamed`]: rows, or AMX A tiles.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Gated {
    Rows(Vec<bf16>),
    Tiled(Aligned<bf16>),
}

/// The rows of a bf16 output shared by tasks that write disjoint columns.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct OutRows(*mut bf16);
// SAFETY: only used for disjoint writes inside one call.
unsafe impl Sync for OutRows {}

/// Where the AMX kernel writes: element `(r, c)` of the `[rows, cols]`
/// result at `out + (r - row0) * ld + (c - col0)` (the whole output, or a
/// task's own block of it).
#[derive(Clone, Copy)]
pub(crate) struct Dest {
    pub(crate) out: Out,
    pub(crate) ld: usize,
    /// Columns of the whole result (the last panel's are masked past it).
    pub(crate) cols: usize,
    pub(crate) row0: usize,
    pub(crate) col0: usize,
}

impl Dest {
    /// The whole `[rows, cols]` output, rows `cols` apart.
    pub(crate) fn whole(out: Out, cols: usize) -> Self {
        Self {
            out,
            ld: cols,
            cols,
            row0: 0,
            col0: 0,
        }
    }

    /// Where element `(r, c)` goes.
    ///
    /// # Safety
    /// `(r, c)` lies in the part of the result that `out` covers.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    unsafe fn at(self, r: usize, c: usize) -> Out {
        unsafe { self.out.add((r - self.row0) * self.ld + (c - self.col0)) }
    }
}

/// Writes panel `p` (rows `p * 32..`, all `in_dim` columns as bf16 pairs)
/// from `seg_of` (see [`PackedBf16::from_rows`]), a segment of 32 rows at a
/// time through a small buffer, so the panel is written sequentially.
fn fill_panel(
    panel: &mut [u32],
    p: usize,
    out_dim: usize,
    in_dim: usize,
    seg_of: &(impl Fn(usize, usize, &mut [u16]) + Sync),
) {
    // Written as bf16 values, read back as the u32 pairs the panel holds
    // (little-endian: the even column in the low half).
    let mut buf = vec![0u32; PANEL * SEGMENT / 2];
    let mut k0 = 0;
    while k0 < in_dim {
        let len = SEGMENT.min(in_dim - k0);
        {
            let halves: &mut [u16] = bytemuck::cast_slice_mut(&mut buf);
            for lane in 0..PANEL {
                let n = p * PANEL + lane;
                let row = &mut halves[lane * SEGMENT..(lane + 1) * SEGMENT];
                if n < out_dim {
                    seg_of(n, k0, &mut row[..len]);
                } else {
                    row[..len].fill(0);
                }
                // An odd last column pairs with a zero.
                row[len..].fill(0);
            }
        }
        let base = k0 / 2 * PANEL;
        for kk in 0..len.div_ceil(2) {
            let dst = &mut panel[base + kk * PANEL..base + (kk + 1) * PANEL];
            for (lane, d) in dst.iter_mut().enumerate() {
                *d = buf[lane * SEGMENT / 2 + kk];
            }
        }
        k0 += len;
    }
}

/// The AMX tile configuration and steps, shared with [`crate::gemm::int8`],
/// [`crate::attention::flash`] and [`crate::conv::bf16`].
#[cfg(target_arch = "x86_64")]
pub(crate) use amx::{bf16_steps, c_tiles, prefetch_next, tile_config, zero_c};
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{store_row, transpose16};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

/// Never called off x86-64: [`available`] and [`use_amx`] are false there.
#[cfg(not(target_arch = "x86_64"))]
mod amx {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn amx_block(
        _a: *const u32,
        _pairs: usize,
        _rows: (usize, usize),
        _data: (&[u32], usize),
        _panels: (usize, usize),
        _bias: *const f32,
        _dest: super::Dest,
    ) {
    }
}

/// Never called off x86-64: the SIMD Q4_0 decoding needs AVX512-BF16.
#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub unsafe fn decode_q4_0(_src: &[u8], _out: &mut [u16]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels this machine runs: the portable one always, AVX512-BF16
    /// and AMX where [`crate::caps`] allows them.
    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Portable];
        if crate::simd::has_avx512_bf16() {
            k.push(Kernel::Avx512);
        }
        if use_amx() {
            k.push(Kernel::Amx);
        }
        k
    }

    /// The rounding helper equals half's conversion on every special value and
    /// a sweep of bit patterns.
    #[test]
    fn round_bf16_is_halfs() {
        crate::report_paths("round_bf16_is_halfs");
        let mut vals = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        vals.extend((0..1u32 << 20).map(|i| f32::from_bits(i.wrapping_mul(4099) ^ (i << 12))));
        for v in vals {
            if v.is_nan() {
                assert!(bf16::from_bits(round_bf16(v)).is_nan());
            } else {
                assert_eq!(round_bf16(v), bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
    }

    /// Q4_0 and Q8_0 decoded into the panels equal candle's dequantisation
    /// rounded to bf16, bit for bit (partial panel included).
    #[test]
    fn quantized_packs_as_dequantised() -> candle_core::Result<()> {
        crate::report_paths("quantized_packs_as_dequantised");
        let w = Tensor::randn(0f32, 1., (70, 608), &Device::Cpu)?;
        for ty in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&w, ty)?;
            let direct = PackedBf16::from_quantized(&q)?;
            let via = PackedBf16::pack(&q.dequantize(&Device::Cpu)?)?;
            assert_eq!(*direct.data, *via.data, "{ty:?}");
        }
        Ok(())
    }

    /// The per-call path with its reused buffer: a smaller weight (partial
    /// last panel) packed into the dirty buffer of a larger one multiplies
    /// exactly as a freshly packed one.
    #[test]
    fn reused_buffer_packs_as_fresh() -> candle_core::Result<()> {
        crate::report_paths("reused_buffer_packs_as_fresh");
        eprintln!(
            "reused_buffer_packs_as_fresh: packed kernel {:?}",
            best_kernel()
        );
        let dev = Device::Cpu;
        let big = QTensor::quantize(&Tensor::randn(0f32, 1., (96, 256), &dev)?, GgmlDType::Q4_0)?;
        let small = QTensor::quantize(&Tensor::randn(0f32, 1., (40, 64), &dev)?, GgmlDType::Q4_0)?;
        let xb = Tensor::randn(0f32, 1., (20, 256), &dev)?.to_dtype(DType::BF16)?;
        let xs = Tensor::randn(0f32, 1., (20, 64), &dev)?.to_dtype(DType::BF16)?;
        let bits = |t: Tensor| -> candle_core::Result<Vec<u16>> {
            Ok(t.flatten_all()?
                .to_vec1::<bf16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        let fresh = bits(PackedBf16::from_quantized(&small)?.matmul(&xs, None)?)?;
        bits(PackedBf16::matmul_quantized(&big, &xb, None)?)?;
        let reused = bits(PackedBf16::matmul_quantized(&small, &xs, None)?)?;
        assert_eq!(fresh, reused);
        // Several tasks and row blocks (on AMX the panels are decoded per
        // task), a partial last panel, a bias: the same bits as packing first.
        let w = QTensor::quantize(
            &Tensor::randn(0f32, 1., (1000, 4096), &dev)?,
            GgmlDType::Q4_0,
        )?;
        let x = Tensor::randn(0f32, 1., (200, 4096), &dev)?.to_dtype(DType::BF16)?;
        let bias: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect();
        let packed = bits(PackedBf16::from_quantized(&w)?.matmul(&x, Some(&bias))?)?;
        let streamed = bits(PackedBf16::matmul_quantized(&w, &x, Some(&bias))?)?;
        assert_eq!(packed, streamed);
        Ok(())
    }

    /// Packing from blocks of rows (as read from a file) lays out exactly
    /// the panels packing the whole tensor does, for partial last panels and
    /// odd widths; a reader's error stops it and comes back.
    #[test]
    fn row_blocks_pack_as_the_whole_tensor() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (out_dim, in_dim) in [(96, 256), (70, 301), (1, 7), (33, 2304)] {
            let w = Tensor::randn(0f32, 1., (out_dim, in_dim), &dev)?.to_dtype(DType::BF16)?;
            let bits: Vec<u16> = w
                .flatten_all()?
                .to_vec1::<bf16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let whole = PackedBf16::pack(&w)?;
            let blocks =
                PackedBf16::from_row_blocks(out_dim, in_dim, |first, block: &mut [u16]| {
                    assert_eq!(block.len() % in_dim, 0);
                    assert!(block.len() / in_dim <= PANEL);
                    block.copy_from_slice(&bits[first * in_dim..first * in_dim + block.len()]);
                    Ok::<(), String>(())
                })
                .map_err(candle_core::Error::msg)?;
            assert_eq!(whole.dims(), blocks.dims());
            assert_eq!(whole.data(), blocks.data(), "{out_dim}x{in_dim}");
        }
        let failed = PackedBf16::from_row_blocks(64, 8, |first, _: &mut [u16]| {
            if first == 32 {
                Err("short read")
            } else {
                Ok(())
            }
        });
        assert_eq!(failed.err(), Some("short read"));
        Ok(())
    }

    /// The packed product against an f64 reference of the same bf16 inputs,
    /// for shapes with partial panels, partial tiles, odd widths, a bias and
    /// a depth split into chunks.
    #[test]
    fn matches_reference() -> candle_core::Result<()> {
        crate::report_paths("matches_reference");
        eprintln!("matches_reference: packed kernels {:?}", kernels());
        let dev = Device::Cpu;
        for &(rows, inp, out, with_bias) in &[
            (1usize, 2usize, 1usize, false),
            (5, 7, 33, true),
            (13, 64, 32, false),
            (97, 130, 70, true),
            (200, 257, 100, true),
            // Deep enough for the AMX kernel's depth chunks (three, uneven),
            // with a second task's rows.
            (130, 5000, 40, true),
        ] {
            let x = Tensor::randn(0f32, 1., (rows, inp), &dev)?.to_dtype(DType::BF16)?;
            let w = Tensor::randn(0f32, 1., (out, inp), &dev)?.to_dtype(DType::BF16)?;
            let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.25 - 3.0).collect();
            let packed = PackedBf16::pack(&w)?;
            assert_eq!(packed.to_dense()?.to_vec2::<bf16>()?, w.to_vec2::<bf16>()?);
            for kernel in kernels() {
                let y = packed.matmul_with(&x, with_bias.then_some(&bias[..]), None, kernel)?;
                let yf = packed
                    .matmul_with(&x, None, Some(0.5), kernel)?
                    .to_vec2::<f32>()?;
                assert_eq!(y.dims(), &[rows, out]);
                let y = y.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let xs = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let ws = w.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for r in 0..rows {
                    for n in 0..out {
                        let mut s: f64 = if with_bias { bias[n] as f64 } else { 0.0 };
                        for k in 0..inp {
                            s += xs[r][k] as f64 * ws[n][k] as f64;
                        }
                        // One bf16 rounding of the f32 sum: half an ulp of bf16
                        // (2^-8 relative) plus the f32 accumulation's error.
                        let tol = s.abs() * 2f64.powi(-8) + 1e-4 * (inp as f64).sqrt();
                        let d = (y[r][n] as f64 - s).abs();
                        assert!(
                            d <= tol,
                            "{kernel:?} ({rows},{inp},{out}) [{r},{n}]: {} vs {s}",
                            y[r][n]
                        );
                        // The f32 output: no bias, no rounding to bf16, scaled.
                        let b = if with_bias { bias[n] as f64 } else { 0.0 };
                        let f = 0.5 * (s - b);
                        let ftol = 1e-4 * (inp as f64).sqrt();
                        let got = yf[r][n] as f64;
                        assert!((got - f).abs() <= ftol, "f32 out [{r},{n}]: {got} vs {f}");
                    }
                }
            }
        }
        Ok(())
    }
}
