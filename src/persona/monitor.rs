//! Monitoring: the last-prompt-token projection onto a persona vector predicts the trait of the
//! answer that follows. Prompts go up a ladder of system prompts, from trait-suppressing (the
//! trait's negative instructions) through none to trait-eliciting (its positive instructions);
//! the report gives, per layer, the AUROC of eliciting vs suppressing prompts — for the vector and
//! for a norm-matched random direction — and the correlation between the projection and the
//! measured trait of the responses (judge score, or without a judge the response's own mean
//! projection).

use std::sync::Arc;

use serde::Serialize;

use super::common::{auroc, pearson, progress, teacher_force, CaptureRange, Forced};
use super::eval::random_like;
use super::extract::chat_ids;
use super::judge::Judge;
use super::traits::TraitDef;
use crate::backend::Backend;
use crate::engine::generate::GenRequest;
use crate::error::{Error, Result};
use crate::steer::vector::PersonaVector;
use crate::steer::{Probe, SeqSteering};
use crate::LoadedModel;

/// One prompt of the ladder.
#[derive(Debug, Clone, Serialize)]
pub struct LadderPrompt {
    pub question: String,
    pub system: Option<String>,
    /// −1 suppressing, 0 neutral, +1 eliciting.
    pub level: i32,
}

#[derive(Debug, Clone)]
pub struct MonitorOptions {
    pub questions: usize,
    /// Residual indices to probe (default 1..=N).
    pub layers: Vec<usize>,
    /// The layer the correlation is reported at (default: best AUROC).
    pub layer: Option<usize>,
    pub generate: bool,
    pub max_tokens: usize,
    pub batch: usize,
    pub seed: u64,
    pub show_progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MonitorRow {
    pub prompt: LadderPrompt,
    /// Last-prompt-token projection per probed layer (same order as `layers`).
    pub projection: Vec<f32>,
    pub random_projection: Vec<f32>,
    pub response: Option<String>,
    pub response_projection: Option<f32>,
    pub trait_score: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MonitorReport {
    pub trait_name: String,
    pub layers: Vec<usize>,
    pub auroc: Vec<f64>,
    pub random_auroc: Vec<f64>,
    pub layer: usize,
    /// Pearson correlation of last-prompt projection with the responses' measured trait.
    pub correlation: Option<f64>,
    /// What the correlation is measured against.
    pub correlation_with: String,
    pub rows: Vec<MonitorRow>,
}

/// The ladder for a trait: each evaluation question under every negative instruction, none, and
/// every positive instruction.
pub fn ladder(t: &TraitDef, questions: usize) -> Vec<LadderPrompt> {
    let mut out = vec![];
    for q in t.eval_questions.iter().take(questions) {
        for p in &t.instructions {
            out.push(LadderPrompt { question: q.clone(), system: Some(p.neg.clone()), level: -1 });
        }
        out.push(LadderPrompt { question: q.clone(), system: None, level: 0 });
        for p in &t.instructions {
            out.push(LadderPrompt { question: q.clone(), system: Some(p.pos.clone()), level: 1 });
        }
    }
    out
}

pub fn run<B: Backend>(
    m: &LoadedModel<B>,
    name: &str,
    prompts: Vec<LadderPrompt>,
    v: &PersonaVector,
    t: Option<&TraitDef>,
    judge: Option<&dyn Judge>,
    o: &MonitorOptions,
) -> Result<MonitorReport> {
    if prompts.is_empty() {
        return Err(Error::Invalid("no prompts to monitor".into()));
    }
    let mut probes = vec![];
    for &l in &o.layers {
        v.check_layer(l)?;
        probes.push(Probe { name: "v".into(), layer: l, vector: Arc::from(v.layer(l)) });
    }
    for &l in &o.layers {
        let r = random_like(v.layer(l), o.seed ^ l as u64);
        probes.push(Probe { name: "random".into(), layer: l, vector: Arc::from(r) });
    }
    let nl = o.layers.len();
    let st = SeqSteering { plan: Default::default(), probes };
    let items: Vec<Forced> = prompts
        .iter()
        .map(|p| {
            let ids = chat_ids(m, p.system.as_deref(), &p.question)?;
            Ok(Forced { answer_start: ids.len(), tokens: ids })
        })
        .collect::<Result<_>>()?;
    let pb = o.show_progress.then(|| progress(items.len(), "prompts"));
    let outs = teacher_force(&m.engine, &items, Some(&st), CaptureRange::None, false, o.batch, pb.as_ref())?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut rows: Vec<MonitorRow> = prompts
        .into_iter()
        .zip(&outs)
        .map(|(p, f)| MonitorRow {
            prompt: p,
            projection: f.last_prompt_proj[..nl].to_vec(),
            random_projection: f.last_prompt_proj[nl..].to_vec(),
            response: None,
            response_projection: None,
            trait_score: None,
        })
        .collect();
    let side = |rows: &[MonitorRow], level: i32, k: usize, random: bool| -> Vec<f64> {
        rows.iter()
            .filter(|r| r.prompt.level == level)
            .map(|r| if random { r.random_projection[k] } else { r.projection[k] } as f64)
            .collect()
    };
    let au: Vec<f64> = (0..nl).map(|k| auroc(&side(&rows, 1, k, false), &side(&rows, -1, k, false))).collect();
    let rau: Vec<f64> = (0..nl).map(|k| auroc(&side(&rows, 1, k, true), &side(&rows, -1, k, true))).collect();
    let best = (0..nl).max_by(|&a, &b| au[a].total_cmp(&au[b])).unwrap_or(0);
    let layer = o.layer.unwrap_or(o.layers[best]);
    let k = o
        .layers
        .iter()
        .position(|&l| l == layer)
        .ok_or_else(|| Error::Invalid(format!("layer {layer} is not among the probed layers {:?}", o.layers)))?;
    let mut correlation = None;
    let mut correlation_with = String::from("none (no responses generated)");
    if o.generate || judge.is_some() {
        let st = Arc::new(SeqSteering {
            plan: Default::default(),
            probes: vec![Probe { name: "v".into(), layer, vector: Arc::from(v.layer(layer)) }],
        });
        let pb = o.show_progress.then(|| progress(rows.len(), "responses"));
        for chunk in rows.chunks_mut(o.batch.max(1)) {
            let reqs: Vec<GenRequest> = chunk
                .iter()
                .map(|r| {
                    let ids = chat_ids(m, r.prompt.system.as_deref(), &r.prompt.question)?;
                    Ok(GenRequest { steering: Some(st.clone()), ..GenRequest::greedy(ids, o.max_tokens) })
                })
                .collect::<Result<_>>()?;
            let gens = m.engine.generate(&reqs, &mut |_, _| {})?;
            for (r, g) in chunk.iter_mut().zip(gens) {
                r.response = Some(m.answer_text(&g)?);
                r.response_projection = Some(g.response_mean_projection(0));
            }
            if let Some(pb) = &pb {
                pb.inc(chunk.len() as u64);
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        if let (Some(j), Some(t)) = (judge, t) {
            let prompts: Vec<String> =
                rows.iter().map(|r| t.render_judge(&r.prompt.question, r.response.as_deref().unwrap_or(""))).collect();
            for (r, s) in rows.iter_mut().zip(j.score(&prompts)) {
                r.trait_score = s?.score;
            }
            correlation_with = "judge trait score of the response".into();
        } else {
            correlation_with = "mean projection of the response".into();
        }
        let (mut x, mut y) = (vec![], vec![]);
        for r in &rows {
            let target = if judge.is_some() { r.trait_score } else { r.response_projection.map(|p| p as f64) };
            if let Some(tv) = target {
                x.push(r.projection[k] as f64);
                y.push(tv);
            }
        }
        correlation = Some(pearson(&x, &y));
    }
    Ok(MonitorReport {
        trait_name: name.to_string(),
        layers: o.layers.clone(),
        auroc: au,
        random_auroc: rau,
        layer,
        correlation,
        correlation_with,
        rows,
    })
}

impl MonitorReport {
    pub fn table(&self) -> String {
        let mut s = format!("last-prompt-token projection, eliciting vs suppressing prompts (`{}`)\n", self.trait_name);
        s += &format!("{:>6} {:>8} {:>14}\n", "layer", "AUROC", "random AUROC");
        for (i, l) in self.layers.iter().enumerate() {
            let mark = if *l == self.layer { " <" } else { "" };
            s += &format!("{:>6} {:>8.3} {:>14.3}{mark}\n", l, self.auroc[i], self.random_auroc[i]);
        }
        if let Some(c) = self.correlation {
            s += &format!("correlation at layer {} with the {}: r = {:.3}\n", self.layer, self.correlation_with, c);
        }
        s
    }
}
