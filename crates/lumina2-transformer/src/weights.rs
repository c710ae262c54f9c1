//! How the model receives its weights.
//!
//! The model never opens files. It asks a [`WeightSource`] for tensors by their
//! diffusers key; a source can be a candle [`VarBuilder`], a map of tensors, the
//! memory-mapped safetensors files of [`Weights::from_safetensors`], or anything
//! the `lumina2-loader` crate builds (original checkpoints, GGUF). Linear layers
//! ask through [`WeightSource::linear`], which may hand out a quantised tensor
//! that stays quantised in memory: one model definition serves dense and
//! quantised weights.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The weight of a linear layer: dense, or quantised and kept so.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense `[out, in]` matrix.
    Dense(Tensor),
    /// A quantised `[out, in]` matrix, dequantised one layer at a time when used.
    Quantized(Arc<QTensor>),
}

impl LinearWeight {
    /// The `[out, in]` shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Dense(t) => t.dims().to_vec(),
            Self::Quantized(q) => q.shape().dims().to_vec(),
        }
    }
}

/// A store of named tensors the model can draw its weights from.
///
/// Keys are diffusers' names (`layers.0.attn.to_q.weight`). Implementations
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
    /// A short description for error messages (usually the file names).
    fn name(&self) -> String;
    /// Every key the source holds, when it can list them (loaders use this to
    /// report all missing and unexpected keys at once); empty otherwise.
    fn keys(&self) -> Vec<String> {
        Vec::new()
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
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = HashMap::keys(self).cloned().collect();
        k.sort();
        k
    }
}

/// Memory-mapped safetensors files (one or several shards).
pub struct SafetensorsSource {
    inner: candle_core::safetensors::MmapedSafetensors,
    files: String,
}

impl SafetensorsSource {
    /// Memory-maps the given files. Keys are looked up across all of them.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let files = paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // SAFETY: the files are mapped read-only; as with every mmap, the caller
        // must not truncate or rewrite them while the model is alive.
        let inner =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }.map_err(|e| {
                Error::WeightLoad {
                    key: String::new(),
                    source_name: files.clone(),
                    reason: e.to_string(),
                }
            })?;
        Ok(Self { inner, files })
    }
}

impl WeightSource for SafetensorsSource {
    fn contains(&self, key: &str) -> bool {
        self.inner.get(key).is_ok()
    }
    fn tensor(&self, key: &str) -> Result<Tensor> {
        self.inner
            .load(key, &Device::Cpu)
            .map_err(|e| Error::WeightLoad {
                key: key.to_string(),
                source_name: self.files.clone(),
                reason: e.to_string(),
            })
    }
    fn name(&self) -> String {
        self.files.clone()
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.inner.tensors().into_iter().map(|(n, _)| n).collect();
        k.sort();
        k
    }
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
}

impl Weights {
    /// Weights from any source, converted to `dtype` on `device` when loaded.
    pub fn new(source: Arc<dyn WeightSource>, dtype: DType, device: &Device) -> Self {
        Self {
            source,
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// Weights from a candle `VarBuilder`; its own dtype is ignored in favour of `dtype`.
    pub fn from_var_builder(vb: VarBuilder<'static>, dtype: DType, device: &Device) -> Self {
        Self::new(Arc::new(VarBuilderSource(vb)), dtype, device)
    }

    /// Weights from memory-mapped safetensors files (the shards of one model).
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

    /// Weights from tensors in memory, keyed by diffusers' names.
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

    /// A dense tensor of the given shape, in the compute dtype, on the compute device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.key(name);
        self.require(&key)?;
        let t = self.source.tensor(&key)?;
        self.check_shape(&key, t.dims(), shape)?;
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// A linear layer `in_dim -> out_dim` (`name.weight`, and `name.bias` when `bias`).
    pub fn linear(&self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let wkey = self.key(&format!("{name}.weight"));
        self.require(&wkey)?;
        let weight = match self.source.linear(&wkey)? {
            LinearWeight::Dense(t) => {
                self.check_shape(&wkey, t.dims(), &[out_dim, in_dim])?;
                LinearWeight::Dense(t.to_device(&self.device)?.to_dtype(self.dtype)?)
            }
            LinearWeight::Quantized(q) => {
                self.check_shape(&wkey, q.shape().dims(), &[out_dim, in_dim])?;
                LinearWeight::Quantized(q)
            }
        };
        let bias = if bias {
            Some(self.get(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

/// `y = x W^T + b` over the last dimension, with a dense or quantised `W`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    /// A linear layer from its parts (`weight` is `[out, in]`).
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the layer to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = match &self.weight {
            LinearWeight::Dense(w) => w.clone(),
            // Dequantised when used, so that only one layer is ever dense at a time.
            LinearWeight::Quantized(q) => q.dequantize(x.device())?.to_dtype(x.dtype())?,
        };
        let dims = x.dims();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.dim(0)?;
        }
        y.reshape(out_dims)
    }
}
