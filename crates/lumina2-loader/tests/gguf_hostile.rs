//! The GGUF reader against crafted files: every malformation is a typed error
//! naming the file, never a panic or an allocation of a claimed size.

use lumina2_loader::gguf::{GgmlType, GgufError, GgufFile, MetadataArray, MetadataValue};

const PATH: &str = "crafted.gguf";

/// Writes GGUF bytes field by field.
#[derive(Default, Clone)]
struct W(Vec<u8>);

impl W {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut w = W::default();
        w.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        w
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.raw(&[v])
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to `align` and appends `n` data bytes 0, 1, 2, ...
    fn data(&mut self, align: usize, n: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        for i in 0..n {
            self.0.push(i as u8);
        }
        self
    }
    fn open(&self) -> Result<GgufFile, GgufError> {
        GgufFile::from_bytes(PATH, self.0.clone())
    }
}

fn err(w: &W) -> GgufError {
    match w.open() {
        Ok(_) => panic!("a malformed file was accepted"),
        Err(e) => {
            assert!(
                e.to_string().starts_with(PATH),
                "error does not name the file: {e}"
            );
            e
        }
    }
}

/// A valid file: metadata of every type, two F32 tensors and a Q8_0 one.
fn valid() -> W {
    let mut w = W::header(3, 3, 16);
    w.str("u8").u32(0).u8(200);
    w.str("i8").u32(1).u8(0xF9);
    w.str("u16").u32(2).raw(&65535u16.to_le_bytes());
    w.str("i16").u32(3).raw(&(-300i16).to_le_bytes());
    w.kv_u32("u32", 123_456);
    w.str("i32").u32(5).raw(&(-5i32).to_le_bytes());
    w.str("f32").u32(6).raw(&0.25f32.to_le_bytes());
    w.str("bool").u32(7).u8(1);
    w.str("string").u32(8).str("héllo");
    w.str("u64").u32(10).u64(u64::MAX);
    w.str("i64").u32(11).raw(&(-1i64 << 40).to_le_bytes());
    w.str("f64").u32(12).raw(&(-2.5f64).to_le_bytes());
    w.str("strings")
        .u32(9)
        .u32(8)
        .u64(3)
        .str("a")
        .str("")
        .str("bc");
    w.str("empty").u32(9).u32(4).u64(0);
    // [[1, 2], [3]] as u16 arrays inside an array.
    w.str("nested").u32(9).u32(9).u64(2);
    w.u32(2)
        .u64(2)
        .raw(&1u16.to_le_bytes())
        .raw(&2u16.to_le_bytes());
    w.u32(2).u64(1).raw(&3u16.to_le_bytes());
    w.str("bools").u32(9).u32(7).u64(2).u8(0).u8(1);
    w.tensor("a", &[4, 2], 0, 0); // PyTorch shape [2, 4], 32 bytes
    w.tensor("b", &[3], 0, 32); // 12 bytes
    w.tensor("q", &[32], 8, 64); // one Q8_0 block, 34 bytes
    w.data(32, 98);
    w
}

#[test]
fn a_valid_crafted_file_reads_completely() {
    let w = valid();
    let f = w.open().unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    let m = f.metadata();
    assert_eq!(m.len(), 16);
    assert_eq!(m["u8"], MetadataValue::U8(200));
    assert_eq!(m["i8"], MetadataValue::I8(-7));
    assert_eq!(m["u16"], MetadataValue::U16(65535));
    assert_eq!(m["i16"], MetadataValue::I16(-300));
    assert_eq!(m["u32"], MetadataValue::U32(123_456));
    assert_eq!(m["i32"], MetadataValue::I32(-5));
    assert_eq!(m["f32"], MetadataValue::F32(0.25));
    assert_eq!(m["bool"], MetadataValue::Bool(true));
    assert_eq!(m["string"].as_str(), Some("héllo"));
    assert_eq!(m["u64"], MetadataValue::U64(u64::MAX));
    assert_eq!(m["i64"], MetadataValue::I64(-1 << 40));
    assert_eq!(m["f64"], MetadataValue::F64(-2.5));
    assert_eq!(
        m["strings"],
        MetadataValue::Array(MetadataArray::String(vec![
            "a".into(),
            "".into(),
            "bc".into()
        ]))
    );
    assert_eq!(m["empty"], MetadataValue::Array(MetadataArray::U32(vec![])));
    assert_eq!(
        m["nested"],
        MetadataValue::Array(MetadataArray::Array(vec![
            MetadataArray::U16(vec![1, 2]),
            MetadataArray::U16(vec![3])
        ]))
    );
    assert_eq!(
        m["bools"],
        MetadataValue::Array(MetadataArray::Bool(vec![false, true]))
    );

    let names: Vec<_> = f.tensor_infos().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "q"]);
    let a = f.tensor_info("a").unwrap();
    assert_eq!(a.dims, vec![4, 2]);
    assert_eq!(a.shape(), vec![2, 4]);
    assert_eq!((a.n_elements, a.n_bytes), (8, 32));
    let data_start = f.data_start() as usize;
    assert_eq!(data_start % 32, 0);
    assert_eq!(data_start + 98, w.0.len());
    // Tensor "b" is bytes 32..44 of the data section: 32, 33, ... as f32 bits.
    let b = f.dequantize("b").unwrap();
    let expect: Vec<f32> = (0..3)
        .map(|i| f32::from_le_bytes(std::array::from_fn(|k| (32 + 4 * i + k) as u8)))
        .collect();
    assert_eq!(
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        expect.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // The Q8_0 block: d = f16 from bytes (64, 65), q_i = byte 66 + i as i8.
    let q = f.dequantize("q").unwrap();
    let d = half::f16::from_le_bytes([64, 65]).to_f32();
    for (i, v) in q.iter().enumerate() {
        assert_eq!(v.to_bits(), (((66 + i) as u8 as i8) as f32 * d).to_bits());
    }
    let t = f
        .tensor("a", candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[2, 4]);
    assert!(matches!(
        f.dequantize("nope"),
        Err(GgufError::NoSuchTensor { .. })
    ));
}

#[test]
fn every_truncation_is_an_error() {
    let w = valid();
    for len in 0..w.0.len() {
        let cut = W(w.0[..len].to_vec());
        let e = err(&cut);
        assert!(
            matches!(
                e,
                GgufError::Truncated { .. }
                    | GgufError::CountTooLarge { .. }
                    | GgufError::TensorPastEnd { .. }
            ),
            "cut at {len}: {e}"
        );
    }
}

#[test]
fn empty_file_on_disk_is_an_error_naming_it() {
    let dir = std::env::temp_dir().join(format!("lumina2-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    let e = GgufFile::open(&p).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("empty.gguf"));
    let missing = GgufFile::open(dir.join("missing.gguf")).unwrap_err();
    assert!(matches!(missing, GgufError::Io { .. }));
    std::fs::write(&p, &valid().0).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.tensor_infos().len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_magic_and_versions() {
    let mut w = valid();
    w.0[..4].copy_from_slice(b"GGML");
    assert!(matches!(err(&w), GgufError::BadMagic { found, .. } if found == b"GGML"));
    for version in [0, 1, 4, u32::MAX] {
        let mut w = valid();
        w.0[4..8].copy_from_slice(&version.to_le_bytes());
        assert!(
            matches!(err(&w), GgufError::UnsupportedVersion { version: v, .. } if v == version)
        );
    }
    let mut w = valid();
    w.0[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(w.open().unwrap().version(), 2);
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    for (n_tensors, n_kv) in [(u64::MAX, 0), (0, u64::MAX), (1 << 40, 0), (0, 1 << 40)] {
        let w = W::header(3, n_tensors, n_kv);
        assert!(matches!(err(&w), GgufError::CountTooLarge { .. }));
    }
    // A key of length 2^62.
    let mut w = W::header(3, 0, 1);
    w.u64(1 << 62).raw(&[b'k'; 64]);
    assert!(matches!(err(&w), GgufError::CountTooLarge { count, .. } if count == 1 << 62));
    // A string value of length u64::MAX.
    let mut w = W::header(3, 0, 1);
    w.str("s").u32(8).u64(u64::MAX);
    assert!(matches!(err(&w), GgufError::CountTooLarge { .. }));
    // An array of 2^61 u64 (count * 8 overflows) and of 2^40 u8.
    for (ty, count) in [(10u32, 1u64 << 61), (0, 1 << 40), (9, 1 << 59)] {
        let mut w = W::header(3, 0, 1);
        w.str("arr").u32(9).u32(ty).u64(count).raw(&[0; 64]);
        assert!(
            matches!(err(&w), GgufError::CountTooLarge { .. }),
            "type {ty}"
        );
    }
    // A tensor name of absurd length.
    let mut w = W::header(3, 1, 0);
    w.u64(u64::MAX / 2).raw(&[0; 64]);
    assert!(matches!(err(&w), GgufError::CountTooLarge { .. }));
}

#[test]
fn arrays_nested_too_deep() {
    let mut w = W::header(3, 0, 1);
    w.str("deep").u32(9);
    for _ in 0..100 {
        w.u32(9).u64(1);
    }
    w.u32(0).u64(0);
    assert!(matches!(err(&w), GgufError::NestingTooDeep { max: 16, .. }));
}

#[test]
fn unknown_value_types_bad_bools_bad_utf8() {
    let mut w = W::header(3, 0, 1);
    w.str("k").u32(13).u32(0);
    assert!(matches!(
        err(&w),
        GgufError::UnknownValueType { id: 13, .. }
    ));
    let mut w = W::header(3, 0, 1);
    w.str("k").u32(9).u32(99).u64(0);
    assert!(matches!(
        err(&w),
        GgufError::UnknownValueType { id: 99, .. }
    ));
    let mut w = W::header(3, 0, 1);
    w.str("k").u32(7).u8(2);
    assert!(matches!(err(&w), GgufError::InvalidBool { byte: 2, .. }));
    let mut w = W::header(3, 0, 1);
    w.u64(2).raw(&[0xC3, 0x28]).u32(0).u8(0);
    assert!(matches!(err(&w), GgufError::InvalidUtf8 { .. }));
}

#[test]
fn duplicates() {
    let mut w = W::header(3, 0, 2);
    w.kv_u32("k", 1).kv_u32("k", 2);
    assert!(matches!(err(&w), GgufError::DuplicateKey { key, .. } if key == "k"));
    let mut w = W::header(3, 2, 0);
    w.tensor("t", &[4], 0, 0)
        .tensor("t", &[4], 0, 32)
        .data(32, 64);
    assert!(matches!(err(&w), GgufError::DuplicateTensor { name, .. } if name == "t"));
}

#[test]
fn alignment_key() {
    for bad in [0u32, 3, 48] {
        let mut w = W::header(3, 0, 1);
        w.kv_u32("general.alignment", bad);
        assert!(matches!(err(&w), GgufError::BadAlignment { .. }), "{bad}");
    }
    let mut w = W::header(3, 0, 1);
    w.str("general.alignment").u32(8).str("32");
    assert!(matches!(err(&w), GgufError::BadAlignment { .. }));
    // Alignment 64: offset 32 is misaligned, 64 is fine.
    let mut w = W::header(3, 1, 1);
    w.kv_u32("general.alignment", 64)
        .tensor("t", &[4], 0, 32)
        .data(64, 96);
    assert!(matches!(
        err(&w),
        GgufError::MisalignedTensor {
            offset: 32,
            alignment: 64,
            ..
        }
    ));
    let mut w = W::header(3, 1, 1);
    w.kv_u32("general.alignment", 64)
        .tensor("t", &[4], 0, 64)
        .data(64, 80);
    let f = w.open().unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_start() % 64, 0);
}

#[test]
fn bad_tensor_infos() {
    let one = |dims: &[u64], ty: u32, offset: u64, data: usize| {
        let mut w = W::header(3, 1, 0);
        w.tensor("t", dims, ty, offset).data(32, data);
        w
    };
    assert!(matches!(
        err(&one(&[4], 5, 0, 16)),
        GgufError::UnknownTensorType { id: 5, .. }
    ));
    assert!(matches!(
        err(&one(&[4], 1000, 0, 16)),
        GgufError::UnknownTensorType { id: 1000, .. }
    ));
    assert!(matches!(
        err(&one(&[1; 9], 0, 0, 16)),
        GgufError::InvalidDims { .. }
    ));
    let mut w = W::header(3, 1, 0);
    w.str("t").u32(u32::MAX).raw(&[0; 64]);
    assert!(matches!(err(&w), GgufError::InvalidDims { .. }));
    assert!(matches!(
        err(&one(&[u64::MAX, 1], 0, 0, 16)),
        GgufError::InvalidDims { .. }
    ));
    assert!(matches!(
        err(&one(&[1 << 32, 1 << 32], 0, 0, 16)),
        GgufError::InvalidDims { .. }
    ));
    // Q4_0 rows must be whole blocks of 32.
    assert!(matches!(
        err(&one(&[16, 2], 2, 0, 64)),
        GgufError::InvalidDims { .. }
    ));
    // Misaligned offset.
    assert!(matches!(
        err(&one(&[4], 0, 4, 64)),
        GgufError::MisalignedTensor { offset: 4, .. }
    ));
    // Past the end: 4 f32 need 16 bytes; the data section has 15.
    assert!(matches!(
        err(&one(&[4], 0, 0, 15)),
        GgufError::TensorPastEnd {
            end: 16,
            data_len: 15,
            ..
        }
    ));
    assert!(matches!(
        err(&one(&[4], 0, u64::MAX - 31, 64)),
        GgufError::TensorPastEnd { .. }
    ));
    // No data section at all.
    let mut w = W::header(3, 1, 0);
    w.tensor("t", &[4], 0, 0);
    assert!(matches!(err(&w), GgufError::TensorPastEnd { .. }));
    // Overlap: t1 is 64 bytes at 0, t2 starts at 32.
    let mut w = W::header(3, 2, 0);
    w.tensor("t1", &[16], 0, 0)
        .tensor("t2", &[4], 0, 32)
        .data(32, 128);
    assert!(matches!(err(&w), GgufError::OverlappingTensors { .. }));
    // Zero-element tensors are fine anywhere in range.
    let mut w = W::header(3, 2, 0);
    w.tensor("z", &[0, 4], 0, 0)
        .tensor("t", &[4], 0, 0)
        .data(32, 16);
    let f = w.open().unwrap();
    assert!(f.dequantize("z").unwrap().is_empty());
    assert_eq!(f.tensor_info("z").unwrap().shape(), vec![4, 0]);
}

#[test]
fn types_without_kernels_open_but_do_not_dequantize() {
    // IQ4_NL: 32-element blocks of 18 bytes.
    let mut w = W::header(3, 1, 0);
    w.tensor("iq", &[32], 20, 0).data(32, 18);
    let f = w.open().unwrap();
    let t = f.tensor_info("iq").unwrap();
    assert_eq!(t.ggml_type, GgmlType::IQ4_NL);
    assert_eq!(t.n_bytes, 18);
    assert_eq!(f.tensor_data("iq").unwrap().len(), 18);
    assert!(matches!(
        f.dequantize("iq"),
        Err(GgufError::Unsupported { .. })
    ));
    assert!(matches!(
        f.qtensor("iq", &candle_core::Device::Cpu),
        Err(GgufError::Unsupported { .. })
    ));
}

#[test]
fn ggml_type_table_round_trips() {
    for id in 0..64 {
        if let Some(t) = GgmlType::from_id(id) {
            assert_eq!(t.id(), id);
            assert!(t.type_size() > 0 && t.block_size() > 0);
        }
    }
    assert_eq!(GgmlType::from_id(4), None);
    assert_eq!(GgmlType::Q6_K.type_size(), 210);
    assert_eq!(GgmlType::Q4_K.type_size(), 144);
}

#[test]
fn random_corruptions_never_panic() {
    // Deterministic xorshift: overwrite 1-4 bytes (or cut the file) and use
    // whatever still opens through every accessor.
    let base = valid();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..3000 {
        let mut w = base.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % w.0.len() as u64) as usize;
            w.0[i] = next() as u8;
        }
        if next() % 8 == 0 {
            let len = (next() % w.0.len() as u64) as usize;
            w.0.truncate(len);
        }
        match w.open() {
            Err(e) => {
                assert!(e.to_string().starts_with(PATH), "{e}");
                refused += 1;
            }
            Ok(f) => {
                opened += 1;
                for t in f.tensor_infos() {
                    let n = f.dequantize(&t.name).map(|v| v.len());
                    if let Ok(n) = n {
                        assert_eq!(n as u64, t.n_elements);
                    }
                    let _ = f.qtensor(&t.name, &candle_core::Device::Cpu);
                    let _ = f.tensor(&t.name, candle_core::DType::BF16, &candle_core::Device::Cpu);
                }
            }
        }
    }
    assert!(
        opened > 100 && refused > 100,
        "{opened} opened, {refused} refused"
    );
}

#[test]
fn misaligned_data_still_makes_qtensors() {
    // general.alignment 1 lets a tensor start at an odd address; candle would
    // assert on it, so the bytes are copied to an aligned buffer first.
    for offset in [1u64, 2, 3] {
        let mut w = W::header(3, 1, 1);
        w.kv_u32("general.alignment", 1)
            .tensor("t", &[3], 0, offset)
            .data(1, offset as usize + 12);
        let f = w.open().unwrap();
        assert_eq!(f.alignment(), 1);
        let ours = f.dequantize("t").unwrap();
        let q = f.qtensor("t", &candle_core::Device::Cpu).unwrap();
        assert_eq!(q.data().unwrap().as_ref(), f.tensor_data("t").unwrap());
        let theirs = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            ours.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            theirs.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn tensors_in_other_dtypes_and_q8_1_layout() {
    // One Q8_0 block: d = 0.5, q_i = i - 16; as bf16 each value is exact.
    let mut w = W::header(3, 2, 0);
    w.tensor("q", &[32], 8, 0).tensor("q81", &[32], 9, 64);
    while !w.0.len().is_multiple_of(32) {
        w.0.push(0);
    }
    w.raw(&half::f16::from_f32(0.5).to_le_bytes());
    for i in 0..32u8 {
        w.u8(i.wrapping_sub(16));
    }
    w.raw(&[0; 30]);
    // Q8_1 is 36 bytes a block, as ggml's block_q8_1.
    w.raw(&[0; 36]);
    let f = w.open().unwrap();
    let expect: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(f.dequantize("q").unwrap(), expect);
    let dev = candle_core::Device::Cpu;
    for dt in [candle_core::DType::BF16, candle_core::DType::F16] {
        let x = f.tensor("q", dt, &dev).unwrap();
        assert_eq!(x.dtype(), dt);
        let back = x
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(back, expect);
    }
    assert_eq!(f.tensor_info("q81").unwrap().n_bytes, 36);
    assert!(matches!(
        f.dequantize("q81"),
        Err(GgufError::Unsupported { .. })
    ));
    let q = f.qtensor("q81", &dev).unwrap();
    assert_eq!(q.shape().dims(), &[32]);
}

#[test]
fn f16_special_values_as_numpy_converts_them() {
    // Bits from gguf-py 0.19 (`dequantize(..., F16)`, numpy's astype): signalling
    // NaNs stay signalling, subnormals and infinities are exact.
    let cases: [(u16, u32); 8] = [
        (0x7C01, 0x7F80_2000),
        (0xFE01, 0xFFC0_2000),
        (0x7E00, 0x7FC0_0000),
        (0x0001, 0x3380_0000),
        (0x8000, 0x8000_0000),
        (0x7C00, 0x7F80_0000),
        (0x83FF, 0xB87F_C000),
        (0x3C00, 0x3F80_0000),
    ];
    let bytes: Vec<u8> = cases.iter().flat_map(|(h, _)| h.to_le_bytes()).collect();
    let out = lumina2_loader::gguf::dequantize(GgmlType::F16, &bytes, cases.len()).unwrap();
    for ((h, f), o) in cases.iter().zip(&out) {
        assert_eq!(o.to_bits(), *f, "f16 {h:#06x}");
    }
}
