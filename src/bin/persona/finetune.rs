//! `persona finetune`: LoRA fine-tuning with steering in the training pass (preventative
//! steering, CAFT), PEFT-compatible adapters out, per-step log with monitor projections.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use persona::backend::cpu::CpuGemmBackend;
use persona::backend::Backend;
use persona::model::lora::{LoraAdapter, LoraConfig, Target};
use persona::persona::common::randomize_ops;
use persona::steer::spec::resolve;
use persona::train::data::{read_jsonl, split_holdout, DataOptions, Example};
use persona::train::optim::Schedule;
use persona::train::{init_adapter, TrainOptions, Trainer};
use persona::LoadedModel;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{BackendKind, ModelArgs};

#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training rows (JSONL): {"messages":[..]}, {"prompt","response"}, {"question","answer"} or {"ids","answer_from"}.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: adapter_model.safetensors + adapter_config.json (PEFT), train_log.jsonl,
    /// persona_train.json, checkpoint/.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Keep only rows whose "label" equals this (extraction files label answers pos/neg).
    #[arg(long)]
    pub label: Option<String>,
    /// Steering in every training forward pass (the vaccine): same SPEC as `generate`; positions default to all.
    #[arg(long)]
    pub steer: Vec<String>,
    /// Log the mean projection of the answer tokens at these layers each step (before that layer's steering).
    #[arg(long)]
    pub monitor: Vec<String>,
    /// Folder searched first for `vector=NAME` in --steer / --monitor (then vectors/<model name>/).
    #[arg(long, value_name = "DIR")]
    pub vectors: Option<PathBuf>,
    /// Replace each steering vector by a random direction of the same norm (seeded): the control arm.
    #[arg(long)]
    pub random_control: Option<u64>,
    /// Start from an existing PEFT adapter (its config gives rank, alpha, rsLoRA and targets).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Scale alpha/√r (rsLoRA, the default) ...
    #[arg(long, overrides_with = "no_rslora")]
    pub rslora: bool,
    /// ... or alpha/r.
    #[arg(long)]
    pub no_rslora: bool,
    #[arg(long, default_value = "q,k,v,o,gate,up,down", value_delimiter = ',')]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Optimiser steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch (ragged, no padding).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the file order (with --batch ≥ rows every step uses all rows in order).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Held-out rows: a JSONL file, or a fraction of the data (e.g. 0.1).
    #[arg(long)]
    pub holdout: Option<String>,
    /// Held-out loss every N steps (and after the last).
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Longest row in tokens (longer rows are an error, never truncated).
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Write a checkpoint every N steps (and always on Ctrl-C and at the end).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Write the LoRA gradients of the first step (before any update) with the adapter's keys.
    #[arg(long)]
    pub grads_out: Option<PathBuf>,
    /// Continue the run in DIR (its --out) from its checkpoint, bit for bit; give the same data and options.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Stop after this many steps of this invocation, with a checkpoint (a long run split into
    /// time-boxed jobs; continue with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Print one JSON object per step on stdout instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

fn sha256_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    persona::train::keep_freed_memory();
    if a.model.adapter.is_some() {
        bail!("finetune trains an adapter on the base model: use --init-adapter DIR to start from an existing adapter");
    }
    a.model.cpu_activations.refuse_for_training("finetune")?;
    if !matches!(a.model.backend, BackendKind::Auto | BackendKind::Cpu) {
        bail!("training runs on the CPU backend (the CUDA and wgpu training kernels are not written yet); use --backend cpu");
    }
    let path = super::resolve_model(&a.model.model)?;
    let m = LoadedModel::load(&path, CpuGemmBackend, a.model.context.max(a.max_len))
        .with_context(|| format!("loading {}", path.display()))?;
    finetune(a, m, &path)
}

fn lora_config(a: &FinetuneArgs) -> Result<LoraConfig> {
    if a.lora_rank == 0 {
        bail!("--lora-rank must be at least 1");
    }
    if !(a.lora_alpha.is_finite() && a.lora_alpha > 0.0) {
        bail!("--lora-alpha must be a positive number");
    }
    let mut targets = vec![];
    for t in &a.targets {
        let t = Target::parse(t.trim())?;
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    if targets.is_empty() {
        bail!("--targets names no module");
    }
    targets.sort_by_key(|t| t.index());
    Ok(LoraConfig { r: a.lora_rank, alpha: a.lora_alpha, use_rslora: !a.no_rslora, targets })
}

fn finetune<B: Backend + persona::train::TrainBackend>(
    a: FinetuneArgs,
    m: LoadedModel<B>,
    model_path: &Path,
) -> Result<()> {
    let cfg = m.engine.config.clone();
    let out = match (&a.out, &a.resume) {
        (Some(o), Some(r)) if o != r => {
            bail!("--out {} and --resume {}: give one run folder", o.display(), r.display())
        }
        (Some(o), _) => o.clone(),
        (None, Some(r)) => r.clone(),
        (None, None) => bail!("--out DIR is required"),
    };
    let out = &out;
    let run_file = out.join("persona_train.json");
    let log_file = out.join("train_log.jsonl");
    let ckpt = out.join("checkpoint");
    if a.resume.is_some() {
        if !run_file.exists() {
            bail!("--resume: {} holds no training run (no persona_train.json)", out.display());
        }
    } else if run_file.exists() {
        bail!(
            "{} already holds a training run (persona_train.json): pass --resume DIR to continue it, or choose another --out",
            out.display()
        );
    }

    // Data.
    let opts_data = DataOptions { max_len: a.max_len, label: a.label.clone() };
    let rows = read_jsonl(&a.data, &m, &opts_data)?;
    let data_sha = sha256_file(&a.data)?;
    let (train, holdout): (Vec<Example>, Vec<Example>) = match &a.holdout {
        None => (rows, vec![]),
        Some(h) => match h.parse::<f64>() {
            Ok(f) if !Path::new(h).exists() => split_holdout(rows, f, a.seed)?,
            _ => (rows, read_jsonl(Path::new(h), &m, &opts_data)?),
        },
    };

    // Steering (training passes only) and monitors.
    let (steer, monitor) =
        super::generate::parse_specs(&a.steer, &a.monitor, &super::vector_dirs(a.vectors.as_deref(), &m.path))?;
    if let Some(s) = steer.iter().find(|s| s.when.is_some()) {
        bail!("--steer {}: when= conditions are not differentiable and are refused for training", s.vector);
    }
    let mut warnings = vec![];
    let mut st = resolve(&steer, &monitor, &cfg, &mut warnings)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let monitors = std::mem::take(&mut st.probes);
    if let Some(seed) = a.random_control {
        randomize_ops(&mut st, seed);
    }
    let steer_record: Vec<_> = st
        .plan
        .ops
        .iter()
        .map(|o| {
            json!({"kind": format!("{:?}", o.kind).to_lowercase(), "layer": o.layer, "coeff": o.coeff,
                   "positions": format!("{:?}", o.positions).to_lowercase(), "vector_sha256": sha256_f32(&o.vector),
                   "norm": o.vector.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()})
        })
        .collect();
    let steer_files: Vec<_> = steer
        .iter()
        .map(|s| {
            let path = s.vector.path().context("--steer: training takes vector files")?;
            Ok(json!({"spec_vector": path, "file_sha256": sha256_file(path)?}))
        })
        .collect::<Result<_>>()?;
    let steering = (!st.plan.ops.is_empty()).then_some(st);

    // Adapter and options.
    let adapter = match &a.init_adapter {
        Some(dir) => LoraAdapter::load(dir, &cfg).with_context(|| format!("--init-adapter {}", dir.display()))?,
        None => init_adapter(lora_config(&a)?, &cfg, a.seed),
    };
    let mut opts = TrainOptions::new(adapter.config.clone());
    opts.lr = a.lr;
    opts.adamw.weight_decay = a.weight_decay;
    opts.clip = (a.clip > 0.0).then_some(a.clip);
    opts.schedule = Schedule::parse(&a.schedule)?;
    opts.warmup = a.warmup;
    opts.steps = a.steps;
    opts.epochs = a.epochs.unwrap_or(1.0);
    opts.batch = a.batch;
    opts.accum = a.accum;
    opts.seed = a.seed;
    opts.shuffle = !a.no_shuffle;
    opts.eval_every = a.eval_every.max(1);
    let n_train = train.len();
    let n_holdout = holdout.len();
    let answer_tokens: usize = train.iter().map(|e| e.n_targets()).sum();
    let mut trainer = Trainer::new(&m.engine, opts.clone(), adapter, train, holdout, steering, monitors)?;
    let total = trainer.total_steps();
    let record = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "model": model_path,
        "data": {"path": a.data, "sha256": data_sha, "rows": n_train, "holdout_rows": n_holdout,
                 "answer_tokens": answer_tokens, "label": a.label, "max_len": a.max_len},
        "lora": {"r": opts.lora.r, "alpha": opts.lora.alpha, "use_rslora": opts.lora.use_rslora,
                 "targets": opts.lora.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
                 "init_adapter": a.init_adapter},
        "optimizer": {"kind": "adamw", "lr": opts.lr, "betas": [opts.adamw.beta1, opts.adamw.beta2],
                      "eps": opts.adamw.eps, "weight_decay": opts.adamw.weight_decay, "clip": opts.clip,
                      "schedule": opts.schedule.name(), "warmup": opts.warmup},
        "steps": total, "batch": opts.batch, "accum": opts.accum, "seed": opts.seed, "shuffle": opts.shuffle,
        "steering": steer_record, "steering_files": steer_files, "random_control": a.random_control,
        "monitors": a.monitor,
    });
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if a.resume.is_some() {
        let text = std::fs::read_to_string(&run_file).with_context(|| format!("reading {}", run_file.display()))?;
        let prev: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", run_file.display()))?;
        if prev["status"] == "finished" {
            bail!("--resume: the run in {} finished ({} steps); nothing to continue", out.display(), prev["steps"]);
        }
        for key in
            ["data", "lora", "optimizer", "steps", "batch", "accum", "seed", "shuffle", "steering", "random_control"]
        {
            if prev[key] != record[key] {
                bail!(
                    "--resume: this command's `{key}` differs from the run in {} ({} vs {}): a resumed run must use \
                     the same data and options",
                    out.display(),
                    record[key],
                    prev[key]
                );
            }
        }
        if !ckpt.join(persona::train::trainer::STATE_FILE).exists() {
            bail!("--resume: {} has no checkpoint yet; start the run again without --resume", out.display());
        }
        trainer.load_checkpoint(&ckpt)?;
        eprintln!("resuming at step {} of {total}", trainer.step);
        // Keep the log's lines up to the checkpoint.
        let kept: String = std::fs::read_to_string(&log_file)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= trainer.step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        persona::atomic_file::write_atomic(&log_file, kept.as_bytes())?;
    } else {
        let _ = std::fs::remove_file(&log_file);
    }
    let mut status = record.clone();
    status["status"] = json!("running");
    persona::atomic_file::write_atomic(&run_file, serde_json::to_string_pretty(&status)?.as_bytes())?;
    eprintln!(
        "finetune: {n_train} rows ({answer_tokens} answer tokens), {n_holdout} held out; {total} steps of batch {} × accum {}; \
         LoRA r {} alpha {} ({}), {} targets; {} steering op(s){}",
        opts.batch,
        opts.accum,
        opts.lora.r,
        opts.lora.alpha,
        if opts.lora.use_rslora { "rsLoRA" } else { "alpha/r" },
        opts.lora.targets.len(),
        record["steering"].as_array().map_or(0, |v| v.len()),
        if a.random_control.is_some() { " (random control)" } else { "" }
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // The first Ctrl-C finishes the step in flight and checkpoints; a second one leaves at once.
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: stopping now, without a checkpoint of the step in flight");
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to stop at once)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let base = model_path.display().to_string();
    let bar = if a.json { ProgressBar::hidden() } else { ProgressBar::new(total as u64) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed}<{eta} {msg}").unwrap());
    bar.set_position(trainer.step as u64);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_file)
        .with_context(|| format!("opening {}", log_file.display()))?;
    let started = Instant::now();
    let mut last = None;
    let stop_at = a.stop_after.map_or(total, |n| (trainer.step + n).min(total));
    while trainer.step < stop_at {
        let first = trainer.step == 0;
        let mut grads = None;
        if first && a.grads_out.is_some() {
            grads = Some(LoraAdapter::zeros(trainer.adapter.config.clone(), &cfg));
        }
        let entry = match trainer.step_and_evaluate(grads.as_mut()) {
            Ok(e) => e,
            Err(e) => {
                bar.abandon();
                let kept = if trainer.step > 0 {
                    trainer.save_checkpoint(&ckpt, &base)?;
                    format!("; the adapter after step {} is kept in {}", trainer.step, ckpt.display())
                } else {
                    String::new()
                };
                bail!("training stopped at step {}: {e}{kept}", trainer.step + 1);
            }
        };
        if let (Some(g), Some(p)) = (&grads, &a.grads_out) {
            g.save_tensors(p)?;
        }
        let line = entry.to_json();
        writeln!(log, "{line}").and_then(|_| log.flush()).with_context(|| format!("writing {}", log_file.display()))?;
        if a.json {
            println!("{line}");
        }
        let proj: String = entry.projections.iter().map(|(n, l, x)| format!(" {n}@{l} {x:+.3}")).collect();
        let held = entry.holdout_loss.map(|h| format!(" held-out {h:.4}")).unwrap_or_default();
        bar.set_message(format!("loss {:.4}{held} lr {:.2e} |g| {:.3}{proj}", entry.loss, entry.lr, entry.grad_norm));
        bar.inc(1);
        last = Some(entry);
        let interrupted = stop.load(Ordering::SeqCst);
        if interrupted || a.save_every.is_some_and(|n| n > 0 && trainer.step % n == 0) {
            trainer.save_checkpoint(&ckpt, &base)?;
        }
        if interrupted && trainer.step < total {
            bar.abandon();
            eprintln!(
                "interrupted after step {} of {total}: checkpoint in {}; continue with the same command and --resume {}",
                trainer.step,
                ckpt.display(),
                out.display()
            );
            std::process::exit(130);
        }
    }
    if trainer.step < total {
        bar.abandon();
        trainer.save_checkpoint(&ckpt, &base)?;
        eprintln!(
            "stopped after step {} of {total} (--stop-after): checkpoint in {}; continue with --resume {}",
            trainer.step,
            ckpt.display(),
            out.display()
        );
        return Ok(());
    }
    bar.finish();
    trainer.adapter.save(out, &base)?;
    trainer.save_checkpoint(&ckpt, &base)?;
    status["status"] = json!("finished");
    status["seconds"] = json!(started.elapsed().as_secs_f64());
    if let Some(l) = &last {
        status["final"] = l.to_json();
    }
    persona::atomic_file::write_atomic(&run_file, serde_json::to_string_pretty(&status)?.as_bytes())?;
    eprintln!("adapter written to {} (PEFT layout); log in {}", out.display(), log_file.display());
    Ok(())
}
