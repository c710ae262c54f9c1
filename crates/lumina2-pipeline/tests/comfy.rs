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
