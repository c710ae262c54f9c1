//! The model configuration, as diffusers writes it in `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Upper bounds on a config's numbers, far above any real model (Lumina-Image
/// 2.0 has 26 layers, 24 heads, width 2304) and far below what would make
/// sizes overflow or allocations absurd. [`Config::validate`] names the limit
/// a config breaks.
#[derive(Debug, Clone, Copy)]
pub struct Limits;

impl Limits {
    /// `num_layers` and `num_refiner_layers`.
    pub const LAYERS: usize = 1024;
    /// `num_attention_heads` and `num_kv_heads`.
    pub const HEADS: usize = 1024;
    /// `hidden_size` and `cap_feat_dim`.
    pub const WIDTH: usize = 1 << 16;
    /// The feed-forward's inner width (and `multiple_of`).
    pub const FFN_WIDTH: usize = 1 << 20;
    /// `in_channels` and `out_channels`.
    pub const CHANNELS: usize = 4096;
    /// `patch_size`.
    pub const PATCH: usize = 64;
    /// `sample_size`.
    pub const SAMPLE_SIZE: usize = 1 << 16;
    /// Total weights ([`Config::parameter_count`]): 2^38, 100x the largest
    /// open diffusion transformers.
    pub const PARAMETERS: u64 = 1 << 38;
}

/// Configuration of [`crate::Lumina2Transformer`], field for field the arguments of
/// diffusers' `Lumina2Transformer2DModel.__init__`, with the same defaults.
///
/// Unknown keys (`_class_name`, `_diffusers_version`, ...) are ignored, so the
/// `transformer/config.json` of a diffusers pipeline deserialises as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Latent width the model was trained at (the pipeline's default size is `sample_size * 8`).
    pub sample_size: usize,
    /// Side of the square patches the latent is cut into.
    pub patch_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out (`None`: same as `in_channels`).
    pub out_channels: Option<usize>,
    /// Width of the transformer.
    pub hidden_size: usize,
    /// Number of joint blocks.
    pub num_layers: usize,
    /// Number of blocks in each refiner (context and noise).
    pub num_refiner_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// The feed-forward width is rounded up to a multiple of this.
    pub multiple_of: usize,
    /// Optional multiplier of the feed-forward width (`4 * hidden_size`).
    pub ffn_dim_multiplier: Option<f64>,
    /// Epsilon of the RMS norms of the blocks and of the caption embedder.
    pub norm_eps: f64,
    /// Stored by diffusers; the forward pass does not use it.
    pub scaling_factor: f64,
    /// Per-axis RoPE dimensions (caption position, row, column); they sum to the head dimension.
    pub axes_dim_rope: Vec<usize>,
    /// Per-axis RoPE table lengths: the largest position + 1 each axis supports.
    pub axes_lens: Vec<usize>,
    /// Width of the caption features (the text encoder's hidden size).
    pub cap_feat_dim: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            out_channels: None,
            hidden_size: 2304,
            num_layers: 26,
            num_refiner_layers: 2,
            num_attention_heads: 24,
            num_kv_heads: 8,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            norm_eps: 1e-5,
            scaling_factor: 1.0,
            axes_dim_rope: vec![32, 32, 32],
            axes_lens: vec![300, 512, 512],
            cap_feat_dim: 1024,
        }
    }
}

impl Config {
    /// Parses a `config.json` text and validates it.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json).map_err(|source| Error::ConfigParse {
            origin: "<string>".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a `config.json` file (or a folder holding one) and validates it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg: Self = read_config_file(path.as_ref())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the dimensions are consistent, as the model construction
    /// needs, and that every count and width is within [`Limits`]: a config
    /// comes from a file, and nothing is sized from it before this passes.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        let limits = [
            ("num_layers", self.num_layers, Limits::LAYERS),
            (
                "num_refiner_layers",
                self.num_refiner_layers,
                Limits::LAYERS,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                Limits::HEADS,
            ),
            ("num_kv_heads", self.num_kv_heads, Limits::HEADS),
            ("hidden_size", self.hidden_size, Limits::WIDTH),
            ("cap_feat_dim", self.cap_feat_dim, Limits::WIDTH),
            ("in_channels", self.in_channels, Limits::CHANNELS),
            ("out_channels", self.out_channels(), Limits::CHANNELS),
            ("patch_size", self.patch_size, Limits::PATCH),
            ("multiple_of", self.multiple_of, Limits::FFN_WIDTH),
            ("sample_size", self.sample_size, Limits::SAMPLE_SIZE),
        ];
        for (name, value, max) in limits {
            if value > max {
                return bad(format!("{name} {value} is over the limit of {max}"));
            }
        }
        if self.patch_size == 0 || self.in_channels == 0 || self.hidden_size == 0 {
            return bad("patch_size, in_channels and hidden_size must be positive".into());
        }
        if self.out_channels == Some(0) || self.cap_feat_dim == 0 {
            return bad("out_channels and cap_feat_dim must be positive".into());
        }
        if self.num_attention_heads == 0 || self.num_kv_heads == 0 {
            return bad("num_attention_heads and num_kv_heads must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_kv_heads {}",
                self.num_attention_heads, self.num_kv_heads
            ));
        }
        if self.multiple_of == 0 {
            return bad("multiple_of must be positive".into());
        }
        if let Some(m) = self.ffn_dim_multiplier {
            if !(m.is_finite() && m > 0.0) {
                return bad(format!("ffn_dim_multiplier {m} must be a positive number"));
            }
            // The product is computed in f64 before it is truncated to a
            // width: bound it there, so no huge float saturates to usize::MAX.
            let inner = m * (4 * self.hidden_size) as f64;
            if inner > Limits::FFN_WIDTH as f64 {
                return bad(format!(
                    "ffn_dim_multiplier {m} makes a feed-forward width of {inner:.0}, over the limit of {}",
                    Limits::FFN_WIDTH
                ));
            }
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
        if self.axes_dim_rope.len() != 3 || self.axes_lens.len() != 3 {
            return bad(format!(
                "axes_dim_rope {:?} and axes_lens {:?} must have 3 entries (caption, row, column)",
                self.axes_dim_rope, self.axes_lens
            ));
        }
        if self.axes_dim_rope.iter().any(|d| d % 2 != 0) {
            return bad(format!(
                "axes_dim_rope {:?} must be even",
                self.axes_dim_rope
            ));
        }
        let rope_dim = self
            .axes_dim_rope
            .iter()
            .try_fold(0usize, |a, &d| a.checked_add(d));
        if rope_dim != Some(self.head_dim()) {
            return bad(format!(
                "axes_dim_rope {:?} does not sum to the head dimension {}",
                self.axes_dim_rope,
                self.head_dim()
            ));
        }
        if self.axes_lens.iter().any(|&l| l == 0 || l > 1 << 20) {
            return bad(format!(
                "axes_lens {:?} must be in 1..=2^20",
                self.axes_lens
            ));
        }
        // The RoPE tables are sized by these alone (len x dim / 2 per axis).
        let table: usize = self
            .axes_lens
            .iter()
            .zip(&self.axes_dim_rope)
            .map(|(&l, &d)| l.saturating_mul(d / 2))
            .fold(0, usize::saturating_add);
        if table > 1 << 24 {
            return bad(format!(
                "axes_lens {:?} x axes_dim_rope {:?} make RoPE tables of {table} values (at most 2^24)",
                self.axes_lens, self.axes_dim_rope
            ));
        }
        let params = self.parameter_count();
        if params > Limits::PARAMETERS {
            return bad(format!(
                "the config describes {params} parameters, over the limit of {}",
                Limits::PARAMETERS
            ));
        }
        Ok(())
    }

    /// The number of weights the model loads for this config: the sum over
    /// [`crate::weight_shapes`], computed from the config's numbers alone
    /// (no per-layer list is built, so an absurd layer count costs nothing
    /// before [`Config::validate`] refuses it). Saturates at `u64::MAX`.
    pub fn parameter_count(&self) -> u64 {
        let n = |x: usize| x as u64;
        let (h, t, hd, ff) = (
            n(self.hidden_size),
            n(self.temb_dim()),
            n(self.head_dim()),
            n(self.ffn_inner_dim()),
        );
        let kv = n(self.num_kv_heads).saturating_mul(hd);
        let p2 = n(self.patch_size).saturating_mul(n(self.patch_size));
        let cap = n(self.cap_feat_dim);
        let out = p2.saturating_mul(n(self.out_channels()));
        let sum = |terms: &[u64]| terms.iter().fold(0u64, |a, &b| a.saturating_add(b));
        let mul = |a: u64, b: u64| a.saturating_mul(b);
        let freq = n(crate::embed::FREQUENCY_EMBEDDING_SIZE);
        let embedders = sum(&[
            mul(h, mul(p2, n(self.in_channels))) + h,
            mul(t, freq) + t,
            mul(t, t) + t,
            cap,
            mul(h, cap) + h,
        ]);
        // to_q, to_k, to_v, to_out, the two qk norms, the SwiGLU and four norms.
        let block = sum(&[
            mul(2, mul(h, h)),
            mul(2, mul(kv, h)),
            mul(2, hd),
            mul(3, mul(ff, h)),
            mul(3, h),
        ]);
        // adaLN: its linear, its bias and the modulated norm.
        let modulation = sum(&[mul(mul(4, h), t), mul(4, h), h]);
        let unmodulated = mul(n(self.num_refiner_layers), block.saturating_add(h));
        let modulated = mul(
            n(self.num_refiner_layers).saturating_add(n(self.num_layers)),
            block.saturating_add(modulation),
        );
        let final_layer = sum(&[mul(h, t), h, mul(out, h), out]);
        sum(&[embedders, unmodulated, modulated, final_layer])
    }

    /// Latent channels out.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Width of the timestep embedding and of the adaLN conditioning: `min(hidden_size, 1024)`.
    pub fn temb_dim(&self) -> usize {
        self.hidden_size.min(1024)
    }

    /// The dimensions, weight names and modulation of this model's blocks.
    pub fn block_spec(&self) -> crate::block::BlockSpec {
        crate::block::BlockSpec {
            dim: self.hidden_size,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_kv_heads,
            norm_eps: self.norm_eps,
            ffn_inner: self.ffn_inner_dim(),
            temb_dim: self.temb_dim(),
            qk_norm: true,
            modulation_input: crate::block::ModulationInput::Silu,
            keys: crate::block::BlockKeys::LUMINA2,
        }
    }

    /// Inner width of the SwiGLU feed-forward, computed as diffusers' `LuminaFeedForward`:
    /// `4 * hidden_size`, times `ffn_dim_multiplier` (truncated), rounded up to `multiple_of`.
    ///
    /// Saturates instead of overflowing on a config [`Config::validate`]
    /// would refuse.
    pub fn ffn_inner_dim(&self) -> usize {
        let mut inner = self.hidden_size.saturating_mul(4);
        if let Some(m) = self.ffn_dim_multiplier {
            // Python's int() truncates toward zero (`as` saturates).
            inner = (m * inner as f64).trunc() as usize;
        }
        let m = self.multiple_of.max(1);
        m.saturating_mul(inner.div_ceil(m))
    }
}

/// Parses `config.json` (or the file itself when `path` is a file), read
/// with the size bound of every config (a FIFO, `/dev/zero` or a huge file
/// is refused before it is read), its errors naming the file.
pub(crate) fn read_config_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let mut path = path.to_path_buf();
    if path.is_dir() {
        path = path.join("config.json");
    }
    let text =
        lumina2_weights::fs::read_to_string_bounded(&path, lumina2_weights::fs::MAX_CONFIG_BYTES)
            .map_err(|source| Error::ConfigIo {
            path: path.clone(),
            source,
        })?;
    serde_json::from_str(&text).map_err(|source| Error::ConfigParse {
        origin: path.display().to_string(),
        source,
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_config_of_the_2b_model() {
        // The transformer/config.json of Alpha-VLLM/Lumina-Image-2.0.
        let json = r#"{
          "_class_name": "Lumina2Transformer2DModel",
          "_diffusers_version": "0.33.0.dev0",
          "axes_dim_rope": [32, 32, 32],
          "axes_lens": [300, 512, 512],
          "cap_feat_dim": 2304,
          "ffn_dim_multiplier": null,
          "hidden_size": 2304,
          "in_channels": 16,
          "multiple_of": 256,
          "norm_eps": 1e-05,
          "num_attention_heads": 24,
          "num_kv_heads": 8,
          "num_layers": 26,
          "num_refiner_layers": 2,
          "out_channels": null,
          "patch_size": 2,
          "sample_size": 128,
          "scaling_factor": 1.0
        }"#;
        let cfg = Config::from_json_str(json).unwrap();
        assert_eq!(cfg.head_dim(), 96);
        assert_eq!(cfg.ffn_inner_dim(), 9216);
        assert_eq!(cfg.temb_dim(), 1024);
        assert_eq!(cfg.out_channels(), 16);
    }

    #[test]
    fn parameter_count_is_the_sum_of_the_weight_shapes() {
        for cfg in [
            Config::default(),
            Config {
                hidden_size: 48,
                num_attention_heads: 2,
                num_kv_heads: 1,
                axes_dim_rope: vec![8, 8, 8],
                multiple_of: 16,
                ffn_dim_multiplier: Some(1.3),
                num_layers: 3,
                num_refiner_layers: 1,
                cap_feat_dim: 40,
                out_channels: Some(8),
                ..Config::default()
            },
        ] {
            let listed: u64 = crate::weight_shapes(&cfg)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(cfg.parameter_count(), listed);
        }
    }

    #[test]
    fn defaults_match_diffusers() {
        let cfg = Config::from_json_str("{}").unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.cap_feat_dim, 1024);
    }

    #[test]
    fn ffn_multiplier_truncates_then_rounds_up() {
        let cfg = Config {
            hidden_size: 48,
            num_attention_heads: 2,
            num_kv_heads: 1,
            axes_dim_rope: vec![8, 8, 8],
            multiple_of: 16,
            ffn_dim_multiplier: Some(1.3),
            ..Config::default()
        };
        // int(1.3 * 192) = 249 -> 256
        assert_eq!(cfg.ffn_inner_dim(), 256);
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        for json in [
            r#"{"hidden_size": 100}"#,
            r#"{"num_kv_heads": 5}"#,
            r#"{"axes_dim_rope": [32, 32]}"#,
            r#"{"axes_dim_rope": [32, 32, 30]}"#,
            r#"{"axes_dim_rope": [31, 33, 32]}"#,
            r#"{"multiple_of": 0}"#,
            r#"{"patch_size": 0}"#,
            r#"{"hidden_size": "big"}"#,
            // Counts and widths over the limits, and derived sizes that
            // would overflow.
            r#"{"num_layers": 100000000}"#,
            r#"{"num_refiner_layers": 1000000}"#,
            r#"{"num_attention_heads": 4096, "num_kv_heads": 4096, "hidden_size": 4096}"#,
            r#"{"hidden_size": 1152921504606846976}"#,
            r#"{"ffn_dim_multiplier": 1e308}"#,
            r#"{"ffn_dim_multiplier": 1e5}"#,
            r#"{"in_channels": 4611686018427387904}"#,
            r#"{"out_channels": 4611686018427387904}"#,
            r#"{"patch_size": 4294967296}"#,
            r#"{"cap_feat_dim": 4611686018427387904}"#,
            r#"{"multiple_of": 4611686018427387904}"#,
            r#"{"axes_dim_rope": [9223372036854775808, 9223372036854775808, 96]}"#,
            r#"{"num_layers": 1024, "hidden_size": 65472, "num_attention_heads": 682, "num_kv_heads": 682, "axes_dim_rope": [32, 32, 32]}"#,
        ] {
            assert!(Config::from_json_str(json).is_err(), "{json} was accepted");
        }
    }
}
