//! LoRA (low-rank adaptation) for the Lumina2 transformer.
//!
//! A LoRA changes linear weights `W` (`[out, in]`) into
//! `W + scale * (alpha / r) * B A`, `A` (`lora_A`/`lora_down`) being `[r, in]`
//! and `B` (`lora_B`/`lora_up`) `[out, r]`; `alpha` is the file's (a
//! `<module>.alpha` tensor, or `lora_alpha`/`alpha_pattern` of the PEFT config
//! diffusers stores in the safetensors metadata), `r` when it has none.
//! Several LoRAs add up, each with its own `scale`.
//!
//! File formats, told apart key by key:
//! - diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight`;
//! - original / ComfyUI: `diffusion_model.<original module>.lora_A.weight`
//!   (fused `attention.qkv`, `feed_forward.w1..w3`, `adaLN_modulation.1`, ...),
//!   mapped as original checkpoints are; a `qkv` module is split over `to_q`,
//!   `to_k` and `to_v` with the sizes of the config;
//! - kohya: `lora_unet_<original or diffusers module, `.` as `_`>.lora_down.weight`,
//!   looked up among the spellings of the model's own modules.
//!
//! A file's header is read first; the factors of a module are read only once
//! it is matched to a weight of the model and its shapes fit, so a tensor the
//! model does not use is never read.
//!
//! [`LoraSource`] wraps the [`WeightSource`](lumina2_transformer::WeightSource)
//! of any checkpoint: dense weights come merged, quantised (GGUF) weights stay
//! quantised and carry the factors, applied at run time by
//! [`lumina2_weights::Linear`]. The transformer crate is unchanged:
//!
//! ```no_run
//! use std::sync::Arc;
//! use candle_core::{DType, Device};
//! use lumina2_loader::{lora::LoraSource, open_transformer_file, ComponentFolder};
//! use lumina2_transformer::{Config, Lumina2Transformer, WeightSource, Weights};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = Config::from_file("Lumina-Image-2.0/transformer/config.json")?;
//! // A diffusers folder, or a single file (.safetensors, .pth, .gguf):
//! let folder = ComponentFolder::open("Lumina-Image-2.0/transformer")?;
//! let base: Arc<dyn WeightSource> = Arc::new(
//!     lumina2_weights::SafetensorsSource::open(folder.safetensors_files())?,
//! );
//! // let base = open_transformer_file("lumina2-q4_0.gguf".as_ref(), &cfg)?;
//! let loras = [("style.safetensors", 0.8), ("detail.safetensors", 0.5)];
//! let source = LoraSource::open(base, &cfg, &loras)?;
//! let weights = Weights::new(Arc::new(source), DType::BF16, &Device::Cpu);
//! let model = Lumina2Transformer::new(&cfg, &weights)?;
//! # let _ = open_transformer_file; Ok(()) }
//! ```

mod file;
mod keys;
mod source;

pub use file::{LoraFile, LoraModule};
#[doc(hidden)]
pub use keys::ModuleNames;
pub use lumina2_weights::LoraAdapter;
pub use source::LoraSource;
