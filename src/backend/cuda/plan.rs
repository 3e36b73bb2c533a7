//! A forward call's [`ResidualPlan`] on the device. The buffers come from a pool owned by the
//! backend and go back to it when the plan is dropped; they only grow (to the next power of two),
//! so from one call to the next the kernels see the same pointers and only the contents change --
//! what a captured CUDA graph needs when steering changes between steps.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::libs::err;
use crate::backend::{ResidualPlan, NONE, OP_ABLATE, OP_ADD, OP_CLAMP};
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
    pub vectors: Grow<f32>,
    pub units: Grow<f32>,
    pub token_seq: Grow<u32>,
    pub token_flags: Grow<u32>,
    pub token_capture: Grow<u32>,
    /// [`crate::backend::OpDesc`] as 8 words each.
    pub ops: Grow<u32>,
    pub layer_ops: Grow<u32>,
    /// [`crate::backend::ProbeDesc`] as 2 words each.
    pub probes: Grow<u32>,
    pub layer_probes: Grow<u32>,
    pub proj: Grow<f32>,
    pub capture: Grow<f32>,
    /// `[n_ops][2]` op counts (the kernel's receipts).
    pub counts: Grow<u32>,
}

impl PlanBufs {
    fn new(s: &Arc<CudaStream>) -> Result<Self> {
        Ok(PlanBufs {
            vectors: Grow::new(s)?,
            units: Grow::new(s)?,
            token_seq: Grow::new(s)?,
            token_flags: Grow::new(s)?,
            token_capture: Grow::new(s)?,
            ops: Grow::new(s)?,
            layer_ops: Grow::new(s)?,
            probes: Grow::new(s)?,
            layer_probes: Grow::new(s)?,
            proj: Grow::new(s)?,
            capture: Grow::new(s)?,
            counts: Grow::new(s)?,
        })
    }
}

pub(super) type Pool = Arc<Mutex<Option<PlanBufs>>>;

/// A plan on the device with its outputs (projections `[t, n_cols]`, capture sums).
pub struct CudaPlan {
    pub(super) bufs: Option<PlanBufs>,
    pool: Pool,
    pub(super) t: usize,
    pub(super) hidden: usize,
    pub(super) n_layers: usize,
    pub(super) n_cols: usize,
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

/// Check that every index in the plan is in range: the kernel trusts them.
pub fn validate(p: &ResidualPlan) -> Result<()> {
    let bad = |m: String| Err(err(format!("invalid residual plan: {m}")));
    let h = p.hidden;
    if h == 0 || p.vectors.len() % h != 0 || p.units.len() != p.vectors.len() {
        return bad(format!("vectors ({}) and units ({}) are not [n, {h}]", p.vectors.len(), p.units.len()));
    }
    let nv = (p.vectors.len() / h) as u32;
    let t = p.token_seq.len();
    if p.token_flags.len() != t || p.token_capture.len() != t {
        return bad(format!("token arrays differ in length ({t}, {}, {})", p.token_flags.len(), p.token_capture.len()));
    }
    let offsets_ok = |o: &[u32], n: usize| {
        o.len() == p.n_layers + 2 && o.windows(2).all(|w| w[0] <= w[1]) && o.last().is_some_and(|&x| x as usize == n)
    };
    if !offsets_ok(&p.layer_ops, p.ops.len()) || !offsets_ok(&p.layer_probes, p.probes.len()) {
        return bad(format!(
            "layer offsets are not {} ascending offsets ending at the op/probe counts",
            p.n_layers + 2
        ));
    }
    for (i, op) in p.ops.iter().enumerate() {
        if op.vec >= nv || ![OP_ADD, OP_ABLATE, OP_CLAMP].contains(&op.kind) {
            return bad(format!("op {i}: vector {} of {nv} or kind {}", op.vec, op.kind));
        }
        if op.cond_col != NONE && op.cond_col as usize >= p.n_cols {
            return bad(format!("op {i}: condition column {} of {}", op.cond_col, p.n_cols));
        }
    }
    for (i, pr) in p.probes.iter().enumerate() {
        if pr.vec >= nv || pr.col as usize >= p.n_cols {
            return bad(format!("probe {i}: vector {} of {nv}, column {} of {}", pr.vec, pr.col, p.n_cols));
        }
    }
    if let Some(c) = p.token_capture.iter().find(|&&c| c != NONE && c as usize >= p.n_captures) {
        return bad(format!("capture slot {c} of {}", p.n_captures));
    }
    Ok(())
}

/// Upload `p` into the pool's buffers (allocating them the first time).
pub(super) fn upload(stream: &Arc<CudaStream>, pool: &Pool, p: &ResidualPlan) -> Result<CudaPlan> {
    validate(p)?;
    let taken = pool.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut b = match taken {
        Some(b) => b,
        None => PlanBufs::new(stream)?,
    };
    let t = p.token_seq.len();
    let proj_len = t * p.n_cols;
    let capture_len = p.n_captures * (p.n_layers + 1) * p.hidden;
    b.vectors.fill(stream, &p.vectors)?;
    b.units.fill(stream, &p.units)?;
    b.token_seq.fill(stream, &p.token_seq)?;
    b.token_flags.fill(stream, &p.token_flags)?;
    b.token_capture.fill(stream, &p.token_capture)?;
    b.ops.fill(stream, bytemuck::cast_slice(&p.ops))?;
    b.layer_ops.fill(stream, &p.layer_ops)?;
    b.probes.fill(stream, bytemuck::cast_slice(&p.probes))?;
    b.layer_probes.fill(stream, &p.layer_probes)?;
    b.proj.zero(stream, proj_len)?;
    b.capture.zero(stream, capture_len)?;
    b.counts.zero(stream, 2 * p.ops.len())?;
    Ok(CudaPlan {
        bufs: Some(b),
        pool: pool.clone(),
        t,
        hidden: p.hidden,
        n_layers: p.n_layers,
        n_cols: p.n_cols,
        proj_len,
        capture_len,
        counts_len: 2 * p.ops.len(),
    })
}
