//! Runs the committed PyTorch fixtures (tests/fixtures) without Python.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lumina2_parity::{find_cases, input, Case};
use lumina2_text_encoder::{
    Gemma2Encoder, PromptEncoder, PromptOptions, Qwen3Encoder, SystemPrompt,
};

fn cases(component: &str) -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(component);
    find_cases(&root)
        .unwrap()
        .iter()
        .map(|dir| Case::load(dir).unwrap())
        .collect()
}

/// (max |ours - expected|, max |ours - expected| / (atol + rtol |expected|)).
fn compare(ours: &Tensor, exp: &Tensor, case: &Case, what: &str) -> (f64, f64) {
    let tol = case.tolerance;
    let c = lumina2_parity::compare(ours, exp, tol.atol, tol.rtol)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(c.max_abs.is_finite(), "{what}: non-finite output");
    (c.max_abs, c.worst)
}

#[test]
fn text_encoder_fixtures_match_pytorch() {
    let cases = cases("text_encoder");
    assert!(cases.len() >= 4, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for c in &cases {
        let dir = &c.dir;
        let model = Gemma2Encoder::from_folder(c.model().unwrap(), c.dtype, &Device::Cpu).unwrap();
        let inputs = c.inputs().unwrap();
        let out = model
            .forward(
                input(&inputs, "input_ids").unwrap(),
                Some(input(&inputs, "attention_mask").unwrap()),
            )
            .unwrap();
        assert_eq!(out.dtype(), c.dtype);
        let expected = c.expected().unwrap();
        let (max_abs, worst) = compare(
            &out,
            &expected["hidden_states"],
            c,
            &dir.display().to_string(),
        );
        eprintln!("{}: max_abs {max_abs:.3e} worst {worst:.4}", dir.display());
        if worst > 1.0 {
            failures.push(dir.display().to_string());
        }
    }
    assert!(failures.is_empty(), "cases over tolerance: {failures:?}");
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn prompt_encoding_fixtures_match_diffusers() {
    let cases = cases("prompt_encoding");
    assert!(cases.len() >= 4, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for c in &cases {
        let dir = &c.dir;
        let a = &serde_json::Value::Object(c.args.clone());
        let expected = c.expected().unwrap();
        let opts = PromptOptions {
            system_prompt: match a["system_prompt"].as_str() {
                Some(s) => SystemPrompt::Text(s.to_string()),
                None => SystemPrompt::default(),
            },
            negative_prompt: (!a["negative_prompt"].is_null())
                .then(|| strings(&a["negative_prompt"])),
            do_classifier_free_guidance: a["do_classifier_free_guidance"].as_bool().unwrap(),
            num_images_per_prompt: a["num_images_per_prompt"].as_u64().unwrap() as usize,
            max_sequence_length: a["max_sequence_length"].as_u64().unwrap() as usize,
            trim_padding: false,
        };
        let enc =
            PromptEncoder::from_pipeline_folder(c.model().unwrap(), c.dtype, &Device::Cpu).unwrap();
        let out = enc.encode(&strings(&a["prompt"]), &opts).unwrap();
        let mut ours = vec![
            ("prompt_embeds", out.prompt_embeds.clone()),
            ("prompt_attention_mask", out.prompt_attention_mask.clone()),
        ];
        if opts.do_classifier_free_guidance {
            ours.push((
                "negative_prompt_embeds",
                out.negative_prompt_embeds.unwrap(),
            ));
            ours.push((
                "negative_prompt_attention_mask",
                out.negative_prompt_attention_mask.unwrap(),
            ));
        } else {
            assert!(out.negative_prompt_embeds.is_none());
        }
        assert_eq!(ours.len(), expected.len(), "{}", dir.display());
        for (name, t) in ours {
            let exp = &expected[name];
            let what = format!("{} {name}", dir.display());
            if name.ends_with("mask") {
                // Masks are exact.
                assert_eq!(t.dtype(), DType::I64, "{what}");
                assert_eq!(
                    t.to_vec2::<i64>().unwrap(),
                    exp.to_vec2::<i64>().unwrap(),
                    "{what}"
                );
                continue;
            }
            let (max_abs, worst) = compare(&t, exp, c, &what);
            eprintln!("{what}: max_abs {max_abs:.3e} worst {worst:.4}");
            if worst > 1.0 {
                failures.push(what);
            }
        }
        // The truncation case warns and quotes the cut text.
        if dir.display().to_string().contains("truncated") {
            assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
            assert!(out.warnings[0].contains("sharp"), "{:?}", out.warnings);
        } else if !dir.display().to_string().contains("no_guidance") {
            assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        }
    }
    assert!(failures.is_empty(), "cases over tolerance: {failures:?}");
}

#[test]
fn qwen3_fixtures_match_pytorch() {
    let cases = cases("qwen3");
    assert!(cases.len() >= 4, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for c in &cases {
        let dir = &c.dir;
        let model = Qwen3Encoder::from_folder(c.model().unwrap(), c.dtype, &Device::Cpu).unwrap();
        let inputs = c.inputs().unwrap();
        let out = model
            .forward(
                input(&inputs, "input_ids").unwrap(),
                Some(input(&inputs, "attention_mask").unwrap()),
            )
            .unwrap();
        assert_eq!(out.dtype(), c.dtype);
        let expected = c.expected().unwrap();
        let (max_abs, worst) = compare(
            &out,
            &expected["hidden_states"],
            c,
            &dir.display().to_string(),
        );
        eprintln!("{}: max_abs {max_abs:.3e} worst {worst:.4}", dir.display());
        if worst > 1.0 {
            failures.push(dir.display().to_string());
        }
    }
    assert!(failures.is_empty(), "cases over tolerance: {failures:?}");
}
