//! Throughput benchmarks in the style of llama-bench: prompt processing (one sequence of P tokens
//! in one forward call) and token generation (B sequences decoding together, one forward call per
//! step) measured separately, with and without steering, over repetitions (mean ± sd).
//! Runs on a loaded model or on a named shape with seeded random weights (`shapes.rs`); rows are
//! reported as Markdown or JSON (`report.rs`). This file holds the timed runs and their rows; the
//! other two are re-exported here.
//!
//! ```no_run
//! use persona::backend::cpu::CpuBackend;
//! use persona::bench::{random_model, run_pp, Shape, SteerMode};
//! use persona::model::tensor::DType;
//! let shape = Shape::by_name("smollm2-135m").unwrap();
//! let (cfg, tensors) = random_model(&shape, 42, DType::F32)?;
//! let engine = persona::Engine::new(CpuBackend, cfg, &tensors, 256)?;
//! let row = run_pp(&engine, 64, SteerMode::All, 3, 42)?;
//! println!("{}: {:.1} ± {:.1} t/s", row.test, row.mean_ts, row.sd_ts);
//! # Ok::<(), persona::Error>(())
//! ```

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::engine::{Engine, SeqInput};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp};

mod report;
mod shapes;

pub use report::{commit, cpu_name, format_markdown, to_json, utc_now, BenchInfo};
pub use shapes::{
    check_memory, check_memory_for, f32_bytes, host_bytes, mem_available, param_count, random_model, Shape, SHAPE_NAMES,
};

use shapes::Rng;

/// What each sequence asks of the residual stream during a timed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SteerMode {
    /// No steering, no probes.
    None,
    /// Every layer 1..=N steered (add, all positions) and probed; one plan shared by the batch.
    All,
    /// As `All`, but every sequence with its own random vectors and coefficient.
    Mixed,
}

impl SteerMode {
    pub fn name(self) -> &'static str {
        match self {
            SteerMode::None => "none",
            SteerMode::All => "all",
            SteerMode::Mixed => "mixed",
        }
    }
}

fn random_steering(c: &ModelConfig, rng: &mut Rng) -> SeqSteering {
    let coeff = 0.5 + 3.5 * rng.unit() as f32;
    let mut s = SeqSteering::default();
    for layer in 1..=c.n_layers {
        let v: Arc<[f32]> = (0..c.hidden).map(|_| 0.02 * rng.normal()).collect::<Vec<_>>().into();
        s.plan.ops.push(SteerOp {
            kind: SteerKind::Add,
            layer,
            vector: v.clone(),
            coeff,
            positions: Positions::All,
            when: None,
        });
        s.probes.push(Probe { name: format!("bench{layer}"), layer, vector: v });
    }
    s
}

/// The steering of each of `batch` sequences for `mode` (`None` entries for no steering).
pub fn steering_for(c: &ModelConfig, mode: SteerMode, batch: usize, seed: u64) -> Vec<Option<SeqSteering>> {
    let mut rng = Rng::new(seed ^ 0x5EED_57EE);
    match mode {
        SteerMode::None => vec![None; batch],
        SteerMode::All => vec![Some(random_steering(c, &mut rng)); batch],
        SteerMode::Mixed => (0..batch).map(|_| Some(random_steering(c, &mut rng))).collect(),
    }
}

/// One benchmark row: a test (`pp512`, `tg128`) at one batch size and steering mode.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub test: String,
    /// Prompt tokens (pp) or generated tokens per sequence (tg).
    pub n_tokens: usize,
    pub batch: usize,
    pub steer: SteerMode,
    /// Tokens per second of each repetition (all sequences of the batch together).
    pub samples_ts: Vec<f64>,
    pub mean_ts: f64,
    pub sd_ts: f64,
    /// Mean wall time per token of one sequence: pp, the call ÷ P; tg, one decode step.
    pub ms_per_token: f64,
    /// Weight bytes (as stored) read per second: one read of every matmul weight per forward
    /// call (pp: per prompt; tg: per decode step of the whole batch). 0 until [`fill_rates`].
    pub gb_s: f64,
    /// Arithmetic rate: matmuls (2 FLOP per weight per token) plus attention (4 FLOP per head
    /// dimension per attended position per layer). 0 until [`fill_rates`].
    pub gflop_s: f64,
}

/// Bytes and elements of the matmul weights a forward call reads (q, k, v, o, gate, up, down of
/// every layer and the output projection, tied or not), as stored.
pub fn matmul_weights(t: &crate::model::load::ModelTensors) -> (u64, u64) {
    let mut all: Vec<&crate::model::tensor::HostTensor> = vec![t.lm_head.as_ref().unwrap_or(&t.embed)];
    for l in &t.layers {
        all.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
    }
    all.iter().fold((0, 0), |(b, n), w| (b + w.bytes().len() as u64, n + w.numel() as u64))
}

/// Fill [`BenchRow::gb_s`] and [`BenchRow::gflop_s`] from the weights and shape in `info`.
pub fn fill_rates(info: &BenchInfo, rows: &mut [BenchRow]) {
    let attn_per_pos = 4.0 * (info.n_layers * info.n_heads * info.head_dim) as f64;
    for r in rows {
        let n = r.n_tokens as f64;
        let (calls_per_s, flop_per_token) = if r.test.starts_with("pp") {
            // Position p attends to p + 1 positions: n(n+1)/2 in all.
            (r.mean_ts / n, 2.0 * info.matmul_params as f64 + attn_per_pos * (n + 1.0) / 2.0)
        } else {
            // Decode steps attend to TG_PROMPT + 1 .. TG_PROMPT + n positions.
            (
                r.mean_ts / r.batch as f64,
                2.0 * info.matmul_params as f64 + attn_per_pos * (TG_PROMPT as f64 + (n + 1.0) / 2.0),
            )
        };
        r.gb_s = info.weight_bytes as f64 * calls_per_s / 1e9;
        r.gflop_s = flop_per_token * r.mean_ts / 1e9;
    }
}

/// Mean and sample standard deviation.
pub fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n.max(1.0);
    let var = if x.len() > 1 { x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

fn row(test: String, n_tokens: usize, batch: usize, steer: SteerMode, secs: &[f64]) -> BenchRow {
    let tokens = (n_tokens * batch) as f64;
    let samples_ts: Vec<f64> = secs.iter().map(|s| tokens / s.max(1e-12)).collect();
    let (mean_ts, sd_ts) = mean_sd(&samples_ts);
    let mean_s = secs.iter().sum::<f64>() / secs.len().max(1) as f64;
    let ms_per_token = 1e3 * mean_s / n_tokens as f64;
    BenchRow { test, n_tokens, batch, steer, samples_ts, mean_ts, sd_ts, ms_per_token, gb_s: 0.0, gflop_s: 0.0 }
}

fn random_ids(rng: &mut Rng, vocab: usize, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// One test, the same inputs for every steering mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// Prompt processing: a fresh cache, one forward call over `n_prompt` tokens of one sequence.
    Pp { n_prompt: usize },
    /// Token generation: `batch` sequences, each prefilled with [`TG_PROMPT`] tokens (untimed), then
    /// `n_gen` timed decode steps, each one forward call with every sequence's next token.
    Tg { n_gen: usize, batch: usize },
}

/// Prompt tokens each sequence is prefilled with (untimed) before a tg run.
pub const TG_PROMPT: usize = 8;

impl Test {
    pub fn name(self) -> String {
        match self {
            Test::Pp { n_prompt } => format!("pp{n_prompt}"),
            Test::Tg { n_gen, .. } => format!("tg{n_gen}"),
        }
    }
    fn tokens(self) -> usize {
        match self {
            Test::Pp { n_prompt } => n_prompt,
            Test::Tg { n_gen, .. } => n_gen,
        }
    }
    fn batch(self) -> usize {
        match self {
            Test::Pp { .. } => 1,
            Test::Tg { batch, .. } => batch,
        }
    }
}

/// Run `test` for every mode in `modes`: one untimed warm-up per mode, then `reps` rounds, each
/// timing every mode once in turn, so that a machine's drift (turbo, other load) is shared by
/// all modes rather than falling on whichever ran last. Rows come back in the order of `modes`.
pub fn run_test<B: Backend>(
    e: &Engine<B>,
    test: Test,
    modes: &[SteerMode],
    reps: usize,
    seed: u64,
) -> Result<Vec<BenchRow>> {
    let (n, batch) = (test.tokens(), test.batch());
    if n == 0 || batch == 0 || reps == 0 {
        return Err(Error::Invalid(format!(
            "{}: token count, batch size and repetitions must be at least 1",
            test.name()
        )));
    }
    let c = &e.config;
    let mut rng = Rng::new(seed);
    let steering: Vec<Vec<Option<SeqSteering>>> = modes.iter().map(|&m| steering_for(c, m, batch, seed)).collect();
    let mut secs = vec![Vec::with_capacity(reps); modes.len()];
    match test {
        Test::Pp { n_prompt } => {
            let ids = random_ids(&mut rng, c.vocab, n_prompt);
            for r in 0..=reps {
                for (m, st) in steering.iter().enumerate() {
                    let mut cache = e.new_cache(1, n_prompt)?;
                    let input = SeqInput { prompt: true, steering: st[0].as_ref(), ..SeqInput::new(0, &ids) };
                    let t = Instant::now();
                    e.forward(&mut cache, &[input], false)?;
                    if r > 0 {
                        secs[m].push(t.elapsed().as_secs_f64());
                    }
                }
            }
        }
        Test::Tg { n_gen, batch } => {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|_| random_ids(&mut rng, c.vocab, TG_PROMPT)).collect();
            // Fixed random next tokens: the timing is the engine's, not a sampler's.
            let next: Vec<Vec<[u32; 1]>> =
                (0..n_gen).map(|_| (0..batch).map(|_| [rng.below(c.vocab) as u32]).collect()).collect();
            let mut cache = e.new_cache(batch, TG_PROMPT + n_gen)?;
            for r in 0..=reps {
                for (m, st) in steering.iter().enumerate() {
                    (0..batch).for_each(|s| cache.reset(s));
                    let inputs: Vec<SeqInput> = (0..batch)
                        .map(|s| SeqInput { prompt: true, steering: st[s].as_ref(), ..SeqInput::new(s, &prompts[s]) })
                        .collect();
                    e.forward(&mut cache, &inputs, false)?;
                    let t = Instant::now();
                    for step in &next {
                        let inputs: Vec<SeqInput> = (0..batch)
                            .map(|s| SeqInput { steering: st[s].as_ref(), ..SeqInput::new(s, &step[s]) })
                            .collect();
                        e.forward(&mut cache, &inputs, false)?;
                    }
                    if r > 0 {
                        secs[m].push(t.elapsed().as_secs_f64());
                    }
                }
            }
        }
    }
    Ok(modes.iter().zip(&secs).map(|(&m, s)| row(test.name(), n, batch, m, s)).collect())
}

/// Prompt processing for one mode (see [`Test::Pp`] and [`run_test`]).
pub fn run_pp<B: Backend>(e: &Engine<B>, n_prompt: usize, mode: SteerMode, reps: usize, seed: u64) -> Result<BenchRow> {
    Ok(run_test(e, Test::Pp { n_prompt }, &[mode], reps, seed)?.remove(0))
}

/// Token generation for one mode (see [`Test::Tg`] and [`run_test`]).
pub fn run_tg<B: Backend>(
    e: &Engine<B>,
    n_gen: usize,
    batch: usize,
    mode: SteerMode,
    reps: usize,
    seed: u64,
) -> Result<BenchRow> {
    Ok(run_test(e, Test::Tg { n_gen, batch }, &[mode], reps, seed)?.remove(0))
}

/// Throughput of a steered mode relative to `none` for the same test and batch.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub test: String,
    pub batch: usize,
    pub steer: SteerMode,
    /// mean t/s (steered) ÷ mean t/s (none).
    pub ratio: f64,
    /// (1 − ratio) · 100: the throughput lost to steering, in percent.
    pub overhead_pct: f64,
}

/// Every steered row that has a `none` row of the same test and batch.
pub fn overheads(rows: &[BenchRow]) -> Vec<Overhead> {
    rows.iter()
        .filter(|r| r.steer != SteerMode::None)
        .filter_map(|r| {
            let base = rows.iter().find(|b| b.steer == SteerMode::None && b.test == r.test && b.batch == r.batch)?;
            let ratio = r.mean_ts / base.mean_ts;
            Some(Overhead {
                test: r.test.clone(),
                batch: r.batch,
                steer: r.steer,
                ratio,
                overhead_pct: (1.0 - ratio) * 100.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_sd_of_known_values() {
        let (m, s) = mean_sd(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - 2.138_089_935).abs() < 1e-6, "{s}");
    }
}
