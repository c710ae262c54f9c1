//! Reading a case folder: `case.json`, its paths and its tensor files.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// The largest `case.json` read: cases are a few hundred bytes of fields and
/// prompts, so anything near this is not a case.
pub const MAX_CASE_JSON_BYTES: u64 = 1 << 20;

/// How deep [`find_cases`] looks under its root: cases sit a few levels down,
/// and a bound keeps a hostile tree from recursing without end.
pub const MAX_DEPTH: usize = 32;

/// `tolerance` of a case: an element passes when
/// `|ours - expected| <= atol + rtol * |expected|`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part.
    pub rtol: f64,
}

/// `case.json` as written; unknown keys are ignored (the format allows them).
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

/// A parity case (`docs/parity-cases.md`), its paths resolved inside its folder.
#[derive(Debug, Clone)]
pub struct Case {
    /// The case folder.
    pub dir: PathBuf,
    /// The component name (`transformer`, `vae_decode`, ...).
    pub component: String,
    /// What to load, inside the case folder.
    pub model: Option<PathBuf>,
    /// The config folder for a single-file model, inside the case folder.
    pub model_config: Option<PathBuf>,
    /// The dtype our side computes in.
    pub dtype: DType,
    /// Component-specific arguments.
    pub args: serde_json::Map<String, serde_json::Value>,
    /// How outputs are judged.
    pub tolerance: Tolerance,
}

impl Case {
    /// Reads `dir/case.json` and checks what it names exists inside `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let json_path = dir.join("case.json");
        let text = read_case_json(&json_path)?;
        let j: CaseJson = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: json_path.clone(),
            source,
        })?;
        let dtype = match j.dtype.as_deref().unwrap_or("f32") {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => {
                return Err(Error::InvalidField {
                    path: json_path,
                    field: "dtype",
                    found: format!("`{other}`"),
                    expected: "`f32`, `bf16` or `f16`",
                })
            }
        };
        let Tolerance { atol, rtol } = j.tolerance;
        // `!(x >= 0)` also refuses NaN; infinity would pass everything.
        for (field, v) in [("tolerance.atol", atol), ("tolerance.rtol", rtol)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::InvalidField {
                    path: json_path,
                    field,
                    found: v.to_string(),
                    expected: "a finite number >= 0",
                });
            }
        }
        let mut case = Self {
            dir: dir.to_path_buf(),
            component: j.component,
            model: None,
            model_config: None,
            dtype,
            args: j.args,
            tolerance: j.tolerance,
        };
        case.model = j.model.map(|m| case.path("model", &m)).transpose()?;
        case.model_config = j
            .model_config
            .map(|m| case.path("model_config", &m))
            .transpose()?;
        Ok(case)
    }

    /// `rel` (the value of `field` in `case.json`) resolved inside the case
    /// folder: absolute paths, `..`, and links leading out are refused, since
    /// a case from elsewhere must not make us read files outside it.
    pub fn path(&self, field: &str, rel: &str) -> Result<PathBuf> {
        let escapes = || Error::PathEscapes {
            path: self.dir.join("case.json"),
            field: field.to_string(),
            value: rel.to_string(),
        };
        let lexical_ok = !rel.is_empty()
            && Path::new(rel)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !lexical_ok {
            return Err(escapes());
        }
        let full = self.dir.join(rel);
        let (Ok(real), Ok(root)) = (full.canonicalize(), self.dir.canonicalize()) else {
            return Err(Error::Missing {
                path: self.dir.join("case.json"),
                field: field.to_string(),
                value: rel.to_string(),
            });
        };
        if !real.starts_with(&root) {
            return Err(escapes());
        }
        Ok(full)
    }

    /// The model path, which most components require.
    pub fn model(&self) -> Result<&Path> {
        self.model.as_deref().ok_or_else(|| Error::MissingField {
            path: self.dir.join("case.json"),
            field: "model",
        })
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

/// Opens `path` if it is a regular file, through the project's one opener
/// for user files (non-blocking open, type checked on the opened file, so a
/// FIFO cannot hang the run).
fn open_regular(path: &Path) -> Result<std::fs::File> {
    lumina2_weights::fs::open_regular(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidInput {
            Error::NotRegularFile {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Reads `case.json` as a bounded regular file.
fn read_case_json(path: &Path) -> Result<String> {
    let mut text = String::new();
    open_regular(path)?
        .take(MAX_CASE_JSON_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if text.len() as u64 > MAX_CASE_JSON_BYTES {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            size: text.len() as u64,
            limit: MAX_CASE_JSON_BYTES,
        });
    }
    Ok(text)
}

fn load_tensors(p: &Path) -> Result<BTreeMap<String, Tensor>> {
    open_regular(p)?;
    let map = candle_core::safetensors::load(p, &Device::Cpu).map_err(|source| Error::Tensor {
        path: p.to_path_buf(),
        source,
    })?;
    Ok(map.into_iter().collect())
}

/// A required input tensor.
pub fn input<'a>(inputs: &'a BTreeMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    inputs.get(name).ok_or_else(|| Error::MissingTensor {
        file: "inputs.safetensors",
        name: name.to_string(),
    })
}

/// Every case folder (one holding `case.json`) under `root`, at any depth up
/// to [`MAX_DEPTH`], sorted. Links to folders are not followed.
pub fn find_cases(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    if dir.join("case.json").is_file() {
        out.push(dir.to_path_buf());
    }
    if depth == MAX_DEPTH {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_dir() {
            walk(&entry.path(), depth + 1, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case_dir(name: &str, json: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lumina2-parity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("model")).unwrap();
        std::fs::write(dir.join("case.json"), json).unwrap();
        dir
    }

    #[test]
    fn paths_stay_inside_the_case() {
        let base = r#"{"component": "transformer", "tolerance": {"atol": 1e-5, "rtol": 0}"#;
        let ok = case_dir("ok", &format!(r#"{base}, "model": "./model"}}"#));
        let case = Case::load(&ok).unwrap();
        assert_eq!(case.model().unwrap(), ok.join("./model"));
        assert_eq!(case.dtype, DType::F32);
        for (name, model) in [
            ("dotdot", "../x"),
            ("abs", "/etc"),
            ("inner", "model/../../x"),
        ] {
            let dir = case_dir(name, &format!(r#"{base}, "model": "{model}"}}"#));
            let err = Case::load(&dir).unwrap_err();
            assert!(matches!(err, Error::PathEscapes { .. }), "{model}: {err}");
            assert!(err.to_string().contains(model), "{err}");
        }
        let dir = case_dir("missing", &format!(r#"{base}, "model": "nothing"}}"#));
        assert!(matches!(Case::load(&dir), Err(Error::Missing { .. })));
        #[cfg(unix)]
        {
            let dir = case_dir("link", &format!(r#"{base}, "model": "out"}}"#));
            std::os::unix::fs::symlink(std::env::temp_dir(), dir.join("out")).unwrap();
            assert!(matches!(Case::load(&dir), Err(Error::PathEscapes { .. })));
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let dir = case_dir(
            "dtype",
            r#"{"component": "x", "dtype": "f8", "tolerance": {"atol": 0, "rtol": 0}}"#,
        );
        let err = Case::load(&dir).unwrap_err().to_string();
        assert!(err.contains("`dtype`") && err.contains("f8"), "{err}");
        let dir = case_dir(
            "tol",
            r#"{"component": "x", "tolerance": {"atol": -1, "rtol": 0}}"#,
        );
        let err = Case::load(&dir).unwrap_err().to_string();
        assert!(err.contains("tolerance.atol"), "{err}");
        let dir = case_dir("big", &" ".repeat(MAX_CASE_JSON_BYTES as usize + 1));
        assert!(matches!(Case::load(&dir), Err(Error::TooLarge { .. })));
    }

    /// A `case.json` that is a FIFO or a folder is refused at once (the
    /// test finishing shows the open did not block).
    #[cfg(unix)]
    #[test]
    fn a_case_json_that_is_not_a_file_is_refused_without_blocking() {
        let dir = case_dir("fifo", "{}");
        let json = dir.join("case.json");
        std::fs::remove_file(&json).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&json).status();
        assert!(made.is_ok_and(|s| s.success()));
        assert!(matches!(
            Case::load(&dir),
            Err(Error::NotRegularFile { .. })
        ));
        std::fs::remove_file(&json).unwrap();
        std::fs::create_dir(&json).unwrap();
        assert!(matches!(
            Case::load(&dir),
            Err(Error::NotRegularFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
