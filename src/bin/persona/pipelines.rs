//! `persona extract`, `eval`, `monitor`, `screen` and `demo`: the paper's pipelines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use persona::backend::Backend;
use persona::engine::generate::GenRequest;
use persona::persona::common::write_atomic;
use persona::persona::eval::{sweep, EvalOptions};
use persona::persona::extract::{baseline_projection, BASELINE_KEY};
use persona::persona::extract::{
    chat_ids, generate_responses, judge_and_filter, questions_of, read_responses, vector_from_responses,
    ExtractOptions, Method,
};
use persona::persona::judge::{Judge, LocalJudge, OpenAiJudge};
use persona::persona::monitor::{ladder, many_shot_ladder, shot_pool, LadderPrompt, MonitorOptions, Shot};
use persona::persona::screen::{control as screen_control, read_dataset_with_fields, screen, ScreenOptions};
use persona::persona::traits::{find_trait, looks_like_path, record_trait, recorded_trait, trait_for_vector, TraitDef};
use persona::steer::spec::{locate_vector, Layers};
use persona::steer::vector::PersonaVector;
use persona::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp, SteeringPlan};
use persona::LoadedModel;

use super::screen_report::{render, Report, ReportFormat};
use super::{ModelArgs, ModelTask};

/// What the judge filter did: answers without a score (the judge put less than 0.25 of its
/// top-logprob mass on the integers 0–100, or gave no reply) and pairs kept.
fn report_judging(responses: &[persona::persona::extract::Response]) {
    let n = responses.len();
    let no_trait = responses.iter().filter(|r| r.trait_score.is_none()).count();
    let no_coh = responses.iter().filter(|r| r.coherence.is_none()).count();
    let kept = responses.iter().filter(|r| r.kept).count();
    eprintln!(
        "judge: {no_trait} of {n} answers got no trait score and {no_coh} no coherence score (less than 0.25 \
         probability on the integers 0–100); {} of {} pairs kept",
        kept / 2,
        n / 2
    );
}

/// `--judge none|self|URL` and its companions.
#[derive(Args, Debug, Clone)]
pub struct JudgeArgs {
    /// none, self (the local model), or the base URL of an OpenAI-compatible endpoint.
    #[arg(long, default_value = "none")]
    pub judge: String,
    /// Model name sent to the judge endpoint.
    #[arg(long, default_value = "gpt-4.1-mini")]
    pub judge_model: String,
    /// API key for the judge endpoint.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub judge_key: Option<String>,
}

impl JudgeArgs {
    fn build<'a, B: Backend>(&self, m: &'a LoadedModel<B>) -> Result<Option<Box<dyn Judge + 'a>>> {
        Ok(match self.judge.as_str() {
            "none" => None,
            "self" => Some(Box::new(LocalJudge::new(m)?)),
            url if url.starts_with("http://") || url.starts_with("https://") => {
                Some(Box::new(OpenAiJudge::new(url, &self.judge_model, self.judge_key.clone())?))
            }
            other => bail!("--judge `{other}`: expected none, self, or an http(s) URL"),
        })
    }
}

/// Create an output file's folder before any work is done, so no work is lost at the end.
fn ensure_parent(out: &Path) -> Result<()> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display())),
        None => Ok(()),
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

#[derive(Args, Debug, Clone)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Trait name in the catalog (traits/) or a path to a trait JSON file.
    #[arg(long = "trait")]
    pub trait_name: String,
    /// Output vector file (.safetensors); the answers go to the same path with .jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Build the vector from given answers (JSONL lines {"system"?, "question", "answer", "label"}).
    #[arg(long)]
    pub from_responses: Option<PathBuf>,
    /// Answers per (instruction, question).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Use at most this many instruction pairs / questions.
    #[arg(long)]
    pub pairs: Option<usize>,
    #[arg(long)]
    pub questions: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// response_avg | prompt_avg | prompt_last
    #[arg(long, default_value = "response_avg")]
    pub method: String,
    /// No progress bars (they are drawn only when stderr is a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub judge: JudgeArgs,
}

impl ModelTask for ExtractArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        let a = self;
        let method = Method::parse(&a.method)?;
        let t0 = std::time::Instant::now();
        ensure_parent(&a.out)?;
        let (name, mut responses, trait_def) = match &a.from_responses {
            Some(f) => {
                let t = find_trait(&a.trait_name);
                let name = t.as_ref().map(|t| t.name.clone()).unwrap_or_else(|_| a.trait_name.clone());
                (name, read_responses(f)?, t)
            }
            None => {
                let t = find_trait(&a.trait_name)?;
                let o = ExtractOptions {
                    pairs: a.pairs.unwrap_or(usize::MAX),
                    questions: a.questions.unwrap_or(usize::MAX),
                    samples: a.samples,
                    max_tokens: a.max_tokens,
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed,
                    batch: a.batch,
                    method,
                    show_progress: !a.quiet,
                };
                let r = generate_responses(&m, &t, &o)?;
                (t.name.clone(), r, Ok(t))
            }
        };
        // Judging needs the trait's judge prompts, also for --from-responses.
        if let Some(j) = a.judge.build(&m)? {
            let t = trait_def.as_ref().map_err(|e| anyhow::anyhow!("judging needs the trait's judge prompts: {e}"))?;
            judge_and_filter(t, j.as_ref(), &mut responses)?;
            report_judging(&responses);
        }
        // The answers (with their judge scores) first: they are kept even when no vector can be
        // built from them (e.g. the judge filtered every pair out).
        let jsonl = a.out.with_extension("jsonl");
        let text: String = responses.iter().map(|r| serde_json::to_string(r).unwrap_or_default() + "\n").collect();
        write_atomic(&jsonl, text.as_bytes())?;
        let mut v = vector_from_responses(&m, &name, &responses, method, a.batch, !a.quiet)
            .with_context(|| format!("the answers and their scores are in {}", jsonl.display()))?;
        v.record_model(&m.engine.config);
        // The trait as it was used (custom traits need no catalog later), and the baseline: the
        // model's ordinary projection, over its answers to the trait's questions (or those asked).
        let questions: Vec<String> = match &trait_def {
            Ok(t) => {
                record_trait(&mut v, t);
                t.questions.clone()
            }
            Err(_) => questions_of(&responses),
        };
        // The vector is worth keeping without its baseline (`persona eval --write` adds one later).
        match baseline_projection(&m, &v, &questions, a.max_tokens.max(1), !a.quiet) {
            Ok(b) => {
                v.metadata.insert(BASELINE_KEY.into(), serde_json::to_string(&b).unwrap_or_default());
            }
            Err(e) => eprintln!(
                "warning: no baseline recorded ({e}); op=center needs one: `persona eval --vector {} --write` adds it",
                a.out.display()
            ),
        }
        v.metadata.insert("persona.seed".into(), a.seed.to_string());
        v.metadata.insert("persona.temperature".into(), a.temperature.to_string());
        v.metadata.insert("persona.judge".into(), a.judge.judge.clone());
        v.metadata.insert("persona.command".into(), command_line());
        v.save(&a.out)?;
        let kept = responses.iter().filter(|r| r.kept).count();
        eprintln!(
            "{}: {} responses ({} kept) → {} and {} in {:.1}s",
            name,
            responses.len(),
            kept,
            a.out.display(),
            jsonl.display(),
            t0.elapsed().as_secs_f64()
        );
        let norms = v.norms();
        let best = v.max_norm_layer();
        println!(
            "vector norms by layer: max {:.2} at layer {best}; layer N/2 = {:.2}",
            norms[best],
            norms[norms.len() / 2]
        );
        Ok(())
    }
}

fn default_layers(n: usize) -> Vec<usize> {
    // The method works from about half depth on: five layers from 40% to 80%.
    let mut v: Vec<usize> = (0..5).map(|i| ((0.4 + 0.1 * i as f64) * n as f64).round() as usize).collect();
    v.dedup();
    v.retain(|&l| l >= 1 && l <= n);
    v
}

fn parse_coeffs(s: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|x| match x.trim().parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => bail!("--coeffs: `{x}` is not a finite number"),
        })
        .collect()
}

fn trait_for(arg: &Option<String>, v: &PersonaVector) -> Result<TraitDef> {
    Ok(trait_for_vector(arg.as_deref(), v)?)
}

/// `--vector PATH|NAME` and `--vectors DIR`: a vector for the loaded model, by path or by name
/// (looked up like `--steer vector=NAME`: `--vectors DIR`, then vectors/<model name>/).
#[derive(Args, Debug, Clone)]
pub struct VectorArg {
    /// Vector file, or the name of one in --vectors DIR or vectors/<model name>/ (e.g. `evil`).
    #[arg(long, value_name = "PATH|NAME")]
    pub vector: PathBuf,
    /// Folder searched first for --vector NAME.
    #[arg(long, value_name = "DIR")]
    pub vectors: Option<PathBuf>,
}

impl VectorArg {
    /// The file `--vector` names and the vector in it, checked against the model.
    fn open<B: Backend>(&self, m: &LoadedModel<B>) -> Result<(PathBuf, PersonaVector)> {
        let path = locate_vector(&self.vector, &super::vector_dirs(self.vectors.as_deref(), &m.path))?;
        let v = PersonaVector::load_for_model(&path, &m.engine.config)?;
        if let Some(w) = v.check_identity(&m.engine.config)? {
            eprintln!("warning: {w}");
        }
        Ok((path, v))
    }
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The trait's questions and judge prompts: a catalog name or a trait JSON file (default: the
    /// definition stored in the vector at extraction, else the catalog trait it names).
    #[arg(long = "trait")]
    pub trait_name: Option<String>,
    #[command(flatten)]
    pub vector: VectorArg,
    /// Layers to sweep (e.g. 12-18, 10+14; default: five layers at 40–80% depth).
    #[arg(long, allow_hyphen_values = true)]
    pub layers: Option<String>,
    /// Steering coefficients, comma-separated; may start negative (`--coeffs -2,0,2`).
    #[arg(long, default_value = "-3,-2,-1,0,1,2,3", allow_hyphen_values = true)]
    pub coeffs: String,
    #[arg(long, default_value_t = 10)]
    pub questions: usize,
    #[arg(long, default_value_t = 40)]
    pub max_tokens: usize,
    /// Also generate steered answers (response projection, samples).
    #[arg(long)]
    pub generate: bool,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Seeds the random directions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Norm-matched random directions swept at the best layer as the control. Each costs as much
    /// as one more layer of the sweep (a teacher-forced pass per coefficient, and generation with
    /// --generate or a judge): the defaults sweep 5 + 3 lines of 7 coefficients.
    #[arg(long, default_value_t = 3)]
    pub random_eval: usize,
    /// Folder for eval.json, eval.txt and eval.svg (default: beside the vector).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// A layer qualifies for the choice when its monitoring AUROC reaches this: the chosen layer
    /// is the largest steering span among the qualifying layers.
    #[arg(long, default_value_t = 0.8)]
    pub min_auroc: f64,
    /// Record the chosen layer (persona.layer), the rule and the sweep's spans and AUROCs in the
    /// vector file, and its baseline and trait definition where it has none. Without it the vector
    /// is never modified.
    #[arg(long)]
    pub write: bool,
    /// No progress bars (they are drawn only when stderr is a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub judge: JudgeArgs,
}

impl ModelTask for EvalArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        let a = self;
        // The flags first, so that a typo is reported before any file is read.
        let coeffs = parse_coeffs(&a.coeffs)?;
        let n = m.engine.config.n_layers;
        let layers = match &a.layers {
            Some(l) => Layers::parse(l).context("--layers")?.resolve(n),
            None => default_layers(n),
        };
        if !(0.0..=1.0).contains(&a.min_auroc) {
            bail!("--min-auroc {}: an AUROC is between 0 and 1", a.min_auroc);
        }
        let (path, mut v) = a.vector.open(&m)?;
        let t = trait_for(&a.trait_name, &v)?;
        let judge = a.judge.build(&m)?;
        let o = EvalOptions {
            layers,
            coeffs,
            questions: a.questions,
            generate: a.generate,
            max_tokens: a.max_tokens,
            batch: a.batch,
            seed: a.seed,
            random: a.random_eval,
            min_auroc: a.min_auroc,
            show_progress: !a.quiet,
        };
        // Everything that could fail after the sweep is checked before it: the output folder, and
        // (with --write) the stored trait definition.
        let dir = a.out_dir.clone().unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let has_trait = if a.write { recorded_trait(&v).map(|t| t.is_some()).unwrap_or(false) } else { true };
        let r = sweep(&m, &t, &v, judge.as_deref(), &o)?;
        let stem = format!("{}.eval", path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default());
        let table = r.table();
        print!("{table}");
        write_atomic(&dir.join(format!("{stem}.txt")), table.as_bytes())?;
        write_atomic(&dir.join(format!("{stem}.json")), serde_json::to_string_pretty(&r)?.as_bytes())?;
        write_atomic(&dir.join(format!("{stem}.svg")), r.svg().as_bytes())?;
        if a.write {
            let mut what = vec![format!("persona.layer = {}", r.best_layer)];
            v.metadata.insert("persona.layer".into(), r.best_layer.to_string());
            v.metadata.insert("persona.layer_rule".into(), r.rule.clone());
            v.metadata.insert("persona.eval".into(), serde_json::to_string(&r.effect).unwrap_or_default());
            v.metadata.insert("persona.eval_auroc".into(), serde_json::to_string(&r.auroc).unwrap_or_default());
            if r.baseline_measured {
                v.metadata.insert(BASELINE_KEY.into(), serde_json::to_string(&r.baseline).unwrap_or_default());
                what.push("persona.baseline".into());
            }
            if !has_trait {
                record_trait(&mut v, &t);
                what.push(format!("the `{}` trait definition", t.name));
            }
            v.save(&path)?;
            eprintln!("recorded {} in {}", what.join(", "), path.display());
        } else {
            eprintln!(
                "{} was not modified (pass --write to record persona.layer = {} and the sweep in it)",
                path.display(),
                r.best_layer
            );
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vector: VectorArg,
    /// The trait whose ladder of system prompts to use: a catalog name or a trait JSON file
    /// (default: the definition stored in the vector, else the catalog trait it names).
    #[arg(long = "trait")]
    pub trait_name: Option<String>,
    /// JSONL prompts `{"question", "system"?, "shots"?: [{"question", "answer"}], "level": -1|0|1}`
    /// instead of the trait's ladder.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Add many-shot rungs with these numbers of example turns (e.g. 2,4,8): each question after k
    /// example answers in the trait (eliciting) or k opposite answers (suppressing), no system prompt
    /// (k = 0, the bare question, is already the ladder's middle rung).
    #[arg(long, value_delimiter = ',')]
    pub shots: Vec<usize>,
    /// Example answers for --shots: a responses JSONL with pos/neg labels (default: the extraction
    /// answers beside the vector, VECTOR.jsonl).
    #[arg(long)]
    pub shots_from: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub questions: usize,
    /// Layers to probe (default all).
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub layers: String,
    /// Layer for the correlation (default: the best AUROC).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Generate responses and correlate projection with their trait.
    #[arg(long)]
    pub generate: bool,
    #[arg(long, default_value_t = 40)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Seeds the random directions (layer L's come from SEED xor L).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Norm-matched random directions per layer, the control: their mean AUROC, the 95th percentile
    /// of their |AUROC − 0.5| and the vector's percentile among them (no extra model runs).
    #[arg(long, default_value_t = 20)]
    pub random: usize,
    /// Write the full report (every prompt's projections) as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bars (they are drawn only when stderr is a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub judge: JudgeArgs,
}

fn read_prompts(path: &Path) -> Result<Vec<LadderPrompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}: not valid JSON", path.display(), i + 1))?;
        let question = v["question"]
            .as_str()
            .with_context(|| format!("{}: line {}: missing string `question`", path.display(), i + 1))?;
        let shots: Vec<Shot> = match v.get("shots") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(s) => serde_json::from_value(s.clone()).with_context(|| {
                format!("{}: line {}: `shots` must be a list of {{\"question\", \"answer\"}}", path.display(), i + 1)
            })?,
        };
        out.push(LadderPrompt {
            question: question.to_string(),
            system: v["system"].as_str().map(str::to_string),
            shots,
            level: v["level"].as_i64().unwrap_or(0).clamp(-1, 1) as i32,
        });
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

impl ModelTask for MonitorArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        let a = self;
        let (path, v) = a.vector.open(&m)?;
        let t = if a.prompts.is_some() && a.trait_name.is_none() { None } else { Some(trait_for(&a.trait_name, &v)?) };
        let mut prompts = match &a.prompts {
            Some(p) => read_prompts(p)?,
            None => ladder(t.as_ref().context("a trait is needed for the ladder")?, a.questions),
        };
        if !a.shots.is_empty() {
            if a.prompts.is_some() {
                bail!("--shots builds many-shot rungs on the trait's evaluation questions; with --prompts, give each line its own `shots`");
            }
            let t = t.as_ref().context("a trait is needed for many-shot prompts")?;
            let from = a.shots_from.clone().unwrap_or_else(|| path.with_extension("jsonl"));
            if !from.exists() {
                bail!(
                    "--shots needs example answers: {} does not exist (extraction writes it beside the vector); pass --shots-from",
                    from.display()
                );
            }
            let pool = shot_pool(&read_responses(&from)?);
            let questions: Vec<String> = t.eval_questions.iter().take(a.questions).cloned().collect();
            prompts.extend(
                many_shot_ladder(&questions, &pool, &a.shots)
                    .with_context(|| format!("example answers from {}", from.display()))?,
            );
        }
        let judge = a.judge.build(&m)?;
        let o = MonitorOptions {
            questions: a.questions,
            layers: Layers::parse(&a.layers)?.resolve(m.engine.config.n_layers),
            layer: a.layer,
            generate: a.generate,
            max_tokens: a.max_tokens,
            batch: a.batch,
            seed: a.seed,
            random: a.random,
            show_progress: !a.quiet,
        };
        let name = t.as_ref().map(|t| t.name.clone()).unwrap_or_else(|| v.name.clone());
        if let Some(out) = &a.out {
            ensure_parent(out)?;
        }
        let r = persona::persona::monitor::run(&m, &name, prompts, &v, t.as_ref(), judge.as_deref(), &o)?;
        print!("{}", r.table());
        if let Some(out) = &a.out {
            write_atomic(out, serde_json::to_string_pretty(&r)?.as_bytes())?;
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct ScreenArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vector: VectorArg,
    /// Chat JSONL (`messages`) or prompt/response JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Layer to project at (default: the vector's persona.layer).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Report file; its extension picks the format: .json (the whole report), .jsonl (one sample per
    /// line), .csv or .md (ranked tables). Each sample keeps the dataset's own fields (ids, labels).
    #[arg(long)]
    pub out: PathBuf,
    /// Show the K highest-ΔP samples.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Norm-matched random directions, the control: ΔP along each (no extra model runs).
    #[arg(long, default_value_t = 20)]
    pub random: usize,
    /// Seeds the random directions (drawn from SEED xor LAYER, as `monitor` does).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bars (they are drawn only when stderr is a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn vector_layer(v: &PersonaVector, arg: Option<usize>) -> Result<usize> {
    match arg {
        Some(l) => Ok(l),
        None => v
            .metadata
            .get("persona.layer")
            .and_then(|l| l.parse().ok())
            .context("the vector records no layer (persona.layer; run `persona eval`): pass --layer"),
    }
}

impl ModelTask for ScreenArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        let a = self;
        let format = ReportFormat::for_path(&a.out)?;
        let (path, v) = a.vector.open(&m)?;
        let layer = vector_layer(&v, a.layer)?;
        let (samples, fields) = read_dataset_with_fields(&a.data)?;
        ensure_parent(&a.out)?;
        let progress_file = a.out.with_extension("progress.jsonl");
        let o = ScreenOptions {
            layer,
            max_tokens: a.max_tokens,
            batch: a.batch,
            random: a.random,
            seed: a.seed,
            show_progress: !a.quiet,
        };
        let rows = screen(&m, &v, &samples, &progress_file, &o)?;
        let mean = rows.iter().map(|r| r.delta_p).sum::<f64>() / rows.len().max(1) as f64;
        let ctl = screen_control(&rows);
        let mut ranked = rows.clone();
        ranked.sort_by(|x, y| y.delta_p.total_cmp(&x.delta_p));
        let body = render(
            format,
            &Report {
                vector: &path,
                layer,
                mean,
                random: a.random,
                seed: a.seed,
                control: &ctl,
                ranked: &ranked,
                samples: &samples,
                fields: &fields,
            },
        )?;
        write_atomic(&a.out, body.as_bytes())?;
        let _ = std::fs::remove_file(&progress_file);
        println!("{} samples, dataset mean ΔP = {mean:+.3} at layer {layer}", rows.len());
        if a.random > 0 {
            let c = &ctl.mean_delta_p;
            println!(
                "{} random directions: mean ΔP {:+.3}, 95th percentile of |mean ΔP| {:.3} (the vector's |mean ΔP| \
                 is at percentile {:.0}); per sample, random |ΔP| 95th percentile {:.3}, exceeded by {} samples",
                a.random, c.mean, c.p95_abs, c.percentile, ctl.sample_p95_abs, ctl.samples_above_p95
            );
        }
        println!(
            "top {} (pct: |ΔP| as a percentile of the random directions' for that sample):",
            a.top.min(rows.len())
        );
        for r in ranked.iter().take(a.top) {
            let resp: String = samples[r.index].response.chars().take(70).collect();
            let pct = r.delta_p_percentile.map_or("-".to_string(), |p| format!("{p:.0}"));
            println!("  #{:<5} ΔP {:+8.3} pct {:>3}  {}", r.index, r.delta_p, pct, resp.replace('\n', " "));
        }
        Ok(())
    }
}

/// The shipped vectors' folder.
pub fn shipped_vectors() -> PathBuf {
    let local = PathBuf::from("vectors/smollm2-135m-instruct");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct")
}

#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:
  persona demo                                  the shipped `evil` vector on the default model
  persona demo --trait humorous                 another shipped vector, by name
  persona demo --trait traits/pirate.json --vectors out/   a custom trait: its questions, and the
                                                vector named after it in out/ (out/pirate.safetensors)
  persona demo --vector out/pirate.safetensors  any vector: the trait stored in it at extraction")]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A trait: the name of a vector in --vectors DIR or vectors/<model name>/ (the shipped
    /// vectors, for the default model), or a trait JSON file, whose questions are asked and whose
    /// name picks the vector (default: evil, or with --vector the trait stored in the vector).
    #[arg(long = "trait", value_name = "NAME|PATH.json")]
    pub trait_name: Option<String>,
    /// The vector: a file, or a name looked up like --trait's (default: the trait's name).
    #[arg(long, value_name = "PATH|NAME")]
    pub vector: Option<PathBuf>,
    /// Folder searched first for vectors by name.
    #[arg(long, value_name = "DIR")]
    pub vectors: Option<PathBuf>,
    /// Steering coefficient α (raw; default 0.13·|h_L|/|v_L|); answers at −α, 0, +α.
    #[arg(long, allow_negative_numbers = true)]
    pub coeff: Option<f32>,
    #[arg(long)]
    pub layer: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub questions: usize,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
}

impl ModelTask for DemoArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        let a = self;
        let file_trait = match &a.trait_name {
            Some(x) if looks_like_path(x) => Some(TraitDef::load(x)?),
            _ => None,
        };
        let name = match (&file_trait, &a.trait_name, &a.vector) {
            (Some(t), _, _) => t.name.clone(),
            (None, Some(n), _) => n.clone(),
            (None, None, Some(v)) => v.file_stem().map_or("the".into(), |s| s.to_string_lossy().to_string()),
            (None, None, None) => "evil".to_string(),
        };
        let dirs = super::vector_dirs(a.vectors.as_deref(), &m.path);
        let wanted = a.vector.clone().unwrap_or_else(|| PathBuf::from(&name));
        let path = locate_vector(&wanted, &dirs).with_context(|| match &a.vector {
            Some(_) => "--vector".to_string(),
            None => format!(
                "no vector for the trait `{name}`: make one with `persona extract --trait {} --out DIR/{name}.safetensors` \
                 and pass --vectors DIR, or pass --vector",
                a.trait_name.as_deref().unwrap_or(&name)
            ),
        })?;
        let v = PersonaVector::load_for_model(&path, &m.engine.config)
            .with_context(|| format!("loading the {name} vector"))?;
        if let Some(w) = v.check_identity(&m.engine.config)? {
            eprintln!("warning: {w}");
        }
        let t = match file_trait {
            Some(t) => t,
            None => trait_for_vector(a.trait_name.as_deref(), &v)?,
        };
        let layer = vector_layer(&v, a.layer)?;
        let coeff = match a.coeff {
            Some(c) => c,
            // 0.13 of the layer's mean residual norm (coherent on the default model), in raw units.
            None => {
                let norms: Vec<f32> = v
                    .metadata
                    .get("persona.mean_norms")
                    .and_then(|s| serde_json::from_str(s).ok())
                    .context("the vector has no persona.mean_norms: pass --coeff")?;
                0.13 * norms[layer] / v.norm(layer)
            }
        };
        let row: Arc<[f32]> = Arc::from(v.layer(layer));
        let probe = Probe { name: t.name.clone(), layer, vector: row.clone() };
        let questions: Vec<&String> = t.eval_questions.iter().take(a.questions).collect();
        println!("persona demo: `{}` vector, layer {layer}, α = {coeff:.2} (raw)\n", t.name);
        let mut reqs = vec![];
        for q in &questions {
            for c in [-coeff, 0.0, coeff] {
                let ops = if c == 0.0 {
                    vec![]
                } else {
                    vec![SteerOp {
                        kind: SteerKind::Add,
                        layer,
                        vector: row.clone(),
                        coeff: c,
                        positions: Positions::All,
                        when: None,
                    }]
                };
                let st = Arc::new(SeqSteering {
                    sources: Vec::new(),
                    plan: SteeringPlan { ops },
                    probes: vec![probe.clone()],
                });
                reqs.push(GenRequest {
                    steering: Some(st),
                    ..GenRequest::greedy(chat_ids(&m, None, q)?, a.max_tokens)
                });
            }
        }
        let outs = m.engine.generate(&reqs, &mut |_, _| {})?;
        for (qi, q) in questions.iter().enumerate() {
            println!("Q: {q}");
            for (k, label) in ["−α", " 0", "+α"].iter().enumerate() {
                let o = &outs[qi * 3 + k];
                let text = m.answer_text(o)?.replace('\n', " ");
                println!("  {label} [score {:+7.2}] {}", o.response_mean_projection(0), text.trim());
            }
            println!();
        }
        println!("score = mean projection of the answer onto the unit `{}` vector at layer {layer}", t.name);
        Ok(())
    }
}
