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
