//! Runs the committed PyTorch fixtures (tests/fixtures/scheduler) without Python:
//! set_timesteps as Lumina2Pipeline's retrieve_timesteps does, begin index 0,
//! step i fed model_outputs[i]; compares timesteps, sigmas and the final sample.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lumina2_scheduler::{FlowMatchEulerDiscreteScheduler, TimestepRequest};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scheduler");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

/// max over elements of |ours - expected| / (atol + rtol |expected|) (the case
/// format's `worst`), with exact equality counting as 0 even when atol = rtol = 0.
fn worst(ours: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(ours.dims(), expected.dims());
    let a: Vec<f32> = ours
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| {
            let d = (x as f64 - y as f64).abs();
            if d == 0.0 {
                0.0
            } else {
                d / (atol + rtol * (y as f64).abs())
            }
        })
        .fold(0.0, f64::max)
}

fn run_case(dir: &Path) -> Vec<(String, f64)> {
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    assert_eq!(case["component"], "scheduler");
    let dtype = match case["dtype"].as_str().unwrap_or("f32") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let atol = case["tolerance"]["atol"].as_f64().unwrap();
    let rtol = case["tolerance"]["rtol"].as_f64().unwrap();
    let args = &case["args"];
    let n = args["num_inference_steps"].as_u64().unwrap() as usize;
    let req = TimestepRequest {
        num_inference_steps: Some(n),
        sigmas: args["sigmas"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_f64().unwrap()).collect()),
        timesteps: None,
        mu: args["mu"].as_f64(),
    };
    let model = dir.join(case["model"].as_str().unwrap());
    let mut sched = FlowMatchEulerDiscreteScheduler::from_config_file(&model).unwrap();
    sched.set_timesteps(&req).unwrap();
    sched.set_begin_index(0);

    let dev = Device::Cpu;
    let inputs: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("inputs.safetensors"), &dev).unwrap();
    let expected: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let mut x = inputs["sample"].to_dtype(dtype).unwrap();
    let outs = inputs["model_outputs"].to_dtype(dtype).unwrap();
    let timesteps = sched.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        x = sched.step(&outs.get(i).unwrap(), t, &x, None).unwrap();
    }
    assert_eq!(x.dtype(), dtype);
    let ours = [
        (
            "timesteps",
            Tensor::new(timesteps.as_slice(), &dev).unwrap(),
        ),
        ("sigmas", Tensor::new(sched.sigmas(), &dev).unwrap()),
        ("final_sample", x),
    ];
    ours.iter()
        .map(|(name, t)| (name.to_string(), worst(t, &expected[*name], atol, rtol)))
        .collect()
}

#[test]
fn scheduler_fixtures_match_diffusers() {
    let cases = cases();
    assert!(cases.len() >= 18, "only {} scheduler fixtures", cases.len());
    let mut failures = Vec::new();
    for dir in &cases {
        for (name, w) in run_case(dir) {
            let case = dir.file_name().unwrap().to_string_lossy().to_string();
            println!("{case:<32} {name:<14} worst {w:.4}");
            if w.is_nan() || w > 1.0 {
                failures.push(format!("{case} {name}: worst {w}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
