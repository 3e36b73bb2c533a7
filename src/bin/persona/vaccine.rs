//! `persona vaccine`: preventative steering measured against plain fine-tuning, norm-matched
//! random directions, CAFT and another trait's vector, on the same data and LoRA seed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use persona::backend::cpu::CpuGemmBackend;
use persona::model::lora::{LoraConfig, Target};
use persona::model::ModelFiles;
use persona::persona::common::Forced;
use persona::persona::dataset::{build, training_questions, DatasetOptions, Kind};
use persona::persona::extract::{chat_ids, forced_item};
use persona::persona::traits::find_trait;
use persona::persona::vaccine::{self, plan_arms, VaccineData, VaccineOptions};
use persona::steer::vector::PersonaVector;
use persona::train::data::{read_jsonl, split_holdout, DataOptions};
use persona::train::TrainOptions;
use persona::LoadedModel;
use serde_json::json;

use super::{BackendKind, ModelArgs};

#[derive(Args, Debug, Clone)]
pub struct VaccineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Trait name in the catalog (traits/) or a path to a trait JSON file.
    #[arg(long = "trait")]
    pub trait_name: String,
    /// The trait's persona vector (for this model).
    #[arg(long)]
    pub vector: PathBuf,
    /// Residual index of the steering and the projections (default: the vector's `persona.layer`).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Output folder: data/, arms/<name>/, results.json, results.md. A re-run resumes.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// About 15 minutes on 2 CPU cores: 40 rows, 20 steps of 8, 10 questions, 32-token answers.
    #[arg(long)]
    pub quick: bool,
    /// Steering coefficients of the steer and random arms (other_trait: the middle one).
    #[arg(long, value_delimiter = ',', default_value = "0.5,2,8")]
    pub coeffs: Vec<f32>,
    /// Optimiser steps per arm (default: 20 with --quick, else 40).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Data, LoRA initialisation, data order and bootstrap seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random-direction arms per coefficient (seeds 1000+seed, 1001+seed, ...).
    #[arg(long, default_value_t = 1)]
    pub random_seeds: usize,
    /// The other trait's vector (default: the first other trait's vector beside --vector).
    #[arg(long)]
    pub other_vector: Option<PathBuf>,
    /// Evaluation questions (default: 10 with --quick, else all).
    #[arg(long)]
    pub questions: Option<usize>,
    /// Greedy answer length (default: 32 with --quick, else 48).
    #[arg(long)]
    pub answer_tokens: Option<usize>,
    /// Trait answers per training question (default: 2 with --quick, else 4).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Longest generated training answer in tokens.
    #[arg(long, default_value_t = 64)]
    pub data_tokens: usize,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
}

/// The first other trait's vector in `dir` (alphabetical), as (trait name, path).
fn other_vector_beside(vector: &Path, trait_name: &str) -> Option<PathBuf> {
    let dir = vector.parent()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| p.file_stem().is_some_and(|s| s != trait_name) && p != vector)
        .collect();
    files.sort();
    files.into_iter().next()
}

pub fn run(a: VaccineArgs) -> Result<()> {
    persona::train::keep_freed_memory();
    let t0 = Instant::now();
    if a.model.adapter.is_some() {
        bail!("vaccine fine-tunes the base model itself: --adapter is not supported here");
    }
    if !matches!(a.model.backend, BackendKind::Auto | BackendKind::Cpu) {
        bail!("training runs on the CPU backend; use --backend cpu");
    }
    let t = find_trait(&a.trait_name)?;
    let train_q = training_questions(&t)?.to_vec();
    let nq = a.questions.unwrap_or(if a.quick { 10 } else { t.eval_questions.len() });
    if nq < 2 || t.eval_questions.len() < nq.min(2) || t.eval_questions.len() < 2 {
        bail!(
            "trait `{}` has {} evaluation questions and {nq} were asked for: the shifts' intervals need at least 2",
            t.name,
            t.eval_questions.len()
        );
    }
    let eval_q: Vec<String> = t.eval_questions.iter().take(nq).cloned().collect();
    // Evaluation questions are never trained on (training_questions checked the trait; assert it).
    let norm_q = |q: &str| q.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    assert!(eval_q.iter().all(|q| !train_q.iter().any(|x| norm_q(x) == norm_q(q))));
    let steps = a.steps.unwrap_or(if a.quick { 20 } else { 40 });
    let answer_tokens = a.answer_tokens.unwrap_or(if a.quick { 32 } else { 48 });
    let samples = a.samples.unwrap_or(if a.quick { 2 } else { 4 });
    if steps == 0 || a.batch == 0 || samples == 0 || answer_tokens == 0 {
        bail!("--steps, --batch, --samples and --answer-tokens must be at least 1");
    }
    let path = super::resolve_model(&a.model.model)?;
    let ctx = a.model.context.max(512);
    let m = LoadedModel::load(&path, CpuGemmBackend, ctx).with_context(|| format!("loading {}", path.display()))?;
    let cfg = m.engine.config.clone();
    let pv = PersonaVector::load_for_model(&a.vector, &cfg)
        .with_context(|| format!("the vector {} does not fit this model", a.vector.display()))?;
    let layer = match a.layer {
        Some(l) => l,
        None => match pv.metadata.get("persona.layer").and_then(|s| s.parse().ok()) {
            Some(l) => l,
            None => bail!("{} records no layer: give --layer", a.vector.display()),
        },
    };
    pv.check_layer(layer)?;
    if pv.is_zero(layer) {
        bail!("{} is zero at layer {layer}", a.vector.display());
    }
    if let Some(tr) = pv.metadata.get("persona.trait") {
        if tr != &t.name {
            eprintln!("warning: {} is a `{tr}` vector, used for trait `{}`", a.vector.display(), t.name);
        }
    }
    let v = pv.layer(layer).to_vec();
    let other_path = a.other_vector.clone().or_else(|| other_vector_beside(&a.vector, &t.name));
    let other = match &other_path {
        Some(p) => {
            let o = PersonaVector::load_for_model(p, &cfg)
                .with_context(|| format!("the other trait's vector {} does not fit this model", p.display()))?;
            let name = o.metadata.get("persona.trait").cloned().unwrap_or_else(|| o.name.clone());
            Some((name, o.layer(layer).to_vec()))
        }
        None => {
            eprintln!("note: no other trait's vector beside {}: no other_trait arm", a.vector.display());
            None
        }
    };
    let seeds: Vec<u64> = (0..a.random_seeds as u64).map(|i| a.seed + 1000 + i).collect();
    let arms = plan_arms(layer, &v, &t.name, &a.coeffs, &seeds, other.as_ref().map(|(n, w)| (n.as_str(), &w[..])))?;

    // Data: generated once into out/data (resumable), then tokenised.
    let data_dir = a.out_dir.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let ds = |kind: Kind, samples: usize| DatasetOptions {
        kind,
        mix: None,
        questions: usize::MAX,
        samples,
        max_tokens: a.data_tokens,
        temperature: 0.7,
        seed: a.seed,
        batch: 20,
        show_progress: true,
    };
    let pos_file = data_dir.join("trait-pos.jsonl");
    let benign_file = data_dir.join("benign.jsonl");
    eprintln!("data: {} trait rows → {}", train_q.len() * samples, pos_file.display());
    build(&m, &t, &ds(Kind::Pos, samples), &pos_file)?;
    eprintln!("data: {} benign rows → {}", train_q.len(), benign_file.display());
    build(&m, &t, &ds(Kind::Benign, 1), &benign_file)?;
    let dopt = DataOptions { max_len: 512, label: None };
    let rows = read_jsonl(&pos_file, &m, &dopt)?;
    let (train, trait_holdout) = split_holdout(rows, 0.2, a.seed)?;
    let benign_holdout = read_jsonl(&benign_file, &m, &dopt)?;
    let eval_prompts: Vec<Vec<u32>> = eval_q.iter().map(|q| chat_ids(&m, None, q)).collect::<persona::Result<_>>()?;
    // Log-odds items: base's greedy answers under the trait's instructions, scored without them.
    eprintln!("log-odds: base answers {} questions under positive and negative instructions", eval_q.len());
    let (mut logodds_pos, mut logodds_neg) = (vec![], vec![]);
    if !t.instructions.is_empty() {
        let mut reqs = vec![];
        for (i, q) in eval_q.iter().enumerate() {
            let ins = &t.instructions[i % t.instructions.len()];
            for sys in [&ins.pos, &ins.neg] {
                reqs.push(persona::engine::generate::GenRequest::greedy(chat_ids(&m, Some(sys), q)?, answer_tokens));
            }
        }
        let gens = m.engine.generate(&reqs, &mut |_, _| {})?;
        for (i, q) in eval_q.iter().enumerate() {
            let item = |g| -> Result<Forced> { Ok(forced_item(&m, None, q, &m.answer_text(g)?)?) };
            logodds_pos.push(item(&gens[2 * i])?);
            logodds_neg.push(item(&gens[2 * i + 1])?);
        }
        // An empty answer has no tokens to score: drop that question's pair.
        let keep: Vec<bool> = logodds_pos
            .iter()
            .zip(&logodds_neg)
            .map(|(p, n)| p.tokens.len() > p.answer_start && n.tokens.len() > n.answer_start)
            .collect();
        let mut k = keep.iter();
        logodds_pos.retain(|_| *k.next().unwrap_or(&false));
        let mut k = keep.iter();
        logodds_neg.retain(|_| *k.next().unwrap_or(&false));
    }
    let d = VaccineData { train, trait_holdout, benign_holdout, eval_prompts, logodds_pos, logodds_neg };
    vaccine::check_data(&d)?;

    let lora = LoraConfig { r: a.lora_rank, alpha: a.lora_alpha, use_rslora: true, targets: Target::ALL.to_vec() };
    let mut train = TrainOptions::new(lora.clone());
    train.lr = a.lr;
    train.steps = Some(steps);
    train.batch = a.batch;
    train.seed = a.seed;
    let settings = json!({
        "trait": t.name, "vector": a.vector.display().to_string(), "vector_norm_at_layer": persona::persona::common::norm(&v),
        "layer": layer, "model": path.display().to_string(), "quick": a.quick, "steps": steps, "batch": a.batch,
        "lr": a.lr, "schedule": "linear", "warmup": train.warmup, "seed": a.seed,
        "lora": {"r": lora.r, "alpha": lora.alpha, "rslora": true, "targets": "all"},
        "train_rows": d.train.len(), "trait_holdout_rows": d.trait_holdout.len(), "benign_rows": d.benign_holdout.len(),
        "data_hash": vaccine::data_hash(&d.train), "eval_questions": eval_q.len(), "answer_tokens": answer_tokens,
        "logodds_pairs": d.logodds_pos.len(), "resamples": a.resamples,
        "other_vector": other_path.as_ref().map(|p| p.display().to_string()),
    });
    let o = VaccineOptions {
        layer,
        train,
        max_answer_tokens: answer_tokens,
        resamples: a.resamples,
        boot_seed: a.seed,
        batch: 10,
        settings,
    };
    eprintln!(
        "{} arms × {steps} steps of {} rows ({} training rows, {} held-out trait, {} benign, {} questions)",
        arms.len(),
        a.batch,
        d.train.len(),
        d.trait_holdout.len(),
        d.benign_holdout.len(),
        eval_q.len()
    );
    let mut load_merged = |ad: &persona::model::lora::LoraAdapter| -> persona::Result<LoadedModel<CpuGemmBackend>> {
        let mut files = ModelFiles::open(&path)?;
        ad.merge_into(&mut files.tensors)?;
        LoadedModel::from_files(files, CpuGemmBackend, ctx)
    };
    let results =
        vaccine::run(&m, &mut load_merged, &arms, &d, &v, &o, &a.out_dir, &path.display().to_string(), &mut |l| {
            eprintln!("{l} [{:.0} s]", t0.elapsed().as_secs_f64())
        })?;
    print!("{}", vaccine::results_markdown(&results));
    eprintln!("wrote {} ({:.0} s)", a.out_dir.join("results.json").display(), t0.elapsed().as_secs_f64());
    Ok(())
}
