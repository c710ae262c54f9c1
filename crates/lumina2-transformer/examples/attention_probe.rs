//! Time of the attention core on the transformer's shapes (24 query heads,
//! 8 key heads, head size 96), against the floating-point work it does: bf16
//! unfused (`grouped_attention_packed`) and fused (`flash::attention_bf16`),
//! then f32 unfused (`grouped_attention`) and fused (`flash::attention_f32`).
//! `cargo run --release -p lumina2-transformer --example attention_probe`
use candle_core::{DType, Device, Tensor};
use lumina2_transformer::{grouped_attention_packed, KeyMask};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    if !lumina2_weights::packed::available() {
        println!("no packed bf16 kernel on this CPU");
        return Ok(());
    }
    let budget = lumina2_transformer::attention::PACKED_SCORE_BUDGET;
    for &(s, masked) in &[(1280usize, false), (4352, false), (1280, true)] {
        let (h, kv, d) = (24, 8, 96);
        let q = Tensor::randn(0f32, 1., (1, h, s, d), &dev)?.to_dtype(DType::BF16)?;
        let k = Tensor::randn(0f32, 1., (1, kv, s, d), &dev)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1., (1, kv, s, d), &dev)?.to_dtype(DType::BF16)?;
        let valid: Vec<Vec<bool>> = vec![(0..s).map(|j| j < s - 100).collect()];
        let mask = KeyMask::from_valid(&valid, &dev).map_err(candle_core::Error::wrap)?;
        let mask = masked.then_some(&mask);
        let scale = 1.0 / (d as f32).sqrt();
        grouped_attention_packed(&q, &k, &v, mask, budget, scale)?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            grouped_attention_packed(&q, &k, &v, mask, budget, scale)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        let bias = masked
            .then(|| {
                Tensor::from_vec(
                    valid[0]
                        .iter()
                        .map(|&v| if v { 0f32 } else { f32::NEG_INFINITY })
                        .collect::<Vec<_>>(),
                    (1, s),
                    &dev,
                )
            })
            .transpose()?;
        let mut fused = f64::NAN;
        if lumina2_weights::flash::attention_bf16(&q, &k, &v, bias.as_ref(), scale)?.is_some() {
            fused = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                lumina2_weights::flash::attention_bf16(&q, &k, &v, bias.as_ref(), scale)?;
                fused = fused.min(t.elapsed().as_secs_f64());
            }
        }
        let flop = 4.0 * (h * s * s * d) as f64;
        println!(
            "S {s}{}: unfused {:.1} ms ({:.0} GFLOP/s), fused {:.1} ms ({:.0} GFLOP/s)",
            if masked { " masked" } else { "" },
            best * 1e3,
            flop / best / 1e9,
            fused * 1e3,
            flop / fused / 1e9
        );
    }
    for &(s, masked) in &[(1280usize, false), (4352, false), (1280, true)] {
        let (h, kv, d) = (24, 8, 96);
        let scale = 1.0 / (d as f32).sqrt();
        let q = Tensor::randn(0f32, 1., (1, h, s, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, kv, s, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, kv, s, d), &dev)?;
        let valid: Vec<Vec<bool>> = vec![(0..s).map(|j| j < s - 100).collect()];
        let mask = KeyMask::from_valid(&valid, &dev).map_err(candle_core::Error::wrap)?;
        let bias = masked
            .then(|| {
                let b: Vec<f32> = valid[0]
                    .iter()
                    .map(|&v| if v { 0.0 } else { f32::NEG_INFINITY })
                    .collect();
                Tensor::from_vec(b, (1, s), &dev)
            })
            .transpose()?;
        let mask = masked.then_some(&mask);
        let qs = (&q * scale as f64)?;
        let time = |f: &dyn Fn() -> candle_core::Result<()>| -> candle_core::Result<f64> {
            f()?;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let unfused = time(&|| {
            lumina2_transformer::grouped_attention(&qs, &k, &v, mask, 64 << 20).map(|_| ())
        })?;
        let fused = time(&|| {
            lumina2_weights::flash::attention_f32(&q, &k, &v, bias.as_ref(), scale).map(|_| ())
        })?;
        let flop = 4.0 * (h * s * s * d) as f64;
        println!(
            "f32 S {s}{}: unfused {:.1} ms ({:.0} GFLOP/s), fused {:.1} ms ({:.0} GFLOP/s)",
            if masked { " masked" } else { "" },
            unfused * 1e3,
            flop / unfused / 1e9,
            fused * 1e3,
            flop / fused / 1e9
        );
    }
    Ok(())
}
