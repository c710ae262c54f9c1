//! Which kernel a linear layer `y = x W^T + b` multiplies on, from the form
//! its weight is kept in and the input's device and dtype; and candle's
//! matmul, the path everywhere else.

use candle_core::{DType, Tensor};

use crate::gemm::packed;

/// The form a linear layer keeps its `[out, in]` weight in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightForm {
    /// A dense tensor.
    Dense,
    /// A quantised tensor (GGUF blocks), dequantised or packed when used.
    Quantized,
    /// Repacked for the packed bf16 kernel ([`packed::PackedBf16`]).
    PackedBf16,
    /// A bf16 matrix used in place in its file's memory map
    /// ([`crate::gemm::mapped::RowMajorBf16`]).
    MappedBf16,
    /// Quantised to int8 per output row ([`crate::gemm::int8::PackedI8`]).
    Int8,
}

/// Where a linear layer's product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The packed bf16 kernel with the layer's packed weight.
    PackedBf16,
    /// The in-place bf16 kernel with the layer's mapped weight.
    MappedBf16,
    /// The int8 kernel with the layer's int8 weight.
    Int8,
    /// A quantised weight packed for this call, then the packed bf16 kernel
    /// (bf16 inputs of at least [`PACK_PER_CALL_ROWS`] rows).
    PackPerCall,
    /// The weight made dense in the input's dtype, candle's matmul.
    Candle,
}

/// The fewest input rows for which a quantised weight is packed per call:
/// packing costs about one pass over the weight, worth it once a few rows
/// share it.
pub const PACK_PER_CALL_ROWS: usize = 16;

/// Whether a dense `weight` is repacked for the packed bf16 kernel when a
/// layer is built: a bf16 matrix on the CPU, the kernel available
/// ([`packed::available`]).
pub fn packs(weight: &Tensor) -> bool {
    weight.dtype() == DType::BF16
        && weight.device().is_cpu()
        && weight.rank() == 2
        && packed::available()
}

/// The path of a layer whose weight is kept as `form`, for the input `x`
/// (`[..., in]`). The packed and int8 weights live on the CPU: they serve
/// CPU inputs, any other goes through candle with the weight made dense.
pub fn path(form: WeightForm, x: &Tensor) -> Path {
    let cpu = x.device().is_cpu();
    let in_dim = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / in_dim.max(1);
    match form {
        WeightForm::PackedBf16 if cpu => Path::PackedBf16,
        WeightForm::MappedBf16 if cpu => Path::MappedBf16,
        WeightForm::Int8 if cpu => Path::Int8,
        WeightForm::Quantized
            if cpu
                && x.dtype() == DType::BF16
                && rows >= PACK_PER_CALL_ROWS
                && packed::available() =>
        {
            Path::PackPerCall
        }
        _ => Path::Candle,
    }
}

/// Whether a gated feed-forward on Q4_0 weights runs its one-pass kernels
/// ([`packed::PackedBf16::gated_q4_0_rows`],
/// [`packed::PackedBf16::feed_forward_q4_0`]) for the input `x`: bf16 inputs
/// of at least [`PACK_PER_CALL_ROWS`] rows, with AMX usable. Those are the
/// inputs for which each of its layers alone would run the packed kernel
/// ([`Path::PackPerCall`]), whose bits the one-pass kernels reproduce; on
/// fewer rows the layers run one by one, as [`path`] sends each. (The
/// kernels themselves answer `None` for weights of other types.)
pub fn fused_q4_0(x: &Tensor) -> bool {
    let rows = x.dims().last().map_or(0, |&w| x.elem_count() / w.max(1));
    x.dtype() == DType::BF16 && rows >= PACK_PER_CALL_ROWS && packed::use_amx()
}

/// candle's `x W^T + b` for rows `x` `[n, in]`, `weight` `[out, in]` and
/// `bias` `[out]` (cast to the product's dtype), in `x`'s dtype.
pub fn matmul(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let w = weight.to_dtype(x.dtype())?;
    let y = x.matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}
