//! The CPU fast path of the VAE's convolutions: an implicit-GEMM f32 kernel.
//!
//! Why: candle 0.11's CPU `conv2d` copies the input to NHWC on one thread,
//! reflattens the kernel on every call, builds im2col tiles of 512 pixels with
//! scattered writes and scatters the output back; the decode spent 88% of its
//! time there at about a third of PyTorch's (oneDNN's) speed.
//!
//! How: `out[co, p] = bias[co] + sum_k W[co, k] * col[k, p]` with
//! `k = (ci, ky, kx)` (PyTorch's weight order) and `p` the output pixels in
//! NCHW order. The weights are packed once at load into panels of [`MR`]
//! output channels; the im2col matrix is never built: each thread packs, for its
//! own [`NC`] pixels and [`KC`] rows of `k` at a time, panels of [`NR`] pixels
//! straight from the input (zero padding, stride and a fused nearest 2x
//! upsampling resolved while packing), and an AVX2/FMA micro-kernel multiplies
//! an `MR x KC` weight panel by a `KC x NR` pixel panel into registers (with
//! AVX-512, two adjacent pixel panels at once: `MR x 2NR` in 12 zmm), then
//! writes (or accumulates into) the NCHW output rows directly. Threads split the
//! pixels, so they never write the same element and share only the packed
//! weights.
//!
//! Used on x86-64 CPUs with AVX2 and FMA; elsewhere (and for other devices or
//! dtypes) the layers call candle's `conv2d`.

use rayon::prelude::*;

/// Output channels per weight panel (rows of the micro-kernel).
pub const MR: usize = 6;
/// Pixels per packed pixel panel (columns of the micro-kernel: two AVX registers).
pub const NR: usize = 16;
/// Rows of `k` per block: the `MR x KC` weight panel (12 KiB) stays in L1
/// while the task's pixel panels (`NR x KC`, 32 KiB each) stream from L2.
/// Measured on the decoder's layers (single core, CPU time): 512 beat 256 by
/// ~9%, 384 and 1024 by ~3%.
const KC: usize = 512;
/// Pixels per task: the task's packed block (`KC x NC`, 512 KiB) fills L2;
/// 128 and 512 measured slower.
const NC: usize = 256;
/// Input values one (channel, kernel row) of a row panel reads, rounded up:
/// kernels up to 9 wide (the VAE has 1 and 3).
const LINE: usize = 24;

/// Whether this CPU can run the fast path.
pub fn available() -> bool {
    crate::caps().avx2_fma
}

/// Whether the AVX-512 kernel (two pixel panels per call) can run here.
/// `LUMINA2_NO_AVX512_CONV=1` keeps the AVX2 kernel (for comparisons).
fn wide_available() -> bool {
    crate::caps().avx512_conv
}

/// Which micro-kernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Two pixel panels at once in zmm registers (`avx512.rs`).
    Avx512,
    /// One panel in ymm registers (`avx2.rs`).
    Avx2,
    /// Plain Rust (`portable.rs`).
    Portable,
}

impl Path {
    /// The fastest path [`crate::caps`] allows; `None` without AVX2/FMA
    /// (production then calls candle's `conv2d`).
    pub(crate) fn best() -> Option<Self> {
        match (available(), wide_available()) {
            (false, _) => None,
            (true, true) => Some(Self::Avx512),
            (true, false) => Some(Self::Avx2),
        }
    }
}

/// How the input is read (stride, padding, upsampling): the same description
/// as the AMX bf16 kernel's.
pub use crate::conv::bf16::Geometry;

/// A convolution's weights packed for the micro-kernel.
#[derive(Debug, Clone)]
pub struct PackedConv {
    c_out: usize,
    c_in: usize,
    kernel: usize,
    /// `[c_out / MR (rounded up)][K][MR]`, rows past `c_out` zero.
    panels: Vec<f32>,
    /// `c_out` rounded up to `MR`, zero past `c_out`.
    bias: Vec<f32>,
}

impl PackedConv {
    /// Packs `weight` ([c_out, c_in, k, k] in PyTorch's order, flattened) and `bias`.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        c_out: usize,
        c_in: usize,
        kernel: usize,
    ) -> Option<Self> {
        let k_len = c_in * kernel * kernel;
        if weight.len() != c_out * k_len || bias.len() != c_out || k_len == 0 {
            return None;
        }
        let m_panels = c_out.div_ceil(MR);
        let mut panels = vec![0f32; m_panels * k_len * MR];
        for (co, row) in weight.chunks_exact(k_len).enumerate() {
            let (mp, r) = (co / MR, co % MR);
            let panel = &mut panels[mp * k_len * MR..(mp + 1) * k_len * MR];
            for (k, &w) in row.iter().enumerate() {
                panel[k * MR + r] = w;
            }
        }
        let mut b = vec![0f32; m_panels * MR];
        b[..c_out].copy_from_slice(bias);
        Some(Self {
            c_out,
            c_in,
            kernel,
            panels,
            bias: b,
        })
    }

    /// A 1x1 convolution without bias whose weight matrix is the transpose
    /// of `at` ([c_in, c_out] row-major): packs `at` without transposing it.
    pub fn from_transposed(at: &[f32], c_out: usize, c_in: usize) -> Option<Self> {
        if at.len() != c_out * c_in || at.is_empty() {
            return None;
        }
        let m_panels = c_out.div_ceil(MR);
        let mut panels = vec![0f32; m_panels * c_in * MR];
        for (k, row) in at.chunks_exact(c_out).enumerate() {
            for (co, &w) in row.iter().enumerate() {
                panels[((co / MR) * c_in + k) * MR + co % MR] = w;
            }
        }
        Some(Self {
            c_out,
            c_in,
            kernel: 1,
            panels,
            bias: vec![0f32; m_panels * MR],
        })
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// Convolves `x` ([b, c_in, h, w] contiguous f32) into [b, c_out, ho, wo],
    /// plus `residual` (same shape as the output) when given: the resnets'
    /// skip connection, added while the output tile is still in registers.
    /// Returns `None` when the sizes do not fit together.
    pub fn forward(
        &self,
        x: &[f32],
        b: usize,
        hw: (usize, usize),
        g: Geometry,
        residual: Option<&[f32]>,
    ) -> Option<(Vec<f32>, usize, usize)> {
        self.forward_with(x, b, hw, g, residual, Path::best()?)
    }

    /// [`Self::forward`] on the plain-Rust micro-tile, on every CPU (the
    /// reference path the tests compare everywhere; production uses
    /// [`crate::ops::conv2d_f32`] to choose).
    pub fn forward_portable(
        &self,
        x: &[f32],
        b: usize,
        hw: (usize, usize),
        g: Geometry,
        residual: Option<&[f32]>,
    ) -> Option<(Vec<f32>, usize, usize)> {
        self.forward_with(x, b, hw, g, residual, Path::Portable)
    }

    /// [`Self::forward`] on `path` (x86 paths only where [`Path::best`]
    /// allows them).
    pub(crate) fn forward_with(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        g: Geometry,
        residual: Option<&[f32]>,
        path: Path,
    ) -> Option<(Vec<f32>, usize, usize)> {
        if g.upsample == 0 || x.len() != b * self.c_in * h * w {
            return None;
        }
        let (ho, wo) = g.out_size((h, w), self.kernel)?;
        let n = ho * wo;
        if residual.is_some_and(|r| r.len() != b * self.c_out * n) {
            return None;
        }
        let mut out = vec![0f32; b * self.c_out * n];
        let src = Source {
            h,
            w,
            kernel: self.kernel,
            g,
            wo,
        };
        for (i, (xb, ob)) in x
            .chunks_exact(self.c_in * h * w)
            .zip(out.chunks_exact_mut(self.c_out * n))
            .enumerate()
        {
            let dst = OutPtr(ob.as_mut_ptr());
            let dst = &dst;
            let res = residual.map(|r| &r[i * self.c_out * n..(i + 1) * self.c_out * n]);
            (0..n.div_ceil(NC)).into_par_iter().for_each_init(
                // 64-byte aligned so that no pixel-vector load splits a cache line.
                || vec![0f32; KC * NC + 16],
                |buf, t| {
                    let p0 = t * NC;
                    let p1 = (p0 + NC).min(n);
                    let off = buf.as_ptr().align_offset(64).min(16);
                    // SAFETY: `ob` has c_out * n elements; this task writes only
                    // columns p0..p1 of each row, which no other task touches.
                    unsafe {
                        self.task(
                            xb,
                            &src,
                            &mut buf[off..off + KC * NC],
                            dst.0,
                            res,
                            n,
                            (p0, p1),
                            path,
                        )
                    };
                },
            );
        }
        Some((out, ho, wo))
    }

    /// One task: all output channels of pixels `p0..p1`.
    ///
    /// # Safety
    /// `out` must point to `c_out * n` f32, with no other writer of columns
    /// `p0..p1`; the CPU must have the features of `path`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn task(
        &self,
        x: &[f32],
        src: &Source,
        buf: &mut [f32],
        out: *mut f32,
        res: Option<&[f32]>,
        n: usize,
        (p0, p1): (usize, usize),
        path: Path,
    ) {
        let k_len = self.c_in * self.kernel * self.kernel;
        let m_panels = self.c_out.div_ceil(MR);
        let wide = path == Path::Avx512;
        let n_panels = (p1 - p0).div_ceil(NR);
        let mut kb = 0;
        while kb < k_len {
            let kc = KC.min(k_len - kb);
            src.pack(x, &mut buf[..n_panels * kc * NR], kb, kc, p0, p1);
            for mp in 0..m_panels {
                let a = &self.panels[(mp * k_len + kb) * MR..(mp * k_len + kb + kc) * MR];
                let rows = MR.min(self.c_out - mp * MR);
                let bias = (kb == 0).then(|| &self.bias[mp * MR..(mp + 1) * MR]);
                let last = kb + kc == k_len;
                let mut pi = 0;
                while pi < n_panels {
                    let q0 = p0 + pi * NR;
                    let c = out.add(mp * MR * n + q0);
                    let r = res.filter(|_| last).map(|r| &r[mp * MR * n + q0..]);
                    // Two full panels side by side: the AVX-512 kernel.
                    #[cfg(target_arch = "x86_64")]
                    if wide && rows == MR && q0 + 2 * NR <= p1 {
                        let bp = &buf[pi * kc * NR..(pi + 2) * kc * NR];
                        avx512::kernel_wide(
                            kc,
                            a.as_ptr(),
                            bp.as_ptr(),
                            bp.as_ptr().add(kc * NR),
                            c,
                            n,
                            bias.map(|b| b.as_ptr()),
                            r.map(|r| r.as_ptr()),
                        );
                        pi += 2;
                        continue;
                    }
                    let cols = NR.min(p1 - q0);
                    let bp = &buf[pi * kc * NR..(pi + 1) * kc * NR];
                    if path == Path::Portable {
                        portable::micro_tile(kc, a, bp, c, n, rows, cols, bias, r);
                    } else {
                        micro_tile(kc, a, bp, c, n, rows, cols, bias, r);
                    }
                    pi += 1;
                }
            }
            kb += kc;
        }
    }
}

/// The output pointer, shared by tasks that write disjoint columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `PackedConv::forward`).
unsafe impl Sync for OutPtr {}

/// Where the pixel panels read from: one batch item of the input.
struct Source {
    h: usize,
    w: usize,
    kernel: usize,
    g: Geometry,
    wo: usize,
}

impl Source {
    /// Packs rows `kb..kb + kc` of the implicit im2col matrix for output pixels
    /// `p0..p1` into `dst`: panels of `NR` pixels, each `kc x NR` (pixel-minor,
    /// columns past `p1` zero).
    ///
    /// Why this loop order: the rows of one (channel, kernel row) are packed for
    /// all panels before the next, so the input is read along its rows (what
    /// the prefetcher follows) rather than jumping between channel planes.
    fn pack(&self, x: &[f32], dst: &mut [f32], kb: usize, kc: usize, p0: usize, p1: usize) {
        let k = self.kernel;
        let kk = k * k;
        let mut r = 0;
        while r < kc {
            let kr = kb + r;
            let (ci, ky, kx) = (kr / kk, (kr % kk) / k, kr % k);
            // Rows r..r + len share (ci, ky): kx runs from kx to kx + len.
            let len = (k - kx).min(kc - r);
            let group = Group { ci, ky, kx, r, len };
            for (pi, panel) in dst.chunks_exact_mut(kc * NR).enumerate() {
                let q0 = p0 + pi * NR;
                let cols = NR.min(p1 - q0);
                self.pack_group(x, panel, group, q0, cols);
            }
            r += len;
        }
    }

    /// Packs the rows of `g` for pixels `q0..q0 + cols` into `panel` (`kc x NR`).
    fn pack_group(&self, x: &[f32], panel: &mut [f32], g: Group, q0: usize, cols: usize) {
        let (y, x0) = (q0 / self.wo, q0 % self.wo);
        let (s, up) = (self.g.stride, self.g.upsample);
        let (pad_y, pad_x) = (self.g.pad.0 as isize, self.g.pad.1 as isize);
        let (hv, wv) = ((self.h * up) as isize, (self.w * up) as isize);
        let plane = &x[g.ci * self.h * self.w..(g.ci + 1) * self.h * self.w];
        let rows = panel[g.r * NR..(g.r + g.len) * NR].chunks_exact_mut(NR);
        if s == 1 && x0 + cols <= self.wo && self.kernel + NR - 1 <= LINE && up <= 2 {
            // Stride 1, one output row. Full panels inside the row without
            // upsampling copy straight from the input; otherwise the group's
            // rows read the same input values shifted by one, gathered once
            // into `line`.
            let u = (y + g.ky) as isize - pad_y;
            if u < 0 || u >= hv {
                rows.for_each(|row| row.fill(0.0));
                return;
            }
            let start = (u as usize >> (up == 2) as usize) * self.w;
            let src = &plane[start..start + self.w];
            let v0 = x0 as isize - pad_x;
            let (lo, hi) = (v0 + g.kx as isize, v0 + (g.kx + g.len - 1) as isize);
            if up == 1 && cols == NR && lo >= 0 && hi + NR as isize <= self.w as isize {
                for (i, row) in rows.enumerate() {
                    let v = lo as usize + i;
                    row.copy_from_slice(&src[v..v + NR]);
                }
                return;
            }
            let mut line = [0f32; LINE];
            fill_line(&mut line, src, v0, up == 2);
            for (i, row) in rows.enumerate() {
                let kx = g.kx + i;
                if cols == NR {
                    row.copy_from_slice(&line[kx..kx + NR]);
                } else {
                    row[..cols].copy_from_slice(&line[kx..kx + cols]);
                    row[cols..].fill(0.0);
                }
            }
            return;
        }
        // Any stride or upsampling, pixels over several output rows.
        for (i, row) in rows.enumerate() {
            let kx = g.kx + i;
            for (j, o) in row.iter_mut().enumerate() {
                *o = 0.0;
                if j >= cols {
                    continue;
                }
                let p = q0 + j;
                let (yo, xo) = (p / self.wo, p % self.wo);
                let u = (yo * s + g.ky) as isize - pad_y;
                let v = (xo * s + kx) as isize - pad_x;
                if u >= 0 && u < hv && v >= 0 && v < wv {
                    *o = plane[(u as usize / up) * self.w + v as usize / up];
                }
            }
        }
    }
}

/// Consecutive rows `r..r + len` of a packed block that share an input
/// channel and kernel row; their kernel columns start at `kx`.
#[derive(Debug, Clone, Copy)]
struct Group {
    ci: usize,
    ky: usize,
    kx: usize,
    r: usize,
    len: usize,
}

/// `line[i] = row[(v0 + i) / up]` (up is 1, or 2 when `up2`), zero outside
/// the row.
#[inline]
fn fill_line(line: &mut [f32; LINE], row: &[f32], v0: isize, up2: bool) {
    let wv = (row.len() << up2 as usize) as isize;
    if !up2 && v0 >= 0 && v0 + LINE as isize <= wv {
        line.copy_from_slice(&row[v0 as usize..v0 as usize + LINE]);
        return;
    }
    // Columns lo..hi of the line fall inside the (virtual) row.
    let lo = (-v0).clamp(0, LINE as isize) as usize;
    let hi = (wv - v0).clamp(lo as isize, LINE as isize) as usize;
    line[..lo].fill(0.0);
    line[hi..].fill(0.0);
    let first = (v0 + lo as isize) as usize;
    if up2 {
        for (i, l) in line[lo..hi].iter_mut().enumerate() {
            *l = row[(first + i) >> 1];
        }
    } else {
        line[lo..hi].copy_from_slice(&row[first..first + hi - lo]);
    }
}

/// One `rows x cols` output tile (at most `MR x NR`): full tiles go straight to
/// the kernel, partial ones through a scratch tile. With `bias`, the tile
/// starts from the bias; without, it accumulates into `c`. `res` (row 0 of the
/// same tile in the residual, same stride) is added before the store.
///
/// # Safety
/// `c` points to row 0 of a tile of `rows` rows of stride `ldc`, each with
/// `cols` writable f32; `res`, when given, holds `(rows - 1) * ldc + cols`
/// f32; AVX2 and FMA are available.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn micro_tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if rows == MR && cols == NR {
            let res = res.map(|r| r.as_ptr());
            avx2::kernel(
                kc,
                a.as_ptr(),
                b.as_ptr(),
                c,
                ldc,
                bias.map(|b| b.as_ptr()),
                res,
            );
            return;
        }
        let mut tmp = [0f32; MR * NR];
        if bias.is_none() {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(c.add(r * ldc), tmp.as_mut_ptr().add(r * NR), cols);
            }
        }
        avx2::kernel(
            kc,
            a.as_ptr(),
            b.as_ptr(),
            tmp.as_mut_ptr(),
            NR,
            bias.map(|b| b.as_ptr()),
            None,
        );
        if let Some(res) = res {
            for r in 0..rows {
                for j in 0..cols {
                    tmp[r * NR + j] += res[r * ldc + j];
                }
            }
        }
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(tmp.as_ptr().add(r * NR), c.add(r * ldc), cols);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Off x86-64 only the portable path exists.
        portable::micro_tile(kc, a, b, c, ldc, rows, cols, bias, res);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Our kernel against candle's `conv2d` (after candle's nearest upsampling,
    /// plus the residual) on random data, over the shapes that exercise the
    /// edges: output channels not a multiple of `MR`, pixel counts not a
    /// multiple of `NR` and panels across rows, `K` larger than `KC`, stride 2.
    #[test]
    fn matches_candle_conv2d() -> candle_core::Result<()> {
        crate::report_paths("matches_candle_conv2d");
        eprintln!("matches_candle_conv2d: f32 convolution paths {:?}", paths());
        let dev = Device::Cpu;
        // (batch, c_in, c_out, h, w, kernel, stride, padding, upsample, residual)
        let cases = [
            (1, 3, 7, 5, 9, 3, 1, 1, 1, false),
            (2, 40, 13, 6, 17, 3, 1, 1, 1, true),
            (1, 8, 6, 7, 5, 3, 2, 0, 1, false),
            (1, 5, 9, 4, 6, 3, 1, 1, 2, false),
            (1, 32, 12, 16, 32, 3, 1, 1, 1, true),
            (1, 16, 4, 9, 20, 3, 1, 1, 2, false),
            (2, 300, 5, 3, 4, 1, 1, 0, 1, true),
            (1, 4, 3, 18, 18, 3, 1, 1, 1, false),
            // Depth 576 > KC: the second block accumulates (no bias), in the
            // AVX-512 kernel's two-panel tiles too.
            (1, 64, 12, 8, 16, 3, 1, 1, 1, true),
        ];
        for (b, ci, co, h, w, k, s, p, up, with_res) in cases {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 0.2, (co, ci, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, co, &dev)?;
            let xu = x.upsample_nearest2d(h * up, w * up)?;
            let mut want = xu
                .conv2d(&wt, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, co, 1, 1))?)?;
            let res = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
            if with_res {
                want = (want + &res)?;
            }
            let packed =
                PackedConv::new(&wt.flatten_all()?.to_vec1()?, &bias.to_vec1()?, co, ci, k)
                    .ok_or_else(|| candle_core::Error::Msg("pack".into()))?;
            let g = Geometry {
                upsample: up,
                ..Geometry::symmetric(s, p)
            };
            let rv: Vec<f32> = res.flatten_all()?.to_vec1()?;
            let want_dims = want.dims().to_vec();
            let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
            for path in paths() {
                let (got, ho, wo) = packed
                    .forward_with(
                        &x.flatten_all()?.to_vec1()?,
                        b,
                        (h, w),
                        g,
                        with_res.then_some(rv.as_slice()),
                        path,
                    )
                    .ok_or_else(|| candle_core::Error::Msg("forward".into()))?;
                assert_eq!(&[b, co, ho, wo], &want_dims[..]);
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs() / (1e-5 + 1e-5 * w.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 1.0,
                    "{path:?} case {:?}: worst {worst}",
                    (b, ci, co, h, w, k, s, p, up)
                );
            }
        }
        Ok(())
    }

    /// The paths this machine runs: portable always, AVX2 and AVX-512 where
    /// [`crate::caps`] allows them.
    fn paths() -> Vec<Path> {
        let mut paths = vec![Path::Portable];
        if available() {
            paths.push(Path::Avx2);
        }
        if available() && wide_available() {
            paths.push(Path::Avx512);
        }
        paths
    }

    /// Every path against an f64 convolution of the same values, each
    /// output within the error bound of an f32 sum of `depth + 2` terms
    /// (products, bias, residual): `(depth + 2) * 2^-24 * sum |terms|`.
    #[test]
    fn matches_f64_reference() {
        crate::report_paths("conv f32 matches_f64_reference");
        eprintln!("conv f32 matches_f64_reference: paths {:?}", paths());
        let val = |i: usize, m: usize| ((i * 7919 + m) % 2001) as f32 / 1000.0 - 1.0;
        // (batch, c_in, c_out, h, w, kernel, stride, padding, upsample)
        for (b, ci, co, h, w, k, s, p, up) in [
            (1, 3, 7, 5, 9, 3, 1, 1, 1),
            (2, 70, 13, 6, 17, 3, 1, 1, 1),
            (1, 8, 6, 7, 5, 3, 2, 0, 1),
            (1, 5, 9, 4, 6, 3, 1, 1, 2),
            (1, 300, 5, 3, 4, 1, 1, 0, 1),
        ] {
            let x: Vec<f32> = (0..b * ci * h * w).map(|i| val(i, 1)).collect();
            let wt: Vec<f32> = (0..co * ci * k * k).map(|i| val(i, 2) * 0.3).collect();
            let bias: Vec<f32> = (0..co).map(|i| val(i, 3)).collect();
            let g = Geometry {
                upsample: up,
                ..Geometry::symmetric(s, p)
            };
            let (ho, wo) = g.out_size((h, w), k).unwrap();
            let res: Vec<f32> = (0..b * co * ho * wo).map(|i| val(i, 4)).collect();
            let packed = PackedConv::new(&wt, &bias, co, ci, k).unwrap();
            let depth = (ci * k * k + 2) as f64;
            for path in paths() {
                let (got, _, _) = packed
                    .forward_with(&x, b, (h, w), g, Some(&res), path)
                    .unwrap();
                for (i, &y) in got.iter().enumerate() {
                    let (bi, o, oy, ox) =
                        (i / (co * ho * wo), i / (ho * wo) % co, i / wo % ho, i % wo);
                    let mut sum = bias[o] as f64 + res[i] as f64;
                    let mut mag = (bias[o] as f64).abs() + (res[i] as f64).abs();
                    for c in 0..ci {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - p as isize;
                                let ix = (ox * s + kx) as isize - p as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= (h * up) as isize
                                    || ix >= (w * up) as isize
                                {
                                    continue;
                                }
                                let (iy, ix) = (iy as usize / up, ix as usize / up);
                                let t = x[((bi * ci + c) * h + iy) * w + ix] as f64
                                    * wt[((o * ci + c) * k + ky) * k + kx] as f64;
                                sum += t;
                                mag += t.abs();
                            }
                        }
                    }
                    let bound = depth * mag * 2f64.powi(-24);
                    assert!(
                        (y as f64 - sum).abs() <= bound,
                        "{path:?} {:?} element {i}: {y} vs {sum} (bound {bound:e})",
                        (b, ci, co, h, w, k, s, p, up)
                    );
                }
            }
        }
    }
}
