//! The pipeline's error type.

use std::path::PathBuf;

/// Errors of the pipeline: invalid options, component errors (with the file,
/// key and shapes those carry), and runs that had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option of the request is invalid; nothing was computed.
    #[error("invalid `{option}`: {reason}")]
    InvalidOption {
        /// The option, named as diffusers' argument.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A file of the pipeline could not be read or is not valid.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The transformer failed (loading or running).
    #[error("transformer: {0}")]
    Transformer(#[from] lumina2_transformer::Error),
    /// The text encoder or tokenizer failed.
    #[error("text encoder: {0}")]
    TextEncoder(#[from] lumina2_text_encoder::Error),
    /// A GGUF text encoder could not be read.
    #[error("text encoder: {0}")]
    TextEncoderGguf(Box<lumina2_loader::GemmaGgufError>),
    /// A Qwen3 GGUF text encoder (Z-Image) could not be read.
    #[error("text encoder: {0}")]
    TextEncoderQwen3Gguf(Box<lumina2_loader::Qwen3GgufError>),
    /// The VAE failed.
    #[error("VAE: {0}")]
    Vae(#[from] lumina2_vae::VaeError),
    /// The scheduler rejected its configuration or inputs.
    #[error("scheduler: {0}")]
    Scheduler(#[from] lumina2_scheduler::SchedulerError),
    /// A checkpoint could not be found or opened.
    #[error("{0}")]
    Loader(#[from] lumina2_loader::Error),
    /// A component folder could not be resolved into its files.
    #[error("{0}")]
    Folder(#[from] lumina2_weights::FolderError),
    /// A weight could not be read.
    #[error("{0}")]
    Weights(#[from] lumina2_weights::Error),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The latents stopped being finite: the run stops instead of decoding a
    /// black image.
    #[error("the latents hold {count} NaN/Inf values after denoising step {step} of {steps}{} (reduce the guidance scale, check the weights, or use f32)", broken_weights_note(.weights))]
    NonFinite {
        /// The 1-based step after which it was found.
        step: usize,
        /// The number of steps of the run.
        steps: usize,
        /// How many values are not finite.
        count: usize,
        /// The weights (`component: key`) found then to hold NaN or
        /// infinity, among those not read at load (used in place from
        /// memory-mapped files); the others were reported when loaded.
        weights: Vec<String>,
    },
    /// The caller's step callback asked to stop.
    #[error("stopped by the caller after step {step} of {steps}")]
    Stopped {
        /// Steps completed.
        step: usize,
        /// Steps planned.
        steps: usize,
    },
    /// The run would need more memory than the machine has.
    #[error("{what} needs about {needed_mib} MiB but only {available_mib} MiB are available; use a smaller size, fewer images, VAE tiling or bf16")]
    OutOfMemory {
        /// What was estimated.
        what: String,
        /// The estimate.
        needed_mib: u64,
        /// Memory available to this process.
        available_mib: u64,
    },
}

impl From<lumina2_loader::GemmaGgufError> for Error {
    fn from(e: lumina2_loader::GemmaGgufError) -> Self {
        Self::TextEncoderGguf(Box::new(e))
    }
}

impl From<lumina2_loader::Qwen3GgufError> for Error {
    fn from(e: lumina2_loader::Qwen3GgufError) -> Self {
        Self::TextEncoderQwen3Gguf(Box::new(e))
    }
}

/// The pipeline's result type.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid(option: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        option,
        reason: reason.into(),
    }
}

/// `; NaN/Inf in the weights a, b, c and N more` (empty when none).
fn broken_weights_note(weights: &[String]) -> String {
    if weights.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = weights.iter().take(5).map(String::as_str).collect();
    let more = weights.len() - shown.len();
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("; NaN/Inf in the weights {}{more}", shown.join(", "))
}
