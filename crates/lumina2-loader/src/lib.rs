//! # lumina2-loader
//!
//! Finds and opens Lumina-Image 2.0 checkpoints for the model crates.
//!
//! Built so far:
//! - [`PipelineFolder`]: a diffusers pipeline folder (`model_index.json`
//!   checked for the Lumina2 pipeline and component classes), handing out each
//!   component's folder and files;
//! - [`ComponentFolder`] (from `lumina2_weights::folder`, shared with the text
//!   encoder): the safetensors files of a component folder, one file or the
//!   shards of a validated `*.safetensors.index.json`;
//! - [`hub`]: the Hugging Face Hub through `hf-hub`, in the cache layout and
//!   with the environment variables of Python's `huggingface_hub` (files it
//!   downloaded are reused; `HF_HUB_OFFLINE` works); [`HubRepo::download_pipeline`]
//!   fetches a whole pipeline;
//! - single-file transformer checkpoints in the original, ComfyUI or diffusers
//!   layout, from `.pth` (read without executing pickle code) or `.safetensors`
//!   ([`open_transformer_file`]); GGUF files ([`gguf`]).
//!
//! - [`lora`]: diffusers/PEFT, original/ComfyUI and kohya LoRA files, several
//!   at once with a scale each, merged into dense weights or kept factored on
//!   quantised ones ([`lora::LoraSource`]).
//!
//! - [`comfy`]: the files ComfyUI users download: the all-in-one
//!   checkpoint, the split Gemma-2 text encoder (with its embedded
//!   SentencePiece tokenizer) and the Flux VAE in Black Forest Labs' key names
//!   ([`bfl_vae`]), recognised from their keys ([`SingleFile`]), each model a
//!   view over the one file, configs inferred from the tensors' shapes.
//!
//! - [`convert`]: a transformer from any of those layouts to a diffusers
//!   folder, the original single file or GGUF (optionally quantised: the
//!   quantisers are in [`gguf`]), one tensor at a time, atomically;
//!   [`comfy_write`]: a whole pipeline (diffusers folder, ComfyUI
//!   checkpoint, or one source per part) to ComfyUI's all-in-one checkpoint
//!   or its split files, losslessly, atomically; [`pipeline_write`]: the
//!   other way, ComfyUI's all-in-one checkpoint or split files to a whole
//!   diffusers `Lumina2Pipeline` folder (tokenizer built from the embedded
//!   SentencePiece model, scheduler of the released model), losslessly,
//!   atomically.
//!
//! - [`gemma_gguf`]: Gemma-2 text encoders from GGUF files in llama.cpp's
//!   key names (the community Gemma-2-2B quantisations), config from the
//!   file's metadata, linear weights kept quantised ([`Gemma2Gguf`]).
//! - [`qwen3_gguf`]: Qwen3 text encoders (Z-Image) from llama.cpp GGUF files
//!   the same way ([`Qwen3Gguf`]); [`qwen3_file`]: a single safetensors
//!   file of it (ComfyUI's `qwen_3_4b.safetensors`, keys under any prefix).
//! - [`zimage_file`]: Z-Image transformers from single files (ComfyUI's
//!   original keys with a fused `qkv`, community GGUF files kept quantised,
//!   diffusers keys), mapped through the same machinery as Lumina2's
//!   original checkpoints ([`model_keys::ModelKeys`]); LoRAs for Z-Image
//!   through [`LoraSource`] with a `ZImageConfig`.
//!
//! ```no_run
//! use lumina2_loader::{Component, HubRepo, PipelineFolder};
//!
//! // A local folder, or the Hub (downloaded once into ~/.cache/huggingface/hub).
//! let local = PipelineFolder::open("Lumina-Image-2.0")?;
//! let hub = HubRepo::new("Alpha-VLLM/Lumina-Image-2.0").download_pipeline(true)?;
//! let shards = hub.component_folder(Component::Transformer)?;
//! println!("{:?} {:?}", local.tokenizer_file(), shards.safetensors_files());
//! # Ok::<(), lumina2_loader::Error>(())
//! ```
//!
//! Features: `download` (default) downloads through `hf-hub`; without it the
//! Hub cache is still read, offline.

#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bfl_vae;
pub mod comfy;
pub mod comfy_write;
pub mod convert;
mod folder;
pub mod gemma_gguf;
pub mod gguf;
mod gguf_source;
pub mod hub;
mod llama_gguf;
pub mod lora;
pub mod model_keys;
pub mod original;
mod pickle_guard;
mod pipeline_folder;
pub mod pipeline_write;
pub mod prefixed;
pub mod pth;
pub mod qwen3_file;
pub mod qwen3_gguf;
mod st_write;
pub mod zimage_file;

pub use comfy::{detect_single_file, GemmaFile, SingleFile, SingleFileLayout};
pub use comfy_write::{convert_to_comfy, ComfyFormat, PipelineParts};
pub use convert::{
    convert_transformer, ConvertError, ConvertFormat, ConvertOptions, ConvertReport,
};
pub use folder::{ComponentFolder, Error, FolderError, ShardIndex};
pub use gemma_gguf::{Gemma2Gguf, GemmaGgufError};
pub use hub::{HubEnv, HubRepo};
pub use lora::{LoraFile, LoraSource};
pub use model_keys::ModelKeys;
pub use original::{detect_layout, infer_config, open_transformer_file, TransformerLayout};
pub use pipeline_folder::{
    Component, PipelineFolder, PipelineKind, PIPELINE_CLASSES, ZIMAGE_PIPELINE_CLASSES,
};
pub use pipeline_write::{convert_to_diffusers_pipeline, PipelineConfigs};
pub use pth::PthFile;
pub use qwen3_file::open_qwen3_file;
pub use qwen3_gguf::{Qwen3Gguf, Qwen3GgufError};
pub use zimage_file::{
    detect_zimage_layout, infer_zimage_config, load_zimage_transformer_file,
    open_zimage_transformer_file, zimage_file_config, ZImageLayout,
};
