//! The encoder's and decoder's blocks: `DownEncoderBlock2D`,
//! `UpDecoderBlock2D` and `UNetMidBlock2D`.

use candle_core::Tensor;
use lumina2_weights::Weights;

use crate::attention::Attention;
use crate::error::Result;
use crate::layers::{Activation, Conv2d};
use crate::resnet::ResnetBlock2D;

/// Group-norm epsilon of every block of the VAE.
pub(crate) const EPS: f64 = 1e-6;

/// Shared parameters of a block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockParams {
    pub groups: usize,
    pub act: Activation,
}

/// `resnets.0..n`: the first maps `c_in` to `c_out`, the others keep `c_out`.
fn load_resnets(
    vb: &Weights,
    c_in: usize,
    c_out: usize,
    num_layers: usize,
    p: BlockParams,
) -> Result<Vec<ResnetBlock2D>> {
    (0..num_layers)
        .map(|i| {
            let ci = if i == 0 { c_in } else { c_out };
            ResnetBlock2D::load(&vb.pp("resnets").pp(i), ci, c_out, p.groups, EPS, p.act)
        })
        .collect()
}

/// `num_layers` resnets, then (except at the last level) a stride-2 3x3
/// convolution after padding right and bottom by one (`Downsample2D`, padding 0).
#[derive(Debug, Clone)]
pub(crate) struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Conv2d>,
}

impl DownEncoderBlock2D {
    pub(crate) fn load(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        num_layers: usize,
        add_downsample: bool,
        p: BlockParams,
    ) -> Result<Self> {
        let resnets = load_resnets(vb, c_in, c_out, num_layers, p)?;
        let downsample = if add_downsample {
            Some(Conv2d::load(
                &vb.pp("downsamplers").pp("0").pp("conv"),
                c_out,
                c_out,
                3,
                2,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsample,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        if let Some(conv) = &self.downsample {
            let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            x = conv.forward(&padded)?;
        }
        Ok(x)
    }
}

/// `num_layers` resnets, then (except at the last level) nearest 2x upsampling
/// and a 3x3 convolution (`Upsample2D`).
#[derive(Debug, Clone)]
pub(crate) struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Conv2d>,
}

impl UpDecoderBlock2D {
    pub(crate) fn load(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        num_layers: usize,
        add_upsample: bool,
        p: BlockParams,
    ) -> Result<Self> {
        let resnets = load_resnets(vb, c_in, c_out, num_layers, p)?;
        let upsample = if add_upsample {
            Some(Conv2d::load_upsampler(
                &vb.pp("upsamplers").pp("0").pp("conv"),
                c_out,
            )?)
        } else {
            None
        };
        Ok(Self { resnets, upsample })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        if let Some(conv) = &self.upsample {
            x = conv.forward_upsampled(&x)?;
        }
        Ok(x)
    }
}

/// A resnet, then (with attention) attention and another resnet.
#[derive(Debug, Clone)]
pub(crate) struct UNetMidBlock2D {
    first: ResnetBlock2D,
    attention: Option<Attention>,
    second: ResnetBlock2D,
}

impl UNetMidBlock2D {
    pub(crate) fn load(
        vb: &Weights,
        channels: usize,
        add_attention: bool,
        p: BlockParams,
    ) -> Result<Self> {
        let r = vb.pp("resnets");
        Ok(Self {
            first: ResnetBlock2D::load(&r.pp("0"), channels, channels, p.groups, EPS, p.act)?,
            attention: if add_attention {
                Some(Attention::load(
                    &vb.pp("attentions").pp("0"),
                    channels,
                    p.groups,
                    EPS,
                )?)
            } else {
                None
            },
            second: ResnetBlock2D::load(&r.pp("1"), channels, channels, p.groups, EPS, p.act)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.first.forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.second.forward(&x)
    }
}
