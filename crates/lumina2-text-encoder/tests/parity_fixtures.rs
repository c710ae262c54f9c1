//! Runs the committed PyTorch fixtures (tests/fixtures) without Python.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lumina2_text_encoder::{Gemma2Encoder, PromptEncoder, PromptOptions, SystemPrompt};

fn cases(component: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(component);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

struct Case {
    json: serde_json::Value,
    dtype: DType,
    atol: f64,
    rtol: f64,
    model: PathBuf,
    expected: HashMap<String, Tensor>,
}

fn load(dir: &Path) -> Case {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let dtype = match json["dtype"].as_str().unwrap_or("f32") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    Case {
        dtype,
        atol: json["tolerance"]["atol"].as_f64().unwrap(),
        rtol: json["tolerance"]["rtol"].as_f64().unwrap(),
        model: dir.join(json["model"].as_str().unwrap()),
        expected: candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
            .unwrap(),
        json,
    }
}

/// (max |ours - expected|, max |ours - expected| / (atol + rtol |expected|)).
fn compare(ours: &Tensor, exp: &Tensor, atol: f64, rtol: f64, what: &str) -> (f64, f64) {
    assert_eq!(ours.dims(), exp.dims(), "{what}");
    let v = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, e) = (v(ours), v(exp));
    let (mut max_abs, mut worst) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&e) {
        let d = (x - y).abs();
        assert!(d.is_finite(), "{what}: non-finite output");
        max_abs = max_abs.max(d);
        worst = worst.max(d / (atol + rtol * y.abs()));
    }
    (max_abs, worst)
}

#[test]
fn text_encoder_fixtures_match_pytorch() {
    let cases = cases("text_encoder");
    assert!(cases.len() >= 4, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for dir in &cases {
        let c = load(dir);
        let model = Gemma2Encoder::from_folder(&c.model, c.dtype, &Device::Cpu).unwrap();
        let inputs =
            candle_core::safetensors::load(dir.join("inputs.safetensors"), &Device::Cpu).unwrap();
        let out = model
            .forward(&inputs["input_ids"], Some(&inputs["attention_mask"]))
            .unwrap();
        assert_eq!(out.dtype(), c.dtype);
        let (max_abs, worst) = compare(
            &out,
            &c.expected["hidden_states"],
            c.atol,
            c.rtol,
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
    for dir in &cases {
        let c = load(dir);
        let a = &c.json["args"];
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
        };
        let enc = PromptEncoder::from_pipeline_folder(&c.model, c.dtype, &Device::Cpu).unwrap();
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
        assert_eq!(ours.len(), c.expected.len(), "{}", dir.display());
        for (name, t) in ours {
            let exp = &c.expected[name];
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
            let (max_abs, worst) = compare(&t, exp, c.atol, c.rtol, &what);
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
