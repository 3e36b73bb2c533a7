//! Persona pipelines: traits, extraction, judges, evaluation, monitoring, screening.

pub mod common;
pub mod dataset;
pub mod eval;
pub mod extract;
pub mod judge;
pub mod monitor;
pub mod screen;
pub mod screening;
pub mod traits;
pub mod vaccine;
