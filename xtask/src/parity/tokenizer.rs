//! `tokenizer_ids` cases: the token ids and attention masks our
//! `GemmaTokenizer` gives a list of texts, tokenized as `Lumina2Pipeline`
//! calls transformers' tokenizer (`padding="max_length",
//! max_length=max_sequence_length, truncation=True`).
//!
//! `chat_tokenizer` cases: prompts rendered with a tokenizer's chat template
//! and then tokenized the same way, as `ZImagePipeline._encode_prompt` does
//! (our `ChatTokenizer`); the rendered texts are compared too, as UTF-8
//! bytes.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_text_encoder::{ChatTokenizer, GemmaTokenizer};

use super::text_encoder::strings;
use super::{Case, Prepared};

struct TokenizerCase {
    tokenizer: GemmaTokenizer,
    texts: Vec<String>,
    max_len: usize,
}

/// Loads the case's `model` (a `tokenizer.json`, a SentencePiece
/// `tokenizer.model`, or a folder holding either) the way the pipeline does.
pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let (texts, max_len) = texts_and_length(case, "texts")?;
    let model_path = case.model()?;
    let tokenizer = GemmaTokenizer::from_file(model_path)
        .with_context(|| format!("loading {}", model_path.display()))?;
    Ok(Box::new(TokenizerCase {
        tokenizer,
        texts,
        max_len,
    }))
}

/// The case's list of strings `key` and its `max_sequence_length`.
fn texts_and_length(case: &Case, key: &str) -> Result<(Vec<String>, usize)> {
    let a = &case.args;
    let texts = strings(
        a.get(key).ok_or_else(|| anyhow!("args has no `{key}`"))?,
        key,
    )?;
    let max_len = a
        .get("max_sequence_length")
        .and_then(|v| v.as_u64())
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow!("`max_sequence_length` must be a positive integer"))?
        as usize;
    Ok((texts, max_len))
}

struct ChatCase {
    tokenizer: ChatTokenizer,
    prompts: Vec<String>,
    max_len: usize,
}

/// Loads the case's `model`, a tokenizer folder with a chat template.
pub fn prepare_chat(case: &Case) -> Result<Box<dyn Prepared>> {
    let (prompts, max_len) = texts_and_length(case, "prompts")?;
    let model_path = case.model()?;
    let tokenizer = ChatTokenizer::from_folder(model_path)
        .with_context(|| format!("loading {}", model_path.display()))?;
    Ok(Box::new(ChatCase {
        tokenizer,
        prompts,
        max_len,
    }))
}

impl Prepared for ChatCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let rendered = self
            .prompts
            .iter()
            .map(|p| self.tokenizer.render_prompt(p))
            .collect::<lumina2_text_encoder::Result<Vec<_>>>()?;
        // One row of UTF-8 bytes per text, padded with -1 to the longest.
        let width = rendered.iter().map(String::len).max().unwrap_or(0);
        let bytes: Vec<i64> = rendered
            .iter()
            .flat_map(|r| {
                r.bytes()
                    .map(i64::from)
                    .chain(std::iter::repeat(-1))
                    .take(width)
            })
            .collect();
        let t = self
            .tokenizer
            .tokenizer()
            .encode_padded(&rendered, self.max_len)?;
        Ok(BTreeMap::from([
            (
                "rendered_utf8".to_string(),
                Tensor::from_vec(bytes, (rendered.len(), width), &Device::Cpu)?,
            ),
            (
                "input_ids".to_string(),
                to_tensor(&t.input_ids, self.max_len)?,
            ),
            (
                "attention_mask".to_string(),
                to_tensor(&t.attention_mask, self.max_len)?,
            ),
        ]))
    }
}

fn to_tensor(rows: &[Vec<u32>], len: usize) -> Result<Tensor> {
    let flat: Vec<i64> = rows.iter().flatten().map(|&v| i64::from(v)).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), len), &Device::Cpu)?)
}

impl Prepared for TokenizerCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let t = self.tokenizer.encode_padded(&self.texts, self.max_len)?;
        Ok(BTreeMap::from([
            (
                "input_ids".to_string(),
                to_tensor(&t.input_ids, self.max_len)?,
            ),
            (
                "attention_mask".to_string(),
                to_tensor(&t.attention_mask, self.max_len)?,
            ),
        ]))
    }
}
