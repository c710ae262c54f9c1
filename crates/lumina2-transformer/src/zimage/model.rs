//! The Z-Image model: embeddings, padded per-item sequences, noise and
//! context refiners, the joint `[image, caption]` blocks, final layer.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::config::{ZImageConfig, SEQ_MULTI_OF, TIMESTEP_MID_DIM};
use crate::attention::KeyMask;
use crate::block::TransformerBlock;
use crate::embed::{
    patchify, unpatchify, CaptionEmbedder, TimestepEmbedder, FREQUENCY_EMBEDDING_SIZE,
};
use crate::error::{invalid_input, Error, Result};
use crate::norm::OutputNorm;
use crate::rope::{Position, Rope, RopeAngles, RopeEmbedder};
use crate::weights::{Linear, Weights};

/// The patch size diffusers' `forward` uses by default (`patch_size=2, f_patch_size=1`).
pub const DEFAULT_PATCH: (usize, usize) = (2, 1);

/// The patch embedder and final layer of one patch size.
#[derive(Debug, Clone)]
struct PatchLayers {
    x_embedder: Linear,
    final_layer: OutputNorm,
}

/// diffusers' `ZImageTransformer2DModel` in its basic mode (one image and one
/// caption per item), inference only.
#[derive(Debug, Clone)]
pub struct ZImageTransformer {
    config: ZImageConfig,
    /// By `(patch_size, f_patch_size)`.
    patches: BTreeMap<(usize, usize), PatchLayers>,
    t_embedder: TimestepEmbedder,
    cap_embedder: CaptionEmbedder,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    noise_refiner: Vec<TransformerBlock>,
    context_refiner: Vec<TransformerBlock>,
    layers: Vec<TransformerBlock>,
    rope: RopeEmbedder,
    dtype: DType,
    device: Device,
}

/// `n` rounded up to a multiple of [`SEQ_MULTI_OF`].
fn padded(n: usize) -> usize {
    n.div_ceil(SEQ_MULTI_OF) * SEQ_MULTI_OF
}

impl ZImageTransformer {
    /// Builds the model from its config and weights (diffusers key names).
    ///
    /// Refuses an omni config (`siglip_feat_dim`) with [`Error::Unsupported`].
    pub fn new(config: &ZImageConfig, weights: &Weights) -> Result<Self> {
        config.validate()?;
        let cfg = config;
        let w = weights;
        let dim = cfg.dim;
        let spec = cfg.block_spec();
        let blocks = |stack: &str, n: usize, modulated: bool| -> Result<Vec<TransformerBlock>> {
            (0..n)
                .map(|i| TransformerBlock::load_spec(&w.pp(stack).pp(i), &spec, modulated))
                .collect()
        };
        // As in the Lumina2 model, int8 linears (if asked for) only in the blocks.
        let plain = w.clone().with_int8_linears(false);
        let mut patches = BTreeMap::new();
        for (&p, &f) in cfg.all_patch_size.iter().zip(&cfg.all_f_patch_size) {
            let key = ZImageConfig::patch_key(p, f);
            let patch_dim = cfg.patch_dim(p, f);
            patches.insert(
                (p, f),
                PatchLayers {
                    x_embedder: plain
                        .pp("all_x_embedder")
                        .linear(&key, patch_dim, dim, true)?,
                    final_layer: OutputNorm::load_with(
                        &plain.pp("all_final_layer").pp(&key),
                        ("adaLN_modulation.1", "linear"),
                        cfg.temb_dim(),
                        dim,
                        patch_dim,
                    )?,
                },
            );
        }
        Ok(Self {
            config: cfg.clone(),
            patches,
            t_embedder: TimestepEmbedder::load_with(
                &plain.pp("t_embedder"),
                ("mlp.0", "mlp.2"),
                TIMESTEP_MID_DIM,
                cfg.temb_dim(),
            )?,
            cap_embedder: CaptionEmbedder::load(
                &plain.pp("cap_embedder"),
                cfg.cap_feat_dim,
                dim,
                cfg.norm_eps,
            )?,
            x_pad_token: w.get("x_pad_token", &[1, dim])?,
            cap_pad_token: w.get("cap_pad_token", &[1, dim])?,
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false)?,
            layers: blocks("layers", cfg.n_layers, true)?,
            rope: RopeEmbedder::with_angles(
                cfg.rope_theta,
                &cfg.axes_dims,
                &cfg.axes_lens,
                RopeAngles::F32,
                w.device(),
            )?,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ZImageConfig {
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

    /// Predicts the flow with diffusers' default patch size (2, 1).
    ///
    /// - `latents`: `[B, in_channels, H, W]`, `H` and `W` multiples of 2.
    /// - `timestep`: `[B]` (or `[1]`, shared) model times as Z-Image's
    ///   pipeline passes them (`(1000 - t) / 1000`: 0 = noise, 1 = image);
    ///   the model multiplies them by `t_scale`.
    /// - `captions`: one `[L_i, cap_feat_dim]` tensor per item, of any
    ///   lengths `L_i >= 1` (no padding, no mask).
    ///
    /// Returns `[B, in_channels, H, W]` in the compute dtype, the raw model output.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        captions: &[Tensor],
    ) -> Result<Tensor> {
        self.forward_with_patch(latents, timestep, captions, DEFAULT_PATCH)
    }

    /// [`Self::forward`] with the patch embedder and final layer of
    /// `(patch_size, f_patch_size)`, one of the config's pairs; images have
    /// one frame, so `f_patch_size` must be 1.
    pub fn forward_with_patch(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        captions: &[Tensor],
        patch: (usize, usize),
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (p, f) = patch;
        let layers = self.patches.get(&patch).ok_or_else(|| {
            invalid_input(
                "patch_size",
                format!(
                    "({p}, {f}) is not one of the config's (all_patch_size, all_f_patch_size) pairs"
                ),
            )
        })?;
        if f != 1 {
            return Err(invalid_input(
                "f_patch_size",
                format!("{f}: an image has one frame, only f_patch_size 1 applies"),
            ));
        }
        let (b, c, h, w) = self.check_inputs(latents, timestep, captions, p)?;
        let dim = cfg.dim;
        let (gh, gw) = (h / p, w / p);
        let img_len = gh * gw;
        let img_padded = padded(img_len);
        let cap_lens: Vec<usize> = captions
            .iter()
            .map(|t| t.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let cap_padded: Vec<usize> = cap_lens.iter().map(|&l| padded(l)).collect();

        // 1. The adaLN input: the sinusoid of `t * t_scale` (the product in
        //    f32, as the reference's f32 timestep times a Python float).
        let t = timestep
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let t: Vec<f32> = match t.len() {
            1 if b > 1 => vec![t[0]; b],
            _ => t,
        };
        let scaled: Vec<f32> = t.iter().map(|&v| v * cfg.t_scale as f32).collect();
        let scaled = Tensor::from_vec(scaled, b, &Device::Cpu)?;
        let temb = self.t_embedder.forward(&scaled, self.dtype, &self.device)?;

        // 2. Image tokens, padded with the learnt pad token to a multiple of
        //    32; all items have the same image size, so no mask.
        let latents = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let img = layers.x_embedder.forward(&patchify(&latents, p)?)?;
        let img = if img_padded > img_len {
            let pad = self
                .x_pad_token
                .unsqueeze(0)?
                .broadcast_as((b, img_padded - img_len, dim))?
                .contiguous()?;
            // (candle's cat along dim 1 is contiguous only from contiguous parts.)
            Tensor::cat(&[&img, &pad], 1)?
        } else {
            img
        };
        // Image token (r, c) at (padded caption length + 1, r, c), padding at 0.
        let img_pos: Vec<Vec<Position>> = cap_padded
            .iter()
            .map(|&cp| {
                let mut row: Vec<Position> = (0..img_len)
                    .map(|k| Position::At([(cp + 1) as u32, (k / gw) as u32, (k % gw) as u32]))
                    .collect();
                row.resize(img_padded, Position::At([0, 0, 0]));
                row
            })
            .collect();
        let img_rope = self.rope.gather(&img_pos)?;
        let mut img = img;
        for layer in &self.noise_refiner {
            img = layer.forward(&img, &img_rope, None, Some(&temb))?;
        }

        // 3. Caption tokens, each item padded with the pad token to a
        //    multiple of 32, then zero-padded to the longest (masked).
        let max_cap = cap_padded.iter().copied().max().unwrap_or(0);
        let mut rows = Vec::with_capacity(b);
        for (cap, (&l, &lp)) in captions.iter().zip(cap_lens.iter().zip(&cap_padded)) {
            let cap = cap.to_device(&self.device)?.to_dtype(self.dtype)?;
            let mut parts = vec![self.cap_embedder.forward(&cap.unsqueeze(0)?)?.squeeze(0)?];
            if lp > l {
                parts.push(
                    self.cap_pad_token
                        .broadcast_as((lp - l, dim))?
                        .contiguous()?,
                );
            }
            if max_cap > lp {
                parts.push(Tensor::zeros(
                    (max_cap - lp, dim),
                    self.dtype,
                    &self.device,
                )?);
            }
            rows.push(Tensor::cat(&parts, 0)?);
        }
        let mut cap = Tensor::stack(&rows, 0)?;
        // Caption token i (pad tokens included) at (1 + i, 0, 0).
        let cap_pos: Vec<Vec<Position>> = cap_padded
            .iter()
            .map(|&lp| {
                let mut row: Vec<Position> = (0..lp)
                    .map(|i| Position::At([(1 + i) as u32, 0, 0]))
                    .collect();
                row.resize(max_cap, Position::Zero);
                row
            })
            .collect();
        let cap_rope = self.rope.gather(&cap_pos)?;
        let cap_mask = prefix_mask(&cap_padded, max_cap, &self.device)?;
        for layer in &self.context_refiner {
            cap = layer.forward(&cap, &cap_rope, cap_mask.as_ref(), None)?;
        }

        // 4. The joint sequence [image, caption] per item, zero-padded to the
        //    longest (masked).
        let seq_lens: Vec<usize> = cap_padded.iter().map(|&lp| img_padded + lp).collect();
        let max_len = seq_lens.iter().copied().max().unwrap_or(0);
        let mut rows = Vec::with_capacity(b);
        let mut joint_pos = Vec::with_capacity(b);
        for (i, &lp) in cap_padded.iter().enumerate() {
            let mut parts = vec![img.get(i)?, cap.get(i)?.narrow(0, 0, lp)?];
            if max_len > img_padded + lp {
                parts.push(Tensor::zeros(
                    (max_len - img_padded - lp, dim),
                    self.dtype,
                    &self.device,
                )?);
            }
            rows.push(Tensor::cat(&parts, 0)?);
            let mut pos = img_pos[i].clone();
            pos.extend_from_slice(&cap_pos[i][..lp]);
            pos.resize(max_len, Position::Zero);
            joint_pos.push(pos);
        }
        let mut x = Tensor::stack(&rows, 0)?;
        let joint_rope: Rope = self.rope.gather(&joint_pos)?;
        let joint_mask = prefix_mask(&seq_lens, max_len, &self.device)?;
        for layer in &self.layers {
            x = layer.forward(&x, &joint_rope, joint_mask.as_ref(), Some(&temb))?;
        }

        // 5. Final layer, then each item's image from its first tokens.
        let x = layers.final_layer.forward(&x, &temb)?;
        let mut images = Vec::with_capacity(b);
        for i in 0..b {
            let tokens = x.get(i)?.narrow(0, 0, img_len)?;
            images.push(unpatchify(&tokens, p, c, h, w)?);
        }
        Ok(Tensor::stack(&images, 0)?)
    }

    /// Validates the inputs; returns the latent shape.
    fn check_inputs(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        captions: &[Tensor],
        p: usize,
    ) -> Result<(usize, usize, usize, usize)> {
        let cfg = &self.config;
        let (b, c, h, w) = latents.dims4().map_err(|_| {
            invalid_input(
                "latents",
                format!("expected [B, C, H, W], got {:?}", latents.dims()),
            )
        })?;
        if b == 0 || h == 0 || w == 0 {
            return Err(invalid_input(
                "latents",
                format!("empty shape {:?}", latents.dims()),
            ));
        }
        if c != cfg.in_channels {
            return Err(invalid_input(
                "latents",
                format!("{c} channels, the model expects {}", cfg.in_channels),
            ));
        }
        if h % p != 0 || w % p != 0 {
            return Err(invalid_input(
                "latents",
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
        if captions.len() != b {
            return Err(invalid_input(
                "captions",
                format!("{} captions for a batch of {b}", captions.len()),
            ));
        }
        for (i, cap) in captions.iter().enumerate() {
            match cap.dims() {
                [l, d] if *l > 0 && *d == cfg.cap_feat_dim => {}
                [_, _, _] => {
                    return Err(Error::Unsupported(format!(
                        "caption {i} has shape {:?}: several captions per item are Z-Image's \
                         omni mode, which is not implemented",
                        cap.dims()
                    )))
                }
                dims => {
                    return Err(invalid_input(
                        "captions",
                        format!(
                            "caption {i} has shape {dims:?}, expected [L >= 1, {}] (cap_feat_dim)",
                            cfg.cap_feat_dim
                        ),
                    ))
                }
            }
        }
        Ok((b, c, h, w))
    }
}

/// A key mask for items whose first `lens[i]` of `max` tokens are real;
/// `None` when all are full length (the reference passes no mask then).
fn prefix_mask(lens: &[usize], max: usize, device: &Device) -> Result<Option<KeyMask>> {
    if lens.iter().all(|&l| l == max) {
        return Ok(None);
    }
    let valid: Vec<Vec<bool>> = lens
        .iter()
        .map(|&l| (0..max).map(|j| j < l).collect())
        .collect();
    Ok(Some(KeyMask::from_valid(&valid, device)?))
}

/// Every weight the model loads for `cfg`, with its shape, by diffusers key.
pub fn weight_shapes(cfg: &ZImageConfig) -> Vec<(String, Vec<usize>)> {
    let (d, t, cap) = (cfg.dim, cfg.temb_dim(), cfg.cap_feat_dim);
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    for (&p, &f) in cfg.all_patch_size.iter().zip(&cfg.all_f_patch_size) {
        let key = ZImageConfig::patch_key(p, f);
        let pd = cfg.patch_dim(p, f);
        v.push((format!("all_x_embedder.{key}.weight"), vec![d, pd]));
        v.push((format!("all_x_embedder.{key}.bias"), vec![d]));
        let fl = format!("all_final_layer.{key}");
        v.push((format!("{fl}.adaLN_modulation.1.weight"), vec![d, t]));
        v.push((format!("{fl}.adaLN_modulation.1.bias"), vec![d]));
        v.push((format!("{fl}.linear.weight"), vec![pd, d]));
        v.push((format!("{fl}.linear.bias"), vec![pd]));
    }
    v.push((
        "t_embedder.mlp.0.weight".into(),
        vec![TIMESTEP_MID_DIM, FREQUENCY_EMBEDDING_SIZE],
    ));
    v.push(("t_embedder.mlp.0.bias".into(), vec![TIMESTEP_MID_DIM]));
    v.push(("t_embedder.mlp.2.weight".into(), vec![t, TIMESTEP_MID_DIM]));
    v.push(("t_embedder.mlp.2.bias".into(), vec![t]));
    v.push(("cap_embedder.0.weight".into(), vec![cap]));
    v.push(("cap_embedder.1.weight".into(), vec![d, cap]));
    v.push(("cap_embedder.1.bias".into(), vec![d]));
    v.push(("x_pad_token".into(), vec![1, d]));
    v.push(("cap_pad_token".into(), vec![1, d]));
    let spec = cfg.block_spec();
    let stacks = [
        ("noise_refiner", cfg.n_refiner_layers, true),
        ("context_refiner", cfg.n_refiner_layers, false),
        ("layers", cfg.n_layers, true),
    ];
    for (stack, n, modulated) in stacks {
        for i in 0..n {
            v.extend(spec.weight_shapes(&format!("{stack}.{i}"), modulated));
        }
    }
    v
}
