//! # lumina2-weights
//!
//! How the lumina2-rs model crates receive their weights: one interface shared
//! by the transformer and the text encoder, implemented once by the loader.
//!
//! A model never opens files. It asks a [`WeightSource`] for tensors by key; a
//! source can be a candle [`VarBuilder`], a map of tensors, safetensors files
//! ([`SafetensorsSource`], [`Weights::from_safetensors`]), or anything the
//! `lumina2-loader` crate builds (original checkpoints, GGUF). Linear layers ask
//! through [`WeightSource::linear`], which may hand out a quantised tensor that
//! stays quantised in memory: one model definition serves dense and quantised
//! weights.

#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod error;
pub mod folder;
pub mod fp8;
pub mod fs;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lumina2_kernels::gemm::{int8, mapped, packed};
use lumina2_kernels::ops::linear::Path as LinearPath;
use lumina2_kernels::{cast, ops, profile};
use rayon::prelude::*;

pub use error::{Error, Result};
pub use folder::{ComponentFolder, FolderError, ShardIndex};

/// The weight of a linear layer: dense, or quantised and kept so.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense `[out, in]` matrix.
    Dense(Tensor),
    /// A quantised `[out, in]` matrix, dequantised one layer at a time when used.
    Quantized(Arc<QTensor>),
    /// A bf16 `[out, in]` matrix repacked for the CPU's bf16 dot-product
    /// instructions ([`packed`]); [`Linear`] makes this from a dense bf16
    /// weight on CPUs that have them.
    PackedBf16(Arc<packed::PackedBf16>),
    /// A bf16 `[out, in]` matrix used where it lies in its file, from a
    /// memory map ([`mapped`]: AMX CPUs; nothing copied at load).
    MappedBf16(Arc<mapped::RowMajorBf16>),
    /// An `[out, in]` matrix quantised to int8 per output row, for
    /// [`int8`]'s kernels (made by [`Weights::with_int8_linears`]).
    Int8(Arc<int8::PackedI8>),
}

impl LinearWeight {
    /// The `[out, in]` shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Dense(t) => t.dims().to_vec(),
            Self::Quantized(q) => q.shape().dims().to_vec(),
            Self::PackedBf16(p) => p.dims().to_vec(),
            Self::MappedBf16(m) => m.dims().to_vec(),
            Self::Int8(p) => p.dims().to_vec(),
        }
    }

    /// The weight as a dense `[out, in]` tensor (dequantised or unpacked if
    /// need be) on `device`.
    pub fn to_dense(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quantized(q) => q.dequantize(device),
            Self::PackedBf16(p) => p.to_dense()?.to_device(device),
            Self::MappedBf16(m) => m.to_dense()?.to_device(device),
            Self::Int8(p) => p.to_dense()?.to_device(device),
        }
    }

    /// A dense weight converted to `dtype` (on its device); quantised,
    /// packed and int8 weights as they are.
    pub fn dense_as(self, dtype: DType) -> candle_core::Result<Self> {
        match self {
            Self::Dense(t) => Ok(Self::Dense(cast(&t, dtype)?)),
            other => Ok(other),
        }
    }

    /// The form the weight is kept in, as the dispatch sees it.
    fn form(&self) -> ops::linear::WeightForm {
        match self {
            Self::Dense(_) => ops::linear::WeightForm::Dense,
            Self::Quantized(_) => ops::linear::WeightForm::Quantized,
            Self::PackedBf16(_) => ops::linear::WeightForm::PackedBf16,
            Self::MappedBf16(_) => ops::linear::WeightForm::MappedBf16,
            Self::Int8(_) => ops::linear::WeightForm::Int8,
        }
    }

    /// The bf16 weight repacked for [`packed`]'s kernel when the dispatch
    /// packs it ([`ops::linear::packs`]: dense bf16 on a CPU that has the
    /// kernel); otherwise unchanged.
    pub fn packed_if_possible(self) -> candle_core::Result<Self> {
        match &self {
            Self::Dense(t) if ops::linear::packs(t) => {
                Ok(Self::PackedBf16(Arc::new(packed::PackedBf16::pack(t)?)))
            }
            _ => Ok(self),
        }
    }
}

/// `q` on `device`: its blocks are copied there once, when the layer loads,
/// so that on a GPU the weight stays quantised in device memory and is
/// dequantised there when used (candle's CUDA/Metal dequantisation kernels),
/// never copied from the host per call. Unchanged when already there.
fn quantized_on(q: Arc<QTensor>, device: &Device) -> candle_core::Result<Arc<QTensor>> {
    if q.device().same_device(device) {
        return Ok(q);
    }
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(Arc::new(QTensor::new(storage, q.shape().clone())?))
}

/// `x` `[..., in]` as a matrix of rows `[n, in]`.
fn as_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let in_dim = x.dims().last().copied().unwrap_or(0);
    x.reshape((x.elem_count() / in_dim.max(1), in_dim))
}

/// `y` `[n, out]` with `x`'s leading dimensions: `[..., out]`.
fn like_input(y: Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = y.dim(1)?;
    }
    y.reshape(dims)
}

/// The activation of a gated feed-forward ([`Linear::gated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAct {
    /// `x * sigmoid(x)` (Lumina2's feed-forward).
    Silu,
    /// PyTorch's `gelu(approximate="tanh")` (Gemma-2's MLP).
    GeluTanh,
}

/// A low-rank adapter (LoRA) of a linear layer, kept factored: it adds
/// `scale * B A` to the `[out, in]` weight, `A` (`down`) being `[rank, in]`
/// and `B` (`up`) `[out, rank]`.
///
/// `scale` is everything that multiplies `B A`: the user's strength times the
/// file's `alpha / rank`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    down: Tensor,
    up: Tensor,
    scale: f64,
    /// `[out, in]`, fixed when built.
    dims: [usize; 2],
}

impl LoraAdapter {
    /// An adapter from `down` (`A`, `[rank, in]`) and `up` (`B`, `[out, rank]`).
    /// Fails when they are not matrices of the same rank.
    pub fn new(down: Tensor, up: Tensor, scale: f64) -> candle_core::Result<Self> {
        match (down.dims(), up.dims()) {
            (&[r, inp], &[out, r2]) if r == r2 => Ok(Self {
                down,
                up,
                scale,
                dims: [out, inp],
            }),
            (d, u) => candle_core::bail!(
                "LoRA factors do not fit: down (A) {d:?} must be [rank, in], up (B) {u:?} [out, rank]"
            ),
        }
    }

    /// `A`, `[rank, in]`.
    pub fn down(&self) -> &Tensor {
        &self.down
    }

    /// `B`, `[out, rank]`.
    pub fn up(&self) -> &Tensor {
        &self.up
    }

    /// The factor of `B A`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The `[out, in]` shape of the weight this adapter changes.
    pub fn dims(&self) -> [usize; 2] {
        self.dims
    }

    /// The dense `[out, in]` update `scale * B A`, computed in f32 on the
    /// factors' device.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        up.matmul(&down)? * self.scale
    }

    /// The same adapter with its factors in `dtype` on `device`.
    pub fn to(&self, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            down: self.down.to_device(device)?.to_dtype(dtype)?,
            up: self.up.to_device(device)?.to_dtype(dtype)?,
            scale: self.scale,
            dims: self.dims,
        })
    }

    /// `scale * (x A^T) B^T` for `x` of shape `[rows, in]`: the adapter's part
    /// of a linear layer's output, without forming `B A`.
    fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.down.t()?)?.matmul(&self.up.t()?)? * self.scale
    }
}

/// A store of named tensors the model can draw its weights from.
///
/// Keys are the model's own names (diffusers' for the transformer, transformers'
/// for the text encoder). Implementations
/// convert nothing: [`Weights`] checks shapes and converts to the compute
/// dtype and device.
pub trait WeightSource: Send + Sync {
    /// Whether the source holds `key`.
    fn contains(&self, key: &str) -> bool;
    /// The tensor stored under `key`, in any dtype, on any device.
    fn tensor(&self, key: &str) -> Result<Tensor>;
    /// The weight of a linear layer. The default is dense; quantised sources
    /// override it to hand out their quantised tensor.
    fn linear(&self, key: &str) -> Result<LinearWeight> {
        Ok(LinearWeight::Dense(self.tensor(key)?))
    }
    /// The tensor stored under `key`, converted to `dtype` on the CPU.
    /// Sources that read files override it to convert while reading, so that
    /// a weight is written once, in its final dtype, without a second buffer
    /// in the stored dtype (most of a load's cost is the first touch of its
    /// memory).
    fn tensor_as(&self, key: &str, dtype: DType) -> Result<Tensor> {
        Ok(cast(&self.tensor(key)?, dtype)?)
    }
    /// [`WeightSource::linear`] with a dense weight converted to `dtype` on
    /// the CPU (quantised weights as they are), read as
    /// [`WeightSource::tensor_as`] reads where the source overrides this.
    fn linear_as(&self, key: &str, dtype: DType) -> Result<LinearWeight> {
        Ok(self.linear(key)?.dense_as(dtype)?)
    }
    /// [`WeightSource::linear_as`], with whether the weight holds NaN or
    /// infinity where the source found out while converting it (`None`:
    /// not checked, the default; the caller then scans the result). A file
    /// source widening bf16 to f32 checks each piece while it is in the
    /// cache, sparing a second pass over the whole f32 weight.
    fn linear_as_scanned(&self, key: &str, dtype: DType) -> Result<(LinearWeight, Option<bool>)> {
        Ok((self.linear_as(key, dtype)?, None))
    }
    /// The bf16 weight `key` packed for the CPU's packed bf16 kernel
    /// straight from its stored bf16 values, with whether any of them is NaN
    /// or infinite (`None`: not read, see below); `None` where the source
    /// cannot (the default: the caller then reads the weight and packs it).
    /// A file source reads each panel's rows into a small reused buffer and
    /// packs them from there, so the weight's memory is written once, in its
    /// packed form; or, on AMX CPUs ([`mapped::available`]), hands out the
    /// weight in place in a memory map of its file
    /// ([`LinearWeight::MappedBf16`]), written nowhere and not read at load
    /// ([`UnscannedWeights`] scans it when asked).
    fn packed_bf16(&self, key: &str) -> Option<Result<(LinearWeight, Option<bool>)>> {
        let _ = key;
        None
    }
    /// The bf16 `[rows, width]` table `key` in place in a memory map of its
    /// file, for row lookups that read only the rows asked for; `None` where
    /// the source cannot (the default), the tensor is not a 2-D bf16 one,
    /// or `LUMINA2_NO_MMAP=1`.
    fn mapped_table(&self, key: &str) -> Option<Arc<mapped::RowMajorBf16>> {
        let _ = key;
        None
    }
    /// A short description for error messages (usually the file names).
    fn name(&self) -> String;
    /// The shape of `key` as the source declares it (a file's header),
    /// without reading the tensor; `None` where the source cannot tell
    /// before reading. [`Weights`] compares it with the shape the model
    /// expects before anything is read, so a tensor a file declares far
    /// larger than the model needs is refused, never read.
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let _ = key;
        None
    }
    /// Every key the source holds, when it can list them (loaders use this to
    /// report all missing and unexpected keys at once); empty otherwise.
    fn keys(&self) -> Vec<String> {
        Vec::new()
    }
    /// The low-rank adapters (LoRA) that go with a quantised `linear(key)`.
    ///
    /// A source merges its adapters into every dense weight it hands out
    /// (through [`WeightSource::tensor`] and [`WeightSource::linear`]); a
    /// quantised weight cannot take them without being dequantised for good,
    /// so they are handed out here and applied at run time by [`Linear`].
    /// [`Weights::linear`] asks only when `linear(key)` was quantised. The
    /// default has none.
    fn lora_adapters(&self, key: &str) -> Result<Vec<LoraAdapter>> {
        let _ = key;
        Ok(Vec::new())
    }
}

/// A [`WeightSource`] over a candle [`VarBuilder`] (whatever backend it has).
pub struct VarBuilderSource(pub VarBuilder<'static>);

impl WeightSource for VarBuilderSource {
    fn contains(&self, key: &str) -> bool {
        self.0.contains_tensor(key)
    }
    fn tensor(&self, key: &str) -> Result<Tensor> {
        Ok(self.0.get_unchecked(key)?)
    }
    fn name(&self) -> String {
        "VarBuilder".into()
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn contains(&self, key: &str) -> bool {
        self.contains_key(key)
    }
    fn tensor(&self, key: &str) -> Result<Tensor> {
        self.get(key).cloned().ok_or_else(|| Error::MissingWeight {
            key: key.to_string(),
            source_name: self.name(),
        })
    }
    fn name(&self) -> String {
        "in-memory tensors".into()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.get(key).map(|t| t.dims().to_vec())
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = HashMap::keys(self).cloned().collect();
        k.sort();
        k
    }
}

/// Safetensors files (one or several shards), read tensor by tensor.
///
/// The headers are parsed and checked when opened (offsets inside the file,
/// sizes that match dtype and shape, no key twice); each tensor is then read
/// with a positioned read into its own buffer, so the peak memory of a load
/// is the model plus one tensor. The exception: bf16 linear weights on AMX
/// CPUs under bf16 compute are used in place from a memory map of the file
/// ([`WeightSource::packed_bf16`], [`mapped`]; `LUMINA2_NO_MMAP=1` turns it
/// off), and the map's pages are the page cache's, not copies.
pub struct SafetensorsSource {
    files: Vec<(std::path::PathBuf, std::sync::Mutex<std::fs::File>)>,
    /// Each file's memory map, made the first time a weight is used in
    /// place ([`mapped`]); `None` when mapping failed (weights are then
    /// copied).
    maps: Vec<std::sync::OnceLock<Option<Arc<mapped::MappedFile>>>>,
    index: HashMap<String, StEntry>,
    names: String,
    metadata: HashMap<String, String>,
    /// Whether any tensor is fp8: ComfyUI's scale keys are then hidden.
    has_fp8: bool,
}

#[derive(Debug, Clone)]
struct StEntry {
    file: usize,
    /// The element type (U8 for fp8, whose format is `fp8`).
    dtype: DType,
    fp8: Option<fp8::Fp8>,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// A safetensors header's entries in file order, duplicates kept.
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(entry);
                }
                Ok(HeaderEntries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Checks that no two of a file's tensors, given as `(start, end, key)`
/// byte spans, share a byte (the format forbids it, and the `safetensors`
/// crate refuses it); `Err` names the two keys.
fn check_no_overlap(
    mut spans: Vec<(u64, u64, String)>,
) -> std::result::Result<(), (String, String)> {
    spans.retain(|(start, end, _)| end > start);
    spans.sort_unstable();
    for w in spans.windows(2) {
        if let [(_, end, a), (start, _, b)] = w {
            if start < end {
                return Err((b.clone(), a.clone()));
            }
        }
    }
    Ok(())
}

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

fn st_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl SafetensorsSource {
    /// Opens the files and reads their headers. Keys are looked up across all of them.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let names = paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        let mut metadata = HashMap::new();
        for (fi, p) in paths.iter().enumerate() {
            let p = p.as_ref();
            let bad = |key: &str, reason: String| Error::WeightLoad {
                key: key.to_string(),
                source_name: p.display().to_string(),
                reason,
            };
            let mut f = fs::open_regular(p).map_err(|e| bad("", e.to_string()))?;
            let file_len = f.metadata().map_err(|e| bad("", e.to_string()))?.len();
            let mut n = [0u8; 8];
            std::io::Read::read_exact(&mut f, &mut n)
                .map_err(|_| bad("", "truncated safetensors header".into()))?;
            let n = u64::from_le_bytes(n);
            if n > MAX_HEADER || n > file_len.saturating_sub(8) {
                return Err(bad(
                    "",
                    format!("header length {n} does not fit the file ({file_len} bytes)"),
                ));
            }
            let mut header = vec![0u8; n as usize];
            std::io::Read::read_exact(&mut f, &mut header)
                .map_err(|_| bad("", "truncated safetensors header".into()))?;
            let HeaderEntries(json) = serde_json::from_slice(&header)
                .map_err(|e| bad("", format!("invalid header: {e}")))?;
            let data_start = 8 + n;
            let mut seen = std::collections::HashSet::new();
            let mut spans = Vec::new();
            for (key, v) in json {
                // JSON objects may repeat a key; serde_json's map would keep the
                // last silently, which hides a corrupt or forged header.
                if !seen.insert(key.clone()) {
                    return Err(bad(&key, "key listed twice in the header".into()));
                }
                if key == "__metadata__" {
                    // The format's free-form string map (LoRA files keep their
                    // adapter config there); other value types are ignored.
                    if let Some(m) = v.as_object() {
                        for (mk, mv) in m {
                            if let Some(mv) = mv.as_str() {
                                metadata.insert(mk.clone(), mv.to_string());
                            }
                        }
                    }
                    continue;
                }
                let dtype = v
                    .get("dtype")
                    .and_then(|d| d.as_str())
                    .ok_or_else(|| bad(&key, "no dtype".into()))?;
                let fp8 = fp8::Fp8::from_st(dtype);
                let dtype = match fp8 {
                    Some(_) => DType::U8,
                    None => st_dtype(dtype)
                        .ok_or_else(|| bad(&key, format!("unsupported dtype {dtype}")))?,
                };
                let shape: Vec<usize> = v
                    .get("shape")
                    .and_then(|s| s.as_array())
                    .ok_or_else(|| bad(&key, "no shape".into()))?
                    .iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(&key, "invalid shape".into()))?;
                let offs: Vec<u64> = v
                    .get("data_offsets")
                    .and_then(|o| o.as_array())
                    .map(|o| o.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
                let [s0, s1] = offs[..] else {
                    return Err(bad(&key, "invalid data_offsets".into()));
                };
                let need = shape
                    .iter()
                    .try_fold(dtype.size_in_bytes(), |a, &d| a.checked_mul(d))
                    .ok_or_else(|| bad(&key, "size overflows".into()))?;
                let end = data_start.checked_add(s1);
                if s1 < s0 || end.is_none_or(|e| e > file_len) || (s1 - s0) as usize != need {
                    return Err(bad(
                        &key,
                        format!(
                            "data_offsets [{s0}, {s1}] do not hold {need} bytes inside the file ({file_len} bytes)"
                        ),
                    ));
                }
                let entry = StEntry {
                    file: fi,
                    dtype,
                    fp8,
                    shape,
                    start: data_start + s0,
                    len: need,
                };
                spans.push((entry.start, entry.start + need as u64, key.clone()));
                if index.insert(key.clone(), entry).is_some() {
                    return Err(bad(&key, "the key appears twice".into()));
                }
            }
            check_no_overlap(spans).map_err(|(a, b)| {
                bad(
                    &a,
                    format!("its bytes overlap those of `{b}` (the format forbids it)"),
                )
            })?;
            files.push((p.to_path_buf(), std::sync::Mutex::new(f)));
        }
        let has_fp8 = index.values().any(|e| e.fp8.is_some());
        Ok(Self {
            maps: files.iter().map(|_| std::sync::OnceLock::new()).collect(),
            files,
            index,
            names,
            metadata,
            has_fp8,
        })
    }

    /// The storage dtype and shape of a tensor, from the header (nothing is read).
    pub fn tensor_info(&self, key: &str) -> Option<(DType, &[usize])> {
        self.index.get(key).map(|e| (e.dtype, e.shape.as_slice()))
    }

    /// The stored element type of a tensor as the header names it
    /// (`F32`, `BF16`, `U8`, ...; `F8_E4M3` or `F8_E5M2` for fp8, which
    /// [`Self::tensor_info`] lists as U8, its bytes).
    pub fn storage_type(&self, key: &str) -> Option<String> {
        self.index.get(key).map(|e| match e.fp8 {
            Some(f) => f.st_name().to_string(),
            None => format!("{:?}", e.dtype).to_uppercase(),
        })
    }

    /// The `__metadata__` string map of the headers (of all files together).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
}

impl WeightSource for SafetensorsSource {
    fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }
    fn tensor(&self, key: &str) -> Result<Tensor> {
        let e = self.index.get(key).ok_or_else(|| Error::MissingWeight {
            key: key.to_string(),
            source_name: self.names.clone(),
        })?;
        let (path, file) = self.files.get(e.file).ok_or_else(|| Error::MissingWeight {
            key: key.to_string(),
            source_name: self.names.clone(),
        })?;
        let err = |reason: String| Error::WeightLoad {
            key: key.to_string(),
            source_name: path.display().to_string(),
            reason,
        };
        // Read straight into a buffer of the element type (no second copy),
        // large tensors in parallel pieces.
        let f = file.lock().map_err(|_| err("file lock poisoned".into()))?;
        let read = |buf: &mut [u8]| read_at(&f, e.start, buf).map_err(|x| err(x.to_string()));
        let n = e.shape.iter().product::<usize>();
        let shape = e.shape.as_slice();
        let t = match (e.fp8, e.dtype) {
            (Some(format), _) => {
                let mut buf = vec![0u8; e.len];
                read(&mut buf)?;
                drop(f);
                let table = format.table();
                let v: Vec<half::f16> = buf.iter().map(|&b| table[usize::from(b)]).collect();
                let t = Tensor::from_vec(v, shape, &Device::Cpu)?;
                return self.scaled(key, t);
            }
            (None, DType::F32) => {
                let mut v = vec![0f32; n];
                read(bytemuck::cast_slice_mut(&mut v))?;
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            // Zeroed as integers, which the allocator hands out as untouched
            // zero pages (`vec![bf16::ZERO; n]` would write every element
            // before the read writes it again), then reinterpreted in place.
            (None, DType::BF16) => {
                let mut v = vec![0u16; n];
                read(bytemuck::cast_slice_mut(&mut v))?;
                let v: Vec<half::bf16> = bytemuck::allocation::cast_vec(v);
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            (None, DType::F16) => {
                let mut v = vec![0u16; n];
                read(bytemuck::cast_slice_mut(&mut v))?;
                let v: Vec<half::f16> = bytemuck::allocation::cast_vec(v);
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            _ => {
                let mut buf = vec![0u8; e.len];
                read(&mut buf)?;
                Tensor::from_raw_buffer(&buf, e.dtype, shape, &Device::Cpu)?
            }
        };
        Ok(t)
    }
    fn tensor_as(&self, key: &str, dtype: DType) -> Result<Tensor> {
        match self.index.get(key) {
            Some(e) if e.fp8.is_none() && dtype == DType::F32 && e.dtype == DType::BF16 => {
                Ok(self.read_widened(key, e, lumina2_kernels::widen_bf16)?.0)
            }
            Some(e) if e.fp8.is_none() && dtype == DType::F32 && e.dtype == DType::F16 => {
                Ok(self.read_widened(key, e, lumina2_kernels::widen_f16)?.0)
            }
            _ => Ok(cast(&self.tensor(key)?, dtype)?),
        }
    }
    fn linear_as(&self, key: &str, dtype: DType) -> Result<LinearWeight> {
        Ok(LinearWeight::Dense(self.tensor_as(key, dtype)?))
    }
    fn linear_as_scanned(&self, key: &str, dtype: DType) -> Result<(LinearWeight, Option<bool>)> {
        let (t, non_finite) = match self.index.get(key) {
            Some(e) if e.fp8.is_none() && dtype == DType::F32 && e.dtype == DType::BF16 => {
                let (t, bad) = self.read_widened(key, e, lumina2_kernels::widen_bf16)?;
                (t, Some(bad))
            }
            Some(e) if e.fp8.is_none() && dtype == DType::F32 && e.dtype == DType::F16 => {
                let (t, bad) = self.read_widened(key, e, lumina2_kernels::widen_f16)?;
                (t, Some(bad))
            }
            _ => (self.tensor_as(key, dtype)?, None),
        };
        Ok((LinearWeight::Dense(t), non_finite))
    }
    fn packed_bf16(&self, key: &str) -> Option<Result<(LinearWeight, Option<bool>)>> {
        let e = self.index.get(key)?;
        if e.fp8.is_some() || e.dtype != DType::BF16 || e.shape.len() != 2 {
            return None;
        }
        if mapped::available() {
            if let Some(w) = self.mapped_bf16(e) {
                return Some(Ok((LinearWeight::MappedBf16(w), None)));
            }
        }
        Some(
            self.read_packed_bf16(key, e)
                .map(|(w, non_finite)| (w, Some(non_finite))),
        )
    }
    fn mapped_table(&self, key: &str) -> Option<Arc<mapped::RowMajorBf16>> {
        let e = self.index.get(key)?;
        if e.fp8.is_some() || e.dtype != DType::BF16 || e.shape.len() != 2 || !mapped::allowed() {
            return None;
        }
        self.mapped_bf16(e)
    }
    fn name(&self) -> String {
        self.names.clone()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.index.get(key).map(|e| e.shape.clone())
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .index
            .keys()
            .filter(|k| !(self.has_fp8 && fp8::is_scale_key(k)))
            .cloned()
            .collect();
        k.sort();
        k
    }
}

impl SafetensorsSource {
    /// A 16-bit float tensor read as f32: pieces of the file are read into a
    /// small buffer that each thread reuses and widened straight into the
    /// output, so the only memory the load touches is the f32 weight itself
    /// (reading the whole tensor first would touch, then free, a second
    /// buffer half its size). Each widened piece is checked for NaN and
    /// infinity while it is in the cache: the second value says whether one
    /// was found.
    fn read_widened<T: bytemuck::Pod + Send + Sync>(
        &self,
        key: &str,
        e: &StEntry,
        widen: fn(&[T], &mut [f32]),
    ) -> Result<(Tensor, bool)> {
        /// Elements per piece: 2 MiB read, 4 MiB written, within the caches.
        const PIECE: usize = 1 << 20;
        let (path, file) = self.files.get(e.file).ok_or_else(|| Error::MissingWeight {
            key: key.to_string(),
            source_name: self.names.clone(),
        })?;
        let err = |reason: String| Error::WeightLoad {
            key: key.to_string(),
            source_name: path.display().to_string(),
            reason,
        };
        let n = e.shape.iter().product::<usize>();
        let width = std::mem::size_of::<T>();
        if n.checked_mul(width) != Some(e.len) {
            return Err(err(format!("{} bytes do not hold {n} values", e.len)));
        }
        let f = file.lock().map_err(|_| err("file lock poisoned".into()))?;
        let f: &std::fs::File = &f;
        let mut out = vec![0f32; n];
        let non_finite = std::sync::atomic::AtomicBool::new(false);
        out.par_chunks_mut(PIECE)
            .enumerate()
            .try_for_each_init(
                || vec![T::zeroed(); PIECE],
                |scratch, (i, o)| {
                    let s = &mut scratch[..o.len()];
                    read_at(
                        f,
                        e.start + (i * PIECE * width) as u64,
                        bytemuck::cast_slice_mut(s),
                    )?;
                    widen(s, o);
                    if lumina2_kernels::f32_non_finite(o) {
                        non_finite.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok::<(), std::io::Error>(())
                },
            )
            .map_err(|x| err(x.to_string()))?;
        Ok((
            Tensor::from_vec(out, e.shape.as_slice(), &Device::Cpu)?,
            non_finite.into_inner(),
        ))
    }

    /// A bf16 `[out, in]` weight used in place in the memory map of its
    /// file (not read here: its pages are first touched where it is used);
    /// `None` where the file cannot be mapped or the weight's bytes are not
    /// 2-byte aligned (the format does not promise it): the caller then
    /// copies it.
    fn mapped_bf16(&self, e: &StEntry) -> Option<Arc<mapped::RowMajorBf16>> {
        let map = self.maps.get(e.file)?.get_or_init(|| {
            let (_, file) = self.files.get(e.file)?;
            let f = file.lock().ok()?;
            mapped::MappedFile::open(&f).ok()
        });
        let bytes: mapped::Bytes = map.clone()?;
        let start = usize::try_from(e.start).ok()?;
        mapped::RowMajorBf16::new(bytes, start, e.shape[0], e.shape[1]).map(Arc::new)
    }

    /// A bf16 `[out, in]` weight packed while read
    /// ([`packed::PackedBf16::from_row_blocks`]): each panel's 32 rows are
    /// one contiguous range of the file, read into a buffer the thread
    /// reuses, scanned for NaN and infinity, and packed from there.
    fn read_packed_bf16(&self, key: &str, e: &StEntry) -> Result<(LinearWeight, bool)> {
        let (path, file) = self.files.get(e.file).ok_or_else(|| Error::MissingWeight {
            key: key.to_string(),
            source_name: self.names.clone(),
        })?;
        let err = |reason: String| Error::WeightLoad {
            key: key.to_string(),
            source_name: path.display().to_string(),
            reason,
        };
        let (out_dim, in_dim) = (e.shape[0], e.shape[1]);
        if out_dim.checked_mul(in_dim).and_then(|n| n.checked_mul(2)) != Some(e.len) {
            return Err(err(format!(
                "{} bytes do not hold {out_dim} x {in_dim} bf16 values",
                e.len
            )));
        }
        let f = file.lock().map_err(|_| err("file lock poisoned".into()))?;
        let f: &std::fs::File = &f;
        let non_finite = std::sync::atomic::AtomicBool::new(false);
        let packed = packed::PackedBf16::from_row_blocks(out_dim, in_dim, |first, rows| {
            read_at_serial(
                f,
                e.start + (first * in_dim * 2) as u64,
                bytemuck::cast_slice_mut(rows),
            )?;
            if lumina2_kernels::bf16_bits_non_finite(rows) {
                non_finite.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<(), std::io::Error>(())
        })
        .map_err(|x| err(x.to_string()))?;
        Ok((
            LinearWeight::PackedBf16(Arc::new(packed)),
            non_finite.into_inner(),
        ))
    }

    /// An fp8 tensor (as f16) times its ComfyUI `scale_weight`, if it has one
    /// (then in f32: `fp8 * scale`, one rounding).
    fn scaled(&self, key: &str, t: Tensor) -> Result<Tensor> {
        let Some(base) = key.strip_suffix(".weight") else {
            return Ok(t);
        };
        let scale_key = format!("{base}.scale_weight");
        if !self.index.contains_key(&scale_key) {
            return Ok(t);
        }
        let scale = self.tensor(&scale_key)?.to_dtype(DType::F32)?;
        if scale.elem_count() != 1 {
            return Err(Error::WeightLoad {
                key: scale_key,
                source_name: self.names.clone(),
                reason: format!("a scale of shape {:?}, expected one value", scale.dims()),
            });
        }
        let scale = scale.flatten_all()?;
        Ok(t.to_dtype(DType::F32)?.broadcast_mul(&scale.reshape(())?)?)
    }
}

/// Fills `buf` from `file` at byte `offset`: positioned reads (no shared
/// cursor), pieces of 64 MiB in parallel for large buffers (a single thread
/// copies from the page cache at well under the memory bandwidth).
fn read_at(file: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    const PIECE: usize = 64 << 20;
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        buf.par_chunks_mut(PIECE)
            .enumerate()
            .try_for_each(|(i, chunk)| file.read_exact_at(chunk, offset + (i * PIECE) as u64))
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

/// Fills `buf` from `file` at byte `offset` on the calling thread (a small
/// read that is already one task of a parallel loop).
fn read_at_serial(file: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }
    #[cfg(not(unix))]
    {
        read_at(file, offset, buf)
    }
}

/// Whether a float tensor holds NaN or infinity. Contiguous CPU tensors are
/// scanned by their bits ([`lumina2_kernels::any_non_finite`]); others (on
/// a GPU, strided) by their f32 sum, which is then not finite (a sum
/// overflowing from huge finite values is flagged too, which is as
/// suspicious), in slices of 2^20 values so that a large bf16 table
/// (Gemma's 256000 x 2304 embedding) is never copied whole to f32.
pub fn holds_non_finite(t: &Tensor) -> candle_core::Result<bool> {
    const SLICE: usize = 1 << 20;
    let n = t.elem_count();
    if !t.dtype().is_float() || n == 0 {
        return Ok(false);
    }
    // Contiguous CPU floats: the exponent bits, in parallel.
    if let Some(found) = lumina2_kernels::any_non_finite(t) {
        return Ok(found);
    }
    let flat = t.flatten_all()?;
    let mut start = 0;
    while start < n {
        let len = SLICE.min(n - start);
        let sum = flat
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if !sum.is_finite() {
            return Ok(true);
        }
        start += len;
    }
    Ok(false)
}

/// A handle on a [`WeightSource`]: a key prefix, the compute dtype and the device.
///
/// Cheap to clone; [`Weights::pp`] descends into a sub-module as candle's
/// `VarBuilder::pp` does.
#[derive(Clone)]
pub struct Weights {
    source: Arc<dyn WeightSource>,
    prefix: String,
    dtype: DType,
    device: Device,
    /// Keys of the dense tensors loaded so far that hold NaN or infinity
    /// (shared by every handle made from one [`Weights::new`]).
    non_finite: Arc<std::sync::Mutex<Vec<String>>>,
    /// The weights handed out in place from a memory map, not read at load.
    unscanned: UnscannedWeights,
    /// Whether [`Weights::linear`] quantises weights to int8.
    int8: bool,
}

/// The bf16 weights a [`Weights`] handed out in place from memory maps
/// ([`LinearWeight::MappedBf16`], mapped embedding tables) without reading
/// them: scanning them for NaN and infinity at load would read, and fault
/// in, every page of the model before anything runs, which is most of a
/// load's time. [`UnscannedWeights::scan`] reads them when asked: a
/// pipeline asks when its latents stop being finite, to name the broken
/// tensors in its error. It holds the weights weakly: a model dropped is
/// not kept alive (nor its file mapped) by this list, and is not scanned.
#[derive(Clone, Default)]
pub struct UnscannedWeights(Arc<std::sync::Mutex<Unscanned>>);

#[derive(Default)]
struct Unscanned {
    /// Not scanned yet.
    pending: Vec<(String, std::sync::Weak<mapped::RowMajorBf16>)>,
    /// Scanned and found holding NaN or infinity.
    non_finite: Vec<String>,
}

impl std::fmt::Debug for UnscannedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = self.0.lock().unwrap_or_else(|e| e.into_inner());
        write!(
            f,
            "UnscannedWeights({} pending, {} non-finite)",
            u.pending.len(),
            u.non_finite.len()
        )
    }
}

impl UnscannedWeights {
    fn push(&self, key: &str, w: &Arc<mapped::RowMajorBf16>) {
        let mut u = self.0.lock().unwrap_or_else(|e| e.into_inner());
        u.pending.push((key.to_string(), Arc::downgrade(w)));
    }

    /// Scans the weights not scanned yet that are still in use (each once,
    /// reading all its values) and returns the keys of all those found
    /// holding NaN or infinity.
    pub fn scan(&self) -> Vec<String> {
        let mut u = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut u.pending);
        for (key, w) in pending {
            if w.upgrade().is_some_and(|w| w.any_non_finite()) {
                u.non_finite.push(key);
            }
        }
        u.non_finite.clone()
    }

    /// How many weights still in use wait for [`UnscannedWeights::scan`].
    pub fn pending(&self) -> usize {
        self.0.lock().map_or(0, |u| {
            u.pending
                .iter()
                .filter(|(_, w)| w.strong_count() > 0)
                .count()
        })
    }
}

impl Weights {
    /// Weights from any source, converted to `dtype` on `device` when loaded.
    pub fn new(source: Arc<dyn WeightSource>, dtype: DType, device: &Device) -> Self {
        Self {
            source,
            prefix: String::new(),
            dtype,
            device: device.clone(),
            non_finite: Arc::default(),
            unscanned: UnscannedWeights::default(),
            int8: false,
        }
    }

    /// The same handle, with linear layers ([`Weights::linear`]) quantised
    /// to int8 as they load ([`int8::PackedI8`]: per output row, the inputs
    /// per row at run time) when `on`; handles made from it with
    /// [`Weights::pp`] inherit the setting. Faster than bf16 on CPUs with AMX
    /// or AVX512-VNNI, at the accuracy of 8-bit inputs. Tables read with
    /// [`Weights::linear_weight`] (embeddings) are not affected.
    pub fn with_int8_linears(mut self, on: bool) -> Self {
        self.int8 = on;
        self
    }

    /// Whether linear layers are quantised to int8.
    pub fn int8_linears(&self) -> bool {
        self.int8
    }

    /// The keys of the dense tensors loaded so far through this handle (or
    /// any handle derived from the same [`Weights::new`]) that hold NaN or
    /// infinite values: a broken checkpoint, worth a warning before it turns
    /// the output black. Quantised weights are not scanned.
    pub fn non_finite_keys(&self) -> Vec<String> {
        self.non_finite
            .lock()
            .map(|v| v.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The weights this handle (or any handle derived from the same
    /// [`Weights::new`]) handed out in place without reading them; their
    /// keys are not in [`Weights::non_finite_keys`] until scanned.
    pub fn unscanned(&self) -> UnscannedWeights {
        self.unscanned.clone()
    }

    /// Records `key` when `t` holds NaN or infinity ([`holds_non_finite`]).
    fn scan(&self, key: &str, t: &Tensor) -> Result<()> {
        if holds_non_finite(t)? {
            let mut v = self.non_finite.lock().unwrap_or_else(|e| e.into_inner());
            v.push(key.to_string());
        }
        Ok(())
    }

    /// Weights from a candle `VarBuilder`; its own dtype is ignored in favour of `dtype`.
    pub fn from_var_builder(vb: VarBuilder<'static>, dtype: DType, device: &Device) -> Self {
        Self::new(Arc::new(VarBuilderSource(vb)), dtype, device)
    }

    /// Weights from safetensors files (the shards of one model).
    pub fn from_safetensors<P: AsRef<Path>>(
        paths: &[P],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::new(
            Arc::new(SafetensorsSource::open(paths)?),
            dtype,
            device,
        ))
    }

    /// Weights from tensors in memory, keyed by the model's names.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::new(Arc::new(tensors), dtype, device)
    }

    /// The handle for a sub-module: keys are prefixed with `name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the source has `name` under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.key(name))
    }

    fn check_shape(&self, key: &str, found: &[usize], expected: &[usize]) -> Result<()> {
        if found != expected {
            return Err(Error::WeightShape {
                key: key.to_string(),
                source_name: self.source.name(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    fn require(&self, key: &str) -> Result<()> {
        if !self.source.contains(key) {
            return Err(Error::MissingWeight {
                key: key.to_string(),
                source_name: self.source.name(),
            });
        }
        Ok(())
    }

    /// [`Weights::require`], and the shape the source declares compared
    /// with `expected` before anything is read.
    fn require_shape(&self, key: &str, expected: &[usize]) -> Result<()> {
        self.require(key)?;
        match self.source.shape(key) {
            Some(declared) => self.check_shape(key, &declared, expected),
            None => Ok(()),
        }
    }

    /// A dense tensor of the given shape, in the compute dtype, on the compute device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// A dense tensor of the given shape in `dtype` (not the compute dtype), on the compute device.
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let key = self.key(name);
        self.require_shape(&key, shape)?;
        if self.device.is_cpu() {
            // Converted while read (a widened or narrowed value is finite
            // exactly when it can be used, so the scan sees the final values).
            let t = self.source.tensor_as(&key, dtype)?;
            self.check_shape(&key, t.dims(), shape)?;
            self.scan(&key, &t)?;
            return Ok(t);
        }
        // Copied to the device in the stored dtype (the smaller transfer) and
        // converted there.
        let t = self.source.tensor(&key)?;
        self.check_shape(&key, t.dims(), shape)?;
        self.scan(&key, &t)?;
        Ok(cast(&t.to_device(&self.device)?, dtype)?)
    }

    /// The `[out_dim, in_dim]` weight `name.weight` as the source hands it
    /// out (dense in the compute dtype and device, or quantised), shape
    /// checked, not repacked: for tables that are not multiplied, such as
    /// embeddings.
    pub fn linear_weight(&self, name: &str, in_dim: usize, out_dim: usize) -> Result<LinearWeight> {
        let wkey = self.key(&format!("{name}.weight"));
        self.require_shape(&wkey, &[out_dim, in_dim])?;
        let (stored, scanned) = if self.device.is_cpu() {
            self.source.linear_as_scanned(&wkey, self.dtype)?
        } else {
            (self.source.linear(&wkey)?, None)
        };
        let weight = match stored {
            LinearWeight::Dense(t) => {
                self.check_shape(&wkey, t.dims(), &[out_dim, in_dim])?;
                match scanned {
                    Some(true) => {
                        let mut v = self.non_finite.lock().unwrap_or_else(|e| e.into_inner());
                        v.push(wkey.clone());
                    }
                    Some(false) => {}
                    None => self.scan(&wkey, &t)?,
                }
                LinearWeight::Dense(cast(&t.to_device(&self.device)?, self.dtype)?)
            }
            LinearWeight::Quantized(q) => {
                self.check_shape(&wkey, q.shape().dims(), &[out_dim, in_dim])?;
                LinearWeight::Quantized(quantized_on(q, &self.device)?)
            }
            LinearWeight::PackedBf16(p) => {
                self.check_shape(&wkey, &p.dims(), &[out_dim, in_dim])?;
                LinearWeight::PackedBf16(p)
            }
            LinearWeight::MappedBf16(m) => {
                self.check_shape(&wkey, &m.dims(), &[out_dim, in_dim])?;
                LinearWeight::MappedBf16(m)
            }
            LinearWeight::Int8(p) => {
                self.check_shape(&wkey, &p.dims(), &[out_dim, in_dim])?;
                LinearWeight::Int8(p)
            }
        };
        Ok(weight)
    }

    /// The weight `wkey` packed for the packed bf16 kernel while the source
    /// reads it ([`WeightSource::packed_bf16`]), where that is what
    /// [`Linear::new`] would make of it anyway: bf16 compute on a CPU that
    /// has the kernel, no int8, a source that can. `None` otherwise.
    fn packed_while_read(
        &self,
        wkey: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Option<LinearWeight>> {
        if !(self.device.is_cpu() && self.dtype == DType::BF16 && !self.int8 && packed::available())
        {
            return Ok(None);
        }
        self.require_shape(wkey, &[out_dim, in_dim])?;
        let Some(read) = self.source.packed_bf16(wkey) else {
            return Ok(None);
        };
        let (weight, non_finite) = read?;
        self.check_shape(wkey, &weight.dims(), &[out_dim, in_dim])?;
        match (non_finite, &weight) {
            (Some(true), _) => {
                let mut v = self.non_finite.lock().unwrap_or_else(|e| e.into_inner());
                v.push(wkey.to_string());
            }
            (None, LinearWeight::MappedBf16(m)) => self.unscanned.push(wkey, m),
            _ => {}
        }
        Ok(Some(weight))
    }

    /// The `[out_dim, in_dim]` table `name.weight` for row lookups
    /// (embeddings): as [`Weights::linear_weight`], except that a dense table
    /// stored in f16 or bf16 stays so when the compute dtype is f32. Its rows
    /// are then widened when gathered, to exactly the values a widened table
    /// would give, and a table of which a prompt uses a few hundred rows
    /// costs half the memory and no conversion at load. A quantised table
    /// stays on the host whatever the compute device.
    pub fn table(&self, name: &str, in_dim: usize, out_dim: usize) -> Result<LinearWeight> {
        let wkey = self.key(&format!("{name}.weight"));
        self.require_shape(&wkey, &[out_dim, in_dim])?;
        // A bf16 table in a mapped file is read a few rows at a time where
        // it lies (Gemma-2's is 1.2 GB, of which a prompt uses some hundred
        // rows), whatever the compute dtype: rows are converted as gathered.
        if self.device.is_cpu() {
            if let Some(m) = self.source.mapped_table(&wkey) {
                self.check_shape(&wkey, &m.dims(), &[out_dim, in_dim])?;
                self.unscanned.push(&wkey, &m);
                return Ok(LinearWeight::MappedBf16(m));
            }
        }
        match self.source.linear(&wkey)? {
            LinearWeight::Dense(t)
                if self.dtype == DType::F32 && matches!(t.dtype(), DType::BF16 | DType::F16) =>
            {
                self.check_shape(&wkey, t.dims(), &[out_dim, in_dim])?;
                self.scan(&wkey, &t)?;
                Ok(LinearWeight::Dense(t.to_device(&self.device)?))
            }
            LinearWeight::Dense(t) => {
                self.check_shape(&wkey, t.dims(), &[out_dim, in_dim])?;
                self.scan(&wkey, &t)?;
                Ok(LinearWeight::Dense(cast(
                    &t.to_device(&self.device)?,
                    self.dtype,
                )?))
            }
            // A quantised table stays where the source keeps it (the host):
            // a lookup gathers and dequantises a few rows there and moves
            // only those to the compute device. On a GPU, a table moved
            // there would come back whole to the host at every lookup.
            LinearWeight::Quantized(q) => {
                self.check_shape(&wkey, q.shape().dims(), &[out_dim, in_dim])?;
                Ok(LinearWeight::Quantized(q))
            }
            // Packed or int8: as `linear_weight` hands them out.
            _ => self.linear_weight(name, in_dim, out_dim),
        }
    }

    /// A linear layer `in_dim -> out_dim` (`name.weight`, and `name.bias` when `bias`).
    pub fn linear(&self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let wkey = self.key(&format!("{name}.weight"));
        let mut weight = match self.packed_while_read(&wkey, in_dim, out_dim)? {
            Some(w) => w,
            None => self.linear_weight(name, in_dim, out_dim)?,
        };
        // Dense weights come with their adapters merged; quantised ones carry
        // them at run time.
        let mut adapters = Vec::new();
        if matches!(weight, LinearWeight::Quantized(_)) {
            for a in self.source.lora_adapters(&wkey)? {
                let [out, inp] = a.dims();
                if [out, inp] != [out_dim, in_dim] {
                    return Err(Error::WeightShape {
                        key: format!("{wkey} (LoRA)"),
                        source_name: self.source.name(),
                        expected: vec![out_dim, in_dim],
                        found: vec![out, inp],
                    });
                }
                adapters.push(a.to(self.dtype, &self.device)?);
            }
        }
        let bias = if bias {
            Some(self.get(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        if self.int8 && !matches!(weight, LinearWeight::Int8(_)) {
            let dense = weight.to_dense(&Device::Cpu)?;
            let packed = int8::PackedI8::quantize(&dense).map_err(|e| Error::WeightLoad {
                key: wkey.clone(),
                source_name: self.source.name(),
                reason: e.to_string(),
            })?;
            weight = LinearWeight::Int8(Arc::new(packed));
        }
        Ok(Linear::new(weight, bias)?.with_adapters(adapters))
    }
}

/// `y = x W^T + b` over the last dimension, with a dense or quantised `W`, plus
/// `sum_i s_i (x A_i^T) B_i^T` for each low-rank adapter (LoRA) it carries.
///
/// Adapters are kept factored so that a quantised `W` stays quantised: only
/// the base weight is dequantised, one layer at a time, when used.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The bias in f32, for the packed bf16 kernel.
    bias_f32: Option<Vec<f32>>,
    adapters: Vec<LoraAdapter>,
}

impl Linear {
    /// A linear layer from its parts (`weight` is `[out, in]`).
    ///
    /// A dense bf16 weight on a CPU with AVX512-BF16 is repacked for
    /// [`packed`]'s kernel (see [`LinearWeight::packed_if_possible`]).
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let bias_f32 = Self::bias_f32(bias.as_ref())?;
        Ok(Self {
            weight: weight.packed_if_possible()?,
            bias,
            bias_f32,
            adapters: Vec::new(),
        })
    }

    /// The bias as f32 values, kept beside the tensor for the packed kernel
    /// (which adds it in f32, before its one rounding to bf16, as oneDNN does).
    fn bias_f32(bias: Option<&Tensor>) -> candle_core::Result<Option<Vec<f32>>> {
        bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()
    }

    /// The same layer with `adapters` added to those it has (each must be
    /// `[out, in]` and in the compute dtype of the inputs).
    pub fn with_adapters(mut self, adapters: impl IntoIterator<Item = LoraAdapter>) -> Self {
        self.adapters.extend(adapters);
        self
    }

    /// The low-rank adapters applied at run time.
    pub fn adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }

    /// The weight.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `act(self(x)) * up(x)`: a gated feed-forward's two input layers
    /// (SiLU for Lumina2's, GELU-tanh for Gemma-2's), rounded as the unfused
    /// ops are ([`ops::elementwise::silu_mul`], [`ops::elementwise::gelu_tanh_mul`]). When both
    /// weights are Q4_0 (GGUF) without bias or adapters and the input is bf16
    /// on a CPU with AMX, the two products and the activation are computed
    /// panel by panel, without the two `[.., out]` intermediates (the
    /// transformer's peak memory at 512x512: 47 MB less).
    pub fn gated(&self, up: &Linear, x: &Tensor, act: GateAct) -> candle_core::Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        if let (LinearWeight::Quantized(g), LinearWeight::Quantized(u)) = (&self.weight, &up.weight)
        {
            // The one-pass kernels need AMX; elsewhere no span is opened for
            // them, so that the profile counts only the layers that run.
            if self.plain() && up.plain() && ops::linear::fused_q4_0(x) {
                let _span = profile::span(profile::groups::LINEAR);
                let gelu = act == GateAct::GeluTanh;
                let x2 = as_rows(x)?;
                if let Some(y) = packed::PackedBf16::gated_q4_0_rows(g, u, &x2, gelu)? {
                    let out = g.shape().dims2()?.0;
                    return like_input(Tensor::from_vec(y, (x2.dim(0)?, out), x.device())?, x);
                }
            }
        }
        let (g, u) = (self.forward(x)?, up.forward(x)?);
        let _span = profile::span(profile::groups::ELEMENTWISE);
        match act {
            GateAct::Silu => ops::elementwise::silu_mul(&g, &u),
            GateAct::GeluTanh => ops::elementwise::gelu_tanh_mul(&g, &u),
        }
    }

    /// A gated feed-forward: `down(act(self(x)) * up(x))` ([`Self::gated`],
    /// then `down`). When the three weights are Q4_0 (GGUF) without
    /// adapters (`self` and `up` without bias), the input bf16 and the CPU
    /// has AMX, the gated product goes straight into the layout that the
    /// last matmul reads (it exists once, not twice).
    pub fn feed_forward(
        &self,
        up: &Linear,
        down: &Linear,
        x: &Tensor,
        act: GateAct,
    ) -> candle_core::Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        if let (
            LinearWeight::Quantized(g),
            LinearWeight::Quantized(u),
            LinearWeight::Quantized(d),
        ) = (&self.weight, &up.weight, &down.weight)
        {
            if self.plain() && up.plain() && down.adapters.is_empty() && ops::linear::fused_q4_0(x)
            {
                let _span = profile::span(profile::groups::LINEAR);
                let gelu = act == GateAct::GeluTanh;
                let bias = down.bias_f32.as_deref();
                let x2 = as_rows(x)?;
                if let Some(y) = packed::PackedBf16::feed_forward_q4_0((g, u, d), &x2, gelu, bias)?
                {
                    return like_input(y, x);
                }
            }
        }
        let h = self.gated(up, x, act)?;
        down.forward(&h)
    }

    /// Applies the layer to `x` of shape `[..., in]`.
    ///
    /// The product runs where [`ops::linear::path`] sends it: packed bf16 and
    /// int8 weights on their kernels, quantised weights with bf16 inputs
    /// packed per call, everything else through candle's matmul; the
    /// adapters are added after.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _span = profile::span(profile::groups::LINEAR);
        let x2 = as_rows(x)?;
        let bias_f32 = self.bias_f32.as_deref();
        let mut y = match (ops::linear::path(self.weight.form(), x), &self.weight) {
            (LinearPath::PackedBf16, LinearWeight::PackedBf16(p)) => {
                p.matmul(&x2, bias_f32)?.to_dtype(x.dtype())?
            }
            (LinearPath::MappedBf16, LinearWeight::MappedBf16(m)) => {
                m.matmul(&x2, bias_f32)?.to_dtype(x.dtype())?
            }
            // Outputs in the input's dtype when it is f32 or bf16.
            (LinearPath::Int8, LinearWeight::Int8(p)) => {
                p.matmul(&x2, bias_f32)?.to_dtype(x.dtype())?
            }
            (LinearPath::PackPerCall, LinearWeight::Quantized(q)) => {
                packed::PackedBf16::matmul_quantized(q, &x2, bias_f32)?
            }
            (_, w) => ops::linear::matmul(&x2, &w.to_dense(x.device())?, self.bias.as_ref())?,
        };
        for a in &self.adapters {
            y = (y + a.forward_rows(&x2)?)?;
        }
        like_input(y, x)
    }

    /// No bias and no adapters: the weight alone, as the one-pass GGUF
    /// feed-forward kernels take it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn plain(&self) -> bool {
        self.bias.is_none() && self.adapters.is_empty()
    }
}
