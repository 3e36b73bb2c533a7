//! The `persona` command: parses flags and calls the library.

mod bench;
mod chat;
mod check;
mod dataset;
mod finetune;
mod generate;
mod info;
mod pipelines;
mod screen_report;
mod serve;
mod traits;
mod vaccine;
mod vectors;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use persona::backend::cpu::CpuBackend;
use persona::backend::cuda::CudaBackend;
use persona::backend::wgpu::WgpuBackend;
use persona::backend::Backend;
use persona::model::lora::LoraAdapter;
use persona::model::ModelFiles;
use persona::LoadedModel;

#[derive(Parser)]
#[command(name = "persona", version, about = "Extract, monitor and steer persona vectors in chat models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a reply (or continue raw text / token ids), optionally steered and monitored.
    Generate(generate::GenerateArgs),
    /// Interactive chat, streamed, steered and monitored; slash commands change the steering (/help).
    Chat(chat::ChatArgs),
    /// Describe a model: architecture, sizes, dtypes, tensors.
    Info(info::InfoArgs),
    /// Download a model into the cache: the default (SmolLM2-135M-Instruct Q4_1), or one by name.
    Fetch(FetchArgs),
    /// Check a backend op by op against the CPU reference.
    Check(check::CheckArgs),
    /// Inspect persona vector files: metadata, per-layer norms, cosine similarities; convert formats.
    Vectors(vectors::VectorsArgs),
    /// List and validate trait definitions.
    Traits(traits::TraitsArgs),
    /// Extract a trait's persona vector from contrastive system prompts (or given answers).
    Extract(pipelines::ExtractArgs),
    /// Steering sweep over layers × coefficients: trait log-odds (or judge scores), best layer.
    Eval(pipelines::EvalArgs),
    /// Last-prompt-token projections on a ladder of system prompts: AUROC and correlation.
    Monitor(pipelines::MonitorArgs),
    /// Screen a training dataset: projection difference ΔP per sample, ranked.
    Screen(pipelines::ScreenArgs),
    /// Answers at −α, 0, +α with each answer's projection score, on the default model.
    Demo(pipelines::DemoArgs),
    /// OpenAI-compatible HTTP server with per-request steering, live projections and continuous batching.
    Serve(serve::ServeArgs),
    /// LoRA fine-tuning with steering in the training pass (preventative steering / CAFT); PEFT adapters out.
    Finetune(finetune::FinetuneArgs),
    /// A fine-tuning set made by the model: trait answers (written without their system prompt), benign ones, or a mix.
    Dataset(dataset::DatasetArgs),
    /// Preventative steering measured: plain vs steered fine-tunes, random/CAFT/other-trait controls.
    Vaccine(vaccine::VaccineArgs),
    /// Throughput benchmark (llama-bench style): prompt processing and generation, steered and not.
    Bench(bench::BenchArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendKind {
    /// The best usable backend.
    Auto,
    /// The plain-Rust reference backend.
    Cpu,
    /// NVIDIA GPU: hand-written kernels compiled by NVRTC (needs the driver and libnvrtc).
    Cuda,
    /// Vulkan, Metal or DX12 through wgpu (WGSL shaders); PERSONA_WGPU_ADAPTER picks an adapter by name.
    Wgpu,
}

/// How the CPU backend takes the activations of its quantized matmuls.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ActivationsArg {
    /// Exact: f32 activations (outputs equal the widened weights' bit for bit).
    F32,
    /// 8 bits per 32 values, as llama.cpp does, for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights: faster
    /// decode; each matmul differs from the exact one by the rounding (NMSE about 1e-5).
    Q8,
}

impl ActivationsArg {
    /// Make it the CPU backend's mode for this process. `gpu`: the GPU backend that runs instead
    /// (its name, and whether the user named it): q8 there is an error where the user asked for
    /// that backend, a warning where `--backend auto` chose it (it runs f32 activations).
    pub fn apply(self, gpu: Option<(&str, bool)>) -> Result<()> {
        use persona::backend::cpu::{set_activations, Activations};
        if let (ActivationsArg::Q8, Some((name, asked))) = (self, gpu) {
            let why = format!("--cpu-activations q8 (or PERSONA_CPU_ACTIVATIONS=q8) applies to the CPU backend only; {name} runs f32 activations");
            if asked {
                bail!("{why} (use --backend cpu)");
            }
            eprintln!("warning: {why} (add --backend cpu for 8-bit activations)");
        }
        set_activations(match (self, gpu) {
            (ActivationsArg::Q8, None) => Activations::Q8,
            _ => Activations::F32,
        });
        Ok(())
    }

    /// Training widens the weights to f32, so the 8-bit kernels would never run: refuse q8
    /// rather than ignore it.
    pub fn refuse_for_training(self, what: &str) -> Result<()> {
        if self == ActivationsArg::Q8 {
            bail!("{what} with --cpu-activations q8 (or PERSONA_CPU_ACTIVATIONS=q8): training widens the weights to f32, so the 8-bit kernels never run; leave it at f32");
        }
        Ok(())
    }
}

/// Flags shared by every command that runs a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// HF model folder or GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, short = 'm', env = "PERSONA_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// Longest sequence (prompt + generated tokens) to plan for.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to run the model with,
    /// merged into the weights at load.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Use persona vectors recorded for another model (a different `persona.model_fingerprint`)
    /// anyway, with a warning; without it they are refused.
    #[arg(long)]
    pub force: bool,
    /// CPU backend: `q8` quantizes the activations of matmuls with Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K
    /// weights to 8 bits per 32 values, as llama.cpp does (faster decode; each matmul differs
    /// from the exact one by NMSE about 1e-5); `f32` keeps them exact.
    #[arg(long, value_enum, env = "PERSONA_CPU_ACTIVATIONS", default_value = "f32", ignore_case = true)]
    pub cpu_activations: ActivationsArg,
}

pub use persona::model::load::model_name;

pub use persona::steer::spec::vector_dirs;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  persona fetch                        the default model, SmolLM2-135M-Instruct (Q4_1 GGUF)
  persona fetch qwen2.5-coder-0.5b     Qwen2.5-Coder-0.5B-Instruct, official Q4_K_M (491 MB)
  persona fetch --list                 the models persona can fetch by name")]
pub struct FetchArgs {
    /// A model by name (see --list); without one, the default model.
    pub name: Option<String>,
    /// List the models persona can fetch by name, with their sizes, licences and cache state.
    #[arg(long)]
    pub list: bool,
}

fn fetch(a: FetchArgs) -> Result<()> {
    if a.list {
        println!("{:<22} {:>9}  {:<10} {:<7} upstream", "name", "size", "licence", "cached");
        println!(
            "{:<22} {:>9}  {:<10} {:<7} HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF; the default)",
            "smollm2-135m",
            "98.4 MB",
            "Apache-2.0",
            if persona::fetch::cached_default_model().is_some() { "yes" } else { "no" }
        );
        for m in &persona::fetch::MODELS {
            let cached = persona::fetch::cached_named_model(m.name).is_some();
            println!(
                "{:<22} {:>9}  {:<10} {:<7} {}",
                m.name,
                format!("{:.1} MB", m.size as f64 / 1e6),
                m.licence,
                if cached { "yes" } else { "no" },
                m.upstream
            );
        }
        return Ok(());
    }
    let log = &mut |l: &str| eprintln!("{l}");
    let path = match a.name.as_deref() {
        None => persona::fetch::default_model(log)?,
        Some(n) if n.eq_ignore_ascii_case("smollm2-135m") => persona::fetch::default_model(log)?,
        Some(n) => match persona::fetch::named_model(n) {
            Some(m) => persona::fetch::fetch_named(m, log)?,
            None => anyhow::bail!("unknown model `{n}`; `persona fetch --list` names the models persona can fetch"),
        },
    };
    println!("{}", path.display());
    Ok(())
}

/// A `--model` argument ([`persona::fetch::resolve_model`]).
pub fn resolve_model(m: &Option<PathBuf>) -> Result<PathBuf> {
    persona::fetch::resolve_model(m.as_deref(), &mut |l| eprintln!("{l}")).map_err(|e| match e {
        // "model `X`: ..." reads as "--model `X`: ..." for the flag.
        persona::Error::Invalid(m) => anyhow::anyhow!("--{m}"),
        e => anyhow::Error::from(e).context("--model"),
    })
}

pub use persona::backend::Auto;

/// `--backend auto` ([`persona::backend::auto`]), saying which on stderr (`backend: ...`).
/// `generate`, `check` and every other command pick the same way.
pub fn auto_backend() -> Auto {
    let (b, line) = persona::backend::auto();
    eprintln!("backend: {line}");
    b
}

/// A command body that works on a model loaded on any backend.
pub trait ModelTask {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()>;
}

/// Open a model, merge an optional PEFT LoRA adapter into its weights and upload it to `b`.
fn load_model<B: Backend>(path: &Path, adapter: Option<&Path>, b: B, a: &ModelArgs) -> Result<LoadedModel<B>> {
    let mut files = ModelFiles::open(path).with_context(|| format!("loading {}", path.display()))?;
    if let Some(id) = files.config.identity.as_mut() {
        id.allow_foreign = a.force;
    }
    let context = a.context;
    if let Some(dir) = adapter {
        LoraAdapter::load(dir, &files.config)
            .and_then(|a| a.merge_into(&mut files.tensors))
            .with_context(|| format!("applying adapter {} to {}", dir.display(), path.display()))?;
    }
    LoadedModel::from_files(files, b, context).with_context(|| format!("loading {}", path.display()))
}

impl ModelArgs {
    /// Load the model on the chosen backend and run `task` on it.
    pub fn run(&self, task: impl ModelTask) -> Result<()> {
        let path = resolve_model(&self.model)?;
        if self.context == 0 {
            bail!("--context must be at least 1");
        }
        let adapter = self.adapter.as_deref();
        let act = self.cpu_activations;
        match self.backend {
            BackendKind::Cpu => {
                act.apply(None)?;
                task.run(load_model(&path, adapter, CpuBackend, self)?)
            }
            BackendKind::Cuda => {
                act.apply(Some(("--backend cuda", true)))?;
                task.run(load_model(&path, adapter, CudaBackend::new(0)?, self)?)
            }
            BackendKind::Wgpu => {
                act.apply(Some(("--backend wgpu", true)))?;
                task.run(load_model(&path, adapter, WgpuBackend::new()?, self)?)
            }
            BackendKind::Auto => match auto_backend() {
                Auto::Cuda(b) => {
                    act.apply(Some(("the cuda backend --backend auto chose", false)))?;
                    task.run(load_model(&path, adapter, b, self)?)
                }
                Auto::Wgpu(b) => {
                    act.apply(Some(("the wgpu backend --backend auto chose", false)))?;
                    task.run(load_model(&path, adapter, b, self)?)
                }
                Auto::Cpu => {
                    act.apply(None)?;
                    task.run(load_model(&path, adapter, CpuBackend, self)?)
                }
            },
        }
    }
}

fn main() {
    // Mesa's Vulkan device-select layer prints "XDG_RUNTIME_DIR is invalid" on headless machines
    // whenever wgpu probes adapters; persona chooses adapters itself. Set while single-threaded.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = Cli::parse();
    let r = persona::backend::cpu::on_pool(move || match cli.cmd {
        Cmd::Generate(a) => a.model.clone().run(a),
        Cmd::Chat(a) => a.model.clone().run(a),
        Cmd::Extract(a) => a.model.clone().run(a),
        Cmd::Eval(a) => a.model.clone().run(a),
        Cmd::Monitor(a) => a.model.clone().run(a),
        Cmd::Screen(a) => a.model.clone().run(a),
        Cmd::Demo(a) => a.model.clone().run(a),
        Cmd::Serve(a) => a.model.clone().run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Vectors(a) => vectors::run(a),
        Cmd::Traits(a) => traits::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Finetune(a) => finetune::run(a),
        Cmd::Dataset(a) => dataset::run(a),
        Cmd::Vaccine(a) => vaccine::run(a),
        Cmd::Fetch(a) => fetch(a),
    });
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
