//! fp8 safetensors (written by torch, see xtask/parity/gen_fp8.py): every
//! F8_E4M3 and F8_E5M2 byte decodes to torch's `.to(torch.float32)` value,
//! and ComfyUI's scaled-fp8 weights come back as `fp8 * scale_weight`, each
//! tensor on its own (no dense copy of the file).

use std::path::Path;

use candle_core::{DType, Device};
use lumina2_weights::{SafetensorsSource, WeightSource, Weights};

fn source() -> SafetensorsSource {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fp8.safetensors");
    SafetensorsSource::open(&[p]).unwrap()
}

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        // NaN payloads aside (torch and we both give a NaN), bits must match.
        .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
        .collect()
}

#[test]
fn every_fp8_value_matches_torch() {
    let s = source();
    for (key, want) in [
        ("e4m3.weight", "expected.e4m3"),
        ("e5m2.weight", "expected.e5m2"),
    ] {
        let ours = s.tensor(key).unwrap();
        assert_eq!(ours.dtype(), DType::F16, "decoded to f16, exact for fp8");
        assert_eq!(bits(&ours), bits(&s.tensor(want).unwrap()), "{key}");
    }
}

#[test]
fn fp8_tensors_are_named_by_their_format() {
    let s = source();
    assert_eq!(s.storage_type("e4m3.weight").as_deref(), Some("F8_E4M3"));
    assert_eq!(s.storage_type("e5m2.weight").as_deref(), Some("F8_E5M2"));
    assert_eq!(s.storage_type("expected.e4m3").as_deref(), Some("F32"));
    assert_eq!(s.storage_type("absent"), None);
    // `tensor_info` gives the element type of the bytes.
    assert_eq!(s.tensor_info("e4m3.weight").map(|i| i.0), Some(DType::U8));
}

#[test]
fn scaled_fp8_weights_are_multiplied_by_their_scale() {
    let s = source();
    let ours = s.tensor("w.weight").unwrap();
    assert_eq!(bits(&ours), bits(&s.tensor("expected.w").unwrap()));
    // The scale and the marker are bookkeeping, not weights.
    let keys = s.keys();
    assert!(
        keys.iter()
            .all(|k| !k.ends_with("scale_weight") && k != "scaled_fp8"),
        "{keys:?}"
    );
    assert!(keys.contains(&"w.weight".to_string()));
    // Through `Weights`, in the compute dtype, layer by layer.
    let w = Weights::new(std::sync::Arc::new(source()), DType::BF16, &Device::Cpu);
    let t = w.get("w.weight", &[8, 32]).unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    let e4 = w.get("e4m3.weight", &[16, 16]).unwrap();
    let exp = s.tensor("expected.e4m3").unwrap();
    // bf16 holds every fp8 value exactly.
    assert_eq!(bits(&e4), bits(&exp));
}
