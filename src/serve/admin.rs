//! Run-time administration routes: the vector registry (`GET|POST /v1/vectors`,
//! `GET|DELETE /v1/vectors/{name}`) and the server-wide default steering (`GET|PUT /v1/steering`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::api::{field, parse_body, ApiError, ApiResult};
use super::registry;
use super::{body_bytes, into_response, S};

pub(super) async fn list_vectors(State(st): State<S>) -> Response {
    Json(json!({"object": "list", "data": st.registry.list()})).into_response()
}

pub(super) async fn get_vector(State(st): State<S>, UrlPath(name): UrlPath<String>) -> Response {
    match st.registry.get(&name) {
        Some(v) => Json(registry::vector_json(&v)).into_response(),
        None => ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", format!("no vector named `{name}`"))
            .into_response(),
    }
}

pub(super) async fn upload_vector(
    State(st): State<S>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    into_response((|| -> ApiResult<Response> {
        let bytes = body_bytes(body)?;
        let name = q.get("name").map(String::as_str).filter(|n| !n.is_empty());
        if let Some(n) = name {
            if n.contains('/') || n.len() > 200 {
                return Err(ApiError::param("name", "vector names may not contain `/` (at most 200 bytes)"));
            }
        }
        let flag = |k: &str| match q.get(k).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(x) => Err(ApiError::param(k, format!("`{k}` must be true or false, got `{x}`"))),
        };
        let (replace, force) = (flag("replace")?, flag("force")?);
        let v = registry::parse_upload(&bytes, name, &st.model)?;
        // A vector made from another model of the same shape is refused unless `?force=true`.
        let mut model = st.model.clone();
        if let Some(id) = model.identity.as_mut() {
            id.allow_foreign |= force;
        }
        let warning =
            v.check_identity(&model).map_err(|e| ApiError::bad(None, e.to_string()).with_code("model_mismatch"))?;
        if !replace && st.registry.get(&v.name).is_some() {
            return Err(ApiError::status(
                StatusCode::CONFLICT,
                "invalid_request_error",
                format!("a vector named `{}` already exists: upload with `?replace=true` to replace it", v.name),
            )
            .with_code("vector_exists"));
        }
        let mut body = registry::vector_json(&v);
        if let Some(w) = warning {
            body["warning"] = Value::String(w);
        }
        st.registry.insert(v);
        Ok((StatusCode::CREATED, Json(body)).into_response())
    })())
}

/// Where the server-wide default uses vector `name`: `steering[i]` / `monitor[i]`.
fn default_uses(st: &S, name: &str) -> Vec<String> {
    let d = st.default.read().map(|d| d.clone()).unwrap_or_default();
    let mut out = vec![];
    for k in ["steering", "monitor"] {
        if let Some(Value::Array(a)) = d.get(k) {
            for (i, o) in a.iter().enumerate() {
                if o.get("vector").and_then(Value::as_str) == Some(name) {
                    out.push(format!("{k}[{i}]"));
                }
            }
        }
    }
    out
}

pub(super) async fn delete_vector(State(st): State<S>, UrlPath(name): UrlPath<String>) -> Response {
    let uses = default_uses(&st, &name);
    if !uses.is_empty() && st.registry.get(&name).is_some() {
        return ApiError::status(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!(
                "vector `{name}` is used by the server-wide default ({}): change it first \
                 (PUT /v1/steering; {{}} clears it)",
                uses.join(", ")
            ),
        )
        .with_code("vector_in_use")
        .into_response();
    }
    if st.registry.remove(&name) {
        Json(json!({"id": name, "object": "persona.vector", "deleted": true})).into_response()
    } else {
        ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", format!("no vector named `{name}`"))
            .into_response()
    }
}

/// The server-wide default as set (`{"set": true, "steering": [..], "monitor": [..]}`), or, when
/// none is, an object that says so: `{"set": false, "steering": [], "monitor": [], "message": ..}`.
pub(super) async fn get_default(State(st): State<S>) -> Response {
    let d = st.default.read().map(|d| d.clone()).unwrap_or_default();
    let set = !d.is_empty();
    let mut out = serde_json::Map::new();
    out.insert("set".into(), set.into());
    out.insert("steering".into(), d.get("steering").cloned().unwrap_or_else(|| Value::Array(vec![])));
    out.insert("monitor".into(), d.get("monitor").cloned().unwrap_or_else(|| Value::Array(vec![])));
    if !set {
        out.insert(
            "message".into(),
            "no server-wide default steering or monitor is set; requests run as they ask \
             (PUT /v1/steering {\"steering\": [..], \"monitor\": [..]} sets one, {} clears it)"
                .into(),
        );
    }
    Json(Value::Object(out)).into_response()
}

pub(super) async fn set_default(State(st): State<S>, body: Result<Bytes, BytesRejection>) -> Response {
    into_response((|| -> ApiResult<Response> {
        let m = parse_body(&body_bytes(body)?)?;
        for k in m.keys() {
            if k != "steering" && k != "monitor" {
                return Err(ApiError::param(k, format!("unknown key `{k}` (steering, monitor)")));
            }
        }
        registry::resolve(field(&m, "steering"), field(&m, "monitor"), &st.registry, &st.model)?;
        if let Ok(mut d) = st.default.write() {
            *d = m.clone();
        }
        Ok(Json(Value::Object(m)).into_response())
    })())
}
