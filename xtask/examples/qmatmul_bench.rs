//! Quantised weights at run time: multiply while quantised (candle's
//! `QMatMul`, which quantises the activations to Q8 and uses integer dot
//! products) or dequantise the layer and run the f32 matmul (what
//! `lumina2_weights::Linear` does), against the dense f32 matmul (the floor).
//! The numbers are for the loader README:
//!
//! ```sh
//! cargo run -p xtask --release --example qmatmul_bench
//! ```
//!
//! Shapes: the transformer's and Gemma-2's hidden width (2304) into 2304 and
//! 9216 outputs; rows from 16 (a few caption tokens) to 4096 (a 1024x1024
//! image's tokens). Median of 3 runs after a warm-up, milliseconds.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[1]
}

fn main() {
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<5} {:>5} {:>5} {:>5} | {:>9} {:>11} {:>9} | {:>9}",
        "type", "M", "K", "N", "dense f32", "dequant+f32", "QMatMul", "dequant"
    );
    for ty in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
        for (k, n) in [(2304usize, 2304usize), (2304, 9216)] {
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap() * 0.02).unwrap();
            let q = QTensor::quantize(&w, ty).unwrap();
            let dense = q.dequantize(&dev).unwrap();
            let qmm = QMatMul::from_qtensor(QTensor::quantize(&w, ty).unwrap()).unwrap();
            let deq = median_ms(|| {
                q.dequantize(&dev).unwrap();
            });
            for m in [16usize, 64, 256, 1024, 4096] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let t_dense = median_ms(|| {
                    x.matmul(&dense.t().unwrap()).unwrap();
                });
                let t_deq = median_ms(|| {
                    let d = q.dequantize(&dev).unwrap();
                    x.matmul(&d.t().unwrap()).unwrap();
                });
                let t_q = median_ms(|| {
                    qmm.forward(&x).unwrap();
                });
                // Same product, up to the Q8 rounding of the activations.
                let a = x.matmul(&dense.t().unwrap()).unwrap();
                let b = qmm.forward(&x).unwrap();
                let rel = ((a.clone() - b).unwrap().sqr().unwrap().mean_all().unwrap())
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt()
                    / a.sqr()
                        .unwrap()
                        .mean_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        .sqrt();
                assert!(rel < 0.05, "QMatMul relative RMS error {rel}");
                println!(
                    "{:<5} {:>5} {:>5} {:>5} | {:>9.2} {:>11.2} {:>9.2} | {:>9.2}",
                    format!("{ty:?}"),
                    m,
                    k,
                    n,
                    t_dense,
                    t_deq,
                    t_q,
                    deq
                );
            }
        }
    }
}
