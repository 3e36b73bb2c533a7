//! The run-time vector registry, and the resolution of a request's `steering` and `monitor`
//! lists against it. Their JSON form is the library's request type ([`crate::steer::request`]):
//! `"steering": [{"vector": NAME, "layers": "12" | "10-14" | "all" | [12, 13] | 12, "coeff": 4,
//! "op": "add", "positions": "all", "scale": "raw" | "relative", "when": "evil:gt:3.5" (or "evil>3.5")}]` and
//! `"monitor": [{"vector": NAME, "layers": .., "threshold": .., "name": ..}]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::{json, Value};

use super::api::{ApiError, ApiResult};
use crate::model::config::ModelConfig;
use crate::steer::request::{self, Item, ReqError, VectorSource};
use crate::steer::vector::{PersonaVector, GGUF_MAGIC};

pub use crate::steer::request::{MonitorInfo, Resolved, MAX_COEFF};

#[derive(Default)]
pub struct Registry {
    pub vectors: RwLock<BTreeMap<String, Arc<PersonaVector>>>,
}

pub fn vector_json(v: &PersonaVector) -> Value {
    let norms = v.norms();
    json!({
        "name": v.name,
        "object": "persona.vector",
        "n_layers": v.n_layers,
        "hidden": v.hidden,
        "metadata": v.metadata,
        "norms": norms,
        "max_norm_layer": v.max_norm_layer(),
    })
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<PersonaVector>> {
        self.vectors.read().ok()?.get(name).cloned()
    }

    pub fn insert(&self, v: PersonaVector) {
        if let Ok(mut m) = self.vectors.write() {
            m.insert(v.name.clone(), Arc::new(v));
        }
    }

    pub fn remove(&self, name: &str) -> bool {
        self.vectors.write().map(|mut m| m.remove(name).is_some()).unwrap_or(false)
    }

    pub fn list(&self) -> Vec<Value> {
        self.vectors.read().map(|m| m.values().map(|v| vector_json(v)).collect()).unwrap_or_default()
    }

    /// Load every `*.safetensors` and `*.gguf` in `dir` (a file that does not fit the model is
    /// skipped with a warning).
    pub fn load_dir(&self, dir: &Path, cfg: &ModelConfig, warn: &mut dyn FnMut(String)) -> crate::Result<usize> {
        let rd = std::fs::read_dir(dir).map_err(|e| crate::Error::io(dir, e))?;
        let mut n = 0;
        let mut paths: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != "safetensors" && ext != "gguf" {
                continue;
            }
            match PersonaVector::load_for_model(&p, cfg) {
                Ok(v) => {
                    self.insert(v);
                    n += 1;
                }
                Err(e) => warn(format!("skipping vector {}: {e}", p.display())),
            }
        }
        Ok(n)
    }
}

/// Parse an uploaded vector: persona safetensors bytes or a llama.cpp control-vector GGUF.
pub fn parse_upload(bytes: &[u8], name: Option<&str>, cfg: &ModelConfig) -> ApiResult<PersonaVector> {
    if bytes.is_empty() {
        return Err(ApiError::bad(None, "empty upload: send the vector file's bytes as the request body"));
    }
    let label = name.unwrap_or("upload");
    let mut v = if bytes.starts_with(GGUF_MAGIC) {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "persona-upload-{}-{}.gguf",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        ));
        std::fs::write(&path, bytes).map_err(|e| ApiError::bad(None, format!("writing the upload: {e}")))?;
        let r = crate::steer::control_vector::import_control_vector(&path, cfg);
        let _ = std::fs::remove_file(&path);
        r.map_err(|e| ApiError::bad(None, format!("control vector: {e}")))?
    } else {
        let p = Path::new(label);
        let v = PersonaVector::from_safetensors_bytes(bytes, p).map_err(|e| ApiError::bad(None, e.to_string()))?;
        v.check_model(cfg.hidden, cfg.n_layers).map_err(|e| {
            ApiError::bad(None, format!("vector is for another model: {e}")).with_code("model_mismatch")
        })?;
        v
    };
    if let Some(n) = name {
        v.name = n.to_string();
    }
    if v.name.is_empty() || v.name == "upload" && name.is_none() {
        return Err(ApiError::param("name", "give the vector a name: POST /v1/vectors?name=NAME"));
    }
    Ok(v)
}

impl VectorSource for &Registry {
    fn vector(&mut self, name: &str, _: &ModelConfig, _: &mut Vec<String>) -> Result<Arc<PersonaVector>, ReqError> {
        self.get(name).ok_or_else(|| {
            let names: Vec<String> = self.vectors.read().map(|m| m.keys().cloned().collect()).unwrap_or_default();
            ReqError::new(format!("unknown vector `{name}` (registered: {})", names.join(", "))).code("unknown_vector")
        })
    }
}

fn api_error((item, e): (Item, ReqError)) -> ApiError {
    let err = ApiError::param(&item.param(), e.message);
    match e.code {
        Some(c) => err.with_code(c),
        None => err,
    }
}

/// Resolve a request's `steering` and `monitor` lists (the library's request type,
/// [`crate::steer::request`]) against the registry and the model.
pub fn resolve(
    steer: Option<&Value>,
    monitor: Option<&Value>,
    reg: &Registry,
    cfg: &ModelConfig,
) -> ApiResult<Resolved> {
    let steer = request::steer_list(steer).map_err(api_error)?;
    let monitor = request::monitor_list(monitor).map_err(api_error)?;
    request::resolve(&steer, &monitor, &mut &*reg, cfg).map_err(api_error)
}
