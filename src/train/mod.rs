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

/// A training step allocates and frees the same large buffers (the tape, logits, gradients) every
/// step; glibc would unmap each one on free and fault it in again (measured: 12% of a step on the
/// default model). Serve them from the heap instead and keep freed memory in the process. Call
/// once, before training; process-wide.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
