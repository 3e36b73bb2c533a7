//! `persona bench`: prompt processing and token generation throughput, llama-bench style.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use persona::backend::cpu::CpuBackend;
use persona::backend::cuda::CudaBackend;
use persona::backend::wgpu::WgpuBackend;
use persona::backend::Backend;
use persona::bench::{self, BenchInfo, BenchRow, Shape, SteerMode};
use persona::model::lora::LoraAdapter;
use persona::model::tensor::DType;
use persona::model::ModelFiles;
use persona::Engine;

use super::{ActivationsArg, BackendKind};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ShapeName {
    /// SmolLM2-135M: 30 layers, H 576, 9/3 heads, FFN 1536, vocab 49152, tied embeddings.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// Qwen2.5-7B: 28 layers, H 3584, 28/4 heads, FFN 18944, vocab 152064, q/k/v biases.
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    /// Llama-3.1-8B: 32 layers, H 4096, 32/8 heads, FFN 14336, vocab 128256.
    #[value(name = "llama3.1-8b")]
    Llama31_8b,
}

impl ShapeName {
    fn name(self) -> &'static str {
        match self {
            ShapeName::Smollm2_135m => "smollm2-135m",
            ShapeName::Qwen25_7b => "qwen2.5-7b",
            ShapeName::Llama31_8b => "llama3.1-8b",
        }
    }
}

/// Storage of `--shape` random weights.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DtypeArg {
    /// f32 (values still bf16-representable).
    F32,
    /// bf16 as a model file would hold it: every backend keeps it as stored.
    Bf16,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SteerArg {
    /// No steering, no probes.
    None,
    /// Every layer steered (add) and probed, one plan for the whole batch.
    All,
    /// Every sequence of the batch with its own random vectors and coefficient.
    Mixed,
}

fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

#[derive(Args)]
pub struct BenchArgs {
    /// HF model folder or GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, short = 'm', env = "PERSONA_MODEL")]
    pub model: Option<PathBuf>,
    /// A named model shape with seeded random weights (bf16-representable f32) instead of a model file.
    #[arg(long, value_enum)]
    pub shape: Option<ShapeName>,
    /// Weight storage for --shape.
    #[arg(long, value_enum, default_value = "f32", requires = "shape")]
    pub dtype: DtypeArg,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to run the model with,
    /// merged into the weights at load.
    #[arg(long, value_name = "DIR", conflicts_with = "shape")]
    pub adapter: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// CPU backend: `q8` quantizes the activations of matmuls with Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K
    /// weights to 8 bits per 32 values, as llama.cpp does; `f32` keeps them exact.
    #[arg(long, value_enum, env = "PERSONA_CPU_ACTIVATIONS", default_value = "f32", ignore_case = true)]
    pub cpu_activations: ActivationsArg,
    /// Prompt lengths for prompt processing (comma list).
    #[arg(short = 'p', long = "n-prompt", value_delimiter = ',', default_value = "512", value_parser = at_least_one)]
    pub n_prompt: Vec<usize>,
    /// Tokens generated per sequence for token generation.
    #[arg(short = 'n', long = "n-gen", default_value = "128", value_parser = at_least_one)]
    pub n_gen: usize,
    /// Batch sizes for token generation: that many sequences decoding together (comma list).
    #[arg(short = 'b', long = "batch", value_delimiter = ',', default_value = "1,8", value_parser = at_least_one)]
    pub batch: Vec<usize>,
    /// Timed repetitions of each test (after one untimed warm-up).
    #[arg(short = 'r', long = "repetitions", default_value = "3", value_parser = at_least_one)]
    pub reps: usize,
    /// Steering modes (comma list).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none,all,mixed")]
    pub steer: Vec<SteerArg>,
    /// Seed for random weights, tokens and steering vectors.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Benchmark LoRA training steps instead (CPU): training tokens/s at --train-batch, rank
    /// --lora-rank, all seven targets, -r timed steps after one warm-up, rows in file order.
    #[arg(long)]
    pub train: bool,
    /// Training rows for --train (default: the shipped evil extraction answers, label pos).
    #[arg(long, requires = "train")]
    pub train_data: Option<PathBuf>,
    #[arg(long, default_value_t = 8, requires = "train", value_parser = at_least_one)]
    pub train_batch: usize,
    #[arg(long, default_value_t = 16, requires = "train", value_parser = at_least_one)]
    pub lora_rank: usize,
}

/// `persona bench --train`: LoRA training steps on the CPU backend.
fn run_train(a: &BenchArgs) -> Result<()> {
    a.cpu_activations.refuse_for_training("bench --train")?;
    if !matches!(a.backend, BackendKind::Auto | BackendKind::Cpu) {
        bail!("--train: training runs on the CPU backend (no CUDA or wgpu training kernels yet)");
    }
    if a.shape.is_some() {
        bail!("--train needs a model with a tokenizer (--model), not a --shape");
    }
    let path = super::resolve_model(&a.model)?;
    let m = persona::LoadedModel::load_with_adapter(
        &path,
        a.adapter.as_deref(),
        persona::backend::cpu::CpuGemmBackend,
        4096,
    )
    .with_context(|| format!("loading {}", path.display()))?;
    let (data_path, label) = match &a.train_data {
        Some(p) => (p.clone(), None),
        None => (super::pipelines::shipped_vectors().join("evil.jsonl"), Some("pos".to_string())),
    };
    let opts = persona::train::data::DataOptions { max_len: 4096, label };
    let rows = persona::train::data::read_jsonl(&data_path, &m, &opts)?;
    eprintln!(
        "training {} + 1 warm-up steps of batch {} (rank {}, 7 targets) on {} ({} rows)",
        a.reps,
        a.train_batch,
        a.lora_rank,
        data_path.display(),
        rows.len()
    );
    let r = persona::train::bench::bench_train(&m.engine, rows, a.train_batch, a.lora_rank, a.reps, &mut |i, s| {
        eprintln!("  step {i}{}: {s:.2} s", if i == 0 { " (warm-up)" } else { "" })
    })?;
    let info =
        BenchInfo::new(&m.engine.config, "cpu-gemm", bench::cpu_name(), path.display().to_string(), "f32".into());
    let (s, s_sd) = r.step_seconds();
    let (t, t_sd) = r.tokens_per_second();
    if a.json {
        let mut v = serde_json::to_value(&info)?;
        v["rows"] = serde_json::json!([r.to_json()]);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("persona {} · {} · {} · {}", info.persona_commit, info.backend, info.device, info.model);
        println!("\n| test | batch | rank | s/step | train tokens/s |\n|---|---:|---:|---:|---:|");
        println!("| train | {} | {} | {s:.2} ± {s_sd:.2} | {t:.1} ± {t_sd:.1} |", r.batch, r.rank);
    }
    Ok(())
}

/// A benchmark body that runs on any backend; `device` describes the hardware.
trait BackendTask {
    fn run<B: Backend>(self, b: B, device: String) -> Result<()>;
}

/// Open the chosen backend, in the same order as the model commands for `auto`
/// (CUDA, then a wgpu GPU adapter, then the CPU).
fn with_backend(kind: BackendKind, act: ActivationsArg, task: impl BackendTask) -> Result<()> {
    match kind {
        BackendKind::Cpu => {
            act.apply(None)?;
            task.run(CpuBackend, bench::cpu_name())
        }
        BackendKind::Cuda => {
            act.apply(Some(("--backend cuda", true)))?;
            let b = CudaBackend::new(0)?;
            let d = format!("{} ({})", b.device_name(), b.arch());
            task.run(b, d)
        }
        BackendKind::Wgpu => {
            act.apply(Some(("--backend wgpu", true)))?;
            let b = WgpuBackend::new()?;
            let d = b.describe();
            task.run(b, d)
        }
        BackendKind::Auto => match CudaBackend::new(0) {
            Ok(b) => {
                let d = format!("{} ({})", b.device_name(), b.arch());
                eprintln!("backend: cuda {d}");
                act.apply(Some(("the cuda backend --backend auto chose", false)))?;
                task.run(b, d)
            }
            Err(e) => match WgpuBackend::new_gpu() {
                Ok(b) => {
                    let d = b.describe();
                    eprintln!("backend: wgpu {d} (cuda not usable: {e})");
                    act.apply(Some(("the wgpu backend --backend auto chose", false)))?;
                    task.run(b, d)
                }
                Err(w) => {
                    eprintln!("backend: cpu (cuda not usable: {e}; {w})");
                    act.apply(None)?;
                    task.run(CpuBackend, bench::cpu_name())
                }
            },
        },
    }
}

/// Positions the engine must cover: the longest prompt, and a tg prompt plus its generated tokens.
fn context_needed(a: &BenchArgs) -> usize {
    let pp = a.n_prompt.iter().copied().max().unwrap_or(1);
    pp.max(bench::TG_PROMPT + a.n_gen)
}

struct Task<'a> {
    args: &'a BenchArgs,
    source: Source,
}

enum Source {
    Shape(Shape),
    File(PathBuf),
}

impl BackendTask for Task<'_> {
    fn run<B: Backend>(self, b: B, device: String) -> Result<()> {
        let a = self.args;
        let ctx = context_needed(a);
        let (engine, model, dtype, weights) = match self.source {
            Source::Shape(shape) => {
                let (dtype, label) = match a.dtype {
                    DtypeArg::F32 => (DType::F32, "f32 (bf16-representable random)"),
                    DtypeArg::Bf16 => (DType::BF16, "bf16 (random)"),
                };
                check_shape_memory(&shape, dtype, false).context("--shape")?;
                eprintln!("generating random {label} weights for {} (seed {})", shape.name, a.seed);
                let (cfg, tensors) = bench::random_model(&shape, a.seed, dtype)?;
                let e = Engine::new(b, cfg, &tensors, ctx)?;
                (e, format!("shape:{}", shape.name), label.to_string(), bench::matmul_weights(&tensors))
            }
            Source::File(path) => {
                let mut files = ModelFiles::open(&path).with_context(|| format!("loading {}", path.display()))?;
                let mut dtypes: std::collections::BTreeMap<&str, usize> = Default::default();
                for (_, _, d) in &files.listing {
                    *dtypes.entry(d.as_str()).or_default() += 1;
                }
                let mut dtype = dtypes.iter().map(|(d, n)| format!("{d}×{n}")).collect::<Vec<_>>().join(", ");
                let mut model = path.display().to_string();
                if let Some(dir) = &a.adapter {
                    LoraAdapter::load(dir, &files.config)
                        .and_then(|l| l.merge_into(&mut files.tensors))
                        .with_context(|| format!("applying adapter {} to {model}", dir.display()))?;
                    // Merging widens the targeted projections to f32.
                    dtype += "; adapter projections merged as f32";
                    model += &format!(" + adapter {}", dir.display());
                }
                let e = Engine::new(b, files.config.clone(), &files.tensors, ctx)?;
                (e, model, format!("stored {dtype}"), bench::matmul_weights(&files.tensors))
            }
        };
        if engine.max_context < ctx {
            bail!(
                "-p/-n: the run needs {ctx} positions but the model covers only {}; use shorter prompts (-p) \
                 or fewer generated tokens (-n)",
                engine.max_context
            );
        }
        let info = BenchInfo::new(&engine.config, engine.backend.name(), device, model, dtype).with_weights(weights);
        let mut rows = run_all(&engine, a)?;
        bench::fill_rates(&info, &mut rows);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&bench::to_json(&info, &rows))?);
        } else {
            print!("{}", bench::format_markdown(&info, &rows));
        }
        Ok(())
    }
}

fn run_all<B: Backend>(e: &Engine<B>, a: &BenchArgs) -> Result<Vec<BenchRow>> {
    let modes: Vec<SteerMode> = a
        .steer
        .iter()
        .map(|s| match s {
            SteerArg::None => SteerMode::None,
            SteerArg::All => SteerMode::All,
            SteerArg::Mixed => SteerMode::Mixed,
        })
        .collect();
    let tests = a
        .n_prompt
        .iter()
        .map(|&n_prompt| bench::Test::Pp { n_prompt })
        .chain(a.batch.iter().map(|&batch| bench::Test::Tg { n_gen: a.n_gen, batch }));
    let mut rows = Vec::new();
    for t in tests {
        let got = bench::run_test(e, t, &modes, a.reps, a.seed).with_context(|| t.name())?;
        for r in &got {
            eprintln!("{} batch {} steer {}: {:.2} ± {:.2} t/s", r.test, r.batch, r.steer.name(), r.mean_ts, r.sd_ts);
        }
        rows.extend(got);
    }
    Ok(rows)
}

fn check_shape_memory(shape: &Shape, dtype: DType, widens: bool) -> Result<()> {
    // PERSONA_BENCH_MEM_AVAILABLE (bytes) stands in for /proc/meminfo, for tests.
    let available = match std::env::var("PERSONA_BENCH_MEM_AVAILABLE") {
        Ok(v) => Some(v.trim().parse::<u64>().context("PERSONA_BENCH_MEM_AVAILABLE must be a number of bytes")?),
        Err(_) => bench::mem_available(),
    };
    match available {
        Some(avail) => Ok(bench::check_memory_for(shape, dtype, widens, avail)?),
        None => Ok(()),
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.train {
        return run_train(&a);
    }
    if a.n_prompt.is_empty() {
        bail!("-p/--n-prompt: give at least one prompt length");
    }
    if a.batch.is_empty() {
        bail!("-b/--batch: give at least one batch size");
    }
    if a.steer.is_empty() {
        bail!("--steer: give at least one of none, all, mixed");
    }
    let source = match a.shape {
        Some(s) => {
            // PERSONA_MODEL in the environment yields to --shape; --model on the command line does not.
            let from_env = std::env::var_os("PERSONA_MODEL").map(PathBuf::from);
            if a.model.is_some() && a.model != from_env {
                bail!("--model and --shape: give one (a model file, or a named shape with random weights)");
            }
            let shape = Shape::by_name(s.name()).context("--shape: unknown shape")?;
            // Refuse before opening a backend where even the f32-or-bf16 host copy cannot fit.
            let dtype = if a.dtype == DtypeArg::Bf16 { DType::BF16 } else { DType::F32 };
            check_shape_memory(&shape, dtype, false).context("--shape")?;
            Source::Shape(shape)
        }
        None => Source::File(super::resolve_model(&a.model)?),
    };
    with_backend(a.backend, a.cpu_activations, Task { args: &a, source })
}
