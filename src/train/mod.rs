//! Fine-tuning beside the engine: LoRA adapters trained with steering in the training pass
//! (preventative steering, CAFT). The engine knows nothing of training; this module drives its
//! forward pass with a hook that adds the adapter and keeps what the backward needs.

pub mod backend;
pub mod bench;
pub mod cpu;
pub mod data;
pub mod optim;
pub mod pass;
pub mod trainer;

pub use backend::{SeqRows, TrainBackend};
pub use trainer::{init_adapter, StepLog, TrainOptions, Trainer};
