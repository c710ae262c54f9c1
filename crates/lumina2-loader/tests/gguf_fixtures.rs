//! The committed `gguf_dequant` parity cases (written by gguf-py, see
//! tests/fixtures/README.md), checked without Python: every tensor dequantised
//! by our kernels must equal gguf-py's `dequantize` bit for bit.

use std::path::Path;

use candle_core::{DType, Device};
use lumina2_loader::gguf::{GgmlType, GgufFile, MetadataArray, MetadataValue};
use lumina2_parity::{find_cases, Case};

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_dequant");
    find_cases(&root)
        .unwrap()
        .iter()
        .map(|dir| Case::load(dir).unwrap())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn fixtures_dequantize_bit_exact() {
    let cases = cases();
    assert_eq!(cases.len(), 2, "{cases:?}");
    let mut types = std::collections::BTreeSet::new();
    for case in cases {
        assert_eq!(case.component, "gguf_dequant");
        assert_eq!(case.tolerance.atol, 0.0);
        let f = GgufFile::open(case.model().unwrap()).unwrap();
        // Stricter than the case's zero tolerance: the bits must match.
        let exp = case.expected().unwrap();
        assert_eq!(exp.len(), f.tensor_infos().len());
        for t in f.tensor_infos() {
            let e = &exp[&t.name];
            assert_eq!(e.dims(), t.shape().as_slice(), "{}", t.name);
            let ours = f.dequantize(&t.name).unwrap();
            let theirs = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(&ours), bits(&theirs), "{} ({})", t.name, t.ggml_type);
            // The candle tensor holds the same values in the same shape.
            let x = f.tensor(&t.name, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(x.dims(), e.dims());
            assert_eq!(
                bits(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
                bits(&theirs)
            );
            types.insert(t.ggml_type.id());
        }
    }
    // Every type with a kernel is covered.
    for id in 0..64 {
        if let Some(t) = GgmlType::from_id(id) {
            assert_eq!(t.can_dequantize(), types.contains(&id), "{t}");
        }
    }
}

#[test]
fn fixture_metadata_as_gguf_py_wrote_it() {
    let f = GgufFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf_dequant/all_types/model.gguf"),
    )
    .unwrap();
    let m = f.metadata();
    assert_eq!(f.version(), 3);
    assert_eq!(m["general.architecture"].as_str(), Some("lumina2"));
    assert_eq!(
        m["general.name"].as_str(),
        Some("lumina2-rs gguf parity fixture")
    );
    assert_eq!(m["lumina2.block_count"], MetadataValue::U32(2));
    assert_eq!(m["test.i64"], MetadataValue::I64(-(1 << 40)));
    assert_eq!(m["test.f32"], MetadataValue::F32(0.1));
    assert_eq!(m["test.f64"], MetadataValue::F64(-2.5e-300));
    assert_eq!(m["test.bool"], MetadataValue::Bool(true));
    assert_eq!(m["test.i8"], MetadataValue::I8(-7));
    assert_eq!(m["test.u16"], MetadataValue::U16(65535));
    assert_eq!(
        m["test.strings"].as_array(),
        Some(&MetadataArray::String(vec![
            "a".into(),
            "".into(),
            "ünïcödé".into(),
            "GGUF".into()
        ]))
    );
    assert_eq!(
        m["test.i32s"].as_array(),
        Some(&MetadataArray::I32(vec![1, -2, 3]))
    );
    assert_eq!(
        m["test.f32s"].as_array(),
        Some(&MetadataArray::F32(vec![0.5, -1.5]))
    );
    assert_eq!(
        m["test.nested"].as_array(),
        Some(&MetadataArray::Array(vec![
            MetadataArray::I32(vec![1, 2, 3]),
            MetadataArray::I32(vec![4]),
            MetadataArray::I32(vec![5, 6]),
        ]))
    );
    assert_eq!(
        m["test.nested_strings"].as_array(),
        Some(&MetadataArray::Array(vec![
            MetadataArray::String(vec!["x".into(), "yz".into()]),
            MetadataArray::String(vec!["w".into()]),
        ]))
    );
    let aligned = GgufFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf_dequant/align64/model.gguf"),
    )
    .unwrap();
    assert_eq!(aligned.alignment(), 64);
    assert_eq!(aligned.data_start() % 64, 0);
    for t in aligned.tensor_infos() {
        assert_eq!(t.offset % 64, 0);
    }
}

#[test]
fn qtensors_keep_the_bytes_and_shape() {
    let f = GgufFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf_dequant/all_types/model.gguf"),
    )
    .unwrap();
    let exp = Case::load(f.path().parent().unwrap())
        .unwrap()
        .expected()
        .unwrap();
    for t in f.tensor_infos() {
        let q = f.qtensor(&t.name, &Device::Cpu).unwrap();
        assert_eq!(q.shape().dims(), t.shape().as_slice());
        assert_eq!(Some(q.dtype()), t.ggml_type.to_candle());
        assert_eq!(
            q.data().unwrap().as_ref(),
            f.tensor_data(&t.name).unwrap(),
            "{}",
            t.name
        );
        // candle's own dequantisation agrees with gguf-py up to float rounding.
        let d = q.dequantize(&Device::Cpu).unwrap();
        let diff = (d - &exp[&t.name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-6, "{}: candle differs by {diff}", t.name);
    }
}
