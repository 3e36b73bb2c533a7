//! `persona serve`: an OpenAI-compatible HTTP server with per-request steering, live projections
//! and continuous batching.
//!
//! Threads: the caller's thread runs the scheduler ([`scheduler::run`]), which owns the engine
//! and a paged KV cache (`max_batch` slots of up to `--context` tokens sharing a pool of
//! `kv_tokens`; see the scheduler for admission and preemption). An axum/tokio runtime on its own threads parses
//! requests, tokenizes, resolves steering against the vector registry, queues jobs (bounded:
//! HTTP 429 when full) and turns the scheduler's token events into JSON or SSE chunks.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
//! `GET /metrics`, `GET|POST /v1/vectors`, `GET|DELETE /v1/vectors/{name}`,
//! `GET|PUT /v1/steering` (the server-wide default `steering` / `monitor`). With an admin key the
//! routes that change the registry or the default need it (see [`policy`]).

mod admin;
pub mod api;
mod completions;
pub mod metrics;
mod playground;
mod policy;
pub mod registry;
pub mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

pub use self::completions::parse_messages;

use self::api::{ApiError, ApiResult};
use self::metrics::Metrics;
use self::registry::Registry;
use self::scheduler::Queue;
use crate::backend::Backend;
use crate::model::config::ModelConfig;
use crate::model::ChatTemplate;
use crate::LoadedModel;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// With a key every route but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// With an admin key, `POST /v1/vectors`, `DELETE /v1/vectors/{name}` and `PUT /v1/steering`
    /// need it (403 for the API key); it also works wherever the API key does. Without one the
    /// API key (if any) covers everything.
    pub admin_key: Option<String>,
    /// Whether a request's own `steering` may replace the server-wide default steering (when
    /// false and a default steering is set, a request carrying `steering` gets 403).
    pub allow_steering_override: bool,
    /// Most work one request may ask for, `n × (prompt + max_tokens) × (1 + steering ops)`
    /// (default: 4 × max_batch × context); beyond it 400.
    pub max_request_work: Option<usize>,
    /// Load every vector file in this folder into the registry at start.
    pub vectors_dir: Option<PathBuf>,
    /// KV-cache slots: sequences decoding at once.
    pub max_batch: usize,
    /// Sequences waiting for a slot; beyond it requests get HTTP 429.
    pub max_queue: usize,
    /// KV-cache pool in tokens, shared by the running sequences (default: max_batch × context / 4,
    /// at least one context).
    pub kv_tokens: Option<usize>,
    /// Most prompt tokens prefilled per step, across sequences (chunked prefill), so long prompts
    /// do not stall the other sequences' decoding for their whole prefill.
    pub max_prefill_tokens: usize,
    /// The model id reported by `/v1/models` and in responses.
    pub model_id: String,
    /// Sleep after each scheduler step (tests use it to hold requests in flight).
    pub step_delay: Option<Duration>,
    /// Stop on Ctrl-C / SIGTERM (graceful: stop accepting, finish in-flight work within `grace`).
    pub handle_signals: bool,
    pub grace: Duration,
    /// Largest request body (vector uploads included).
    pub max_body: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            admin_key: None,
            allow_steering_override: true,
            max_request_work: None,
            vectors_dir: None,
            max_batch: 8,
            max_queue: 64,
            kv_tokens: None,
            max_prefill_tokens: 512,
            model_id: "persona".into(),
            step_delay: None,
            handle_signals: false,
            grace: Duration::from_secs(30),
            max_body: 64 << 20,
        }
    }
}

struct AppState {
    cfg: ServeConfig,
    model: ModelConfig,
    capacity: usize,
    tokenizer: Option<Tokenizer>,
    template: Option<ChatTemplate>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    registry: Registry,
    /// `{"steering": [...], "monitor": [...]}` applied when a request omits the key.
    default: RwLock<Map<String, Value>>,
    created: u64,
    next_id: AtomicU64,
}

type S = Arc<AppState>;

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Serve `model` until shut down: binds, calls `ready` with the bound address (port 0 picks a
/// free one), then runs the scheduler on this thread.
pub fn run_server<B: Backend>(
    model: LoadedModel<B>,
    cfg: ServeConfig,
    ready: impl FnOnce(SocketAddr),
) -> crate::Result<()> {
    let LoadedModel { engine, tokenizer, chat_template, .. } = model;
    if cfg.max_batch == 0 || cfg.max_queue == 0 || cfg.max_prefill_tokens == 0 {
        return Err(crate::Error::Invalid(
            "--max-batch, --max-queue and --max-prefill-tokens must be at least 1".into(),
        ));
    }
    let capacity = engine.max_context;
    let kv_tokens = cfg.kv_tokens.unwrap_or((cfg.max_batch * capacity / 4).max(capacity));
    if kv_tokens < capacity {
        return Err(crate::Error::Invalid(format!(
            "--kv-tokens {kv_tokens} must hold at least one full context ({capacity} tokens)"
        )));
    }
    if cfg.admin_key.is_some() && cfg.admin_key == cfg.api_key {
        return Err(crate::Error::Invalid("--admin-key must differ from --api-key".into()));
    }
    if cfg.max_request_work == Some(0) {
        return Err(crate::Error::Invalid("--max-request-work must be at least 1".into()));
    }
    if let Some(w) = policy::warning(&cfg) {
        eprintln!("{w}");
    }
    let mut cache = engine.new_paged_cache(cfg.max_batch, capacity, kv_tokens, crate::engine::PAGE_SIZE)?;
    let registry = Registry::default();
    if let Some(dir) = &cfg.vectors_dir {
        let n = registry.load_dir(dir, &engine.config, &mut |w| eprintln!("warning: {w}"))?;
        eprintln!("loaded {n} vector(s) from {}", dir.display());
    }
    let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .map_err(|e| crate::Error::Invalid(format!("cannot bind {}:{}: {e}", cfg.host, cfg.port)))?;
    listener.set_nonblocking(true).map_err(|e| crate::Error::Invalid(e.to_string()))?;
    let addr = listener.local_addr().map_err(|e| crate::Error::Invalid(e.to_string()))?;
    let queue = Arc::new(Queue::new(cfg.max_queue));
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AppState {
        model: engine.config.clone(),
        capacity,
        tokenizer,
        template: chat_template,
        queue: queue.clone(),
        metrics: metrics.clone(),
        registry,
        default: RwLock::new(Map::new()),
        created: now_s(),
        next_id: AtomicU64::new(1),
        cfg: cfg.clone(),
    });
    let app = router(state);
    let q2 = queue.clone();
    let http = std::thread::Builder::new()
        .name("persona-http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: tokio runtime: {e}");
                    q2.shutdown.store(true, Ordering::SeqCst);
                    return;
                }
            };
            let q3 = q2.clone();
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: listener: {e}");
                        return;
                    }
                };
                let handle = cfg.handle_signals;
                let grace = cfg.grace;
                let signal = async move {
                    if !handle {
                        std::future::pending::<()>().await;
                    }
                    shutdown_signal().await;
                    eprintln!("shutting down: no new requests; in-flight ones have {}s", grace.as_secs());
                    q3.shutdown.store(true, Ordering::SeqCst);
                    let q4 = q3.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(grace);
                        q4.cancel_all.store(true, Ordering::SeqCst);
                        q4.wake();
                    });
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(signal).await {
                    eprintln!("error: http server: {e}");
                }
            });
            q2.shutdown.store(true, Ordering::SeqCst);
            q2.wake();
        })
        .map_err(|e| crate::Error::Invalid(format!("spawning the http thread: {e}")))?;
    ready(addr);
    scheduler::run(&engine, &mut cache, &queue, &metrics, cfg.max_prefill_tokens, cfg.step_delay);
    let _ = http.join();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: S) -> Router {
    let max_body = state.cfg.max_body;
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/vectors", get(admin::list_vectors).post(admin::upload_vector))
        .route("/v1/vectors/{name}", get(admin::get_vector).delete(admin::delete_vector))
        .route("/v1/steering", get(admin::get_default).put(admin::set_default).post(admin::set_default))
        .route("/metrics", get(metrics_route))
        .route("/", get(playground::index))
        .route("/playground.js", get(playground::script))
        .route("/playground.css", get(playground::style))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth_and_count))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/vectors" => "/v1/vectors",
        "/v1/steering" => "/v1/steering",
        "/metrics" => "/metrics",
        p if playground::ASSETS.contains(&p) => "/",
        p if p.starts_with("/v1/vectors/") => "/v1/vectors/{name}",
        _ => "other",
    }
}

async fn auth_and_count(State(st): State<S>, req: Request, next: Next) -> Response {
    let label = route_label(req.uri().path());
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let caller = policy::caller(&st.cfg, bearer);
    if let Err(e) = policy::authorize(&st.cfg, caller, req.method(), label) {
        st.metrics.request(label, e.status.as_u16());
        return e.into_response();
    }
    let r = next.run(req).await;
    st.metrics.request(label, r.status().as_u16());
    r
}

async fn not_found() -> Response {
    ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", "no such route").into_response()
}

async fn health(State(st): State<S>) -> Response {
    Json(json!({
        "status": "ok",
        "queue_depth": st.queue.depth(),
        "batch_size": st.metrics.batch_size.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn models(State(st): State<S>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": st.cfg.model_id,
        "object": "model",
        "created": st.created,
        "owned_by": "persona",
        "max_model_len": st.capacity,
        "n_layers": st.model.n_layers,
        "hidden_size": st.model.hidden,
    }]}))
    .into_response()
}

async fn metrics_route(State(st): State<S>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.render())
        .into_response()
}

fn body_bytes(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        let status = e.status();
        let mut err = ApiError::status(status, "invalid_request_error", format!("request body: {}", e.body_text()));
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            err.code = Some("body_too_large");
        }
        err
    })
}

fn into_response(r: ApiResult<Response>) -> Response {
    r.unwrap_or_else(|e| e.into_response())
}
