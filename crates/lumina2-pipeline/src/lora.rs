//! LoRAs on the transformer's weights: the loader's [`LoraSource`] merges them
//! into dense weights and keeps them factored on quantised (GGUF) ones.

use std::sync::Arc;

use lumina2_loader::lora::LoraSource;
use lumina2_loader::ModelKeys;
use lumina2_transformer::WeightSource;

use crate::components::LoraSpec;
use crate::error::Result;

pub(crate) fn apply(
    base: Arc<dyn WeightSource>,
    loras: &[LoraSpec],
    cfg: &(impl ModelKeys + ?Sized),
) -> Result<Arc<dyn WeightSource>> {
    let list: Vec<(&std::path::Path, f64)> =
        loras.iter().map(|l| (l.path.as_path(), l.scale)).collect();
    Ok(Arc::new(LoraSource::open(base, cfg, &list)?))
}
