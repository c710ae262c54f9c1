//! The safetensors reader: shards, and broken headers refused before allocating.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use lumina2_weights::{Error, SafetensorsSource, WeightSource};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn safetensors_source_reads_shards_and_refuses_broken_headers() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("lumina2-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = Tensor::arange(0f32, 6., &dev)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let b = Tensor::new(&[1u8, 2, 3], &dev).unwrap();
    let (pa, pb) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    candle_core::safetensors::save(&HashMap::from([("a".to_string(), a.clone())]), &pa).unwrap();
    candle_core::safetensors::save(&HashMap::from([("b".to_string(), b)]), &pb).unwrap();
    let src = SafetensorsSource::open(&[&pa, &pb]).unwrap();
    assert_eq!(src.keys(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(max_diff(&src.tensor("a").unwrap(), &a), 0.0);
    assert!(matches!(src.tensor("c"), Err(Error::MissingWeight { .. })));

    let bytes = std::fs::read(&pa).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let bad = dir.join("bad.safetensors");
    let mut cases: Vec<Vec<u8>> = vec![
        bytes[..4].to_vec(),               // no header length
        bytes[..8 + n / 2].to_vec(),       // header cut
        bytes[..bytes.len() - 4].to_vec(), // data cut
    ];
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes()); // a 1 TB header
    cases.push(huge);
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    for (from, to) in [
        ("[2,3]", "[2,4]"),
        ("F32", "Q9"),
        ("[0,24]", "[0,99999999999]"),
    ] {
        let h = header.replace(from, to);
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(&bytes[8 + n..]);
        cases.push(v);
    }
    // The same key twice in one header (a JSON map would keep the last one).
    let entry = r#""a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}"#;
    let h = format!("{{{entry},{entry}}}");
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&bad, &v).unwrap();
    match SafetensorsSource::open(&[&bad]) {
        Err(e @ Error::WeightLoad { .. }) => assert!(e.to_string().contains("twice"), "{e}"),
        other => panic!("duplicate key accepted: {:?}", other.map(|_| ())),
    }
    for (i, c) in cases.iter().enumerate() {
        std::fs::write(&bad, c).unwrap();
        assert!(
            matches!(
                SafetensorsSource::open(&[&bad]),
                Err(Error::WeightLoad { .. })
            ),
            "broken file {i} was accepted"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors file from explicit header entries `(key, dtype, shape,
/// [start, end])` and `data_len` bytes of data (zeros, or a hole).
fn write_raw(path: &std::path::Path, entries: &[(&str, &str, Vec<u64>, [u64; 2])], data_len: u64) {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    for (k, dt, shape, offs) in entries {
        header.insert(
            k.to_string(),
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": offs}),
        );
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    f.set_len(8 + h.len() as u64 + data_len).unwrap();
}

/// Tensors whose bytes overlap (the format forbids it; a forged file could
/// make one tensor's bytes serve as another's) and a key present in two
/// shards are refused, naming the keys and the file.
#[test]
fn overlapping_tensors_and_keys_in_two_shards_are_refused() {
    let dir = std::env::temp_dir().join(format!("lumina2-st-overlap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("overlap.safetensors");
    write_raw(
        &p,
        &[
            ("a", "F32", vec![4], [0, 16]),
            ("b", "F32", vec![4], [8, 24]),
        ],
        24,
    );
    let e = SafetensorsSource::open(&[&p])
        .err()
        .expect("overlap refused")
        .to_string();
    assert!(
        e.contains("overlap") && e.contains("overlap.safetensors"),
        "{e}"
    );
    assert!(e.contains("`a`") || e.contains("`b`"), "{e}");
    // Adjacent, and zero-sized tensors anywhere, are fine.
    write_raw(
        &p,
        &[
            ("a", "F32", vec![4], [0, 16]),
            ("b", "F32", vec![2], [16, 24]),
            ("e", "F32", vec![0], [8, 8]),
        ],
        24,
    );
    assert!(SafetensorsSource::open(&[&p]).is_ok());

    let (s1, s2) = (dir.join("s1.safetensors"), dir.join("s2.safetensors"));
    write_raw(&s1, &[("w", "F32", vec![2], [0, 8])], 8);
    write_raw(&s2, &[("w", "F32", vec![2], [0, 8])], 8);
    let e = SafetensorsSource::open(&[&s1, &s2])
        .err()
        .expect("duplicate refused");
    assert!(
        matches!(&e, Error::WeightLoad { key, .. } if key == "w"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tensor declared far larger than the model expects (8 GiB in a sparse
/// file) is refused from its header: `Weights::get` compares shapes before
/// reading, so the test finishes at once and allocates nothing of that size.
#[test]
fn declared_shapes_are_compared_before_reading() {
    let dir = std::env::temp_dir().join(format!("lumina2-st-sparse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("sparse.safetensors");
    let n: u64 = 1 << 31;
    write_raw(&p, &[("w", "F32", vec![n], [0, 4 * n])], 4 * n);
    let w =
        lumina2_weights::Weights::from_safetensors(&[&p], candle_core::DType::F32, &Device::Cpu)
            .unwrap();
    match w.get("w", &[16, 16]) {
        Err(Error::WeightShape {
            key,
            expected,
            found,
            source_name,
        }) => {
            assert_eq!(
                (key.as_str(), expected, found),
                ("w", vec![16, 16], vec![n as usize])
            );
            assert!(source_name.contains("sparse.safetensors"));
        }
        other => panic!("{other:?}"),
    }
    match w.linear_weight("x", 16, 16) {
        Err(Error::MissingWeight { key, .. }) => assert_eq!(key, "x.weight"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A 16-bit tensor read as f32 (converted while read, in pieces of 2^20
/// values across threads) has exactly the bits of the tensor read as stored
/// and then converted, for a size that ends inside a piece; so has the same
/// read through [`Weights`], in both dtypes.
#[test]
fn converting_reads_equal_read_then_convert() {
    use candle_core::DType;
    use lumina2_weights::Weights;
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("lumina2-st-widen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 2^20 + 2^19 + 3 values: one whole piece and a partial one; varied bits
    // (subnormals, signs, large exponents) from a sine.
    let n = (1usize << 20) + (1 << 19) + 3;
    let x = Tensor::arange(0f32, n as f32, &dev)
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap()
        .powf(7.0)
        .unwrap()
        .affine(3.0e4, 0.0)
        .unwrap()
        .reshape((n / 3, 3))
        .unwrap();
    let path = dir.join("w.safetensors");
    let tensors = HashMap::from([
        ("bf.weight".to_string(), x.to_dtype(DType::BF16).unwrap()),
        ("h.weight".to_string(), x.to_dtype(DType::F16).unwrap()),
        ("f.weight".to_string(), x.clone()),
    ]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let src = std::sync::Arc::new(SafetensorsSource::open(&[&path]).unwrap());
    let bits = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    for name in ["bf", "h", "f"] {
        let key = &format!("{name}.weight");
        let direct = src.tensor_as(key, DType::F32).unwrap();
        let stored = src.tensor(key).unwrap();
        let converted = stored.to_dtype(DType::F32).unwrap();
        assert_eq!(direct.dims(), stored.dims(), "{key}");
        assert!(bits(&direct) == bits(&converted), "{key}: bits differ");
        let w = Weights::new(src.clone(), DType::F32, &dev);
        let got = w.get(key, &[n / 3, 3]).unwrap();
        assert!(
            bits(&got) == bits(&converted),
            "{key}: Weights::get differs"
        );
        // The 16-bit tables stay as stored for row lookups under f32.
        let table = w.table(name, 3, n / 3).unwrap().to_dense(&dev).unwrap();
        assert_eq!(table.dtype(), stored.dtype(), "{key}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
