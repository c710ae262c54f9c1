//! `lumina2 inspect FILE`: what a checkpoint is, read from its header only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use lumina2_loader::gguf::{GgufFile, MetadataValue};
use lumina2_loader::{detect_layout, original::original_key_to_diffusers, PthFile};
use lumina2_weights::fs::{open_regular, read_to_string_bounded, MAX_CONFIG_BYTES};
use lumina2_weights::{SafetensorsSource, WeightSource};

/// Arguments of `lumina2 inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// A checkpoint (.safetensors, .pth, .gguf) or a diffusers folder.
    file: PathBuf,
}

/// One tensor as the file describes it.
struct Entry {
    key: String,
    shape: Vec<usize>,
    dtype: String,
}

fn safetensors_entries(path: &Path) -> Result<Vec<Entry>> {
    // The validated reader of the model crates: header bounds, offsets,
    // sizes and duplicate keys are checked before anything is listed.
    let st = lumina2_weights::SafetensorsSource::open(&[path])?;
    let mut out = Vec::new();
    for key in lumina2_weights::WeightSource::keys(&st) {
        // The header's own type name: fp8 is named as such, not as its bytes.
        if let (Some((_, shape)), Some(dtype)) = (st.tensor_info(&key), st.storage_type(&key)) {
            out.push(Entry {
                shape: shape.to_vec(),
                dtype,
                key,
            });
        }
    }
    Ok(out)
}

/// Key/value lines to print.
type Lines = Vec<(String, String)>;

fn gguf_entries(g: &GgufFile) -> (Vec<Entry>, Lines) {
    let entries = g
        .tensor_infos()
        .iter()
        .map(|t| Entry {
            key: t.name.clone(),
            // GGUF lists dimensions innermost first.
            shape: t.dims.iter().rev().map(|&d| d as usize).collect(),
            dtype: t.ggml_type.to_string(),
        })
        .collect();
    let mut meta = vec![("gguf version".to_string(), g.version().to_string())];
    for (k, v) in g.metadata() {
        let text = match v {
            MetadataValue::String(s) if s.len() <= 200 => s.clone(),
            MetadataValue::String(s) => format!("<{} characters>", s.len()),
            MetadataValue::Array(_) => "<array>".to_string(),
            other => format!("{other:?}"),
        };
        meta.push((k.clone(), text));
    }
    (entries, meta)
}

fn pth_entries(path: &Path) -> Result<Vec<Entry>> {
    let p = PthFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(p.keys()
        .into_iter()
        .map(|k| Entry {
            shape: p.shape(&k).unwrap_or_default(),
            key: k,
            dtype: "torch storage".to_string(),
        })
        .collect())
}

/// Transformer dimensions read back from the shapes (diffusers names).
fn detect_transformer_config(entries: &[Entry]) -> Vec<(String, String)> {
    let by_name: BTreeMap<String, &Entry> = entries
        .iter()
        .map(|e| (original_key_to_diffusers(&e.key), e))
        .collect();
    let count = |prefix: &str| {
        let mut idx = std::collections::BTreeSet::new();
        for k in by_name.keys() {
            if let Some(rest) = k.strip_prefix(prefix) {
                if let Some((i, _)) = rest.split_once('.') {
                    if let Ok(i) = i.parse::<usize>() {
                        idx.insert(i);
                    }
                }
            }
        }
        idx.len()
    };
    let shape = |k: &str| by_name.get(k).map(|e| e.shape.clone());
    let mut out = Vec::new();
    if let Some(s) = shape("x_embedder.weight") {
        if let [hidden, inp] = s[..] {
            out.push(("hidden_size".into(), hidden.to_string()));
            out.push(("in_channels * patch_size^2".into(), inp.to_string()));
        }
    }
    for (name, prefix) in [
        ("num_layers", "layers."),
        ("num_refiner_layers (noise)", "noise_refiner."),
        ("num_refiner_layers (context)", "context_refiner."),
    ] {
        out.push((name.into(), count(prefix).to_string()));
    }
    let cap = shape("time_caption_embed.caption_embedder.0.weight")
        .or_else(|| shape("cap_embedder.0.weight"));
    if let Some(s) = cap {
        if let Some(d) = s.first() {
            out.push(("cap_feat_dim".into(), d.to_string()));
        }
    }
    let head_dim = shape("layers.0.attn.norm_q.weight")
        .or_else(|| shape("layers.0.attention.q_norm.weight"))
        .and_then(|s| s.first().copied());
    if let Some(hd) = head_dim {
        out.push(("head_dim".into(), hd.to_string()));
        if let Some(q) = shape("layers.0.attn.to_q.weight").and_then(|s| s.first().copied()) {
            out.push(("num_attention_heads".into(), (q / hd.max(1)).to_string()));
        }
        if let Some(k) = shape("layers.0.attn.to_k.weight").and_then(|s| s.first().copied()) {
            out.push(("num_kv_heads".into(), (k / hd.max(1)).to_string()));
        }
    }
    out
}

fn describe(path: &Path, format: &str, entries: &[Entry], extra: &[(String, String)]) {
    println!("file: {}", path.display());
    println!("format: {format}");
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    let zimage = lumina2_loader::detect_zimage_layout(keys.iter().copied());
    // A Z-Image file's original keys look much like Lumina2's: it is told first.
    let layout = zimage
        .is_none()
        .then(|| detect_layout(keys.iter().copied()))
        .flatten();
    println!(
        "key layout: {}",
        match (zimage, layout) {
            (Some(z), _) => z.describe().to_string(),
            (None, Some(l)) => format!("Lumina2 transformer, {l:?} keys"),
            (None, None) if keys.iter().any(|k| k.contains("lora")) => {
                if keys.iter().any(|k| is_zimage_lora_key(k)) {
                    "LoRA (Z-Image module names)".to_string()
                } else {
                    "LoRA".to_string()
                }
            }
            (None, None) => "not a Lumina2 or Z-Image transformer".to_string(),
        }
    );
    println!("tensors: {}", entries.len());
    let mut dtypes: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut params: u64 = 0;
    for e in entries {
        // Saturating: shapes a file states are counted, never trusted to fit.
        let n = e
            .shape
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
        params = params.saturating_add(n);
        let slot = dtypes.entry(e.dtype.as_str()).or_default();
        slot.0 += 1;
        slot.1 = slot.1.saturating_add(n);
    }
    println!("parameters: {params} ({:.3} B)", params as f64 / 1e9);
    println!("storage types:");
    for (d, (count, n)) in &dtypes {
        println!("  {d}: {count} tensors, {n} values");
    }
    if layout.is_some() {
        println!("detected transformer config:");
        for (k, v) in detect_transformer_config(entries) {
            println!("  {k}: {v}");
        }
    }
    if !extra.is_empty() {
        println!("metadata:");
        for (k, v) in extra {
            println!("  {k}: {v}");
        }
    }
}

/// A LoRA key naming a module only Z-Image has (its attention is
/// `attention.to_q`, Lumina2's `attn.to_q`; its blocks' modulation
/// `adaLN_modulation.0`, Lumina2's `adaLN_modulation.1` / `norm1.linear`),
/// in dotted or kohya spelling.
fn is_zimage_lora_key(key: &str) -> bool {
    [
        "attention.to_q",
        "attention_to_q",
        "adaLN_modulation.0",
        "adaLN_modulation_0",
        "all_x_embedder",
    ]
    .iter()
    .any(|m| key.contains(m))
}

/// The Z-Image config a transformer file implies (what
/// `load_zimage_transformer_file` uses without a `config.json`), or `None`
/// when the file is no Z-Image transformer.
fn zimage_lines(source: &dyn WeightSource, path: &Path) -> Lines {
    let keys = source.keys();
    if lumina2_loader::detect_zimage_layout(keys.iter().map(String::as_str)).is_none() {
        return Vec::new();
    }
    let cfg = match lumina2_loader::infer_zimage_config(source, path) {
        Ok(c) => format!("{c:?}"),
        Err(e) => format!("error: {e}"),
    };
    vec![("inferred Z-Image config".into(), cfg)]
}

/// What a single `.safetensors` file is (ComfyUI all-in-one checkpoint,
/// transformer, Gemma-2 text encoder, Flux VAE) and the configs the loader
/// would infer for its models; an inference that fails is shown as its error.
fn single_file_lines(path: &Path) -> Lines {
    let file = match lumina2_loader::SingleFile::open(path) {
        Ok(f) => f,
        Err(e) => return vec![("single-file layout".into(), format!("none ({e})"))],
    };
    let layout = file.layout();
    let mut out: Lines = vec![("single-file layout".into(), layout.describe().into())];
    let show = |r: std::result::Result<String, lumina2_loader::Error>| match r {
        Ok(s) => s,
        Err(e) => format!("error: {e}"),
    };
    use lumina2_loader::SingleFileLayout as L;
    if matches!(layout, L::Checkpoint | L::Transformer(_))
        && layout != L::Transformer(lumina2_loader::TransformerLayout::Diffusers)
    {
        let cfg =
            lumina2_loader::infer_config(file.source().clone(), path).map(|c| format!("{c:?}"));
        out.push(("inferred transformer config".into(), show(cfg)));
    }
    if matches!(layout, L::Checkpoint | L::TextEncoder) {
        match file.text_encoder() {
            Ok(te) => {
                out.push((
                    "inferred Gemma-2 config".into(),
                    show(te.config().map(|c| format!("{c:?}"))),
                ));
                let tok = match te.spiece_model() {
                    Ok(Some(b)) => format!(
                        "SentencePiece model, {} bytes (`{}`)",
                        b.len(),
                        te.spiece_key().unwrap_or_default()
                    ),
                    Ok(None) => "none (give --tokenizer)".into(),
                    Err(e) => format!("error: {e}"),
                };
                out.push(("embedded tokenizer".into(), tok));
            }
            Err(e) => out.push(("text encoder".into(), format!("error: {e}"))),
        }
    }
    if matches!(layout, L::Checkpoint | L::BflVae) {
        let cfg = file.flux_vae_config().map(|c| format!("{c:?}"));
        out.push(("inferred VAE config".into(), show(cfg)));
    }
    out
}

/// The top-level keys of a folder's `config.json`, none when the folder has
/// no such entry. One that is there must be a regular file (links followed)
/// of at most [`MAX_CONFIG_BYTES`] holding a JSON object.
fn config_lines(path: &Path) -> Result<Lines> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        _ => {}
    }
    let text = read_to_string_bounded(path, MAX_CONFIG_BYTES)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let serde_json::Value::Object(m) = value else {
        bail!("{}: not a JSON object", path.display());
    };
    Ok(m.into_iter()
        .map(|(k, v)| (format!("config.{k}"), v.to_string()))
        .collect())
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let path = &args.file;
    if path.is_dir() {
        let index = path.join("model_index.json");
        if std::fs::symlink_metadata(&index).is_ok() {
            open_regular(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let folder = lumina2_loader::PipelineFolder::open(path)?;
            println!("diffusers pipeline folder: {}", path.display());
            println!("{folder:#?}");
            return Ok(());
        }
        let folder = lumina2_loader::ComponentFolder::open(path)?;
        let mut entries = Vec::new();
        for f in folder.safetensors_files() {
            entries.extend(safetensors_entries(f)?);
        }
        let extra = config_lines(&path.join("config.json"))?;
        describe(path, "component folder (safetensors)", &entries, &extra);
        return Ok(());
    }
    // A FIFO or device named like a checkpoint is refused here, whatever
    // the format's reader would do with it.
    open_regular(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => {
            let entries = safetensors_entries(path)?;
            let source = SafetensorsSource::open(&[path])
                .with_context(|| format!("reading {}", path.display()))?;
            let mut extra = zimage_lines(&source, path);
            if extra.is_empty() {
                extra = single_file_lines(path);
            }
            describe(path, "safetensors", &entries, &extra);
        }
        "gguf" => {
            let g = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
            let (entries, mut meta) = gguf_entries(&g);
            meta.extend(zimage_lines(&g, path));
            let is_gemma = g
                .metadata()
                .get("general.architecture")
                .and_then(MetadataValue::as_str)
                == Some("gemma2");
            let mut format = "GGUF";
            if is_gemma {
                if let Ok(g) = lumina2_loader::Gemma2Gguf::new(g) {
                    let cfg = match g.config() {
                        Ok(cfg) => format!("{cfg:?}"),
                        Err(e) => format!("error: {e}"),
                    };
                    meta.push(("detected Gemma-2 config".into(), cfg));
                    format = "GGUF (Gemma-2 text encoder, llama.cpp names)";
                }
            }
            describe(path, format, &entries, &meta);
        }
        "pth" | "pt" | "bin" => {
            let pth = PthFile::open(path)?;
            describe(
                path,
                "PyTorch zip (read without executing pickle code)",
                &pth_entries(path)?,
                &zimage_lines(&pth, path),
            )
        }
        _ => bail!(
            "{}: unknown checkpoint type (expected .safetensors, .gguf, .pth or a folder)",
            path.display()
        ),
    }
    Ok(())
}
