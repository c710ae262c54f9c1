//! Building blocks: weight loading with shape checks, convolution, group norm,
//! linear layers and activations, with the precision rules PyTorch follows.
//!
//! Precision: convolutions and linear layers on the CPU run in f32 when the
//! model dtype is a half type (candle has no half-precision CPU convolution;
//! PyTorch accumulates half products in f32 too) and round their output to the
//! model dtype. Group norms and activations compute in f32 and round to the
//! model dtype, as PyTorch's CPU kernels do.

use std::sync::Arc;

use candle_core::{DType, Storage, Tensor};
use lumina2_weights::Weights;

use lumina2_kernels::conv::bf16::{ConvBf16, Geometry};

use crate::error::{input_err, Result, VaeError};
use crate::profile::{span, Op};
use lumina2_kernels::conv::f32::PackedConv;
use lumina2_kernels::conv::upsample::UpsampleConv;
use lumina2_kernels::norm::group::FusedAct;
use lumina2_kernels::ops;

/// Loads `name` under `vb`'s prefix with exactly `shape`, in the model's
/// dtype: the shape the file declares is compared before anything is read,
/// and errors name the key and the file.
pub(crate) fn get(vb: &Weights, shape: &[usize], name: &str) -> Result<Tensor> {
    Ok(vb.get(name, shape)?)
}

/// Rounds an f32 tensor through `dtype` and back (what storing a PyTorch
/// intermediate in a half dtype does); a no-op for f32.
pub(crate) fn round_through(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == x.dtype() {
        Ok(x.clone())
    } else {
        cast(&cast(x, dtype)?, x.dtype())
    }
}

/// `x.to_dtype(dtype)`, with the f32 <-> bf16 conversions of contiguous CPU
/// tensors done in parallel ([`lumina2_kernels::cast`]: candle converts one
/// value at a time, which made a bf16 decode 1.6x slower than f32 on
/// conversions alone). Same results as candle's.
pub(crate) fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(lumina2_kernels::cast(x, dtype)?)
}

/// A 2D convolution with bias (`nn.Conv2d`).
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    kind: ConvKind,
    kernel: usize,
    stride: usize,
    padding: usize,
    dtype: DType,
}

/// Where the convolution runs: the AMX bf16 kernel for a bf16 model on a CPU
/// with AMX ([`lumina2_kernels::conv::bf16`]; an `Upsample2D` convolution reads the
/// upsampled input through it); our packed f32 CPU kernel (x86-64 with
/// AVX2/FMA, see `lumina2_kernels::conv::f32`) and its four-phase form for an `Upsample2D`
/// convolution (`lumina2_kernels::conv::upsample`, used only upsampled); or candle's `conv2d`
/// (other devices and CPUs).
#[derive(Debug, Clone)]
enum ConvKind {
    Bf16(Arc<ConvBf16>),
    Packed(Arc<PackedConv>),
    Upsampler(Arc<UpsampleConv>),
    Candle { weight: Tensor, bias: Tensor },
}

impl Conv2d {
    /// Loads `weight` [out, in, k, k] and `bias` [out].
    pub(crate) fn load(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::load_as(vb, c_in, c_out, kernel, stride, padding, false)
    }

    /// Loads the 3x3 convolution of an `Upsample2D`: on the CPU path it only
    /// serves [`Self::forward_upsampled`].
    pub(crate) fn load_upsampler(vb: &Weights, channels: usize) -> Result<Self> {
        Self::load_as(vb, channels, channels, 3, 1, 1, true)
    }

    fn load_as(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        upsampler: bool,
    ) -> Result<Self> {
        let dtype = vb.dtype();
        let cdt = ops::conv::compute_dtype(dtype, vb.device());
        let weight = get(vb, &[c_out, c_in, kernel, kernel], "weight")?;
        let bias = get(vb, &[c_out], "bias")?.to_dtype(cdt)?;
        if ops::conv::bf16_kernel(vb.device(), dtype) {
            let w = weight.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
            let b = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            if let Some(c) = ConvBf16::new(&w, &b, c_out, c_in, kernel) {
                return Ok(Self {
                    kind: ConvKind::Bf16(Arc::new(c)),
                    kernel,
                    stride,
                    padding,
                    dtype,
                });
            }
        }
        let weight = weight.to_dtype(cdt)?;
        let fast = ops::conv::f32_kernel(vb.device(), cdt);
        let kind = if fast {
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            let b = bias.to_vec1::<f32>()?;
            if upsampler {
                UpsampleConv::new(&w, &b, c_out, c_in).map(|u| ConvKind::Upsampler(Arc::new(u)))
            } else {
                PackedConv::new(&w, &b, c_out, c_in, kernel).map(|p| ConvKind::Packed(Arc::new(p)))
            }
        } else {
            None
        };
        let kind = match kind {
            Some(k) => k,
            None => ConvKind::Candle {
                weight,
                bias: bias.reshape((1, c_out, 1, 1))?,
            },
        };
        Ok(Self {
            kind,
            kernel,
            stride,
            padding,
            dtype,
        })
    }

    /// Applies the convolution; the output has the model dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, 1, None)
    }

    /// Nearest 2x upsampling then the convolution (`Upsample2D`), fused on the
    /// CPU path so that the upsampled tensor is never built.
    pub(crate) fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, 2, None)
    }

    /// `residual + conv(x)` (a resnet's last convolution and skip connection).
    /// In f32 on the CPU path the sum is taken before the output is stored;
    /// otherwise the convolution's output is rounded to the model dtype first,
    /// as PyTorch does.
    pub(crate) fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if matches!(self.kind, ConvKind::Packed(_)) && self.dtype == DType::F32 {
            return self.run(x, 1, Some(residual));
        }
        let y = self.run(x, 1, None)?;
        let _s = span(Op::Residual);
        Ok(ops::elementwise::add(residual, &y)?)
    }

    fn run(&self, x: &Tensor, upsample: usize, residual: Option<&Tensor>) -> Result<Tensor> {
        let _s = span(if self.kernel == 1 {
            Op::Conv1x1
        } else {
            Op::Conv3x3
        });
        let y = match &self.kind {
            ConvKind::Bf16(c) => match residual {
                Some(r) => ops::elementwise::add(r, &self.run_bf16(c, x, upsample)?)?,
                None => self.run_bf16(c, x, upsample)?,
            },
            ConvKind::Packed(p) => self.run_packed(p, x, upsample, residual)?,
            ConvKind::Upsampler(u) if upsample == 2 && residual.is_none() => {
                self.run_upsampler(u, x)?
            }
            ConvKind::Upsampler(_) => {
                return Err(VaeError::Config(
                    "an Upsample2D convolution runs only after upsampling by 2".into(),
                ))
            }
            ConvKind::Candle { weight, bias } => {
                let mut x = x.to_dtype(weight.dtype())?;
                if upsample != 1 {
                    let _s = span(Op::Upsample);
                    let (_, _, h, w) = x.dims4()?;
                    x = x.upsample_nearest2d(upsample * h, upsample * w)?;
                }
                let y = x
                    .conv2d(weight, self.padding, self.stride, 1, 1)?
                    .broadcast_add(bias)?;
                match residual {
                    Some(r) => (cast(&y, self.dtype)? + r)?,
                    None => y,
                }
            }
        };
        cast(&y, self.dtype)
    }

    fn run_packed(
        &self,
        p: &PackedConv,
        x: &Tensor,
        upsample: usize,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, h, w) = input_dims(x, p.c_in())?;
        let g = self.geometry(upsample);
        let x = cast(&x.contiguous()?, DType::F32)?;
        let res = residual
            .map(|r| cast(&r.contiguous()?, DType::F32))
            .transpose()?;
        let out = match &res {
            Some(r) => with_cpu_f32(r, |rs| {
                with_cpu_f32(&x, |xs| p.forward(xs, b, (h, w), g, Some(rs)))
            })?
            .transpose()?
            .flatten(),
            None => with_cpu_f32(&x, |xs| p.forward(xs, b, (h, w), g, None))?,
        }
        .ok_or_else(|| input_err("convolution input", "not on the CPU, as the weights"))?;
        match out {
            Some((y, ho, wo)) => Ok(Tensor::from_vec(y, (b, p.c_out(), ho, wo), x.device())?),
            None => Err(self.too_small(
                (h, w, upsample),
                ", or the residual's shape is not the output's",
            )),
        }
    }
}

impl Conv2d {
    /// How the CPU kernels read the input: the layer's stride and padding,
    /// after a nearest upsampling by `upsample`.
    fn geometry(&self, upsample: usize) -> Geometry {
        Geometry {
            upsample,
            ..Geometry::symmetric(self.stride, self.padding)
        }
    }

    /// The error for an `h x w` input (upsampled `upsample` times) that
    /// gives no output pixel; `more` adds another possible cause.
    fn too_small(&self, (h, w, upsample): (usize, usize, usize), more: &str) -> VaeError {
        input_err(
            "convolution input",
            format!(
                "{h}x{w} (upsampled {upsample}x) is too small for a {0}x{0} kernel with padding {1}{more}",
                self.kernel, self.padding
            ),
        )
    }

    /// The AMX bf16 kernel: bf16 in, bf16 out (bias added in f32, rounded
    /// once), reading the input upsampled by `upsample`.
    fn run_bf16(&self, c: &ConvBf16, x: &Tensor, upsample: usize) -> Result<Tensor> {
        let (b, h, w) = input_dims(x, c.c_in())?;
        let g = self.geometry(upsample);
        let x = cast(&x.contiguous()?, DType::BF16)?;
        let out = with_cpu::<half::bf16, _>(&x, |xs| c.forward(xs, b, (h, w), g))?
            .ok_or_else(|| input_err("convolution input", "not on the CPU, as the weights"))?;
        match out {
            Some((y, ho, wo)) => Ok(Tensor::from_vec(y, (b, c.c_out(), ho, wo), x.device())?),
            None => Err(self.too_small((h, w, upsample), "")),
        }
    }

    fn run_upsampler(&self, u: &UpsampleConv, x: &Tensor) -> Result<Tensor> {
        let (b, h, w) = input_dims(x, u.c_in())?;
        let x = cast(&x.contiguous()?, DType::F32)?;
        let y = with_cpu_f32(&x, |xs| u.forward(xs, b, (h, w)))?
            .ok_or_else(|| input_err("convolution input", "not on the CPU, as the weights"))?
            .ok_or_else(|| input_err("convolution input", format!("{h}x{w}: empty")))?;
        Ok(Tensor::from_vec(
            y,
            (b, u.c_out(), 2 * h, 2 * w),
            x.device(),
        )?)
    }
}

/// Batch, height and width of a convolution's `[b, c, h, w]` input, checked
/// against the `c_in` channels of its weights.
fn input_dims(x: &Tensor, c_in: usize) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = x.dims4()?;
    if c != c_in {
        return Err(input_err(
            "convolution input",
            format!("{c} channels, the weights expect {c_in}"),
        ));
    }
    Ok((b, h, w))
}

/// Runs `f` on the data of a contiguous f32 CPU tensor (`None` otherwise).
pub(crate) fn with_cpu_f32<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<Option<T>> {
    with_cpu::<f32, T>(x, f)
}

/// Runs `f` on the data of a contiguous CPU tensor of dtype `E` (`None`
/// otherwise).
pub(crate) fn with_cpu<E: candle_core::WithDType, T>(
    x: &Tensor,
    f: impl FnOnce(&[E]) -> T,
) -> Result<Option<T>> {
    let (storage, layout) = x.storage_and_layout();
    Ok(match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((a, b))) => {
            cpu.as_slice::<E>().ok().and_then(|v| v.get(a..b)).map(f)
        }
        _ => None,
    })
}

/// A linear layer with bias (`nn.Linear`), applied to the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight_t: Tensor,
    bias: Tensor,
    dtype: DType,
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out].
    pub(crate) fn load(vb: &Weights, c_in: usize, c_out: usize) -> Result<Self> {
        let dtype = vb.dtype();
        let cdt = ops::conv::compute_dtype(dtype, vb.device());
        let weight_t = get(vb, &[c_out, c_in], "weight")?
            .to_dtype(cdt)?
            .t()?
            .contiguous()?;
        let bias = get(vb, &[c_out], "bias")?.to_dtype(cdt)?;
        Ok(Self {
            weight_t,
            bias,
            dtype,
        })
    }

    /// `x @ W^T + b` for `x` [b, n, in]; output in the model dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.weight_t.dtype())?;
        let y = x
            .broadcast_matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?;
        Ok(y.to_dtype(self.dtype)?)
    }
}

/// `nn.GroupNorm` with affine parameters, computed in f32
/// ([`ops::norm::GroupNorm`]).
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm(ops::norm::GroupNorm);

impl GroupNorm {
    /// Loads `weight` [c] and `bias` [c].
    pub(crate) fn load(vb: &Weights, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let weight = get(vb, &[channels], "weight")?;
        let bias = get(vb, &[channels], "bias")?;
        Ok(Self(ops::norm::GroupNorm::new(
            &weight, &bias, groups, eps,
        )?))
    }

    /// Normalises `x` [b, c, h, w]; the output is f32.
    pub(crate) fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward_f32(x)?)
    }
}

/// The residual blocks' nonlinearity (diffusers' `get_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    Relu,
    Gelu,
    Mish,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            "mish" => Ok(Self::Mish),
            other => Err(VaeError::Config(format!(
                "act_fn `{other}` is not supported"
            ))),
        }
    }

    /// Applies the activation to an f32 tensor.
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => candle_nn::ops::silu(x)?,
            Self::Relu => x.relu()?,
            Self::Gelu => x.gelu_erf()?,
            // x * tanh(softplus(x)); softplus as PyTorch: x above 20 stays x.
            Self::Mish => {
                let sp = x.exp()?.affine(1.0, 1.0)?.log()?;
                let big = x.ge(20f64)?;
                let sp = big.where_cond(x, &sp)?;
                (x * sp.tanh()?)?
            }
        })
    }
}

/// Group norm then activation, rounding as PyTorch does in a half dtype:
/// the norm's output is stored in `dtype`, the activation reads it in f32 and
/// its output is stored in `dtype`.
pub(crate) fn norm_act(
    norm: &GroupNorm,
    act: Activation,
    x: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let fused = match act {
        Activation::Silu => Some(FusedAct::Silu),
        Activation::Relu => Some(FusedAct::Relu),
        Activation::Gelu | Activation::Mish => None,
    };
    if let Some(f) = fused {
        let _s = span(Op::GroupNorm);
        if let Some(y) = norm.0.forward_act(x, f, dtype)? {
            return cast(&y, dtype);
        }
    }
    let y = {
        let _s = span(Op::GroupNorm);
        round_through(&norm.forward_f32(x)?, dtype)?
    };
    let _s = span(Op::Activation);
    cast(&act.apply(&y)?, dtype)
}
