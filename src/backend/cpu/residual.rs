//! The fused residual op on the CPU: `h += delta`, probes, steering ops, captures, RMSNorm —
//! one pass per token row.

use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;

use crate::backend::{
    ResidualPlan, NONE, OP_ABLATE, OP_ADD, OP_CLAMP, POS_ALL, POS_LAST, POS_PROMPT, TOKEN_LAST, TOKEN_PROMPT,
};

/// A plan with its outputs, CPU side.
pub struct CpuPlan {
    pub desc: ResidualPlan,
    /// `[t, n_cols]`
    pub proj: Vec<f32>,
    /// `[n_captures, n_layers + 1, hidden]`
    pub capture: Vec<f32>,
    /// `[n_ops][2]`: tokens selected by each op's positions, and tokens it was applied to.
    pub counts: Vec<AtomicU32>,
}

impl CpuPlan {
    pub fn new(desc: &ResidualPlan) -> Self {
        let t = desc.token_seq.len();
        CpuPlan {
            proj: vec![0.0; t * desc.n_cols],
            capture: vec![0.0; desc.n_captures * (desc.n_layers + 1) * desc.hidden],
            counts: (0..2 * desc.ops.len()).map(|_| AtomicU32::new(0)).collect(),
            desc: desc.clone(),
        }
    }
}

/// `h · u` accumulated in f64 (the reference's projections).
fn project(h: &[f32], u: &[f32]) -> f32 {
    h.iter().zip(u).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32
}

/// Probes, then this token's ops (counting the tokens each selects and touches), then probes
/// again if the row changed.
fn steer_row(p: &ResidualPlan, l: usize, i: usize, h: &mut [f32], proj: &mut [f32], counts: &[AtomicU32]) {
    let probes = p.probes_at(l);
    for pr in probes {
        proj[pr.col as usize] = project(h, p.unit(pr.vec));
    }
    let (seq, flags) = (p.token_seq[i], p.token_flags[i]);
    let mut changed = false;
    let first = p.layer_ops[l] as usize;
    for (k, op) in p.ops_at(l).iter().enumerate() {
        let at = match op.positions {
            POS_ALL => true,
            POS_PROMPT => flags & TOKEN_PROMPT != 0,
            POS_LAST => flags & TOKEN_LAST != 0,
            _ => false,
        };
        if op.seq != seq || !at {
            continue;
        }
        counts[2 * (first + k)].fetch_add(1, Ordering::Relaxed);
        if op.cond_col != NONE {
            let v = proj[op.cond_col as usize];
            let pass = if op.cond_cmp == 0 { v > op.threshold } else { v < op.threshold };
            if !pass {
                continue;
            }
        }
        counts[2 * (first + k) + 1].fetch_add(1, Ordering::Relaxed);
        match op.kind {
            OP_ADD => {
                // α = 0 leaves h untouched bit for bit.
                if op.coeff != 0.0 {
                    for (a, &v) in h.iter_mut().zip(p.vector(op.vec)) {
                        *a += op.coeff * v;
                    }
                    changed = true;
                }
            }
            OP_ABLATE | OP_CLAMP => {
                let u = p.unit(op.vec);
                let target = if op.kind == OP_CLAMP { op.coeff } else { 0.0 };
                let c = target - project(h, u);
                for (a, &b) in h.iter_mut().zip(u) {
                    *a += c * b;
                }
                changed = true;
            }
            _ => {}
        }
    }
    if changed {
        for pr in probes {
            proj[pr.col as usize] = project(h, p.unit(pr.vec));
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn residual_steer_norm(
    h: &mut [f32],
    delta: Option<&[f32]>,
    mut steer: Option<(&mut CpuPlan, usize)>,
    w: &[f32],
    eps: f32,
    t: usize,
    width: usize,
    x: &mut [f32],
) {
    let (plan, proj, counts) = match steer.as_mut() {
        Some((cp, l)) => (Some((&cp.desc, *l)), Some(&mut cp.proj), &cp.counts[..]),
        None => (None, None, &[][..]),
    };
    let cols = plan.map(|(p, _)| p.n_cols).unwrap_or(0);
    let mut empty = Vec::new();
    let proj = proj.unwrap_or(&mut empty);
    let row = |i: usize, hr: &mut [f32], xr: &mut [f32], pr: &mut [f32]| {
        if let Some(d) = delta {
            for (a, b) in hr.iter_mut().zip(&d[i * width..(i + 1) * width]) {
                *a += *b;
            }
        }
        if let Some((p, l)) = plan {
            steer_row(p, l, i, hr, pr, counts);
        }
        let ss: f64 = hr.iter().map(|&a| a as f64 * a as f64).sum();
        let inv = 1.0 / ((ss / width as f64) as f32 + eps).sqrt();
        for ((o, &a), &g) in xr.iter_mut().zip(hr.iter()).zip(w) {
            *o = a * inv * g;
        }
    };
    let rows = h[..t * width].par_chunks_mut(width).zip(x[..t * width].par_chunks_mut(width)).enumerate();
    if cols > 0 {
        rows.zip(proj[..t * cols].par_chunks_mut(cols)).for_each(|((i, (hr, xr)), pr)| row(i, hr, xr, pr));
    } else {
        rows.for_each(|(i, (hr, xr))| row(i, hr, xr, &mut []));
    }
    // Captures: sum the (steered) residual of each captured token; sequential, as tokens share sums.
    if let Some((cp, l)) = steer {
        let p = &cp.desc;
        if p.n_captures > 0 {
            for i in 0..t {
                let c = p.token_capture[i];
                if c != NONE {
                    let at = (c as usize * (p.n_layers + 1) + l) * width;
                    for (s, &a) in cp.capture[at..at + width].iter_mut().zip(&h[i * width..(i + 1) * width]) {
                        *s += a;
                    }
                }
            }
        }
    }
}
