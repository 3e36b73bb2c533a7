//! persona: an inference engine for persona vectors.

pub mod atomic_file;
pub mod backend;
pub mod bench;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod model;
pub mod persona;
pub mod plot;
pub mod serve;
pub mod steer;
pub mod train;

pub use error::{Error, Result};

pub use engine::loaded::LoadedModel;
pub use engine::Engine;
