//! `lumina2 generate --model <Z-Image folder>` with the component options
//! (`--transformer` single files and GGUF, `--text-encoder`, `--vae`,
//! `--tokenizer`), `--lora`, `--int8`, `--vae-tiling`, `--preview` and
//! `--from-file`, on the committed tiny Z-Image pipeline
//! (`lumina2-pipeline/tests/fixtures/zimage/tiny_tokenizer_cfg`): each image
//! is the one the library makes from the same files and options (the
//! library's own parity against diffusers is that fixture's test), and bad
//! files or options fail with a message and a non-zero status.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use lumina2_loader::gguf::{write_gguf, GgmlType, MetadataValue, TensorPlan};
use lumina2_pipeline::{
    LoraSpec, Noise, TransformerSource, ZImageOptions, ZImagePipeline, ZImageSources,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/zimage/tiny_tokenizer_cfg/pipeline")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-zcli-{name}-{}", std::process::id()));
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

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

const PROMPT: &str = "a red fox in the snow";
const SEED: u64 = 5;

/// `lumina2 generate` of the fixture's request (24x16, 3 steps, guidance 3
/// with normalization, seed 5, f32) into `out`, with `extra` arguments.
fn generate(model: &Path, out: &Path, extra: &[&str]) -> Output {
    generate_sized(model, out, (24, 16), extra)
}

/// [`generate`] at another size.
fn generate_sized(model: &Path, out: &Path, (w, h): (usize, usize), extra: &[&str]) -> Output {
    let (model, out, w, h) = (s(model), s(out), w.to_string(), h.to_string());
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--prompt",
        PROMPT,
        "--width",
        &w,
        "--height",
        &h,
        "--steps",
        "3",
        "--guidance-scale",
        "3",
        "--cfg-normalization",
        "1",
        "--max-sequence-length",
        "48",
        "--seed",
        "5",
        "--dtype",
        "f32",
        "-q",
        "-o",
        &out,
    ];
    args.extend_from_slice(extra);
    lumina2(&args)
}

fn ok(r: &Output) {
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// The failure of `r`, its message.
fn fails(r: &Output) -> String {
    assert!(!r.status.success(), "succeeded");
    String::from_utf8_lossy(&r.stderr).into_owned()
}

/// The options of [`generate`]'s request in the library.
fn options() -> ZImageOptions {
    let mut o = ZImageOptions::new(PROMPT);
    o.width = Some(24);
    o.height = Some(16);
    o.num_inference_steps = 3;
    o.guidance_scale = 3.0;
    o.cfg_normalization = 1.0;
    o.max_sequence_length = 48;
    o.noise = Noise::Seeds(vec![SEED]);
    o
}

/// The library's image of [`generate`]'s request from `sources`.
fn library_image(sources: ZImageSources, int8: bool, tiling: bool) -> image::RgbImage {
    let mut pipe = ZImagePipeline::builder(sources)
        .int8_transformer(int8)
        .vae_tiling(tiling)
        .build()
        .unwrap();
    let out = pipe
        .generate(&options(), &mut |_| Default::default())
        .unwrap();
    out.rgb_images().unwrap().remove(0)
}

fn folder_sources() -> ZImageSources {
    ZImageSources::from_pipeline_folder(fixture()).unwrap()
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn png_text(path: &Path) -> Vec<(String, String)> {
    let bytes = std::fs::read(path).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().unwrap();
    reader
        .info()
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect()
}

fn text_of<'a>(meta: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    meta.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The fixture transformer's tensors, in diffusers' names.
fn transformer_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture().join("transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// The same weights in the original (Tongyi / ComfyUI) names: one patch
/// size (2-1), fused `qkv`, `out`, `q_norm`/`k_norm`.
fn original_tensors() -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let d = transformer_tensors();
    for (k, v) in &d {
        if k.starts_with("all_x_embedder.1-1.") || k.starts_with("all_final_layer.1-1.") {
            continue;
        }
        if k.ends_with(".attention.to_k.weight") || k.ends_with(".attention.to_v.weight") {
            continue;
        }
        let name = if let Some(base) = k.strip_suffix(".attention.to_q.weight") {
            let part = |p: &str| d[&format!("{base}.attention.{p}.weight")].clone();
            let qkv = Tensor::cat(&[part("to_q"), part("to_k"), part("to_v")], 0).unwrap();
            out.insert(format!("{base}.attention.qkv.weight"), qkv);
            continue;
        } else {
            k.replace("all_x_embedder.2-1.", "x_embedder.")
                .replace("all_final_layer.2-1.", "final_layer.")
                .replace(".attention.to_out.0.", ".attention.out.")
                .replace(".attention.norm_q.", ".attention.q_norm.")
                .replace(".attention.norm_k.", ".attention.k_norm.")
        };
        out.insert(name, v.clone());
    }
    out
}

/// The fixture transformer's config with its one patch size an original
/// file holds (the pipeline uses 2-1 only).
fn one_patch_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixture().join("transformer/config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["all_patch_size"] = serde_json::json!([2]);
    cfg["all_f_patch_size"] = serde_json::json!([1]);
    let path = dir.join("transformer_config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

/// A GGUF file of `tensors`, each stored as F32 (the tiny model's rows are
/// shorter than a quantisation block).
fn write_f32_gguf(
    path: &Path,
    arch: &str,
    meta: Vec<(String, MetadataValue)>,
    tensors: &[(String, Tensor)],
) {
    let mut metadata = vec![(
        "general.architecture".to_string(),
        MetadataValue::String(arch.into()),
    )];
    metadata.extend(meta);
    let plans: Vec<TensorPlan> = tensors
        .iter()
        .map(|(name, t)| TensorPlan {
            name: name.clone(),
            shape: t.dims().to_vec(),
            ggml_type: GgmlType::F32,
        })
        .collect();
    write_gguf(path, &metadata, &plans, |i| {
        let v: Vec<f32> = tensors[i]
            .1
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    })
    .unwrap();
}

fn save(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

#[test]
fn the_folder_gives_the_librarys_image() {
    let dir = tmp_dir("folder");
    let out = dir.join("fox.png");
    ok(&generate(&fixture(), &out, &[]));
    assert_eq!(rgb(&out), library_image(folder_sources(), false, false));
    let meta = png_text(&out);
    assert_eq!(text_of(&meta, "pipeline"), vec!["ZImagePipeline"]);
    assert_eq!(text_of(&meta, "model"), vec![s(&fixture())]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Image-to-image and inpainting runs name diffusers' classes whose
/// semantics they follow, as a text-to-image run names `ZImagePipeline`.
#[test]
fn image_runs_name_diffusers_img2img_and_inpaint_classes() {
    let dir = tmp_dir("classes");
    let cases = fixture().join("../..");
    let image = s(&cases.join("img2img_strength_0_6/image.png"));
    let mask = s(&cases.join("inpaint_soft_mask/mask.png"));
    let runs: [(&[&str], &str); 2] = [
        (&["--image", &image], "ZImageImg2ImgPipeline"),
        (
            &["--image", &image, "--mask-image", &mask],
            "ZImageInpaintPipeline",
        ),
    ];
    for (extra, class) in runs {
        let out = dir.join(format!("{class}.png"));
        ok(&generate(&fixture(), &out, extra));
        let meta = png_text(&out);
        assert_eq!(text_of(&meta, "pipeline"), vec![class], "{extra:?}");
        assert_eq!(text_of(&meta, "source_image"), vec!["image.png"]);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--transformer` in every layout people download gives the folder's
/// image: the weights are the same numbers.
#[test]
fn single_transformer_files_give_the_folders_image() {
    let dir = tmp_dir("transformer");
    let folder_image = library_image(folder_sources(), false, false);
    let config = one_patch_config(&dir);
    let original = original_tensors();
    let bare = dir.join("z_image_turbo_bf16.safetensors");
    save(&bare, &original);
    let comfy = dir.join("z_image_checkpoint.safetensors");
    save(
        &comfy,
        &original
            .iter()
            .map(|(k, v)| (format!("model.diffusion_model.{k}"), v.clone()))
            .collect(),
    );
    let gguf = dir.join("z_image-f32.gguf");
    let mut sorted: Vec<(String, Tensor)> = original.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    write_f32_gguf(&gguf, "lumina2", Vec::new(), &sorted);
    let diffusers = fixture().join("transformer/diffusion_pytorch_model.safetensors");

    for (file, cfg) in [
        // A diffusers-key file takes the folder's config, as for Lumina2.
        (&diffusers, None),
        (&bare, Some(&config)),
        (&comfy, Some(&config)),
        (&gguf, Some(&config)),
    ] {
        let out = dir.join("out.png");
        let mut extra = vec!["--transformer".to_string(), s(file)];
        if let Some(c) = cfg {
            extra.extend(["--transformer-config".to_string(), s(c)]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        ok(&generate(&fixture(), &out, &extra));
        assert_eq!(rgb(&out), folder_image, "{}", file.display());
        // The library from the same file.
        let mut sources = folder_sources();
        sources.transformer = TransformerSource::File {
            path: file.clone(),
            config: Some(
                cfg.cloned()
                    .unwrap_or_else(|| fixture().join("transformer")),
            ),
        };
        assert_eq!(rgb(&out), library_image(sources, false, false));
        // Images record the transformer file as their model, as Lumina2's.
        assert_eq!(text_of(&png_text(&out), "model"), vec![s(file)]);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Deterministic small values (no RNG: the LoRA files are the same each run).
fn values(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.731 + seed).sin() * 0.3)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Three LoRAs on the fixture's transformer, one per naming scheme the
/// loader reads: PEFT (`transformer.`), ComfyUI (`diffusion_model.` and
/// original names, fused `qkv`) and kohya (`lora_unet_`, with `alpha`).
fn write_loras(dir: &Path) -> [PathBuf; 3] {
    let peft = dir.join("peft.safetensors");
    save(
        &peft,
        &HashMap::from([
            (
                "transformer.layers.0.attention.to_q.lora_A.weight".to_string(),
                values(&[2, 16], 0.1),
            ),
            (
                "transformer.layers.0.attention.to_q.lora_B.weight".to_string(),
                values(&[16, 2], 0.2),
            ),
        ]),
    );
    let comfy = dir.join("comfy.safetensors");
    save(
        &comfy,
        &HashMap::from([
            (
                "diffusion_model.noise_refiner.0.attention.qkv.lora_A.weight".to_string(),
                values(&[2, 16], 0.3),
            ),
            (
                "diffusion_model.noise_refiner.0.attention.qkv.lora_B.weight".to_string(),
                values(&[48, 2], 0.4),
            ),
        ]),
    );
    let kohya = dir.join("kohya.safetensors");
    save(
        &kohya,
        &HashMap::from([
            (
                "lora_unet_layers_0_feed_forward_w1.lora_down.weight".to_string(),
                values(&[4, 16], 0.5),
            ),
            (
                "lora_unet_layers_0_feed_forward_w1.lora_up.weight".to_string(),
                values(&[42, 4], 0.6),
            ),
            (
                "lora_unet_layers_0_feed_forward_w1.alpha".to_string(),
                Tensor::new(2f32, &Device::Cpu).unwrap(),
            ),
        ]),
    );
    [peft, comfy, kohya]
}

#[test]
fn loras_change_the_image_as_in_the_library() {
    let dir = tmp_dir("lora");
    let [peft, comfy, kohya] = write_loras(&dir);
    let out = dir.join("out.png");
    let args = [
        format!("{}:0.7", s(&peft)),
        s(&comfy),
        format!("{}:-0.5", s(&kohya)),
    ];
    ok(&generate(
        &fixture(),
        &out,
        &["--lora", &args[0], "--lora", &args[1], "--lora", &args[2]],
    ));
    let mut sources = folder_sources();
    sources.loras = vec![
        LoraSpec {
            path: peft.clone(),
            scale: 0.7,
        },
        LoraSpec {
            path: comfy.clone(),
            scale: 1.0,
        },
        LoraSpec {
            path: kohya.clone(),
            scale: -0.5,
        },
    ];
    assert_eq!(rgb(&out), library_image(sources, false, false));
    assert_ne!(rgb(&out), library_image(folder_sources(), false, false));
    let meta = png_text(&out);
    assert_eq!(
        text_of(&meta, "lora"),
        args.iter().map(String::as_str).collect::<Vec<_>>()
    );

    // On a single file too (kept factored on quantised weights, merged here).
    let config = one_patch_config(&dir);
    let gguf = dir.join("z.gguf");
    let mut sorted: Vec<(String, Tensor)> = original_tensors().into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    write_f32_gguf(&gguf, "lumina2", Vec::new(), &sorted);
    let out2 = dir.join("out2.png");
    ok(&generate(
        &fixture(),
        &out2,
        &[
            "--transformer",
            &s(&gguf),
            "--transformer-config",
            &s(&config),
            "--lora",
            &args[0],
        ],
    ));
    let mut sources = folder_sources();
    sources.transformer = TransformerSource::File {
        path: gguf.clone(),
        config: Some(config.clone()),
    };
    sources.loras = vec![LoraSpec {
        path: peft.clone(),
        scale: 0.7,
    }];
    assert_eq!(rgb(&out2), library_image(sources, false, false));

    // A missing file, a bad scale, a LoRA for another model.
    let e = fails(&generate(
        &fixture(),
        &out,
        &["--lora", "/nonexistent/x.safetensors"],
    ));
    assert!(
        e.contains("--lora /nonexistent/x.safetensors: no such file"),
        "{e}"
    );
    let e = fails(&generate(
        &fixture(),
        &out,
        &["--lora", &format!("{}:500", s(&peft))],
    ));
    assert!(e.contains("the scale is not in"), "{e}");
    let wrong = dir.join("wrong.safetensors");
    save(
        &wrong,
        &HashMap::from([
            (
                "transformer.layers.0.attention.to_q.lora_A.weight".to_string(),
                values(&[2, 32], 0.1),
            ),
            (
                "transformer.layers.0.attention.to_q.lora_B.weight".to_string(),
                values(&[32, 2], 0.2),
            ),
        ]),
    );
    let e = fails(&generate(&fixture(), &out, &["--lora", &s(&wrong)]));
    assert!(e.contains("wrong.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A Qwen3 GGUF in llama.cpp's names of the fixture's text encoder, its
/// config in the `qwen3.*` metadata.
fn write_qwen3_gguf(path: &Path) {
    let te = candle_core::safetensors::load(
        fixture().join("text_encoder/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut tensors: Vec<(String, Tensor)> = te
        .iter()
        .map(|(k, v)| {
            (
                lumina2_loader::qwen3_gguf::llama_cpp_name(k).unwrap(),
                v.clone(),
            )
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let u = |k: &str, v: u32| (format!("qwen3.{k}"), MetadataValue::U32(v));
    let f = |k: &str, v: f32| (format!("qwen3.{k}"), MetadataValue::F32(v));
    write_f32_gguf(
        path,
        "qwen3",
        vec![
            u("embedding_length", 24),
            u("attention.head_count", 2),
            u("attention.head_count_kv", 1),
            u("attention.key_length", 12),
            u("attention.value_length", 12),
            u("block_count", 2),
            u("feed_forward_length", 16),
            u("context_length", 1024),
            f("attention.layer_norm_rms_epsilon", 1e-6),
            f("rope.freq_base", 1e6),
        ],
        &tensors,
    );
}

/// `--text-encoder` as a safetensors file (bare transformers keys, ComfyUI's
/// `qwen_3_4b.safetensors` layout under `model.`, or under a checkpoint's
/// prefix) or a GGUF file, `--vae` and `--tokenizer` as files.
#[test]
fn text_encoder_vae_and_tokenizer_files() {
    let dir = tmp_dir("te");
    let folder_image = library_image(folder_sources(), false, false);
    let te = candle_core::safetensors::load(
        fixture().join("text_encoder/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prefixed = |p: &str| -> HashMap<String, Tensor> {
        te.iter()
            .map(|(k, v)| (format!("{p}{k}"), v.clone()))
            .collect()
    };
    let comfy = dir.join("qwen_3_4b.safetensors");
    save(&comfy, &prefixed("model."));
    let ckpt = dir.join("checkpoint_te.safetensors");
    save(
        &ckpt,
        &prefixed("text_encoders.qwen3_4b.transformer.model."),
    );
    let bare = fixture().join("text_encoder/model.safetensors");
    let out = dir.join("out.png");
    for file in [&bare, &comfy, &ckpt] {
        ok(&generate(&fixture(), &out, &["--text-encoder", &s(file)]));
        assert_eq!(rgb(&out), folder_image, "{}", file.display());
    }

    // GGUF: the config from its metadata, as the library reads it.
    let gguf = dir.join("qwen3-4b-f32.gguf");
    write_qwen3_gguf(&gguf);
    ok(&generate(&fixture(), &out, &["--text-encoder", &s(&gguf)]));
    let mut sources = folder_sources();
    sources.text_encoder = gguf.clone();
    assert_eq!(rgb(&out), library_image(sources, false, false));

    // The VAE file (the folder's config taken, as for Lumina2) and the
    // tokenizer's file (its folder).
    ok(&generate(
        &fixture(),
        &out,
        &[
            "--vae",
            &s(&fixture().join("vae/diffusion_pytorch_model.safetensors")),
            "--tokenizer",
            &s(&fixture().join("tokenizer/tokenizer.json")),
            "--scheduler-config",
            &s(&fixture().join("scheduler/scheduler_config.json")),
        ],
    ));
    assert_eq!(rgb(&out), folder_image);

    // A file that is no Qwen3 encoder, and one that does not exist.
    let e = fails(&generate(
        &fixture(),
        &out,
        &[
            "--text-encoder",
            &s(&fixture().join("vae/diffusion_pytorch_model.safetensors")),
        ],
    ));
    assert!(e.contains("not a Qwen3 text encoder"), "{e}");
    let e = fails(&generate(
        &fixture(),
        &out,
        &["--text-encoder", "/nonexistent/te.gguf"],
    ));
    assert!(e.contains("/nonexistent/te.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn int8_and_tiling_are_the_librarys() {
    let dir = tmp_dir("int8");
    let out = dir.join("out.png");
    let (int8, f32) = (dir.join("int8.safetensors"), dir.join("f32.safetensors"));
    ok(&generate(
        &fixture(),
        &out,
        &["--int8", "--output-latents", &s(&int8)],
    ));
    assert_eq!(rgb(&out), library_image(folder_sources(), true, false));
    // int8 ran: the latents are not the f32 run's.
    ok(&generate(
        &fixture(),
        &dir.join("f.png"),
        &["--output-latents", &s(&f32)],
    ));
    let latents = |p: &Path| {
        candle_core::safetensors::load(p, &Device::Cpu).unwrap()["latents"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_ne!(latents(&int8), latents(&f32));
    ok(&generate(&fixture(), &out, &["--vae-tiling"]));
    assert_eq!(rgb(&out), library_image(folder_sources(), false, true));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_component_files_fail_naming_them() {
    let dir = tmp_dir("bad");
    let out = dir.join("out.png");
    // A Z-Image GGUF of another size: its config says cap_feat_dim 32, the
    // folder's text encoder gives 24.
    let other = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-loader/tests/fixtures/zimage_files/gguf_q4_0_f32");
    let e = fails(&generate(
        &fixture(),
        &out,
        &[
            "--transformer",
            &s(&other.join("z_image-q4_0.gguf")),
            "--transformer-config",
            &s(&other.join("config")),
        ],
    ));
    assert!(e.contains("cap_feat_dim 32"), "{e}");
    // The folder's config for it: the tensors' shapes do not fit.
    let e = fails(&generate(
        &fixture(),
        &out,
        &["--transformer", &s(&other.join("z_image-q4_0.gguf"))],
    ));
    assert!(e.contains("z_image-q4_0.gguf"), "{e}");
    // Not a Z-Image transformer.
    let e = fails(&generate(
        &fixture(),
        &out,
        &[
            "--transformer",
            &s(&fixture().join("vae/diffusion_pytorch_model.safetensors")),
        ],
    ));
    assert!(e.contains("not a Z-Image transformer"), "{e}");
    // --preview-every 0.
    let e = fails(&generate(
        &fixture(),
        &out,
        &["--preview", &s(&dir.join("p.png")), "--preview-every", "0"],
    ));
    assert!(e.contains("--preview-every"), "{e}");
    assert!(!out.exists());
    // `serve` does not serve Z-Image.
    let e = fails(&lumina2(&["serve", "--model", &s(&fixture())]));
    assert!(e.contains("serves Lumina2 models only"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The fixture pipeline with 16 latent channels, the real model's (the
/// preview's latent-to-RGB matrix is made for them): the transformer's
/// patch embedder and final layer resized (deterministic values), the
/// 16-channel VAE of the Lumina2 `latent16_preview` fixture.
fn latent16_pipeline(dir: &Path) -> PathBuf {
    let root = dir.join("zimage16");
    for part in [
        "text_encoder",
        "tokenizer",
        "scheduler",
        "transformer",
        "vae",
    ] {
        std::fs::create_dir_all(root.join(part)).unwrap();
    }
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).unwrap();
    };
    copy(
        &fixture().join("model_index.json"),
        &root.join("model_index.json"),
    );
    for part in ["text_encoder", "tokenizer", "scheduler"] {
        for e in std::fs::read_dir(fixture().join(part)).unwrap() {
            let e = e.unwrap();
            copy(&e.path(), &root.join(part).join(e.file_name()));
        }
    }
    let vae16 = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/pipeline/latent16_preview/pipeline/vae");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        copy(&vae16.join(f), &root.join("vae").join(f));
    }
    let text = std::fs::read_to_string(fixture().join("transformer/config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["in_channels"] = serde_json::json!(16);
    cfg["all_patch_size"] = serde_json::json!([2]);
    cfg["all_f_patch_size"] = serde_json::json!([1]);
    std::fs::write(root.join("transformer/config.json"), cfg.to_string()).unwrap();
    let mut t: HashMap<String, Tensor> = transformer_tensors()
        .into_iter()
        .filter(|(k, _)| !k.contains(".1-1."))
        .collect();
    t.insert("all_x_embedder.2-1.weight".into(), values(&[16, 64], 0.7));
    t.insert(
        "all_final_layer.2-1.linear.weight".into(),
        values(&[64, 16], 0.8),
    );
    t.insert("all_final_layer.2-1.linear.bias".into(), values(&[64], 0.9));
    save(
        &root.join("transformer/diffusion_pytorch_model.safetensors"),
        &t,
    );
    root
}

/// `--preview`: the last preview is the projection of the final latents
/// (the last step's clean prediction, its next sigma being 0); previews
/// leave the image unchanged.
#[test]
fn previews_project_the_predicted_clean_latents() {
    let dir = tmp_dir("preview");
    let model = latent16_pipeline(&dir);
    let preview = dir.join("preview.png");
    let latents = dir.join("latents.safetensors");
    let with = dir.join("with.png");
    let size = (48, 32);
    ok(&generate_sized(
        &model,
        &with,
        size,
        &["--preview", &s(&preview), "--output-latents", &s(&latents)],
    ));
    let last = rgb(&preview);
    let final_latents = candle_core::safetensors::load(&latents, &Device::Cpu)
        .unwrap()
        .remove("latents")
        .unwrap();
    assert_eq!(final_latents.dim(1).unwrap(), 16);
    let projected = lumina2_pipeline::preview::latents_to_rgb(&final_latents)
        .unwrap()
        .remove(0);
    assert_eq!((last.width(), last.height()), (6, 4));
    assert_eq!(last.as_raw(), projected.as_raw());
    let without = dir.join("without.png");
    ok(&generate_sized(&model, &without, size, &[]));
    assert_eq!(rgb(&with), rgb(&without));
    // Every 2nd of 3 steps: one preview, after step 2, not the final one.
    let every2 = dir.join("every2.png");
    ok(&generate_sized(
        &model,
        &dir.join("x.png"),
        size,
        &["--preview", &s(&every2), "--preview-every", "2"],
    ));
    assert_ne!(rgb(&every2).as_raw(), projected.as_raw());
    std::fs::remove_dir_all(&dir).ok();
}

/// `--from-file` on a Z-Image folder: each line's image is `generate`'s,
/// shards split the lines, the manifest records them, `--skip-existing`
/// resumes, a bad line is reported and the others go on.
#[test]
fn batches_shard_and_resume_on_a_zimage_folder() {
    let dir = tmp_dir("batch");
    let jsonl = dir.join("prompts.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{{\"prompt\": \"{PROMPT}\", \"seed\": 5}}\n\
             {{\"prompt\": \"two cats asleep\", \"seed\": 6, \"cfg_normalization\": false, \"cfg_truncation\": 0.1}}\n\
             {{\"prompt\": \"a lighthouse\", \"seed\": 7, \"sampler\": \"midpoint\"}}\n"
        ),
    )
    .unwrap();
    let manifest = dir.join("manifest.jsonl");
    let pattern = dir.join("img_{line}.png");
    let run = |shard: &str, extra: &[&str]| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            s(&fixture()),
            "--from-file".into(),
            s(&jsonl),
            "--shard".into(),
            shard.into(),
            "--manifest".into(),
            s(&manifest),
            "--width".into(),
            "24".into(),
            "--height".into(),
            "16".into(),
            "--steps".into(),
            "3".into(),
            "--guidance-scale".into(),
            "3".into(),
            "--cfg-normalization".into(),
            "1".into(),
            "--max-sequence-length".into(),
            "48".into(),
            "--dtype".into(),
            "f32".into(),
            "-q".into(),
            "-o".into(),
            s(&pattern),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lumina2(&args)
    };
    // Shard 0/2: lines 0 and 2; line 2 asks for a Lumina2 sampler.
    let e = fails(&run("0/2", &[]));
    assert!(e.contains("line 2") && e.contains("--sampler"), "{e}");
    ok(&run("1/2", &[]));
    // Line 0 is the image `generate` writes for the same request.
    assert_eq!(
        rgb(&dir.join("img_0.png")),
        library_image(folder_sources(), false, false)
    );
    let one = dir.join("one.png");
    ok(&lumina2(&[
        "generate",
        "--model",
        &s(&fixture()),
        "--prompt",
        "two cats asleep",
        "--seed",
        "6",
        "--guidance-scale",
        "3",
        "--cfg-normalization",
        "0",
        "--cfg-truncation",
        "0.1",
        "--width",
        "24",
        "--height",
        "16",
        "--steps",
        "3",
        "--max-sequence-length",
        "48",
        "--dtype",
        "f32",
        "-q",
        "-o",
        &s(&one),
    ]));
    assert_eq!(rgb(&dir.join("img_1.png")), rgb(&one));
    // The line's Z-Image fields took effect: not the command line's request.
    let mut o = options();
    o.prompts = vec!["two cats asleep".into()];
    o.noise = Noise::Seeds(vec![6]);
    let mut pipe = ZImagePipeline::builder(folder_sources()).build().unwrap();
    let defaults = pipe.generate(&o, &mut |_| Default::default()).unwrap();
    assert_ne!(rgb(&one), defaults.rgb_images().unwrap().remove(0));
    assert!(!dir.join("img_2.png").exists());
    // Resuming skips what exists.
    ok(&run("1/2", &["--skip-existing"]));
    let entries: Vec<serde_json::Value> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let statuses: Vec<(u64, &str)> = entries
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        vec![(0, "ok"), (2, "error"), (1, "ok"), (1, "skipped")]
    );
    assert_eq!(entries[0]["seed"], 5);
    assert_eq!(
        entries[0]["output"].as_str().unwrap(),
        s(&dir.join("img_0.png"))
    );
    std::fs::remove_dir_all(&dir).ok();
}
