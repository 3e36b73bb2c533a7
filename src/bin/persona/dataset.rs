//! `persona dataset`: a fine-tuning set made by the model itself (trait answers written without
//! their system prompt, benign answers, or a mixture), resumable.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use persona::backend::Backend;
use persona::persona::dataset::{build, plan, DatasetOptions, Kind};
use persona::persona::traits::{find_trait, TraitDef};
use persona::LoadedModel;

use super::{ModelArgs, ModelTask};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    /// Answers under the trait's positive (eliciting) instructions.
    Pos,
    /// Answers under the trait's negative (suppressing) instructions.
    Neg,
    /// Answers with no system prompt (the model's own).
    Benign,
}

#[derive(Args, Debug, Clone)]
pub struct DatasetArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Trait name in the catalog (traits/) or a path to a trait JSON file.
    #[arg(long = "trait")]
    pub trait_name: String,
    /// Which system prompt the trait rows are answered under (rows never contain it).
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Percent (0–100) of trait rows; the rest are benign answers to the same questions (seeded choice).
    #[arg(long, value_name = "K")]
    pub mix: Option<f64>,
    /// Output JSONL file (its folder is created); an interrupted run resumes from it.
    #[arg(long)]
    pub out: PathBuf,
    /// Answers per question.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Use at most this many of the trait's extraction questions (default: all).
    #[arg(long)]
    pub questions: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences per generation batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

struct Task {
    t: TraitDef,
    o: DatasetOptions,
    /// `--mix` as given (percent), for the summary.
    mix: Option<f64>,
    out: PathBuf,
}

/// Check everything that needs no model (trait, options, output path), then load the model and build.
pub fn run(a: DatasetArgs) -> Result<()> {
    let t = find_trait(&a.trait_name)?;
    let kind = match a.kind {
        KindArg::Pos => Kind::Pos,
        KindArg::Neg => Kind::Neg,
        KindArg::Benign => Kind::Benign,
    };
    let mix = match a.mix {
        None => None,
        Some(_) if kind == Kind::Benign => {
            bail!("--mix K puts K% trait rows among benign ones: use it with --kind pos or --kind neg")
        }
        Some(k) if (0.0..=100.0).contains(&k) => Some(k / 100.0),
        Some(k) => bail!("--mix {k}: expected a percentage of trait rows from 0 to 100"),
    };
    if a.questions == Some(0) {
        bail!("--questions 0: use at least 1 question");
    }
    if a.samples == 0 {
        bail!("--samples 0: use at least 1 answer per question");
    }
    if a.batch == 0 {
        bail!("--batch 0: use at least 1 sequence per batch");
    }
    let o = DatasetOptions {
        kind,
        mix,
        questions: a.questions.unwrap_or(usize::MAX),
        samples: a.samples,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        batch: a.batch,
        show_progress: true,
    };
    plan(&t, &o)?;
    if a.out.is_dir() {
        bail!("--out {} is a folder; give a .jsonl file path", a.out.display());
    }
    ensure_parent(&a.out)?;
    a.model.clone().run(Task { t, o, mix: a.mix, out: a.out })
}

fn ensure_parent(out: &Path) -> Result<()> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display())),
        None => Ok(()),
    }
}

impl ModelTask for Task {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        let Task { t, o, mix, out } = self;
        let t0 = std::time::Instant::now();
        let s = build(&m, &t, &o, &out)?;
        if s.already_complete {
            eprintln!("{} already holds all {} rows of this run; left as is", out.display(), s.rows);
        } else if s.resumed > 0 {
            eprintln!(
                "resumed {}: kept {} of {} rows from an earlier run, generated {}",
                out.display(),
                s.resumed,
                s.rows,
                s.generated
            );
        }
        for (q, sample, kind) in &s.empty {
            eprintln!(
                "warning: question {q} sample {sample} ({}) gave an empty answer every time; the row is left out",
                kind.name()
            );
        }
        let what = match mix {
            Some(k) => format!("{} mix {k}%", o.kind.name()),
            None => o.kind.name().to_string(),
        };
        println!(
            "{} {what}: {} rows ({} trait, {} benign), mean answer {:.1} tokens → {} ({:.1}s)",
            t.name,
            s.rows,
            s.trait_rows,
            s.benign_rows,
            s.mean_answer_tokens,
            out.display(),
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
