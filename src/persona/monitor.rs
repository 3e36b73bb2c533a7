//! Monitoring: the last-prompt-token projection onto a persona vector predicts the trait of the
//! answer that follows. Prompts go up a ladder of system prompts, from trait-suppressing (the
//! trait's negative instructions) through none to trait-eliciting (its positive instructions).
//! Many-shot rungs (the paper's second setting) put k example question/answer turns before the
//! question, with no system prompt: the trait-eliciting side shows k answers written in the trait,
//! the suppressing side the opposite answers to the same k questions. The report gives, per layer,
//! the AUROC of eliciting vs suppressing prompts — system prompts, and each k apart — for the
//! vector and, as the control, for R norm-matched random directions (the mean of their AUROCs,
//! the 95th percentile of their |AUROC − 0.5| and the vector's percentile among them), and the
//! correlation between the projection and the measured trait of the responses (judge score, or
//! without a judge the response's own mean projection). The random directions cost no model runs:
//! the pass captures the last prompt token's residual at every layer and projects it onto each.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::common::{
    auroc, pearson, progress, project, random_directions, teacher_force, unit, CaptureRange, Forced, RandomControl,
};
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
    /// Seeds the random directions (layer `l`'s are drawn from `seed ^ l`).
    pub seed: u64,
    /// Random directions per layer (the control).
    pub random: usize,
    pub show_progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MonitorRow {
    pub prompt: LadderPrompt,
    /// Last-prompt-token projection per probed layer (same order as `layers`).
    pub projection: Vec<f32>,
    /// The same onto the first random direction per layer (the single control of earlier versions).
    pub random_projection: Vec<f32>,
    /// The same onto every random direction: `[layer][direction]`.
    pub random_projections: Vec<Vec<f32>>,
    pub response: Option<String>,
    pub response_projection: Option<f32>,
    pub trait_score: Option<f64>,
}

/// AUROC of the many-shot rungs with `shots` examples, eliciting vs suppressing, per layer.
#[derive(Debug, Clone, Serialize)]
pub struct ShotAuroc {
    pub shots: usize,
    pub auroc: Vec<f64>,
    /// Mean AUROC of the random directions, per layer.
    pub random_auroc: Vec<f64>,
    /// Per layer: the random directions' AUROCs against the vector's (center 0.5).
    pub random: Vec<RandomControl>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MonitorReport {
    pub trait_name: String,
    pub layers: Vec<usize>,
    /// Random directions per layer.
    pub random_directions: usize,
    /// System-prompt ladder (prompts without example turns): eliciting vs suppressing, per layer.
    pub auroc: Vec<f64>,
    /// Mean AUROC of the random directions, per layer.
    pub random_auroc: Vec<f64>,
    /// Per layer: the random directions' AUROCs against the vector's. A direction's sign is
    /// arbitrary (AUROC a and 1 − a are equally likely for a random one), so `p95_abs`, `max_abs`,
    /// `percentile` and `rank` compare |AUROC − 0.5|.
    pub random: Vec<RandomControl>,
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

/// The AUROC of eliciting (`pos`) over suppressing (`neg`) prompts along the vector, and the same
/// along each of `r` random directions as its control (center 0.5). Each prompt is (its projection
/// onto the vector, its projections onto the random directions).
///
/// ```
/// use persona::persona::monitor::auroc_control;
/// let pos: Vec<(f32, &[f32])> = vec![(2.0, &[0.1, -1.0]), (3.0, &[0.3, 0.0])];
/// let neg: Vec<(f32, &[f32])> = vec![(-1.0, &[0.2, 1.0]), (0.0, &[0.0, 2.0])];
/// let (au, c) = auroc_control(&pos, &neg, 2);
/// assert_eq!((au, c.values.clone()), (1.0, vec![0.75, 0.0]));
/// // Direction 1 separates as well as the vector, the other way round: a tie.
/// assert_eq!((c.rank, c.percentile), (1, 75.0));
/// ```
pub fn auroc_control(pos: &[(f32, &[f32])], neg: &[(f32, &[f32])], r: usize) -> (f64, RandomControl) {
    let along = |side: &[(f32, &[f32])], i: Option<usize>| -> Vec<f64> {
        side.iter().map(|(p, rs)| i.map_or(*p, |i| rs[i]) as f64).collect()
    };
    let a = auroc(&along(pos, None), &along(neg, None));
    let rand = (0..r).map(|i| auroc(&along(pos, Some(i)), &along(neg, Some(i)))).collect();
    (a, RandomControl::new(a, rand, 0.5))
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
    // Unit random directions per layer; the residual at the last prompt token is captured at
    // every layer, so projecting onto them needs no further model runs.
    let units: Vec<Vec<Vec<f32>>> = o
        .layers
        .iter()
        .map(|&l| random_directions(v.layer(l), o.random, o.seed ^ l as u64).iter().map(|d| unit(d)).collect())
        .collect();
    let hidden = m.engine.config.hidden;
    let nl = o.layers.len();
    let st = SeqSteering { sources: Vec::new(), plan: Default::default(), probes };
    let items: Vec<Forced> = prompts
        .iter()
        .map(|p| {
            let ids = p.ids(m)?;
            Ok(Forced { answer_start: ids.len(), tokens: ids })
        })
        .collect::<Result<_>>()?;
    let pb = o.show_progress.then(|| progress(items.len(), "prompts"));
    let outs = teacher_force(&m.engine, &items, Some(&st), CaptureRange::PromptLast, false, o.batch, pb.as_ref())?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut rows: Vec<MonitorRow> = vec![];
    for (p, f) in prompts.into_iter().zip(&outs) {
        let h = f
            .mean
            .as_ref()
            .ok_or_else(|| Error::Invalid("the last prompt token's residual was not captured".into()))?;
        let random_projections: Vec<Vec<f32>> = o
            .layers
            .iter()
            .zip(&units)
            .map(|(&l, us)| project(&h[l * hidden..(l + 1) * hidden], us).into_iter().map(|x| x as f32).collect())
            .collect();
        rows.push(MonitorRow {
            prompt: p,
            projection: f.last_prompt_proj[..nl].to_vec(),
            random_projection: random_projections.iter().filter_map(|r| r.first().copied()).collect(),
            random_projections,
            response: None,
            response_projection: None,
            trait_score: None,
        });
    }
    // AUROC per layer over the rows with `n` example turns, eliciting vs suppressing: the vector's,
    // and each random direction's against it.
    let au_of = |n: usize| -> (Vec<f64>, Vec<RandomControl>) {
        (0..nl)
            .map(|k| {
                let side = |level: i32| -> Vec<(f32, &[f32])> {
                    rows.iter()
                        .filter(|r| r.prompt.level == level && r.prompt.shots.len() == n)
                        .map(|r| (r.projection[k], &r.random_projections[k][..]))
                        .collect()
                };
                auroc_control(&side(1), &side(-1), o.random)
            })
            .unzip()
    };
    let means = |c: &[RandomControl]| c.iter().map(|c| c.mean).collect::<Vec<f64>>();
    let (au, random) = au_of(0);
    let rau = means(&random);
    let mut ks: Vec<usize> = rows.iter().map(|r| r.prompt.shots.len()).filter(|&n| n > 0).collect();
    ks.sort_unstable();
    ks.dedup();
    let many_shot: Vec<ShotAuroc> = ks
        .iter()
        .map(|&n| {
            let (auroc, random) = au_of(n);
            ShotAuroc { shots: n, auroc, random_auroc: means(&random), random }
        })
        .collect();
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
            sources: Vec::new(),
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
        random_directions: o.random,
        auroc: au,
        random_auroc: rau,
        random,
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
        // One group per rung: the vector's AUROC; the random directions' mean AUROC, 95th percentile
        // of |AUROC − 0.5| and the vector's percentile of |AUROC − 0.5| among them.
        let group = |s: &mut String, au: f64, c: &RandomControl| {
            *s += &format!(" {:>7.3} {:>6.3} {:>6.3} {:>5.0}", au, c.mean, c.p95_abs, c.percentile);
        };
        let mut head = format!("{:>6} {:>7} {:>6} {:>6} {:>5}", "", "system", "rand", "rand", "");
        for ms in &self.many_shot {
            head += &format!(" | {:>7} {:>6} {:>6} {:>5}", format!("{}-shot", ms.shots), "rand", "rand", "");
        }
        s += head.trim_end();
        s += "\n";
        s += &format!("{:>6} {:>7} {:>6} {:>6} {:>5}", "layer", "AUROC", "mean", "p95", "pct");
        for _ in &self.many_shot {
            s += &format!(" | {:>7} {:>6} {:>6} {:>5}", "AUROC", "mean", "p95", "pct");
        }
        s += "\n";
        for (i, l) in self.layers.iter().enumerate() {
            s += &format!("{l:>6}");
            group(&mut s, self.auroc[i], &self.random[i]);
            for ms in &self.many_shot {
                s += " |";
                group(&mut s, ms.auroc[i], &ms.random[i]);
            }
            s += if *l == self.layer { " <\n" } else { "\n" };
        }
        s += &format!(
            "(rand: {} norm-matched random directions per layer. mean: their mean AUROC; p95: the 95th percentile\n \
             of their |AUROC − 0.5|, as a direction's sign is arbitrary; pct: the vector's |AUROC − 0.5| as a\n \
             percentile of theirs, 100 = beyond every one)\n",
            self.random_directions
        );
        if !self.many_shot.is_empty() {
            s += "(system: system prompts; k-shot: k example answers in the trait vs the opposite, no system prompt)\n";
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
