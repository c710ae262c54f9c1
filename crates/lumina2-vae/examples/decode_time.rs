//! Times one f32 decode of random latents: `decode_time MODEL_DIR [LATENT_SIZE] [tiled]`
//! (MODEL_DIR: a diffusers VAE folder; LATENT_SIZE defaults to 64, a 512x512 image).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig, VarBuilder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(
        args.get(1)
            .ok_or("usage: decode_time MODEL_DIR [LATENT_SIZE] [tiled]")?,
    );
    let size: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let dev = Device::Cpu;
    let cfg = AutoencoderKLConfig::from_file(&dir)?;
    let weights =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)?;
    let mut vae = AutoencoderKL::new(&cfg, &VarBuilder::from_tensors(weights, DType::F32, &dev))?;
    if args.get(3).map(String::as_str) == Some("tiled") {
        vae.enable_tiling();
    }
    let z = Tensor::randn(0f32, 1f32, (1, cfg.latent_channels, size, size), &dev)?;
    let t0 = Instant::now();
    let img = vae.decode(&z)?;
    println!(
        "decode {:?} -> {:?}: {:.2} s",
        z.dims(),
        img.dims(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
