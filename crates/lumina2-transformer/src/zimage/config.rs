//! The Z-Image configuration, as diffusers writes it in `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::block::{BlockKeys, BlockSpec, ModulationInput};
use crate::config::Limits;
use crate::error::{Error, Result};

/// Width of the timestep embedding is `min(dim, ADALN_EMBED_DIM)`.
pub const ADALN_EMBED_DIM: usize = 256;
/// Inner width of the timestep embedder's MLP (a constant in diffusers).
pub const TIMESTEP_MID_DIM: usize = 1024;
/// Captions and images are padded to a multiple of this many tokens.
pub const SEQ_MULTI_OF: usize = 32;

/// Configuration of [`crate::zimage::ZImageTransformer`], field for field the
/// arguments of diffusers' `ZImageTransformer2DModel.__init__`, with the same
/// defaults (Tongyi-MAI/Z-Image-Turbo's values).
///
/// Unknown keys (`_class_name`, `_diffusers_version`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ZImageConfig {
    /// Spatial patch sizes, one patch embedder and final layer each.
    pub all_patch_size: Vec<usize>,
    /// Temporal patch sizes, paired with `all_patch_size`.
    pub all_f_patch_size: Vec<usize>,
    /// Latent channels (in and out).
    pub in_channels: usize,
    /// Model width.
    pub dim: usize,
    /// Joint blocks.
    pub n_layers: usize,
    /// Blocks of each refiner (noise and context).
    pub n_refiner_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Read and ignored, as diffusers does: its attention has `n_heads`
    /// key/value heads whatever this says.
    pub n_kv_heads: usize,
    /// Epsilon of the block norms and of the caption norm.
    pub norm_eps: f64,
    /// q/k RMS norms in the attention.
    pub qk_norm: bool,
    /// Width of the text features.
    pub cap_feat_dim: usize,
    /// Width of SigLIP features (the omni variant); must be absent.
    pub siglip_feat_dim: Option<usize>,
    /// RoPE base of every axis.
    pub rope_theta: f64,
    /// Factor of the timestep before its sinusoidal features.
    pub t_scale: f64,
    /// RoPE channels per axis (caption/frame, row, column); sums to the head dimension.
    pub axes_dims: Vec<usize>,
    /// RoPE table length per axis.
    pub axes_lens: Vec<usize>,
}

impl Default for ZImageConfig {
    fn default() -> Self {
        Self {
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            in_channels: 16,
            dim: 3840,
            n_layers: 30,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: 30,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            siglip_feat_dim: None,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![32, 48, 48],
            axes_lens: vec![1024, 512, 512],
        }
    }
}

impl ZImageConfig {
    /// Parses a `config.json` string and validates it.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json).map_err(|source| Error::ConfigParse {
            origin: "<string>".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `config.json` (or the file itself when `path` is a file) and validates it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg: Self = crate::config::read_config_file(path.as_ref())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the model construction needs (diffusers' asserts and more)
    /// and the same size limits as the Lumina2 [`crate::Config`].
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if let Some(d) = self.siglip_feat_dim {
            return Err(Error::Unsupported(format!(
                "siglip_feat_dim {d}: Z-Image's omni variant (SigLIP features) is not implemented"
            )));
        }
        let limits = [
            ("n_layers", self.n_layers, Limits::LAYERS),
            ("n_refiner_layers", self.n_refiner_layers, Limits::LAYERS),
            ("n_heads", self.n_heads, Limits::HEADS),
            ("dim", self.dim, Limits::WIDTH),
            ("cap_feat_dim", self.cap_feat_dim, Limits::WIDTH),
            ("in_channels", self.in_channels, Limits::CHANNELS),
        ];
        for (name, value, max) in limits {
            if value == 0 {
                return bad(format!("{name} must be positive"));
            }
            if value > max {
                return bad(format!("{name} {value} is over the limit of {max}"));
            }
        }
        if self.all_patch_size.is_empty()
            || self.all_patch_size.len() != self.all_f_patch_size.len()
        {
            return bad(format!(
                "all_patch_size {:?} and all_f_patch_size {:?} must be non-empty and of the same length",
                self.all_patch_size, self.all_f_patch_size
            ));
        }
        let sizes = self.all_patch_size.iter().chain(&self.all_f_patch_size);
        if let Some(p) = sizes.into_iter().find(|&&p| p == 0 || p > Limits::PATCH) {
            return bad(format!("patch size {p} must be in 1..={}", Limits::PATCH));
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return bad(format!(
                "dim {} is not divisible by n_heads {}",
                self.dim, self.n_heads
            ));
        }
        if self.ffn_inner_dim() > Limits::FFN_WIDTH {
            return bad(format!(
                "the feed-forward width {} is over the limit of {}",
                self.ffn_inner_dim(),
                Limits::FFN_WIDTH
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(format!(
                "norm_eps {} must be a non-negative number",
                self.norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !self.t_scale.is_finite() {
            return bad(format!("t_scale {} must be finite", self.t_scale));
        }
        if self.axes_dims.len() != 3 || self.axes_lens.len() != 3 {
            return bad(format!(
                "axes_dims {:?} and axes_lens {:?} must have 3 entries (caption/frame, row, column)",
                self.axes_dims, self.axes_lens
            ));
        }
        if self.axes_dims.iter().any(|d| d % 2 != 0) {
            return bad(format!("axes_dims {:?} must be even", self.axes_dims));
        }
        let rope_dim = self
            .axes_dims
            .iter()
            .try_fold(0usize, |a, &d| a.checked_add(d));
        if rope_dim != Some(self.head_dim()) {
            return bad(format!(
                "axes_dims {:?} does not sum to the head dimension {} (dim / n_heads)",
                self.axes_dims,
                self.head_dim()
            ));
        }
        let table: usize = self
            .axes_lens
            .iter()
            .zip(&self.axes_dims)
            .map(|(&l, &d)| l.saturating_mul(d / 2))
            .fold(0, usize::saturating_add);
        if self.axes_lens.contains(&0) || table > 1 << 24 {
            return bad(format!(
                "axes_lens {:?} x axes_dims {:?} make RoPE tables of {table} values (1..=2^24)",
                self.axes_lens, self.axes_dims
            ));
        }
        Ok(())
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads.max(1)
    }

    /// Width of the timestep embedding (the adaLN input): `min(dim, 256)`.
    pub fn temb_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    /// Inner width of the feed-forward: Python's `int(dim / 3 * 8)`.
    pub fn ffn_inner_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0).trunc() as usize
    }

    /// Output width of the patch embedder and the final layer for a patch size.
    pub fn patch_dim(&self, patch: usize, f_patch: usize) -> usize {
        patch * patch * f_patch * self.in_channels
    }

    /// The key of the patch embedder and final layer of a patch size (`"2-1"`).
    pub fn patch_key(patch: usize, f_patch: usize) -> String {
        format!("{patch}-{f_patch}")
    }

    /// The dimensions, weight names and modulation of Z-Image's blocks.
    pub fn block_spec(&self) -> BlockSpec {
        BlockSpec {
            dim: self.dim,
            n_heads: self.n_heads,
            // diffusers' ZSingleStreamAttnProcessor splits keys and values
            // into `heads` heads: no grouped-query attention.
            n_kv_heads: self.n_heads,
            norm_eps: self.norm_eps,
            ffn_inner: self.ffn_inner_dim(),
            temb_dim: self.temb_dim(),
            qk_norm: self.qk_norm,
            modulation_input: ModulationInput::Identity,
            keys: BlockKeys::ZIMAGE,
        }
    }
}
