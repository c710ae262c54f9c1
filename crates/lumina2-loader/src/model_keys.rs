//! The weight names of a transformer model, in both its namings: diffusers'
//! (what the model crates load) and the original one of single-file
//! checkpoints (Alpha-VLLM's for Lumina2, Tongyi's / ComfyUI's for Z-Image).
//!
//! Original checkpoints ([`crate::original::OriginalTransformer`]) and LoRAs
//! ([`crate::lora`]) are read through this table, so one mapping machinery
//! serves every model: Lumina2's [`Config`] and Z-Image's [`ZImageConfig`]
//! each say what their names are.

use lumina2_transformer::zimage::ZImageConfig;
use lumina2_transformer::Config;

/// The names and shapes of a model's weights for one config.
pub trait ModelKeys {
    /// Every weight the model loads, diffusers key and shape.
    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)>;

    /// Every key of an original-layout checkpoint of this config (without a
    /// ComfyUI prefix), the unused ones ([`ModelKeys::unused_original_key`])
    /// left out. Through [`ModelKeys::original_to_diffusers`], each fused
    /// `qkv` split in three, they are exactly the keys of
    /// [`ModelKeys::weight_shapes`].
    fn original_weight_keys(&self) -> Vec<String>;

    /// The diffusers name of an original key (a ComfyUI prefix removed
    /// first). A fused `qkv` key keeps `qkv` in its name: it stands for the
    /// `to_q`, `to_k` and `to_v` weights.
    fn original_to_diffusers(&self, key: &str) -> String;

    /// An original key the model does not use and that is dropped (as
    /// diffusers' converters drop it).
    fn unused_original_key(&self, key: &str) -> bool;

    /// Rows of `q`, `k` and `v` in a fused `qkv` weight.
    fn qkv_rows(&self) -> [usize; 3];

    /// The model's name, for messages.
    fn model_name(&self) -> &'static str;
}

/// The ComfyUI checkpoint prefix of the diffusion model.
pub(crate) const COMFY_PREFIX: &str = "model.diffusion_model.";

/// `key` without the ComfyUI prefix.
pub(crate) fn strip_comfy(key: &str) -> &str {
    key.strip_prefix(COMFY_PREFIX).unwrap_or(key)
}

impl ModelKeys for Config {
    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        lumina2_transformer::weight_shapes(self)
    }
    fn original_weight_keys(&self) -> Vec<String> {
        crate::original::original_weight_keys(self)
    }
    fn original_to_diffusers(&self, key: &str) -> String {
        crate::original::original_key_to_diffusers(key)
    }
    fn unused_original_key(&self, key: &str) -> bool {
        strip_comfy(key) == "norm_final.weight"
    }
    fn qkv_rows(&self) -> [usize; 3] {
        let kv = self.num_kv_heads * self.head_dim();
        [self.hidden_size, kv, kv]
    }
    fn model_name(&self) -> &'static str {
        "Lumina2"
    }
}

impl ModelKeys for ZImageConfig {
    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        lumina2_transformer::zimage::weight_shapes(self)
    }
    fn original_weight_keys(&self) -> Vec<String> {
        crate::zimage_file::original_weight_keys(self)
    }
    fn original_to_diffusers(&self, key: &str) -> String {
        crate::zimage_file::original_key_to_diffusers(self, key)
    }
    fn unused_original_key(&self, key: &str) -> bool {
        // Lumina's unused final RMS norm, which diffusers'
        // `convert_z_image_transformer_checkpoint_to_diffusers` drops.
        strip_comfy(key) == "norm_final.weight"
    }
    fn qkv_rows(&self) -> [usize; 3] {
        // diffusers' Z-Image attention has `n_heads` key and value heads
        // (its converter cuts the fused `qkv` in three equal parts).
        [self.dim; 3]
    }
    fn model_name(&self) -> &'static str {
        "Z-Image"
    }
}
