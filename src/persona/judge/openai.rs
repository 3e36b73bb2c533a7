//! [`OpenAiJudge`]: a judge behind an OpenAI-compatible `chat/completions` endpoint. One request
//! per prompt asks for one token with the top log-probabilities (the paper's request); prompts are
//! sent from a bounded pool of threads, with retries on connection errors, timeouts, 408, 429 and
//! 5xx (exponential backoff with jitter, or the server's `retry-after-ms` / `Retry-After`). The
//! top log-probabilities are scored by [`aggregate_0_100`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{aggregate_0_100, Judge, JudgeScore};
use crate::{Error, Result};

/// How an [`OpenAiJudge`] talks to its endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiOptions {
    /// Requests in flight at once (threads in the pool).
    pub concurrency: usize,
    /// Whole-request limit: connect, send, wait and read.
    pub timeout: Duration,
    /// Retries after the first attempt, on connection errors, timeouts, HTTP 408, 429 and 5xx.
    pub retries: u32,
    /// First backoff; doubles with each retry (less up to 25% jitter), capped at `max_backoff`.
    pub backoff: Duration,
    /// Longest wait between attempts; also caps a server's `Retry-After`.
    pub max_backoff: Duration,
    /// `top_logprobs` asked for (the paper: 20, the OpenAI maximum).
    pub top_logprobs: u32,
}

impl Default for OpenAiOptions {
    fn default() -> Self {
        OpenAiOptions {
            concurrency: 16,
            timeout: Duration::from_secs(60),
            retries: 5,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            top_logprobs: 20,
        }
    }
}

/// A judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server,
/// OpenRouter, ...). Each prompt is sent as one user message; the request asks for one token at
/// temperature 0 with seed 0 and the top log-probabilities, as the paper's code does.
pub struct OpenAiJudge {
    url: String,
    model: String,
    api_key: Option<String>,
    opts: OpenAiOptions,
    agent: ureq::Agent,
}

/// The chat-completions URL for a base URL:
/// - a URL ending in `/chat/completions` is used as given;
/// - a bare host (`https://api.openai.com`, `http://localhost:8000`) gets `/v1/chat/completions`;
/// - any other path (`…/v1`, `https://openrouter.ai/api/v1`, `…/v1beta/openai`) gets
///   `/chat/completions` — the rule of OpenAI's own clients, whose base URL includes the version.
///
/// ```
/// use persona::persona::judge::chat_completions_url as u;
/// assert_eq!(u("http://localhost:8000").unwrap(), "http://localhost:8000/v1/chat/completions");
/// assert_eq!(u("http://localhost:8000/v1/").unwrap(), "http://localhost:8000/v1/chat/completions");
/// assert_eq!(u("https://x.ai/api/v1/chat/completions").unwrap(), "https://x.ai/api/v1/chat/completions");
/// ```
pub fn chat_completions_url(base: &str) -> Result<String> {
    let b = base.trim().trim_end_matches('/');
    let rest = b
        .strip_prefix("http://")
        .or_else(|| b.strip_prefix("https://"))
        .filter(|r| !r.is_empty() && !r.starts_with('/'))
        .ok_or_else(|| Error::Invalid(format!("judge URL `{base}`: expected http://HOST[:PORT][/PATH]")))?;
    if b.contains(['?', '#']) || b.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!("judge URL `{base}`: no query, fragment or spaces, please")));
    }
    Ok(if b.ends_with("/chat/completions") {
        b.to_string()
    } else if !rest.contains('/') {
        format!("{b}/v1/chat/completions")
    } else {
        format!("{b}/chat/completions")
    })
}

impl OpenAiJudge {
    /// A judge with default [`OpenAiOptions`]; see [`chat_completions_url`] for `base_url`.
    /// `api_key` (when given and not empty) is sent as `Authorization: Bearer …`.
    pub fn new(base_url: &str, model: &str, api_key: Option<String>) -> Result<Self> {
        if model.trim().is_empty() {
            return Err(Error::Invalid("judge model name is empty".into()));
        }
        let opts = OpenAiOptions::default();
        Ok(OpenAiJudge {
            url: chat_completions_url(base_url)?,
            model: model.to_string(),
            api_key: api_key.filter(|k| !k.trim().is_empty()),
            agent: agent(&opts),
            opts,
        })
    }

    pub fn with_options(mut self, opts: OpenAiOptions) -> Self {
        self.agent = agent(&opts);
        self.opts = opts;
        self
    }

    /// The URL every request goes to.
    pub fn endpoint(&self) -> &str {
        &self.url
    }

    pub fn options(&self) -> &OpenAiOptions {
        &self.opts
    }

    /// The request body for one prompt.
    pub fn request_body(&self, prompt: &str) -> Value {
        serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": true,
            "top_logprobs": self.opts.top_logprobs,
            "seed": 0,
        })
    }

    /// The endpoint's top `(token, logprob)` pairs for the first answer token of `prompt`,
    /// with retries.
    pub fn top_logprobs(&self, prompt: &str) -> Result<Vec<(String, f64)>> {
        let body = self.request_body(prompt).to_string();
        let mut attempt = 0u32;
        loop {
            let mut req = self.agent.post(&self.url).set("Content-Type", "application/json");
            if let Some(k) = &self.api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let failure = match req.send_string(&body) {
                Ok(resp) => match resp.into_string() {
                    Ok(text) => {
                        return parse_reply(&text).map_err(|m| self.err(format!("{m}; reply: {}", snippet(&text))))
                    }
                    Err(e) => Failure { msg: format!("reading the reply: {e}"), retry: true, wait: None },
                },
                Err(ureq::Error::Status(code, resp)) => {
                    let wait = retry_after(&resp);
                    let status = format!("HTTP {code} {}", resp.status_text());
                    let text = resp.into_string().unwrap_or_default();
                    let retry = code == 408 || code == 429 || (500..600).contains(&code);
                    Failure { msg: format!("{status}: {}", snippet(&text)), retry, wait }
                }
                Err(ureq::Error::Transport(t)) => {
                    use ureq::ErrorKind as K;
                    let retry =
                        matches!(t.kind(), K::Dns | K::ConnectionFailed | K::Io | K::BadStatus | K::ProxyConnect);
                    Failure { msg: transport_message(&t), retry, wait: None }
                }
            };
            if !failure.retry || attempt >= self.opts.retries {
                let tries = if attempt == 0 { String::new() } else { format!(" (after {} attempts)", attempt + 1) };
                return Err(self.err(format!("{}{tries}", failure.msg)));
            }
            let backoff = self.opts.backoff.saturating_mul(1 << attempt.min(20)).min(self.opts.max_backoff);
            let wait = failure.wait.unwrap_or_else(|| backoff.mul_f64(1.0 - 0.25 * jitter()));
            std::thread::sleep(wait.min(self.opts.max_backoff));
            attempt += 1;
        }
    }

    /// Score one prompt (one request, with retries).
    pub fn score_one(&self, prompt: &str) -> Result<JudgeScore> {
        Ok(aggregate_0_100(&self.top_logprobs(prompt)?))
    }

    fn err(&self, msg: String) -> Error {
        Error::format(&self.url, format!("judge `{}`: {msg}", self.model))
    }
}

impl Judge for OpenAiJudge {
    fn score(&self, prompts: &[String]) -> Vec<Result<JudgeScore>> {
        let n = prompts.len();
        let workers = self.opts.concurrency.clamp(1, n.max(1));
        let next = AtomicUsize::new(0);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            for _ in 0..workers {
                let tx = tx.clone();
                let next = &next;
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || tx.send((i, self.score_one(&prompts[i]))).is_err() {
                        break;
                    }
                });
            }
        });
        drop(tx);
        let mut out: Vec<Option<Result<JudgeScore>>> = (0..n).map(|_| None).collect();
        for (i, r) in rx {
            out[i] = Some(r);
        }
        out.into_iter().map(|r| r.expect("every prompt is scored by some worker")).collect()
    }

    fn describe(&self) -> String {
        format!("{} at {}", self.model, self.url)
    }
}

struct Failure {
    msg: String,
    retry: bool,
    wait: Option<Duration>,
}

fn agent(o: &OpenAiOptions) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(o.timeout)
        .max_idle_connections_per_host(o.concurrency.max(1))
        .user_agent(concat!("persona/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// What went wrong below HTTP, without the URL (the error names it once already).
fn transport_message(t: &ureq::Transport) -> String {
    // The innermost cause says it best ("timed out reading response", "Connection refused").
    let mut cause = std::error::Error::source(t).map(|s| s.to_string());
    let mut src = std::error::Error::source(t).and_then(|s| s.source());
    while let Some(s) = src {
        cause = Some(s.to_string());
        src = s.source();
    }
    match cause.or_else(|| t.message().map(str::to_string)) {
        Some(c) => format!("{}: {c}", t.kind()),
        None => t.kind().to_string(),
    }
}

/// A 0..1 pseudo-random number for backoff jitter (std's randomly keyed hasher; no RNG crate).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::thread::current().id().hash(&mut h);
    SystemTime::now().hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `retry-after-ms` (OpenAI's), else `Retry-After` in seconds or as an HTTP date.
fn retry_after(resp: &ureq::Response) -> Option<Duration> {
    let secs = |s: &str| s.trim().parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
    if let Some(ms) = resp.header("retry-after-ms").and_then(secs) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = resp.header("retry-after")?;
    if let Some(s) = secs(v) {
        return Some(Duration::from_secs_f64(s.min(1e6)));
    }
    let at = http_date(v)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since 1970 of an IMF-fixdate (`Wed, 21 Oct 2015 07:28:00 GMT`).
fn http_date(s: &str) -> Option<u64> {
    let f: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, hms, "GMT"] = f.as_slice() else { return None };
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let m = MONTHS.iter().position(|x| x == mon)? as i64 + 1;
    let (d, y): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [hh, mm, ss] = t.as_slice() else { return None };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The first 300 characters of a reply, on one line.
fn snippet(text: &str) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &one[..i]),
        None if one.is_empty() => "(empty body)".into(),
        None => one,
    }
}

/// `choices[0].logprobs.content[0].top_logprobs[] {token, logprob}` of a reply, or what is wrong.
pub fn parse_reply(text: &str) -> std::result::Result<Vec<(String, f64)>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("the reply is not JSON ({e})"))?;
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        let msg = e.get("message").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_string);
        return Err(format!("the endpoint returned an error: {msg}"));
    }
    let mut path = String::new();
    let mut at = &v;
    for step in ["choices", "0", "logprobs", "content", "0", "top_logprobs"] {
        let next = match step.parse::<usize>() {
            Ok(i) => at.as_array().ok_or_else(|| format!("`{path}` is not a list"))?.get(i),
            Err(_) => at.as_object().ok_or_else(|| format!("`{path}` is not an object"))?.get(step),
        };
        path = if path.is_empty() { step.to_string() } else { format!("{path}.{step}") };
        at = next.filter(|x| !x.is_null()).ok_or_else(|| {
            let hint = if step == "logprobs" { " (does the endpoint support `logprobs`?)" } else { "" };
            format!("the reply has no `{path}`{hint}")
        })?;
    }
    let list = at.as_array().ok_or_else(|| format!("`{path}` is not a list"))?;
    if list.is_empty() {
        return Err(format!("`{path}` is empty (does the endpoint support `top_logprobs`?)"));
    }
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let tok =
                e.get("token").and_then(Value::as_str).ok_or_else(|| format!("`{path}[{i}].token` is missing"))?;
            let lp =
                e.get("logprob").and_then(Value::as_f64).ok_or_else(|| format!("`{path}[{i}].logprob` is missing"))?;
            Ok((tok.to_string(), lp))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(http_date("Wed, 21 Oct 2015 07:28:00 GMT"), Some(1_445_412_480));
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(http_date("Tue, 29 Feb 2000 12:00:00 GMT"), Some(951_825_600));
        assert_eq!(http_date("soon"), None);
    }

    #[test]
    fn url_rules() {
        let u = |s| chat_completions_url(s).unwrap();
        assert_eq!(u("https://api.openai.com"), "https://api.openai.com/v1/chat/completions");
        assert_eq!(u("https://openrouter.ai/api/v1"), "https://openrouter.ai/api/v1/chat/completions");
        assert_eq!(
            u("https://generativelanguage.googleapis.com/v1beta/openai/"),
            "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"
        );
        for bad in ["localhost:8000", "ftp://x", "http://", "http:///v1", "http://x/v1?a=b"] {
            assert!(chat_completions_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reply_parsing_names_what_is_missing() {
        let e = |s: &str| parse_reply(s).unwrap_err();
        assert!(e("<html>").contains("not JSON"));
        assert!(e(r#"{"choices": []}"#).contains("no `choices.0`"));
        assert!(e(r#"{"choices": [{"logprobs": null}]}"#).contains("no `choices.0.logprobs`"));
        assert!(e(r#"{"choices": [{"logprobs": {"content": []}}]}"#).contains("no `choices.0.logprobs.content.0`"));
        let r = r#"{"choices":[{"logprobs":{"content":[{"top_logprobs":[{"token":"5"}]}]}}]}"#;
        assert!(e(r).contains("top_logprobs[0].logprob"));
        assert!(e(r#"{"error": {"message": "bad key"}}"#).contains("bad key"));
        let ok = r#"{"choices":[{"logprobs":{"content":[{"top_logprobs":[{"token":"5","logprob":-0.5}]}]}}]}"#;
        assert_eq!(parse_reply(ok).unwrap(), vec![("5".to_string(), -0.5)]);
    }
}
