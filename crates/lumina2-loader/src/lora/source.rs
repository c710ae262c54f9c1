//! Applying LoRAs to a transformer's weights: a [`WeightSource`] wrapper.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use lumina2_transformer::{LinearWeight, WeightSource};
use lumina2_weights::LoraAdapter;

use super::file::{LoraFile, LoraModule};
use super::keys::{Resolver, Target};
use crate::folder::Error;
use crate::model_keys::ModelKeys;

/// Any [`WeightSource`] with LoRAs on top, for the transformer `cfg` describes
/// (Lumina2's [`lumina2_transformer::Config`] or Z-Image's
/// [`lumina2_transformer::zimage::ZImageConfig`]).
///
/// Dense weights are handed out with every update merged in:
/// `W + sum_i s_i (alpha_i / r_i) B_i A_i`, computed in f32 (the model then
/// converts to its compute dtype). Quantised linear weights stay quantised and
/// the updates go with them as [`LoraAdapter`]s
/// ([`WeightSource::lora_adapters`]), which the model's linear layers apply at
/// run time.
pub struct LoraSource {
    inner: Arc<dyn WeightSource>,
    /// Adapters by diffusers weight key.
    adapters: HashMap<String, Vec<LoraAdapter>>,
}

impl LoraSource {
    /// Puts `loras`, each with its strength (`scale`), on top of `inner`.
    ///
    /// Every module of every LoRA must map onto a linear weight of the model
    /// (else [`Error::KeyMismatch`] lists all those that do not) and fit its
    /// shape (else [`Error::Shape`] names the LoRA key, the expected and the
    /// found shape), its rank no larger than the weight's smaller side (a
    /// larger one is no low-rank update). All of this is checked on the
    /// files' headers before any factor is read. A fused original `qkv`
    /// module is split: its `A` is shared by `to_q`, `to_k` and `to_v`, the
    /// rows of its `B` are cut with the sizes of those weights.
    pub fn new<M: ModelKeys + ?Sized>(
        inner: Arc<dyn WeightSource>,
        cfg: &M,
        loras: &[(LoraFile, f64)],
    ) -> Result<Self, Error> {
        let resolver = Resolver::new(cfg);
        // Every module matched and checked from the headers first: nothing
        // is read for a LoRA that does not fit.
        let matched = loras
            .iter()
            .map(|(lora, _)| match_modules(&resolver, lora))
            .collect::<Result<Vec<_>, Error>>()?;
        let mut adapters: HashMap<String, Vec<LoraAdapter>> = HashMap::new();
        for ((lora, scale), modules) in loras.iter().zip(matched) {
            let path = lora.path();
            for (m, target) in modules {
                let (down, up) = lora.read_factors(m)?;
                let s = scale * lora.factor(m)?;
                let new = |up: Tensor| {
                    LoraAdapter::new(down.clone(), up, s).map_err(|e| Error::Unsupported {
                        path: path.to_path_buf(),
                        reason: format!("LoRA module `{}`: {e}", m.name()),
                    })
                };
                match target {
                    Target::Single(key) => adapters.entry(key).or_default().push(new(up)?),
                    Target::Qkv(keys) => {
                        let mut start = 0;
                        for key in keys {
                            let rows = resolver.weight_dims(&key).map_or(0, |[o, _]| o);
                            let part =
                                up.narrow(0, start, rows).map_err(|e| Error::Unsupported {
                                    path: path.to_path_buf(),
                                    reason: format!("`{}`: {e}", m.up_key()),
                                })?;
                            adapters.entry(key).or_default().push(new(part)?);
                            start += rows;
                        }
                    }
                }
            }
        }
        Ok(Self { inner, adapters })
    }

    /// Opens the LoRA files and puts them, each with its strength, on top of `inner`.
    pub fn open<P: AsRef<Path>, M: ModelKeys + ?Sized>(
        inner: Arc<dyn WeightSource>,
        cfg: &M,
        loras: &[(P, f64)],
    ) -> Result<Self, Error> {
        let files = loras
            .iter()
            .map(|(p, s)| Ok((LoraFile::open(p)?, *s)))
            .collect::<Result<Vec<_>, Error>>()?;
        Self::new(inner, cfg, &files)
    }

    /// The diffusers keys of the weights the LoRAs change, sorted.
    pub fn adapted_keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.adapters.keys().cloned().collect();
        k.sort();
        k
    }

    /// `w` with this source's updates of `key` added, in f32.
    fn merged(&self, key: &str, w: Tensor) -> lumina2_weights::Result<Tensor> {
        let Some(list) = self.adapters.get(key) else {
            return Ok(w);
        };
        let mut w = w.to_dtype(DType::F32)?;
        for a in list {
            if w.dims() != a.dims() {
                return Err(lumina2_weights::Error::WeightShape {
                    key: key.to_string(),
                    source_name: self.inner.name(),
                    expected: a.dims().to_vec(),
                    found: w.dims().to_vec(),
                });
            }
            let delta = a.delta()?.to_device(w.device())?;
            w = (w + delta)?;
        }
        Ok(w)
    }
}

/// The target of every module of `lora`, its factors' shapes checked against
/// it, from the header alone; no two modules on one weight. Every key that
/// names no weight is reported at once.
fn match_modules<'a>(
    resolver: &Resolver,
    lora: &'a LoraFile,
) -> Result<Vec<(&'a LoraModule, Target)>, Error> {
    let path = lora.path();
    let mut unknown: Vec<String> = lora.unrecognised_keys().to_vec();
    let mut matched = Vec::new();
    // The module adapting each weight: one per weight, so that the factors
    // read stay within twice the model's size, whatever the file lists.
    let mut adapted: HashMap<String, &str> = HashMap::new();
    for m in lora.modules() {
        let target = resolver
            .resolve(m.name())
            .map_err(|reason| Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!("LoRA module `{}`: {reason}", m.name()),
            })?;
        let Some((target, [out, inp])) = target.and_then(|t| resolver.dims(&t).map(|d| (t, d)))
        else {
            unknown.push(m.down_key().to_string());
            unknown.push(m.up_key().to_string());
            continue;
        };
        let rank = m.rank();
        check_dims(path, m.down_key(), m.down_shape(), [rank, inp])?;
        check_dims(path, m.up_key(), m.up_shape(), [out, rank])?;
        let max_rank = out.min(inp);
        if rank > max_rank {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "LoRA module `{}` has rank {rank}, more than its weight's smaller side \
                     ({out} x {inp}: at most {max_rank})",
                    m.name()
                ),
            });
        }
        let keys: &[String] = match &target {
            Target::Single(k) => std::slice::from_ref(k),
            Target::Qkv(k) => k,
        };
        for k in keys {
            if let Some(other) = adapted.insert(k.clone(), m.name()) {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    reason: format!("LoRA modules `{other}` and `{}` both adapt `{k}`", m.name()),
                });
            }
        }
        matched.push((m, target));
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::KeyMismatch {
            path: path.to_path_buf(),
            missing: Vec::new(),
            unexpected: unknown,
        });
    }
    Ok(matched)
}

fn check_dims(
    path: &Path,
    key: &str,
    found: [usize; 2],
    expected: [usize; 2],
) -> Result<(), Error> {
    if found != expected {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

impl WeightSource for LoraSource {
    fn contains(&self, key: &str) -> bool {
        self.inner.contains(key)
    }
    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        self.merged(key, self.inner.tensor(key)?)
    }
    fn linear(&self, key: &str) -> lumina2_weights::Result<LinearWeight> {
        Ok(match self.inner.linear(key)? {
            LinearWeight::Dense(w) => LinearWeight::Dense(self.merged(key, w)?),
            q @ LinearWeight::Quantized(_) => q,
            // Sources do not hand out packed or int8 weights today; one that
            // did would be unpacked, merged, and repacked by `Linear::new`
            // (or requantised by `Weights::linear`).
            p @ (LinearWeight::PackedBf16(_)
            | LinearWeight::MappedBf16(_)
            | LinearWeight::Int8(_)) => {
                LinearWeight::Dense(self.merged(key, p.to_dense(&candle_core::Device::Cpu)?)?)
            }
        })
    }
    fn tensor_as(&self, key: &str, dtype: DType) -> lumina2_weights::Result<Tensor> {
        // A weight without adapters of this layer is read as the inner
        // source reads it; one with adapters is merged at the stored dtype.
        if !self.adapters.contains_key(key) {
            return self.inner.tensor_as(key, dtype);
        }
        Ok(self.tensor(key)?.to_dtype(dtype)?)
    }
    fn linear_as(&self, key: &str, dtype: DType) -> lumina2_weights::Result<LinearWeight> {
        if !self.adapters.contains_key(key) {
            return self.inner.linear_as(key, dtype);
        }
        Ok(self.linear(key)?.dense_as(dtype)?)
    }
    fn lora_adapters(&self, key: &str) -> lumina2_weights::Result<Vec<LoraAdapter>> {
        // The inner source may be another LoRA layer with its own.
        let mut list = self.inner.lora_adapters(key)?;
        list.extend(self.adapters.get(key).into_iter().flatten().cloned());
        Ok(list)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        // Merging a LoRA keeps the base weight's shape.
        self.inner.shape(key)
    }
    fn keys(&self) -> Vec<String> {
        self.inner.keys()
    }
}
