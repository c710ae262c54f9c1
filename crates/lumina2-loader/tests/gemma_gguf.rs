//! Gemma-2 text encoders from llama.cpp GGUF files: the committed
//! `text_encoder_gguf` cases (written as llama.cpp's converter writes Gemma-2,
//! reference from transformers' own GGUF reader, see tests/fixtures/README.md).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lumina2_loader::gguf::GgufFile;
use lumina2_loader::{Gemma2Gguf, GemmaGgufError};
use lumina2_parity::{compare, Case};
use lumina2_weights::{LinearWeight, WeightSource};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text_encoder_gguf")
        .join(name)
}

#[test]
fn config_comes_from_the_gemma2_metadata() {
    let g = Gemma2Gguf::open(case("tiny_q4_0").join("model.gguf")).unwrap();
    let cfg = g.config().unwrap();
    // The generator's TINY spec (xtask/parity/gen_text_encoder_gguf.py).
    assert_eq!(cfg.vocab_size, 160);
    assert_eq!(cfg.hidden_size, 64);
    assert_eq!(cfg.intermediate_size, 96);
    assert_eq!(cfg.num_hidden_layers, 3);
    assert_eq!(cfg.num_attention_heads, 4);
    assert_eq!(cfg.num_key_value_heads, 2);
    assert_eq!(cfg.head_dim(), 16);
    assert_eq!(cfg.query_pre_attn_scalar, 16.0);
    assert_eq!(cfg.sliding_window, Some(4));
    assert_eq!(cfg.attn_logit_softcapping, Some(5.0));
    assert_eq!(cfg.final_logit_softcapping, Some(30.0));
    assert_eq!(cfg.max_position_embeddings, 64);
    assert!((cfg.rms_norm_eps - 1e-6).abs() < 1e-12);
}

#[test]
fn linears_stay_quantised_and_norms_lose_the_plus_one() {
    let path = case("tiny_q4_0").join("model.gguf");
    let g = Gemma2Gguf::open(&path).unwrap();
    for key in [
        "layers.0.self_attn.q_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ] {
        assert!(g.contains(key), "{key}");
        match g.linear(key).unwrap() {
            LinearWeight::Quantized(q) => {
                assert_eq!(q.dtype(), candle_core::quantized::GgmlDType::Q4_0)
            }
            other => panic!("{key} not quantised: {other:?}"),
        }
    }
    let raw = GgufFile::open(&path).unwrap();
    for (key, name) in [
        (
            "layers.1.pre_feedforward_layernorm.weight",
            "blk.1.ffn_norm.weight",
        ),
        ("norm.weight", "output_norm.weight"),
    ] {
        let stored = raw.dequantize(name).unwrap();
        let ours = g.tensor(key).unwrap().to_vec1::<f32>().unwrap();
        let back: Vec<f32> = stored.iter().map(|v| v - 1.0).collect();
        assert_eq!(ours, back, "{key}");
        // A norm is never handed out quantised.
        assert!(matches!(g.linear(key).unwrap(), LinearWeight::Dense(_)));
    }
    let keys = g.keys();
    assert!(keys.contains(&"embed_tokens.weight".to_string()));
    assert!(keys.contains(&"layers.2.post_feedforward_layernorm.weight".to_string()));
    assert!(!g.contains("lm_head.weight"));
    assert!(g.tensor("layers.0.self_attn.rotary.weight").is_err());
}

#[test]
fn hidden_states_match_transformers_reading_the_same_file() {
    for name in ["tiny_q4_0", "tiny_q8_0_f16"] {
        let case = Case::load(&case(name)).unwrap();
        let enc = Gemma2Gguf::open(case.model().unwrap())
            .unwrap()
            .penultimate_encoder(DType::F32, &Device::Cpu)
            .unwrap();
        let inputs = case.inputs().unwrap();
        let out = enc
            .forward(&inputs["input_ids"], Some(&inputs["attention_mask"]))
            .unwrap();
        let expected = &case.expected().unwrap()["hidden_states"];
        let c = compare(&out, expected, case.tolerance.atol, case.tolerance.rtol).unwrap();
        assert!(c.passes(), "{name}: {c:?}");
    }
}

/// A GGUF v3 header with the given string metadata and no tensors.
fn header_only(kv: &[(&str, &str)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(8u32.to_le_bytes()); // string
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.as_bytes());
    }
    b
}

#[test]
fn other_architectures_and_missing_metadata_are_refused() {
    let lumina = GgufFile::from_bytes(
        "lumina.gguf",
        header_only(&[("general.architecture", "lumina2")]),
    )
    .unwrap();
    let e = Gemma2Gguf::new(lumina).unwrap_err();
    assert!(matches!(e, GemmaGgufError::Architecture { .. }), "{e}");
    assert!(e.to_string().contains("lumina2"), "{e}");

    let bare = GgufFile::from_bytes(
        "bare.gguf",
        header_only(&[("general.architecture", "gemma2")]),
    )
    .unwrap();
    let e = Gemma2Gguf::new(bare).unwrap().config().unwrap_err();
    assert!(
        matches!(&e, GemmaGgufError::Metadata { key, .. } if key == "gemma2.embedding_length"),
        "{e}"
    );
    assert!(e.to_string().contains("bare.gguf"), "{e}");
}

#[test]
fn a_config_that_does_not_match_the_tensors_is_an_error() {
    let g = Gemma2Gguf::open(case("tiny_q4_0").join("model.gguf")).unwrap();
    let mut cfg = g.config().unwrap();
    cfg.intermediate_size = 128;
    let e = g
        .penultimate_encoder_with_config(&cfg, DType::F32, &Device::Cpu)
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("model.gguf"), "{msg}");
    assert!(
        msg.contains("gate_proj") || msg.contains("ffn_gate"),
        "{msg}"
    );
}

/// `cargo xtask fuzz` found a file whose `gemma2.block_count` claims 2097155
/// layers: building the encoder reserved memory for all of them (928 MiB)
/// before failing. It is now refused from the config.
#[test]
fn an_absurd_layer_count_is_refused_before_allocating() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../xtask/fuzz/seeds/regression-2m-layers.gguf");
    let g = Gemma2Gguf::open(path).unwrap();
    let e = g.config().unwrap_err();
    assert!(e.to_string().contains("num_hidden_layers 2097155"), "{e}");
}
