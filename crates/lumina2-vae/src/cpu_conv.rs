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
//! an `MR x KC` weight panel by a `KC x NR` pixel panel into registers, then
//! writes (or accumulates into) the NCHW output rows directly. Threads split the
//! pixels, so they never write the same element and share only the packed
//! weights.
//!
//! Used on x86-64 CPUs with AVX2 and FMA; elsewhere (and for other devices or
//! dtypes) the layers call candle's `conv2d`.

use rayon::prelude::*;

/// Output channels per weight panel (rows of the micro-kernel).
pub(crate) const MR: usize = 6;
/// Pixels per packed pixel panel (columns of the micro-kernel: two AVX registers).
pub(crate) const NR: usize = 16;
/// Rows of `k` per block: an `MR x KC` weight panel (6 KiB) and an `NR x KC`
/// pixel panel (16 KiB) stay in L1 during a micro-kernel call.
const KC: usize = 256;
/// Pixels per task: the task's packed block (`KC x NC`, 256 KiB) stays in L2.
const NC: usize = 256;

/// Whether this CPU can run the fast path.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How the input is read: zero padding on each side, stride, and a nearest
/// upsampling by `upsample` applied before the convolution (diffusers'
/// `Upsample2D` is `interpolate(scale 2, nearest)` then a 3x3 convolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub stride: usize,
    pub padding: usize,
    pub upsample: usize,
}

/// A convolution's weights packed for the micro-kernel.
#[derive(Debug, Clone)]
pub(crate) struct PackedConv {
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
    pub(crate) fn new(
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

    /// Input channels.
    pub(crate) fn c_in(&self) -> usize {
        self.c_in
    }

    /// Output channels.
    pub(crate) fn c_out(&self) -> usize {
        self.c_out
    }

    /// Output height and width for an `h x w` input, if positive.
    pub(crate) fn out_size(&self, h: usize, w: usize, g: Geometry) -> Option<(usize, usize)> {
        let out = |n: usize| {
            let v = n * g.upsample + 2 * g.padding;
            (g.stride > 0 && v >= self.kernel).then(|| (v - self.kernel) / g.stride + 1)
        };
        Some((out(h)?, out(w)?))
    }

    /// Convolves `x` ([b, c_in, h, w] contiguous f32) into [b, c_out, ho, wo].
    /// Returns `None` when the sizes do not fit together (the caller falls back).
    pub(crate) fn forward(
        &self,
        x: &[f32],
        b: usize,
        h: usize,
        w: usize,
        g: Geometry,
    ) -> Option<(Vec<f32>, usize, usize)> {
        if !available() || g.upsample == 0 || x.len() != b * self.c_in * h * w {
            return None;
        }
        let (ho, wo) = self.out_size(h, w, g)?;
        let n = ho * wo;
        let mut out = vec![0f32; b * self.c_out * n];
        let src = Source {
            h,
            w,
            kernel: self.kernel,
            g,
            wo,
        };
        for (xb, ob) in x
            .chunks_exact(self.c_in * h * w)
            .zip(out.chunks_exact_mut(self.c_out * n))
        {
            let dst = OutPtr(ob.as_mut_ptr());
            let dst = &dst;
            (0..n.div_ceil(NC)).into_par_iter().for_each_init(
                || vec![0f32; KC * NC],
                |buf, t| {
                    let p0 = t * NC;
                    let p1 = (p0 + NC).min(n);
                    // SAFETY: `ob` has c_out * n elements; this task writes only
                    // columns p0..p1 of each row, which no other task touches.
                    unsafe { self.task(xb, &src, buf, dst.0, n, p0, p1) };
                },
            );
        }
        Some((out, ho, wo))
    }

    /// One task: all output channels of pixels `p0..p1`.
    ///
    /// # Safety
    /// `out` must point to `c_out * n` f32, with no other writer of columns
    /// `p0..p1`; the CPU must have AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    unsafe fn task(
        &self,
        x: &[f32],
        src: &Source,
        buf: &mut [f32],
        out: *mut f32,
        n: usize,
        p0: usize,
        p1: usize,
    ) {
        let k_len = self.c_in * self.kernel * self.kernel;
        let m_panels = self.c_out.div_ceil(MR);
        let n_panels = (p1 - p0).div_ceil(NR);
        let mut kb = 0;
        while kb < k_len {
            let kc = KC.min(k_len - kb);
            for pi in 0..n_panels {
                let q0 = p0 + pi * NR;
                let cols = NR.min(p1 - q0);
                src.pack(
                    x,
                    &mut buf[pi * kc * NR..(pi + 1) * kc * NR],
                    kb,
                    kc,
                    q0,
                    cols,
                );
            }
            for mp in 0..m_panels {
                let a = &self.panels[(mp * k_len + kb) * MR..(mp * k_len + kb + kc) * MR];
                let rows = MR.min(self.c_out - mp * MR);
                let bias = (kb == 0).then(|| &self.bias[mp * MR..(mp + 1) * MR]);
                for pi in 0..n_panels {
                    let q0 = p0 + pi * NR;
                    let cols = NR.min(p1 - q0);
                    let bp = &buf[pi * kc * NR..(pi + 1) * kc * NR];
                    let c = out.add(mp * MR * n + q0);
                    micro_tile(kc, a, bp, c, n, rows, cols, bias);
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
    /// `q0..q0 + cols` into `dst` (`kc x NR`, pixel-minor; columns past `cols` zero).
    fn pack(&self, x: &[f32], dst: &mut [f32], kb: usize, kc: usize, q0: usize, cols: usize) {
        let kk = self.kernel * self.kernel;
        let (hv, wv) = (self.h * self.g.upsample, self.w * self.g.upsample);
        let (s, pad, up) = (self.g.stride, self.g.padding, self.g.upsample);
        // The pixels as runs along output rows: (first column in the panel,
        // length, output row, first output column).
        let mut segs = [(0usize, 0usize, 0usize, 0usize); NR];
        let mut n_segs = 0;
        let mut j = 0;
        while j < cols {
            let p = q0 + j;
            let (y, x0) = (p / self.wo, p % self.wo);
            let len = (self.wo - x0).min(cols - j);
            segs[n_segs] = (j, len, y, x0);
            n_segs += 1;
            j += len;
        }
        let (mut ci, mut ky, mut kx) = (kb / kk, (kb % kk) / self.kernel, kb % self.kernel);
        for row in dst.chunks_exact_mut(NR).take(kc) {
            let plane = &x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for &(j0, len, y, x0) in &segs[..n_segs] {
                let out = &mut row[j0..j0 + len];
                let u = (y * s + ky) as isize - pad as isize;
                if u < 0 || u >= hv as isize {
                    out.fill(0.0);
                    continue;
                }
                let src = &plane[(u as usize / up) * self.w..(u as usize / up + 1) * self.w];
                let v0 = (x0 * s + kx) as isize - pad as isize;
                if up == 1 && s == 1 && v0 >= 0 && v0 as usize + len <= self.w {
                    out.copy_from_slice(&src[v0 as usize..v0 as usize + len]);
                } else {
                    for (jj, o) in out.iter_mut().enumerate() {
                        let v = v0 + (jj * s) as isize;
                        *o = if v >= 0 && v < wv as isize {
                            src[v as usize / up]
                        } else {
                            0.0
                        };
                    }
                }
            }
            row[cols..].fill(0.0);
            kx += 1;
            if kx == self.kernel {
                kx = 0;
                ky += 1;
                if ky == self.kernel {
                    ky = 0;
                    ci += 1;
                }
            }
        }
    }
}

/// One `rows x cols` output tile (at most `MR x NR`): full tiles go straight to
/// the kernel, partial ones through a scratch tile. With `bias`, the tile
/// starts from the bias; without, it accumulates into `c`.
///
/// # Safety
/// `c` points to row 0 of a tile of `rows` rows of stride `ldc`, each with
/// `cols` writable f32; AVX2 and FMA are available.
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
) {
    #[cfg(target_arch = "x86_64")]
    {
        if rows == MR && cols == NR {
            x86::kernel(kc, a.as_ptr(), b.as_ptr(), c, ldc, bias.map(|b| b.as_ptr()));
            return;
        }
        let mut tmp = [0f32; MR * NR];
        if bias.is_none() {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(c.add(r * ldc), tmp.as_mut_ptr().add(r * NR), cols);
            }
        }
        x86::kernel(
            kc,
            a.as_ptr(),
            b.as_ptr(),
            tmp.as_mut_ptr(),
            NR,
            bias.map(|b| b.as_ptr()),
        );
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(tmp.as_ptr().add(r * NR), c.add(r * ldc), cols);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Unreachable: `available()` is false off x86-64.
        let _ = (kc, a, b, c, ldc, rows, cols, bias);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// `C[MR x NR] (+)= A[kc x MR]^T B[kc x NR]`: twelve accumulators, two
    /// pixel vectors and one broadcast weight per step, all in registers.
    ///
    /// # Safety
    /// `a` holds `kc * MR` f32, `b` `kc * NR`, `c` `MR` rows of stride `ldc`
    /// with `NR` writable f32 each (read too when `bias` is `None`; `bias`
    /// holds `MR` f32); AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        bias: Option<*const f32>,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        match bias {
            Some(bias) => {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let v = _mm256_broadcast_ss(&*bias.add(r));
                    *acc_r = [v, v];
                }
            }
            None => {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let row = c.add(r * ldc);
                    *acc_r = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
                }
            }
        }
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let w = _mm256_broadcast_ss(&*a.add(r));
                acc_r[0] = _mm256_fmadd_ps(w, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(w, b1, acc_r[1]);
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let row = c.add(r * ldc);
            _mm256_storeu_ps(row, acc_r[0]);
            _mm256_storeu_ps(row.add(8), acc_r[1]);
        }
    }
}
