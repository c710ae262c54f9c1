//! fp8 weights: safetensors' `F8_E4M3` (PyTorch's `float8_e4m3fn`) and
//! `F8_E5M2` (`float8_e5m2`), decoded per tensor to f16, which holds every
//! value of both formats exactly (so the compute dtype's cast is exact too),
//! and ComfyUI's scaled-fp8 layout: `NAME.weight` times the f32 scalar
//! `NAME.scale_weight` (comfy/ops.py `scaled_fp8_ops`: `weight *
//! scale_weight`), computed in f32.

/// The two fp8 formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8 {
    /// 4 exponent bits (bias 7), 3 mantissa bits, no infinities; 0x7F and
    /// 0xFF are NaN (the "fn" variant).
    E4M3,
    /// 5 exponent bits (bias 15), 2 mantissa bits: the top byte of an f16.
    E5M2,
}

impl Fp8 {
    /// The format of a safetensors dtype name.
    pub fn from_st(name: &str) -> Option<Self> {
        match name {
            "F8_E4M3" => Some(Self::E4M3),
            "F8_E5M2" => Some(Self::E5M2),
            _ => None,
        }
    }

    /// The safetensors dtype name of the format.
    pub fn st_name(self) -> &'static str {
        match self {
            Self::E4M3 => "F8_E4M3",
            Self::E5M2 => "F8_E5M2",
        }
    }

    /// The f16 holding the value of `b` exactly.
    pub fn to_f16(self, b: u8) -> half::f16 {
        match self {
            Fp8::E5M2 => half::f16::from_bits(u16::from(b) << 8),
            Fp8::E4M3 => {
                let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
                let e = i32::from((b >> 3) & 0x0F);
                let m = f32::from(b & 0x07);
                let v = if e == 15 && m == 7.0 {
                    f32::NAN
                } else if e == 0 {
                    // Subnormal: m * 2^-9.
                    m * (2f32).powi(-9)
                } else {
                    (8.0 + m) * (2f32).powi(e - 10)
                };
                // Exact: 3 mantissa bits and exponents -9..8 fit in f16.
                half::f16::from_f32(sign * v)
            }
        }
    }

    /// Every byte decoded: a table for the per-element conversion.
    pub fn table(self) -> [half::f16; 256] {
        std::array::from_fn(|b| self.to_f16(b as u8))
    }
}

/// Whether `key` is part of ComfyUI's scaled-fp8 bookkeeping rather than a
/// weight: the per-layer `scale_weight` / `scale_input` scalars and the
/// `scaled_fp8` marker.
pub fn is_scale_key(key: &str) -> bool {
    key == "scaled_fp8"
        || key.ends_with(".scaled_fp8")
        || key.ends_with(".scale_weight")
        || key.ends_with(".scale_input")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let t = Fp8::E4M3.table();
        assert_eq!(t[0x38].to_f32(), 1.0);
        assert_eq!(t[0x7E].to_f32(), 448.0);
        assert_eq!(t[0x01].to_f32(), 2f32.powi(-9));
        assert!(t[0x7F].is_nan() && t[0xFF].is_nan());
        assert_eq!(t[0xB8].to_f32(), -1.0);
        let t = Fp8::E5M2.table();
        assert_eq!(t[0x3C].to_f32(), 1.0);
        assert_eq!(t[0x7B].to_f32(), 57344.0);
        assert!(t[0x7C].to_f32().is_infinite());
    }
}
