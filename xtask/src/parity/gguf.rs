//! `gguf_dequant` cases: every tensor of a GGUF file, dequantised to f32 by our
//! kernels, in PyTorch's shape.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lumina2_loader::gguf::GgufFile;

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
