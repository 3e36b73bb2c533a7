//! Building blocks of the pipelines: teacher-forced passes over (prompt, answer) token lists in
//! batches (answer-token means, log-probabilities, projections), statistics, atomic writes and
//! progress bars.

use indicatif::{ProgressBar, ProgressStyle};

pub use crate::atomic_file::write_atomic;
use crate::backend::Backend;
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
}
