//! Host-side tensors as read from model files: memory-mapped where the file's dtype is kept
//! (f32, f16, bf16 and ggml's quantized blocks alike), owned where the loader had to reorder
//! rows or convert.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::model::gguf_types::GgmlType;

/// Element type of a stored (non-quantized) tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Where a tensor's bytes live.
#[derive(Clone)]
pub enum Storage {
    /// `len` bytes at `offset` of a shared memory map, little-endian `dtype` elements.
    Mapped { map: Arc<Mmap>, offset: usize, len: usize, dtype: DType },
    /// Converted at load time.
    F32(Arc<Vec<f32>>),
    /// ggml blocks of a quantized type (Q4_1, Q4_K, ...), exactly as stored: a range of the
    /// file's map, or owned bytes when the loader reordered rows. Read with
    /// [`HostTensor::to_f32`] (dequantized) or [`HostTensor::quantized`] (packed).
    Quant { bytes: Bytes, ty: GgmlType },
}

/// Bytes shared by tensors: a range of a memory map, or owned.
#[derive(Clone)]
pub enum Bytes {
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    Owned(Arc<Vec<u8>>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Bytes::Owned(v) => v,
        }
    }
}

/// A weight tensor, row-major, `shape` outermost first (PyTorch order).
#[derive(Clone)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor({}, {:?}, {:?})", self.name, self.shape, self.dtype())
    }
}

impl HostTensor {
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { name: name.into(), shape, storage: Storage::F32(Arc::new(data)) }
    }

    /// A quantized tensor kept packed, checked against its type's block layout (so
    /// [`Self::to_f32`] cannot fail later): rows (the last dimension) are whole blocks.
    pub fn quant(name: impl Into<String>, shape: Vec<usize>, ty: GgmlType, bytes: Bytes) -> crate::Result<Self> {
        let name = name.into();
        let (block, size) = match ty.block_layout() {
            Some((b, s)) if ty.is_readable() => (b as usize, s as usize),
            _ => return Err(crate::Error::Unsupported(format!("tensor `{name}`: ggml type {ty} cannot be read"))),
        };
        let cols = shape.last().copied().unwrap_or(1);
        let n: usize = shape.iter().product();
        if cols % block != 0 || bytes.len() != n / block * size {
            return Err(crate::Error::Invalid(format!(
                "tensor `{name}` {shape:?} of {ty}: rows of {cols} are not whole blocks of {block}, or its {} bytes are not {} blocks",
                bytes.len(),
                n / block
            )));
        }
        Ok(HostTensor { name, shape, storage: Storage::Quant { bytes, ty } })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element type of a plain tensor; a quantized one reads as f32, the type [`Self::to_f32`]
    /// and [`Self::widened`] give it (its packed bytes are [`Self::quantized`]).
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Mapped { dtype, .. } => *dtype,
            Storage::F32(_) | Storage::Quant { .. } => DType::F32,
        }
    }

    /// The ggml type and packed blocks of a quantized tensor.
    pub fn quantized(&self) -> Option<(GgmlType, &[u8])> {
        match &self.storage {
            Storage::Quant { bytes, ty } => Some((*ty, bytes)),
            _ => None,
        }
    }

    /// This tensor with quantized blocks widened to f32 (a copy); plain tensors are borrowed.
    /// For consumers that take only f32/f16/bf16 (the GPU uploads, tensor edits).
    pub fn widened(&self) -> std::borrow::Cow<'_, HostTensor> {
        match &self.storage {
            Storage::Quant { .. } => {
                std::borrow::Cow::Owned(HostTensor::from_f32(self.name.clone(), self.shape.clone(), self.to_f32()))
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    /// Raw little-endian bytes: of a mapped tensor, of the owned f32 data, or the packed blocks
    /// of a quantized tensor (use [`Self::widened`] first where elements of [`Self::dtype`] are
    /// expected).
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, offset, len, .. } => &map[*offset..*offset + *len],
            Storage::F32(v) => bytemuck::cast_slice(v.as_slice()),
            Storage::Quant { bytes, .. } => bytes,
        }
    }

    /// Widen to f32 (copies; dequantizes quantized blocks).
    pub fn to_f32(&self) -> Vec<f32> {
        if let Storage::Quant { bytes, ty } = &self.storage {
            return crate::model::gguf_quant::dequantize(*ty, bytes, self.numel())
                .expect("quantized tensors are checked against their type's block layout when read");
        }
        let b = self.bytes();
        match self.dtype() {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }
}
