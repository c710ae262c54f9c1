//! The whole model: embeddings, context and noise refiners, joint blocks,
//! output norm and unpatchify.

use candle_core::{DType, Device, Tensor};

use crate::attention::KeyMask;
use crate::block::TransformerBlock;
use crate::config::Config;
use crate::embed::{patchify, unpatchify, CaptionEmbedder, TimestepEmbedder};
use crate::error::{invalid_input, Result};
use crate::norm::OutputNorm;
use crate::rope::{Position, Rope, RopeEmbedder};
use crate::weights::{Linear, Weights};

/// RoPE base of every axis (diffusers builds `Lumina2RotaryPosEmbed(theta=10000)`).
pub const ROPE_THETA: f64 = 10000.0;

/// diffusers' `Lumina2Transformer2DModel` (NextDiT), inference only.
#[derive(Debug, Clone)]
pub struct Lumina2Transformer {
    config: Config,
    x_embedder: Linear,
    t_embedder: TimestepEmbedder,
    cap_embedder: CaptionEmbedder,
    context_refiner: Vec<TransformerBlock>,
    noise_refiner: Vec<TransformerBlock>,
    layers: Vec<TransformerBlock>,
    norm_out: OutputNorm,
    rope: RopeEmbedder,
    dtype: DType,
    device: Device,
}

/// The sequence layout of one forward: caption lengths and where each item's
/// image tokens sit in the joint sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceLayout {
    /// Real caption length of each item (the sum of its caption mask row).
    pub caption_lens: Vec<usize>,
    /// Image tokens per item, `(H/p) * (W/p)`.
    pub image_len: usize,
    /// Patches per column and per row: `(H/p, W/p)`.
    pub grid: (usize, usize),
}

impl SequenceLayout {
    /// Joint length of each item: caption plus image tokens.
    pub fn seq_lens(&self) -> Vec<usize> {
        self.caption_lens
            .iter()
            .map(|c| c + self.image_len)
            .collect()
    }

    /// Length of the padded joint sequence.
    pub fn max_seq_len(&self) -> usize {
        self.seq_lens().into_iter().max().unwrap_or(0)
    }

    /// Position ids as diffusers builds them: caption token `i` at `(i, 0, 0)`,
    /// image patch `(r, c)` of item `b` at `(cap_len_b, r, c)`, padding at 0.
    pub fn joint_positions(&self) -> Vec<Vec<Position>> {
        let max = self.max_seq_len();
        self.caption_lens
            .iter()
            .map(|&cap| {
                let mut row: Vec<Position> =
                    (0..cap).map(|i| Position::At([i as u32, 0, 0])).collect();
                row.extend(self.image_positions(cap));
                row.resize(max, Position::At([0, 0, 0]));
                row
            })
            .collect()
    }

    fn image_positions(&self, cap: usize) -> impl Iterator<Item = Position> {
        let (gh, gw) = self.grid;
        (0..gh * gw).map(move |k| Position::At([cap as u32, (k / gw) as u32, (k % gw) as u32]))
    }
}

/// The packed input of the joint layers and what they and the output layer
/// need ([`Lumina2Transformer::embed`]).
#[derive(Debug, Clone)]
pub struct JointInput {
    hidden: Tensor,
    temb: Tensor,
    rope: Rope,
    mask: Option<KeyMask>,
    layout: SequenceLayout,
    latent_size: (usize, usize),
}

impl JointInput {
    /// The packed `[caption, image]` sequence `[B, S, hidden]`, zero-padded to
    /// the longest item.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }

    /// The sequence layout.
    pub fn layout(&self) -> &SequenceLayout {
        &self.layout
    }
}

impl Lumina2Transformer {
    /// Builds the model from its config and weights (diffusers key names).
    ///
    /// Weights are converted to `weights.dtype()`, the compute dtype; linear
    /// weights that the source hands out quantised stay quantised.
    pub fn new(config: &Config, weights: &Weights) -> Result<Self> {
        config.validate()?;
        let cfg = config;
        let w = weights;
        let hidden = cfg.hidden_size;
        let p = cfg.patch_size;
        let block = |prefix: &str, i: usize, modulated: bool| {
            TransformerBlock::load(&w.pp(prefix).pp(i), cfg, modulated)
        };
        // With int8 linears (`Weights::with_int8_linears`), only the blocks'
        // attention and feed-forward layers are quantised: the embedders and
        // the output layer are a small share of the work and sit where the
        // error would reach the output directly (measured on the parity
        // cases: relative error 1.5-2.5% quantising every linear, 0.8-1.6%
        // the blocks' only).
        let plain = w.clone().with_int8_linears(false);
        Ok(Self {
            config: cfg.clone(),
            x_embedder: plain.linear("x_embedder", p * p * cfg.in_channels, hidden, true)?,
            t_embedder: TimestepEmbedder::load(
                &plain.pp("time_caption_embed.timestep_embedder"),
                cfg.temb_dim(),
            )?,
            cap_embedder: CaptionEmbedder::load(
                &plain.pp("time_caption_embed.caption_embedder"),
                cfg.cap_feat_dim,
                hidden,
                cfg.norm_eps,
            )?,
            context_refiner: (0..cfg.num_refiner_layers)
                .map(|i| block("context_refiner", i, false))
                .collect::<Result<_>>()?,
            noise_refiner: (0..cfg.num_refiner_layers)
                .map(|i| block("noise_refiner", i, true))
                .collect::<Result<_>>()?,
            layers: (0..cfg.num_layers)
                .map(|i| block("layers", i, true))
                .collect::<Result<_>>()?,
            norm_out: OutputNorm::load(
                &plain.pp("norm_out"),
                cfg.temb_dim(),
                hidden,
                p * p * cfg.out_channels(),
            )?,
            rope: RopeEmbedder::new(ROPE_THETA, &cfg.axes_dim_rope, &cfg.axes_lens, w.device())?,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sets the byte budget of the attention score block of every layer
    /// (see [`crate::attention::DEFAULT_SCORE_BUDGET`]).
    pub fn set_attention_budget(&mut self, bytes: usize) {
        for b in self
            .context_refiner
            .iter_mut()
            .chain(self.noise_refiner.iter_mut())
            .chain(self.layers.iter_mut())
        {
            b.attn_mut().set_score_budget(bytes);
        }
    }

    /// Predicts the flow for `latents`.
    ///
    /// - `latents`: `[B, in_channels, H, W]`, `H` and `W` multiples of `patch_size`.
    /// - `timestep`: `[B]` (or `[1]`, shared) model times, 0 = noise, 1 = image
    ///   (diffusers' pipeline passes `1 - t / 1000`).
    /// - `caption`: `[B, L, cap_feat_dim]` text features.
    /// - `caption_mask`: `[B, L]`, non-zero for real tokens; as in diffusers, the
    ///   real tokens must come first (right padding).
    ///
    /// Returns `[B, out_channels, H, W]` in the compute dtype: the raw model
    /// output (the pipeline negates it before the scheduler step).
    ///
    /// It is [`Self::embed`], [`Self::joint_layers`] and [`Self::output`] in
    /// turn; step caches (TeaCache) call them apart to skip the joint layers.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        caption: &Tensor,
        caption_mask: &Tensor,
    ) -> Result<Tensor> {
        let input = self.embed(latents, timestep, caption, caption_mask)?;
        let hidden = self.joint_layers(&input)?;
        self.output(&input, &hidden)
    }

    /// Everything before the joint layers: the embeddings, the refiners and
    /// the packed `[caption, image]` sequence (arguments as [`Self::forward`]).
    pub fn embed(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        caption: &Tensor,
        caption_mask: &Tensor,
    ) -> Result<JointInput> {
        let cfg = &self.config;
        let (layout, mask_rows) = self.check_inputs(latents, timestep, caption, caption_mask)?;
        let b = layout.caption_lens.len();
        let (_, _, h, w) = latents.dims4()?;
        let hidden = cfg.hidden_size;

        // 1. Conditioning: timestep and caption embeddings, patch tokens.
        let timestep = match timestep.elem_count() {
            1 if b > 1 => timestep.flatten_all()?.repeat(b)?,
            _ => timestep.flatten_all()?,
        };
        let temb = self
            .t_embedder
            .forward(&timestep, self.dtype, &self.device)?;
        let caption = caption.to_device(&self.device)?.to_dtype(self.dtype)?;
        let cap = self.cap_embedder.forward(&caption)?;
        let latents = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let img = self
            .x_embedder
            .forward(&patchify(&latents, cfg.patch_size)?)?;

        // 2. RoPE factors. Caption rows past the real length get a zero factor
        //    (diffusers' zero-filled `cap_freqs_cis`); their outputs are dropped.
        let joint_pos = layout.joint_positions();
        let l = caption_mask.dim(1)?;
        let cap_pos: Vec<Vec<Position>> = joint_pos
            .iter()
            .zip(&layout.caption_lens)
            .map(|(row, &c)| {
                let mut r = row[..c.min(l)].to_vec();
                r.resize(l, Position::Zero);
                r
            })
            .collect();
        let img_pos: Vec<Vec<Position>> = joint_pos
            .iter()
            .zip(&layout.caption_lens)
            .map(|(row, &c)| row[c..c + layout.image_len].to_vec())
            .collect();
        let cap_rope = self.rope.gather(&cap_pos)?;
        let img_rope = self.rope.gather(&img_pos)?;
        let joint_rope = self.rope.gather(&joint_pos)?;

        // 3. Refiners: the caption attends to its real tokens only; the image
        //    tokens all have the same length and need no mask.
        let cap_mask = if mask_rows.iter().all(|r| r.iter().all(|&v| v)) {
            None
        } else {
            Some(KeyMask::from_valid(&mask_rows, &self.device)?)
        };
        let mut cap = cap;
        for layer in &self.context_refiner {
            cap = layer.forward(&cap, &cap_rope, cap_mask.as_ref(), None)?;
        }
        let mut img = img;
        for layer in &self.noise_refiner {
            img = layer.forward(&img, &img_rope, None, Some(&temb))?;
        }

        // 4. Pack [caption tokens, image tokens] per item, zero-padded to the
        //    longest; mask the padding keys only when lengths differ.
        let seq_lens = layout.seq_lens();
        let max_len = layout.max_seq_len();
        let mut rows = Vec::with_capacity(b);
        for (i, (&c, &s)) in layout.caption_lens.iter().zip(&seq_lens).enumerate() {
            let mut parts = vec![cap.get(i)?.narrow(0, 0, c)?, img.get(i)?];
            if s < max_len {
                parts.push(Tensor::zeros(
                    (max_len - s, hidden),
                    self.dtype,
                    &self.device,
                )?);
            }
            rows.push(Tensor::cat(&parts, 0)?);
        }
        let x = Tensor::stack(&rows, 0)?;
        let mask = if seq_lens.iter().any(|&s| s != max_len) {
            let valid: Vec<Vec<bool>> = seq_lens
                .iter()
                .map(|&s| (0..max_len).map(|j| j < s).collect())
                .collect();
            Some(KeyMask::from_valid(&valid, &self.device)?)
        } else {
            None
        };
        Ok(JointInput {
            hidden: x,
            temb,
            rope: joint_rope,
            mask,
            layout,
            latent_size: (h, w),
        })
    }

    /// The first joint layer's modulated attention input,
    /// `norm1(x) * (1 + scale_msa)` (`[B, S, hidden]`): the signal TeaCache
    /// watches. `None` for a model without joint layers.
    pub fn first_modulated_input(&self, input: &JointInput) -> Result<Option<Tensor>> {
        match self.layers.first() {
            Some(layer) => layer.modulated_input(&input.hidden, &input.temb),
            None => Ok(None),
        }
    }

    /// The joint layers over the packed sequence: `[B, S, hidden]`.
    pub fn joint_layers(&self, input: &JointInput) -> Result<Tensor> {
        let mut x = input.hidden.clone();
        for layer in &self.layers {
            x = layer.forward(&x, &input.rope, input.mask.as_ref(), Some(&input.temb))?;
        }
        Ok(x)
    }

    /// The output norm and unpatchify of the joint layers' output `hidden`
    /// (`[B, S, hidden]`): `[B, out_channels, H, W]`.
    pub fn output(&self, input: &JointInput, hidden: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (h, w) = input.latent_size;
        let x = self.norm_out.forward(hidden, &input.temb)?;
        let out_c = cfg.out_channels();
        let layout = &input.layout;
        let mut images = Vec::with_capacity(layout.caption_lens.len());
        for (i, &c) in layout.caption_lens.iter().enumerate() {
            let tokens = x.get(i)?.narrow(0, c, layout.image_len)?;
            images.push(unpatchify(&tokens, cfg.patch_size, out_c, h, w)?);
        }
        Ok(Tensor::stack(&images, 0)?)
    }

    /// Validates the inputs and derives the sequence layout and the caption key mask.
    fn check_inputs(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        caption: &Tensor,
        caption_mask: &Tensor,
    ) -> Result<(SequenceLayout, Vec<Vec<bool>>)> {
        let cfg = &self.config;
        let (b, c, h, w) = latents.dims4().map_err(|_| {
            invalid_input(
                "hidden_states",
                format!("expected [B, C, H, W], got {:?}", latents.dims()),
            )
        })?;
        if b == 0 || h == 0 || w == 0 {
            return Err(invalid_input(
                "hidden_states",
                format!("empty shape {:?}", latents.dims()),
            ));
        }
        if c != cfg.in_channels {
            return Err(invalid_input(
                "hidden_states",
                format!("{c} channels, the model expects {}", cfg.in_channels),
            ));
        }
        let p = cfg.patch_size;
        if h % p != 0 || w % p != 0 {
            return Err(invalid_input(
                "hidden_states",
                format!("latent size {h}x{w} is not a multiple of the patch size {p}"),
            ));
        }
        let nt = timestep.elem_count();
        if timestep.rank() > 1 || (nt != b && nt != 1) {
            return Err(invalid_input(
                "timestep",
                format!("expected [{b}] or [1], got {:?}", timestep.dims()),
            ));
        }
        let (cb, l, d) = caption.dims3().map_err(|_| {
            invalid_input(
                "encoder_hidden_states",
                format!("expected [B, L, D], got {:?}", caption.dims()),
            )
        })?;
        if cb != b || d != cfg.cap_feat_dim {
            return Err(invalid_input(
                "encoder_hidden_states",
                format!(
                    "shape {:?}, expected [{b}, L, {}] (cap_feat_dim)",
                    caption.dims(),
                    cfg.cap_feat_dim
                ),
            ));
        }
        if caption_mask.dims() != [b, l] {
            return Err(invalid_input(
                "encoder_attention_mask",
                format!("shape {:?}, expected [{b}, {l}]", caption_mask.dims()),
            ));
        }
        let rows: Vec<Vec<bool>> = caption_mask
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v != 0.0).collect())
            .collect();
        let caption_lens: Vec<usize> = rows
            .iter()
            .map(|r| r.iter().filter(|&&v| v).count())
            .collect();
        let layout = SequenceLayout {
            caption_lens,
            image_len: (h / p) * (w / p),
            grid: (h / p, w / p),
        };
        Ok((layout, rows))
    }
}

/// Every weight the model loads for `cfg`, with its shape, by diffusers key.
///
/// Loaders use it to list all missing and unexpected keys of a checkpoint at
/// once, before the model is built.
pub fn weight_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let t = cfg.temb_dim();
    let p2 = cfg.patch_size * cfg.patch_size;
    let cap = cfg.cap_feat_dim;
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |k: String, s: &[usize]| v.push((k, s.to_vec()));
    push("x_embedder.weight".into(), &[h, p2 * cfg.in_channels]);
    push("x_embedder.bias".into(), &[h]);
    let te = "time_caption_embed.timestep_embedder";
    push(
        format!("{te}.linear_1.weight"),
        &[t, crate::embed::FREQUENCY_EMBEDDING_SIZE],
    );
    push(format!("{te}.linear_1.bias"), &[t]);
    push(format!("{te}.linear_2.weight"), &[t, t]);
    push(format!("{te}.linear_2.bias"), &[t]);
    let ce = "time_caption_embed.caption_embedder";
    push(format!("{ce}.0.weight"), &[cap]);
    push(format!("{ce}.1.weight"), &[h, cap]);
    push(format!("{ce}.1.bias"), &[h]);
    let stacks = [
        ("context_refiner", cfg.num_refiner_layers, false),
        ("noise_refiner", cfg.num_refiner_layers, true),
        ("layers", cfg.num_layers, true),
    ];
    let spec = cfg.block_spec();
    for (stack, n, modulated) in stacks {
        for i in 0..n {
            for (k, shape) in spec.weight_shapes(&format!("{stack}.{i}"), modulated) {
                push(k, &shape);
            }
        }
    }
    push("norm_out.linear_1.weight".into(), &[h, t]);
    push("norm_out.linear_1.bias".into(), &[h]);
    push(
        "norm_out.linear_2.weight".into(),
        &[p2 * cfg.out_channels(), h],
    );
    push("norm_out.linear_2.bias".into(), &[p2 * cfg.out_channels()]);
    v
}
