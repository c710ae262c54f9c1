//! The initial latents: diffusers' `prepare_latents`.

use candle_core::{DType, Device, Tensor};

use crate::error::{invalid, Result};
use crate::options::Noise;
use crate::torch_rng::TorchGenerator;

/// The latent shape diffusers uses for an image: `[batch, channels, 2 *
/// (height / 16), 2 * (width / 16)]` (the VAE's factor 8 and the patch of 2).
pub fn latent_shape(
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> (usize, usize, usize, usize) {
    (batch, channels, 2 * (height / 16), 2 * (width / 16))
}

/// Draws the initial latents in `dtype` on `device`.
///
/// A seed draws exactly what `torch.randn(shape, generator=torch.Generator("cpu")
/// .manual_seed(seed), dtype=dtype)` returns on this machine's PyTorch (see
/// [`crate::torch_rng`]), in the dtype of the pipeline as diffusers does (it
/// draws in the text encoder's dtype).
pub fn initial_latents(
    noise: &Noise,
    shape: (usize, usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let (b, c, h, w) = shape;
    let per_image = c * h * w;
    let t = match noise {
        Noise::Seed(seed) => draw(&mut TorchGenerator::new(*seed), b * per_image, dtype)?,
        Noise::Seeds(seeds) => {
            if seeds.len() != b {
                return Err(invalid(
                    "generator",
                    format!("{} seeds for a batch of {b}", seeds.len()),
                ));
            }
            let parts = seeds
                .iter()
                .map(|s| draw(&mut TorchGenerator::new(*s), per_image, dtype))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        }
        Noise::Latents(l) => {
            if l.dims() != [b, c, h, w] {
                return Err(invalid(
                    "latents",
                    format!("shape {:?}, expected {:?}", l.dims(), [b, c, h, w]),
                ));
            }
            return Ok(l.to_device(device)?.to_dtype(dtype)?);
        }
    };
    Ok(t.reshape((b, c, h, w))?.to_device(device)?)
}

pub(crate) fn draw(g: &mut TorchGenerator, n: usize, dtype: DType) -> Result<Tensor> {
    let dev = Device::Cpu;
    Ok(match dtype {
        DType::F32 => Tensor::from_vec(g.randn_f32(n), n, &dev)?,
        DType::BF16 => Tensor::from_vec(g.randn_bf16(n), n, &dev)?,
        DType::F16 => Tensor::from_vec(g.randn_f16(n), n, &dev)?,
        other => {
            return Err(invalid(
                "dtype",
                format!("no noise generator for {other:?} (use f32, bf16 or f16)"),
            ))
        }
    })
}
