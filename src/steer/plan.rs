//! What a request asks of the residual stream: steering ops, probes (monitoring) and captures.
//! Vectors here are plain rows (`[hidden]` f32) for one residual index; the file formats live in
//! `vector.rs`. Conventions (DESIGN.md): index L (0..=N) is the residual after block L-1, index 0
//! the embedding output; `add` uses the raw vector, `ablate`/`clamp`/projections its unit vector.

use std::sync::Arc;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerKind {
    /// `h += coeff · v`
    Add,
    /// `h -= (h·u) u`
    Ablate,
    /// `h += (coeff − h·u) u`
    Clamp,
}

/// Which tokens an op touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Every token of every forward pass.
    All,
    /// Prompt (prefill) tokens only.
    Prompt,
    /// The positions that produce response tokens: the last prompt token, then every generated
    /// (or teacher-forced answer) token.
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Gt,
    Lt,
}

/// Apply an op only on tokens whose projection onto `vector`'s unit at residual index `layer`
/// (≤ the op's layer) compares with `threshold`. At the op's own layer the projection is taken
/// before any steering of that layer; at an earlier layer, after that layer's steering.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub vector: Arc<[f32]>,
    pub layer: usize,
    pub cmp: Cmp,
    pub threshold: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SteerOp {
    pub kind: SteerKind,
    /// Residual index 0..=N.
    pub layer: usize,
    /// The raw vector row for `layer` (`[hidden]`).
    pub vector: Arc<[f32]>,
    /// `add`: α; `clamp`: the target projection; `ablate`: ignored.
    pub coeff: f32,
    pub positions: Positions,
    pub when: Option<Condition>,
}

/// Any number of ops, applied in order at each layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SteeringPlan {
    pub ops: Vec<SteerOp>,
}

/// Monitoring: the projection `h·u` at residual index `layer`, per token, after that layer's steering.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub name: String,
    pub layer: usize,
    pub vector: Arc<[f32]>,
}

/// Sum of the residual at every index 0..=N over the new tokens of a forward call from
/// `from` on (token index within the call), accumulated inside the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture {
    pub from: usize,
}

/// Everything one sequence asks of the residual stream in a forward call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqSteering {
    pub plan: SteeringPlan,
    pub probes: Vec<Probe>,
    /// Which request op each run of `plan.ops` came from (for receipts); ops no source covers
    /// get a receipt of their own.
    pub sources: Vec<OpSource>,
}

/// One op as the user asked for it (a `--steer` spec or a request's `steering[i]`), expanded to
/// `plan.ops[ops]`, one per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSource {
    /// The vector's name (registry name or file stem).
    pub vector: String,
    /// [`crate::steer::vector::PersonaVector::sha256`] of the vector.
    pub sha256: String,
    pub ops: std::ops::Range<usize>,
    /// The condition as written (`evil@12:gt:3.5`), if any.
    pub when: Option<String>,
}

/// What the fused kernel counted for one steering op in one or more forward calls
/// ([`crate::backend::PlanOutputs::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCount {
    /// Tokens its positions rule selected.
    pub selected: u64,
    /// Of those, tokens it was applied to (its `when=` condition held, or it has none).
    pub applied: u64,
}

impl std::ops::AddAssign for OpCount {
    fn add_assign(&mut self, o: OpCount) {
        self.selected += o.selected;
        self.applied += o.applied;
    }
}

/// Proof that a steering op ran: what the fused kernel counted for it over a request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Receipt {
    pub vector: String,
    pub sha256: String,
    /// `add`, `ablate` or `clamp`.
    pub op: &'static str,
    pub layers: Vec<usize>,
    pub positions: &'static str,
    /// The coefficient the kernel applied at the first layer (after `scale=relative`).
    pub coeff: f32,
    /// Tokens its positions rule selected (at each of its layers; the smallest count if they
    /// differ, which would be a bug).
    pub tokens: u64,
    /// With `when=`: token·layer applications where the condition held (0 = it never fired).
    pub fired: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

impl SteerKind {
    pub fn name(self) -> &'static str {
        match self {
            SteerKind::Add => "add",
            SteerKind::Ablate => "ablate",
            SteerKind::Clamp => "clamp",
        }
    }
}

impl Positions {
    pub fn name(self) -> &'static str {
        match self {
            Positions::All => "all",
            Positions::Prompt => "prompt",
            Positions::Response => "response",
        }
    }
}

fn check_row(what: &str, layer: usize, v: &[f32], hidden: usize, n_layers: usize) -> Result<()> {
    if layer > n_layers {
        return Err(Error::Invalid(format!("{what}: layer {layer} is out of range 0..={n_layers}")));
    }
    if v.len() != hidden {
        return Err(Error::Invalid(format!(
            "{what}: vector has {} values, the model's hidden size is {hidden}",
            v.len()
        )));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::Invalid(format!("{what}: vector at layer {layer} has NaN or Inf values")));
    }
    Ok(())
}

fn check_unit(what: &str, layer: usize, v: &[f32]) -> Result<()> {
    if v.iter().all(|&x| x == 0.0) {
        return Err(Error::Invalid(format!("{what}: vector at layer {layer} is all zero (no direction)")));
    }
    Ok(())
}

impl SeqSteering {
    pub fn is_empty(&self) -> bool {
        self.plan.ops.is_empty() && self.probes.is_empty()
    }

    /// One receipt per source (and per op no source covers), from the kernel's counts for each
    /// op of the plan (`counts[i]` for `plan.ops[i]`, summed over the request's forward calls).
    pub fn receipts(&self, counts: &[OpCount]) -> Vec<Receipt> {
        let mut covered = vec![false; self.plan.ops.len()];
        let mut groups: Vec<(String, String, std::ops::Range<usize>, Option<String>)> = vec![];
        for s in &self.sources {
            let r = s.ops.start.min(self.plan.ops.len())..s.ops.end.min(self.plan.ops.len());
            r.clone().for_each(|i| covered[i] = true);
            groups.push((s.vector.clone(), s.sha256.clone(), r, s.when.clone()));
        }
        for (i, op) in self.plan.ops.iter().enumerate().filter(|(i, _)| !covered[*i]) {
            let bytes: Vec<u8> = op.vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            let sha = crate::steer::vector::sha256_hex(&bytes);
            groups.push((format!("op {}", i + 1), sha, i..i + 1, None));
        }
        groups.sort_by_key(|g| g.2.start);
        groups
            .into_iter()
            .filter(|g| !g.2.is_empty())
            .map(|(vector, sha256, r, when)| {
                let ops = &self.plan.ops[r.clone()];
                let c = |i: usize| counts.get(i).copied().unwrap_or_default();
                let conditional = ops.iter().any(|o| o.when.is_some());
                Receipt {
                    vector,
                    sha256,
                    op: ops[0].kind.name(),
                    layers: ops.iter().map(|o| o.layer).collect(),
                    positions: ops[0].positions.name(),
                    coeff: ops[0].coeff,
                    tokens: r.clone().map(|i| c(i).selected).min().unwrap_or(0),
                    fired: conditional.then(|| r.clone().map(|i| c(i).applied).sum()),
                    when,
                }
            })
            .collect()
    }

    /// Check every op and probe against the model's sizes: layers in range, vector lengths,
    /// finite values and coefficients, non-zero vectors where a unit vector is needed.
    pub fn validate(&self, hidden: usize, n_layers: usize) -> Result<()> {
        for (i, op) in self.plan.ops.iter().enumerate() {
            let what = format!("steering op {} ({:?} at layer {})", i + 1, op.kind, op.layer);
            check_row(&what, op.layer, &op.vector, hidden, n_layers)?;
            if !op.coeff.is_finite() {
                return Err(Error::Invalid(format!("{what}: coefficient {} is not a finite number", op.coeff)));
            }
            if op.kind != SteerKind::Add {
                check_unit(&what, op.layer, &op.vector)?;
            }
            if let Some(c) = &op.when {
                check_row(&format!("{what} condition"), c.layer, &c.vector, hidden, n_layers)?;
                check_unit(&format!("{what} condition"), c.layer, &c.vector)?;
                if c.layer > op.layer {
                    return Err(Error::Invalid(format!(
                        "{what}: its condition reads layer {}, after the op's own layer",
                        c.layer
                    )));
                }
                if !c.threshold.is_finite() {
                    return Err(Error::Invalid(format!("{what}: condition threshold is not a finite number")));
                }
            }
        }
        for p in &self.probes {
            let what = format!("probe `{}` at layer {}", p.name, p.layer);
            check_row(&what, p.layer, &p.vector, hidden, n_layers)?;
            check_unit(&what, p.layer, &p.vector)?;
        }
        Ok(())
    }
}
