//! diffusers' `AutoencoderKL`: encoder, decoder, optional 1x1 quant convs,
//! the diagonal Gaussian posterior, the latent transform and tiling.

use candle_core::{DType, Device, Tensor};
use lumina2_weights::Weights;

use crate::config::AutoencoderKLConfig;
use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::error::{input_err, Result};
use crate::layers::Conv2d;
use crate::tiling::{tiled, Tiling};

/// The latent distribution `encode` returns (diffusers'
/// `DiagonalGaussianDistribution`): `logvar` is already clamped to [-30, 20].
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// Mean [b, latent, h, w].
    pub mean: Tensor,
    /// Log-variance [b, latent, h, w], clamped to [-30, 20].
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments [b, 2 latent, h, w] into mean and clamped log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)?;
        if c % 2 != 0 {
            return Err(input_err("moments", format!("odd channel count {c}")));
        }
        let mean = moments.narrow(1, 0, c / 2)?.contiguous()?;
        let logvar = moments
            .narrow(1, c / 2, c / 2)?
            .clamp(-30f32, 20f32)?
            .contiguous()?;
        Ok(Self { mean, logvar })
    }

    /// The standard deviation `exp(0.5 logvar)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// The mode (the mean), what pipelines use with `sample_mode="argmax"`.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// A sample `mean + std * noise` for caller-supplied standard normal
    /// `noise` of the mean's shape (never drawn here).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(input_err(
                "noise",
                format!(
                    "shape {:?}, expected the mean's {:?}",
                    noise.dims(),
                    self.mean.dims()
                ),
            ));
        }
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }
}

/// diffusers' `AutoencoderKL` (e.g. the Flux VAE of Lumina-Image 2.0).
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    tiling: Option<Tiling>,
    dtype: DType,
    device: Device,
}

impl AutoencoderKL {
    /// Loads the model from diffusers' weight keys (`encoder.*`, `decoder.*`,
    /// `quant_conv.*`, `post_quant_conv.*`) at `vb`'s root, in `vb`'s dtype and
    /// device. Every shape is checked against `config`.
    pub fn new(config: &AutoencoderKLConfig, vb: &Weights) -> Result<Self> {
        config.validate()?;
        let l = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(config, &vb.pp("encoder"))?,
            decoder: Decoder::new(config, &vb.pp("decoder"))?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(&vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(&vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
            } else {
                None
            },
            config: config.clone(),
            tiling: None,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The dtype the model computes in (outputs have it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns tiling on with diffusers' defaults (`vae.enable_tiling()`):
    /// `decode` and `encode` then tile inputs larger than a tile.
    pub fn enable_tiling(&mut self) {
        self.tiling = Some(Tiling::from_config(&self.config));
    }

    /// Sets (or with `None` turns off) tiling with custom tile sizes.
    pub fn set_tiling(&mut self, tiling: Option<Tiling>) {
        self.tiling = tiling;
    }

    /// The tiling in effect, if any.
    pub fn tiling(&self) -> Option<Tiling> {
        self.tiling
    }

    fn check_input(&self, x: &Tensor, name: &'static str, channels: usize) -> Result<Tensor> {
        if x.rank() != 4 {
            return Err(input_err(
                name,
                format!("rank {} (shape {:?}), expected 4", x.rank(), x.dims()),
            ));
        }
        if !x.dtype().is_float() {
            return Err(input_err(
                name,
                format!("dtype {:?}, expected a float dtype", x.dtype()),
            ));
        }
        let (b, c, h, w) = x.dims4()?;
        if c != channels {
            return Err(input_err(
                name,
                format!("{c} channels, expected {channels}"),
            ));
        }
        if b == 0 || h == 0 || w == 0 {
            return Err(input_err(name, format!("empty shape {:?}", x.dims())));
        }
        Ok(x.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Errors unless every downsampling of the encoder sees at least 2 pixels
    /// (what its padded stride-2 convolution needs).
    fn check_encodable(&self, h: usize, w: usize) -> Result<()> {
        let (mut hh, mut ww) = (h, w);
        for _ in 1..self.config.block_out_channels.len() {
            if hh < 2 || ww < 2 {
                return Err(input_err(
                    "sample",
                    format!("{h}x{w} (or one of its tiles) is too small to encode: a level sees {hh}x{ww}"),
                ));
            }
            hh = (hh - 2) / 2 + 1;
            ww = (ww - 2) / 2 + 1;
        }
        Ok(())
    }

    /// Decodes latents [b, latent_channels, h, w], exactly what diffusers'
    /// `AutoencoderKL.decode` receives (already `latents / scaling_factor +
    /// shift_factor`; see [`Self::unscale_latents`]), into images [b, out, 8h, 8w]
    /// in [-1, 1] (roughly) in the model dtype. With tiling on, latents larger
    /// than a tile are decoded tile by tile.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.check_input(latents, "latents", self.config.latent_channels)?;
        if let Some(t) = self.tiling {
            let (_, _, h, w) = z.dims4()?;
            if h > t.latent_tile || w > t.latent_tile {
                return self.tiled_decode_checked(&z, &t);
            }
        }
        self.decode_tile(&z)
    }

    /// Decodes with tiles whatever the size (diffusers' `tiled_decode`), with
    /// the tiling in effect or diffusers' default tiling.
    pub fn tiled_decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.check_input(latents, "latents", self.config.latent_channels)?;
        let t = self
            .tiling
            .unwrap_or_else(|| Tiling::from_config(&self.config));
        self.tiled_decode_checked(&z, &t)
    }

    fn tiled_decode_checked(&self, z: &Tensor, t: &Tiling) -> Result<Tensor> {
        tiled(z, t.latent_tile, t.sample_tile, t, |tile| {
            self.decode_tile(tile)
        })
    }

    fn decode_tile(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Encodes images [b, in_channels, H, W] in [-1, 1] into the latent
    /// distribution (diffusers' `encode(x).latent_dist`). With tiling on,
    /// images larger than a tile are encoded tile by tile.
    pub fn encode(&self, sample: &Tensor) -> Result<DiagonalGaussian> {
        let x = self.check_input(sample, "sample", self.config.in_channels)?;
        let (_, _, h, w) = x.dims4()?;
        let moments = match self.tiling {
            Some(t) if h > t.sample_tile || w > t.sample_tile => self.tiled_moments(&x, &t)?,
            _ => self.encode_tile(&x)?,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Encodes with tiles whatever the size (diffusers' `tiled_encode`), with
    /// the tiling in effect or diffusers' default tiling.
    pub fn tiled_encode(&self, sample: &Tensor) -> Result<DiagonalGaussian> {
        let x = self.check_input(sample, "sample", self.config.in_channels)?;
        let t = self
            .tiling
            .unwrap_or_else(|| Tiling::from_config(&self.config));
        DiagonalGaussian::from_moments(&self.tiled_moments(&x, &t)?)
    }

    fn tiled_moments(&self, x: &Tensor, t: &Tiling) -> Result<Tensor> {
        tiled(x, t.sample_tile, t.latent_tile, t, |tile| {
            self.encode_tile(tile)
        })
    }

    fn encode_tile(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.check_encodable(h, w)?;
        let m = self.encoder.forward(x)?;
        match &self.quant_conv {
            Some(c) => c.forward(&m),
            None => Ok(m),
        }
    }

    /// The pipeline's transform before decoding: `latents / scaling_factor +
    /// shift_factor` (no shift when the config has none), computed as PyTorch
    /// does (in f32 for half dtypes, each step stored in the tensor's dtype).
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let x = scalar_op(latents, self.config.scaling_factor, Op::Div)?;
        match self.config.shift_factor {
            Some(s) => scalar_op(&x, s, Op::Add),
            None => Ok(x),
        }
    }

    /// The inverse, after encoding: `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let x = match self.config.shift_factor {
            Some(s) => scalar_op(z, s, Op::Sub)?,
            None => z.clone(),
        };
        scalar_op(&x, self.config.scaling_factor, Op::Mul)
    }
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

/// `x op s` with the Python float `s` as PyTorch applies it: in f32 (the
/// scalar rounded to f32), the result stored in `x`'s dtype.
fn scalar_op(x: &Tensor, s: f64, op: Op) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let st = Tensor::new(s as f32, x.device())?;
    let y = match op {
        Op::Add => xf.broadcast_add(&st)?,
        Op::Sub => xf.broadcast_sub(&st)?,
        Op::Mul => xf.broadcast_mul(&st)?,
        Op::Div => xf.broadcast_div(&st)?,
    };
    Ok(y.to_dtype(dtype)?)
}
