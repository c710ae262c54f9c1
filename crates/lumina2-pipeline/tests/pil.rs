//! Image reading and resizing against Pillow's own outputs
//! (`tests/fixtures/pil`, written by `xtask/parity/gen_pil_fixtures.py`):
//! bit for bit.

use std::path::{Path, PathBuf};

use lumina2_pipeline::img2img::luma;
use lumina2_pipeline::{resample, source_image};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pil")
}

fn read(name: &str) -> image::RgbImage {
    source_image::read_rgb(&dir().join(name)).unwrap()
}

fn sizes() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("sizes.json")).unwrap()).unwrap()
}

#[test]
fn every_png_colour_type_reads_as_pils_convert_rgb() {
    let s = sizes();
    let names = s["decoded"].as_array().unwrap();
    assert!(names.len() >= 9);
    for n in names {
        let n = n.as_str().unwrap();
        let ours = read(&format!("{n}.png"));
        let pil = read(&format!("{n}.rgb.png"));
        assert_eq!(ours.dimensions(), pil.dimensions(), "{n}");
        assert!(ours.as_raw() == pil.as_raw(), "{n}: differs from PIL");
    }
}

#[test]
fn lanczos_and_grey_match_pil_bit_for_bit() {
    let src = read("rgb.png");
    let (w, h) = (src.width() as usize, src.height() as usize);
    for size in sizes()["sizes"].as_array().unwrap() {
        let (ow, oh) = (
            size[0].as_u64().unwrap() as usize,
            size[1].as_u64().unwrap() as usize,
        );
        let ours = resample::lanczos_u8(src.as_raw(), (w, h), 3, (ow, oh));
        let pil = read(&format!("rgb.lanczos_{ow}x{oh}.png"));
        let diff = ours
            .iter()
            .zip(pil.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diff, 0, "{ow}x{oh}: {diff} values differ from PIL");
        // The mask's grey conversion (read back as RGB: grey replicated).
        let grey = read(&format!("rgb.lanczos_{ow}x{oh}.l.png"));
        for (p, g) in ours.chunks_exact(3).zip(grey.pixels()) {
            assert_eq!(luma(p[0], p[1], p[2]), g.0[0]);
        }
    }
}

/// The raw 8-bit values of a fixture: RGB, or L for the grey source.
fn raw(name: &str, grey: bool) -> (Vec<u8>, (usize, usize)) {
    let im = image::open(dir().join(name)).unwrap();
    let dims = (im.width() as usize, im.height() as usize);
    if grey {
        assert!(matches!(im, image::DynamicImage::ImageLuma8(_)), "{name}");
        (im.into_luma8().into_raw(), dims)
    } else {
        (read(name).into_raw(), dims)
    }
}

/// Resizes that change both axes, RGB and L, upscales, downscales and mixed:
/// bit for bit, and Pillow's order of the two passes (recorded by the
/// generator from which two-call composition its result equals) is
/// `resample::vertical_first`.
#[test]
fn two_axis_lanczos_matches_pil_and_its_pass_order() {
    let s = sizes();
    let cases = s["two_axis"].as_array().unwrap();
    assert!(cases.len() >= 100, "{}", cases.len());
    let (mut vertical, mut horizontal, mut order_visible) = (0, 0, 0);
    for case in cases {
        let name = case[0].as_str().unwrap();
        let (ow, oh) = (
            case[1].as_u64().unwrap() as usize,
            case[2].as_u64().unwrap() as usize,
        );
        let order = case[3].as_str().unwrap();
        let grey = name == "l";
        let channels = if grey { 1 } else { 3 };
        let (src, (w, h)) = raw(&format!("{name}.png"), grey);
        let (pil, dims) = raw(&format!("{name}.lanczos_{ow}x{oh}.png"), grey);
        assert_eq!(dims, (ow, oh), "{name} {ow}x{oh}");
        assert!(
            ow != w && oh != h,
            "{name} {ow}x{oh}: not a two-axis resize"
        );

        let v_first = resample::vertical_first((w, h), (ow, oh));
        if order != "hv" {
            assert_eq!(
                v_first,
                order == "v",
                "{name} {w}x{h} -> {ow}x{oh}: pass order"
            );
            order_visible += 1;
        }
        if v_first {
            vertical += 1;
        } else {
            horizontal += 1;
        }
        let ours = resample::lanczos_u8(&src, (w, h), channels, (ow, oh));
        let diff = ours.iter().zip(&pil).filter(|(a, b)| a != b).count();
        assert_eq!(ours.len(), pil.len(), "{name} {ow}x{oh}");
        assert_eq!(diff, 0, "{name} {ow}x{oh}: {diff} values differ from PIL");

        // Where the order is visible, the other order is not PIL's result.
        if order != "hv" {
            let other = if v_first {
                let x = resample::lanczos_u8(&src, (w, h), channels, (ow, h));
                resample::lanczos_u8(&x, (ow, h), channels, (ow, oh))
            } else {
                let y = resample::lanczos_u8(&src, (w, h), channels, (w, oh));
                resample::lanczos_u8(&y, (w, oh), channels, (ow, oh))
            };
            assert!(
                other != pil,
                "{name} {ow}x{oh}: both orders give PIL's result"
            );
        }
    }
    assert!(
        vertical >= 20 && horizontal >= 20,
        "{vertical} {horizontal}"
    );
    assert!(order_visible >= 100, "{order_visible}");
}

#[test]
fn hostile_files_are_refused_without_decoding() {
    // A header claiming 100000 x 100000 pixels, no data.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let ihdr = [
        &100_000u32.to_be_bytes()[..],
        &100_000u32.to_be_bytes()[..],
        &[8, 2, 0, 0, 0],
    ]
    .concat();
    png.extend_from_slice(&(ihdr.len() as u32).to_be_bytes());
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&ihdr);
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    let e = source_image::decode_rgb(&png).unwrap_err();
    assert!(
        e.contains("100000x100000") && e.contains("decompression bomb"),
        "{e}"
    );
    // Not a PNG, truncated PNG, empty file.
    assert!(source_image::decode_rgb(b"GIF89a....").is_err());
    let good = std::fs::read(dir().join("rgb.png")).unwrap();
    assert!(source_image::decode_rgb(&good[..good.len() / 2]).is_err());
    assert!(source_image::decode_rgb(&[]).is_err());
    let missing = source_image::read_rgb(&dir().join("missing.png")).unwrap_err();
    assert!(missing.to_string().contains("missing.png"), "{missing}");
}

/// Not a regular file: a device that never ends, a folder and (on Unix) a
/// FIFO with no writer are refused at once, nothing read from them.
#[test]
fn files_that_are_not_regular_are_refused_at_once() {
    let started = std::time::Instant::now();
    let mut paths = vec![PathBuf::from("/dev/zero"), dir()];
    #[cfg(unix)]
    {
        let fifo = std::env::temp_dir().join(format!("lumina2-pil-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            paths.push(fifo);
        }
    }
    for p in &paths {
        if !p.exists() {
            continue;
        }
        let e = source_image::read_rgb(p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
    for p in &paths {
        if p.to_string_lossy().contains("lumina2-pil-fifo") {
            let _ = std::fs::remove_file(p);
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}
