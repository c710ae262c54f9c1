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

    /// [`Self::forward`] in plain Rust, on every CPU: the same arithmetic
    /// (f32 sums of the exact bf16 products, the bias in f32, one rounding
    /// to bf16), slowly. The reference path the tests compare everywhere;
    /// production uses [`crate::ops::conv2d_bf16`] to choose. `None` when
    /// the sizes do not fit together.
    pub fn forward_portable(
        &self,
        x: &[bf16],
        batch: usize,
        (h, w): (usize, usize),
        g: Geometry,
    ) -> Option<(Vec<bf16>, usize, usize)> {
        portable::forward(self, x, batch, (h, w), g)
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
                amx::pack(src, q, &mut buf[i * len..(i + 1) * len]);
            }
            amx::multiply(self, src, &buf[..qs.len() * len], qs, dst.0);
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
mod amx;
mod portable;
