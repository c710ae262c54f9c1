//! Runs the committed Z-Image PyTorch fixtures (tests/fixtures/zimage_transformer)
//! through the model, and checks how it refuses what it does not implement.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lumina2_parity::{compare, find_cases, input, Case};
use lumina2_transformer::zimage::{weight_shapes, ZImageConfig, ZImageTransformer};
use lumina2_transformer::{Error, Weights};

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zimage_transformer");
    find_cases(&root)
        .unwrap()
        .iter()
        .map(|dir| Case::load(dir).unwrap())
        .collect()
}

fn load(model_dir: &Path, dtype: DType) -> (ZImageConfig, Weights) {
    let cfg = ZImageConfig::from_file(model_dir).unwrap();
    let weights = Weights::from_safetensors(
        &[model_dir.join("diffusion_pytorch_model.safetensors")],
        dtype,
        &Device::Cpu,
    )
    .unwrap();
    (cfg, weights)
}

#[test]
fn pytorch_fixtures_match() {
    let cases = cases();
    assert!(cases.len() >= 6, "fixtures missing: {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let (cfg, weights) = load(case.model().unwrap(), case.dtype);
        let model = ZImageTransformer::new(&cfg, &weights).unwrap();
        let inputs = case.inputs().unwrap();
        let caps = input(&inputs, "encoder_hidden_states").unwrap();
        let lens = input(&inputs, "caption_lens")
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        let captions: Vec<Tensor> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| caps.get(i).unwrap().narrow(0, 0, n as usize).unwrap())
            .collect();
        let patch = case.args["patch_size"].as_u64().unwrap() as usize;
        let out = model
            .forward_with_patch(
                input(&inputs, "hidden_states").unwrap(),
                input(&inputs, "timestep").unwrap(),
                &captions,
                (patch, 1),
            )
            .unwrap();
        let expected = case.expected().unwrap();
        let c = compare(
            &out,
            &expected["sample"],
            case.tolerance.atol,
            case.tolerance.rtol,
        )
        .unwrap();
        eprintln!(
            "{}: max_abs {:.3e} worst {:.4}",
            case.dir.display(),
            c.max_abs,
            c.worst
        );
        if !(c.max_abs.is_finite() && c.passes()) {
            failures.push(case.dir.display().to_string());
        }
    }
    assert!(failures.is_empty(), "cases over tolerance: {failures:?}");
}

/// `weight_shapes` lists exactly the checkpoint's tensors, with their shapes.
#[test]
fn weight_shapes_match_the_checkpoint() {
    let case = &cases()[0];
    let dir = case.model().unwrap();
    let cfg = ZImageConfig::from_file(dir).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let mut found: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let mut listed = weight_shapes(&cfg);
    found.sort();
    listed.sort();
    assert_eq!(listed, found);
}

#[test]
fn default_config_is_diffusers() {
    let cfg =
        ZImageConfig::from_json_str(r#"{"_class_name": "ZImageTransformer2DModel"}"#).unwrap();
    assert_eq!(cfg, ZImageConfig::default());
    assert_eq!(cfg.head_dim(), 128);
    assert_eq!(cfg.ffn_inner_dim(), 10240);
    assert_eq!(cfg.temb_dim(), 256);
}

#[test]
fn refuses_omni_and_bad_configs() {
    let omni = ZImageConfig::from_json_str(r#"{"siglip_feat_dim": 1152}"#);
    assert!(matches!(omni, Err(Error::Unsupported(_))), "{omni:?}");
    let heads = ZImageConfig::from_json_str(r#"{"axes_dims": [32, 48, 40]}"#);
    assert!(matches!(heads, Err(Error::InvalidConfig(_))), "{heads:?}");
    let patches = ZImageConfig::from_json_str(r#"{"all_f_patch_size": [1, 1]}"#);
    assert!(
        matches!(patches, Err(Error::InvalidConfig(_))),
        "{patches:?}"
    );
}

/// A config path that is not a regular file (here an endless device) is
/// refused before anything is read from it.
#[cfg(unix)]
#[test]
fn a_config_that_is_not_a_regular_file_is_refused_unread() {
    let r = ZImageConfig::from_file("/dev/zero");
    assert!(matches!(r, Err(Error::ConfigIo { .. })), "{r:?}");
}

#[test]
fn refuses_bad_inputs() {
    let case = &cases()[0];
    let (cfg, weights) = load(case.model().unwrap(), DType::F32);
    let model = ZImageTransformer::new(&cfg, &weights).unwrap();
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, cfg.in_channels, 4, 4), DType::F32, &dev).unwrap();
    let t = Tensor::zeros(2, DType::F32, &dev).unwrap();
    let cap = Tensor::zeros((3, cfg.cap_feat_dim), DType::F32, &dev).unwrap();
    // One caption for two images.
    let r = model.forward(&x, &t, std::slice::from_ref(&cap));
    assert!(matches!(r, Err(Error::InvalidInput { .. })), "{r:?}");
    // Several captions per item: the omni mode.
    let nested = Tensor::zeros((2, 3, cfg.cap_feat_dim), DType::F32, &dev).unwrap();
    let r = model.forward(&x, &t, &[nested.clone(), nested]);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    // An empty caption, a wrong width.
    let empty = Tensor::zeros((0, cfg.cap_feat_dim), DType::F32, &dev).unwrap();
    let r = model.forward(&x, &t, &[cap.clone(), empty]);
    assert!(matches!(r, Err(Error::InvalidInput { .. })), "{r:?}");
    // A patch size the config does not have.
    let r = model.forward_with_patch(&x, &t, &[cap.clone(), cap], (4, 1));
    assert!(matches!(r, Err(Error::InvalidInput { .. })), "{r:?}");
}
