//! An up-front memory estimate, so that a request too large for the machine
//! is refused with a number before anything is allocated.
//!
//! The estimate is deliberately simple: weights from the configs (or the file
//! size of a single-file checkpoint, which covers quantised GGUF), and the
//! largest activations of each stage with a safety factor. It is meant to
//! catch absurd sizes, not to predict the peak to the megabyte.

use std::path::Path;

use candle_core::{DType, Device};
use lumina2_transformer::Config as TransformerConfig;
use lumina2_vae::{AutoencoderKLConfig, Tiling};

/// Estimated bytes per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Text encoder weights plus its activations.
    pub encode: u64,
    /// Transformer weights plus the activations of one forward.
    pub denoise: u64,
    /// VAE weights plus the decoder's activations.
    pub decode: u64,
    /// Of these, the weights of the components the pipeline holds already:
    /// memory that is taken, which the available memory no longer counts.
    pub loaded: u64,
}

impl MemoryEstimate {
    /// The peak: the largest stage when components are loaded one at a time,
    /// all weights plus the largest activations when they stay resident.
    pub fn peak(&self, resident: bool) -> u64 {
        if resident {
            self.encode + self.denoise + self.decode
        } else {
            self.encode.max(self.denoise).max(self.decode)
        }
    }

    /// What the request still needs beyond the memory already taken: with
    /// resident components, the peak less the weights already loaded (a
    /// server or batch run that keeps its models is not charged for them
    /// twice); otherwise the peak, since each component is loaded anew.
    pub fn needed(&self, resident: bool) -> u64 {
        if resident {
            self.peak(true).saturating_sub(self.loaded)
        } else {
            self.peak(false)
        }
    }
}

/// Bytes of one element of `dtype`.
pub(crate) fn dtype_bytes(dtype: DType) -> u64 {
    dtype.size_in_bytes() as u64
}

/// Weights and one forward of the transformer for `batch` images of
/// `width` x `height` with `caption_len` text tokens.
pub fn transformer_bytes(
    cfg: &TransformerConfig,
    weights_bytes: u64,
    batch: usize,
    width: usize,
    height: usize,
    caption_len: usize,
) -> u64 {
    // Saturating: an absurd request must come out as a huge estimate (and be
    // refused), never wrap around to a small one.
    let tokens = ((width / 16) as u64)
        .saturating_mul((height / 16) as u64)
        .saturating_add(caption_len as u64);
    let d = cfg.hidden_size as u64;
    let ffn = cfg.ffn_inner_dim() as u64;
    // Residual stream, normed copies, q/k/v/out and the two FFN branches, in
    // f32 where diffusers upcasts; attention scores are chunked (64 MiB).
    let per_token = d
        .saturating_mul(10)
        .saturating_add(ffn.saturating_mul(3))
        .saturating_mul(4);
    weights_bytes
        .saturating_add(
            (batch as u64)
                .saturating_mul(tokens)
                .saturating_mul(per_token),
        )
        .saturating_add(64 << 20)
}

/// The transformer's parameters times the dtype size.
pub fn transformer_weight_bytes(cfg: &TransformerConfig, dtype: DType) -> u64 {
    // From the config's numbers: no per-layer list is built.
    cfg.parameter_count().saturating_mul(dtype_bytes(dtype))
}

/// The VAE decoder's weights and activations for `batch` images.
pub fn vae_decode_bytes(
    cfg: &AutoencoderKLConfig,
    weights_bytes: u64,
    batch: usize,
    width: usize,
    height: usize,
    tiled: bool,
) -> u64 {
    let full = (width as u64).saturating_mul(height as u64);
    let pixels = if tiled {
        let t = Tiling::from_config(cfg).sample_tile as u64;
        t.saturating_mul(t).min(full)
    } else {
        full
    };
    let ch = cfg.block_out_channels.first().copied().unwrap_or(128) as u64;
    // The last up block at full resolution: input, output, a residual and the
    // 3x3 convolution's unfolded input (9 channels per channel), in f32.
    weights_bytes.saturating_add(
        (batch as u64)
            .saturating_mul(pixels)
            .saturating_mul(ch)
            .saturating_mul(4 * (3 + 9)),
    )
}

/// Total size of the regular files in `dir` (or of `dir` itself when it is a file).
pub fn files_bytes(dir: &Path) -> u64 {
    if dir.is_file() {
        return std::fs::metadata(dir).map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x == "safetensors" || x == "gguf" || x == "pth")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .fold(0u64, u64::saturating_add)
        })
        .unwrap_or(0)
}

/// The bytes of one component's weights in `path`: in a ComfyUI all-in-one
/// checkpoint (which holds every component) the tensors under `prefix`
/// only, from its header; anywhere else [`files_bytes`].
pub fn component_bytes(path: &Path, prefix: &str) -> u64 {
    if path.is_file() {
        if let Ok(f) = lumina2_loader::SingleFile::open(path) {
            if f.layout() == lumina2_loader::SingleFileLayout::Checkpoint {
                let src = f.source();
                return lumina2_weights::WeightSource::keys(src.as_ref())
                    .iter()
                    .filter(|k| k.starts_with(prefix))
                    .filter_map(|k| src.tensor_info(k))
                    .map(|(d, s)| {
                        s.iter()
                            .fold(d.size_in_bytes() as u64, |a, &n| a.saturating_mul(n as u64))
                    })
                    .fold(0u64, u64::saturating_add);
            }
        }
    }
    files_bytes(path)
}

/// Memory the run may still use on `device`: on the CPU, `MemAvailable` of
/// `/proc/meminfo` (Linux); on a CUDA GPU, the device's free memory (the
/// weights and activations live there); `None` where unknown (Metal, which
/// shares the system's memory but does not report it through candle, and
/// other systems), in which case the check passes.
pub fn available_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => system_available_bytes(),
        Device::Cuda(_) => cuda_free_bytes(device),
        Device::Metal(_) => None,
    }
}

/// `MemAvailable` of `/proc/meminfo`.
fn system_available_bytes() -> Option<u64> {
    let text = lumina2_weights::fs::read_to_string_bounded(
        Path::new("/proc/meminfo"),
        lumina2_weights::fs::MAX_CONFIG_BYTES,
    )
    .ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// The free memory of a CUDA device, as its driver reports it.
#[cfg(feature = "cuda")]
fn cuda_free_bytes(device: &Device) -> Option<u64> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    u64::try_from(free).ok()
}

/// Without the `cuda` feature no CUDA device can exist.
#[cfg(not(feature = "cuda"))]
fn cuda_free_bytes(_device: &Device) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::MemoryEstimate;

    #[test]
    fn loaded_weights_are_not_charged_twice_when_resident() {
        let est = MemoryEstimate {
            encode: 10,
            denoise: 20,
            decode: 5,
            loaded: 12,
        };
        // Resident: all weights plus activations, less what is already held.
        assert_eq!(est.peak(true), 35);
        assert_eq!(est.needed(true), 23);
        // One component at a time: the largest stage, loaded anew.
        assert_eq!(est.needed(false), 20);
        let none_held = MemoryEstimate { loaded: 0, ..est };
        assert_eq!(none_held.needed(true), 35);
    }

    /// An all-in-one checkpoint is counted per component, not whole for
    /// each: the parts add up to the file's data, each less than the file.
    #[test]
    fn an_all_in_one_checkpoint_counts_each_components_tensors() {
        use lumina2_loader::comfy::{
            CHECKPOINT_SPIECE_KEY, TEXT_ENCODER_PREFIX, TRANSFORMER_PREFIX, VAE_PREFIX,
        };
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/comfy/lumina_2.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let data = bytes.len() as u64 - 8 - header;
        let parts = [
            TRANSFORMER_PREFIX,
            TEXT_ENCODER_PREFIX,
            VAE_PREFIX,
            CHECKPOINT_SPIECE_KEY,
            "text_encoders.gemma2_2b.logit_scale",
        ]
        .map(|p| super::component_bytes(&path, p));
        assert!(parts.iter().all(|&n| n > 0 && n < data), "{parts:?}");
        assert_eq!(parts.iter().sum::<u64>(), data);
        // Any other file: its size, as before.
        assert_eq!(
            super::component_bytes(&path.with_file_name("ae.safetensors"), VAE_PREFIX),
            super::files_bytes(&path.with_file_name("ae.safetensors"))
        );
    }
}
