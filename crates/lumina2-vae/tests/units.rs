//! Unit tests of pieces whose expected values come from math.

use candle_core::{Device, Tensor};

/// A stride-2 convolution equals the stride-1 convolution sampled at even
/// positions (checks the convolution our downsampling relies on).
#[test]
fn stride_two_conv_is_subsampled_stride_one_conv() {
    let d = Device::Cpu;
    for (c, h, w) in [(2usize, 5usize, 5usize), (8, 25, 21), (16, 7, 4)] {
        let x = Tensor::randn(0f32, 1., (1, c, h, w), &d).unwrap();
        let k = Tensor::randn(0f32, 1., (c, c, 3, 3), &d).unwrap();
        let a = x.conv2d(&k, 0, 2, 1, 1).unwrap();
        let b = x.conv2d(&k, 0, 1, 1, 1).unwrap();
        let (_, _, bh, bw) = b.dims4().unwrap();
        let ih = Tensor::arange_step(0u32, bh as u32, 2, &d).unwrap();
        let iw = Tensor::arange_step(0u32, bw as u32, 2, &d).unwrap();
        let b2 = b
            .index_select(&ih, 2)
            .unwrap()
            .index_select(&iw, 3)
            .unwrap();
        let diff: f32 = (a - b2)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        eprintln!("{c} {h} {w}: {diff}");
        assert!(diff < 1e-4);
    }
}

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::DType;
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig, VaeError, Weights};
use lumina2_weights::Error as WeightError;

const LUMINA_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0",
  "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true, "in_channels": 3, "latent_channels": 16, "latents_mean": null, "latents_std": null,
  "layers_per_block": 2, "mid_block_add_attention": true, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "use_post_quant_conv": false, "use_quant_conv": false, "some_future_key": 1
}"#;

#[test]
fn flux_config_parses_with_unknown_keys_and_defaults() {
    let cfg = AutoencoderKLConfig::from_json(LUMINA_VAE_CONFIG).unwrap();
    assert_eq!(cfg, AutoencoderKLConfig::flux());
    let tiling = lumina2_vae::Tiling::from_config(&cfg);
    assert_eq!((tiling.sample_tile, tiling.latent_tile), (1024, 128));
    let d = AutoencoderKLConfig::from_json(r#"{"sample_size": [64, 64]}"#).unwrap();
    assert_eq!(d.sample_size, 64);
    assert_eq!(d.scaling_factor, 0.18215);
    assert!(d.use_quant_conv && d.shift_factor.is_none());
    assert!(matches!(
        AutoencoderKLConfig::from_json(r#"{"down_block_types": ["CrossAttnDownBlock2D"]}"#),
        Err(VaeError::Config(_))
    ));
}

#[test]
fn absurd_config_numbers_are_refused_with_the_limit() {
    let seventy = format!(
        r#"{{"block_out_channels": [{c}], "down_block_types": [{d}], "up_block_types": [{u}]}}"#,
        c = vec!["32"; 70].join(","),
        d = vec!["\"DownEncoderBlock2D\""; 70].join(","),
        u = vec!["\"UpDecoderBlock2D\""; 70].join(","),
    );
    for (json, culprit) in [
        (seventy.as_str(), "resolution levels"),
        (r#"{"in_channels": 4611686018427387904}"#, "in_channels"),
        (
            r#"{"latent_channels": 4611686018427387904}"#,
            "latent_channels",
        ),
        (r#"{"layers_per_block": 100000000}"#, "layers_per_block"),
        (
            r#"{"block_out_channels": [4294967296]}"#,
            "block_out_channels",
        ),
        (r#"{"sample_size": 18446744073709551615}"#, "sample_size"),
        (
            r#"{"block_out_channels": [16384], "layers_per_block": 64}"#,
            "convolution weights",
        ),
    ] {
        match AutoencoderKLConfig::from_json(json) {
            Err(VaeError::Config(m)) => {
                assert!(m.contains(culprit) && m.contains("limit"), "{json}: {m}")
            }
            other => panic!("{json}: {other:?}"),
        }
    }
}

fn tiny() -> (AutoencoderKLConfig, HashMap<String, Tensor>) {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae_decode/tiny_f32/model");
    let cfg = AutoencoderKLConfig::from_file(&dir).unwrap();
    let w = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (cfg, w)
}

#[test]
fn weight_errors_name_the_key_and_shapes() {
    let (cfg, mut w) = tiny();
    let key = "decoder.mid_block.attentions.0.to_q.weight";
    let orig = w.remove(key).unwrap();
    let err = AutoencoderKL::new(
        &cfg,
        &Weights::from_tensors(w.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap_err();
    assert!(
        matches!(&err, VaeError::Weight(WeightError::MissingWeight { key: k, .. }) if k == key),
        "{err}"
    );
    w.insert(key.to_string(), orig.reshape((8, 32)).unwrap());
    let err =
        AutoencoderKL::new(&cfg, &Weights::from_tensors(w, DType::F32, &Device::Cpu)).unwrap_err();
    match err {
        VaeError::Weight(WeightError::WeightShape {
            key: k,
            expected,
            found,
            ..
        }) => {
            assert_eq!(
                (k.as_str(), expected, found),
                (key, vec![16, 16], vec![8, 32])
            );
        }
        other => panic!("{other}"),
    }
}

/// A VAE file whose tensors are declared far larger than the config needs
/// (a sparse file: the bytes are "there" but cost no disk), or that holds a
/// huge tensor the model does not use: the shapes are compared from the
/// header, nothing of the huge tensors is read.
#[test]
fn declared_shapes_are_checked_before_reading_and_unused_tensors_never_read() {
    let (cfg, w) = tiny();
    let dir = std::env::temp_dir().join(format!("lumina2-vae-sparse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 2^31 f32 values: 8 GiB declared.
    let huge: usize = 1 << 31;
    for (case, replaced) in [("wrong_shape", true), ("unused", false)] {
        let mut entries: Vec<(String, String, Vec<usize>, usize)> = w
            .iter()
            .filter(|(k, _)| !(replaced && k.as_str() == "decoder.conv_in.weight"))
            .map(|(k, t)| {
                (
                    k.clone(),
                    "F32".to_string(),
                    t.dims().to_vec(),
                    t.elem_count() * 4,
                )
            })
            .collect();
        let big_key = if replaced {
            "decoder.conv_in.weight"
        } else {
            "decoder.not_a_module.weight"
        };
        entries.push((big_key.to_string(), "F32".into(), vec![huge], huge * 4));
        entries.sort();
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (k, dt, shape, len) in &entries {
            header.insert(
                k.clone(),
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        let path = dir.join(format!("{case}.safetensors"));
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
            f.write_all(&header).unwrap();
            let data_start = 8 + header.len() as u64;
            let mut at = 0u64;
            for (k, _, _, len) in &entries {
                if let Some(t) = w.get(k).filter(|_| k != big_key) {
                    let bytes: Vec<u8> = t
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    f.seek(SeekFrom::Start(data_start + at)).unwrap();
                    f.write_all(&bytes).unwrap();
                }
                at += *len as u64;
            }
            // The huge tensor's bytes are a hole.
            f.set_len(data_start + at).unwrap();
        }
        let weights = Weights::from_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap();
        let result = AutoencoderKL::new(&cfg, &weights);
        if replaced {
            match result {
                Err(VaeError::Weight(WeightError::WeightShape {
                    key,
                    found,
                    source_name,
                    ..
                })) => {
                    assert_eq!(
                        (key.as_str(), found),
                        ("decoder.conv_in.weight", vec![huge])
                    );
                    assert!(
                        source_name.contains("wrong_shape.safetensors"),
                        "{source_name}"
                    );
                }
                other => panic!("{other:?}"),
            }
        } else {
            assert!(result.is_ok(), "{:?}", result.err());
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (cfg, w) = tiny();
    let dev = Device::Cpu;
    let vae = AutoencoderKL::new(&cfg, &Weights::from_tensors(w, DType::F32, &dev)).unwrap();
    let bad = [
        Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap(), // 3 latent channels, not 4
        Tensor::zeros((4, 4, 4), DType::F32, &dev).unwrap(),    // rank 3
        Tensor::zeros((1, 4, 0, 4), DType::F32, &dev).unwrap(), // empty
        Tensor::zeros((1, 4, 4, 4), DType::U32, &dev).unwrap(), // integers
    ];
    for z in &bad {
        assert!(
            matches!(vae.decode(z), Err(VaeError::Input { .. })),
            "{:?}",
            z.dims()
        );
    }
    // 1x1 latents decode; a 3x3 image is too small for two downsamplings.
    let img = vae
        .decode(&Tensor::zeros((1, 4, 1, 1), DType::F32, &dev).unwrap())
        .unwrap();
    assert_eq!(img.dims(), &[1, 3, 4, 4]);
    let small = Tensor::zeros((1, 3, 3, 3), DType::F32, &dev).unwrap();
    assert!(matches!(vae.encode(&small), Err(VaeError::Input { .. })));
    let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
    let d = vae.encode(&x).unwrap();
    let noise = Tensor::zeros((1, 4, 3, 3), DType::F32, &dev).unwrap();
    assert!(matches!(d.sample(&noise), Err(VaeError::Input { .. })));
    // Sampling: mean + exp(logvar / 2) * noise.
    let noise = Tensor::ones(d.mean.dims(), DType::F32, &dev).unwrap();
    let s = d.sample(&noise).unwrap();
    let want = (&d.mean + (&d.logvar * 0.5).unwrap().exp().unwrap()).unwrap();
    let diff: f32 = (s - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn latent_transform_is_the_pipelines() {
    let (_, w) = tiny();
    let dev = Device::Cpu;
    let cfg = AutoencoderKLConfig::from_json(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/vae_decode/tiny_f32/model/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let vae = AutoencoderKL::new(&cfg, &Weights::from_tensors(w, DType::F32, &dev)).unwrap();
    let vals = [-2.0f32, -0.3, 0.0, 0.7, 1.9];
    let x = Tensor::new(&vals, &dev).unwrap();
    let u = vae.unscale_latents(&x).unwrap().to_vec1::<f32>().unwrap();
    let (s, sh) = (cfg.scaling_factor as f32, cfg.shift_factor.unwrap() as f32);
    for (v, got) in vals.iter().zip(&u) {
        assert_eq!(*got, v / s + sh);
    }
    let back = vae
        .scale_latents(&Tensor::new(u.as_slice(), &dev).unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (v, got) in u.iter().zip(&back) {
        assert_eq!(*got, (v - sh) * s);
    }
}

#[test]
fn rgb_postprocessing_is_vae_image_processors() {
    let dev = Device::Cpu;
    // x -> (x / 2 + 0.5).clamp(0, 1) * 255, rounded half to even:
    // -3 -> 0, -1 -> 0, 0 -> 127.5 -> 128, 1 -> 255, 3 -> 255, 0.5 -> 191.25 -> 191.
    let vals = [-3f32, -1., 0., 1., 3., 0.5];
    let want = [0u8, 0, 128, 255, 255, 191];
    // [1, 3, 1, 2]: channel c of pixel p is vals[2c + p].
    let t = Tensor::new(&vals, &dev)
        .unwrap()
        .reshape((1, 3, 1, 2))
        .unwrap();
    let imgs = lumina2_vae::image::to_rgb_images(&t).unwrap();
    assert_eq!(imgs.len(), 1);
    for p in 0..2u32 {
        let px = imgs[0].get_pixel(p, 0).0;
        for c in 0..3 {
            assert_eq!(px[c], want[2 * c + p as usize]);
        }
    }
    assert_eq!(lumina2_vae::image::to_u8(0.5), 128); // 127.5 -> even
    assert_eq!(lumina2_vae::image::to_u8(f32::NAN), 0);
    assert!(lumina2_vae::image::to_rgb_images(
        &Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap()
    )
    .is_err());
}

#[test]
fn blending_is_linear_over_the_extent() {
    let dev = Device::Cpu;
    let a = Tensor::ones((1, 1, 6, 5), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((1, 1, 6, 5), DType::F32, &dev).unwrap();
    let v = lumina2_vae::tiling::blend_v(&a, &b, 4).unwrap();
    let col: Vec<f32> = v
        .narrow(3, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(col, vec![1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    let h = lumina2_vae::tiling::blend_h(&a, &b, 8).unwrap(); // extent clamped to 5
    let row: Vec<f32> = h
        .narrow(2, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(row, vec![1.0, 0.8, 0.6, 0.4, 0.2]);
}
