//! `persona._persona`: the Python face of persona. Thin: every request goes through the
//! library's own types ([`persona::steer::request`] for steering and monitoring, the engine's
//! batched `generate`), so Python, the CLI and the HTTP server give the same tokens and
//! projections and the same error messages. The GIL is released while the engine runs.

mod convert;
mod model;
mod vector;

use pyo3::prelude::*;

pyo3::create_exception!(
    persona._persona,
    PersonaError,
    pyo3::exceptions::PyValueError,
    "An error from persona (bad input, a file it cannot read, a model it cannot run). A ValueError."
);

/// A library error as a Python exception, with the library's message.
pub(crate) fn err(e: impl std::fmt::Display) -> PyErr {
    PersonaError::new_err(e.to_string())
}

#[pymodule(module = "persona")]
mod _persona {
    #[pymodule_export]
    use super::model::{Generation, Model, Token, TokenStream};
    #[pymodule_export]
    use super::vector::Vector;
    #[pymodule_export]
    use super::PersonaError;

    #[pymodule_export]
    const VERSION: &str = env!("CARGO_PKG_VERSION");

    /// The CPU backend's activations, for the whole process (every CPU model, from the next
    /// call on): "f32" (the default; exact) or "q8", 8 bits per 32 values as llama.cpp does, for
    /// matmuls with Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights (faster decode; each matmul differs from
    /// the exact one by NMSE about 1e-5). GPU backends always run f32 activations. Returns the
    /// previous setting.
    ///
    /// Example:
    ///     >>> persona.set_cpu_activations("q8")
    ///     'f32'
    #[pyo3::pyfunction]
    fn set_cpu_activations(mode: &str) -> pyo3::PyResult<&'static str> {
        use persona::backend::cpu::{activations, set_activations, Activations};
        let a = match mode {
            "f32" => Activations::F32,
            "q8" => Activations::Q8,
            o => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "cpu activations `{o}`: expected f32 or q8"
                )))
            }
        };
        let before = activations().name();
        set_activations(a);
        Ok(before)
    }
}
