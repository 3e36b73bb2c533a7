//! Continuous batching: one thread owns the engine and a paged KV cache with `max_batch` slots
//! sharing one pool of pages. Every step it admits queued jobs into free slots while the pool has
//! room for their prompts (chunked prefill: at most `max_prefill_tokens` prompt tokens per step,
//! oldest sequences first, in the same forward calls as the other sequences' decode tokens, so a
//! burst of long prompts does not stall decoding), samples one token for every running sequence
//! whose prompt is in, and retires the finished ones, so requests join and leave the running
//! batch at every step. Each sequence carries its own steering plan and probes into the forward
//! call.
//!
//! Sequences take pages as they grow. When a step needs more pages than are free, the most
//! recently admitted sequences are preempted: their pages go back to the pool and they wait at
//! the head of the line; readmitted, they recompute their prompt and the tokens they already
//! generated, in chunks under the same per-step budget (their sampler state is kept, so the
//! stream continues as it would have: bit for bit on the CPU backend, whose results do not depend
//! on how tokens are batched; on a GPU the recomputed positions run the prefill kernels, so low
//! bits may differ, as they do with batch composition). Paused sequences see stop requests and
//! disconnects too; preemption prefers unfinished sequences over tails.
//! A job whose receiver is gone (client disconnected) is dropped before the next step and its
//! slot and pages freed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::backend::Backend;
use crate::engine::generate::push_projections;
use crate::engine::sampler::{sample, top_k, Rng, SamplingParams};
use crate::engine::{Engine, KvCache, SeqInput};
use crate::steer::{OpCount, Receipt, SeqSteering};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token (included in the tokens sent).
    Eos,
    /// `max_tokens` reached.
    Length,
    /// The HTTP side found a stop string and asked to end after a given token.
    Stop,
}

/// One sequence to generate (a request with `n` choices is `n` jobs).
pub struct Job {
    pub choice: usize,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    /// Report log-probabilities of the chosen token and of the `top_logprobs` best ones.
    pub logprobs: bool,
    pub top_logprobs: usize,
    pub steering: Option<Arc<SeqSteering>>,
    /// Set by the HTTP side: keep only the first `stop_after` tokens and finish (stop string found).
    pub stop_after: Arc<AtomicUsize>,
    pub tx: UnboundedSender<Event>,
    pub enqueued: Instant,
}

impl Job {
    fn probes(&self) -> usize {
        self.steering.as_ref().map_or(0, |s| s.probes.len())
    }

    /// The client is gone, or everything is being cancelled (then the client is told): count the
    /// job as cancelled and say so.
    fn dropped(&self, cancel: bool, metrics: &Metrics) -> bool {
        let gone = self.tx.is_closed() || cancel;
        if gone {
            if cancel {
                let _ = self.tx.send(Event::Error(self.choice, "server shutting down".into()));
            }
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        gone
    }
}

#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u32,
    /// log p(id) under the raw logits (no temperature), when asked for.
    pub logprob: Option<f32>,
    /// The best tokens with their log-probabilities, when asked for.
    pub top: Vec<(u32, f32)>,
    /// Per probe: the projection at the position that produced this token (for the first token,
    /// the last prompt token).
    pub projections: Vec<f32>,
    /// That position in the sequence (0 = the first prompt token): prompt length + index of
    /// this token − 1. The final `persona` object's series holds the same value at it.
    pub position: usize,
}

#[derive(Debug, Clone)]
pub struct DoneEvent {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Per probe: projection at every prompt token, then at every kept generated token.
    pub series: Vec<Vec<f32>>,
    /// What the kernel counted for each steering op (tokens touched, conditions fired).
    pub receipts: Vec<Receipt>,
}

#[derive(Debug, Clone)]
pub enum Event {
    Token(usize, TokenEvent),
    Done(usize, DoneEvent),
    Error(usize, String),
}

/// The bounded queue between the HTTP side and the scheduler.
pub struct Queue {
    waiting: Mutex<VecDeque<Job>>,
    cv: Condvar,
    pub max_queue: usize,
    pub shutdown: AtomicBool,
    /// Cancel everything in flight (shutdown deadline passed).
    pub cancel_all: AtomicBool,
}

impl Queue {
    pub fn new(max_queue: usize) -> Self {
        Queue {
            waiting: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            max_queue,
            shutdown: AtomicBool::new(false),
            cancel_all: AtomicBool::new(false),
        }
    }

    /// Queue all jobs of one request, or none when the queue has no room for them.
    pub fn submit(&self, jobs: Vec<Job>, metrics: &Metrics) -> bool {
        let mut q = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() + jobs.len() > self.max_queue || self.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        q.extend(jobs);
        metrics.queue_depth.store(q.len(), Ordering::Relaxed);
        drop(q);
        self.cv.notify_all();
        true
    }

    pub fn depth(&self) -> usize {
        self.waiting.lock().map(|q| q.len()).unwrap_or(0)
    }

    pub fn wake(&self) {
        self.cv.notify_all();
    }
}

struct Seq {
    job: Job,
    slot: usize,
    rng: Rng,
    /// Tokens generated (and sent) so far.
    out: Vec<u32>,
    /// Admission order (preemption takes the latest first).
    order: u64,
    series: Vec<Vec<f32>>,
    /// Per steering op, the kernel's counts over every step of this sequence (recomputed
    /// positions after a preemption count again: the kernel steered them again).
    counts: Vec<OpCount>,
    finish: Option<FinishReason>,
    /// Tokens kept when finished (≤ generated).
    kept: usize,
}

impl Seq {
    fn new(job: Job, order: u64) -> Self {
        let probes = job.probes();
        let n_ops = job.steering.as_ref().map_or(0, |s| s.plan.ops.len());
        Seq {
            rng: Rng::new(job.sampling.seed),
            job,
            slot: usize::MAX,
            out: vec![],
            order,
            series: vec![vec![]; probes],
            counts: vec![OpCount::default(); n_ops],
            finish: None,
            kept: 0,
        }
    }

    /// Positions whose projections are recorded.
    fn recorded(&self) -> usize {
        self.series.first().map_or(0, Vec::len)
    }

    /// Finished, but the last kept token's own projections are still missing.
    fn needs_tail(&self) -> bool {
        self.finish.is_some() && self.job.probes() > 0 && self.recorded() < self.job.prompt_ids.len() + self.kept
    }

    /// The HTTP side found a stop string: finish after the tokens it keeps.
    fn check_stop(&mut self) {
        let stop = self.job.stop_after.load(Ordering::SeqCst);
        if self.finish.is_none() && stop != usize::MAX {
            self.finish = Some(FinishReason::Stop);
            self.kept = stop.min(self.out.len());
        }
    }

    /// Send `Done` (a finished sequence): the kept tokens and their projection series.
    fn send_done(&mut self, metrics: &Metrics) {
        let finish = self.finish.unwrap_or(FinishReason::Length);
        let keep = self.job.prompt_ids.len() + self.kept;
        let series = std::mem::take(&mut self.series)
            .into_iter()
            .map(|mut v| {
                v.truncate(keep);
                v
            })
            .collect();
        let receipts = self.job.steering.as_ref().map_or(vec![], |s| s.receipts(&self.counts));
        let done = DoneEvent {
            finish,
            prompt_tokens: self.job.prompt_ids.len(),
            completion_tokens: self.kept,
            series,
            receipts,
        };
        let _ = self.job.tx.send(Event::Done(self.job.choice, done));
        metrics.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// Positions still to feed: the prompt, then the generated tokens (for a finished sequence
    /// the kept ones, whose projections a tail records).
    fn end(&self) -> usize {
        self.job.prompt_ids.len() + if self.finish.is_some() { self.kept } else { self.out.len() }
    }

    /// What to feed this step given `fed` cached positions, at most `chunk` tokens. A step never
    /// mixes prompt and response tokens (steering may target either). Running: the rest of the
    /// prompt, else the generated tokens not yet cached (normally the last one; after a
    /// preemption all of them, replayed in chunks). Tails (finished, projections missing): the
    /// kept tokens not yet cached. A step samples once its last chunk is in.
    fn feed(&self, fed: usize, chunk: usize) -> Feed {
        let p = self.job.prompt_ids.len();
        let end = self.end();
        if fed < p {
            let to = p.min(fed + chunk.max(1));
            let more = to < p;
            let samples = !more && self.finish.is_none() && self.out.is_empty();
            Feed { fed, to, prompt: true, more_prompt: more, samples }
        } else {
            let to = end.min(fed + chunk.max(1));
            let samples = self.finish.is_none() && to == end;
            Feed { fed, to, prompt: false, more_prompt: false, samples }
        }
    }

    /// The tokens of a feed: positions `fed..to` of prompt + generated tokens.
    fn tokens(&self, f: &Feed) -> &[u32] {
        let p = &self.job.prompt_ids;
        let from = f.fed.min(f.to);
        if f.prompt {
            &p[from..f.to]
        } else {
            &self.out[from - p.len()..f.to - p.len()]
        }
    }
}

/// One sequence's part of a step.
struct Feed {
    /// Positions already cached; the step feeds positions `fed..to`.
    fed: usize,
    to: usize,
    /// Prompt tokens (else response tokens).
    prompt: bool,
    /// A prompt chunk with more of the prompt to come.
    more_prompt: bool,
    /// The step samples a new token from the last one's logits.
    samples: bool,
}

/// log-softmax of one logit given the row's max and log-sum-exp.
fn log_softmax_parts(logits: &[f32]) -> (f32, f64) {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
    (m, s.ln())
}

/// Slots not in use, and the KV pages behind them.
struct Slots {
    free: Vec<usize>,
}

impl Slots {
    /// A free slot: empty, since every slot is reset when released.
    fn take(&mut self) -> Option<usize> {
        self.free.pop()
    }
    /// Give a slot back; its pages return to the pool at once.
    fn release<B: Backend>(&mut self, cache: &mut KvCache<B>, slot: usize, metrics: &Metrics) {
        cache.reset(slot);
        self.free.push(slot);
        metrics.kv_pages_used.store(cache.total_pages() - cache.free_pages(), Ordering::Relaxed);
    }
}

/// Run until `queue.shutdown` is set and nothing is left to do.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    cache: &mut KvCache<B>,
    queue: &Queue,
    metrics: &Metrics,
    max_prefill_tokens: usize,
    step_delay: Option<Duration>,
) {
    let eos = engine.config.eos_ids.clone();
    let mut slots = Slots { free: (0..cache.slots()).rev().collect() };
    let mut running: Vec<Seq> = Vec::new();
    // Preempted sequences, readmitted before any queued job (oldest first).
    let mut paused: VecDeque<Seq> = VecDeque::new();
    let mut admitted = 0u64;
    metrics.kv_pages_total.store(cache.total_pages(), Ordering::Relaxed);
    loop {
        // Admission: paused sequences first, then the queue, in order, while a slot is free and
        // the pool keeps one page per running sequence for growth beyond what the step needs.
        {
            let mut q = queue.waiting.lock().unwrap_or_else(|e| e.into_inner());
            while running.is_empty() && paused.is_empty() && q.is_empty() {
                if queue.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                q = queue.cv.wait_timeout(q, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
            }
            let mut spare =
                cache.free_pages().saturating_sub(step_pages(&running, cache, max_prefill_tokens) + running.len());
            loop {
                let from_paused = !paused.is_empty();
                let next = if from_paused { paused.front().map(|s| &s.job) } else { q.front() };
                let Some(job) = next else { break };
                if job.tx.is_closed() || job.prompt_ids.is_empty() {
                    let job = if from_paused {
                        paused.pop_front().expect("front checked").job
                    } else {
                        q.pop_front().expect("front checked")
                    };
                    if job.prompt_ids.is_empty() {
                        let _ = job.tx.send(Event::Error(job.choice, "the prompt is empty".into()));
                    }
                    metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let need = cache.pages_for(job.prompt_ids.len().min(max_prefill_tokens));
                if slots.free.is_empty() || (need > spare && !running.is_empty()) {
                    break;
                }
                let mut seq = if from_paused {
                    paused.pop_front().expect("front checked")
                } else {
                    admitted += 1;
                    Seq::new(q.pop_front().expect("front checked"), admitted)
                };
                seq.slot = slots.take().expect("checked non-empty");
                spare = spare.saturating_sub(need + 1);
                running.push(seq);
            }
            metrics.queue_depth.store(q.len() + paused.len(), Ordering::Relaxed);
        }
        // Disconnected clients and cancellation free their slots at once; stop requests finish
        // (paused sequences too: one that needs no tail ends without being readmitted).
        let cancel = queue.cancel_all.load(Ordering::SeqCst);
        paused.retain_mut(|s| {
            if s.job.dropped(cancel, metrics) {
                return false;
            }
            s.check_stop();
            if s.finish.is_some() && !s.needs_tail() {
                s.send_done(metrics);
                return false;
            }
            true
        });
        running.retain(|s| {
            let gone = s.job.dropped(cancel, metrics);
            if gone {
                slots.release(cache, s.slot, metrics);
            }
            !gone
        });
        running.iter_mut().for_each(Seq::check_stop);
        retire(&mut running, &mut slots, cache, metrics);
        // Not enough pages for this step: preempt the latest admitted unfinished sequence (tails
        // need one page at most) until it fits. One sequence alone always fits (the HTTP side
        // keeps prompt + max_tokens within a context, and the pool holds at least one context).
        while step_pages(&running, cache, max_prefill_tokens) > cache.free_pages() && running.len() > 1 {
            let victim =
                (0..running.len()).max_by_key(|&i| (running[i].finish.is_none(), running[i].order)).expect("non-empty");
            let s = running.swap_remove(victim);
            slots.release(cache, s.slot, metrics);
            metrics.preempted.fetch_add(1, Ordering::Relaxed);
            let at = paused.iter().position(|p| p.order > s.order).unwrap_or(paused.len());
            paused.insert(at, s);
        }
        metrics.batch_size.store(running.len(), Ordering::Relaxed);
        if running.is_empty() {
            continue;
        }
        // One forward call for every running sequence that has tokens this step: prompt chunks,
        // decode tokens, replays and tails.
        let feeds = plan_feeds(&running, cache, max_prefill_tokens);
        let active: Vec<usize> = (0..running.len()).filter(|&i| feeds[i].is_some()).collect();
        let inputs: Vec<SeqInput> = active
            .iter()
            .map(|&i| {
                let (s, f) = (&running[i], feeds[i].as_ref().expect("active"));
                SeqInput {
                    slot: s.slot,
                    tokens: s.tokens(f),
                    logits_from: None,
                    prompt: f.prompt,
                    answer_from: None,
                    more_prompt: f.more_prompt,
                    steering: s.job.steering.as_deref(),
                    capture: None,
                }
            })
            .collect();
        let t0 = Instant::now();
        // A panic inside the engine fails this step's requests instead of hanging every client.
        let fwd = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.forward(cache, &inputs, false)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                Err(crate::Error::Invalid(format!("internal error in the forward pass: {msg}")))
            });
        drop(inputs);
        let out = match fwd {
            Ok(o) => o,
            Err(crate::Error::NonFinite { slot, msg }) => {
                // Only that sequence fails (a steering coefficient can overflow one request);
                // the others' caches are back before this step, so they are fed again.
                // (Should no running sequence own that slot, all fail: never retry forever.)
                let known = running.iter().any(|s| s.slot == slot);
                running.retain(|s| {
                    if known && s.slot != slot {
                        return true;
                    }
                    let _ = s.job.tx.send(Event::Error(s.job.choice, format!("non-finite values: {msg}")));
                    slots.release(cache, s.slot, metrics);
                    false
                });
                metrics.engine_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) => {
                for s in running.drain(..) {
                    let _ = s.job.tx.send(Event::Error(s.job.choice, e.to_string()));
                    slots.release(cache, s.slot, metrics);
                }
                metrics.engine_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        for (k, &i) in active.iter().enumerate() {
            let (s, f) = (&mut running[i], feeds[i].as_ref().expect("active"));
            // Projections of positions already recorded (a replay after preemption) are not
            // recorded twice.
            let np = s.job.probes();
            let skip = s.recorded().saturating_sub(f.fed) * np;
            push_projections(&mut s.series, out.projections[k].get(skip..).unwrap_or(&[]));
            for (acc, &c) in s.counts.iter_mut().zip(&out.op_counts[k]) {
                *acc += c;
            }
            if !f.samples {
                continue;
            }
            let logits = out.last(k);
            let id = sample(logits, &s.job.sampling, &mut s.rng);
            let (logprob, top) = if s.job.logprobs {
                let (m, lse) = log_softmax_parts(logits);
                let lp = |l: f32| ((l - m) as f64 - lse) as f32;
                let top = if s.job.top_logprobs > 0 {
                    top_k(logits, s.job.top_logprobs).into_iter().map(|(i, l)| (i, lp(l))).collect()
                } else {
                    vec![]
                };
                (Some(lp(logits[id as usize])), top)
            } else {
                (None, vec![])
            };
            let proj = &out.projections[k];
            let projections = if np > 0 { proj[proj.len() - np..].to_vec() } else { vec![] };
            if s.out.is_empty() {
                metrics.observe_ttft(s.job.enqueued.elapsed().as_secs_f64());
            }
            let position = s.job.prompt_ids.len() + s.out.len() - 1;
            s.out.push(id);
            // Counted before the client can see the token (a reply read right after must find it).
            metrics.tokens.fetch_add(1, Ordering::Relaxed);
            let _ = s.job.tx.send(Event::Token(s.job.choice, TokenEvent { id, logprob, top, projections, position }));
            if !s.job.ignore_eos && eos.contains(&id) {
                s.finish = Some(FinishReason::Eos);
                s.kept = s.out.len();
            } else if s.out.len() >= s.job.max_tokens {
                s.finish = Some(FinishReason::Length);
                s.kept = s.out.len();
            }
        }
        metrics.add_decode_time(t0.elapsed().as_secs_f64());
        retire(&mut running, &mut slots, cache, metrics);
        metrics.kv_pages_used.store(cache.total_pages() - cache.free_pages(), Ordering::Relaxed);
        metrics.batch_size.store(running.len(), Ordering::Relaxed);
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
    }
}

/// Each running sequence's tokens for this step: prompt tokens and replayed response tokens
/// (after a preemption) share a budget of `max_prefill_tokens`, oldest sequence first (it always
/// gets some, so every sequence advances); one left without budget sits this step out (`None`).
/// A single decode or tail token is not limited.
fn plan_feeds<B: Backend>(running: &[Seq], cache: &KvCache<B>, max_prefill_tokens: usize) -> Vec<Option<Feed>> {
    let mut order: Vec<usize> = (0..running.len()).collect();
    order.sort_by_key(|&i| running[i].order);
    let mut budget = max_prefill_tokens.max(1);
    let mut feeds: Vec<Option<Feed>> = (0..running.len()).map(|_| None).collect();
    for i in order {
        let s = &running[i];
        let fed = cache.len(s.slot);
        if fed < s.job.prompt_ids.len() || s.end() > fed + 1 {
            if budget == 0 {
                continue;
            }
            let f = s.feed(fed, budget);
            budget = budget.saturating_sub(f.to - f.fed);
            feeds[i] = Some(f);
        } else {
            feeds[i] = Some(s.feed(fed, 1));
        }
    }
    feeds
}

/// Pages the running sequences need beyond those they hold, to take this step's tokens.
fn step_pages<B: Backend>(running: &[Seq], cache: &KvCache<B>, max_prefill_tokens: usize) -> usize {
    plan_feeds(running, cache, max_prefill_tokens)
        .iter()
        .zip(running)
        .filter_map(|(f, s)| f.as_ref().map(|f| cache.pages_missing(s.slot, f.to)))
        .sum()
}

/// Send `Done` for finished sequences that need no tail, and free their slots and pages.
fn retire<B: Backend>(running: &mut Vec<Seq>, slots: &mut Slots, cache: &mut KvCache<B>, metrics: &Metrics) {
    running.retain_mut(|s| {
        if s.finish.is_none() || s.needs_tail() {
            return true;
        }
        // Pages first: a client that sees its stream end sees its pages free.
        slots.release(cache, s.slot, metrics);
        s.send_done(metrics);
        false
    });
}
