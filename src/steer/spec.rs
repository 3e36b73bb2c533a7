//! Steering and monitoring specs as the CLI writes them, and their resolution against a model.
//!
//! `--steer vector=PATH|NAME[,layer=12],coeff=4,op=add,positions=all[,when=NAME:gt:3.5]`
//!   (`vector=NAME` is looked up by [`locate_vector`]; without `layer=` the vector's recorded
//!   `persona.layer`; also `layers=10-14`, `layers=all` = 1..=N, `layers=3+7`; `op=clamp` takes the target projection
//!   as `coeff`; `when=NAME[@L]:gt:τ` or `:lt:τ` (shell-safe; `NAME>τ` / `NAME<τ` also work when
//!   quoted) reads monitor NAME's vector — or `self`, the op's own
//!   vector — at residual index L, default the op's layer; `scale=relative` reads `coeff` as a
//!   fraction of the layer's mean residual norm |h_L| recorded in the vector's metadata:
//!   h += c·|h_L|·v/|v| — the paper's raw coefficients stay the default, `scale=raw`; `op=center`
//!   clamps to the vector's baseline projection `persona.baseline`, and `origin=baseline` measures
//!   a clamp's target and the `when=` thresholds from it instead of from 0)
//! `--monitor vector=PATH|NAME[,layers=all][,name=NAME][,threshold=T]` (name defaults to the file stem; layers to
//! the vector's `persona.layer`, else all)
//!
//! Both parse into the library's one request type ([`crate::steer::request`]), the same the
//! server's JSON and the Python keywords parse into.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::steer::request::{self, FileSource, Item};
pub use crate::steer::request::{MonitorRequest, SteerRequest, VectorRef};
use crate::steer::vector::PersonaVector;
use crate::steer::{Cmp, SeqSteering, SteerKind};

/// The largest residual index a layer list may name (models have at most a few hundred blocks;
/// a larger number is a typo, and a range up to it would be allocated in full).
pub const MAX_LAYER: usize = 1 << 16;

/// Which residual indices a spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layers {
    /// 1..=N
    All,
    List(Vec<usize>),
}

impl Layers {
    pub fn resolve(&self, n_layers: usize) -> Vec<usize> {
        match self {
            Layers::All => (1..=n_layers).collect(),
            Layers::List(v) => v.clone(),
        }
    }

    /// `12`, `10-14`, `3+7+9`, `all`. Indices above [`MAX_LAYER`] are refused, and so are lists
    /// of more than `MAX_LAYER + 1` entries (before anything is allocated for them).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("layers `{s}`: expected a number, A-B, A+B+C or `all`"));
        if s == "all" {
            return Ok(Layers::All);
        }
        let shown: String = s.chars().take(100).collect();
        let too_big = |what: String| Error::Invalid(format!("layers `{shown}`: {what} (layers go up to {MAX_LAYER})"));
        let mut out = vec![];
        for part in s.split('+') {
            let num = |x: &str| {
                let n = x.trim().parse::<usize>().map_err(|_| bad())?;
                if n > MAX_LAYER {
                    return Err(too_big(format!("layer {n} is out of range")));
                }
                Ok(n)
            };
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if a > b {
                return Err(bad());
            }
            if out.len() + (b - a) > MAX_LAYER {
                return Err(too_big(format!("more than {} layers listed", MAX_LAYER + 1)));
            }
            out.extend(a..=b);
        }
        if out.is_empty() {
            return Err(bad());
        }
        Ok(Layers::List(out))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WhenSpec {
    /// A monitor's name, or `self`.
    pub probe: String,
    pub layer: Option<usize>,
    pub cmp: Cmp,
    pub threshold: f32,
}

/// A `--steer` spec: the library's one steering request type ([`SteerRequest`]).
pub type SteerSpec = SteerRequest;
/// A `--monitor` spec ([`MonitorRequest`]).
pub type MonitorSpec = MonitorRequest;

/// The window of relative coefficients measured to steer without wrecking the text on the
/// default model (at 50–60% depth); beyond it `resolve` warns.
pub const RELATIVE_WINDOW: (f32, f32) = (0.1, 0.3);

/// `k=v,k=v` as a JSON object of strings (every value is read by the JSON parser, which
/// accepts numbers written as strings).
fn pairs(spec: &str, what: &str) -> Result<serde_json::Value> {
    let mut m = serde_json::Map::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("{what} `{spec}`: `{part}` is not key=value")))?;
        let k = k.trim();
        if m.insert(k.to_string(), serde_json::Value::String(v.trim().to_string())).is_some() {
            return Err(Error::Invalid(format!("{what} `{spec}`: `{k}` given twice")));
        }
    }
    Ok(serde_json::Value::Object(m))
}

impl SteerRequest {
    /// Parse a `--steer` SPEC (`key=value,...`); the pairs mean what the same keys mean in JSON
    /// ([`SteerRequest::from_json`]).
    pub fn parse(spec: &str) -> Result<Self> {
        let m = pairs(spec, "--steer")?;
        SteerRequest::from_json(&m).map_err(|e| Error::Invalid(format!("--steer `{spec}`: {e}")))
    }

    /// The `--steer` SPEC that parses back to this op (inline values are shown as `inline`).
    pub fn to_spec(&self) -> String {
        spec_of(&self.to_json())
    }
}

impl MonitorRequest {
    /// Parse a `--monitor` SPEC (`vector=PATH|NAME[,layers=all][,name=NAME][,threshold=T]`); a
    /// bare `NAME` (no `=`) is short for `vector=NAME`.
    pub fn parse(spec: &str) -> Result<Self> {
        let m = if spec.contains('=') || spec.trim().is_empty() {
            pairs(spec, "--monitor")?
        } else {
            serde_json::json!({ "vector": spec.trim() })
        };
        MonitorRequest::from_json(&m).map_err(|e| Error::Invalid(format!("--monitor `{spec}`: {e}")))
    }

    pub fn to_spec(&self) -> String {
        spec_of(&self.to_json())
    }
}

/// `k=v,...` of a request's JSON, `vector` first and the rest in the order written in the docs,
/// leaving out what is the default.
fn spec_of(v: &serde_json::Value) -> String {
    use serde_json::Value;
    let Some(o) = v.as_object() else { return String::new() };
    let order = ["vector", "layers", "op", "coeff", "positions", "when", "scale", "origin", "name", "threshold"];
    let defaults = [("op", "add"), ("positions", "all"), ("scale", "raw")];
    order
        .iter()
        .filter_map(|&k| {
            let v = o.get(k)?;
            let text = match v {
                Value::String(s) if defaults.contains(&(k, s.as_str())) => return None,
                Value::String(s) => s.clone(),
                Value::Array(_) if k == "vector" => "inline".to_string(),
                Value::Array(a) => a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("+"),
                v => v.to_string(),
            };
            Some(format!("{k}={text}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A steering op's kind from `op=` and whether it is measured from the baseline (`origin=`):
/// `op=center` is a clamp to the baseline (no coeff); `origin=baseline` moves clamp targets and
/// `when=` thresholds by the baseline. Used by [`SteerRequest::from_json`], which every front end
/// parses through.
pub fn op_and_origin(
    op: &str,
    origin: Option<&str>,
    has_coeff: bool,
    has_when: bool,
) -> std::result::Result<(SteerKind, bool), String> {
    let kind = match op {
        "add" => SteerKind::Add,
        "ablate" => SteerKind::Ablate,
        "clamp" | "center" => SteerKind::Clamp,
        o => return Err(format!("unknown op `{o}` (add, ablate, clamp, center)")),
    };
    let from_baseline = match origin {
        None => op == "center",
        Some("zero") if op == "center" => {
            return Err("op=center is measured from the baseline; origin=zero contradicts it".into())
        }
        Some("zero") => false,
        Some("baseline") => true,
        Some(o) => return Err(format!("unknown origin `{o}` (zero, baseline)")),
    };
    if op == "center" && has_coeff {
        return Err("op=center sets the projection to the baseline and takes no coeff (for an offset from the \
                    baseline: op=clamp,coeff=X,origin=baseline)"
            .into());
    }
    if from_baseline && kind == SteerKind::Ablate {
        return Err("ablate moves the projection to 0; to move it to the baseline use op=center".into());
    }
    if from_baseline && kind == SteerKind::Add && !has_when {
        return Err("origin=baseline moves clamp targets and when= thresholds; op=add has neither here".into());
    }
    Ok((kind, from_baseline))
}

/// What a `when=` condition must look like, for error messages.
pub const WHEN_SYNTAX: &str = "NAME:gt:τ or NAME:lt:τ (NAME@L:gt:τ for layer L; `NAME>τ` / `NAME<τ` also work, \
                               quoted from the shell)";

impl std::fmt::Display for WhenSpec {
    /// The shell-safe spelling, `NAME[@L]:gt:τ`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.layer.map(|l| format!("@{l}")).unwrap_or_default();
        let cmp = if self.cmp == Cmp::Gt { "gt" } else { "lt" };
        write!(f, "{}{at}:{cmp}:{}", self.probe, self.threshold)
    }
}

impl WhenSpec {
    /// `NAME[@L]:gt:τ`, `NAME[@L]:lt:τ` — words, so the condition survives an unquoted shell — or
    /// `NAME[@L]>τ`, `NAME[@L]<τ`. τ may be negative (`evil:lt:-2`).
    ///
    /// ```
    /// use persona::steer::{spec::WhenSpec, Cmp};
    /// let w = WhenSpec::parse_condition("evil@12:lt:-2").unwrap();
    /// assert_eq!((w.probe.as_str(), w.layer, w.cmp, w.threshold), ("evil", Some(12), Cmp::Lt, -2.0));
    /// assert_eq!(WhenSpec::parse_condition("evil>3.5").unwrap(), WhenSpec::parse_condition("evil:gt:3.5").unwrap());
    /// ```
    pub fn parse_condition(w: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| format!("when `{w}`: {why}; expected {WHEN_SYNTAX}");
        let (lhs, rhs, cmp) = if let Some((a, b)) = w.split_once('>') {
            (a, b, Cmp::Gt)
        } else if let Some((a, b)) = w.split_once('<') {
            (a, b, Cmp::Lt)
        } else {
            let parts: Vec<&str> = w.split(':').collect();
            let [a, op, b] = parts[..] else { return Err(bad("no comparison")) };
            let cmp = match op.trim().to_ascii_lowercase().as_str() {
                "gt" => Cmp::Gt,
                "lt" => Cmp::Lt,
                o => return Err(bad(&format!("unknown comparison `{o}` (gt, lt)"))),
            };
            (a, b, cmp)
        };
        let threshold = match rhs.trim().parse::<f32>() {
            Ok(x) if x.is_finite() => x,
            _ => return Err(bad(&format!("threshold `{}` is not a finite number", rhs.trim()))),
        };
        let (probe, layer) = match lhs.trim().split_once('@') {
            Some((n, l)) => (
                n.trim().to_string(),
                Some(l.trim().parse::<usize>().map_err(|_| bad(&format!("layer `{l}` is not a number")))?),
            ),
            None => (lhs.trim().to_string(), None),
        };
        if probe.is_empty() {
            return Err(bad("it names no probe"));
        }
        Ok(WhenSpec { probe, layer, cmp, threshold })
    }
}

/// The layer chosen for the vector (`persona.layer`, recorded by `persona eval`), if any.
pub fn recorded_layer(v: &PersonaVector) -> Result<Option<usize>> {
    match v.metadata.get("persona.layer") {
        None => Ok(None),
        Some(s) => match s.trim().parse::<usize>() {
            Ok(l) if l <= v.n_layers => Ok(Some(l)),
            _ => Err(Error::format(v.origin(), format!("`persona.layer` is `{s}`, not a layer 0..={}", v.n_layers))),
        },
    }
}

/// Where `vector=NAME` is looked for: `extra` (`--vectors DIR`) first, then the model's own
/// folder of vectors, `vectors/<model name, lower case>/`, in the working directory and beside
/// persona's sources (where the shipped vectors live).
pub fn vector_dirs(extra: Option<&Path>, model: &Path) -> Vec<PathBuf> {
    let own = Path::new("vectors").join(crate::model::load::model_name(model).to_lowercase());
    let mut dirs: Vec<PathBuf> = extra.map(Path::to_path_buf).into_iter().collect();
    dirs.push(own.clone());
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(&own));
    dirs.dedup();
    dirs
}

/// The vector files (`*.safetensors`, `*.gguf`) in `dirs`, by name (file stem), sorted, once each.
pub fn vector_names(dirs: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors" || e == "gguf"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().to_string()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The file a spec's `vector=` means: an existing path as given; else a bare name (no folder
/// part, e.g. `evil` or `evil.safetensors`) looked up in `dirs` in order, as `NAME`,
/// `NAME.safetensors` or `NAME.gguf`. A name found nowhere is an error listing the names there are.
///
/// ```
/// # use std::path::{Path, PathBuf};
/// let dirs = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct")];
/// let p = persona::steer::spec::locate_vector(Path::new("evil"), &dirs).unwrap();
/// assert!(p.ends_with("evil.safetensors"));
/// ```
pub fn locate_vector(v: &Path, dirs: &[PathBuf]) -> Result<PathBuf> {
    if v.is_file() || v.components().count() != 1 {
        // A path: the loader names it if it is missing.
        return Ok(v.to_path_buf());
    }
    let name = v.to_string_lossy();
    for d in dirs {
        for cand in [d.join(v), d.join(format!("{name}.safetensors")), d.join(format!("{name}.gguf"))] {
            if cand.is_file() {
                return Ok(cand);
            }
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let names = vector_names(dirs);
    Err(Error::Invalid(format!(
        "vector `{name}`: no such file, and no vector of that name in {} (available: {}); give a path, or a \
         folder of vectors with --vectors DIR",
        if searched.is_empty() { "any vector folder".to_string() } else { searched.join(", ") },
        if names.is_empty() { "none".to_string() } else { names.join(", ") }
    )))
}

/// Metadata key of the vector's baseline: per residual index, the model's ordinary projection
/// onto the vector (JSON list of N+1 numbers; measured by
/// [`crate::persona::extract::baseline_projection`]).
pub const BASELINE_KEY: &str = "persona.baseline";

/// The baseline recorded in `v` ([`BASELINE_KEY`]), if any; a malformed one is an error.
pub fn recorded_baseline(v: &PersonaVector) -> Result<Option<Vec<f32>>> {
    let Some(s) = v.metadata.get(BASELINE_KEY) else { return Ok(None) };
    let b: Vec<f32> = serde_json::from_str(s)
        .map_err(|e| Error::format(v.origin(), format!("`{BASELINE_KEY}` is not a JSON list of numbers: {e}")))?;
    if b.len() != v.n_layers + 1 || b.iter().any(|x| !x.is_finite()) {
        return Err(Error::format(v.origin(), format!("`{BASELINE_KEY}` needs {} finite numbers", v.n_layers + 1)));
    }
    Ok(Some(b))
}

/// The vector's baseline projection at layer `l`, for `origin=baseline` / `op=center`.
pub fn baseline_of(v: &PersonaVector, l: usize) -> Result<f32> {
    v.check_layer(l)?;
    match recorded_baseline(v)? {
        Some(b) => Ok(b[l]),
        None => Err(Error::format(
            v.origin(),
            format!(
                "op=center and origin=baseline need the vector's baseline projection (`{BASELINE_KEY}`), which it does \
                 not record: vectors made by `persona extract` have it; for an older vector, `persona eval --vector \
                 FILE --write` measures and records it"
            ),
        )),
    }
}

/// The per-layer mean residual norms |h_L| recorded at extraction (`persona.mean_norms`).
pub fn mean_norms(v: &PersonaVector) -> Result<Vec<f32>> {
    let s = v.metadata.get("persona.mean_norms").ok_or_else(|| {
        Error::format(
            v.origin(),
            "scale=relative needs the layer's mean residual norm, but the vector has no `persona.mean_norms` \
             metadata (vectors made by `persona extract` have it)",
        )
    })?;
    let norms: Vec<f32> = serde_json::from_str(s)
        .map_err(|e| Error::format(v.origin(), format!("`persona.mean_norms` is not a JSON list of numbers: {e}")))?;
    if norms.len() != v.n_layers + 1 || norms.iter().any(|x| !x.is_finite() || *x <= 0.0) {
        return Err(Error::format(
            v.origin(),
            format!("`persona.mean_norms` needs {} positive numbers", v.n_layers + 1),
        ));
    }
    Ok(norms)
}

/// Resolve CLI specs against a model: vectors are files (a bare name is looked up in the
/// vector folders first, by [`locate_vector`] in the caller), loaded once each. Warnings
/// (relative coefficients outside [`RELATIVE_WINDOW`], a vector made from another model of the
/// same shape) go to `warnings`. Errors name the spec.
pub fn resolve(
    steer: &[SteerSpec],
    monitor: &[MonitorSpec],
    cfg: &ModelConfig,
    warnings: &mut Vec<String>,
) -> Result<SeqSteering> {
    let mut src = FileSource::new(vec![]);
    let r = request::resolve(steer, monitor, &mut src, cfg).map_err(|(item, e)| {
        Error::Invalid(match item {
            Item::Steer(i) => format!("--steer `{}`: {e}", steer[i].to_spec()),
            Item::Monitor(i) => format!("--monitor `{}`: {e}", monitor[i].to_spec()),
            _ => e.to_string(),
        })
    })?;
    warnings.extend(r.warnings);
    Ok(r.steering)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steer::Positions;

    #[test]
    fn center_and_origin_baseline() {
        let s = SteerSpec::parse("vector=v,layer=2,op=center").unwrap();
        assert_eq!((s.kind, s.coeff, s.from_baseline), (SteerKind::Clamp, 0.0, true));
        let s = SteerSpec::parse("vector=v,layer=2,op=clamp,coeff=1.5,origin=baseline").unwrap();
        assert_eq!((s.kind, s.coeff, s.from_baseline), (SteerKind::Clamp, 1.5, true));
        assert!(!SteerSpec::parse("vector=v,layer=2,op=clamp,coeff=1.5").unwrap().from_baseline);
        let err = |spec: &str| SteerSpec::parse(spec).unwrap_err().to_string();
        assert!(err("vector=v,op=center,coeff=2").contains("takes no coeff"));
        assert!(err("vector=v,op=center,origin=zero").contains("contradicts"));
        assert!(err("vector=v,op=ablate,origin=baseline").contains("use op=center"));
        assert!(err("vector=v,op=add,coeff=1,origin=baseline").contains("op=add has neither"));
        assert!(err("vector=v,op=clamp,coeff=1,origin=mean").contains("unknown origin `mean`"));
        assert!(err("vector=v,op=cap,coeff=1").contains("(add, ablate, clamp, center)"));
        // With a when=, add may measure the threshold from the baseline.
        assert!(SteerSpec::parse("vector=v,op=add,coeff=1,when=self:gt:2,origin=baseline").unwrap().from_baseline);
    }

    #[test]
    fn baseline_moves_clamp_targets_and_thresholds() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::model::config::ModelConfig::from_hf_json(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/config.json"),
        )
        .unwrap();
        let (n, h) = (cfg.n_layers, cfg.hidden);
        let data: Vec<f32> = (0..(n + 1) * h).map(|i| 1.0 + (i % 5) as f32).collect();
        let mut v = PersonaVector::new("t", n, h, data).unwrap();
        let path = dir.path().join("t.safetensors");
        v.save(&path).unwrap();
        let resolve1 = |spec: &str| {
            let s = SteerSpec::parse(&spec.replace("PATH", path.to_str().unwrap())).unwrap();
            resolve(&[s], &[], &cfg, &mut vec![])
        };
        // No recorded baseline: a clear error that says how to get one.
        let e = resolve1("vector=PATH,layer=2,op=center").unwrap_err().to_string();
        assert!(e.contains("persona.baseline") && e.contains("persona eval"), "{e}");
        let mut b = vec![0.0f32; n + 1];
        (b[1], b[2]) = (-1.5, -19.0);
        v.metadata.insert(BASELINE_KEY.into(), serde_json::to_string(&b).unwrap());
        v.save(&path).unwrap();
        let st = resolve1("vector=PATH,layer=2,op=center").unwrap();
        assert_eq!((st.plan.ops[0].kind, st.plan.ops[0].coeff), (SteerKind::Clamp, -19.0));
        let st = resolve1("vector=PATH,layer=2,op=clamp,coeff=2,origin=baseline,when=self@1:gt:0.5").unwrap();
        let op = &st.plan.ops[0];
        assert_eq!(op.coeff, -17.0);
        assert_eq!(op.when.as_ref().unwrap().threshold, -1.0);
        // A condition layer out of range is an error, not a panic.
        let e = resolve1("vector=PATH,layer=2,op=center,when=self@99:gt:0").unwrap_err().to_string();
        assert!(e.contains("99"), "{e}");
        // origin=zero (the default) leaves both as written.
        let st = resolve1("vector=PATH,layer=2,op=clamp,coeff=2,when=self@1:gt:0.5").unwrap();
        assert_eq!((st.plan.ops[0].coeff, st.plan.ops[0].when.as_ref().unwrap().threshold), (2.0, 0.5));
        // A malformed baseline is named.
        v.metadata.insert(BASELINE_KEY.into(), "[1, 2]".into());
        v.save(&path).unwrap();
        let e = resolve1("vector=PATH,layer=2,op=center").unwrap_err().to_string();
        assert!(e.contains(&format!("needs {} finite numbers", n + 1)), "{e}");
    }

    #[test]
    fn parses_full_specs() {
        let s = SteerSpec::parse(
            "vector=v.safetensors,layers=10-12,coeff=-2.5,op=clamp,positions=response,when=evil@9>3.5",
        )
        .unwrap();
        assert_eq!(s.layers, Some(Layers::List(vec![10, 11, 12])));
        assert_eq!((s.kind, s.coeff, s.positions), (SteerKind::Clamp, -2.5, Positions::Response));
        assert_eq!(s.when, Some(WhenSpec { probe: "evil".into(), layer: Some(9), cmp: Cmp::Gt, threshold: 3.5 }));
        // The shell-safe spellings mean the same.
        let w = |c: &str| SteerSpec::parse(&format!("vector=v,layer=3,coeff=1,when={c}")).unwrap().when.unwrap();
        assert_eq!(w("evil@9:gt:3.5"), s.when.clone().unwrap());
        assert_eq!(w("evil:lt:-2"), WhenSpec { probe: "evil".into(), layer: None, cmp: Cmp::Lt, threshold: -2.0 });
        assert_eq!(w("evil:LT:-2"), w("evil<-2"));
        assert_eq!(w("self@2:gt:1e9").threshold, 1e9);
        let m = MonitorSpec::parse("vector=/x/evil.safetensors").unwrap();
        assert_eq!((m.name().as_str(), m.layers), ("evil", None));
        let m = MonitorSpec::parse("vector=evil,layers=all").unwrap();
        assert_eq!(
            (m.name().as_str(), m.layers, m.vector),
            ("evil", Some(Layers::All), VectorRef::Name("evil".into()))
        );
        assert_eq!(SteerSpec::parse("vector=evil,coeff=2").unwrap().layers, None);
        assert_eq!(Layers::parse("3+7+9").unwrap(), Layers::List(vec![3, 7, 9]));
    }

    #[test]
    fn malformed_specs_name_the_part() {
        let err = |s: &str| SteerSpec::parse(s).unwrap_err().to_string();
        assert!(err("vector=a,layer=3,coeff=1,op=boost").contains("unknown op `boost`"));
        assert!(err("vector=a,layer=3,coeff=nan")
            .contains("`coeff` must be a finite number with magnitude at most 10000, got `nan`"));
        assert!(err("vector=a,layer=x,coeff=1").contains("layers `x`"));
        assert!(err("layer=3,coeff=1").contains("missing `vector`"));
        assert!(err("vector=a,layer=3,coeff=1,colour=red").contains("unknown key `colour`"));
        assert!(err("vector=a,layer=3,coeff=1,positions=middle").contains("unknown positions"));
        assert!(err("vector=a,layer=3,op=clamp").contains("needs `coeff`"));
        assert!(err("vector=a,layer=3,coeff=1,when=evil=3").contains("NAME:gt:τ"));
        assert!(err("vector=a,layer=3,coeff=1,when=evil:ge:3").contains("unknown comparison `ge`"));
        assert!(err("vector=a,layer=3,coeff=1,when=evil:gt:x").contains("threshold `x`"));
        assert!(err("vector=a,layer=3,coeff=1,when=evil@x:gt:1").contains("layer `x`"));
        assert!(err("vector=a,layer=3,coeff=1,when=:gt:1").contains("names no probe"));
        assert!(err("vector=a,layer=3,coeff=1,when=evil:gt").contains("no comparison"));
        assert!(err("vector=a,layer=5-3,coeff=1").contains("layers `5-3`"));
        assert!(err("vector=a,layer 3").contains("not key=value"));
    }
}
