//! `gguf_dequant` cases: every tensor of a GGUF file, dequantised to f32 by our
//! kernels, in PyTorch's shape; `gguf_quantize` cases: f32 tensors quantised
//! by our kernels, compared byte for byte.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lumina2_loader::gguf::{quantize, GgmlType, GgufFile, QUANTIZE_TYPES};

use super::Case;
use super::Prepared;

struct GgufCase {
    file: GgufFile,
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let path = case.model()?;
    let file = GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::new(GgufCase { file }))
}

impl Prepared for GgufCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for t in self.file.tensor_infos() {
            let x = self.file.tensor(&t.name, DType::F32, &Device::Cpu)?;
            out.insert(t.name.clone(), x);
        }
        Ok(out)
    }
}

/// `gguf_quantize` cases: every input quantised by our kernels to each of
/// `args.types`, as the bytes of its blocks (int64, one per byte).
struct QuantizeCase {
    inputs: BTreeMap<String, Tensor>,
    types: Vec<GgmlType>,
}

pub fn prepare_quantize(case: &Case) -> Result<Box<dyn Prepared>> {
    let names = case
        .args
        .get("types")
        .and_then(|t| t.as_array())
        .context("args.types: a list of type names")?;
    let types = names
        .iter()
        .map(|n| {
            let n = n.as_str().context("args.types: names are strings")?;
            QUANTIZE_TYPES
                .into_iter()
                .find(|t| t.to_string() == n)
                .with_context(|| format!("args.types: `{n}` is not a type we quantise"))
        })
        .collect::<Result<_>>()?;
    Ok(Box::new(QuantizeCase {
        inputs: case.inputs()?,
        types,
    }))
}

impl Prepared for QuantizeCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, x) in &self.inputs {
            let x: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for &ty in &self.types {
                let q = quantize(ty, &x).with_context(|| format!("{name} to {ty}"))?;
                let bytes: Vec<i64> = q.into_iter().map(i64::from).collect();
                let n = bytes.len();
                out.insert(
                    format!("{name}.{ty}"),
                    Tensor::from_vec(bytes, n, &Device::Cpu)?,
                );
            }
        }
        Ok(out)
    }
}
