//! The narrow Backend trait: the ops the forward pass is written over. Every backend
//! (CPU reference, CUDA, wgpu) implements exactly these, and is checked against the CPU one.

pub mod check;
pub mod cpu;
pub mod cuda;
pub mod wgpu;

use crate::error::{Error, Result};
use crate::model::tensor::HostTensor;

/// The backend `--backend auto` (and Python's `backend="auto"`) picks.
pub enum Auto {
    Cuda(cuda::CudaBackend),
    Wgpu(wgpu::WgpuBackend),
    Cpu,
}

/// CUDA when usable, then a wgpu GPU adapter (not a CPU one such as lavapipe), then the CPU; with
/// the line that says which and why (`cuda (NAME, sm_90)`, `cpu (no usable CUDA or wgpu GPU; ...)`).
pub fn auto() -> (Auto, String) {
    match cuda::CudaBackend::new(0) {
        Ok(b) => {
            let line = format!("cuda ({}, {})", b.device_name(), b.arch());
            (Auto::Cuda(b), line)
        }
        Err(e) => match wgpu::WgpuBackend::new_gpu() {
            Ok(b) => {
                let line = format!("wgpu {} (cuda not usable: {e})", b.describe());
                (Auto::Wgpu(b), line)
            }
            Err(_) => (Auto::Cpu, "cpu (no usable CUDA or wgpu GPU; --backend cuda|wgpu says why)".into()),
        },
    }
}

/// Where one token of a batch lives: its sequence's KV-cache slot and its position in that sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPos {
    pub slot: u32,
    pub pos: u32,
}

/// Attention geometry of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's KV cache, paged: `k`, `v` are `[pages][page_size][n_kv_heads][head_dim]`; a
/// [`PageTable`] says which page holds which positions of which slot.
pub struct KvLayer<B: Backend + ?Sized> {
    pub k: B::Buf,
    pub v: B::Buf,
}

/// Page entry of a [`PageTable`] that no page backs.
pub const NO_PAGE: u32 = u32::MAX;

/// The KV cache's page table for one forward call: position `pos` of slot `s` lives in page
/// `table[s * width + pos / page_size]`, row `pos % page_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    pub page_size: usize,
    /// Pages per slot (the longest sequence is `width * page_size` positions).
    pub width: usize,
    /// `[slots][width]`, [`NO_PAGE`] where unassigned.
    pub table: Vec<u32>,
}

impl PageTable {
    /// Every slot owns `width` consecutive pages: slot `s` is pages `s * width ..`.
    pub fn contiguous(slots: usize, width: usize, page_size: usize) -> Self {
        PageTable { page_size, width, table: (0..(slots * width) as u32).collect() }
    }

    /// The cache row (page · page_size + offset) of position `pos` of `slot`; the table must hold it.
    pub fn row(&self, slot: usize, pos: usize) -> usize {
        self.table[slot * self.width + pos / self.page_size] as usize * self.page_size + pos % self.page_size
    }

    /// Check that every position attention reads for `tokens` (0..=pos of each token's slot) has a
    /// page; returns the number of pages the cache must have (largest page used + 1).
    pub fn check(&self, tokens: &[TokenPos]) -> Result<usize> {
        if self.page_size == 0 || self.width == 0 || !self.table.len().is_multiple_of(self.width) {
            return Err(Error::Invalid(format!(
                "page table of {} entries with page size {} and width {} is malformed",
                self.table.len(),
                self.page_size,
                self.width
            )));
        }
        let slots = self.table.len() / self.width;
        let mut last = vec![None::<usize>; slots];
        for tp in tokens {
            let (slot, pos) = (tp.slot as usize, tp.pos as usize);
            if slot >= slots || pos >= self.width * self.page_size {
                return Err(Error::Invalid(format!(
                    "token at slot {slot} position {pos} is outside the KV cache ({slots} slots of {} positions)",
                    self.width * self.page_size
                )));
            }
            let p = pos / self.page_size;
            last[slot] = Some(last[slot].map_or(p, |q: usize| q.max(p)));
        }
        let mut pages = 0;
        for (slot, l) in last.iter().enumerate() {
            for (i, &e) in self.table[slot * self.width..].iter().take(l.map_or(0, |l| l + 1)).enumerate() {
                if e == NO_PAGE {
                    return Err(Error::Invalid(format!(
                        "slot {slot} has no KV page for positions from {}",
                        i * self.page_size
                    )));
                }
                pages = pages.max(e as usize + 1);
            }
        }
        Ok(pages)
    }
}

/// Token flag: the token is part of a prompt (prefill).
pub const TOKEN_PROMPT: u32 = 1;
/// Token flag: the token's residual produces a response token — the last prompt token, and
/// every response token (ops with [`POS_LAST`] apply there).
pub const TOKEN_LAST: u32 = 2;
/// No condition / no capture.
pub const NONE: u32 = u32::MAX;

/// One steering op at one residual index, for one sequence of the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct OpDesc {
    /// Index of the sequence (in the call) whose tokens it touches.
    pub seq: u32,
    /// 0 add, 1 ablate, 2 clamp.
    pub kind: u32,
    /// Row of the plan's vector tables.
    pub vec: u32,
    /// 0 all, 1 prompt tokens, 2 last position of the call.
    pub positions: u32,
    pub coeff: f32,
    /// Projection column the condition reads, or NONE.
    pub cond_col: u32,
    /// 0: apply when projection > threshold; 1: when <.
    pub cond_cmp: u32,
    pub threshold: f32,
}

pub const OP_ADD: u32 = 0;
pub const OP_ABLATE: u32 = 1;
pub const OP_CLAMP: u32 = 2;
pub const POS_ALL: u32 = 0;
pub const POS_PROMPT: u32 = 1;
/// Positions flagged [`TOKEN_LAST`] (`positions=response`).
pub const POS_LAST: u32 = 2;

/// A projection column: `proj[t, col] = h · units[vec]` at one residual index.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ProbeDesc {
    pub vec: u32,
    pub col: u32,
}

/// Flat description of a forward call's steering, probes and captures, built by the engine and
/// uploaded once per call. Grouped by residual index `l` in `0..=n_layers`:
/// `ops[layer_ops[l]..layer_ops[l+1]]`, `probes[layer_probes[l]..layer_probes[l+1]]`.
///
/// At residual index `l`, for each token: this layer's probes are projected (so same-layer
/// conditions see the pre-steering value), the token's ops are applied in order, the probes
/// are projected again if anything changed, and the residual is added to its capture sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResidualPlan {
    pub hidden: usize,
    pub n_layers: usize,
    /// `[n_vectors, hidden]` raw vectors and their unit vectors.
    pub vectors: Vec<f32>,
    pub units: Vec<f32>,
    pub token_seq: Vec<u32>,
    pub token_flags: Vec<u32>,
    /// Capture slot per token, or NONE.
    pub token_capture: Vec<u32>,
    pub ops: Vec<OpDesc>,
    pub layer_ops: Vec<u32>,
    pub probes: Vec<ProbeDesc>,
    pub layer_probes: Vec<u32>,
    /// Projection columns (`proj` is `[t, n_cols]`).
    pub n_cols: usize,
    /// Capture slots (`capture` is `[n_captures, n_layers + 1, hidden]`).
    pub n_captures: usize,
}

impl ResidualPlan {
    pub fn ops_at(&self, l: usize) -> &[OpDesc] {
        &self.ops[self.layer_ops[l] as usize..self.layer_ops[l + 1] as usize]
    }
    pub fn probes_at(&self, l: usize) -> &[ProbeDesc] {
        &self.probes[self.layer_probes[l] as usize..self.layer_probes[l + 1] as usize]
    }
    pub fn vector(&self, v: u32) -> &[f32] {
        &self.vectors[v as usize * self.hidden..(v as usize + 1) * self.hidden]
    }
    pub fn unit(&self, v: u32) -> &[f32] {
        &self.units[v as usize * self.hidden..(v as usize + 1) * self.hidden]
    }
}

/// What the fused op wrote while running a plan: the receipts of its steering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanOutputs {
    /// `[t, n_cols]` projections.
    pub proj: Vec<f32>,
    /// `[n_captures, n_layers + 1, hidden]` residual sums.
    pub capture: Vec<f32>,
    /// `[n_ops][2]`, counted by the kernel itself: tokens of the op's sequence that its positions
    /// rule selected (`[o][0]`), and of those, the tokens it was applied to — its condition held,
    /// or it has none (`[o][1]`).
    pub counts: Vec<u32>,
}

/// The ops of the transformer forward pass. `t` is the number of tokens in the batch
/// (all sequences concatenated); activations are row-major `[t, width]` f32 buffers.
pub trait Backend: Send + Sync {
    /// Activation buffer (f32).
    type Buf: Send + Sync;
    /// A weight tensor in the backend's own format.
    type Weight: Send + Sync;
    /// A batch's per-token layout, uploaded once per forward call.
    type Layout;
    /// A forward call's [`ResidualPlan`] on the device, with its projection and capture outputs.
    type Plan: Send;

    fn name(&self) -> &'static str;

    fn upload(&self, t: &HostTensor) -> Result<Self::Weight>;
    /// A zeroed f32 buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn write(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    fn read(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>>;
    /// The batch's tokens and the KV page table their attention reads (checked with
    /// [`PageTable::check`]).
    fn layout(&self, tokens: &[TokenPos], pages: &PageTable) -> Result<Self::Layout>;
    /// Upload a plan; its outputs start at zero.
    fn plan(&self, plan: &ResidualPlan) -> Result<Self::Plan>;
    /// Download a plan's outputs: projections, capture sums and op counts.
    fn plan_outputs(&self, plan: &Self::Plan) -> Result<PlanOutputs>;

    /// `out[i] = table[ids[i]]` (rows of `width`).
    fn embed(&self, table: &Self::Weight, ids: &[u32], width: usize, out: &mut Self::Buf) -> Result<()>;

    /// The fused residual boundary, one pass over `h`: `h += delta` (when given); at a residual
    /// index (`steer = Some((plan, l))`) the plan's probes, steering ops and captures for `l`;
    /// then `x = rmsnorm(h) · norm`.
    #[allow(clippy::too_many_arguments)]
    fn residual_steer_norm(
        &self,
        h: &mut Self::Buf,
        delta: Option<&Self::Buf>,
        steer: Option<(&mut Self::Plan, usize)>,
        norm: &Self::Weight,
        eps: f32,
        t: usize,
        width: usize,
        x: &mut Self::Buf,
    ) -> Result<()>;

    /// `out[i, n] = Σ_k x[i, k] · w[n, k] + bias[n]` for `w` of shape `[n_out, k]`.
    fn matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        t: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// Rotate `x` (`[t, heads, head_dim]`) in place by each token's position; `cos_sin` is an
    /// f32 buffer `[positions, head_dim/2, 2]` (cos, sin) in rotate-half convention (a table,
    /// not a weight: it stays exact f32 on every backend).
    fn rope(
        &self,
        x: &mut Self::Buf,
        cos_sin: &Self::Buf,
        layout: &Self::Layout,
        t: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Store this batch's `k`, `v` (`[t, n_kv_heads, head_dim]`) into `cache` at each token's
    /// (slot, pos) through the layout's page table, then causal attention of each token over its
    /// own slot's positions `0..=pos`.
    /// `out` is `[t, n_heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        cache: &mut KvLayer<Self>,
        layout: &Self::Layout,
        t: usize,
        shape: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `out = silu(gate) · up`, elementwise over `n` values.
    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;

    /// `out[i] = x[rows[i]]` (rows of `width`).
    fn gather_rows(&self, x: &Self::Buf, rows: &[u32], width: usize, out: &mut Self::Buf) -> Result<()>;
}
