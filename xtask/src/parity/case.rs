//! Reading a case directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// `tolerance` of a case.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part.
    pub rtol: f64,
}

#[derive(Debug, Deserialize)]
struct CaseJson {
    component: String,
    model: Option<String>,
    model_config: Option<String>,
    dtype: Option<String>,
    #[serde(default)]
    args: serde_json::Map<String, serde_json::Value>,
    tolerance: Tolerance,
}

/// A parity case (see `shared/parity-cases.md`).
#[derive(Debug, Clone)]
pub struct Case {
    /// The case directory.
    pub dir: PathBuf,
    /// The component name.
    pub component: String,
    /// What to load, resolved against the case directory.
    pub model: Option<PathBuf>,
    /// The config folder for a single-file model.
    pub model_config: Option<PathBuf>,
    /// The dtype our side computes in.
    pub dtype: DType,
    /// Component-specific arguments.
    pub args: serde_json::Map<String, serde_json::Value>,
    /// How outputs are judged.
    pub tolerance: Tolerance,
}

impl Case {
    /// Reads `dir/case.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("case.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let j: CaseJson =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let dtype = match j.dtype.as_deref().unwrap_or("f32") {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => bail!("{}: unknown dtype `{other}`", path.display()),
        };
        if !(j.tolerance.atol >= 0.0 && j.tolerance.rtol >= 0.0) {
            bail!("{}: tolerance must be non-negative", path.display());
        }
        let inside = |rel: &str| -> Result<PathBuf> {
            let p = dir.join(rel);
            if !p.exists() {
                bail!("{}: `{rel}` does not exist", path.display());
            }
            Ok(p)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            component: j.component,
            model: j.model.as_deref().map(inside).transpose()?,
            model_config: j.model_config.as_deref().map(inside).transpose()?,
            dtype,
            args: j.args,
            tolerance: j.tolerance,
        })
    }

    /// The model path, which this component requires.
    pub fn model(&self) -> Result<&Path> {
        self.model
            .as_deref()
            .ok_or_else(|| anyhow!("case.json has no `model`"))
    }

    /// The named inputs (empty when the case has no `inputs.safetensors`).
    pub fn inputs(&self) -> Result<BTreeMap<String, Tensor>> {
        let p = self.dir.join("inputs.safetensors");
        if !p.exists() {
            return Ok(BTreeMap::new());
        }
        load_tensors(&p)
    }

    /// The reference outputs.
    pub fn expected(&self) -> Result<BTreeMap<String, Tensor>> {
        load_tensors(&self.dir.join("expected.safetensors"))
    }
}

fn load_tensors(p: &Path) -> Result<BTreeMap<String, Tensor>> {
    let map = candle_core::safetensors::load(p, &Device::Cpu)
        .with_context(|| format!("reading {}", p.display()))?;
    Ok(map.into_iter().collect())
}

/// A required input tensor.
pub fn input<'a>(inputs: &'a BTreeMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    inputs
        .get(name)
        .ok_or_else(|| anyhow!("inputs.safetensors has no `{name}`"))
}

/// Every case directory (holding `case.json`) under `root`, at any depth, sorted.
pub fn find_cases(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, &mut out).with_context(|| format!("scanning {}", root.display()))?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if dir.join("case.json").is_file() {
        out.push(dir.to_path_buf());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), out)?;
        }
    }
    Ok(())
}
