//! `config.json` of diffusers' `AutoencoderKL`, with diffusers' defaults.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::error::{Result, VaeError};

/// Upper bounds on a VAE config's numbers, far above any real VAE (the Flux
/// VAE: 4 levels of at most 512 channels, 2 layers per block, 16 latent
/// channels) and far below what would overflow sizes.
#[derive(Debug, Clone, Copy)]
pub struct Limits;

impl Limits {
    /// Resolution levels (`block_out_channels.len()`): the downsampling
    /// factor is `2^(levels - 1)`.
    pub const LEVELS: usize = 8;
    /// Channels of a level, latent channels and norm groups.
    pub const CHANNELS: usize = 16384;
    /// Image channels in and out.
    pub const IMAGE_CHANNELS: usize = 64;
    /// Residual blocks per level.
    pub const LAYERS_PER_BLOCK: usize = 64;
    /// `sample_size` (the tile size).
    pub const SAMPLE_SIZE: usize = 1 << 16;
    /// Weights of the 3x3 convolutions, estimated from the config: 2^34.
    pub const PARAMETERS: u64 = 1 << 34;
}

/// The configuration of an `AutoencoderKL`, as diffusers writes it in
/// `config.json`. Missing keys take diffusers' defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels the encoder reads.
    pub in_channels: usize,
    /// Image channels the decoder writes.
    pub out_channels: usize,
    /// Encoder block types (only `DownEncoderBlock2D`).
    pub down_block_types: Vec<String>,
    /// Decoder block types (only `UpDecoderBlock2D`).
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level, highest resolution first.
    pub block_out_channels: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// Activation of the residual blocks (`silu`/`swish`, `relu`, `gelu`, `mish`).
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Image size the model was trained on: the tile size of tiled encoding
    /// and decoding. A list (as some configs write) gives its first element.
    #[serde(deserialize_with = "int_or_first")]
    pub sample_size: usize,
    /// Latent scale: the pipeline decodes `latents / scaling_factor + shift_factor`.
    pub scaling_factor: f64,
    /// Latent shift (none: 0).
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (unused by `AutoencoderKL` itself).
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations (unused by `AutoencoderKL` itself).
    pub latents_std: Option<Vec<f64>>,
    /// Whether pipelines run this VAE in f32 even with a half-precision model.
    pub force_upcast: bool,
    /// Whether a 1x1 `quant_conv` follows the encoder.
    pub use_quant_conv: bool,
    /// Whether a 1x1 `post_quant_conv` precedes the decoder.
    pub use_post_quant_conv: bool,
    /// Whether the middle blocks hold a self-attention layer.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

fn int_or_first<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrList {
        Int(usize),
        List(Vec<usize>),
    }
    match IntOrList::deserialize(d)? {
        IntOrList::Int(n) => Ok(n),
        IntOrList::List(v) => v
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("empty sample_size list")),
    }
}

impl AutoencoderKLConfig {
    /// The Flux VAE (16 latent channels) that Lumina-Image 2.0 uses.
    pub fn flux() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            layers_per_block: 2,
            latent_channels: 16,
            sample_size: 1024,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            ..Self::default()
        }
    }

    /// Parses a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `config.json` from a component folder, or the given file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let file = if p.is_dir() {
            p.join("config.json")
        } else {
            p.to_path_buf()
        };
        let text = lumina2_weights::fs::read_to_string_bounded(
            &file,
            lumina2_weights::fs::MAX_CONFIG_BYTES,
        )
        .map_err(|source| VaeError::ConfigIo {
            path: file.clone(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Checks what the modules rely on, and that every count and width is
    /// within [`Limits`] (nothing is sized from a config before this passes).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VaeError::Config(m));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if n > Limits::LEVELS {
            return bad(format!(
                "{n} resolution levels (block_out_channels) are over the limit of {}",
                Limits::LEVELS
            ));
        }
        let counts = [
            ("in_channels", self.in_channels, Limits::IMAGE_CHANNELS),
            ("out_channels", self.out_channels, Limits::IMAGE_CHANNELS),
            ("latent_channels", self.latent_channels, Limits::CHANNELS),
            (
                "layers_per_block",
                self.layers_per_block,
                Limits::LAYERS_PER_BLOCK,
            ),
            ("norm_num_groups", self.norm_num_groups, Limits::CHANNELS),
            ("sample_size", self.sample_size, Limits::SAMPLE_SIZE),
        ];
        let widths = self
            .block_out_channels
            .iter()
            .map(|&c| ("block_out_channels", c, Limits::CHANNELS));
        for (name, value, max) in counts.into_iter().chain(widths) {
            if value > max {
                return bad(format!("{name} {value} is over the limit of {max}"));
            }
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| t.as_str() != "DownEncoderBlock2D")
        {
            return bad(format!("down block type `{t}` is not supported"));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return bad(format!("up block type `{t}` is not supported"));
        }
        if self.norm_num_groups == 0 {
            return bad("norm_num_groups is 0".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "block_out_channels {c} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return bad("zero channels".into());
        }
        crate::layers::Activation::parse(&self.act_fn)?;
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return bad(format!("scaling_factor {}", self.scaling_factor));
        }
        if let Some(s) = self.shift_factor.filter(|s| !s.is_finite()) {
            return bad(format!("shift_factor {s} is not a finite number"));
        }
        // The 3x3 convolutions dominate: two per residual block, a decoder
        // level has one block more than an encoder level.
        let convs = |c: usize| (c as u64).pow(2).saturating_mul(9 * 2);
        let params = self
            .block_out_channels
            .iter()
            .map(|&c| convs(c).saturating_mul(2 * self.layers_per_block as u64 + 1))
            .fold(0u64, u64::saturating_add);
        if params > Limits::PARAMETERS {
            return bad(format!(
                "block_out_channels {:?} with layers_per_block {} make about {params} convolution weights, over the limit of {}",
                self.block_out_channels,
                self.layers_per_block,
                Limits::PARAMETERS
            ));
        }
        Ok(())
    }

    /// Spatial downsampling factor between image and latent: `2^(levels - 1)`.
    pub fn downsample_factor(&self) -> usize {
        1usize << self.block_out_channels.len().saturating_sub(1)
    }
}
