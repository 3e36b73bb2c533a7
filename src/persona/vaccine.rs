//! Preventative steering measured, with controls (`persona vaccine`).
//!
//! Several LoRA fine-tunes of one model on the **same** rows, in the same order, from the same
//! initial adapter, differing only in the steering applied during the training passes: none
//! (`plain`), `c·v[L]` added at every position (`steer`), a norm-matched random direction at the
//! same coefficients (`random`), the direction ablated (`caft`), another trait's vector scaled to
//! `|v[L]|` (`other_trait`); plus the model itself (`base`). Every measurement is taken with the
//! steering **off**:
//!
//! - prompt projection: per evaluation question (chat-templated, no system prompt), the last
//!   prompt token's residual at L projected on the unit `v[L]` — `shift` is its mean minus base's;
//! - response projection: the model's greedy answer read by the **base** model at L (mean over the
//!   answer tokens) — `response_shift` is its mean minus base's own answers read the same way;
//! - `benign_nll`, `trait_nll_off`, `trait_nll_on`: held-out mean NLL per answer token (benign rows;
//!   trait rows without and with the arm's training steering), computed by the training pass;
//! - `logodds_shift` (when log-odds items are given): the trait log-odds of `persona eval` (mean
//!   log-prob per token of base's trait-positive answers minus its trait-negative ones, no system
//!   prompt) minus base's;
//! - 95% intervals of both shifts by a paired bootstrap over questions.
//!
//! Each arm writes `arms/<name>/` (adapter, `train_log.jsonl`, `result.json` with the raw
//! per-question values); an arm whose `result.json` matches the run's settings is not retrained.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::common::{norm, quantile, random_like, teacher_force, unit, write_atomic, CaptureRange, Forced};
use crate::engine::generate::GenRequest;
use crate::engine::sampler::Rng;
use crate::error::{Error, Result};
use crate::model::lora::LoraAdapter;
use crate::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp, SteeringPlan};
use crate::train::data::Example;
use crate::train::pass::{forward_backward, DeviceLora};
use crate::train::{init_adapter, TrainBackend, TrainOptions, Trainer};
use crate::LoadedModel;

/// What an arm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArmKind {
    Base,
    Plain,
    Steer,
    Random,
    Caft,
    OtherTrait,
}

impl ArmKind {
    pub fn name(self) -> &'static str {
        match self {
            ArmKind::Base => "base",
            ArmKind::Plain => "plain",
            ArmKind::Steer => "steer",
            ArmKind::Random => "random",
            ArmKind::Caft => "caft",
            ArmKind::OtherTrait => "other_trait",
        }
    }
}

/// One arm: its name (a folder name), kind, and the steering of its training passes.
#[derive(Debug, Clone)]
pub struct Arm {
    pub name: String,
    pub kind: ArmKind,
    /// What the steering vector is (`evil@18`, `random(seed 1000)`, ...); `None` without steering.
    pub vector: Option<String>,
    pub coeff: Option<f32>,
    /// The training-time steering op (`None`: base and plain).
    pub op: Option<SteerOp>,
    /// Training seed (LoRA initialisation and data order) when not the run's: the seed-noise arms.
    pub seed: Option<u64>,
}

impl Arm {
    pub fn steering(&self) -> Option<SeqSteering> {
        self.op.as_ref().map(|op| SeqSteering {
            sources: Vec::new(),
            plan: SteeringPlan { ops: vec![op.clone()] },
            probes: vec![],
        })
    }
}

fn add_op(layer: usize, v: &[f32], coeff: f32) -> SteerOp {
    SteerOp { kind: SteerKind::Add, layer, vector: Arc::from(v), coeff, positions: Positions::All, when: None }
}

fn coeff_name(c: f32) -> String {
    format!("{c}").replace('-', "m")
}

/// The first arms of a run, in the order they are trained: base, plain, steer at each
/// coefficient, caft. The controls ([`control_arms`]) follow once the best coefficient is known.
pub fn plan_arms(layer: usize, v: &[f32], label: &str, coeffs: &[f32]) -> Result<Vec<Arm>> {
    if coeffs.is_empty() {
        return Err(Error::Invalid("give at least one steering coefficient".into()));
    }
    if let Some(c) = coeffs.iter().find(|c| !c.is_finite()) {
        return Err(Error::Invalid(format!("coefficient {c} is not a finite number")));
    }
    if norm(v) == 0.0 {
        return Err(Error::Invalid(format!("the vector `{label}` is zero at layer {layer}: no direction")));
    }
    let mut arms = vec![
        Arm { name: "base".into(), kind: ArmKind::Base, vector: None, coeff: None, op: None, seed: None },
        Arm { name: "plain".into(), kind: ArmKind::Plain, vector: None, coeff: None, op: None, seed: None },
    ];
    for &c in coeffs {
        arms.push(Arm {
            name: format!("steer-c{}", coeff_name(c)),
            kind: ArmKind::Steer,
            vector: Some(format!("{label}@{layer}")),
            coeff: Some(c),
            op: Some(add_op(layer, v, c)),
            seed: None,
        });
    }
    arms.push(Arm {
        name: "caft".into(),
        kind: ArmKind::Caft,
        vector: Some(format!("{label}@{layer}")),
        coeff: None,
        op: Some(SteerOp {
            kind: SteerKind::Ablate,
            layer,
            vector: Arc::from(v),
            coeff: 0.0,
            positions: Positions::All,
            when: None,
        }),
        seed: None,
    });
    Ok(arms)
}

/// The control arms: a random direction norm-matched to `v` per seed of `random_seeds` (the
/// same direction at every coefficient) at each of `coeffs`, and `other` (name, its row at
/// `layer`) scaled to `|v|` at `other_coeff`.
pub fn control_arms(
    layer: usize,
    v: &[f32],
    coeffs: &[f32],
    random_seeds: &[u64],
    other: Option<(&str, &[f32])>,
    other_coeff: f32,
) -> Result<Vec<Arm>> {
    let mut arms = vec![];
    for &s in random_seeds {
        let r = random_like(v, s);
        for &c in coeffs {
            arms.push(Arm {
                name: format!("random-c{}-s{s}", coeff_name(c)),
                kind: ArmKind::Random,
                vector: Some(format!("random(seed {s}, |v|={:.3})@{layer}", norm(v))),
                coeff: Some(c),
                op: Some(add_op(layer, &r, c)),
                seed: None,
            });
        }
    }
    if let Some((name, w)) = other {
        let nw = norm(w);
        if nw == 0.0 {
            return Err(Error::Invalid(format!("the other trait's vector `{name}` is zero at layer {layer}")));
        }
        let scaled: Vec<f32> = w.iter().map(|&x| (x as f64 * norm(v) / nw) as f32).collect();
        arms.push(Arm {
            name: format!("other-{name}-c{}", coeff_name(other_coeff)),
            kind: ArmKind::OtherTrait,
            vector: Some(format!("{name}@{layer} scaled to |v|")),
            coeff: Some(other_coeff),
            op: Some(add_op(layer, &scaled, other_coeff)),
            seed: None,
        });
    }
    Ok(arms)
}

/// The same arm trained from another seed (LoRA initialisation and data order): seed noise.
pub fn reseeded(arm: &Arm, seed: u64) -> Arm {
    Arm { name: format!("{}-seed{seed}", arm.name), seed: Some(seed), ..arm.clone() }
}

/// What a run trains besides its first arms ([`plan_arms`]).
#[derive(Debug, Clone)]
pub struct Protocol {
    pub coeffs: Vec<f32>,
    /// Seeds of the random directions (one direction per seed).
    pub random_seeds: Vec<u64>,
    /// Random arms at every coefficient; otherwise at the best steer arm's coefficient only.
    pub random_at_all: bool,
    /// Another trait's vector row at the layer, scaled to `|v|` and added at the best coefficient.
    pub other: Option<(String, Vec<f32>)>,
    /// Train plain and the best steer arm again from this seed.
    pub noise_seed: Option<u64>,
    /// The best steer arm keeps benign NLL within this many nats/token of plain's.
    pub nll_margin: f64,
}

/// The best steer arm: the highest prompt prevention ratio among those whose benign NLL is within
/// `nll_margin` of plain's (or among all steer arms when none is); `None` without steer arms.
/// Returns (index into `arms`, whether it met the NLL margin).
pub fn best_steer(arms: &[ArmMeasure], nll_margin: f64) -> Option<(usize, bool)> {
    let base = arms.iter().find(|a| a.kind == ArmKind::Base)?;
    let plain = arms.iter().find(|a| a.kind == ArmKind::Plain && a.seed.is_none())?;
    let shift = |a: &ArmMeasure| paired_shift(&a.prompt_proj, &base.prompt_proj, 0, 0).0;
    let ps = shift(plain);
    let steer: Vec<(usize, f64, bool)> = arms
        .iter()
        .enumerate()
        .filter(|(_, a)| a.kind == ArmKind::Steer && a.seed.is_none())
        .map(|(i, a)| {
            let pr = prevention_ratio(shift(a), ps).unwrap_or(f64::NEG_INFINITY);
            (i, pr, a.benign_nll <= plain.benign_nll + nll_margin)
        })
        .collect();
    let pick =
        |ok_only: bool| steer.iter().filter(|x| !ok_only || x.2).max_by(|a, b| a.1.total_cmp(&b.1)).map(|x| (x.0, x.2));
    pick(true).or_else(|| pick(false))
}

/// The prepared data of a run (token ids; see the CLI for how it is made from a trait).
#[derive(Debug, Clone, Default)]
pub struct VaccineData {
    pub train: Vec<Example>,
    /// Held-out trait rows (`trait_nll_*`).
    pub trait_holdout: Vec<Example>,
    /// Held-out benign rows (`benign_nll`).
    pub benign_holdout: Vec<Example>,
    /// Evaluation prompts (chat-templated questions, no system prompt, generation prompt added).
    pub eval_prompts: Vec<Vec<u32>>,
    /// Log-odds items: per evaluation question, base's trait-positive and trait-negative answers
    /// after the no-system prompt. Empty: no `logodds_shift`.
    pub logodds_pos: Vec<Forced>,
    pub logodds_neg: Vec<Forced>,
}

/// How a run measures.
#[derive(Debug, Clone)]
pub struct VaccineOptions {
    /// Residual index of the steering and of every projection.
    pub layer: usize,
    pub train: TrainOptions,
    /// Greedy answer length for the response projection.
    pub max_answer_tokens: usize,
    /// Bootstrap resamples and seed.
    pub resamples: usize,
    pub boot_seed: u64,
    /// Sequences per evaluation batch.
    pub batch: usize,
    /// What an arm's measurement depends on (model, trait, vector, layer, data, training and
    /// evaluation settings), written into each arm's `result.json`: an arm recorded under other
    /// settings is refused. The protocol (coefficients, seeds) is not part of it, so a run can be
    /// extended with more arms.
    pub settings: Value,
}

/// An arm's raw measurements (its `result.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArmMeasure {
    pub name: String,
    pub kind: ArmKind,
    pub vector: Option<String>,
    pub coeff: Option<f32>,
    /// Training seed when not the run's (seed-noise arms).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Per evaluation question: last-prompt-token projection (this model).
    pub prompt_proj: Vec<f64>,
    /// Per evaluation question: this model's greedy answer read by the base model (mean over its
    /// tokens; NaN for an empty answer).
    pub response_proj: Vec<f64>,
    pub answer_tokens: Vec<usize>,
    pub logodds: Option<f64>,
    pub benign_nll: f64,
    pub trait_nll_off: f64,
    pub trait_nll_on: f64,
    /// FNV-1a of the initial adapter and of the training rows in order (same for every arm).
    pub init_hash: String,
    pub data_hash: String,
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub settings: Value,
}

fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

pub fn adapter_hash(a: &LoraAdapter) -> String {
    let mut h = FNV0;
    for p in a.layers.iter().flatten().flatten() {
        h = fnv(p.a.iter().chain(&p.b).flat_map(|x| x.to_le_bytes()), h);
    }
    format!("{h:016x}")
}

pub fn data_hash(rows: &[Example]) -> String {
    let mut h = FNV0;
    for r in rows {
        h = fnv(r.ids.iter().flat_map(|x| x.to_le_bytes()), h);
        h = fnv(r.target.iter().map(|&t| t as u8), h);
        h = fnv([0xff], h);
    }
    format!("{h:016x}")
}

/// Check the data before any training: enough rows and questions, no evaluation prompt among the
/// training rows' prompts.
pub fn check_data(d: &VaccineData) -> Result<()> {
    if d.eval_prompts.len() < 2 {
        return Err(Error::Invalid(format!(
            "{} evaluation question(s): a shift with an interval needs at least 2",
            d.eval_prompts.len()
        )));
    }
    if d.train.is_empty() || d.trait_holdout.is_empty() || d.benign_holdout.is_empty() {
        return Err(Error::Invalid(format!(
            "too little data: {} training rows, {} held-out trait rows, {} held-out benign rows (each needs at least 1)",
            d.train.len(),
            d.trait_holdout.len(),
            d.benign_holdout.len()
        )));
    }
    for (i, p) in d.eval_prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Invalid(format!("evaluation prompt {} is empty", i + 1)));
        }
        for r in &d.train {
            let first = r.target.iter().position(|&t| t).unwrap_or(r.ids.len());
            if r.ids[..first].ends_with(p) || r.ids[..first] == p[..] {
                return Err(Error::Invalid(format!(
                    "evaluation prompt {} is the prompt of a training row (line {}): evaluation questions must \
                     never be trained on",
                    i + 1,
                    r.line
                )));
            }
        }
    }
    if d.logodds_pos.len() != d.logodds_neg.len() {
        return Err(Error::Invalid("log-odds items: as many positive as negative answers are needed".into()));
    }
    Ok(())
}

/// The record at `path` (an arm's or a dataset's `result.json`) when there is one: `None` when
/// absent, an error when unreadable or made under other settings than `want`.
pub(crate) fn read_recorded<T: serde::de::DeserializeOwned>(
    path: &Path,
    settings: impl Fn(&T) -> &Value,
    want: &Value,
    what: &str,
) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let r: T = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not {what}: {e}")))?;
    if settings(&r) != want {
        return Err(Error::format(
            path,
            "recorded under other settings (model, trait, vector, layer, data, training or evaluation settings); \
             use another --out-dir, or delete this folder",
        ));
    }
    Ok(Some(r))
}

/// Run `t` to its last step, one line per step in `dir/train_log.jsonl` and a progress line to
/// `log` (loss, first monitor's projection, ETA); save the adapter in `dir`. Returns (steps, last loss).
pub(crate) fn train_logged<B: TrainBackend>(
    t: &mut Trainer<'_, B>,
    dir: &Path,
    base_model: &str,
    name: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(usize, Option<f64>)> {
    let start = Instant::now();
    let total = t.total_steps();
    let log_path = dir.join("train_log.jsonl");
    let mut f = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let mut last = None;
    while t.step < total {
        let s = t.train_step(None)?;
        writeln!(f, "{}", s.to_json()).map_err(|e| Error::io(&log_path, e))?;
        let per = start.elapsed().as_secs_f64() / s.step as f64;
        log(&format!(
            "[{name}] step {}/{total} loss {:.4} proj {:+.3} ({:.1} s/step, ETA {:.0} s)",
            s.step,
            s.loss,
            s.projections.first().map_or(f64::NAN, |p| p.2),
            per,
            per * (total - s.step) as f64
        ));
        last = Some(s.loss);
    }
    f.sync_all().map_err(|e| Error::io(&log_path, e))?;
    t.adapter.save(dir, base_model)?;
    Ok((total, last))
}

/// Mean NLL per answer token of `rows` with the adapter and `steering` (the training pass's loss).
pub fn nll<B: TrainBackend>(
    m: &LoadedModel<B>,
    lora: &DeviceLora<B>,
    rows: &[Example],
    steering: Option<&SeqSteering>,
    batch: usize,
) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let out = forward_backward(&m.engine, lora, &refs, steering, &[], 1.0, None)?;
        sum += out.loss_sum;
        n += out.targets;
    }
    Ok(sum / n.max(1) as f64)
}

fn probe_steering(layer: usize, u: &[f32]) -> SeqSteering {
    SeqSteering {
        sources: Vec::new(),
        plan: SteeringPlan::default(),
        probes: vec![Probe { name: "v".into(), layer, vector: Arc::from(u) }],
    }
}

/// Prompt projections, greedy answers read by `base`, and log-odds of `model` (steering off).
#[allow(clippy::type_complexity)]
fn measure_model<B: TrainBackend>(
    base: &LoadedModel<B>,
    model: &LoadedModel<B>,
    d: &VaccineData,
    u: &[f32],
    o: &VaccineOptions,
) -> Result<(Vec<f64>, Vec<f64>, Vec<usize>, Option<f64>)> {
    let probe = Arc::new(probe_steering(o.layer, u));
    let (mut prompt_proj, mut response_proj, mut lens) = (vec![], vec![], vec![]);
    for chunk in d.eval_prompts.chunks(o.batch.max(1)) {
        let reqs: Vec<GenRequest> = chunk
            .iter()
            .map(|p| GenRequest { steering: Some(probe.clone()), ..GenRequest::greedy(p.clone(), o.max_answer_tokens) })
            .collect();
        let gens = model.engine.generate(&reqs, &mut |_, _| {})?;
        let mut items = vec![];
        for (p, g) in chunk.iter().zip(&gens) {
            prompt_proj.push(g.last_prompt_projection(0) as f64);
            let ans = model.answer_ids(g);
            lens.push(ans.len());
            let mut tokens = p.clone();
            tokens.extend(&ans);
            items.push(Forced { tokens, answer_start: p.len() });
        }
        let outs = teacher_force(&base.engine, &items, Some(&probe), CaptureRange::None, false, o.batch, None)?;
        for (it, out) in items.iter().zip(outs) {
            response_proj.push(if it.tokens.len() > it.answer_start { out.answer_proj[0] as f64 } else { f64::NAN });
        }
    }
    let logodds = if d.logodds_pos.is_empty() {
        None
    } else {
        let lp = |items: &[Forced]| -> Result<f64> {
            let outs = teacher_force(&model.engine, items, None, CaptureRange::None, true, o.batch, None)?;
            Ok(outs.iter().map(|x| x.logprob.unwrap_or(0.0)).sum::<f64>() / outs.len().max(1) as f64)
        };
        Some(lp(&d.logodds_pos)? - lp(&d.logodds_neg)?)
    };
    Ok((prompt_proj, response_proj, lens, logodds))
}

/// Train (unless base) and measure one arm in `dir`; an arm already recorded there under the same
/// settings is read back and not retrained. `load_merged` builds the fine-tuned model (the adapter
/// merged into the weights); `log` receives progress lines.
#[allow(clippy::too_many_arguments)]
pub fn run_arm<B: TrainBackend>(
    base: &LoadedModel<B>,
    load_merged: &mut dyn FnMut(&LoraAdapter) -> Result<LoadedModel<B>>,
    arm: &Arm,
    d: &VaccineData,
    v: &[f32],
    o: &VaccineOptions,
    dir: &Path,
    base_model: &str,
    log: &mut dyn FnMut(&str),
) -> Result<ArmMeasure> {
    let result_path = dir.join("result.json");
    if let Some(r) = read_recorded::<ArmMeasure>(&result_path, |r| &r.settings, &o.settings, "an arm result")? {
        log(&format!("[{}] already measured: resumed from {}", arm.name, result_path.display()));
        return Ok(r);
    }
    check_data(d)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = &base.engine.config;
    let mut train = o.train.clone();
    if let Some(seed) = arm.seed {
        train.seed = seed;
    }
    let init = init_adapter(train.lora.clone(), cfg, train.seed);
    let init_hash = adapter_hash(&init);
    let steering = arm.steering();
    let start = Instant::now();
    let (adapter, steps, final_loss) = if arm.kind == ArmKind::Base {
        (LoraAdapter::zeros(o.train.lora.clone(), cfg), 0, None)
    } else {
        let u = unit(v);
        let monitor = Probe { name: "v".into(), layer: o.layer, vector: Arc::from(&u[..]) };
        let mut t = Trainer::new(&base.engine, train, init, d.train.clone(), vec![], steering.clone(), vec![monitor])?;
        let (total, last) = train_logged(&mut t, dir, base_model, &arm.name, log)?;
        (t.adapter, total, last)
    };
    let train_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    log(&format!("[{}] measuring (steering off)", arm.name));
    let lora = DeviceLora::upload(&base.engine.backend, &adapter)?;
    let benign_nll = nll(base, &lora, &d.benign_holdout, None, o.batch)?;
    let trait_nll_off = nll(base, &lora, &d.trait_holdout, None, o.batch)?;
    let trait_nll_on = match &steering {
        Some(s) => nll(base, &lora, &d.trait_holdout, Some(s), o.batch)?,
        None => trait_nll_off,
    };
    drop(lora);
    let u = unit(v);
    let (prompt_proj, response_proj, answer_tokens, logodds) = if arm.kind == ArmKind::Base {
        measure_model(base, base, d, &u, o)?
    } else {
        let merged = load_merged(&adapter)?;
        measure_model(base, &merged, d, &u, o)?
    };
    let r = ArmMeasure {
        name: arm.name.clone(),
        kind: arm.kind,
        vector: arm.vector.clone(),
        coeff: arm.coeff,
        seed: arm.seed,
        prompt_proj,
        response_proj,
        answer_tokens,
        logodds,
        benign_nll,
        trait_nll_off,
        trait_nll_on,
        init_hash,
        data_hash: data_hash(&d.train),
        steps,
        final_loss,
        train_seconds,
        eval_seconds: start.elapsed().as_secs_f64(),
        settings: o.settings.clone(),
    };
    let text = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&result_path, text.as_bytes())?;
    Ok(r)
}

/// Mean of `a[i] − b[i]` over the pairs where both are finite, and its 95% paired-bootstrap
/// interval (`resamples` resamples of the questions, seeded).
pub fn paired_shift(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> (f64, [f64; 2]) {
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).filter(|d| d.is_finite()).collect();
    if diffs.is_empty() {
        return (f64::NAN, [f64::NAN, f64::NAN]);
    }
    let n = diffs.len();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let mut rng = Rng::new(seed);
    let boots: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| diffs[(rng.next_u64() % n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    (mean, [quantile(&boots, 0.025), quantile(&boots, 0.975)])
}

pub(crate) fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// `results.json`'s value: every arm's shifts relative to `base` (the arm of kind base), the best
/// steer arm ([`best_steer`]), seed noise, and the verdict on the criteria.
pub fn results_json(
    arms: &[ArmMeasure],
    resamples: usize,
    seed: u64,
    settings: &Value,
    nll_margin: f64,
) -> Result<Value> {
    let base = arms
        .iter()
        .find(|a| a.kind == ArmKind::Base)
        .ok_or_else(|| Error::Invalid("no base arm to measure shifts against".into()))?;
    let shifts = |a: &ArmMeasure| {
        (
            paired_shift(&a.prompt_proj, &base.prompt_proj, resamples, seed),
            paired_shift(&a.response_proj, &base.response_proj, resamples, seed),
        )
    };
    let rows: Vec<Value> = arms
        .iter()
        .map(|a| {
            let ((s, ci_s), (r, ci_r)) = shifts(a);
            let lo = match (a.logodds, base.logodds) {
                (Some(x), Some(y)) => num(x - y),
                _ => Value::Null,
            };
            json!({
                "name": a.name, "kind": a.kind.name(), "vector": a.vector, "coeff": a.coeff, "seed": a.seed,
                "shift": num(s), "response_shift": num(r), "logodds_shift": lo,
                "benign_nll": num(a.benign_nll), "trait_nll_off": num(a.trait_nll_off), "trait_nll_on": num(a.trait_nll_on),
                "ci95": {"shift": [num(ci_s[0]), num(ci_s[1])], "response_shift": [num(ci_r[0]), num(ci_r[1])]},
                "final_loss": a.final_loss, "steps": a.steps, "train_seconds": a.train_seconds,
                "mean_answer_tokens": a.answer_tokens.iter().sum::<usize>() as f64 / a.answer_tokens.len().max(1) as f64,
            })
        })
        .collect();
    let mut out = json!({ "arms": rows, "settings": settings });
    let plain = arms.iter().find(|a| a.kind == ArmKind::Plain && a.seed.is_none());
    let (Some(plain), Some((bi, nll_ok))) = (plain, best_steer(arms, nll_margin)) else {
        return Ok(out);
    };
    let best = &arms[bi];
    let ((ps, ps_ci), (pr, _)) = shifts(plain);
    let ((bs, _), (br, _)) = shifts(best);
    let pr_of = |a: &ArmMeasure| {
        let ((s, _), (r, _)) = shifts(a);
        json!({"name": a.name, "pr_prompt": prevention_ratio(s, ps).map(num), "pr_response": prevention_ratio(r, pr).map(num)})
    };
    let randoms: Vec<&ArmMeasure> =
        arms.iter().filter(|a| a.kind == ArmKind::Random && a.coeff == best.coeff).collect();
    let random_prs: Vec<f64> = randoms.iter().filter_map(|a| prevention_ratio(shifts(a).0 .0, ps)).collect();
    let best_pr = prevention_ratio(bs, ps);
    let nll_delta = best.benign_nll - plain.benign_nll;
    let plain_significant = ps_ci[0] > 0.0 || ps_ci[1] < 0.0;
    let checks = json!({
        "plain_shift_significant": plain_significant,
        "best_pr_at_least_0.5": best_pr.is_some_and(|p| p >= 0.5),
        "benign_nll_within_margin": nll_ok,
        "random_pr_at_most_0.25": (!random_prs.is_empty()).then(|| random_prs.iter().all(|&p| p <= 0.25)),
    });
    let met = checks.as_object().is_some_and(|c| c.values().all(|v| v == &json!(true)));
    // Seed noise: |shift(seed s) − shift(run's seed)| for plain and the best arm, where both ran.
    let noise: Vec<Value> = arms
        .iter()
        .filter(|a| a.seed.is_some())
        .filter_map(|a| {
            let twin = arms.iter().find(|b| b.seed.is_none() && b.kind == a.kind && b.coeff == a.coeff)?;
            let ((s1, _), (r1, _)) = shifts(a);
            let ((s0, _), (r0, _)) = shifts(twin);
            Some(json!({"arm": twin.name, "seed": a.seed, "shift_diff": num((s1 - s0).abs()), "response_shift_diff": num((r1 - r0).abs())}))
        })
        .collect();
    out["best"] = json!({
        "name": best.name, "coeff": best.coeff,
        "rule": format!("steer arm with the highest prompt PR among those with benign NLL ≤ plain + {nll_margin} (all steer arms if none)"),
        "pr_prompt": best_pr.map(num), "pr_response": prevention_ratio(br, pr).map(num),
        "benign_nll_minus_plain": num(nll_delta),
        "random_at_best_coeff": randoms.iter().map(|a| pr_of(a)).collect::<Vec<_>>(),
        "other_trait": arms.iter().filter(|a| a.kind == ArmKind::OtherTrait).map(pr_of).collect::<Vec<_>>(),
        "caft": arms.iter().filter(|a| a.kind == ArmKind::Caft).map(pr_of).collect::<Vec<_>>(),
    });
    out["seed_noise"] = json!(noise);
    out["verdict"] = json!({"checks": checks, "criterion_met": met});
    Ok(out)
}

fn f(x: &Value, digits: usize) -> String {
    x.as_f64().map_or("–".into(), |v| format!("{v:+.digits$}"))
}

/// Prevention ratio `1 − |x_arm| / |x_plain|` (`None` when plain's shift is 0 or missing).
pub fn prevention_ratio(arm: f64, plain: f64) -> Option<f64> {
    (plain.is_finite() && plain != 0.0 && arm.is_finite()).then(|| 1.0 - arm.abs() / plain.abs())
}

/// `results.md`: the table and the prevention ratios.
pub fn results_markdown(results: &Value) -> String {
    let arms = results["arms"].as_array().cloned().unwrap_or_default();
    let plain = arms.iter().find(|a| a["kind"] == "plain");
    let ps = plain.and_then(|p| p["shift"].as_f64()).unwrap_or(f64::NAN);
    let pr = plain.and_then(|p| p["response_shift"].as_f64()).unwrap_or(f64::NAN);
    let mut s = String::from("# persona vaccine\n\n");
    s += &format!("settings: `{}`\n\n", results["settings"]);
    s += "Shifts are relative to base, measured with steering off; [95% paired bootstrap over questions]. \
          PR = 1 − |shift_arm| / |shift_plain| (prompt; response).\n\n";
    s += "| arm | kind | coeff | shift [95%] | response_shift [95%] | logodds_shift | benign_nll | trait_nll_off | trait_nll_on | PR prompt | PR response |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for a in &arms {
        let ci = |k: &str| format!("[{}, {}]", f(&a["ci95"][k][0], 3), f(&a["ci95"][k][1], 3));
        let prf = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.2}"));
        let (is_ft, sh, rs) = (
            a["kind"] != "base" && a["kind"] != "plain",
            a["shift"].as_f64().unwrap_or(f64::NAN),
            a["response_shift"].as_f64().unwrap_or(f64::NAN),
        );
        s += &format!(
            "| {} | {} | {} | {} {} | {} {} | {} | {:.4} | {:.4} | {:.4} | {} | {} |\n",
            a["name"].as_str().unwrap_or(""),
            a["kind"].as_str().unwrap_or(""),
            a["coeff"].as_f64().map_or("–".into(), |c| format!("{c}")),
            f(&a["shift"], 3),
            ci("shift"),
            f(&a["response_shift"], 3),
            ci("response_shift"),
            f(&a["logodds_shift"], 3),
            a["benign_nll"].as_f64().unwrap_or(f64::NAN),
            a["trait_nll_off"].as_f64().unwrap_or(f64::NAN),
            a["trait_nll_on"].as_f64().unwrap_or(f64::NAN),
            if is_ft { prf(prevention_ratio(sh, ps)) } else { "–".into() },
            if is_ft { prf(prevention_ratio(rs, pr)) } else { "–".into() },
        );
    }
    let b = &results["best"];
    if b.is_object() {
        let prf = |x: &Value| x.as_f64().map_or("–".to_string(), |v| format!("{v:.2}"));
        s += &format!(
            "\nBest steer arm: **{}** ({}): PR prompt {}, response {}; benign NLL {} nats/token vs plain.\n",
            b["name"].as_str().unwrap_or(""),
            b["rule"].as_str().unwrap_or(""),
            prf(&b["pr_prompt"]),
            prf(&b["pr_response"]),
            f(&b["benign_nll_minus_plain"], 4)
        );
        for r in b["random_at_best_coeff"].as_array().into_iter().flatten() {
            s += &format!(
                "- random at the same coefficient, {}: PR prompt {}, response {}\n",
                r["name"].as_str().unwrap_or(""),
                prf(&r["pr_prompt"]),
                prf(&r["pr_response"])
            );
        }
        for n in results["seed_noise"].as_array().into_iter().flatten() {
            s += &format!(
                "- seed noise, {} (seed {}): |Δshift| {}, |Δresponse_shift| {}\n",
                n["arm"].as_str().unwrap_or(""),
                n["seed"],
                f(&n["shift_diff"], 3),
                f(&n["response_shift_diff"], 3)
            );
        }
        s += &format!(
            "\nCriterion checks: `{}` → **{}**\n",
            results["verdict"]["checks"],
            if results["verdict"]["criterion_met"] == json!(true) { "met" } else { "not met" }
        );
    }
    s
}

/// Run every arm (resuming finished ones) and write `results.json` and `results.md` atomically
/// into `out`; arms go to `out/arms/<name>/`. The first arms are [`plan_arms`]'s; then, once the
/// best steer arm is known, the controls ([`control_arms`]: random directions at every coefficient
/// or at the best one, the other trait at the best one) and the seed-noise arms. Returns the
/// results value.
#[allow(clippy::too_many_arguments)]
pub fn run<B: TrainBackend>(
    base: &LoadedModel<B>,
    load_merged: &mut dyn FnMut(&LoraAdapter) -> Result<LoadedModel<B>>,
    label: &str,
    protocol: &Protocol,
    d: &VaccineData,
    v: &[f32],
    o: &VaccineOptions,
    out: &Path,
    base_model: &str,
    log: &mut dyn FnMut(&str),
) -> Result<Value> {
    check_data(d)?;
    if v.len() != base.engine.config.hidden {
        return Err(Error::Invalid(format!(
            "the vector row has {} values; the model's hidden size is {}",
            v.len(),
            base.engine.config.hidden
        )));
    }
    let p = protocol;
    let arms = plan_arms(o.layer, v, label, &p.coeffs)?;
    if let Some((name, w)) = &p.other {
        if w.len() != v.len() {
            return Err(Error::Invalid(format!(
                "the other trait's vector `{name}` has {} values, not {}",
                w.len(),
                v.len()
            )));
        }
    }
    // results.json's settings: the arms' (which decide whether a finished arm is reused) and the
    // protocol's (which arms there are: changing them extends a run instead of redoing it).
    let mut settings = o.settings.clone();
    if let Some(m) = settings.as_object_mut() {
        m.insert("coeffs".into(), json!(p.coeffs));
        m.insert("random_seeds".into(), json!(p.random_seeds));
        m.insert("random_at_all".into(), json!(p.random_at_all));
        m.insert("other_trait".into(), json!(p.other.as_ref().map(|o| &o.0)));
        m.insert("noise_seed".into(), json!(p.noise_seed));
        m.insert("nll_margin".into(), json!(p.nll_margin));
    }
    let start = Instant::now();
    let mut done: Vec<ArmMeasure> = vec![];
    let write = |done: &[ArmMeasure]| -> Result<Value> {
        let results = results_json(done, o.resamples, o.boot_seed, &settings, p.nll_margin)?;
        write_atomic(&out.join("results.json"), serde_json::to_string_pretty(&results).unwrap_or_default().as_bytes())?;
        write_atomic(&out.join("results.md"), results_markdown(&results).as_bytes())?;
        write_plots(&results, out)?;
        Ok(results)
    };
    let mut run_arms = |arms: &[Arm], done: &mut Vec<ArmMeasure>, log: &mut dyn FnMut(&str)| -> Result<()> {
        for arm in arms {
            log(&format!("arm {}: {} ({:.0} s so far)", done.len() + 1, arm.name, start.elapsed().as_secs_f64()));
            let r = run_arm(base, load_merged, arm, d, v, o, &out.join("arms").join(&arm.name), base_model, log)?;
            done.push(r);
            write(done)?;
        }
        Ok(())
    };
    run_arms(&arms, &mut done, log)?;
    if let Some((bi, _)) = best_steer(&done, p.nll_margin) {
        let best = done[bi].coeff.unwrap_or(0.0);
        log(&format!("best steer arm: {} (coefficient {best}); planning the controls", done[bi].name));
        let rc: Vec<f32> = if p.random_at_all { p.coeffs.clone() } else { vec![best] };
        let other = p.other.as_ref().map(|(n, w)| (n.as_str(), &w[..]));
        let mut controls = control_arms(o.layer, v, &rc, &p.random_seeds, other, best)?;
        if let Some(s) = p.noise_seed {
            let plain = arms.iter().find(|a| a.kind == ArmKind::Plain);
            let steer = arms.iter().find(|a| a.name == done[bi].name);
            controls.extend(plain.into_iter().chain(steer).map(|a| reseeded(a, s)));
        }
        let mut names: Vec<&str> = arms.iter().chain(&controls).map(|a| a.name.as_str()).collect();
        names.sort();
        names.dedup();
        if names.len() != arms.len() + controls.len() {
            return Err(Error::Invalid("two arms have the same name".into()));
        }
        run_arms(&controls, &mut done, log)?;
    }
    write(&done)
}

/// The plots of a run's results: `shift_vs_coeff.svg` (prompt shift of the steer and random arms
/// by coefficient, with their intervals, plain and base as lines, the other trait and CAFT as
/// points), `response_shift_vs_coeff.svg` (the same for the response shift) and
/// `training_projection.svg` (each trained arm's projection on the unit vector at L per step,
/// from its `train_log.jsonl`, read before the layer's training steering: the model's own drift). Returns the files written.
pub fn write_plots(results: &Value, out: &Path) -> Result<Vec<std::path::PathBuf>> {
    use crate::plot::{Chart, Point, Series};
    let arms = results["arms"].as_array().cloned().unwrap_or_default();
    let layer = &results["settings"]["layer"];
    let label = results["settings"]["trait"].as_str().unwrap_or("trait").to_string();
    let mut written = vec![];
    for (key, what) in [("shift", "prompt"), ("response_shift", "response")] {
        let point = |a: &Value| -> Option<Point> {
            let (x, y) = (a["coeff"].as_f64()?, a[key].as_f64()?);
            let ci = &a["ci95"][key];
            Some(match (ci[0].as_f64(), ci[1].as_f64()) {
                (Some(lo), Some(hi)) => Point::new(x, y).with_ci(lo, hi),
                _ => Point::new(x, y),
            })
        };
        let of = |kind: &str, name_has: Option<&str>| -> Vec<Point> {
            arms.iter()
                .filter(|a| a["kind"] == kind && a["seed"].is_null())
                .filter(|a| name_has.is_none_or(|n| a["name"].as_str().is_some_and(|s| s.ends_with(n))))
                .filter_map(point)
                .collect()
        };
        let mut series = vec![Series::line(format!("{label} vector (steer)"), of("steer", None))];
        let mut seeds: Vec<String> = arms
            .iter()
            .filter(|a| a["kind"] == "random")
            .filter_map(|a| a["name"].as_str()?.rsplit_once("-s").map(|(_, s)| format!("-s{s}")))
            .collect();
        seeds.sort();
        seeds.dedup();
        for s in &seeds {
            let mut r = Series::line(format!("random direction (seed {})", &s[2..]), of("random", Some(s)));
            r.dashed = true;
            series.push(r);
        }
        for kind in ["other_trait", "caft"] {
            for a in arms.iter().filter(|a| a["kind"] == kind) {
                // CAFT has no coefficient: drawn at the best coefficient's x for reference.
                let x = a["coeff"].as_f64().or_else(|| results["best"]["coeff"].as_f64()).unwrap_or(1.0);
                if let Some(y) = a[key].as_f64() {
                    let mut p = Point::new(x, y).with_label(a["name"].as_str().unwrap_or(kind));
                    if let (Some(lo), Some(hi)) = (a["ci95"][key][0].as_f64(), a["ci95"][key][1].as_f64()) {
                        p = p.with_ci(lo, hi);
                    }
                    series.push(Series::scatter(a["name"].as_str().unwrap_or(kind).to_string(), vec![p]));
                }
            }
        }
        let mut hlines = vec![("base".to_string(), 0.0)];
        if let Some(p) = arms.iter().find(|a| a["kind"] == "plain" && a["seed"].is_null()).and_then(|a| a[key].as_f64())
        {
            hlines.push(("plain fine-tune".to_string(), p));
        }
        let chart = Chart {
            title: format!(
                "{label}: {what} projection shift after fine-tuning (steering off), by training coefficient"
            ),
            x_label: "steering coefficient during training (raw, × v)".into(),
            y_label: format!("{what} shift vs base (projection at layer {layer})"),
            series,
            hlines,
            log_x: true,
        };
        let file = out.join(format!("{key}_vs_coeff.svg"));
        write_atomic(&file, chart.to_svg()?.as_bytes())?;
        written.push(file);
    }
    // Projection during training, per trained arm.
    let mut series = vec![];
    for a in &arms {
        let name = a["name"].as_str().unwrap_or("");
        let log = out.join("arms").join(name).join("train_log.jsonl");
        let Ok(text) = std::fs::read_to_string(&log) else { continue };
        let pts: Vec<Point> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| {
                let p = v["projections"]["v"].as_object()?.values().next()?.as_f64()?;
                Some(Point::new(v["step"].as_f64()?, p))
            })
            .collect();
        if !pts.is_empty() {
            let mut s = Series::line(name.to_string(), pts);
            s.dashed = a["kind"] == "random";
            series.push(s);
        }
    }
    let chart = Chart {
        title: format!("{label}: projection during training (read before the layer's steering)"),
        x_label: "optimiser step".into(),
        y_label: format!("mean projection over the step's answer tokens, layer {layer}"),
        series,
        hlines: vec![],
        log_x: false,
    };
    let file = out.join("training_projection.svg");
    write_atomic(&file, chart.to_svg()?.as_bytes())?;
    written.push(file);
    Ok(written)
}
