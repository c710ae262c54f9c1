//! Prompt encoding: diffusers' `Lumina2Pipeline.encode_prompt` (0.42.1).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{invalid_input, Error, Result};
use crate::model::Gemma2Encoder;

/// diffusers' default system prompt (`Lumina2Pipeline.system_prompt`), which
/// is also the `real` preset of the original sampling script.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are an assistant designed to generate superior images with the superior degree of image-text alignment based on textual prompts or user prompts.";

/// The longest `max_sequence_length` diffusers accepts.
pub const MAX_SEQUENCE_LENGTH_LIMIT: usize = 512;

/// The system prompts of the original Lumina-Image 2.0 sampling script
/// (Alpha-VLLM/Lumina-Image-2.0, `sample.py`, `--system_type`, commit
/// 4a4d6f8), by name, without their ` <Prompt Start> ` suffix. `empty` is
/// [`SystemPrompt::None`]: no template at all.
pub const SYSTEM_PROMPT_PRESETS: [(&str, &str); 5] = [
    (
        "align",
        "You are an assistant designed to generate high-quality images with the highest degree of image-text alignment based on textual prompts.",
    ),
    (
        "base",
        "You are an assistant designed to generate high-quality images based on user prompts.",
    ),
    (
        "aesthetics",
        "You are an assistant designed to generate high-quality images with highest degree of aesthetics based on user prompts.",
    ),
    ("real", DEFAULT_SYSTEM_PROMPT),
    (
        "4grid",
        "You are an assistant designed to generate four high-quality images with highest degree of aesthetics arranged in 2x2 grids based on user prompts.",
    ),
];

/// What goes in front of each (positive) prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemPrompt {
    /// `text + " <Prompt Start> " + prompt`, as diffusers builds it.
    Text(String),
    /// The prompt alone (the original script's `empty` preset).
    None,
}

impl Default for SystemPrompt {
    /// [`DEFAULT_SYSTEM_PROMPT`], as diffusers.
    fn default() -> Self {
        Self::Text(DEFAULT_SYSTEM_PROMPT.to_string())
    }
}

impl SystemPrompt {
    /// A preset of the original sampling script by its `--system_type` name:
    /// `align`, `base`, `aesthetics`, `real`, `4grid` or `empty`.
    pub fn preset(name: &str) -> Result<Self> {
        if name == "empty" {
            return Ok(Self::None);
        }
        SYSTEM_PROMPT_PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| Self::Text((*t).to_string()))
            .ok_or_else(|| {
                invalid_input(
                    "system_prompt",
                    format!(
                        "unknown preset `{name}` (known: align, base, aesthetics, real, 4grid, empty)"
                    ),
                )
            })
    }

    /// The text the tokenizer sees for `prompt`.
    pub fn apply(&self, prompt: &str) -> String {
        match self {
            Self::Text(s) => format!("{s} <Prompt Start> {prompt}"),
            Self::None => prompt.to_string(),
        }
    }
}

/// Token ids and masks of a batch, padded on the right to a fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// `[B][max_len]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][max_len]`: 1 for tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// For each text, the part cut by truncation (decoded), if any.
    pub truncated: Vec<Option<String>>,
}

impl Tokenized {
    /// Positions up to the last real token of the longest row (0 for an
    /// empty batch or all padding). The padding is on the right, so the
    /// columns past it are padding in every row.
    pub fn longest(&self) -> usize {
        self.attention_mask
            .iter()
            .map(|row| row.iter().rposition(|&m| m != 0).map_or(0, |j| j + 1))
            .max()
            .unwrap_or(0)
    }
}

/// The model's tokenizer (its `tokenizer.json`, or built from a SentencePiece
/// `tokenizer.model`), with its special tokens and post-processor
/// (Gemma's prepends `<bos>`), padded on the right as diffusers sets it.
#[derive(Clone)]
pub struct GemmaTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    origin: String,
}

impl std::fmt::Debug for GemmaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GemmaTokenizer")
            .field("origin", &self.origin)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn tok_err(origin: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        origin: origin.to_string(),
        reason: e.to_string(),
    }
}

/// The `pad_token` of a transformers `tokenizer_config.json` or
/// `special_tokens_map.json` (a string, or an object with `content`).
fn configured_pad_token(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = dir.join(name);
        if !p.exists() {
            continue;
        }
        let text =
            lumina2_weights::fs::read_to_string_bounded(&p, lumina2_weights::fs::MAX_CONFIG_BYTES)
                .map_err(|source| Error::Io {
                    path: p.clone(),
                    source,
                })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                origin: p.display().to_string(),
                source,
            })?;
        match json.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(serde_json::Value::Object(o)) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Ok(Some(s.to_string()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

impl GemmaTokenizer {
    /// Reads `tokenizer.json` (a file, or a folder holding it; a folder with
    /// only a SentencePiece `tokenizer.model` is read with
    /// [`GemmaTokenizer::from_sentencepiece`]). The padding token is the
    /// folder's `tokenizer_config.json` / `special_tokens_map.json`
    /// `pad_token` when present, else `<pad>` (Gemma's).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path: PathBuf = path.as_ref().to_path_buf();
        if path.is_dir() {
            let spm = path.join("tokenizer.model");
            path = path.join("tokenizer.json");
            if !path.exists() && spm.exists() {
                return Self::from_sentencepiece_file(&spm);
            }
        } else if path.extension().is_some_and(|e| e == "model") {
            return Self::from_sentencepiece_file(&path);
        }
        let origin = path.display().to_string();
        let text = lumina2_weights::fs::read_to_string_bounded(
            &path,
            lumina2_weights::fs::MAX_TOKENIZER_BYTES,
        )
        .map_err(|e| tok_err(&origin, e))?;
        // The tokenizers crate panics (an `expect` in its decoder and
        // normalizer deserialisers) on some malformed files, a truncated one
        // among them: check the JSON syntax first, and turn any panic left
        // into an error.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| tok_err(&origin, format!("not valid JSON: {e}")))?;
        let parsed = std::panic::catch_unwind(|| text.parse::<Tokenizer>()).map_err(|_| {
            tok_err(
                &origin,
                "malformed tokenizer.json (the tokenizers crate could not read it)",
            )
        })?;
        let inner = parsed.map_err(|e| tok_err(&origin, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let pad_token = configured_pad_token(dir)?.unwrap_or_else(|| "<pad>".to_string());
        Self::wrap(inner, &pad_token, origin)
    }

    /// The tokenizer transformers 5.24's `GemmaTokenizer` builds from a
    /// SentencePiece BPE `tokenizer.model` given as bytes (a file's content,
    /// or ComfyUI's `spiece_model` tensor): same vocabulary, merges, byte
    /// fallback, normaliser, special tokens and `<bos>` prefix, hence the same
    /// ids. `origin` names where the bytes came from in error messages (e.g.
    /// `lumina_2.safetensors: text_encoders.spiece_model`). The padding token
    /// is `<pad>`.
    pub fn from_sentencepiece(bytes: &[u8], origin: &str) -> Result<GemmaTokenizer> {
        let spm_err = |source| Error::SentencePiece {
            origin: origin.to_string(),
            source,
        };
        let model = crate::sentencepiece::parse(bytes).map_err(spm_err)?;
        let inner = crate::spm_tokenizer::build(&model).map_err(spm_err)?;
        Self::wrap(inner, "<pad>", origin.to_string())
    }

    /// [`GemmaTokenizer::from_sentencepiece`] on a `tokenizer.model` file;
    /// the folder's configured `pad_token` applies as in
    /// [`GemmaTokenizer::from_file`].
    fn from_sentencepiece_file(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let bytes = lumina2_weights::fs::read_bounded(
            path,
            crate::sentencepiece::MAX_SENTENCEPIECE_BYTES as u64,
        )
        .map_err(|e| tok_err(&origin, e))?;
        let model = Self::from_sentencepiece(&bytes, &origin)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        match configured_pad_token(dir)? {
            Some(pad) => Self::wrap(model.inner, &pad, origin),
            None => Ok(model),
        }
    }

    /// Padding and truncation off (transformers sets them per call) and the
    /// padding token's id looked up.
    fn wrap(mut inner: Tokenizer, pad_token: &str, origin: String) -> Result<Self> {
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(&origin, e))?;
        let pad_id = inner.token_to_id(pad_token).ok_or_else(|| {
            tok_err(
                &origin,
                format!("padding token `{pad_token}` is not in the vocabulary"),
            )
        })?;
        Ok(Self {
            inner,
            pad_id,
            origin,
        })
    }

    /// The padding token id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer (padding and truncation off).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// `tokenizer.encode(text, add_special_tokens)`, with a panic of the
    /// tokenizers crate (it has `expect`s on inconsistent files, e.g. a
    /// post-processor naming a special token the vocabulary lacks) turned
    /// into an error.
    fn guarded_encode(&self, tokenizer: &Tokenizer, text: &str) -> Result<tokenizers::Encoding> {
        match std::panic::catch_unwind(|| tokenizer.encode(text, true)) {
            Ok(r) => r.map_err(|e| tok_err(&self.origin, e)),
            Err(_) => Err(tok_err(
                &self.origin,
                "inconsistent tokenizer.json (the tokenizers crate failed while encoding)",
            )),
        }
    }

    /// Tokenizes as transformers does with `padding="max_length",
    /// max_length=max_len, truncation=True`: special tokens added by the
    /// post-processor, the text truncated on the right so that the result
    /// (special tokens included) fits `max_len`, then padded on the right.
    pub fn encode_padded(&self, texts: &[String], max_len: usize) -> Result<Tokenized> {
        if max_len == 0 {
            return Err(invalid_input("max_sequence_length", "must be positive"));
        }
        let mut truncating = self.inner.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| tok_err(&self.origin, e))?;
        let mut out = Tokenized {
            input_ids: Vec::with_capacity(texts.len()),
            attention_mask: Vec::with_capacity(texts.len()),
            truncated: Vec::with_capacity(texts.len()),
        };
        for text in texts {
            let enc = self.guarded_encode(&truncating, text)?;
            let mut ids = enc.get_ids().to_vec();
            if ids.len() > max_len {
                return Err(tok_err(
                    &self.origin,
                    format!(
                        "{} tokens after truncation to {max_len} (the special tokens alone do not fit)",
                        ids.len()
                    ),
                ));
            }
            let full = self.guarded_encode(&self.inner, text)?;
            let cut = if full.get_ids().len() > ids.len() {
                // The text tokens beyond those kept are what truncation removed.
                let kept = enc
                    .get_special_tokens_mask()
                    .iter()
                    .filter(|&&s| s == 0)
                    .count();
                let removed: Vec<u32> = full
                    .get_ids()
                    .iter()
                    .zip(full.get_special_tokens_mask())
                    .filter(|(_, &s)| s == 0)
                    .skip(kept)
                    .map(|(&id, _)| id)
                    .collect();
                Some(
                    self.inner
                        .decode(&removed, false)
                        .map_err(|e| tok_err(&self.origin, e))?,
                )
            } else {
                None
            };
            let n = ids.len();
            let mut mask = vec![1u32; n];
            ids.resize(max_len, self.pad_id);
            mask.resize(max_len, 0);
            out.input_ids.push(ids);
            out.attention_mask.push(mask);
            out.truncated.push(cut);
        }
        Ok(out)
    }
}

/// How to encode prompts (diffusers' `encode_prompt` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptOptions {
    /// Put in front of every positive prompt (not the negative ones).
    pub system_prompt: SystemPrompt,
    /// One negative prompt per prompt, or one for all; `None`: `""`.
    pub negative_prompt: Option<Vec<String>>,
    /// Whether to encode the negative prompts too.
    pub do_classifier_free_guidance: bool,
    /// Each prompt's embeddings are repeated this many times.
    pub num_images_per_prompt: usize,
    /// Tokens per sequence after padding/truncation (at most 512).
    pub max_sequence_length: usize,
    /// `false` (diffusers): every row has `max_sequence_length` positions.
    /// `true`: the batch ends after its longest prompt's last token; the
    /// positions past it are padding in every row, and they are neither
    /// computed nor returned. The padding is on the right and Gemma-2 is
    /// causal, so the real tokens' states do not depend on it (up to a
    /// matmul's order of summation), and a short prompt costs a fraction of
    /// `max_sequence_length` positions. The padded positions that remain
    /// may differ (one whose keys are all masked averages over every
    /// position, as in PyTorch); Lumina's transformer drops padded caption
    /// rows, so its output does not change.
    pub trim_padding: bool,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self {
            system_prompt: SystemPrompt::default(),
            negative_prompt: None,
            do_classifier_free_guidance: true,
            num_images_per_prompt: 1,
            max_sequence_length: 256,
            trim_padding: false,
        }
    }
}

/// Encoded prompts: what Lumina's transformer receives.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// `[B * num_images_per_prompt, L, D]` in the encoder's dtype; `L` is
    /// `max_sequence_length`, or the longest prompt's length with
    /// [`PromptOptions::trim_padding`].
    pub prompt_embeds: Tensor,
    /// `[B * num_images_per_prompt, L]` int64 on the CPU, 1 for tokens, 0 for padding.
    pub prompt_attention_mask: Tensor,
    /// As `prompt_embeds`, for the negative prompts (with guidance only).
    pub negative_prompt_embeds: Option<Tensor>,
    /// As `prompt_attention_mask`, for the negative prompts (with guidance only).
    pub negative_prompt_attention_mask: Option<Tensor>,
    /// Warnings for the user, such as the text truncation removed.
    pub warnings: Vec<String>,
}

/// Tokenizer and text encoder: diffusers' `Lumina2Pipeline.encode_prompt`.
///
/// Differences from diffusers 0.42.1, both deliberate:
/// - with several prompts and `num_images_per_prompt > 1`, diffusers repeats
///   the embeddings per prompt (`p0 p0 p1 p1`) but the masks per batch
///   (`m0 m1 m0 m1`), so masks and embeddings disagree; here both are
///   repeated per prompt and stay aligned;
/// - a truncation warning quotes the text tokens that were actually cut
///   (diffusers' slice `[max_len - 1 : -1]` of the untruncated ids drops the
///   last one and includes one kept token); it is returned in
///   [`PromptEmbeddings::warnings`] instead of being logged.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    tokenizer: GemmaTokenizer,
    encoder: Gemma2Encoder,
}

impl PromptEncoder {
    /// From a tokenizer and an encoder (usually [`Gemma2Encoder::penultimate`]).
    pub fn new(tokenizer: GemmaTokenizer, encoder: Gemma2Encoder) -> Self {
        Self { tokenizer, encoder }
    }

    /// Opens a diffusers pipeline folder: `tokenizer/tokenizer.json` and the
    /// `text_encoder/` transformers folder, computing in `dtype` on `device`.
    pub fn from_pipeline_folder(
        path: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tokenizer = GemmaTokenizer::from_file(path.join("tokenizer"))?;
        let encoder = Gemma2Encoder::from_folder(path.join("text_encoder"), dtype, device)?;
        Ok(Self::new(tokenizer, encoder))
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &GemmaTokenizer {
        &self.tokenizer
    }

    /// The text encoder.
    pub fn encoder(&self) -> &Gemma2Encoder {
        &self.encoder
    }

    /// Encodes a batch of prompts.
    pub fn encode<S: AsRef<str>>(
        &self,
        prompts: &[S],
        opts: &PromptOptions,
    ) -> Result<PromptEmbeddings> {
        if prompts.is_empty() {
            return Err(invalid_input("prompt", "no prompt"));
        }
        if opts.max_sequence_length == 0 || opts.max_sequence_length > MAX_SEQUENCE_LENGTH_LIMIT {
            return Err(invalid_input(
                "max_sequence_length",
                format!(
                    "{} is not in [1, {MAX_SEQUENCE_LENGTH_LIMIT}]",
                    opts.max_sequence_length
                ),
            ));
        }
        if opts.num_images_per_prompt == 0 {
            return Err(invalid_input("num_images_per_prompt", "must be positive"));
        }
        let texts: Vec<String> = prompts
            .iter()
            .map(|p| opts.system_prompt.apply(p.as_ref()))
            .collect();
        let negatives: Vec<String> = if opts.do_classifier_free_guidance {
            match &opts.negative_prompt {
                None => vec![String::new(); prompts.len()],
                Some(n) if n.len() == prompts.len() => n.clone(),
                Some(n) if n.len() == 1 => vec![n[0].clone(); prompts.len()],
                Some(n) => {
                    return Err(invalid_input(
                        "negative_prompt",
                        format!("{} negative prompts for {} prompts", n.len(), prompts.len()),
                    ))
                }
            }
        } else {
            Vec::new()
        };
        // Prompts and negative prompts go through the encoder as one batch:
        // diffusers encodes them in two calls, but every row is computed on
        // its own (its own mask, per-token layers), so one call gives the
        // same rows while reading the weights once instead of twice.
        let b = texts.len();
        let all: Vec<String> = texts.into_iter().chain(negatives).collect();
        let mut warnings = Vec::new();
        let (embeds, mask) = self.encode_texts(&all, opts, &mut warnings)?;
        let n = opts.num_images_per_prompt;
        let (prompt_embeds, prompt_attention_mask) =
            repeat_rows(embeds.narrow(0, 0, b)?, mask.narrow(0, 0, b)?, n)?;
        let (negative_prompt_embeds, negative_prompt_attention_mask) = if all.len() > b {
            let (e, m) = repeat_rows(embeds.narrow(0, b, b)?, mask.narrow(0, b, b)?, n)?;
            (Some(e), Some(m))
        } else {
            (None, None)
        };
        Ok(PromptEmbeddings {
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            warnings,
        })
    }

    fn encode_texts(
        &self,
        texts: &[String],
        opts: &PromptOptions,
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Tensor)> {
        let max_len = opts.max_sequence_length;
        let tok = self.tokenizer.encode_padded(texts, max_len)?;
        for cut in tok.truncated.iter().flatten() {
            warnings.push(format!(
                "The following part of your input was truncated because Gemma can only handle sequences up to {max_len} tokens: {cut:?}"
            ));
        }
        let b = texts.len();
        let dev = self.encoder.device();
        // Positions kept per row: all, or up to the longest prompt's last
        // token (at least one, so that the shapes stay valid).
        let len = if opts.trim_padding {
            tok.longest().clamp(1, max_len)
        } else {
            max_len
        };
        let ids: Vec<u32> = tok
            .input_ids
            .iter()
            .flat_map(|row| row[..len].iter().copied())
            .collect();
        let mask: Vec<i64> = tok
            .attention_mask
            .iter()
            .flat_map(|row| row[..len].iter().map(|&m| i64::from(m)))
            .collect();
        let ids = Tensor::from_vec(ids, (b, len), dev)?;
        let mask = Tensor::from_vec(mask, (b, len), &Device::Cpu)?;
        let embeds = self.encoder.forward(&ids, Some(&mask))?;
        Ok((embeds, mask))
    }
}

/// Each row of `embeds` and `mask` repeated `n` times (p0 p0 p1 p1), as
/// diffusers repeats them for `num_images_per_prompt`.
fn repeat_rows(embeds: Tensor, mask: Tensor, n: usize) -> Result<(Tensor, Tensor)> {
    if n == 1 {
        return Ok((embeds, mask));
    }
    let b = embeds.dim(0)?;
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    let idx_dev = Tensor::from_vec(idx.clone(), b * n, embeds.device())?;
    let idx_cpu = Tensor::from_vec(idx, b * n, &Device::Cpu)?;
    Ok((
        embeds.index_select(&idx_dev, 0)?,
        mask.index_select(&idx_cpu, 0)?,
    ))
}
