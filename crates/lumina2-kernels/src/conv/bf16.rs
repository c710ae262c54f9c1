//! A bf16 2-D convolution on AMX tiles (implicit GEMM), for the VAE's
//! convolutions in a bf16 model.
//!
//! Why: PyTorch runs a bf16 `conv2d` on oneDNN's AMX kernels, about three
//! times its f32 speed on this project's machine; widening bf16 to f32 for an
//! f32 kernel (what the VAE did) cannot keep up.
//!
//! How: `out[co, p] = bias[co] + sum_k W[co, k] * col[k, p]` with
//! `k = (ci, ky, kx)` (PyTorch's weight order) and `p` an output pixel. The
//! weight is the A operand, tiled once at load (16 output channels x 32 values
//! of `k` a tile). The im2col matrix is never built: each task packs, for a
//! few panels of 32 output pixels of one output row, the B operand straight
//! from the input, one VNNI row (32 pairs `(k, k + 1)`) per two vectors of 32
//! pixels: masked loads along the input row (zero padding from the masks), a
//! lane permutation for a nearest 2x upsampling (diffusers' `Upsample2D`),
//! a per-lane gather for other strides. Then every 32 output channels multiply
//! the task's panels with the 2x2 tile step of [`crate::gemm::packed`] over the
//! whole depth, and the sums get the bias in f32 and are rounded once to bf16:
//! oneDNN's arithmetic (exact bf16 products, f32 sums, one rounding), with the
//! sums taken in another order.
//!
//! Runs where [`available`] (AMX usable, see [`crate::gemm::packed`]); elsewhere
//! [`ConvBf16::forward`] returns `None` and the caller keeps its own path.

use half::bf16;
use rayon::prelude::*;

use crate::cpu::Aligned;
use crate::gemm::packed::{self, PANEL};

/// How the input is read: stride, zero padding, and a nearest upsampling by
/// `upsample` applied before the convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Step between output pixels, in (upsampled) input pixels.
    pub stride: usize,
    /// Zero rows above and zero columns left of the (upsampled) input.
    pub pad: (usize, usize),
    /// Nearest upsampling factor applied to the input first (1: none).
    pub upsample: usize,
    /// Output height and width; `None`: the same padding below and right,
    /// `(n * upsample + 2 pad - kernel) / stride + 1`.
    pub out: Option<(usize, usize)>,
}

impl Geometry {
    /// `padding` on every side (`nn.Conv2d`'s), no upsampling.
    pub fn symmetric(stride: usize, padding: usize) -> Self {
        Self {
            stride,
            pad: (padding, padding),
            upsample: 1,
            out: None,
        }
    }

    /// Output height and width of a `kernel x kernel` convolution of an
    /// `h x w` input, if positive.
    pub fn out_size(&self, (h, w): (usize, usize), kernel: usize) -> Option<(usize, usize)> {
        if let Some((ho, wo)) = self.out {
            return (ho > 0 && wo > 0).then_some((ho, wo));
        }
        let out = |n: usize, pad: usize| {
            let v = n.checked_mul(self.upsample)?.checked_add(2 * pad)?;
            (self.stride > 0 && v >= kernel).then(|| (v - kernel) / self.stride + 1)
        };
        Some((out(h, self.pad.0)?, out(w, self.pad.1)?))
    }
}

/// Whether [`ConvBf16::forward`] can run on this CPU: AMX-BF16 usable (see
/// [`crate::gemm::packed`]; `LUMINA2_NO_AMX=1` turns it off).
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && packed::use_amx()
}

/// Bytes of packed input per task: the task's panels stay in L2 while every
/// block of 32 output channels multiplies them.
const TASK_BYTES: usize = 1024 * 1024;

/// A convolution's bf16 weights tiled for AMX, and its bias.
pub struct ConvBf16 {
    c_out: usize,
    c_in: usize,
    kernel: usize,
    /// `c_in * kernel^2` rounded up to 32 (one tile's depth).
    width: usize,
    /// The weight `[c_out, c_in * kernel^2]` as AMX A tiles (rows padded to
    /// 32, depth to `width`, with zeros).
    a: Aligned<bf16>,
    /// `c_out` values, then zeros to a multiple of 32.
    bias: Vec<f32>,
}

impl std::fmt::Debug for ConvBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ConvBf16({} -> {}, {}x{})",
            self.c_in, self.c_out, self.kernel, self.kernel
        )
    }
}

impl ConvBf16 {
    /// Tiles `weight` (`[c_out, c_in, kernel, kernel]` flattened, PyTorch's
    /// order) and keeps `bias` (`c_out` values); `None` when the lengths do
    /// not match the sizes or a size is zero.
    pub fn new(
        weight: &[bf16],
        bias: &[f32],
        c_out: usize,
        c_in: usize,
        kernel: usize,
    ) -> Option<Self> {
        let k_len = c_in.checked_mul(kernel.checked_mul(kernel)?)?;
        if k_len == 0 || c_out == 0 || weight.len() != c_out.checked_mul(k_len)? {
            return None;
        }
        if bias.len() != c_out {
            return None;
        }
        let width = k_len.div_ceil(32) * 32;
        let a = packed::tile_inputs(weight, c_out, k_len, width);
        let mut b = vec![0f32; c_out.div_ceil(32) * 32];
        b[..c_out].copy_from_slice(bias);
        Some(Self {
            c_out,
            c_in,
            kernel,
            width,
            a,
            bias: b,
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

    /// Kernel height and width.
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// Convolves `x` (`[batch, c_in, h, w]` contiguous bf16) into
    /// `[batch, c_out, ho, wo]` bf16, returned with `ho` and `wo`. `None`
    /// when the kernel cannot run here ([`available`]) or the sizes do not
    /// fit together.
    pub fn forward(
        &self,
        x: &[bf16],
        batch: usize,
        (h, w): (usize, usize),
        g: Geometry,
    ) -> Option<(Vec<bf16>, usize, usize)> {
        if !available() || g.upsample == 0 || g.stride == 0 || h == 0 || w == 0 {
            return None;
        }
        if x.len()
            != batch
                .checked_mul(self.c_in)?
                .checked_mul(h)?
                .checked_mul(w)?
        {
            return None;
        }
        let (ho, wo) = g.out_size((h, w), self.kernel)?;
        let n = ho.checked_mul(wo)?;
        let mut out = vec![bf16::ZERO; batch.checked_mul(self.c_out)?.checked_mul(n)?];
        let per_row = wo.div_ceil(PANEL);
        let panels = batch * ho * per_row;
        let pairs = self.width / 2;
        let per_task = (TASK_BYTES / (pairs * PANEL * 4)).clamp(1, 8);
        let src = Source {
            x,
            c_in: self.c_in,
            h,
            w,
            kernel: self.kernel,
            g,
            ho,
            wo,
            per_row,
            pairs,
        };
        let dst = OutPtr(out.as_mut_ptr().cast::<u16>());
        let dst = &dst;
        (0..panels.div_ceil(per_task))
            .into_par_iter()
            .for_each_init(
                || Aligned::<u32>::zeroed(per_task * pairs * PANEL),
                |buf, t| {
                    let q0 = t * per_task;
                    let q1 = (q0 + per_task).min(panels);
                    self.task(&src, buf, q0..q1, dst);
                },
            );
        Some((out, ho, wo))
    }
}

impl ConvBf16 {
    /// Packs and multiplies the panels `qs`.
    fn task(&self, src: &Source, buf: &mut [u32], qs: std::ops::Range<usize>, dst: &OutPtr) {
        let len = src.pairs * PANEL;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `forward` checked `available()` (AMX, AVX-512 BW/VL/BF16);
        // `buf` holds `qs.len()` panels; the task writes only the pixels of
        // its own panels (every output channel of them), inside the output.
        unsafe {
            for (i, q) in qs.clone().enumerate() {
                x86::pack(src, q, &mut buf[i * len..(i + 1) * len]);
            }
            x86::multiply(self, src, &buf[..qs.len() * len], qs, dst.0);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (src, buf, qs, dst, len);
    }
}

/// The output pointer, shared by tasks that write disjoint pixels.
struct OutPtr(*mut u16);
// SAFETY: tasks write disjoint elements (see `ConvBf16::forward`).
unsafe impl Sync for OutPtr {}

/// One batch of input and where each panel of output pixels lies.
struct Source<'a> {
    x: &'a [bf16],
    c_in: usize,
    h: usize,
    w: usize,
    kernel: usize,
    g: Geometry,
    ho: usize,
    wo: usize,
    /// Panels of 32 output pixels per output row (the last one partial).
    per_row: usize,
    /// Pairs of `k` per panel (the padded depth / 2).
    pairs: usize,
}

/// Where panel `q` writes: batch item, output row, first column, columns.
struct Panel {
    item: usize,
    oy: usize,
    ox0: usize,
    cols: usize,
}

impl Source<'_> {
    fn panel(&self, q: usize) -> Panel {
        let per_item = self.ho * self.per_row;
        let (item, rest) = (q / per_item, q % per_item);
        let (oy, ox0) = (rest / self.per_row, (rest % self.per_row) * PANEL);
        Panel {
            item,
            oy,
            ox0,
            cols: PANEL.min(self.wo - ox0),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{ConvBf16, Source, PANEL};
    use crate::gemm::packed::{
        bf16_steps, c_tiles, prefetch_next, store_row, tile_config, zero_c, Out,
    };

    /// How a panel's vectors are read from an input row.
    #[derive(Clone, Copy)]
    enum Read {
        /// Stride 1, no upsampling: one masked load per vector.
        Direct,
        /// Stride 1, nearest 2x upsampling, left padding <= 2, kernel <= 3:
        /// one masked load of source columns from `ox0 / 2 - 1` and a lane
        /// permutation (`(j + kx - pad) div 2 + 1` for output lane `j`).
        Up2,
        /// Anything else: a gather, lane by lane.
        Gather,
    }

    fn read_mode(s: &Source) -> Read {
        let g = s.g;
        match (g.stride, g.upsample) {
            (1, 1) => Read::Direct,
            (1, 2) if g.pad.1 <= 2 && s.kernel <= 3 => Read::Up2,
            _ => Read::Gather,
        }
    }

    /// Lanes `lo..hi` (clamped to 0..32).
    #[inline(always)]
    fn lanes(lo: isize, hi: isize) -> __mmask32 {
        let lo = lo.clamp(0, 32) as u32;
        let hi = hi.clamp(0, 32) as u32;
        if hi <= lo {
            return 0;
        }
        let upto = |n: u32| if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
        upto(hi) & !upto(lo)
    }

    /// Packs panel `q`: `pairs` rows of 32 lanes, lane `j` of row `i` holding
    /// the input values of `k = 2i` (low half) and `2i + 1` (high half) for
    /// the panel's pixel `j`; zeros past the depth.
    ///
    /// # Safety
    /// AVX-512F/BW are available; `dst` holds `pairs * 32` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack(s: &Source, q: usize, dst: &mut [u32]) {
        let p = s.panel(q);
        let plane = s.h * s.w;
        let item = &s.x[p.item * s.c_in * plane..(p.item + 1) * s.c_in * plane];
        let mode = read_mode(s);
        let (pt, pl) = (s.g.pad.0 as isize, s.g.pad.1 as isize);
        let (h, w) = (s.h as isize, s.w as isize);
        // Interleaving indices: lane 2j <- v0[j], 2j + 1 <- v1[j] (low half:
        // j < 16; high half: j >= 16).
        let mut lo_idx = [0u16; 32];
        let mut hi_idx = [0u16; 32];
        for j in 0..16 {
            lo_idx[2 * j] = j as u16;
            lo_idx[2 * j + 1] = 32 + j as u16;
            hi_idx[2 * j] = 16 + j as u16;
            hi_idx[2 * j + 1] = 48 + j as u16;
        }
        // The upsampling's lane permutation per kernel column.
        let mut up_idx = [[0u16; 32]; 3];
        if let Read::Up2 = mode {
            for (kx, idx) in up_idx.iter_mut().enumerate().take(s.kernel) {
                for (j, v) in idx.iter_mut().enumerate() {
                    *v = ((j as isize + kx as isize - pl).div_euclid(2) + 1) as u16;
                }
            }
        }
        unsafe {
            let lo_idx = _mm512_loadu_si512(lo_idx.as_ptr().cast());
            let hi_idx = _mm512_loadu_si512(hi_idx.as_ptr().cast());
            let mut rows = Rows {
                out: dst.as_mut_ptr(),
                row: 0,
                pending: None,
                lo_idx,
                hi_idx,
            };
            for ci in 0..s.c_in {
                let chan = item.as_ptr().add(ci * plane).cast::<i16>();
                for ky in 0..s.kernel {
                    match mode {
                        Read::Direct => {
                            let iy = p.oy as isize + ky as isize - pt;
                            for kx in 0..s.kernel {
                                let col0 = p.ox0 as isize + kx as isize - pl;
                                let v = if iy < 0 || iy >= h {
                                    _mm512_setzero_si512()
                                } else {
                                    let m = lanes(-col0, (w - col0).min(p.cols as isize));
                                    // Masked-off lanes are not read (they may
                                    // lie outside the row, even the tensor).
                                    let at = chan.wrapping_offset(iy * w + col0);
                                    _mm512_maskz_loadu_epi16(m, at)
                                };
                                rows.push(v);
                            }
                        }
                        Read::Up2 => {
                            let iy_up = p.oy as isize + ky as isize - pt;
                            let src = if iy_up < 0 || iy_up >= 2 * h {
                                None
                            } else {
                                let s0 = p.ox0 as isize / 2 - 1;
                                let m = lanes(-s0, w - s0);
                                let at = chan.wrapping_offset((iy_up / 2) * w + s0);
                                Some(_mm512_maskz_loadu_epi16(m, at))
                            };
                            for idx in up_idx.iter().take(s.kernel) {
                                let v = match src {
                                    None => _mm512_setzero_si512(),
                                    Some(v) => _mm512_permutexvar_epi16(
                                        _mm512_loadu_si512(idx.as_ptr().cast()),
                                        v,
                                    ),
                                };
                                rows.push(v);
                            }
                        }
                        Read::Gather => {
                            let (st, up) = (s.g.stride as isize, s.g.upsample as isize);
                            let iy_up = p.oy as isize * st + ky as isize - pt;
                            for kx in 0..s.kernel {
                                let mut vals = [0i16; 32];
                                if iy_up >= 0 && iy_up < h * up {
                                    for (j, v) in vals.iter_mut().enumerate().take(p.cols) {
                                        let ix_up = (p.ox0 + j) as isize * st + kx as isize - pl;
                                        if ix_up >= 0 && ix_up < w * up {
                                            *v = *chan.offset((iy_up / up) * w + ix_up / up);
                                        }
                                    }
                                }
                                rows.push(_mm512_loadu_si512(vals.as_ptr().cast()));
                            }
                        }
                    }
                }
            }
            rows.finish(s.pairs);
        }
    }

    /// Writes the packed rows of a panel: vectors of consecutive `k` arrive
    /// one at a time and leave interleaved two by two.
    struct Rows {
        out: *mut u32,
        row: usize,
        pending: Option<__m512i>,
        lo_idx: __m512i,
        hi_idx: __m512i,
    }

    impl Rows {
        /// The vector of the next `k`.
        ///
        /// # Safety
        /// AVX-512BW is available; the row written is inside the panel.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn push(&mut self, v: __m512i) {
            match self.pending.take() {
                None => self.pending = Some(v),
                Some(v0) => unsafe {
                    let d = self.out.add(self.row * PANEL).cast::<__m512i>();
                    _mm512_storeu_si512(d, _mm512_permutex2var_epi16(v0, self.lo_idx, v));
                    _mm512_storeu_si512(d.add(1), _mm512_permutex2var_epi16(v0, self.hi_idx, v));
                    self.row += 1;
                },
            }
        }

        /// Completes the last pair with a zero and zeroes the rows up to `pairs`.
        ///
        /// # Safety
        /// As [`Self::push`]; the panel holds `pairs` rows.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn finish(&mut self, pairs: usize) {
            unsafe {
                if self.pending.is_some() {
                    self.push(_mm512_setzero_si512());
                }
                while self.row < pairs {
                    let d = self.out.add(self.row * PANEL).cast::<__m512i>();
                    _mm512_storeu_si512(d, _mm512_setzero_si512());
                    _mm512_storeu_si512(d.add(1), _mm512_setzero_si512());
                    self.row += 1;
                }
            }
        }
    }

    /// The 32x32 f32 sums of one tile block, 64-byte aligned for the tile
    /// stores.
    #[repr(C, align(64))]
    struct Block([f32; 32 * 32]);

    /// Multiplies the packed panels `qs` (in `buf`) by every output channel
    /// and writes them, bias added and rounded to bf16, to `out`
    /// (`[batch, c_out, ho, wo]`).
    ///
    /// # Safety
    /// AMX-BF16 is usable and AVX-512F/BW/VL/BF16 available; `buf` holds the
    /// panels `qs` packed by [`pack`]; `out` points at the whole output, and
    /// no other writer touches these panels' pixels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn multiply(
        conv: &ConvBf16,
        s: &Source,
        buf: &[u32],
        qs: std::ops::Range<usize>,
        out: *mut u16,
    ) {
        let cfg = tile_config();
        let steps = conv.width / 32;
        let pairs = conv.width / 2;
        let mut c = Block([0f32; 32 * 32]);
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
            for cb in 0..conv.c_out.div_ceil(32) {
                // Row tiles 2cb and 2cb + 1: tile (t, step) at byte (t * steps + step) * 1024.
                let a0 = conv.a.as_ptr().cast::<u8>().add(2 * cb * steps * 1024);
                let a1 = a0.add(steps * 1024);
                let rows = 32.min(conv.c_out - cb * 32);
                for q in qs.clone() {
                    let bp = buf
                        .as_ptr()
                        .add((q - qs.start) * pairs * PANEL)
                        .cast::<u8>();
                    zero_c();
                    for st in 0..steps {
                        // The next step's tiles into L1 (see `packed::amx_block`).
                        if st + 1 < steps {
                            prefetch_next(a0.add(st * 1024), steps * 1024, bp.add(st * 2048));
                        }
                        bf16_steps(
                            a0.add(st * 1024),
                            a1.add(st * 1024),
                            0,
                            bp.add(st * 2048),
                            0,
                            1,
                        );
                    }
                    c_tiles(c.0.as_mut_ptr(), 32, false);
                    let p = s.panel(q);
                    let (m0, m1) = crate::simd::masks32(p.cols);
                    for i in 0..rows {
                        let co = cb * 32 + i;
                        let bias = _mm512_set1_ps(conv.bias[co]);
                        let at = ((p.item * conv.c_out + co) * s.ho + p.oy) * s.wo + p.ox0;
                        store_row(
                            Out::Bf16(out.add(at)),
                            _mm512_loadu_ps(c.0.as_ptr().add(i * 32)),
                            _mm512_loadu_ps(c.0.as_ptr().add(i * 32 + 16)),
                            bias,
                            bias,
                            m0,
                            m1,
                        );
                    }
                }
            }
            asm!("tilerelease", options(nostack));
        }
    }
}
