//! Shared helpers for integration tests: fixture paths and JSON access.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("PERSONA_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

pub fn json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The default model (SmolLM2-135M-Instruct Q4_1 GGUF), if it is in the cache or named by
/// PERSONA_MODEL_GGUF.
pub fn default_model() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PERSONA_MODEL_GGUF") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    persona::fetch::cached_default_model()
}

/// Compare greedy ids with a reference up to the first step whose reference margin is below `noise`.
pub fn assert_greedy_prefix(got: &[u32], want: &[u32], margins: &[f32], noise: f32, what: &str) {
    for i in 0..want.len() {
        assert_eq!(
            got[i], want[i],
            "{what}: greedy id {i} differs (got {:?}, want {:?})",
            got, want
        );
        if margins[i] < noise {
            eprintln!(
                "{what}: stopping comparison at step {i} (reference margin {} < {noise})",
                margins[i]
            );
            return;
        }
    }
}
