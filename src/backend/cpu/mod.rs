//! The CPU reference backend: plain loops, f32 storage, f64 accumulation where it is cheap
//! (norms, softmax sums). Parallel over rows with rayon; SIMD dot product when the CPU has AVX2+FMA.

mod gemm;
mod matmul;
mod residual;

use rayon::prelude::*;

use super::{AttnShape, Backend, KvLayer, PageTable, PlanOutputs, ResidualPlan, TokenPos};
use crate::error::{Error, Result};
use crate::model::tensor::{HostTensor, Storage};

pub use gemm::{gemm_f32, CpuGemmBackend};
pub use matmul::dot;
pub use residual::CpuPlan;

/// The CPU backend. Stateless; cheap to create.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// A weight widened to f32 (shared when the loader already produced f32).
pub struct CpuWeight {
    pub data: std::sync::Arc<Vec<f32>>,
    pub shape: Vec<usize>,
}

/// A batch's tokens with the KV page table, and the number of pages the table uses.
pub struct CpuLayout {
    pub tokens: Vec<TokenPos>,
    pub pages: PageTable,
    pub pages_used: usize,
}

fn invalid(msg: String) -> Error {
    Error::Backend { backend: "cpu", msg }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type Layout = CpuLayout;
    type Plan = CpuPlan;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, t: &HostTensor) -> Result<CpuWeight> {
        let data = match &t.storage {
            Storage::F32(v) => v.clone(),
            Storage::Mapped { .. } => std::sync::Arc::new(t.to_f32()),
        };
        Ok(CpuWeight { data, shape: t.shape.clone() })
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

    fn plan(&self, plan: &ResidualPlan) -> Result<CpuPlan> {
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
        let rows = table.data.len() / width;
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= rows {
                return Err(invalid(format!("token id {id} is outside the embedding table ({rows} rows)")));
            }
            out[i * width..(i + 1) * width].copy_from_slice(&table.data[id * width..(id + 1) * width]);
        }
        Ok(())
    }

    fn residual_steer_norm(
        &self,
        h: &mut Vec<f32>,
        delta: Option<&Vec<f32>>,
        steer: Option<(&mut CpuPlan, usize)>,
        norm: &CpuWeight,
        eps: f32,
        t: usize,
        width: usize,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        if let Some((p, l)) = &steer {
            if p.desc.token_seq.len() < t || *l > p.desc.n_layers || p.desc.hidden != width {
                return Err(invalid(format!("residual plan does not fit this call (t {t}, layer {l}, width {width})")));
            }
        }
        residual::residual_steer_norm(h, delta.map(|d| d.as_slice()), steer, &norm.data[..width], eps, t, width, x);
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
        let (n, k) = (w.shape[0], w.shape[1]);
        matmul::matmul(&x[..t * k], &w.data, bias.map(|b| b.data.as_slice()), t, n, k, &mut out[..t * n]);
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
        // One task per (token, head): scores over the slot's positions 0..=pos, softmax, weighted sum of v.
        out[..t * s.n_heads * hd].par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
            let (i, head) = (idx / s.n_heads, idx % s.n_heads);
            let tp = layout[i];
            let kvh = head / group;
            let qv = &q[(i * s.n_heads + head) * hd..][..hd];
            let slot = tp.slot as usize;
            let n = tp.pos as usize + 1;
            let rows: Vec<usize> = (0..n).map(|j| (pt.row(slot, j) * s.n_kv_heads + kvh) * hd).collect();
            let mut scores: Vec<f32> = rows.iter().map(|&r| dot(qv, &kc[r..][..hd]) * scale).collect();
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for sc in scores.iter_mut() {
                *sc = (*sc - m).exp();
                sum += *sc as f64;
            }
            let inv = (1.0 / sum) as f32;
            o.fill(0.0);
            for (&r, &p) in rows.iter().zip(&scores) {
                let vr = &vc[r..][..hd];
                let p = p * inv;
                for (a, &b) in o.iter_mut().zip(vr) {
                    *a += p * b;
                }
            }
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
