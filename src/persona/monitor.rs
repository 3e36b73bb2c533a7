//! Monitoring: the last-prompt-token projection onto a persona vector predicts the trait of the
//! answer that follows. Prompts go up a ladder of system prompts, from trait-suppressing (the
//! trait's negative instructions) through none to trait-eliciting (its positive instructions).
//! Many-shot rungs (the paper's second setting) put k example question/answer turns before the
//! question, with no system prompt: the trait-eliciting side shows k answers written in the trait,
//! the suppressing side the opposite answers to the same k questions. The report gives, per layer,
//! the AUROC of eliciting vs suppressing prompts — system prompts, and each k apart — for the
//! vector and for a norm-matched random direction, and the correlation between the projection and
//! the measured trait of the responses (judge score, or without a judge the response's own mean
//! projection).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::common::{auroc, pearson, progress, teacher_force, CaptureRange, Forced};
use super::eval::random_like;
use super::extract::{Label, Response};
use super::judge::Judge;
use super::traits::{norm_question, TraitDef};
use crate::backend::Backend;
use crate::engine::generate::GenRequest;
use crate::error::{Error, Result};
use crate::model::Message;
use crate::steer::vector::PersonaVector;
use crate::steer::{Probe, SeqSteering};
use crate::LoadedModel;

/// One example turn of a many-shot prompt: a user question and the assistant's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shot {
    pub question: String,
    pub answer: String,
}

/// One prompt of the ladder.
#[derive(Debug, Clone, Serialize)]
pub struct LadderPrompt {
    pub question: String,
    pub system: Option<String>,
    /// Example turns before the question (many-shot rungs; empty for the system-prompt ladder).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shots: Vec<Shot>,
    /// −1 suppressing, 0 neutral, +1 eliciting.
    pub level: i32,
}

impl LadderPrompt {
    /// The chat: system prompt (if any), the example turns, then the question.
    pub fn messages(&self) -> Vec<Message> {
        let mut msgs = Vec::with_capacity(2 * self.shots.len() + 2);
        if let Some(s) = &self.system {
            msgs.push(Message::system(s.as_str()));
        }
        for sh in &self.shots {
            msgs.push(Message::user(sh.question.as_str()));
            msgs.push(Message::assistant(sh.answer.as_str()));
        }
        msgs.push(Message::user(self.question.as_str()));
        msgs
    }

    /// The prompt ids, with the generation prompt.
    pub fn ids<B: Backend>(&self, m: &LoadedModel<B>) -> Result<Vec<u32>> {
        m.chat_prompt_ids(&self.messages())
    }
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

/// AUROC of the many-shot rungs with `shots` examples, eliciting vs suppressing, per layer.
#[derive(Debug, Clone, Serialize)]
pub struct ShotAuroc {
    pub shots: usize,
    pub auroc: Vec<f64>,
    pub random_auroc: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MonitorReport {
    pub trait_name: String,
    pub layers: Vec<usize>,
    /// System-prompt ladder (prompts without example turns): eliciting vs suppressing, per layer.
    pub auroc: Vec<f64>,
    pub random_auroc: Vec<f64>,
    /// Many-shot rungs, one entry per number of examples (empty without many-shot prompts).
    pub many_shot: Vec<ShotAuroc>,
    pub layer: usize,
    /// Pearson correlation of last-prompt projection with the responses' measured trait (all rows).
    pub correlation: Option<f64>,
    /// The same over the many-shot rows alone.
    pub many_shot_correlation: Option<f64>,
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
            out.push(LadderPrompt { question: q.clone(), system: Some(p.neg.clone()), shots: vec![], level: -1 });
        }
        out.push(LadderPrompt { question: q.clone(), system: None, shots: vec![], level: 0 });
        for p in &t.instructions {
            out.push(LadderPrompt { question: q.clone(), system: Some(p.pos.clone()), shots: vec![], level: 1 });
        }
    }
    out
}

/// Example pairs for many-shot prompts from extraction answers: (eliciting, suppressing) answers
/// to the same question — a question's i-th kept positive answer with its i-th kept negative one
/// (with empty answers dropped). Questions take turns, so consecutive pairs ask different questions.
pub fn shot_pool(responses: &[Response]) -> Vec<(Shot, Shot)> {
    let mut by_q: Vec<(String, Vec<&Response>, Vec<&Response>)> = vec![];
    for r in responses.iter().filter(|r| r.kept) {
        let i = match by_q.iter().position(|(q, _, _)| *q == r.question) {
            Some(i) => i,
            None => {
                by_q.push((r.question.clone(), vec![], vec![]));
                by_q.len() - 1
            }
        };
        match r.label {
            Label::Pos => by_q[i].1.push(r),
            Label::Neg => by_q[i].2.push(r),
        }
    }
    let per_q: Vec<Vec<(Shot, Shot)>> = by_q
        .iter()
        .map(|(q, pos, neg)| {
            pos.iter()
                .zip(neg)
                .filter(|(p, n)| !p.answer.trim().is_empty() && !n.answer.trim().is_empty())
                .map(|(p, n)| {
                    let shot = |r: &Response| Shot { question: q.clone(), answer: r.answer.trim().to_string() };
                    (shot(p), shot(n))
                })
                .collect()
        })
        .collect();
    let rounds = per_q.iter().map(Vec::len).max().unwrap_or(0);
    (0..rounds).flat_map(|i| per_q.iter().filter_map(move |q| q.get(i).cloned())).collect()
}

/// Many-shot rungs: each question after `k` example turns, for every `k` in `shots` (0, the bare
/// question, is the system ladder's `none` rung and adds nothing here): eliciting (+1) with the
/// pool's trait answers, suppressing (−1) with the opposite answers to the same example questions.
/// Question `j` takes pairs `j·k, j·k+1, ...` (cyclically) of those whose question differs from it.
pub fn many_shot_ladder(questions: &[String], pool: &[(Shot, Shot)], shots: &[usize]) -> Result<Vec<LadderPrompt>> {
    let mut out = vec![];
    for (j, q) in questions.iter().enumerate() {
        let avail: Vec<&(Shot, Shot)> =
            pool.iter().filter(|(p, _)| norm_question(&p.question) != norm_question(q)).collect();
        for &k in shots.iter().filter(|&&k| k > 0) {
            if k > avail.len() {
                return Err(Error::Invalid(format!(
                    "{k}-shot prompts need {k} example answer pairs; only {} are available (for question `{q}`)",
                    avail.len()
                )));
            }
            let picks: Vec<&(Shot, Shot)> = (0..k).map(|i| avail[(j * k + i) % avail.len()]).collect();
            for (level, side) in [(-1, 1), (1, 0)] {
                let shots = picks.iter().map(|p| if side == 0 { p.0.clone() } else { p.1.clone() }).collect();
                out.push(LadderPrompt { question: q.clone(), system: None, shots, level });
            }
        }
    }
    Ok(out)
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
            let ids = p.ids(m)?;
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
    // AUROC per layer over the rows with `n` example turns, eliciting vs suppressing.
    let au_of = |n: usize, random: bool| -> Vec<f64> {
        let side = |level: i32, k: usize| -> Vec<f64> {
            rows.iter()
                .filter(|r| r.prompt.level == level && r.prompt.shots.len() == n)
                .map(|r| if random { r.random_projection[k] } else { r.projection[k] } as f64)
                .collect()
        };
        (0..nl).map(|k| auroc(&side(1, k), &side(-1, k))).collect()
    };
    let (au, rau) = (au_of(0, false), au_of(0, true));
    let mut ks: Vec<usize> = rows.iter().map(|r| r.prompt.shots.len()).filter(|&n| n > 0).collect();
    ks.sort_unstable();
    ks.dedup();
    let many_shot: Vec<ShotAuroc> =
        ks.iter().map(|&n| ShotAuroc { shots: n, auroc: au_of(n, false), random_auroc: au_of(n, true) }).collect();
    // The default layer: the best system-ladder AUROC, or without one the best of the first many-shot rung.
    let primary = if au.iter().all(|a| a.is_nan()) { many_shot.first().map_or(&au, |s| &s.auroc) } else { &au };
    let best =
        (0..nl).filter(|&i| !primary[i].is_nan()).max_by(|&a, &b| primary[a].total_cmp(&primary[b])).unwrap_or(0);
    let layer = o.layer.unwrap_or(o.layers[best]);
    let k = o
        .layers
        .iter()
        .position(|&l| l == layer)
        .ok_or_else(|| Error::Invalid(format!("layer {layer} is not among the probed layers {:?}", o.layers)))?;
    let (mut correlation, mut many_shot_correlation) = (None, None);
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
                    Ok(GenRequest { steering: Some(st.clone()), ..GenRequest::greedy(r.prompt.ids(m)?, o.max_tokens) })
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
        let corr = |many_shot: bool| {
            let (mut x, mut y) = (vec![], vec![]);
            for r in rows.iter().filter(|r| !many_shot || !r.prompt.shots.is_empty()) {
                let target = if judge.is_some() { r.trait_score } else { r.response_projection.map(|p| p as f64) };
                if let Some(tv) = target {
                    x.push(r.projection[k] as f64);
                    y.push(tv);
                }
            }
            pearson(&x, &y)
        };
        correlation = Some(corr(false));
        if !many_shot.is_empty() {
            many_shot_correlation = Some(corr(true));
        }
    }
    Ok(MonitorReport {
        trait_name: name.to_string(),
        layers: o.layers.clone(),
        auroc: au,
        random_auroc: rau,
        many_shot,
        layer,
        correlation,
        many_shot_correlation,
        correlation_with,
        rows,
    })
}

impl MonitorReport {
    pub fn table(&self) -> String {
        let mut s = format!("last-prompt-token projection, eliciting vs suppressing prompts (`{}`)\n", self.trait_name);
        s += &format!("{:>6} {:>8} {:>14}", "layer", "AUROC", "random AUROC");
        for ms in &self.many_shot {
            s += &format!(" | {:>9} {:>7}", format!("{}-shot", ms.shots), "random");
        }
        s += "\n";
        for (i, l) in self.layers.iter().enumerate() {
            s += &format!("{:>6} {:>8.3} {:>14.3}", l, self.auroc[i], self.random_auroc[i]);
            for ms in &self.many_shot {
                s += &format!(" | {:>9.3} {:>7.3}", ms.auroc[i], ms.random_auroc[i]);
            }
            s += if *l == self.layer { " <\n" } else { "\n" };
        }
        if !self.many_shot.is_empty() {
            s += "(AUROC: system prompts; k-shot: k example answers in the trait vs the opposite, no system prompt)\n";
        }
        if let Some(c) = self.correlation {
            s += &format!("correlation at layer {} with the {}: r = {:.3}", self.layer, self.correlation_with, c);
            if let Some(mc) = self.many_shot_correlation {
                s += &format!(" (many-shot prompts alone: r = {mc:.3})");
            }
            s += "\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(q: &str, a: &str, label: Label, kept: bool) -> Response {
        Response {
            system: Some("s".into()),
            question: q.into(),
            answer: a.into(),
            label,
            pair: None,
            trait_score: None,
            coherence: None,
            kept,
        }
    }

    #[test]
    fn shot_pool_pairs_answers_to_the_same_question_and_alternates_questions() {
        let rs = [
            resp("q1", "p1a", Label::Pos, true),
            resp("q1", "n1a", Label::Neg, true),
            resp("q2", "p2a", Label::Pos, true),
            resp("q2", "n2a", Label::Neg, true),
            resp("q1", "p1b", Label::Pos, true),
            resp("q1", "n1b", Label::Neg, true),
            resp("q2", "p2b", Label::Pos, false),
            resp("q2", "n2b", Label::Neg, false),
            resp("q3", " ", Label::Pos, true),
            resp("q3", "n3", Label::Neg, true),
        ];
        let pool = shot_pool(&rs);
        let got: Vec<(&str, &str)> = pool.iter().map(|(p, n)| (p.answer.as_str(), n.answer.as_str())).collect();
        assert_eq!(got, [("p1a", "n1a"), ("p2a", "n2a"), ("p1b", "n1b")]);
        assert!(pool.iter().all(|(p, n)| p.question == n.question));
    }

    #[test]
    fn many_shot_ladder_pairs_sides_and_skips_the_question_itself() {
        let rs: Vec<Response> = (0..4)
            .flat_map(|i| {
                [
                    resp(&format!("q{i}"), &format!("p{i}"), Label::Pos, true),
                    resp(&format!("q{i}"), &format!("n{i}"), Label::Neg, true),
                ]
            })
            .collect();
        let pool = shot_pool(&rs);
        let qs = vec!["Q0".to_string(), "q1".to_string()];
        let l = many_shot_ladder(&qs, &pool, &[0, 2]).unwrap();
        assert_eq!(l.len(), 4);
        for p in &l {
            assert_eq!(p.shots.len(), 2);
            assert!(p.system.is_none());
            assert!(p.shots.iter().all(|s| norm_question(&s.question) != norm_question(&p.question)));
            let want = if p.level == 1 { 'p' } else { 'n' };
            assert!(p.shots.iter().all(|s| s.answer.starts_with(want)), "{p:?}");
        }
        // Both sides of a question show the same example questions.
        assert_eq!(
            l[0].shots.iter().map(|s| &s.question).collect::<Vec<_>>(),
            l[1].shots.iter().map(|s| &s.question).collect::<Vec<_>>()
        );
        let e = many_shot_ladder(&qs, &pool, &[4]).unwrap_err().to_string();
        assert!(e.contains("4-shot") && e.contains("only 3"), "{e}");
        let m = l[0].messages();
        assert_eq!(
            m.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
            ["user", "assistant", "user", "assistant", "user"]
        );
    }
}
