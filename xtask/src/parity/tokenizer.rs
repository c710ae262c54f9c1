//! `tokenizer_ids` cases: the token ids and attention masks our
//! `GemmaTokenizer` gives a list of texts, tokenized as `Lumina2Pipeline`
//! calls transformers' tokenizer (`padding="max_length",
//! max_length=max_sequence_length, truncation=True`).

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_text_encoder::GemmaTokenizer;

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
    let a = &case.args;
    let texts = strings(
        a.get("texts")
            .ok_or_else(|| anyhow!("args has no `texts`"))?,
        "texts",
    )?;
    let max_len = a
        .get("max_sequence_length")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| anyhow!("`max_sequence_length` must be a positive integer"))?
        as usize;
    let model_path = case.model()?;
    let tokenizer = GemmaTokenizer::from_file(model_path)
        .with_context(|| format!("loading {}", model_path.display()))?;
    Ok(Box::new(TokenizerCase {
        tokenizer,
        texts,
        max_len,
    }))
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
