//! The Gemma-2 decoder stack, run as an encoder: transformers' `Gemma2Model`
//! (eager attention) up to a chosen layer.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::ops;
use lumina2_kernels::profile::{groups, span};

use crate::config::{Activation, Gemma2Config, LayerType};
use crate::embedding::Embedding;
use crate::error::{invalid_input, Error, Result};
use crate::weights::{safetensors_files, Linear, Weights};

/// The most negative finite value of `dtype` (`torch.finfo(dtype).min`), as f32.
fn dtype_min(dtype: DType) -> f32 {
    match dtype {
        // bf16 0xFF7F: -3.3895314e38, exactly representable in f32.
        DType::BF16 => f32::from_bits(0xFF7F_0000),
        DType::F16 => -65504.0,
        _ => f32::MIN,
    }
}

/// Gemma's RMSNorm: `x / sqrt(mean(x^2) + eps) * (1 + w)`, computed in float32
/// (`1 + w` is precomputed at load), the result cast back to the input dtype.
#[derive(Debug, Clone)]
struct RmsNorm {
    one_plus_w: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get_as(&format!("{name}.weight"), &[dim], DType::F32)?;
        Ok(Self {
            one_plus_w: (weight + 1.0)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = span(groups::NORM);
        Ok(ops::norm::rms_norm_f32(x, &self.one_plus_w, self.eps)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scaling: f64,
    softcap: Option<f64>,
}

/// `x * cos + rotate_half(x) * sin`, rounded after each op in a half dtype
/// as PyTorch computes it.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(ops::rope::rotate_half(x, cos, sin)?)
}

impl Attention {
    fn load(w: &Weights, cfg: &Gemma2Config) -> Result<Self> {
        let (h, kv, hd, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
            cfg.hidden_size,
        );
        let bias = cfg.attention_bias;
        Ok(Self {
            q: w.linear("q_proj", d, h * hd, bias)?,
            k: w.linear("k_proj", d, kv * hd, bias)?,
            v: w.linear("v_proj", d, kv * hd, bias)?,
            o: w.linear("o_proj", h * hd, d, bias)?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
            scaling: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    /// `mask`: additive float32 `[B, 1, L, L]`.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, l, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q.forward(x)?, self.heads)?;
        let k = split(self.k.forward(x)?, self.kv_heads)?;
        let v = split(self.v.forward(x)?, self.kv_heads)?;
        let (q, k) = {
            let _span = span(groups::ROPE);
            (apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?)
        };
        let _span = span(groups::ATTENTION);
        // transformers' eager attention, every op rounded in a half dtype.
        let out = ops::attention::eager(&q, &k, &v, mask, self.scaling, self.softcap)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        drop(_span);
        Ok(self.o.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn load(w: &Weights, cfg: &Gemma2Config) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: w.linear("gate_proj", d, i, false)?,
            up: w.linear("up_proj", d, i, false)?,
            down: w.linear("down_proj", i, d, false)?,
            act: cfg.activation()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if self.act == Activation::GeluTanh {
            // One parallel pass for bf16 and f32 (the same two roundings as
            // below; GGUF weights on AMX without the two intermediates);
            // other dtypes fall back to candle's ops.
            let act = lumina2_weights::GateAct::GeluTanh;
            return Ok(self.gate.feed_forward(&self.up, &self.down, x, act)?);
        }
        // The activation in float32, rounded once, as PyTorch does for bf16/f16.
        let g = self.gate.forward(x)?.to_dtype(DType::F32)?;
        let g = match self.act {
            Activation::GeluTanh => g.gelu()?,
            Activation::GeluErf => g.gelu_erf()?,
            Activation::Silu => g.silu()?,
            Activation::Relu => g.relu()?,
        }
        .to_dtype(dtype)?;
        let h = (g * self.up.forward(x)?)?;
        Ok(self.down.forward(&h)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    layer_type: LayerType,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &Gemma2Config, layer_type: LayerType) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(w, "input_layernorm", d, eps)?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(w, "post_attention_layernorm", d, eps)?,
            pre_feedforward_layernorm: RmsNorm::load(w, "pre_feedforward_layernorm", d, eps)?,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
            post_feedforward_layernorm: RmsNorm::load(w, "post_feedforward_layernorm", d, eps)?,
            layer_type,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self.self_attn.forward(&h, cos, sin, mask)?;
        let h = self.post_attention_layernorm.forward(&h)?;
        let x = residual(x, &h)?;
        let h = self.pre_feedforward_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        let h = self.post_feedforward_layernorm.forward(&h)?;
        residual(&x, &h)
    }
}

/// `x + h`, rounded once in a half dtype (PyTorch's `add`).
fn residual(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let _span = span(groups::ELEMENTWISE);
    Ok(ops::elementwise::add(x, h)?)
}

/// Gemma-2 as Lumina-Image 2.0's text encoder.
///
/// Equal to transformers' `Gemma2Model` with eager attention, but it stops
/// early: [`Gemma2Encoder::penultimate`] loads and runs the first
/// `num_hidden_layers - 1` decoder layers and returns their output, which is
/// `Gemma2Model(..., output_hidden_states=True).hidden_states[-2]`, the
/// hidden states that *enter* the last decoder layer. Lumina-Image 2.0
/// conditions on exactly those, so the last layer, the final norm and the LM
/// head would only cost memory and time: they are neither loaded nor run.
/// [`Gemma2Encoder::new`] loads any number of layers for callers that want
/// another depth, and [`Gemma2Encoder::forward_to_layer`] stops at any loaded
/// depth (`hidden_states[n]`).
///
/// Padding: `attention_mask` (1 = token, 0 = padding) is combined with the
/// causal (and sliding-window) mask exactly as transformers' masking utilities
/// do: padded keys are masked with the dtype's most negative value, and a
/// query row whose keys are all masked (a padded position beyond the sliding
/// window of every real token, or a sequence with no token at all) gets a
/// uniform softmax over all positions, as PyTorch computes it. Outputs at
/// padded positions therefore match transformers too.
#[derive(Debug, Clone)]
pub struct Gemma2Encoder {
    embed_tokens: Embedding,
    embed_scale: Tensor,
    layers: Vec<DecoderLayer>,
    inv_freq: Vec<f32>,
    sliding_window: Option<usize>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    dtype: DType,
    device: Device,
}

impl Gemma2Encoder {
    /// Loads the embeddings and the first `num_layers` decoder layers.
    ///
    /// Keys are looked up with and without transformers' `model.` prefix
    /// (`Gemma2ForCausalLM` checkpoints have it, `Gemma2Model` ones do not).
    pub fn new(cfg: &Gemma2Config, weights: &Weights, num_layers: usize) -> Result<Self> {
        cfg.validate()?;
        if num_layers > cfg.num_hidden_layers {
            return Err(Error::InvalidConfig(format!(
                "cannot load {num_layers} layers: the config has {}",
                cfg.num_hidden_layers
            )));
        }
        let w = if !weights.contains("embed_tokens.weight")
            && weights.contains("model.embed_tokens.weight")
        {
            weights.pp("model")
        } else {
            weights.clone()
        };
        let dtype = w.dtype();
        let device = w.device().clone();
        let embed_tokens = Embedding::load(&w, "embed_tokens", cfg.vocab_size, cfg.hidden_size)?;
        // transformers: torch.tensor(hidden_size ** 0.5) (float32) cast to the weights' dtype.
        let scale = (cfg.hidden_size as f64).sqrt() as f32;
        let embed_scale = Tensor::new(scale, &device)?.to_dtype(dtype)?;
        let types = cfg.layer_types()?;
        let mut layers = Vec::with_capacity(num_layers);
        for (i, t) in types.iter().take(num_layers).enumerate() {
            layers.push(DecoderLayer::load(&w.pp(format!("layers.{i}")), cfg, *t)?);
        }
        let rope = cfg.rope()?;
        let hd = cfg.head_dim();
        // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in float32;
        // `linear` scaling divides the frequencies by its factor.
        let inv_freq = (0..hd / 2)
            .map(|i| {
                let e = (2 * i) as f32 / hd as f32;
                let f = 1.0f32 / (rope.theta as f32).powf(e);
                if rope.linear_factor == 1.0 {
                    f
                } else {
                    f / rope.linear_factor as f32
                }
            })
            .collect();
        Ok(Self {
            embed_tokens,
            embed_scale,
            layers,
            inv_freq,
            sliding_window: cfg.sliding_window,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            dtype,
            device,
        })
    }

    /// Loads what `hidden_states[-2]` needs: all decoder layers but the last.
    pub fn penultimate(cfg: &Gemma2Config, weights: &Weights) -> Result<Self> {
        if cfg.num_hidden_layers == 0 {
            return Err(Error::InvalidConfig(
                "a model without decoder layers has no penultimate hidden state".into(),
            ));
        }
        Self::new(cfg, weights, cfg.num_hidden_layers - 1)
    }

    /// Opens a transformers folder (`config.json` and safetensors, sharded or
    /// not, stored in any float dtype) and loads [`Gemma2Encoder::penultimate`],
    /// computing in `dtype` on `device`.
    pub fn from_folder(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let cfg = Gemma2Config::from_file(path)?;
        let files = safetensors_files(path)?;
        let weights = Weights::from_safetensors(&files, dtype, device)?;
        Self::penultimate(&cfg, &weights)
    }

    /// Number of loaded (and run) decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layers of the checkpoint (`num_hidden_layers`).
    pub fn num_hidden_layers(&self) -> usize {
        self.num_hidden_layers
    }

    /// Width of the returned hidden states.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The hidden states after all loaded layers, `[B, L, hidden_size]` in the
    /// compute dtype (with [`Gemma2Encoder::penultimate`]: `hidden_states[-2]`).
    ///
    /// `input_ids`: `[B, L]` integer token ids; `attention_mask`: `[B, L]`,
    /// nonzero for tokens, 0 for padding (`None`: no padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_to_layer(input_ids, attention_mask, self.layers.len())
    }

    /// `hidden_states[n]` of transformers: the embeddings for `n = 0`, else the
    /// output of decoder layer `n - 1`. `n` cannot exceed [`Self::num_layers`].
    pub fn forward_to_layer(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        n: usize,
    ) -> Result<Tensor> {
        if n > self.layers.len() {
            return Err(invalid_input(
                "n",
                format!("layer {n} asked, only {} loaded", self.layers.len()),
            ));
        }
        let (b, l, ids) = self.check_ids(input_ids)?;
        let keep = self.check_mask(attention_mask, b, l)?;
        let x = self
            .embed_tokens
            .lookup(&ids, self.hidden_size, &self.device)?
            .reshape((b, l, self.hidden_size))?;
        let mut x = x.broadcast_mul(&self.embed_scale)?;
        if n == 0 {
            return Ok(x);
        }
        let (cos, sin) = self.rope(l)?;
        let full = self.mask(&keep, b, l, None)?;
        let sliding = match self.sliding_window {
            Some(w)
                if self.layers[..n]
                    .iter()
                    .any(|ly| ly.layer_type == LayerType::Sliding) =>
            {
                Some(self.mask(&keep, b, l, Some(w))?)
            }
            _ => None,
        };
        for layer in &self.layers[..n] {
            let mask = match (layer.layer_type, &sliding) {
                (LayerType::Sliding, Some(m)) => m,
                _ => &full,
            };
            x = layer.forward(&x, &cos, &sin, mask)?;
        }
        Ok(x)
    }

    fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize, Vec<u32>)> {
        let (b, l) = input_ids.dims2().map_err(|_| {
            invalid_input(
                "input_ids",
                format!("shape {:?}, expected [B, L]", input_ids.dims()),
            )
        })?;
        if b == 0 || l == 0 {
            return Err(invalid_input("input_ids", "empty batch or sequence"));
        }
        let vals: Vec<i64> = match input_ids.dtype() {
            DType::U8 | DType::U32 | DType::I64 | DType::I32 | DType::I16 => input_ids
                .to_device(&Device::Cpu)?
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?,
            other => {
                return Err(invalid_input(
                    "input_ids",
                    format!("dtype {other:?}, expected an integer dtype"),
                ))
            }
        };
        let mut ids = Vec::with_capacity(vals.len());
        for v in vals {
            if v < 0 || v as u64 >= self.vocab_size as u64 {
                return Err(invalid_input(
                    "input_ids",
                    format!(
                        "token id {v} outside the vocabulary [0, {})",
                        self.vocab_size
                    ),
                ));
            }
            ids.push(v as u32);
        }
        Ok((b, l, ids))
    }

    fn check_mask(&self, mask: Option<&Tensor>, b: usize, l: usize) -> Result<Vec<bool>> {
        let Some(m) = mask else {
            return Ok(vec![true; b * l]);
        };
        if m.dims() != [b, l] {
            return Err(invalid_input(
                "attention_mask",
                format!("shape {:?}, expected [{b}, {l}] as input_ids", m.dims()),
            ));
        }
        let v = m
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok(v.into_iter().map(|x| x != 0.0).collect())
    }

    /// cos, sin: `[L, head_dim]` in the compute dtype (computed in float32, as
    /// transformers' rotary embedding does, then cast).
    fn rope(&self, l: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut freqs = Vec::with_capacity(l * half * 2);
        for p in 0..l {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            freqs.extend_from_slice(&row);
            freqs.extend_from_slice(&row);
        }
        let emb = Tensor::from_vec(freqs, (l, half * 2), &self.device)?;
        Ok((
            emb.cos()?.to_dtype(self.dtype)?,
            emb.sin()?.to_dtype(self.dtype)?,
        ))
    }

    /// Additive float32 mask `[B, 1, L, L]`: 0 where query q may see key k
    /// (k <= q, k not padding, and within the window: k > q - window), else
    /// the compute dtype's most negative value (transformers' `eager_mask`).
    fn mask(&self, keep: &[bool], b: usize, l: usize, window: Option<usize>) -> Result<Tensor> {
        let neg = dtype_min(self.dtype);
        let mut m = vec![0f32; b * l * l];
        for bi in 0..b {
            for q in 0..l {
                for k in 0..l {
                    let in_window = window.is_none_or(|w| k + w > q);
                    let ok = k <= q && keep[bi * l + k] && in_window;
                    if !ok {
                        m[(bi * l + q) * l + k] = neg;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, l, l), &self.device)?)
    }
}
