//! `torch_rng` against what torch 2.15 returned for the same seeds
//! (tests/fixtures/torch_rng, written by xtask/parity/gen_torch_rng.py): every
//! value must match bit for bit, for both of torch's kernels, whatever this
//! machine's own torch would use.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lumina2_pipeline::torch_rng::{NormalKernel, TorchGenerator};
use safetensors::{Dtype, SafeTensors};

/// The tensors of one fixture file, by key: dtype and raw little-endian bytes.
struct Fixture {
    tensors: BTreeMap<String, (Dtype, Vec<u8>)>,
}

fn fixture(kernel: NormalKernel) -> Fixture {
    let name = match kernel {
        NormalKernel::Avx2 => "avx2.safetensors",
        NormalKernel::Scalar => "scalar.safetensors",
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch_rng")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file =
        SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(key, view)| (key, (view.dtype(), view.data().to_vec())))
        .collect();
    Fixture { tensors }
}

/// Bit patterns of one draw, as u32 (f32) or u16 (half types) widened to u32.
fn draw(generator: &mut TorchGenerator, dtype: &str, numel: usize) -> Vec<u32> {
    match dtype {
        "f32" => generator
            .randn_f32(numel)
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        "bf16" => generator
            .randn_bf16(numel)
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        "f16" => generator
            .randn_f16(numel)
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        other => panic!("unknown dtype {other}"),
    }
}

/// The fixture's bit patterns, checked to be of the key's dtype.
fn expected_bits(dtype: Dtype, data: &[u8], key: &str) -> Vec<u32> {
    match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 | Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        other => panic!("{key}: unexpected dtype {other:?}"),
    }
}

/// `sum(bits[i] * (2 i + 1)) mod 2^64`, the generator script's checksum.
fn checksum(bits: &[u32]) -> i64 {
    bits.iter().enumerate().fold(0u64, |sum, (i, &b)| {
        sum.wrapping_add(u64::from(b).wrapping_mul(2 * i as u64 + 1))
    }) as i64
}

fn first_mismatch(ours: &[u32], torch: &[u32]) -> Option<(usize, u32, u32)> {
    ours.iter()
        .zip(torch)
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i, *a, *b))
}

/// Parses `{dtype}.seed{seed}.n{numel}` (with an optional suffix after it).
fn parse_single(key: &str) -> Option<(&str, u64, usize, Option<&str>)> {
    let mut parts = key.splitn(4, '.');
    let dtype = parts.next()?;
    let seed = parts.next()?.strip_prefix("seed")?.parse().ok()?;
    let numel = parts.next()?.strip_prefix('n')?.parse().ok()?;
    Some((dtype, seed, numel, parts.next()))
}

fn check_single_tensors(kernel: NormalKernel) {
    let fixture = fixture(kernel);
    let mut checked = 0;
    for (key, (dtype, data)) in &fixture.tensors {
        let Some((name, seed, numel, suffix)) = parse_single(key) else {
            continue;
        };
        let ours = draw(&mut TorchGenerator::with_kernel(seed, kernel), name, numel);
        match suffix {
            None => {
                let expected = expected_bits(*dtype, data, key);
                assert_eq!(ours.len(), expected.len(), "{kernel:?} {key}: length");
                if let Some((i, a, b)) = first_mismatch(&ours, &expected) {
                    panic!("{kernel:?} {key}: value {i} is {a:#x}, torch gives {b:#x}");
                }
            }
            Some("checksum") => {
                assert_eq!(*dtype, Dtype::I64, "{key}: dtype");
                let stored = i64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                assert_eq!(checksum(&ours), stored, "{kernel:?} {key}");
            }
            Some(every) => {
                let step: usize = every
                    .strip_prefix("every")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("{key}: unknown suffix"));
                let expected = expected_bits(*dtype, data, key);
                let sample: Vec<u32> = ours.iter().step_by(step).copied().collect();
                if let Some((i, a, b)) = first_mismatch(&sample, &expected) {
                    let at = i * step;
                    panic!("{kernel:?} {key}: value {at} is {a:#x}, torch gives {b:#x}");
                }
                assert_eq!(sample.len(), expected.len(), "{kernel:?} {key}: length");
            }
        }
        checked += 1;
    }
    // 3 dtypes x 3 seeds x (6 full + 2 large x (checksum + sample)).
    assert_eq!(checked, 90, "{kernel:?}: fixture keys");
}

/// One call of a run: dtype name, numel and torch's bit patterns.
type Call = (String, usize, Vec<u32>);

fn check_sequences(kernel: NormalKernel) {
    let fixture = fixture(kernel);
    // seed -> call index -> the call
    let mut runs: BTreeMap<u64, BTreeMap<usize, Call>> = BTreeMap::new();
    for (key, (dtype, data)) in &fixture.tensors {
        let Some(rest) = key.strip_prefix("seq") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let [seed, index, name, numel] = parts[..] else {
            panic!("{key}: malformed sequence key");
        };
        let numel = numel.strip_prefix('n').and_then(|n| n.parse().ok());
        let (Ok(seed), Ok(index), Some(numel)) = (seed.parse(), index.parse(), numel) else {
            panic!("{key}: malformed sequence key");
        };
        let expected = expected_bits(*dtype, data, key);
        runs.entry(seed)
            .or_default()
            .insert(index, (name.to_string(), numel, expected));
    }
    assert_eq!(runs.len(), 2, "{kernel:?}: sequences");
    for (seed, calls) in runs {
        let mut generator = TorchGenerator::with_kernel(seed, kernel);
        for (index, (name, numel, expected)) in calls {
            let ours = draw(&mut generator, &name, numel);
            assert_eq!(ours.len(), expected.len());
            if let Some((i, a, b)) = first_mismatch(&ours, &expected) {
                panic!(
                    "{kernel:?} seed {seed} call {index} ({name}, {numel}): \
                     value {i} is {a:#x}, torch gives {b:#x}"
                );
            }
        }
    }
}

#[test]
fn avx2_kernel_matches_torch() {
    check_single_tensors(NormalKernel::Avx2);
}

#[test]
fn scalar_kernel_matches_torch() {
    check_single_tensors(NormalKernel::Scalar);
}

#[test]
fn avx2_calls_in_sequence_match_torch() {
    check_sequences(NormalKernel::Avx2);
}

#[test]
fn scalar_calls_in_sequence_match_torch() {
    check_sequences(NormalKernel::Scalar);
}

#[test]
fn the_two_kernels_differ_as_torch_does() {
    // Not a property we want, but one we must keep: if the two kernels ever gave
    // the same bits for a 1024-value tensor, one of them would not be torch's.
    let a = TorchGenerator::with_kernel(0, NormalKernel::Avx2).randn_f32(1024);
    let b = TorchGenerator::with_kernel(0, NormalKernel::Scalar).randn_f32(1024);
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert!(differing > 100, "{differing} values differ");
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
}
