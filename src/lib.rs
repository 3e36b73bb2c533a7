//! persona: an inference engine for persona vectors.

pub mod error;
pub mod model;

pub use error::{Error, Result};
