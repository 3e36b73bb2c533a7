//! Turns each sequence's [`SeqSteering`](crate::steer::SeqSteering) and capture request into the
//! flat [`ResidualPlan`] the backends execute, and maps the plan's outputs back to sequences.

use crate::backend::{
    OpDesc, ProbeDesc, ResidualPlan, NONE, OP_ABLATE, OP_ADD, OP_CLAMP, POS_ALL, POS_LAST, POS_PROMPT, TOKEN_LAST,
    TOKEN_PROMPT,
};
use crate::steer::{Cmp, Positions, SteerKind};

use super::SeqInput;

/// Where a sequence's outputs live in a plan.
#[derive(Debug, Clone, Default)]
pub struct SeqColumns {
    /// Projection column of each of the sequence's probes, in order.
    pub probe_cols: Vec<usize>,
    pub capture: Option<usize>,
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if n == 0.0 {
        return vec![0.0; v.len()];
    }
    v.iter().map(|&x| (x as f64 / n) as f32).collect()
}

/// A plan and where each sequence's outputs live in it.
pub struct Built {
    pub plan: ResidualPlan,
    pub cols: Vec<SeqColumns>,
    /// Per plan op (in plan order): its sequence (index in the call) and its index in that
    /// sequence's [`crate::steer::SteeringPlan`].
    pub op_origin: Vec<(usize, usize)>,
}

/// `None` when no sequence steers, probes or captures: the forward pass then runs plain.
pub fn build(seqs: &[SeqInput], hidden: usize, n_layers: usize) -> Option<Built> {
    if seqs.iter().all(|s| s.steering.is_none_or(|st| st.is_empty()) && s.capture.is_none()) {
        return None;
    }
    let mut p = ResidualPlan { hidden, n_layers, ..Default::default() };
    let push_vec = |p: &mut ResidualPlan, v: &[f32]| -> u32 {
        p.vectors.extend_from_slice(v);
        p.units.extend(unit(v));
        (p.vectors.len() / hidden - 1) as u32
    };
    // (layer, desc) lists, sorted by layer (stable) at the end; ops with their origin.
    let mut ops: Vec<(usize, OpDesc, (usize, usize))> = vec![];
    let mut probes: Vec<(usize, ProbeDesc)> = vec![];
    let mut cols = Vec::with_capacity(seqs.len());
    let mut n_cols = 0u32;
    for (si, s) in seqs.iter().enumerate() {
        let mut sc = SeqColumns::default();
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
            p.token_seq.push(si as u32);
            p.token_flags.push(flags);
        }
        let capture_slot = s.capture.map(|_| {
            p.n_captures += 1;
            p.n_captures - 1
        });
        for i in 0..s.tokens.len() {
            let on = s.capture.is_some_and(|c| i >= c.from);
            p.token_capture.push(if on { capture_slot.unwrap_or(0) as u32 } else { NONE });
        }
        sc.capture = capture_slot;
        if let Some(st) = s.steering {
            for pr in &st.probes {
                let vec = push_vec(&mut p, &pr.vector);
                probes.push((pr.layer, ProbeDesc { vec, col: n_cols }));
                sc.probe_cols.push(n_cols as usize);
                n_cols += 1;
            }
            for (oi, op) in st.plan.ops.iter().enumerate() {
                let vec = push_vec(&mut p, &op.vector);
                let (cond_col, cond_cmp, threshold) = match &op.when {
                    Some(c) => {
                        // A hidden probe column for the condition.
                        let cv = push_vec(&mut p, &c.vector);
                        probes.push((c.layer, ProbeDesc { vec: cv, col: n_cols }));
                        n_cols += 1;
                        (n_cols - 1, if c.cmp == Cmp::Gt { 0 } else { 1 }, c.threshold)
                    }
                    None => (NONE, 0, 0.0),
                };
                ops.push((
                    op.layer,
                    OpDesc {
                        seq: si as u32,
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
        cols.push(sc);
    }
    ops.sort_by_key(|(l, _, _)| *l);
    probes.sort_by_key(|(l, _)| *l);
    let offsets = |layers: Vec<usize>| -> Vec<u32> {
        (0..=n_layers + 1).map(|l| layers.iter().filter(|&&x| x < l).count() as u32).collect()
    };
    p.layer_ops = offsets(ops.iter().map(|(l, _, _)| *l).collect());
    p.layer_probes = offsets(probes.iter().map(|(l, _)| *l).collect());
    let op_origin = ops.iter().map(|(_, _, o)| *o).collect();
    p.ops = ops.into_iter().map(|(_, o, _)| o).collect();
    p.probes = probes.into_iter().map(|(_, o)| o).collect();
    p.n_cols = n_cols as usize;
    Some(Built { plan: p, cols, op_origin })
}
