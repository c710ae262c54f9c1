//! LoRA: the committed PyTorch fixtures through the public API, and the errors
//! for LoRAs that do not fit the model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lumina2_loader::lora::{LoraFile, LoraSource};
use lumina2_loader::{open_transformer_file, ComponentFolder, Error};
use lumina2_parity::{compare, Case, Comparison};
use lumina2_transformer::{Config, LinearWeight, Lumina2Transformer, WeightSource, Weights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lora")
        .join(name)
}

/// The case's model, as a source, and its config.
fn base(case: &Path) -> (Config, Arc<dyn WeightSource>) {
    if case.join("model").is_dir() {
        let folder = ComponentFolder::open(case.join("model")).unwrap();
        let cfg = Config::from_file(case.join("model")).unwrap();
        let src = lumina2_transformer::weights::SafetensorsSource::open(folder.safetensors_files())
            .unwrap();
        (cfg, Arc::new(src))
    } else {
        let cfg = Config::from_file(case.join("config")).unwrap();
        let src = open_transformer_file(&case.join("lumina2-q4_0.gguf"), &cfg).unwrap();
        (cfg, src)
    }
}

/// The `args.lora` list of a case, each path resolved inside the case.
fn loras(dir: &Path) -> Vec<(PathBuf, f64)> {
    let case = Case::load(dir).unwrap();
    case.args["lora"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                case.path("args.lora.path", l["path"].as_str().unwrap())
                    .unwrap(),
                l["scale"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A case's output against PyTorch's, with the case's tolerance.
fn run(dir: &Path) -> Comparison {
    let case = Case::load(dir).unwrap();
    let (cfg, src) = base(dir);
    let src = LoraSource::open(src, &cfg, &loras(dir)).unwrap();
    let model =
        Lumina2Transformer::new(&cfg, &Weights::new(Arc::new(src), DType::F32, &Device::Cpu))
            .unwrap();
    let i = case.inputs().unwrap();
    let out = model
        .forward(
            &i["hidden_states"],
            &i["timestep"],
            &i["encoder_hidden_states"],
            &i["encoder_attention_mask"],
        )
        .unwrap();
    let e = case.expected().unwrap();
    compare(&out, &e["sample"], case.tolerance.atol, case.tolerance.rtol).unwrap()
}

#[test]
fn every_format_matches_pytorch() {
    // The cases' f32 tolerance is atol 1e-5 on outputs of order 1; each
    // LoRA moves the output by 1.7 to 4.3 (provenance.json), so a LoRA
    // dropped or misapplied anywhere fails by far.
    for case in [
        "peft_alpha_f32",
        "two_loras_f32",
        "comfyui_qkv_f32",
        "kohya_f32",
        "gguf_q4_0_f32",
    ] {
        let c = run(&fixture(case));
        assert!(c.passes(), "{case}: {c:?}");
    }
}

#[test]
fn quantised_weights_stay_quantised_and_carry_the_adapters() {
    let case = fixture("gguf_q4_0_f32");
    let (cfg, src) = base(&case);
    let src: Arc<dyn WeightSource> = Arc::new(LoraSource::open(src, &cfg, &loras(&case)).unwrap());
    let w = Weights::new(src.clone(), DType::F32, &Device::Cpu);
    // to_q: a PEFT adapter and the q rows of the ComfyUI qkv adapter.
    let h = cfg.hidden_size;
    let q = w.pp("layers.0.attn").linear("to_q", h, h, false).unwrap();
    assert!(matches!(q.weight(), LinearWeight::Quantized(_)));
    assert_eq!(q.adapters().len(), 2);
    let kv = cfg.num_kv_heads * cfg.head_dim();
    let k = w.pp("layers.0.attn").linear("to_k", h, kv, false).unwrap();
    assert!(matches!(k.weight(), LinearWeight::Quantized(_)));
    assert_eq!(k.adapters().len(), 2);
    // The caption embedder's input width (24) is no whole number of Q4_0
    // blocks: the file keeps it F32, and its update is merged.
    let ce = w
        .pp("time_caption_embed.caption_embedder")
        .linear("1", cfg.cap_feat_dim, h, true)
        .unwrap();
    assert!(matches!(ce.weight(), LinearWeight::Dense(_)));
    assert!(ce.adapters().is_empty());
    assert!(src
        .linear("time_caption_embed.caption_embedder.1.weight")
        .is_ok());
}

#[test]
fn merged_and_run_time_updates_agree() {
    // The same LoRA merged into a dense base and kept factored on top of it.
    let case = fixture("peft_alpha_f32");
    let (cfg, src) = base(&case);
    let lora = LoraSource::open(src.clone(), &cfg, &loras(&case)).unwrap();
    let key = "layers.1.feed_forward.linear_2.weight";
    let merged = match lora.linear(key).unwrap() {
        LinearWeight::Dense(t) => t,
        other => panic!("dense base came back as {other:?}"),
    };
    let base = src.tensor(key).unwrap().to_dtype(DType::F32).unwrap();
    let adapters = lora.lora_adapters(key).unwrap();
    assert_eq!(adapters.len(), 1);
    let x = Tensor::randn(0f32, 1., (3, 5, merged.dim(1).unwrap()), &Device::Cpu).unwrap();
    let dense = lumina2_weights::Linear::new(LinearWeight::Dense(merged), None).unwrap();
    let factored = lumina2_weights::Linear::new(LinearWeight::Dense(base), None)
        .unwrap()
        .with_adapters(
            adapters
                .into_iter()
                .map(|a| a.to(DType::F32, &Device::Cpu).unwrap()),
        );
    let d = (dense.forward(&x).unwrap() - factored.forward(&x).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "{d}");
}

/// A tiny config for the error tests (the fixtures' model).
fn tiny_config() -> Config {
    Config::from_file(fixture("gguf_q4_0_f32").join("config")).unwrap()
}

fn lora_from(tensors: Vec<(&str, Tensor)>, meta: Option<&str>) -> Result<LoraFile, Error> {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    LoraFile::from_tensors(map, meta, Path::new("test-lora.safetensors"))
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

fn apply(lora: LoraFile) -> Result<LoraSource, Error> {
    let cfg = tiny_config();
    let empty: HashMap<String, Tensor> = HashMap::new();
    LoraSource::new(Arc::new(empty), &cfg, &[(lora, 1.0)])
}

#[test]
fn keys_that_name_no_weight_are_an_error_listing_them_all() {
    let lora = lora_from(
        vec![
            (
                "transformer.layers.0.attn.to_q.lora_A.weight",
                zeros(&[2, 32]),
            ),
            (
                "transformer.layers.0.attn.to_q.lora_B.weight",
                zeros(&[32, 2]),
            ),
            (
                "transformer.layers.7.attn.to_q.lora_A.weight",
                zeros(&[2, 32]),
            ),
            (
                "transformer.layers.7.attn.to_q.lora_B.weight",
                zeros(&[32, 2]),
            ),
            ("transformer.layers.0.attn.to_q.lora_B.bias", zeros(&[32])),
            (
                "transformer.layers.0.attn.norm_q.lora_A.weight",
                zeros(&[2, 8]),
            ),
            (
                "transformer.layers.0.attn.norm_q.lora_B.weight",
                zeros(&[8, 2]),
            ),
        ],
        None,
    )
    .unwrap();
    let Err(Error::KeyMismatch { unexpected, .. }) = apply(lora) else {
        panic!("unknown keys were accepted")
    };
    assert_eq!(
        unexpected,
        [
            "transformer.layers.0.attn.norm_q.lora_A.weight",
            "transformer.layers.0.attn.norm_q.lora_B.weight",
            "transformer.layers.0.attn.to_q.lora_B.bias",
            "transformer.layers.7.attn.to_q.lora_A.weight",
            "transformer.layers.7.attn.to_q.lora_B.weight",
        ]
    );
}

#[test]
fn a_shape_that_does_not_fit_is_an_error_naming_key_and_shapes() {
    // to_k is [16, 32]: B must have 16 rows.
    let lora = lora_from(
        vec![
            (
                "transformer.layers.0.attn.to_k.lora_A.weight",
                zeros(&[2, 32]),
            ),
            (
                "transformer.layers.0.attn.to_k.lora_B.weight",
                zeros(&[32, 2]),
            ),
        ],
        None,
    )
    .unwrap();
    let Err(Error::Shape {
        key,
        expected,
        found,
        ..
    }) = apply(lora)
    else {
        panic!("a misfit LoRA was accepted")
    };
    assert_eq!(key, "transformer.layers.0.attn.to_k.lora_B.weight");
    assert_eq!((expected, found), (vec![16, 2], vec![32, 2]));

    // A fused qkv B must have q + 2 kv = 64 rows.
    let lora = lora_from(
        vec![
            (
                "diffusion_model.layers.1.attention.qkv.lora_A.weight",
                zeros(&[2, 32]),
            ),
            (
                "diffusion_model.layers.1.attention.qkv.lora_B.weight",
                zeros(&[96, 2]),
            ),
        ],
        None,
    )
    .unwrap();
    let Err(Error::Shape {
        key,
        expected,
        found,
        ..
    }) = apply(lora)
    else {
        panic!("a misfit qkv LoRA was accepted")
    };
    assert_eq!(key, "diffusion_model.layers.1.attention.qkv.lora_B.weight");
    assert_eq!((expected, found), (vec![64, 2], vec![96, 2]));

    // A and B of different ranks.
    let r = lora_from(
        vec![
            ("transformer.x_embedder.lora_A.weight", zeros(&[2, 16])),
            ("transformer.x_embedder.lora_B.weight", zeros(&[32, 3])),
        ],
        None,
    );
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
}

#[test]
fn a_factor_without_its_partner_is_an_error() {
    let r = lora_from(
        vec![("transformer.x_embedder.lora_A.weight", zeros(&[2, 16]))],
        None,
    );
    let Err(Error::Unsupported { reason, .. }) = r else {
        panic!("{r:?}")
    };
    assert!(
        reason.contains("transformer.x_embedder.lora_A.weight"),
        "{reason}"
    );
}

#[test]
fn alpha_comes_from_the_key_the_adapter_config_or_the_rank() {
    let pair = |prefix: &str| {
        vec![
            (
                format!("{prefix}layers.0.attn.to_q.lora_A.weight"),
                zeros(&[4, 32]),
            ),
            (
                format!("{prefix}layers.0.attn.to_q.lora_B.weight"),
                zeros(&[32, 4]),
            ),
            (
                format!("{prefix}layers.1.attn.to_q.lora_A.weight"),
                zeros(&[4, 32]),
            ),
            (
                format!("{prefix}layers.1.attn.to_q.lora_B.weight"),
                zeros(&[32, 4]),
            ),
        ]
    };
    let factors = |tensors: Vec<(String, Tensor)>, meta: Option<&str>| -> Vec<f64> {
        let t = tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let lora = lora_from(t, meta).unwrap();
        lora.modules()
            .iter()
            .map(|m| lora.factor(m).unwrap())
            .collect()
    };
    // No alpha anywhere: alpha = r.
    assert_eq!(factors(pair("transformer."), None), [1.0, 1.0]);
    // An `.alpha` key (kohya / ComfyUI).
    let mut t = pair("transformer.");
    t.push((
        "transformer.layers.1.attn.to_q.alpha".into(),
        Tensor::new(2f32, &Device::Cpu).unwrap(),
    ));
    assert_eq!(factors(t, None), [1.0, 0.5]);
    // PEFT's config as `save_lora_adapter` writes it (no prefix), with a pattern.
    let meta = r#"{"r": 4, "lora_alpha": 8, "alpha_pattern": {"layers.1.attn.to_q": 2}}"#;
    assert_eq!(factors(pair("transformer."), Some(meta)), [2.0, 0.5]);
    // As `Lumina2Pipeline.save_lora_weights` writes it (under `transformer.`).
    let meta =
        r#"{"transformer.r": 4, "transformer.lora_alpha": 12, "transformer.use_rslora": true}"#;
    assert_eq!(factors(pair("transformer."), Some(meta)), [6.0, 6.0]);
    // DoRA is refused, not silently applied as a plain LoRA.
    let meta = r#"{"r": 4, "lora_alpha": 8, "use_dora": true}"#;
    let t = pair("transformer.");
    let t = t.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    assert!(matches!(
        lora_from(t, Some(meta)),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn kohya_and_original_names_reach_the_same_weights() {
    let cfg = tiny_config();
    let empty: Arc<dyn WeightSource> = Arc::new(HashMap::<String, Tensor>::new());
    let names = [
        ("lora_unet_layers_0_attention_qkv", [64, 32]),
        ("lora_unet_noise_refiner_0_adaLN_modulation_1", [128, 32]),
        ("lora_unet_final_layer_adaLN_modulation_1", [32, 32]),
        ("lora_unet_t_embedder_mlp_0", [32, 256]),
        ("lora_unet_context_refiner_0_feed_forward_w2", [32, 128]),
        ("lora_unet_layers_1_attn_to_out_0", [32, 32]),
        ("diffusion_model.cap_embedder.1", [32, 24]),
        ("base_model.model.norm_out.linear_2", [16, 32]),
    ];
    let mut t = Vec::new();
    for (n, [o, i]) in names {
        t.push((format!("{n}.lora_down.weight"), zeros(&[1, i])));
        t.push((format!("{n}.lora_up.weight"), zeros(&[o, 1])));
    }
    let t = t.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let src = LoraSource::new(empty, &cfg, &[(lora_from(t, None).unwrap(), 1.0)]).unwrap();
    assert_eq!(
        src.adapted_keys(),
        [
            "context_refiner.0.feed_forward.linear_2.weight",
            "layers.0.attn.to_k.weight",
            "layers.0.attn.to_q.weight",
            "layers.0.attn.to_v.weight",
            "layers.1.attn.to_out.0.weight",
            "noise_refiner.0.norm1.linear.weight",
            "norm_out.linear_1.weight",
            "norm_out.linear_2.weight",
            "time_caption_embed.caption_embedder.1.weight",
            "time_caption_embed.timestep_embedder.linear_1.weight",
        ]
    );
}

#[test]
fn loras_stack_on_a_lora_source() {
    // A LoRA source over another one: the quantised weights carry both.
    let case = fixture("gguf_q4_0_f32");
    let (cfg, src) = base(&case);
    let l = loras(&case);
    let one: Arc<dyn WeightSource> = Arc::new(LoraSource::open(src, &cfg, &l[..1]).unwrap());
    let two = LoraSource::open(one, &cfg, &l[1..]).unwrap();
    assert_eq!(
        two.lora_adapters("layers.0.attn.to_v.weight")
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn kohya_names_with_many_underscores_resolve_in_one_lookup() {
    // The issue's case: 1000 modules of 14 underscores, each read 2^14 ways
    // with `_` or `.` at each underscore by a search over the readings (14 s
    // in all), and 10 of 40 (2^40 readings: a search would never end). A
    // lookup of the spelling is immediate.
    let names: Vec<String> = (0..1000)
        .map(|i| format!("lora_unet_{i}{}", "_layers_0".repeat(7)))
        .chain((0..10).map(|i| format!("lora_unet_{i}{}", "_layers_0".repeat(20))))
        .collect();
    assert_eq!(names[0].matches('_').count() - 2, 14);
    assert_eq!(names[1000].matches('_').count() - 2, 40);
    let mut t = Vec::new();
    for n in &names {
        t.push((format!("{n}.lora_down.weight"), zeros(&[1, 1])));
        t.push((format!("{n}.lora_up.weight"), zeros(&[1, 1])));
    }
    // And one real module, spelt with its underscores.
    t.push((
        "lora_unet_layers_1_feed_forward_w3.lora_down.weight".into(),
        zeros(&[1, 32]),
    ));
    t.push((
        "lora_unet_layers_1_feed_forward_w3.lora_up.weight".into(),
        zeros(&[128, 1]),
    ));
    let t = t.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let Err(Error::KeyMismatch { unexpected, .. }) = apply(lora_from(t, None).unwrap()) else {
        panic!("unknown kohya modules were accepted")
    };
    assert_eq!(unexpected.len(), 2 * names.len());
    assert!(unexpected.iter().all(|k| !k.contains("feed_forward")));
}

/// A safetensors file of F32 tensors; those given no data are left as a hole
/// at the end of the file (sparse: they cost no disk). Returns the file and
/// the length it has without the holes.
fn sparse_safetensors(name: &str, tensors: &[(&str, &[usize], bool)]) -> (PathBuf, u64) {
    let path = std::env::temp_dir().join(format!("lumina2-lora-{}-{name}", std::process::id()));
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    let mut ordered: Vec<_> = tensors.iter().filter(|t| t.2).collect();
    ordered.extend(tensors.iter().filter(|t| !t.2));
    for (key, shape, _) in &ordered {
        let len = 4 * shape.iter().product::<usize>() as u64;
        header.insert(
            key.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    for (_, shape, data) in &ordered {
        if *data {
            let n = shape.iter().product::<usize>();
            bytes.extend((0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()));
        }
    }
    std::fs::write(&path, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(8 + header.len() as u64 + offset).unwrap();
    (path, bytes.len() as u64)
}

/// Cuts the holes off `path`: any read of a tensor in them now fails.
fn cut_holes(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len).unwrap();
}

const GIB_OF_F32: usize = 1 << 28;

#[test]
fn tensors_the_model_does_not_use_are_never_read() {
    let to_q = "transformer.layers.0.attn.to_q";
    let (a, b) = (
        format!("{to_q}.lora_A.weight"),
        format!("{to_q}.lora_B.weight"),
    );
    let huge: &[usize] = &[4 * GIB_OF_F32];
    let unknown_a = "transformer.layers.9.attn.to_q.lora_A.weight";
    let unknown_b = "transformer.layers.9.attn.to_q.lora_B.weight";
    let (path, len) = sparse_safetensors(
        "unused.safetensors",
        &[
            (&a, &[2, 32], true),
            (&b, &[32, 2], true),
            // 4 GiB each, declared but never written (a sparse file).
            (
                "transformer.layers.0.attn.to_q.lora_magnitude_vector",
                huge,
                false,
            ),
            (unknown_a, &[2, 2 * GIB_OF_F32], false),
            (unknown_b, &[32, 2], true),
        ],
    );
    let lora = LoraFile::open(&path).unwrap();
    assert_eq!(lora.modules().len(), 2);
    // Reading them would fail now: what follows comes from the header alone.
    cut_holes(&path, len);
    let _ = std::fs::remove_file(&path);
    let Err(Error::KeyMismatch { unexpected, .. }) = apply(lora) else {
        panic!("unknown tensors were accepted")
    };
    assert_eq!(
        unexpected,
        [
            "transformer.layers.0.attn.to_q.lora_magnitude_vector",
            unknown_a,
            unknown_b
        ]
    );

    // The used module alone loads, the rest of the file untouched.
    let (path, len) = sparse_safetensors(
        "used.safetensors",
        &[(&a, &[2, 32], true), (&b, &[32, 2], true)],
    );
    let lora = LoraFile::open(&path).unwrap();
    cut_holes(&path, len);
    let _ = std::fs::remove_file(&path);
    let src = apply(lora).unwrap();
    assert_eq!(src.adapted_keys(), ["layers.0.attn.to_q.weight"]);
}

#[test]
fn a_used_factor_of_the_wrong_shape_is_refused_before_it_is_read() {
    let to_q = "transformer.layers.0.attn.to_q";
    let (a, b) = (
        format!("{to_q}.lora_A.weight"),
        format!("{to_q}.lora_B.weight"),
    );
    // A 4 GiB `A` for a [32, 32] weight.
    let (path, len) = sparse_safetensors(
        "wide.safetensors",
        &[(&a, &[2, 2 * GIB_OF_F32], false), (&b, &[32, 2], true)],
    );
    let lora = LoraFile::open(&path).unwrap();
    cut_holes(&path, len);
    let _ = std::fs::remove_file(&path);
    let Err(Error::Shape {
        key,
        expected,
        found,
        ..
    }) = apply(lora)
    else {
        panic!("a misfit factor was accepted")
    };
    assert_eq!(key, a);
    assert_eq!((expected, found), (vec![2, 32], vec![2, 2 * GIB_OF_F32]));

    // A rank beyond the weight's smaller side (32): 2 GiB per factor.
    let r = GIB_OF_F32 / 64;
    let (path, len) = sparse_safetensors(
        "rank.safetensors",
        &[(&a, &[r, 32], false), (&b, &[32, r], false)],
    );
    let lora = LoraFile::open(&path).unwrap();
    cut_holes(&path, len);
    let _ = std::fs::remove_file(&path);
    let Err(Error::Unsupported { reason, .. }) = apply(lora) else {
        panic!("an absurd rank was accepted")
    };
    assert!(reason.contains(&format!("rank {r}")), "{reason}");
    assert!(reason.contains("at most 32"), "{reason}");

    // An alpha must be one number, checked before it is read.
    let (path, _) = sparse_safetensors(
        "alpha.safetensors",
        &[
            (&a, &[2, 32], true),
            (&b, &[32, 2], true),
            ("transformer.layers.0.attn.to_q.alpha", &[GIB_OF_F32], false),
        ],
    );
    let r = LoraFile::open(&path);
    assert!(
        matches!(&r, Err(Error::Shape { key, .. }) if key == "transformer.layers.0.attn.to_q.alpha"),
        "{r:?}"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn two_modules_of_one_lora_on_one_weight_are_an_error() {
    // The diffusers and the kohya name of `to_k`, or a fused qkv and `to_k`:
    // a file could list a module under any number of spellings, each read.
    for (other, rows) in [
        ("lora_unet_layers_0_attn_to_k", 16),
        ("diffusion_model.layers.0.attention.qkv", 64),
    ] {
        let factors = [
            (
                "transformer.layers.0.attn.to_k.lora_A.weight".to_string(),
                zeros(&[2, 32]),
            ),
            (
                "transformer.layers.0.attn.to_k.lora_B.weight".to_string(),
                zeros(&[16, 2]),
            ),
            (format!("{other}.lora_down.weight"), zeros(&[2, 32])),
            (format!("{other}.lora_up.weight"), zeros(&[rows, 2])),
        ];
        let t = factors
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let Err(Error::Unsupported { reason, .. }) = apply(lora_from(t, None).unwrap()) else {
            panic!("two modules on one weight were accepted")
        };
        assert!(reason.contains("layers.0.attn.to_k.weight"), "{reason}");
        assert!(reason.contains(other), "{reason}");
    }
}
