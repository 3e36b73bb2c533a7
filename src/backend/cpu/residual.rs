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
    /// `proj_len` values: each token's row at its `token_proj` offset.
    pub proj: Vec<f32>,
    /// `[n_captures, n_layers + 1, hidden]`
    pub capture: Vec<f32>,
    /// `[n_ops][2]`: tokens selected by each op's positions, and tokens it was applied to.
    pub counts: Vec<AtomicU32>,
}

impl CpuPlan {
    pub fn new(desc: &ResidualPlan) -> Self {
        CpuPlan {
            proj: vec![0.0; desc.proj_len],
            capture: vec![0.0; desc.n_captures * (desc.n_layers + 1) * desc.hidden],
            counts: (0..2 * desc.ops.len()).map(|_| AtomicU32::new(0)).collect(),
            desc: desc.clone(),
        }
    }
}

/// The vector table on the CPU: `[rows, hidden]` raw vectors and their unit vectors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuVectors {
    pub hidden: usize,
    pub rows: usize,
    pub raw: Vec<f32>,
    pub units: Vec<f32>,
}

impl CpuVectors {
    pub fn new(rows: usize, hidden: usize) -> Self {
        CpuVectors { hidden, rows, raw: vec![0.0; rows * hidden], units: vec![0.0; rows * hidden] }
    }
    pub fn vector(&self, v: u32) -> &[f32] {
        &self.raw[v as usize * self.hidden..(v as usize + 1) * self.hidden]
    }
    pub fn unit(&self, v: u32) -> &[f32] {
        &self.units[v as usize * self.hidden..(v as usize + 1) * self.hidden]
    }
    /// Overwrite rows from `row` on.
    pub fn write(&mut self, row: usize, raw: &[f32], units: &[f32]) -> crate::error::Result<()> {
        crate::backend::check_vector_write(self.rows, self.hidden, row, raw, units)?;
        let h = self.hidden;
        self.raw[row * h..row * h + raw.len()].copy_from_slice(raw);
        self.units[row * h..row * h + units.len()].copy_from_slice(units);
        Ok(())
    }
}

/// `h · u` accumulated in f64 (the reference's projections).
fn project(h: &[f32], u: &[f32]) -> f32 {
    h.iter().zip(u).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32
}

/// The probes of the token's sequence, then its sequence's ops (counting the tokens each selects
/// and touches), then the probes again if the row changed. `proj` is the token's own projection
/// row.
fn steer_row(
    p: &ResidualPlan,
    vt: &CpuVectors,
    l: usize,
    i: usize,
    h: &mut [f32],
    proj: &mut [f32],
    counts: &[AtomicU32],
) {
    let (seq, flags) = (p.token_seq[i], p.token_flags[i]);
    let probes = p.probes_of(l, seq);
    let run_probes = |h: &[f32], proj: &mut [f32]| {
        for pr in probes {
            proj[pr.col as usize] = project(h, vt.unit(pr.vec));
        }
    };
    run_probes(h, proj);
    let mut changed = false;
    let mine = p.seq_range(&p.op_ranges, l, seq);
    let first = mine.start;
    for (k, op) in p.ops[mine].iter().enumerate() {
        let at = match op.positions {
            POS_ALL => true,
            POS_PROMPT => flags & TOKEN_PROMPT != 0,
            POS_LAST => flags & TOKEN_LAST != 0,
            _ => false,
        };
        if !at {
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
                    for (a, &v) in h.iter_mut().zip(vt.vector(op.vec)) {
                        *a += op.coeff * v;
                    }
                    changed = true;
                }
            }
            OP_ABLATE | OP_CLAMP => {
                let u = vt.unit(op.vec);
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
        run_probes(h, proj);
    }
}

#[allow(clippy::too_many_arguments)]
pub fn residual_steer_norm(
    h: &mut [f32],
    delta: Option<&[f32]>,
    steer: Option<(&mut CpuPlan, &CpuVectors, usize)>,
    w: &[f32],
    eps: f32,
    t: usize,
    width: usize,
    x: &mut [f32],
) {
    let add_delta = |i: usize, hr: &mut [f32]| {
        if let Some(d) = delta {
            for (a, b) in hr.iter_mut().zip(&d[i * width..(i + 1) * width]) {
                *a += *b;
            }
        }
    };
    let norm = |hr: &[f32], xr: &mut [f32]| {
        let ss: f64 = hr.iter().map(|&a| a as f64 * a as f64).sum();
        let inv = 1.0 / ((ss / width as f64) as f32 + eps).sqrt();
        for ((o, &a), &g) in xr.iter_mut().zip(hr).zip(w) {
            *o = a * inv * g;
        }
    };
    let rows = h[..t * width].par_chunks_mut(width).zip(x[..t * width].par_chunks_mut(width)).enumerate();
    let Some((cp, vt, l)) = steer else {
        rows.for_each(|(i, (hr, xr))| {
            add_delta(i, hr);
            norm(hr, xr);
        });
        return;
    };
    let p = &cp.desc;
    // Each token's projection row, split off `proj` in token order: `validate` checked that the
    // rows follow each other from 0 without gaps.
    let mut proj_rows: Vec<&mut [f32]> = Vec::with_capacity(t);
    let mut rest: &mut [f32] = &mut cp.proj;
    for i in 0..t {
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(p.proj_row(i).1);
        proj_rows.push(row);
        rest = tail;
    }
    let counts = &cp.counts[..];
    rows.zip(proj_rows.into_par_iter()).for_each(|((i, (hr, xr)), pr)| {
        add_delta(i, hr);
        steer_row(p, vt, l, i, hr, pr, counts);
        norm(hr, xr);
    });
    // Captures: sum the (steered) residual of each captured token; sequential, as tokens share sums.
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
