//! Server policy beyond the API key: the admin key that reserves the routes changing the
//! server's state, whether a request may replace the server-wide default steering, and the cap
//! on one request's work.

use axum::http::{Method, StatusCode};
use serde_json::{Map, Value};

use super::api::{ApiError, ApiResult};
use super::ServeConfig;

/// Default `--max-request-work` per slot and context: a request may do the work of
/// `WORK_PER_SLOT_CONTEXT × max_batch` unsteered full contexts (with max_batch 8: `n` 16 at full
/// context with one steering op, or one full context with up to 31 steering ops).
pub const WORK_PER_SLOT_CONTEXT: usize = 4;

/// The work cap in force: `--max-request-work`, else `4 × max_batch × context`.
pub fn max_request_work(cfg: &ServeConfig, context: usize) -> usize {
    cfg.max_request_work.unwrap_or_else(|| WORK_PER_SLOT_CONTEXT.saturating_mul(cfg.max_batch).saturating_mul(context))
}

/// Whether `method path` changes the server's state (registry uploads and deletes, the default
/// steering): with `--admin-key` these need the admin key.
pub fn is_admin_route(method: &Method, route: &str) -> bool {
    matches!(route, "/v1/vectors" | "/v1/vectors/{name}" | "/v1/steering")
        && method != Method::GET
        && method != Method::HEAD
}

/// Who a request's bearer token makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// The API key, or anyone when the server has none.
    User,
    /// A key is needed and none (or a wrong one) was sent.
    Nobody,
}

pub fn caller(cfg: &ServeConfig, bearer: Option<&str>) -> Caller {
    let is = |k: &Option<String>| match (k, bearer) {
        (Some(k), Some(b)) => constant_eq(b.as_bytes(), k.as_bytes()),
        _ => false,
    };
    if is(&cfg.admin_key) {
        Caller::Admin
    } else if cfg.api_key.is_none() || is(&cfg.api_key) {
        Caller::User
    } else {
        Caller::Nobody
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Ok` when `caller` may use `method route` (`/health` is open to all); else the 401 or 403.
pub fn authorize(cfg: &ServeConfig, caller: Caller, method: &Method, route: &str) -> ApiResult<()> {
    // The playground's page and assets (`/`) are public: the page asks for the key and sends it
    // with every API call.
    if route == "/health" || route == "/" || caller == Caller::Admin {
        return Ok(());
    }
    if caller == Caller::Nobody {
        let mut e = ApiError::status(StatusCode::UNAUTHORIZED, "invalid_request_error", "missing or wrong API key");
        e.code = Some("invalid_api_key");
        return Err(e);
    }
    if cfg.admin_key.is_some() && is_admin_route(method, route) {
        return Err(ApiError::status(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!(
                "{method} {route} changes the server's state and needs the admin key (--admin-key): \
                 send `Authorization: Bearer ADMIN_KEY`; the API key may only read the registry and the default steering"
            ),
        )
        .with_code("admin_key_required"));
    }
    Ok(())
}

/// The start-up warning for a server whose API key also covers the registry and the default
/// steering.
pub fn warning(cfg: &ServeConfig) -> Option<&'static str> {
    (cfg.api_key.is_some() && cfg.admin_key.is_none()).then_some(
        "warning: --api-key is set without --admin-key: any client with the API key can change the vector \
         registry and the server-wide default steering",
    )
}

/// With `--allow-steering-override false`, a request may not carry a `steering` key (not even
/// `[]` or null) while the server-wide default has one: the default steering then applies to every
/// request. `monitor` stays free.
pub fn check_steering_override(
    cfg: &ServeConfig,
    request: &Map<String, Value>,
    default: &Map<String, Value>,
) -> ApiResult<()> {
    let default_set = default.get("steering").is_some_and(|v| !v.is_null());
    if cfg.allow_steering_override || !default_set || !request.contains_key("steering") {
        return Ok(());
    }
    let mut e = ApiError::status(
        StatusCode::FORBIDDEN,
        "permission_error",
        "this server does not let a request replace its default steering (--allow-steering-override false): \
         send no `steering` key (the default, GET /v1/steering, applies); `monitor` is allowed",
    )
    .with_code("steering_override_disabled");
    e.param = Some("steering".into());
    Err(e)
}

/// A request's work, `n × (prompt_tokens + max_tokens) × (1 + steering_ops)`, must not exceed the
/// server's cap (`max_tokens` as it will run: the context's room when the request omits it).
pub fn check_work(
    limit: usize,
    prompt_tokens: usize,
    max_tokens: usize,
    n: usize,
    steering_ops: usize,
) -> ApiResult<()> {
    let work =
        n.saturating_mul(prompt_tokens.saturating_add(max_tokens)).saturating_mul(steering_ops.saturating_add(1));
    if work <= limit {
        return Ok(());
    }
    Err(ApiError::bad(
        None,
        format!(
            "this request's work is n {n} × ({prompt_tokens} prompt + {max_tokens} max_tokens tokens) × \
             (1 + {steering_ops} steering ops) = {work}, over this server's limit of {limit} \
             (--max-request-work): lower n, max_tokens or the number of steering ops (one per layer)"
        ),
    )
    .with_code("request_too_large"))
}
