//! The library on the committed tiny pipeline: stopping, residency, latents
//! output and non-finite latents. (Image parity runs through the xtask runner
//! on the same fixtures.)

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lumina2_pipeline::{
    Control, Error, Event, GenerateOptions, Lumina2Pipeline, Noise, OutputKind, PipelineSources,
    Stage, TransformerSource,
};

fn pipeline(resident: bool) -> Lumina2Pipeline {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/seed_cfg/pipeline");
    let sources = PipelineSources::from_pipeline_folder(dir).unwrap();
    Lumina2Pipeline::builder(sources)
        .keep_resident(resident)
        .build()
        .unwrap()
}

fn small(prompt: &str) -> GenerateOptions {
    let mut o = GenerateOptions::new(prompt);
    o.width = Some(32);
    o.height = Some(32);
    o.num_inference_steps = 4;
    o.max_sequence_length = 32;
    o.noise = Noise::Seed(3);
    o
}

#[test]
fn an_observer_can_stop_the_run() {
    let mut pipe = pipeline(true);
    let mut steps = Vec::new();
    let r = pipe.generate(&small("a boat"), &mut |e| match e {
        Event::Step(s) => {
            steps.push((s.step, s.num_steps, s.guidance, s.model_calls));
            if s.step == 2 {
                Control::Stop
            } else {
                Control::Continue
            }
        }
        _ => Control::Continue,
    });
    assert!(
        matches!(r, Err(Error::Stopped { step: 2, steps: 4 })),
        "{r:?}"
    );
    // Guidance (scale 4 > 1) doubles the model calls of every step.
    assert_eq!(steps, vec![(1, 4, true, 2), (2, 4, true, 2)]);

    // Resident components survive the stop: the next run loads nothing.
    let out = pipe
        .generate(&small("a boat"), &mut |_| Control::Continue)
        .unwrap();
    for stage in [Stage::LoadTextEncoder, Stage::LoadTransformer] {
        assert!(
            !out.timings.stages.iter().any(|(s, _)| *s == stage),
            "{stage:?} again"
        );
    }
    assert_eq!(out.timings.steps.len(), 4);
    let again = pipe
        .generate(&small("a boat"), &mut |_| Control::Continue)
        .unwrap();
    let a: Vec<f32> = out
        .images
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = again
        .images
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b, "same seed, same image");
}

#[test]
fn latents_output_skips_the_vae_and_truncation_skips_guidance() {
    let mut pipe = pipeline(false);
    let mut o = small("a road");
    o.output = OutputKind::Latents;
    o.cfg_trunc_ratio = 0.5;
    let mut guided = Vec::new();
    let out = pipe
        .generate(&o, &mut |e| {
            match e {
                Event::Step(s) => guided.push(s.guidance),
                Event::StageStarted(Stage::LoadVae | Stage::Decode) => panic!("VAE used"),
                _ => {}
            }
            Control::Continue
        })
        .unwrap();
    assert!(out.images.is_none());
    assert_eq!(out.latents.dims(), &[1, 4, 4, 4]);
    assert_eq!(guided, vec![true, true, false, false]);
}

#[test]
fn non_finite_latents_stop_with_the_step() {
    let mut pipe = pipeline(false);
    let mut o = small("x");
    let mut v = vec![0.5f32; 64];
    v[7] = f32::NAN;
    o.noise = Noise::Latents(Tensor::from_vec(v, (1, 4, 4, 4), &Device::Cpu).unwrap());
    let r = pipe.generate(&o, &mut |_| Control::Continue);
    assert!(matches!(r, Err(Error::NonFinite { step: 1, .. })), "{r:?}");
}

#[test]
fn invalid_requests_are_refused_before_loading() {
    let mut pipe = pipeline(false);
    let mut o = small("x");
    o.noise = Noise::Seeds(vec![1, 2]);
    let mut loaded = false;
    let r = pipe.generate(&o, &mut |e| {
        loaded |= matches!(e, Event::StageStarted(_));
        Control::Continue
    });
    assert!(
        matches!(
            r,
            Err(Error::InvalidOption {
                option: "generator",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(!loaded);
    let mut o = small("x");
    o.noise = Noise::Latents(Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap());
    assert!(matches!(
        pipe.generate(&o, &mut |_| Control::Continue),
        Err(Error::InvalidOption {
            option: "latents",
            ..
        })
    ));
    let mut o = small("x");
    o.width = Some(33);
    assert!(matches!(
        pipe.generate(&o, &mut |_| Control::Continue),
        Err(Error::InvalidOption {
            option: "width",
            ..
        })
    ));
}

/// A NaN in a transformer weight stored in bf16, run in bf16. Where bf16
/// weights are used in place from the memory map (AMX CPUs), nothing is
/// read at load: the run's non-finite error names the weight, found by the
/// scan it triggers. Elsewhere the weight is scanned as it is copied (a
/// load warning) and the error names nothing more.
#[test]
fn a_broken_weight_used_in_place_is_named_by_the_error() {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/seed_cfg/pipeline");
    let tmp = std::env::temp_dir().join(format!("lumina2-nan-weight-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("transformer/config.json"), tmp.join("config.json")).unwrap();
    let file = src.join("transformer/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let key = "layers.0.feed_forward.linear_1.weight";
    for (k, t) in tensors.iter_mut() {
        let mut v = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        if k == key {
            v[5] = f32::NAN;
        }
        *t = Tensor::from_vec(v, t.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
    }
    candle_core::safetensors::save(&tensors, tmp.join("diffusion_pytorch_model.safetensors"))
        .unwrap();

    let mut sources = PipelineSources::from_pipeline_folder(&src).unwrap();
    sources.transformer = TransformerSource::Folder(tmp.clone());
    let mut pipe = Lumina2Pipeline::builder(sources)
        .dtype(DType::BF16)
        .build()
        .unwrap();
    let r = pipe.generate(&small("x"), &mut |_| Control::Continue);
    std::fs::remove_dir_all(&tmp).ok();
    let Err(Error::NonFinite {
        step: 1, weights, ..
    }) = r
    else {
        panic!("expected a non-finite error, got {r:?}");
    };
    if lumina2_kernels::gemm::mapped::available() {
        assert_eq!(weights, vec![format!("transformer: {key}")]);
    } else {
        assert!(weights.is_empty(), "{weights:?}");
    }
}
