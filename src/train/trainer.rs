//! The training loop: data order (seeded shuffle per epoch), micro-batches and gradient
//! accumulation, the schedule, clipping, AdamW, per-step logs with monitor projections, held-out
//! loss, and checkpoints that resume bit for bit.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use super::backend::TrainBackend;
use super::data::Example;
use super::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use super::pass::{forward_backward, DeviceLora};
use crate::atomic_file::write_atomic;
use crate::engine::sampler::Rng;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, LoraConfig};
use crate::steer::{Probe, SeqSteering};

/// How long to train and how.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub lora: LoraConfig,
    pub adamw: AdamWConfig,
    pub lr: f64,
    /// Global gradient-norm clip (`None`: off).
    pub clip: Option<f64>,
    pub schedule: Schedule,
    pub warmup: usize,
    /// Optimiser steps; when `None`, `epochs` passes over the data.
    pub steps: Option<usize>,
    pub epochs: f64,
    /// Sequences per micro-batch (at most the number of rows).
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub accum: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Held-out loss every this many steps (and after the last), when there is a held-out set.
    pub eval_every: usize,
}

impl TrainOptions {
    /// The paper's recipe with persona's defaults for the rest.
    pub fn new(lora: LoraConfig) -> Self {
        TrainOptions {
            lora,
            adamw: AdamWConfig::default(),
            lr: 1e-4,
            clip: Some(1.0),
            schedule: Schedule::Linear,
            warmup: 5,
            steps: None,
            epochs: 1.0,
            batch: 8,
            accum: 1,
            seed: 0,
            shuffle: true,
            eval_every: 10,
        }
    }
}

/// One optimiser step's record (a line of `train_log.jsonl`).
#[derive(Debug, Clone)]
pub struct StepLog {
    /// 1-based.
    pub step: usize,
    /// Mean loss over the step's target tokens, before the update.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (prompt and answer) run in the step.
    pub tokens: usize,
    pub targets: usize,
    pub seconds: f64,
    /// `(monitor name, layer, mean projection over the step's answer tokens)`.
    pub projections: Vec<(String, usize, f64)>,
    pub holdout_loss: Option<f64>,
}

impl StepLog {
    pub fn to_json(&self) -> Value {
        let mut proj = serde_json::Map::new();
        for (name, layer, x) in &self.projections {
            let e = proj.entry(name.clone()).or_insert_with(|| json!({}));
            e[layer.to_string()] = json!(x);
        }
        let mut v = json!({
            "step": self.step, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
            "tokens": self.tokens, "targets": self.targets, "seconds": self.seconds, "projections": proj,
        });
        if let Some(h) = self.holdout_loss {
            v["holdout_loss"] = json!(h);
        }
        v
    }
}

/// PEFT's initialisation: A Kaiming-uniform (a = √5, so U(−1/√in, 1/√in)), B zero; A drawn from
/// SplitMix64(seed) layer by layer, target by target, row-major.
pub fn init_adapter(config: LoraConfig, model: &crate::model::config::ModelConfig, seed: u64) -> LoraAdapter {
    let mut a = LoraAdapter::zeros(config, model);
    let mut rng = Rng::new(seed);
    let r = a.config.r;
    for layer in a.layers.iter_mut() {
        for p in layer.iter_mut().flatten() {
            let bound = 1.0 / ((p.a.len() / r) as f64).sqrt();
            for x in p.a.iter_mut() {
                *x = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
            }
        }
    }
    a
}

/// A fine-tuning run on an engine: the adapter, the optimiser and the position in the data.
///
/// ```no_run
/// use persona::{LoadedModel, backend::cpu::CpuBackend};
/// use persona::model::lora::{LoraConfig, Target};
/// use persona::train::data::{read_jsonl, DataOptions};
/// use persona::train::{init_adapter, TrainOptions, Trainer};
/// let m = LoadedModel::load(std::path::Path::new("model.gguf"), CpuBackend, 4096)?;
/// let rows = read_jsonl(std::path::Path::new("data.jsonl"), &m, &DataOptions { max_len: 512, label: None })?;
/// let lora = LoraConfig { r: 16, alpha: 32.0, use_rslora: true, targets: Target::ALL.to_vec() };
/// let mut opts = TrainOptions::new(lora.clone());
/// opts.steps = Some(30);
/// let adapter = init_adapter(lora, &m.engine.config, 0);
/// let mut t = Trainer::new(&m.engine, opts, adapter, rows, vec![], None, vec![])?;
/// t.run(&mut |log| {
///     println!("step {} loss {:.4}", log.step, log.loss);
///     true // keep going
/// })?;
/// t.adapter.save(std::path::Path::new("my-adapter"), "model.gguf")?;
/// # Ok::<(), persona::Error>(())
/// ```
pub struct Trainer<'e, B: TrainBackend> {
    engine: &'e Engine<B>,
    pub opts: TrainOptions,
    pub adapter: LoraAdapter,
    pub optimizer: AdamW,
    /// Optimiser steps taken.
    pub step: usize,
    data: Vec<Example>,
    holdout: Vec<Example>,
    steering: Option<SeqSteering>,
    monitors: Vec<Probe>,
}

impl<'e, B: TrainBackend> Trainer<'e, B> {
    /// Start from `adapter` (from [`init_adapter`] or an existing PEFT adapter).
    pub fn new(
        engine: &'e Engine<B>,
        opts: TrainOptions,
        adapter: LoraAdapter,
        data: Vec<Example>,
        holdout: Vec<Example>,
        steering: Option<SeqSteering>,
        monitors: Vec<Probe>,
    ) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::Invalid("no training rows".into()));
        }
        if opts.batch == 0 || opts.accum == 0 {
            return Err(Error::Invalid(format!(
                "batch ({}) and accum ({}) must be at least 1",
                opts.batch, opts.accum
            )));
        }
        if !(opts.lr.is_finite() && opts.lr >= 0.0) {
            return Err(Error::Invalid(format!("learning rate {} is not a finite non-negative number", opts.lr)));
        }
        if opts.steps == Some(0) || (opts.steps.is_none() && !(opts.epochs > 0.0 && opts.epochs.is_finite())) {
            return Err(Error::Invalid("train for at least one step (--steps N or --epochs E > 0)".into()));
        }
        if let Some(st) = &steering {
            st.validate(engine.config.hidden, engine.config.n_layers)?;
            if let Some(op) = st.plan.ops.iter().find(|o| o.when.is_some()) {
                return Err(Error::Unsupported(format!(
                    "steering at layer {} has a when= condition: conditions are not differentiable and are refused \
                     for training",
                    op.layer
                )));
            }
        }
        let longest = data.iter().chain(&holdout).map(|e| e.ids.len()).max().unwrap_or(0);
        if longest > engine.max_context {
            return Err(Error::Invalid(format!(
                "a training row has {longest} tokens, beyond the context of {} the model was loaded with",
                engine.max_context
            )));
        }
        let optimizer = AdamW::new(opts.adamw, &adapter);
        Ok(Trainer { engine, opts, adapter, optimizer, step: 0, data, holdout, steering, monitors })
    }

    /// Sequences per micro-batch: `batch`, but never more than the rows.
    fn micro(&self) -> usize {
        self.opts.batch.min(self.data.len())
    }

    pub fn total_steps(&self) -> usize {
        self.opts.steps.unwrap_or_else(|| {
            let per_step = (self.micro() * self.opts.accum) as f64;
            ((self.data.len() as f64 * self.opts.epochs) / per_step).ceil().max(1.0) as usize
        })
    }

    pub fn rows(&self) -> usize {
        self.data.len()
    }

    /// The row at position `p` of the data stream: epoch `p / n` in its own seeded order.
    fn row_at(&self, p: usize) -> usize {
        let n = self.data.len();
        let (epoch, i) = (p / n, p % n);
        if !self.opts.shuffle {
            return i;
        }
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(self.opts.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for j in (1..n).rev() {
            let k = (rng.next_u64() % (j as u64 + 1)) as usize;
            order.swap(j, k);
        }
        order[i]
    }

    fn micro_batch(&self, m: usize) -> Vec<&Example> {
        let b = self.micro();
        (m * b..(m + 1) * b).map(|p| &self.data[self.row_at(p)]).collect()
    }

    /// One optimiser step. With `grads_out`, the step's (unclipped) gradients are copied there.
    pub fn train_step(&mut self, grads_out: Option<&mut LoraAdapter>) -> Result<StepLog> {
        let start = Instant::now();
        let total = self.total_steps();
        let lr = self.opts.schedule.lr(self.opts.lr, self.step, self.opts.warmup, total);
        let micro: Vec<Vec<&Example>> =
            (0..self.opts.accum).map(|a| self.micro_batch(self.step * self.opts.accum + a)).collect();
        let norm: usize = micro.iter().flatten().map(|e| e.n_targets()).sum();
        if norm == 0 {
            return Err(Error::Invalid(format!("step {} has no answer tokens", self.step + 1)));
        }
        let lora = DeviceLora::upload(&self.engine.backend, &self.adapter)?;
        let mut grads = LoraAdapter::zeros(self.adapter.config.clone(), &self.engine.config);
        let (mut loss_sum, mut tokens, mut targets) = (0f64, 0, 0);
        let mut proj = vec![0f64; self.monitors.len()];
        for mb in &micro {
            let out = forward_backward(
                self.engine,
                &lora,
                mb,
                self.steering.as_ref(),
                &self.monitors,
                norm as f64,
                Some(&mut grads),
            )?;
            loss_sum += out.loss_sum;
            tokens += out.tokens;
            targets += out.targets;
            for (p, s) in proj.iter_mut().zip(&out.projection_sums) {
                *p += s;
            }
        }
        let loss = loss_sum / norm as f64;
        if let Some(g) = grads_out {
            *g = grads.clone();
        }
        let grad_norm = clip_grad_norm(&mut grads, self.opts.clip);
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::Invalid(format!(
                "step {}: the loss ({loss}) or gradient norm ({grad_norm}) is not finite; stopped before updating",
                self.step + 1
            )));
        }
        self.optimizer.step(&mut self.adapter, &grads, lr)?;
        self.step += 1;
        let projections = self
            .monitors
            .iter()
            .zip(&proj)
            .map(|(m, s)| (m.name.clone(), m.layer, s / targets.max(1) as f64))
            .collect();
        Ok(StepLog {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens,
            targets,
            seconds: start.elapsed().as_secs_f64(),
            projections,
            holdout_loss: None,
        })
    }

    /// [`Trainer::train_step`], then the held-out loss when it is due (every `eval_every` steps
    /// and after the last).
    pub fn step_and_evaluate(&mut self, grads_out: Option<&mut LoraAdapter>) -> Result<StepLog> {
        let mut log = self.train_step(grads_out)?;
        if self.step % self.opts.eval_every.max(1) == 0 || self.step == self.total_steps() {
            log.holdout_loss = self.holdout_loss()?;
        }
        Ok(log)
    }

    /// Train to the last step, with the held-out loss every `eval_every` steps and after the
    /// last; `on_step` sees each step's log and returns `false` to stop early.
    pub fn run(&mut self, on_step: &mut dyn FnMut(&StepLog) -> bool) -> Result<()> {
        while self.step < self.total_steps() {
            let log = self.step_and_evaluate(None)?;
            if !on_step(&log) {
                break;
            }
        }
        Ok(())
    }

    /// Mean loss of `rows` under the current adapter, with the training steering (as the
    /// training loss is measured), in micro-batches.
    pub fn loss_on(&self, rows: &[Example]) -> Result<f64> {
        let lora = DeviceLora::upload(&self.engine.backend, &self.adapter)?;
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in rows.chunks(self.opts.batch.max(1)) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let out = forward_backward(self.engine, &lora, &refs, self.steering.as_ref(), &[], 1.0, None)?;
            sum += out.loss_sum;
            n += out.targets;
        }
        Ok(sum / n.max(1) as f64)
    }

    pub fn holdout_loss(&self) -> Result<Option<f64>> {
        if self.holdout.is_empty() {
            return Ok(None);
        }
        self.loss_on(&self.holdout).map(Some)
    }

    /// Write the adapter, the optimiser moments and the step to `dir` (each file atomically).
    pub fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.adapter.save(dir, base_model)?;
        let mut tensors: Vec<(String, Vec<u8>, usize)> = vec![];
        for (kind, moments) in [("m", &self.optimizer.m), ("v", &self.optimizer.v)] {
            for (i, x) in moments.iter().enumerate() {
                tensors.push((format!("{kind}.{i}"), x.iter().flat_map(|v| v.to_le_bytes()).collect(), x.len()));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(k, bytes, n)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![*n], bytes)
                    .map_err(|e| Error::Invalid(format!("optimizer state {k}: {e}")))?;
                Ok((k.clone(), v))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, &None)
            .map_err(|e| Error::Invalid(format!("serializing the optimizer state: {e}")))?;
        write_atomic(&dir.join(OPTIMIZER_FILE), &bytes)?;
        let state = json!({ "step": self.step, "adam_t": self.optimizer.t });
        write_atomic(&dir.join(STATE_FILE), serde_json::to_string_pretty(&state).unwrap_or_default().as_bytes())
    }

    /// Continue from a checkpoint written by [`Trainer::save_checkpoint`] (same data and options).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let adapter = LoraAdapter::load(dir, &self.engine.config)?;
        if adapter.config.r != self.adapter.config.r || adapter.config.targets != self.adapter.config.targets {
            return Err(Error::format(dir, "the checkpoint's adapter has another rank or target set"));
        }
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let state: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
        let step = state["step"].as_u64().ok_or_else(|| Error::format(&path, "no `step`"))? as usize;
        let adam_t = state["adam_t"].as_u64().ok_or_else(|| Error::format(&path, "no `adam_t`"))?;
        let path = dir.join(OPTIMIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&path, e.to_string()))?;
        let mut opt = AdamW::new(self.opts.adamw, &adapter);
        for (kind, moments) in [("m", &mut opt.m), ("v", &mut opt.v)] {
            for (i, x) in moments.iter_mut().enumerate() {
                let key = format!("{kind}.{i}");
                let t = st.tensor(&key).map_err(|e| Error::format(&path, format!("{key}: {e}")))?;
                if t.dtype() != safetensors::Dtype::F64 || t.data().len() != x.len() * 8 {
                    return Err(Error::format(&path, format!("{key} has the wrong type or size")));
                }
                for (v, c) in x.iter_mut().zip(t.data().chunks_exact(8)) {
                    *v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
                }
            }
        }
        opt.t = adam_t;
        self.adapter = adapter;
        self.optimizer = opt;
        self.step = step;
        Ok(())
    }
}

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
