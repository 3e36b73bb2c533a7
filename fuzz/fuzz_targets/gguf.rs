//! A GGUF file: header, metadata, tensor table; then every small tensor read (dequantized),
//! the model config, and the whole model load (tensors in HF naming, q/k un-permuted,
//! tokenizer, chat template) — `GgufFile::from_bytes`, `GgufFile::tensor`,
//! `gguf_model::config_from_gguf`, `gguf_model::model_from_gguf`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persona::model::gguf::{dequantize, GgufFile};
use persona::model::gguf_model::{config_from_gguf, model_from_gguf};

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let Ok(g) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data) else { return };
    let _ = (g.version(), g.alignment(), g.data_offset(), g.file_size(), format!("{g:?}"));
    for (k, v) in g.metadata() {
        let _ = (g.get_u64(k), g.get_f64(k), g.get_str(k), g.get_bool(k), g.get_array(k), v.type_name());
        let _ = (v.as_i64(), format!("{v:?}"));
    }
    for info in g.tensors() {
        let _ = (info.shape(), info.n_elements(), info.n_bytes(), info.ggml_type.name(), info.ggml_type.is_readable());
        let Ok(bytes) = g.tensor_data(info) else { continue };
        // Tensors are bounded by the file; keep the per-input work small all the same.
        if info.n_elements() <= 1 << 16 {
            if let Ok(t) = g.tensor(&info.name) {
                assert_eq!(t.numel(), info.n_elements() as usize, "tensor `{}`", info.name);
                let v = t.to_f32();
                assert_eq!(v.len(), t.numel());
            }
            let _ = dequantize(info.ggml_type, bytes, info.n_elements() as usize);
        }
    }
    if let Ok(cfg) = config_from_gguf(&g) {
        let _ = cfg.rope.inv_freq(cfg.head_dim.min(1 << 12));
    }
    if let Ok(m) = model_from_gguf(&g) {
        if let Some(tok) = &m.tokenizer {
            persona_fuzz::exercise_tokenizer(tok);
        }
        if let Some(t) = &m.chat_template {
            let _ = t.render(&persona_fuzz::conversation(), true);
        }
    }
});
