//! Qwen3 encoder behaviour that follows from the definitions (no reference
//! needed), on the committed fixture models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use lumina2_text_encoder::{
    safetensors_files, Error, Qwen3Config, Qwen3Encoder, WeightError, Weights,
};

/// A `Qwen3ForCausalLM` checkpoint (keys with `model.`), 3 layers, sharded.
fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3/tiny_f32/model")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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

fn tensors() -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for f in safetensors_files(tiny_model()).unwrap() {
        all.extend(candle_core::safetensors::load(f, &Device::Cpu).unwrap());
    }
    all
}

#[test]
fn layer_zero_is_the_unscaled_embedding() {
    let dev = Device::Cpu;
    let enc = Qwen3Encoder::from_folder(tiny_model(), DType::F32, &dev).unwrap();
    let table = tensors()["model.embed_tokens.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    let ids = Tensor::new(&[[3u32, 7, 0, 127]], &dev).unwrap();
    let out = enc.forward_to_layer(&ids, None, 0).unwrap();
    for (j, id) in [3usize, 7, 0, 127].iter().enumerate() {
        assert_eq!(
            max_abs_diff(&out.i((0, j)).unwrap(), &table.i(*id).unwrap()),
            0.0
        );
    }
}

#[test]
fn penultimate_skips_the_last_layer() {
    let dev = Device::Cpu;
    let cfg = Qwen3Config::from_file(tiny_model()).unwrap();
    assert_eq!(cfg.num_hidden_layers, 3);
    let files = safetensors_files(tiny_model()).unwrap();
    let w = Weights::from_safetensors(&files, DType::F32, &dev).unwrap();
    let pen = Qwen3Encoder::penultimate(&cfg, &w).unwrap();
    assert_eq!((pen.num_layers(), pen.num_hidden_layers()), (2, 3));
    let all = Qwen3Encoder::new(&cfg, &w, 3).unwrap();
    let ids = Tensor::new(&[[2u32, 5, 9, 11, 40, 3]], &dev).unwrap();
    let a = pen.forward(&ids, None).unwrap();
    assert_eq!(
        max_abs_diff(&a, &all.forward_to_layer(&ids, None, 2).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&a, &all.forward(&ids, None).unwrap()) > 1e-3);
    assert!(matches!(
        pen.forward_to_layer(&ids, None, 3),
        Err(Error::InvalidInput { name: "n", .. })
    ));
    assert!(Qwen3Encoder::new(&cfg, &w, 4).is_err());
}

#[test]
fn keys_without_the_model_prefix_load_the_same_model() {
    let dev = Device::Cpu;
    let cfg = Qwen3Config::from_file(tiny_model()).unwrap();
    let bare: HashMap<String, Tensor> = tensors()
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("model.").unwrap_or(&k).to_string(), v))
        .collect();
    assert!(bare.contains_key("layers.0.self_attn.q_norm.weight"));
    let a = Qwen3Encoder::from_folder(tiny_model(), DType::F32, &dev).unwrap();
    let b =
        Qwen3Encoder::penultimate(&cfg, &Weights::from_tensors(bare, DType::F32, &dev)).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &dev).unwrap();
    assert_eq!(
        max_abs_diff(
            &a.forward(&ids, None).unwrap(),
            &b.forward(&ids, None).unwrap()
        ),
        0.0
    );
}

#[test]
fn right_padding_does_not_change_real_tokens() {
    let dev = Device::Cpu;
    let enc = Qwen3Encoder::from_folder(tiny_model(), DType::F32, &dev).unwrap();
    let alone = Tensor::new(&[[5u32, 9, 17, 33]], &dev).unwrap();
    let padded = Tensor::new(&[[5u32, 9, 17, 33, 127, 127, 127]], &dev).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 1, 0, 0, 0]], &dev).unwrap();
    let a = enc.forward(&alone, None).unwrap();
    let b = enc.forward(&padded, Some(&mask)).unwrap();
    assert!(max_abs_diff(&a, &b.narrow(1, 0, 4).unwrap()) <= 1e-5);
}

#[test]
fn a_missing_qk_norm_is_a_typed_error_naming_the_key() {
    let dev = Device::Cpu;
    let cfg = Qwen3Config::from_file(tiny_model()).unwrap();
    let mut t = tensors();
    t.remove("model.layers.1.self_attn.k_norm.weight");
    let e =
        Qwen3Encoder::penultimate(&cfg, &Weights::from_tensors(t, DType::F32, &dev)).unwrap_err();
    assert!(
        matches!(e, Error::Weight(WeightError::MissingWeight { .. })),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("layers.1.self_attn.k_norm.weight"),
        "{e}"
    );
}
