//! `convert_transformer` on the committed tiny single-file fixtures: every
//! layout converted into every other and back holds identical weights, GGUF
//! files are quantised as ComfyUI-GGUF's convert.py lays them out, and a
//! failure leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use lumina2_loader::gguf::{dequantize, quantize, GgmlType, GgufFile};
use lumina2_loader::{
    convert_transformer, open_transformer_file, ConvertFormat, ConvertOptions, ConvertReport,
};
use lumina2_parity::{compare, Case};
use lumina2_transformer::{Config, Lumina2Transformer, WeightSource, Weights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformer")
        .join(name)
}

fn cfg() -> Config {
    Config::from_file(fixture("tiny_pth_f32").join("config/config.json")).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-convert-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts(format: ConvertFormat, quantize: Option<GgmlType>) -> ConvertOptions {
    ConvertOptions {
        format,
        quantize,
        config: Some(cfg()),
    }
}

fn run(src: &Path, dst: &Path, o: &ConvertOptions) -> ConvertReport {
    let mut calls = 0;
    let r = convert_transformer(src, dst, o, &mut |done, total| {
        assert!(done <= total);
        calls += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        calls,
        r.tensors + 1,
        "progress before each tensor and at the end"
    );
    r
}

/// Every weight of a checkpoint in diffusers' names, as f32 bits.
fn weights(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
    let src: Arc<dyn WeightSource> = if path.is_dir() {
        Arc::new(
            lumina2_transformer::weights::SafetensorsSource::open(&[
                path.join("diffusion_pytorch_model.safetensors")
            ])
            .unwrap(),
        )
    } else {
        open_transformer_file(path, &cfg()).unwrap()
    };
    src.keys()
        .into_iter()
        .map(|k| {
            let t = src.tensor(&k).unwrap().to_dtype(DType::F32).unwrap();
            let bits = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            (k, (t.dims().to_vec(), bits))
        })
        .collect()
}

#[test]
fn every_layout_round_trips_losslessly() {
    let d = tmp("rt");
    let comfy = fixture("tiny_comfyui_f32").join("lumina2_comfyui.safetensors");
    let reference = weights(&comfy);
    assert!(reference.len() > 20);

    let folder = d.join("diffusers");
    run(&comfy, &folder, &opts(ConvertFormat::Diffusers, None));
    assert!(folder.join("config.json").is_file());
    assert_eq!(
        Config::from_file(folder.join("config.json")).unwrap(),
        cfg()
    );
    assert_eq!(weights(&folder), reference);

    let original = d.join("original.safetensors");
    run(&folder, &original, &opts(ConvertFormat::Original, None));
    assert_eq!(weights(&original), reference);

    let gguf = d.join("f.gguf");
    let r = run(&original, &gguf, &opts(ConvertFormat::Gguf, None));
    assert_eq!(weights(&gguf), reference);
    assert!(r.by_type.keys().all(|t| t == "F32" || t == "BF16"), "{r:?}");
    let f = GgufFile::open(&gguf).unwrap();
    assert_eq!(
        f.metadata()["general.architecture"].as_str(),
        Some("lumina2")
    );
    assert_eq!(
        f.metadata()["general.quantization_version"].as_u64(),
        Some(2)
    );
    // Original key names, fused qkv, as ComfyUI-GGUF writes them.
    assert!(f.tensor_info("layers.0.attention.qkv.weight").is_ok());

    // And back to a folder from the GGUF file, and from the .pth original.
    let back = d.join("back");
    run(&gguf, &back, &opts(ConvertFormat::Diffusers, None));
    assert_eq!(weights(&back), reference);
    let pth = fixture("tiny_pth_f32").join("consolidated.00-of-01.pth");
    let from_pth = d.join("from_pth.safetensors");
    run(&pth, &from_pth, &opts(ConvertFormat::Original, None));
    assert_eq!(weights(&from_pth), weights(&pth));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn quantised_gguf_follows_comfyui_gguf_and_loads() {
    let d = tmp("q");
    let comfy = fixture("tiny_comfyui_f32").join("lumina2_comfyui.safetensors");
    let dense = open_transformer_file(&comfy, &cfg()).unwrap();
    for q in [GgmlType::Q8_0, GgmlType::Q4_K] {
        let out = d.join(format!("{q}.gguf"));
        let r = run(&comfy, &out, &opts(ConvertFormat::Gguf, Some(q)));
        let f = GgufFile::open(&out).unwrap();
        for t in f.tensor_infos() {
            let shape = t.shape();
            let n: usize = shape.iter().product();
            let want = if shape.len() == 1 || n <= 1024 {
                GgmlType::F32
            } else if shape[shape.len() - 1] % q.block_size() == 0 {
                q
            } else {
                GgmlType::F16
            };
            assert_eq!(t.ggml_type, want, "{} {shape:?}", t.name);
        }
        // Quantised tensors hold exactly our quantisation of the dense weights.
        let mut quantised = 0;
        for t in f.tensor_infos().iter().filter(|t| t.ggml_type == q) {
            let src = fixture("tiny_comfyui_f32").join("lumina2_comfyui.safetensors");
            let raw = lumina2_transformer::weights::SafetensorsSource::open(&[src]).unwrap();
            let x: Vec<f32> = raw
                .tensor(&format!("model.diffusion_model.{}", t.name))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(f.tensor_data(&t.name).unwrap(), quantize(q, &x).unwrap());
            let y = dequantize(q, f.tensor_data(&t.name).unwrap(), x.len()).unwrap();
            assert_eq!(y, f.dequantize(&t.name).unwrap());
            quantised += 1;
        }
        assert_eq!(
            r.by_type.get(&q.to_string()).copied().unwrap_or(0),
            quantised
        );
        // Our loader reads the file and the model runs; weights are close to dense.
        let loaded = open_transformer_file(&out, &cfg()).unwrap();
        assert_eq!(loaded.keys(), dense.keys());
        let model =
            Lumina2Transformer::new(&cfg(), &Weights::new(loaded, DType::F32, &Device::Cpu))
                .unwrap();
        let case = Case::load(&fixture("tiny_comfyui_f32")).unwrap();
        let i = case.inputs().unwrap();
        let out = model
            .forward(
                &i["hidden_states"],
                &i["timestep"],
                &i["encoder_hidden_states"],
                &i["encoder_attention_mask"],
            )
            .unwrap();
        let c = compare(&out, &case.expected().unwrap()["sample"], 0.0, 0.0).unwrap();
        assert!(c.rel_rms.is_finite() && c.rel_rms < 0.2, "{q}: {c:?}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_failure_mid_way_leaves_nothing_and_keeps_the_old_file() {
    let d = tmp("fail");
    let comfy = fixture("tiny_comfyui_f32").join("lumina2_comfyui.safetensors");
    for (name, format) in [
        ("x.gguf", ConvertFormat::Gguf),
        ("x.safetensors", ConvertFormat::Original),
    ] {
        let dst = d.join(name);
        std::fs::write(&dst, b"previous").unwrap();
        let e = convert_transformer(&comfy, &dst, &opts(format, None), &mut |done, _| {
            if done == 5 {
                Err("interrupted".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("interrupted"), "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"previous");
    }
    // A new folder that failed is removed.
    let folder = d.join("new_folder");
    convert_transformer(
        &comfy,
        &folder,
        &opts(ConvertFormat::Diffusers, None),
        &mut |done, _| {
            if done == 3 {
                Err("interrupted".into())
            } else {
                Ok(())
            }
        },
    )
    .unwrap_err();
    assert!(!folder.exists());
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "only the two previous files: {left:?}");
    // Options that do not fit, and a source that is not a transformer.
    let e = convert_transformer(
        &comfy,
        &d.join("y.safetensors"),
        &opts(ConvertFormat::Original, Some(GgmlType::Q8_0)),
        &mut |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("GGUF"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The original single file through a diffusers folder and back: the same
/// keys (but `norm_final.weight`, which the model does not use and
/// diffusers drops), dtypes, shapes and bytes.
#[test]
fn the_original_file_through_diffusers_and_back_is_lossless() {
    let d = tmp("orig-rt");
    let comfy = fixture("tiny_comfyui_f32").join("lumina2_comfyui.safetensors");
    let original = d.join("original.safetensors");
    run(&comfy, &original, &opts(ConvertFormat::Original, None));
    let folder = d.join("diffusers");
    run(&original, &folder, &opts(ConvertFormat::Diffusers, None));
    let back = d.join("back.safetensors");
    run(&folder, &back, &opts(ConvertFormat::Original, None));
    let raw = |p: &Path| -> BTreeMap<String, (DType, Vec<usize>, Vec<u8>)> {
        candle_core::safetensors::load(p, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                // Widened to f32 (exact) with the stored type kept beside.
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
                (k, (t.dtype(), t.dims().to_vec(), bytes))
            })
            .collect()
    };
    let mut want = raw(&original);
    let got = raw(&back);
    want.remove("norm_final.weight");
    assert!(want.keys().any(|k| k.ends_with("attention.qkv.weight")));
    assert_eq!(got, want);
    std::fs::remove_dir_all(&d).unwrap();
}
