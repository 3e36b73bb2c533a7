//! Turns each sequence's [`SeqSteering`](crate::steer::SeqSteering) and capture request into the
//! flat [`ResidualPlan`] the backends execute, and maps the plan's outputs back to sequences.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::{
    OpDesc, ProbeDesc, ResidualPlan, NONE, OP_ABLATE, OP_ADD, OP_CLAMP, POS_ALL, POS_LAST, POS_PROMPT, TOKEN_LAST,
    TOKEN_PROMPT,
};
use crate::steer::{Cmp, Positions, SteerKind};

use super::SeqInput;

/// Where a sequence's outputs live in a plan.
#[derive(Debug, Clone, Default)]
pub struct SeqColumns {
    /// Its probes' columns are `0..n_probes` of each of its tokens' projection rows (condition
    /// columns follow them).
    pub n_probes: usize,
    pub capture: Option<usize>,
}

/// `v / |v|` (norm in f64), zero for a zero vector.
pub fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if n == 0.0 {
        return vec![0.0; v.len()];
    }
    v.iter().map(|&x| (x as f64 / n) as f32).collect()
}

/// A plan and where each sequence's outputs live in it.
pub struct Built {
    /// Ops and probes index `vectors` (rows 0..) until [`Built::remap`] points them at a table.
    pub plan: ResidualPlan,
    /// The distinct vectors the plan reads (by allocation: the steering plans' `Arc`s).
    pub vectors: Vec<Arc<[f32]>>,
    pub cols: Vec<SeqColumns>,
    /// Per plan op (in plan order): its sequence (index in the call) and its index in that
    /// sequence's [`crate::steer::SteeringPlan`].
    pub op_origin: Vec<(usize, usize)>,
}

impl Built {
    /// Point every op and probe at `rows[v]` (the table row of `vectors[v]`) in a table of
    /// `n_vectors` rows.
    pub fn remap(&mut self, rows: &[u32], n_vectors: usize) {
        for op in &mut self.plan.ops {
            op.vec = rows[op.vec as usize];
        }
        for pr in &mut self.plan.probes {
            pr.vec = rows[pr.vec as usize];
        }
        self.plan.n_vectors = n_vectors;
    }
}

/// `None` when no sequence steers, probes or captures: the forward pass then runs plain.
pub fn build(seqs: &[SeqInput], hidden: usize, n_layers: usize) -> Option<Built> {
    if seqs.iter().all(|s| s.steering.is_none_or(|st| st.is_empty()) && s.capture.is_none()) {
        return None;
    }
    let mut p = ResidualPlan { hidden, n_layers, ..Default::default() };
    let mut vectors: Vec<Arc<[f32]>> = vec![];
    let mut index: HashMap<*const f32, u32> = HashMap::new();
    let mut vec_of = |v: &Arc<[f32]>| -> u32 {
        *index.entry(Arc::as_ptr(v) as *const f32).or_insert_with(|| {
            vectors.push(v.clone());
            (vectors.len() - 1) as u32
        })
    };
    // (layer, desc) lists, sorted by layer (stable) at the end; ops with their origin.
    let mut ops: Vec<(usize, OpDesc, (usize, usize))> = vec![];
    let mut probes: Vec<(usize, ProbeDesc)> = vec![];
    let mut cols = Vec::with_capacity(seqs.len());
    for (si, s) in seqs.iter().enumerate() {
        let seq = si as u32;
        let mut sc = SeqColumns::default();
        let mut n_cols = 0u32;
        let capture_slot = s.capture.map(|_| {
            p.n_captures += 1;
            p.n_captures - 1
        });
        sc.capture = capture_slot;
        if let Some(st) = s.steering {
            for pr in &st.probes {
                probes.push((pr.layer, ProbeDesc { seq, vec: vec_of(&pr.vector), col: n_cols }));
                n_cols += 1;
            }
            sc.n_probes = n_cols as usize;
            for (oi, op) in st.plan.ops.iter().enumerate() {
                let vec = vec_of(&op.vector);
                let (cond_col, cond_cmp, threshold) = match &op.when {
                    Some(c) => {
                        // A hidden probe column for the condition.
                        probes.push((c.layer, ProbeDesc { seq, vec: vec_of(&c.vector), col: n_cols }));
                        n_cols += 1;
                        (n_cols - 1, if c.cmp == Cmp::Gt { 0 } else { 1 }, c.threshold)
                    }
                    None => (NONE, 0, 0.0),
                };
                ops.push((
                    op.layer,
                    OpDesc {
                        seq,
                        kind: match op.kind {
                            SteerKind::Add => OP_ADD,
                            SteerKind::Ablate => OP_ABLATE,
                            SteerKind::Clamp => OP_CLAMP,
                        },
                        vec,
                        positions: match op.positions {
                            Positions::All => POS_ALL,
                            Positions::Prompt => POS_PROMPT,
                            Positions::Response => POS_LAST,
                        },
                        coeff: op.coeff,
                        cond_col,
                        cond_cmp,
                        threshold,
                    },
                    (si, oi),
                ));
            }
        }
        p.seq_cols.push(n_cols);
        for (i, _) in s.tokens.iter().enumerate() {
            // Prompt tokens, unless past `answer_from`; the positions that produce a response
            // token (`positions=response`): the last token of the call (the last prompt token
            // of a prefill unless more prompt follows, or a decode token), every response token,
            // and the last prompt token before a teacher-forced answer.
            let prompt = s.prompt && s.answer_from.is_none_or(|a| i < a);
            let mut flags = if prompt { TOKEN_PROMPT } else { 0 };
            let last = i + 1 == s.tokens.len() && !(prompt && s.more_prompt);
            if last || !prompt || s.answer_from.is_some_and(|a| i + 1 == a) {
                flags |= TOKEN_LAST;
            }
            p.token_seq.push(seq);
            p.token_flags.push(flags);
            p.token_proj.push(p.proj_len as u32);
            p.proj_len += n_cols as usize;
            let on = s.capture.is_some_and(|c| i >= c.from);
            p.token_capture.push(if on { capture_slot.unwrap_or(0) as u32 } else { NONE });
        }
        cols.push(sc);
    }
    // By residual index, then sequence (stable: each sequence's ops keep their order).
    ops.sort_by_key(|(l, o, _)| (*l, o.seq));
    probes.sort_by_key(|(l, pr)| (*l, pr.seq));
    let n_seqs = seqs.len();
    p.op_ranges = ResidualPlan::ranges_of(n_layers, n_seqs, ops.iter().map(|(l, o, _)| (*l, o.seq)));
    p.probe_ranges = ResidualPlan::ranges_of(n_layers, n_seqs, probes.iter().map(|(l, pr)| (*l, pr.seq)));
    let op_origin = ops.iter().map(|(_, _, o)| *o).collect();
    p.ops = ops.into_iter().map(|(_, o, _)| o).collect();
    p.probes = probes.into_iter().map(|(_, o)| o).collect();
    p.n_vectors = vectors.len();
    Some(Built { plan: p, vectors, cols, op_origin })
}
