//! The run-time vector registry and the JSON form of steering and monitoring:
//! `"steering": [{"vector": NAME, "layers": "12" | "10-14" | "all" | [12, 13] | 12, "coeff": 4,
//! "op": "add", "positions": "all", "scale": "raw" | "relative", "when": "evil:gt:3.5" (or "evil>3.5")}]` and
//! `"monitor": [{"vector": NAME, "layers": .., "threshold": .., "name": ..}]`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::{json, Map, Value};

use super::api::{ApiError, ApiResult};
use crate::model::config::ModelConfig;
use crate::steer::spec::{baseline_of, mean_norms, op_and_origin, Layers, WhenSpec};
use crate::steer::vector::{PersonaVector, GGUF_MAGIC};
use crate::steer::{Cmp, Condition, OpSource, Positions, Probe, SeqSteering, SteerKind, SteerOp};

/// Largest |coeff| accepted (raw multiples, or clamp targets); beyond it the text is noise.
pub const MAX_COEFF: f32 = 1.0e4;

#[derive(Default)]
pub struct Registry {
    pub vectors: RwLock<BTreeMap<String, Arc<PersonaVector>>>,
}

/// One monitor of a request: a probe per layer, with an optional threshold.
#[derive(Debug, Clone)]
pub struct MonitorInfo {
    pub name: String,
    pub vector: String,
    pub layer: usize,
    pub threshold: Option<f32>,
}

/// What a request (or the server default) asks of the residual stream.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub steering: SeqSteering,
    /// One per probe, in probe order.
    pub monitors: Vec<MonitorInfo>,
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

fn layers_of(v: &Value, n_layers: usize, param: &str) -> ApiResult<Vec<usize>> {
    let out = match v {
        Value::Number(x) => {
            vec![x.as_u64().ok_or_else(|| ApiError::param(param, format!("layer {x} is not a non-negative integer")))?
                as usize]
        }
        Value::String(s) => Layers::parse(s).map_err(|e| ApiError::param(param, e.to_string()))?.resolve(n_layers),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::param(param, "layers must be a list of non-negative integers"))?,
        _ => return Err(ApiError::param(param, "layers must be a number, \"A-B\", \"all\" or a list")),
    };
    if out.is_empty() {
        return Err(ApiError::param(param, "no layers given"));
    }
    if let Some(&l) = out.iter().find(|&&l| l > n_layers) {
        return Err(ApiError::param(param, format!("layer {l} is out of range: this model has layers 0..={n_layers}"))
            .with_code("layer_out_of_range"));
    }
    Ok(out)
}

fn str_field<'a>(o: &'a Map<String, Value>, k: &str, param: &str) -> ApiResult<Option<&'a str>> {
    match o.get(k).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ApiError::param(param, format!("`{k}` must be a string, got {v}"))),
    }
}

fn num_field(o: &Map<String, Value>, k: &str, param: &str) -> ApiResult<Option<f32>> {
    match o.get(k).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && (x.abs() as f32) <= MAX_COEFF => Ok(Some(x as f32)),
            _ => Err(ApiError::param(
                param,
                format!("`{k}` must be a finite number with magnitude at most {MAX_COEFF}, got {v}"),
            )
            .with_code("invalid_coefficient")),
        },
    }
}

fn check_keys(o: &Map<String, Value>, known: &[&str], param: &str) -> ApiResult<()> {
    for k in o.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::param(param, format!("unknown key `{k}` (known: {})", known.join(", "))));
        }
    }
    Ok(())
}

fn lookup(reg: &Registry, name: &str, param: &str, cfg: &ModelConfig) -> ApiResult<Arc<PersonaVector>> {
    let v = reg.get(name).ok_or_else(|| {
        let names: Vec<String> = reg.vectors.read().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        ApiError::param(param, format!("unknown vector `{name}` (registered: {})", names.join(", ")))
            .with_code("unknown_vector")
    })?;
    v.check_model(cfg.hidden, cfg.n_layers)
        .map_err(|e| ApiError::param(param, format!("vector `{name}` does not fit this model: {e}")))?;
    Ok(v)
}

fn row(v: &PersonaVector, l: usize, param: &str) -> ApiResult<Arc<[f32]>> {
    v.check_layer(l).map_err(|e| ApiError::param(param, e.to_string()))?;
    Ok(Arc::from(v.layer(l)))
}

/// The CLI's condition syntax: `NAME[@L]:gt:τ`, `:lt:τ`, `NAME[@L]>τ` or `<τ`.
fn parse_when(w: &str, param: &str) -> ApiResult<(String, Option<usize>, Cmp, f32)> {
    let c = WhenSpec::parse_condition(w).map_err(|e| ApiError::param(param, e))?;
    Ok((c.probe, c.layer, c.cmp, c.threshold))
}

fn as_list<'a>(v: Option<&'a Value>, param: &str) -> ApiResult<&'a [Value]> {
    match v {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(ApiError::param(param, format!("`{param}` must be a list of objects"))),
    }
}

/// Resolve the `steering` and `monitor` extensions against the registry and the model.
pub fn resolve(
    steer: Option<&Value>,
    monitor: Option<&Value>,
    reg: &Registry,
    cfg: &ModelConfig,
) -> ApiResult<Resolved> {
    let n = cfg.n_layers;
    let mut out = Resolved::default();
    let mut by_name: HashMap<String, Arc<PersonaVector>> = HashMap::new();
    for (i, m) in as_list(monitor, "monitor")?.iter().enumerate() {
        let param = format!("monitor[{i}]");
        let o = m.as_object().ok_or_else(|| ApiError::param(&param, "each monitor must be an object"))?;
        check_keys(o, &["vector", "layers", "layer", "threshold", "name"], &param)?;
        let vname = str_field(o, "vector", &param)?.ok_or_else(|| ApiError::param(&param, "missing `vector`"))?;
        let v = lookup(reg, vname, &param, cfg)?;
        let name = str_field(o, "name", &param)?.unwrap_or(vname).to_string();
        let layers = match o.get("layers").or(o.get("layer")).filter(|x| !x.is_null()) {
            Some(l) => layers_of(l, n, &param)?,
            None => match v.metadata.get("persona.layer").and_then(|s| s.parse::<usize>().ok()) {
                Some(l) if l <= n => vec![l],
                _ => (1..=n).collect(),
            },
        };
        let threshold = num_field(o, "threshold", &param)?;
        if by_name.insert(name.clone(), v.clone()).is_some() {
            return Err(ApiError::param(&param, format!("two monitors are named `{name}`: give one a `name`")));
        }
        for l in layers {
            out.steering.probes.push(Probe { name: name.clone(), layer: l, vector: row(&v, l, &param)? });
            out.monitors.push(MonitorInfo { name: name.clone(), vector: vname.to_string(), layer: l, threshold });
        }
    }
    for (i, s) in as_list(steer, "steering")?.iter().enumerate() {
        let param = format!("steering[{i}]");
        let o = s.as_object().ok_or_else(|| ApiError::param(&param, "each steering op must be an object"))?;
        check_keys(o, &["vector", "layers", "layer", "coeff", "op", "positions", "scale", "when", "origin"], &param)?;
        let vname = str_field(o, "vector", &param)?.ok_or_else(|| ApiError::param(&param, "missing `vector`"))?;
        let v = lookup(reg, vname, &param, cfg)?;
        let layers = match o.get("layers").or(o.get("layer")).filter(|x| !x.is_null()) {
            Some(l) => layers_of(l, n, &param)?,
            None => return Err(ApiError::param(&param, "missing `layers` (a number, \"A-B\", \"all\" or a list)")),
        };
        let op = str_field(o, "op", &param)?.unwrap_or("add");
        let has = |k: &str| o.get(k).is_some_and(|x| !x.is_null());
        let (kind, from_baseline) = op_and_origin(op, str_field(o, "origin", &param)?, has("coeff"), has("when"))
            .map_err(|e| ApiError::param(&param, e))?;
        let coeff = match (num_field(o, "coeff", &param)?, kind) {
            (Some(c), _) => c,
            (None, SteerKind::Ablate) => 0.0,
            (None, _) if op == "center" => 0.0,
            (None, _) => return Err(ApiError::param(&param, "missing `coeff`")),
        };
        let positions = match str_field(o, "positions", &param)?.unwrap_or("all") {
            "all" => Positions::All,
            "prompt" => Positions::Prompt,
            "response" => Positions::Response,
            x => return Err(ApiError::param(&param, format!("unknown positions `{x}` (all, prompt, response)"))),
        };
        let relative = match str_field(o, "scale", &param)?.unwrap_or("raw") {
            "raw" => false,
            "relative" => true,
            x => return Err(ApiError::param(&param, format!("unknown scale `{x}` (raw, relative)"))),
        };
        let when_text = str_field(o, "when", &param)?;
        let when = when_text.map(|w| parse_when(w, &param)).transpose()?;
        let first = out.steering.plan.ops.len();
        for l in layers {
            let vector = row(&v, l, &param)?;
            let mut c = coeff;
            if relative && kind != SteerKind::Ablate {
                let hl = mean_norms(&v).map_err(|e| ApiError::param(&param, e.to_string()))?[l];
                c = if kind == SteerKind::Add { coeff * hl / v.norm(l) } else { coeff * hl };
            }
            let base =
                |v: &PersonaVector, l: usize| baseline_of(v, l).map_err(|e| ApiError::param(&param, e.to_string()));
            if from_baseline && kind == SteerKind::Clamp {
                c += base(&v, l)?;
            }
            let when = match &when {
                None => None,
                Some((probe, layer, cmp, t)) => {
                    let cv = if probe == "self" {
                        v.clone()
                    } else {
                        by_name.get(probe).cloned().ok_or_else(|| {
                            ApiError::param(&param, format!("when: no monitor named `{probe}` (or use `self`)"))
                        })?
                    };
                    let cl = layer.unwrap_or(l);
                    if cl > l {
                        return Err(ApiError::param(
                            &param,
                            format!("when reads layer {cl}, after the op's layer {l}"),
                        ));
                    }
                    let threshold = if from_baseline { *t + base(&cv, cl)? } else { *t };
                    Some(Condition { vector: row(&cv, cl, &param)?, layer: cl, cmp: *cmp, threshold })
                }
            };
            out.steering.plan.ops.push(SteerOp { kind, layer: l, vector, coeff: c, positions, when });
        }
        out.steering.sources.push(OpSource {
            vector: vname.to_string(),
            sha256: v.sha256(),
            ops: first..out.steering.plan.ops.len(),
            when: when_text.map(str::to_string),
        });
    }
    out.steering.validate(cfg.hidden, cfg.n_layers).map_err(|e| ApiError::bad(Some("steering"), e.to_string()))?;
    Ok(out)
}
