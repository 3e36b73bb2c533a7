//! Batched generation: every request gets a KV-cache slot; prompts are prefilled together in one
//! ragged forward call, then all unfinished sequences decode together, one token per step.

use super::sampler::{sample, top_k, Rng, SamplingParams};
use super::{Engine, SeqInput};
use crate::backend::Backend;
use crate::error::{Error, Result};

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
}

impl GenRequest {
    pub fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        GenRequest { prompt_ids, max_tokens, sampling: SamplingParams::greedy(), ignore_eos: false, top_logits: 0 }
    }
}

/// One generated token, with the highest logits that produced it when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenStep {
    pub id: u32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Produced an end-of-sequence token (included in `ids`).
    Eos,
    /// Reached `max_tokens`.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenOutput {
    pub prompt_ids: Vec<u32>,
    pub steps: Vec<GenStep>,
    pub finish: Finish,
    /// Seconds spent in prefill and in decode (shared by the whole batch).
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl GenOutput {
    pub fn ids(&self) -> Vec<u32> {
        self.steps.iter().map(|s| s.id).collect()
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
        }
        if reqs.is_empty() {
            return Ok(vec![]);
        }
        let capacity = reqs.iter().map(|r| r.prompt_ids.len() + r.max_tokens).max().unwrap_or(1);
        let mut cache = self.new_cache(reqs.len(), capacity)?;
        let mut rngs: Vec<Rng> = reqs.iter().map(|r| Rng::new(r.sampling.seed)).collect();
        let mut steps: Vec<Vec<GenStep>> = vec![vec![]; reqs.len()];
        let mut finish: Vec<Option<Finish>> = vec![None; reqs.len()];
        let eos = &self.config.eos_ids;

        let t0 = std::time::Instant::now();
        let inputs: Vec<SeqInput> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| SeqInput { slot: i, tokens: &r.prompt_ids, all_logits: false })
            .collect();
        let mut out = self.forward(&mut cache, &inputs, false)?;
        let mut active: Vec<usize> = (0..reqs.len()).collect();
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        loop {
            let mut next = Vec::with_capacity(active.len());
            for (row, &i) in active.iter().enumerate() {
                let r = &reqs[i];
                let logits = out.last(row);
                let id = sample(logits, &r.sampling, &mut rngs[i]);
                let step = GenStep { id, top: if r.top_logits > 0 { top_k(logits, r.top_logits) } else { vec![] } };
                on_token(i, &step);
                steps[i].push(step);
                if !r.ignore_eos && eos.contains(&id) {
                    finish[i] = Some(Finish::Eos);
                } else if steps[i].len() >= r.max_tokens {
                    finish[i] = Some(Finish::Length);
                } else {
                    next.push(i);
                }
            }
            active = next;
            if active.is_empty() {
                break;
            }
            let last: Vec<[u32; 1]> = active.iter().map(|&i| [steps[i].last().map(|s| s.id).unwrap_or(0)]).collect();
            let inputs: Vec<SeqInput> = active
                .iter()
                .zip(&last)
                .map(|(&i, tok)| SeqInput { slot: i, tokens: tok, all_logits: false })
                .collect();
            out = self.forward(&mut cache, &inputs, false)?;
        }
        let decode_s = t1.elapsed().as_secs_f64();
        Ok(reqs
            .iter()
            .zip(steps)
            .zip(finish)
            .map(|((r, steps), f)| GenOutput {
                prompt_ids: r.prompt_ids.clone(),
                steps,
                finish: f.unwrap_or(Finish::Length),
                prefill_s,
                decode_s,
            })
            .collect())
    }
}
