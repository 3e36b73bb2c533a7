//! Python objects ↔ JSON values, and the steering keyword lists into the library's request type.

use std::collections::HashMap;
use std::sync::Arc;

use persona::model::config::ModelConfig;
use persona::steer::request::{self, MonitorRequest, ReqError, Resolved, SteerRequest, VectorSource};
use persona::steer::vector::PersonaVector;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::Value;

use crate::vector::Vector;

/// A Python value as JSON: None, bool, int, float, str, dict, list/tuple, and anything with
/// `tolist()` (numpy arrays and scalars).
pub fn py_to_json(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        return Ok(match obj.extract::<i64>() {
            Ok(i) => Value::from(i),
            Err(_) => Value::from(obj.extract::<f64>()?),
        });
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        // NaN and ±inf have no JSON form: they become a string the number parsers refuse by name.
        return Ok(serde_json::Number::from_f64(f.value())
            .map(Value::Number)
            .unwrap_or(Value::String(f.value().to_string())));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = serde_json::Map::new();
        for (k, v) in d.iter() {
            let k: String = k.extract().map_err(|_| PyTypeError::new_err("dictionary keys must be strings"))?;
            m.insert(k, py_to_json(&v)?);
        }
        return Ok(Value::Object(m));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return Ok(Value::Array(l.iter().map(|x| py_to_json(&x)).collect::<PyResult<_>>()?));
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Ok(Value::Array(t.iter().map(|x| py_to_json(&x)).collect::<PyResult<_>>()?));
    }
    if obj.hasattr("tolist")? {
        return py_to_json(&obj.call_method0("tolist")?);
    }
    Err(PyTypeError::new_err(format!("cannot read a {} as JSON", obj.get_type().name()?)))
}

/// JSON as Python objects.
pub fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => PyFloat::new(py, n.as_f64().unwrap_or(f64::NAN)).into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let l = PyList::empty(py);
            for x in a {
                l.append(json_to_py(py, x)?)?;
            }
            l.into_any()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// Vectors for one call: `Vector` objects the caller passed (by a key of their own), then files
/// (a name in the model's vector folders, or a path).
pub struct PySource {
    pub objects: HashMap<String, Arc<PersonaVector>>,
    pub files: request::FileSource,
}

impl VectorSource for PySource {
    fn vector(
        &mut self,
        name: &str,
        cfg: &ModelConfig,
        warnings: &mut Vec<String>,
    ) -> Result<Arc<PersonaVector>, ReqError> {
        match self.objects.get(name) {
            Some(v) => Ok(v.clone()),
            None => self.files.vector(name, cfg, warnings),
        }
    }
}

type Objects = HashMap<String, Arc<PersonaVector>>;

/// The key a `persona.Vector` object is registered under for one call: a string no name or path
/// can be (it starts with U+0001), so an object never hides a file of the same name.
fn object_key(n: usize) -> String {
    format!("\u{1}object{n}")
}

/// One steering or monitor item as JSON: a `persona.Vector` under `vector` is registered in
/// `objects` and replaced by its key (a monitor without `name` takes the vector's name); a bare
/// string or Vector is short for `{"vector": it}`.
fn item_json(obj: &Bound<'_, PyAny>, objects: &mut Objects, monitor: bool) -> PyResult<Value> {
    let mut m = serde_json::Map::new();
    let mut vector: Option<Vector> = None;
    if let Ok(v) = obj.cast::<Vector>() {
        vector = Some(v.borrow().clone());
    } else if obj.is_instance_of::<PyString>() {
        m.insert("vector".into(), py_to_json(obj)?);
    } else if let Ok(d) = obj.cast::<PyDict>() {
        for (k, v) in d.iter() {
            let k: String = k.extract().map_err(|_| PyTypeError::new_err("dictionary keys must be strings"))?;
            match v.cast::<Vector>() {
                Ok(vec) if k == "vector" => vector = Some(vec.borrow().clone()),
                _ => {
                    m.insert(k, py_to_json(&v)?);
                }
            }
        }
    } else {
        return py_to_json(obj);
    }
    if let Some(v) = vector {
        let key = object_key(objects.len());
        if monitor && !m.contains_key("name") {
            m.insert("name".into(), Value::String(v.inner.name.clone()));
        }
        objects.insert(key.clone(), v.inner);
        m.insert("vector".into(), Value::String(key));
    }
    Ok(Value::Object(m))
}

/// A list of items (None: empty). `what` names the keyword in errors.
fn items(obj: Option<&Bound<'_, PyAny>>, what: &str, objects: &mut Objects) -> PyResult<Vec<Value>> {
    let monitor = what == "monitor";
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(vec![]) };
    if obj.is_instance_of::<PyDict>() || obj.is_instance_of::<PyString>() || obj.cast::<Vector>().is_ok() {
        return Ok(vec![item_json(obj, objects, monitor)?]);
    }
    let list = obj.try_iter().map_err(|_| {
        crate::err(format!(
            "{what}: expected a list of dicts, got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    list.map(|x| item_json(&x?, objects, monitor)).collect()
}

/// The steering plan of `steer` and `monitor` keyword arguments, resolved against the model.
/// Errors are `PersonaError` (a `ValueError`): `steer[i]: <the library's message>`.
pub fn resolve(
    steer: Option<&Bound<'_, PyAny>>,
    monitor: Option<&Bound<'_, PyAny>>,
    dirs: &[std::path::PathBuf],
    cfg: &ModelConfig,
) -> PyResult<Resolved> {
    let mut objects = Objects::new();
    let s = items(steer, "steer", &mut objects)?;
    let m = items(monitor, "monitor", &mut objects)?;
    // Messages, receipts and monitors name an object by its vector's name, not by its key.
    let names: Vec<(String, String)> = objects.iter().map(|(k, v)| (k.clone(), v.name.clone())).collect();
    let shown = |text: &str| names.iter().fold(text.to_string(), |t, (k, n)| t.replace(k.as_str(), n));
    let bad = |what: &str, i: usize, e: ReqError| crate::err(format!("{what}[{i}]: {}", shown(&e.message)));
    let s: Vec<SteerRequest> = s
        .iter()
        .enumerate()
        .map(|(i, v)| SteerRequest::from_json(v).map_err(|e| bad("steer", i, e)))
        .collect::<PyResult<_>>()?;
    let m: Vec<MonitorRequest> = m
        .iter()
        .enumerate()
        .map(|(i, v)| MonitorRequest::from_json(v).map_err(|e| bad("monitor", i, e)))
        .collect::<PyResult<_>>()?;
    let mut src = PySource { objects, files: request::FileSource::new(dirs.to_vec()) };
    let mut r = request::resolve(&s, &m, &mut src, cfg).map_err(|(item, e)| match item {
        request::Item::Steer(i) => bad("steer", i, e),
        request::Item::Monitor(i) => bad("monitor", i, e),
        _ => crate::err(shown(&e.message)),
    })?;
    for src in &mut r.steering.sources {
        src.vector = shown(&src.vector);
    }
    for m in &mut r.monitors {
        m.vector = shown(&m.vector);
    }
    for w in &mut r.warnings {
        *w = shown(w);
    }
    Ok(r)
}
