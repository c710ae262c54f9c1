//! `.pth` checkpoints: PyTorch's own views and shared storages read bit for
//! bit, and hostile pickles and archives refused with a typed error (never a
//! panic, an unbounded allocation or a stack overflow).

use std::path::{Path, PathBuf};

use candle_core::Device;
use lumina2_loader::pth::{parse_state_dict, PickleError, StorageType};
use lumina2_loader::{Error, PthFile};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth_views")
        .join(name)
}

fn temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lumina2-pth-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---------------------------------------------------------------------------
// Hand-built pickles.

/// A pickle int: BININT1 when small, else LONG1 (little-endian two's
/// complement, as Python writes it).
fn int(v: i128) -> Vec<u8> {
    if (0..256).contains(&v) {
        return vec![b'K', v as u8];
    }
    let mut bytes = v.to_le_bytes().to_vec();
    while bytes.len() > 1 {
        let (last, prev) = (bytes[bytes.len() - 1], bytes[bytes.len() - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            bytes.pop();
        } else {
            break;
        }
    }
    let mut out = vec![0x8a, bytes.len() as u8];
    out.extend(bytes);
    out
}

fn unicode(s: &str) -> Vec<u8> {
    let mut out = vec![b'X'];
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
    out
}

fn ints_tuple(v: &[i128]) -> Vec<u8> {
    let mut out = vec![b'('];
    for &x in v {
        out.extend(int(x));
    }
    out.push(b't');
    out
}

/// One tensor in a storage, as `torch.save` pickles it.
struct T<'a> {
    name: &'a str,
    storage: &'a str,
    key: &'a str,
    numel: i128,
    offset: i128,
    size: &'a [i128],
    stride: &'a [i128],
}

fn tensor_pickle(t: &T) -> Vec<u8> {
    let mut p = unicode(t.name);
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(unicode("storage"));
    p.extend(format!("ctorch\n{}\n", t.storage).as_bytes());
    p.extend(unicode(t.key));
    p.extend(unicode("cpu"));
    p.extend(int(t.numel));
    p.extend(b"tQ");
    p.extend(int(t.offset));
    p.extend(ints_tuple(t.size));
    p.extend(ints_tuple(t.stride));
    p.extend(b"\x89ccollections\nOrderedDict\n)RtR");
    p
}

fn state_dict_pickle(tensors: &[T]) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    for t in tensors {
        p.extend(tensor_pickle(t));
    }
    p.extend(b"u.");
    p
}

fn one(t: T) -> Vec<u8> {
    state_dict_pickle(&[t])
}

fn f32_tensor<'a>(size: &'a [i128], stride: &'a [i128], offset: i128, numel: i128) -> T<'a> {
    T {
        name: "w",
        storage: "FloatStorage",
        key: "0",
        numel,
        offset,
        size,
        stride,
    }
}

fn malformed(e: PickleError) -> String {
    match e {
        PickleError::Malformed { reason, .. } => reason,
        other => panic!("expected Malformed, got {other}"),
    }
}

// ---------------------------------------------------------------------------
// Hand-built zip archives (torch.save's layout: stored entries, zip64 end).

struct ZipEntry {
    name: String,
    /// The bytes in the archive (compressed when `method` is 8).
    data: Vec<u8>,
    method: u16,
    /// The size the central directory (and the local header, saturated)
    /// claims, when it lies; for a deflated entry, the uncompressed size.
    declared: Option<u64>,
}

fn entry(name: &str, data: &[u8]) -> ZipEntry {
    ZipEntry {
        name: name.to_string(),
        data: data.to_vec(),
        method: 0,
        declared: None,
    }
}

fn deflated(name: &str, data: &[u8], declared: u64) -> ZipEntry {
    ZipEntry {
        name: name.to_string(),
        data: miniz_oxide::deflate::compress_to_vec(data, 6),
        method: 8,
        declared: Some(declared),
    }
}

fn zip(entries: &[ZipEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let size = e.declared.unwrap_or(e.data.len() as u64);
        let csize = if e.method == 8 {
            e.data.len() as u64
        } else {
            size
        };
        let (size32, csize32, extra) = if size >= 0xffff_ffff {
            let mut x = vec![1, 0, 16, 0];
            x.extend(size.to_le_bytes());
            x.extend(csize.to_le_bytes());
            (0xffff_ffffu32, 0xffff_ffffu32, x)
        } else {
            (size as u32, csize as u32, Vec::new())
        };
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend([45, 0, 0, 0]);
        out.extend(e.method.to_le_bytes());
        out.extend([0; 8]); // time, date, crc
        out.extend(csize32.to_le_bytes());
        out.extend(size32.to_le_bytes());
        out.extend((e.name.len() as u16).to_le_bytes());
        out.extend((extra.len() as u16).to_le_bytes());
        out.extend(e.name.as_bytes());
        out.extend(&extra);
        out.extend(&e.data);

        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend([45, 0, 45, 0, 0, 0]);
        central.extend(e.method.to_le_bytes());
        central.extend([0; 8]);
        central.extend(csize32.to_le_bytes());
        central.extend(size32.to_le_bytes());
        central.extend((e.name.len() as u16).to_le_bytes());
        central.extend((extra.len() as u16).to_le_bytes());
        central.extend([0; 10]); // comment length, disk, attributes
        central.extend(offset.to_le_bytes());
        central.extend(e.name.as_bytes());
        central.extend(&extra);
    }
    let cd_start = out.len() as u64;
    let cd_size = central.len() as u64;
    out.extend(central);
    let eocd64 = out.len() as u64;
    out.extend(0x0606_4b50u32.to_le_bytes());
    out.extend(44u64.to_le_bytes());
    out.extend([45, 0, 45, 0]);
    out.extend([0; 8]);
    out.extend((entries.len() as u64).to_le_bytes());
    out.extend((entries.len() as u64).to_le_bytes());
    out.extend(cd_size.to_le_bytes());
    out.extend(cd_start.to_le_bytes());
    out.extend(0x0706_4b50u32.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(eocd64.to_le_bytes());
    out.extend(1u32.to_le_bytes());
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0; 4]);
    out.extend([0xff; 4]);
    out.extend([0xff; 8]);
    out.extend([0; 2]);
    out
}

fn pth(pickle: &[u8], storages: Vec<ZipEntry>) -> Vec<u8> {
    let mut entries = vec![entry("archive/data.pkl", pickle)];
    entries.extend(storages);
    entries.push(entry("archive/byteorder", b"little"));
    zip(&entries)
}

fn pth_error(name: &str, bytes: &[u8]) -> String {
    match PthFile::open(temp(name, bytes)) {
        Ok(_) => panic!("{name} was accepted"),
        Err(Error::Pth { reason, .. }) => reason,
        Err(other) => panic!("{name}: expected Error::Pth, got {other}"),
    }
}

// ---------------------------------------------------------------------------
// PyTorch's own files.

#[test]
fn torch_save_views_shared_storages_and_strides_match_torch_load() {
    // torch.save's own archive, with pickle protocols 2 and 5, and the same
    // re-zipped with deflate.
    for file in ["views.pth", "views_protocol5.pth", "views_deflated.pth"] {
        views_match_torch_load(file);
    }
}

fn views_match_torch_load(file: &str) {
    let f = PthFile::open(fixture(file)).unwrap();
    let expected =
        candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    let mut keys: Vec<String> = expected.keys().cloned().collect();
    keys.sort();
    assert_eq!(f.keys(), keys);
    for k in &keys {
        let got = f.tensor(k).unwrap();
        let want = &expected[k];
        assert_eq!(got.dims(), want.dims(), "{file}: {k}");
        assert_eq!(got.dtype(), want.dtype(), "{file}: {k}");
        // Bit for bit.
        assert_eq!(raw(&got), raw(want), "{file}: {k}");
    }
    // The views the generator wrote really are views (the case this guards).
    let k = f.view("k").unwrap();
    assert_eq!((k.offset, k.storage_numel), (128, 384));
    assert_eq!(f.view("transposed").unwrap().stride, vec![1, 6]);
    assert_eq!(f.view("expanded").unwrap().stride, vec![0, 1]);
    assert_eq!(
        f.view("bf16_permuted").unwrap().storage_type,
        StorageType::BFloat16
    );
}

/// A tensor's elements as little-endian bytes.
fn raw(t: &candle_core::Tensor) -> Vec<u8> {
    use candle_core::DType;
    fn le<T: candle_core::WithDType, const N: usize>(
        t: &candle_core::Tensor,
        f: fn(T) -> [u8; N],
    ) -> Vec<u8> {
        t.to_vec1::<T>().unwrap().into_iter().flat_map(f).collect()
    }
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => le(&t, f32::to_le_bytes),
        DType::F64 => le(&t, f64::to_le_bytes),
        DType::F16 => le(&t, |x: half::f16| x.to_bits().to_le_bytes()),
        DType::BF16 => le(&t, |x: half::bf16| x.to_bits().to_le_bytes()),
        DType::I64 => le(&t, i64::to_le_bytes),
        DType::I32 => le(&t, i32::to_le_bytes),
        DType::I16 => le(&t, i16::to_le_bytes),
        DType::U8 => le(&t, u8::to_le_bytes),
        other => panic!("unexpected dtype {other:?}"),
    }
}

#[test]
fn a_hand_built_state_dict_reads() {
    let data: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let p = one(f32_tensor(&[2, 2], &[1, 3], 1, 6));
    let f = PthFile::open(temp(
        "ok.pth",
        &pth(&p, vec![entry("archive/data/0", &data)]),
    ))
    .unwrap();
    let t = f.tensor("w").unwrap();
    // Elements 1 + [[0, 3], [1, 4]].
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 4.0], vec![2.0, 5.0]]
    );
}

// ---------------------------------------------------------------------------
// Malicious pickles (issue 15).

#[test]
fn reduce_of_an_allowed_global_with_no_arguments_is_an_error() {
    let p = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n)Ru.";
    let e = malformed(parse_state_dict(p).unwrap_err());
    assert!(e.contains("0 arguments, expected 6 or 7"), "{e}");
    let p = b"\x80\x02ctorch._utils\n_rebuild_parameter\n)R.";
    let e = malformed(parse_state_dict(p).unwrap_err());
    assert!(e.contains("expected 3"), "{e}");
    // Through the file, too.
    let e = pth_error("reduce.pth", &pth(p, vec![]));
    assert!(e.contains("expected 3"), "{e}");
}

#[test]
fn a_short_storage_tuple_is_an_error() {
    // ('storage', FloatStorage) instead of five values.
    let mut p = b"\x80\x02}(".to_vec();
    p.extend(unicode("w"));
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(unicode("storage"));
    p.extend(b"ctorch\nFloatStorage\ntQK\x00(K\x01t(K\x01t\x89ccollections\nOrderedDict\n)RtRu.");
    let e = malformed(parse_state_dict(&p).unwrap_err());
    assert!(e.contains("persistent id of 2 values"), "{e}");
}

#[test]
fn two_million_nested_tuple1_is_refused_without_recursion() {
    let mut p = b"\x80\x02N".to_vec();
    p.extend(std::iter::repeat_n(0x85u8, 2_000_000));
    p.push(b'.');
    match parse_state_dict(&p).unwrap_err() {
        PickleError::Limit { what, limit, .. } => {
            assert_eq!((what, limit), ("nesting levels", 32));
        }
        other => panic!("{other}"),
    }
}

/// `N`, then `levels` times: move it to the memo, get it twice, pair them.
fn memo_bomb(levels: u8) -> Vec<u8> {
    let mut p = b"\x80\x02N".to_vec();
    for i in 0..levels {
        p.extend([b'q', i, b'0', b'h', i, b'h', i, 0x86]);
    }
    p.push(b'.');
    p
}

#[test]
fn a_memo_billion_laughs_costs_its_bytes() {
    // 47 levels: 2^47 leaves if GET copied; refused at the nesting limit.
    let p = memo_bomb(47);
    assert!(p.len() < 400);
    assert!(matches!(
        parse_state_dict(&p).unwrap_err(),
        PickleError::Limit {
            what: "nesting levels",
            ..
        }
    ));
    // 31 levels stay under the limit: 2^31 leaves, read in microseconds
    // because GET shares, then refused as not a state dict.
    let t = std::time::Instant::now();
    let e = malformed(parse_state_dict(&memo_bomb(31)).unwrap_err());
    assert!(e.contains("holds a tuple, not a state dict"), "{e}");
    assert!(t.elapsed().as_secs_f64() < 0.5);
}

#[test]
fn a_long1_offset_of_2_pow_62_is_an_error_not_a_wrap() {
    let p = one(f32_tensor(&[2], &[1], 1 << 62, 4));
    let e = malformed(parse_state_dict(&p).unwrap_err());
    assert!(
        e.contains("at offset 4611686018427387904 does not fit"),
        "{e}"
    );
    // Wider than 64 bits: refused when read.
    let p = one(f32_tensor(&[2], &[1], 1 << 64, 4));
    let e = malformed(parse_state_dict(&p).unwrap_err());
    assert!(e.contains("wider than 64 bits"), "{e}");
    // And a stride that overflows the reach computation.
    let p = one(f32_tensor(&[5, 2], &[1 << 62, 1], 0, 4));
    assert!(parse_state_dict(&p).is_err());
}

#[test]
fn globals_outside_the_allow_list_are_unsafe() {
    let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
    match parse_state_dict(p).unwrap_err() {
        PickleError::Global { module, name, at } => {
            assert_eq!((module.as_str(), name.as_str(), at), ("os", "system", 2));
        }
        other => panic!("{other}"),
    }
    let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
    assert!(matches!(
        parse_state_dict(p).unwrap_err(),
        PickleError::Global { .. }
    ));
    assert!(matches!(
        PthFile::open(temp("os.pth", &pth(b"\x80\x02cos\nsystem\n.", vec![]))),
        Err(Error::UnsafePickle { .. })
    ));
}

#[test]
fn opcodes_outside_the_subset_are_named() {
    match parse_state_dict(b"\x80\x02\x82\x01.").unwrap_err() {
        PickleError::Opcode { op, name, at } => assert_eq!((op, name, at), (0x82, "EXT", 2)),
        other => panic!("{other}"),
    }
    assert!(matches!(
        parse_state_dict(b"\x80\x02").unwrap_err(),
        PickleError::Truncated { at: 2 }
    ));
    // A string longer than what remains.
    assert!(matches!(
        parse_state_dict(b"\x80\x02X\xff\xff\xff\xff").unwrap_err(),
        PickleError::Truncated { .. }
    ));
    // Values below a MARK are out of reach.
    assert!(parse_state_dict(b"\x80\x02}(s.").is_err());
}

// ---------------------------------------------------------------------------
// Allocations and archive structure.

#[test]
fn a_storage_entry_declaring_1_tib_allocates_nothing() {
    let rows: i128 = (1 << 31) - 1;
    let p = one(T {
        name: "w",
        storage: "HalfStorage",
        key: "0",
        numel: rows * 256,
        offset: 0,
        size: &[rows, 256],
        stride: &[256, 1],
    });
    let storage = ZipEntry {
        declared: Some(1 << 40),
        ..entry("archive/data/0", &[0u8; 64])
    };
    let e = pth_error("tib.pth", &pth(&p, vec![storage]));
    assert!(
        e.contains("declares 1099511627776 bytes") && e.contains("past the end"),
        "{e}"
    );
    // An honest 64-byte entry: the pickle's shape needs more than it holds.
    let e = pth_error(
        "short.pth",
        &pth(&p, vec![entry("archive/data/0", &[0u8; 64])]),
    );
    assert!(
        e.contains("tensor `w`: storage `0` holds 64 bytes") && e.contains("need 1099511627264"),
        "{e}"
    );
}

#[test]
fn a_broadcast_view_is_bounded() {
    // One element broadcast to 2^40 elements.
    let p = one(f32_tensor(&[1 << 20, 1 << 20], &[0, 0], 0, 1));
    let e = pth_error(
        "broadcast.pth",
        &pth(&p, vec![entry("archive/data/0", &[0u8; 4])]),
    );
    assert!(e.contains("would expand storage `0` of 4 bytes"), "{e}");
}

#[test]
fn deflated_entries_read_within_the_ratio_and_the_real_stream() {
    let data: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let p = one(f32_tensor(&[2, 2], &[1, 3], 1, 6));
    let f = PthFile::open(temp(
        "deflated.pth",
        &pth(&p, vec![deflated("archive/data/0", &data, 24)]),
    ))
    .unwrap();
    assert_eq!(
        f.tensor("w").unwrap().to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 4.0], vec![2.0, 5.0]]
    );
    // A claim beyond deflate's ratio is refused when the file is opened.
    let e = pth_error(
        "ratio.pth",
        &pth(&p, vec![deflated("archive/data/0", &data, 1 << 40)]),
    );
    assert!(e.contains("more than deflate's maximum ratio 1032"), "{e}");
    // A claim within the ratio that the stream does not keep: the tensor
    // read fails once the stream ends, having allocated what it produced.
    // (Incompressible bytes, so that the claim is within the ratio.)
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..1 << 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let big = one(f32_tensor(&[1 << 20], &[1], 0, 1 << 20));
    let f = PthFile::open(temp(
        "liar.pth",
        &pth(&big, vec![deflated("archive/data/0", &noise, 4 << 20)]),
    ))
    .unwrap();
    let e = f.tensor("w").unwrap_err().to_string();
    assert!(e.contains("holds 65536 bytes, 4194304 are needed"), "{e}");
    // Other compression methods are named.
    let bzip2 = ZipEntry {
        method: 12,
        ..entry("archive/data/0", &data)
    };
    let e = pth_error("bzip2.pth", &pth(&p, vec![bzip2]));
    assert!(e.contains("zip compression method 12"), "{e}");
}

#[test]
fn inconsistent_and_truncated_archives_are_errors() {
    let p = one(f32_tensor(&[1], &[1], 0, 1));
    // The local header names another file than the central directory.
    let mut bytes = pth(&p, vec![entry("archive/data/0", &[0u8; 4])]);
    let at = bytes
        .windows(14)
        .position(|w| w == b"archive/data/0")
        .unwrap();
    bytes[at + 13] = b'9';
    let e = pth_error("local.pth", &bytes);
    assert!(e.contains("disagrees with the central directory"), "{e}");

    // Every truncation of a good archive is an error, never a panic.
    let good = pth(&p, vec![entry("archive/data/0", &[0u8; 4])]);
    assert!(PthFile::open(temp("good.pth", &good)).is_ok());
    for cut in 0..good.len() {
        assert!(
            PthFile::open(temp("cut.pth", &good[..cut])).is_err(),
            "cut at {cut}"
        );
    }
}
