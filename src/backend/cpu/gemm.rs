//! The CPU backend with a GEMM library for batches of rows: `matmul` of 16 or more tokens goes
//! through the `gemm` crate (packed, cache-blocked, rayon-parallel; measured about 1.6× the
//! reference tile kernel at training shapes), everything else is the reference backend. Its
//! results depend on the batch (blocking changes the summation order), so the reference stays
//! the default for inference, where a batch must equal its sequences run alone bit for bit; the
//! fine-tuner runs on this one.

use super::{CpuBackend, CpuLayout, CpuPlan, CpuVectors, CpuWeight};
use crate::backend::{AttnShape, Backend, KvLayer, PageTable, PlanOutputs, ResidualPlan, TokenPos};
use crate::error::{Error, Result};
use crate::model::tensor::HostTensor;

/// `dst (+)= beta · lhs · rhs`, row-major `dst` `[m, n]`; `lhs` (`[m, k]`) and `rhs` (`[k, n]`)
/// are (slice, row stride, column stride), so transposed operands cost nothing.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let extent = |(s, rs, cs): (&[f32], isize, isize), rows: usize, cols: usize| {
        (rows - 1) as isize * rs + (cols - 1) as isize * cs < s.len() as isize
    };
    assert!(dst.len() >= m * n && extent(lhs, m, k) && extent(rhs, k, n), "gemm operands out of bounds");
    let par = match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: the assert above keeps every index of dst, lhs and rhs in bounds for (m, n, k) and
    // the given strides; dst (a &mut) does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// Rows from which `matmul` uses the GEMM library (below, the reference kernel: decode-sized).
const GEMM_MIN_ROWS: usize = 16;

/// The CPU backend with GEMM-library matmuls for batches (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuGemmBackend;

impl Backend for CpuGemmBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type Layout = CpuLayout;
    type Plan = CpuPlan;
    type Vectors = CpuVectors;

    fn name(&self) -> &'static str {
        "cpu-gemm"
    }
    fn upload(&self, t: &HostTensor) -> Result<CpuWeight> {
        // Training reads every weight as f32 (the backward GEMMs), so widen them all.
        CpuWeight::f32(t)
    }
    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        CpuBackend.alloc(len)
    }
    fn write(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        CpuBackend.write(dst, src)
    }
    fn read(&self, src: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        CpuBackend.read(src, len)
    }
    fn layout(&self, tokens: &[TokenPos], pages: &PageTable) -> Result<CpuLayout> {
        CpuBackend.layout(tokens, pages)
    }
    fn vectors(&self, rows: usize, hidden: usize) -> Result<CpuVectors> {
        CpuBackend.vectors(rows, hidden)
    }
    fn write_vectors(&self, table: &mut CpuVectors, row: usize, raw: &[f32], units: &[f32]) -> Result<()> {
        CpuBackend.write_vectors(table, row, raw, units)
    }
    fn plan(&self, plan: &ResidualPlan) -> Result<CpuPlan> {
        CpuBackend.plan(plan)
    }
    fn plan_outputs(&self, plan: &CpuPlan) -> Result<PlanOutputs> {
        CpuBackend.plan_outputs(plan)
    }
    fn embed(&self, table: &CpuWeight, ids: &[u32], width: usize, out: &mut Vec<f32>) -> Result<()> {
        CpuBackend.embed(table, ids, width, out)
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
        CpuBackend.residual_steer_norm(h, delta, steer, norm, eps, t, width, x)
    }
    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        bias: Option<&CpuWeight>,
        t: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if t < GEMM_MIN_ROWS {
            return CpuBackend.matmul(x, w, bias, t, out);
        }
        let (n, k) = (w.shape[0], w.shape[1]);
        let (wv, bias) = (w.values()?, bias.map(|b| b.values()).transpose()?);
        if x.len() < t * k || out.len() < t * n || wv.len() < n * k || bias.is_some_and(|b| b.len() < n) {
            return Err(Error::Backend {
                backend: "cpu-gemm",
                msg: format!("matmul buffers too small for [{t}, {k}] × [{n}, {k}]ᵀ"),
            });
        }
        // out = x · Wᵀ: W is [n, k] row-major, so Wᵀ has row stride 1 and column stride k.
        gemm_f32(t, n, k, out, false, (&x[..t * k], k as isize, 1), (&wv[..n * k], 1, k as isize), 1.0);
        if let Some(b) = bias {
            for row in out[..t * n].chunks_mut(n) {
                for (o, &bv) in row.iter_mut().zip(&b[..n]) {
                    *o += bv;
                }
            }
        }
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
        CpuBackend.rope(x, cos_sin, layout, t, heads, hd)
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
        // Same buffer types: borrow the cache as the reference backend's.
        let mut c = KvLayer::<CpuBackend> { k: std::mem::take(&mut cache.k), v: std::mem::take(&mut cache.v) };
        let r = CpuBackend.attention(q, k, v, &mut c, layout, t, s, out);
        (cache.k, cache.v) = (c.k, c.v);
        r
    }
    fn silu_mul(&self, gate: &Vec<f32>, up: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        CpuBackend.silu_mul(gate, up, n, out)
    }
    fn gather_rows(&self, x: &Vec<f32>, rows: &[u32], width: usize, out: &mut Vec<f32>) -> Result<()> {
        CpuBackend.gather_rows(x, rows, width, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GEMM path against the reference kernel on awkward shapes (with a bias).
    #[test]
    fn gemm_matmul_matches_reference() {
        for (t, n, k) in [(16, 7, 33), (33, 64, 17), (40, 5, 1)] {
            let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 17) as f32 * 0.05 - 0.4).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let wt = CpuBackend.upload(&HostTensor::from_f32("w", vec![n, k], w)).unwrap();
            let bt = CpuBackend.upload(&HostTensor::from_f32("b", vec![n], b)).unwrap();
            let (mut want, mut got) = (vec![0f32; t * n], vec![f32::NAN; t * n]);
            CpuBackend.matmul(&x, &wt, Some(&bt), t, &mut want).unwrap();
            CpuGemmBackend.matmul(&x, &wt, Some(&bt), t, &mut got).unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "t{t} n{n} k{k}: {a} vs {b}");
            }
        }
    }
}
