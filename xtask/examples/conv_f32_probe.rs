//! Throughput of the f32 implicit-GEMM convolution
//! (`lumina2_kernels::conv::f32::PackedConv`) on the Flux VAE decoder's 3x3
//! layer shapes (one batch item, padding 1, with and without the fused
//! nearest 2x upsampling): the best of 3 runs per shape, in seconds and
//! GFLOP/s (2 per multiply-add of the true sizes). The kernel path is the one
//! `lumina2_kernels::caps()` gives (AVX2/FMA, or AVX-512 unless
//! `LUMINA2_NO_AVX512_CONV=1`).
//!
//! `cargo run -p xtask --release --example conv_f32_probe`

use std::time::Instant;

use lumina2_kernels::conv::f32::{available, Geometry, PackedConv};

fn main() {
    println!("kernel paths: {:?}", lumina2_kernels::caps().paths());
    if !available() {
        println!("AVX2/FMA is not usable on this CPU: nothing to measure");
        return;
    }
    // (c_in, c_out, size, upsample)
    for (ci, co, hw, up) in [
        (512, 512, 64, 1),
        (256, 256, 128, 1),
        (128, 128, 256, 1),
        (256, 256, 128, 2),
        (128, 3, 256, 1),
    ] {
        let x: Vec<f32> = (0..ci * hw * hw).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..co * ci * 9).map(|i| (i % 5) as f32 * 0.01).collect();
        let Some(packed) = PackedConv::new(&w, &vec![0.0; co], co, ci, 3) else {
            println!("{ci}->{co}: sizes do not fit");
            continue;
        };
        let g = Geometry {
            upsample: up,
            ..Geometry::symmetric(1, 1)
        };
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            let _ = packed.forward(&x, 1, (hw, hw), g, None);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let flops = 2.0 * (ci * co * 9 * hw * hw * up * up) as f64;
        println!(
            "{ci}->{co} at {0}x{0}: {best:.3} s, {1:.1} GFLOP/s",
            hw * up,
            flops / best / 1e9
        );
    }
}
