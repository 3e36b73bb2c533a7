//! Model files: configuration, weights (safetensors, GGUF), tokenizer and chat template.
//! Knows nothing of execution.

pub mod chat;
pub mod config;
pub mod gguf;
pub mod gguf_model;
mod gguf_quant;
pub mod gguf_tokenizer;
mod gguf_types;
mod gguf_write;
pub mod load;
pub mod lora;
pub mod safetensors;
pub mod tensor;

pub use chat::{ChatTemplate, Message};
pub use config::ModelConfig;
pub use load::ModelFiles;
