//! Lumina-Image 2.0's text conditioning on candle: the Gemma-2 encoder
//! ([`Gemma2Encoder`], transformers' `Gemma2Model` stopped before its last
//! layer, i.e. `hidden_states[-2]`) and the prompt encoding of diffusers'
//! `Lumina2Pipeline.encode_prompt` ([`PromptEncoder`]: system prompt template,
//! padding, truncation, masks, repetition per image); and Z-Image's Qwen3
//! encoder ([`Qwen3Encoder`], transformers' `Qwen3Model`, `hidden_states[-2]`).
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use lumina2_text_encoder::{PromptEncoder, PromptOptions};
//!
//! # fn main() -> lumina2_text_encoder::Result<()> {
//! let enc = PromptEncoder::from_pipeline_folder("Lumina-Image-2.0", DType::BF16, &Device::Cpu)?;
//! let out = enc.encode(&["a cat on a mat"], &PromptOptions::default())?;
//! for w in &out.warnings {
//!     eprintln!("{w}");
//! }
//! println!("{:?}", out.prompt_embeds.dims()); // [1, 256, 2304]
//! # Ok(())
//! # }
//! ```
//!
//! The crate depends on candle, `tokenizers` and minijinja (chat templates:
//! [`ChatTemplate`], [`ChatTokenizer`]) only. Weights come through
//! [`Weights`] (over a [`WeightSource`]: safetensors files, a candle
//! `VarBuilder`, tensors in memory, or a quantised source).
#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod chat_template;
mod chat_tokenizer;
mod config;
mod decoder;
mod embedding;
mod error;
mod model;
mod prompt;
mod qwen3;
mod qwen3_config;
mod sentencepiece;
mod spm_tokenizer;
mod stack;
mod weights;

pub use chat_template::{
    ChatMessage, ChatTemplate, MAX_RENDERED_BYTES, MAX_TEMPLATE_BYTES, TEMPLATE_FUEL,
    TEMPLATE_RECURSION_LIMIT,
};
pub use chat_tokenizer::ChatTokenizer;
pub use config::{Activation, Gemma2Config, LayerType, Rope, MAX_PARAMETERS};
pub use error::{Error, Result};
/// Errors of weight loading (inside [`Error::Weight`]).
pub use lumina2_weights::Error as WeightError;
pub use model::Gemma2Encoder;
pub use prompt::{
    GemmaTokenizer, PromptEmbeddings, PromptEncoder, PromptOptions, SystemPrompt, Tokenized,
    DEFAULT_SYSTEM_PROMPT, MAX_SEQUENCE_LENGTH_LIMIT, SYSTEM_PROMPT_PRESETS,
};
pub use qwen3::Qwen3Encoder;
pub use qwen3_config::Qwen3Config;
pub use sentencepiece::{
    PieceType, SentencePieceError, SentencePieceModel, MAX_SENTENCEPIECE_BYTES,
};
pub use spm_tokenizer::MAX_MERGE_WORK;
pub use weights::{
    safetensors_files, Linear, LinearWeight, SafetensorsSource, VarBuilderSource, WeightSource,
    Weights,
};
