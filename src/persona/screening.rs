//! Data screening checked against real fine-tunes (`persona vaccine --screening`).
//!
//! For each dataset: ΔP before training — the mean over its rows of the projection of the
//! dataset's response minus the model's own greedy answer to the same prompt (mean answer
//! residual, [`screen`](super::screen)'s ΔP), along every studied trait's unit vector at that
//! trait's layer and along norm-matched random directions — then a LoRA fine-tune on the rows
//! (no steering; every dataset from the same initial adapter and seed) and the shift it caused:
//! per trait, the mean over its evaluation questions of the last-prompt-token projection of the
//! fine-tuned model minus the base model's. The question is whether ΔP predicts the shift
//! (Pearson r over datasets, with a Fisher-z 95% interval), and whether ΔP along random
//! directions predicts it as well (r for each random direction; their mean and 95th percentile
//! of |r|, and where the vector's |r| falls among them).
//!
//! Each dataset writes `datasets/<name>/` (adapter, `train_log.jsonl`, `result.json`); a dataset
//! already measured under the same settings is not redone, so an interrupted run resumes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::common::{percentile_of, project, quantile, random_directions, teacher_force, unit, write_atomic};
use super::common::{CaptureRange, Forced};
use super::screen::{data_and_own, Sample};
use super::vaccine::{num, paired_shift, read_recorded, train_logged};
use crate::error::{Error, Result};
use crate::model::lora::LoraAdapter;
use crate::steer::{Probe, SeqSteering, SteeringPlan};
use crate::train::data::Example;
use crate::train::{init_adapter, TrainBackend, TrainOptions, Trainer};
use crate::LoadedModel;

/// A studied trait: its vector's row at its layer and its evaluation prompts (chat-templated,
/// no system prompt, generation prompt added).
#[derive(Debug, Clone)]
pub struct StudyTrait {
    pub name: String,
    pub layer: usize,
    pub v: Vec<f32>,
    pub eval_prompts: Vec<Vec<u32>>,
}

/// A dataset: the same rows as screening samples (messages) and as training examples (ids).
#[derive(Debug, Clone)]
pub struct StudyDataset {
    pub name: String,
    /// The trait the dataset was made to induce (its "own" trait in the pooled correlation).
    pub trait_name: String,
    pub samples: Vec<Sample>,
    pub train: Vec<Example>,
}

#[derive(Debug, Clone)]
pub struct ScreeningOptions {
    pub train: TrainOptions,
    /// Random directions per trait (the control).
    pub random: usize,
    /// Seed of the random directions (drawn from `seed ^ layer`, as `persona screen` does).
    pub seed: u64,
    /// Length of the model's own answers for ΔP.
    pub max_tokens: usize,
    pub batch: usize,
    pub resamples: usize,
    /// Recorded in each dataset's `result.json`; a result made under other settings is refused.
    pub settings: Value,
}

/// A dataset's measurements (its `result.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetMeasure {
    pub name: String,
    pub trait_name: String,
    pub rows: usize,
    /// Per trait: ΔP along the unit vector.
    pub delta_p: BTreeMap<String, f64>,
    /// Per trait: ΔP along each random direction, in draw order.
    pub delta_p_random: BTreeMap<String, Vec<f64>>,
    /// Per trait: the fine-tuned model's last-prompt-token projection per evaluation question.
    pub prompt_proj: BTreeMap<String, Vec<f64>>,
    pub final_loss: Option<f64>,
    pub train_seconds: f64,
    pub settings: Value,
}

fn probes(traits: &[StudyTrait]) -> SeqSteering {
    SeqSteering {
        sources: Vec::new(),
        plan: SteeringPlan::default(),
        probes: traits
            .iter()
            .map(|t| Probe { name: t.name.clone(), layer: t.layer, vector: Arc::from(&unit(&t.v)[..]) })
            .collect(),
    }
}

/// Per trait: the last-prompt-token projection of `m` on each of the trait's evaluation prompts.
pub fn prompt_projections<B: TrainBackend>(
    m: &LoadedModel<B>,
    traits: &[StudyTrait],
    batch: usize,
) -> Result<BTreeMap<String, Vec<f64>>> {
    let st = probes(traits);
    let mut out = BTreeMap::new();
    for (k, t) in traits.iter().enumerate() {
        let items: Vec<Forced> =
            t.eval_prompts.iter().map(|p| Forced { tokens: p.clone(), answer_start: p.len() }).collect();
        let outs = teacher_force(&m.engine, &items, Some(&st), CaptureRange::PromptLast, false, batch, None)?;
        out.insert(t.name.clone(), outs.iter().map(|o| o.last_prompt_proj[k] as f64).collect());
    }
    Ok(out)
}

/// ΔP of `d` along every trait's unit vector and `random` random directions per trait.
#[allow(clippy::type_complexity)]
fn delta_p<B: TrainBackend>(
    m: &LoadedModel<B>,
    d: &StudyDataset,
    traits: &[StudyTrait],
    o: &ScreeningOptions,
) -> Result<(BTreeMap<String, f64>, BTreeMap<String, Vec<f64>>)> {
    let hidden = m.engine.config.hidden;
    let width = (m.engine.config.n_layers + 1) * hidden;
    // The mean over rows of (data − own) mean answer residuals, at every layer.
    let mut sum = vec![0f64; width];
    let idx: Vec<usize> = (0..d.samples.len()).collect();
    for chunk in idx.chunks(o.batch.max(1)) {
        let (_, outs) = data_and_own(m, &d.samples, chunk, o.max_tokens, o.batch, None)?;
        for pair in outs.chunks(2) {
            // An empty answer has no residual: it counts as zero, as its projection does in `screen`.
            let z = vec![0f32; width];
            let data = pair[0].mean.as_deref().unwrap_or(&z);
            let own = pair[1].mean.as_deref().unwrap_or(&z);
            sum.iter_mut().zip(data.iter().zip(own)).for_each(|(s, (a, b))| *s += (*a - *b) as f64);
        }
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / d.samples.len().max(1) as f64) as f32).collect();
    let (mut dp, mut dpr) = (BTreeMap::new(), BTreeMap::new());
    for t in traits {
        let at = &mean[t.layer * hidden..(t.layer + 1) * hidden];
        dp.insert(t.name.clone(), project(at, &[unit(&t.v)])[0]);
        let units: Vec<Vec<f32>> =
            random_directions(&t.v, o.random, o.seed ^ t.layer as u64).iter().map(|r| unit(r)).collect();
        dpr.insert(t.name.clone(), project(at, &units));
    }
    Ok((dp, dpr))
}

/// Screen, fine-tune and measure one dataset in `dir` (resumed when already measured there).
#[allow(clippy::too_many_arguments)]
pub fn run_dataset<B: TrainBackend>(
    base: &LoadedModel<B>,
    load_merged: &mut dyn FnMut(&LoraAdapter) -> Result<LoadedModel<B>>,
    d: &StudyDataset,
    traits: &[StudyTrait],
    o: &ScreeningOptions,
    dir: &Path,
    base_model: &str,
    log: &mut dyn FnMut(&str),
) -> Result<DatasetMeasure> {
    let result_path = dir.join("result.json");
    if let Some(r) = read_recorded::<DatasetMeasure>(&result_path, |r| &r.settings, &o.settings, "a screening result")?
    {
        log(&format!("[{}] already measured: resumed from {}", d.name, result_path.display()));
        return Ok(r);
    }
    if d.train.is_empty() || d.samples.is_empty() {
        return Err(Error::Invalid(format!("dataset `{}` has no rows", d.name)));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    log(&format!("[{}] ΔP over {} rows (own answers of up to {} tokens)", d.name, d.samples.len(), o.max_tokens));
    let (delta_p, delta_p_random) = delta_p(base, d, traits, o)?;
    let start = Instant::now();
    let init = init_adapter(o.train.lora.clone(), &base.engine.config, o.train.seed);
    let monitors = probes(traits).probes;
    let mut t = Trainer::new(&base.engine, o.train.clone(), init, d.train.clone(), vec![], None, monitors)?;
    let (_, last) = train_logged(&mut t, dir, base_model, &d.name, log)?;
    let train_seconds = start.elapsed().as_secs_f64();
    let merged = load_merged(&t.adapter)?;
    let prompt_proj = prompt_projections(&merged, traits, o.batch)?;
    let r = DatasetMeasure {
        name: d.name.clone(),
        trait_name: d.trait_name.clone(),
        rows: d.train.len(),
        delta_p,
        delta_p_random,
        prompt_proj,
        final_loss: last,
        train_seconds,
        settings: o.settings.clone(),
    };
    let text = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&result_path, text.as_bytes())?;
    Ok(r)
}

/// Pearson correlation (NaN with fewer than 3 points or no variance).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 3 {
        return f64::NAN;
    }
    let (mx, my) = (x[..n].iter().sum::<f64>() / n as f64, y[..n].iter().sum::<f64>() / n as f64);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (a, b) = (x[i] - mx, y[i] - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// 95% interval of Pearson's r by Fisher's z (n ≥ 4; NaN otherwise).
pub fn pearson_ci95(r: f64, n: usize) -> [f64; 2] {
    if n < 4 || !r.is_finite() {
        return [f64::NAN, f64::NAN];
    }
    let z = r.clamp(-0.999_999, 0.999_999).atanh();
    let h = 1.959_964 / ((n - 3) as f64).sqrt();
    [(z - h).tanh(), (z + h).tanh()]
}

/// r of ΔP vs shift, its interval, and the same with each random direction's ΔP.
fn correlation(delta_p: &[f64], random: &[Vec<f64>], shift: &[f64]) -> Value {
    let r = pearson(delta_p, shift);
    let rr: Vec<f64> = (0..random.first().map_or(0, |x| x.len()))
        .map(|k| pearson(&random.iter().map(|x| x[k]).collect::<Vec<_>>(), shift))
        .filter(|x| x.is_finite())
        .collect();
    let abs: Vec<f64> = rr.iter().map(|x| x.abs()).collect();
    json!({
        "n": shift.len(), "r": num(r), "r_ci95": pearson_ci95(r, shift.len()).map(num),
        "r_random": rr.first().copied().map(num),
        "r_random_mean": num(if rr.is_empty() { f64::NAN } else { rr.iter().sum::<f64>() / rr.len() as f64 }),
        "r_random_p95_abs": num(quantile(&abs, 0.95)),
        "r_percentile_among_random": num(percentile_of(r.abs(), &abs)),
        "r_random_all": rr.iter().map(|&x| num(x)).collect::<Vec<_>>(),
    })
}

/// `screening.json`'s value: per dataset its own trait's ΔP (vector and first random direction)
/// and shift, the pooled correlation over the datasets' own traits, and per trait the correlation
/// over every dataset.
pub fn screening_json(
    ms: &[DatasetMeasure],
    base: &BTreeMap<String, Vec<f64>>,
    resamples: usize,
    seed: u64,
    settings: &Value,
) -> Value {
    let shift = |m: &DatasetMeasure, t: &str| -> (f64, [f64; 2]) {
        match (m.prompt_proj.get(t), base.get(t)) {
            (Some(a), Some(b)) => paired_shift(a, b, resamples, seed),
            _ => (f64::NAN, [f64::NAN; 2]),
        }
    };
    let datasets: Vec<Value> = ms
        .iter()
        .map(|m| {
            let t = &m.trait_name;
            let (s, ci) = shift(m, t);
            let all: BTreeMap<&String, Value> = m
                .delta_p
                .iter()
                .map(|(k, dp)| (k, json!({"delta_p": num(*dp), "shift": num(shift(m, k).0)})))
                .collect();
            json!({
                "name": m.name, "trait": t, "rows": m.rows,
                "delta_p": m.delta_p.get(t).copied().map(num),
                "delta_p_random": m.delta_p_random.get(t).and_then(|x| x.first()).copied().map(num),
                "shift": num(s), "shift_ci95": ci.map(num), "final_loss": m.final_loss, "all_traits": all,
            })
        })
        .collect();
    let own = |m: &DatasetMeasure| m.delta_p.get(&m.trait_name).copied().unwrap_or(f64::NAN);
    let own_random = |m: &DatasetMeasure| m.delta_p_random.get(&m.trait_name).cloned().unwrap_or_default();
    let pooled = correlation(
        &ms.iter().map(own).collect::<Vec<_>>(),
        &ms.iter().map(own_random).collect::<Vec<_>>(),
        &ms.iter().map(|m| shift(m, &m.trait_name).0).collect::<Vec<_>>(),
    );
    let per_trait: BTreeMap<&String, Value> = base
        .keys()
        .map(|t| {
            let dp: Vec<f64> = ms.iter().map(|m| m.delta_p.get(t).copied().unwrap_or(f64::NAN)).collect();
            let dpr: Vec<Vec<f64>> = ms.iter().map(|m| m.delta_p_random.get(t).cloned().unwrap_or_default()).collect();
            let sh: Vec<f64> = ms.iter().map(|m| shift(m, t).0).collect();
            (t, correlation(&dp, &dpr, &sh))
        })
        .collect();
    json!({
        "datasets": datasets,
        "r": pooled["r"], "r_ci95": pooled["r_ci95"], "r_random": pooled["r_random"], "pooled": pooled,
        "per_trait": per_trait, "settings": settings,
    })
}

/// `screening.md`: the table and the correlations.
pub fn screening_markdown(v: &Value) -> String {
    let f = |x: &Value| x.as_f64().map_or("–".to_string(), |x| format!("{x:+.3}"));
    let mut s = String::from("# persona vaccine --screening\n\n");
    s += &format!("settings: `{}`\n\n", v["settings"]);
    s += "ΔP: projection of the dataset's responses minus the model's own answers (before training); shift: \
          last-prompt-token projection after fine-tuning minus before, mean over the trait's evaluation questions.\n\n";
    s += "| dataset | trait | rows | ΔP | ΔP random | shift [95%] |\n|---|---|---|---|---|---|\n";
    for d in v["datasets"].as_array().into_iter().flatten() {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} [{}, {}] |\n",
            d["name"].as_str().unwrap_or(""),
            d["trait"].as_str().unwrap_or(""),
            d["rows"],
            f(&d["delta_p"]),
            f(&d["delta_p_random"]),
            f(&d["shift"]),
            f(&d["shift_ci95"][0]),
            f(&d["shift_ci95"][1])
        );
    }
    let line = |name: &str, c: &Value| {
        format!(
            "| {name} | {} | {} | [{}, {}] | {} | {} | {} |\n",
            c["n"],
            f(&c["r"]),
            f(&c["r_ci95"][0]),
            f(&c["r_ci95"][1]),
            f(&c["r_random_mean"]),
            f(&c["r_random_p95_abs"]),
            c["r_percentile_among_random"].as_f64().map_or("–".into(), |p| format!("{p:.0}")),
        )
    };
    s += "\n| correlation of ΔP with the shift | n | r | 95% (Fisher z) | random directions: mean r | 95th pct of |r| | |r| percentile among random |\n";
    s += "|---|---|---|---|---|---|---|\n";
    s += &line("pooled (each dataset's own trait)", &v["pooled"]);
    for (t, c) in v["per_trait"].as_object().into_iter().flatten() {
        s += &line(&format!("{t} (every dataset)"), c);
    }
    s
}

/// Screen, fine-tune and measure every dataset (resuming finished ones); writes `screening.json`
/// and `screening.md` into `out` after each.
#[allow(clippy::too_many_arguments)]
pub fn run<B: TrainBackend>(
    base: &LoadedModel<B>,
    load_merged: &mut dyn FnMut(&LoraAdapter) -> Result<LoadedModel<B>>,
    traits: &[StudyTrait],
    datasets: &[StudyDataset],
    o: &ScreeningOptions,
    out: &Path,
    base_model: &str,
    log: &mut dyn FnMut(&str),
) -> Result<Value> {
    let hidden = base.engine.config.hidden;
    for t in traits {
        if t.v.len() != hidden || t.layer > base.engine.config.n_layers {
            return Err(Error::Invalid(format!(
                "trait `{}`: a vector row of {} values at layer {} does not fit a model of hidden size {hidden} \
                 and {} layers",
                t.name,
                t.v.len(),
                t.layer,
                base.engine.config.n_layers
            )));
        }
        if t.eval_prompts.len() < 2 {
            return Err(Error::Invalid(format!("trait `{}`: a shift needs at least 2 evaluation questions", t.name)));
        }
    }
    let mut names: Vec<&str> = datasets.iter().map(|d| d.name.as_str()).collect();
    names.sort();
    names.dedup();
    if names.len() != datasets.len() {
        return Err(Error::Invalid("two datasets have the same name".into()));
    }
    log("base model: projections on the evaluation questions");
    let base_proj = prompt_projections(base, traits, o.batch)?;
    let start = Instant::now();
    let mut done = vec![];
    let mut value = Value::Null;
    for (i, d) in datasets.iter().enumerate() {
        log(&format!(
            "dataset {}/{}: {} ({:.0} s so far)",
            i + 1,
            datasets.len(),
            d.name,
            start.elapsed().as_secs_f64()
        ));
        done.push(run_dataset(base, load_merged, d, traits, o, &out.join("datasets").join(&d.name), base_model, log)?);
        value = screening_json(&done, &base_proj, o.resamples, o.seed, &o.settings);
        write_atomic(&out.join("screening.json"), serde_json::to_string_pretty(&value).unwrap_or_default().as_bytes())?;
        write_atomic(&out.join("screening.md"), screening_markdown(&value).as_bytes())?;
        write_atomic(&out.join("screening.svg"), screening_chart(&value).to_svg()?.as_bytes())?;
    }
    Ok(value)
}

/// The scatter of ΔP (before training) against the shift (after), one series per trait over
/// every dataset, and the same datasets' ΔP along the first random direction of the dataset's
/// own trait.
pub fn screening_chart(v: &Value) -> crate::plot::Chart {
    use crate::plot::{Chart, Point, Series};
    let ds = v["datasets"].as_array().cloned().unwrap_or_default();
    let mut series = vec![];
    for (t, _) in v["per_trait"].as_object().into_iter().flatten() {
        let pts: Vec<Point> = ds
            .iter()
            .filter_map(|d| {
                let a = &d["all_traits"][t];
                let p = Point::new(a["delta_p"].as_f64()?, a["shift"].as_f64()?);
                // Label the dataset where it was made for this trait.
                Some(if d["trait"] == t.as_str() { p.with_label(d["name"].as_str().unwrap_or("")) } else { p })
            })
            .collect();
        series.push(Series::scatter(format!("{t} vector (r = {})", fmt_r(&v["per_trait"][t]["r"])), pts));
    }
    let pts: Vec<Point> =
        ds.iter().filter_map(|d| Some(Point::new(d["delta_p_random"].as_f64()?, d["shift"].as_f64()?))).collect();
    series.push(Series::scatter(
        format!("random direction, own trait's shift (r = {})", fmt_r(&v["pooled"]["r_random"])),
        pts,
    ));
    Chart {
        title: format!("Does ΔP before training predict the shift? pooled r = {}", fmt_r(&v["r"])),
        x_label: "ΔP: dataset responses minus the model's own answers (projection)".into(),
        y_label: "shift after fine-tuning (last-prompt-token projection)".into(),
        series,
        hlines: vec![("no shift".into(), 0.0)],
        log_x: false,
    }
}

fn fmt_r(x: &Value) -> String {
    x.as_f64().map_or("–".into(), |r| format!("{r:.2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_known_values() {
        assert!((pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 6.0, 8.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // scipy.stats.pearsonr([1,2,3,4,5], [2,1,4,3,5]) = 0.8
        assert!((pearson(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]) - 0.8).abs() < 1e-12);
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(pearson(&[1.0, 2.0], &[1.0, 2.0]).is_nan());
        // Fisher z: r = 0.8, n = 10 → [0.3433, 0.9507] (tanh(atanh r ± 1.96/√7), computed in Python).
        let ci = pearson_ci95(0.8, 10);
        assert!((ci[0] - 0.3433).abs() < 1e-4 && (ci[1] - 0.9507).abs() < 1e-4, "{ci:?}");
        assert!(pearson_ci95(0.5, 3)[0].is_nan());
    }
}
