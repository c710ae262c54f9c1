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
