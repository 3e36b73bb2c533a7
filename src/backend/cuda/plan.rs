//! A forward call's [`ResidualPlan`] on the device. The buffers come from a pool owned by the
//! backend and go back to it when the plan is dropped; they only grow (to the next power of two),
//! so from one call to the next the kernels see the same pointers and only the contents change --
//! what a captured CUDA graph needs when steering changes between steps.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::libs::err;
use crate::backend::ResidualPlan;
use crate::error::Result;

/// A device buffer that only grows.
pub(super) struct Grow<T> {
    pub buf: CudaSlice<T>,
}

impl<T: DeviceRepr + ValidAsZeroBits> Grow<T> {
    fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(Grow { buf: stream.alloc_zeros::<T>(1).map_err(|e| err(format!("allocating a plan buffer: {e}")))? })
    }

    /// Make room for `n` elements (keeping the pointer when there is room already).
    fn reserve(&mut self, stream: &Arc<CudaStream>, n: usize) -> Result<()> {
        if self.buf.len() < n {
            self.buf = stream
                .alloc_zeros::<T>(n.next_power_of_two())
                .map_err(|e| err(format!("allocating a plan buffer of {n} elements: {e}")))?;
        }
        Ok(())
    }

    /// Copy `data` to the front of the buffer.
    fn fill(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> Result<()> {
        self.reserve(stream, data.len())?;
        if !data.is_empty() {
            let mut dst = self.buf.slice_mut(..data.len());
            stream.memcpy_htod(data, &mut dst).map_err(|e| err(format!("uploading a plan: {e}")))?;
        }
        Ok(())
    }

    /// Zero the first `n` elements.
    fn zero(&mut self, stream: &Arc<CudaStream>, n: usize) -> Result<()> {
        self.reserve(stream, n)?;
        if n > 0 {
            let mut dst = self.buf.slice_mut(..n);
            stream.memset_zeros(&mut dst).map_err(|e| err(format!("clearing plan outputs: {e}")))?;
        }
        Ok(())
    }
}

/// The fixed device buffers of a plan.
pub(super) struct PlanBufs {
    pub token_seq: Grow<u32>,
    pub token_flags: Grow<u32>,
    pub token_capture: Grow<u32>,
    pub token_proj: Grow<u32>,
    /// [`crate::backend::OpDesc`] as 8 words each.
    pub ops: Grow<u32>,
    pub op_ranges: Grow<u32>,
    /// [`crate::backend::ProbeDesc`] as 3 words each.
    pub probes: Grow<u32>,
    pub probe_ranges: Grow<u32>,
    pub proj: Grow<f32>,
    pub capture: Grow<f32>,
    /// `[n_ops][2]` op counts (the kernel's receipts).
    pub counts: Grow<u32>,
}

impl PlanBufs {
    fn new(s: &Arc<CudaStream>) -> Result<Self> {
        Ok(PlanBufs {
            token_seq: Grow::new(s)?,
            token_flags: Grow::new(s)?,
            token_capture: Grow::new(s)?,
            token_proj: Grow::new(s)?,
            ops: Grow::new(s)?,
            op_ranges: Grow::new(s)?,
            probes: Grow::new(s)?,
            probe_ranges: Grow::new(s)?,
            proj: Grow::new(s)?,
            capture: Grow::new(s)?,
            counts: Grow::new(s)?,
        })
    }
}

pub(super) type Pool = Arc<Mutex<Option<PlanBufs>>>;

/// A plan on the device with its outputs (projections, capture sums).
pub struct CudaPlan {
    pub(super) bufs: Option<PlanBufs>,
    pool: Pool,
    pub(super) t: usize,
    pub(super) hidden: usize,
    pub(super) n_layers: usize,
    pub(super) n_vectors: usize,
    pub(super) n_seqs: usize,
    pub(super) proj_len: usize,
    pub(super) capture_len: usize,
    pub(super) counts_len: usize,
}

impl CudaPlan {
    pub(super) fn bufs(&self) -> &PlanBufs {
        self.bufs.as_ref().expect("plan buffers are held until drop")
    }
}

impl Drop for CudaPlan {
    fn drop(&mut self) {
        if let Some(b) = self.bufs.take() {
            let mut slot = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(b);
            }
        }
    }
}

/// Upload `p` into the pool's buffers (allocating them the first time).
pub(super) fn upload(stream: &Arc<CudaStream>, pool: &Pool, p: &ResidualPlan) -> Result<CudaPlan> {
    p.validate()?;
    let taken = pool.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut b = match taken {
        Some(b) => b,
        None => PlanBufs::new(stream)?,
    };
    let t = p.token_seq.len();
    let proj_len = p.proj_len;
    let capture_len = p.n_captures * (p.n_layers + 1) * p.hidden;
    b.token_seq.fill(stream, &p.token_seq)?;
    b.token_flags.fill(stream, &p.token_flags)?;
    b.token_capture.fill(stream, &p.token_capture)?;
    b.token_proj.fill(stream, &p.token_proj)?;
    b.ops.fill(stream, bytemuck::cast_slice(&p.ops))?;
    b.op_ranges.fill(stream, &p.op_ranges)?;
    b.probes.fill(stream, bytemuck::cast_slice(&p.probes))?;
    b.probe_ranges.fill(stream, &p.probe_ranges)?;
    b.proj.zero(stream, proj_len)?;
    b.capture.zero(stream, capture_len)?;
    b.counts.zero(stream, 2 * p.ops.len())?;
    Ok(CudaPlan {
        bufs: Some(b),
        pool: pool.clone(),
        t,
        hidden: p.hidden,
        n_layers: p.n_layers,
        n_vectors: p.n_vectors,
        n_seqs: p.n_seqs(),
        proj_len,
        capture_len,
        counts_len: 2 * p.ops.len(),
    })
}

/// The vector table on the device: `[rows, hidden]` raw vectors and their unit vectors. Its
/// pointers change only when the engine grows it (then a captured graph is captured again).
pub struct CudaVectors {
    pub(super) raw: CudaSlice<f32>,
    pub(super) units: CudaSlice<f32>,
    pub(super) rows: usize,
    pub(super) hidden: usize,
}

pub(super) fn vectors(stream: &Arc<CudaStream>, rows: usize, hidden: usize) -> Result<CudaVectors> {
    let n = (rows * hidden).max(1);
    let alloc = || {
        stream.alloc_zeros::<f32>(n).map_err(|e| err(format!("allocating a vector table of {rows} × {hidden}: {e}")))
    };
    Ok(CudaVectors { raw: alloc()?, units: alloc()?, rows, hidden })
}

pub(super) fn write_vectors(
    stream: &Arc<CudaStream>,
    t: &mut CudaVectors,
    row: usize,
    raw: &[f32],
    units: &[f32],
) -> Result<()> {
    crate::backend::check_vector_write(t.rows, t.hidden, row, raw, units)?;
    let h = t.hidden;
    if raw.is_empty() {
        return Ok(());
    }
    let range = row * h..row * h + raw.len();
    stream
        .memcpy_htod(raw, &mut t.raw.slice_mut(range.clone()))
        .and_then(|_| stream.memcpy_htod(units, &mut t.units.slice_mut(range)))
        .map_err(|e| err(format!("uploading steering vectors: {e}")))
}
