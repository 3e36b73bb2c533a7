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
    /// Row of the vector table.
    pub vec: u32,
    /// 0 all, 1 prompt tokens, 2 last position of the call.
    pub positions: u32,
    pub coeff: f32,
    /// Column of the sequence's projection row the condition reads, or NONE.
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

/// A projection column of one sequence: `proj[token_proj[i] + col] = h_i · units[vec]` at one
/// residual index, for the tokens `i` of sequence `seq` only.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ProbeDesc {
    /// Index of the sequence (in the call) whose tokens it projects.
    pub seq: u32,
    /// Row of the vector table.
    pub vec: u32,
    /// Column in the sequence's own projection row.
    pub col: u32,
}

/// Flat description of a forward call's steering, probes and captures, built by the engine and
/// uploaded once per call. Ops and probes are sorted by residual index `l` in `0..=n_layers`,
/// then by sequence `s` in `0..S` (S = `seq_cols.len()`), and `op_ranges` / `probe_ranges` hold
/// `(n_layers + 1) · S + 1` ascending offsets: sequence `s`'s ops at `l` are
/// `ops[op_ranges[l·S + s]..op_ranges[l·S + s + 1]]`, so a token walks only its own.
///
/// At residual index `l`, for each token: its sequence's probes at `l` are projected (so
/// same-layer conditions see the pre-steering value), its sequence's ops at `l` are applied in
/// order, the probes are projected again if anything changed, and the residual is added to its
/// capture sum.
///
/// Vectors are not part of the plan: ops and probes index the rows of a vector table
/// ([`Backend::vectors`]) that lives on the device across calls, so uploading a plan costs
/// O(tokens + ops + probes), not O(vectors × hidden).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResidualPlan {
    pub hidden: usize,
    pub n_layers: usize,
    /// Rows of the vector table the plan indexes (every `vec` is below it).
    pub n_vectors: usize,
    pub token_seq: Vec<u32>,
    pub token_flags: Vec<u32>,
    /// Capture slot per token, or NONE.
    pub token_capture: Vec<u32>,
    /// Offset of each token's projection row in `proj` (its sequence's `seq_cols` columns).
    pub token_proj: Vec<u32>,
    /// Projection columns of each sequence of the call.
    pub seq_cols: Vec<u32>,
    pub ops: Vec<OpDesc>,
    pub op_ranges: Vec<u32>,
    pub probes: Vec<ProbeDesc>,
    pub probe_ranges: Vec<u32>,
    /// Length of `proj`: Σ over tokens of their sequence's columns.
    pub proj_len: usize,
    /// Capture slots (`capture` is `[n_captures, n_layers + 1, hidden]`).
    pub n_captures: usize,
}

impl ResidualPlan {
    pub fn n_seqs(&self) -> usize {
        self.seq_cols.len()
    }
    /// Index range of every sequence's ops (or probes, with `probe_ranges`) at residual index `l`.
    pub fn layer_range(&self, ranges: &[u32], l: usize) -> std::ops::Range<usize> {
        let s = self.n_seqs();
        ranges[l * s] as usize..ranges[(l + 1) * s] as usize
    }
    /// Index range of sequence `seq`'s ops (or probes) at residual index `l`.
    pub fn seq_range(&self, ranges: &[u32], l: usize, seq: u32) -> std::ops::Range<usize> {
        let at = l * self.n_seqs() + seq as usize;
        ranges[at] as usize..ranges[at + 1] as usize
    }
    /// Every op at residual index `l`.
    pub fn ops_at(&self, l: usize) -> &[OpDesc] {
        &self.ops[self.layer_range(&self.op_ranges, l)]
    }
    /// Sequence `seq`'s probes at residual index `l`.
    pub fn probes_of(&self, l: usize, seq: u32) -> &[ProbeDesc] {
        &self.probes[self.seq_range(&self.probe_ranges, l, seq)]
    }
    /// `(l·S + s)` offsets of records sorted by (residual index, sequence).
    pub fn ranges_of(n_layers: usize, n_seqs: usize, keys: impl Iterator<Item = (usize, u32)>) -> Vec<u32> {
        let mut counts = vec![0u32; (n_layers + 1) * n_seqs + 1];
        for (l, s) in keys {
            counts[l * n_seqs + s as usize + 1] += 1;
        }
        for i in 1..counts.len() {
            counts[i] += counts[i - 1];
        }
        counts
    }
    /// Token `i`'s projection row: `(offset in proj, columns)`.
    pub fn proj_row(&self, i: usize) -> (usize, usize) {
        (self.token_proj[i] as usize, self.seq_cols[self.token_seq[i] as usize] as usize)
    }

    /// Check every index against the plan's own sizes: the kernels trust them. A backend calls
    /// this when a plan is uploaded (and checks `n_vectors` against its table when it runs).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("invalid residual plan: {m}")));
        let t = self.token_seq.len();
        if self.hidden == 0 {
            return bad("hidden size 0".into());
        }
        if self.token_flags.len() != t || self.token_capture.len() != t || self.token_proj.len() != t {
            return bad(format!(
                "{t} token sequences but {} flags, {} captures, {} projection offsets",
                self.token_flags.len(),
                self.token_capture.len(),
                self.token_proj.len()
            ));
        }
        let n_seqs = self.seq_cols.len() as u32;
        // Projection rows follow each other in token order, without gaps or overlap.
        let mut end = 0usize;
        for i in 0..t {
            if self.token_seq[i] >= n_seqs {
                return bad(format!("token {i}: sequence {} of {n_seqs}", self.token_seq[i]));
            }
            let (at, cols) = self.proj_row(i);
            if at != end {
                return bad(format!("token {i}: projection row at {at}, the previous row ends at {end}"));
            }
            end = at + cols;
        }
        if end != self.proj_len {
            return bad(format!("projection rows end at {end}, proj_len is {}", self.proj_len));
        }
        // One capture sum per sequence at most, and sizes that fit the address space.
        let capture_len =
            self.n_captures.checked_mul(self.n_layers.saturating_add(1)).and_then(|n| n.checked_mul(self.hidden));
        if self.n_captures > n_seqs as usize || capture_len.is_none_or(|n| n > u32::MAX as usize) {
            return bad(format!("{} capture slots for {n_seqs} sequences", self.n_captures));
        }
        if let Some(c) = self.token_capture.iter().find(|&&c| c != NONE && c as usize >= self.n_captures) {
            return bad(format!("capture slot {c} of {}", self.n_captures));
        }
        let Some(n_ranges) =
            self.n_layers.checked_add(1).and_then(|n| n.checked_mul(n_seqs as usize)).and_then(|n| n.checked_add(1))
        else {
            return bad(format!("{} layers × {n_seqs} sequences overflow", self.n_layers));
        };
        for (name, offs, len) in
            [("op_ranges", &self.op_ranges, self.ops.len()), ("probe_ranges", &self.probe_ranges, self.probes.len())]
        {
            let ascending = offs.windows(2).all(|w| w[0] <= w[1]);
            if offs.len() != n_ranges || !ascending || offs.first() != Some(&0) || offs[n_ranges - 1] as usize != len {
                return bad(format!("{name} is not {n_ranges} ascending offsets from 0 to {len}"));
            }
        }
        // Each record sits in its own sequence's range (the kernels do not check `seq`).
        for (at, w) in self.op_ranges.windows(2).enumerate() {
            let s = (at % n_seqs as usize) as u32;
            if let Some(o) = (w[0]..w[1]).find(|&o| self.ops[o as usize].seq != s) {
                return bad(format!("op {o} of sequence {} is in sequence {s}'s range", self.ops[o as usize].seq));
            }
        }
        for (at, w) in self.probe_ranges.windows(2).enumerate() {
            let s = (at % n_seqs as usize) as u32;
            if let Some(o) = (w[0]..w[1]).find(|&o| self.probes[o as usize].seq != s) {
                return bad(format!(
                    "probe {o} of sequence {} is in sequence {s}'s range",
                    self.probes[o as usize].seq
                ));
            }
        }
        let nv = self.n_vectors as u32;
        let col_ok = |seq: u32, c: u32| seq < n_seqs && c < self.seq_cols[seq as usize];
        for (i, o) in self.ops.iter().enumerate() {
            if o.vec >= nv || o.seq >= n_seqs || ![OP_ADD, OP_ABLATE, OP_CLAMP].contains(&o.kind) {
                return bad(format!(
                    "op {i}: vector {} of {nv}, sequence {} of {n_seqs}, kind {}",
                    o.vec, o.seq, o.kind
                ));
            }
            if o.cond_col != NONE && !col_ok(o.seq, o.cond_col) {
                return bad(format!("op {i}: condition column {} outside sequence {}'s columns", o.cond_col, o.seq));
            }
        }
        for (i, pr) in self.probes.iter().enumerate() {
            if pr.vec >= nv || !col_ok(pr.seq, pr.col) {
                return bad(format!(
                    "probe {i}: vector {} of {nv}, column {} of sequence {} of {n_seqs}",
                    pr.vec, pr.col, pr.seq
                ));
            }
        }
        Ok(())
    }

    /// Check that the plan fits a call of `t` tokens of `width` at residual index `l`, reading a
    /// vector table of `rows` × `hidden`.
    pub fn fits(&self, t: usize, l: usize, width: usize, rows: usize, hidden: usize) -> Result<()> {
        if self.token_seq.len() < t || l > self.n_layers || self.hidden != width {
            return Err(Error::Invalid(format!(
                "residual plan (t {}, {} layers, hidden {}) does not fit this call (t {t}, layer {l}, width {width})",
                self.token_seq.len(),
                self.n_layers,
                self.hidden
            )));
        }
        if rows < self.n_vectors || hidden != width {
            return Err(Error::Invalid(format!(
                "residual plan indexes {} vectors of {width}, the vector table holds {rows} of {hidden}",
                self.n_vectors
            )));
        }
        Ok(())
    }
}

/// Check a write of `raw` and `units` (whole rows of `hidden`) at `row` of a vector table of `rows`.
pub fn check_vector_write(rows: usize, hidden: usize, row: usize, raw: &[f32], units: &[f32]) -> Result<()> {
    let whole = hidden > 0 && raw.len() == units.len() && raw.len() % hidden == 0;
    if !whole || row + raw.len() / hidden.max(1) > rows {
        return Err(Error::Invalid(format!(
            "writing {} raw and {} unit values at row {row} of a vector table of {rows} × {hidden}",
            raw.len(),
            units.len()
        )));
    }
    Ok(())
}

/// What the fused op wrote while running a plan: the receipts of its steering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanOutputs {
    /// Projections, `proj_len` values (each token's row at its `token_proj` offset).
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
    /// A table of steering vectors on the device: `rows` raw vectors of `hidden` values and their
    /// unit vectors. It outlives forward calls; plans index its rows.
    type Vectors: Send + Sync;

    fn name(&self) -> &'static str;

    fn upload(&self, t: &HostTensor) -> Result<Self::Weight>;
    /// A zeroed f32 buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn write(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    fn read(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>>;
    /// The batch's tokens and the KV page table their attention reads (checked with
    /// [`PageTable::check`]).
    fn layout(&self, tokens: &[TokenPos], pages: &PageTable) -> Result<Self::Layout>;
    /// A zeroed vector table of `rows` rows of `hidden` values.
    fn vectors(&self, rows: usize, hidden: usize) -> Result<Self::Vectors>;
    /// Overwrite rows `row..row + raw.len() / hidden` of a table: raw vectors and their units.
    fn write_vectors(&self, table: &mut Self::Vectors, row: usize, raw: &[f32], units: &[f32]) -> Result<()>;
    /// Upload a plan (checked with [`ResidualPlan::validate`]); its outputs start at zero.
    fn plan(&self, plan: &ResidualPlan) -> Result<Self::Plan>;
    /// Download a plan's outputs: projections, capture sums and op counts.
    fn plan_outputs(&self, plan: &Self::Plan) -> Result<PlanOutputs>;

    /// `out[i] = table[ids[i]]` (rows of `width`).
    fn embed(&self, table: &Self::Weight, ids: &[u32], width: usize, out: &mut Self::Buf) -> Result<()>;

    /// The fused residual boundary, one pass over `h`: `h += delta` (when given); at a residual
    /// index (`steer = Some((plan, vectors, l))`) the plan's probes, steering ops and captures
    /// for `l`, reading the vector table the plan indexes; then `x = rmsnorm(h) · norm`.
    #[allow(clippy::too_many_arguments)]
    fn residual_steer_norm(
        &self,
        h: &mut Self::Buf,
        delta: Option<&Self::Buf>,
        steer: Option<(&mut Self::Plan, &Self::Vectors, usize)>,
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
