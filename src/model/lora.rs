//! PEFT-compatible LoRA adapters: the adapter as data (A `[r, in]`, B `[out, r]` per target and
//! layer), read from and written to PEFT's folder layout (`adapter_config.json` +
//! `adapter_model.safetensors`), and merged into a model's weights (`W + scale·B·A`), which is
//! how every backend runs a model with an adapter.
//!
//! ```no_run
//! use persona::model::{lora::LoraAdapter, ModelFiles};
//! let mut files = ModelFiles::open(std::path::Path::new("model-folder"))?;
//! let adapter = LoraAdapter::load(std::path::Path::new("my-adapter"), &files.config)?;
//! adapter.merge_into(&mut files.tensors)?;
//! # Ok::<(), persona::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};

use crate::atomic_file::write_atomic;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::load::{LayerTensors, ModelTensors};
use crate::model::tensor::HostTensor;

/// PEFT's adapter configuration file in an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file in an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.model.layers.";

/// A projection of the decoder block that an adapter may target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// Every target, in [`Target::index`] order.
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// Position in [`Target::ALL`] (0..7).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module name in HF / PEFT (`q_proj`, ..., `down_proj`).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The short name (`q`, ..., `down`).
    pub fn short_name(self) -> &'static str {
        self.peft_name().trim_end_matches("_proj")
    }

    /// The block sub-module that holds it: `self_attn` or `mlp`.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    /// `q` or `q_proj`, ..., `down` or `down_proj`.
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim();
        Target::ALL.into_iter().find(|t| t.peft_name() == s || t.short_name() == s).ok_or_else(|| {
            let names: Vec<&str> = Target::ALL.iter().map(|t| t.peft_name()).collect();
            Error::Invalid(format!(
                "unknown LoRA target `{s}`; valid targets: {} (or without `_proj`)",
                names.join(", ")
            ))
        })
    }

    /// `(in, out)` features of the projection in `cfg`; its weight is `[out, in]`.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, q, kv) = (cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        match self {
            Target::Q => (h, q),
            Target::K | Target::V => (h, kv),
            Target::O => (q, h),
            Target::Gate | Target::Up => (h, cfg.intermediate),
            Target::Down => (cfg.intermediate, h),
        }
    }

    fn weight_mut(self, l: &mut LayerTensors) -> &mut HostTensor {
        match self {
            Target::Q => &mut l.wq,
            Target::K => &mut l.wk,
            Target::V => &mut l.wv,
            Target::O => &mut l.wo,
            Target::Gate => &mut l.w_gate,
            Target::Up => &mut l.w_up,
            Target::Down => &mut l.w_down,
        }
    }
}

/// The PEFT keys of a target's `(A, B)` matrices in `layer`
/// (`base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight`, ...).
pub fn peft_keys(layer: usize, target: Target) -> (String, String) {
    let stem = format!("{KEY_PREFIX}{layer}.{}.{}", target.module(), target.peft_name());
    (format!("{stem}.lora_A.weight"), format!("{stem}.lora_B.weight"))
}

/// Rank, scaling and targets of an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// rsLoRA: scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// The factor on `B·A`: alpha/√r with rsLoRA, else alpha/r.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }

    /// Targets deduplicated, in [`Target::ALL`] order.
    fn normalized(mut self) -> Self {
        self.targets.sort_by_key(|t| t.index());
        self.targets.dedup();
        self
    }
}

/// One target's matrices: `a` is `[r, in]`, `b` is `[out, r]`, both row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A LoRA adapter: per layer, a pair for each target (indexed by [`Target::index`]; `Some`
/// exactly for the config's targets).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraAdapter {
    /// All-zero A and B of the right shapes for `model` (targets deduplicated, in `Target::ALL` order).
    pub fn zeros(config: LoraConfig, model: &ModelConfig) -> Self {
        let config = config.normalized();
        let r = config.r;
        let layers = (0..model.n_layers)
            .map(|_| {
                std::array::from_fn(|i| {
                    let t = Target::ALL[i];
                    config.targets.contains(&t).then(|| {
                        let (inp, out) = t.dims(model);
                        LoraPair { a: vec![0.0; r * inp], b: vec![0.0; out * r] }
                    })
                })
            })
            .collect();
        LoraAdapter { config, layers }
    }

    /// The pair of `target` in `layer`, if the adapter has one.
    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[target.index()].as_ref())
    }

    /// Read a PEFT adapter folder for `model`: every target of every layer must be present with
    /// exactly the shape `model` needs; anything PEFT would apply differently is refused.
    pub fn load(dir: &Path, model: &ModelConfig) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let st_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&st_path).map_err(|e| Error::io(&st_path, e))?;
        Self::from_parts(&text, &bytes, dir, model)
    }

    /// [`Self::load`] of a folder `dir` whose `adapter_config.json` holds `config_json` and whose
    /// `adapter_model.safetensors` holds `weights` (`dir` only names the files in errors).
    pub fn from_parts(config_json: &str, weights: &[u8], dir: &Path, model: &ModelConfig) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let v: Value =
            serde_json::from_str(config_json).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
        let config = parse_config(&cfg_path, &v)?;
        let st_path = dir.join(WEIGHTS_FILE);
        let st = SafeTensors::deserialize(weights)
            .map_err(|e| Error::format(&st_path, format!("not a valid safetensors file: {e:?}")))?;
        read_pairs(&st_path, &st, config, model)
    }

    /// Write a PEFT-loadable adapter folder (created if needed): `adapter_model.safetensors` (F32)
    /// and `adapter_config.json` naming `base_model`. Each file is written atomically.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.check_layout()?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.save_tensors(&dir.join(WEIGHTS_FILE))?;
        let c = &self.config;
        // An integral alpha is written as an integer, as PEFT's own configs have it.
        let alpha = if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e15 { json!(c.alpha as i64) } else { json!(c.alpha) };
        let v = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.r,
            "lora_alpha": alpha,
            "use_rslora": c.use_rslora,
            "target_modules": c.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "base_model_name_or_path": base_model,
            "modules_to_save": null,
            "use_dora": false,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": null,
            "layers_pattern": null,
            "revision": null,
        });
        let mut text = serde_json::to_string_pretty(&v).map_err(|e| Error::Invalid(format!("adapter config: {e}")))?;
        text.push('\n');
        write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
    }

    /// Write only the safetensors file (F32, PEFT keys, sorted), atomically; used for gradient
    /// dumps with the adapter's keys.
    pub fn save_tensors(&self, path: &Path) -> Result<()> {
        self.check_layout()?;
        let r = self.config.r;
        let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
        for (l, pairs) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &pairs[t.index()] {
                    let (ka, kb) = peft_keys(l, t);
                    tensors.insert(ka, (vec![r, p.a.len() / r], le_bytes(&p.a)));
                    tensors.insert(kb, (vec![p.b.len() / r, r], le_bytes(&p.b)));
                }
            }
        }
        let views = tensors
            .iter()
            .map(|(k, (shape, data))| {
                TensorView::new(Dtype::F32, shape.clone(), data)
                    .map(|v| (k.as_str(), v))
                    .map_err(|e| Error::Invalid(format!("LoRA tensor `{k}`: {e:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let md = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let bytes = safetensors::serialize(views, &md)
            .map_err(|e| Error::Invalid(format!("{}: cannot serialise the adapter: {e:?}", path.display())))?;
        write_atomic(path, &bytes)
    }

    /// Replace each targeted weight `W` (`[out, in]`, any storage) by the f32 tensor
    /// `W + scale·B·A` (B·A accumulated in f64 per element, added in f32), keeping its name.
    pub fn merge_into(&self, t: &mut ModelTensors) -> Result<()> {
        if self.layers.len() != t.layers.len() {
            return Err(Error::Invalid(format!(
                "the LoRA adapter has {} layers but the model has {}",
                self.layers.len(),
                t.layers.len()
            )));
        }
        let r = self.config.r;
        let scale = f64::from(self.config.scale());
        for (pairs, lt) in self.layers.iter().zip(t.layers.iter_mut()) {
            for target in Target::ALL {
                if let Some(p) = &pairs[target.index()] {
                    let w = target.weight_mut(lt);
                    *w = merged(w, p, r, scale)?;
                }
            }
        }
        Ok(())
    }

    /// Every layer holds a pair exactly for the config's targets, with sizes that are multiples of r.
    fn check_layout(&self) -> Result<()> {
        let r = self.config.r;
        if r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        for (l, pairs) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                let want = self.config.targets.contains(&t);
                match &pairs[t.index()] {
                    Some(_) if !want => {
                        return Err(Error::Invalid(format!(
                            "LoRA layer {l} has a pair for {} that the config does not target",
                            t.peft_name()
                        )))
                    }
                    None if want => {
                        return Err(Error::Invalid(format!("LoRA layer {l} has no pair for {}", t.peft_name())))
                    }
                    Some(p) if p.a.is_empty() || p.a.len() % r != 0 || p.b.is_empty() || p.b.len() % r != 0 => {
                        return Err(Error::Invalid(format!(
                            "LoRA layer {l} {}: A has {} values and B {}, not whole rows of r = {r}",
                            t.peft_name(),
                            p.a.len(),
                            p.b.len()
                        )))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `w + scale·B·A` as a new f32 tensor with `w`'s name.
fn merged(w: &HostTensor, p: &LoraPair, r: usize, scale: f64) -> Result<HostTensor> {
    let (out, inp) = match w.shape[..] {
        [o, i] => (o, i),
        _ => return Err(Error::Invalid(format!("weight `{}` has shape {:?}, not a matrix", w.name, w.shape))),
    };
    if p.a.len() != r * inp || p.b.len() != out * r {
        return Err(Error::Invalid(format!(
            "LoRA pair for `{}` ({out}×{inp}) has A of {} and B of {} values; expected [{r}, {inp}] and [{out}, {r}]",
            w.name,
            p.a.len(),
            p.b.len()
        )));
    }
    let mut data = w.to_f32();
    // One output row at a time: row o of B·A is Σ_k B[o,k]·A[k,:], a sum of r rows of A.
    data.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
        let mut acc = vec![0f64; inp];
        for (k, &bk) in p.b[o * r..(o + 1) * r].iter().enumerate() {
            let bk = f64::from(bk);
            for (s, &a) in acc.iter_mut().zip(&p.a[k * inp..(k + 1) * inp]) {
                *s += bk * f64::from(a);
            }
        }
        for (x, s) in row.iter_mut().zip(&acc) {
            *x += (scale * s) as f32;
        }
    });
    Ok(HostTensor::from_f32(w.name.clone(), w.shape.clone(), data))
}

/// The fields of a PEFT `adapter_config.json` that decide what the adapter computes.
fn parse_config(path: &Path, v: &Value) -> Result<LoraConfig> {
    let bad = |m: String| Error::format(path, m);
    let unsupported = |field: &str, why: &str| Error::Unsupported(format!("{}: `{field}` {why}", path.display()));
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(unsupported("peft_type", &format!("is \"{other}\"; only \"LORA\" adapters are supported")))
        }
        None => return Err(bad("missing string field `peft_type` (expected \"LORA\")".into())),
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0 && r <= 1 << 20)
        .ok_or_else(|| bad("`r` must be a positive whole number".into()))? as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite())
        .ok_or_else(|| bad("`lora_alpha` must be a number".into()))?;
    let bool_field = |k: &str| -> Result<bool> {
        match field(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => Err(bad(format!("`{k}` must be true or false, not {x}"))),
        }
    };
    let use_rslora = bool_field("use_rslora")?;
    for (k, why) in [
        ("use_dora", "is true: DoRA adapters are not supported"),
        ("fan_in_fan_out", "is true: only nn.Linear weights ([out, in]) are supported"),
        ("lora_bias", "is true: LoRA biases are not supported"),
        ("use_qalora", "is true: QALoRA adapters are not supported"),
    ] {
        if bool_field(k)? {
            return Err(unsupported(k, why));
        }
    }
    match field("bias") {
        None => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(x) => return Err(unsupported("bias", &format!("is {x}; only \"none\" is supported (no trained biases)"))),
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        match field(k) {
            None => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(_) => return Err(unsupported(k, "is not empty: per-module ranks or alphas are not supported")),
        }
    }
    for (k, why) in [
        ("layers_to_transform", "is set: adapters on only some layers are not supported"),
        ("modules_to_save", "is set: fully trained extra modules are not supported"),
        ("layer_replication", "is set: layer replication is not supported"),
        ("target_parameters", "is set: adapters on raw parameters are not supported"),
        ("trainable_token_indices", "is set: trainable token embeddings are not supported"),
    ] {
        match field(k) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => return Err(unsupported(k, why)),
        }
    }
    let names: Vec<&str> = Target::ALL.iter().map(|t| t.peft_name()).collect();
    let targets = match field("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                let s = x.as_str().ok_or_else(|| bad(format!("`target_modules` entry {x} is not a string")))?;
                match Target::ALL.into_iter().find(|t| t.peft_name() == s) {
                    Some(t) => Ok(t),
                    None => Err(unsupported(
                        "target_modules",
                        &format!("names `{s}`; supported modules: {}", names.join(", ")),
                    )),
                }
            })
            .collect::<Result<Vec<_>>>()?,
        // PEFT reads a string as a regular expression over module paths; only a single module
        // name (and "all-linear", every projection of the block) is understood here.
        Some(Value::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
        Some(Value::String(s)) => match Target::ALL.into_iter().find(|t| t.peft_name() == s) {
            Some(t) => vec![t],
            None => {
                return Err(unsupported(
                    "target_modules",
                    &format!(
                        "is the pattern \"{s}\"; patterns are not supported: give a list of module names ({})",
                        names.join(", ")
                    ),
                ))
            }
        },
        _ => return Err(bad("`target_modules` must be a list of module names".into())),
    };
    if targets.is_empty() {
        return Err(bad("`target_modules` is empty".into()));
    }
    Ok(LoraConfig { r, alpha, use_rslora, targets }.normalized())
}

/// `(layer, target, is_b)` of a PEFT key (with or without the `.default` adapter-name infix).
fn parse_key(key: &str) -> Option<(usize, Target, bool)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let layer = layer.parse().ok()?;
    let (module, rest) = rest.split_once('.')?;
    let (proj, rest) = rest.split_once('.')?;
    let target = Target::ALL.into_iter().find(|t| t.module() == module && t.peft_name() == proj)?;
    let is_b = match rest {
        "lora_A.weight" | "lora_A.default.weight" => false,
        "lora_B.weight" | "lora_B.default.weight" => true,
        _ => return None,
    };
    Some((layer, target, is_b))
}

fn to_f32(path: &Path, key: &str, t: &TensorView) -> Result<Vec<f32>> {
    let d = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(Error::format(path, format!("tensor `{key}` has dtype {other:?}; expected F32, F16 or BF16")))
        }
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::format(path, format!("tensor `{key}` has a non-finite value ({}) at element {i}", v[i])));
    }
    Ok(v)
}

/// Every pair of `config` for every layer of `model`, from the safetensors `st`.
fn read_pairs(path: &Path, st: &SafeTensors, config: LoraConfig, model: &ModelConfig) -> Result<LoraAdapter> {
    let r = config.r;
    let mut found: HashMap<(usize, Target, bool), (String, Vec<f32>)> = HashMap::new();
    let mut unknown = Vec::new();
    let mut keys: Vec<&str> = st.names().into_iter().map(String::as_str).collect();
    keys.sort();
    for key in keys {
        let Some((layer, target, is_b)) = parse_key(key) else {
            unknown.push(key.to_string());
            continue;
        };
        if !config.targets.contains(&target) {
            unknown.push(format!("{key} ({} is not in target_modules)", target.peft_name()));
            continue;
        }
        if layer >= model.n_layers {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{key}` is for layer {layer} but the model has {} layers — an adapter for another model?",
                    model.n_layers
                ),
            ));
        }
        let t = st.tensor(key).map_err(|e| Error::format(path, format!("tensor `{key}`: {e:?}")))?;
        let (inp, out) = target.dims(model);
        let want = if is_b { [out, r] } else { [r, inp] };
        if t.shape() != want {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{key}` has shape {:?}, expected {:?} (r = {r}) — an adapter for another model?",
                    t.shape(),
                    want
                ),
            ));
        }
        let data = to_f32(path, key, &t)?;
        if let Some((first, _)) = found.insert((layer, target, is_b), (key.to_string(), data)) {
            return Err(Error::format(path, format!("tensors `{first}` and `{key}` are the same matrix given twice")));
        }
    }
    if !unknown.is_empty() {
        let n = unknown.len();
        unknown.truncate(8);
        return Err(Error::format(
            path,
            format!("{n} unexpected tensor(s): {}{}", unknown.join(", "), if n > 8 { ", ..." } else { "" }),
        ));
    }
    let mut layers = Vec::with_capacity(model.n_layers);
    for l in 0..model.n_layers {
        let mut pairs: [Option<LoraPair>; 7] = Default::default();
        for &t in &config.targets {
            let (ka, kb) = peft_keys(l, t);
            let mut take = |is_b: bool, key: &str| {
                found.remove(&(l, t, is_b)).map(|(_, v)| v).ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "missing tensor `{key}` ({} is in target_modules; the model has {} layers) — an adapter for another model?",
                            t.peft_name(),
                            model.n_layers
                        ),
                    )
                })
            };
            let a = take(false, &ka)?;
            let b = take(true, &kb)?;
            pairs[t.index()] = Some(LoraPair { a, b });
        }
        layers.push(pairs);
    }
    Ok(LoraAdapter { config, layers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn model(name: &str) -> ModelConfig {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).join("config.json");
        ModelConfig::from_hf_json(&p).unwrap()
    }

    /// An adapter with distinct, non-trivial values everywhere.
    fn filled(cfg: LoraConfig, m: &ModelConfig) -> LoraAdapter {
        let mut a = LoraAdapter::zeros(cfg, m);
        let mut x = 0.1f32;
        for pairs in &mut a.layers {
            for p in pairs.iter_mut().flatten() {
                for v in p.a.iter_mut().chain(p.b.iter_mut()) {
                    x = (x * 3.7 + 0.31).fract();
                    *v = x - 0.5;
                }
            }
        }
        a
    }

    fn cfg(targets: &[Target]) -> LoraConfig {
        LoraConfig { r: 3, alpha: 6.0, use_rslora: false, targets: targets.to_vec() }
    }

    #[test]
    fn save_load_round_trip_is_exact() {
        let m = model("tiny-llama");
        let a = filled(cfg(&[Target::Down, Target::Q, Target::V]), &m);
        assert_eq!(a.config.targets, [Target::Q, Target::V, Target::Down]);
        let d = tempfile::tempdir().unwrap();
        a.save(d.path(), "tiny-llama").unwrap();
        let b = LoraAdapter::load(d.path(), &m).unwrap();
        assert_eq!(a, b);
        assert_eq!(b.config.scale(), 2.0);
        let rs = LoraConfig { use_rslora: true, r: 4, alpha: 8.0, targets: vec![Target::Q] };
        assert_eq!(rs.scale(), 4.0);
    }

    #[test]
    fn wrong_shape_names_the_key() {
        let (llama, qwen) = (model("tiny-llama"), model("tiny-qwen2"));
        let a = filled(cfg(&[Target::Up]), &llama);
        let d = tempfile::tempdir().unwrap();
        a.save(d.path(), "tiny-llama").unwrap();
        let e = LoraAdapter::load(d.path(), &qwen).unwrap_err().to_string();
        assert!(e.contains("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"), "{e}");
        assert!(e.contains("[3, 64]") && e.contains("[3, 96]") && e.contains("another model"), "{e}");
    }

    #[test]
    fn unknown_target_names_are_refused() {
        let e = Target::parse("qkv_proj").unwrap_err().to_string();
        assert!(e.contains("qkv_proj") && e.contains("down_proj"), "{e}");
        assert_eq!(Target::parse("gate").unwrap(), Target::Gate);
        assert_eq!(Target::parse("o_proj").unwrap(), Target::O);
        // In adapter_config.json, too.
        let m = model("tiny-llama");
        let d = tempfile::tempdir().unwrap();
        filled(cfg(&[Target::Q]), &m).save(d.path(), "x").unwrap();
        let p = d.path().join(CONFIG_FILE);
        let text = std::fs::read_to_string(&p).unwrap().replace("\"q_proj\"", "\"lm_head\"");
        std::fs::write(&p, text).unwrap();
        let e = LoraAdapter::load(d.path(), &m).unwrap_err().to_string();
        assert!(e.contains("target_modules") && e.contains("lm_head"), "{e}");
    }

    #[test]
    fn unsupported_config_fields_are_named() {
        let m = model("tiny-llama");
        let d = tempfile::tempdir().unwrap();
        filled(cfg(&[Target::Q]), &m).save(d.path(), "x").unwrap();
        let p = d.path().join(CONFIG_FILE);
        let orig: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        for (k, v) in [
            ("use_dora", json!(true)),
            ("bias", json!("all")),
            ("rank_pattern", json!({"q_proj": 8})),
            ("alpha_pattern", json!({"q_proj": 8})),
            ("layers_to_transform", json!([0])),
            ("modules_to_save", json!(["lm_head"])),
            ("fan_in_fan_out", json!(true)),
            ("peft_type", json!("LOHA")),
            ("target_modules", json!(".*proj")),
        ] {
            let mut c = orig.clone();
            c[k] = v;
            std::fs::write(&p, serde_json::to_string(&c).unwrap()).unwrap();
            let e = LoraAdapter::load(d.path(), &m).unwrap_err().to_string();
            assert!(e.contains(k), "{k}: {e}");
        }
    }

    #[test]
    fn merge_adds_scaled_product() {
        let m = model("tiny-llama");
        let a = filled(LoraConfig { r: 2, alpha: 3.0, use_rslora: false, targets: vec![Target::K] }, &m);
        let w = HostTensor::from_f32("k", vec![32, 64], (0..32 * 64).map(|i| i as f32 * 1e-3).collect());
        let p = a.pair(0, Target::K).unwrap();
        let got = merged(&w, p, 2, 1.5).unwrap().to_f32();
        let (o, i) = (5, 17);
        let want = w.to_f32()[o * 64 + i] + 1.5 * (p.b[o * 2] * p.a[i] + p.b[o * 2 + 1] * p.a[64 + i]);
        assert!((got[o * 64 + i] - want).abs() < 1e-6);
        assert!(merged(&w, p, 3, 1.5).is_err());
    }
}
