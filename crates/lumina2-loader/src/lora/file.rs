//! Reading a LoRA file: its pairs of factors, their ranks and alphas.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use lumina2_weights::{SafetensorsSource, WeightSource};

use super::keys::{peft_module_name, split_key, Part};
use crate::folder::Error;
use crate::pth::PthFile;

/// The safetensors metadata entry where diffusers and PEFT keep the adapter's
/// `LoraConfig` (as JSON).
const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// PEFT's `LoraConfig.lora_alpha` default, used when a file's adapter config
/// does not set it (as PEFT would).
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// One adapted module of a LoRA file: `B A`, scaled by `factor` at strength 1.
#[derive(Debug, Clone)]
pub struct LoraModule {
    name: String,
    down_key: String,
    up_key: String,
    down: Tensor,
    up: Tensor,
    factor: f64,
}

impl LoraModule {
    /// The module name as in the file (prefix included, factor suffix removed).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }
    /// `alpha / r` (`alpha / sqrt(r)` for rsLoRA): what multiplies `B A` at strength 1.
    pub fn factor(&self) -> f64 {
        self.factor
    }
    /// The file key of `A` (`lora_A` / `lora_down`).
    pub fn down_key(&self) -> &str {
        &self.down_key
    }
    /// The file key of `B` (`lora_B` / `lora_up`).
    pub fn up_key(&self) -> &str {
        &self.up_key
    }
    /// `A`, `[r, in]`, in the file's dtype.
    pub fn down(&self) -> &Tensor {
        &self.down
    }
    /// `B`, `[out, r]`, in the file's dtype.
    pub fn up(&self) -> &Tensor {
        &self.up
    }
}

/// A LoRA file read into memory (LoRA files are small next to the model):
/// every module with its factors and its `alpha / r`.
///
/// Any naming the loader knows is accepted (see [`super`]); keys of no known
/// convention are kept aside and reported, with the keys that name no weight
/// of the model, when the LoRA is applied ([`super::LoraSource::new`]).
#[derive(Debug, Clone)]
pub struct LoraFile {
    path: PathBuf,
    modules: Vec<LoraModule>,
    unrecognised: Vec<String>,
}

/// The parts of PEFT's `LoraConfig` that change the scale.
#[derive(Debug, Default)]
struct AdapterConfig {
    lora_alpha: Option<f64>,
    /// `(module-name pattern, alpha)`.
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl LoraFile {
    /// Reads a LoRA file: `.safetensors` (with diffusers/PEFT adapter metadata,
    /// when present), or a `torch.save` file (`.pt`, `.pth`, `.bin`, read without
    /// executing pickle code).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "safetensors" => {
                let st = SafetensorsSource::open(&[path]).map_err(|e| Error::Unsupported {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
                let meta = st.metadata().get(ADAPTER_METADATA_KEY).cloned();
                Self::from_source(&st, meta.as_deref(), path)
            }
            "pt" | "pth" | "bin" => Self::from_source(&PthFile::open(path)?, None, path),
            _ => Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "unknown LoRA file extension `.{ext}` (expected .safetensors, .pt, .pth or .bin)"
                ),
            }),
        }
    }

    /// A LoRA from any weight source holding its tensors; `adapter_config` is
    /// PEFT's `LoraConfig` as JSON (diffusers stores it in the safetensors
    /// metadata under `lora_adapter_metadata`). `path` names it in errors.
    pub fn from_source(
        source: &dyn WeightSource,
        adapter_config: Option<&str>,
        path: &Path,
    ) -> Result<Self, Error> {
        let config = match adapter_config {
            Some(j) => parse_adapter_config(j, path)?,
            None => None,
        };
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        let read = |key: &str| {
            source
                .tensor(key)
                .map_err(|e| unsupported(format!("cannot read `{key}`: {e}")))
        };
        #[derive(Default)]
        struct Parts {
            down: Option<(String, Tensor)>,
            up: Option<(String, Tensor)>,
            alpha: Option<(String, f64)>,
        }
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unrecognised = Vec::new();
        for key in source.keys() {
            let Some((module, part)) = split_key(&key) else {
                unrecognised.push(key);
                continue;
            };
            let entry = parts.entry(module.to_string()).or_default();
            let twice = || {
                unsupported(format!(
                    "module `{module}` has a second {part:?} factor in `{key}`"
                ))
            };
            match part {
                Part::Down | Part::Up => {
                    let t = read(&key)?;
                    if t.rank() != 2 {
                        return Err(Error::Shape {
                            path: path.to_path_buf(),
                            key,
                            expected: vec![0, 0],
                            found: t.dims().to_vec(),
                        });
                    }
                    let slot = if part == Part::Down {
                        &mut entry.down
                    } else {
                        &mut entry.up
                    };
                    if slot.is_some() {
                        return Err(twice());
                    }
                    *slot = Some((key.clone(), t));
                }
                Part::Alpha => {
                    let t = read(&key)?;
                    let v = t
                        .to_dtype(DType::F64)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f64>())
                        .map_err(|e| unsupported(format!("cannot read `{key}`: {e}")))?;
                    let [alpha] = v[..] else {
                        return Err(Error::Shape {
                            path: path.to_path_buf(),
                            key,
                            expected: vec![],
                            found: t.dims().to_vec(),
                        });
                    };
                    if entry.alpha.is_some() {
                        return Err(twice());
                    }
                    entry.alpha = Some((key.clone(), alpha));
                }
            }
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (name, p) in parts {
            let (down_key, down, up_key, up) = match (p.down, p.up) {
                (Some((dk, d)), Some((uk, u))) => (dk, d, uk, u),
                (Some((k, _)), None) | (None, Some((k, _))) => {
                    return Err(unsupported(format!(
                        "`{k}` has no partner: a LoRA module needs both `lora_A`/`lora_down` and `lora_B`/`lora_up`"
                    )))
                }
                (None, None) => {
                    let k = p.alpha.map(|(k, _)| k).unwrap_or_default();
                    return Err(unsupported(format!("`{k}` belongs to no LoRA factors")));
                }
            };
            // Both are matrices (checked when read).
            let (rank, _) = down.dims2().map_err(|e| unsupported(e.to_string()))?;
            let (out, up_rank) = up.dims2().map_err(|e| unsupported(e.to_string()))?;
            if rank != up_rank {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    key: up_key,
                    expected: vec![out, rank],
                    found: vec![out, up_rank],
                });
            }
            if rank == 0 {
                return Err(unsupported(format!("`{down_key}` has rank 0")));
            }
            let alpha = p
                .alpha
                .map(|(_, a)| a)
                .or_else(|| {
                    config
                        .as_ref()
                        .map(|c| c.alpha_for(peft_module_name(&name)))
                })
                .unwrap_or(rank as f64);
            let rslora = config.as_ref().is_some_and(|c| c.use_rslora);
            let divisor = if rslora {
                (rank as f64).sqrt()
            } else {
                rank as f64
            };
            modules.push(LoraModule {
                name,
                down_key,
                up_key,
                down,
                up,
                factor: alpha / divisor,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            modules,
            unrecognised,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its modules, sorted by name.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Keys of no LoRA convention the loader knows (an error when applied).
    pub fn unrecognised_keys(&self) -> &[String] {
        &self.unrecognised
    }
}

impl AdapterConfig {
    /// PEFT's choice: the first `alpha_pattern` entry matching the module name,
    /// else `lora_alpha`.
    fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
            .unwrap_or(PEFT_DEFAULT_ALPHA)
    }
}

/// Reads the scale-related fields of a PEFT `LoraConfig` JSON: the
/// transformer's, when the keys carry component prefixes as
/// `Lumina2Pipeline.save_lora_weights` writes them (`transformer.lora_alpha`),
/// else the whole object, as `save_lora_adapter` writes it. `None` when it
/// holds no config for the transformer.
fn parse_adapter_config(json: &str, path: &Path) -> Result<Option<AdapterConfig>, Error> {
    let bad = |reason: String| Error::Unsupported {
        path: path.to_path_buf(),
        reason: format!("`{ADAPTER_METADATA_KEY}`: {reason}"),
    };
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let all = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    // `LoraConfig` field names have no dots; prefixed ones belong to a component.
    let prefixed: serde_json::Map<String, serde_json::Value> = all
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("transformer.")?.to_string(), v.clone())))
        .collect();
    let obj: serde_json::Map<String, serde_json::Value> = if prefixed.is_empty() {
        all.iter()
            .filter(|(k, _)| !k.contains('.'))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    } else {
        prefixed
    };
    if obj.is_empty() {
        return Ok(None);
    }
    if obj.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad("DoRA adapters (`use_dora`) are not supported".into()));
    }
    let lora_alpha = match obj.get("lora_alpha") {
        None | Some(serde_json::Value::Null) => None,
        Some(a) => Some(
            a.as_f64()
                .ok_or_else(|| bad(format!("`lora_alpha` is not a number: {a}")))?,
        ),
    };
    let mut alpha_pattern = Vec::new();
    if let Some(p) = obj.get("alpha_pattern").and_then(|p| p.as_object()) {
        for (pattern, a) in p {
            // PEFT matches these as regular expressions; plain module names
            // (the only kind diffusers writes) match the same literally.
            if pattern.contains([
                '\\', '^', '$', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|',
            ]) {
                return Err(bad(format!(
                    "`alpha_pattern` entry `{pattern}` is a regular expression; only module names are supported"
                )));
            }
            let a = a
                .as_f64()
                .ok_or_else(|| bad(format!("`alpha_pattern[{pattern}]` is not a number")))?;
            alpha_pattern.push((pattern.clone(), a));
        }
    }
    let use_rslora = obj.get("use_rslora").and_then(|x| x.as_bool()) == Some(true);
    Ok(Some(AdapterConfig {
        lora_alpha,
        alpha_pattern,
        use_rslora,
    }))
}
