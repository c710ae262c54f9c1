//! Dequantisation throughput (the numbers are for the loader README):
//!
//! ```sh
//! cargo run -p xtask --release --example gguf_bench
//! ```
//!
//! Each type dequantises 16 Mi elements (64 MiB of f32 output) of random blocks
//! with sane f16 scales; the median of 3 runs is reported as GB/s of f32 output
//! and of quantised input.

use std::time::Instant;

use lumina2_loader::gguf::{dequantize_into, GgmlType};

const N: usize = 16 * 1024 * 1024;

/// Byte offsets of the f16 scales in each block, overwritten with a sane value
/// so that the outputs are ordinary floats.
fn scale_offsets(t: GgmlType) -> &'static [usize] {
    match t {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

fn main() {
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    let mut out = vec![0f32; N];
    println!("threads: {}", rayon::current_num_threads());
    for t in types {
        let n_bytes = N / t.block_size() * t.type_size();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut bytes: Vec<u8> = (0..n_bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let ts = t.type_size();
        match t {
            // Finite values for the float types.
            GgmlType::F32 => bytes.chunks_exact_mut(4).for_each(|c| c[3] &= 0x3F),
            GgmlType::F16 | GgmlType::BF16 => bytes.chunks_exact_mut(2).for_each(|c| c[1] &= 0x3F),
            _ => {
                let scale = half::f16::from_f32(0.01).to_le_bytes();
                for block in bytes.chunks_exact_mut(ts) {
                    for &o in scale_offsets(t) {
                        block[o..o + 2].copy_from_slice(&scale);
                    }
                }
            }
        }
        let mut times = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            dequantize_into(t, &bytes, &mut out).unwrap();
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let s = times[1];
        assert!(out.iter().all(|x| x.is_finite()));
        println!(
            "{:<5} {:>8.2} GB/s out (f32)  {:>7.2} GB/s in  ({:.2} ms)",
            t.to_string(),
            (N * 4) as f64 / s / 1e9,
            n_bytes as f64 / s / 1e9,
            s * 1e3
        );
    }
}
