//! ComfyUI's files (written by xtask/parity/gen_comfy.py from the committed
//! tiny pipeline): the all-in-one checkpoint, and the split text encoder and
//! VAE files, give the same pixels as the diffusers folder they were made
//! from; broken variants of each are refused with errors naming the file and
//! the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lumina2_pipeline::{
    Control, GenerateOptions, Lumina2Pipeline, Noise, PipelineSources, TransformerSource,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn folder() -> PathBuf {
    fixtures().join("pipeline/seed_cfg/pipeline")
}

fn comfy(name: &str) -> PathBuf {
    fixtures().join("comfy").join(name)
}

fn options() -> GenerateOptions {
    let mut o = GenerateOptions::new("a red fox in the snow");
    o.width = Some(48);
    o.height = Some(32);
    o.num_inference_steps = 3;
    o.max_sequence_length = 32;
    o.noise = Noise::Seed(42);
    o
}

fn pixels(sources: PipelineSources) -> Vec<f32> {
    let mut pipe = Lumina2Pipeline::builder(sources).build().unwrap();
    let out = pipe
        .generate(&options(), &mut |_| Control::Continue)
        .unwrap();
    out.images
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The tiny model's configs and tokenizer come from the folder: the
/// checkpoint's own (Lumina-Image 2.0's) would not describe it.
fn with_tiny_configs(mut s: PipelineSources) -> PipelineSources {
    let f = folder();
    if let TransformerSource::File { config, .. } = &mut s.transformer {
        *config = Some(f.join("transformer"));
    }
    s.text_encoder_config = Some(f.join("text_encoder"));
    s.vae_config = Some(f.join("vae"));
    s.tokenizer = f.join("tokenizer");
    s.scheduler_config = Some(f.join("scheduler/scheduler_config.json"));
    s
}

#[test]
fn the_all_in_one_checkpoint_gives_the_folders_pixels() {
    let reference = pixels(PipelineSources::from_pipeline_folder(folder()).unwrap());
    let sources = PipelineSources::from_checkpoint(comfy("lumina_2.safetensors")).unwrap();
    assert_eq!(sources.scheduler_config, None, "the checkpoint has none");
    let got = pixels(with_tiny_configs(sources));
    assert!(reference.iter().any(|&v| v != reference[0]));
    assert_eq!(got, reference);
}

/// The checkpoint's own tokenizer (its `spiece_model`, a SentencePiece BPE
/// model of the tiny pipeline's vocabulary) tokenises as the folder's
/// tokenizer.json: the same pixels with nothing taken from the folder but
/// the tiny configs.
#[test]
fn the_all_in_one_checkpoint_with_its_embedded_tokenizer_gives_the_folders_pixels() {
    let reference = pixels(PipelineSources::from_pipeline_folder(folder()).unwrap());
    let mut s =
        with_tiny_configs(PipelineSources::from_checkpoint(comfy("lumina_2.safetensors")).unwrap());
    s.tokenizer = comfy("lumina_2.safetensors");
    assert_eq!(pixels(s), reference);
}

#[test]
fn the_split_files_give_the_folders_pixels() {
    let reference = pixels(PipelineSources::from_pipeline_folder(folder()).unwrap());
    let mut s = PipelineSources::from_pipeline_folder(folder()).unwrap();
    s.text_encoder = comfy("gemma_2_2b_fp16.safetensors");
    s.text_encoder_config = Some(folder().join("text_encoder"));
    s.vae = comfy("ae.safetensors");
    s.vae_config = Some(folder().join("vae"));
    assert_eq!(pixels(s), reference);
}

#[test]
fn single_files_alone_take_lumina2_configs_with_their_sizes() {
    // No config given: the real model's, sizes from the tensors. The tiny
    // transformer's head width (8) is not the real one's RoPE split (96),
    // so it asks for its config; the VAE's sizes are read back.
    let file = lumina2_loader::SingleFile::open(comfy("ae.safetensors")).unwrap();
    assert_eq!(file.layout(), lumina2_loader::SingleFileLayout::BflVae);
    let cfg = file.flux_vae_config().unwrap();
    assert_eq!(cfg.block_out_channels, vec![8, 8, 16, 16]);
    assert_eq!(cfg.layers_per_block, 1);
    assert_eq!(cfg.latent_channels, 4);
    assert_eq!(
        (cfg.scaling_factor, cfg.shift_factor),
        (0.3611, Some(0.1159))
    );
    assert!(!cfg.use_quant_conv && !cfg.use_post_quant_conv);

    let s = PipelineSources::from_checkpoint(comfy("lumina_2.safetensors")).unwrap();
    let err = s.transformer.config().unwrap_err().to_string();
    assert!(
        err.contains("head width 8") && err.contains("config.json"),
        "{err}"
    );
    assert!(err.contains("lumina_2.safetensors"), "{err}");

    let te = lumina2_loader::SingleFile::open(comfy("gemma_2_2b_fp16.safetensors"))
        .unwrap()
        .text_encoder()
        .unwrap();
    // 16 query rows are not a whole number of Gemma-2's 256-wide heads.
    let err = te.config().unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight"),
        "{err}"
    );
    let spiece = te.spiece_model().unwrap().unwrap();
    assert!(spiece.len() > 1000);
}

// ---- hostile variants --------------------------------------------------

fn read_all(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn write(name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lumina2-comfy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    candle_core::safetensors::save(tensors, &p).unwrap();
    p
}

fn load_error(sources: PipelineSources) -> String {
    let mut pipe = match Lumina2Pipeline::builder(sources).build() {
        Ok(p) => p,
        Err(e) => return e.to_string(),
    };
    match pipe.generate(&options(), &mut |_| Control::Continue) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

fn checkpoint_sources(path: &Path) -> PipelineSources {
    let mut s = with_tiny_configs(PipelineSources::from_checkpoint(path).unwrap());
    s.tokenizer = folder().join("tokenizer");
    s
}

#[test]
fn a_checkpoint_missing_a_part_is_refused_naming_it() {
    for (part, marker) in [
        ("vae.", "vae.encoder.down.0.block.0.conv1.weight"),
        (
            "text_encoders.gemma2_2b.transformer.",
            "text_encoders.gemma2_2b.transformer.model.embed_tokens.weight",
        ),
    ] {
        let mut t = read_all(&comfy("lumina_2.safetensors"));
        t.retain(|k, _| !k.starts_with(part));
        let p = write("no_part.safetensors", &t);
        let err = load_error(checkpoint_sources(&p));
        assert!(
            err.contains(marker) && err.contains("no_part.safetensors"),
            "{err}"
        );
    }
}

#[test]
fn stray_or_misprefixed_keys_are_refused_naming_them() {
    let mut t = read_all(&comfy("lumina_2.safetensors"));
    let v = t.remove("vae.decoder.conv_in.weight").unwrap();
    t.insert("first_stage_model.decoder.conv_in.weight".into(), v);
    let p = write("stray.safetensors", &t);
    let err = load_error(checkpoint_sources(&p));
    assert!(
        err.contains("first_stage_model.decoder.conv_in.weight")
            && err.contains("stray.safetensors"),
        "{err}"
    );

    // A VAE file with a key outside the BFL layout.
    let mut t = read_all(&comfy("ae.safetensors"));
    let v = t.remove("decoder.mid.attn_1.q.weight").unwrap();
    t.insert("decoder.mid.attn_1.query.weight".into(), v);
    let p = write("ae_bad_key.safetensors", &t);
    let err = lumina2_loader::SingleFile::open(&p)
        .unwrap()
        .vae()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("decoder.mid.attn_1.query.weight"), "{err}");
}

#[test]
fn wrong_shapes_are_refused_naming_the_key() {
    let mut s = PipelineSources::from_pipeline_folder(folder()).unwrap();
    let mut t = read_all(&comfy("gemma_2_2b_fp16.safetensors"));
    t.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        Tensor::zeros((31, 16), DType::F16, &Device::Cpu).unwrap(),
    );
    s.text_encoder = write("te_shape.safetensors", &t);
    s.text_encoder_config = Some(folder().join("text_encoder"));
    let err = load_error(s);
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("te_shape.safetensors"),
        "{err}"
    );

    let mut s = PipelineSources::from_pipeline_folder(folder()).unwrap();
    let mut t = read_all(&comfy("ae.safetensors"));
    t.insert(
        "decoder.mid.attn_1.k.weight".into(),
        Tensor::zeros((16, 8, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    s.vae = write("ae_shape.safetensors", &t);
    s.vae_config = Some(folder().join("vae"));
    let err = load_error(s);
    assert!(err.contains("to_k") || err.contains("attn_1.k"), "{err}");
    assert!(err.contains("ae_shape.safetensors"), "{err}");
}

#[test]
fn a_broken_or_absent_tokenizer_is_refused_naming_the_file() {
    let te = |t: &HashMap<String, Tensor>, name: &str| {
        let p = write(name, t);
        lumina2_loader::SingleFile::open(&p)
            .unwrap()
            .text_encoder()
            .unwrap()
            .spiece_model()
    };
    let base = read_all(&comfy("gemma_2_2b_fp16.safetensors"));

    let mut t = base.clone();
    t.insert(
        "spiece_model".into(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = te(&t, "spiece_f32.safetensors").unwrap_err().to_string();
    assert!(
        err.contains("spiece_model") && err.contains("spiece_f32.safetensors"),
        "{err}"
    );

    let mut t = base.clone();
    t.insert(
        "spiece_model".into(),
        Tensor::zeros(0, DType::U8, &Device::Cpu).unwrap(),
    );
    let err = te(&t, "spiece_empty.safetensors").unwrap_err().to_string();
    assert!(err.contains("0 bytes"), "{err}");

    // No tokenizer at all: asked for.
    let mut t = base.clone();
    t.remove("spiece_model");
    assert!(te(&t, "no_spiece.safetensors").unwrap().is_none());
    let mut s = PipelineSources::from_pipeline_folder(folder()).unwrap();
    s.text_encoder = write("no_spiece2.safetensors", &t);
    s.text_encoder_config = Some(folder().join("text_encoder"));
    s.tokenizer = s.text_encoder.clone();
    let err = load_error(s);
    assert!(
        err.contains("--tokenizer") && err.contains("no_spiece2.safetensors"),
        "{err}"
    );
}

// ---- writing ComfyUI files (`lumina2 convert --format comfy|comfy-split`) --

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-comfy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every tensor of two sources: same keys, dtypes, shapes and bits.
fn assert_same_tensors(
    a: &dyn lumina2_weights::WeightSource,
    b: &dyn lumina2_weights::WeightSource,
    what: &str,
) {
    let ka = a.keys();
    assert_eq!(ka, b.keys(), "{what}: keys");
    assert!(!ka.is_empty(), "{what}");
    for k in ka {
        let (x, y) = (a.tensor(&k).unwrap(), b.tensor(&k).unwrap());
        assert_eq!((x.dtype(), x.dims()), (y.dtype(), y.dims()), "{what}: {k}");
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            v.iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(&x), bits(&y), "{what}: {k}");
    }
}

fn folder_source(component: &str, file: &str) -> lumina2_weights::SafetensorsSource {
    lumina2_weights::SafetensorsSource::open(&[folder().join(component).join(file)]).unwrap()
}

fn transformer_config() -> lumina2_transformer::Config {
    lumina2_transformer::Config::from_file(folder().join("transformer/config.json")).unwrap()
}

/// The folder's three models, in diffusers' and transformers' names, against
/// those read from ComfyUI files.
fn assert_folder_tensors(transformer: &Path, text_encoder: &Path, vae: &Path) {
    let t = lumina2_loader::open_transformer_file(transformer, &transformer_config()).unwrap();
    assert_same_tensors(
        &folder_source("transformer", "diffusion_pytorch_model.safetensors"),
        t.as_ref(),
        "transformer",
    );
    // transformers' Gemma2Model keys have no `model.`; ComfyUI's do.
    let te = lumina2_loader::SingleFile::open(text_encoder)
        .unwrap()
        .text_encoder()
        .unwrap();
    let src = folder_source("text_encoder", "model.safetensors");
    let prefixed: HashMap<String, Tensor> = lumina2_weights::WeightSource::keys(&src)
        .into_iter()
        .map(|k| {
            let t = lumina2_weights::WeightSource::tensor(&src, &k).unwrap();
            (format!("model.{k}"), t)
        })
        .collect();
    let mut te_keys = te.weights().keys();
    te_keys.retain(|k| k != "spiece_model");
    let ours: HashMap<String, Tensor> = te_keys
        .into_iter()
        .map(|k| {
            let t = te.weights().tensor(&k).unwrap();
            (k, t)
        })
        .collect();
    assert_same_tensors(&prefixed, &ours, "text encoder");
    let v = lumina2_loader::SingleFile::open(vae)
        .unwrap()
        .vae()
        .unwrap();
    assert_same_tensors(
        &folder_source("vae", "diffusion_pytorch_model.safetensors"),
        v.as_ref(),
        "vae",
    );
}

#[test]
fn a_folder_converted_to_an_all_in_one_checkpoint_loads_back_identical() {
    use lumina2_loader::{convert_to_comfy, ComfyFormat, PipelineParts};
    let d = out_dir("aio");
    let ckpt = d.join("lumina_2.safetensors");
    let parts = PipelineParts::from_source(&folder()).unwrap();
    // The tiny folder's tokenizer is a tokenizer.json, not a SentencePiece model.
    assert_eq!(parts.tokenizer, None);
    let mut calls = 0;
    let r = convert_to_comfy(&parts, &ckpt, ComfyFormat::AllInOne, &mut |done, total| {
        assert!(done <= total);
        calls += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, r.tensors + 1);
    assert_eq!(r.files, vec![ckpt.clone()]);
    assert!(r.notes.iter().any(|n| n.contains("spiece_model")), "{r:?}");
    let file = lumina2_loader::SingleFile::open(&ckpt).unwrap();
    assert_eq!(file.layout(), lumina2_loader::SingleFileLayout::Checkpoint);
    assert!(file.stray_checkpoint_keys().is_empty());
    let logit = lumina2_weights::WeightSource::tensor(
        file.source().as_ref(),
        "text_encoders.gemma2_2b.logit_scale",
    )
    .unwrap();
    assert_eq!(logit.dtype(), DType::F32);
    assert_eq!(logit.to_scalar::<f32>().unwrap(), 4.6055);
    assert_folder_tensors(&ckpt, &ckpt, &ckpt);

    let reference = pixels(PipelineSources::from_pipeline_folder(folder()).unwrap());
    let got = pixels(with_tiny_configs(
        PipelineSources::from_checkpoint(&ckpt).unwrap(),
    ));
    assert_eq!(got, reference);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_folder_converted_to_split_files_loads_back_identical() {
    use lumina2_loader::comfy_write::SPLIT_FILES;
    use lumina2_loader::{convert_to_comfy, ComfyFormat, PipelineParts};
    let d = out_dir("split");
    let out = d.join("models");
    let parts = PipelineParts::from_source(&folder()).unwrap();
    let r = convert_to_comfy(&parts, &out, ComfyFormat::Split, &mut |_, _| Ok(())).unwrap();
    let [t, te, vae] = SPLIT_FILES.map(|f| out.join(f));
    assert_eq!(r.files, vec![t.clone(), te.clone(), vae.clone()]);
    use lumina2_loader::SingleFileLayout as L;
    for (f, layout) in [
        (
            &t,
            L::Transformer(lumina2_loader::TransformerLayout::Original),
        ),
        (&te, L::TextEncoder),
        (&vae, L::BflVae),
    ] {
        assert_eq!(
            lumina2_loader::SingleFile::open(f).unwrap().layout(),
            layout
        );
    }
    // The Flux VAE has no quant convs, and the BFL file none either.
    let ae = lumina2_loader::SingleFile::open(&vae).unwrap();
    assert!(!ae.flux_vae_config().unwrap().use_quant_conv);
    assert_folder_tensors(&t, &te, &vae);

    let reference = pixels(PipelineSources::from_pipeline_folder(folder()).unwrap());
    let mut s = PipelineSources::from_pipeline_folder(folder()).unwrap();
    s.transformer = TransformerSource::File {
        path: t,
        config: Some(folder().join("transformer")),
    };
    s.text_encoder = te;
    s.text_encoder_config = Some(folder().join("text_encoder"));
    s.vae = vae;
    s.vae_config = Some(folder().join("vae"));
    assert_eq!(pixels(s), reference);
    std::fs::remove_dir_all(&d).unwrap();
}

/// ComfyUI's checkpoint converted again gives back its own tensors, the
/// embedded tokenizer included, bit for bit (the logit scale is written as
/// ComfyUI initialises it, f32); and the split files made from it carry
/// the tokenizer too.
#[test]
fn a_comfyui_checkpoint_converts_to_itself_and_to_split_files() {
    use lumina2_loader::comfy_write::SPLIT_FILES;
    use lumina2_loader::{convert_to_comfy, ComfyFormat, PipelineParts};
    let d = out_dir("self");
    let src = comfy("lumina_2.safetensors");
    let parts = PipelineParts::from_source(&src).unwrap();
    let ckpt = d.join("again.safetensors");
    let r = convert_to_comfy(&parts, &ckpt, ComfyFormat::AllInOne, &mut |_, _| Ok(())).unwrap();
    assert!(r.notes.is_empty(), "{r:?}");
    let mut want = read_all(&src);
    let mut got = read_all(&ckpt);
    let logit = "text_encoders.gemma2_2b.logit_scale";
    assert_eq!(got.remove(logit).unwrap().dtype(), DType::F32);
    want.remove(logit);
    assert_same_tensors(&want, &got, "checkpoint");
    let spiece = |m: &HashMap<String, Tensor>, k: &str| m[k].to_vec1::<u8>().unwrap();
    assert_eq!(
        spiece(&got, "text_encoders.spiece_model"),
        spiece(&want, "text_encoders.spiece_model")
    );

    let out = d.join("split");
    convert_to_comfy(&parts, &out, ComfyFormat::Split, &mut |_, _| Ok(())).unwrap();
    let te = read_all(&out.join(SPLIT_FILES[1]));
    assert_eq!(
        spiece(&te, "spiece_model"),
        spiece(&want, "text_encoders.spiece_model")
    );
    // The VAE file as ComfyUI's ae.safetensors (there f32, here the
    // checkpoint's f16: the same values).
    let ae = read_all(&out.join(SPLIT_FILES[2]));
    let fixture_ae: HashMap<String, Tensor> = read_all(&comfy("ae.safetensors"))
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    assert_same_tensors(&fixture_ae, &ae, "ae.safetensors");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_failed_comfy_conversion_leaves_nothing() {
    use lumina2_loader::{convert_to_comfy, ComfyFormat, PipelineParts};
    let d = out_dir("fail");
    let parts = PipelineParts::from_source(&folder()).unwrap();
    let ckpt = d.join("old.safetensors");
    std::fs::write(&ckpt, b"previous").unwrap();
    let stop = |at: usize| {
        move |done: usize, _: usize| {
            if done == at {
                Err("interrupted".to_string())
            } else {
                Ok(())
            }
        }
    };
    let e = convert_to_comfy(&parts, &ckpt, ComfyFormat::AllInOne, &mut stop(40)).unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), b"previous");
    // Split: interrupted in the VAE, the last file, after the other two
    // were complete: none is put in place, no folder is left.
    let n = convert_to_comfy(&parts, &d.join("probe"), ComfyFormat::Split, &mut |_, _| {
        Ok(())
    })
    .unwrap()
    .tensors;
    std::fs::remove_dir_all(d.join("probe")).unwrap();
    let out = d.join("models");
    let e = convert_to_comfy(&parts, &out, ComfyFormat::Split, &mut stop(n - 2)).unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert!(!out.exists());
    // A VAE that is not one: refused before anything is written.
    let mut bad = parts.clone();
    bad.vae = folder().join("text_encoder");
    let e = convert_to_comfy(&bad, &out, ComfyFormat::Split, &mut |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("text_encoder"), "{e}");
    assert!(!out.exists());
    let mut left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, vec![std::ffi::OsString::from("old.safetensors")]);
    std::fs::remove_dir_all(&d).unwrap();
}

// ---- ComfyUI files to a diffusers pipeline folder
// (`lumina2 convert --format diffusers-pipeline`) ----------------------------

/// The tiny folder as a ComfyUI all-in-one checkpoint with a SentencePiece
/// tokenizer (the committed checkpoint's `spiece_model`, the tiny
/// vocabulary), written by `convert_to_comfy`.
fn all_in_one_from_folder(d: &Path) -> PathBuf {
    use lumina2_loader::{convert_to_comfy, ComfyFormat, PipelineParts};
    let ckpt = d.join("lumina_2.safetensors");
    let mut parts = PipelineParts::from_source(&folder()).unwrap();
    parts.tokenizer = Some(comfy("lumina_2.safetensors"));
    convert_to_comfy(&parts, &ckpt, ComfyFormat::AllInOne, &mut |_, _| Ok(())).unwrap();
    ckpt
}

/// The tiny model's configs (its sizes are not the real model's); the
/// scheduler is left to the converter's default, Lumina-Image 2.0's.
fn tiny_configs() -> lumina2_loader::PipelineConfigs {
    let mut c = lumina2_loader::PipelineConfigs::from_pipeline_folder(&folder());
    c.scheduler = None;
    c
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn folder_to_all_in_one_to_folder_gives_back_the_folder() {
    use lumina2_loader::{convert_to_diffusers_pipeline, PipelineParts};
    let d = out_dir("tofolder");
    let ckpt = all_in_one_from_folder(&d);
    let out = d.join("pipeline");
    let parts = PipelineParts::from_source(&ckpt).unwrap();
    let mut calls = 0;
    let r = convert_to_diffusers_pipeline(&parts, &tiny_configs(), &out, &mut |done, total| {
        assert!(done <= total);
        calls += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, r.tensors + 1);
    assert!(r.notes.iter().any(|n| n.contains("shift 6.0")), "{r:?}");
    let f = lumina2_loader::PipelineFolder::open(&out).unwrap();
    assert_eq!(f.class_name(), "Lumina2Pipeline");

    // Every tensor: same keys, dtypes, shapes and bits.
    for (component, file) in [
        ("transformer", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ] {
        let ours =
            lumina2_weights::SafetensorsSource::open(&[out.join(component).join(file)]).unwrap();
        assert_same_tensors(&folder_source(component, file), &ours, component);
        for k in lumina2_weights::WeightSource::keys(&ours) {
            assert_eq!(
                ours.tensor_info(&k).unwrap().0,
                folder_source(component, file).tensor_info(&k).unwrap().0,
                "{component}: {k}"
            );
        }
    }
    // The configs: the same JSON (the scheduler's is the real model's, which
    // the tiny folder has too).
    for cfg in [
        "model_index.json",
        "transformer/config.json",
        "text_encoder/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
    ] {
        assert_eq!(json(&out.join(cfg)), json(&folder().join(cfg)), "{cfg}");
    }
    // The tokenizer: tokenizer.json, and tokenizer.model alone, give the
    // folder's ids.
    let reference =
        lumina2_text_encoder::GemmaTokenizer::from_file(folder().join("tokenizer")).unwrap();
    let from_json = lumina2_text_encoder::GemmaTokenizer::from_file(out.join("tokenizer")).unwrap();
    let from_spm =
        lumina2_text_encoder::GemmaTokenizer::from_file(out.join("tokenizer/tokenizer.model"))
            .unwrap();
    let texts: Vec<String> = [
        "a red fox in the snow",
        "  two  spaces\tand a tab\nnew line",
        "ünïcödé, 日本語, emoji 🦊 <bos> <pad>",
        "",
    ]
    .map(String::from)
    .to_vec();
    let ids = |t: &lumina2_text_encoder::GemmaTokenizer| t.encode_padded(&texts, 48).unwrap();
    let want = ids(&reference);
    assert_eq!(ids(&from_json).input_ids, want.input_ids);
    assert_eq!(ids(&from_json).attention_mask, want.attention_mask);
    assert_eq!(ids(&from_spm).input_ids, want.input_ids);
    assert_eq!(from_json.pad_id(), reference.pad_id());
    let spm = read_all(&ckpt)["text_encoders.spiece_model"]
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(
        std::fs::read(out.join("tokenizer/tokenizer.model")).unwrap(),
        spm
    );

    // And the same image.
    let reference = pixels(PipelineSources::from_pipeline_folder(folder()).unwrap());
    assert_eq!(
        pixels(PipelineSources::from_pipeline_folder(&out).unwrap()),
        reference
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// The split files (transformer, Gemma-2 with its tokenizer, BFL VAE) give
/// the same folder.
#[test]
fn split_files_to_a_folder_give_back_the_folder() {
    use lumina2_loader::comfy_write::SPLIT_FILES;
    use lumina2_loader::{
        convert_to_comfy, convert_to_diffusers_pipeline, ComfyFormat, PipelineParts,
    };
    let d = out_dir("splittofolder");
    let ckpt = all_in_one_from_folder(&d);
    let split = d.join("models");
    convert_to_comfy(
        &PipelineParts::from_source(&ckpt).unwrap(),
        &split,
        ComfyFormat::Split,
        &mut |_, _| Ok(()),
    )
    .unwrap();
    let parts = PipelineParts {
        transformer: split.join(SPLIT_FILES[0]),
        text_encoder: split.join(SPLIT_FILES[1]),
        vae: split.join(SPLIT_FILES[2]),
        tokenizer: None,
    };
    let out = d.join("pipeline");
    convert_to_diffusers_pipeline(&parts, &tiny_configs(), &out, &mut |_, _| Ok(())).unwrap();
    for (component, file) in [
        ("transformer", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ] {
        let ours =
            lumina2_weights::SafetensorsSource::open(&[out.join(component).join(file)]).unwrap();
        assert_same_tensors(&folder_source(component, file), &ours, component);
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Without configs, the text encoder's and VAE's are derived from the
/// tensors: Gemma-2-2B's settings (head width 256) cannot describe the tiny
/// encoder's 16 query rows, and the error names the key; the Flux VAE's
/// config takes the tensors' sizes.
#[test]
fn configs_are_derived_from_the_tensors_or_refused_naming_the_key() {
    use lumina2_loader::{convert_to_diffusers_pipeline, PipelineConfigs, PipelineParts};
    let d = out_dir("derive");
    let ckpt = comfy("lumina_2.safetensors");
    let parts = PipelineParts::from_source(&ckpt).unwrap();
    let mut configs = PipelineConfigs {
        transformer: Some(folder().join("transformer/config.json")),
        ..Default::default()
    };
    let out = d.join("pipeline");
    let e = convert_to_diffusers_pipeline(&parts, &configs, &out, &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lumina_2.safetensors")
            && e.contains(
                "text_encoders.gemma2_2b.transformer.model.layers.0.self_attn.q_proj.weight"
            ),
        "{e}"
    );
    assert!(!out.exists());
    configs.text_encoder = Some(folder().join("text_encoder/config.json"));
    convert_to_diffusers_pipeline(&parts, &configs, &out, &mut |_, _| Ok(())).unwrap();
    let vae = json(&out.join("vae/config.json"));
    let tiny = json(&folder().join("vae/config.json"));
    for k in [
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
        "scaling_factor",
        "shift_factor",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    ] {
        assert_eq!(vae[k], tiny[k], "{k}");
    }
    // The real Flux VAE's group norms (the tiny one's 4 is not in its tensors).
    assert_eq!(vae["norm_num_groups"], 32);
    // A VAE config that does not fit the tensors is refused.
    configs.vae = Some(folder().join("transformer/config.json"));
    let out2 = d.join("pipeline2");
    let e = convert_to_diffusers_pipeline(&parts, &configs, &out2, &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("transformer/config.json"), "{e}");
    assert!(!out2.exists());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn hostile_checkpoints_are_refused_naming_file_and_key_and_leave_nothing() {
    use lumina2_loader::{convert_to_diffusers_pipeline, PipelineParts};
    let d = out_dir("tofolderhostile");
    let base = read_all(&comfy("lumina_2.safetensors"));
    let convert = |ckpt: &Path| {
        let out = d.join("pipeline");
        let parts = PipelineParts {
            transformer: ckpt.to_path_buf(),
            text_encoder: ckpt.to_path_buf(),
            vae: ckpt.to_path_buf(),
            tokenizer: None,
        };
        let e = convert_to_diffusers_pipeline(&parts, &tiny_configs(), &out, &mut |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(!out.exists(), "{e}");
        e
    };

    // No VAE.
    let mut t = base.clone();
    t.retain(|k, _| !k.starts_with("vae."));
    let p = d.join("no_vae.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = convert(&p);
    assert!(
        e.contains("no_vae.safetensors") && e.contains("vae.encoder.down.0.block.0.conv1.weight"),
        "{e}"
    );

    // A truncated tokenizer.
    let mut t = base.clone();
    let spm = t["text_encoders.spiece_model"].to_vec1::<u8>().unwrap();
    let half = spm[..spm.len() / 2].to_vec();
    let n = half.len();
    t.insert(
        "text_encoders.spiece_model".into(),
        Tensor::from_vec(half, n, &Device::Cpu).unwrap(),
    );
    let p = d.join("truncated_spm.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = convert(&p);
    assert!(
        e.contains("truncated_spm.safetensors") && e.contains("text_encoders.spiece_model"),
        "{e}"
    );

    // No tokenizer at all.
    let mut t = base.clone();
    t.remove("text_encoders.spiece_model");
    let p = d.join("no_spm.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = convert(&p);
    assert!(
        e.contains("no_spm.safetensors") && e.contains("text_encoders.spiece_model"),
        "{e}"
    );

    // Interrupted in the VAE, the last file: no folder, no partial one.
    let ckpt = comfy("lumina_2.safetensors");
    let parts = PipelineParts::from_source(&ckpt).unwrap();
    let out = d.join("pipeline");
    let e = convert_to_diffusers_pipeline(&parts, &tiny_configs(), &out, &mut |done, total| {
        if done + 2 == total {
            Err("interrupted".into())
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert!(!out.exists());
    // A non-empty destination is refused.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let e = convert_to_diffusers_pipeline(&parts, &tiny_configs(), &out, &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an empty folder"), "{e}");
    std::fs::remove_dir_all(&out).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "no_spm.safetensors",
            "no_vae.safetensors",
            "truncated_spm.safetensors"
        ]
    );
    std::fs::remove_dir_all(&d).unwrap();
}
