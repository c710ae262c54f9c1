//! Reading a LoRA file: its pairs of factors, their shapes, ranks and alphas
//! from the header; the factors' data only when asked for.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Where a LoRA's tensors are: their shapes known without reading them (a
/// file's header or pickle), their data read on demand, so that tensors the
/// model has no use for are never read.
enum Store {
    Safetensors(SafetensorsSource),
    Pth(PthFile),
    Memory(HashMap<String, Tensor>),
}

impl Store {
    fn keys(&self) -> Vec<String> {
        match self {
            Store::Safetensors(s) => s.keys(),
            Store::Pth(p) => p.keys(),
            Store::Memory(m) => WeightSource::keys(m),
        }
    }

    /// The shape of `key`, read from the header only.
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        match self {
            Store::Safetensors(s) => s.tensor_info(key).map(|(_, s)| s.to_vec()),
            Store::Pth(p) => p.shape(key),
            Store::Memory(m) => m.get(key).map(|t| t.dims().to_vec()),
        }
    }

    fn read(&self, key: &str) -> Result<Tensor, String> {
        match self {
            Store::Safetensors(s) => s.tensor(key).map_err(|e| e.to_string()),
            Store::Pth(p) => p.tensor(key).map_err(|e| e.to_string()),
            Store::Memory(m) => m.tensor(key).map_err(|e| e.to_string()),
        }
    }
}

/// Where a module's `alpha` comes from.
#[derive(Debug, Clone)]
enum Alpha {
    /// Its `.alpha` tensor (a single number, checked from the header).
    Key(String),
    /// The adapter config's, or the rank.
    Value(f64),
}

/// One adapted module of a LoRA file, as its header describes it: `B A`,
/// `A` being `[rank, in]` and `B` `[out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    name: String,
    down_key: String,
    up_key: String,
    rank: usize,
    in_features: usize,
    out_features: usize,
    alpha: Alpha,
    rslora: bool,
}

impl LoraModule {
    /// The module name as in the file (prefix included, factor suffix removed).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The shape of `A`, `[r, in]`.
    pub fn down_shape(&self) -> [usize; 2] {
        [self.rank, self.in_features]
    }
    /// The shape of `B`, `[out, r]`.
    pub fn up_shape(&self) -> [usize; 2] {
        [self.out_features, self.rank]
    }
    /// The file key of `A` (`lora_A` / `lora_down`).
    pub fn down_key(&self) -> &str {
        &self.down_key
    }
    /// The file key of `B` (`lora_B` / `lora_up`).
    pub fn up_key(&self) -> &str {
        &self.up_key
    }
    /// The file key of its `alpha`, when it has one.
    pub fn alpha_key(&self) -> Option<&str> {
        match &self.alpha {
            Alpha::Key(k) => Some(k),
            Alpha::Value(_) => None,
        }
    }
}

/// A LoRA file, its header read: every module with its factors' keys and
/// shapes. Tensor data is read only for the modules a model uses
/// ([`LoraFile::factor`], [`LoraFile::read_factors`], called by
/// [`super::LoraSource::new`] once every module has been matched and checked),
/// so a tensor the model does not use costs nothing, however large it claims to be.
///
/// Any naming the loader knows is accepted (see [`super`]); keys of no known
/// convention are kept aside and reported, with the keys that name no weight
/// of the model, when the LoRA is applied ([`super::LoraSource::new`]).
#[derive(Clone)]
pub struct LoraFile {
    path: PathBuf,
    store: Arc<Store>,
    modules: Vec<LoraModule>,
    unrecognised: Vec<String>,
}

impl fmt::Debug for LoraFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoraFile")
            .field("path", &self.path)
            .field("modules", &self.modules)
            .field("unrecognised", &self.unrecognised)
            .finish_non_exhaustive()
    }
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
    /// Opens a LoRA file and reads its header: `.safetensors` (with
    /// diffusers/PEFT adapter metadata, when present), or a `torch.save` file
    /// (`.pt`, `.pth`, `.bin`, read without executing pickle code). No tensor
    /// data is read here.
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
                Self::new(Store::Safetensors(st), meta.as_deref(), path)
            }
            "pt" | "pth" | "bin" => Self::new(Store::Pth(PthFile::open(path)?), None, path),
            _ => Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "unknown LoRA file extension `.{ext}` (expected .safetensors, .pt, .pth or .bin)"
                ),
            }),
        }
    }

    /// A LoRA from tensors in memory; `adapter_config` is PEFT's `LoraConfig`
    /// as JSON (diffusers stores it in the safetensors metadata under
    /// `lora_adapter_metadata`). `path` names it in errors.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        adapter_config: Option<&str>,
        path: &Path,
    ) -> Result<Self, Error> {
        Self::new(Store::Memory(tensors), adapter_config, path)
    }

    /// Pairs the factors of every module from the shapes alone.
    fn new(store: Store, adapter_config: Option<&str>, path: &Path) -> Result<Self, Error> {
        let config = match adapter_config {
            Some(j) => parse_adapter_config(j, path)?,
            None => None,
        };
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        #[derive(Default)]
        struct Parts {
            down: Option<(String, [usize; 2])>,
            up: Option<(String, [usize; 2])>,
            alpha: Option<String>,
        }
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unrecognised = Vec::new();
        for key in store.keys() {
            let Some((module, part)) = split_key(&key) else {
                unrecognised.push(key);
                continue;
            };
            let shape = store
                .shape(&key)
                .ok_or_else(|| unsupported(format!("`{key}` has no shape")))?;
            let entry = parts.entry(module.to_string()).or_default();
            let twice = || {
                unsupported(format!(
                    "module `{module}` has a second {part:?} factor in `{key}`"
                ))
            };
            match part {
                Part::Down | Part::Up => {
                    let [a, b] = shape[..] else {
                        return Err(Error::Shape {
                            path: path.to_path_buf(),
                            key,
                            expected: vec![0, 0],
                            found: shape,
                        });
                    };
                    let slot = if part == Part::Down {
                        &mut entry.down
                    } else {
                        &mut entry.up
                    };
                    if slot.is_some() {
                        return Err(twice());
                    }
                    *slot = Some((key.clone(), [a, b]));
                }
                Part::Alpha => {
                    // One number, whatever its shape (`[]` or `[1]`).
                    if shape.iter().product::<usize>() != 1 {
                        return Err(Error::Shape {
                            path: path.to_path_buf(),
                            key,
                            expected: vec![],
                            found: shape,
                        });
                    }
                    if entry.alpha.is_some() {
                        return Err(twice());
                    }
                    entry.alpha = Some(key.clone());
                }
            }
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (name, p) in parts {
            let ((down_key, [rank, in_features]), (up_key, [out_features, up_rank])) =
                match (p.down, p.up) {
                    (Some(d), Some(u)) => (d, u),
                    (Some((k, _)), None) | (None, Some((k, _))) => {
                        return Err(unsupported(format!(
                            "`{k}` has no partner: a LoRA module needs both `lora_A`/`lora_down` and `lora_B`/`lora_up`"
                        )))
                    }
                    (None, None) => {
                        let k = p.alpha.unwrap_or_default();
                        return Err(unsupported(format!("`{k}` belongs to no LoRA factors")));
                    }
                };
            if rank != up_rank {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    key: up_key,
                    expected: vec![out_features, rank],
                    found: vec![out_features, up_rank],
                });
            }
            if rank == 0 {
                return Err(unsupported(format!("`{down_key}` has rank 0")));
            }
            let alpha = match p.alpha {
                Some(k) => Alpha::Key(k),
                None => Alpha::Value(
                    config
                        .as_ref()
                        .map(|c| c.alpha_for(peft_module_name(&name)))
                        .unwrap_or(rank as f64),
                ),
            };
            modules.push(LoraModule {
                name,
                down_key,
                up_key,
                rank,
                in_features,
                out_features,
                alpha,
                rslora: config.as_ref().is_some_and(|c| c.use_rslora),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            store: Arc::new(store),
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

    /// `alpha / r` of a module (`alpha / sqrt(r)` for rsLoRA): what multiplies
    /// `B A` at strength 1. Reads its `.alpha` tensor when it has one.
    pub fn factor(&self, module: &LoraModule) -> Result<f64, Error> {
        let alpha = match &module.alpha {
            Alpha::Value(a) => *a,
            Alpha::Key(key) => {
                let bad = |reason: String| Error::Unsupported {
                    path: self.path.clone(),
                    reason: format!("cannot read `{key}`: {reason}"),
                };
                let v = self
                    .store
                    .read(key)
                    .map_err(bad)?
                    .to_dtype(DType::F64)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f64>())
                    .map_err(|e| bad(e.to_string()))?;
                match v[..] {
                    [a] if a.is_finite() => a,
                    [a] => return Err(bad(format!("alpha {a} is not a finite number"))),
                    _ => return Err(bad(format!("{} values, expected one", v.len()))),
                }
            }
        };
        let rank = module.rank as f64;
        Ok(alpha / if module.rslora { rank.sqrt() } else { rank })
    }

    /// Reads a module's `A` (`[r, in]`) and `B` (`[out, r]`), in the file's dtype.
    pub fn read_factors(&self, module: &LoraModule) -> Result<(Tensor, Tensor), Error> {
        let read = |key: &str, shape: [usize; 2]| {
            let t = self.store.read(key).map_err(|e| Error::Unsupported {
                path: self.path.clone(),
                reason: format!("cannot read `{key}`: {e}"),
            })?;
            if t.dims() != shape {
                return Err(Error::Shape {
                    path: self.path.clone(),
                    key: key.to_string(),
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        Ok((
            read(&module.down_key, module.down_shape())?,
            read(&module.up_key, module.up_shape())?,
        ))
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
