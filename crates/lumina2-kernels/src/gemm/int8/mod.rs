//! An int8 linear layer: `y = x W^T + b` with `W` quantised once per output
//! channel and `x` quantised per row at every call (symmetric, 255 levels,
//! the "W8A8" scheme), products summed exactly in int32 and scaled back to
//! f32.
//!
//! - Weight row `n` is stored as `q_w = round(w / s_w)`, `s_w = max|w| / 127`;
//!   input row `r` as `q_x = round(x / s_x)` likewise; then
//!   `y[r, n] = (sum_k q_x q_w) * s_w[n] * s_x[r] + b[n]`.
//! - Kernels, chosen at run time: AMX-INT8 tiles (`tdpbssd`) where the CPU
//!   and the OS allow them (as [`crate::gemm::packed`]: `LUMINA2_NO_AMX=1` turns
//!   them off), else AVX512-VNNI (`vpdpbusd`), else plain Rust. The int32
//!   sums are exact, so all three give the same bits.
//! - The weight is packed like [`crate::gemm::packed::PackedBf16`]'s, four input
//!   elements a 32-bit lane instead of two: panels of 32 output columns, the
//!   operand layout of `vpdpbusd` and, row by row, of an AMX B tile. It takes
//!   a quarter of the f32 weight's memory (plus one f32 scale per row).
//!
//! This trades accuracy for speed: the error against f32 is that of 8-bit
//! inputs (about 0.4% of each row's largest value per element, before the
//! sums average it down); `cargo xtask parity --int8` reports it on the
//! transformer's parity cases.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{Aligned, CpuView};

/// Output columns per packed panel.
pub const PANEL: usize = 32;
/// Rows per parallel task (a multiple of the AMX block, 32 rows).
const BLOCK_ROWS: usize = 96;
/// Panels per parallel task.
const BLOCK_PANELS: usize = 8;
/// Rows of a VNNI register tile (2 x 8 accumulators).
const VNNI_ROWS: usize = 8;

/// Which kernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Amx,
    Vnni,
    Scalar,
}

/// The fastest kernel this CPU runs.
fn best_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::caps().amx_int8 {
            return Kernel::Amx;
        }
        if has_vnni() {
            return Kernel::Vnni;
        }
    }
    Kernel::Scalar
}

fn has_vnni() -> bool {
    crate::caps().avx512_vnni
}

/// The name of the kernel [`PackedI8::matmul`] uses on this CPU: `"amx"`,
/// `"avx512-vnni"` or `"scalar"` (for reports).
pub fn kernel_name() -> &'static str {
    match best_kernel() {
        Kernel::Amx => "amx",
        Kernel::Vnni => "avx512-vnni",
        Kernel::Scalar => "scalar",
    }
}

/// `max|v| / 127` of a row and the row quantised with it into `out` (round
/// half to even, as `torch.round`); a zero row has scale 0, a row holding NaN
/// or infinity scale NaN (so that its outputs are NaN).
fn quantize_row(values: impl Iterator<Item = f32> + Clone, out: &mut [i8]) -> f32 {
    let amax = values.clone().fold(0f32, |m, v| m.max(v.abs()));
    let any_nan = values.clone().any(f32::is_nan);
    if any_nan || amax.is_infinite() {
        out.fill(0);
        return f32::NAN;
    }
    if amax == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let scale = amax / 127.0;
    for (o, v) in out.iter_mut().zip(values) {
        *o = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// One input row.
#[derive(Clone, Copy)]
enum Row<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// [`quantize_row`] of an input row, with AVX-512 where the CPU has it
/// (same results: the maximum, the division and the rounding are exact
/// operations either way).
fn quantize_input(row: Row, out: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F/BW were detected; `out` is as long as the row.
        return unsafe { avx512::quantize_row(row, out) };
    }
    match row {
        Row::F32(x) => quantize_row(x.iter().copied(), out),
        Row::Bf16(x) => quantize_row(x.iter().map(|v| v.to_f32()), out),
    }
}

fn has_avx512() -> bool {
    crate::caps().avx512bw
}

/// An `[out, in]` weight quantised to int8 per output row, in the panel
/// layout of the kernels.
///
/// Element `(n, k)` lives in panel `n / 32`, quad `k / 4`, lane `n % 32`,
/// byte `k % 4`; the input width is padded with zeros to a multiple of 64
/// (one AMX tile's depth), the last panel with zero columns.
#[derive(Debug)]
pub struct PackedI8 {
    out_dim: usize,
    in_dim: usize,
    /// `ceil(in_dim / 64) * 16`.
    quads: usize,
    /// `ceil(out_dim / 32)`.
    panels: usize,
    /// `panels * quads * 32` lanes of four int8.
    data: Aligned<u32>,
    /// Per output column (`panels * 32`, padding 0): `s_w`.
    scales: Vec<f32>,
    /// Per output column: `sum_k q_w`, for the VNNI kernel's unsigned inputs.
    col_sums: Vec<i32>,
}

impl PackedI8 {
    /// Quantises a dense `[out, in]` weight (any dtype, any device; read
    /// through f32). Fails when a row holds NaN or infinity.
    pub fn quantize(weight: &Tensor) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let w = weight.to_device(&Device::Cpu)?;
        let w = match w.dtype() {
            DType::BF16 | DType::F32 => w.contiguous()?,
            _ => w.to_dtype(DType::F32)?.contiguous()?,
        };
        let view = CpuView::of(&w);
        let (wb, wf) = match &view {
            Some(v) => (v.slice::<bf16>(), v.slice::<f32>()),
            None => (None, None),
        };
        if wb.is_none() && wf.is_none() {
            candle_core::bail!("int8 quantisation: the weight is not readable from the CPU");
        }
        let quads = in_dim.div_ceil(64) * 16;
        let panels = out_dim.div_ceil(PANEL);
        // Rows quantised in parallel into `quads` lanes each (zero-padded),
        // then transposed lane by lane into the panels.
        let mut rows = vec![0u32; out_dim * quads];
        let mut scales = vec![0f32; panels * PANEL];
        let mut col_sums = vec![0i32; panels * PANEL];
        if quads > 0 {
            rows.par_chunks_mut(quads)
                .zip(scales.par_iter_mut().zip(col_sums.par_iter_mut()))
                .enumerate()
                .for_each(|(n, (q, (s, sum)))| {
                    let q: &mut [i8] = bytemuck::cast_slice_mut(q);
                    let row = match (wb, wf) {
                        (Some(w), _) => Row::Bf16(&w[n * in_dim..(n + 1) * in_dim]),
                        (_, Some(w)) => Row::F32(&w[n * in_dim..(n + 1) * in_dim]),
                        _ => Row::F32(&[]),
                    };
                    *s = quantize_input(row, &mut q[..in_dim]);
                    *sum = q.iter().map(|&v| i32::from(v)).sum();
                });
        }
        if let Some(n) = scales.iter().position(|s| s.is_nan()) {
            candle_core::bail!("int8 quantisation: row {n} of the weight holds NaN or infinity");
        }
        let mut data = Aligned::<u32>::zeroed(panels * quads * PANEL);
        if quads > 0 {
            data.par_chunks_mut(quads * PANEL)
                .enumerate()
                .for_each(|(p, panel)| {
                    for lane in 0..PANEL.min(out_dim - p * PANEL) {
                        let n = p * PANEL + lane;
                        for (kk, &quad) in rows[n * quads..(n + 1) * quads].iter().enumerate() {
                            panel[kk * PANEL + lane] = quad;
                        }
                    }
                });
        }
        Ok(Self {
            out_dim,
            in_dim,
            quads,
            panels,
            data,
            scales,
            col_sums,
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.out_dim, self.in_dim]
    }

    /// The dequantised `[out, in]` weight (`q_w * s_w`), f32.
    pub fn to_dense(&self) -> candle_core::Result<Tensor> {
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        for (n, row) in w.chunks_mut(self.in_dim.max(1)).enumerate() {
            let (p, lane) = (n / PANEL, n % PANEL);
            for (k, v) in row.iter_mut().enumerate() {
                let quad = self.data[(p * self.quads + k / 4) * PANEL + lane];
                let q = (quad >> (8 * (k % 4))) as u8 as i8;
                *v = f32::from(q) * self.scales[n];
            }
        }
        Tensor::from_vec(w, (self.out_dim, self.in_dim), &Device::Cpu)
    }

    /// `x W^T + bias` for `x` of shape `[rows, in]` (f32 or bf16, any
    /// layout) and an optional f32 `bias` of `out` values, as a `[rows, out]`
    /// CPU tensor of `x`'s dtype (bf16 outputs are the f32 results rounded
    /// once, to nearest even).
    pub fn matmul(&self, x: &Tensor, bias: Option<&[f32]>) -> candle_core::Result<Tensor> {
        self.matmul_with(x, bias, best_kernel())
    }

    fn matmul_with(
        &self,
        x: &Tensor,
        bias: Option<&[f32]>,
        kernel: Kernel,
    ) -> candle_core::Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        crate::gemm::packed::check_operands("int8", in_dim, bias, self.dims())?;
        let x = x.to_device(&Device::Cpu)?;
        let bf16_in = x.dtype() == DType::BF16;
        let x = if bf16_in {
            x.contiguous()?
        } else {
            x.to_dtype(DType::F32)?.contiguous()?
        };
        let view = CpuView::of(&x);
        let (xb, xf) = match &view {
            Some(v) => (v.slice::<bf16>(), v.slice::<f32>()),
            None => (None, None),
        };
        let row = |r: usize| match (xb, xf) {
            (Some(x), _) => Row::Bf16(&x[r * in_dim..(r + 1) * in_dim]),
            (_, Some(x)) => Row::F32(&x[r * in_dim..(r + 1) * in_dim]),
            _ => Row::F32(&[]),
        };
        if xb.is_none() && xf.is_none() {
            candle_core::bail!("int8 matmul: the input is not readable from the CPU");
        }
        // Quantised rows, zero-padded to `width`; for AMX laid out tile by
        // tile (16 rows x 64 values, 1 KiB contiguous, in the order the
        // kernel reads them) in whole 32-row blocks.
        let width = 4 * self.quads;
        let steps = width / 64;
        let amx = kernel == Kernel::Amx;
        let padded_rows = if amx { rows.div_ceil(32) * 32 } else { rows };
        let mut a = Aligned::<i8>::zeroed(padded_rows * width);
        let mut sx = vec![0f32; rows];
        if width > 0 {
            a.par_chunks_mut(16 * width)
                .zip(sx.par_chunks_mut(16))
                .enumerate()
                .for_each(|(g, (tiles, sxs))| {
                    let mut q = vec![0i8; in_dim];
                    for (i, s) in sxs.iter_mut().enumerate() {
                        let r = g * 16 + i;
                        if !amx {
                            *s = quantize_input(row(r), &mut tiles[i * width..i * width + in_dim]);
                            continue;
                        }
                        *s = quantize_input(row(r), &mut q);
                        for (st, chunk) in q.chunks(64).enumerate().take(steps) {
                            let at = st * 1024 + i * 64;
                            tiles[at..at + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                });
        }
        let mut bias_pad = vec![0f32; self.panels * PANEL];
        if let Some(b) = bias {
            bias_pad[..b.len()].copy_from_slice(b);
        }
        let epi = Epilogue {
            sx: &sx,
            sw: &self.scales,
            bias: &bias_pad,
            col_sums: &self.col_sums,
            ldo: self.out_dim,
        };
        if bf16_in {
            let mut out = vec![bf16::ZERO; rows * self.out_dim];
            self.run(&a, rows, &epi, Out::Bf16(out.as_mut_ptr().cast()), kernel);
            Tensor::from_vec(out, (rows, self.out_dim), &Device::Cpu)
        } else {
            let mut out = vec![0f32; rows * self.out_dim];
            self.run(&a, rows, &epi, Out::F32(out.as_mut_ptr()), kernel);
            Tensor::from_vec(out, (rows, self.out_dim), &Device::Cpu)
        }
    }

    /// Spreads (row block, panel block) tasks over the pool.
    fn run(&self, a: &[i8], rows: usize, epi: &Epilogue, out: Out, kernel: Kernel) {
        let row_blocks = rows.div_ceil(BLOCK_ROWS);
        let panel_blocks = self.panels.div_ceil(BLOCK_PANELS);
        (0..row_blocks * panel_blocks)
            .into_par_iter()
            .for_each(|t| {
                let (rb, pb) = (t / panel_blocks, t % panel_blocks);
                let rows_ = (rb * BLOCK_ROWS, ((rb + 1) * BLOCK_ROWS).min(rows));
                let panels = (
                    pb * BLOCK_PANELS,
                    ((pb + 1) * BLOCK_PANELS).min(self.panels),
                );
                match kernel {
                    // SAFETY: AMX-INT8 is usable (`best_kernel`, or the
                    // tests' check); `a` is tiled in whole 32-row blocks,
                    // `data` holds `panels * quads * 32` lanes; tasks write
                    // disjoint (row, column) ranges of `out`.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Amx => unsafe {
                        amx::amx_block(a, self.quads, rows_, &self.data, panels, epi, out)
                    },
                    // SAFETY: AVX512-VNNI was detected; as above, rows
                    // `quads * 4` bytes apart.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => unsafe {
                        avx512::vnni_block(a, self.quads, rows_, &self.data, panels, epi, out)
                    },
                    _ => scalar_block(a, self.quads, rows_, &self.data, panels, epi, out),
                }
            });
    }
}

/// Where the kernels write: f32 rows, or bf16 rows (each value rounded once).
/// Shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
enum Out {
    F32(*mut f32),
    Bf16(*mut u16),
}
// SAFETY: only used for disjoint writes inside one `matmul_with` call.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// What turns an int32 sum into an output: `(sum as f32 * s_w) * s_x + b`,
/// the last step one fused multiply-add (the same in every kernel).
struct Epilogue<'a> {
    sx: &'a [f32],
    sw: &'a [f32],
    bias: &'a [f32],
    col_sums: &'a [i32],
    ldo: usize,
}

impl Epilogue<'_> {
    #[inline]
    fn value(&self, sum: i32, r: usize, n: usize) -> f32 {
        (sum as f32 * self.sw[n]).mul_add(self.sx[r], self.bias[n])
    }
}

/// The portable kernel: row-major `a` (`quads * 4` int8 a row).
fn scalar_block(
    a: &[i8],
    quads: usize,
    (r0, r1): (usize, usize),
    data: &[u32],
    (p0, p1): (usize, usize),
    epi: &Epilogue,
    out: Out,
) {
    let width = quads * 4;
    for r in r0..r1 {
        let row = &a[r * width..(r + 1) * width];
        for p in p0..p1 {
            let panel = &data[p * quads * PANEL..(p + 1) * quads * PANEL];
            let mut sums = [0i32; PANEL];
            for (kk, x) in row.chunks_exact(4).enumerate() {
                let lanes = &panel[kk * PANEL..(kk + 1) * PANEL];
                for (s, &l) in sums.iter_mut().zip(lanes) {
                    let w = l.to_le_bytes();
                    for j in 0..4 {
                        *s += i32::from(x[j]) * i32::from(w[j] as i8);
                    }
                }
            }
            let cols = PANEL.min(epi.ldo - p * PANEL);
            for (c, &s) in sums.iter().enumerate().take(cols) {
                let n = p * PANEL + c;
                let y = epi.value(s, r, n);
                // SAFETY: inside the `rows x ldo` output; this task owns
                // rows `r0..r1` of panels `p0..p1`.
                unsafe {
                    match out {
                        Out::F32(o) => *o.add(r * epi.ldo + n) = y,
                        Out::Bf16(o) => {
                            *o.add(r * epi.ldo + n) = crate::gemm::packed::round_bf16(y)
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;

    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Scalar];
        if has_vnni() {
            k.push(Kernel::Vnni);
        }
        if best_kernel() == Kernel::Amx {
            k.push(Kernel::Amx);
        }
        k
    }

    /// Every kernel against an exact integer reference of the same quantised
    /// values (so the three agree bit for bit), over partial panels, partial
    /// row blocks, widths that are not multiples of 64, bias, bf16 inputs.
    #[test]
    fn kernels_match_the_integer_reference() -> candle_core::Result<()> {
        crate::report_paths("kernels_match_the_integer_reference");
        eprintln!(
            "kernels_match_the_integer_reference: int8 kernels {:?}",
            kernels()
        );
        let dev = Device::Cpu;
        for &(rows, inp, out, with_bias, bf) in &[
            (1usize, 3usize, 1usize, false, false),
            (5, 70, 33, true, false),
            (13, 64, 32, false, true),
            (97, 130, 70, true, true),
            (40, 257, 100, true, false),
        ] {
            let x = Tensor::randn(0f32, 1., (rows, inp), &dev)?;
            let x = if bf { x.to_dtype(DType::BF16)? } else { x };
            let w = Tensor::randn(0f32, 1., (out, inp), &dev)?;
            let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.25 - 3.0).collect();
            let p = PackedI8::quantize(&w)?;
            // The reference: quantise both sides the documented way.
            let xs = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let ws = w.to_vec2::<f32>()?;
            let quant = |v: &[f32]| {
                let mut q = vec![0i8; v.len()];
                let s = quantize_row(v.iter().copied(), &mut q);
                (q, s)
            };
            let qx: Vec<_> = xs.iter().map(|r| quant(r)).collect();
            let qw: Vec<_> = ws.iter().map(|r| quant(r)).collect();
            for kernel in kernels() {
                let y = p.matmul_with(&x, with_bias.then_some(&bias[..]), kernel)?;
                assert_eq!(y.dtype(), x.dtype());
                let y = y.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for r in 0..rows {
                    for n in 0..out {
                        let sum: i32 = (0..inp)
                            .map(|k| i32::from(qx[r].0[k]) * i32::from(qw[n].0[k]))
                            .sum();
                        let b = if with_bias { bias[n] } else { 0.0 };
                        let mut want = (sum as f32 * qw[n].1).mul_add(qx[r].1, b);
                        if bf {
                            want = bf16::from_bits(crate::gemm::packed::round_bf16(want)).to_f32();
                        }
                        assert_eq!(
                            y[r][n].to_bits(),
                            want.to_bits(),
                            "{kernel:?} ({rows},{inp},{out}) [{r},{n}]: {} vs {want}",
                            y[r][n]
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Against the f32 product: within what 8-bit inputs allow (each
    /// element off by at most half a step of its row's scale).
    #[test]
    fn close_to_f32() -> candle_core::Result<()> {
        crate::report_paths("close_to_f32");
        let dev = Device::Cpu;
        let (rows, inp, out) = (64, 512, 96);
        let x = Tensor::randn(0f32, 1., (rows, inp), &dev)?;
        let w = Tensor::randn(0f32, 1., (out, inp), &dev)?;
        let p = PackedI8::quantize(&w)?;
        let y = p.matmul(&x, None)?;
        let want = x.matmul(&w.t()?)?;
        let rel = ((y - &want)?.sqr()?.mean_all()?.to_scalar::<f32>()?
            / want.sqr()?.mean_all()?.to_scalar::<f32>()?)
        .sqrt();
        // Uniform rounding error of a step s is s / sqrt(12); with Gaussian
        // rows the step is about 3.3 sigma / 127, so each side adds about
        // 0.75% and the two together about 1.1% (relative RMS).
        assert!(rel < 0.015, "relative RMS error {rel}");
        // The dequantised weight is within half a step of the original.
        let back = p.to_dense()?.to_vec2::<f32>()?;
        for (bn, wn) in back.iter().zip(w.to_vec2::<f32>()?) {
            let step = wn.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (b, w) in bn.iter().zip(&wn) {
                assert!((b - w).abs() <= step * 0.5 + 1e-6);
            }
        }
        Ok(())
    }

    /// Zero rows give the bias; NaN inputs give NaN rows, not garbage;
    /// non-finite weights are refused; a wrong width is an error.
    #[test]
    fn edge_cases() -> candle_core::Result<()> {
        crate::report_paths("edge_cases");
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (3, 8), &dev)?;
        let p = PackedI8::quantize(&w)?;
        let bias = [1.0f32, 2.0, 3.0];
        let mut xs = vec![0f32; 16];
        xs[8] = f32::NAN;
        let x = Tensor::from_vec(xs, (2, 8), &dev)?;
        for kernel in kernels() {
            let y = p.matmul_with(&x, Some(&bias), kernel)?.to_vec2::<f32>()?;
            assert_eq!(y[0], bias.to_vec(), "{kernel:?}");
            assert!(y[1].iter().all(|v| v.is_nan()), "{kernel:?}");
        }
        let bad = Tensor::from_vec(vec![1f32, f32::INFINITY], (1, 2), &dev)?;
        assert!(PackedI8::quantize(&bad).is_err());
        assert!(p
            .matmul(&Tensor::zeros((1, 7), DType::F32, &dev)?, None)
            .is_err());
        Ok(())
    }
}
