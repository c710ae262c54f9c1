//! A part of a checkpoint: the tensors under one key prefix, seen without it.
//!
//! ComfyUI's all-in-one checkpoint holds the three models side by side under
//! `model.diffusion_model.`, `text_encoders.gemma2_2b.transformer.` and
//! `vae.`; each model is read through its own [`Prefixed`] view of the one
//! open file (headers parsed once, tensors read as asked, nothing copied
//! ahead).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use lumina2_weights::{LinearWeight, WeightSource};

/// The tensors of `inner` whose keys start with `prefix`, keyed without it.
pub struct Prefixed {
    inner: Arc<dyn WeightSource>,
    prefix: String,
}

impl Prefixed {
    /// The view of `inner` under `prefix` (which ends with `.`).
    pub fn new(inner: Arc<dyn WeightSource>, prefix: impl Into<String>) -> Self {
        Self {
            inner,
            prefix: prefix.into(),
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl WeightSource for Prefixed {
    fn contains(&self, key: &str) -> bool {
        self.inner.contains(&self.full(key))
    }
    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        self.inner.tensor(&self.full(key))
    }
    fn linear(&self, key: &str) -> lumina2_weights::Result<LinearWeight> {
        self.inner.linear(&self.full(key))
    }
    fn tensor_as(&self, key: &str, dtype: DType) -> lumina2_weights::Result<Tensor> {
        self.inner.tensor_as(&self.full(key), dtype)
    }
    fn linear_as(&self, key: &str, dtype: DType) -> lumina2_weights::Result<LinearWeight> {
        self.inner.linear_as(&self.full(key), dtype)
    }
    fn linear_as_scanned(
        &self,
        key: &str,
        dtype: DType,
    ) -> lumina2_weights::Result<(LinearWeight, Option<bool>)> {
        self.inner.linear_as_scanned(&self.full(key), dtype)
    }
    fn name(&self) -> String {
        format!("{} (under `{}`)", self.inner.name(), self.prefix)
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.inner.shape(&self.full(key))
    }
    fn keys(&self) -> Vec<String> {
        self.inner
            .keys()
            .into_iter()
            .filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_string))
            .collect()
    }
}
