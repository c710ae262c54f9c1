//! Times one encoding of the Gemma-2 text encoder:
//! `cargo run -p xtask --release --example encode_time -- MODEL_DIR [LEN] [f32|bf16]`.
//!
//! Loads the transformers folder (all layers but the last), encodes one
//! sequence of LEN (default 256) token ids (a fixed pattern), and prints the
//! load time and the time of a second forward pass (after a warm-up).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lumina2_text_encoder::Gemma2Encoder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: encode_time MODEL_DIR [LEN] [f32|bf16]")?;
    let len: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(256);
    let dtype = match args.next().as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let t0 = Instant::now();
    let enc = Gemma2Encoder::from_folder(&dir, dtype, &Device::Cpu)?;
    let load = t0.elapsed().as_secs_f64();
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 7 + 3) % 500).collect();
    let ids = Tensor::from_vec(ids, (1, len), &Device::Cpu)?;
    let _ = enc.forward(&ids, None)?;
    let t1 = Instant::now();
    let out = enc.forward(&ids, None)?;
    let run = t1.elapsed().as_secs_f64();
    println!(
        "layers run {} load {load:.3}s forward {run:.3}s out {:?}",
        enc.num_layers(),
        out.dims()
    );
    Ok(())
}
