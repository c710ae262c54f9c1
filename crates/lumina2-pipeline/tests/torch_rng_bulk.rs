//! The large check of `torch_rng` against torch: 20 seeds x 262144 values (a
//! 1024x1024 latent) per dtype and kernel, plus 40 small calls in a row per seed.
//! It needs the raw files of `xtask/parity/gen_torch_rng.py --bulk DIR`, so it is
//! ignored by default:
//!
//! ```text
//! target/parity-venv/bin/python xtask/parity/gen_torch_rng.py --bulk /tmp/torch_rng_bulk
//! TORCH_RNG_BULK_DIR=/tmp/torch_rng_bulk cargo test -p lumina2-pipeline \
//!     --test torch_rng_bulk -- --ignored --nocapture
//! ```

use std::path::Path;
use std::time::Instant;

use lumina2_pipeline::torch_rng::{NormalKernel, TorchGenerator};

/// The seeds and call sizes of the generator script's bulk mode.
const SEEDS: [u64; 20] = [
    0,
    1,
    2,
    3,
    5,
    7,
    42,
    99,
    1234,
    2024,
    31337,
    123_456_789,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) + 5,
    u64::MAX,
    8,
    9,
    10,
    11,
];
const NUMEL: usize = 16 * 128 * 128;

fn read_bits(path: &Path, width: usize) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(width)
        .map(|c| match c {
            [a, b] => u32::from(u16::from_le_bytes([*a, *b])),
            [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
            _ => unreachable!(),
        })
        .collect()
}

fn mismatches(ours: &[u32], torch: &[u32]) -> usize {
    assert_eq!(ours.len(), torch.len());
    ours.iter().zip(torch).filter(|(a, b)| a != b).count()
}

#[test]
#[ignore = "needs TORCH_RNG_BULK_DIR from xtask/parity/gen_torch_rng.py --bulk"]
fn bulk_matches_torch() {
    let Some(dir) = std::env::var_os("TORCH_RNG_BULK_DIR") else {
        panic!("set TORCH_RNG_BULK_DIR to the folder gen_torch_rng.py --bulk wrote");
    };
    let dir = Path::new(&dir);
    let mut total_bad = 0;
    for (kernel, name) in [
        (NormalKernel::Avx2, "avx2"),
        (NormalKernel::Scalar, "scalar"),
    ] {
        for dtype in ["f32", "bf16", "f16"] {
            let (mut bad, mut values) = (0, 0);
            for seed in SEEDS {
                let path = dir.join(format!("{name}_{dtype}_seed{seed}.bin"));
                let torch = read_bits(&path, if dtype == "f32" { 4 } else { 2 });
                let mut generator = TorchGenerator::with_kernel(seed, kernel);
                let ours: Vec<u32> = match dtype {
                    "f32" => generator
                        .randn_f32(NUMEL)
                        .iter()
                        .map(|v| v.to_bits())
                        .collect(),
                    "bf16" => generator
                        .randn_bf16(NUMEL)
                        .iter()
                        .map(|v| u32::from(v.to_bits()))
                        .collect(),
                    _ => generator
                        .randn_f16(NUMEL)
                        .iter()
                        .map(|v| u32::from(v.to_bits()))
                        .collect(),
                };
                bad += mismatches(&ours, &torch);
                values += torch.len();
            }
            println!("{name} {dtype}: {bad} of {values} values differ");
            total_bad += bad;
        }
        let (mut bad, mut values) = (0, 0);
        for seed in SEEDS {
            let torch = read_bits(&dir.join(format!("{name}_small_seed{seed}.bin")), 4);
            let mut generator = TorchGenerator::with_kernel(seed, kernel);
            let ours: Vec<u32> = (1..=40)
                .flat_map(|n| generator.randn_f32(n))
                .map(f32::to_bits)
                .collect();
            bad += mismatches(&ours, &torch);
            values += torch.len();
        }
        println!("{name} f32, calls of 1..=40 values in a row: {bad} of {values} values differ");
        total_bad += bad;

        let mut generator = TorchGenerator::with_kernel(0, kernel);
        let start = Instant::now();
        let latent = generator.randn_f32(NUMEL);
        let elapsed = start.elapsed();
        println!(
            "{name}: {NUMEL} f32 values in {elapsed:?} ({})",
            latent.len()
        );
    }
    assert_eq!(total_bad, 0);
}
