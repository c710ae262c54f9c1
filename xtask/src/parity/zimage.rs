//! `zimage_transformer` cases.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_transformer::weights::SafetensorsSource;
use lumina2_transformer::zimage::{ZImageConfig, ZImageTransformer, DEFAULT_PATCH};
use lumina2_transformer::Weights;

use super::Prepared;
use super::{input, Case};

struct ZImageCase {
    model: ZImageTransformer,
    inputs: BTreeMap<String, Tensor>,
    patch: (usize, usize),
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let model_path = case.model()?;
    let folder = lumina2_loader::ComponentFolder::open(model_path)
        .with_context(|| format!("opening {}", model_path.display()))?;
    let cfg = ZImageConfig::from_file(model_path)?;
    let source = SafetensorsSource::open(folder.safetensors_files())?;
    let weights = Weights::new(std::sync::Arc::new(source), case.dtype, &Device::Cpu);
    let model = ZImageTransformer::new(&cfg, &weights)?;
    let patch = match case.args.get("patch_size") {
        None | Some(serde_json::Value::Null) => DEFAULT_PATCH,
        Some(v) => match v.as_u64() {
            Some(p) => (p as usize, 1),
            None => bail!("`patch_size` must be a positive integer, not {v}"),
        },
    };
    Ok(Box::new(ZImageCase {
        model,
        inputs: case.inputs()?,
        patch,
    }))
}

/// The per-item captions: the first `caption_lens[i]` rows of
/// `encoder_hidden_states[i]`.
pub fn captions(inputs: &BTreeMap<String, Tensor>) -> Result<Vec<Tensor>> {
    let caps = input(inputs, "encoder_hidden_states")?;
    let lens = input(inputs, "caption_lens")?.to_vec1::<i64>()?;
    lens.iter()
        .enumerate()
        .map(|(i, &n)| Ok(caps.get(i)?.narrow(0, 0, usize::try_from(n)?)?))
        .collect()
}

impl Prepared for ZImageCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let i = &self.inputs;
        let out = self.model.forward_with_patch(
            input(i, "hidden_states")?,
            input(i, "timestep")?,
            &captions(i)?,
            self.patch,
        )?;
        Ok(BTreeMap::from([("sample".to_string(), out)]))
    }
}
