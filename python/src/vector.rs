//! `persona.Vector`: a persona vector, `[N+1, hidden]` f32 (one row per residual index), with
//! its metadata.

use std::collections::BTreeMap;
use std::sync::Arc;

use numpy::prelude::*;
use numpy::{AllowTypeChange, PyArray1, PyArray2, PyArrayLike2};
use persona::steer::vector::PersonaVector;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::err;
use crate::model::Model;

/// A persona vector: one direction per residual index 0..=N (index 0 is the embedding output,
/// index L the residual after block L-1), as `persona extract` writes it.
///
/// Example:
///     >>> v = persona.Vector.load("vectors/smollm2-135m-instruct/evil.safetensors")
///     >>> v.to_numpy().shape
///     (31, 576)
#[pyclass(frozen, module = "persona._persona")]
#[derive(Clone)]
pub struct Vector {
    pub inner: Arc<PersonaVector>,
}

impl Vector {
    pub fn new(v: PersonaVector) -> Self {
        Vector { inner: Arc::new(v) }
    }
}

#[pymethods]
impl Vector {
    /// Read a persona vector file (`.safetensors` from persona, or a llama.cpp control vector
    /// `.gguf`, whose layers are mapped by the file itself).
    #[staticmethod]
    fn load(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        py.detach(|| PersonaVector::load(&path)).map(Vector::new).map_err(err)
    }

    /// Write the vector as persona safetensors (atomically: a crash leaves the old file or none).
    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        let v = self.inner.clone();
        py.detach(|| v.save(&path)).map_err(err)
    }

    /// A vector from a float array of shape `[N+1, hidden]` (cast to float32).
    ///
    /// Example:
    ///     >>> v = persona.Vector.from_numpy(np.zeros((31, 576)), name="zero")
    #[staticmethod]
    #[pyo3(signature = (array, name = "vector".to_string(), metadata = None))]
    fn from_numpy(
        array: PyArrayLike2<'_, f32, AllowTypeChange>,
        name: String,
        metadata: Option<BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let shape = array.shape().to_vec();
        if shape[0] < 2 || shape[1] == 0 {
            return Err(err(format!(
                "from_numpy: shape {shape:?}: a persona vector has N+1 ≥ 2 rows (residual indices 0..=N) of hidden ≥ 1 values"
            )));
        }
        let data: Vec<f32> = array.as_array().iter().copied().collect();
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(err(format!(
                "from_numpy: value {} at row {}, column {} is not finite",
                data[i],
                i / shape[1],
                i % shape[1]
            )));
        }
        let mut v = PersonaVector::new(name, shape[0] - 1, shape[1], data).map_err(err)?;
        v.metadata.extend(metadata.unwrap_or_default());
        Ok(Vector::new(v))
    }

    /// The values as a float32 array `[N+1, hidden]` (a copy).
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        PyArray1::from_vec(py, self.inner.data.clone()).reshape([self.inner.n_layers + 1, self.inner.hidden])
    }

    /// Import a llama.cpp control vector (GGUF) for `model`.
    #[staticmethod]
    fn import_control_vector(py: Python<'_>, path: std::path::PathBuf, model: &Model) -> PyResult<Self> {
        let cfg = model.config();
        py.detach(|| persona::steer::control_vector::import_control_vector(&path, &cfg)).map(Vector::new).map_err(err)
    }

    /// Export as a llama.cpp control vector (GGUF), loadable with llama.cpp's `--control-vector`.
    #[pyo3(signature = (path, model_hint = ""))]
    fn export_control_vector(&self, py: Python<'_>, path: std::path::PathBuf, model_hint: &str) -> PyResult<()> {
        let v = self.inner.clone();
        py.detach(|| persona::steer::control_vector::export_control_vector(&v, &path, model_hint)).map_err(err)
    }

    #[getter]
    fn name(&self) -> String {
        self.inner.name.clone()
    }

    /// N, the number of decoder blocks (the vector has N+1 rows).
    #[getter]
    fn n_layers(&self) -> usize {
        self.inner.n_layers
    }

    #[getter]
    fn hidden(&self) -> usize {
        self.inner.hidden
    }

    /// The layer `persona eval` chose for steering (`persona.layer`), if recorded.
    #[getter]
    fn layer(&self) -> PyResult<Option<usize>> {
        persona::steer::spec::recorded_layer(&self.inner).map_err(err)
    }

    /// The file's metadata (`persona.*` keys: trait, model, layer, mean_norms, baseline, ...).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.inner.metadata {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// The L2 norm of every row, float32 `[N+1]`.
    fn norms<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.inner.norms().into_pyarray(py)
    }

    /// Cosine similarity with `other` at `layer`, or at every layer (float32 `[N+1]`, NaN where
    /// either row is zero) when `layer` is None.
    #[pyo3(signature = (other, layer = None))]
    fn cosine<'py>(&self, py: Python<'py>, other: &Vector, layer: Option<usize>) -> PyResult<Bound<'py, PyAny>> {
        self.same_shape(other)?;
        match layer {
            Some(l) => {
                self.inner.check_layer(l).map_err(err)?;
                Ok(self.inner.cosine(&other.inner, l).unwrap_or(f32::NAN).into_pyobject(py)?.into_any())
            }
            None => {
                let v: Vec<f32> =
                    (0..=self.inner.n_layers).map(|l| self.inner.cosine(&other.inner, l).unwrap_or(f32::NAN)).collect();
                Ok(v.into_pyarray(py).into_any())
            }
        }
    }

    /// This vector with its component along `other` removed, layer by layer.
    fn orthogonalize(&self, other: &Vector) -> PyResult<Self> {
        self.inner.orthogonalized_against(&other.inner).map(Vector::new).map_err(err)
    }

    /// Only the rows of `layers` kept (the others zero).
    fn only_layers(&self, layers: Vec<usize>) -> PyResult<Self> {
        self.inner.only_layers(&layers).map(Vector::new).map_err(err)
    }

    fn __add__(&self, other: &Vector) -> PyResult<Self> {
        self.inner.add(&other.inner).map(Vector::new).map_err(err)
    }

    fn __sub__(&self, other: &Vector) -> PyResult<Self> {
        let mut d = self.inner.add(&other.inner.scaled(-1.0)).map_err(err)?;
        d.name = format!("{}-{}", self.inner.name, other.inner.name);
        Ok(Vector::new(d))
    }

    fn __mul__(&self, c: f32) -> PyResult<Self> {
        if !c.is_finite() {
            return Err(err(format!("cannot scale a vector by {c}")));
        }
        Ok(Vector::new(self.inner.scaled(c)))
    }

    fn __rmul__(&self, c: f32) -> PyResult<Self> {
        self.__mul__(c)
    }

    fn __neg__(&self) -> Self {
        Vector::new(self.inner.scaled(-1.0))
    }

    fn __repr__(&self) -> String {
        format!("persona.Vector({})", self.inner.summary())
    }
}

impl Vector {
    fn same_shape(&self, o: &Vector) -> PyResult<()> {
        let (a, b) = (&self.inner, &o.inner);
        if (a.n_layers, a.hidden) != (b.n_layers, b.hidden) {
            return Err(err(format!(
                "vectors `{}` (N={}, H={}) and `{}` (N={}, H={}) have different shapes",
                a.name, a.n_layers, a.hidden, b.name, b.n_layers, b.hidden
            )));
        }
        Ok(())
    }
}
