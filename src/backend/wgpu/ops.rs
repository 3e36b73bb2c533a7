//! The Backend ops on wgpu: host-side checks (a bad shape or index is an error here, never an
//! out-of-bounds access on the device), parameters, and one or two dispatches per op.

use std::sync::Arc;

use super::context::{err, Access, Ctx, Gbuf, Kernel};
use super::weights::{self, WeightFormat, WgpuWeight};
use super::WgpuBackend;
use crate::backend::{AttnShape, Backend, KvLayer, PageTable, PlanOutputs, ResidualPlan, TokenPos, NONE};
use crate::error::Result;
use crate::model::tensor::HostTensor;

use Access::{Read as R, ReadWrite as RW};

const EMBED: Kernel = Kernel { file: "embed.wgsl", entry: "embed", bindings: &[(1, R), (2, R), (3, RW)] };
const GATHER: Kernel = Kernel { file: "gather_rows.wgsl", entry: "gather_rows", bindings: &[(1, R), (2, R), (3, RW)] };
const SILU_MUL: Kernel = Kernel { file: "silu_mul.wgsl", entry: "silu_mul", bindings: &[(1, R), (2, R), (3, RW)] };
const GEMV: Kernel = Kernel { file: "matmul.wgsl", entry: "matmul_gemv", bindings: &[(1, R), (2, R), (3, R), (4, RW)] };
const GEMM: Kernel = Kernel { file: "matmul.wgsl", entry: "matmul_gemm", bindings: &[(1, R), (2, R), (3, R), (4, RW)] };
const ROPE: Kernel = Kernel { file: "rope.wgsl", entry: "rope", bindings: &[(1, R), (2, R), (3, RW)] };
const KV_STORE: Kernel =
    Kernel { file: "attention.wgsl", entry: "kv_store", bindings: &[(1, R), (2, R), (3, R), (4, RW), (5, RW)] };
const ATTENTION: Kernel =
    Kernel { file: "attention.wgsl", entry: "attention", bindings: &[(1, R), (6, R), (7, R), (8, R), (9, RW)] };
const RESIDUAL_NORM: Kernel =
    Kernel { file: "residual_steer_norm.wgsl", entry: "residual_norm", bindings: &[(1, RW), (2, R), (3, R), (4, RW)] };
const RESIDUAL_STEER_NORM: Kernel = Kernel {
    file: "residual_steer_norm.wgsl",
    entry: "residual_steer_norm",
    bindings: &[(1, RW), (2, R), (3, R), (4, RW), (5, R), (6, R), (7, RW), (10, RW)],
};
const CAPTURE_SUM: Kernel =
    Kernel { file: "residual_steer_norm.wgsl", entry: "capture_sum", bindings: &[(6, R), (8, R), (9, RW)] };

/// Token counts up to which matmul runs as the GEMV (bandwidth-bound decode); above, the tiled GEMM.
const GEMV_MAX_T: usize = 8;
/// The attention shader keeps q in a 256-float workgroup array.
const MAX_HEAD_DIM: usize = 256;

/// An f32 activation buffer of `len` values.
pub struct WgpuBuf {
    pub(crate) g: Gbuf,
    pub len: usize,
}

/// A batch's tokens: on the host for checks, on the device as (slot, pos) pairs.
pub struct WgpuLayout {
    tokens: Vec<TokenPos>,
    /// `[t][2]` (slot, pos), then the page table.
    buf: Gbuf,
    page_size: usize,
    width: usize,
    pages_used: usize,
}

/// A [`ResidualPlan`] on the device with its outputs (projections, capture sums).
pub struct WgpuPlan {
    desc: ResidualPlan,
    meta: Gbuf,
    proj: Gbuf,
    capture: Gbuf,
    /// `[n_ops][2]` u32 op counts.
    counts: Gbuf,
    ops_off: u32,
    probes_off: u32,
    op_ranges_off: u32,
    probe_ranges_off: u32,
}

/// The vector table: `[rows][hidden]` raw vectors, then `[rows][hidden]` unit vectors.
pub struct WgpuVectors {
    buf: Gbuf,
    rows: usize,
    hidden: usize,
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(err(format!("{what} holds {have} values, the op needs {want}")));
    }
    Ok(())
}

fn u(x: usize) -> u32 {
    x as u32
}

/// Largest element count a shader indexes with u32 arithmetic.
fn fits_u32(what: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize / 2 {
        return Err(err(format!("{what} has {n} elements, beyond the shaders' 32-bit indexing")));
    }
    Ok(())
}

impl WgpuBackend {
    fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }
}

impl Backend for WgpuBackend {
    type Buf = WgpuBuf;
    type Weight = WgpuWeight;
    type Layout = WgpuLayout;
    type Plan = WgpuPlan;
    type Vectors = WgpuVectors;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn upload(&self, t: &HostTensor) -> Result<WgpuWeight> {
        weights::upload(self.ctx(), t)
    }

    fn alloc(&self, len: usize) -> Result<WgpuBuf> {
        fits_u32("buffer", len)?;
        Ok(WgpuBuf { g: self.ctx.storage(len as u64 * 4, "activation buffer")?, len })
    }

    fn write(&self, dst: &mut WgpuBuf, src: &[f32]) -> Result<()> {
        if src.len() > dst.len {
            return Err(err(format!("write of {} values into a buffer of {}", src.len(), dst.len)));
        }
        self.ctx.write(&dst.g, bytemuck::cast_slice(src))
    }

    fn read(&self, src: &WgpuBuf, len: usize) -> Result<Vec<f32>> {
        if len > src.len {
            return Err(err(format!("read of {len} values from a buffer of {}", src.len)));
        }
        let bytes = self.ctx.read(&src.g, len as u64 * 4)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn layout(&self, tokens: &[TokenPos], pages: &PageTable) -> Result<WgpuLayout> {
        let pages_used = pages.check(tokens)?;
        let mut words: Vec<u32> = tokens.iter().flat_map(|t| [t.slot, t.pos]).collect();
        words.extend(&pages.table);
        Ok(WgpuLayout {
            tokens: tokens.to_vec(),
            buf: self.ctx.storage_init(bytemuck::cast_slice(&words), "layout")?,
            page_size: pages.page_size,
            width: pages.width,
            pages_used,
        })
    }

    fn vectors(&self, rows: usize, hidden: usize) -> Result<WgpuVectors> {
        let n = 2 * rows * hidden;
        fits_u32("vector table", n)?;
        Ok(WgpuVectors { buf: self.ctx.storage(n as u64 * 4, "vector table")?, rows, hidden })
    }

    fn write_vectors(&self, table: &mut WgpuVectors, row: usize, raw: &[f32], units: &[f32]) -> Result<()> {
        crate::backend::check_vector_write(table.rows, table.hidden, row, raw, units)?;
        let h = table.hidden;
        let at = (row * h) as u64 * 4;
        self.ctx.write_at(&table.buf, at, bytemuck::cast_slice(raw))?;
        self.ctx.write_at(&table.buf, (table.rows * h) as u64 * 4 + at, bytemuck::cast_slice(units))
    }

    fn plan(&self, plan: &ResidualPlan) -> Result<WgpuPlan> {
        plan.validate()?;
        let t = plan.token_seq.len();
        let mut meta: Vec<u32> = Vec::with_capacity(4 * t + 8 * plan.ops.len() + 3 * plan.probes.len());
        for i in 0..t {
            meta.extend([plan.token_seq[i], plan.token_flags[i], plan.token_capture[i], plan.token_proj[i]]);
        }
        let ops_off = u(meta.len());
        meta.extend_from_slice(bytemuck::cast_slice(&plan.ops));
        let probes_off = u(meta.len());
        meta.extend_from_slice(bytemuck::cast_slice(&plan.probes));
        let op_ranges_off = u(meta.len());
        meta.extend_from_slice(&plan.op_ranges);
        let probe_ranges_off = u(meta.len());
        meta.extend_from_slice(&plan.probe_ranges);
        let n_cap = plan.n_captures * (plan.n_layers + 1) * plan.hidden;
        fits_u32("plan", meta.len().max(n_cap).max(plan.proj_len))?;
        let ctx = self.ctx();
        Ok(WgpuPlan {
            meta: ctx.storage_init(bytemuck::cast_slice(&meta), "plan")?,
            proj: ctx.storage(plan.proj_len as u64 * 4, "projections")?,
            capture: ctx.storage(n_cap as u64 * 4, "captures")?,
            counts: ctx.storage(plan.ops.len() as u64 * 8, "op counts")?,
            ops_off,
            probes_off,
            op_ranges_off,
            probe_ranges_off,
            desc: plan.clone(),
        })
    }

    fn plan_outputs(&self, plan: &WgpuPlan) -> Result<PlanOutputs> {
        let p = &plan.desc;
        let f = |b: Vec<u8>| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let proj = self.ctx.read(&plan.proj, p.proj_len as u64 * 4)?;
        let cap = self.ctx.read(&plan.capture, (p.n_captures * (p.n_layers + 1) * p.hidden) as u64 * 4)?;
        let counts = self.ctx.read(&plan.counts, p.ops.len() as u64 * 8)?;
        let counts = counts.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(PlanOutputs { proj: f(proj), capture: f(cap), counts })
    }

    fn embed(&self, table: &WgpuWeight, ids: &[u32], width: usize, out: &mut WgpuBuf) -> Result<()> {
        if table.cols != width || table.shape.len() != 2 {
            return Err(err(format!("embedding table {:?} does not have rows of width {width}", table.shape)));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(err(format!("token id {id} is outside the embedding table ({} rows)", table.rows)));
        }
        need("embedding output", out.len, ids.len() * width)?;
        if ids.is_empty() {
            return Ok(());
        }
        let idb = self.ctx.storage_init(bytemuck::cast_slice(ids), "token ids")?;
        let grid = self.ctx.grid(ids.len())?;
        for c in &table.chunks {
            let params = [u(ids.len()), u(width), u(c.row0), u(c.rows), u(table.stride)];
            self.ctx.dispatch(&EMBED, table.format as u32, &params, &[&idb, &c.buf, &out.g], grid)?;
        }
        Ok(())
    }

    fn residual_steer_norm(
        &self,
        h: &mut WgpuBuf,
        delta: Option<&WgpuBuf>,
        steer: Option<(&mut WgpuPlan, &WgpuVectors, usize)>,
        norm: &WgpuWeight,
        eps: f32,
        t: usize,
        width: usize,
        x: &mut WgpuBuf,
    ) -> Result<()> {
        need("h", h.len, t * width)?;
        need("x", x.len, t * width)?;
        if let Some(d) = delta {
            need("delta", d.len, t * width)?;
        }
        if norm.cols < width || norm.shape.len() > 1 {
            return Err(err(format!("norm weight {:?} is not a vector of {width}", norm.shape)));
        }
        let normb = norm.single("norm weight")?;
        let deltab = delta.map(|d| &d.g).unwrap_or(&self.dummy);
        let grid = self.ctx.grid(t)?;
        let mut params = [0u32; 15];
        params[..4].copy_from_slice(&[u(t), u(width), eps.to_bits(), delta.is_some() as u32]);
        let Some((plan, vt, l)) = steer else {
            return self.ctx.dispatch(&RESIDUAL_NORM, 0, &params, &[&h.g, deltab, normb, &x.g], grid);
        };
        let p = &plan.desc;
        p.fits(t, l, width, vt.rows, vt.hidden)?;
        params[4..].copy_from_slice(&[
            u(l),
            u(p.n_seqs()),
            plan.ops_off,
            plan.probes_off,
            plan.op_ranges_off,
            plan.probe_ranges_off,
            0,
            u(vt.rows * width),
            u(p.n_layers),
            u(p.n_captures),
            0,
        ]);
        if p.layer_range(&p.op_ranges, l).is_empty() && p.layer_range(&p.probe_ranges, l).is_empty() {
            self.ctx.dispatch(&RESIDUAL_NORM, 0, &params, &[&h.g, deltab, normb, &x.g], grid)?;
        } else {
            let bufs = [&h.g, deltab, normb, &x.g, &vt.buf, &plan.meta, &plan.proj, &plan.counts];
            self.ctx.dispatch(&RESIDUAL_STEER_NORM, 0, &params, &bufs, grid)?;
        }
        if p.token_capture[..t].iter().any(|&c| c != NONE) {
            let max = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
            if p.n_captures > max {
                return Err(err(format!("{} captures exceed max_compute_workgroups_per_dimension", p.n_captures)));
            }
            let grid = [u(width.div_ceil(256)), u(p.n_captures), 1];
            self.ctx.dispatch(&CAPTURE_SUM, 0, &params, &[&plan.meta, &h.g, &plan.capture], grid)?;
        }
        Ok(())
    }

    fn matmul(
        &self,
        x: &WgpuBuf,
        w: &WgpuWeight,
        bias: Option<&WgpuWeight>,
        t: usize,
        out: &mut WgpuBuf,
    ) -> Result<()> {
        if w.shape.len() != 2 {
            return Err(err(format!("matmul weight of shape {:?} is not a matrix", w.shape)));
        }
        let (n, k) = (w.rows, w.cols);
        need("matmul input", x.len, t * k)?;
        need("matmul output", out.len, t * n)?;
        let biasb = match bias {
            Some(b) if b.cols != n || b.shape.len() != 1 => {
                return Err(err(format!("bias {:?} does not match {n} output columns", b.shape)));
            }
            Some(b) => b.single("bias")?,
            None => &self.dummy,
        };
        if t == 0 {
            return Ok(());
        }
        for c in &w.chunks {
            let params = [u(t), u(k), u(c.rows), u(c.row0), u(n), u(w.stride), bias.is_some() as u32];
            let bufs = [&x.g, &c.buf, biasb, &out.g];
            if t <= GEMV_MAX_T {
                self.ctx.dispatch(&GEMV, w.format as u32, &params, &bufs, self.ctx.grid(c.rows.div_ceil(8))?)?;
            } else {
                let (gx, gy) = (c.rows.div_ceil(64), t.div_ceil(64));
                let max = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
                if gx > max || gy > max {
                    return Err(err(format!("matmul of {t}×{n} exceeds max_compute_workgroups_per_dimension ({max})")));
                }
                self.ctx.dispatch(&GEMM, w.format as u32, &params, &bufs, [u(gx), u(gy), 1])?;
            }
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut WgpuBuf,
        cos_sin: &WgpuBuf,
        layout: &WgpuLayout,
        t: usize,
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        if hd == 0 || hd % 2 != 0 {
            return Err(err(format!("RoPE needs an even head size, got {hd}")));
        }
        need("layout", layout.tokens.len(), t)?;
        need("rope input", x.len, t * heads * hd)?;
        let rows = cos_sin.len / hd;
        if let Some(tp) = layout.tokens[..t].iter().find(|tp| tp.pos as usize >= rows) {
            return Err(err(format!("position {} is beyond the RoPE table ({rows})", tp.pos)));
        }
        let n = t * heads * hd / 2;
        let params = [u(t), u(heads), u(hd), u(hd)];
        self.ctx.dispatch(
            &ROPE,
            WeightFormat::F32 as u32,
            &params,
            &[&layout.buf, &cos_sin.g, &x.g],
            self.ctx.grid(n.div_ceil(256))?,
        )
    }

    fn attention(
        &self,
        q: &WgpuBuf,
        k: &WgpuBuf,
        v: &WgpuBuf,
        cache: &mut KvLayer<Self>,
        layout: &WgpuLayout,
        t: usize,
        s: AttnShape,
        out: &mut WgpuBuf,
    ) -> Result<()> {
        if s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 || s.head_dim == 0 || s.head_dim > MAX_HEAD_DIM {
            return Err(err(format!(
                "attention shape {s:?}: heads must be a multiple of kv heads, head_dim 1..={MAX_HEAD_DIM}"
            )));
        }
        let kvw = s.n_kv_heads * s.head_dim;
        need("layout", layout.tokens.len(), t)?;
        need("q", q.len, t * s.n_heads * s.head_dim)?;
        need("k", k.len, t * kvw)?;
        need("v", v.len, t * kvw)?;
        need("attention output", out.len, t * s.n_heads * s.head_dim)?;
        if cache.k.len != cache.v.len {
            return Err(err(format!("KV cache k ({}) and v ({}) differ", cache.k.len, cache.v.len)));
        }
        let pages = cache.k.len / (layout.page_size * kvw);
        if layout.pages_used > pages {
            return Err(err(format!("the layout uses {} KV pages; the cache has {pages}", layout.pages_used)));
        }
        if t == 0 {
            return Ok(());
        }
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let params = [
            u(t),
            u(s.n_heads),
            u(s.n_kv_heads),
            u(s.head_dim),
            u(layout.page_size),
            u(layout.width),
            u(2 * layout.tokens.len()),
            scale.to_bits(),
        ];
        let bufs = [&layout.buf, &k.g, &v.g, &cache.k.g, &cache.v.g];
        self.ctx.dispatch(&KV_STORE, 0, &params, &bufs, self.ctx.grid((t * kvw).div_ceil(256))?)?;
        let bufs = [&layout.buf, &q.g, &cache.k.g, &cache.v.g, &out.g];
        self.ctx.dispatch(&ATTENTION, 0, &params, &bufs, self.ctx.grid(t * s.n_heads)?)
    }

    fn silu_mul(&self, gate: &WgpuBuf, up: &WgpuBuf, n: usize, out: &mut WgpuBuf) -> Result<()> {
        need("gate", gate.len, n)?;
        need("up", up.len, n)?;
        need("silu_mul output", out.len, n)?;
        self.ctx.dispatch(&SILU_MUL, 0, &[u(n)], &[&gate.g, &up.g, &out.g], self.ctx.grid(n.div_ceil(256))?)
    }

    fn gather_rows(&self, x: &WgpuBuf, rows: &[u32], width: usize, out: &mut WgpuBuf) -> Result<()> {
        if let Some(&r) = rows.iter().find(|&&r| (r as usize + 1) * width > x.len) {
            return Err(err(format!("row {r} is outside the input ({} rows of {width})", x.len / width.max(1))));
        }
        need("gather output", out.len, rows.len() * width)?;
        if rows.is_empty() {
            return Ok(());
        }
        let rb = self.ctx.storage_init(bytemuck::cast_slice(rows), "row indices")?;
        let params = [u(rows.len()), u(width)];
        self.ctx.dispatch(&GATHER, 0, &params, &[&rb, &x.g, &out.g], self.ctx.grid(rows.len())?)
    }
}
