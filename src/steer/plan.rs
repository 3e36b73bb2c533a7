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
