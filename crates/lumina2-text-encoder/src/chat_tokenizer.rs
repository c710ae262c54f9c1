//! A tokenizer with a chat template (Qwen3's, for Z-Image): diffusers 0.42.1
//! `ZImagePipeline._encode_prompt`'s tokenization.
//!
//! Each prompt becomes the single user message of a chat, rendered with the
//! tokenizer's template (`apply_chat_template(messages, tokenize=False,
//! add_generation_prompt=True, enable_thinking=True)`); the rendered texts
//! are then tokenized with `padding="max_length", max_length=...,
//! truncation=True`. transformers 5.24's `Qwen2Tokenizer` pads and truncates
//! on the right (its defaults; Qwen3's `tokenizer_config.json` sets
//! neither), and adds no special tokens of its own: the template writes
//! `<|im_start|>` and `<|im_end|>` as text, which the tokenizer's added
//! tokens turn into their ids. A prompt longer than `max_length` therefore
//! loses the end of the template (`<|im_end|>` and the assistant header) as
//! it does in diffusers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::chat_template::{read_json, ChatMessage, ChatTemplate};
use crate::error::{Error, Result};
use crate::prompt::{GemmaTokenizer, Tokenized};

/// The named special tokens transformers passes to a chat template
/// (`PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`, those set).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A transformers tokenizer folder with a chat template: `tokenizer.json`,
/// `tokenizer_config.json` (padding token, special tokens, the template) and
/// optionally `chat_template.jinja` (which takes priority over the config's
/// template, as in transformers 5).
#[derive(Debug)]
pub struct ChatTokenizer {
    tokenizer: GemmaTokenizer,
    template: ChatTemplate,
    special_tokens: BTreeMap<String, serde_json::Value>,
    dir: PathBuf,
}

fn tok_err(origin: &Path, reason: impl Into<String>) -> Error {
    Error::Tokenizer {
        origin: origin.display().to_string(),
        reason: reason.into(),
    }
}

/// A special token of a `tokenizer_config.json`: a string, or an
/// `AddedToken` object with `content`.
fn token_string(v: &serde_json::Value) -> Option<&str> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
        _ => None,
    }
}

impl ChatTokenizer {
    /// Loads a tokenizer folder (a pipeline's `tokenizer/`). Its
    /// `tokenizer_config.json` must name a `pad_token` (Qwen3's is
    /// `<|endoftext|>`) and the folder must hold a chat template.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let mut special_tokens = BTreeMap::new();
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(token) = config.get(name).and_then(token_string) {
                special_tokens.insert(name.to_string(), serde_json::Value::from(token));
            }
        }
        if !special_tokens.contains_key("pad_token") {
            return Err(tok_err(
                &config_path,
                "no `pad_token` (padding to max_length needs one)",
            ));
        }
        // Reads the same `pad_token` from the config beside it.
        let tokenizer = GemmaTokenizer::from_file(dir.join("tokenizer.json"))?;
        let template = match ChatTemplate::from_tokenizer_folder(&dir)? {
            Some(t) => t,
            None => {
                return Err(tok_err(
                    &config_path,
                    "no chat template (neither `chat_template` here nor a chat_template.jinja beside it)",
                ))
            }
        };
        Ok(Self {
            tokenizer,
            template,
            special_tokens,
            dir,
        })
    }

    /// The folder the tokenizer was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The tokenizer the rendered texts go through (padding token from the
    /// config, padding and truncation set per call).
    pub fn tokenizer(&self) -> &GemmaTokenizer {
        &self.tokenizer
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt,
    /// **kwargs)`: the template sees the named special tokens and `kwargs`
    /// (a keyword argument overrides a token of the same name).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &BTreeMap<String, serde_json::Value>,
    ) -> Result<String> {
        let mut vars = self.special_tokens.clone();
        vars.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.template.render(messages, add_generation_prompt, &vars)
    }

    /// A prompt as `ZImagePipeline._encode_prompt` renders it: one user
    /// message, `add_generation_prompt=True`, `enable_thinking=True`.
    pub fn render_prompt(&self, prompt: &str) -> Result<String> {
        let kwargs =
            BTreeMap::from([("enable_thinking".to_string(), serde_json::Value::Bool(true))]);
        self.apply_chat_template(&[ChatMessage::user(prompt)], true, &kwargs)
    }

    /// Rendered prompts ([`ChatTokenizer::render_prompt`]) tokenized with
    /// `padding="max_length", max_length=max_len, truncation=True`: ids and
    /// mask `[B][max_len]`, truncated and padded on the right.
    pub fn encode_prompts(&self, prompts: &[String], max_len: usize) -> Result<Tokenized> {
        let rendered = prompts
            .iter()
            .map(|p| self.render_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        self.tokenizer.encode_padded(&rendered, max_len)
    }
}
