//! The `persona` command: parses flags and calls the library.

mod check;
mod generate;
mod info;
mod vectors;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use persona::backend::cpu::CpuBackend;
use persona::backend::Backend;
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
    /// Interactive chat with streaming output.
    Chat(generate::ChatArgs),
    /// Describe a model: architecture, sizes, dtypes, tensors.
    Info(info::InfoArgs),
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into the cache.
    Fetch,
    /// Check a backend op by op against the CPU reference.
    Check(check::CheckArgs),
    /// Inspect persona vector files: metadata, per-layer norms, cosine similarities; convert formats.
    Vectors(vectors::VectorsArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendKind {
    /// The best usable backend.
    Auto,
    /// The plain-Rust reference backend.
    Cpu,
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
}

pub fn resolve_model(m: &Option<PathBuf>) -> Result<PathBuf> {
    match m {
        Some(p) => Ok(p.clone()),
        None => Ok(persona::fetch::default_model(&mut |l| eprintln!("{l}"))?),
    }
}

/// A command body that works on a model loaded on any backend.
pub trait ModelTask {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()>;
}

impl ModelArgs {
    /// Load the model on the chosen backend and run `task` on it.
    pub fn run(&self, task: impl ModelTask) -> Result<()> {
        let path = resolve_model(&self.model)?;
        if self.context == 0 {
            bail!("--context must be at least 1");
        }
        let load = |b| LoadedModel::load(&path, b, self.context).with_context(|| format!("loading {}", path.display()));
        match self.backend {
            BackendKind::Auto | BackendKind::Cpu => task.run(load(CpuBackend)?),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => a.model.clone().run(a),
        Cmd::Chat(a) => a.model.clone().run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Vectors(a) => vectors::run(a),
        Cmd::Fetch => persona::fetch::default_model(&mut |l| eprintln!("{l}"))
            .map(|p| println!("{}", p.display()))
            .map_err(Into::into),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
