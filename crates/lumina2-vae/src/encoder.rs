//! diffusers' VAE `Encoder` (with `double_z`: it outputs mean and log-variance).

use candle_core::{DType, Tensor};
use lumina2_weights::Weights;

use crate::blocks::{BlockParams, DownEncoderBlock2D, UNetMidBlock2D, EPS};
use crate::config::AutoencoderKLConfig;
use crate::error::Result;
use crate::layers::{norm_act, Activation, Conv2d, GroupNorm};

/// `conv_in -> down_blocks -> mid_block -> norm -> silu -> conv_out`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
}

impl Encoder {
    /// Loads the weights under `vb` (usually the `encoder` prefix).
    pub fn new(cfg: &AutoencoderKLConfig, vb: &Weights) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let p = BlockParams {
            groups: cfg.norm_num_groups,
            act: Activation::parse(&cfg.act_fn)?,
        };
        let first = ch[0];
        let last = ch[ch.len() - 1];
        let conv_in = Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, first, 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut c_out = first;
        for i in 0..ch.len() {
            let c_in = c_out;
            c_out = ch[i];
            down_blocks.push(DownEncoderBlock2D::load(
                &vb.pp("down_blocks").pp(i),
                c_in,
                c_out,
                cfg.layers_per_block,
                i + 1 != ch.len(),
                p,
            )?);
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: UNetMidBlock2D::load(
                &vb.pp("mid_block"),
                last,
                cfg.mid_block_add_attention,
                p,
            )?,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), last, p.groups, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
            dtype: vb.dtype(),
        })
    }

    /// Image [b, in, H, W] (model dtype) to moments [b, 2 latent, h, w].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        let x = norm_act(&self.conv_norm_out, Activation::Silu, &x, self.dtype)?;
        self.conv_out.forward(&x)
    }
}
