//! diffusers' `ResnetBlock2D` without time embedding (as the VAE uses it).

use candle_core::{DType, Tensor};
use lumina2_weights::Weights;

use crate::error::Result;
use crate::layers::{norm_act, Activation, Conv2d, GroupNorm};

/// `norm1 -> act -> conv1 -> norm2 -> act -> conv2`, plus the input (through a
/// 1x1 `conv_shortcut` when the channel count changes).
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    dtype: DType,
}

impl ResnetBlock2D {
    pub(crate) fn load(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        groups: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), c_in, groups, eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), c_out, groups, eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out {
                Some(Conv2d::load(&vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?)
            } else {
                None
            },
            act,
            dtype: vb.dtype(),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = norm_act(&self.norm1, self.act, x, self.dtype)?;
        let h = self.conv1.forward(&h)?;
        let h = norm_act(&self.norm2, self.act, &h, self.dtype)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_add(&h, &shortcut)
    }
}
