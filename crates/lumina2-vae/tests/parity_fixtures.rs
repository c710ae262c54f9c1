//! Runs the committed PyTorch fixtures (tests/fixtures) through the model,
//! without Python. `LUMINA2_VAE_CASES=DIR` runs the cases under DIR instead
//! (e.g. the real-config cases `cargo xtask parity` generates).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig, Weights};

fn find(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.join("case.json").is_file() {
        out.push(dir.to_path_buf());
    }
    for e in std::fs::read_dir(dir).expect("readable folder") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            find(&p, out);
        }
    }
}

fn cases() -> Vec<PathBuf> {
    let root = std::env::var_os("LUMINA2_VAE_CASES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    let mut v = Vec::new();
    find(&root, &mut v);
    v.sort();
    v
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Returns (tensor name, max abs error, worst ratio) per expected tensor.
fn run_case(dir: &Path) -> Vec<(String, f64, f64)> {
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
    let cfg = AutoencoderKLConfig::from_file(&model_dir).unwrap();
    let weights =
        candle_core::safetensors::load(model_dir.join("diffusion_pytorch_model.safetensors"), &dev)
            .unwrap();
    let mut vae = AutoencoderKL::new(&cfg, &Weights::from_tensors(weights, dtype, &dev)).unwrap();
    if case["args"]["tiling"].as_bool() == Some(true) {
        vae.enable_tiling();
    }
    let inputs: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("inputs.safetensors"), &dev).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let outputs: HashMap<String, Tensor> = match case["component"].as_str().unwrap() {
        "vae_decode" => HashMap::from([("sample".into(), vae.decode(&inputs["latents"]).unwrap())]),
        "vae_encode" => {
            let d = vae.encode(&inputs["sample"]).unwrap();
            HashMap::from([("mean".into(), d.mean), ("logvar".into(), d.logvar)])
        }
        other => panic!("not a VAE case: {other}"),
    };
    let mut rows = Vec::new();
    for (name, exp) in &expected {
        let out = &outputs[name];
        assert_eq!(out.dims(), exp.dims(), "{} {name}", dir.display());
        assert_eq!(out.dtype(), dtype);
        let (mut max_abs, mut worst) = (0f64, 0f64);
        for (a, e) in to_vec(out).iter().zip(to_vec(exp)) {
            let d = (a - e).abs();
            assert!(d.is_finite(), "{}: non-finite output", dir.display());
            max_abs = max_abs.max(d);
            worst = worst.max(d / (atol + rtol * e.abs()));
        }
        rows.push((name.clone(), max_abs, worst));
    }
    rows
}

#[test]
fn pytorch_fixtures_match() {
    let cases = cases();
    if std::env::var_os("LUMINA2_VAE_CASES").is_none() {
        assert!(cases.len() >= 10, "fixtures missing: {cases:?}");
    }
    let mut failures = Vec::new();
    for dir in &cases {
        for (name, max_abs, worst) in run_case(dir) {
            eprintln!(
                "{} {name}: max_abs {max_abs:.3e} worst {worst:.4}",
                dir.display()
            );
            if worst > 1.0 {
                failures.push(format!("{} {name}", dir.display()));
            }
        }
    }
    assert!(failures.is_empty(), "cases over tolerance: {failures:?}");
}
