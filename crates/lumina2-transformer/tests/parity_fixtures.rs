//! Runs the committed PyTorch fixtures (tests/fixtures) through the model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lumina2_transformer::{Config, Lumina2Transformer, Weights};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformer");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

fn run_case(dir: &Path) -> (f64, f64) {
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let dtype = match case["dtype"].as_str().unwrap_or("f32") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let atol = case["tolerance"]["atol"].as_f64().unwrap();
    let rtol = case["tolerance"]["rtol"].as_f64().unwrap();
    let model_dir = dir.join(case["model"].as_str().unwrap());
    let dev = Device::Cpu;
    let cfg = Config::from_file(&model_dir).unwrap();
    let weights = Weights::from_safetensors(
        &[model_dir.join("diffusion_pytorch_model.safetensors")],
        dtype,
        &dev,
    )
    .unwrap();
    let model = Lumina2Transformer::new(&cfg, &weights).unwrap();
    let inputs: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("inputs.safetensors"), &dev).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let out = model
        .forward(
            &inputs["hidden_states"],
            &inputs["timestep"],
            &inputs["encoder_hidden_states"],
            &inputs["encoder_attention_mask"],
        )
        .unwrap();
    let exp = &expected["sample"];
    assert_eq!(out.dims(), exp.dims(), "{}", dir.display());
    let ours = out
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let refs = exp
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut worst = 0f64;
    let mut max_abs = 0f64;
    for (a, e) in ours.iter().zip(&refs) {
        let d = (a - e).abs();
        assert!(d.is_finite(), "{}: non-finite output", dir.display());
        max_abs = max_abs.max(d);
        worst = worst.max(d / (atol + rtol * e.abs()));
    }
    (max_abs, worst)
}

#[test]
fn pytorch_fixtures_match() {
    let cases = cases();
    assert!(cases.len() >= 6, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for dir in &cases {
        let (max_abs, worst) = run_case(dir);
        eprintln!("{}: max_abs {max_abs:.3e} worst {worst:.4}", dir.display());
        if worst > 1.0 {
            failures.push(dir.display().to_string());
        }
    }
    assert!(failures.is_empty(), "cases over tolerance: {failures:?}");
}
