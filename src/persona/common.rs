//! Building blocks of the pipelines: teacher-forced passes over (prompt, answer) token lists in
//! batches (answer-token means, log-probabilities, projections), statistics, random-direction
//! controls, atomic writes and progress bars.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use crate::atomic_file::write_atomic;
use crate::backend::Backend;
use crate::engine::sampler::Rng;
use crate::engine::{Engine, SeqInput};
use crate::error::{Error, Result};
use crate::steer::{Capture, SeqSteering};

/// One sequence to run teacher-forced: `tokens[..answer_start]` is the prompt, the rest the answer.
#[derive(Debug, Clone)]
pub struct Forced {
    pub tokens: Vec<u32>,
    pub answer_start: usize,
}

/// What a teacher-forced pass measures for one sequence.
#[derive(Debug, Clone, Default)]
pub struct ForcedOut {
    /// Mean log-probability per answer token (with `logprob`).
    pub logprob: Option<f64>,
    /// Mean residual `[(N+1) * hidden]` over the captured tokens (with `capture`).
    pub mean: Option<Vec<f32>>,
    /// Per probe: projection at the last prompt token, and mean over the answer tokens.
    pub last_prompt_proj: Vec<f32>,
    pub answer_proj: Vec<f32>,
}

/// Which tokens a teacher-forced pass averages the residual over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureRange {
    None,
    /// Every answer token (the paper's response_avg).
    Answer,
    /// Every prompt token (prompt_avg).
    Prompt,
    /// The last prompt token (prompt_last).
    PromptLast,
}

fn log_softmax_at(logits: &[f32], id: u32) -> f64 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    logits[id as usize] as f64 - m - z.ln()
}

/// Run `items` teacher-forced in batches of `batch` sequences, under `steering` (applied to
/// every sequence; its probes are measured).
pub fn teacher_force<B: Backend>(
    e: &Engine<B>,
    items: &[Forced],
    steering: Option<&SeqSteering>,
    capture: CaptureRange,
    logprob: bool,
    batch: usize,
    progress: Option<&ProgressBar>,
) -> Result<Vec<ForcedOut>> {
    let mut outs = Vec::with_capacity(items.len());
    let k = steering.map_or(0, |s| s.probes.len());
    for chunk in items.chunks(batch.max(1)) {
        for (i, it) in chunk.iter().enumerate() {
            if it.answer_start == 0 || it.answer_start > it.tokens.len() {
                return Err(Error::Invalid(format!(
                    "item {i}: answer start {} is outside 1..={}",
                    it.answer_start,
                    it.tokens.len()
                )));
            }
        }
        // Prompt-only captures need no answer tokens at all.
        let prompt_only = matches!(capture, CaptureRange::Prompt | CaptureRange::PromptLast) && !logprob;
        let toks: Vec<&[u32]> =
            chunk.iter().map(|it| if prompt_only { &it.tokens[..it.answer_start] } else { &it.tokens[..] }).collect();
        let cap = toks.iter().map(|t| t.len()).max().unwrap_or(1);
        let mut cache = e.new_cache(chunk.len(), cap)?;
        let inputs: Vec<SeqInput> = chunk
            .iter()
            .zip(&toks)
            .enumerate()
            .map(|(slot, (it, t))| SeqInput {
                slot,
                tokens: t,
                logits_from: logprob.then(|| it.answer_start - 1),
                prompt: true,
                answer_from: Some(it.answer_start),
                more_prompt: false,
                steering,
                capture: match capture {
                    CaptureRange::None => None,
                    CaptureRange::Answer => Some(Capture { from: it.answer_start }),
                    CaptureRange::Prompt => Some(Capture { from: 0 }),
                    CaptureRange::PromptLast => Some(Capture { from: it.answer_start - 1 }),
                },
            })
            .collect();
        let out = e.forward(&mut cache, &inputs, false)?;
        for (si, it) in chunk.iter().enumerate() {
            let mut o = ForcedOut::default();
            if logprob {
                let rows = out.rows[si].clone();
                // Row r predicts token answer_start + r; the final row predicts nothing.
                let n = it.tokens.len() - it.answer_start;
                let lp: f64 =
                    (0..n).map(|r| log_softmax_at(out.row(rows.start + r), it.tokens[it.answer_start + r])).sum();
                o.logprob = Some(if n > 0 { lp / n as f64 } else { 0.0 });
            }
            if let Some((sum, n)) = &out.captures[si] {
                o.mean = Some(sum.iter().map(|&x| x / (*n).max(1) as f32).collect());
            }
            if k > 0 {
                let p = &out.projections[si];
                let last = it.answer_start - 1;
                o.last_prompt_proj = p[last * k..(last + 1) * k].to_vec();
                let ntok = p.len() / k;
                let ans = it.answer_start..ntok;
                o.answer_proj = (0..k)
                    .map(|j| {
                        let s: f64 = ans.clone().map(|t| p[t * k + j] as f64).sum();
                        (s / ans.len().max(1) as f64) as f32
                    })
                    .collect();
            }
            outs.push(o);
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok(outs)
}

/// A progress bar with ETA on stderr (hidden when stderr is not a terminal).
pub fn progress(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} ({elapsed} elapsed, ETA {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Generate `reqs` (up to `max_tokens` each) with a progress bar named `what`, advanced per
/// token, when `show` (an answer that ends early leaves its share unfilled).
pub fn generate_with_progress<B: Backend>(
    e: &Engine<B>,
    reqs: &[crate::engine::generate::GenRequest],
    max_tokens: usize,
    what: &str,
    show: bool,
) -> Result<Vec<crate::engine::generate::GenOutput>> {
    let pb = show.then(|| progress(reqs.len() * max_tokens, what));
    let gens = e.generate(reqs, &mut |_, _| {
        if let Some(pb) = &pb {
            pb.inc(1);
        }
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(gens)
}

/// Area under the ROC curve of `pos` scored above `neg` (ties count half).
pub fn auroc(pos: &[f64], neg: &[f64]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0.0;
    for &p in pos {
        for &n in neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

/// Pearson correlation.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

/// `a · b`, accumulated in f64.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// A random direction with the norm of `v` (the first of [`random_directions`]).
/// The random-direction control of a steering plan: every op's vector replaced by a random one of
/// the same norm, op `i` drawn from `seed + i`.
pub fn randomize_ops(st: &mut SeqSteering, seed: u64) {
    for (i, op) in st.plan.ops.iter_mut().enumerate() {
        op.vector = std::sync::Arc::from(random_like(&op.vector, seed.wrapping_add(i as u64)));
    }
}

pub fn random_like(v: &[f32], seed: u64) -> Vec<f32> {
    random_directions(v, 1, seed).pop().unwrap_or_default()
}

/// `r` random directions with the norm of `v`: isotropic Gaussian vectors (Box–Muller normals)
/// drawn one after another from one stream seeded by `seed`, each rescaled to |v|. The same seed
/// gives the same set, and a larger `r` only appends to it (member 0 is `random_like(v, seed)`).
///
/// ```
/// use persona::persona::common::random_directions;
/// let v = [3.0f32, 4.0, 0.0, 0.0];
/// let r = random_directions(&v, 20, 7);
/// assert_eq!(r.len(), 20);
/// assert!(r.iter().all(|d| (d.iter().map(|x| x * x).sum::<f32>().sqrt() - 5.0).abs() < 1e-4));
/// assert_eq!(r[..3], random_directions(&v, 3, 7)[..]);
/// ```
pub fn random_directions(v: &[f32], r: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let nv = norm(v);
    (0..r)
        .map(|_| {
            let mut g: Vec<f32> = (0..v.len())
                .map(|_| {
                    let (u1, u2) = (rng.next_f64().max(1e-300), rng.next_f64());
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect();
            let ng = norm(&g);
            g.iter_mut().for_each(|x| *x *= (nv / ng) as f32);
            g
        })
        .collect()
}

/// Euclidean norm, accumulated in f64.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// `v / |v|` (a zero vector stays zero).
pub fn unit(v: &[f32]) -> Vec<f32> {
    let n = norm(v);
    v.iter().map(|&x| if n > 0.0 { (x as f64 / n) as f32 } else { 0.0 }).collect()
}

/// `h · u` for each of `units`, accumulated in f64.
pub fn project(h: &[f32], units: &[Vec<f32>]) -> Vec<f64> {
    units.iter().map(|u| dot(h, u)).collect()
}

/// Percentile (0–100) of `x` among `samples`: the share of samples below `x`, a tie counting
/// half (100: above every sample, 0: below every one). NaN samples are ignored; NaN when `x` is
/// NaN or no sample remains.
///
/// ```
/// use persona::persona::common::percentile_of;
/// assert_eq!(percentile_of(5.0, &[1.0, 2.0, 3.0, 4.0]), 100.0);
/// assert_eq!(percentile_of(2.0, &[1.0, 2.0, 3.0, 4.0]), 37.5);
/// ```
pub fn percentile_of(x: f64, samples: &[f64]) -> f64 {
    let s: Vec<f64> = samples.iter().copied().filter(|s| !s.is_nan()).collect();
    if x.is_nan() || s.is_empty() {
        return f64::NAN;
    }
    let below = s.iter().filter(|&&s| s < x).count() as f64;
    let ties = s.iter().filter(|&&s| s == x).count() as f64;
    100.0 * (below + 0.5 * ties) / s.len() as f64
}

/// The `q`-quantile (`q` in 0..=1) of `samples`, interpolating linearly between order statistics
/// (numpy's default). NaN samples are ignored; NaN when none remain.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = samples.iter().copied().filter(|s| !s.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < s.len() {
        s[i] + f * (s[i + 1] - s[i])
    } else {
        s[i]
    }
}

/// A statistic of the persona vector beside the same statistic for R random directions. A
/// direction's sign is arbitrary (a random direction and its negative are equally likely), so how
/// far a statistic is from chance is measured as |value − center| (center 0.5 for an AUROC, 0 for
/// a difference of projections or a log-odds span): `p95_abs`, `max_abs`, `percentile` and `rank`
/// compare those distances.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RandomControl {
    /// The chance level the distances are measured from.
    pub center: f64,
    /// The statistic for each random direction, in draw order.
    pub values: Vec<f64>,
    /// Their mean (signed).
    pub mean: f64,
    /// 95th percentile of |value − center| over the random directions.
    pub p95_abs: f64,
    /// The largest |value − center| of a random direction.
    pub max_abs: f64,
    /// The vector's |value − center| as a percentile (0–100) of the random directions' (100:
    /// farther from chance than every one).
    pub percentile: f64,
    /// The vector's rank among itself and the random directions by |value − center|: 1 + the
    /// number of random directions strictly farther from chance.
    pub rank: usize,
}

impl RandomControl {
    /// The control for the vector's statistic `real` against `values` (one per random direction).
    ///
    /// ```
    /// use persona::persona::common::RandomControl;
    /// let c = RandomControl::new(0.95, vec![0.4, 0.55, 0.62, 0.3], 0.5);
    /// assert_eq!((c.percentile, c.rank), (100.0, 1));
    /// assert!((c.max_abs - 0.2).abs() < 1e-12);
    /// ```
    pub fn new(real: f64, values: Vec<f64>, center: f64) -> Self {
        let dist: Vec<f64> = values.iter().map(|v| (v - center).abs()).collect();
        let d = (real - center).abs();
        let finite: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        RandomControl {
            center,
            mean: if finite.is_empty() { f64::NAN } else { finite.iter().sum::<f64>() / finite.len() as f64 },
            p95_abs: quantile(&dist, 0.95),
            max_abs: dist.iter().copied().filter(|x| !x.is_nan()).fold(f64::NAN, f64::max),
            percentile: percentile_of(d, &dist),
            rank: 1 + dist.iter().filter(|&&x| x > d).count(),
            values,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_and_pearson() {
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(auroc(&[1.0], &[1.0]), 0.5);
        assert!((auroc(&[1.0, 3.0], &[2.0]) - 0.5).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }

    #[test]
    fn log_softmax_matches_definition() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((log_softmax_at(&l, 1) - (2f64.exp() / z).ln()).abs() < 1e-12);
    }

    #[test]
    fn percentile_edge_cases() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile_of(0.0, &s), 0.0);
        assert_eq!(percentile_of(9.0, &s), 100.0);
        assert_eq!(percentile_of(2.5, &s), 50.0);
        // Ties count half; all samples equal to x is the 50th percentile.
        assert_eq!(percentile_of(4.0, &s), 87.5);
        assert_eq!(percentile_of(1.0, &[1.0, 1.0]), 50.0);
        assert!(percentile_of(1.0, &[]).is_nan());
        assert!(percentile_of(f64::NAN, &s).is_nan());
        assert_eq!(percentile_of(3.0, &[f64::NAN, 1.0, 5.0]), 50.0);
        assert!(percentile_of(3.0, &[f64::NAN]).is_nan());
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        // numpy.percentile([1, 2, 3, 4, 10], [0, 50, 95, 100]) = [1, 3, 8.8, 10]
        let s = [10.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 0.5), 3.0);
        assert!((quantile(&s, 0.95) - 8.8).abs() < 1e-12);
        assert_eq!(quantile(&s, 1.0), 10.0);
        assert_eq!(quantile(&[7.0], 0.95), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn random_control_measures_distance_from_chance_either_way() {
        // 0.1 is as far from chance as 0.9: both outrank a vector at 0.8.
        let c = RandomControl::new(0.8, vec![0.1, 0.5, 0.6, 0.9], 0.5);
        assert_eq!(c.rank, 3);
        assert_eq!(c.percentile, 50.0);
        assert!((c.mean - 0.525).abs() < 1e-12);
        assert!((c.max_abs - 0.4).abs() < 1e-12);
        let none = RandomControl::new(0.8, vec![], 0.5);
        assert!(none.mean.is_nan() && none.p95_abs.is_nan() && none.max_abs.is_nan() && none.percentile.is_nan());
        assert_eq!(none.rank, 1);
    }

    #[test]
    fn random_directions_are_seeded_norm_matched_and_extend() {
        let v: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = random_directions(&v, 5, 42);
        assert_eq!(a, random_directions(&v, 5, 42));
        assert_ne!(a, random_directions(&v, 5, 43));
        assert_eq!(a[..2], random_directions(&v, 2, 42)[..]);
        // Member 0 is the single direction earlier versions drew (finetune's --random-control, the
        // monitor's and eval's first control): the same numbers, bit for bit.
        let old = {
            let mut r = Rng::new(42);
            let mut g: Vec<f32> = (0..v.len())
                .map(|_| {
                    let (u1, u2) = (r.next_f64().max(1e-300), r.next_f64());
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect();
            let (nv, ng) = (norm(&v), norm(&g));
            g.iter_mut().for_each(|x| *x *= (nv / ng) as f32);
            g
        };
        assert_eq!(a[0], old);
        assert_eq!(random_like(&v, 42), old);
        for d in &a {
            assert!((norm(d) - norm(&v)).abs() < 1e-4 * norm(&v));
        }
        // Distinct members, nearly orthogonal in 64 dimensions.
        let cos = dot(&a[0], &a[1]) / (norm(&a[0]) * norm(&a[1]));
        assert!(cos.abs() < 0.5, "cos {cos}");
        assert!((norm(&unit(&v)) - 1.0).abs() < 1e-6);
        assert!(unit(&[0.0, 0.0]).iter().all(|&x| x == 0.0));
    }
}
