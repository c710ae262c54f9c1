//! Z-Image transformers from single files: the committed PyTorch fixtures
//! (`tests/fixtures/zimage_files`, written by
//! `xtask/parity/gen_zimage_files.py`: a community-layout Q4_0 GGUF, alone
//! and with a kohya and a PEFT LoRA), the same weights as ComfyUI's
//! original-key `.safetensors` (bare and under `model.diffusion_model.`),
//! and hostile variants.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lumina2_loader::{
    detect_zimage_layout, load_zimage_transformer_file, open_transformer_file,
    open_zimage_transformer_file, Error, ZImageLayout,
};
use lumina2_parity::{compare, input, Case};
use lumina2_transformer::zimage::ZImageConfig;
use lumina2_transformer::{Config, WeightSource};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/zimage_files")
        .join(name)
}

fn captions(inputs: &std::collections::BTreeMap<String, Tensor>) -> Vec<Tensor> {
    let caps = input(inputs, "encoder_hidden_states").unwrap();
    let lens = input(inputs, "caption_lens")
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    lens.iter()
        .enumerate()
        .map(|(i, &n)| caps.get(i).unwrap().narrow(0, 0, n as usize).unwrap())
        .collect()
}

/// Runs `case` with the model loaded from `model` (with the case's LoRAs)
/// and the case's config; returns the worst error.
fn run_case(case: &Case, model: &Path, with_config: bool) -> f64 {
    let cfg = with_config.then(|| ZImageConfig::from_file(case.dir.join("config")).unwrap());
    let loras: Vec<(PathBuf, f64)> = case
        .args
        .get("lora")
        .and_then(|l| l.as_array())
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    (
                        case.dir.join(i["path"].as_str().unwrap()),
                        i["scale"].as_f64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let (m, used) =
        load_zimage_transformer_file(model, cfg.as_ref(), &loras, case.dtype, &Device::Cpu)
            .unwrap();
    if let Some(c) = cfg {
        assert_eq!(used, c);
    }
    let inputs = case.inputs().unwrap();
    let out = m
        .forward_with_patch(
            input(&inputs, "hidden_states").unwrap(),
            input(&inputs, "timestep").unwrap(),
            &captions(&inputs),
            (2, 1),
        )
        .unwrap();
    let expected = case.expected().unwrap();
    let r = compare(
        &out,
        input(&expected, "sample").unwrap(),
        case.tolerance.atol,
        case.tolerance.rtol,
    )
    .unwrap();
    assert!(r.passes(), "{}: {r:?}", case.dir.display());
    r.max_abs
}

#[test]
fn community_gguf_matches_pytorch_with_and_without_loras() {
    for name in ["gguf_q4_0_f32", "gguf_q4_0_lora_f32"] {
        let case = Case::load(&fixture(name)).unwrap();
        let model = case.model().unwrap().to_path_buf();
        run_case(&case, &model, true);
        no_config_asks_for_one(&model);
    }
}

/// Without a config.json the released model's RoPE axes are assumed; the
/// tiny model's head width does not fit them, which asks for the config.
fn no_config_asks_for_one(model: &Path) {
    let none: [(PathBuf, f64); 0] = [];
    match load_zimage_transformer_file(model, None, &none, DType::F32, &Device::Cpu) {
        Err(Error::Unsupported { reason, .. }) => {
            assert!(
                reason.contains("head width 16") && reason.contains("config.json"),
                "{reason}"
            )
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn gguf_linear_weights_stay_quantised_the_qkv_parts_too() {
    let path = fixture("gguf_q4_0_f32").join("z_image-q4_0.gguf");
    let cfg = ZImageConfig::from_file(fixture("gguf_q4_0_f32").join("config")).unwrap();
    let src = open_zimage_transformer_file(&path, &cfg).unwrap();
    for key in [
        "layers.0.attention.to_q.weight",
        "layers.0.attention.to_v.weight",
        "noise_refiner.0.attention.to_out.0.weight",
        "t_embedder.mlp.0.weight",
    ] {
        assert!(
            matches!(
                src.linear(key).unwrap(),
                lumina2_transformer::LinearWeight::Quantized(_)
            ),
            "{key}"
        );
    }
}

/// The GGUF fixture's tensors (as gguf-py dequantises them), by file key.
fn dense_original() -> HashMap<String, Tensor> {
    let g =
        lumina2_loader::gguf::GgufFile::open(fixture("gguf_q4_0_f32").join("z_image-q4_0.gguf"))
            .unwrap();
    WeightSource::keys(&g)
        .into_iter()
        .map(|k| {
            let t = WeightSource::tensor(&g, &k).unwrap();
            (k, t)
        })
        .collect()
}

fn write(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

#[test]
fn comfyui_safetensors_bare_and_prefixed_match_the_gguf_case() {
    let dir = tempdir();
    let case = Case::load(&fixture("gguf_q4_0_f32")).unwrap();
    let sd = dense_original();
    let bare = write(&dir, "z_image_turbo.safetensors", &sd);
    let prefixed: HashMap<String, Tensor> = sd
        .iter()
        .map(|(k, v)| (format!("model.diffusion_model.{k}"), v.clone()))
        .collect();
    let comfy = write(&dir, "z_image_checkpoint.safetensors", &prefixed);
    let keys = |m: &HashMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        detect_zimage_layout(keys(&sd).iter().map(String::as_str)),
        Some(ZImageLayout::Original)
    );
    assert_eq!(
        detect_zimage_layout(keys(&prefixed).iter().map(String::as_str)),
        Some(ZImageLayout::ComfyUi)
    );
    // Dense weights equal to the GGUF's dequantised ones: the same output.
    for path in [&bare, &comfy] {
        run_case(&case, path, true);
        no_config_asks_for_one(path);
    }
}

#[test]
fn hostile_files_give_typed_errors_naming_file_and_key() {
    let dir = tempdir();
    let cfg = ZImageConfig::from_file(fixture("gguf_q4_0_f32").join("config")).unwrap();
    let sd = dense_original();

    // A missing fused qkv: its three diffusers weights are missing.
    let mut missing = sd.clone();
    missing.remove("layers.0.attention.qkv.weight");
    let path = write(&dir, "missing.safetensors", &missing);
    match open_zimage_transformer_file(&path, &cfg) {
        Err(Error::KeyMismatch {
            path: p, missing, ..
        }) => {
            assert_eq!(p, path);
            assert!(missing.contains(&"layers.0.attention.to_k.weight".to_string()));
        }
        other => panic!("{:?}", other.err()),
    }

    // An extra tensor is listed as unexpected.
    let mut extra = sd.clone();
    extra.insert(
        "layers.0.attention.bogus.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = write(&dir, "extra.safetensors", &extra);
    match open_zimage_transformer_file(&path, &cfg) {
        Err(Error::KeyMismatch { unexpected, .. }) => {
            assert_eq!(
                unexpected,
                vec!["layers.0.attention.bogus.weight".to_string()]
            )
        }
        other => panic!("{:?}", other.err()),
    }

    // A fused qkv with too few rows: the file's key is named.
    let mut short = sd.clone();
    let qkv = short["layers.0.attention.qkv.weight"]
        .narrow(0, 0, 64)
        .unwrap();
    short.insert("layers.0.attention.qkv.weight".into(), qkv);
    let path = write(&dir, "short.safetensors", &short);
    match open_zimage_transformer_file(&path, &cfg) {
        Err(Error::Shape { key, found, .. }) => {
            assert_eq!(key, "layers.0.attention.qkv.weight");
            assert_eq!(found, vec![64, 32]);
        }
        other => panic!("{:?}", other.err()),
    }

    // A wrong pad token shape.
    let mut pad = sd.clone();
    pad.insert(
        "x_pad_token".into(),
        Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = write(&dir, "pad.safetensors", &pad);
    match open_zimage_transformer_file(&path, &cfg) {
        Err(Error::Shape { key, .. }) => assert_eq!(key, "x_pad_token"),
        other => panic!("{:?}", other.err()),
    }

    // Lumina2's opener names a Z-Image file as such; Z-Image's refuses a file
    // that is no Z-Image transformer.
    let bare = write(&dir, "ok.safetensors", &sd);
    match open_transformer_file(&bare, &Config::default()) {
        Err(Error::Unsupported { reason, .. }) => assert!(reason.contains("Z-Image"), "{reason}"),
        other => panic!("{:?}", other.err()),
    }
    let mut lumina = HashMap::new();
    lumina.insert(
        "cap_embedder.0.weight".to_string(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = write(&dir, "lumina.safetensors", &lumina);
    assert!(matches!(
        open_zimage_transformer_file(&path, &cfg),
        Err(Error::Unsupported { .. })
    ));
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "lumina2-zimage-files-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
