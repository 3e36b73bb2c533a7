//! Host-side tensors as read from model files: memory-mapped where the file's dtype is kept,
//! owned where the loader had to convert (GGUF quantized blocks, un-permuted rows).

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

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

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Mapped { dtype, .. } => *dtype,
            Storage::F32(_) => DType::F32,
        }
    }

    /// Raw little-endian bytes of a mapped tensor, or of the owned f32 data.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, offset, len, .. } => &map[*offset..*offset + *len],
            Storage::F32(v) => bytemuck::cast_slice(v.as_slice()),
        }
    }

    /// Widen to f32 (copies).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype() {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }
}
