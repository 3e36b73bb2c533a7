//! Persona vectors (file formats, arithmetic), steering plans, probes and captures.

pub mod control_vector;
pub mod plan;
pub mod request;
pub mod spec;
pub mod vector;

pub use plan::{
    Capture, Cmp, Condition, OpCount, OpSource, Positions, Probe, Receipt, SeqSteering, SteerKind, SteerOp,
    SteeringPlan,
};
