//! Times VAE decodes of random latents:
//! `cargo run -p xtask --release --example decode_time -- MODEL_DIR [LATENT_SIZE] [tiled | tile=SAMPLE_TILE] [--runs N] [--profile] [--dtype f32|bf16|f16]`
//! (MODEL_DIR: a diffusers VAE folder; LATENT_SIZE defaults to 64, a 512x512
//! image; `tiled`: diffusers' default tiling; `tile=512`: tiles of 512 pixels
//! (64 latents); `--runs N`: N timed decodes after one warm-up (default: one
//! decode, no warm-up); `--profile`: time per op group of the last decode;
//! `--dtype`: the model dtype, f32 by default).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lumina2_vae::{profile, AutoencoderKL, AutoencoderKLConfig, Tiling, Weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: decode_time MODEL_DIR [LATENT_SIZE] [tiled | tile=N] [--runs N] [--profile] [--dtype f32|bf16|f16]";
    let dir = std::path::PathBuf::from(args.first().ok_or(usage)?);
    let mut size = 64;
    let mut runs = 0;
    let mut tiling = None;
    let mut prof = false;
    let mut dtype = DType::F32;
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "tiled" => tiling = Some(None),
            "--profile" => prof = true,
            "--runs" => runs = rest.next().ok_or(usage)?.parse()?,
            "--dtype" => {
                dtype = match rest.next().map(String::as_str) {
                    Some("f32") => DType::F32,
                    Some("bf16") => DType::BF16,
                    Some("f16") => DType::F16,
                    _ => return Err(usage.into()),
                }
            }
            s if s.starts_with("tile=") => tiling = Some(Some(s[5..].parse::<usize>()?)),
            s => size = s.parse()?,
        }
    }
    let dev = Device::Cpu;
    let cfg = AutoencoderKLConfig::from_file(&dir)?;
    let weights = Weights::from_safetensors(
        &[dir.join("diffusion_pytorch_model.safetensors")],
        dtype,
        &dev,
    )?;
    let mut vae = AutoencoderKL::new(&cfg, &weights)?;
    match tiling {
        Some(None) => vae.enable_tiling(),
        Some(Some(sample_tile)) => vae.set_tiling(Some(Tiling {
            sample_tile,
            latent_tile: sample_tile / cfg.downsample_factor(),
            overlap_factor: 0.25,
        })),
        None => {}
    }
    let z =
        Tensor::randn(0f32, 1f32, (1, cfg.latent_channels, size, size), &dev)?.to_dtype(dtype)?;
    let mut times = Vec::new();
    for k in 0..=runs {
        profile::reset();
        profile::enable(prof && k == runs);
        let t0 = Instant::now();
        let img = vae.decode(&z)?;
        let s = t0.elapsed().as_secs_f64();
        println!("decode {:?} -> {:?}: {s:.2} s", z.dims(), img.dims());
        if k > 0 || runs == 0 {
            times.push(s);
        }
    }
    times.sort_by(f64::total_cmp);
    println!("median of {}: {:.2} s", times.len(), times[times.len() / 2]);
    if prof {
        let rows = profile::report();
        let total: f64 = rows.iter().map(|r| r.1).sum();
        println!("| op group | seconds | share | calls |\n|---|---|---|---|");
        for (op, s, calls) in rows {
            println!(
                "| {} | {s:.3} | {:.1}% | {calls} |",
                op.name(),
                100.0 * s / total
            );
        }
        println!("| total in spans | {total:.3} | | |");
    }
    Ok(())
}
