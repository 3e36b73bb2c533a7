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
}
