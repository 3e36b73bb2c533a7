//! Request parsing and OpenAI-style errors.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self::bad(Some(param), message)
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
        }
        r
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Parse a JSON object body.
pub fn parse_body(bytes: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(None, format!("request body is not valid JSON: {e}")).with_code("invalid_json"))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad(None, "request body must be a JSON object").with_code("invalid_json")),
    }
}

/// A present, non-null field.
pub fn field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

pub fn get_f32(m: &Map<String, Value>, k: &str, default: f32) -> ApiResult<f32> {
    match field(m, k) {
        None => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x.abs() < 1e30 => Ok(x as f32),
            _ => Err(ApiError::param(k, format!("`{k}` must be a finite number, got {v}"))),
        },
    }
}

pub fn get_usize(m: &Map<String, Value>, k: &str) -> ApiResult<Option<usize>> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) => Ok(Some(x.min(usize::MAX as u64) as usize)),
            None => Err(ApiError::param(k, format!("`{k}` must be a non-negative integer, got {v}"))),
        },
    }
}

pub fn get_bool(m: &Map<String, Value>, k: &str) -> ApiResult<bool> {
    match field(m, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::param(k, format!("`{k}` must be true or false, got {v}"))),
    }
}

/// The sampling and output fields shared by chat and text completions.
#[derive(Debug, Clone)]
pub struct Common {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub top_logprobs: usize,
    pub ignore_eos: bool,
}

pub const MAX_N: usize = 16;
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Common {
    /// `chat`: `logprobs` is a bool with `top_logprobs` beside it; completions: `logprobs` is the
    /// number of top tokens.
    pub fn parse(m: &Map<String, Value>, chat: bool) -> ApiResult<Self> {
        let max_tokens = match get_usize(m, "max_completion_tokens")? {
            Some(x) => Some(x),
            None => get_usize(m, "max_tokens")?,
        };
        if max_tokens == Some(0) {
            return Err(ApiError::param("max_tokens", "`max_tokens` must be at least 1"));
        }
        let temperature = get_f32(m, "temperature", 1.0)?;
        if !(0.0..=100.0).contains(&temperature) {
            return Err(ApiError::param(
                "temperature",
                format!("`temperature` must be in [0, 100], got {temperature}"),
            ));
        }
        let top_p = get_f32(m, "top_p", 1.0)?;
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::param("top_p", format!("`top_p` must be in (0, 1], got {top_p}")));
        }
        let top_k = match field(m, "top_k") {
            Some(v) if v.as_i64() == Some(-1) => 0,
            _ => get_usize(m, "top_k")?.unwrap_or(0),
        };
        let seed = match field(m, "seed") {
            None => None,
            Some(v) => match (v.as_u64(), v.as_i64()) {
                (Some(s), _) => Some(s),
                (None, Some(s)) => Some(s as u64),
                _ => return Err(ApiError::param("seed", format!("`seed` must be an integer, got {v}"))),
            },
        };
        let n = get_usize(m, "n")?.unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::param("n", format!("`n` must be between 1 and {MAX_N}, got {n}")));
        }
        let stop = match field(m, "stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::param("stop", "`stop` must be a string or a list of strings"))?,
            Some(_) => return Err(ApiError::param("stop", "`stop` must be a string or a list of strings")),
        };
        if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::param("stop", "`stop` takes at most 4 non-empty strings"));
        }
        let stream = get_bool(m, "stream")?;
        let include_usage = match field(m, "stream_options") {
            Some(Value::Object(o)) => get_bool(o, "include_usage")?,
            Some(_) => return Err(ApiError::param("stream_options", "`stream_options` must be an object")),
            None => false,
        };
        let (logprobs, top_logprobs) = if chat {
            let lp = get_bool(m, "logprobs")?;
            let top = get_usize(m, "top_logprobs")?.unwrap_or(0);
            if top > 0 && !lp {
                return Err(ApiError::param("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
            }
            (lp, top)
        } else {
            match get_usize(m, "logprobs")? {
                None => (false, 0),
                Some(k) => (true, k),
            }
        };
        if top_logprobs > MAX_TOP_LOGPROBS {
            return Err(ApiError::param(
                if chat { "top_logprobs" } else { "logprobs" },
                format!("at most {MAX_TOP_LOGPROBS} top log-probabilities, got {top_logprobs}"),
            ));
        }
        let ignore_eos = get_bool(m, "ignore_eos")?;
        Ok(Common {
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            n,
            stop,
            stream,
            include_usage,
            logprobs,
            top_logprobs,
            ignore_eos,
        })
    }
}

/// Top-level keys persona reads in a chat (`chat`) or text completion body; `model` is checked
/// by [`check_model`].
fn used_keys(chat: bool) -> &'static [&'static str] {
    const CHAT: &[&str] = &[
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "n",
        "stop",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "ignore_eos",
        "steering",
        "monitor",
    ];
    const TEXT: &[&str] = &[
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "n",
        "stop",
        "stream",
        "stream_options",
        "logprobs",
        "ignore_eos",
        "steering",
        "monitor",
    ];
    if chat {
        CHAT
    } else {
        TEXT
    }
}

/// Documented OpenAI keys persona accepts without acting on them: always ignored (bookkeeping
/// that changes no output), or accepted only at the value that means "off".
const IGNORED_ALWAYS: &[&str] =
    &["user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"];

/// Whether `v` (not null) is the "off" value of the documented OpenAI option `k`; `None` when `k`
/// is not such an option. The message names the accepted value.
fn default_only(k: &str, v: &Value, chat: bool) -> Option<(bool, &'static str)> {
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    let empty = |v: &Value| match v {
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    Some(match k {
        "frequency_penalty" | "presence_penalty" => (zero(v), "0"),
        "logit_bias" => (empty(v), "{}"),
        "response_format" => (v.get("type").and_then(Value::as_str) == Some("text"), "{\"type\": \"text\"}"),
        "tools" | "functions" if chat => (empty(v), "[]"),
        "tool_choice" | "function_call" if chat => (v.as_str() == Some("none"), "\"none\""),
        "modalities" if chat => (v.as_array().is_some_and(|a| a.len() == 1 && a[0] == "text"), "[\"text\"]"),
        "audio" | "prediction" | "reasoning_effort" | "verbosity" | "web_search_options" if chat => (false, "null"),
        "echo" if !chat => (v == &Value::Bool(false), "false"),
        "best_of" if !chat => (v.as_u64() == Some(1), "1"),
        "suffix" if !chat => (v.as_str() == Some(""), "\"\""),
        _ => return None,
    })
}

/// Levenshtein distance (small strings: request keys).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Refuse top-level keys that are neither read by persona nor documented OpenAI keys it may
/// ignore, and non-default values of OpenAI options persona does not implement.
pub fn check_keys(m: &Map<String, Value>, chat: bool) -> ApiResult<()> {
    let used = used_keys(chat);
    for (k, v) in m {
        if used.contains(&k.as_str()) || IGNORED_ALWAYS.contains(&k.as_str()) {
            continue;
        }
        if let Some((ok, want)) = default_only(k, v, chat) {
            if ok || v.is_null() {
                continue;
            }
            return Err(ApiError::param(
                k,
                format!("persona does not support the OpenAI option `{k}` (only {want} or null is accepted), got {v}"),
            )
            .with_code("unsupported_parameter"));
        }
        let mut msg = format!("unknown field `{k}`");
        if k.len() <= 200 {
            let best = used.iter().map(|u| (edit_distance(k, u), *u)).filter(|(d, _)| *d <= 2).min_by_key(|(d, _)| *d);
            if let Some((_, u)) = best {
                msg.push_str(&format!("; did you mean `{u}`?"));
            }
        }
        let name = if k.len() > 200 { "(a long key)" } else { k.as_str() };
        return Err(ApiError::param(name, msg).with_code("unknown_parameter"));
    }
    Ok(())
}

/// Model aliases accepted besides the served id.
pub const MODEL_ALIASES: &[&str] = &["persona"];

/// `model`, when present, must name the served model (its id or an alias): 404 otherwise, as
/// OpenAI answers for an unknown model.
pub fn check_model(m: &Map<String, Value>, served: &str) -> ApiResult<()> {
    match field(m, "model") {
        None => Ok(()),
        Some(Value::String(s)) if s == served || MODEL_ALIASES.contains(&s.as_str()) => Ok(()),
        Some(Value::String(s)) => {
            let shown: String = s.chars().take(200).collect();
            let mut e = ApiError::status(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{shown}` does not exist: this server serves `{served}` (alias: `persona`)"),
            )
            .with_code("model_not_found");
            e.param = Some("model".into());
            Err(e)
        }
        Some(v) => Err(ApiError::param("model", format!("`model` must be a string, got {v}"))),
    }
}

/// Bytes of prompt text accepted per token of context: 8 × a generous 16 bytes per token, so
/// that no prompt that could fit the context is refused, and none far past it is tokenized.
pub const PROMPT_BYTES_PER_CONTEXT_TOKEN: usize = 128;

/// Refuse, before tokenizing, prompt text (`bytes` long) far longer than the context could hold.
pub fn check_prompt_bytes(bytes: usize, context: usize, param: &str) -> ApiResult<()> {
    let limit = context.saturating_mul(PROMPT_BYTES_PER_CONTEXT_TOKEN);
    if bytes > limit {
        return Err(ApiError::param(
            param,
            format!(
                "the prompt is {bytes} bytes, over this server's limit of {limit} bytes \
                 ({PROMPT_BYTES_PER_CONTEXT_TOKEN} bytes per token of its {context}-token context); \
                 it cannot fit the context"
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}
