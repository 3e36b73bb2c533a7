//! GGUF reader (versions 2 and 3) and a minimal F32 writer.
//!
//! The file is memory-mapped once; F32/F16/BF16 tensors are handed out zero-copy as
//! [`Storage::Mapped`], block-quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are dequantized to
//! f32 exactly as ggml does. Parsing never trusts a count or a length from the file: each one is
//! checked against the bytes that are left before anything is allocated, so a damaged or hostile
//! file gives an [`Error`] that names the file and the problem, never a panic or a huge allocation.
//!
//! ```no_run
//! use persona::model::gguf::GgufFile;
//! let g = GgufFile::open(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! assert_eq!(g.get_str("general.architecture"), Some("llama"));
//! let emb = g.tensor("token_embd.weight")?; // shape [vocab, hidden], dequantized to f32
//! # Ok::<(), persona::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::tensor::{DType, HostTensor, Storage};

const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (no real file nests more than twice).
const MAX_ARRAY_DEPTH: usize = 8;

// GGUF metadata value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric value (integers widened, f32 converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::I64(v) => Some(v as f64),
            GgufValue::U64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of this value's type (`u32`, `string`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::Str(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => T_U8,
            GgufValue::I8(_) => T_I8,
            GgufValue::U16(_) => T_U16,
            GgufValue::I16(_) => T_I16,
            GgufValue::U32(_) => T_U32,
            GgufValue::I32(_) => T_I32,
            GgufValue::U64(_) => T_U64,
            GgufValue::I64(_) => T_I64,
            GgufValue::F32(_) => T_F32,
            GgufValue::F64(_) => T_F64,
            GgufValue::Bool(_) => T_BOOL,
            GgufValue::Str(_) => T_STR,
            GgufValue::Array(_) => T_ARRAY,
        }
    }
}

/// ggml tensor element types, with the ids used in GGUF files.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    /// A type id this reader does not know; such tensors can be listed but not read.
    Other(u32),
}

/// (type, GGUF id, elements per block, bytes per block), as in ggml's type traits.
const GGML_TYPES: [(GgmlType, u32, u64, u64); 32] = {
    use GgmlType::*;
    [
        (F32, 0, 1, 4),
        (F16, 1, 1, 2),
        (Q4_0, 2, 32, 18),
        (Q4_1, 3, 32, 20),
        (Q5_0, 6, 32, 22),
        (Q5_1, 7, 32, 24),
        (Q8_0, 8, 32, 34),
        (Q8_1, 9, 32, 36),
        (Q2_K, 10, 256, 84),
        (Q3_K, 11, 256, 110),
        (Q4_K, 12, 256, 144),
        (Q5_K, 13, 256, 176),
        (Q6_K, 14, 256, 210),
        (Q8_K, 15, 256, 292),
        (IQ2_XXS, 16, 256, 66),
        (IQ2_XS, 17, 256, 74),
        (IQ3_XXS, 18, 256, 98),
        (IQ1_S, 19, 256, 50),
        (IQ4_NL, 20, 32, 18),
        (IQ3_S, 21, 256, 110),
        (IQ2_S, 22, 256, 82),
        (IQ4_XS, 23, 256, 136),
        (I8, 24, 1, 1),
        (I16, 25, 1, 2),
        (I32, 26, 1, 4),
        (I64, 27, 1, 8),
        (F64, 28, 1, 8),
        (IQ1_M, 29, 256, 56),
        (BF16, 30, 1, 2),
        (TQ1_0, 34, 256, 54),
        (TQ2_0, 35, 256, 66),
        (MXFP4, 39, 32, 17),
    ]
};

impl GgmlType {
    pub fn from_u32(id: u32) -> GgmlType {
        GGML_TYPES.iter().find(|e| e.1 == id).map_or(GgmlType::Other(id), |e| e.0)
    }

    /// The id stored in GGUF files.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Other(id) => id,
            t => GGML_TYPES.iter().find(|e| e.0 == t).map_or(u32::MAX, |e| e.1),
        }
    }

    /// ggml's name for the type (`Q4_1`, `BF16`, ...); `type N` for unknown ids.
    pub fn name(self) -> String {
        match self {
            GgmlType::Other(id) => format!("type {id}"),
            known => format!("{known:?}"),
        }
    }

    /// (elements per block, bytes per block); None for unknown ids.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        GGML_TYPES.iter().find(|e| e.0 == self).map(|e| (e.2, e.3))
    }

    /// Whether [`GgufFile::tensor`] can read tensors of this type.
    pub fn is_readable(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` (ne0) is the innermost, contiguous dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// PyTorch order (outermost first): the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (checked against overflow when the file was opened).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data, None for unknown types or element counts that are not whole blocks.
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, size) = self.ggml_type.block_layout()?;
        let ne0 = self.dims.first().copied().unwrap_or(1);
        if ne0 % block != 0 {
            return None;
        }
        (self.n_elements() / block).checked_mul(size)
    }
}

/// An open GGUF file: metadata and tensor table parsed, data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Map and parse `path`. Checks the header, every metadata value, the tensor table and that
    /// each tensor's data lies inside the file; tensor data itself is only read by [`Self::tensor`].
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < HEADER_LEN as u64 {
            return Err(too_short(path, len));
        }
        // SAFETY: the map is read-only; like every mmap user we rely on the file not being
        // truncated while mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_map(path, map)
    }

    fn from_map(path: &Path, map: Mmap) -> Result<GgufFile> {
        let (version, metadata, tensors, alignment, data_start) = parse(path, &map)?;
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_start
    }
    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    /// Any non-negative integer value under `key`.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }
    /// Any numeric value under `key`.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }
    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.get(key)?.as_array()
    }
    /// Tensor table in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of a tensor (any type whose block layout is known).
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let (start, end) = self.data_range(info)?;
        Ok(&self.map[start..end])
    }

    /// Read a tensor: F32/F16/BF16 zero-copy from the map, quantized types dequantized to f32.
    /// The shape is in PyTorch order (outermost first).
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: name.to_string() })?;
        let shape = info.shape();
        let (start, end) = self.data_range(info)?;
        let dtype = match info.ggml_type {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if let Some(dtype) = dtype {
            let storage = Storage::Mapped { map: self.map.clone(), offset: start, len: end - start, dtype };
            return Ok(HostTensor { name: info.name.clone(), shape, storage });
        }
        let n = info.n_elements() as usize;
        let data = dequantize(info.ggml_type, &self.map[start..end], n).map_err(|e| match e {
            Error::Unsupported(msg) => {
                Error::Unsupported(format!("{}: tensor `{}`: {msg}", self.path.display(), info.name))
            }
            other => other,
        })?;
        Ok(HostTensor::from_f32(info.name.clone(), shape, data))
    }

    /// Absolute byte range of a tensor's data, checked against the block layout and file size.
    fn data_range(&self, info: &GgufTensorInfo) -> Result<(usize, usize)> {
        let Some((block, _)) = info.ggml_type.block_layout() else {
            return Err(Error::Unsupported(format!(
                "{}: tensor `{}` has unknown ggml type id {}",
                self.path.display(),
                info.name,
                info.ggml_type.id()
            )));
        };
        let nbytes = info.n_bytes().ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "tensor `{}` has {} elements per row, not a multiple of the {} block size {block}",
                    info.name,
                    info.dims.first().copied().unwrap_or(1),
                    info.ggml_type
                ),
            )
        })?;
        let size = self.map.len() as u64;
        let start = self.data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= size => Ok((s as usize, e as usize)),
            _ => Err(Error::format(
                &self.path,
                format!(
                    "tensor `{}` data [{}..{}) is past the end of the file (size {size})",
                    info.name,
                    self.data_start as u128 + info.offset as u128,
                    self.data_start as u128 + info.offset as u128 + nbytes as u128
                ),
            )),
        }
    }
}

/// Bounds-checked little-endian cursor over the mapped file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn err(&self, msg: String) -> Error {
        Error::format(self.path, msg)
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {} at offset {} needs {n} bytes but the file ends after {} (size {})",
                what(),
                self.pos,
                self.remaining(),
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{}: string length {len} at offset {at} is larger than the rest of the file ({} bytes)",
                what(),
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        })
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue> {
        Ok(match ty {
            T_U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            T_I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            T_U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T_I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T_U32 => GgufValue::U32(self.u32(what)?),
            T_I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T_U64 => GgufValue::U64(self.u64(what)?),
            T_I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T_F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T_F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            T_BOOL => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(self.err(format!(
                        "{}: bool value {b} at offset {} is not 0 or 1",
                        what(),
                        self.pos - 1
                    )))
                }
            },
            T_STR => GgufValue::Str(self.string(what)?),
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels at offset {}",
                        what(),
                        self.pos
                    )));
                }
                let elem_ty = self.u32(what)?;
                let min = min_value_size(elem_ty).ok_or_else(|| {
                    self.err(format!("{}: unknown array element type {elem_ty} at offset {}", what(), self.pos - 4))
                })?;
                let at = self.pos;
                let n = self.u64(what)?;
                if n.checked_mul(min).map_or(true, |b| b > self.remaining() as u64) {
                    return Err(self.err(format!(
                        "{}: array length {n} at offset {at} is larger than the rest of the file ({} bytes) could hold",
                        what(),
                        self.remaining()
                    )));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1, what)?);
                }
                GgufValue::Array(items)
            }
            other => {
                return Err(self.err(format!("{}: unknown value type {other} at offset {}", what(), self.pos - 4)))
            }
        })
    }
}

/// Fewest bytes a value of GGUF type `ty` can occupy; None for unknown types.
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STR => 8,
        T_ARRAY => 12,
        _ => return None,
    })
}

type Parsed = (u32, BTreeMap<String, GgufValue>, Vec<GgufTensorInfo>, u64, u64);

/// Magic, version, tensor count, metadata count.
const HEADER_LEN: usize = 4 + 4 + 8 + 8;

fn too_short(path: &Path, len: u64) -> Error {
    Error::format(
        path,
        format!("file is {len} bytes long, too short to be a GGUF file (the header alone is {HEADER_LEN} bytes)"),
    )
}

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    if buf.len() < HEADER_LEN {
        return Err(too_short(path, buf.len() as u64));
    }
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.array::<4>(&|| "magic".into())?;
    if &magic != MAGIC {
        return Err(
            r.err(format!("not a GGUF file: magic is {:?}, expected \"GGUF\"", String::from_utf8_lossy(&magic)))
        );
    }
    let version = r.u32(&|| "version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF version 1 (the 2023 draft format) is not supported; re-convert the model with a current llama.cpp",
                path.display()
            )))
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(Error::Unsupported(format!(
                "{}: big-endian GGUF (version {}) is not supported",
                path.display(),
                v.swap_bytes()
            )))
        }
        v => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF version {v} is not supported (expected 2 or 3)",
                path.display()
            )))
        }
    }
    let n_tensors = r.u64(&|| "tensor count".into())?;
    let n_kv = r.u64(&|| "metadata count".into())?;
    // A tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes, a
    // key/value at least 8 (key length) + 4 (type) + 1 bytes.
    let rem = r.remaining() as u64;
    if n_tensors.checked_mul(24).map_or(true, |b| b > rem) {
        return Err(
            r.err(format!("tensor count {n_tensors} is larger than the rest of the file ({rem} bytes) could hold"))
        );
    }
    if n_kv.checked_mul(13).map_or(true, |b| b > rem) {
        return Err(
            r.err(format!("metadata count {n_kv} is larger than the rest of the file ({rem} bytes) could hold"))
        );
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let what = || format!("metadata `{key}`");
        let ty = r.u32(&what)?;
        let value = r.value(ty, 0, &what)?;
        if metadata.contains_key(&key) {
            return Err(r.err(format!("duplicate metadata key `{key}`")));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(r.err(format!("general.alignment must be a power of two, found {v:?}"))),
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("tensor #{i} name"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = r.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(r.err(format!("tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&what)?);
        }
        let count = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if count.map_or(true, |c| c > i64::MAX as u64) {
            return Err(r.err(format!("tensor `{name}` dims {dims:?}: element count overflows")));
        }
        let ggml_type = GgmlType::from_u32(r.u32(&what)?);
        let offset = r.u64(&what)?;
        if offset % alignment != 0 {
            return Err(
                r.err(format!("tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment}"))
            );
        }
        if let Some(j) = seen.insert(name.clone(), i as usize) {
            return Err(r.err(format!("duplicate tensor name `{name}` (entries #{j} and #{i})")));
        }
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
    }

    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let size = buf.len() as u64;
    for t in &tensors {
        // Unknown types cannot be sized; they fail when read. Rows that are not whole blocks
        // are reported when read as well.
        let Some(nbytes) = t.n_bytes() else { continue };
        let start = data_start as u128 + t.offset as u128;
        let end = start + nbytes as u128;
        if end > size as u128 {
            return Err(
                r.err(format!("tensor `{}` data [{start}..{end}) is past the end of the file (size {size})", t.name))
            );
        }
    }
    Ok((version, metadata, tensors, alignment, data_start))
}

/// Dequantize `n` elements of ggml type `ty` stored in `data` to f32, bit-for-bit as ggml's
/// `dequantize_row_*` (and gguf-py's `dequantize`) do. F32/F16/BF16 are widened.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let (block, bytes) = match ty.block_layout() {
        Some((b, s)) if ty.is_readable() => (b as usize, s as usize),
        _ => {
            return Err(Error::Unsupported(format!(
                "ggml type {ty} cannot be read (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)"
            )))
        }
    };
    if n % block != 0 {
        return Err(Error::Invalid(format!("{n} elements are not a whole number of {ty} blocks of {block}")));
    }
    let need = n / block * bytes;
    if data.len() != need {
        return Err(Error::Invalid(format!("{n} {ty} elements need {need} bytes, got {}", data.len())));
    }
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, y| y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        _ => unreachable!("is_readable covers exactly these types"),
    };
    let mut out = vec![0f32; n];
    // Chunks of 1024 blocks: big enough to amortise rayon's scheduling, small enough to balance.
    const CHUNK: usize = 1024;
    let run = |(y, b): (&mut [f32], &[u8])| {
        for (yb, bb) in y.chunks_exact_mut(block).zip(b.chunks_exact(bytes)) {
            f(bb, yb);
        }
    };
    if n / block >= 4 * CHUNK {
        out.par_chunks_mut(CHUNK * block).zip(data.par_chunks(CHUNK * bytes)).for_each(run);
    } else {
        run((&mut out, data));
    }
    Ok(out)
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q8_0: f16 d, 32 × i8; y = d·q.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (yi, &q) in y.iter_mut().zip(&b[2..34]) {
        *yi = (q as i8) as f32 * d;
    }
}

/// Q4_0: f16 d, 16 bytes of nibbles (low nibbles are elements 0..16, high 16..32); y = d·(q−8).
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; y = d·q + m.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 d, u32 high bits, 16 bytes of nibbles; y = d·(q−16) with q 5 bits.
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((q as u32 & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q as u32 >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 d, f16 m, u32 high bits, 16 bytes of nibbles; y = d·q + m with q 5 bits.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((q as u32 & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((q as u32 >> 4) | h1) as f32 * d + m;
    }
}

/// A tensor to encode: raw bytes of any ggml type, `dims` in ggml order.
struct RawTensor<'a> {
    name: &'a str,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::Str(s) => put_str(out, s),
        GgufValue::Array(items) => {
            let ty = items.first().map_or(T_U8, GgufValue::type_id);
            if items.iter().any(|x| x.type_id() != ty) {
                return Err(Error::Invalid("a GGUF array must hold values of a single type".into()));
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x)?;
            }
        }
    }
    Ok(())
}

/// Serialize a GGUF v3 file. Alignment comes from `general.alignment` when given.
fn encode(metadata: &[(String, GgufValue)], tensors: &[RawTensor]) -> Result<Vec<u8>> {
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(Error::Invalid(format!("general.alignment must be a power of two, got {v:?}"))),
        },
    } as usize;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v)?;
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
    }
    let data_start = out.len().div_ceil(alignment) * alignment;
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(data_start + off, 0);
        out.extend_from_slice(&t.data);
    }
    Ok(out)
}

/// Write a GGUF v3 file holding `metadata` and F32 `tensors` (name, PyTorch-order shape, data).
/// Used to export llama.cpp control vectors.
///
/// ```no_run
/// use persona::model::gguf::{write_gguf, GgufValue};
/// let v = vec![0.0f32; 576];
/// write_gguf(
///     "control.gguf",
///     &[("general.architecture".into(), GgufValue::Str("controlvector".into()))],
///     &[("direction.1".into(), vec![576], &v[..])],
/// )?;
/// # Ok::<(), persona::Error>(())
/// ```
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<()> {
    let path = path.as_ref();
    let mut names = std::collections::HashSet::new();
    for (name, shape, data) in tensors {
        if !names.insert(name.as_str()) {
            return Err(Error::Invalid(format!("write_gguf {}: duplicate tensor `{name}`", path.display())));
        }
        if shape.len() > MAX_DIMS as usize || shape.iter().product::<usize>() != data.len() {
            return Err(Error::Invalid(format!(
                "write_gguf {}: tensor `{name}` has shape {shape:?} but {} values",
                path.display(),
                data.len()
            )));
        }
    }
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, shape, data)| RawTensor {
            name,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: GgmlType::F32.id(),
            data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let bytes = encode(metadata, &raw)?;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&bytes).and_then(|_| f.flush()).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Open an in-memory GGUF image through an anonymous map (same code path as `open` after
    /// the file is mapped).
    fn open_bytes(bytes: &[u8]) -> Result<GgufFile> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).unwrap();
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only().unwrap();
        // map_anon cannot be empty: parse a slice of the right length instead.
        if bytes.is_empty() {
            return parse(Path::new("mem.gguf"), bytes).map(|_| unreachable!());
        }
        GgufFile::from_map(Path::new("mem.gguf"), map)
    }

    fn err_of(bytes: &[u8]) -> Error {
        match open_bytes(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    fn assert_err(bytes: &[u8], needle: &str) {
        let msg = err_of(bytes).to_string();
        assert!(msg.contains(needle), "error `{msg}` does not mention `{needle}`");
        assert!(msg.contains("mem.gguf"), "error `{msg}` does not name the file");
    }

    fn raw<'a>(name: &'a str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> RawTensor<'a> {
        RawTensor { name, dims: dims.to_vec(), ggml_type: ty.id(), data }
    }

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b
    }

    fn tensor_entry(b: &mut Vec<u8>, name: &str, dims: &[u64], ty: u32, offset: u64) {
        put_str(b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }

    /// Header + tensor table + padding to 32 + `data_len` zero bytes.
    fn with_tensors(entries: &[(&str, &[u64], u32, u64)], data_len: usize) -> Vec<u8> {
        let mut b = header(entries.len() as u64, 0);
        for (name, dims, ty, off) in entries {
            tensor_entry(&mut b, name, dims, *ty, *off);
        }
        b.resize(b.len().div_ceil(32) * 32 + data_len, 0);
        b
    }

    fn sample_metadata() -> Vec<(String, GgufValue)> {
        use GgufValue::*;
        vec![
            ("general.architecture".into(), Str("llama".into())),
            ("a.u8".into(), U8(200)),
            ("a.i8".into(), I8(-5)),
            ("a.u16".into(), U16(60000)),
            ("a.i16".into(), I16(-300)),
            ("a.u32".into(), U32(30)),
            ("a.i32".into(), I32(7)),
            ("a.u64".into(), U64(1 << 40)),
            ("a.i64".into(), I64(-(1 << 40))),
            ("a.f32".into(), F32(1e-5)),
            ("a.f64".into(), F64(100000.5)),
            ("a.bool".into(), Bool(true)),
            ("a.utf8".into(), Str("naïve — 数学 🎉".into())),
            ("a.tokens".into(), Array(vec![Str("<s>".into()), Str("Ġthe".into()), Str(String::new())])),
            ("a.nested".into(), Array(vec![Array(vec![I32(1), I32(-2)]), Array(vec![])])),
            ("a.empty".into(), Array(vec![])),
        ]
    }

    #[test]
    fn round_trip_metadata_and_float_tensors() {
        let f32s: Vec<f32> = vec![0.0, 1.5, -2.25, 3.0, 1e-8, -7.0];
        let f16s = [0.5f32, -1.0, 65504.0, 0.000061035156];
        let bf16s = [1.0f32, -3.0, 0.15625, 1e30];
        let tensors = [
            raw("w", &[3, 2], GgmlType::F32, f32s.iter().flat_map(|x| x.to_le_bytes()).collect()),
            raw("h", &[4], GgmlType::F16, f16s.iter().flat_map(|&x| f16b(x)).collect()),
            raw(
                "b",
                &[2, 2],
                GgmlType::BF16,
                bf16s.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            ),
        ];
        let md = sample_metadata();
        let g = open_bytes(&encode(&md, &tensors).unwrap()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 32);
        assert_eq!(g.data_offset() % 32, 0);
        assert_eq!(g.metadata().len(), md.len());
        for (k, v) in &md {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get_u64("a.u32"), Some(30));
        assert_eq!(g.get_u64("a.i32"), Some(7));
        assert_eq!(g.get_u64("a.i8"), None, "negative integers are not u64");
        assert_eq!(g.get_u64("a.f32"), None);
        assert_eq!(g.get_f64("a.u16"), Some(60000.0));
        assert_eq!(g.get_f64("a.f32"), Some(1e-5f32 as f64));
        assert_eq!(g.get_f64("a.i64"), Some(-((1u64 << 40) as f64)));
        assert_eq!(g.get_bool("a.bool"), Some(true));
        assert_eq!(g.get_array("a.tokens").map(|a| a.len()), Some(3));
        assert_eq!(g.get("missing"), None);

        let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "h", "b"]);
        let info = g.tensor_info("w").unwrap();
        assert_eq!(info.dims, [3, 2]);
        assert_eq!(info.shape(), [2, 3]);
        assert_eq!(info.ggml_type, GgmlType::F32);

        let w = g.tensor("w").unwrap();
        assert_eq!(w.shape, [2, 3]);
        assert!(matches!(w.storage, Storage::Mapped { dtype: DType::F32, .. }));
        assert_eq!(w.to_f32(), f32s);
        let h = g.tensor("h").unwrap();
        assert_eq!(h.dtype(), DType::F16);
        assert_eq!(h.to_f32(), f16s);
        let b = g.tensor("b").unwrap();
        assert_eq!((b.dtype(), b.shape.clone()), (DType::BF16, vec![2, 2]));
        assert_eq!(b.to_f32(), bf16s.map(|x| half::bf16::from_f32(x).to_f32()));
        assert!(matches!(g.tensor("nope"), Err(Error::MissingTensor { .. })));
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let md = vec![("general.alignment".to_string(), GgufValue::U32(64))];
        let a: Vec<u8> = [1.0f32].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [2.0f32, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let g =
            open_bytes(&encode(&md, &[raw("a", &[1], GgmlType::F32, a), raw("b", &[2], GgmlType::F32, b)]).unwrap())
                .unwrap();
        assert_eq!(g.alignment(), 64);
        assert_eq!(g.data_offset() % 64, 0);
        assert_eq!(g.tensor_info("b").unwrap().offset, 64);
        assert_eq!(g.tensor("b").unwrap().to_f32(), [2.0, 3.0]);
    }

    /// Nibble pattern used by the Q4/Q5 tests: low nibble j, high nibble 15 − j.
    fn nibbles() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    fn read_one(ty: GgmlType, dims: &[u64], data: Vec<u8>) -> HostTensor {
        let g = open_bytes(&encode(&[], &[raw("q", dims, ty, data)]).unwrap()).unwrap();
        let t = g.tensor("q").unwrap();
        assert!(matches!(t.storage, Storage::F32(_)));
        t
    }

    #[test]
    fn q4_0_dequantizes_like_ggml() {
        // Block 0: d = 0.5, nibbles j / 15−j  →  y[j] = 0.5·(j−8), y[16+j] = 0.5·(7−j).
        // Block 1: d = −2, every byte 0x9F   →  y = −2·(15−8) = −14 (low), −2·(9−8) = −2 (high).
        let mut data = f16b(0.5).to_vec();
        data.extend(nibbles());
        data.extend(f16b(-2.0));
        data.extend([0x9F; 16]);
        let t = read_one(GgmlType::Q4_0, &[32, 2], data);
        assert_eq!(t.shape, [2, 32]);
        let y = t.to_f32();
        assert_eq!([y[0], y[1], y[8], y[15], y[16], y[17], y[31]], [-4.0, -3.5, 0.0, 3.5, 3.5, 3.0, -4.0]);
        assert!(y[32..48].iter().all(|&v| v == -14.0));
        assert!(y[48..64].iter().all(|&v| v == -2.0));
    }

    #[test]
    fn q4_1_dequantizes_like_ggml() {
        // d = 0.25, m = −1: y[j] = 0.25·j − 1, y[16+j] = 0.25·(15−j) − 1.
        let mut data = f16b(0.25).to_vec();
        data.extend(f16b(-1.0));
        data.extend(nibbles());
        let y = read_one(GgmlType::Q4_1, &[32], data).to_f32();
        assert_eq!([y[0], y[1], y[4], y[15], y[16], y[27], y[31]], [-1.0, -0.75, 0.0, 2.75, 2.75, 0.0, -1.0]);
    }

    #[test]
    fn q8_0_dequantizes_like_ggml() {
        // d = 0.125: y = 0.125·q.
        let mut data = f16b(0.125).to_vec();
        let q: [i8; 32] = std::array::from_fn(|i| match i {
            0 => -128,
            1 => 127,
            2 => 0,
            3 => 1,
            4 => -1,
            i => (i as i8) * 3 - 50,
        });
        data.extend(q.iter().map(|&x| x as u8));
        let y = read_one(GgmlType::Q8_0, &[32], data).to_f32();
        assert_eq!(&y[..5], &[-16.0, 15.875, 0.0, 0.125, -0.125]);
        assert_eq!(y[31], (31 * 3 - 50) as f32 * 0.125);
    }

    #[test]
    fn q5_0_and_q5_1_dequantize_like_ggml() {
        // qh bit j is the 5th bit of element j; bit 16 + j that of element 16 + j.
        // Bits 0 and 16 set; qs[1] = 0x21 (element 1 → 1, element 17 → 2), other bytes 0.
        let qh = (1u32 | (1 << 16)).to_le_bytes();
        let mut qs = [0u8; 16];
        qs[1] = 0x21;
        // Q5_0, d = 1: y = q − 16.
        let mut data = f16b(1.0).to_vec();
        data.extend(qh);
        data.extend(qs);
        let y = read_one(GgmlType::Q5_0, &[32], data).to_f32();
        assert_eq!([y[0], y[1], y[2], y[16], y[17], y[31]], [0.0, -15.0, -16.0, 0.0, -14.0, -16.0]);
        // Q5_1, d = 0.5, m = 1: y = 0.5·q + 1.
        let mut data = f16b(0.5).to_vec();
        data.extend(f16b(1.0));
        data.extend(qh);
        data.extend(qs);
        let y = read_one(GgmlType::Q5_1, &[32], data).to_f32();
        assert_eq!([y[0], y[1], y[2], y[16], y[17], y[31]], [9.0, 1.5, 1.0, 9.0, 2.0, 1.0]);
    }

    /// Blocks quantized by gguf-py 0.19.0 (`gguf.quants.quantize`) from
    /// `x = (sin(0.7·i)·1.3 + 0.01·i) as f32, i in 0..64`; the expected values are gguf-py's
    /// `dequantize` of the same bytes (f32 bit patterns at indices 0, 1, 5, 16, 17, 31, 32, 63,
    /// and the f64 sum of all 64).
    #[test]
    fn dequantization_matches_gguf_py() {
        #[rustfmt::skip]
        let cases: [(GgmlType, &str, [u32; 8], f64); 5] = [
            (GgmlType::Q4_0, "53b2e8b47132061a5d9edcd7b36122051a5d6db3194c8cbab693512205194b8cb9b68250",
             [0x80000000, 0x3f4a6000, 0xbeca6000, 0xbf97c800, 0xbf17c800, 0x3f17c800, 0xbe6da000, 0x3f323800], 19.83447265625),
            (GgmlType::Q4_1, "f331d4bc163b8dcdf9e4a15023174c8eddf9e5a1ee3163bbd4905013174c9eddf9e4a15123284c9f",
             [0xbdbb8000, 0x3f568800, 0xbeed4000, 0xbf82b400, 0xbf263800, 0x3f26f000, 0xbe3a8000, 0x3f3e9000], 20.55908203125),
            (GgmlType::Q5_0, "53aee1c18307b067e3541b34ab3c97af56d2440a239a6daf0f1e3c78329708646c25a2330a218607535b1491",
             [0x80000000, 0x3f63ac00, 0xbeca6000, 0xbf8b2200, 0xbf17c800, 0x3f311400, 0xbe6da000, 0x3f4fec00], 20.61224365234375),
            (GgmlType::Q5_1, "c12dd4bc1e3c7cf81d670c9ae3c941a0352f881dabf3da52bd2d63bbe0e1c387c831a0362f882dbbf3c942a147319a3e",
             [0xbd1cc000, 0x3f5c5c00, 0xbecbb800, 0xbf8efe00, 0xbf2ae800, 0x3f2e5400, 0xbe530000, 0x3f47bc00], 20.09222412109375),
            (GgmlType::Q8_0, "5f220044695d26dfaa9fc4094d70632ce5b0a7cd1255786931ebb7aed61b5e7f6f377c23f3c7c1e31f57726433f7ccc7eb265e796a38fcd2cef22e657f6f3d01d8d4fa36",
             [0x00000000, 0x3f589e00, 0xbed23f00, 0xbf8dc1c0, 0xbf227680, 0x3f2f3480, 0xbe429800, 0x3f4a1400], 20.25489044189453),
        ];
        for (ty, hex, bits, sum) in cases {
            let bytes: Vec<u8> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let y = dequantize(ty, &bytes, 64).unwrap();
            let got: Vec<u32> = [0, 1, 5, 16, 17, 31, 32, 63].iter().map(|&i| y[i].to_bits()).collect();
            assert_eq!(got, bits, "{ty}");
            let s: f64 = y.iter().map(|&v| v as f64).sum();
            assert!((s - sum).abs() < 1e-12, "{ty}: sum {s} vs {sum}");
        }
    }

    #[test]
    fn parallel_dequantization_matches_serial() {
        // 5000 Q8_0 blocks takes the rayon path; each block compared with a one-block decode.
        let n_blocks = 5000;
        let mut data = Vec::with_capacity(n_blocks * 34);
        for b in 0..n_blocks {
            data.extend(f16b((b % 17) as f32 * 0.01 - 0.08));
            data.extend((0..32).map(|i| ((b * 31 + i * 7) % 256) as u8));
        }
        let all = dequantize(GgmlType::Q8_0, &data, n_blocks * 32).unwrap();
        for b in [0, 1, 1023, 1024, 4095, 4096, 4999] {
            let one = dequantize(GgmlType::Q8_0, &data[b * 34..(b + 1) * 34], 32).unwrap();
            assert_eq!(&all[b * 32..(b + 1) * 32], &one[..], "block {b}");
        }
    }

    #[test]
    fn write_gguf_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cv.gguf");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b = vec![-1.0f32; 5];
        let md = vec![
            ("general.architecture".to_string(), GgufValue::Str("controlvector".into())),
            ("controlvector.layer_count".to_string(), GgufValue::U32(2)),
        ];
        write_gguf(&p, &md, &[("direction.1".into(), vec![2, 3], &a[..]), ("direction.2".into(), vec![5], &b[..])])
            .unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.path(), p);
        assert_eq!(g.get_str("general.architecture"), Some("controlvector"));
        assert_eq!(g.get_u64("controlvector.layer_count"), Some(2));
        assert_eq!(g.tensor_info("direction.1").unwrap().dims, [3, 2]);
        let t = g.tensor("direction.1").unwrap();
        assert_eq!((t.shape.clone(), t.to_f32()), (vec![2, 3], a));
        assert_eq!(g.tensor("direction.2").unwrap().to_f32(), b);
        // Shape/data mismatch and duplicate names are refused.
        assert!(write_gguf(&p, &[], &[("x".into(), vec![2, 2], &b[..])]).is_err());
        assert!(write_gguf(&p, &[], &[("x".into(), vec![5], &b[..]), ("x".into(), vec![5], &b[..])]).is_err());
    }

    #[test]
    fn open_reads_real_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.gguf");
        assert!(matches!(GgufFile::open(&p), Err(Error::Io { .. })));
        std::fs::write(&p, b"GGUF").unwrap();
        let msg = GgufFile::open(&p).unwrap_err().to_string();
        assert!(msg.contains("too short") && msg.contains("none.gguf"), "{msg}");
        std::fs::write(&p, b"").unwrap();
        assert!(GgufFile::open(&p).unwrap_err().to_string().contains("too short"));
    }

    #[test]
    fn bad_magic_and_versions() {
        let mut b = header(0, 0);
        b[..4].copy_from_slice(b"GGML");
        assert_err(&b, "not a GGUF file");
        assert_err(&b[..10], "too short");

        let mut b = header(0, 0);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        let e = err_of(&b);
        assert!(matches!(&e, Error::Unsupported(m) if m.contains("version 1") && m.contains("mem.gguf")), "{e}");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(err_of(&b).to_string().contains("big-endian"));
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(err_of(&b).to_string().contains("version 7"));
        // Version 2 has the same layout as version 3.
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(open_bytes(&b).unwrap().version(), 2);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let data: Vec<u8> = (0..40).collect();
        let full = encode(
            &sample_metadata(),
            &[raw("q", &[32], GgmlType::Q4_0, data[..18].to_vec()), raw("w", &[1], GgmlType::F32, data[..4].to_vec())],
        )
        .unwrap();
        assert!(open_bytes(&full).is_ok());
        for len in 0..full.len() {
            let e = err_of(&full[..len]).to_string();
            assert!(
                e.contains("truncated")
                    || e.contains("too short")
                    || e.contains("past the end")
                    || e.contains("larger than"),
                "prefix of {len} bytes: {e}"
            );
        }
    }

    #[test]
    fn absurd_counts_and_lengths() {
        assert_err(&header(u64::MAX, 0), "tensor count 18446744073709551615");
        assert_err(&header(1 << 40, 0), "tensor count");
        assert_err(&header(0, u64::MAX / 2), "metadata count");

        // Key length larger than the file.
        let mut b = header(0, 1);
        b.extend_from_slice(&(u64::MAX - 3).to_le_bytes());
        b.extend_from_slice(&[0; 16]);
        assert_err(&b, "string length");

        // String value length larger than the file.
        let mut b = header(0, 1);
        put_str(&mut b, "k");
        b.extend_from_slice(&T_STR.to_le_bytes());
        b.extend_from_slice(&(1u64 << 50).to_le_bytes());
        assert_err(&b, "metadata `k`: string length 1125899906842624");

        // Array length larger than the file could hold.
        let mut b = header(0, 1);
        put_str(&mut b, "arr");
        b.extend_from_slice(&T_ARRAY.to_le_bytes());
        b.extend_from_slice(&T_U32.to_le_bytes());
        b.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        b.extend_from_slice(&[0; 64]);
        assert_err(&b, "metadata `arr`: array length");

        // An array of 1000 strings in 100 bytes.
        let mut b = header(0, 1);
        put_str(&mut b, "arr");
        b.extend_from_slice(&T_ARRAY.to_le_bytes());
        b.extend_from_slice(&T_STR.to_le_bytes());
        b.extend_from_slice(&1000u64.to_le_bytes());
        b.extend_from_slice(&[0; 100]);
        assert_err(&b, "array length 1000");
    }

    #[test]
    fn bad_values() {
        let kv = |ty: u32, payload: &[u8]| {
            let mut b = header(0, 1);
            put_str(&mut b, "k");
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(payload);
            b
        };
        assert_err(&kv(13, &[0; 8]), "unknown value type 13");
        assert_err(&kv(T_BOOL, &[2]), "bool value 2");
        let mut arr = vec![0xFF; 4];
        arr.extend_from_slice(&0u64.to_le_bytes());
        assert_err(&kv(T_ARRAY, &arr), "unknown array element type");
        // Arrays of arrays of ... nested 100 deep.
        let mut deep = Vec::new();
        for _ in 0..100 {
            deep.extend_from_slice(&T_ARRAY.to_le_bytes());
            deep.extend_from_slice(&1u64.to_le_bytes());
        }
        deep.extend_from_slice(&T_U8.to_le_bytes());
        deep.extend_from_slice(&0u64.to_le_bytes());
        assert_err(&kv(T_ARRAY, &deep), "nested deeper");
        // Duplicate keys.
        let mut b = header(0, 2);
        for _ in 0..2 {
            put_str(&mut b, "dup");
            b.extend_from_slice(&T_U8.to_le_bytes());
            b.push(1);
        }
        assert_err(&b, "duplicate metadata key `dup`");
        // Alignment that is not a power of two.
        for bad in [GgufValue::U32(0), GgufValue::U32(24), GgufValue::Str("32".into())] {
            let mut b = header(0, 1);
            put_str(&mut b, "general.alignment");
            b.extend_from_slice(&bad.type_id().to_le_bytes());
            put_value(&mut b, &bad).unwrap();
            assert_err(&b, "power of two");
        }
    }

    #[test]
    fn bad_tensor_tables() {
        let f32_id = GgmlType::F32.id();
        // Data past the end: offset beyond the file, and size beyond the file.
        assert_err(
            &with_tensors(&[("blk.0.attn_q.weight", &[4], f32_id, 1024)], 16),
            "tensor `blk.0.attn_q.weight` data [",
        );
        let e = err_of(&with_tensors(&[("big", &[1000], f32_id, 0)], 16)).to_string();
        assert!(e.contains("past the end of the file (size") && e.contains("`big`"), "{e}");
        // Offsets near u64::MAX do not overflow.
        assert_err(&with_tensors(&[("far", &[4], f32_id, u64::MAX - 31)], 16), "past the end");
        // Element count overflow.
        assert_err(&with_tensors(&[("ovf", &[1 << 40, 1 << 40], f32_id, 0)], 16), "element count overflows");
        assert_err(&with_tensors(&[("ovf", &[u64::MAX, 2], f32_id, 0)], 16), "overflows");
        // Too many dimensions.
        assert_err(&with_tensors(&[("d5", &[1, 1, 1, 1, 1], f32_id, 0)], 16), "5 dimensions");
        // Duplicate names.
        assert_err(&with_tensors(&[("t", &[4], f32_id, 0), ("t", &[4], f32_id, 32)], 64), "duplicate tensor name `t`");
        // Misaligned offset.
        assert_err(&with_tensors(&[("m", &[1], f32_id, 4)], 64), "not a multiple of the alignment");
        // The tensor table itself cut short.
        let mut b = header(1, 0);
        put_str(&mut b, "cut");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        assert_err(&b, "truncated: tensor `cut`");
    }

    #[test]
    fn unknown_and_unsupported_types_fail_only_when_read() {
        let b =
            with_tensors(&[("odd", &[8, 2], 99, 0), ("k4", &[256], GgmlType::Q4_K.id(), 0), ("ok", &[2], 0, 160)], 192);
        let g = open_bytes(&b).unwrap();
        let odd = g.tensor_info("odd").unwrap();
        assert_eq!(odd.ggml_type, GgmlType::Other(99));
        assert_eq!(odd.ggml_type.name(), "type 99");
        assert_eq!(odd.shape(), [2, 8]);
        assert_eq!(odd.n_bytes(), None);
        let e = g.tensor("odd").unwrap_err();
        assert!(matches!(&e, Error::Unsupported(m) if m.contains("`odd`") && m.contains("99")), "{e}");
        let e = g.tensor("k4").unwrap_err();
        assert!(matches!(&e, Error::Unsupported(m) if m.contains("`k4`") && m.contains("Q4_K")), "{e}");
        assert_eq!(g.tensor("ok").unwrap().to_f32(), [0.0, 0.0]);
        // Rows that are not whole blocks.
        let g = open_bytes(&with_tensors(&[("part", &[16], GgmlType::Q8_0.id(), 0)], 64)).unwrap();
        let e = g.tensor("part").unwrap_err().to_string();
        assert!(e.contains("`part`") && e.contains("not a multiple of the Q8_0 block size 32"), "{e}");
    }

    #[test]
    fn random_corruption_never_panics() {
        let data: Vec<u8> = (0..=255).collect();
        let good = encode(
            &sample_metadata(),
            &[
                raw("q", &[32, 2], GgmlType::Q4_1, data[..40].to_vec()),
                raw("w", &[3], GgmlType::F32, data[..12].to_vec()),
                raw("e", &[32], GgmlType::Q8_0, data[..34].to_vec()),
            ],
        )
        .unwrap();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = match next() % 3 {
                    0 => next() as u8,
                    1 => 0xFF,
                    _ => b[i] ^ (1 << (next() % 8)),
                };
            }
            if next() % 4 == 0 {
                b.truncate((next() % b.len() as u64) as usize);
            }
            if let Ok(g) = open_bytes(&b) {
                for t in g.tensors().to_vec() {
                    let _ = g.tensor(&t.name).map(|t| t.to_f32());
                }
            }
        }
    }
}
