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
use persona::persona::dataset::{
    build, compose_mixture, read_rows, training_questions, write_rows, DatasetOptions, Kind,
};
use persona::persona::extract::{chat_ids, forced_item};
use persona::persona::screen::read_dataset;
use persona::persona::screening::{self, ScreeningOptions, StudyDataset, StudyTrait};
use persona::persona::traits::{find_trait, norm_question};
use persona::persona::vaccine::{self, plan_arms, VaccineData, VaccineOptions};
use persona::steer::vector::PersonaVector;
use persona::train::data::{read_jsonl, split_holdout, DataOptions};
use persona::train::TrainOptions;
use persona::LoadedModel;
use serde_json::json;

use super::pipelines::shipped_vectors;
use super::{BackendKind, ModelArgs};

#[derive(Args, Debug, Clone)]
pub struct VaccineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Trait name in the catalog (traits/) or a path to a trait JSON file.
    #[arg(long = "trait", required_unless_present = "screening")]
    pub trait_name: Option<String>,
    /// The trait's persona vector (default: the shipped vectors/smollm2-135m-instruct/<trait>.safetensors).
    #[arg(long)]
    pub vector: Option<PathBuf>,
    /// Residual index of the steering and the projections (default: the vector's `persona.layer`).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Output folder: data/, arms/<name>/, results.json, results.md. A re-run resumes.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// About 15 minutes on 2 CPU cores: 40 rows, 20 steps of 4, coefficients 0.5,1,2, random
    /// directions at the best coefficient only, 10 questions, 32-token answers, no seed-noise arms.
    #[arg(long)]
    pub quick: bool,
    /// Steering coefficients of the steer arms (default: 0.5,1,2 with --quick, else 0.25,0.5,1,2,4,8).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub coeffs: Option<Vec<f32>>,
    /// Random-direction arms at `all` coefficients or at the `best` steer arm's (default: best with
    /// --quick, else all). The other trait's arm is always at the best coefficient.
    #[arg(long, value_parser = ["best", "all"])]
    pub random_at: Option<String>,
    /// Train plain and the best steer arm again from seed+1 (default: on, off with --quick).
    #[arg(long)]
    pub seed_noise: Option<bool>,
    /// Benign NLL margin (nats/token over plain) within which the best steer arm is chosen.
    #[arg(long, default_value_t = 0.05)]
    pub nll_margin: f64,
    /// Optimiser steps per arm (default: 20 with --quick, else 40).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Rows per optimiser step (default: 4 with --quick, else 8).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Data, LoRA initialisation, data order and bootstrap seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random directions (seeds 1000+seed, 1001+seed, ...), each trained at the random arms' coefficients.
    #[arg(long, default_value_t = 2)]
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
    /// Data screening checked against real fine-tunes: ΔP of each of 9 datasets (several traits;
    /// clean, mixed and trait-inducing) before training vs the shift fine-tuning on it causes.
    /// Writes screening.json, screening.md and screening.svg into --out-dir. Uses the shipped
    /// vectors of --traits; --trait and --vector are not used.
    #[arg(long)]
    pub screening: bool,
    /// Traits of the screening study: the first gets clean, 25%, 50%, 100% and negative datasets,
    /// the others 25% and 100%.
    #[arg(long, value_delimiter = ',', default_value = "evil,sycophantic,hallucinating")]
    pub traits: Vec<String>,
    /// Random directions per trait in the screening control.
    #[arg(long, default_value_t = 20)]
    pub random: usize,
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

impl VaccineArgs {
    /// Training fine-tunes the base model on the CPU backend: no adapter, no other backend.
    fn check_base(&self, what: &str) -> Result<()> {
        if self.model.adapter.is_some() {
            bail!("{what} fine-tunes the base model itself: --adapter is not supported here");
        }
        if !matches!(self.model.backend, BackendKind::Auto | BackendKind::Cpu) {
            bail!("training runs on the CPU backend; use --backend cpu");
        }
        Ok(())
    }

    /// The model (path, context, loaded on the training backend).
    fn load_base(&self) -> Result<(PathBuf, usize, LoadedModel<CpuGemmBackend>)> {
        let path = super::resolve_model(&self.model.model)?;
        let ctx = self.model.context.max(512);
        let m = LoadedModel::load(&path, CpuGemmBackend, ctx).with_context(|| format!("loading {}", path.display()))?;
        Ok((path, ctx, m))
    }

    /// The dataset generation settings (every extraction question, temperature 0.7).
    fn data_options(&self, kind: Kind, mix: Option<f64>, samples: usize) -> DatasetOptions {
        DatasetOptions {
            kind,
            mix,
            questions: usize::MAX,
            samples,
            max_tokens: self.data_tokens,
            temperature: 0.7,
            seed: self.seed,
            batch: 20,
            show_progress: true,
        }
    }

    /// LoRA on all seven targets (rsLoRA) with the run's lr and seed.
    fn train_options(&self, steps: usize, batch: usize) -> TrainOptions {
        let lora =
            LoraConfig { r: self.lora_rank, alpha: self.lora_alpha, use_rslora: true, targets: Target::ALL.to_vec() };
        let mut train = TrainOptions::new(lora);
        train.lr = self.lr;
        train.steps = Some(steps);
        train.batch = batch;
        train.seed = self.seed;
        train
    }
}

/// How a fine-tuned model is built for measuring: the adapter merged into the weights.
fn merged_loader(
    path: &Path,
    ctx: usize,
) -> impl FnMut(&persona::model::lora::LoraAdapter) -> persona::Result<LoadedModel<CpuGemmBackend>> + '_ {
    move |ad| {
        let mut files = ModelFiles::open(path)?;
        ad.merge_into(&mut files.tensors)?;
        LoadedModel::from_files(files, CpuGemmBackend, ctx)
    }
}

fn lora_json(l: &LoraConfig) -> serde_json::Value {
    json!({"r": l.r, "alpha": l.alpha, "rslora": l.use_rslora, "targets": "all"})
}

pub fn run(a: VaccineArgs) -> Result<()> {
    persona::train::keep_freed_memory();
    a.model.cpu_activations.refuse_for_training("vaccine")?;
    if a.screening {
        return run_screening(a);
    }
    let t0 = Instant::now();
    a.check_base("vaccine")?;
    let Some(trait_name) = a.trait_name.as_deref() else { bail!("--trait is required (or --screening)") };
    let t = find_trait(trait_name)?;
    let vector = a.vector.clone().unwrap_or_else(|| shipped_vectors().join(format!("{}.safetensors", t.name)));
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
    assert!(eval_q.iter().all(|q| !train_q.iter().any(|x| norm_question(x) == norm_question(q))));
    let steps = a.steps.unwrap_or(if a.quick { 20 } else { 40 });
    let answer_tokens = a.answer_tokens.unwrap_or(if a.quick { 32 } else { 48 });
    let samples = a.samples.unwrap_or(if a.quick { 2 } else { 4 });
    let batch = a.batch.unwrap_or(if a.quick { 4 } else { 8 });
    let coeffs = a.coeffs.clone().unwrap_or_else(|| {
        if a.quick {
            vec![0.5, 1.0, 2.0]
        } else {
            vec![0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
        }
    });
    let random_at_all = a.random_at.as_deref().map_or(!a.quick, |r| r == "all");
    let seed_noise = a.seed_noise.unwrap_or(!a.quick);
    if steps == 0 || batch == 0 || samples == 0 || answer_tokens == 0 {
        bail!("--steps, --batch, --samples and --answer-tokens must be at least 1");
    }
    let (path, ctx, m) = a.load_base()?;
    let cfg = m.engine.config.clone();
    let pv = PersonaVector::load_for_model(&vector, &cfg)
        .with_context(|| format!("the vector {} does not fit this model", vector.display()))?;
    let layer = match a.layer {
        Some(l) => l,
        None => match pv.metadata.get("persona.layer").and_then(|s| s.parse().ok()) {
            Some(l) => l,
            None => bail!("{} records no layer: give --layer", vector.display()),
        },
    };
    pv.check_layer(layer)?;
    if pv.is_zero(layer) {
        bail!("{} is zero at layer {layer}", vector.display());
    }
    if let Some(tr) = pv.metadata.get("persona.trait") {
        if tr != &t.name {
            eprintln!("warning: {} is a `{tr}` vector, used for trait `{}`", vector.display(), t.name);
        }
    }
    let v = pv.layer(layer).to_vec();
    let other_path = a.other_vector.clone().or_else(|| other_vector_beside(&vector, &t.name));
    let other = match &other_path {
        Some(p) => {
            let o = PersonaVector::load_for_model(p, &cfg)
                .with_context(|| format!("the other trait's vector {} does not fit this model", p.display()))?;
            let name = o.metadata.get("persona.trait").cloned().unwrap_or_else(|| o.name.clone());
            Some((name, o.layer(layer).to_vec()))
        }
        None => {
            eprintln!("note: no other trait's vector beside {}: no other_trait arm", vector.display());
            None
        }
    };
    let seeds: Vec<u64> = (0..a.random_seeds as u64).map(|i| a.seed + 1000 + i).collect();
    let protocol = vaccine::Protocol {
        coeffs: coeffs.clone(),
        random_seeds: seeds,
        random_at_all,
        other: other.clone(),
        noise_seed: seed_noise.then_some(a.seed + 1),
        nll_margin: a.nll_margin,
    };
    // Checks the coefficients and the vector before any data is made.
    let first = plan_arms(layer, &v, &t.name, &coeffs)?;
    let protocol_arms = first.len()
        + a.random_seeds * if random_at_all { coeffs.len() } else { 1 }
        + usize::from(other.is_some())
        + if seed_noise { 2 } else { 0 };

    // Data: generated once into out/data (resumable), then tokenised.
    let data_dir = a.out_dir.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let ds = |kind: Kind, samples: usize| a.data_options(kind, None, samples);
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

    let train = a.train_options(steps, batch);
    let settings = json!({
        "trait": t.name, "vector": vector.display().to_string(), "vector_norm_at_layer": persona::persona::common::norm(&v),
        "layer": layer, "model": path.display().to_string(), "steps": steps, "batch": batch,
        "lr": a.lr, "schedule": "linear", "warmup": train.warmup, "seed": a.seed,
        "lora": lora_json(&train.lora),
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
        protocol_arms,
        batch,
        d.train.len(),
        d.trait_holdout.len(),
        d.benign_holdout.len(),
        eval_q.len()
    );
    let mut load_merged = merged_loader(&path, ctx);
    let results = vaccine::run(
        &m,
        &mut load_merged,
        &t.name,
        &protocol,
        &d,
        &v,
        &o,
        &a.out_dir,
        &path.display().to_string(),
        &mut |l| eprintln!("{l} [{:.0} s]", t0.elapsed().as_secs_f64()),
    )?;
    print!("{}", vaccine::results_markdown(&results));
    eprintln!("wrote {} ({:.0} s)", a.out_dir.join("results.json").display(), t0.elapsed().as_secs_f64());
    Ok(())
}

/// `persona vaccine --screening`.
fn run_screening(a: VaccineArgs) -> Result<()> {
    let t0 = Instant::now();
    a.check_base("screening")?;
    if a.trait_name.is_some() || a.vector.is_some() || a.coeffs.is_some() || a.other_vector.is_some() {
        bail!(
            "--screening studies the shipped vectors of --traits and trains without steering: \
             --trait, --vector, --coeffs and --other-vector do not apply"
        );
    }
    if a.traits.is_empty() {
        bail!("--traits names no trait");
    }
    let steps = a.steps.unwrap_or(20);
    let batch = a.batch.unwrap_or(4);
    let samples = a.samples.unwrap_or(2);
    let nq = a.questions.unwrap_or(10);
    if steps == 0 || batch == 0 || samples == 0 || a.data_tokens == 0 {
        bail!("--steps, --batch, --samples and --data-tokens must be at least 1");
    }
    let defs = a.traits.iter().map(|n| find_trait(n)).collect::<persona::Result<Vec<_>>>()?;
    let (path, ctx, m) = a.load_base()?;
    let cfg = m.engine.config.clone();
    // The traits: definition, shipped vector, layer, evaluation prompts.
    let mut traits = vec![];
    for t in &defs {
        let vp = shipped_vectors().join(format!("{}.safetensors", t.name));
        let pv = PersonaVector::load_for_model(&vp, &cfg)
            .with_context(|| format!("the {} vector {} does not fit this model", t.name, vp.display()))?;
        let layer = match a.layer.or_else(|| pv.metadata.get("persona.layer").and_then(|s| s.parse().ok())) {
            Some(l) => l,
            None => bail!("{} records no layer: give --layer", vp.display()),
        };
        pv.check_layer(layer)?;
        if t.eval_questions.len() < nq.max(2) {
            bail!(
                "trait `{}` has {} evaluation questions; {} were asked for (at least 2)",
                t.name,
                t.eval_questions.len(),
                nq.max(2)
            );
        }
        let eval_prompts =
            t.eval_questions.iter().take(nq).map(|q| chat_ids(&m, None, q)).collect::<persona::Result<Vec<_>>>()?;
        traits.push(StudyTrait { name: t.name.clone(), layer, v: pv.layer(layer).to_vec(), eval_prompts });
    }
    // Data: per trait, positive and benign answers (the first trait also negative), generated once;
    // mixtures are composed from them (the rows `persona dataset --mix` would generate).
    let data_dir = a.out_dir.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let ds = |kind: Kind, mix: Option<f64>| a.data_options(kind, mix, samples);
    let mut files: Vec<(String, String, PathBuf)> = vec![];
    for (i, t) in defs.iter().enumerate() {
        let gen = |kind: Kind| -> Result<Vec<persona::persona::dataset::Row>> {
            let f = data_dir.join(format!("{}-{}.jsonl", t.name, kind.name()));
            eprintln!("data: {} ({} rows) → {}", kind.name(), training_questions(t)?.len() * samples, f.display());
            build(&m, t, &ds(kind, None), &f)?;
            Ok(read_rows(&f)?.into_iter().map(|(_, r)| r).collect())
        };
        let pos = gen(Kind::Pos)?;
        let benign = gen(Kind::Benign)?;
        let mixes: &[(&str, f64)] = if i == 0 {
            &[("benign", 0.0), ("mix25", 0.25), ("mix50", 0.5), ("pos", 1.0)]
        } else {
            &[("mix25", 0.25), ("pos", 1.0)]
        };
        if i == 0 {
            gen(Kind::Neg)?;
            files.push((format!("{}-neg", t.name), t.name.clone(), data_dir.join(format!("{}-neg.jsonl", t.name))));
        }
        for &(label, f) in mixes {
            let rows = compose_mixture(t, &ds(Kind::Pos, Some(f)), &pos, &benign)?;
            let file = data_dir.join(format!("{}-{label}.jsonl", t.name));
            write_rows(&file, &rows)?;
            files.push((format!("{}-{label}", t.name), t.name.clone(), file));
        }
    }
    files.sort_by(|x, y| x.0.cmp(&y.0));
    let dopt = DataOptions { max_len: 512, label: None };
    let mut datasets = vec![];
    for (name, trait_name, file) in files {
        let samples = read_dataset(&file)?;
        let train = read_jsonl(&file, &m, &dopt)?;
        if samples.len() != train.len() {
            bail!("{}: {} screening samples but {} training rows", file.display(), samples.len(), train.len());
        }
        datasets.push(StudyDataset { name, trait_name, samples, train });
    }
    let train = a.train_options(steps, batch);
    let settings = json!({
        "traits": traits.iter().map(|t| json!({"name": t.name, "layer": t.layer, "vector_norm": persona::persona::common::norm(&t.v)})).collect::<Vec<_>>(),
        "model": path.display().to_string(), "steps": steps, "batch": batch, "lr": a.lr, "schedule": "linear",
        "warmup": train.warmup, "seed": a.seed, "lora": lora_json(&train.lora),
        "samples": samples, "data_tokens": a.data_tokens, "eval_questions": nq, "random": a.random,
        "own_answer_tokens": a.data_tokens,
    });
    let o = ScreeningOptions {
        train,
        random: a.random,
        seed: a.seed,
        max_tokens: a.data_tokens,
        batch: 10,
        resamples: a.resamples,
        settings,
    };
    eprintln!(
        "{} datasets × {steps} steps of {batch} rows; ΔP along {} traits and {} random directions each",
        datasets.len(),
        traits.len(),
        a.random
    );
    let mut load_merged = merged_loader(&path, ctx);
    let v = screening::run(
        &m,
        &mut load_merged,
        &traits,
        &datasets,
        &o,
        &a.out_dir,
        &path.display().to_string(),
        &mut |l| eprintln!("{l} [{:.0} s]", t0.elapsed().as_secs_f64()),
    )?;
    print!("{}", screening::screening_markdown(&v));
    eprintln!("wrote {} ({:.0} s)", a.out_dir.join("screening.json").display(), t0.elapsed().as_secs_f64());
    Ok(())
}
