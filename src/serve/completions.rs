//! `POST /v1/chat/completions` and `POST /v1/completions`: request parsing, queueing jobs for the
//! scheduler, and turning its token events into one JSON reply or an SSE stream (stop strings,
//! logprobs, `n` choices, the `persona` projections object, flagging).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use super::api::{check_keys, check_model, check_prompt_bytes, field, parse_body, ApiError, ApiResult, Common};
use super::registry::{self, MonitorInfo, Resolved};
use super::scheduler::{DoneEvent, Event, FinishReason, Job, TokenEvent};
use super::{body_bytes, into_response, now_s, AppState, S};
use crate::engine::loaded::TextStream;
use crate::engine::sampler::SamplingParams;
use crate::model::Message;

/// The request's `steering` / `monitor`, or the server default's for a key the request omits.
fn resolve_ext(st: &AppState, m: &Map<String, Value>) -> ApiResult<Resolved> {
    let d = st.default.read().map(|d| d.clone()).unwrap_or_default();
    super::policy::check_steering_override(&st.cfg, m, &d)?;
    let pick = |k: &str| if m.contains_key(k) { field(m, k).cloned() } else { field(&d, k).cloned() };
    registry::resolve(pick("steering").as_ref(), pick("monitor").as_ref(), &st.registry, &st.model)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// A chat request's `messages` (public for the `request_body` fuzz target).
pub fn parse_messages(v: Option<&Value>) -> ApiResult<Vec<Message>> {
    let a = match v {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::param("messages", "`messages` is empty")),
        _ => return Err(ApiError::param("messages", "`messages` must be a non-empty list of messages")),
    };
    let mut out = Vec::with_capacity(a.len());
    for (i, m) in a.iter().enumerate() {
        let p = format!("messages[{i}]");
        let o = m.as_object().ok_or_else(|| ApiError::param(&p, "each message must be an object"))?;
        let role = o.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::param(&p, "missing `role`"))?;
        if !matches!(role, "system" | "user" | "assistant") {
            let shown: String = role.chars().take(100).collect();
            return Err(ApiError::param(
                &format!("{p}.role"),
                format!("{p}: unsupported role `{shown}` (persona takes system, user and assistant messages)"),
            ));
        }
        let content = match o.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => return Err(ApiError::param(&p, "only text content parts are supported")),
                    }
                }
                s
            }
            Some(_) => return Err(ApiError::param(&p, "`content` must be a string or a list of text parts")),
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

fn tokenizer(st: &AppState) -> ApiResult<&Tokenizer> {
    st.tokenizer
        .as_ref()
        .ok_or_else(|| ApiError::bad(None, "this model has no tokenizer: send token ids to /v1/completions"))
}

pub(super) async fn chat(State(st): State<S>, body: Result<Bytes, BytesRejection>) -> Response {
    let prep = (|| -> ApiResult<(Vec<u32>, Common, Resolved)> {
        let m = parse_body(&body_bytes(body)?)?;
        check_keys(&m, true)?;
        check_model(&m, &st.cfg.model_id)?;
        let common = Common::parse(&m, true)?;
        let msgs = parse_messages(field(&m, "messages"))?;
        check_prompt_bytes(msgs.iter().map(|m| m.content.len()).sum(), st.capacity, "messages")?;
        let tok = tokenizer(&st)?;
        let tpl = st
            .template
            .as_ref()
            .ok_or_else(|| ApiError::bad(None, "this model has no chat template: use /v1/completions"))?;
        let text = tpl.render(&msgs, true).map_err(|e| ApiError::param("messages", e.to_string()))?;
        let ids = tok.encode(text, false).map_err(|e| ApiError::param("messages", e.to_string()))?.get_ids().to_vec();
        let ext = resolve_ext(&st, &m)?;
        Ok((ids, common, ext))
    })();
    match prep {
        Ok((ids, common, ext)) => into_response(generate(st, Kind::Chat, ids, common, ext).await),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn completions(State(st): State<S>, body: Result<Bytes, BytesRejection>) -> Response {
    let prep = (|| -> ApiResult<(Vec<u32>, Common, Resolved)> {
        let m = parse_body(&body_bytes(body)?)?;
        check_keys(&m, false)?;
        check_model(&m, &st.cfg.model_id)?;
        let common = Common::parse(&m, false)?;
        let bad = || {
            ApiError::param("prompt", "`prompt` must be a string, a list of token ids, or a one-element list of either")
        };
        let ids_of = |a: &[Value]| -> ApiResult<Vec<u32>> {
            a.iter()
                .map(|x| x.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32))
                .collect::<Option<_>>()
                .ok_or_else(bad)
        };
        let encode = |s: &str| -> ApiResult<Vec<u32>> {
            check_prompt_bytes(s.len(), st.capacity, "prompt")?;
            Ok(tokenizer(&st)?
                .encode(s, true)
                .map_err(|e| ApiError::param("prompt", e.to_string()))?
                .get_ids()
                .to_vec())
        };
        let ids = match field(&m, "prompt") {
            Some(Value::String(s)) => encode(s)?,
            Some(Value::Array(a)) if a.iter().all(Value::is_number) => ids_of(a)?,
            Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
                Value::String(s) => encode(s)?,
                Value::Array(x) => ids_of(x)?,
                _ => return Err(bad()),
            },
            Some(Value::Array(a)) if a.len() > 1 => {
                return Err(ApiError::param("prompt", "one prompt per request (use `n` for several completions)"))
            }
            _ => return Err(bad()),
        };
        if let Some(&bad_id) = ids.iter().find(|&&i| i as usize >= st.model.vocab) {
            return Err(ApiError::param(
                "prompt",
                format!("token id {bad_id} is outside the vocabulary ({})", st.model.vocab),
            ));
        }
        let ext = resolve_ext(&st, &m)?;
        Ok((ids, common, ext))
    })();
    match prep {
        Ok((ids, common, ext)) => into_response(generate(st, Kind::Text, ids, common, ext).await),
        Err(e) => e.into_response(),
    }
}

/// Per-choice state of a request on the HTTP side.
#[derive(Default)]
struct ChoiceState {
    ts: TextStream,
    full: String,
    emitted: usize,
    ids: Vec<u32>,
    tokens: Vec<TokenEvent>,
    stopped: bool,
    finish: Option<&'static str>,
    done: Option<DoneEvent>,
    role_sent: bool,
}

struct Collector {
    st: S,
    kind: Kind,
    id: String,
    created: u64,
    stops: Vec<String>,
    stop_flags: Vec<Arc<AtomicUsize>>,
    ignore_eos: bool,
    logprobs: bool,
    monitors: Vec<MonitorInfo>,
    steering_ops: usize,
    /// The plan's warnings ([`Resolved::warnings`]), reported in the `persona` summary.
    warnings: Vec<String>,
    choices: Vec<ChoiceState>,
    prompt_tokens: usize,
}

/// Longest suffix of `s` that is a proper prefix of a stop string (held back while streaming).
fn held_back(s: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for stop in stops {
        for k in (1..stop.len().min(s.len() + 1)).rev() {
            if k <= best {
                break;
            }
            let start = s.len() - k;
            if s.is_char_boundary(start) && stop.starts_with(&s[start..]) {
                best = k;
                break;
            }
        }
    }
    best
}

impl Collector {
    fn token_str(&self, id: u32) -> String {
        match &self.st.tokenizer {
            Some(t) => t.decode(&[id], false).unwrap_or_default(),
            None => format!("<{id}>"),
        }
    }

    /// A token arrived: the text it makes visible (none once stopped).
    fn on_token(&mut self, c: usize, t: TokenEvent) -> Option<String> {
        let eos = &self.st.model.eos_ids;
        let tok = self.st.tokenizer.as_ref();
        let stops = &self.stops;
        let ch = &mut self.choices[c];
        if ch.stopped || ch.done.is_some() {
            return None;
        }
        ch.ids.push(t.id);
        let is_eos = !self.ignore_eos && eos.contains(&t.id);
        if let (false, Some(tok)) = (is_eos, tok) {
            let piece = ch.ts.push(tok, t.id);
            ch.full.push_str(&piece);
        }
        ch.tokens.push(t);
        if !stops.is_empty() {
            let hit = stops.iter().filter_map(|s| ch.full[ch.emitted..].find(s.as_str()).map(|p| p + ch.emitted)).min();
            if let Some(pos) = hit {
                ch.full.truncate(pos);
                ch.stopped = true;
                ch.finish = Some("stop");
                self.stop_flags[c].store(ch.ids.len(), Ordering::SeqCst);
            }
        }
        let upto = if ch.stopped { ch.full.len() } else { ch.full.len() - held_back(&ch.full[ch.emitted..], stops) };
        let upto = upto.max(ch.emitted);
        let new = ch.full[ch.emitted..upto].to_string();
        ch.emitted = upto;
        Some(new)
    }

    /// The sequence finished: the rest of the text.
    fn on_done(&mut self, c: usize, d: DoneEvent) -> String {
        let ch = &mut self.choices[c];
        if ch.stopped {
            // Tokens after the one that completed the stop string are not part of the answer.
            let keep = d.completion_tokens.min(ch.ids.len());
            ch.ids.truncate(keep);
            ch.tokens.truncate(keep);
        }
        let new = ch.full[ch.emitted.min(ch.full.len())..].to_string();
        ch.emitted = ch.full.len();
        if ch.finish.is_none() {
            ch.finish = Some(match d.finish {
                FinishReason::Eos | FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            });
        }
        ch.done = Some(d);
        new
    }

    /// Log-probabilities of one token, in the route's format.
    fn logprob_json(&self, t: &TokenEvent) -> Value {
        let lp = t.logprob.unwrap_or(f32::NAN);
        let s = self.token_str(t.id);
        match self.kind {
            Kind::Chat => json!({
                "token": s,
                "logprob": lp,
                "bytes": s.as_bytes(),
                "top_logprobs": t.top.iter().map(|&(i, l)| {
                    let ts = self.token_str(i);
                    json!({"token": ts, "logprob": l, "bytes": ts.as_bytes()})
                }).collect::<Vec<_>>(),
            }),
            Kind::Text => {
                let mut top = Map::new();
                for &(i, l) in &t.top {
                    top.insert(self.token_str(i), json!(l));
                }
                json!({"tokens": [s], "token_logprobs": [lp], "top_logprobs": [top]})
            }
        }
    }

    fn logprobs_all(&self, c: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let toks = &self.choices[c].tokens;
        match self.kind {
            Kind::Chat => json!({"content": toks.iter().map(|t| self.logprob_json(t)).collect::<Vec<_>>()}),
            Kind::Text => {
                let (mut tokens, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
                let mut off = 0usize;
                for t in toks {
                    let j = self.logprob_json(t);
                    let s = self.token_str(t.id);
                    offs.push(off);
                    off += s.len();
                    tokens.push(j["tokens"][0].clone());
                    lps.push(j["token_logprobs"][0].clone());
                    tops.push(j["top_logprobs"][0].clone());
                }
                json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
            }
        }
    }

    /// The `persona` object of a finished choice; logs and counts it when flagged.
    fn summary(&self, c: usize, full_series: bool) -> Value {
        let Some(d) = &self.choices[c].done else { return Value::Null };
        let mut probes = vec![];
        let mut reasons = vec![];
        for (k, m) in self.monitors.iter().enumerate() {
            let s = d.series.get(k).map(Vec::as_slice).unwrap_or(&[]);
            let p = d.prompt_tokens;
            let last_prompt = s.get(p.wrapping_sub(1)).copied();
            let resp = if s.len() > p { &s[p..] } else { &[][..] };
            let mean_of = |xs: &[f32]| {
                (!xs.is_empty()).then(|| (xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64) as f32)
            };
            let mean = mean_of(resp);
            // Position 0 (BOS, or the template's first token) is the attention sink: its residual is
            // orders of magnitude larger, and so is its projection; it is left out of the mean.
            let prompt_mean = mean_of(s.get(1..p.min(s.len())).unwrap_or(&[]));
            for &x in resp {
                self.st.metrics.observe_projection(&m.vector, x);
            }
            let label = format!("{}@{}", m.name, m.layer);
            if let Some(t) = m.threshold {
                if let Some(x) = last_prompt.filter(|&x| x > t) {
                    reasons.push(format!("{label}: last prompt token projection {x:.3} > threshold {t}"));
                }
                if let Some(x) = mean.filter(|&x| x > t) {
                    reasons.push(format!("{label}: response mean projection {x:.3} > threshold {t}"));
                }
            }
            let mut o = json!({
                "name": m.name,
                "vector": m.vector,
                "layer": m.layer,
                "threshold": m.threshold,
                "last_prompt": last_prompt,
                "last_prompt_position": p.checked_sub(1),
                "prompt_mean": prompt_mean,
                "response_mean": mean,
                "projections": resp,
                "projections_start": p,
            });
            if full_series {
                o["prompt_projections"] = json!(&s[..p.min(s.len())]);
            }
            probes.push(o);
        }
        let flagged = !reasons.is_empty();
        if flagged {
            self.st.metrics.flagged.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "{}",
                json!({"ts": now_s(), "level": "warn", "event": "persona.flagged", "request_id": self.id,
                       "choice": c, "reasons": reasons, "probes": probes.iter().map(|p| json!({
                           "name": p["name"], "layer": p["layer"], "last_prompt": p["last_prompt"],
                           "response_mean": p["response_mean"]})).collect::<Vec<_>>()})
            );
        }
        let mut out = json!({
            "probes": probes,
            "steering_ops": self.steering_ops,
            "receipts": d.receipts,
            "flagged": flagged,
            "reason": if flagged { Value::String(reasons.join("; ")) } else { Value::Null },
            "reasons": reasons,
        });
        if !self.warnings.is_empty() {
            out["warnings"] = json!(self.warnings);
        }
        out
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.ids.len()).sum();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
               "total_tokens": self.prompt_tokens + completion})
    }

    /// A streamed token's projections; `over` lists the monitors whose threshold this token's
    /// projection crosses (the response is flagged on the final scores, see [`Self::summary`]).
    fn token_persona(&self, t: &TokenEvent) -> Value {
        let mut p = Map::new();
        let mut over = vec![];
        for (m, &x) in self.monitors.iter().zip(&t.projections) {
            let label = format!("{}@{}", m.name, m.layer);
            if m.threshold.is_some_and(|th| x > th) {
                over.push(label.clone());
            }
            p.insert(label, json!(x));
        }
        let mut v = json!({"token_id": t.id, "position": t.position, "projections": p});
        if !over.is_empty() {
            v["over_threshold"] = json!(over);
        }
        v
    }

    /// One streamed chunk for choice `c`.
    fn chunk(&mut self, c: usize, text: String, tok: Option<&TokenEvent>, finish: Option<&str>) -> Value {
        let lp = match tok {
            Some(t) if self.logprobs => match self.kind {
                Kind::Chat => json!({"content": [self.logprob_json(t)]}),
                Kind::Text => self.logprob_json(t),
            },
            _ => Value::Null,
        };
        let mut choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({"content": text});
                if !self.choices[c].role_sent {
                    delta["role"] = json!("assistant");
                    self.choices[c].role_sent = true;
                }
                json!({"index": c, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Text => json!({"index": c, "text": text, "logprobs": lp, "finish_reason": finish}),
        };
        if let Some(t) = tok {
            choice["token_ids"] = json!([t.id]);
        }
        let mut v = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.st.cfg.model_id,
            "choices": [choice],
        });
        if let Some(t) = tok {
            if !self.monitors.is_empty() {
                v["persona"] = self.token_persona(t);
            }
        }
        if finish.is_some() {
            v["persona"] = self.summary(c, false);
        }
        v
    }

    fn full_response(&self) -> Value {
        let choices: Vec<Value> = (0..self.choices.len())
            .map(|c| {
                let ch = &self.choices[c];
                let mut o = match self.kind {
                    Kind::Chat => json!({"index": c, "message": {"role": "assistant", "content": ch.full}}),
                    Kind::Text => json!({"index": c, "text": ch.full}),
                };
                o["logprobs"] = self.logprobs_all(c);
                o["finish_reason"] = json!(ch.finish.unwrap_or("length"));
                o["token_ids"] = json!(ch.ids);
                o["persona"] = self.summary(c, true);
                o
            })
            .collect();
        let persona = choices.first().map(|c| c["persona"].clone()).unwrap_or(Value::Null);
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.st.cfg.model_id,
            "choices": choices,
            "usage": self.usage(),
            "persona": persona,
        })
    }
}

async fn generate(st: S, kind: Kind, ids: Vec<u32>, c: Common, ext: Resolved) -> ApiResult<Response> {
    if ids.is_empty() {
        return Err(ApiError::param(if kind == Kind::Chat { "messages" } else { "prompt" }, "the prompt is empty"));
    }
    let room = st.capacity.saturating_sub(ids.len() + 1);
    if room == 0 {
        return Err(ApiError::param(
            "messages",
            format!("the prompt has {} tokens; the context holds {}", ids.len(), st.capacity),
        )
        .with_code("context_length_exceeded"));
    }
    let max_tokens = match c.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::param(
                "max_tokens",
                format!(
                    "max_tokens {m} + {} prompt tokens exceeds the context of {} tokens (at most {room} here)",
                    ids.len(),
                    st.capacity
                ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m,
        None => room,
    };
    if c.n > st.cfg.max_queue {
        return Err(ApiError::param(
            "n",
            format!("`n` {} is larger than the server's queue ({})", c.n, st.cfg.max_queue),
        ));
    }
    let limit = super::policy::max_request_work(&st.cfg, st.capacity);
    super::policy::check_work(limit, ids.len(), max_tokens, c.n, ext.steering.plan.ops.len())?;
    let seed = c.seed.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
            ^ st.next_id.load(Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let steering = if ext.steering.is_empty() { None } else { Some(Arc::new(ext.steering.clone())) };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop_flags: Vec<Arc<AtomicUsize>> = (0..c.n).map(|_| Arc::new(AtomicUsize::new(usize::MAX))).collect();
    let enqueued = Instant::now();
    let jobs: Vec<Job> = (0..c.n)
        .map(|i| Job {
            choice: i,
            prompt_ids: ids.clone(),
            max_tokens,
            sampling: SamplingParams {
                temperature: c.temperature,
                top_k: c.top_k,
                top_p: c.top_p,
                seed: seed.wrapping_add(i as u64),
            },
            ignore_eos: c.ignore_eos,
            logprobs: c.logprobs,
            top_logprobs: c.top_logprobs,
            steering: steering.clone(),
            stop_after: stop_flags[i].clone(),
            tx: tx.clone(),
            enqueued,
        })
        .collect();
    drop(tx);
    if !st.queue.submit(jobs, &st.metrics) {
        let mut e = ApiError::status(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("the server's queue is full ({} waiting); retry shortly", st.cfg.max_queue),
        );
        e.code = Some("queue_full");
        e.retry_after = Some(1);
        return Err(e);
    }
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let mut col = Collector {
        id: format!("{}-{n}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: now_s(),
        kind,
        stops: c.stop.clone(),
        stop_flags,
        ignore_eos: c.ignore_eos,
        logprobs: c.logprobs,
        monitors: ext.monitors.clone(),
        steering_ops: ext.steering.plan.ops.len(),
        warnings: ext.warnings.clone(),
        choices: (0..c.n).map(|_| ChoiceState::default()).collect(),
        prompt_tokens: ids.len(),
        st: st.clone(),
    };
    if !c.stream {
        let mut done = 0;
        while done < c.n {
            match rx.recv().await {
                Some(Event::Token(i, t)) => {
                    col.on_token(i, t);
                }
                Some(Event::Done(i, d)) => {
                    col.on_done(i, d);
                    done += 1;
                }
                Some(Event::Error(_, msg)) => {
                    return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg))
                }
                None => {
                    return Err(ApiError::status(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "the scheduler dropped the request",
                    ))
                }
            }
        }
        return Ok(Json(col.full_response()).into_response());
    }
    let include_usage = c.include_usage;
    let (otx, orx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let data = |v: &Value| Ok(SseEvent::default().data(v.to_string()));
        let mut done = 0;
        while done < col.choices.len() {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = otx.closed() => return, // client gone: dropping `rx` frees the slots
            };
            let v = match ev {
                Some(Event::Token(i, t)) => {
                    let tcopy = t.clone();
                    match col.on_token(i, t) {
                        Some(text) => col.chunk(i, text, Some(&tcopy), None),
                        None => continue,
                    }
                }
                Some(Event::Done(i, d)) => {
                    done += 1;
                    let text = col.on_done(i, d);
                    let finish = col.choices[i].finish.unwrap_or("length");
                    col.chunk(i, text, None, Some(finish))
                }
                Some(Event::Error(_, msg)) => {
                    let e = ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg);
                    let _ = otx.send(data(&e.body())).await;
                    return;
                }
                None => return,
            };
            if otx.send(data(&v)).await.is_err() {
                return;
            }
        }
        if include_usage {
            let v = json!({"id": col.id, "object": if col.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                           "created": col.created, "model": col.st.cfg.model_id, "choices": [], "usage": col.usage()});
            let _ = otx.send(data(&v)).await;
        }
        let _ = otx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    let stream = futures_util::stream::unfold(orx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
