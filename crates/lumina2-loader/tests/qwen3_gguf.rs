//! Qwen3 text encoders from llama.cpp GGUF files: the committed fixture
//! (`tests/fixtures/qwen3_gguf`, written by `xtask/parity/gen_qwen3.py`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lumina2_loader::gguf::GgufFile;
use lumina2_loader::{Qwen3Gguf, Qwen3GgufError};
use lumina2_parity::{compare, Case};
use lumina2_weights::{LinearWeight, WeightSource};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen3_gguf")
        .join(name)
}

#[test]
fn config_comes_from_the_qwen3_metadata() {
    let g = Qwen3Gguf::open(case("tiny_q4_0").join("model.gguf")).unwrap();
    let cfg = g.config().unwrap();
    // The generator's TINY_GGUF spec.
    assert_eq!(
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size),
        (160, 64, 96)
    );
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads()
        ),
        (3, 4, 2)
    );
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.rope().unwrap().theta, 1e6);
    assert_eq!(cfg.max_position_embeddings, 64);
    assert!(!cfg.attention_bias);
    assert!((cfg.rms_norm_eps - 1e-6).abs() < 1e-12);
}

#[test]
fn linears_and_embedding_stay_quantised_norms_are_as_stored() {
    let path = case("tiny_q4_0").join("model.gguf");
    let g = Qwen3Gguf::open(&path).unwrap();
    for (key, ty) in [
        (
            "layers.0.self_attn.q_proj.weight",
            candle_core::quantized::GgmlDType::Q4_0,
        ),
        (
            "model.layers.2.mlp.down_proj.weight",
            candle_core::quantized::GgmlDType::Q4_0,
        ),
        (
            "embed_tokens.weight",
            candle_core::quantized::GgmlDType::Q8_0,
        ),
    ] {
        match g.linear(key).unwrap() {
            LinearWeight::Quantized(q) => assert_eq!(q.dtype(), ty, "{key}"),
            other => panic!("{key} not quantised: {other:?}"),
        }
    }
    let raw = GgufFile::open(&path).unwrap();
    for (key, name) in [
        (
            "layers.1.self_attn.k_norm.weight",
            "blk.1.attn_k_norm.weight",
        ),
        (
            "layers.1.post_attention_layernorm.weight",
            "blk.1.ffn_norm.weight",
        ),
    ] {
        let stored = raw.dequantize(name).unwrap();
        assert_eq!(g.tensor(key).unwrap().to_vec1::<f32>().unwrap(), stored);
    }
    assert!(g
        .keys()
        .contains(&"layers.2.self_attn.q_norm.weight".to_string()));
    assert!(!g.contains("lm_head.weight"));
}

#[test]
fn hidden_states_match_transformers_reading_the_same_file() {
    let case = Case::load(&case("tiny_q4_0")).unwrap();
    let enc = Qwen3Gguf::open(case.model().unwrap())
        .unwrap()
        .penultimate_encoder(DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(enc.num_layers(), 2);
    let inputs = case.inputs().unwrap();
    let out = enc
        .forward(&inputs["input_ids"], Some(&inputs["attention_mask"]))
        .unwrap();
    let expected = &case.expected().unwrap()["hidden_states"];
    let c = compare(&out, expected, case.tolerance.atol, case.tolerance.rtol).unwrap();
    assert!(c.passes(), "{c:?}");
}

#[test]
fn a_gemma_file_is_refused() {
    let gemma = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text_encoder_gguf/tiny_q4_0/model.gguf");
    let e = Qwen3Gguf::open(gemma).unwrap_err();
    assert!(matches!(e, Qwen3GgufError::Architecture { .. }), "{e}");
    assert!(e.to_string().contains("gemma2"), "{e}");
}
