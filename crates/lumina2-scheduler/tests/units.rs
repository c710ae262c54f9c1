//! Configuration, errors, scale_noise, stochastic steps and the solvers' math.
//! Expected values come from the formulas (diffusers' code) or from closed-form
//! ODE solutions; diffusers parity itself is in parity_fixtures.rs.

use candle_core::{DType, Device, Tensor};
use lumina2_scheduler::{
    calculate_shift, lumina2_sigmas, numpy::linspace, EulerSolver, FlowMatchEulerDiscreteScheduler,
    MidpointSolver, SchedulerConfig, SchedulerError, Solver, SolverKind, TimeShiftType,
    TimestepRequest,
};

const LUMINA_JSON: &str = r#"{
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "_diffusers_version": "0.32.0.dev0",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "invert_sigmas": false,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 6.0,
  "shift_terminal": null,
  "use_beta_sigmas": false,
  "use_dynamic_shifting": false,
  "use_exponential_sigmas": false,
  "use_karras_sigmas": false
}"#;

fn vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn vec64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn lumina() -> FlowMatchEulerDiscreteScheduler {
    FlowMatchEulerDiscreteScheduler::new(SchedulerConfig::from_json_str(LUMINA_JSON).unwrap())
        .unwrap()
}

#[test]
fn config_reads_lumina_json_and_defaults() {
    let c = SchedulerConfig::from_json_str(LUMINA_JSON).unwrap();
    assert_eq!(c, SchedulerConfig::lumina2());
    let d = SchedulerConfig::from_json_str("{}").unwrap();
    assert_eq!(d, SchedulerConfig::default());
    assert_eq!(d.num_train_timesteps, 1000);
    assert_eq!(d.shift, 1.0);
    assert_eq!(d.base_shift, Some(0.5));
    assert_eq!(d.max_shift, Some(1.15));
    assert_eq!(d.time_shift_type, TimeShiftType::Exponential);
    let l = SchedulerConfig::from_json_str(r#"{"time_shift_type": "linear", "base_shift": null}"#)
        .unwrap();
    assert_eq!(l.time_shift_type, TimeShiftType::Linear);
    assert_eq!(l.base_shift, None);
}

#[test]
fn config_rejects_bad_values() {
    for bad in [
        r#"{"time_shift_type": "cubic"}"#,
        r#"{"use_karras_sigmas": true, "use_beta_sigmas": true}"#,
        r#"{"shift": 0.0}"#,
        r#"{"shift": -2.0}"#,
        r#"{"num_train_timesteps": 0}"#,
        r#"{"shift_terminal": 1.0}"#,
        r#"{"num_train_timesteps": -5}"#,
        r#"not json"#,
        // Sizes that would build absurd schedules: refused by the limits.
        r#"{"num_train_timesteps": 100000000000}"#,
        r#"{"num_train_timesteps": 1000001}"#,
        r#"{"max_image_seq_len": 18446744073709551615}"#,
    ] {
        assert!(
            SchedulerConfig::from_json_str(bad).is_err(),
            "{bad} accepted"
        );
    }
    let cfg = SchedulerConfig {
        shift: f64::NAN,
        ..SchedulerConfig::default()
    };
    assert!(matches!(
        FlowMatchEulerDiscreteScheduler::new(cfg),
        Err(SchedulerError::NonFinite { .. })
    ));
    // Built in code rather than parsed: the constructor checks it too.
    let huge = SchedulerConfig {
        num_train_timesteps: 100_000_000_000,
        ..SchedulerConfig::default()
    };
    let err = FlowMatchEulerDiscreteScheduler::new(huge).unwrap_err();
    assert!(err.to_string().contains("1000000"), "{err}");
    let missing = SchedulerConfig::from_file("/nonexistent/scheduler");
    assert!(matches!(missing, Err(SchedulerError::Io { .. })));
}

#[test]
fn lumina_helper_is_the_pipeline_schedule() {
    // The pipeline: sigmas = np.linspace(1.0, 1 / N, N) passed to set_timesteps.
    let n = 30;
    let s = lumina2_sigmas(n);
    assert_eq!(s, linspace(1.0, 1.0 / 30.0, 30));
    assert_eq!(s[0], 1.0);
    assert_eq!(s[29], 1.0 / 30.0);
    let mut a = lumina();
    a.set_timesteps_lumina2(n, 4096).unwrap();
    let mut b = lumina();
    b.set_timesteps(&TimestepRequest::sigmas(s)).unwrap();
    assert_eq!(a.sigmas(), b.sigmas());
    assert_eq!(a.timesteps(), b.timesteps());
    assert_eq!(a.timesteps().len(), n);
    assert_eq!(a.sigmas().len(), n + 1);
    assert_eq!(a.sigmas()[n], 0.0);
    // Shift 6 on sigma = 1 stays 1; timesteps are sigma * 1000 in f32.
    assert_eq!(a.sigmas()[0], 1.0);
    for (t, s) in a.timesteps().iter().zip(a.sigmas()) {
        assert_eq!(*t, s * 1000.0);
    }
    // Sigma shifting in f32 as NumPy does: 6 s / (1 + 5 s).
    let x = lumina2_sigmas(n)[7] as f32;
    assert_eq!(a.sigmas()[7], 6.0f32 * x / (1.0f32 + 5.0f32 * x));
}

#[test]
fn calculate_shift_is_linear_between_base_and_max() {
    assert!((calculate_shift(256, 256, 4096, 0.5, 1.15).unwrap() - 0.5).abs() < 1e-15);
    assert!((calculate_shift(4096, 256, 4096, 0.5, 1.15).unwrap() - 1.15).abs() < 1e-15);
    assert!(calculate_shift(10, 256, 256, 0.5, 1.15).is_err());
}

#[test]
fn set_timesteps_errors() {
    let mut s = FlowMatchEulerDiscreteScheduler::new(SchedulerConfig {
        use_dynamic_shifting: true,
        ..SchedulerConfig::default()
    })
    .unwrap();
    assert!(matches!(
        s.set_timesteps(&TimestepRequest::steps(10)),
        Err(SchedulerError::MuRequired)
    ));
    assert!(s
        .set_timesteps(&TimestepRequest::steps(10).with_mu(f64::INFINITY))
        .is_err());
    s.set_timesteps(&TimestepRequest::steps(10).with_mu(0.8))
        .unwrap();

    let mut s = lumina();
    let wrong_len = TimestepRequest {
        num_inference_steps: Some(5),
        sigmas: Some(vec![1.0, 0.5]),
        ..TimestepRequest::default()
    };
    assert!(matches!(
        s.set_timesteps(&wrong_len),
        Err(SchedulerError::InvalidTimesteps(_))
    ));
    let mismatch = TimestepRequest {
        sigmas: Some(vec![1.0, 0.5]),
        timesteps: Some(vec![1000.0]),
        ..TimestepRequest::default()
    };
    assert!(s.set_timesteps(&mismatch).is_err());
    assert!(s.set_timesteps(&TimestepRequest::default()).is_err());
    assert!(s.set_timesteps(&TimestepRequest::steps(0)).is_err());
    assert!(matches!(
        s.set_timesteps(&TimestepRequest::sigmas(vec![1.0, f64::NAN])),
        Err(SchedulerError::NonFinite { .. })
    ));
    // A failed call leaves the scheduler unset.
    assert_eq!(s.num_inference_steps(), None);
}

#[test]
fn custom_timesteps_are_kept_as_given() {
    let mut s = lumina();
    s.set_timesteps(&TimestepRequest::timesteps(vec![1000.0, 500.0, 250.0]))
        .unwrap();
    assert_eq!(s.timesteps(), &[1000.0, 500.0, 250.0]);
    // sigmas = t / 1000, then shifted 6 s / (1 + 5 s) in f32.
    let want: Vec<f32> = [1.0f32, 0.5, 0.25]
        .iter()
        .map(|x| 6.0 * x / (1.0 + 5.0 * x))
        .chain([0.0])
        .collect();
    assert_eq!(s.sigmas(), want.as_slice());
}

#[test]
fn step_errors_and_index_handling() {
    let dev = Device::Cpu;
    let x = Tensor::ones((1, 2, 2, 2), DType::F32, &dev).unwrap();
    let v = Tensor::ones((1, 2, 2, 2), DType::F32, &dev).unwrap();
    let mut s = lumina();
    assert!(matches!(
        s.step(&v, 1000.0, &x, None),
        Err(SchedulerError::NotInitialized)
    ));
    s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(3)))
        .unwrap();
    assert!(matches!(
        s.step(&v, 123.0, &x, None),
        Err(SchedulerError::TimestepNotFound(_))
    ));
    let wrong = Tensor::ones((1, 2, 2), DType::F32, &dev).unwrap();
    assert!(matches!(
        s.step(&wrong, 1000.0, &x, None),
        Err(SchedulerError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        s.step(&v, 1000.0, &x, Some(&x)),
        Err(SchedulerError::UnexpectedNoise)
    ));
    // Without a begin index the first step looks its timestep up.
    let t1 = s.timesteps()[1];
    let out = s.step(&v, t1, &x, None).unwrap();
    assert_eq!(s.step_index(), Some(2));
    let dt = s.sigmas()[2] - s.sigmas()[1];
    assert!(vec(&out).iter().all(|&o| o == 1.0 + dt));
    let out = s.step(&v, 0.0, &out, None).unwrap();
    assert_eq!(s.step_index(), Some(3));
    assert!(vec(&out).iter().all(|&o| o == (1.0 + dt) - s.sigmas()[2]));
    assert!(matches!(
        s.step(&v, 0.0, &out, None),
        Err(SchedulerError::StepOutOfRange { index: 3, steps: 3 })
    ));
}

#[test]
fn repeated_timesteps_start_at_the_second_occurrence() {
    let mut s = lumina();
    s.set_timesteps(&TimestepRequest::timesteps(vec![800.0, 800.0, 400.0]))
        .unwrap();
    assert_eq!(s.index_for_timestep(800.0).unwrap(), 1);
    assert_eq!(s.index_for_timestep(400.0).unwrap(), 2);
}

#[test]
fn stochastic_step_uses_the_callers_noise() {
    let dev = Device::Cpu;
    let mut s = FlowMatchEulerDiscreteScheduler::new(SchedulerConfig {
        stochastic_sampling: true,
        ..SchedulerConfig::lumina2()
    })
    .unwrap();
    s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(4)))
        .unwrap();
    s.set_begin_index(0);
    let x = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
    let v = Tensor::new(&[[1.5f32, 0.5], [-0.75, 2.0]], &dev).unwrap();
    let n = Tensor::new(&[[0.1f32, -0.3], [0.7, -1.2]], &dev).unwrap();
    let t0 = s.timesteps()[0];
    assert!(matches!(
        s.step(&v, t0, &x, None),
        Err(SchedulerError::NoiseRequired)
    ));
    let out = s.step(&v, t0, &x, Some(&n)).unwrap();
    let (sig, nxt) = (s.sigmas()[0], s.sigmas()[1]);
    let want: Vec<f32> = vec(&x)
        .iter()
        .zip(vec(&v))
        .zip(vec(&n))
        .map(|((x, v), n)| (1.0 - nxt) * (x - sig * v) + nxt * n)
        .collect();
    assert_eq!(vec(&out), want);
    assert!(matches!(
        EulerSolver::new(s.clone(), x.clone()),
        Err(SchedulerError::NoiseRequired)
    ));
}

#[test]
fn scale_noise_is_the_forward_process() {
    let dev = Device::Cpu;
    let mut s = lumina();
    s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(10)))
        .unwrap();
    let x = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0], &dev)
        .unwrap()
        .reshape((2, 1, 2))
        .unwrap();
    let n = Tensor::new(&[0.3f32, 0.1, -0.7, 1.1], &dev)
        .unwrap()
        .reshape((2, 1, 2))
        .unwrap();
    let ts = [s.timesteps()[3], s.timesteps()[6]];
    let out = s.scale_noise(&x, &ts, &n).unwrap();
    let (s3, s6) = (s.sigmas()[3], s.sigmas()[6]);
    let want = [
        s3 * 0.3 + (1.0 - s3) * 1.0,
        s3 * 0.1 + (1.0 - s3) * -2.0,
        s6 * -0.7 + (1.0 - s6) * 0.5,
        s6 * 1.1 + (1.0 - s6) * 3.0,
    ];
    assert_eq!(vec(&out), want);
    // With a begin index, the begin index's sigma for every element.
    s.set_begin_index(2);
    let out = s.scale_noise(&x, &[0.0], &n).unwrap();
    let s2 = s.sigmas()[2];
    assert_eq!(vec(&out)[0], s2 * 0.3 + (1.0 - s2) * 1.0);
    // Errors: wrong count of timesteps, dtype or shape mismatch.
    assert!(s.scale_noise(&x, &[0.0, 0.0, 0.0], &n).is_err());
    let nb = n.to_dtype(DType::BF16).unwrap();
    assert!(matches!(
        s.scale_noise(&x, &[0.0], &nb),
        Err(SchedulerError::DTypeMismatch { .. })
    ));
}

/// Drives a solver with a velocity field, counting the model calls.
fn drive(solver: &mut dyn Solver, v: impl Fn(&Tensor, f32) -> Tensor) -> usize {
    let mut calls = 0;
    while let Some(e) = solver.pending() {
        let out = v(e.sample, e.sigma);
        solver.submit(&out).unwrap();
        calls += 1;
    }
    calls
}

#[test]
fn euler_solver_is_the_pipeline_loop() {
    let dev = Device::Cpu;
    let mut s = lumina();
    s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(6)))
        .unwrap();
    let x0 = Tensor::new(&[0.3f32, -1.2, 2.0], &dev).unwrap();
    let field = |x: &Tensor, sigma: f32| (x.affine(-0.5, 0.0).unwrap() + sigma as f64).unwrap();
    // By hand: begin index 0, scheduler.step at each timestep.
    let mut manual = s.clone();
    manual.set_begin_index(0);
    let mut x = x0.clone();
    for (i, &t) in s.timesteps().iter().enumerate() {
        x = manual.step(&field(&x, s.sigmas()[i]), t, &x, None).unwrap();
    }
    let mut solver = EulerSolver::new(s, x0).unwrap();
    assert_eq!(drive(&mut solver, field), 6);
    assert_eq!(vec(solver.sample()), vec(&x));
    assert!(matches!(
        solver.submit(&x),
        Err(SchedulerError::SolverFinished)
    ));
    assert_eq!((solver.evaluations_per_step(), solver.order()), (1, 1));
}

#[test]
fn midpoint_asks_twice_per_step_at_the_midpoints() {
    let dev = Device::Cpu;
    let mut s = lumina();
    s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(5)))
        .unwrap();
    let sig = s.sigmas().to_vec();
    let x0 = Tensor::zeros(3, DType::F32, &dev).unwrap();
    let mut m = SolverKind::Midpoint.build(s, x0).unwrap();
    assert_eq!(
        (m.num_steps(), m.evaluations_per_step(), m.order()),
        (5, 2, 2)
    );
    let mut seen = Vec::new();
    while let Some(e) = m.pending() {
        seen.push((e.step, e.stage, e.sigma, e.timestep));
        let v = e.sample.ones_like().unwrap();
        m.submit(&v).unwrap();
    }
    assert_eq!(seen.len(), 10);
    for (k, (step, stage, sigma, t)) in seen.into_iter().enumerate() {
        assert_eq!((step, stage), (k / 2, k % 2));
        let (a, b) = (sig[step], sig[step + 1]);
        let want = if stage == 0 { a } else { a + (b - a) * 0.5 };
        assert_eq!(sigma, want);
        assert_eq!(t, want * 1000.0);
    }
    // Constant velocity 1 from sigma 1 to 0: x = -1 (exact in f32: the h sum telescopes).
    assert!(vec(m.sample()).iter().all(|v| (v + 1.0).abs() < 1e-6));
    let dummy = m.sample().clone();
    assert!(matches!(
        m.submit(&dummy),
        Err(SchedulerError::SolverFinished)
    ));
}

#[test]
fn midpoint_is_exact_on_velocities_affine_in_sigma() {
    // dx/dsigma = a + b sigma: x(0) = x(1) - a - b/2, whatever the grid.
    let dev = Device::Cpu;
    let (a, b) = (0.7f64, -2.3f64);
    let field = |x: &Tensor, sigma: f32| {
        x.ones_like()
            .unwrap()
            .affine(a + b * sigma as f64, 0.0)
            .unwrap()
    };
    let mut s = lumina();
    s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(7)))
        .unwrap(); // shift 6: a non-uniform grid
    let x1 = Tensor::new(&[0.25f64, -1.5], &dev).unwrap();
    let exact: Vec<f64> = vec64(&x1).iter().map(|x| x - a - b / 2.0).collect();
    let mut m = MidpointSolver::from_scheduler(&s, x1.clone()).unwrap();
    drive(&mut m, field);
    for (g, w) in vec64(m.sample()).iter().zip(&exact) {
        // Only the f32 rounding of the sigmas themselves remains.
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
    // Euler is not exact there (first order): it misses b/2 * sum h².
    let mut e = EulerSolver::new(s, x1.to_dtype(DType::F32).unwrap()).unwrap();
    drive(&mut e, field);
    let err = (vec(e.sample())[0] as f64 - exact[0]).abs();
    assert!(err > 1e-2, "euler error {err}");
}

fn error_of(solver: &mut dyn Solver, lambda: f64, x1: f64) -> f64 {
    // dx/dsigma = lambda x from sigma = 1 to 0: x(0) = x(1) exp(-lambda).
    drive(solver, |x, _| x.affine(lambda, 0.0).unwrap());
    let got = solver
        .sample()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    (got - x1 * (-lambda).exp()).abs()
}

#[test]
fn midpoint_converges_at_second_order_and_euler_at_first() {
    let dev = Device::Cpu;
    let (lambda, x1) = (1.3, 0.8);
    let mut mid_err = Vec::new();
    let mut euler_err = Vec::new();
    for n in [8usize, 16, 32, 64] {
        let grid: Vec<f32> = linspace(1.0, 0.0, n + 1)
            .iter()
            .map(|&s| s as f32)
            .collect();
        let x = Tensor::new(&[x1], &dev).unwrap();
        let mut m = MidpointSolver::new(grid, 1000, x).unwrap();
        mid_err.push(error_of(&mut m, lambda, x1));
        // Euler through the scheduler: shift 1, sigmas 1 .. 1/n then 0.
        let mut s = FlowMatchEulerDiscreteScheduler::new(SchedulerConfig::default()).unwrap();
        s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(n)))
            .unwrap();
        let mut e = EulerSolver::new(s, Tensor::new(&[x1 as f32], &dev).unwrap()).unwrap();
        euler_err.push(error_of(&mut e, lambda, x1));
    }
    for w in mid_err.windows(2) {
        let r = w[0] / w[1];
        assert!((3.6..4.4).contains(&r), "midpoint ratio {r} ({mid_err:?})");
    }
    for w in euler_err.windows(2) {
        let r = w[0] / w[1];
        assert!((1.8..2.2).contains(&r), "euler ratio {r} ({euler_err:?})");
    }
    // At equal model calls (midpoint n steps = Euler 2n steps) midpoint wins here.
    assert!(mid_err[0] < euler_err[1]);
}

#[test]
fn solvers_need_a_schedule() {
    let dev = Device::Cpu;
    let x = Tensor::zeros(2, DType::F32, &dev).unwrap();
    assert!(matches!(
        EulerSolver::new(lumina(), x.clone()),
        Err(SchedulerError::NotInitialized)
    ));
    assert!(MidpointSolver::from_scheduler(&lumina(), x.clone()).is_err());
    assert!(MidpointSolver::new(vec![1.0], 1000, x.clone()).is_err());
    assert!(MidpointSolver::new(vec![1.0, f32::NAN], 1000, x.clone()).is_err());
    let mut m = MidpointSolver::new(vec![1.0, 0.0], 1000, x).unwrap();
    let wrong = Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert!(matches!(
        m.submit(&wrong),
        Err(SchedulerError::ShapeMismatch { .. })
    ));
}

#[test]
fn a_solver_started_at_a_begin_index_steps_as_diffusers_from_there() {
    let dev = Device::Cpu;
    let mut s = lumina();
    s.set_timesteps(&TimestepRequest::sigmas(lumina2_sigmas(6)))
        .unwrap();
    let x = Tensor::new(&[0.5f32, -1.25, 2.0], &dev).unwrap();
    let v = Tensor::new(&[0.1f32, 0.2, -0.3], &dev).unwrap();
    let mut solver = SolverKind::Euler.build_at(s.clone(), x.clone(), 2).unwrap();
    assert_eq!(solver.num_steps(), 4);
    let eval = solver.pending().unwrap();
    assert_eq!((eval.step, eval.timestep), (0, s.timesteps()[2]));
    assert_eq!(eval.sigma, s.sigmas()[2]);
    solver.submit(&v).unwrap();
    // diffusers: set_begin_index(2), then step(v, timesteps[2], x).
    let mut reference = s.clone();
    reference.set_begin_index(2);
    let want = reference.step(&v, s.timesteps()[2], &x, None).unwrap();
    let got = solver.sample().to_vec1::<f32>().unwrap();
    assert_eq!(got, want.to_vec1::<f32>().unwrap());
    assert_eq!(solver.pending().unwrap().timestep, s.timesteps()[3]);
    // The sample can be replaced between steps, with one of its shape.
    solver.replace_sample(x.clone()).unwrap();
    assert_eq!(solver.sample().to_vec1::<f32>().unwrap(), [0.5, -1.25, 2.0]);
    let wrong = Tensor::zeros(2, DType::F32, &dev).unwrap();
    assert!(solver.replace_sample(wrong).is_err());
    // The midpoint solver skips the same sigmas.
    let m = SolverKind::Midpoint
        .build_at(s.clone(), x.clone(), 2)
        .unwrap();
    assert_eq!(m.num_steps(), 4);
    assert_eq!(m.pending().unwrap().sigma, s.sigmas()[2]);
    // A begin index must leave a step.
    assert!(SolverKind::Euler.build_at(s.clone(), x.clone(), 6).is_err());
    assert!(SolverKind::Midpoint.build_at(s, x, 6).is_err());
}
