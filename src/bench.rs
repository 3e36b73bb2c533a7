//! Throughput benchmarks in the style of llama-bench: prompt processing (one sequence of P tokens
//! in one forward call) and token generation (B sequences decoding together, one forward call per
//! step) measured separately, with and without steering, over repetitions (mean ± sd).
//! Runs on a loaded model or on a named shape with seeded random weights.
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

use half::{bf16, f16};
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::engine::{Engine, SeqInput};
use crate::error::{Error, Result};
use crate::model::config::{Arch, Llama3Scaling, ModelConfig, RopeConfig};
use crate::model::load::{LayerTensors, ModelTensors};
use crate::model::tensor::{DType, HostTensor, Storage};
use crate::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp};

/// A named model shape: the sizes of a real checkpoint, for random-weight benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub config: ModelConfig,
}

/// Names accepted by [`Shape::by_name`].
pub const SHAPE_NAMES: [&str; 3] = ["smollm2-135m", "qwen2.5-7b", "llama3.1-8b"];

impl Shape {
    /// The shape of SmolLM2-135M, Qwen2.5-7B or Llama-3.1-8B (see [`SHAPE_NAMES`]).
    pub fn by_name(name: &str) -> Option<Shape> {
        #[allow(clippy::too_many_arguments)]
        fn cfg(
            arch: Arch,
            layers: usize,
            hidden: usize,
            heads: (usize, usize),
            head_dim: usize,
            ffn: usize,
            vocab: usize,
            tied: bool,
            rope: RopeConfig,
            eps: f32,
        ) -> ModelConfig {
            ModelConfig {
                arch,
                hidden,
                intermediate: ffn,
                n_layers: layers,
                n_heads: heads.0,
                n_kv_heads: heads.1,
                head_dim,
                vocab,
                rms_eps: eps,
                rope,
                max_positions: 32768,
                tie_embeddings: tied,
                qkv_bias: arch == Arch::Qwen2,
                bos_id: None,
                eos_ids: vec![],
            }
        }
        let plain = |theta| RopeConfig { theta, llama3: None };
        let config = match name {
            "smollm2-135m" => cfg(Arch::Llama, 30, 576, (9, 3), 64, 1536, 49152, true, plain(100000.0), 1e-5),
            "qwen2.5-7b" => cfg(Arch::Qwen2, 28, 3584, (28, 4), 128, 18944, 152064, false, plain(1e6), 1e-6),
            "llama3.1-8b" => {
                let llama3 = Llama3Scaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                };
                let rope = RopeConfig { theta: 500000.0, llama3: Some(llama3) };
                cfg(Arch::Llama, 32, 4096, (32, 8), 128, 14336, 128256, false, rope, 1e-5)
            }
            _ => return None,
        };
        let name = SHAPE_NAMES.iter().copied().find(|n| *n == name)?;
        Some(Shape { name, config })
    }
}

/// Number of weights of a model with this config (embedding, blocks, final norm, untied head).
pub fn param_count(c: &ModelConfig) -> usize {
    let (h, f) = (c.hidden, c.intermediate);
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let bias = if c.qkv_bias { q + 2 * kv } else { 0 };
    let layer = 2 * h + q * h + 2 * kv * h + bias + h * q + 3 * f * h;
    let head = if c.tie_embeddings { 0 } else { c.vocab * h };
    c.vocab * h + c.n_layers * layer + h + head
}

/// Bytes of the f32 host copy of a random model with this config.
pub fn f32_bytes(c: &ModelConfig) -> u64 {
    param_count(c) as u64 * 4
}

/// `MemAvailable` from /proc/meminfo, in bytes (`None` where there is no /proc).
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes the host holds for a random model with weights of `dtype`; a backend that widens 16-bit
/// weights to f32 on upload (`widens`: the CPU) holds that f32 copy as well.
pub fn host_bytes(c: &ModelConfig, dtype: DType, widens: bool) -> u64 {
    let per = dtype.size() + if widens && dtype != DType::F32 { 4 } else { 0 };
    param_count(c) as u64 * per as u64
}

/// Refuse a shape whose f32 host copy needs more than `available` bytes.
pub fn check_memory(shape: &Shape, available: u64) -> Result<()> {
    check_memory_for(shape, DType::F32, false, available)
}

/// Refuse a shape whose host copy in `dtype` (plus the f32 copy of a widening backend) needs
/// more than `available` bytes.
pub fn check_memory_for(shape: &Shape, dtype: DType, widens: bool, available: u64) -> Result<()> {
    let need = host_bytes(&shape.config, dtype, widens);
    if need > available {
        let name = format!("{dtype:?}").to_lowercase();
        let what = if widens && dtype != DType::F32 { format!("{name} + widened f32") } else { name };
        return Err(Error::Invalid(format!(
            "shape {} needs {need} bytes ({:.1} GiB) for its {what} weights on the host, but only {available} bytes \
             ({:.1} GiB) are available (MemAvailable); run it on a machine with more memory",
            shape.name,
            need as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// SplitMix64: a tiny seeded generator; every tensor and chunk gets its own stream.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed.wrapping_mul(0x100_0000_01B3), |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
}

/// `center + scale · N(0,1)`, rounded to bf16-representable values, generated in parallel chunks;
/// stored as f32, or as 16-bit values in anonymous memory (as a model file's would be mapped).
fn random_tensor(
    seed: u64,
    name: String,
    shape: Vec<usize>,
    center: f32,
    scale: f32,
    dtype: DType,
) -> Result<HostTensor> {
    const CHUNK: usize = 1 << 20;
    let n: usize = shape.iter().product();
    let base = name_seed(seed, &name);
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut r = Rng::new(base.wrapping_add(i as u64));
        for x in c {
            *x = bf16::from_f32(center + scale * r.normal()).to_f32();
        }
    });
    if dtype == DType::F32 {
        return Ok(HostTensor::from_f32(name, shape, data));
    }
    let len = n * 2;
    let io = |e| Error::io(format!("anonymous memory for {name}"), e);
    let mut map = memmap2::MmapMut::map_anon(len.max(1)).map_err(io)?;
    map[..len].par_chunks_mut(2 * CHUNK).zip(data.par_chunks(CHUNK)).for_each(|(dst, src)| {
        for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
            let b = if dtype == DType::BF16 { bf16::from_f32(x).to_le_bytes() } else { f16::from_f32(x).to_le_bytes() };
            d.copy_from_slice(&b);
        }
    });
    let map = Arc::new(map.make_read_only().map_err(io)?);
    Ok(HostTensor { name, shape, storage: Storage::Mapped { map, offset: 0, len, dtype } })
}

/// A model of `shape` with seeded random weights (never zeros): projections and embeddings
/// N(0, 0.02²), norm weights 1 + N(0, 0.02²), biases N(0, 0.02²); every value bf16-representable,
/// stored as `dtype` (the same values for every dtype but f16, which rounds them once more).
pub fn random_model(shape: &Shape, seed: u64, dtype: DType) -> Result<(ModelConfig, ModelTensors)> {
    let c = &shape.config;
    let (h, f) = (c.hidden, c.intermediate);
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let w = |name: String, shape: Vec<usize>| random_tensor(seed, name, shape, 0.0, 0.02, dtype);
    let norm = |name: String| random_tensor(seed, name, vec![h], 1.0, 0.02, dtype);
    let layers = (0..c.n_layers)
        .map(|i| {
            let p = format!("model.layers.{i}.");
            let bias =
                |n: &str, len: usize| c.qkv_bias.then(|| w(format!("{p}self_attn.{n}.bias"), vec![len])).transpose();
            Ok(LayerTensors {
                attn_norm: norm(format!("{p}input_layernorm.weight"))?,
                wq: w(format!("{p}self_attn.q_proj.weight"), vec![q, h])?,
                wk: w(format!("{p}self_attn.k_proj.weight"), vec![kv, h])?,
                wv: w(format!("{p}self_attn.v_proj.weight"), vec![kv, h])?,
                bq: bias("q_proj", q)?,
                bk: bias("k_proj", kv)?,
                bv: bias("v_proj", kv)?,
                wo: w(format!("{p}self_attn.o_proj.weight"), vec![h, q])?,
                mlp_norm: norm(format!("{p}post_attention_layernorm.weight"))?,
                w_gate: w(format!("{p}mlp.gate_proj.weight"), vec![f, h])?,
                w_up: w(format!("{p}mlp.up_proj.weight"), vec![f, h])?,
                w_down: w(format!("{p}mlp.down_proj.weight"), vec![h, f])?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tensors = ModelTensors {
        embed: w("model.embed_tokens.weight".into(), vec![c.vocab, h])?,
        layers,
        final_norm: norm("model.norm.weight".into())?,
        lm_head: (!c.tie_embeddings).then(|| w("lm_head.weight".into(), vec![c.vocab, h])).transpose()?,
    };
    Ok((c.clone(), tensors))
}

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
    BenchRow { test, n_tokens, batch, steer, samples_ts, mean_ts, sd_ts, ms_per_token: 1e3 * mean_s / n_tokens as f64 }
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

/// Where and on what a benchmark ran, recorded with its rows.
#[derive(Debug, Clone, Serialize)]
pub struct BenchInfo {
    pub persona_commit: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub backend: String,
    pub device: String,
    /// The model file or `shape:<name>` (random weights).
    pub model: String,
    pub dtype: String,
    pub arch: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub params: usize,
    pub threads: usize,
}

impl BenchInfo {
    pub fn new(c: &ModelConfig, backend: &str, device: String, model: String, dtype: String) -> Self {
        BenchInfo {
            persona_commit: commit(),
            date: utc_now(),
            backend: backend.into(),
            device,
            model,
            dtype,
            arch: c.arch.name().into(),
            n_layers: c.n_layers,
            hidden: c.hidden,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            ffn: c.intermediate,
            vocab: c.vocab,
            params: param_count(c),
            threads: rayon::current_num_threads(),
        }
    }
}

/// `git rev-parse --short HEAD` of the working directory, else of the source tree this was built
/// from, else "unknown".
pub fn commit() -> String {
    let try_in = |dir: &std::path::Path| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["rev-parse", "--short", "HEAD"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    };
    std::env::current_dir()
        .ok()
        .and_then(|d| try_in(&d))
        .or_else(|| try_in(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))))
        .unwrap_or_else(|| "unknown".into())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The CPU's model name from /proc/cpuinfo, with the number of logical cores.
pub fn cpu_name() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name"))?.split_once(':').map(|(_, v)| v.trim().into()))
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{name} ({cores} cores)")
}

/// The rows as a Markdown table, the overhead ratios below, headed by where they ran.
pub fn format_markdown(info: &BenchInfo, rows: &[BenchRow]) -> String {
    let mut s = format!(
        "persona {} · {} · backend {} · {}\nmodel {} · {} · {} layers, H {}, heads {}/{}, head_dim {}, FFN {}, \
         vocab {} · {:.1} M params · {} threads\n\n",
        info.persona_commit,
        info.date,
        info.backend,
        info.device,
        info.model,
        info.dtype,
        info.n_layers,
        info.hidden,
        info.n_heads,
        info.n_kv_heads,
        info.head_dim,
        info.ffn,
        info.vocab,
        info.params as f64 / 1e6,
        info.threads
    );
    s += "| test | batch | steer | t/s | ms/token |\n|---|--:|---|--:|--:|\n";
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.2} ± {:.2} | {:.2} |\n",
            r.test,
            r.batch,
            r.steer.name(),
            r.mean_ts,
            r.sd_ts,
            r.ms_per_token
        );
    }
    let o = overheads(rows);
    if !o.is_empty() {
        s += "\n| test | batch | steer vs none | throughput ratio | overhead |\n|---|--:|---|--:|--:|\n";
        for x in &o {
            s += &format!(
                "| {} | {} | {} | {:.3} | {:+.1}% |\n",
                x.test,
                x.batch,
                x.steer.name(),
                x.ratio,
                x.overhead_pct
            );
        }
    }
    s
}

/// The rows, overheads and run description as one JSON document.
pub fn to_json(info: &BenchInfo, rows: &[BenchRow]) -> serde_json::Value {
    serde_json::json!({ "info": info, "rows": rows, "overheads": overheads(rows) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_param_count_matches_the_checkpoint() {
        // SmolLM2-135M has 134,515,008 parameters (tied embeddings).
        assert_eq!(param_count(&Shape::by_name("smollm2-135m").unwrap().config), 134_515_008);
    }

    #[test]
    fn mean_sd_of_known_values() {
        let (m, s) = mean_sd(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - 2.138_089_935).abs() < 1e-6, "{s}");
    }

    #[test]
    fn utc_date_format() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }
}
