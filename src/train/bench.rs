//! Training throughput: optimiser steps timed on a fixed data order (no shuffle), as the PyTorch
//! baseline script (`scripts/train_baseline.py`) times the same step: batch `batch` in file order,
//! one untimed warm-up step, then `reps` timed steps.

use serde_json::{json, Value};

use super::backend::TrainBackend;
use super::data::Example;
use super::optim::Schedule;
use super::trainer::{init_adapter, TrainOptions, Trainer};
use crate::engine::Engine;
use crate::error::Result;
use crate::model::lora::{LoraConfig, Target};

#[derive(Debug, Clone)]
pub struct TrainBench {
    pub batch: usize,
    pub rank: usize,
    pub targets: usize,
    /// Seconds per optimiser step of each timed repetition.
    pub seconds: Vec<f64>,
    /// Tokens (prompt + answer) run per timed step.
    pub tokens: Vec<usize>,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var.sqrt())
}

impl TrainBench {
    /// (mean, sd) seconds per step.
    pub fn step_seconds(&self) -> (f64, f64) {
        mean_sd(&self.seconds)
    }
    /// (mean, sd) training tokens per second.
    pub fn tokens_per_second(&self) -> (f64, f64) {
        let rates: Vec<f64> = self.seconds.iter().zip(&self.tokens).map(|(s, &t)| t as f64 / s).collect();
        mean_sd(&rates)
    }
    pub fn to_json(&self) -> Value {
        let (s, s_sd) = self.step_seconds();
        let (r, r_sd) = self.tokens_per_second();
        json!({"test": "train", "batch": self.batch, "lora_rank": self.rank, "targets": self.targets,
               "s_per_step": s, "s_per_step_sd": s_sd, "train_tok_per_s": r, "train_tok_per_s_sd": r_sd,
               "seconds": self.seconds, "tokens": self.tokens})
    }
}

/// The benchmarked trainer: LoRA rank `rank` (alpha 2·rank, rsLoRA) on all seven targets, AdamW
/// lr 1e-4 constant, `batch` rows per step in file order, `steps` steps.
pub fn bench_trainer<B: TrainBackend>(
    engine: &Engine<B>,
    data: Vec<Example>,
    batch: usize,
    rank: usize,
    steps: usize,
) -> Result<Trainer<'_, B>> {
    let lora = LoraConfig { r: rank, alpha: 2.0 * rank as f64, use_rslora: true, targets: Target::ALL.to_vec() };
    let mut opts = TrainOptions::new(lora.clone());
    opts.batch = batch;
    opts.shuffle = false;
    opts.schedule = Schedule::Constant;
    opts.warmup = 0;
    opts.steps = Some(steps);
    let adapter = init_adapter(lora, &engine.config, 0);
    Trainer::new(engine, opts, adapter, data, vec![], None, vec![])
}

/// [`bench_trainer`]: one untimed warm-up step, then `reps` timed steps.
pub fn bench_train<B: TrainBackend>(
    engine: &Engine<B>,
    data: Vec<Example>,
    batch: usize,
    rank: usize,
    reps: usize,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<TrainBench> {
    let mut t = bench_trainer(engine, data, batch, rank, reps + 1)?;
    let mut out = TrainBench { batch: batch.min(t.rows()), rank, targets: 7, seconds: vec![], tokens: vec![] };
    for i in 0..=reps {
        let log = t.train_step(None)?;
        if i > 0 {
            out.seconds.push(log.seconds);
            out.tokens.push(log.tokens);
        }
        progress(i, log.seconds);
    }
    Ok(out)
}
