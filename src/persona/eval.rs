//! Steering sweeps: layers × coefficients on a trait's evaluation questions. The objective metric
//! without a judge is the trait log-odds: the mean per-token log-probability of the model's own
//! trait-positive answers minus its trait-negative answers (each generated once, unsteered, under
//! the trait's system prompts), scored with no system prompt under steering. With a judge, steered
//! answers are generated and scored for the trait and coherence. The control is R norm-matched
//! random directions at the best layer (`random`, default 3): each costs as much as one layer of
//! the sweep (one teacher-forced pass per coefficient, plus generation with `generate` or a judge),
//! so R stays small; the report gives their spans' mean and largest |span| and the vector's rank.
//! A layer is chosen over both uses of the vector: the largest steering span among the layers
//! whose monitoring AUROC (last prompt token, eliciting vs suppressing system prompts) reaches a
//! threshold ([`LAYER_RULE`]); the report's layer table shows the numbers behind the choice.

use std::sync::Arc;

use serde::Serialize;

pub use super::common::random_like;
use super::common::{
    generate_with_progress, progress, random_directions, teacher_force, CaptureRange, Forced, RandomControl,
};
use super::extract::{baseline_projection, chat_ids, recorded_baseline};
use super::judge::Judge;
use super::monitor::{ladder, MonitorOptions};
use super::traits::TraitDef;
use crate::backend::Backend;
use crate::engine::generate::GenRequest;
use crate::error::{Error, Result};
use crate::steer::vector::PersonaVector;
use crate::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp, SteeringPlan};
use crate::LoadedModel;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub layers: Vec<usize>,
    pub coeffs: Vec<f32>,
    /// Evaluation questions to use (at most).
    pub questions: usize,
    /// Generate steered answers (for the response projection and the judge).
    pub generate: bool,
    pub max_tokens: usize,
    pub batch: usize,
    pub seed: u64,
    /// Random directions at the best layer (the control).
    pub random: usize,
    /// A layer qualifies for the choice when its monitoring AUROC reaches this ([`LAYER_RULE`]).
    pub min_auroc: f64,
    pub show_progress: bool,
}

/// How `sweep` chooses the layer, in words (`{}` is the AUROC threshold).
pub const LAYER_RULE: &str = "the largest steering span among the layers whose monitoring AUROC is at least {}";

/// One (layer, coefficient) cell of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    pub layer: usize,
    pub coeff: f32,
    /// `true` for a norm-matched random direction.
    pub control: bool,
    /// Which random direction (0-based; with `control`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_index: Option<usize>,
    /// Mean over questions of (log p(pos answer) − log p(neg answer)) per token, nats.
    pub log_odds: f64,
    /// Mean projection of the steered answers onto the unit vector at `layer`.
    pub response_projection: Option<f64>,
    pub trait_score: Option<f64>,
    pub coherence: Option<f64>,
    /// A few steered answers, for reading.
    pub samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub trait_name: String,
    pub points: Vec<EvalPoint>,
    /// Per layer: log_odds(max coeff) − log_odds(min coeff).
    pub effect: Vec<(usize, f64)>,
    pub best_layer: usize,
    /// Per swept layer: the monitoring AUROC of the last prompt token's projection, eliciting vs
    /// suppressing system prompts of the trait's ladder on the same evaluation questions.
    pub auroc: Vec<(usize, f64)>,
    /// The rule `best_layer` was chosen by, with its threshold.
    pub rule: String,
    /// No swept layer reached the AUROC threshold: the choice fell back to the largest span.
    pub no_layer_qualified: bool,
    /// The model's ordinary projection onto the vector at every residual index 0..=N (the
    /// vector's recorded `persona.baseline`, else measured by this sweep).
    pub baseline: Vec<f32>,
    /// Whether `baseline` was measured here (it was not recorded in the vector).
    pub baseline_measured: bool,
    /// The mean over the random directions at the best layer of the same span.
    pub random_effect: f64,
    /// The log-odds span of each random direction at the best layer against the vector's there
    /// (center 0: `max_abs` is the largest |span|, `rank` the vector's rank by |span|).
    pub random: RandomControl,
}

/// The model's own reference answers (unsteered) to the evaluation questions, under the
/// trait's positive and negative instructions (pair `q mod pairs` for question `q`).
fn reference_answers<B: Backend>(
    m: &LoadedModel<B>,
    t: &TraitDef,
    questions: &[String],
    max_tokens: usize,
    show_progress: bool,
) -> Result<Vec<(Forced, Forced)>> {
    let mut reqs = vec![];
    for (qi, q) in questions.iter().enumerate() {
        let pair = &t.instructions[qi % t.instructions.len()];
        for sys in [&pair.pos, &pair.neg] {
            reqs.push(GenRequest::greedy(chat_ids(m, Some(sys), q)?, max_tokens));
        }
    }
    let gens = generate_with_progress(&m.engine, &reqs, max_tokens, "references", show_progress)?;
    let mut out = vec![];
    for (qi, q) in questions.iter().enumerate() {
        let base = chat_ids(m, None, q)?;
        let mk = |g: &crate::engine::generate::GenOutput| {
            let mut tokens = base.clone();
            tokens.extend(m.answer_ids(g));
            Forced { answer_start: base.len(), tokens }
        };
        out.push((mk(&gens[2 * qi]), mk(&gens[2 * qi + 1])));
    }
    Ok(out)
}

fn add_op(layer: usize, v: &Arc<[f32]>, coeff: f32) -> SteerOp {
    SteerOp { kind: SteerKind::Add, layer, vector: v.clone(), coeff, positions: Positions::All, when: None }
}

#[allow(clippy::too_many_arguments)]
fn point<B: Backend>(
    m: &LoadedModel<B>,
    t: &TraitDef,
    refs: &[(Forced, Forced)],
    questions: &[String],
    layer: usize,
    coeff: f32,
    row: &Arc<[f32]>,
    random_index: Option<usize>,
    judge: Option<&dyn Judge>,
    o: &EvalOptions,
) -> Result<EvalPoint> {
    let st = SeqSteering {
        sources: Vec::new(),
        plan: SteeringPlan { ops: if coeff != 0.0 { vec![add_op(layer, row, coeff)] } else { vec![] } },
        probes: vec![Probe { name: "v".into(), layer, vector: row.clone() }],
    };
    let items: Vec<Forced> = refs.iter().flat_map(|(p, n)| [p.clone(), n.clone()]).collect();
    let outs = teacher_force(&m.engine, &items, Some(&st), CaptureRange::None, true, o.batch, None)?;
    let lo: f64 = outs.chunks(2).map(|pn| pn[0].logprob.unwrap_or(0.0) - pn[1].logprob.unwrap_or(0.0)).sum::<f64>()
        / refs.len() as f64;
    let mut p = EvalPoint {
        layer,
        coeff,
        control: random_index.is_some(),
        random_index,
        log_odds: lo,
        response_projection: None,
        trait_score: None,
        coherence: None,
        samples: vec![],
    };
    if o.generate || judge.is_some() {
        let st = Arc::new(st);
        let reqs: Vec<GenRequest> = questions
            .iter()
            .map(|q| {
                Ok(GenRequest { steering: Some(st.clone()), ..GenRequest::greedy(chat_ids(m, None, q)?, o.max_tokens) })
            })
            .collect::<Result<_>>()?;
        let gens = m.engine.generate(&reqs, &mut |_, _| {})?;
        let answers: Vec<String> = gens.iter().map(|g| m.answer_text(g)).collect::<Result<_>>()?;
        p.response_projection =
            Some(gens.iter().map(|g| g.response_mean_projection(0) as f64).sum::<f64>() / gens.len() as f64);
        p.samples = answers.iter().take(3).cloned().collect();
        if let Some(j) = judge {
            let mean = |prompts: Vec<String>| -> Result<Option<f64>> {
                let scores: Vec<f64> = j
                    .score(&prompts)
                    .into_iter()
                    .map(|r| r.map(|s| s.score))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .collect();
                Ok((!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64))
            };
            p.trait_score = mean(questions.iter().zip(&answers).map(|(q, a)| t.render_judge(q, a)).collect())?;
            p.coherence = mean(questions.iter().zip(&answers).map(|(q, a)| t.render_coherence(q, a)).collect())?;
        }
    }
    Ok(p)
}

/// Which line of the sweep a point is on: its layer and, for the control, its random direction.
fn line(p: &EvalPoint) -> (usize, Option<usize>) {
    (p.layer, p.random_index)
}

/// A line's name in the table: its layer, or `18 random 2`.
fn label(of: (usize, Option<usize>)) -> String {
    match of {
        (l, Some(r)) => format!("{l} random {}", r + 1),
        (l, None) => l.to_string(),
    }
}

/// log_odds(max coeff) − log_odds(min coeff) along one line.
fn span(points: &[EvalPoint], of: (usize, Option<usize>)) -> f64 {
    let pts: Vec<&EvalPoint> = points.iter().filter(|p| line(p) == of).collect();
    let lo = pts.iter().min_by(|a, b| a.coeff.total_cmp(&b.coeff));
    let hi = pts.iter().max_by(|a, b| a.coeff.total_cmp(&b.coeff));
    match (lo, hi) {
        (Some(a), Some(b)) => b.log_odds - a.log_odds,
        _ => f64::NAN,
    }
}

/// Run the sweep and choose a layer by [`LAYER_RULE`]: steering span is the log-odds span over
/// the coefficients (with a judge, the trait-score span); monitoring AUROC comes from one prompt
/// pass over the trait's ladder at the swept layers. When no layer reaches `min_auroc`, the
/// largest span is chosen and `no_layer_qualified` says so. Also measures the vector's baseline
/// when it has none recorded.
pub fn sweep<B: Backend>(
    m: &LoadedModel<B>,
    t: &TraitDef,
    v: &PersonaVector,
    judge: Option<&dyn Judge>,
    o: &EvalOptions,
) -> Result<EvalReport> {
    if o.layers.is_empty() || o.coeffs.len() < 2 {
        return Err(Error::Invalid("a sweep needs at least one layer and two coefficients".into()));
    }
    for &l in &o.layers {
        v.check_layer(l)?;
    }
    let questions: Vec<String> = t.eval_questions.iter().take(o.questions).cloned().collect();
    let refs = reference_answers(m, t, &questions, o.max_tokens, o.show_progress)?;
    let cells = (o.layers.len() + o.random) * o.coeffs.len();
    let pb = o.show_progress.then(|| progress(cells, "sweep"));
    let mut points = vec![];
    for &l in &o.layers {
        let row: Arc<[f32]> = Arc::from(v.layer(l));
        for &c in &o.coeffs {
            points.push(point(m, t, &refs, &questions, l, c, &row, None, judge, o)?);
            if let Some(pb) = &pb {
                pb.inc(1);
            }
        }
    }
    let score_span = |l: usize| -> f64 {
        let pts: Vec<&EvalPoint> = points.iter().filter(|p| p.layer == l && !p.control).collect();
        match (pts.first().and_then(|p| p.trait_score), pts.last().and_then(|p| p.trait_score)) {
            (Some(a), Some(b)) if judge.is_some() => b - a,
            _ => span(&points, (l, None)),
        }
    };
    let effect: Vec<(usize, f64)> = o.layers.iter().map(|&l| (l, span(&points, (l, None)))).collect();
    // Monitoring at the same layers: one prompt pass over the trait's ladder gives every layer.
    let mo = MonitorOptions {
        questions: o.questions,
        layers: o.layers.clone(),
        layer: None,
        generate: false,
        max_tokens: o.max_tokens,
        batch: o.batch,
        seed: o.seed,
        random: 0,
        show_progress: o.show_progress,
    };
    let mon = super::monitor::run(m, &t.name, ladder(t, o.questions), v, Some(t), None, &mo)?;
    let auroc: Vec<(usize, f64)> = o.layers.iter().copied().zip(mon.auroc.iter().copied()).collect();
    let qualified: Vec<usize> = auroc.iter().filter(|(_, a)| *a >= o.min_auroc).map(|(l, _)| *l).collect();
    let no_layer_qualified = qualified.is_empty();
    let pool = if no_layer_qualified { o.layers.clone() } else { qualified };
    let best_layer =
        pool.iter().copied().max_by(|&a, &b| score_span(a).total_cmp(&score_span(b))).unwrap_or(o.layers[0]);
    let (baseline, baseline_measured) = match recorded_baseline(v)? {
        Some(b) => (b, false),
        None => (baseline_projection(m, v, &t.questions, o.max_tokens, o.show_progress)?, true),
    };
    // Member 0 is the single direction earlier versions drew (same seed).
    for (i, d) in random_directions(v.layer(best_layer), o.random, o.seed ^ 0x5eed).into_iter().enumerate() {
        let d: Arc<[f32]> = Arc::from(d);
        for &c in &o.coeffs {
            points.push(point(m, t, &refs, &questions, best_layer, c, &d, Some(i), judge, o)?);
            if let Some(pb) = &pb {
                pb.inc(1);
            }
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let spans: Vec<f64> = (0..o.random).map(|i| span(&points, (best_layer, Some(i)))).collect();
    let random = RandomControl::new(span(&points, (best_layer, None)), spans, 0.0);
    Ok(EvalReport {
        trait_name: t.name.clone(),
        points,
        effect,
        best_layer,
        auroc,
        rule: LAYER_RULE.replace("{}", &format!("{:.2}", o.min_auroc)),
        no_layer_qualified,
        baseline,
        baseline_measured,
        random_effect: random.mean,
        random,
    })
}

impl EvalReport {
    /// A text table: one row per layer (and the control), one column per coefficient.
    pub fn table(&self) -> String {
        let mut coeffs: Vec<f32> = self.points.iter().map(|p| p.coeff).collect();
        coeffs.sort_by(f32::total_cmp);
        coeffs.dedup();
        let mut s = format!("trait log-odds (nats/token) for `{}`\n{:>12}", self.trait_name, "layer");
        for c in &coeffs {
            s += &format!("{:>9}", format!("{c:+}"));
        }
        s += &format!("{:>9}\n", "span");
        let mut rows: Vec<(usize, Option<usize>)> = self.points.iter().map(line).collect();
        rows.dedup();
        for of in rows {
            s += &format!("{:>12}", label(of));
            for c in &coeffs {
                match self.points.iter().find(|p| line(p) == of && p.coeff == *c) {
                    Some(p) => s += &format!("{:>9.3}", p.log_odds),
                    None => s += &format!("{:>9}", ""),
                }
            }
            s += &format!("{:>9.3}\n", span(&self.points, of));
        }
        s += &self.layer_table();
        let r = &self.random;
        if r.values.is_empty() {
            s += &format!("best layer: {} (no random directions)\n", self.best_layer);
        } else {
            s += &format!(
                "best layer: {} (span {:.3}); {} random directions there: mean span {:.3}, largest |span| {:.3}; \
                 the vector ranks {} of {}\n",
                self.best_layer,
                self.effect.iter().find(|e| e.0 == self.best_layer).map_or(f64::NAN, |e| e.1),
                r.values.len(),
                self.random_effect,
                r.max_abs,
                r.rank,
                r.values.len() + 1
            );
        }
        s
    }

    /// The table that justifies the layer choice: per swept layer, the steering span, the
    /// monitoring AUROC and the baseline projection, the chosen layer marked.
    pub fn layer_table(&self) -> String {
        let mut s = format!("\nlayer choice: {}\n", self.rule);
        s += &format!("{:>12}{:>9}{:>9}{:>11}\n", "layer", "span", "AUROC", "baseline");
        for &(l, span) in &self.effect {
            let au = self.auroc.iter().find(|a| a.0 == l).map_or(f64::NAN, |a| a.1);
            let b = self.baseline.get(l).copied().unwrap_or(f32::NAN);
            let mark = if l == self.best_layer { "← chosen" } else { "" };
            s += format!("{l:>12}{span:>9.3}{au:>9.3}{b:>11.3}  {mark}").trim_end();
            s.push('\n');
        }
        if self.no_layer_qualified {
            s += "no swept layer reaches the AUROC threshold: chosen by steering span alone; this vector monitors \
                  poorly at every swept layer\n";
        }
        s += "baseline: the model's ordinary projection onto the vector (mean over its own unsteered answers); \
              op=ablate moves tokens to 0, op=center to the baseline\n";
        s
    }

    /// An SVG line plot of log-odds against coefficient, one line per layer (control dashed).
    pub fn svg(&self) -> String {
        let (w, h, pad) = (640.0, 400.0, 50.0);
        let xs: Vec<f64> = self.points.iter().map(|p| p.coeff as f64).collect();
        let ys: Vec<f64> = self.points.iter().map(|p| p.log_odds).collect();
        let (x0, x1) =
            (xs.iter().cloned().fold(f64::INFINITY, f64::min), xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
        let (mut y0, mut y1) =
            (ys.iter().cloned().fold(f64::INFINITY, f64::min), ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
        if y1 - y0 < 1e-9 {
            y0 -= 1.0;
            y1 += 1.0;
        }
        let px = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-9) * (w - 2.0 * pad);
        let py = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
        let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"20\" text-anchor=\"middle\">{}: trait log-odds vs steering coefficient</text>\n\
             <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
             <text x=\"{pad}\" y=\"{}\">{x0:+}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x1:+}</text>\n\
             <text x=\"5\" y=\"{}\">{y1:.2}</text><text x=\"5\" y=\"{}\">{y0:.2}</text>\n",
            w / 2.0,
            self.trait_name,
            h - pad,
            w - pad,
            h - pad,
            h - pad,
            h - pad + 15.0,
            w - pad,
            h - pad + 15.0,
            pad + 4.0,
            h - pad
        );
        let mut rows: Vec<(usize, Option<usize>)> = self.points.iter().map(line).collect();
        rows.dedup();
        for (i, &of) in rows.iter().enumerate() {
            let ctl = of.1.is_some();
            let mut pts: Vec<&EvalPoint> = self.points.iter().filter(|p| line(p) == of).collect();
            pts.sort_by(|a, b| a.coeff.total_cmp(&b.coeff));
            let path: Vec<String> =
                pts.iter().map(|p| format!("{:.1},{:.1}", px(p.coeff as f64), py(p.log_odds))).collect();
            let color = if ctl { "#888888" } else { colors[i % colors.len()] };
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{} points=\"{}\"/>\n",
                if ctl { " stroke-dasharray=\"5,4\"" } else { "" },
                path.join(" ")
            );
            s += &format!(
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>\n",
                w - pad + 4.0,
                pad + 14.0 * i as f64,
                match of {
                    (_, Some(r)) => format!("random {}", r + 1),
                    (l, None) => format!("L{l}"),
                }
            );
        }
        s + "</svg>\n"
    }
}
