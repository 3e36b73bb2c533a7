//! Weights on the device: uploaded once, in the format they are stored in.
//!
//! Matrices (2-D and up) keep their dtype: f32 as f32, bf16 as bf16, f16 as f16 (or widened to
//! f32 on an adapter that cannot unpack f16 in shaders). 16-bit values are packed two to a u32
//! word, rows padded to an even length so each row starts on a word; shaders unpack them (see
//! the `w_load` helpers in `shaders/`). Vectors (norm weights, biases) are widened to f32: they
//! are tiny and read by ops that have no 16-bit path.
//!
//! A tensor larger than the adapter's largest storage binding (128 MiB on some adapters, less
//! than a big embedding table) is split by rows into chunks of separate buffers; `embed` and
//! `matmul` dispatch once per chunk.

use std::borrow::Cow;
use std::sync::Arc;

use super::context::{err, Ctx, Gbuf};
use crate::error::Result;
use crate::model::tensor::{DType, HostTensor};

/// How weight elements are stored on the device (the shaders' `W_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl WeightFormat {
    fn elem_bytes(self) -> usize {
        if self == WeightFormat::F32 {
            4
        } else {
            2
        }
    }
}

/// Rows `[row0, row0 + rows)` of a weight, in one buffer.
pub(crate) struct Chunk {
    pub buf: Gbuf,
    pub row0: usize,
    pub rows: usize,
}

/// A weight tensor on the device.
pub struct WgpuWeight {
    pub(crate) chunks: Vec<Chunk>,
    pub format: WeightFormat,
    pub shape: Vec<usize>,
    /// Leading dimension, and elements per row (the product of the others).
    pub rows: usize,
    pub cols: usize,
    /// Elements per stored row (`cols`, rounded up to even for 16-bit formats).
    pub stride: usize,
}

impl WgpuWeight {
    /// How many buffers the weight is split into (1 unless it exceeds one storage binding).
    pub fn chunks_len(&self) -> usize {
        self.chunks.len()
    }

    /// The weight as one buffer, for ops that take no chunked weights (norms, biases, RoPE tables).
    pub(crate) fn single(&self, what: &str) -> Result<&Gbuf> {
        match self.chunks.as_slice() {
            [c] => Ok(&c.buf),
            _ => Err(err(format!(
                "{what} ({:?}) is split into {} chunks by the storage binding limit; it must fit one binding",
                self.shape,
                self.chunks.len()
            ))),
        }
    }
}

/// Stored bytes of rows `[r0, r1)` in `format`, each row padded to `stride` elements.
fn chunk_bytes<'a>(
    t: &'a HostTensor,
    format: WeightFormat,
    cols: usize,
    stride: usize,
    r0: usize,
    r1: usize,
) -> Cow<'a, [u8]> {
    let src = t.bytes();
    let stored = t.dtype().size();
    let same = matches!(
        (t.dtype(), format),
        (DType::F32, WeightFormat::F32) | (DType::F16, WeightFormat::F16) | (DType::BF16, WeightFormat::Bf16)
    );
    if same && stride == cols {
        return Cow::Borrowed(&src[r0 * cols * stored..r1 * cols * stored]);
    }
    let eb = format.elem_bytes();
    let mut out = vec![0u8; (r1 - r0) * stride * eb];
    for (i, r) in (r0..r1).enumerate() {
        let row = &src[r * cols * stored..(r + 1) * cols * stored];
        let dst = &mut out[i * stride * eb..][..cols * eb];
        if same {
            dst.copy_from_slice(row);
        } else {
            // Only widening to f32 is ever needed (vectors, or f16 on an adapter without f16
            // unpacking).
            for (j, c) in row.chunks_exact(stored).enumerate() {
                let v = match t.dtype() {
                    DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                    DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                };
                dst[j * 4..j * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Cow::Owned(out)
}

pub(crate) fn upload(ctx: &Arc<Ctx>, t: &HostTensor) -> Result<WgpuWeight> {
    // Quantized blocks are widened to f32 here, one tensor at a time.
    let t = &*t.widened();
    let numel = t.numel();
    if t.bytes().len() != numel * t.dtype().size() {
        return Err(err(format!(
            "tensor {} has {} bytes for shape {:?} ({:?})",
            t.name,
            t.bytes().len(),
            t.shape,
            t.dtype()
        )));
    }
    let (rows, cols) = match t.shape.as_slice() {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    };
    let format = match t.dtype() {
        _ if t.shape.len() <= 1 => WeightFormat::F32,
        DType::F32 => WeightFormat::F32,
        DType::F16 if ctx.f16 => WeightFormat::F16,
        DType::F16 => WeightFormat::F32,
        DType::BF16 => WeightFormat::Bf16,
    };
    let stride = if format == WeightFormat::F32 { cols } else { cols.next_multiple_of(2) };
    let row_bytes = (stride * format.elem_bytes()) as u64;
    let max = ctx.max_binding.min(ctx.limits.max_buffer_size);
    let per_chunk = max.checked_div(row_bytes).map_or(rows.max(1), |n| n as usize);
    if per_chunk == 0 {
        return Err(err(format!(
            "one row of {} ({row_bytes} bytes) exceeds the adapter's max_storage_buffer_binding_size ({max})",
            t.name
        )));
    }
    let mut chunks = Vec::new();
    let mut r0 = 0;
    while r0 < rows || chunks.is_empty() {
        let r1 = (r0 + per_chunk).min(rows);
        let bytes = chunk_bytes(t, format, cols, stride, r0, r1);
        let buf = ctx.storage_init(&bytes, &t.name)?;
        chunks.push(Chunk { buf, row0: r0, rows: r1 - r0 });
        r0 = r1;
    }
    Ok(WgpuWeight { chunks, format, shape: t.shape.clone(), rows, cols, stride })
}
