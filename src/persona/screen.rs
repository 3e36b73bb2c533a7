//! Training-data screening: for each (prompt x, response y) of a dataset,
//! ΔP = mean_resp(h(x, y))·u − mean_resp(h(x, y'))·u at one layer, where y' is the model's own
//! (greedy) answer to x. Samples with large ΔP would pull the model toward the trait.
//! The control is the same ΔP along R norm-matched random unit directions: the pass captures the
//! mean residual of each response at every layer, so projecting it onto them costs no model runs.
//! Results are appended to a JSONL file as they are computed, so an interrupted run resumes
//! where it stopped.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::common::{
    percentile_of, progress, project, quantile, random_directions, teacher_force, unit, CaptureRange, ForcedOut,
    RandomControl,
};
use super::extract::forced_chat;
use crate::backend::Backend;
use crate::engine::generate::GenRequest;
use crate::error::{Error, Result};
use crate::model::Message;
use crate::steer::vector::PersonaVector;
use crate::steer::{Probe, SeqSteering};
use crate::LoadedModel;

/// One dataset sample: the prompt messages and the response to screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub messages: Vec<Message>,
    pub response: String,
}

/// Read chat JSONL (`{"messages": [...]}`, the last message being the assistant's response) or
/// prompt/response JSONL (`{"prompt": "...", "response": "..."}`). Errors name the line.
pub fn read_dataset(path: &Path) -> Result<Vec<Sample>> {
    Ok(read_dataset_with_fields(path)?.0)
}

/// A sample's own fields besides those screened (`messages`, `prompt`, `response`): ids, labels, ...
pub type SampleFields = serde_json::Map<String, serde_json::Value>;

/// One sample from its JSON object: `{"messages": [..., {"role": "assistant", ...}]}` or
/// `{"prompt": ..., "response": ...}` (a dataset line, or a row a Python caller passed).
pub fn sample_from_json(v: &serde_json::Value) -> std::result::Result<Sample, String> {
    if let Some(msgs) = v.get("messages") {
        let mut msgs: Vec<Message> = serde_json::from_value(msgs.clone()).map_err(|e| format!("`messages`: {e}"))?;
        let last = msgs.pop().ok_or("`messages` is empty")?;
        if last.role != "assistant" {
            return Err("the last message must be the assistant's response".into());
        }
        if msgs.is_empty() {
            return Err("no prompt before the assistant's response".into());
        }
        return Ok(Sample { messages: msgs, response: last.content });
    }
    let get = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("missing string `{k}` (or `messages`)"))
    };
    Ok(Sample { messages: vec![Message::user(get("prompt")?)], response: get("response")? })
}

/// [`read_dataset`], and beside each sample the line's other fields, for the report.
pub fn read_dataset_with_fields(path: &Path) -> Result<(Vec<Sample>, Vec<SampleFields>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = vec![];
    let mut fields = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| Error::format(path, format!("line {}: {m}", i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        let mut own = v.as_object().cloned().ok_or_else(|| bad("not a JSON object"))?;
        for k in ["messages", "prompt", "response"] {
            own.remove(k);
        }
        fields.push(own);
        out.push(sample_from_json(&v).map_err(|e| bad(&e))?);
    }
    if out.is_empty() {
        return Err(Error::format(path, "the dataset has no samples"));
    }
    Ok((out, fields))
}

/// The result for one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenRow {
    pub index: usize,
    pub delta_p: f64,
    /// Mean projection of the dataset response and of the model's own answer.
    pub p_data: f64,
    pub p_own: f64,
    pub own_answer: String,
    /// ΔP along each random direction (the control), in draw order.
    #[serde(default)]
    pub delta_p_random: Vec<f64>,
    /// |ΔP| as a percentile (0–100) of the random directions' |ΔP| for this sample.
    #[serde(default)]
    pub delta_p_percentile: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct ScreenOptions {
    pub layer: usize,
    pub max_tokens: usize,
    pub batch: usize,
    /// Random directions (the control), drawn from `seed ^ layer` (the monitor's at that layer).
    pub random: usize,
    pub seed: u64,
    pub show_progress: bool,
}

/// The dataset's ΔP against the random directions': the vector's mean ΔP beside each random
/// direction's mean ΔP (center 0, distances |mean ΔP|), and per sample the pooled random |ΔP|.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScreenControl {
    /// Over the dataset: the mean ΔP of each random direction against the vector's.
    pub mean_delta_p: RandomControl,
    /// Mean ΔP over every sample and random direction.
    pub sample_mean: f64,
    /// 95th percentile of |ΔP| over every sample and random direction.
    pub sample_p95_abs: f64,
    /// Samples whose |ΔP| along the vector exceeds `sample_p95_abs`.
    pub samples_above_p95: usize,
}

/// The control over finished rows (with `delta_p_random`).
pub fn control(rows: &[ScreenRow]) -> ScreenControl {
    let r = rows.iter().map(|x| x.delta_p_random.len()).min().unwrap_or(0);
    let n = rows.len().max(1) as f64;
    let mean = rows.iter().map(|x| x.delta_p).sum::<f64>() / n;
    let per_dir: Vec<f64> = (0..r).map(|i| rows.iter().map(|x| x.delta_p_random[i]).sum::<f64>() / n).collect();
    let pooled: Vec<f64> = rows.iter().flat_map(|x| x.delta_p_random[..r].iter().copied()).collect();
    let abs: Vec<f64> = pooled.iter().map(|x| x.abs()).collect();
    let p95 = quantile(&abs, 0.95);
    ScreenControl {
        mean_delta_p: RandomControl::new(mean, per_dir, 0.0),
        sample_mean: if pooled.is_empty() { f64::NAN } else { pooled.iter().sum::<f64>() / pooled.len() as f64 },
        sample_p95_abs: p95,
        samples_above_p95: rows.iter().filter(|x| x.delta_p.abs() > p95).count(),
    }
}

/// Rows already in `progress_file` (a truncated last line is ignored and rewritten).
pub fn read_progress(progress_file: &Path) -> Result<Vec<ScreenRow>> {
    if !progress_file.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(progress_file).map_err(|e| Error::io(progress_file, e))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str::<ScreenRow>(l).ok()).collect())
}

/// For the samples `idx`: the model's own greedy answers (at most `max_tokens`), and the
/// teacher-forced passes of the dataset's response and of the own answer — two per sample, in that
/// order — each with the mean answer residual at every layer and `steering`'s probes.
pub fn data_and_own<B: Backend>(
    m: &LoadedModel<B>,
    samples: &[Sample],
    idx: &[usize],
    max_tokens: usize,
    batch: usize,
    steering: Option<&SeqSteering>,
) -> Result<(Vec<String>, Vec<ForcedOut>)> {
    let reqs: Vec<GenRequest> = idx
        .iter()
        .map(|&i| Ok(GenRequest::greedy(m.chat_prompt_ids(&samples[i].messages)?, max_tokens)))
        .collect::<Result<_>>()?;
    let gens = m.engine.generate(&reqs, &mut |_, _| {})?;
    let own: Vec<String> = gens.iter().map(|g| m.answer_text(g)).collect::<Result<_>>()?;
    let mut items = vec![];
    for (&i, a) in idx.iter().zip(&own) {
        items.push(forced_chat(m, &samples[i].messages, &samples[i].response)?);
        items.push(forced_chat(m, &samples[i].messages, a)?);
    }
    let outs = teacher_force(&m.engine, &items, steering, CaptureRange::Answer, false, batch, None)?;
    Ok((own, outs))
}

/// Screen `samples`, appending each finished batch to `progress_file` and skipping samples
/// already there. Returns every row, sorted by index.
pub fn screen<B: Backend>(
    m: &LoadedModel<B>,
    v: &PersonaVector,
    samples: &[Sample],
    progress_file: &Path,
    o: &ScreenOptions,
) -> Result<Vec<ScreenRow>> {
    v.check_layer(o.layer)?;
    let mut rows = read_progress(progress_file)?;
    // Rows from a run with another number of random directions are redone.
    rows.retain(|r| r.index < samples.len() && r.delta_p_random.len() == o.random);
    let done: std::collections::HashSet<usize> = rows.iter().map(|r| r.index).collect();
    // Rewrite the file with only whole lines, then append.
    let mut text = String::new();
    for r in &rows {
        text += &(serde_json::to_string(r).unwrap_or_default() + "\n");
    }
    super::common::write_atomic(progress_file, text.as_bytes())?;
    let mut file =
        std::fs::OpenOptions::new().append(true).open(progress_file).map_err(|e| Error::io(progress_file, e))?;
    let todo: Vec<usize> = (0..samples.len()).filter(|i| !done.contains(i)).collect();
    let st = SeqSteering {
        sources: Vec::new(),
        plan: Default::default(),
        probes: vec![Probe { name: "v".into(), layer: o.layer, vector: Arc::from(v.layer(o.layer)) }],
    };
    let hidden = m.engine.config.hidden;
    let units: Vec<Vec<f32>> =
        random_directions(v.layer(o.layer), o.random, o.seed ^ o.layer as u64).iter().map(|d| unit(d)).collect();
    let pb = o.show_progress.then(|| progress(todo.len(), "screening"));
    for chunk in todo.chunks(o.batch.max(1)) {
        let (own, outs) = data_and_own(m, samples, chunk, o.max_tokens, o.batch, Some(&st))?;
        // The mean answer residual at the layer (zero for an empty answer, as its projection is).
        let at_layer = |f: &ForcedOut| -> Vec<f32> {
            f.mean.as_ref().map_or(vec![0.0; hidden], |h| h[o.layer * hidden..(o.layer + 1) * hidden].to_vec())
        };
        let mut lines = String::new();
        for (k, &i) in chunk.iter().enumerate() {
            let (pd, po) = (outs[2 * k].answer_proj[0] as f64, outs[2 * k + 1].answer_proj[0] as f64);
            let diff: Vec<f32> =
                at_layer(&outs[2 * k]).iter().zip(at_layer(&outs[2 * k + 1])).map(|(a, b)| a - b).collect();
            let delta_p_random = project(&diff, &units);
            let abs: Vec<f64> = delta_p_random.iter().map(|x| x.abs()).collect();
            let pct = percentile_of((pd - po).abs(), &abs);
            let r = ScreenRow {
                index: i,
                delta_p: pd - po,
                p_data: pd,
                p_own: po,
                own_answer: own[k].clone(),
                delta_p_random,
                delta_p_percentile: (!pct.is_nan()).then_some(pct),
            };
            lines += &(serde_json::to_string(&r).unwrap_or_default() + "\n");
            rows.push(r);
        }
        file.write_all(lines.as_bytes()).and_then(|_| file.sync_data()).map_err(|e| Error::io(progress_file, e))?;
        if let Some(pb) = &pb {
            pb.inc(chunk.len() as u64);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    rows.sort_by_key(|r| r.index);
    Ok(rows)
}
