//! The steering request: one type for what a user asks of the residual stream, whichever front
//! end they use. The CLI's `--steer`/`--monitor` SPEC strings ([`crate::steer::spec`]), the
//! server's JSON `steering`/`monitor` lists and the Python keyword arguments all parse into
//! [`SteerRequest`] and [`MonitorRequest`] through [`SteerRequest::from_json`] /
//! [`MonitorRequest::from_json`], and [`resolve`] turns them into a [`SeqSteering`] against a
//! model, with vectors looked up by a [`VectorSource`]. So there is one set of defaults and one
//! set of error messages; each front end only says where the error was (`--steer SPEC`,
//! `steering[0]`, `steer[0]`).
//!
//! JSON form (every key but `vector` optional):
//! `{"vector": NAME | PATH | [h…] | [[h…] × (N+1)], "layers": 12 | "10-14" | "3+7" | "all" | [12, 13],
//!   "coeff": 4, "op": "add" | "ablate" | "clamp" | "center", "positions": "all" | "prompt" | "response",
//!   "when": "evil:gt:3.5", "scale": "raw" | "relative", "origin": "zero" | "baseline"}` and
//! `{"vector": .., "layers": .., "name": .., "threshold": ..}`. `layer` is a synonym of `layers`.
//! Numbers may also be given as strings (the CLI's `coeff=4`).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::model::config::ModelConfig;
use crate::steer::spec::{baseline_of, mean_norms, op_and_origin, recorded_layer, Layers, WhenSpec, RELATIVE_WINDOW};
use crate::steer::vector::PersonaVector;
use crate::steer::{Condition, OpSource, Positions, Probe, SeqSteering, SteerKind, SteerOp};

/// Largest |coeff| (raw multiple or clamp target) and |threshold| accepted; beyond it the text is
/// noise and the number is a typo.
pub const MAX_COEFF: f32 = 1.0e4;

/// Keys of a steering op and of a monitor.
pub const STEER_KEYS: &[&str] = &["vector", "layers", "layer", "coeff", "op", "positions", "when", "scale", "origin"];
pub const MONITOR_KEYS: &[&str] = &["vector", "layers", "layer", "name", "threshold"];

/// What is wrong with one request item: the message every front end shows, and a stable code
/// for the HTTP API (`unknown_vector`, `layer_out_of_range`, `invalid_coefficient`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReqError {
    pub message: String,
    pub code: Option<&'static str>,
}

impl ReqError {
    pub fn new(message: impl Into<String>) -> Self {
        ReqError { message: message.into(), code: None }
    }
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<crate::Error> for ReqError {
    fn from(e: crate::Error) -> Self {
        match e {
            // The item's location is added by the front end; "invalid input: " would only repeat it.
            crate::Error::Invalid(m) => ReqError::new(m),
            e => ReqError::new(e.to_string()),
        }
    }
}

type R<T> = std::result::Result<T, ReqError>;

/// The vector a request item names.
#[derive(Debug, Clone, PartialEq)]
pub enum VectorRef {
    /// A registered name, a vector file's name in the vector folders, or a path.
    Name(String),
    /// The vector's values: one row of `hidden` (the same direction at every layer the item
    /// names) or N+1 rows (one per residual index).
    Rows(Vec<Vec<f32>>),
}

impl VectorRef {
    /// What the item is called when it names no `name`: a path's file stem, else the name as
    /// written; `inline` for values.
    pub fn label(&self) -> String {
        match self {
            VectorRef::Name(s) => {
                let p = std::path::Path::new(s);
                let is_file = s.ends_with(".safetensors") || s.ends_with(".gguf") || p.components().count() > 1;
                match p.file_stem() {
                    Some(stem) if is_file => stem.to_string_lossy().to_string(),
                    _ => s.clone(),
                }
            }
            VectorRef::Rows(_) => "inline".to_string(),
        }
    }

    /// The name or path, if the vector is not given by value.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            VectorRef::Name(s) => Some(std::path::Path::new(s)),
            VectorRef::Rows(_) => None,
        }
    }

    fn from_json(v: Option<&Value>) -> R<Self> {
        match v.filter(|v| !v.is_null()) {
            None => Err(ReqError::new("missing `vector` (a name, a path, or a list of numbers)")),
            Some(Value::String(s)) if s.trim().is_empty() => Err(ReqError::new("`vector` is empty")),
            Some(Value::String(s)) => Ok(VectorRef::Name(s.clone())),
            Some(Value::Array(a)) if a.is_empty() => Err(ReqError::new("`vector` is an empty list")),
            Some(Value::Array(a)) => {
                let row = |v: &Value| -> R<Vec<f32>> {
                    let a = v.as_array().ok_or_else(|| ReqError::new("`vector` rows must all be lists of numbers"))?;
                    a.iter()
                        .map(|x| match x.as_f64() {
                            Some(f) if f.is_finite() && f.abs() <= f32::MAX as f64 => Ok(f as f32),
                            _ => Err(ReqError::new(format!("`vector` holds {x}, not a finite number"))),
                        })
                        .collect()
                };
                if a[0].is_array() {
                    Ok(VectorRef::Rows(a.iter().map(row).collect::<R<_>>()?))
                } else {
                    Ok(VectorRef::Rows(vec![row(&Value::Array(a.clone()))?]))
                }
            }
            Some(v) => Err(ReqError::new(format!("`vector` must be a name, a path or a list of numbers, got {v}"))),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            VectorRef::Name(s) => json!(s),
            VectorRef::Rows(r) if r.len() == 1 => json!(r[0]),
            VectorRef::Rows(r) => json!(r),
        }
    }
}

impl std::fmt::Display for VectorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VectorRef::Name(s) => f.write_str(s),
            VectorRef::Rows(r) => write!(f, "inline values ({} row{})", r.len(), if r.len() == 1 { "" } else { "s" }),
        }
    }
}

/// One steering op as asked for. `op=center` parses to a clamp to the baseline (`kind = Clamp`,
/// `coeff = 0`, `from_baseline`).
#[derive(Debug, Clone, PartialEq)]
pub struct SteerRequest {
    pub vector: VectorRef,
    /// None: the vector's recorded `persona.layer`.
    pub layers: Option<Layers>,
    pub kind: SteerKind,
    /// `add`: the multiple of the vector; `clamp`: the target projection; `ablate`: unused.
    pub coeff: f32,
    pub positions: Positions,
    pub when: Option<WhenSpec>,
    /// `coeff` is a fraction of |h_L| (from the vector's `persona.mean_norms`).
    pub relative: bool,
    /// Clamp targets and `when=` thresholds are measured from the vector's baseline projection.
    pub from_baseline: bool,
}

/// One monitor as asked for: a probe per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorRequest {
    pub vector: VectorRef,
    /// None: the vector's recorded `persona.layer`, else every layer 1..=N.
    pub layers: Option<Layers>,
    /// None: [`VectorRef::label`].
    pub name: Option<String>,
    /// Tokens whose projection exceeds it are flagged.
    pub threshold: Option<f32>,
}

fn check_keys(o: &Map<String, Value>, known: &[&str]) -> R<()> {
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => {
            let shown: String = k.chars().take(100).collect();
            Err(ReqError::new(format!("unknown key `{shown}` (known: {})", known.join(", "))))
        }
        None => Ok(()),
    }
}

fn get<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn string<'a>(o: &'a Map<String, Value>, k: &str) -> R<Option<&'a str>> {
    match get(o, k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ReqError::new(format!("`{k}` must be a string, got {v}"))),
    }
}

/// A finite number of magnitude at most [`MAX_COEFF`] (or a string holding one).
fn number(o: &Map<String, Value>, k: &str) -> R<Option<f32>> {
    let Some(v) = get(o, k) else { return Ok(None) };
    let x = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match x {
        Some(x) if x.is_finite() && x.abs() <= MAX_COEFF as f64 => Ok(Some(x as f32)),
        _ => {
            let shown = match v {
                Value::String(s) => s.chars().take(100).collect(),
                v => v.to_string(),
            };
            Err(ReqError::new(format!(
                "`{k}` must be a finite number with magnitude at most {MAX_COEFF}, got `{shown}`"
            ))
            .code("invalid_coefficient"))
        }
    }
}

fn layers(o: &Map<String, Value>) -> R<Option<Layers>> {
    let v = match (get(o, "layer"), get(o, "layers")) {
        (Some(_), Some(_)) => return Err(ReqError::new("give `layer` or `layers`, not both")),
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => return Ok(None),
    };
    // Every spelling goes through the SPEC parser: `12`, `"10-14"`, `"all"`, `[12, "13-14"]`.
    let one = |x: &Value| -> R<Layers> {
        match x {
            Value::String(s) => Layers::parse(s.trim()).map_err(ReqError::from),
            Value::Number(n) => Layers::parse(&n.to_string()).map_err(ReqError::from),
            _ => Err(ReqError::new(format!("layer {x} is not a number, \"A-B\", \"A+B\" or \"all\""))),
        }
    };
    match v {
        Value::Array(a) if a.is_empty() => Err(ReqError::new("`layers` is an empty list")),
        Value::Array(a) => {
            let mut out = vec![];
            for x in a {
                match one(x)? {
                    Layers::All => return Err(ReqError::new("`all` cannot be one item of a list of layers")),
                    Layers::List(l) => out.extend(l),
                }
                if out.len() > crate::steer::spec::MAX_LAYER + 1 {
                    return Err(ReqError::new(format!(
                        "more than {} layers listed",
                        crate::steer::spec::MAX_LAYER + 1
                    )));
                }
            }
            Ok(Some(Layers::List(out)))
        }
        Value::String(_) | Value::Number(_) => one(v).map(Some),
        _ => Err(ReqError::new("`layers` must be a number, \"A-B\", \"A+B\", \"all\" or a list of numbers")),
    }
}

fn layers_json(l: &Option<Layers>) -> Value {
    match l {
        None => Value::Null,
        Some(Layers::All) => json!("all"),
        Some(Layers::List(v)) => json!(v),
    }
}

fn object<'a>(v: &'a Value, what: &str) -> R<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| ReqError::new(format!("each {what} must be an object, got {v}")))
}

impl SteerRequest {
    /// Parse one op from its JSON object (HTTP body, Python keywords, or a CLI SPEC's pairs).
    pub fn from_json(v: &Value) -> R<Self> {
        let o = object(v, "steering op")?;
        check_keys(o, STEER_KEYS)?;
        let vector = VectorRef::from_json(o.get("vector"))?;
        let layers = layers(o)?;
        let op = string(o, "op")?.unwrap_or("add");
        let has = |k: &str| get(o, k).is_some();
        let (kind, from_baseline) =
            op_and_origin(op, string(o, "origin")?, has("coeff"), has("when")).map_err(ReqError::new)?;
        let coeff = match (number(o, "coeff")?, kind) {
            (Some(c), _) => c,
            (None, SteerKind::Ablate) => 0.0,
            (None, _) if op == "center" => 0.0,
            (None, SteerKind::Clamp) => return Err(ReqError::new("op=clamp needs `coeff` (the target projection)")),
            (None, SteerKind::Add) => return Err(ReqError::new("op=add needs `coeff` (the multiple of the vector)")),
        };
        let positions = match string(o, "positions")?.unwrap_or("all") {
            "all" => Positions::All,
            "prompt" => Positions::Prompt,
            "response" => Positions::Response,
            p => return Err(ReqError::new(format!("unknown positions `{p}` (all, prompt, response)"))),
        };
        let when = string(o, "when")?.map(WhenSpec::parse_condition).transpose().map_err(ReqError::new)?;
        let relative = match string(o, "scale")?.unwrap_or("raw") {
            "raw" => false,
            "relative" => true,
            s => return Err(ReqError::new(format!("unknown scale `{s}` (raw, relative)"))),
        };
        Ok(SteerRequest { vector, layers, kind, coeff, positions, when, relative, from_baseline })
    }

    /// The JSON object that parses back to this op.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("vector".into(), self.vector.to_json());
        if self.layers.is_some() {
            o.insert("layers".into(), layers_json(&self.layers));
        }
        let op = match self.kind {
            SteerKind::Add => "add",
            SteerKind::Ablate => "ablate",
            SteerKind::Clamp => "clamp",
        };
        o.insert("op".into(), json!(op));
        if self.kind != SteerKind::Ablate {
            o.insert("coeff".into(), json!(self.coeff));
        }
        let pos = match self.positions {
            Positions::All => "all",
            Positions::Prompt => "prompt",
            Positions::Response => "response",
        };
        o.insert("positions".into(), json!(pos));
        if let Some(w) = &self.when {
            o.insert("when".into(), json!(w.to_string()));
        }
        o.insert("scale".into(), json!(if self.relative { "relative" } else { "raw" }));
        if self.from_baseline {
            o.insert("origin".into(), json!("baseline"));
        }
        Value::Object(o)
    }
}

impl MonitorRequest {
    /// Parse one monitor; a bare string is short for `{"vector": it}`.
    pub fn from_json(v: &Value) -> R<Self> {
        if let Value::String(s) = v {
            return MonitorRequest::from_json(&serde_json::json!({ "vector": s }));
        }
        let o = object(v, "monitor")?;
        check_keys(o, MONITOR_KEYS)?;
        let vector = VectorRef::from_json(o.get("vector"))?;
        let name = match string(o, "name")? {
            Some(n) if n.trim().is_empty() => return Err(ReqError::new("`name` is empty")),
            n => n.map(str::to_string),
        };
        Ok(MonitorRequest { vector, layers: layers(o)?, name, threshold: number(o, "threshold")? })
    }

    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("vector".into(), self.vector.to_json());
        if self.layers.is_some() {
            o.insert("layers".into(), layers_json(&self.layers));
        }
        o.insert("name".into(), json!(self.name()));
        if let Some(t) = self.threshold {
            o.insert("threshold".into(), json!(t));
        }
        Value::Object(o)
    }

    /// The probe's name: `name`, else the vector's label.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.vector.label())
    }
}

macro_rules! serde_via_json {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                self.to_json().serialize(s)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let v = Value::deserialize(d)?;
                Self::from_json(&v).map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_json!(SteerRequest);
serde_via_json!(MonitorRequest);

/// Parse a JSON list of steering ops (absent or null: none). The error names the item.
pub fn steer_list(v: Option<&Value>) -> std::result::Result<Vec<SteerRequest>, (Item, ReqError)> {
    list(v, Item::Steer, SteerRequest::from_json)
}

/// Parse a JSON list of monitors (absent or null: none). The error names the item.
pub fn monitor_list(v: Option<&Value>) -> std::result::Result<Vec<MonitorRequest>, (Item, ReqError)> {
    list(v, Item::Monitor, MonitorRequest::from_json)
}

fn list<T>(
    v: Option<&Value>,
    item: fn(usize) -> Item,
    parse: fn(&Value) -> R<T>,
) -> std::result::Result<Vec<T>, (Item, ReqError)> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().enumerate().map(|(i, x)| parse(x).map_err(|e| (item(i), e))).collect(),
        Some(_) => {
            let l = item(0).list();
            Err((l, ReqError::new(format!("`{}` must be a list of objects", l.param()))))
        }
    }
}

/// Which part of a request an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Steer(usize),
    Monitor(usize),
    SteerList,
    MonitorList,
    /// The plan as a whole (after every item resolved).
    Plan,
}

impl Item {
    fn list(self) -> Item {
        match self {
            Item::Steer(_) => Item::SteerList,
            Item::Monitor(_) => Item::MonitorList,
            i => i,
        }
    }
    /// The HTTP parameter: `steering[i]`, `monitor[i]`, `steering`, `monitor`.
    pub fn param(self) -> String {
        match self {
            Item::Steer(i) => format!("steering[{i}]"),
            Item::Monitor(i) => format!("monitor[{i}]"),
            Item::SteerList | Item::Plan => "steering".into(),
            Item::MonitorList => "monitor".into(),
        }
    }
}

/// Where a front end finds the vectors requests name: files in vector folders (CLI), the
/// server's registry, objects a Python caller passed.
pub trait VectorSource {
    /// The vector `name` refers to, checked to fit `cfg`. Warnings (e.g. a vector made from
    /// another model of the same shape) go to `warnings`.
    fn vector(&mut self, name: &str, cfg: &ModelConfig, warnings: &mut Vec<String>) -> R<Arc<PersonaVector>>;
}

/// Vector files: a bare name is looked up in `dirs` ([`crate::steer::spec::locate_vector`]),
/// anything else is a path. Each file is read once.
pub struct FileSource {
    pub dirs: Vec<std::path::PathBuf>,
    loaded: HashMap<String, Arc<PersonaVector>>,
}

impl FileSource {
    pub fn new(dirs: Vec<std::path::PathBuf>) -> Self {
        FileSource { dirs, loaded: HashMap::new() }
    }
}

impl VectorSource for FileSource {
    fn vector(&mut self, name: &str, cfg: &ModelConfig, warnings: &mut Vec<String>) -> R<Arc<PersonaVector>> {
        if let Some(v) = self.loaded.get(name) {
            return Ok(v.clone());
        }
        let path = crate::steer::spec::locate_vector(std::path::Path::new(name), &self.dirs)?;
        let v = PersonaVector::load_for_model(&path, cfg)?;
        warnings.extend(v.check_identity(cfg)?);
        let v = Arc::new(v);
        self.loaded.insert(name.to_string(), v.clone());
        Ok(v)
    }
}

/// A steering plan resolved against a model.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub steering: SeqSteering,
    /// One per probe, in probe order.
    pub monitors: Vec<MonitorInfo>,
    /// Not errors, but worth saying (a relative coefficient outside the usable window, a
    /// vector made from another model of the same shape).
    pub warnings: Vec<String>,
}

/// One probe of a resolved plan.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorInfo {
    pub name: String,
    /// The vector as the request named it.
    pub vector: String,
    pub layer: usize,
    pub threshold: Option<f32>,
}

fn inline_vector(rows: &[Vec<f32>], cfg: &ModelConfig) -> R<Arc<PersonaVector>> {
    let (n, h) = (cfg.n_layers, cfg.hidden);
    if let Some(r) = rows.iter().find(|r| r.len() != h) {
        return Err(ReqError::new(format!(
            "`vector` rows have {} numbers, but this model's hidden size is {h}",
            r.len()
        )));
    }
    let data = match rows.len() {
        1 => rows[0].repeat(n + 1),
        k if k == n + 1 => rows.concat(),
        k => {
            return Err(ReqError::new(format!(
                "`vector` has {k} rows: give one row (the same direction at every layer named) or {} (one per \
                 residual index 0..={n})",
                n + 1
            )))
        }
    };
    Ok(Arc::new(PersonaVector::new("inline", n, h, data)?))
}

fn layer_list(l: &Layers, n: usize) -> R<Vec<usize>> {
    let out = l.resolve(n);
    if let Some(&bad) = out.iter().find(|&&x| x > n) {
        return Err(ReqError::new(format!("layer {bad} is out of range: this model has layers 0..={n}"))
            .code("layer_out_of_range"));
    }
    Ok(out)
}

fn row(v: &PersonaVector, l: usize) -> R<Arc<[f32]>> {
    v.check_layer(l)?;
    Ok(Arc::from(v.layer(l)))
}

/// Resolve requests against a model: load each vector once (by `src`, or from its inline
/// values), expand ops and monitors per layer, apply relative scales and baselines, and check
/// the whole plan. The error says which item was wrong.
pub fn resolve(
    steer: &[SteerRequest],
    monitor: &[MonitorRequest],
    src: &mut dyn VectorSource,
    cfg: &ModelConfig,
) -> std::result::Result<Resolved, (Item, ReqError)> {
    let n = cfg.n_layers;
    let mut out = Resolved::default();
    let mut load = |r: &VectorRef, warnings: &mut Vec<String>| -> R<Arc<PersonaVector>> {
        let v = match r {
            VectorRef::Name(s) => src.vector(s, cfg, warnings)?,
            VectorRef::Rows(rows) => inline_vector(rows, cfg)?,
        };
        v.check_model(cfg.hidden, n).map_err(|e| ReqError::new(format!("vector does not fit this model: {e}")))?;
        Ok(v)
    };
    let mut by_name: HashMap<String, Arc<PersonaVector>> = HashMap::new();
    for (i, m) in monitor.iter().enumerate() {
        let at = |e: ReqError| (Item::Monitor(i), e);
        let v = load(&m.vector, &mut out.warnings).map_err(at)?;
        let name = m.name();
        if by_name.insert(name.clone(), v.clone()).is_some() {
            return Err(at(ReqError::new(format!("two monitors are named `{name}`: give one a `name`"))));
        }
        let layers = match (&m.layers, recorded_layer(&v).map_err(|e| at(e.into()))?) {
            (Some(l), _) => layer_list(l, n).map_err(at)?,
            (None, Some(l)) => vec![l],
            (None, None) => Layers::All.resolve(n),
        };
        for l in layers {
            out.steering.probes.push(Probe { name: name.clone(), layer: l, vector: row(&v, l).map_err(at)? });
            let vector = match &m.vector {
                VectorRef::Name(s) => s.clone(),
                VectorRef::Rows(_) => "inline".into(),
            };
            out.monitors.push(MonitorInfo { name: name.clone(), vector, layer: l, threshold: m.threshold });
        }
    }
    for (i, s) in steer.iter().enumerate() {
        let at = |e: ReqError| (Item::Steer(i), e);
        let v = load(&s.vector, &mut out.warnings).map_err(at)?;
        let label = s.vector.label();
        let layers = match (&s.layers, recorded_layer(&v).map_err(|e| at(e.into()))?) {
            (Some(l), _) => layer_list(l, n).map_err(at)?,
            (None, Some(l)) => vec![l],
            (None, None) => {
                return Err(at(ReqError::new(format!(
                    "no layers given and vector `{label}` records no `persona.layer` (`persona eval` chooses one): \
                     give its layer, e.g. layer=L or \"layers\": [L]"
                ))))
            }
        };
        let first = out.steering.plan.ops.len();
        for l in layers {
            let vector = row(&v, l).map_err(at)?;
            let mut coeff = s.coeff;
            if s.relative && s.kind != SteerKind::Ablate && s.coeff != 0.0 {
                let hl = mean_norms(&v).map_err(|e| at(e.into()))?[l];
                let (lo, hi) = RELATIVE_WINDOW;
                if s.kind == SteerKind::Add && (s.coeff.abs() < lo || s.coeff.abs() > hi) {
                    out.warnings.push(format!(
                        "{label}: relative coefficient {} at layer {l} is outside the usable window {lo}–{hi} of |h_L| \
                         measured on the default model",
                        s.coeff
                    ));
                }
                // add: h += c·|h_L|·v/|v|; clamp: target projection c·|h_L|.
                coeff = if s.kind == SteerKind::Add { s.coeff * hl / v.norm(l) } else { s.coeff * hl };
            }
            if s.from_baseline && s.kind == SteerKind::Clamp {
                coeff += baseline_of(&v, l).map_err(|e| at(e.into()))?;
            }
            let when = match &s.when {
                None => None,
                Some(w) => {
                    let cv = if w.probe == "self" {
                        v.clone()
                    } else {
                        by_name.get(&w.probe).cloned().ok_or_else(|| {
                            let mut names: Vec<_> = by_name.keys().cloned().collect();
                            names.sort();
                            at(ReqError::new(format!(
                                "when: no monitor named `{}` (monitors: {}; or use `self`)",
                                w.probe,
                                if names.is_empty() { "none".into() } else { names.join(", ") }
                            )))
                        })?
                    };
                    let cl = w.layer.unwrap_or(l);
                    if cl > l {
                        return Err(at(ReqError::new(format!(
                            "when reads layer {cl}, after the op's layer {l}: a condition can only read the op's \
                             layer or an earlier one"
                        ))));
                    }
                    let threshold = if s.from_baseline {
                        w.threshold + baseline_of(&cv, cl).map_err(|e| at(e.into()))?
                    } else {
                        w.threshold
                    };
                    Some(Condition { vector: row(&cv, cl).map_err(at)?, layer: cl, cmp: w.cmp, threshold })
                }
            };
            out.steering.plan.ops.push(SteerOp { kind: s.kind, layer: l, vector, coeff, positions: s.positions, when });
        }
        out.steering.sources.push(OpSource {
            vector: label,
            sha256: v.sha256(),
            ops: first..out.steering.plan.ops.len(),
            when: s.when.as_ref().map(WhenSpec::to_string),
        });
    }
    out.steering.validate(cfg.hidden, n).map_err(|e| (Item::Plan, e.into()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steer(v: Value) -> R<SteerRequest> {
        SteerRequest::from_json(&v)
    }

    #[test]
    fn json_and_spec_forms_agree_and_round_trip() {
        let a = steer(json!({"vector": "evil", "layers": "10-12", "coeff": -2.5, "op": "clamp",
                             "positions": "response", "when": "evil@9>3.5"}))
        .unwrap();
        let b = crate::steer::spec::SteerSpec::parse(
            "vector=evil,layers=10-12,coeff=-2.5,op=clamp,positions=response,when=evil@9:gt:3.5",
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(steer(a.to_json()).unwrap(), a);
        let s: SteerRequest = serde_json::from_value(json!({"vector": "v", "layer": 3, "op": "center"})).unwrap();
        assert_eq!((s.kind, s.coeff, s.from_baseline), (SteerKind::Clamp, 0.0, true));
        assert_eq!(serde_json::from_value::<SteerRequest>(serde_json::to_value(&s).unwrap()).unwrap(), s);
        assert_eq!(
            steer(json!({"vector": "v", "layers": [3, 4], "coeff": "2"})).unwrap().layers,
            Some(Layers::List(vec![3, 4]))
        );
        assert_eq!(MonitorRequest::from_json(&json!("evil")).unwrap().vector, VectorRef::Name("evil".into()));
        let l = |v: Value| steer(json!({"vector": "v", "coeff": 1, "layers": v})).map(|s| s.layers);
        assert_eq!(l(json!([12, "14-15"])).unwrap(), Some(Layers::List(vec![12, 14, 15])));
        // One message for a bad layer, however it is spelled.
        for bad in [json!(70000), json!("70000"), json!([70000])] {
            assert!(l(bad).unwrap_err().message.contains("layer 70000 is out of range (layers go up to 65536)"));
        }
        let m = MonitorRequest::from_json(&json!({"vector": "/x/evil.safetensors", "threshold": 2})).unwrap();
        assert_eq!((m.name(), m.threshold), ("evil".to_string(), Some(2.0)));
        assert_eq!(MonitorRequest::from_json(&m.to_json()).unwrap().name(), "evil");
    }

    #[test]
    fn bad_items_say_what_is_wrong() {
        let e = |v: Value| steer(v).unwrap_err();
        assert!(e(json!({"vector": "v", "coeff": 1, "colour": 1})).message.contains("unknown key `colour`"));
        assert!(e(json!({"coeff": 1})).message.contains("missing `vector`"));
        assert!(e(json!({"vector": "v", "coeff": 1, "layer": 2, "layers": 3})).message.contains("not both"));
        let c = e(json!({"vector": "v", "coeff": 1e9}));
        assert_eq!(c.code, Some("invalid_coefficient"));
        assert!(e(json!({"vector": "v", "coeff": "x"})).message.contains("`coeff` must be a finite number"));
        assert!(e(json!({"vector": "v"})).message.contains("op=add needs `coeff`"));
        assert!(e(json!({"vector": "v", "op": "clamp"})).message.contains("op=clamp needs `coeff`"));
        assert!(e(json!({"vector": "v", "coeff": 1, "layers": [1, -2]}))
            .message
            .contains("layers `-2`: expected a number"));
        assert!(e(json!({"vector": [1.0, "a"], "coeff": 1})).message.contains("not a finite number"));
        assert!(e(json!({"vector": "v", "coeff": 1, "when": "evil=3"})).message.contains("NAME:gt:τ"));
        assert!(e(json!(["v"])).message.contains("must be an object"));
        let (item, err) = steer_list(Some(&json!([{"vector": "v", "coeff": 1}, {"vector": "v"}]))).unwrap_err();
        assert_eq!((item, item.param()), (Item::Steer(1), "steering[1]".to_string()));
        assert!(err.message.contains("needs `coeff`"));
        assert_eq!(monitor_list(Some(&json!({"vector": "v"}))).unwrap_err().0, Item::MonitorList);
    }

    #[test]
    fn inline_vectors_resolve_like_files() {
        let cfg = ModelConfig::from_hf_json(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/config.json"),
        )
        .unwrap();
        let (n, h) = (cfg.n_layers, cfg.hidden);
        let mut src = FileSource::new(vec![]);
        let one: Vec<f32> = (0..h).map(|i| i as f32 - 1.5).collect();
        let s = steer(json!({"vector": one, "layers": [1, 2], "coeff": 2})).unwrap();
        let m = MonitorRequest::from_json(&json!({"vector": one, "layers": "all"})).unwrap();
        let r = resolve(&[s.clone()], &[m], &mut src, &cfg).unwrap();
        assert_eq!(r.steering.plan.ops.len(), 2);
        assert_eq!(&r.steering.plan.ops[1].vector[..], &one[..]);
        assert_eq!(r.steering.probes.len(), n);
        assert_eq!(r.monitors[0].name, "inline");
        // Without layers an inline vector has no recorded layer to fall back on.
        let s2 = steer(json!({"vector": one, "coeff": 2})).unwrap();
        let (item, e) = resolve(&[s, s2], &[], &mut src, &cfg).unwrap_err();
        assert_eq!(item, Item::Steer(1));
        assert!(e.message.contains("records no `persona.layer`"), "{e}");
        let bad = steer(json!({"vector": vec![1.0; h + 1], "layers": 1, "coeff": 2})).unwrap();
        let e = resolve(&[bad], &[], &mut src, &cfg).unwrap_err().1;
        assert!(e.message.contains(&format!("hidden size is {h}")), "{e}");
        let out = steer(json!({"vector": one, "layers": n + 1, "coeff": 2})).unwrap();
        let e = resolve(&[out], &[], &mut src, &cfg).unwrap_err().1;
        assert_eq!(e.code, Some("layer_out_of_range"));
        let missing = steer(json!({"vector": "no-such-vector", "layers": 1, "coeff": 2})).unwrap();
        let e = resolve(&[missing], &[], &mut src, &cfg).unwrap_err().1;
        assert!(e.message.contains("no-such-vector"), "{e}");
    }
}
