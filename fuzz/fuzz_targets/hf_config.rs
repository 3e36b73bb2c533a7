//! A HF model folder: `config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `chat_template.jinja`, `model.safetensors.index.json` (parts of the
//! input split at `persona_fuzz::SEP`, in that order; an empty part is an absent file), loaded
//! with `ModelFiles::open` (and the config alone with `ModelConfig::from_hf_str`), then the
//! tokenizer and chat template used.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persona::model::{ModelConfig, ModelFiles};

const FILES: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let parts = persona_fuzz::parts(data, FILES.len());
    if let Ok(text) = std::str::from_utf8(parts[0]) {
        if let Ok(cfg) = ModelConfig::from_hf_str(text, Path::new("config.json")) {
            let _ = cfg.rope.inv_freq(cfg.head_dim.min(1 << 12));
        }
    }
    let dir = persona_fuzz::scratch().join("hf");
    std::fs::create_dir_all(&dir).expect("scratch folder");
    for (name, part) in FILES.iter().zip(&parts) {
        let p = dir.join(name);
        if part.is_empty() {
            let _ = std::fs::remove_file(&p);
        } else {
            std::fs::write(&p, part).expect("scratch file");
        }
    }
    let Ok(m) = ModelFiles::open(&dir) else { return };
    let _ = m.listing.len();
    for l in &m.tensors.layers {
        let _ = (l.wq.to_f32().len(), l.bq.as_ref().map(|b| b.numel()));
    }
    if let Some(tok) = &m.tokenizer {
        persona_fuzz::exercise_tokenizer(tok);
    }
    if let Some(t) = &m.chat_template {
        let _ = t.render(&persona_fuzz::conversation(), true);
    }
});
