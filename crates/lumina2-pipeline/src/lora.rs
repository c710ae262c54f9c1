//! LoRAs on the transformer's weights (the loader does the work).

use std::sync::Arc;

use lumina2_transformer::{Config, WeightSource};

use crate::components::LoraSpec;
use crate::error::{invalid, Result};

pub(crate) fn apply(
    _base: Arc<dyn WeightSource>,
    _loras: &[LoraSpec],
    _cfg: &Config,
) -> Result<Arc<dyn WeightSource>> {
    Err(invalid("lora", "LoRA loading is not wired yet"))
}
