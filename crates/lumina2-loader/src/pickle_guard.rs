//! The globals a `torch.save` state dict may name, and what each one means to
//! the pickle interpreter.
//!
//! Nothing from a pickle is ever executed: a global is only a name that the
//! interpreter resolves here to one of a few known meanings. Any other name
//! (`os.system`, `builtins.eval`, a tensor subclass) is refused outright,
//! so a checkpoint that needs more than tensor rebuilding and storage types is
//! an error instead of being half-read.

use candle_core::DType;

/// What an allowed global stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`: called with no arguments, a new dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
    /// requires_grad, backward_hooks[, metadata])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, backward_hooks)`.
    RebuildParameter,
    /// A typed storage class (`torch.FloatStorage`, ...), named by a
    /// persistent id.
    Storage(StorageType),
}

/// A `torch.*Storage` class: the element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    /// `torch.FloatStorage`, f32.
    Float,
    /// `torch.DoubleStorage`, f64.
    Double,
    /// `torch.HalfStorage`, f16.
    Half,
    /// `torch.BFloat16Storage`, bf16.
    BFloat16,
    /// `torch.LongStorage`, i64.
    Long,
    /// `torch.IntStorage`, i32.
    Int,
    /// `torch.ShortStorage`, i16.
    Short,
    /// `torch.CharStorage`, i8.
    Char,
    /// `torch.ByteStorage`, u8.
    Byte,
    /// `torch.BoolStorage`, one byte 0 or 1 per element.
    Bool,
}

impl StorageType {
    /// Bytes per element.
    pub fn elem_size(self) -> u64 {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }

    /// The candle dtype holding these elements unchanged, if candle has one
    /// (booleans are read as `u8` 0/1, as PyTorch stores them).
    pub fn dtype(self) -> Option<DType> {
        Some(match self {
            Self::Float => DType::F32,
            Self::Double => DType::F64,
            Self::Half => DType::F16,
            Self::BFloat16 => DType::BF16,
            Self::Long => DType::I64,
            Self::Int => DType::I32,
            Self::Short => DType::I16,
            Self::Byte | Self::Bool => DType::U8,
            Self::Char => return None,
        })
    }

    /// The PyTorch class name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float => "FloatStorage",
            Self::Double => "DoubleStorage",
            Self::Half => "HalfStorage",
            Self::BFloat16 => "BFloat16Storage",
            Self::Long => "LongStorage",
            Self::Int => "IntStorage",
            Self::Short => "ShortStorage",
            Self::Char => "CharStorage",
            Self::Byte => "ByteStorage",
            Self::Bool => "BoolStorage",
        }
    }
}

const STORAGES: [StorageType; 10] = [
    StorageType::Float,
    StorageType::Double,
    StorageType::Half,
    StorageType::BFloat16,
    StorageType::Long,
    StorageType::Int,
    StorageType::Short,
    StorageType::Char,
    StorageType::Byte,
    StorageType::Bool,
];

/// The meaning of `module.name`, or `None` when a state dict has no business
/// naming it.
pub fn resolve(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", s) => STORAGES
            .iter()
            .find(|t| t.name() == s)
            .map(|&t| Global::Storage(t)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_state_dict_globals_resolve() {
        assert_eq!(
            resolve("torch", "BFloat16Storage"),
            Some(Global::Storage(StorageType::BFloat16))
        );
        assert_eq!(
            resolve("torch._utils", "_rebuild_tensor_v2"),
            Some(Global::RebuildTensorV2)
        );
        for (m, n) in [
            ("os", "system"),
            ("builtins", "eval"),
            ("torch", "load"),
            ("torch._utils", "_rebuild_from_type_v2"),
            ("collections", "defaultdict"),
        ] {
            assert_eq!(resolve(m, n), None, "{m}.{n}");
        }
    }
}
