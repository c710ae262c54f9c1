//! The compute dtype a user gets when they do not choose one.

use candle_core::{DType, Device};

/// The dtype `auto` resolves to on a device, with the reason in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoDtype {
    /// bf16 or f32.
    pub dtype: DType,
    /// Why, for the user (`"the CPU has AMX"`, ...).
    pub reason: &'static str,
}

/// bf16 where the device computes it natively (GPUs; CPUs with AMX or
/// AVX512-BF16, where our packed bf16 kernels run), f32 elsewhere: on other
/// CPUs bf16 is emulated through f32 and only costs precision. f32 stays the
/// choice for exact parity with PyTorch's f32 reference.
pub fn auto_dtype(device: &Device) -> AutoDtype {
    if !device.is_cpu() {
        return AutoDtype {
            dtype: DType::BF16,
            reason: "GPUs compute bf16 natively",
        };
    }
    let caps = lumina2_kernels::caps();
    if caps.amx_bf16 {
        AutoDtype {
            dtype: DType::BF16,
            reason: "the CPU has AMX",
        }
    } else if caps.avx512_bf16 {
        AutoDtype {
            dtype: DType::BF16,
            reason: "the CPU has AVX512-BF16",
        }
    } else {
        AutoDtype {
            dtype: DType::F32,
            reason: "the CPU has no native bf16 (AVX512-BF16 or AMX)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_choice_follows_the_capabilities() {
        let a = auto_dtype(&Device::Cpu);
        let caps = lumina2_kernels::caps();
        let native = caps.amx_bf16 || caps.avx512_bf16;
        assert_eq!(a.dtype, if native { DType::BF16 } else { DType::F32 });
        assert!(!a.reason.is_empty());
    }
}
