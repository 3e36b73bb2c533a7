//! Continuous batching: one thread owns the engine and a slot-based KV cache with `max_batch`
//! slots. Every step it admits queued jobs into free slots (their whole prompt is prefilled in
//! that step's forward call, beside the other sequences' decode tokens), samples one token for
//! every running sequence, and retires the finished ones, so requests join and leave the running
//! batch at every step. Each sequence carries its own steering plan and probes into the forward
//! call. A job whose receiver is gone (client disconnected) is dropped before the next step and
//! its slot freed.

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
use crate::steer::SeqSteering;

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
}

#[derive(Debug, Clone)]
pub struct DoneEvent {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Per probe: projection at every prompt token, then at every kept generated token.
    pub series: Vec<Vec<f32>>,
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
    generated: usize,
    last: u32,
    prefilled: bool,
    series: Vec<Vec<f32>>,
    finish: Option<FinishReason>,
    /// Tokens kept when finished (≤ generated).
    kept: usize,
}

impl Seq {
    /// Finished, but the last kept token's own projections are still missing.
    fn needs_tail(&self) -> bool {
        self.finish.is_some() && self.job.probes() > 0 && self.series[0].len() < self.job.prompt_ids.len() + self.kept
    }
}

/// log-softmax of one logit given the row's max and log-sum-exp.
fn log_softmax_parts(logits: &[f32]) -> (f32, f64) {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
    (m, s.ln())
}

/// Run until `queue.shutdown` is set and nothing is left to do.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    cache: &mut KvCache<B>,
    queue: &Queue,
    metrics: &Metrics,
    step_delay: Option<Duration>,
) {
    let eos = engine.config.eos_ids.clone();
    let mut free: Vec<usize> = (0..cache.slots()).rev().collect();
    let mut running: Vec<Seq> = Vec::new();
    loop {
        // Admission.
        {
            let mut q = queue.waiting.lock().unwrap_or_else(|e| e.into_inner());
            while running.is_empty() && q.is_empty() {
                if queue.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                q = queue.cv.wait_timeout(q, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
            }
            while !free.is_empty() {
                let Some(job) = q.pop_front() else { break };
                if job.tx.is_closed() {
                    metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let slot = free.pop().expect("checked non-empty");
                cache.reset(slot);
                let probes = job.probes();
                running.push(Seq {
                    rng: Rng::new(job.sampling.seed),
                    job,
                    slot,
                    generated: 0,
                    last: 0,
                    prefilled: false,
                    series: vec![vec![]; probes],
                    finish: None,
                    kept: 0,
                });
            }
            metrics.queue_depth.store(q.len(), Ordering::Relaxed);
        }
        // Disconnected clients and cancellation free their slots at once; stop requests finish.
        let cancel = queue.cancel_all.load(Ordering::SeqCst);
        running.retain(|s| {
            let gone = s.job.tx.is_closed() || cancel;
            if gone {
                if cancel {
                    let _ = s.job.tx.send(Event::Error(s.job.choice, "server shutting down".into()));
                }
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                free.push(s.slot);
            }
            !gone
        });
        for s in running.iter_mut() {
            let stop = s.job.stop_after.load(Ordering::SeqCst);
            if s.finish.is_none() && stop != usize::MAX {
                s.finish = Some(FinishReason::Stop);
                s.kept = stop.min(s.generated);
            }
        }
        retire(&mut running, &mut free, metrics);
        metrics.batch_size.store(running.len(), Ordering::Relaxed);
        if running.is_empty() {
            continue;
        }
        // One forward call for every running sequence: prompts, decode tokens and tails.
        let toks: Vec<Vec<u32>> =
            running.iter().map(|s| if s.prefilled { vec![s.last] } else { s.job.prompt_ids.clone() }).collect();
        let inputs: Vec<SeqInput> = running
            .iter()
            .zip(&toks)
            .map(|(s, t)| SeqInput {
                slot: s.slot,
                tokens: t,
                logits_from: None,
                prompt: !s.prefilled,
                steering: s.job.steering.as_deref(),
                capture: None,
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
        let out = match fwd {
            Ok(o) => o,
            Err(e) => {
                for s in running.drain(..) {
                    let _ = s.job.tx.send(Event::Error(s.job.choice, e.to_string()));
                    free.push(s.slot);
                }
                metrics.engine_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        let mut new_tokens = 0;
        for (k, s) in running.iter_mut().enumerate() {
            push_projections(&mut s.series, &out.projections[k]);
            s.prefilled = true;
            if s.finish.is_some() {
                continue; // a tail: only its projections were wanted
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
            let np = s.job.probes();
            let proj = &out.projections[k];
            let projections = if np > 0 { proj[proj.len() - np..].to_vec() } else { vec![] };
            if s.generated == 0 {
                metrics.observe_ttft(s.job.enqueued.elapsed().as_secs_f64());
            }
            s.generated += 1;
            s.last = id;
            new_tokens += 1;
            let _ = s.job.tx.send(Event::Token(s.job.choice, TokenEvent { id, logprob, top, projections }));
            if !s.job.ignore_eos && eos.contains(&id) {
                s.finish = Some(FinishReason::Eos);
                s.kept = s.generated;
            } else if s.generated >= s.job.max_tokens {
                s.finish = Some(FinishReason::Length);
                s.kept = s.generated;
            }
        }
        metrics.tokens.fetch_add(new_tokens, Ordering::Relaxed);
        metrics.add_decode_time(t0.elapsed().as_secs_f64());
        retire(&mut running, &mut free, metrics);
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
    }
}

/// Send `Done` for finished sequences that need no tail, and free their slots.
fn retire(running: &mut Vec<Seq>, free: &mut Vec<usize>, metrics: &Metrics) {
    running.retain_mut(|s| {
        let Some(finish) = s.finish else { return true };
        if s.needs_tail() {
            return true;
        }
        let keep = s.job.prompt_ids.len() + s.kept;
        let series = std::mem::take(&mut s.series)
            .into_iter()
            .map(|mut v| {
                v.truncate(keep);
                v
            })
            .collect();
        let done = DoneEvent { finish, prompt_tokens: s.job.prompt_ids.len(), completion_tokens: s.kept, series };
        let _ = s.job.tx.send(Event::Done(s.job.choice, done));
        metrics.completed.fetch_add(1, Ordering::Relaxed);
        free.push(s.slot);
        false
    });
}
