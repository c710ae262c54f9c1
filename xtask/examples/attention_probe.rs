//! Time of the attention core on the transformer's shapes (24 query heads,
//! 8 key heads, head size 96), against the floating-point work it does: bf16
//! unfused (`grouped_attention_packed`) and fused (`flash::attention_bf16`,
//! AMX), then f32 unfused (`grouped_attention`) and fused
//! (`flash::attention_f32`, AVX-512). Best of 3 after a warm-up.
//! `cargo run -p xtask --release --example attention_probe`

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::attention::flash;
use lumina2_transformer::{grouped_attention, grouped_attention_packed, KeyMask};
use std::time::Instant;

/// Best of 3 timed runs after a warm-up; NaN when `f` says the path does
/// not run here.
fn best_of_3(f: &dyn Fn() -> candle_core::Result<bool>) -> candle_core::Result<f64> {
    if !f()? {
        return Ok(f64::NAN);
    }
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let budget = lumina2_transformer::attention::PACKED_SCORE_BUDGET;
    for dtype in [DType::BF16, DType::F32] {
        if dtype == DType::BF16 && !lumina2_kernels::gemm::packed::available() {
            println!("no packed bf16 kernel on this CPU");
            continue;
        }
        for &(s, masked) in &[(1280usize, false), (4352, false), (1280, true)] {
            let (h, kv, d) = (24, 8, 96);
            let q = Tensor::randn(0f32, 1., (1, h, s, d), &dev)?.to_dtype(dtype)?;
            let k = Tensor::randn(0f32, 1., (1, kv, s, d), &dev)?.to_dtype(dtype)?;
            let v = Tensor::randn(0f32, 1., (1, kv, s, d), &dev)?.to_dtype(dtype)?;
            let valid: Vec<Vec<bool>> = vec![(0..s).map(|j| j < s - 100).collect()];
            let mask = KeyMask::from_valid(&valid, &dev).map_err(candle_core::Error::wrap)?;
            let mask = masked.then_some(&mask);
            let bias: Vec<f32> = valid[0]
                .iter()
                .map(|&v| if v { 0.0 } else { f32::NEG_INFINITY })
                .collect();
            let bias = masked
                .then(|| Tensor::from_vec(bias, (1, s), &dev))
                .transpose()?;
            let scale = 1.0 / (d as f32).sqrt();
            let (unfused, fused) = match dtype {
                DType::BF16 => (
                    best_of_3(&|| {
                        grouped_attention_packed(&q, &k, &v, mask, budget, scale).map(|_| true)
                    })?,
                    best_of_3(&|| {
                        flash::attention_bf16(&q, &k, &v, bias.as_ref(), scale).map(|o| o.is_some())
                    })?,
                ),
                _ => {
                    let qs = (&q * scale as f64)?;
                    (
                        best_of_3(&|| {
                            grouped_attention(&qs, &k, &v, mask, 64 << 20).map(|_| true)
                        })?,
                        best_of_3(&|| {
                            flash::attention_f32(&q, &k, &v, bias.as_ref(), scale)
                                .map(|o| o.is_some())
                        })?,
                    )
                }
            };
            let flop = 4.0 * (h * s * s * d) as f64;
            println!(
                "{dtype:?} S {s}{}: unfused {:.1} ms ({:.0} GFLOP/s), fused {:.1} ms ({:.0} GFLOP/s)",
                if masked { " masked" } else { "" },
                unfused * 1e3,
                flop / unfused / 1e9,
                fused * 1e3,
                flop / fused / 1e9
            );
        }
    }
    Ok(())
}
