//! The `persona` command: parses flags and calls the library.

mod generate;
mod info;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use persona::backend::cpu::CpuBackend;
use persona::LoadedModel;

#[derive(Parser)]
#[command(name = "persona", version, about = "Extract, monitor and steer persona vectors in chat models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a reply (or continue raw text / token ids).
    Generate(generate::GenerateArgs),
    /// Interactive chat with streaming output.
    Chat(generate::ChatArgs),
    /// Describe a model: architecture, sizes, dtypes, tensors.
    Info(info::InfoArgs),
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into the cache.
    Fetch,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendKind {
    /// The best available backend (today: cpu).
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

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel<CpuBackend>> {
        let path = resolve_model(&self.model)?;
        match self.backend {
            BackendKind::Auto | BackendKind::Cpu => {}
        }
        if self.context == 0 {
            bail!("--context must be at least 1");
        }
        LoadedModel::load(&path, CpuBackend, self.context).with_context(|| format!("loading {}", path.display()))
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => generate::run(a),
        Cmd::Chat(a) => generate::chat(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Fetch => persona::fetch::default_model(&mut |l| eprintln!("{l}"))
            .map(|p| println!("{}", p.display()))
            .map_err(Into::into),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
