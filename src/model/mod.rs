//! Model files: configuration, weights (safetensors, GGUF), tokenizer and chat template.
//! Knows nothing of execution.

pub mod config;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod tensor;
