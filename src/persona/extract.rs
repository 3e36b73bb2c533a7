//! Extraction: a persona vector from contrastive system prompts. The model answers the trait's
//! questions under each positive and each negative instruction (batched, seeded); each answer's
//! residual is averaged over its tokens at every index 0..=N (a teacher-forced prefill of
//! prompt + answer, captured inside the forward pass); optionally a judge keeps only pairs with
//! pos ≥ 50, neg < 50 and both coherent ≥ 50; vector = mean(pos) − mean(neg).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{generate_with_progress, progress, teacher_force, CaptureRange, Forced};
use super::judge::Judge;
use super::traits::TraitDef;
use crate::backend::Backend;
use crate::engine::generate::GenRequest;
use crate::engine::sampler::SamplingParams;
use crate::engine::SeqInput;
use crate::error::{Error, Result};
use crate::model::Message;
use crate::steer::vector::PersonaVector;
use crate::LoadedModel;

/// Which tokens' residuals make up a sample's activation (the paper's variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Mean over the answer tokens (the paper's default).
    ResponseAvg,
    /// Mean over the prompt tokens.
    PromptAvg,
    /// The last prompt token.
    PromptLast,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::ResponseAvg => "response_avg",
            Method::PromptAvg => "prompt_avg",
            Method::PromptLast => "prompt_last",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "response_avg" => Ok(Method::ResponseAvg),
            "prompt_avg" => Ok(Method::PromptAvg),
            "prompt_last" => Ok(Method::PromptLast),
            o => Err(Error::Invalid(format!("unknown method `{o}` (response_avg, prompt_avg, prompt_last)"))),
        }
    }
    fn range(self) -> CaptureRange {
        match self {
            Method::ResponseAvg => CaptureRange::Answer,
            Method::PromptAvg => CaptureRange::Prompt,
            Method::PromptLast => CaptureRange::PromptLast,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Pos,
    Neg,
}

/// One answer, as written to (and read from) the responses JSONL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub question: String,
    pub answer: String,
    pub label: Label,
    /// Instruction pair index, question index and sample index: pos and neg answers with the
    /// same key form a pair for judge filtering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<(usize, usize, usize)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trait_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coherence: Option<f64>,
    #[serde(default = "yes")]
    pub kept: bool,
}

fn yes() -> bool {
    true
}

/// Settings of an extraction run.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Instruction pairs and questions to use (at most; `usize::MAX` = all).
    pub pairs: usize,
    pub questions: usize,
    /// Answers per (instruction, question).
    pub samples: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Sequences per forward batch.
    pub batch: usize,
    pub method: Method,
    pub show_progress: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            pairs: usize::MAX,
            questions: usize::MAX,
            samples: 1,
            max_tokens: 64,
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            batch: 32,
            method: Method::ResponseAvg,
            show_progress: true,
        }
    }
}

/// The prompt ids of a (system, question) chat with the generation prompt.
pub fn chat_ids<B: Backend>(m: &LoadedModel<B>, system: Option<&str>, question: &str) -> Result<Vec<u32>> {
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(Message::system(s));
    }
    msgs.push(Message::user(question));
    m.chat_prompt_ids(&msgs)
}

/// Prompt + answer as token ids: the answer text appended to the templated prompt and
/// tokenised together; answer tokens are those after the prompt's own tokens.
pub fn forced_item<B: Backend>(
    m: &LoadedModel<B>,
    system: Option<&str>,
    question: &str,
    answer: &str,
) -> Result<Forced> {
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(Message::system(s));
    }
    msgs.push(Message::user(question));
    forced_chat(m, &msgs, answer)
}

/// [`forced_item`] for any prompt messages.
pub fn forced_chat<B: Backend>(m: &LoadedModel<B>, msgs: &[Message], answer: &str) -> Result<Forced> {
    let prompt = m.apply_chat_template(msgs, true)?;
    let p = m.encode(&prompt, false)?;
    let all = m.encode(&format!("{prompt}{answer}"), false)?;
    let tokens = if all.starts_with(&p) {
        all
    } else {
        // The answer's first characters merged with the prompt's last token: tokenise apart.
        let mut t = p.clone();
        t.extend(m.encode(answer, false)?);
        t
    };
    Ok(Forced { answer_start: p.len(), tokens })
}

/// Generate answers to every (instruction, question, sample) on both sides.
pub fn generate_responses<B: Backend>(m: &LoadedModel<B>, t: &TraitDef, o: &ExtractOptions) -> Result<Vec<Response>> {
    let mut jobs = vec![];
    for (pi, pair) in t.instructions.iter().take(o.pairs).enumerate() {
        for (qi, q) in t.questions.iter().take(o.questions).enumerate() {
            for s in 0..o.samples {
                for (label, sys) in [(Label::Pos, &pair.pos), (Label::Neg, &pair.neg)] {
                    jobs.push((label, sys.clone(), q.clone(), (pi, qi, s)));
                }
            }
        }
    }
    if jobs.is_empty() {
        return Err(Error::Invalid(format!("trait `{}`: no instruction pairs or questions selected", t.name)));
    }
    let pb = o.show_progress.then(|| progress(jobs.len(), "generating"));
    let mut out = Vec::with_capacity(jobs.len());
    for (ci, chunk) in jobs.chunks(o.batch.max(1)).enumerate() {
        let reqs: Vec<GenRequest> = chunk
            .iter()
            .enumerate()
            .map(|(j, (_, sys, q, _))| {
                Ok(GenRequest {
                    sampling: SamplingParams {
                        temperature: o.temperature,
                        top_k: 0,
                        top_p: o.top_p,
                        // A distinct, reproducible stream per job.
                        seed: o.seed.wrapping_mul(1_000_003).wrapping_add((ci * o.batch.max(1) + j) as u64),
                    },
                    ..GenRequest::greedy(chat_ids(m, Some(sys), q)?, o.max_tokens)
                })
            })
            .collect::<Result<_>>()?;
        let gens = m.engine.generate(&reqs, &mut |_, _| {})?;
        for ((label, sys, q, key), g) in chunk.iter().zip(gens) {
            out.push(Response {
                system: Some(sys.clone()),
                question: q.clone(),
                answer: m.answer_text(&g)?.trim().to_string(),
                label: *label,
                pair: Some(*key),
                trait_score: None,
                coherence: None,
                kept: true,
            });
        }
        if let Some(pb) = &pb {
            pb.inc(chunk.len() as u64);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(out)
}

/// Score every response for the trait and coherence, then keep pairs with pos ≥ 50, neg < 50
/// and both coherent ≥ 50 (pairs are kept or dropped together). Judge failures are errors.
pub fn judge_and_filter(t: &TraitDef, judge: &dyn Judge, responses: &mut [Response]) -> Result<()> {
    let trait_prompts: Vec<String> = responses.iter().map(|r| t.render_judge(&r.question, &r.answer)).collect();
    let coh_prompts: Vec<String> = responses.iter().map(|r| t.render_coherence(&r.question, &r.answer)).collect();
    let ts = judge.score(&trait_prompts);
    let cs = judge.score(&coh_prompts);
    for (i, (r, (a, b))) in responses.iter_mut().zip(ts.into_iter().zip(cs)).enumerate() {
        let a = a.map_err(|e| Error::Invalid(format!("judging response {i} (trait): {e}")))?;
        let b = b.map_err(|e| Error::Invalid(format!("judging response {i} (coherence): {e}")))?;
        r.trait_score = a.score;
        r.coherence = b.score;
    }
    let ok = |r: &Response, pos: bool| {
        let t = match r.trait_score {
            Some(s) => (s >= 50.0) == pos,
            None => false,
        };
        t && r.coherence.is_some_and(|c| c >= 50.0)
    };
    let mut by_key: BTreeMap<(usize, usize, usize), [Option<usize>; 2]> = BTreeMap::new();
    for (i, r) in responses.iter().enumerate() {
        if let Some(k) = r.pair {
            by_key.entry(k).or_default()[(r.label == Label::Neg) as usize] = Some(i);
        }
    }
    for r in responses.iter_mut() {
        r.kept = false;
    }
    for [p, n] in by_key.values() {
        if let (Some(p), Some(n)) = (*p, *n) {
            let keep = ok(&responses[p], true) && ok(&responses[n], false);
            responses[p].kept = keep;
            responses[n].kept = keep;
        }
    }
    Ok(())
}

/// The vector from (kept) responses: mean of positive activations − mean of negative ones, with
/// the per-layer mean residual norm |h_L| over the answer tokens in the metadata.
pub fn vector_from_responses<B: Backend>(
    m: &LoadedModel<B>,
    name: &str,
    responses: &[Response],
    method: Method,
    batch: usize,
    show_progress: bool,
) -> Result<PersonaVector> {
    let c = &m.engine.config;
    let width = (c.n_layers + 1) * c.hidden;
    let kept: Vec<&Response> = responses.iter().filter(|r| r.kept).collect();
    let n_pos = kept.iter().filter(|r| r.label == Label::Pos).count();
    let n_neg = kept.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return Err(Error::Invalid(format!(
            "no vector: {n_pos} positive and {n_neg} negative responses left (after filtering); need at least one of each"
        )));
    }
    let items: Vec<Forced> =
        kept.iter().map(|r| forced_item(m, r.system.as_deref(), &r.question, &r.answer)).collect::<Result<_>>()?;
    if let Some((i, _)) = items.iter().enumerate().find(|(_, it)| it.tokens.len() == it.answer_start) {
        if method == Method::ResponseAvg {
            return Err(Error::Invalid(format!("response {i} has an empty answer: nothing to average")));
        }
    }
    let pb = show_progress.then(|| progress(items.len(), "activations"));
    let outs = teacher_force(&m.engine, &items, None, method.range(), false, batch, pb.as_ref())?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let (mut pos, mut neg) = (vec![0f64; width], vec![0f64; width]);
    for (r, o) in kept.iter().zip(&outs) {
        let mean = o.mean.as_ref().ok_or_else(|| Error::Invalid("capture missing".into()))?;
        let acc = if r.label == Label::Pos { &mut pos } else { &mut neg };
        acc.iter_mut().zip(mean).for_each(|(a, &b)| *a += b as f64);
    }
    let data: Vec<f32> = pos.iter().zip(&neg).map(|(p, n)| (p / n_pos as f64 - n / n_neg as f64) as f32).collect();
    let mut v = PersonaVector::new(name, c.n_layers, c.hidden, data)?;
    let norms = mean_residual_norms(m, &items[..items.len().min(16)])?;
    v.metadata.insert("persona.trait".into(), name.into());
    v.metadata.insert("persona.method".into(), method.name().into());
    v.metadata.insert("persona.pos_count".into(), n_pos.to_string());
    v.metadata.insert("persona.neg_count".into(), n_neg.to_string());
    v.metadata.insert("persona.mean_norms".into(), serde_json::to_string(&norms).unwrap_or_default());
    v.record_model(&m.engine.config);
    Ok(v)
}

/// Mean |h_L| over the answer tokens of `items` at every index (a traced pass per item: a small
/// sample is enough for a scale reference).
/// The distinct questions of `responses`, in first-seen order (the baseline's questions when no
/// trait definition gives them).
pub fn questions_of(responses: &[Response]) -> Vec<String> {
    let mut q: Vec<String> = vec![];
    for r in responses {
        if !q.contains(&r.question) {
            q.push(r.question.clone());
        }
    }
    q
}

pub fn mean_residual_norms<B: Backend>(m: &LoadedModel<B>, items: &[Forced]) -> Result<Vec<f32>> {
    let c = &m.engine.config;
    let mut sums = vec![0f64; c.n_layers + 1];
    let mut count = 0usize;
    for it in items {
        let mut cache = m.engine.new_cache(1, it.tokens.len())?;
        let out = m.engine.forward(&mut cache, &[SeqInput::new(0, &it.tokens)], true)?;
        for (l, res) in out.residuals.iter().enumerate() {
            for t in it.answer_start..it.tokens.len() {
                let row = &res[t * c.hidden..(t + 1) * c.hidden];
                sums[l] += row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            }
        }
        count += it.tokens.len() - it.answer_start;
    }
    Ok(sums.iter().map(|s| (s / count.max(1) as f64) as f32).collect())
}

/// Read a responses JSONL (`{"system"?, "question", "answer", "label": "pos"|"neg"}` per line).
/// Errors name the line.
pub fn read_responses(path: &std::path::Path) -> Result<Vec<Response>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Response =
            serde_json::from_str(line).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        out.push(r);
    }
    if out.is_empty() {
        return Err(Error::format(path, "no responses in the file"));
    }
    Ok(out)
}

pub use crate::steer::spec::{recorded_baseline, BASELINE_KEY};

/// Questions [`baseline_projection`] uses at most.
pub const BASELINE_QUESTIONS: usize = 20;

/// The model's ordinary projection onto `v`: at every residual index L, the mean over answers of
/// the answer tokens' mean `h_L · v_L/|v_L|`, over the model's own greedy answers (no system
/// prompt, unsteered) to the first [`BASELINE_QUESTIONS`] of `questions` (0 where `v_L` is zero). It is the
/// neutral point of the trait axis: `op=ablate` moves a token to projection 0, which is not
/// neutral when this is far from 0; `op=center` moves it here.
pub fn baseline_projection<B: Backend>(
    m: &LoadedModel<B>,
    v: &PersonaVector,
    questions: &[String],
    max_tokens: usize,
    show_progress: bool,
) -> Result<Vec<f32>> {
    let c = &m.engine.config;
    v.check_model(c.hidden, c.n_layers)?;
    let questions = &questions[..questions.len().min(BASELINE_QUESTIONS)];
    if questions.is_empty() {
        return Err(Error::Invalid("a baseline needs at least one question".into()));
    }
    let reqs: Vec<GenRequest> = questions
        .iter()
        .map(|q| Ok(GenRequest { capture_response: true, ..GenRequest::greedy(chat_ids(m, None, q)?, max_tokens) }))
        .collect::<Result<_>>()?;
    let gens = generate_with_progress(&m.engine, &reqs, max_tokens, "baseline", show_progress)?;
    let width = (c.n_layers + 1) * c.hidden;
    let (mut sum, mut count) = (vec![0f64; width], 0usize);
    for g in &gens {
        if let (Some(mean), false) = (&g.response_mean, g.steps.is_empty()) {
            sum.iter_mut().zip(mean).for_each(|(s, &x)| *s += x as f64);
            count += 1;
        }
    }
    if count == 0 {
        return Err(Error::Invalid("no answer tokens to take a baseline over".into()));
    }
    Ok((0..=c.n_layers)
        .map(|l| {
            let row = v.layer(l);
            let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            if norm == 0.0 {
                return 0.0;
            }
            let dot: f64 = sum[l * c.hidden..(l + 1) * c.hidden].iter().zip(row).map(|(&s, &x)| s * x as f64).sum();
            (dot / count as f64 / norm) as f32
        })
        .collect())
}
