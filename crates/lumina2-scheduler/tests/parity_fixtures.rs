//! Runs the committed PyTorch fixtures (tests/fixtures/scheduler) without Python:
//! set_timesteps as Lumina2Pipeline's retrieve_timesteps does, begin index 0,
//! step i fed model_outputs[i]; compares timesteps, sigmas and the final sample.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lumina2_parity::{compare, find_cases, input, Case};
use lumina2_scheduler::{FlowMatchEulerDiscreteScheduler, TimestepRequest};

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scheduler");
    find_cases(&root)
        .unwrap()
        .iter()
        .map(|dir| Case::load(dir).unwrap())
        .collect()
}

/// (tensor name, `worst`) per expected tensor.
fn run_case(case: &Case) -> Vec<(String, f64)> {
    assert_eq!(case.component, "scheduler");
    let dtype = case.dtype;
    let args = &case.args;
    let n = args["num_inference_steps"].as_u64().unwrap() as usize;
    let req = TimestepRequest {
        num_inference_steps: Some(n),
        sigmas: args
            .get("sigmas")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().map(|v| v.as_f64().unwrap()).collect()),
        timesteps: None,
        mu: args.get("mu").and_then(|m| m.as_f64()),
    };
    let mut sched =
        FlowMatchEulerDiscreteScheduler::from_config_file(case.model().unwrap()).unwrap();
    sched.set_timesteps(&req).unwrap();
    sched.set_begin_index(0);

    let dev = Device::Cpu;
    let inputs = case.inputs().unwrap();
    let expected = case.expected().unwrap();
    let mut x = input(&inputs, "sample").unwrap().to_dtype(dtype).unwrap();
    let outs = input(&inputs, "model_outputs")
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
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
    let Case { tolerance: tol, .. } = case;
    ours.iter()
        .map(|(name, t)| {
            // diffusers keeps timesteps and sigmas in float32: ours (f64)
            // are judged after the same rounding.
            let t = t.to_dtype(DType::F32).unwrap();
            let c = compare(&t, &expected[*name], tol.atol, tol.rtol).unwrap();
            (name.to_string(), c.worst)
        })
        .collect()
}

#[test]
fn scheduler_fixtures_match_diffusers() {
    let cases = cases();
    assert!(cases.len() >= 18, "only {} scheduler fixtures", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        for (name, w) in run_case(case) {
            let dir = case.dir.file_name().unwrap().to_string_lossy().to_string();
            println!("{dir:<32} {name:<14} worst {w:.4}");
            if w.is_nan() || w > 1.0 {
                failures.push(format!("{dir} {name}: worst {w}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
