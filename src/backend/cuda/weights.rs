//! Weights on the GPU: bf16 / f16 matrices, f32 vectors and tables.

use cudarc::driver::CudaSlice;

/// Device memory of a weight, in its storage type.
pub(super) enum WeightData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    F16(CudaSlice<u16>),
}

/// A weight on the GPU.
pub struct CudaWeight {
    pub(super) data: WeightData,
    pub shape: Vec<usize>,
    pub name: String,
}

impl CudaWeight {
    pub(super) fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub(super) fn dtype_name(&self) -> &'static str {
        match self.data {
            WeightData::F32(_) => "f32",
            WeightData::Bf16(_) => "bf16",
            WeightData::F16(_) => "f16",
        }
    }
}
