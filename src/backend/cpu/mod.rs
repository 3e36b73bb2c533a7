//! The CPU reference backend: plain loops, f32 activations, f64 accumulation where it is cheap
//! (norms, softmax sums). Parallel over rows with rayon; SIMD kernels when the CPU has AVX2+FMA
//! (`simd.rs`). Matmul weights stay as the file stores them (ggml quantized blocks, f16, bf16,
//! memory-mapped where the loader did not have to reorder them) and are decoded a block of rows
//! at a time as the matmul reads them; vectors (norms, biases) are widened at upload.

mod gemm;
mod matmul;
mod pages;
pub mod q8;
mod residual;
pub mod simd;

use rayon::prelude::*;

use super::{AttnShape, Backend, KvLayer, PageTable, PlanOutputs, ResidualPlan, TokenPos};
use crate::error::{Error, Result};
use crate::model::gguf::GgmlType;
use crate::model::tensor::{DType, HostTensor, Storage};

pub use gemm::{gemm_f32, CpuGemmBackend};
pub use matmul::{dot, matmul_act, matmul_with, Rows};
pub use q8::{activations, set_activations, Activations};
pub use residual::{CpuPlan, CpuVectors};

/// Run `f` on a worker of rayon's global pool, so that the CPU backend's parallel ops start on
/// the calling worker and the others join in, instead of every op handing its work to the pool
/// and putting the caller to sleep until it is done (on 2 cores that handoff cost a quarter of a
/// decode step). The CLI runs every command this way; embedders should wrap their generation
/// loop in it. With fewer than 2 workers `f` runs here (a lone worker blocked in `f` could not
/// serve another thread's parallel work).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() < 2 {
        return f();
    }
    rayon::scope(|_| f())
}

/// The CPU backend. Stateless; cheap to create.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// A weight on the CPU: f32, or rows stored packed as the file has them.
pub struct CpuWeight {
    pub shape: Vec<usize>,
    pub data: WeightData,
}

pub enum WeightData {
    /// f32 values.
    F32(F32Values),
    /// Rows of `ty` (ggml quantized blocks, F16 or BF16), `row_bytes` each, in the tensor's
    /// storage (a range of the file's memory map, or bytes the loader reordered).
    Packed { ty: GgmlType, row_bytes: usize, tensor: HostTensor },
}

/// A weight's f32 values: shared with the loader where it already produced f32; widened into
/// huge pages otherwise (decode streams them faster; [`pages`]).
pub enum F32Values {
    Shared(std::sync::Arc<Vec<f32>>),
    Huge(pages::HugeF32),
}

impl std::ops::Deref for F32Values {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            F32Values::Shared(v) => v,
            F32Values::Huge(v) => v,
        }
    }
}

impl CpuWeight {
    /// A weight widened to f32 (what the reference kernels of training read).
    pub fn f32(t: &HostTensor) -> Result<CpuWeight> {
        let data = match &t.storage {
            Storage::F32(v) => F32Values::Shared(v.clone()),
            _ => {
                let v = t.to_f32();
                F32Values::Huge(pages::HugeF32::filled(v.len(), |o| o.copy_from_slice(&v))?)
            }
        };
        Ok(CpuWeight { data: WeightData::F32(data), shape: t.shape.clone() })
    }

    /// The weight's rows as the matmul reads them.
    pub fn rows(&self) -> Rows<'_> {
        match &self.data {
            WeightData::F32(v) => Rows::F32(v),
            WeightData::Packed { ty, row_bytes, tensor } => {
                Rows::Packed { ty: *ty, data: tensor.bytes(), row_bytes: *row_bytes }
            }
        }
    }

    /// The f32 values; an error for a packed weight (an op that needs them got one).
    pub fn values(&self) -> Result<&[f32]> {
        match &self.data {
            WeightData::F32(v) => Ok(v),
            WeightData::Packed { ty, tensor, .. } => {
                Err(invalid(format!("weight `{}` is stored as {ty}; this op needs it widened to f32", tensor.name)))
            }
        }
    }

    /// Elements per row (the last dimension).
    fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}

/// A batch's tokens with the KV page table, and the number of pages the table uses.
pub struct CpuLayout {
    pub tokens: Vec<TokenPos>,
    pub pages: PageTable,
    pub pages_used: usize,
}

/// Attention's output for one task: `o` (heads × `hd`) = Σ_j p_hj · V row j, each head's
/// `p_hj = scores[h·n + j] · inv[h]`, summed in key order with the product rounded before the
/// sum (no FMA), so every SIMD width gives the same values. The compiler vectorizes the inner
/// loop; with AVX2 or AVX-512 enabled it runs 8 or 16 lanes instead of SSE's 4.
fn weighted_values(o: &mut [f32], scores: &[f32], inv: &[f32], rows: &[usize], vc: &[f32], hd: usize, n: usize) {
    weighted_values_at(simd::active(), o, scores, inv, rows, vc, hd, n)
}

/// [`weighted_values`] at SIMD level `level` (at most what the CPU has; tests run each).
#[allow(clippy::too_many_arguments)]
fn weighted_values_at(
    level: simd::Simd,
    o: &mut [f32],
    scores: &[f32],
    inv: &[f32],
    rows: &[usize],
    vc: &[f32],
    hd: usize,
    n: usize,
) {
    #[inline(always)]
    fn run(o: &mut [f32], scores: &[f32], inv: &[f32], rows: &[usize], vc: &[f32], hd: usize, n: usize) {
        o.fill(0.0);
        for (j, &r) in rows.iter().enumerate() {
            let vr = &vc[r..][..hd];
            for (h, oh) in o.chunks_mut(hd).enumerate() {
                let p = scores[h * n + j] * inv[h];
                for (a, &b) in oh.iter_mut().zip(vr) {
                    *a += p * b;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Head dimensions of 64 and 128 (every model persona runs): one head at a time, its
        // output a fixed-size array the compiler keeps in registers over all the keys (the
        // generic loop stored and reloaded it at every key). Same operations in the same order
        // per element.
        #[inline(always)]
        fn heads<const HD: usize>(o: &mut [f32], s: &[f32], inv: &[f32], rows: &[usize], vc: &[f32], n: usize) {
            for (h, oh) in o.chunks_exact_mut(HD).enumerate() {
                let sh = &s[h * n..][..n];
                let mut acc = [0f32; HD];
                for (j, &r) in rows.iter().enumerate() {
                    let p = sh[j] * inv[h];
                    let vr: &[f32; HD] = vc[r..r + HD].try_into().unwrap();
                    for (a, &v) in acc.iter_mut().zip(vr) {
                        *a += p * v;
                    }
                }
                oh.copy_from_slice(&acc);
            }
        }
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn heads_avx512<const HD: usize>(o: &mut [f32], s: &[f32], i: &[f32], r: &[usize], v: &[f32], n: usize) {
            heads::<HD>(o, s, i, r, v, n)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn heads_avx2<const HD: usize>(o: &mut [f32], s: &[f32], i: &[f32], r: &[usize], v: &[f32], n: usize) {
            heads::<HD>(o, s, i, r, v, n)
        }
        let level = level.min(simd::detected());
        // SAFETY: the level is at most what the CPU has (lowered above); o holds whole heads of
        // hd values, and every V row is sliced in bounds.
        unsafe {
            match (level, hd) {
                (simd::Simd::Avx512, 64) => return heads_avx512::<64>(o, scores, inv, rows, vc, n),
                (simd::Simd::Avx512, 128) => return heads_avx512::<128>(o, scores, inv, rows, vc, n),
                (simd::Simd::Avx2, 64) => return heads_avx2::<64>(o, scores, inv, rows, vc, n),
                (simd::Simd::Avx2, 128) => return heads_avx2::<128>(o, scores, inv, rows, vc, n),
                _ => {}
            }
        }
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn run_avx512(o: &mut [f32], s: &[f32], i: &[f32], r: &[usize], v: &[f32], hd: usize, n: usize) {
            run(o, s, i, r, v, hd, n)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn run_avx2(o: &mut [f32], s: &[f32], i: &[f32], r: &[usize], v: &[f32], hd: usize, n: usize) {
            run(o, s, i, r, v, hd, n)
        }
        match level {
            // SAFETY: the level is at most what the CPU has (lowered above).
            simd::Simd::Avx512 => return unsafe { run_avx512(o, scores, inv, rows, vc, hd, n) },
            simd::Simd::Avx2 => return unsafe { run_avx2(o, scores, inv, rows, vc, hd, n) },
            simd::Simd::Portable => {}
        }
    }
    run(o, scores, inv, rows, vc, hd, n)
}

fn invalid(msg: String) -> Error {
    Error::Backend { backend: "cpu", msg }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type Layout = CpuLayout;
    type Plan = CpuPlan;
    type Vectors = CpuVectors;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, t: &HostTensor) -> Result<CpuWeight> {
        // Vectors (norms, biases) are small and read by f32 code: widen them.
        if t.shape.len() < 2 || t.numel() == 0 {
            return CpuWeight::f32(t);
        }
        let ty = match &t.storage {
            Storage::F32(_) | Storage::Mapped { dtype: DType::F32, .. } => return CpuWeight::f32(t),
            Storage::Mapped { dtype: DType::F16, .. } => GgmlType::F16,
            Storage::Mapped { dtype: DType::BF16, .. } => GgmlType::BF16,
            Storage::Quant { ty, .. } => *ty,
        };
        let rows = t.shape[0];
        let bytes = t.bytes().len();
        if bytes % rows != 0 {
            return Err(invalid(format!("tensor `{}` {:?}: {bytes} bytes are not {rows} equal rows", t.name, t.shape)));
        }
        Ok(CpuWeight {
            shape: t.shape.clone(),
            data: WeightData::Packed { ty, row_bytes: bytes / rows, tensor: t.clone() },
        })
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn write(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        if src.len() > dst.len() {
            return Err(invalid(format!("write of {} values into a buffer of {}", src.len(), dst.len())));
        }
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn read(&self, src: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        src.get(..len).map(<[f32]>::to_vec).ok_or_else(|| invalid(format!("read of {len} values from {}", src.len())))
    }

    fn layout(&self, tokens: &[TokenPos], pages: &PageTable) -> Result<CpuLayout> {
        let pages_used = pages.check(tokens)?;
        Ok(CpuLayout { tokens: tokens.to_vec(), pages: pages.clone(), pages_used })
    }

    fn vectors(&self, rows: usize, hidden: usize) -> Result<CpuVectors> {
        Ok(CpuVectors::new(rows, hidden))
    }

    fn write_vectors(&self, table: &mut CpuVectors, row: usize, raw: &[f32], units: &[f32]) -> Result<()> {
        table.write(row, raw, units)
    }

    fn plan(&self, plan: &ResidualPlan) -> Result<CpuPlan> {
        plan.validate()?;
        Ok(CpuPlan::new(plan))
    }

    fn plan_outputs(&self, plan: &CpuPlan) -> Result<PlanOutputs> {
        Ok(PlanOutputs {
            proj: plan.proj.clone(),
            capture: plan.capture.clone(),
            counts: plan.counts.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).collect(),
        })
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32], width: usize, out: &mut Vec<f32>) -> Result<()> {
        if table.cols() != width || out.len() < ids.len() * width {
            return Err(invalid(format!("embedding table {:?} read as rows of {width}", table.shape)));
        }
        let rows = table.shape[0];
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= rows {
                return Err(invalid(format!("token id {id} is outside the embedding table ({rows} rows)")));
            }
            let dst = &mut out[i * width..(i + 1) * width];
            match table.rows() {
                Rows::F32(v) => dst.copy_from_slice(&v[id * width..(id + 1) * width]),
                Rows::Packed { ty, data, row_bytes } => crate::model::gguf::decode_into(
                    ty,
                    &data[id * row_bytes..(id + 1) * row_bytes],
                    dst,
                    simd::active() >= simd::Simd::Avx2,
                ),
            }
        }
        Ok(())
    }

    fn residual_steer_norm(
        &self,
        h: &mut Vec<f32>,
        delta: Option<&Vec<f32>>,
        steer: Option<(&mut CpuPlan, &CpuVectors, usize)>,
        norm: &CpuWeight,
        eps: f32,
        t: usize,
        width: usize,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        if let Some((p, vt, l)) = &steer {
            p.desc.fits(t, *l, width, vt.rows, vt.hidden)?;
        }
        if h.len() < t * width || x.len() < t * width || delta.is_some_and(|d| d.len() < t * width) {
            return Err(invalid(format!("residual buffers too small for [{t}, {width}]")));
        }
        let norm = norm.values()?;
        if norm.len() < width {
            return Err(invalid(format!("norm weight of {} values for width {width}", norm.len())));
        }
        residual::residual_steer_norm(h, delta.map(|d| d.as_slice()), steer, &norm[..width], eps, t, width, x);
        Ok(())
    }

    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        bias: Option<&CpuWeight>,
        t: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, k) = (w.shape[0], w.cols());
        let bias = bias.map(|b| b.values()).transpose()?;
        if x.len() < t * k || out.len() < t * n || bias.is_some_and(|b| b.len() < n) {
            return Err(invalid(format!("matmul buffers too small for [{t}, {k}] × {:?}ᵀ", w.shape)));
        }
        matmul::matmul(&x[..t * k], w.rows(), bias, t, n, k, &mut out[..t * n]);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        cos_sin: &Vec<f32>,
        layout: &CpuLayout,
        t: usize,
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        let layout = &layout.tokens;
        let half = hd / 2;
        let table = cos_sin;
        let max_pos = table.len() / hd;
        for tp in &layout[..t] {
            if tp.pos as usize >= max_pos {
                return Err(invalid(format!("position {} is beyond the RoPE table ({max_pos})", tp.pos)));
            }
        }
        x[..t * heads * hd].par_chunks_mut(heads * hd).zip(&layout[..t]).for_each(|(row, tp)| {
            let cs = &table[tp.pos as usize * hd..(tp.pos as usize + 1) * hd];
            for head in row.chunks_mut(hd) {
                for i in 0..half {
                    let (c, s) = (cs[2 * i], cs[2 * i + 1]);
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * c - b * s;
                    head[i + half] = b * c + a * s;
                }
            }
        });
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cache: &mut KvLayer<Self>,
        layout: &CpuLayout,
        t: usize,
        s: AttnShape,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let kvw = s.n_kv_heads * s.head_dim;
        let pt = &layout.pages;
        let pages = cache.k.len().min(cache.v.len()) / (pt.page_size * kvw).max(1);
        if layout.pages_used > pages || layout.tokens.len() < t {
            return Err(invalid(format!(
                "the layout ({} tokens) uses {} KV pages; the cache has {pages}",
                layout.tokens.len(),
                layout.pages_used
            )));
        }
        let layout = &layout.tokens;
        for (i, tp) in layout[..t].iter().enumerate() {
            let at = pt.row(tp.slot as usize, tp.pos as usize) * kvw;
            cache.k[at..at + kvw].copy_from_slice(&k[i * kvw..(i + 1) * kvw]);
            cache.v[at..at + kvw].copy_from_slice(&v[i * kvw..(i + 1) * kvw]);
        }
        let group = s.n_heads / s.n_kv_heads;
        let hd = s.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let (kc, vc) = (&cache.k, &cache.v);
        // One task per (token, group of query heads sharing a KV head): the scores of the
        // group's heads against each key row in tiles that load the row once, softmax, then
        // each value row read once for the whole group. Every score and output has the same
        // arithmetic as one head alone (a `dot` per score, values summed in key order), so
        // results do not depend on the grouping. Small batches (decode) split groups into single
        // heads so both cores have work.
        let per_task = if t * s.n_kv_heads >= 4 * rayon::current_num_threads() { group } else { 1 };
        let tasks_per_token = s.n_heads / per_task;
        out[..t * s.n_heads * hd].par_chunks_mut(per_task * hd).enumerate().for_each(|(idx, o)| {
            let (i, task) = (idx / tasks_per_token, idx % tasks_per_token);
            let head0 = task * per_task;
            let tp = layout[i];
            let kvh = head0 / group;
            let slot = tp.slot as usize;
            let n = tp.pos as usize + 1;
            let rows: Vec<usize> = (0..n).map(|j| (pt.row(slot, j) * s.n_kv_heads + kvh) * hd).collect();
            let qs: Vec<&[f32]> = (0..per_task).map(|h| &q[(i * s.n_heads + head0 + h) * hd..][..hd]).collect();
            let ks: Vec<&[f32]> = rows.iter().map(|&r| &kc[r..][..hd]).collect();
            let mut scores = vec![0f32; per_task * n];
            matmul::dot_tiles(&qs, &ks, |h, j, v| scores[h * n + j] = v * scale);
            let mut inv = vec![0f32; per_task];
            for (h, sc) in scores.chunks_mut(n).enumerate() {
                let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for x in sc.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x as f64;
                }
                inv[h] = (1.0 / sum) as f32;
            }
            weighted_values(o, &scores, &inv, &rows, vc, hd, n);
        });
        Ok(())
    }

    fn silu_mul(&self, gate: &Vec<f32>, up: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        out[..n].par_chunks_mut(4096).enumerate().for_each(|(c, o)| {
            let off = c * 4096;
            for (j, y) in o.iter_mut().enumerate() {
                let g = gate[off + j];
                *y = g / (1.0 + (-g).exp()) * up[off + j];
            }
        });
        Ok(())
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &[u32], width: usize, out: &mut Vec<f32>) -> Result<()> {
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            out[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention's weighted sum of values gives the same bits at every SIMD level the CPU has,
    /// for the head sizes with their own kernels and one without.
    #[test]
    fn weighted_values_are_the_same_at_every_level() {
        for (hd, heads, n) in [(64, 3, 37), (128, 2, 9), (48, 2, 5), (64, 1, 1)] {
            let f = |i: usize| ((i * 7919) % 29) as f32 * 0.031 - 0.4;
            let rows: Vec<usize> = (0..n).map(|j| ((j * 5) % n) * hd).collect();
            let vc: Vec<f32> = (0..n * hd).map(f).collect();
            let scores: Vec<f32> = (0..heads * n).map(|i| f(i + 3).abs()).collect();
            let inv: Vec<f32> = (0..heads).map(|h| 0.3 + h as f32 * 0.1).collect();
            let mut want = vec![f32::NAN; heads * hd];
            weighted_values_at(simd::Simd::Portable, &mut want, &scores, &inv, &rows, &vc, hd, n);
            for level in simd::Simd::available() {
                let mut got = vec![f32::NAN; heads * hd];
                weighted_values_at(level, &mut got, &scores, &inv, &rows, &vc, hd, n);
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "hd {hd} heads {heads} n {n}: {level:?} differs from portable");
            }
        }
    }
}
