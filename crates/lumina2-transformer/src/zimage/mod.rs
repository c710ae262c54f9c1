//! Z-Image's transformer (diffusers' `ZImageTransformer2DModel`, basic mode)
//! built from the same blocks as the Lumina2 model.
//!
//! Z-Image is a NextDiT like Lumina-Image 2.0. The shared parts are used as
//! they are or configured; what differs from [`crate::Lumina2Transformer`]:
//!
//! - Block weight names ([`crate::block::BlockKeys::ZIMAGE`]): `attention`,
//!   `attention_norm1` (modulated or not), `attention_norm2`,
//!   `adaLN_modulation.0`, `feed_forward.w1/w2/w3`.
//! - Block modulation reads the timestep embedding directly,
//!   `adaLN_modulation(temb)`, without Lumina2's SiLU
//!   ([`crate::block::ModulationInput::Identity`]); scale `1 + s`, gate
//!   `tanh(g)` as in Lumina2.
//! - Feed-forward width `int(dim / 3 * 8)` (Lumina2: `4 * dim` with
//!   `multiple_of` and `ffn_dim_multiplier`).
//! - Attention: q/k RMS norm (eps 1e-5) only with `qk_norm`; keys and values
//!   have `n_heads` heads whatever `n_kv_heads` says (diffusers'
//!   `ZSingleStreamAttnProcessor`), so no grouped-query attention; default
//!   scale `1/sqrt(head_dim)`; no biases.
//! - Timestep embedder `t_embedder.mlp.0` (256 -> 1024), SiLU, `mlp.2`
//!   (1024 -> `min(dim, 256)`); its input is `t * t_scale` (the product in
//!   f32), whose sinusoid `[cos, sin](t f_k)` is Lumina2's.
//! - adaLN width `min(dim, 256)` (Lumina2: `min(hidden, 1024)`).
//! - Caption embedder `cap_embedder.0` (RMS norm, `norm_eps`) and `.1`
//!   (linear): the Lumina2 [`crate::CaptionEmbedder`] under another prefix.
//! - Patch embedder `all_x_embedder.{p}-{f}` and final layer
//!   `all_final_layer.{p}-{f}`, one per configured patch size; the final
//!   layer (`LayerNorm` without affine, eps 1e-6, times
//!   `1 + adaLN_modulation.1(silu(temb))`, then `linear`) is Lumina2's
//!   [`crate::OutputNorm`] under other names.
//! - Each item's caption and image tokens are padded to a multiple of 32
//!   (`SEQ_MULTI_OF`) with the learnt `cap_pad_token` / `x_pad_token`
//!   (`[1, dim]`), which stay in the sequence (attended to).
//! - Positions: caption token `i` (pad tokens included) at `(1 + i, 0, 0)`;
//!   image token `(r, c)` at `(padded caption length + 1, r, c)`; image pad
//!   tokens at `(0, 0, 0)`.
//! - RoPE base `rope_theta` (256), axes `axes_dims` / `axes_lens`; the f64
//!   angle is rounded to f32 before cos and sin
//!   ([`crate::rope::RopeAngles::F32`]; Lumina2 takes cos and sin in f64).
//! - The noise refiner (modulated) runs over the image tokens, the context
//!   refiner (unmodulated) over the caption tokens, each batch zero-padded to
//!   its longest item with a key mask when lengths differ.
//! - The joint sequence is `[image, caption]` (image first; Lumina2:
//!   caption first), zero-padded to the longest item with a key mask when
//!   lengths differ; the output image is unpatchified from each item's first
//!   `(H/p)(W/p)` tokens.
//! - Captions come as one unpadded `[L_i, cap_feat_dim]` tensor per item
//!   (no attention mask).
//!
//! Not implemented, refused with [`crate::Error::Unsupported`]: the omni
//! mode (SigLIP features, `siglip_feat_dim`, several images per item).

pub mod config;
pub mod model;

pub use config::{ZImageConfig, SEQ_MULTI_OF};
pub use model::{weight_shapes, ZImageTransformer, DEFAULT_PATCH};
