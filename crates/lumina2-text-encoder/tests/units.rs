//! Behaviour that follows from the definitions (no reference needed), on the
//! committed fixture models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use lumina2_text_encoder::{
    safetensors_files, Error, Gemma2Config, Gemma2Encoder, GemmaTokenizer, PromptEncoder,
    PromptOptions, SystemPrompt, WeightError, Weights, DEFAULT_SYSTEM_PROMPT,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_model() -> PathBuf {
    fixtures().join("text_encoder/tiny_f32/model")
}

fn pipeline() -> PathBuf {
    fixtures().join("prompt_encoding/two_prompts_f32/pipeline")
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

#[test]
fn layer_zero_is_the_scaled_embedding() {
    let dev = Device::Cpu;
    let enc = Gemma2Encoder::from_folder(tiny_model(), DType::F32, &dev).unwrap();
    let raw = candle_core::safetensors::load(tiny_model().join("model.safetensors"), &dev).unwrap();
    let table = raw["embed_tokens.weight"].to_dtype(DType::F32).unwrap();
    let ids = Tensor::new(&[[3u32, 7, 0, 127]], &dev).unwrap();
    let out = enc.forward_to_layer(&ids, None, 0).unwrap();
    let scale = (32f64).sqrt() as f32;
    for (j, id) in [3usize, 7, 0, 127].iter().enumerate() {
        let want = (table.i(*id).unwrap() * scale as f64).unwrap();
        let got = out.i((0, j)).unwrap();
        assert!(max_abs_diff(&got, &want) <= 1e-6, "token {id}");
    }
}

#[test]
fn penultimate_skips_the_last_layer_and_stops_anywhere() {
    let dev = Device::Cpu;
    let cfg = Gemma2Config::from_file(tiny_model()).unwrap();
    assert_eq!(cfg.num_hidden_layers, 4);
    let files = safetensors_files(tiny_model()).unwrap();
    let w = Weights::from_safetensors(&files, DType::F32, &dev).unwrap();
    let pen = Gemma2Encoder::penultimate(&cfg, &w).unwrap();
    assert_eq!(pen.num_layers(), 3);
    let all = Gemma2Encoder::new(&cfg, &w, 4).unwrap();
    let ids = Tensor::new(&[[2u32, 5, 9, 11, 40, 3]], &dev).unwrap();
    let a = pen.forward(&ids, None).unwrap();
    let b = all.forward_to_layer(&ids, None, 3).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let c = all.forward(&ids, None).unwrap();
    assert!(
        max_abs_diff(&a, &c) > 1e-3,
        "the last layer changes the states"
    );
    assert!(matches!(
        pen.forward_to_layer(&ids, None, 4),
        Err(Error::InvalidInput { name: "n", .. })
    ));
}

#[test]
fn causal_padding_does_not_change_real_tokens() {
    // Causality: the states of the first n tokens do not depend on what follows
    // them, nor on how much padding follows.
    let dev = Device::Cpu;
    let enc = Gemma2Encoder::from_folder(tiny_model(), DType::F32, &dev).unwrap();
    let short = Tensor::new(&[[2u32, 17, 33, 8, 99]], &dev).unwrap();
    let padded = Tensor::new(&[[2u32, 17, 33, 8, 99, 0, 0, 0, 0, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 1, 1, 0, 0, 0, 0, 0]], &dev).unwrap();
    let a = enc.forward(&short, None).unwrap();
    let b = enc
        .forward(&padded, Some(&mask))
        .unwrap()
        .narrow(1, 0, 5)
        .unwrap();
    assert!(max_abs_diff(&a, &b) <= 1e-5);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dev = Device::Cpu;
    let enc = Gemma2Encoder::from_folder(tiny_model(), DType::F32, &dev).unwrap();
    let out_of_vocab = Tensor::new(&[[1u32, 128]], &dev).unwrap();
    assert!(matches!(
        enc.forward(&out_of_vocab, None),
        Err(Error::InvalidInput {
            name: "input_ids",
            ..
        })
    ));
    let floats = Tensor::new(&[[1f32, 2.0]], &dev).unwrap();
    assert!(enc.forward(&floats, None).is_err());
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let mask = Tensor::new(&[[1i64, 1]], &dev).unwrap();
    assert!(matches!(
        enc.forward(&ids, Some(&mask)),
        Err(Error::InvalidInput {
            name: "attention_mask",
            ..
        })
    ));
    let rank1 = Tensor::new(&[1u32, 2], &dev).unwrap();
    assert!(enc.forward(&rank1, None).is_err());
}

#[test]
fn weight_errors_name_the_key_and_shapes() {
    let dev = Device::Cpu;
    let cfg = Gemma2Config::from_file(tiny_model()).unwrap();
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(tiny_model().join("model.safetensors"), &dev).unwrap();
    t.remove("layers.1.mlp.up_proj.weight");
    let w = Weights::from_tensors(t.clone(), DType::F32, &dev);
    match Gemma2Encoder::penultimate(&cfg, &w) {
        Err(Error::Weight(WeightError::MissingWeight { key, .. })) => {
            assert_eq!(key, "layers.1.mlp.up_proj.weight")
        }
        other => panic!("{other:?}"),
    }
    // Two layers only need layers 0 and 1: the missing layer-1 key still matters,
    // but a missing last layer does not.
    let mut t2: HashMap<String, Tensor> =
        candle_core::safetensors::load(tiny_model().join("model.safetensors"), &dev).unwrap();
    t2.retain(|k, _| !k.starts_with("layers.3."));
    let w2 = Weights::from_tensors(t2, DType::F32, &dev);
    assert_eq!(
        Gemma2Encoder::penultimate(&cfg, &w2).unwrap().num_layers(),
        3
    );
    let mut t3 = t;
    t3.insert(
        "layers.1.mlp.up_proj.weight".into(),
        Tensor::zeros((48, 31), DType::F32, &dev).unwrap(),
    );
    let w3 = Weights::from_tensors(t3, DType::F32, &dev);
    match Gemma2Encoder::penultimate(&cfg, &w3) {
        Err(Error::Weight(WeightError::WeightShape {
            key,
            expected,
            found,
            ..
        })) => {
            assert_eq!(key, "layers.1.mlp.up_proj.weight");
            assert_eq!((expected, found), (vec![48, 32], vec![48, 31]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sharded_folders_with_the_model_prefix_load() {
    let dir = fixtures().join("text_encoder/tiny_variant_f32/model");
    let files = safetensors_files(&dir).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let enc = Gemma2Encoder::from_folder(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.num_layers(), 2);
    assert!(matches!(
        safetensors_files(fixtures().join("no-such-folder")),
        Err(Error::NoWeights { .. })
    ));
}

#[test]
fn system_prompt_template_and_presets() {
    assert_eq!(
        SystemPrompt::default().apply("a cat"),
        format!("{DEFAULT_SYSTEM_PROMPT} <Prompt Start> a cat")
    );
    assert_eq!(
        SystemPrompt::preset("real").unwrap(),
        SystemPrompt::default()
    );
    assert_eq!(
        SystemPrompt::preset("empty").unwrap().apply("a cat"),
        "a cat"
    );
    assert_eq!(
        SystemPrompt::preset("base").unwrap().apply("x"),
        "You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start> x"
    );
    assert!(SystemPrompt::preset("nope").is_err());
}

#[test]
fn tokenizer_prepends_bos_pads_right_and_reports_truncation() {
    let tok = GemmaTokenizer::from_file(pipeline().join("tokenizer")).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let t = tok
        .encode_padded(&["a red cat".to_string(), "☃".to_string()], 12)
        .unwrap();
    for (ids, mask) in t.input_ids.iter().zip(&t.attention_mask) {
        assert_eq!(ids.len(), 12);
        assert_eq!(ids[0], 2, "<bos> first");
        let n = mask.iter().filter(|&&m| m == 1).count();
        assert!(mask[..n].iter().all(|&m| m == 1) && ids[n..].iter().all(|&i| i == 0));
    }
    // ☃ is not in the trained vocabulary: byte fallback gives its 3 UTF-8 bytes.
    assert_eq!(t.attention_mask[1].iter().sum::<u32>(), 4);
    assert_eq!(t.truncated, vec![None, None]);
    let long = "a red cat sits on a blue mat in the morning sun".to_string();
    let t = tok.encode_padded(std::slice::from_ref(&long), 4).unwrap();
    assert_eq!(t.attention_mask[0], vec![1, 1, 1, 1]);
    let kept = tok.inner().decode(&t.input_ids[0][1..], false).unwrap();
    let cut = t.truncated[0].clone().unwrap();
    assert_eq!(format!("{kept}{cut}").trim(), long);
}

/// Two prompts of different lengths.
const TWO_PROMPTS: [&str; 2] = [
    "a red cat",
    "two dogs run in the snow near a small wooden house",
];

#[test]
fn repeated_prompts_keep_masks_aligned() {
    let enc = PromptEncoder::from_pipeline_folder(pipeline(), DType::F32, &Device::Cpu).unwrap();
    let prompts = TWO_PROMPTS;
    let one = enc
        .encode(
            &prompts,
            &PromptOptions {
                max_sequence_length: 48,
                ..Default::default()
            },
        )
        .unwrap();
    let two = enc
        .encode(
            &prompts,
            &PromptOptions {
                max_sequence_length: 48,
                num_images_per_prompt: 2,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(two.prompt_embeds.dims(), &[4, 48, 16]);
    let m1 = one.prompt_attention_mask.to_vec2::<i64>().unwrap();
    let m2 = two.prompt_attention_mask.to_vec2::<i64>().unwrap();
    assert_ne!(m1[0], m1[1], "the prompts have different lengths");
    for (row, src) in [0usize, 0, 1, 1].iter().enumerate() {
        // diffusers would give masks m0 m1 m0 m1 here; ours follow the embeddings.
        assert_eq!(m2[row], m1[*src]);
        let a = two.prompt_embeds.i(row).unwrap();
        let b = one.prompt_embeds.i(*src).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let a = two.negative_prompt_embeds.as_ref().unwrap().i(row).unwrap();
        let b = one
            .negative_prompt_embeds
            .as_ref()
            .unwrap()
            .i(*src)
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }
}

#[test]
fn trimmed_padding_keeps_the_real_tokens_states() {
    let enc = PromptEncoder::from_pipeline_folder(pipeline(), DType::F32, &Device::Cpu).unwrap();
    let prompts = TWO_PROMPTS;
    let opts = PromptOptions {
        max_sequence_length: 64,
        negative_prompt: Some(vec!["blurry".into()]),
        ..Default::default()
    };
    let full = enc.encode(&prompts, &opts).unwrap();
    let cut = enc
        .encode(
            &prompts,
            &PromptOptions {
                trim_padding: true,
                ..opts
            },
        )
        .unwrap();
    let masks = full.prompt_attention_mask.to_vec2::<i64>().unwrap();
    let negative_masks = full
        .negative_prompt_attention_mask
        .as_ref()
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let longest = masks
        .iter()
        .chain(&negative_masks)
        .map(|r| r.iter().filter(|&&m| m != 0).count())
        .max()
        .unwrap();
    assert!(longest < 64, "the prompts must leave padding to trim");
    assert_eq!(cut.prompt_embeds.dims(), &[2, longest, 16]);
    let pairs = [
        (
            &full.prompt_embeds,
            &full.prompt_attention_mask,
            &cut.prompt_embeds,
            &cut.prompt_attention_mask,
        ),
        (
            full.negative_prompt_embeds.as_ref().unwrap(),
            full.negative_prompt_attention_mask.as_ref().unwrap(),
            cut.negative_prompt_embeds.as_ref().unwrap(),
            cut.negative_prompt_attention_mask.as_ref().unwrap(),
        ),
    ];
    for (fe, fm, ce, cm) in pairs {
        assert_eq!(
            fm.narrow(1, 0, longest).unwrap().to_vec2::<i64>().unwrap(),
            cm.to_vec2::<i64>().unwrap()
        );
        // The real tokens' states: only a matmul's order of summation may
        // differ with fewer rows. (A padded position whose keys are all
        // masked averages over every position, as in PyTorch, so it depends
        // on the length; the transformer drops those rows.)
        for (r, row) in cm.to_vec2::<i64>().unwrap().iter().enumerate() {
            let real = row.iter().filter(|&&m| m != 0).count();
            let d = max_abs_diff(
                &fe.i(r).unwrap().narrow(0, 0, real).unwrap(),
                &ce.i(r).unwrap().narrow(0, 0, real).unwrap(),
            );
            assert!(d <= 1e-5, "row {r}: real tokens' states moved by {d}");
        }
    }
}

#[test]
fn prompt_options_are_checked() {
    let enc = PromptEncoder::from_pipeline_folder(pipeline(), DType::F32, &Device::Cpu).unwrap();
    let bad = |opts: PromptOptions| enc.encode(&["a cat", "a dog"], &opts).unwrap_err();
    assert!(matches!(
        bad(PromptOptions {
            max_sequence_length: 513,
            ..Default::default()
        }),
        Error::InvalidInput {
            name: "max_sequence_length",
            ..
        }
    ));
    assert!(matches!(
        bad(PromptOptions {
            num_images_per_prompt: 0,
            ..Default::default()
        }),
        Error::InvalidInput { .. }
    ));
    assert!(matches!(
        bad(PromptOptions {
            negative_prompt: Some(vec!["a".into(), "b".into(), "c".into()]),
            ..Default::default()
        }),
        Error::InvalidInput {
            name: "negative_prompt",
            ..
        }
    ));
    let none: [&str; 0] = [];
    assert!(enc.encode(&none, &PromptOptions::default()).is_err());
    // No guidance: no negative outputs.
    let out = enc
        .encode(
            &["a cat"],
            &PromptOptions {
                do_classifier_free_guidance: false,
                max_sequence_length: 40,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(out.negative_prompt_embeds.is_none() && out.warnings.is_empty());
    assert!(GemmaTokenizer::from_file(fixtures().join("nowhere")).is_err());
}

/// A truncated or mangled tokenizer.json is an error, never a panic (the
/// tokenizers crate itself panics on some: `cargo xtask fuzz` found it).
#[test]
fn truncated_tokenizer_files_are_errors() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/prompt_encoding/no_guidance_f32/pipeline/tokenizer/tokenizer.json");
    let bytes = std::fs::read(&src).unwrap();
    let dir = std::env::temp_dir().join(format!("lumina2-tok-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    let mut cuts: Vec<usize> = (0..bytes.len()).step_by(97).collect();
    cuts.push(bytes.len() - 1);
    for cut in cuts {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let r = std::panic::catch_unwind(|| lumina2_text_encoder::GemmaTokenizer::from_file(&path));
        match r {
            Ok(Err(e)) => assert!(e.to_string().contains("tokenizer.json"), "{e}"),
            Ok(Ok(_)) => panic!("a file cut at {cut} of {} bytes was accepted", bytes.len()),
            Err(_) => panic!("panicked on a file cut at {cut} bytes"),
        }
    }
    // The fuzzer's finding (xtask/fuzz/seeds/regression-truncated-tokenizer.json).
    let finding = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../xtask/fuzz/seeds/regression-truncated-tokenizer.json");
    std::fs::copy(finding, &path).unwrap();
    assert!(lumina2_text_encoder::GemmaTokenizer::from_file(&path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
