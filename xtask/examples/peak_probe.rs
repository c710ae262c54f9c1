//! This CPU's measured arithmetic peak per instruction family (AVX-512 f32
//! FMA, AVX512-BF16 dot, AMX-BF16 tile product), per thread and on every
//! thread at once, with no memory traffic (`lumina2_kernels::peak`): the
//! ceiling against which a GEMM's achieved GFLOP/s is read.
//! `cargo run -p xtask --release --example peak_probe [SECONDS]`

use lumina2_kernels::peak::{self, Peak};
use rayon::prelude::*;

/// One measured loop of `lumina2_kernels::peak`, run for a number of iterations.
type PeakFn = fn(usize) -> Option<Peak>;

/// Runs `f` with iteration counts doubling until one run lasts `secs`.
fn calibrated(secs: f64, f: impl Fn(usize) -> Option<Peak>) -> Option<(usize, Peak)> {
    let mut iters = 1 << 12;
    loop {
        let p = f(iters)?;
        if p.seconds >= secs || iters >= 1 << 40 {
            return Some((iters, p));
        }
        iters *= 2;
    }
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    let threads = rayon::current_num_threads();
    println!("threads: {threads}");
    println!("| instruction family | GFLOP/s one thread | GFLOP/s all {threads} threads |");
    println!("|---|---|---|");
    let families: [(&str, PeakFn); 3] = [
        ("AVX-512 f32 FMA (vfmadd231ps)", peak::avx512_f32_fma),
        ("AVX512-BF16 dot (vdpbf16ps)", peak::avx512_bf16_dot),
        ("AMX-BF16 (tdpbf16ps)", peak::amx_bf16),
    ];
    for (name, f) in families {
        let Some((iters, one)) = calibrated(secs, f) else {
            println!("| {name} | not on this CPU | - |");
            continue;
        };
        // Every thread runs the same loop at once; the wall time of the
        // slowest bounds the total.
        let t = std::time::Instant::now();
        let runs: Vec<Option<Peak>> = (0..threads).into_par_iter().map(|_| f(iters)).collect();
        let wall = t.elapsed().as_secs_f64();
        let flop: f64 = runs.iter().flatten().map(|p| p.flop).sum();
        let sum: f32 = runs.iter().flatten().map(|p| p.checksum).sum();
        println!(
            "| {name} | {:.0} | {:.0} |",
            one.gflops(),
            flop / wall / 1e9
        );
        std::hint::black_box(sum + one.checksum);
    }
}
