//! GGUF files as a weight source: linear weights stay quantised (candle
//! `QTensor`s) where candle has the block type; everything else is dequantised
//! by our kernels when loaded.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use lumina2_transformer::{LinearWeight, WeightSource};

use crate::gguf::GgufFile;

fn load_err(file: &GgufFile, key: &str, e: impl std::fmt::Display) -> lumina2_weights::Error {
    lumina2_weights::Error::WeightLoad {
        key: key.to_string(),
        source_name: file.path().display().to_string(),
        reason: e.to_string(),
    }
}

impl WeightSource for GgufFile {
    fn contains(&self, key: &str) -> bool {
        self.tensor_info(key).is_ok()
    }
    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        GgufFile::tensor(self, key, DType::F32, &Device::Cpu).map_err(|e| load_err(self, key, e))
    }
    fn linear(&self, key: &str) -> lumina2_weights::Result<LinearWeight> {
        let info = self.tensor_info(key).map_err(|e| load_err(self, key, e))?;
        if info.ggml_type.block_size() > 1 && info.ggml_type.to_candle().is_some() {
            let q = self
                .qtensor(key, &Device::Cpu)
                .map_err(|e| load_err(self, key, e))?;
            Ok(LinearWeight::Quantized(Arc::new(q)))
        } else {
            Ok(LinearWeight::Dense(WeightSource::tensor(self, key)?))
        }
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.tensor_infos().iter().map(|t| t.name.clone()).collect();
        k.sort();
        k
    }
    fn name(&self) -> String {
        self.path().display().to_string()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensor_info(key).ok().map(|t| t.shape())
    }
}

/// Rows `start..start + len` of a quantised `[out, in]` matrix, still quantised
/// (a row is a whole number of blocks), or `None` when the tensor is not a
/// quantised type candle has.
pub fn quantized_rows(
    file: &GgufFile,
    key: &str,
    start: usize,
    len: usize,
) -> lumina2_weights::Result<Option<QTensor>> {
    let info = file.tensor_info(key).map_err(|e| load_err(file, key, e))?;
    let Some(ct) = info.ggml_type.to_candle() else {
        return Ok(None);
    };
    let shape = info.shape();
    let (rows, cols) = match shape.as_slice() {
        [r, c] => (*r, *c),
        _ => return Ok(None),
    };
    let block = info.ggml_type.block_size();
    if block <= 1 || cols % block != 0 || start + len > rows {
        return Ok(None);
    }
    let row_bytes = cols / block * info.ggml_type.type_size();
    let data = file.tensor_data(key).map_err(|e| load_err(file, key, e))?;
    let slice = data
        .get(start * row_bytes..(start + len) * row_bytes)
        .ok_or_else(|| load_err(file, key, "rows past the tensor data"))?;
    // candle reads the bytes as block structs: give it an 8-byte aligned copy.
    let mut words = vec![0u64; slice.len().div_ceil(8)];
    let bytes = crate::gguf::bytes_of_mut(&mut words)
        .get_mut(..slice.len())
        .ok_or_else(|| load_err(file, key, "buffer size"))?;
    bytes.copy_from_slice(slice);
    let storage = QStorage::from_data(Cow::Borrowed(&*bytes), &Device::Cpu, ct)
        .map_err(|e| load_err(file, key, e))?;
    Ok(Some(
        QTensor::new(storage, (len, cols)).map_err(|e| load_err(file, key, e))?,
    ))
}
