//! `text_encoder` (Gemma-2), `qwen3_text_encoder` and `prompt_encoding` cases.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lumina2_text_encoder::{
    Gemma2Encoder, PromptEncoder, PromptOptions, Qwen3Encoder, SystemPrompt,
};

use super::Prepared;
use super::{input, Case};

/// A decoder run as an encoder: `hidden_states[-2]` of token ids and a mask.
enum Encoder {
    Gemma2(Gemma2Encoder),
    Qwen3(Qwen3Encoder),
}

struct TextEncoderCase {
    model: Encoder,
    inputs: BTreeMap<String, Tensor>,
}

/// A `text_encoder` case: `hidden_states[-2]` of the model folder.
pub fn prepare_text_encoder(case: &Case) -> Result<Box<dyn Prepared>> {
    let model_path = case.model()?;
    let model = if model_path.extension().is_some_and(|e| e == "gguf") {
        // llama.cpp's Gemma-2 GGUF: config from the metadata unless given.
        let gguf = lumina2_loader::Gemma2Gguf::open(model_path)?;
        match case.model_config.as_deref() {
            Some(dir) => {
                let cfg = lumina2_text_encoder::Gemma2Config::from_file(dir)?;
                gguf.penultimate_encoder_with_config(&cfg, case.dtype, &Device::Cpu)?
            }
            None => gguf.penultimate_encoder(case.dtype, &Device::Cpu)?,
        }
    } else {
        Gemma2Encoder::from_folder(model_path, case.dtype, &Device::Cpu)
            .with_context(|| format!("loading {}", model_path.display()))?
    };
    Ok(Box::new(TextEncoderCase {
        model: Encoder::Gemma2(model),
        inputs: case.inputs()?,
    }))
}

/// A `qwen3_text_encoder` case: `hidden_states[-2]` of a Qwen3 model folder
/// or llama.cpp GGUF file.
pub fn prepare_qwen3(case: &Case) -> Result<Box<dyn Prepared>> {
    let model_path = case.model()?;
    let model = if model_path.extension().is_some_and(|e| e == "gguf") {
        // llama.cpp's Qwen3 GGUF: config from the metadata unless given.
        let gguf = lumina2_loader::Qwen3Gguf::open(model_path)?;
        match case.model_config.as_deref() {
            Some(dir) => {
                let cfg = lumina2_text_encoder::Qwen3Config::from_file(dir)?;
                gguf.penultimate_encoder_with_config(&cfg, case.dtype, &Device::Cpu)?
            }
            None => gguf.penultimate_encoder(case.dtype, &Device::Cpu)?,
        }
    } else {
        Qwen3Encoder::from_folder(model_path, case.dtype, &Device::Cpu)
            .with_context(|| format!("loading {}", model_path.display()))?
    };
    Ok(Box::new(TextEncoderCase {
        model: Encoder::Qwen3(model),
        inputs: case.inputs()?,
    }))
}

impl Prepared for TextEncoderCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let i = &self.inputs;
        let (ids, mask) = (input(i, "input_ids")?, Some(input(i, "attention_mask")?));
        let out = match &self.model {
            Encoder::Gemma2(m) => m.forward(ids, mask)?,
            Encoder::Qwen3(m) => m.forward(ids, mask)?,
        };
        Ok(BTreeMap::from([(
            "hidden_states".to_string(),
            out.to_dtype(DType::F32)?,
        )]))
    }
}

struct PromptCase {
    encoder: PromptEncoder,
    prompts: Vec<String>,
    opts: PromptOptions,
}

pub(super) fn strings(v: &serde_json::Value, what: &str) -> Result<Vec<String>> {
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow!("`{what}` must be a list of strings"))?;
    arr.iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("`{what}` must be a list of strings"))
        })
        .collect()
}

/// A `prompt_encoding` case: diffusers' `encode_prompt` on a pipeline folder.
pub fn prepare_prompt_encoding(case: &Case) -> Result<Box<dyn Prepared>> {
    let a = &case.args;
    let prompts = strings(
        a.get("prompt")
            .ok_or_else(|| anyhow!("args has no `prompt`"))?,
        "prompt",
    )?;
    let mut opts = PromptOptions::default();
    match a.get("negative_prompt") {
        None | Some(serde_json::Value::Null) => {}
        Some(v) => opts.negative_prompt = Some(strings(v, "negative_prompt")?),
    }
    match a.get("system_prompt") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) => opts.system_prompt = SystemPrompt::Text(s.clone()),
        Some(_) => bail!("`system_prompt` must be a string or null"),
    }
    let uint = |k: &str| -> Result<Option<usize>> {
        match a.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| anyhow!("`{k}` must be a non-negative integer")),
        }
    };
    if let Some(n) = uint("max_sequence_length")? {
        opts.max_sequence_length = n;
    }
    if let Some(n) = uint("num_images_per_prompt")? {
        opts.num_images_per_prompt = n;
    }
    match a.get("do_classifier_free_guidance") {
        None | Some(serde_json::Value::Null) => {}
        Some(v) => {
            opts.do_classifier_free_guidance = v
                .as_bool()
                .ok_or_else(|| anyhow!("`do_classifier_free_guidance` must be a boolean"))?
        }
    }
    let model_path = case.model()?;
    let encoder = PromptEncoder::from_pipeline_folder(model_path, case.dtype, &Device::Cpu)
        .with_context(|| format!("loading {}", model_path.display()))?;
    Ok(Box::new(PromptCase {
        encoder,
        prompts,
        opts,
    }))
}

impl Prepared for PromptCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let out = self.encoder.encode(&self.prompts, &self.opts)?;
        let mut m = BTreeMap::new();
        m.insert(
            "prompt_embeds".to_string(),
            out.prompt_embeds.to_dtype(DType::F32)?,
        );
        m.insert(
            "prompt_attention_mask".to_string(),
            out.prompt_attention_mask,
        );
        if let (Some(e), Some(mask)) = (
            out.negative_prompt_embeds,
            out.negative_prompt_attention_mask,
        ) {
            m.insert(
                "negative_prompt_embeds".to_string(),
                e.to_dtype(DType::F32)?,
            );
            m.insert("negative_prompt_attention_mask".to_string(), mask);
        }
        Ok(m)
    }
}
