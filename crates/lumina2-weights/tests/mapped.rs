//! Bf16 linear weights of a safetensors file under bf16 compute: on AMX
//! CPUs they are used in place from a memory map (`LinearWeight::MappedBf16`)
//! and multiply to the same bits as the packed copy; NaN weights are still
//! recorded; elsewhere the packed (or dense) path runs as before.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::gemm::mapped;
use lumina2_weights::{Linear, LinearWeight, Weights};

#[test]
fn mapped_weights_multiply_as_packed_ones() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("lumina2-mapped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let w = Tensor::randn(0f32, 1., (70, 130), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let b = Tensor::randn(0f32, 1., 70, &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let mut bad = vec![half::bf16::ONE; 64 * 32];
    bad[100] = half::bf16::NAN;
    let bad = Tensor::from_vec(bad, (64, 32), &dev).unwrap();
    let tensors = HashMap::from([
        ("l.weight".to_string(), w.clone()),
        ("l.bias".to_string(), b.clone()),
        ("n.weight".to_string(), bad),
    ]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let weights = Weights::from_safetensors(&[&path], DType::BF16, &dev).unwrap();
    let layer = weights.linear("l", 130, 70, true).unwrap();
    let expect_mapped = mapped::available();
    eprintln!("mapped available: {expect_mapped}");
    assert_eq!(
        matches!(layer.weight(), LinearWeight::MappedBf16(_)),
        expect_mapped
    );
    let x = Tensor::randn(0f32, 1., (2, 37, 130), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let copied = Linear::new(LinearWeight::Dense(w), Some(b)).unwrap();
    let bits = |t: Tensor| -> Vec<u16> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(
        bits(layer.forward(&x).unwrap()),
        bits(copied.forward(&x).unwrap())
    );
    let n = weights.linear("n", 32, 64, false).unwrap();
    if expect_mapped {
        // Used in place: not read at load; found when scanned.
        assert!(weights.non_finite_keys().is_empty());
        assert_eq!(weights.unscanned().pending(), 2);
        assert_eq!(weights.unscanned().scan(), vec!["n.weight"]);
        assert_eq!(weights.unscanned().pending(), 0);
        // A weight whose layer is gone is not scanned (nor kept mapped).
        let again = Weights::from_safetensors(&[&path], DType::BF16, &dev).unwrap();
        drop(again.linear("n", 32, 64, false).unwrap());
        assert_eq!(again.unscanned().pending(), 0);
        assert!(again.unscanned().scan().is_empty());
    } else {
        assert_eq!(weights.non_finite_keys(), vec!["n.weight"]);
    }
    drop((n, layer));
    std::fs::remove_dir_all(&dir).ok();
}

/// A bf16 table (an embedding) in a mapped file is handed out in place
/// under any compute dtype, and its rows gather to the stored values.
#[test]
fn mapped_tables_gather_the_stored_rows() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("lumina2-mapped-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.safetensors");
    let table = Tensor::randn(0f32, 1., (50, 24), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let tensors = HashMap::from([("e.weight".to_string(), table.clone())]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let weights = Weights::from_safetensors(&[&path], dtype, &dev).unwrap();
        let t = weights.table("e", 24, 50).unwrap();
        let LinearWeight::MappedBf16(m) = &t else {
            assert!(!mapped::allowed(), "{t:?}");
            continue;
        };
        let ids = [49u32, 3, 3, 0];
        let got = m.gather_rows(&ids).unwrap();
        let want = table
            .index_select(&Tensor::new(&ids, &dev).unwrap(), 0)
            .unwrap();
        assert_eq!(
            got.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            want.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
        );
        assert_eq!(weights.unscanned().pending(), 1);
    }
    std::fs::remove_dir_all(&dir).ok();
}
