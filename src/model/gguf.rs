//! GGUF reader (versions 2 and 3); the F32 writer ([`write_gguf`], in `gguf_write.rs`) and the
//! dequantizer ([`dequantize`], in `gguf_quant.rs`) are re-exported here.
//!
//! The file is memory-mapped once; F32/F16/BF16 tensors are handed out zero-copy as
//! [`Storage::Mapped`], block-quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants) as
//! [`Storage::Quant`], packed as stored; [`HostTensor::to_f32`] dequantizes them exactly as ggml
//! does. Parsing never trusts a count or a length from the file: each one is
//! checked against the bytes that are left before anything is allocated, so a damaged or hostile
//! file gives an [`Error`] that names the file and the problem, never a panic or a huge allocation.
//!
//! ```no_run
//! use persona::model::gguf::GgufFile;
//! let g = GgufFile::open(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! assert_eq!(g.get_str("general.architecture"), Some("llama"));
//! let emb = g.tensor("token_embd.weight")?.to_f32(); // [vocab × hidden] values, dequantized
//! # Ok::<(), persona::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::model::gguf_types::{
    T_ARRAY, T_BOOL, T_F32, T_F64, T_I16, T_I32, T_I64, T_I8, T_STR, T_U16, T_U32, T_U64, T_U8,
};
use crate::model::tensor::{Bytes, DType, HostTensor, Storage};

#[cfg(target_arch = "x86_64")]
pub(crate) use crate::model::gguf_quant::k_scales_mins;
pub use crate::model::gguf_quant::{decode_into, dequantize, dot_rows, dot_rows_max, random_blocks};
pub(crate) use crate::model::gguf_quant::{half_at, scale_min_k4};
pub use crate::model::gguf_types::{GgmlType, GgufTensorInfo, GgufValue};
pub use crate::model::gguf_write::write_gguf;

pub(super) const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub(super) const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (no real file nests more than twice).
const MAX_ARRAY_DEPTH: usize = 8;

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

    /// Parse an in-memory GGUF image (copied into an anonymous map, so tensors are handed out
    /// exactly as from [`Self::open`]); `path` names it in errors and [`Self::path`].
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
        if bytes.len() < HEADER_LEN {
            return Err(too_short(path, bytes.len() as u64));
        }
        let mut m = memmap2::MmapMut::map_anon(bytes.len()).map_err(|e| Error::io(path, e))?;
        m.copy_from_slice(bytes);
        let map = m.make_read_only().map_err(|e| Error::io(path, e))?;
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

    /// Read a tensor zero-copy from the map: F32/F16/BF16 as [`Storage::Mapped`], quantized blocks as
    /// [`Storage::Quant`] (widen with [`HostTensor::to_f32`]).
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
        if info.ggml_type.is_readable() {
            // Kept packed (data_range checked whole blocks per row): the CPU backend multiplies
            // the blocks as stored; other consumers widen (`HostTensor::widened`).
            let bytes = Bytes::Mapped { map: self.map.clone(), offset: start, len: end - start };
            return HostTensor::quant(info.name.clone(), shape, info.ggml_type, bytes);
        }
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

#[cfg(test)]
pub(super) mod tests {
    use half::f16;

    use super::*;
    use crate::model::gguf_write::{encode, put_str, put_value, RawTensor};

    /// Open an in-memory GGUF image named `mem.gguf`.
    pub(in crate::model) fn open_bytes(bytes: &[u8]) -> Result<GgufFile> {
        GgufFile::from_bytes(Path::new("mem.gguf"), bytes)
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

    pub(in crate::model) fn raw<'a>(name: &'a str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> RawTensor<'a> {
        RawTensor { name, dims: dims.to_vec(), ggml_type: ty.id(), data }
    }

    pub(in crate::model) fn f16b(x: f32) -> [u8; 2] {
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
        let b = with_tensors(
            &[
                ("odd", &[8, 2], 99, 0),
                ("iq2", &[256], GgmlType::IQ2_XXS.id(), 0),
                ("ok", &[2], 0, 160),
                ("k4", &[256], GgmlType::Q4_K.id(), 0),
            ],
            192,
        );
        let g = open_bytes(&b).unwrap();
        let odd = g.tensor_info("odd").unwrap();
        assert_eq!(odd.ggml_type, GgmlType::Other(99));
        assert_eq!(odd.ggml_type.name(), "type 99");
        assert_eq!(odd.shape(), [2, 8]);
        assert_eq!(odd.n_bytes(), None);
        let e = g.tensor("odd").unwrap_err();
        assert!(matches!(&e, Error::Unsupported(m) if m.contains("`odd`") && m.contains("99")), "{e}");
        let e = g.tensor("iq2").unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("`iq2`") && m.contains("IQ2_XXS") && m.contains("Q6_K")),
            "{e}"
        );
        assert_eq!(g.tensor("ok").unwrap().to_f32(), [0.0, 0.0]);
        // K-quants read (all-zero bytes: d = 0, every element 0).
        assert_eq!(g.tensor("k4").unwrap().to_f32(), vec![0.0; 256]);
        // Rows that are not whole blocks.
        let g = open_bytes(&with_tensors(&[("part", &[16], GgmlType::Q8_0.id(), 0)], 64)).unwrap();
        let e = g.tensor("part").unwrap_err().to_string();
        assert!(e.contains("`part`") && e.contains("not a multiple of the Q8_0 block size 32"), "{e}");
        let g = open_bytes(&with_tensors(&[("kpart", &[128, 2], GgmlType::Q6_K.id(), 0)], 448)).unwrap();
        let e = g.tensor("kpart").unwrap_err().to_string();
        assert!(
            e.contains("`kpart`") && e.contains("128 elements per row, not a multiple of the Q6_K block size 256"),
            "{e}"
        );
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
