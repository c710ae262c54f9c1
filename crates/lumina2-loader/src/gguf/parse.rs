//! Parsing a GGUF header from bytes, trusting nothing in them.
//!
//! Every count and length is checked against the bytes left before anything of
//! that size is allocated, so a hostile file costs at most a small multiple of
//! its own size in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::error::GgufError;
use super::types::{GgmlType, MetadataArray, MetadataValue, TensorInfo, ValueType};

/// The default alignment of tensor data (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 8;
/// Deepest nesting of metadata arrays (arrays of arrays of ...).
pub const MAX_NESTING: usize = 16;

/// A parsed header.
#[derive(Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, MetadataValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Start of the data section in the file.
    pub data_start: u64,
}

struct Cursor<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn path(&self) -> PathBuf {
        self.path.to_path_buf()
    }

    fn left(&self) -> u64 {
        (self.data.len().saturating_sub(self.pos)) as u64
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let data: &'a [u8] = self.data;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path(),
                what: what(),
                offset: self.pos as u64,
                len: data.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each fit in
    /// what is left, and returns the count as usize.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: &dyn Fn() -> String,
    ) -> Result<usize, GgufError> {
        let needed = count.checked_mul(min_size);
        let left = self.left();
        match needed {
            Some(n) if n <= left => Ok(count as usize),
            _ => Err(GgufError::CountTooLarge {
                path: self.path(),
                what: what(),
                count,
                needed: needed.unwrap_or(u64::MAX),
                left,
            }),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let len = self.check_count(len, 1, &|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            path: self.path(),
            what: what(),
        })
    }

    fn value_type(&mut self, key: &str, what: &dyn Fn() -> String) -> Result<ValueType, GgufError> {
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path(),
            key: key.to_string(),
            id,
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool, GgufError> {
        let [b] = self.array(&|| format!("the value of `{key}`"))?;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool {
                path: self.path(),
                key: key.to_string(),
                byte,
            }),
        }
    }

    fn value(&mut self, ty: ValueType, key: &str) -> Result<MetadataValue, GgufError> {
        let what = || format!("the value of `{key}`");
        Ok(match ty {
            ValueType::U8 => MetadataValue::U8(u8::from_le_bytes(self.array(&what)?)),
            ValueType::I8 => MetadataValue::I8(i8::from_le_bytes(self.array(&what)?)),
            ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => MetadataValue::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => MetadataValue::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => MetadataValue::Bool(self.bool(key)?),
            ValueType::String => MetadataValue::String(self.string(&what)?),
            ValueType::Array => MetadataValue::Array(self.array_value(key, 1)?),
        })
    }

    /// An array (element type, count, elements) at nesting `depth` (1 = outermost).
    fn array_value(&mut self, key: &str, depth: usize) -> Result<MetadataArray, GgufError> {
        if depth > MAX_NESTING {
            return Err(GgufError::NestingTooDeep {
                path: self.path(),
                key: key.to_string(),
                max: MAX_NESTING,
            });
        }
        let what = || format!("an array element of `{key}`");
        let ty = self.value_type(key, &|| format!("the element type of array `{key}`"))?;
        let count = self.u64(&|| format!("the length of array `{key}`"))?;
        let n = self.check_count(count, ty.min_size(), &|| {
            format!("the length of array `{key}`")
        })?;
        macro_rules! prim {
            ($variant:ident, $t:ty) => {{
                let mut v: Vec<$t> = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.array(&what)?));
                }
                MetadataArray::$variant(v)
            }};
        }
        Ok(match ty {
            ValueType::U8 => MetadataArray::U8(self.take(n, &what)?.to_vec()),
            ValueType::I8 => prim!(I8, i8),
            ValueType::U16 => prim!(U16, u16),
            ValueType::I16 => prim!(I16, i16),
            ValueType::U32 => prim!(U32, u32),
            ValueType::I32 => prim!(I32, i32),
            ValueType::F32 => prim!(F32, f32),
            ValueType::U64 => prim!(U64, u64),
            ValueType::I64 => prim!(I64, i64),
            ValueType::F64 => prim!(F64, f64),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                MetadataArray::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(&what)?);
                }
                MetadataArray::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                MetadataArray::Array(v)
            }
        })
    }
}

/// Parses the header of the GGUF file `data` (the whole file), checking every
/// tensor's placement against the file's length.
pub(crate) fn parse(path: &Path, data: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { path, data, pos: 0 };
    let magic: [u8; 4] = c.array(&|| "the magic".into())?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic {
            path: c.path(),
            found: magic.to_vec(),
        });
    }
    let version = c.u32(&|| "the version".into())?;
    if !(version == 2 || version == 3) {
        return Err(GgufError::UnsupportedVersion {
            path: c.path(),
            version,
        });
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the metadata count".into())?;
    // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type)
    // + 8 (offset) bytes; a key/value at least 8 (key length) + 4 (type) + 1.
    let n_tensors = c.check_count(n_tensors, 24, &|| "the tensor count".into())?;
    let n_kv = c.check_count(n_kv, 13, &|| "the metadata count".into())?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty = c.value_type(&key, &|| format!("the type of metadata `{key}`"))?;
        let value = c.value(ty, &key)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey {
                path: c.path(),
                key,
            });
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetadataValue::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(GgufError::BadAlignment {
                path: c.path(),
                value: format!("{v:?}"),
            })
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let n_dims = c.u32(&|| format!("the dimension count of tensor `{name}`"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::InvalidDims {
                path: c.path(),
                name,
                dims: Vec::new(),
                why: format!("{n_dims} dimensions (at most {MAX_DIMS} are allowed)"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&|| format!("the dims of tensor `{name}`"))?);
        }
        let type_id = c.u32(&|| format!("the type of tensor `{name}`"))?;
        let offset = c.u64(&|| format!("the offset of tensor `{name}`"))?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownTensorType {
                path: c.path(),
                name,
                id: type_id,
            });
        };
        let invalid = |why: String| GgufError::InvalidDims {
            path: path.to_path_buf(),
            name: name.clone(),
            dims: dims.clone(),
            why,
        };
        // ggml's dims are int64; each must also fit usize here.
        if dims
            .iter()
            .any(|&d| d > i64::MAX as u64 || usize::try_from(d).is_err())
        {
            return Err(invalid("a dimension is too large".into()));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)))
            .filter(|&n| n <= i64::MAX as u64)
            .map(|n| if dims.contains(&0) { 0 } else { n });
        let Some(n_elements) = n_elements else {
            return Err(invalid("the element count overflows".into()));
        };
        let block = ggml_type.block_size() as u64;
        let inner = dims.first().copied().unwrap_or(1);
        if inner % block != 0 {
            return Err(invalid(format!(
                "the innermost dimension {inner} is not a multiple of the {ggml_type} block size {block}"
            )));
        }
        let Some(n_bytes) = (n_elements / block).checked_mul(ggml_type.type_size() as u64) else {
            return Err(invalid("the byte size overflows".into()));
        };
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                path: c.path(),
                name,
                offset,
                alignment,
            });
        }
        if names.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor {
                path: c.path(),
                name,
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        });
    }

    let pos = c.pos as u64;
    let data_start = pos.checked_next_multiple_of(alignment).unwrap_or(u64::MAX);
    let data_len = (data.len() as u64).saturating_sub(data_start);
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes);
        if end.is_none_or(|e| e > data_len) {
            return Err(GgufError::TensorPastEnd {
                path: path.to_path_buf(),
                name: t.name.clone(),
                offset: t.offset,
                end: end.unwrap_or(u64::MAX),
                data_len,
            });
        }
    }
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        if let [a, b] = w {
            if a.offset + a.n_bytes > b.offset {
                return Err(GgufError::OverlappingTensors {
                    path: path.to_path_buf(),
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
