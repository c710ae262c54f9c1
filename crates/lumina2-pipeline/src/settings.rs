//! The settings both pipeline builders take ([`crate::PipelineBuilder`],
//! [`crate::ZImagePipelineBuilder`]) and the checks `build` makes on them.
//!
//! The two pipelines differ in their sources, text encoders and
//! transformers, not in how they are placed and kept: one struct holds those
//! settings so that each builder states only its sources and its own checks
//! ([`pipeline_builder`] writes the builders).

use candle_core::{DType, Device};

use crate::error::{invalid, Result};

/// The dtype, device and memory settings of a pipeline, as its builder sets
/// them and as the pipeline then runs with them.
#[derive(Debug, Clone)]
pub(crate) struct BuildSettings {
    /// The compute dtype of every component.
    pub dtype: DType,
    /// Where every component runs.
    pub device: Device,
    /// Keep components loaded between stages and generations.
    pub keep_resident: bool,
    /// Decode tile by tile.
    pub vae_tiling: bool,
    /// Quantise the transformer's block linears to int8 as they load.
    pub int8_transformer: bool,
}

impl Default for BuildSettings {
    /// f32 on the CPU, each component loaded when needed, whole-image decode,
    /// no int8.
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            keep_resident: false,
            vae_tiling: false,
            int8_transformer: false,
        }
    }
}

impl BuildSettings {
    /// The checks of `build` that need no configuration: a compute dtype,
    /// and int8 linears only on the CPU.
    pub fn check(&self) -> Result<()> {
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(invalid(
                "dtype",
                format!("{:?} is not a compute dtype (f32, bf16, f16)", self.dtype),
            ));
        }
        if self.int8_transformer {
            check_int8_device(&self.device)?;
        }
        Ok(())
    }
}

/// The VAE's latents are the transformer's input: their channel counts must match.
pub(crate) fn check_latent_channels(vae_latent: usize, transformer_in: usize) -> Result<()> {
    if vae_latent != transformer_in {
        return Err(invalid(
            "vae",
            format!(
                "the VAE has {vae_latent} latent channels, the transformer takes {transformer_in}"
            ),
        ));
    }
    Ok(())
}

/// int8 linears run on the CPU only: the kernels are CPU code (AMX-INT8,
/// AVX512-VNNI, plain Rust); on a GPU they would copy every activation to
/// the host and back at each layer.
pub(crate) fn check_int8_device(device: &Device) -> Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    Err(invalid(
        "int8",
        format!(
            "int8 linears run on the CPU only, not on {}; on a GPU use bf16, f16 or a GGUF transformer",
            device_name(device)
        ),
    ))
}

/// `cpu`, `cuda:N` or `metal:N`, as the CLI's `--device` spells it.
pub(crate) fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// A pipeline's builder: the struct (its sources and [`BuildSettings`]),
/// the setters of the settings and `build`, which checks the settings before
/// `$pipeline::new(sources, settings)` reads and checks the configurations.
/// The builder's own doc comment and those of the setters whose meaning
/// differs a little between the pipelines (`dtype`, `keep_resident`,
/// `int8_transformer`, in that order) are given; the others are the same
/// for both.
macro_rules! pipeline_builder {
    // Each setter sets the field of `BuildSettings` of its name.
    (@setters $($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty);)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.settings.$name = $arg;
                self
            }
        )*
    };
    (
        $(#[$doc:meta])*
        $builder:ident($sources:ty) -> $pipeline:ident;
        $(#[$dtype:meta])* dtype;
        $(#[$keep:meta])* keep_resident;
        $(#[$int8:meta])* int8_transformer;
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $builder {
            sources: $sources,
            settings: $crate::settings::BuildSettings,
        }

        impl $builder {
            $crate::settings::pipeline_builder! {
                @setters
                $(#[$dtype])* dtype(dtype: candle_core::DType);
                /// The device (CPU by default).
                device(device: candle_core::Device);
                $(#[$keep])* keep_resident(keep: bool);
                /// Decode large images tile by tile (diffusers' `enable_tiling`).
                vae_tiling(tiling: bool);
                $(#[$int8])* int8_transformer(on: bool);
            }

            /// Reads and checks the configurations; the weights are loaded when used.
            pub fn build(self) -> $crate::error::Result<$pipeline> {
                self.settings.check()?;
                $pipeline::new(self.sources, self.settings)
            }
        }
    };
}
pub(crate) use pipeline_builder;
