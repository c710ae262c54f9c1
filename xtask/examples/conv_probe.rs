//! Throughput of the AMX bf16 convolution (`lumina2_kernels::conv::bf16`) on the
//! Flux VAE decoder's 3x3 layers at a 512x512 output:
//! `cargo run -p xtask --release --example conv_probe [RUNS]`.
//! Prints the best of RUNS (default 5) per shape, in GFLOP/s (2 per
//! multiply-add of the true sizes, padding excluded).

use std::time::Instant;

use half::bf16;
use lumina2_kernels::conv::bf16::{available, ConvBf16, Geometry};

fn main() {
    if !available() {
        println!("AMX is not usable on this CPU: nothing to measure");
        return;
    }
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    println!("| c_in -> c_out | input | upsample | ms | GFLOP/s |\n|---|---|---|---|---|");
    // (c_in, c_out, input side, upsample)
    for (ci, co, side, up) in [
        (512, 512, 64, 1),
        (512, 512, 128, 1),
        (512, 512, 128, 2),
        (512, 256, 256, 1),
        (256, 256, 256, 1),
        (256, 256, 256, 2),
        (128, 128, 512, 1),
    ] {
        let x: Vec<bf16> = (0..ci * side * side)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0))
            .collect();
        let w: Vec<bf16> = (0..co * ci * 9)
            .map(|i| bf16::from_f32(((i * 104729) % 1000) as f32 / 5000.0 - 0.1))
            .collect();
        let conv = ConvBf16::new(&w, &vec![0.1; co], co, ci, 3).expect("sizes");
        let g = Geometry {
            upsample: up,
            ..Geometry::symmetric(1, 1)
        };
        let mut best = f64::MAX;
        for _ in 0..runs {
            let t = Instant::now();
            let y = conv.forward(&x, 1, (side, side), g).expect("runs");
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(y);
        }
        let out = (side * up) * (side * up);
        let flop = 2.0 * (out * co * ci * 9) as f64;
        println!(
            "| {ci} -> {co} | {side}x{side} | {up} | {:.1} | {:.0} |",
            best * 1e3,
            flop / best / 1e9
        );
    }
}
