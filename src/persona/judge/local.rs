//! [`LocalJudge`]: a model loaded in this engine as the judge (`--judge self`). It sees the whole
//! next-token distribution, so every vocabulary token that is an integer 0..=100 counts; models
//! whose tokenizer splits numbers into digits are read digit by digit ([`NumberReading::Digits`])
//! with a few more forward passes over the KV cache.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{aggregate_values, decimal_digit, int_0_100, Judge, JudgeScore};
use crate::backend::Backend;
use crate::engine::{ForwardOutput, KvCache, SeqInput};
use crate::model::Message;
use crate::{Error, LoadedModel, Result};

/// How a [`LocalJudge`] reads the number its model would answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumberReading {
    /// The paper's reading: the first answer token alone; every token that is an integer 0..=100
    /// counts. Right for vocabularies with a token for every number 0..=100 (Llama 3, OpenAI's).
    FirstToken,
    /// Digit by digit, for tokenizers that split numbers into digits (SmolLM2, Qwen2, Llama 2,
    /// Mistral, Gemma), where the first token alone can only say 0..=9: P(n) = P(the answer
    /// starts with the digits of n, then a token that does not start with a digit), n in 0..=100
    /// ("0" followed by more digits, and numbers over 100, count for nothing). Each prefix is
    /// followed by one more forward pass over the KV cache while its probability for some prompt
    /// of the batch is at least [`DIGIT_EPS`]; a rarer prefix is taken to end where it is.
    Digits,
}

/// Below this probability a digit prefix is not followed further (see [`NumberReading::Digits`]).
pub const DIGIT_EPS: f64 = 1e-3;

/// Token ids for reading digit by digit.
struct DigitTokens {
    /// The token whose text is exactly the digit d.
    plain: [u32; 10],
    /// `(id, d)`: tokens that are one digit, maybe with whitespace around it (" 5").
    first: Vec<(u32, u8)>,
    /// Tokens whose text starts with a decimal digit: after a digit they continue the number.
    extend: Vec<u32>,
}

/// A judge that is a model loaded in this engine (`--judge self`). Each prompt is rendered as one
/// user message with the generation prompt; one forward pass over a batch of prompts gives the
/// next-token distribution (softmax of the last logits, in f64), and every vocabulary token whose
/// text is an integer 0..=100 (found once, by decoding each id) counts, not only the top 20.
/// Vocabularies that lack a token for some number in 0..=100 are read digit by digit
/// ([`NumberReading::Digits`], a few more forward passes); [`LocalJudge::with_reading`] chooses.
///
/// `M` is how the judge holds the model: `&LoadedModel<B>` or `Arc<LoadedModel<B>>` (the default).
///
/// ```no_run
/// use persona::{LoadedModel, backend::cpu::CpuBackend, persona::judge::{Judge, LocalJudge}};
/// let model = LoadedModel::load(std::path::Path::new("model.gguf"), CpuBackend, 2048)?;
/// let judge = LocalJudge::new(&model)?;
/// let scores = judge.score(&["How much is this answer about cats, 0-100? Answer: I love cats".into()]);
/// # Ok::<(), persona::Error>(())
/// ```
pub struct LocalJudge<B: Backend, M: Deref<Target = LoadedModel<B>> = Arc<LoadedModel<B>>> {
    model: M,
    numbers: Vec<(u32, u8)>,
    digits: Option<DigitTokens>,
    reading: NumberReading,
    digit_eps: f64,
    batch: usize,
    _backend: PhantomData<fn() -> B>,
}

impl<B: Backend, M: Deref<Target = LoadedModel<B>>> LocalJudge<B, M> {
    /// Finds the integer and digit tokens of the model's vocabulary and picks the reading.
    /// Errors when the model has no tokenizer or chat template, or no token is an integer 0..=100.
    pub fn new(model: M) -> Result<Self> {
        let tok = model
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::Tokenizer(format!("{}: a judge model needs a tokenizer", model.path.display())))?;
        if model.chat_template.is_none() {
            return Err(Error::Template(format!("{}: a judge model needs a chat template", model.path.display())));
        }
        let vocab = model.engine.config.vocab.min(tok.get_vocab_size(true)) as u32;
        let (mut numbers, mut first, mut extend, mut plain) = (vec![], vec![], vec![], [None; 10]);
        for id in 0..vocab {
            let Ok(text) = tok.decode(&[id], false) else { continue };
            if let Some(k) = int_0_100(&text) {
                numbers.push((id, k));
                if text.trim().chars().count() == 1 {
                    first.push((id, k));
                }
            }
            if text.chars().next().and_then(decimal_digit).is_some() {
                extend.push(id);
            }
            if let [c @ b'0'..=b'9'] = text.as_bytes() {
                plain[(c - b'0') as usize].get_or_insert(id);
            }
        }
        if numbers.is_empty() {
            return Err(Error::Unsupported(format!(
                "{}: no token of the vocabulary is an integer 0..100; this model cannot judge",
                model.path.display()
            )));
        }
        let digits = plain.iter().copied().collect::<Option<Vec<u32>>>().map(|p| DigitTokens {
            plain: p.try_into().expect("ten digits"),
            first,
            extend,
        });
        let mut covered = [false; 101];
        numbers.iter().for_each(|&(_, k)| covered[k as usize] = true);
        let reading = if covered.iter().all(|&c| c) || digits.is_none() {
            NumberReading::FirstToken
        } else {
            NumberReading::Digits
        };
        Ok(LocalJudge { model, numbers, digits, reading, digit_eps: DIGIT_EPS, batch: 8, _backend: PhantomData })
    }

    /// Prompts per forward call (default 8).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Read numbers this way; `Digits` needs a token for each digit 0..9.
    pub fn with_reading(mut self, reading: NumberReading) -> Result<Self> {
        if reading == NumberReading::Digits && self.digits.is_none() {
            return Err(Error::Unsupported(format!(
                "{}: the vocabulary has no token for each digit 0..9; cannot read digit by digit",
                self.model.path.display()
            )));
        }
        self.reading = reading;
        Ok(self)
    }

    /// Follow digit prefixes down to this probability (default [`DIGIT_EPS`]; smaller is more
    /// exact and takes more forward passes).
    pub fn with_digit_eps(mut self, eps: f64) -> Self {
        self.digit_eps = eps.clamp(0.0, 1.0);
        self
    }

    pub fn reading(&self) -> NumberReading {
        self.reading
    }

    /// `(token id, integer)` for every vocabulary token that is an integer 0..=100.
    pub fn number_tokens(&self) -> &[(u32, u8)] {
        &self.numbers
    }

    /// The integers 0..=100 that some single token stands for, ascending (0..=9 only for
    /// tokenizers that split numbers into digits).
    pub fn covered_values(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self.numbers.iter().map(|&(_, k)| k).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The paper's aggregation of one row of logits (the first-token reading).
    pub fn score_logits(&self, logits: &[f32]) -> JudgeScore {
        let p = softmax(logits);
        aggregate_values(self.numbers.iter().map(|&(id, k)| (k, p[id as usize])))
    }

    /// Tokens a prompt may have: the context, less room for the digits read after it.
    fn max_prompt(&self) -> usize {
        let room = if self.reading == NumberReading::Digits { 3 } else { 0 };
        self.model.engine.max_context.saturating_sub(room)
    }

    /// P(the answer is the number n), n = 0..=100, for prompts already tokenized, in one batch.
    fn probs_ids(&self, ids: &[&[u32]]) -> Result<Vec<[f64; 101]>> {
        let e = &self.model.engine;
        let room = self.model.engine.max_context - self.max_prompt();
        let mut cache = e.new_cache(ids.len(), ids.iter().map(|x| x.len()).max().unwrap_or(1) + room)?;
        let seqs: Vec<SeqInput> = ids.iter().enumerate().map(|(i, t)| SeqInput::new(i, t)).collect();
        let out = e.forward(&mut cache, &seqs, false)?;
        match (&self.digits, self.reading) {
            (Some(dt), NumberReading::Digits) => self.read_digits(dt, &mut cache, ids, &out),
            _ => Ok((0..ids.len())
                .map(|i| {
                    let p = softmax(out.last(i));
                    let mut pn = [0.0; 101];
                    self.numbers.iter().for_each(|&(id, k)| pn[k as usize] += p[id as usize]);
                    pn
                })
                .collect()),
        }
    }

    /// P(the answer is the number n) for n = 0..=100 (101 values), per prompt: the distribution
    /// a score is the mean of. Prompts are rendered as in [`Judge::score`].
    pub fn number_probs(&self, prompts: &[String]) -> Vec<Result<Vec<f64>>> {
        let m = &self.model;
        let mut out: Vec<Option<Result<Vec<f64>>>> = (0..prompts.len()).map(|_| None).collect();
        let mut ready: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            match m.chat_prompt_ids(&[Message::user(p.as_str())]) {
                Ok(ids) if ids.len() > self.max_prompt() => {
                    out[i] = Some(Err(Error::Invalid(format!(
                        "judge prompt {i} is {} tokens; the judge's context allows {}",
                        ids.len(),
                        self.max_prompt()
                    ))))
                }
                Ok(ids) => ready.push((i, ids)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        for chunk in ready.chunks(self.batch) {
            let ids: Vec<&[u32]> = chunk.iter().map(|(_, x)| x.as_slice()).collect();
            match self.probs_ids(&ids) {
                Ok(p) => chunk.iter().zip(p).for_each(|((i, _), p)| out[*i] = Some(Ok(p.to_vec()))),
                // A failed batch: score its prompts one by one so each gets its own error.
                Err(_) => chunk.iter().for_each(|(i, x)| out[*i] = Some(self.probs_ids(&[x]).map(|p| p[0].to_vec()))),
            }
        }
        out.into_iter().map(|r| r.expect("every prompt is scored")).collect()
    }

    /// [`NumberReading::Digits`] for a batch whose prompts are in the cache (slot i = prompt i).
    fn read_digits(
        &self,
        dt: &DigitTokens,
        cache: &mut KvCache<B>,
        ids: &[&[u32]],
        prompt_out: &ForwardOutput,
    ) -> Result<Vec<[f64; 101]>> {
        let e = &self.model.engine;
        let k = ids.len();
        // Per prompt, after the digits `prefix`: (P(the number ends), P(next token is digit d)).
        let mut follow = |prefix: &[usize]| -> Result<Vec<(f64, [f64; 10])>> {
            let toks: Vec<u32> = prefix.iter().map(|&d| dt.plain[d]).collect();
            let seqs: Vec<SeqInput> = (0..k).map(|i| SeqInput::new(i, &toks)).collect();
            let out = e.forward(cache, &seqs, false)?;
            ids.iter().enumerate().for_each(|(i, x)| cache.truncate(i, x.len()));
            Ok((0..k)
                .map(|i| {
                    let p = softmax(out.last(i));
                    let more: f64 = dt.extend.iter().map(|&id| p[id as usize]).sum();
                    ((1.0 - more).max(0.0), dt.plain.map(|id| p[id as usize]))
                })
                .collect())
        };
        let first: Vec<[f64; 10]> = (0..k)
            .map(|i| {
                let p = softmax(prompt_out.last(i));
                let mut f = [0.0; 10];
                dt.first.iter().for_each(|&(id, d)| f[d as usize] += p[id as usize]);
                f
            })
            .collect();
        // Prefixes `s` with P_i(s) per prompt. Where P_i(s) >= eps the prefix is followed:
        // P_i(n = s) += P_i(s)·P_i(end | s), and each child s+e gets P_i(s)·P_i(e | s). Below eps
        // the number is taken to end at s, with no children. Decided per prompt, so a prompt's
        // score does not depend on the others in its batch.
        let mut pn = vec![[0.0f64; 101]; k];
        let mut todo: Vec<(Vec<usize>, Vec<f64>)> =
            (0..10).rev().map(|d| (vec![d], first.iter().map(|f| f[d]).collect())).collect();
        while let Some((s, p)) = todo.pop() {
            let value = s.iter().fold(0, |v, &d| 10 * v + d);
            // "0" is a number but "0…" is not read as one; children are at most 100.
            let children = if s[0] == 0 { 0..0 } else { 0..(101usize.saturating_sub(10 * value)).min(10) };
            let big: Vec<bool> = p.iter().map(|&x| x >= self.digit_eps).collect();
            if !big.contains(&true) {
                (0..k).for_each(|i| pn[i][value] += p[i]);
                continue;
            }
            let f = follow(&s)?;
            for i in 0..k {
                pn[i][value] += if big[i] { p[i] * f[i].0 } else { p[i] };
            }
            for e2 in children.rev() {
                let pc = (0..k).map(|i| if big[i] { p[i] * f[i].1[e2] } else { 0.0 }).collect();
                todo.push(([s.as_slice(), &[e2]].concat(), pc));
            }
        }
        Ok(pn)
    }
}

/// Softmax of a logits row, in f64.
fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    p
}

impl<B: Backend, M: Deref<Target = LoadedModel<B>> + Send + Sync> Judge for LocalJudge<B, M> {
    fn score(&self, prompts: &[String]) -> Vec<Result<JudgeScore>> {
        let probs = self.number_probs(prompts).into_iter();
        probs.map(|r| r.map(|p| aggregate_values(p.iter().enumerate().map(|(n, &x)| (n as u8, x))))).collect()
    }

    fn describe(&self) -> String {
        let how = match self.reading {
            NumberReading::FirstToken => "first token",
            NumberReading::Digits => "digit by digit",
        };
        format!("self ({}, {how})", self.model.path.display())
    }
}
