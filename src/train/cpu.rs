//! The CPU reference of the training ops: plain loops, f64 where a sum decides the precision
//! (norm statistics, softmax), parallel over rows, heads or output channels with rayon. Each op
//! is checked against central finite differences in f64 in the tests below.

use rayon::prelude::*;

use super::backend::{SeqRows, TrainBackend};
use crate::backend::cpu::{dot, gemm_f32, CpuBackend, CpuGemmBackend, CpuVectors, CpuWeight};
use crate::backend::{AttnShape, ResidualPlan, NONE, OP_ABLATE, OP_ADD, OP_CLAMP, POS_ALL, POS_LAST, POS_PROMPT};
use crate::backend::{TOKEN_LAST, TOKEN_PROMPT};
use crate::error::{Error, Result};

fn invalid(msg: String) -> Error {
    Error::Backend { backend: "cpu", msg }
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(invalid(format!("{what}: buffer of {have} values, the op needs {want}")));
    }
    Ok(())
}

/// `dh += r·(g − x̂·mean(x̂⊙g))` with `g = w⊙dy`, `x̂ = h·r`, `r = 1/√(mean(h²)+eps)` — the same `r`
/// the forward computed (f64 sum of squares, rounded to f32 before `eps`).
pub fn rmsnorm_backward(h: &[f32], w: &[f32], eps: f32, dy: &[f32], width: usize, dh: &mut [f32]) {
    dh.par_chunks_mut(width).zip(h.par_chunks(width)).zip(dy.par_chunks(width)).for_each(|((d, hr), dyr)| {
        let ss: f64 = hr.iter().map(|&a| a as f64 * a as f64).sum();
        let r = 1.0 / ((ss / width as f64) as f32 + eps).sqrt();
        let r = r as f64;
        let dot: f64 = hr.iter().zip(dyr).zip(w).map(|((&a, &g), &wi)| a as f64 * r * g as f64 * wi as f64).sum();
        let mean = dot / width as f64;
        for (((o, &a), &g), &wi) in d.iter_mut().zip(hr).zip(dyr).zip(w) {
            *o += (r * (g as f64 * wi as f64 - a as f64 * r * mean)) as f32;
        }
    });
}

/// `dx (+)= dy · w`, `w` `[n, k]`, `dy` `[t, n]`.
pub fn matmul_backward_x(dy: &[f32], w: &[f32], t: usize, n: usize, k: usize, dx: &mut [f32], accumulate: bool) {
    gemm_f32(t, k, n, dx, accumulate, (&dy[..t * n], n as isize, 1), (&w[..n * k], k as isize, 1), 1.0);
}

/// `dw += a · dyᵀ · x` (`dy` `[t, n]`, `x` `[t, k]`, `dw` `[n, k]`).
pub fn matmul_backward_w(dy: &[f32], x: &[f32], a: f32, t: usize, n: usize, k: usize, dw: &mut [f32]) {
    gemm_f32(n, k, t, dw, true, (&dy[..t * n], 1, n as isize), (&x[..t * k], k as isize, 1), a);
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// `y += a · x` (a loop the compiler vectorises).
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// One (sequence, kv head) per task: it owns `dk`, `dv` of that head's rows and `dq` of the
/// query heads that share it. The softmax is recomputed row by row with the forward's
/// arithmetic (f32 dot products, f64 normaliser); gradients accumulate in f32 rows.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    seqs: &[SeqRows],
    s: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let hd = s.head_dim;
    let (qw, kvw) = (s.n_heads * hd, s.n_kv_heads * hd);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(SeqRows, usize)> = seqs.iter().flat_map(|&sr| (0..s.n_kv_heads).map(move |g| (sr, g))).collect();
    // Per task: dq rows [len][group][hd], dk rows [len][hd], dv rows [len][hd].
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(sr, g)| {
            let n = sr.len;
            let mut dqs = vec![0f32; n * group * hd];
            let mut dks = vec![0f32; n * hd];
            let mut dvs = vec![0f32; n * hd];
            let krow = |j: usize| &k[(sr.start + j) * kvw + g * hd..][..hd];
            let vrow = |j: usize| &v[(sr.start + j) * kvw + g * hd..][..hd];
            let mut p = vec![0f32; n];
            let mut dp = vec![0f32; n];
            for hg in 0..group {
                let head = g * group + hg;
                for i in 0..n {
                    let qi = &q[(sr.start + i) * qw + head * hd..][..hd];
                    let doi = &d_out[(sr.start + i) * qw + head * hd..][..hd];
                    let mut m = f32::NEG_INFINITY;
                    for j in 0..=i {
                        p[j] = dot(qi, krow(j)) * scale;
                        m = m.max(p[j]);
                    }
                    let mut sum = 0f64;
                    for pj in p[..=i].iter_mut() {
                        *pj = (*pj - m).exp();
                        sum += *pj as f64;
                    }
                    let inv = (1.0 / sum) as f32;
                    // D_i = Σ_j P_ij dP_ij with dP_ij = dO_i · v_j.
                    let mut d = 0f64;
                    for j in 0..=i {
                        p[j] *= inv;
                        dp[j] = dot(doi, vrow(j));
                        d += p[j] as f64 * dp[j] as f64;
                    }
                    let d = d as f32;
                    let dqi = &mut dqs[(i * group + hg) * hd..][..hd];
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - d) * scale;
                        axpy(dqi, ds, krow(j));
                        axpy(&mut dks[j * hd..(j + 1) * hd], ds, qi);
                        axpy(&mut dvs[j * hd..(j + 1) * hd], p[j], doi);
                    }
                }
            }
            (dqs, dks, dvs)
        })
        .collect();
    for (&(sr, g), (dqs, dks, dvs)) in tasks.iter().zip(&results) {
        for i in 0..sr.len {
            let row = sr.start + i;
            dq[row * qw + g * group * hd..][..group * hd].copy_from_slice(&dqs[i * group * hd..(i + 1) * group * hd]);
            dk[row * kvw + g * hd..][..hd].copy_from_slice(&dks[i * hd..(i + 1) * hd]);
            dv[row * kvw + g * hd..][..hd].copy_from_slice(&dvs[i * hd..(i + 1) * hd]);
        }
    }
}

/// `dgate = d·up·σ(g)(1 + g(1 − σ(g)))`, `dup = d·silu(g)`, in f32 as the forward computes silu.
pub fn silu_mul_backward(gate: &[f32], up: &[f32], d: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    dgate.par_chunks_mut(4096).zip(dup.par_chunks_mut(4096)).enumerate().for_each(|(c, (dg, du))| {
        let off = c * 4096;
        for j in 0..dg.len() {
            let g = gate[off + j];
            let sg = 1.0 / (1.0 + (-g).exp());
            let dj = d[off + j];
            dg[j] = dj * up[off + j] * sg * (1.0 + g * (1.0 - sg));
            du[j] = dj * g * sg;
        }
    });
}

/// Whether `op` touched token `i` of the plan (the forward's position rule, without conditions).
fn op_applies(p: &ResidualPlan, positions: u32, seq: u32, i: usize) -> bool {
    let flags = p.token_flags[i];
    p.token_seq[i] == seq
        && match positions {
            POS_ALL => true,
            POS_PROMPT => flags & TOKEN_PROMPT != 0,
            POS_LAST => flags & TOKEN_LAST != 0,
            _ => false,
        }
}

pub fn steer_backward(dh: &mut [f32], p: &ResidualPlan, vt: &CpuVectors, l: usize, t: usize) -> Result<()> {
    let ops = p.ops_at(l);
    if let Some(op) = ops.iter().find(|o| o.cond_col != NONE) {
        return Err(Error::Unsupported(format!(
            "a conditional steering op (when=) at layer {l} (op kind {}): conditions are not differentiable and \
             are refused for training",
            op.kind
        )));
    }
    let width = p.hidden;
    dh[..t * width].par_chunks_mut(width).enumerate().for_each(|(i, row)| {
        for op in ops.iter().rev() {
            if op.kind == OP_ADD || !op_applies(p, op.positions, op.seq, i) {
                continue;
            }
            debug_assert!(op.kind == OP_ABLATE || op.kind == OP_CLAMP);
            let u = vt.unit(op.vec);
            let c = dot64(row, u) as f32;
            for (a, &b) in row.iter_mut().zip(u) {
                *a -= c * b;
            }
        }
    });
    Ok(())
}

/// The reference backend and its GEMM-library variant share every training op.
macro_rules! cpu_train_backend {
    ($backend:ty) => {
        impl TrainBackend for $backend {
            fn copy(&self, src: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
                need("copy", src.len(), len)?;
                Ok(src[..len].to_vec())
            }

            fn axpy(&self, y: &mut Vec<f32>, a: f32, x: &Vec<f32>, n: usize) -> Result<()> {
                need("axpy y", y.len(), n)?;
                need("axpy x", x.len(), n)?;
                y[..n].par_chunks_mut(4096).zip(x[..n].par_chunks(4096)).for_each(|(yc, xc)| {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o += a * v;
                    }
                });
                Ok(())
            }

            fn rmsnorm_backward(
                &self,
                h: &Vec<f32>,
                w: &CpuWeight,
                eps: f32,
                dy: &Vec<f32>,
                t: usize,
                width: usize,
                dh: &mut Vec<f32>,
            ) -> Result<()> {
                for (what, len) in [("h", h.len()), ("dy", dy.len()), ("dh", dh.len())] {
                    need(&format!("rmsnorm_backward {what}"), len, t * width)?;
                }
                let w = w.values()?;
                need("rmsnorm_backward weight", w.len(), width)?;
                rmsnorm_backward(&h[..t * width], &w[..width], eps, &dy[..t * width], width, &mut dh[..t * width]);
                Ok(())
            }

            fn matmul_backward_x(
                &self,
                dy: &Vec<f32>,
                w: &CpuWeight,
                t: usize,
                dx: &mut Vec<f32>,
                accumulate: bool,
            ) -> Result<()> {
                let (n, k) = (w.shape[0], w.shape[1]);
                need("matmul_backward_x dy", dy.len(), t * n)?;
                need("matmul_backward_x dx", dx.len(), t * k)?;
                let wv = w.values()?;
                need("matmul_backward_x weight", wv.len(), n * k)?;
                matmul_backward_x(dy, wv, t, n, k, dx, accumulate);
                Ok(())
            }

            fn matmul_backward_w(
                &self,
                dy: &Vec<f32>,
                x: &Vec<f32>,
                a: f32,
                t: usize,
                n: usize,
                k: usize,
                dw: &mut [f32],
            ) -> Result<()> {
                need("matmul_backward_w dy", dy.len(), t * n)?;
                need("matmul_backward_w x", x.len(), t * k)?;
                need("matmul_backward_w dw", dw.len(), n * k)?;
                matmul_backward_w(dy, x, a, t, n, k, dw);
                Ok(())
            }

            fn attention_backward(
                &self,
                q: &Vec<f32>,
                k: &Vec<f32>,
                v: &Vec<f32>,
                d_out: &Vec<f32>,
                seqs: &[SeqRows],
                shape: AttnShape,
                dq: &mut Vec<f32>,
                dk: &mut Vec<f32>,
                dv: &mut Vec<f32>,
            ) -> Result<()> {
                let t = seqs.iter().map(|s| s.start + s.len).max().unwrap_or(0);
                let (qw, kvw) = (shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim);
                if shape.n_kv_heads == 0 || shape.n_heads % shape.n_kv_heads != 0 {
                    return Err(invalid(format!(
                        "{} query heads do not share {} kv heads",
                        shape.n_heads, shape.n_kv_heads
                    )));
                }
                for (what, len, want) in [
                    ("q", q.len(), t * qw),
                    ("d_out", d_out.len(), t * qw),
                    ("dq", dq.len(), t * qw),
                    ("k", k.len(), t * kvw),
                    ("v", v.len(), t * kvw),
                    ("dk", dk.len(), t * kvw),
                    ("dv", dv.len(), t * kvw),
                ] {
                    need(&format!("attention_backward {what}"), len, want)?;
                }
                attention_backward(q, k, v, d_out, seqs, shape, dq, dk, dv);
                Ok(())
            }

            fn silu_mul_backward(
                &self,
                gate: &Vec<f32>,
                up: &Vec<f32>,
                d_out: &Vec<f32>,
                n: usize,
                dgate: &mut Vec<f32>,
                dup: &mut Vec<f32>,
            ) -> Result<()> {
                for (what, len) in [("gate", gate.len()), ("up", up.len()), ("d_out", d_out.len())] {
                    need(&format!("silu_mul_backward {what}"), len, n)?;
                }
                need("silu_mul_backward dgate", dgate.len(), n)?;
                need("silu_mul_backward dup", dup.len(), n)?;
                silu_mul_backward(&gate[..n], &up[..n], &d_out[..n], &mut dgate[..n], &mut dup[..n]);
                Ok(())
            }

            fn steer_backward(
                &self,
                dh: &mut Vec<f32>,
                plan: &ResidualPlan,
                vectors: &CpuVectors,
                l: usize,
                t: usize,
            ) -> Result<()> {
                need("steer_backward dh", dh.len(), t * plan.hidden)?;
                plan.fits(t, l, plan.hidden, vectors.rows, vectors.hidden)?;
                steer_backward(dh, plan, vectors, l, t)
            }
        }
    };
}

cpu_train_backend!(CpuBackend);
cpu_train_backend!(CpuGemmBackend);

#[cfg(test)]
mod tests {
    //! Each backward op against central finite differences of its forward, computed in f64 on
    //! awkward shapes: ∂(Σ w⊙f(x))/∂x for a fixed random weighting w of the outputs.
    use super::*;
    use crate::backend::Backend;
    use crate::backend::{OpDesc, ProbeDesc};
    use crate::model::tensor::HostTensor;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next() as f32).collect()
        }
    }

    /// Central differences of `loss(x) = Σ w·f(x)` in f64 through an f64 forward `f`.
    fn numeric(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
        let mut xp = x.to_vec();
        (0..x.len())
            .map(|i| {
                let e = 1e-6 * (1.0 + x[i].abs());
                xp[i] = x[i] + e;
                let a = f(&xp);
                xp[i] = x[i] - e;
                let b = f(&xp);
                xp[i] = x[i];
                (a - b) / (2.0 * e)
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        let err: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
        let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().max(1e-30);
        let nmse = err / norm;
        assert!(nmse < 1e-9, "{what}: NMSE {nmse:e} (got {:?}.., want {:?}..)", &got[..3.min(got.len())], &want[..3]);
        assert!(got.iter().all(|g| g.is_finite()), "{what}: non-finite gradient");
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        for (t, width) in [(1, 5), (7, 33), (3, 64)] {
            let mut r = Rng(t as u64 * 31 + width as u64);
            let (h, w, dy) = (r.vec(t * width), r.vec(width), r.vec(t * width));
            let eps = 1e-5;
            let f = |h: &[f64]| -> f64 {
                let mut s = 0.0;
                for i in 0..t {
                    let row = &h[i * width..(i + 1) * width];
                    let rr = 1.0 / (row.iter().map(|a| a * a).sum::<f64>() / width as f64 + eps as f64).sqrt();
                    for c in 0..width {
                        s += dy[i * width + c] as f64 * row[c] * rr * w[c] as f64;
                    }
                }
                s
            };
            let want = numeric(&f64s(&h), &f);
            let mut dh = vec![0.0; t * width];
            CpuBackend
                .rmsnorm_backward(
                    &h,
                    &CpuBackend.upload(&HostTensor::from_f32("w", vec![width], w.clone())).unwrap(),
                    eps,
                    &dy,
                    t,
                    width,
                    &mut dh,
                )
                .unwrap();
            assert_close(&dh, &want, &format!("rmsnorm t{t} w{width}"));
        }
    }

    #[test]
    fn matmul_backward_matches_finite_differences() {
        for (t, n, k) in [(1, 3, 5), (7, 13, 9), (33, 10, 17)] {
            let mut r = Rng((t * n * k) as u64);
            let (x, w, dy) = (r.vec(t * k), r.vec(n * k), r.vec(t * n));
            let fx = |x: &[f64]| -> f64 {
                (0..t)
                    .map(|i| {
                        (0..n)
                            .map(|j| {
                                dy[i * n + j] as f64 * (0..k).map(|c| x[i * k + c] * w[j * k + c] as f64).sum::<f64>()
                            })
                            .sum::<f64>()
                    })
                    .sum()
            };
            let want = numeric(&f64s(&x), &fx);
            let wt = CpuBackend.upload(&HostTensor::from_f32("w", vec![n, k], w.clone())).unwrap();
            let mut dx = vec![1.0; t * k];
            CpuBackend.matmul_backward_x(&dy, &wt, t, &mut dx, false).unwrap();
            assert_close(&dx, &want, &format!("dx t{t} n{n} k{k}"));
            let mut dx2 = vec![0.5; t * k];
            CpuBackend.matmul_backward_x(&dy, &wt, t, &mut dx2, true).unwrap();
            let shifted: Vec<f64> = want.iter().map(|v| v + 0.5).collect();
            assert_close(&dx2, &shifted, "dx accumulate");
            let fw = |w: &[f64]| -> f64 {
                (0..t)
                    .map(|i| {
                        (0..n)
                            .map(|j| {
                                dy[i * n + j] as f64 * (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c]).sum::<f64>()
                            })
                            .sum::<f64>()
                    })
                    .sum()
            };
            let want = numeric(&f64s(&w), &fw);
            let mut dw = vec![0.0; n * k];
            CpuBackend.matmul_backward_w(&dy, &x, 1.0, t, n, k, &mut dw).unwrap();
            assert_close(&dw, &want, &format!("dw t{t} n{n} k{k}"));
        }
    }

    /// Causal attention over ragged sequences in f64: `[t, heads, hd]` out.
    fn attention64(q: &[f64], k: &[f64], v: &[f64], seqs: &[SeqRows], s: AttnShape) -> Vec<f64> {
        let hd = s.head_dim;
        let (qw, kvw, group) = (s.n_heads * hd, s.n_kv_heads * hd, s.n_heads / s.n_kv_heads);
        let t = seqs.iter().map(|s| s.start + s.len).max().unwrap();
        let mut out = vec![0.0; t * qw];
        for sr in seqs {
            for i in 0..sr.len {
                for h in 0..s.n_heads {
                    let g = h / group;
                    let qi = &q[(sr.start + i) * qw + h * hd..][..hd];
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kj = &k[(sr.start + j) * kvw + g * hd..][..hd];
                            qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for j in 0..=i {
                        let pj = (sc[j] - m).exp() / z;
                        for c in 0..hd {
                            out[(sr.start + i) * qw + h * hd + c] += pj * v[(sr.start + j) * kvw + g * hd + c];
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        // Odd head counts and ragged sequences (lengths 1, 7 and 4), grouped-query heads.
        for (shape, lens) in [
            (AttnShape { n_heads: 3, n_kv_heads: 1, head_dim: 5 }, vec![1, 7, 4]),
            (AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 6 }, vec![5, 2]),
            (AttnShape { n_heads: 1, n_kv_heads: 1, head_dim: 3 }, vec![9]),
        ] {
            let mut seqs = vec![];
            let mut t = 0;
            for &len in &lens {
                seqs.push(SeqRows { start: t, len });
                t += len;
            }
            let (qw, kvw) = (shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim);
            let mut r = Rng(t as u64 + shape.n_heads as u64);
            let (q, k, v, dout) = (r.vec(t * qw), r.vec(t * kvw), r.vec(t * kvw), r.vec(t * qw));
            let weigh = |o: Vec<f64>| -> f64 { o.iter().zip(&dout).map(|(a, &b)| a * b as f64).sum() };
            let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
            let want_q = numeric(&q64, &|x| weigh(attention64(x, &k64, &v64, &seqs, shape)));
            let want_k = numeric(&k64, &|x| weigh(attention64(&q64, x, &v64, &seqs, shape)));
            let want_v = numeric(&v64, &|x| weigh(attention64(&q64, &k64, x, &seqs, shape)));
            let (mut dq, mut dk, mut dv) = (vec![f32::NAN; t * qw], vec![f32::NAN; t * kvw], vec![f32::NAN; t * kvw]);
            CpuBackend.attention_backward(&q, &k, &v, &dout, &seqs, shape, &mut dq, &mut dk, &mut dv).unwrap();
            assert_close(&dq, &want_q, &format!("dq {shape:?}"));
            assert_close(&dk, &want_k, &format!("dk {shape:?}"));
            assert_close(&dv, &want_v, &format!("dv {shape:?}"));
        }
    }

    #[test]
    fn silu_mul_backward_matches_finite_differences() {
        let n = 37;
        let mut r = Rng(5);
        let (g, u, d) = (r.vec(n).iter().map(|x| x * 4.0).collect::<Vec<f32>>(), r.vec(n), r.vec(n));
        let silu = |x: f64| x / (1.0 + (-x).exp());
        let want_g = numeric(&f64s(&g), &|x| (0..n).map(|i| silu(x[i]) * u[i] as f64 * d[i] as f64).sum());
        let want_u = numeric(&f64s(&u), &|x| (0..n).map(|i| silu(g[i] as f64) * x[i] * d[i] as f64).sum());
        let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        CpuBackend.silu_mul_backward(&g, &u, &d, n, &mut dg, &mut du).unwrap();
        assert_close(&dg, &want_g, "dgate");
        assert_close(&du, &want_u, "dup");
    }

    fn plan_with(
        ops: Vec<OpDesc>,
        vectors: Vec<f32>,
        hidden: usize,
        t: usize,
        flags: Vec<u32>,
    ) -> (ResidualPlan, CpuVectors) {
        let n = vectors.len() / hidden;
        let units: Vec<f32> = vectors.chunks(hidden).flat_map(crate::engine::plan::unit).collect();
        let mut vt = CpuVectors::new(n, hidden);
        vt.write(0, &vectors, &units).unwrap();
        let nops = ops.len() as u32;
        let p = ResidualPlan {
            hidden,
            n_layers: 2,
            n_vectors: n,
            token_seq: vec![0; t],
            token_flags: flags,
            token_capture: vec![NONE; t],
            token_proj: vec![0; t],
            seq_cols: vec![0],
            ops,
            op_ranges: vec![0, 0, nops, nops],
            probes: Vec::<ProbeDesc>::new(),
            probe_ranges: vec![0; 4],
            proj_len: 0,
            n_captures: 0,
        };
        p.validate().unwrap();
        (p, vt)
    }

    /// Stacked ablate, add and clamp at one layer, on a subset of positions, against finite
    /// differences of the forward ops.
    #[test]
    fn steer_backward_matches_finite_differences() {
        let (t, hidden) = (3, 11);
        let mut r = Rng(77);
        let vectors = r.vec(3 * hidden);
        let op = |kind, vec, positions, coeff| OpDesc {
            seq: 0,
            kind,
            vec,
            positions,
            coeff,
            cond_col: NONE,
            cond_cmp: 0,
            threshold: 0.0,
        };
        let ops = vec![op(OP_ABLATE, 0, POS_ALL, 0.0), op(OP_ADD, 1, POS_ALL, 2.5), op(OP_CLAMP, 2, POS_PROMPT, 1.5)];
        let (p, vt) = plan_with(ops, vectors, hidden, t, vec![TOKEN_PROMPT, TOKEN_PROMPT | TOKEN_LAST, 0]);
        let (h, dy) = (r.vec(t * hidden), r.vec(t * hidden));
        let f = |h: &[f64]| -> f64 {
            let mut s = 0.0;
            for i in 0..t {
                let mut row = h[i * hidden..(i + 1) * hidden].to_vec();
                for o in p.ops_at(1) {
                    if !op_applies(&p, o.positions, o.seq, i) {
                        continue;
                    }
                    let u = vt.unit(o.vec);
                    match o.kind {
                        OP_ADD => {
                            row.iter_mut().zip(vt.vector(o.vec)).for_each(|(a, &b)| *a += o.coeff as f64 * b as f64)
                        }
                        _ => {
                            let target = if o.kind == OP_CLAMP { o.coeff as f64 } else { 0.0 };
                            let c = target - row.iter().zip(u).map(|(a, &b)| a * b as f64).sum::<f64>();
                            row.iter_mut().zip(u).for_each(|(a, &b)| *a += c * b as f64);
                        }
                    }
                }
                s += row.iter().zip(&dy[i * hidden..]).map(|(a, &b)| a * b as f64).sum::<f64>();
            }
            s
        };
        let want = numeric(&f64s(&h), &f);
        let mut dh = dy.clone();
        CpuBackend.steer_backward(&mut dh, &p, &vt, 1, t).unwrap();
        assert_close(&dh, &want, "steer");
        // Nothing at the other layers.
        let mut same = dy.clone();
        CpuBackend.steer_backward(&mut same, &p, &vt, 0, t).unwrap();
        assert_eq!(same, dy);
        // Conditions are refused.
        let mut pc = p.clone();
        pc.ops[0].cond_col = 0;
        let err = CpuBackend.steer_backward(&mut dh, &pc, &vt, 1, t).unwrap_err().to_string();
        assert!(err.contains("when="), "{err}");
    }
}
