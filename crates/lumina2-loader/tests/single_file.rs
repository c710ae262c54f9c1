//! Single-file transformer checkpoints against the committed PyTorch fixtures.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use lumina2_loader::{detect_layout, open_transformer_file, Error, PthFile, TransformerLayout};
use lumina2_parity::{compare, Case, Comparison};
use lumina2_transformer::{Config, Lumina2Transformer, WeightSource, Weights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformer")
        .join(name)
}

/// A case through the loader: the model file and config the case names,
/// compared with the case's tolerance.
fn run(dir: &Path) -> Comparison {
    let case = Case::load(dir).unwrap();
    let cfg = Config::from_file(case.model_config.as_ref().unwrap()).unwrap();
    let src = open_transformer_file(case.model().unwrap(), &cfg).unwrap();
    let model =
        Lumina2Transformer::new(&cfg, &Weights::new(src, DType::F32, &Device::Cpu)).unwrap();
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
fn original_pth_and_comfyui_files_match_pytorch() {
    for name in ["tiny_pth_f32", "tiny_comfyui_f32", "tiny_gguf_q4_0_f32"] {
        let c = run(&fixture(name));
        assert!(c.passes(), "{name}: {c:?}");
    }
}

#[test]
fn gguf_linear_weights_stay_quantised_qkv_parts_too() {
    use lumina2_transformer::LinearWeight;
    let case = fixture("tiny_gguf_q4_0_f32");
    let cfg = Config::from_file(case.join("config")).unwrap();
    let src = open_transformer_file(&case.join("lumina2-q4_0.gguf"), &cfg).unwrap();
    for key in [
        "layers.0.attn.to_q.weight",
        "layers.0.attn.to_k.weight",
        "layers.0.attn.to_v.weight",
        "layers.0.feed_forward.linear_1.weight",
    ] {
        match src.linear(key).unwrap() {
            LinearWeight::Quantized(q) => {
                let want = src.tensor(key).unwrap();
                assert_eq!(q.shape().dims(), want.dims(), "{key}");
                let got = q.dequantize(&Device::Cpu).unwrap();
                let diff: f32 = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert_eq!(
                    diff, 0.0,
                    "{key}: quantised rows differ from the dequantised ones"
                );
            }
            other => panic!("{key} was dequantised: {other:?}"),
        }
    }
}

#[test]
fn layouts_are_detected_from_keys() {
    let pth = PthFile::open(fixture("tiny_pth_f32").join("consolidated.00-of-01.pth")).unwrap();
    let keys = pth.keys();
    assert!(keys.iter().any(|k| k.ends_with("attention.qkv.weight")));
    assert_eq!(
        detect_layout(keys.iter().map(String::as_str)),
        Some(TransformerLayout::Original)
    );
    assert_eq!(
        detect_layout(["model.diffusion_model.cap_embedder.0.weight"]),
        Some(TransformerLayout::ComfyUi)
    );
    assert_eq!(
        detect_layout(["time_caption_embed.caption_embedder.0.weight"]),
        Some(TransformerLayout::Diffusers)
    );
    assert_eq!(detect_layout(["something.else"]), None);
}

#[test]
fn a_config_that_does_not_match_lists_the_keys() {
    let case = fixture("tiny_pth_f32");
    let mut cfg = Config::from_file(case.join("config")).unwrap();
    cfg.num_layers += 1; // the file has one joint block fewer than this config
    let err = open_transformer_file(&case.join("consolidated.00-of-01.pth"), &cfg)
        .err()
        .expect("mismatch");
    match err {
        Error::KeyMismatch {
            missing,
            unexpected,
            ..
        } => {
            assert!(
                missing.iter().any(|k| k.starts_with("layers.2.")),
                "{missing:?}"
            );
            assert!(unexpected.is_empty(), "{unexpected:?}");
        }
        other => panic!("expected KeyMismatch, got {other}"),
    }
}

#[test]
fn truncated_and_foreign_files_are_errors() {
    let src = fixture("tiny_pth_f32").join("consolidated.00-of-01.pth");
    let bytes = std::fs::read(&src).unwrap();
    let dir = std::env::temp_dir().join(format!("lumina2-pth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for cut in [0, 10, bytes.len() / 2, bytes.len() - 30] {
        let p = dir.join(format!("cut{cut}.pth"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(
            PthFile::open(&p).is_err(),
            "truncated at {cut} was accepted"
        );
    }
    let cfg = Config::from_file(fixture("tiny_pth_f32").join("config")).unwrap();
    let p = dir.join("weights.ckpt");
    std::fs::write(&p, b"not a checkpoint").unwrap();
    assert!(matches!(
        open_transformer_file(&p, &cfg),
        Err(Error::Unsupported { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
    let _: Option<Arc<dyn WeightSource>> = None;
}
