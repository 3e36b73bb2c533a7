//! Batched generation: every request gets a KV-cache slot; prompts are prefilled together in one
//! ragged forward call, then all unfinished sequences decode together, one token per step.
//! Each request may carry its own steering plan, probes and a capture of its generated tokens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::sampler::{sample, top_k, Rng, SamplingParams};
use super::{Engine, SeqInput};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::steer::{Capture, OpCount, Receipt, SeqSteering};

/// One generation request (token ids; text goes through the tokenizer first).
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going after an end-of-sequence token.
    pub ignore_eos: bool,
    /// Report the K highest logits of every step (0 = none).
    pub top_logits: usize,
    /// Steering ops and probes for this request only.
    pub steering: Option<Arc<SeqSteering>>,
    /// Mean residual at every index over the generated tokens.
    pub capture_response: bool,
    /// Stop early once this flag is set (e.g. by a Ctrl-C handler): it is read after each token
    /// of this request is produced; the token just produced is kept and the output's finish is
    /// [`Finish::Stopped`]. The flag is only read, never cleared. None: run to EOS or `max_tokens`.
    pub stop: Option<Arc<AtomicBool>>,
}

impl GenRequest {
    pub fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        GenRequest {
            prompt_ids,
            max_tokens,
            sampling: SamplingParams::greedy(),
            ignore_eos: false,
            top_logits: 0,
            steering: None,
            capture_response: false,
            stop: None,
        }
    }

    fn probes(&self) -> usize {
        self.steering.as_ref().map_or(0, |s| s.probes.len())
    }
}

/// One generated token, with the highest logits that produced it when asked for, and the
/// projections (one per probe) of the position that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenStep {
    pub id: u32,
    pub top: Vec<(u32, f32)>,
    pub projections: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Produced an end-of-sequence token (included in `ids`).
    Eos,
    /// Reached `max_tokens`.
    Length,
    /// Its [`GenRequest::stop`] flag was set.
    Stopped,
}

#[derive(Debug, Clone)]
pub struct GenOutput {
    pub prompt_ids: Vec<u32>,
    pub steps: Vec<GenStep>,
    pub finish: Finish,
    /// Per probe: the projection at every prompt token, then at every generated token.
    pub projections: Vec<Vec<f32>>,
    /// With `capture_response`: mean residual `[(N+1) * hidden]` over the generated tokens.
    pub response_mean: Option<Vec<f32>>,
    /// Seconds spent in prefill and in decode (shared by the whole batch).
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Per op of the request's steering plan, what the kernel counted over the whole request.
    pub op_counts: Vec<OpCount>,
    /// The steering receipts: per op as asked for, the tokens it touched and how often its
    /// condition fired ([`SeqSteering::receipts`]).
    pub receipts: Vec<Receipt>,
}

impl GenOutput {
    pub fn ids(&self) -> Vec<u32> {
        self.steps.iter().map(|s| s.id).collect()
    }
    /// The ids of the answer's text: [`Self::ids`] without the end-of-sequence token that
    /// stopped generation (with `ignore_eos` every id is text).
    pub fn text_ids(&self, eos: &[u32], ignore_eos: bool) -> Vec<u32> {
        let mut ids = self.ids();
        if self.finish == Finish::Eos && !ignore_eos && ids.last().is_some_and(|l| eos.contains(l)) {
            ids.pop();
        }
        ids
    }
    /// Projection of probe `k` at the last prompt token (the paper's prompt score).
    pub fn last_prompt_projection(&self, k: usize) -> f32 {
        self.projections[k][self.prompt_ids.len() - 1]
    }
    /// Mean projection of probe `k` over the prompt positions 1..p: position 0 (BOS, or the chat
    /// template's first token) is the attention sink, whose residual — and projection — is orders
    /// of magnitude larger than any other's, so it is left out. NaN for a one-token prompt.
    pub fn prompt_mean_projection(&self, k: usize) -> f32 {
        let r = &self.projections[k][1.min(self.prompt_ids.len())..self.prompt_ids.len()];
        (r.iter().map(|&x| x as f64).sum::<f64>() / r.len() as f64) as f32
    }
    /// Mean projection of probe `k` over the generated tokens (the paper's response score).
    pub fn response_mean_projection(&self, k: usize) -> f32 {
        let r = &self.projections[k][self.prompt_ids.len()..];
        r.iter().map(|&x| x as f64).sum::<f64>() as f32 / r.len().max(1) as f32
    }
}

fn input<'a>(reqs: &'a [GenRequest], i: usize, tokens: &'a [u32], prompt: bool) -> SeqInput<'a> {
    let r = &reqs[i];
    SeqInput {
        slot: i,
        tokens,
        logits_from: None,
        prompt,
        answer_from: None,
        more_prompt: false,
        steering: r.steering.as_deref(),
        capture: if r.capture_response && !prompt { Some(Capture { from: 0 }) } else { None },
    }
}

/// Append a forward call's projections (`[tokens][probes]`) to per-probe series.
pub(crate) fn push_projections(series: &mut [Vec<f32>], flat: &[f32]) {
    let k = series.len();
    if k == 0 {
        return;
    }
    for row in flat.chunks(k) {
        for (s, &v) in series.iter_mut().zip(row) {
            s.push(v);
        }
    }
}

impl<B: Backend> Engine<B> {
    /// Generate for every request at once. `on_token(request_index, step)` is called as each
    /// token is produced (streaming).
    pub fn generate(&self, reqs: &[GenRequest], on_token: &mut dyn FnMut(usize, &GenStep)) -> Result<Vec<GenOutput>> {
        for (i, r) in reqs.iter().enumerate() {
            if r.prompt_ids.is_empty() {
                return Err(Error::Invalid(format!("request {i}: empty prompt")));
            }
            if r.max_tokens == 0 {
                return Err(Error::Invalid(format!("request {i}: max tokens must be at least 1")));
            }
            r.sampling.validate()?;
            if let Some(s) = &r.steering {
                s.validate(self.config.hidden, self.config.n_layers)?;
            }
        }
        if reqs.is_empty() {
            return Ok(vec![]);
        }
        // One extra position for the final token's projections / capture.
        let capacity = reqs.iter().map(|r| r.prompt_ids.len() + r.max_tokens + 1).max().unwrap_or(1);
        let mut cache = self.new_cache(reqs.len(), capacity)?;
        let mut rngs: Vec<Rng> = reqs.iter().map(|r| Rng::new(r.sampling.seed)).collect();
        let mut steps: Vec<Vec<GenStep>> = vec![vec![]; reqs.len()];
        let mut finish: Vec<Option<Finish>> = vec![None; reqs.len()];
        let mut series: Vec<Vec<Vec<f32>>> = reqs.iter().map(|r| vec![vec![]; r.probes()]).collect();
        let mut sums: Vec<Option<(Vec<f64>, usize)>> = vec![None; reqs.len()];
        let mut counts: Vec<Vec<OpCount>> = reqs
            .iter()
            .map(|r| vec![OpCount::default(); r.steering.as_ref().map_or(0, |s| s.plan.ops.len())])
            .collect();
        let eos = &self.config.eos_ids;
        let mut absorb = |i: usize, out: &super::ForwardOutput, k: usize, sums: &mut Vec<Option<(Vec<f64>, usize)>>| {
            push_projections(&mut series[i], &out.projections[k]);
            for (acc, &c) in counts[i].iter_mut().zip(&out.op_counts[k]) {
                *acc += c;
            }
            if let Some((s, n)) = &out.captures[k] {
                let acc = sums[i].get_or_insert_with(|| (vec![0.0; s.len()], 0));
                acc.0.iter_mut().zip(s).for_each(|(a, &b)| *a += b as f64);
                acc.1 += n;
            }
        };

        let t0 = std::time::Instant::now();
        let inputs: Vec<SeqInput> = reqs.iter().enumerate().map(|(i, r)| input(reqs, i, &r.prompt_ids, true)).collect();
        let mut out = self.forward(&mut cache, &inputs, false)?;
        for i in 0..reqs.len() {
            absorb(i, &out, i, &mut sums);
        }
        let mut active: Vec<usize> = (0..reqs.len()).collect();
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        loop {
            let mut next = Vec::with_capacity(active.len());
            for (row, &i) in active.iter().enumerate() {
                let r = &reqs[i];
                let logits = out.last(row);
                let id = sample(logits, &r.sampling, &mut rngs[i]);
                let k = r.probes();
                let proj = &out.projections[row];
                let step = GenStep {
                    id,
                    top: if r.top_logits > 0 { top_k(logits, r.top_logits) } else { vec![] },
                    projections: if k > 0 { proj[proj.len() - k..].to_vec() } else { vec![] },
                };
                on_token(i, &step);
                steps[i].push(step);
                if !r.ignore_eos && eos.contains(&id) {
                    finish[i] = Some(Finish::Eos);
                } else if steps[i].len() >= r.max_tokens {
                    finish[i] = Some(Finish::Length);
                } else if r.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                    finish[i] = Some(Finish::Stopped);
                } else {
                    next.push(i);
                }
            }
            // Finished sequences that monitor or capture need their last token's residuals too.
            let tails: Vec<usize> = active
                .iter()
                .copied()
                .filter(|&i| finish[i].is_some() && (reqs[i].probes() > 0 || reqs[i].capture_response))
                .collect();
            let feed: Vec<usize> = next.iter().copied().chain(tails.iter().copied()).collect();
            if feed.is_empty() {
                break;
            }
            let last: Vec<[u32; 1]> = feed.iter().map(|&i| [steps[i].last().map(|s| s.id).unwrap_or(0)]).collect();
            let inputs: Vec<SeqInput> = feed.iter().zip(&last).map(|(&i, tok)| input(reqs, i, tok, false)).collect();
            out = self.forward(&mut cache, &inputs, false)?;
            for (k, &i) in feed.iter().enumerate() {
                absorb(i, &out, k, &mut sums);
            }
            active = next;
            if active.is_empty() {
                break;
            }
        }
        let decode_s = t1.elapsed().as_secs_f64();
        Ok(reqs
            .iter()
            .enumerate()
            .map(|(i, r)| GenOutput {
                receipts: r.steering.as_ref().map_or(vec![], |s| s.receipts(&counts[i])),
                op_counts: std::mem::take(&mut counts[i]),
                prompt_ids: r.prompt_ids.clone(),
                steps: std::mem::take(&mut steps[i]),
                finish: finish[i].unwrap_or(Finish::Length),
                projections: std::mem::take(&mut series[i]),
                response_mean: sums[i].take().map(|(s, n)| s.iter().map(|&x| (x / n.max(1) as f64) as f32).collect()),
                prefill_s,
                decode_s,
            })
            .collect())
    }
}
