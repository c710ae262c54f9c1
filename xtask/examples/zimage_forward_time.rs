//! Times Z-Image transformer forwards on random inputs:
//! `cargo run -p xtask --release --example zimage_forward_time -- TRANSFORMER_DIR [LATENT_SIZE] [--cap N] [--batch B] [--runs N] [--profile] [--dtype f32|bf16]`
//! (TRANSFORMER_DIR: a diffusers `ZImageTransformer2DModel` folder;
//! LATENT_SIZE defaults to 64, a 512x512 image; `--cap N`: caption tokens per
//! item, 32 by default; `--runs N`: N timed forwards after one warm-up;
//! `--profile`: time per op group of the last forward).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::profile;
use lumina2_transformer::{Weights, ZImageConfig, ZImageTransformer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: zimage_forward_time DIR [LATENT_SIZE] [--cap N] [--batch B] [--runs N] [--profile] [--dtype f32|bf16]";
    let dir = std::path::PathBuf::from(args.first().ok_or(usage)?);
    let (mut size, mut cap, mut batch, mut runs, mut prof) =
        (64usize, 32usize, 1usize, 1usize, false);
    let mut dtype = DType::BF16;
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--profile" => prof = true,
            "--runs" => runs = rest.next().ok_or(usage)?.parse()?,
            "--cap" => cap = rest.next().ok_or(usage)?.parse()?,
            "--batch" => batch = rest.next().ok_or(usage)?.parse()?,
            "--dtype" => {
                dtype = match rest.next().map(String::as_str) {
                    Some("f32") => DType::F32,
                    Some("bf16") => DType::BF16,
                    _ => return Err(usage.into()),
                }
            }
            s => size = s.parse()?,
        }
    }
    let dev = Device::Cpu;
    let cfg = ZImageConfig::from_file(dir.join("config.json"))?;
    let t0 = Instant::now();
    let weights = Weights::from_safetensors(
        &[dir.join("diffusion_pytorch_model.safetensors")],
        dtype,
        &dev,
    )?;
    let model = ZImageTransformer::new(&cfg, &weights)?;
    println!("load: {:.2} s", t0.elapsed().as_secs_f64());
    let x = Tensor::randn(0f32, 1f32, (batch, cfg.in_channels, size, size), &dev)?;
    let t = Tensor::full(0.5f32, batch, &dev)?;
    let caps: Vec<Tensor> = (0..batch)
        .map(|_| Tensor::randn(0f32, 1f32, (cap, cfg.cap_feat_dim), &dev))
        .collect::<candle_core::Result<_>>()?;
    let mut times = Vec::new();
    for k in 0..=runs {
        profile::reset();
        profile::enable(prof && k == runs);
        let t0 = Instant::now();
        let out = model.forward(&x, &t, &caps)?;
        let s = t0.elapsed().as_secs_f64();
        println!("forward {:?}: {s:.2} s", out.dims());
        if k > 0 {
            times.push(s);
        }
    }
    times.sort_by(f64::total_cmp);
    println!("median of {}: {:.3} s", times.len(), times[times.len() / 2]);
    if prof {
        let rows = profile::report();
        let total: f64 = rows.iter().map(|r| r.1).sum();
        println!("| op group | seconds | share | calls |\n|---|---|---|---|");
        for (op, s, calls) in rows {
            println!("| {op} | {s:.3} | {:.0}% | {calls} |", 100.0 * s / total);
        }
    }
    Ok(())
}
