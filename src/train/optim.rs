//! AdamW with decoupled weight decay (torch.optim.AdamW's arithmetic), global-norm gradient
//! clipping (torch's `clip_grad_norm_`), and the learning-rate schedules of HF transformers
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`). State in f64.

use crate::error::{Error, Result};
use crate::model::lora::LoraAdapter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            _ => Err(Error::Invalid(format!("unknown schedule `{s}` (constant or linear)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
        }
    }

    /// The learning rate of optimiser step `step` (0-based) of `total`, as HF computes it: a
    /// linear warm-up from 0 over `warmup` steps, then constant or linear decay to 0 at `total`.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        match self {
            Schedule::Constant => base,
            Schedule::Linear => {
                base * ((total - step.min(total)) as f64 / (total - warmup.min(total)).max(1) as f64).max(0.0)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Moments per parameter, in the order of [`params`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken.
    pub t: u64,
    pub m: Vec<Vec<f64>>,
    pub v: Vec<Vec<f64>>,
}

/// Every parameter tensor of an adapter, in a fixed order (layer, target, A then B).
pub fn params(a: &LoraAdapter) -> Vec<&Vec<f32>> {
    a.layers.iter().flat_map(|l| l.iter().flatten()).flat_map(|p| [&p.a, &p.b]).collect()
}

pub fn params_mut(a: &mut LoraAdapter) -> Vec<&mut Vec<f32>> {
    a.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()).flat_map(|p| [&mut p.a, &mut p.b]).collect()
}

/// The global L2 norm of all gradients (f64).
pub fn grad_norm(g: &LoraAdapter) -> f64 {
    params(g).iter().map(|p| p.iter().map(|&x| x as f64 * x as f64).sum::<f64>()).sum::<f64>().sqrt()
}

/// torch's `clip_grad_norm_`: scale by `max / (norm + 1e-6)` when that is below 1. Returns the
/// norm before clipping.
pub fn clip_grad_norm(g: &mut LoraAdapter, max: Option<f64>) -> f64 {
    let norm = grad_norm(g);
    if let Some(max) = max {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for p in params_mut(g) {
                for x in p.iter_mut() {
                    *x = (*x as f64 * coef) as f32;
                }
            }
        }
    }
    norm
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &LoraAdapter) -> Self {
        let sizes: Vec<usize> = self::params(params).iter().map(|p| p.len()).collect();
        AdamW {
            config,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One step at learning rate `lr`: `p ← p·(1 − lr·wd)`, then the bias-corrected Adam update.
    pub fn step(&mut self, p: &mut LoraAdapter, g: &LoraAdapter, lr: f64) -> Result<()> {
        let c = self.config;
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let (ps, gs) = (params_mut(p), params(g));
        if ps.len() != self.m.len() || gs.len() != ps.len() {
            return Err(Error::Invalid("optimiser state does not match the adapter".into()));
        }
        for (((p, g), m), v) in ps.into_iter().zip(gs).zip(&mut self.m).zip(&mut self.v) {
            for i in 0..p.len() {
                let gi = g[i] as f64;
                let mut x = p[i] as f64 * (1.0 - lr * c.weight_decay);
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
                let denom = (v[i].sqrt() / bc2.sqrt()) + c.eps;
                x -= lr / bc1 * m[i] / denom;
                p[i] = x as f32;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_hf() {
        // get_linear_schedule_with_warmup(warmup=5, total=20) at lr 1.0
        let l = |s| Schedule::Linear.lr(1.0, s, 5, 20);
        assert_eq!(l(0), 0.0);
        assert_eq!(l(1), 0.2);
        assert_eq!(l(5), 1.0);
        assert_eq!(l(10), 10.0 / 15.0);
        assert_eq!(l(20), 0.0);
        assert_eq!(Schedule::Constant.lr(2.0, 3, 0, 10), 2.0);
        assert_eq!(Schedule::Constant.lr(2.0, 1, 4, 10), 0.5);
    }
}
