//! diffusers' VAE `Decoder` (group norm variant).

use candle_core::{DType, Tensor};
use lumina2_weights::Weights;

use crate::blocks::{BlockParams, UNetMidBlock2D, UpDecoderBlock2D, EPS};
use crate::config::AutoencoderKLConfig;
use crate::error::Result;
use crate::layers::{norm_act, Activation, Conv2d, GroupNorm};

/// `conv_in -> mid_block -> up_blocks -> norm -> silu -> conv_out`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
}

impl Decoder {
    /// Loads the weights under `vb` (usually the `decoder` prefix).
    pub fn new(cfg: &AutoencoderKLConfig, vb: &Weights) -> Result<Self> {
        cfg.validate()?;
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let p = BlockParams {
            groups: cfg.norm_num_groups,
            act: Activation::parse(&cfg.act_fn)?,
        };
        let top = rev[0];
        let first = rev[rev.len() - 1];
        let conv_in = Conv2d::load(&vb.pp("conv_in"), cfg.latent_channels, top, 3, 1, 1)?;
        let mid_block =
            UNetMidBlock2D::load(&vb.pp("mid_block"), top, cfg.mid_block_add_attention, p)?;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut c_out = top;
        for i in 0..rev.len() {
            let c_in = c_out;
            c_out = rev[i];
            up_blocks.push(UpDecoderBlock2D::load(
                &vb.pp("up_blocks").pp(i),
                c_in,
                c_out,
                cfg.layers_per_block + 1,
                i + 1 != rev.len(),
                p,
            )?);
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), first, p.groups, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
            dtype: vb.dtype(),
        })
    }

    /// Latent [b, latent, h, w] (model dtype) to image [b, out, 8h, 8w].
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x)?;
        for b in &self.up_blocks {
            x = b.forward(&x)?;
        }
        let x = norm_act(&self.conv_norm_out, Activation::Silu, &x, self.dtype)?;
        self.conv_out.forward(&x)
    }
}
