//! The `lumina2` command on the committed tiny pipeline: a generation writes a
//! PNG that matches diffusers' image and carries the parameters; bad input
//! fails with a message and a non-zero status, leaving no file behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pipeline_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lumina2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lumina2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// PNG text chunks (iTXt, uncompressed) as key/value pairs.
fn png_text(bytes: &[u8]) -> Vec<(String, String)> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().unwrap();
    reader
        .info()
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect()
}

/// `lumina2 generate` of the `seed_cfg` fixture case (seed 42, 48x32, 4 steps)
/// into `out`, with `extra` arguments.
fn generate_fixture_case(out: &Path, extra: &[&str]) -> Output {
    let model = pipeline_dir();
    generate_case(&["--model", model.to_str().unwrap()], out, extra)
}

/// The `seed_cfg` case from the weights `source` names (`--model ...`, or
/// `--transformer ... --text-encoder ... --vae ...`).
fn generate_case(source: &[&str], out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["generate"];
    args.extend_from_slice(source);
    args.extend_from_slice(&[
        "--prompt",
        "a red fox in the snow",
        "--width",
        "48",
        "--height",
        "32",
        "--steps",
        "4",
        "--seed",
        "42",
        "--max-sequence-length",
        "32",
        // The reference is diffusers' f32 image (`auto` is bf16 on CPUs with AMX).
        "--dtype",
        "f32",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    lumina2(&args)
}

/// diffusers' `output_type="np"` image of the `seed_cfg` case, `[H, W, 3]`
/// values in 0..1, flattened.
fn fixture_reference() -> Vec<f32> {
    let expected = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    expected["image"].flatten_all().unwrap().to_vec1().unwrap()
}

/// Asserts that a PNG holds diffusers' `output_type="np"` image of the
/// `seed_cfg` case, rounded as its PIL output is (off by one at most where
/// the float error meets a .5).
fn assert_fixture_pixels(png: &[u8]) {
    let reference = fixture_reference();
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (48, 32));
    let worst = img
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&p, &r)| (i32::from(p) - (r * 255.0).round_ties_even() as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "pixel off by {worst}");
}

#[test]
fn generates_the_diffusers_image_with_metadata() {
    let dir = tmp_dir("gen");
    let r = generate_fixture_case(&dir.join("fox_{seed}.png"), &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(files_in(&dir), vec!["fox_42.png".to_string()]);
    let bytes = std::fs::read(dir.join("fox_42.png")).unwrap();
    let text = png_text(&bytes);
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("prompt"), "a red fox in the snow");
    assert_eq!(get("seed"), "42");
    assert_eq!(get("num_inference_steps"), "4");
    assert_eq!(get("width"), "48");
    assert_eq!(get("sampler"), "euler");
    assert_eq!(get("dtype"), "f32");
    // AUTOMATIC1111's `parameters` chunk, as image browsers parse it.
    assert_eq!(
        get("parameters"),
        format!(
            "a red fox in the snow\nSteps: 4, Sampler: Euler, CFG scale: 4.0, Seed: 42, Size: 48x32, Model: {}, Version: lumina2-rs {}",
            get("model"),
            env!("CARGO_PKG_VERSION")
        )
    );

    assert_fixture_pixels(&bytes);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without `--dtype`, the CLI says which dtype `auto` chose and why, records
/// it, and writes the negative prompt and quoted values into `parameters` as
/// A1111 does.
#[test]
fn auto_dtype_is_reported_and_recorded() {
    let dir = tmp_dir("auto_dtype");
    let out = dir.join("a.png");
    let model = pipeline_dir();
    let r = lumina2(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a fox, at night",
        "--negative-prompt",
        "blurry",
        "--guidance-scale",
        "5.5",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "--seed",
        "3",
        "--max-sequence-length",
        "32",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stderr = String::from_utf8_lossy(&r.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("dtype: "))
        .unwrap_or_else(|| panic!("no dtype line in:\n{stderr}"));
    let chosen = line["dtype: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(chosen == "f32" || chosen == "bf16", "{line}");
    let text = png_text(&std::fs::read(&out).unwrap());
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("dtype"), chosen);
    let parameters = get("parameters");
    let lines: Vec<&str> = parameters.lines().collect();
    assert_eq!(lines[0], "a fox, at night");
    assert_eq!(lines[1], "Negative prompt: blurry");
    assert!(
        lines[2]
            .starts_with("Steps: 1, Sampler: Euler, CFG scale: 5.5, Seed: 3, Size: 32x32, Model: "),
        "{parameters}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same generation with the text encoder given as a llama.cpp-style GGUF
/// file (`lumina2-pipeline/tests/fixtures/text_encoder.gguf`: the tiny pipeline's Gemma-2 in
/// F16, written by xtask/parity/gen_text_encoder_gguf.py): the same image.
#[test]
fn a_gguf_text_encoder_gives_the_same_image() {
    let dir = tmp_dir("gguf-te");
    let out = dir.join("fox.png");
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/text_encoder.gguf");
    let r = generate_fixture_case(&out, &["--text-encoder", gguf.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_fixture_pixels(&std::fs::read(&out).unwrap());

    // A GGUF that is not a Gemma-2 model is refused with its architecture.
    let lumina = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-loader/tests/fixtures/transformer/tiny_gguf_q4_0_f32");
    let lumina_gguf = std::fs::read_dir(&lumina)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .unwrap();
    let bad = dir.join("bad.png");
    let r = generate_fixture_case(&bad, &["--text-encoder", lumina_gguf.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("lumina2") && err.contains("gemma2"), "{err}");
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_options_fail_before_loading_and_write_nothing() {
    let dir = tmp_dir("bad");
    let model = pipeline_dir();
    let m = model.to_str().unwrap();
    let out = dir.join("x.png");
    let o = out.to_str().unwrap();
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--width", "40"], "multiple of 16"),
        (vec!["--width", "0"], "multiple of 16"),
        (vec!["--height", "100000"], "larger than"),
        (vec!["--steps", "0"], "at least 1"),
        (
            vec!["--max-sequence-length", "513"],
            "--max-sequence-length",
        ),
        (
            vec!["--num-images-per-prompt", "0"],
            "--num-images-per-prompt",
        ),
        (vec!["--guidance-scale", "NaN"], "--guidance-scale"),
        (
            vec!["--negative-prompt", "a", "--negative-prompt", "b"],
            "negative",
        ),
        (vec!["--system-preset", "nope"], "unknown preset"),
        (vec!["--device", "tpu"], "unknown device"),
        (
            vec![
                "--width",
                "8192",
                "--height",
                "16384",
                "--num-images-per-prompt",
                "64",
            ],
            "MiB",
        ),
    ];
    // A backend left out of the build names the command that builds it in.
    if !cfg!(feature = "cuda") {
        cases.push((
            vec!["--device", "cuda"],
            "cargo install --path crates/lumina2-cli --features cuda",
        ));
    }
    if !cfg!(feature = "metal") {
        cases.push((
            vec!["--device", "metal:1"],
            "cargo install --path crates/lumina2-cli --features metal",
        ));
    }
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model", m, "--prompt", "x", "-o", o, "-q"];
        args.extend(extra.iter().copied());
        let r = lumina2(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{extra:?} succeeded");
        // Usage errors exit with 2, failures while running (memory) with 1.
        let code = if needle == "MiB" { 1 } else { 2 };
        assert_eq!(r.status.code(), Some(code), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));

    // Output folder missing; model folder missing (offline Hub lookup).
    let r = lumina2(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "-o",
        "/nonexistent-dir/x.png",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("does not exist"));
    let r = lumina2(&[
        "generate",
        "--model",
        "nobody/nothing",
        "--prompt",
        "x",
        "-o",
        o,
        "--offline",
    ]);
    assert!(!r.status.success());
    assert!(files_in(&dir).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompts_of_any_kind_do_not_crash() {
    let dir = tmp_dir("prompts");
    let model = pipeline_dir();
    // ~100k characters: truncated to --max-sequence-length tokens (the tiny
    // model's RoPE table holds 128 caption positions, so 64 here).
    let huge = "a very long prompt ".repeat(5300);
    for (i, p) in ["", huge.as_str(), "\u{1}\u{FFFD}\u{202E}☃ 🦊 \\x00 ÿ"]
        .iter()
        .enumerate()
    {
        let out = dir.join(format!("p{i}.png"));
        let r = lumina2(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            p,
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "1",
            "--seed",
            "1",
            "--max-sequence-length",
            "64",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(
            r.status.success(),
            "prompt {i}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(out.is_file());
    }
    // Past the model's RoPE table: a clear error, no panic, no file.
    let out = dir.join("long.png");
    let r = lumina2(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &huge,
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        err.contains("axes_lens") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(err.matches("beyond the table length").count(), 1, "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_describes_a_transformer_folder() {
    let t = pipeline_dir().join("transformer");
    let r = lumina2(&["inspect", t.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let s = String::from_utf8_lossy(&r.stdout);
    assert!(s.contains("Diffusers keys"), "{s}");
    assert!(s.contains("num_layers: 2"), "{s}");
    assert!(s.contains("hidden_size: 32"), "{s}");
    let r = lumina2(&["inspect", "/nonexistent.gguf"]);
    assert!(!r.status.success());
}

fn write_lora(path: &Path, key: &str) {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 0.5, (2, 32), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.5, (32, 2), &dev).unwrap();
    let tensors = std::collections::HashMap::from([
        (format!("transformer.{key}.lora_A.weight"), a),
        (format!("transformer.{key}.lora_B.weight"), b),
    ]);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn loras_change_the_image_and_unknown_keys_are_refused() {
    let dir = tmp_dir("lora");
    let model = pipeline_dir();
    let good = dir.join("good.safetensors");
    let bad = dir.join("bad.safetensors");
    write_lora(&good, "layers.0.attn.to_q");
    write_lora(&bad, "layers.7.attn.to_nothing");
    let run = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a boat",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "2",
            "--seed",
            "5",
            "--max-sequence-length",
            "32",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lumina2(&args)
    };
    let plain = dir.join("plain.png");
    let lora = dir.join("lora.png");
    assert!(run(&[], &plain).status.success());
    let spec = format!("{}:0.7", good.display());
    let r = run(&["--lora", &spec], &lora);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_ne!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&lora).unwrap()
    );
    let text = png_text(&std::fs::read(&lora).unwrap());
    assert!(text.iter().any(|(k, v)| k == "lora" && v == &spec));

    let refused = dir.join("refused.png");
    let r = run(&["--lora", bad.to_str().unwrap()], &refused);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(err.contains("layers.7.attn.to_nothing"), "{err}");
    assert!(!refused.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ctrl-C during denoising: exit status 130, a message, no image.
#[cfg(unix)]
#[test]
fn sigint_during_denoising_leaves_no_image() {
    let dir = tmp_dir("sigint");
    let out = dir.join("never.png");
    let model = pipeline_dir();
    let child = Command::new(env!("CARGO_BIN_EXE_lumina2"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "10000",
            "--max-sequence-length",
            "32",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let r = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An output path that cannot be written (its folder is a file; a read-only
/// folder is refused the same way for a non-root user, but root may write
/// anywhere, so this is what a test can check everywhere): refused before
/// anything is loaded, status 1, naming the folder, nothing left behind.
#[test]
fn an_unwritable_output_path_fails_cleanly() {
    let dir = tmp_dir("unwritable");
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let out = not_a_dir.join("fox.png");
    let r = generate_fixture_case(&out, &[]);
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("is not a folder") && err.contains("file"),
        "{err}"
    );
    assert_eq!(files_in(&dir), vec!["file".to_string()]);
    assert_eq!(std::fs::read(&not_a_dir).unwrap(), b"x");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--int8` (the transformer's attention and feed-forward layers in int8):
/// the same picture within the error of 8-bit arithmetic, measured against
/// diffusers' f32 image of the fixture case.
#[test]
fn int8_transformer_gives_nearly_the_same_image() {
    let dir = tmp_dir("int8");
    let out = dir.join("fox.png");
    let r = generate_fixture_case(&out, &["--int8"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let reference = fixture_reference();
    let img = image::load_from_memory(&std::fs::read(&out).unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!((img.width(), img.height()), (48, 32));
    let diffs: Vec<i32> = img
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&p, &r)| (i32::from(p) - (r * 255.0).round_ties_even() as i32).abs())
        .collect();
    let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
    let worst = diffs.iter().max().copied().unwrap_or(0);
    eprintln!("int8 image: mean pixel error {mean:.3}, worst {worst}");
    // Measured: mean 0.99, worst 7 (of 255); the f32 run is within 1 of the
    // reference everywhere, so a mean this far off also shows int8 ran.
    assert!(mean > 0.1 && mean < 2.0, "mean pixel error {mean}");
    assert!(worst <= 16, "pixel off by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The decoded RGB pixels of a PNG.
fn png_pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

/// `lumina2 convert --format comfy` and `comfy-split` write files that
/// `generate` reads into the folder's image (the tiny model's configs and
/// tokenizer given, as its sizes are not Lumina-Image 2.0's), and that
/// `inspect` names.
#[test]
fn comfy_files_written_by_convert_give_the_folders_image() {
    let dir = tmp_dir("comfy");
    let folder = pipeline_dir();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let ckpt = dir.join("lumina_2.safetensors");
    let r = lumina2(&[
        "convert",
        "--from",
        &p(&folder),
        "--to",
        &p(&ckpt),
        "--format",
        "comfy",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    // The folder has no SentencePiece model to embed: said so.
    assert!(err.contains("spiece_model"), "{err}");
    let split = dir.join("models");
    let r = lumina2(&[
        "-q",
        "convert",
        "--from",
        &p(&folder),
        "--to",
        &p(&split),
        "--format",
        "comfy-split",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let t = split.join("diffusion_models/lumina_2_model.safetensors");
    let te = split.join("text_encoders/gemma_2_2b.safetensors");
    let vae = split.join("vae/ae.safetensors");

    let reference = dir.join("folder.png");
    assert!(generate_fixture_case(&reference, &[]).status.success());
    let configs = [
        "--transformer-config".to_string(),
        p(&folder.join("transformer")),
        "--text-encoder-config".into(),
        p(&folder.join("text_encoder")),
        "--vae-config".into(),
        p(&folder.join("vae")),
        "--tokenizer".into(),
        p(&folder.join("tokenizer")),
        "--scheduler-config".into(),
        p(&folder.join("scheduler/scheduler_config.json")),
    ];
    let configs: Vec<&str> = configs.iter().map(String::as_str).collect();
    let from_ckpt = dir.join("ckpt.png");
    let r = generate_case(&["--model", &p(&ckpt)], &from_ckpt, &configs);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let from_split = dir.join("split.png");
    let r = generate_case(
        &[
            "--transformer",
            &p(&t),
            "--text-encoder",
            &p(&te),
            "--vae",
            &p(&vae),
        ],
        &from_split,
        &configs,
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_fixture_pixels(&std::fs::read(&reference).unwrap());
    assert_eq!(png_pixels(&from_ckpt), png_pixels(&reference));
    assert_eq!(png_pixels(&from_split), png_pixels(&reference));

    for (file, layout) in [
        (&ckpt, "ComfyUI all-in-one checkpoint"),
        (&t, "transformer (original Alpha-VLLM keys)"),
        (&te, "Gemma-2 text encoder"),
        (&vae, "Flux VAE (Black Forest Labs"),
    ] {
        let r = lumina2(&["inspect", &p(file)]);
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(
            out.contains(&format!("single-file layout: {layout}")),
            "{out}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `lumina2 convert` of ComfyUI's all-in-one checkpoint to a folder writes
/// the whole pipeline folder (detected, and with `--format
/// diffusers-pipeline`; the tiny model's configs given, as its sizes are not
/// Lumina-Image 2.0's), which `generate --model` reads into the folder's
/// image with nothing else given.
#[test]
fn an_all_in_one_checkpoint_converts_to_a_pipeline_folder() {
    let dir = tmp_dir("tofolder");
    let folder = pipeline_dir();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/comfy/lumina_2.safetensors");
    let configs = [
        "--config".to_string(),
        p(&folder.join("transformer/config.json")),
        "--text-encoder-config".into(),
        p(&folder.join("text_encoder")),
        "--vae-config".into(),
        p(&folder.join("vae")),
    ];
    let out = dir.join("pipeline");
    let mut args = vec!["convert", "--from", &p(&ckpt), "--to", &p(&out)]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(configs.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = lumina2(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("whole diffusers pipeline folder"), "{err}");
    assert!(err.contains("shift 6.0"), "{err}");
    assert_eq!(
        files_in(&out),
        [
            "model_index.json",
            "scheduler",
            "text_encoder",
            "tokenizer",
            "transformer",
            "vae"
        ]
    );
    assert_eq!(
        files_in(&out.join("tokenizer")),
        [
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json"
        ]
    );
    let reference = dir.join("folder.png");
    assert!(generate_fixture_case(&reference, &[]).status.success());
    let converted = dir.join("converted.png");
    let r = generate_case(&["--model", &p(&out)], &converted, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(png_pixels(&converted), png_pixels(&reference));

    // The explicit format; a non-empty destination is refused.
    let mut explicit = args.clone();
    explicit.extend(["--format", "diffusers-pipeline"]);
    let r = lumina2(&explicit);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(err.contains("not an empty folder"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
    let r = lumina2(&explicit);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("model_index.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors file written by hand: `tensors` in this order, as
/// (key, dtype name, shape, bytes).
fn write_raw_safetensors(path: &Path, tensors: &[(String, String, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (k, d, s, b) in tensors {
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": d, "shape": s, "data_offsets": [offset, offset + b.len()]}),
        );
        offset += b.len();
    }
    let mut head = serde_json::to_vec(&header).unwrap();
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend(head);
    for (_, _, _, b) in tensors {
        out.extend(b);
    }
    std::fs::write(path, out).unwrap();
}

/// The committed ComfyUI checkpoint's tensors, raw.
fn comfy_checkpoint_tensors() -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/comfy/lumina_2.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let o = &v["data_offsets"];
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let dtype = v["dtype"].as_str().unwrap().to_string();
            (k, dtype, shape, bytes[8 + n + a..8 + n + b].to_vec())
        })
        .collect()
}

/// Hostile ComfyUI checkpoints: a `spiece_model` cut short by a truncated
/// file, and a VAE key under a prefix the layout does not have. Each run
/// fails with the file and the key named, and writes nothing.
#[test]
fn hostile_comfy_checkpoints_are_refused_naming_file_and_key() {
    let dir = tmp_dir("comfy-hostile");
    let folder = pipeline_dir();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let configs = [
        "--transformer-config".to_string(),
        p(&folder.join("transformer")),
        "--text-encoder-config".into(),
        p(&folder.join("text_encoder")),
        "--vae-config".into(),
        p(&folder.join("vae")),
    ];
    let configs: Vec<&str> = configs.iter().map(String::as_str).collect();

    // The tokenizer last in the file, the file cut inside it.
    let mut t = comfy_checkpoint_tensors();
    let i = t
        .iter()
        .position(|x| x.0 == "text_encoders.spiece_model")
        .unwrap();
    let spiece = t.remove(i);
    t.push(spiece);
    let cut = dir.join("cut.safetensors");
    write_raw_safetensors(&cut, &t);
    let len = std::fs::metadata(&cut).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);

    // A VAE key under another prefix.
    let mut t = comfy_checkpoint_tensors();
    let v = t
        .iter_mut()
        .find(|x| x.0 == "vae.decoder.conv_in.weight")
        .unwrap();
    v.0 = "first_stage_model.decoder.conv_in.weight".into();
    let stray = dir.join("stray.safetensors");
    write_raw_safetensors(&stray, &t);

    for (file, key) in [
        (&cut, "text_encoders.spiece_model"),
        (&stray, "first_stage_model.decoder.conv_in.weight"),
    ] {
        let out = dir.join("never.png");
        let r = generate_case(&["--model", &p(file)], &out, &configs);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{err}");
        assert!(
            err.contains(key) && err.contains(&p(file)) && !err.contains("panicked"),
            "{err}"
        );
        assert!(!out.exists());
        let r = lumina2(&["inspect", &p(file)]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(all.contains(key), "{all}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `latent16_preview` fixture: the tiny pipeline with the real model's
/// 16 latent channels, for which the preview's latent-to-RGB matrix is made.
fn latent16_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/pipeline/latent16_preview")
}

/// The RGB pixels of a PNG file.
fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

/// `--preview` end to end: the file is the latent-sized projection of the
/// step's clean-image prediction; after the last step, whose next sigma is 0,
/// that prediction is the final latents themselves, so the last preview is
/// the projection of `--output-latents`. Previews leave the image unchanged,
/// and `--preview-every` skips the steps between.
#[test]
fn previews_project_the_predicted_clean_latents() {
    let model = latent16_dir().join("pipeline");
    let source = ["--model", model.to_str().unwrap()];
    let dir = tmp_dir("preview16");
    let preview = dir.join("preview.png");
    let latents = dir.join("latents.safetensors");
    let r = generate_case(
        &source,
        &dir.join("with.png"),
        &[
            "--preview",
            preview.to_str().unwrap(),
            "--preview-every",
            "1",
            "--output-latents",
            latents.to_str().unwrap(),
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // 48x32 pixels are 6x4 latents: the preview has the latent grid's size.
    let last = rgb(&preview);
    assert_eq!((last.width(), last.height()), (6, 4));
    let final_latents = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu)
        .unwrap()
        .remove("latents")
        .unwrap();
    let projected = lumina2_pipeline::preview::latents_to_rgb(&final_latents)
        .unwrap()
        .remove(0);
    assert_eq!(last.as_raw(), projected.as_raw());

    // The image is the one made without previews, and diffusers' image.
    let r = generate_case(&source, &dir.join("without.png"), &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(rgb(&dir.join("with.png")), rgb(&dir.join("without.png")));
    let expected = candle_core::safetensors::load(
        latent16_dir().join("expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let reference: Vec<f32> = expected["image"].flatten_all().unwrap().to_vec1().unwrap();
    let worst = rgb(&dir.join("without.png"))
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&p, &r)| (i32::from(p) - (r * 255.0).round_ties_even() as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "pixel off by {worst}");

    // Every 3rd of 4 steps: one preview, after step 3, which is not the
    // final latents' projection.
    let every3 = dir.join("every3.png");
    let r = generate_case(
        &source,
        &dir.join("every3-image.png"),
        &[
            "--preview",
            every3.to_str().unwrap(),
            "--preview-every",
            "3",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let step3 = rgb(&every3);
    assert_eq!((step3.width(), step3.height()), (6, 4));
    assert_ne!(step3.as_raw(), projected.as_raw());
    std::fs::remove_dir_all(&dir).ok();
}
