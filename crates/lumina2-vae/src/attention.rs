//! The single-head spatial self-attention of the VAE's middle block
//! (diffusers' `Attention` with `residual_connection`, group norm and one head).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use lumina2_weights::Weights;

use crate::error::{input_err, Result};
use crate::layers::{get, with_cpu_f32, GroupNorm, Linear};
use crate::profile::{span, Op};
use lumina2_kernels::attention::vae::{LinearWeights, PackedAttention};
use lumina2_kernels::ops;

/// Queries per chunk: bounds the score matrix to `QUERY_CHUNK x tokens` f32.
const QUERY_CHUNK: usize = 1024;

/// `x + to_out(softmax(q k^T / sqrt(c)) v)` over the `h*w` positions, with
/// q, k, v projections of `group_norm(x)`. Scores and softmax in f32.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// The f32 CPU path (`lumina2_kernels::attention::vae`), when available.
    packed: Option<Arc<PackedAttention>>,
    channels: usize,
    dtype: DType,
}

impl Attention {
    pub(crate) fn load(vb: &Weights, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let packed = if ops::attention::vae_kernel(vb.device(), vb.dtype()) {
            let lin = |name: &str| -> Result<LinearWeights> {
                let v = vb.pp(name);
                Ok(LinearWeights {
                    weight: get(&v, &[channels, channels], "weight")?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?,
                    bias: get(&v, &[channels], "bias")?
                        .to_dtype(DType::F32)?
                        .to_vec1()?,
                })
            };
            PackedAttention::new(
                &lin("to_q")?,
                &lin("to_k")?,
                &lin("to_v")?,
                &lin("to_out.0")?,
                channels,
            )
            .map(Arc::new)
        } else {
            None
        };
        Ok(Self {
            packed,
            group_norm: GroupNorm::load(&vb.pp("group_norm"), channels, groups, eps)?,
            to_q: Linear::load(&vb.pp("to_q"), channels, channels)?,
            to_k: Linear::load(&vb.pp("to_k"), channels, channels)?,
            to_v: Linear::load(&vb.pp("to_v"), channels, channels)?,
            to_out: Linear::load(&vb.pp("to_out").pp("0"), channels, channels)?,
            channels,
            dtype: vb.dtype(),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _s = span(Op::Attention);
        if let Some(p) = &self.packed {
            return self.forward_packed(p, x);
        }
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let hs = crate::layers::cast(&self.group_norm.forward_f32(x)?, self.dtype)?;
        let hs = hs.reshape((b, c, n))?.transpose(1, 2)?.contiguous()?;
        // Projections are stored in the model dtype (as PyTorch does), then
        // attention reads them in f32.
        let q = self.to_q.forward(&hs)?.to_dtype(DType::F32)?;
        let k = self.to_k.forward(&hs)?.to_dtype(DType::F32)?;
        let v = self.to_v.forward(&hs)?.to_dtype(DType::F32)?;
        let kt = k.transpose(1, 2)?.contiguous()?;
        let scale = 1.0 / (self.channels as f64).sqrt();
        let mut outs = Vec::with_capacity(n.div_ceil(QUERY_CHUNK));
        let mut start = 0;
        while start < n {
            let len = QUERY_CHUNK.min(n - start);
            let qc = q.narrow(1, start, len)?;
            let scores = (qc.matmul(&kt)? * scale)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            outs.push(probs.matmul(&v)?);
            start += len;
        }
        let attn = Tensor::cat(&outs, 1)?;
        let attn = crate::layers::cast(&attn, self.dtype)?;
        let out = self.to_out.forward(&attn)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + x)?)
    }

    /// The f32 CPU path (see `lumina2_kernels::attention::vae`).
    fn forward_packed(&self, p: &PackedAttention, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            return Err(input_err(
                "attention input",
                format!("{c} channels, the weights expect {}", self.channels),
            ));
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let hs = self.group_norm.forward_f32(&x)?.contiguous()?;
        let y = with_cpu_f32(&hs, |hv| with_cpu_f32(&x, |xv| p.forward(hv, xv, b, h * w)))?
            .transpose()?
            .flatten()
            .flatten()
            .ok_or_else(|| input_err("attention input", "not on the CPU, as the weights"))?;
        Ok(Tensor::from_vec(y, (b, c, h, w), x.device())?)
    }
}
