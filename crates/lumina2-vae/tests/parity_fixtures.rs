//! Runs the committed PyTorch fixtures (tests/fixtures) through the model,
//! without Python. `LUMINA2_VAE_CASES=DIR` runs the cases under DIR instead
//! (e.g. the real-config cases `cargo xtask parity` generates).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lumina2_parity::{compare, find_cases, input, Case, Comparison};
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig, Weights};

fn cases() -> Vec<Case> {
    let root = std::env::var_os("LUMINA2_VAE_CASES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    find_cases(&root)
        .unwrap()
        .iter()
        .map(|dir| Case::load(dir).unwrap())
        .collect()
}

/// (tensor name, comparison) per expected tensor.
fn run_case(case: &Case) -> Vec<(String, Comparison)> {
    let model_dir = case.model().unwrap();
    let dev = Device::Cpu;
    let cfg = AutoencoderKLConfig::from_file(model_dir).unwrap();
    let weights =
        candle_core::safetensors::load(model_dir.join("diffusion_pytorch_model.safetensors"), &dev)
            .unwrap();
    let mut vae =
        AutoencoderKL::new(&cfg, &Weights::from_tensors(weights, case.dtype, &dev)).unwrap();
    if case.args.get("tiling").and_then(|t| t.as_bool()) == Some(true) {
        vae.enable_tiling();
    }
    let inputs = case.inputs().unwrap();
    let outputs: HashMap<String, Tensor> = match case.component.as_str() {
        "vae_decode" => HashMap::from([(
            "sample".into(),
            vae.decode(input(&inputs, "latents").unwrap()).unwrap(),
        )]),
        "vae_encode" => {
            let d = vae.encode(input(&inputs, "sample").unwrap()).unwrap();
            HashMap::from([("mean".into(), d.mean), ("logvar".into(), d.logvar)])
        }
        other => panic!("not a VAE case: {other}"),
    };
    let mut rows = Vec::new();
    for (name, exp) in &case.expected().unwrap() {
        let out = &outputs[name];
        assert_eq!(out.dtype(), case.dtype);
        let c = compare(out, exp, case.tolerance.atol, case.tolerance.rtol)
            .unwrap_or_else(|e| panic!("{} {name}: {e}", case.dir.display()));
        assert!(
            c.max_abs.is_finite(),
            "{}: non-finite output",
            case.dir.display()
        );
        rows.push((name.clone(), c));
    }
    rows
}

#[test]
fn pytorch_fixtures_match() {
    let cases = cases();
    if std::env::var_os("LUMINA2_VAE_CASES").is_none() {
        assert!(cases.len() >= 10, "fixtures missing: {}", cases.len());
    }
    let mut failures = Vec::new();
    for case in &cases {
        for (name, c) in run_case(case) {
            eprintln!(
                "{} {name}: max_abs {:.3e} worst {:.4}",
                case.dir.display(),
                c.max_abs,
                c.worst
            );
            if !c.passes() {
                failures.push(format!("{} {name}", case.dir.display()));
            }
        }
    }
    assert!(failures.is_empty(), "cases over tolerance: {failures:?}");
}
