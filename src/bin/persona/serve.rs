//! `persona serve`: the OpenAI-compatible server (see `persona::serve`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use persona::backend::Backend;
use persona::serve::{run_server, ServeConfig};
use persona::LoadedModel;

use crate::{ModelArgs, ModelTask};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "PERSONA_API_KEY")]
    pub api_key: Option<String>,
    /// Reserve the routes that change the server's state (POST /v1/vectors, DELETE
    /// /v1/vectors/NAME, PUT /v1/steering) for `Authorization: Bearer ADMIN_KEY` (the API key gets
    /// 403 there; the admin key works everywhere). Without it the API key covers everything.
    #[arg(long, env = "PERSONA_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// Whether a request's own `steering` may replace the server-wide default steering (PUT
    /// /v1/steering). With false, while a default steering is set, a request carrying a
    /// `steering` key (even [] or null) gets 403; `monitor` stays allowed.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub allow_steering_override: bool,
    /// Most work one request may ask for: n × (prompt tokens + max_tokens) × (1 + steering ops,
    /// one per layer), max_tokens being the context's room when omitted; beyond it 400
    /// (default: 4 × max-batch × context).
    #[arg(long)]
    pub max_request_work: Option<usize>,
    /// Load every *.safetensors / *.gguf vector in this folder into the registry.
    #[arg(long)]
    pub vectors: Option<PathBuf>,
    /// Sequences decoding at once (KV-cache slots).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// KV-cache pool shared by all running sequences, in tokens (pages of 16; default: a quarter
    /// of max-batch full contexts, at least one context). Sequences take pages as they grow; when
    /// the pool runs out the latest admitted are paused and recomputed later.
    #[arg(long)]
    pub kv_tokens: Option<usize>,
    /// Most prompt tokens prefilled per step, across sequences (chunked prefill): long prompts are
    /// fed over several steps, oldest first, so the other streams keep decoding.
    #[arg(long, default_value_t = 512)]
    pub max_prefill_tokens: usize,
    /// Sequences waiting for a slot; beyond it requests get HTTP 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Model id reported by /v1/models (default: the model file's stem).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Seconds in-flight requests get to finish after Ctrl-C / SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Sleep this many milliseconds after each scheduler step (testing).
    #[arg(long, hide = true)]
    pub step_delay_ms: Option<u64>,
}

impl ModelTask for ServeArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        let model_id = self.model_id.clone().unwrap_or_else(|| {
            m.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "persona".into())
        });
        let cfg = ServeConfig {
            host: self.host,
            port: self.port,
            api_key: self.api_key.filter(|k| !k.is_empty()),
            admin_key: self.admin_key.filter(|k| !k.is_empty()),
            allow_steering_override: self.allow_steering_override,
            max_request_work: self.max_request_work,
            vectors_dir: self.vectors,
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            kv_tokens: self.kv_tokens,
            max_prefill_tokens: self.max_prefill_tokens,
            model_id,
            step_delay: self.step_delay_ms.map(std::time::Duration::from_millis),
            handle_signals: true,
            grace: std::time::Duration::from_secs(self.grace),
            ..ServeConfig::default()
        };
        run_server(m, cfg, |addr| {
            println!("persona serve: listening on http://{addr}");
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        })?;
        Ok(())
    }
}
