//! Times the load of the two large components of a diffusers pipeline folder:
//! `cargo run -p xtask --release --example load_time -- PIPELINE_DIR [f32|bf16]`.
//!
//! Builds the Gemma-2 text encoder (all layers but the last, as the pipeline
//! does) and the transformer from their folders, and prints for each the
//! wall time and the process's user and system CPU time (from
//! `/proc/self/stat`), so that page-fault and copy costs show apart from
//! the arithmetic.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use lumina2_text_encoder::Gemma2Encoder;
use lumina2_transformer::{Config, Lumina2Transformer};
use lumina2_weights::{ComponentFolder, Weights};

/// (user, system) CPU seconds of this process so far.
fn cpu_times() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0;
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / tick;
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
    (get(11), get(12))
}

fn timed<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, Box<dyn std::error::Error>>,
) -> Result<T, Box<dyn std::error::Error>> {
    let (u0, s0) = cpu_times();
    let t0 = Instant::now();
    let v = f()?;
    let wall = t0.elapsed().as_secs_f64();
    let (u1, s1) = cpu_times();
    println!(
        "{what}: wall {wall:.2} s, user {:.2} s, sys {:.2} s",
        u1 - u0,
        s1 - s0
    );
    Ok(v)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: load_time PIPELINE_DIR [f32|bf16]")?;
    let dtype = match args.next().as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let dir = Path::new(&dir);
    let enc = timed("text encoder", || {
        Ok(Gemma2Encoder::from_folder(
            dir.join("text_encoder"),
            dtype,
            &Device::Cpu,
        )?)
    })?;
    let tr = timed("transformer", || {
        let tdir = dir.join("transformer");
        let cfg = Config::from_file(tdir.join("config.json"))?;
        let folder = ComponentFolder::open(&tdir)?;
        let w = Weights::from_safetensors(folder.safetensors_files(), dtype, &Device::Cpu)?;
        Ok(Lumina2Transformer::new(&cfg, &w)?)
    })?;
    println!(
        "loaded {} text layers; transformer {:?}",
        enc.num_layers(),
        std::mem::size_of_val(&tr)
    );
    Ok(())
}
