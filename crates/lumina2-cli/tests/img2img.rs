//! `lumina2 generate --image/--mask-image/--strength` on the committed tiny
//! pipeline: the inpaint parity case's image from the command line, its
//! metadata, and the errors of bad inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/img2img")
        .join(name)
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-i2i-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `inpaint` case (seed 11, 5 steps, strength 0.8; sizes from the image).
fn inpaint(out: &Path, extra: &[&str]) -> Output {
    let case = case_dir("inpaint");
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        case.join("pipeline").to_string_lossy().into_owned(),
        "--prompt".into(),
        "a red fox in the snow".into(),
        "--steps".into(),
        "5".into(),
        "--seed".into(),
        "11".into(),
        "--max-sequence-length".into(),
        "32".into(),
        // The reference image is diffusers' f32 run; without this, `auto`
        // picks bf16 on CPUs with AMX or AVX512-BF16.
        "--dtype".into(),
        "f32".into(),
        "-q".into(),
        "-o".into(),
        out.to_string_lossy().into_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_lumina2"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn png_text(bytes: &[u8]) -> Vec<(String, String)> {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    reader
        .info()
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect()
}

#[test]
fn inpainting_from_the_command_line_gives_the_reference_image() {
    let case = case_dir("inpaint");
    let dir = tmp_dir("ok");
    let out = dir.join("fox.png");
    let image = case.join("image.png");
    let mask = case.join("mask.png");
    let r = inpaint(
        &out,
        &[
            "--image",
            image.to_str().unwrap(),
            "--mask-image",
            mask.to_str().unwrap(),
            "--strength",
            "0.8",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let text = png_text(&bytes);
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("source_image").as_deref(), Some("image.png"));
    assert_eq!(get("mask_image").as_deref(), Some("mask.png"));
    assert_eq!(get("strength").as_deref(), Some("0.8"));
    assert_eq!(get("width").as_deref(), Some("48"));

    let expected = candle_core::safetensors::load(
        case.join("expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let reference: Vec<f32> = expected["image"].flatten_all().unwrap().to_vec1().unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (48, 32));
    let worst = img
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&p, &r)| (i32::from(p) - (r * 255.0).round_ties_even() as i32).abs())
        .max()
        .unwrap();
    // Rounded as PIL rounds diffusers' image: off by one at most where the
    // float error meets a .5.
    assert!(worst <= 1, "pixel off by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_fail_with_a_message_naming_them() {
    let case = case_dir("inpaint");
    let dir = tmp_dir("bad");
    let out = dir.join("x.png");
    let image = case.join("image.png");
    let image = image.to_str().unwrap();
    let not_png = case.join("case.json");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--image", "/nonexistent/in.png"],
            "/nonexistent/in.png",
        ),
        (
            vec!["--image", not_png.to_str().unwrap()],
            "not a readable PNG",
        ),
        (vec!["--image", image, "--strength", "1.5"], "--strength"),
        (vec!["--image", image, "--strength", "0"], "leaves no step"),
        (
            vec!["--image", image, "--strength", "1e-300"],
            "leaves no step",
        ),
        (vec!["--strength", "0.5"], "--image"),
    ];
    for (extra, needle) in cases {
        let r = inpaint(&out, &extra);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{extra:?} succeeded");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `generate` on the committed Z-Image inpainting case's pipeline folder.
fn zimage(case: &Path, out: &Path, extra: &[&str]) -> Output {
    zimage_seeded(case, out, 11, extra)
}

/// [`zimage`] with another seed.
fn zimage_seeded(case: &Path, out: &Path, seed: u64, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        case.join("pipeline").to_string_lossy().into_owned(),
        "--prompt".into(),
        "a red fox in the snow".into(),
        "--steps".into(),
        "5".into(),
        "--seed".into(),
        seed.to_string(),
        "--guidance-scale".into(),
        "3".into(),
        "--max-sequence-length".into(),
        "48".into(),
        "--dtype".into(),
        "f32".into(),
        "-q".into(),
        "-o".into(),
        out.to_string_lossy().into_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_lumina2"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

/// The largest difference, in 8-bit steps, between a PNG and a case's
/// reference image (diffusers' f32 values, rounded as PIL rounds them).
fn worst_pixel(png: &[u8], case: &Path, size: (u32, u32)) -> i32 {
    let expected = candle_core::safetensors::load(
        case.join("expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let reference: Vec<f32> = expected["image"].flatten_all().unwrap().to_vec1().unwrap();
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), size);
    img.as_raw()
        .iter()
        .zip(&reference)
        .map(|(&p, &r)| (i32::from(p) - (r * 255.0).round_ties_even() as i32).abs())
        .max()
        .unwrap()
}

/// A mask of another size and aspect than the image (portrait 13x30 on a
/// landscape 24x16 image) gives `ZImageInpaintPipeline`'s image: the mask
/// processor resizes it to the output size.
#[test]
fn zimage_inpainting_with_a_mask_of_another_size_gives_the_reference_image() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/zimage/inpaint_mask_other_size");
    let dir = tmp_dir("zimage-mask-size");
    let out = dir.join("fox.png");
    let image = case.join("image.png");
    let mask = case.join("mask.png");
    let r = zimage_seeded(
        &case,
        &out,
        17,
        &[
            "--image",
            image.to_str().unwrap(),
            "--mask-image",
            mask.to_str().unwrap(),
            "--strength",
            "0.9",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let worst = worst_pixel(&std::fs::read(&out).unwrap(), &case, (24, 16));
    assert!(worst <= 1, "pixel off by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Lumina2: a mask of another size and aspect gives the image of that mask
/// resized beforehand to the output size (PIL's Lanczos, which the
/// pipeline applies), and not the image without a mask.
#[test]
fn a_mask_of_another_size_is_resized_to_the_output() {
    let case = case_dir("inpaint");
    let dir = tmp_dir("mask-size");
    let image = case.join("image.png");
    let image = image.to_str().unwrap();
    let other = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/zimage/inpaint_mask_other_size/mask.png");
    let small = lumina2_pipeline::source_image::read_rgb(&other).unwrap();
    assert_eq!(small.dimensions(), (13, 30));
    let resized = lumina2_pipeline::resample::lanczos_u8(small.as_raw(), (13, 30), 3, (48, 32));
    let resized_path = dir.join("resized.png");
    image::RgbImage::from_raw(48, 32, resized)
        .unwrap()
        .save(&resized_path)
        .unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["--image", image, "--strength", "0.8"];
        args.extend_from_slice(extra);
        let r = inpaint(&out, &args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        image::open(&out).unwrap().to_rgb8()
    };
    let from_other = run("other.png", &["--mask-image", other.to_str().unwrap()]);
    let from_resized = run(
        "resized.png",
        &["--mask-image", resized_path.to_str().unwrap()],
    );
    let unmasked = run("unmasked.png", &[]);
    assert_eq!(from_other.dimensions(), (48, 32));
    assert!(from_other == from_resized);
    assert!(from_other != unmasked);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zimage_inpainting_from_the_command_line_gives_the_reference_image() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/zimage/inpaint_soft_mask");
    let dir = tmp_dir("zimage");
    let out = dir.join("fox.png");
    let image = case.join("image.png");
    let mask = case.join("mask.png");
    let (image, mask) = (image.to_str().unwrap(), mask.to_str().unwrap());
    let r = zimage(
        &case,
        &out,
        &["--image", image, "--mask-image", mask, "--strength", "0.8"],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let text = png_text(&bytes);
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("source_image").as_deref(), Some("image.png"));
    assert_eq!(get("mask_image").as_deref(), Some("mask.png"));
    assert_eq!(get("strength").as_deref(), Some("0.8"));
    assert_eq!(get("width").as_deref(), Some("24"));
    let expected = candle_core::safetensors::load(
        case.join("expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let reference: Vec<f32> = expected["image"].flatten_all().unwrap().to_vec1().unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (24, 16));
    let worst = img
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&p, &r)| (i32::from(p) - (r * 255.0).round_ties_even() as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "pixel off by {worst}");
    std::fs::remove_file(&out).unwrap();

    // Without --strength, inpainting takes ZImageInpaintPipeline's 1.0.
    let r = zimage(&case, &out, &["--image", image, "--mask-image", mask]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = png_text(&std::fs::read(&out).unwrap());
    assert!(text.contains(&("strength".to_string(), "1".to_string())));
    std::fs::remove_file(&out).unwrap();

    // Errors, exit status 2: another output size than the image's (the
    // reference encodes the image at its own), and one negative prompt for
    // two prompts with guidance (the reference asserts equal counts).
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--image", image, "--width", "32"], "--width"),
        (
            vec!["--prompt", "two cats", "--negative-prompt", "blurry"],
            "1 negative prompt(s) for 2 prompt(s)",
        ),
    ];
    for (extra, needle) in cases {
        let r = zimage(&case, &out, &extra);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
