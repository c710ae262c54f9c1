//! The token embedding table: dense, or quantised (a GGUF file) and kept so.
//!
//! Gemma-2's table is large (256000 x 2304: 1.2 GB in bf16, 2.4 GB in f32,
//! more than all the quantised layers of a Q4_0 file together). A bf16 or
//! f16 table stays so under f32 compute (its rows widened, exactly, when
//! gathered); a bf16 table in a memory-mapped file stays there, a lookup
//! reading only its rows; a quantised table stays as stored; a lookup dequantises only the rows of the tokens
//! asked for. Rows are whole quantisation blocks, so a row dequantised alone
//! has exactly the values of the whole table dequantised.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::{LinearWeight, Weights};
use lumina2_kernels::gemm::mapped::RowMajorBf16;

/// A `[vocab, hidden]` embedding table.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    /// As [`Weights::table`] hands it out (the compute dtype, or f16/bf16
    /// for f32 compute); rows are converted to `dtype` when looked up.
    Dense { table: Tensor, dtype: DType },
    /// Bf16, where it lies in a memory-mapped file; rows are read and
    /// converted to `dtype` when looked up.
    Mapped {
        table: Arc<RowMajorBf16>,
        dtype: DType,
    },
    /// As stored; rows are dequantised to `dtype` when looked up.
    Quantized {
        table: Arc<QTensor>,
        row_bytes: usize,
        dtype: DType,
    },
}

impl Embedding {
    /// `name.weight` of `[vocab, hidden]`, quantised when the source hands it
    /// out quantised (a GGUF file), else dense as [`Weights::table`] keeps it.
    pub(crate) fn load(w: &Weights, name: &str, vocab: usize, hidden: usize) -> Result<Self> {
        let dtype = w.dtype();
        match w.table(name, hidden, vocab)? {
            LinearWeight::Dense(table) => Ok(Self::Dense { table, dtype }),
            LinearWeight::MappedBf16(table) => Ok(Self::Mapped { table, dtype }),
            packed @ (LinearWeight::PackedBf16(_) | LinearWeight::Int8(_)) => Ok(Self::Dense {
                table: packed.to_dense(w.device())?.to_dtype(dtype)?,
                dtype,
            }),
            LinearWeight::Quantized(q) => {
                let ty = q.dtype();
                let (block, size) = (ty.block_size(), ty.type_size());
                if block == 0 || !hidden.is_multiple_of(block) {
                    return Err(Error::InvalidConfig(format!(
                        "{name}.weight: rows of {hidden} values are not whole {ty:?} blocks of {block}"
                    )));
                }
                Ok(Self::Quantized {
                    table: q,
                    row_bytes: hidden / block * size,
                    dtype: w.dtype(),
                })
            }
        }
    }

    /// The rows of `ids` (already checked against the vocabulary size), as
    /// `[ids.len(), hidden]` on `device`.
    pub(crate) fn lookup(&self, ids: &[u32], hidden: usize, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense { table, dtype } => {
                let ids = Tensor::from_slice(ids, ids.len(), device)?;
                Ok(table.index_select(&ids, 0)?.to_dtype(*dtype)?)
            }
            Self::Mapped { table, dtype } => Ok(table
                .gather_rows(ids)?
                .to_dtype(*dtype)?
                .to_device(device)?),
            Self::Quantized {
                table,
                row_bytes,
                dtype,
            } => {
                let data = table.data()?;
                let mut rows = Vec::with_capacity(ids.len() * row_bytes);
                for &id in ids {
                    let start = id as usize * row_bytes;
                    let row = data.get(start..start + row_bytes).ok_or_else(|| {
                        Error::InvalidConfig(format!(
                            "token id {id} is past the quantised embedding table"
                        ))
                    })?;
                    rows.extend_from_slice(row);
                }
                let storage = QStorage::from_data(Cow::Owned(rows), &Device::Cpu, table.dtype())?;
                let q = QTensor::new(storage, (ids.len(), hidden))?;
                Ok(q.dequantize(&Device::Cpu)?
                    .to_dtype(*dtype)?
                    .to_device(device)?)
            }
        }
    }
}
