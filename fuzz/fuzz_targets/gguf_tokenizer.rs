//! The tokenizer (and chat template) rebuilt from a GGUF file's metadata, then used:
//! `gguf_tokenizer::tokenizer_from_gguf`, `gguf_chat_template`, `ChatTemplate::new` / `render`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persona::model::gguf::GgufFile;
use persona::model::gguf_tokenizer::{gguf_chat_template, tokenizer_from_gguf};
use persona::model::ChatTemplate;

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let Ok(g) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data) else { return };
    let tok = tokenizer_from_gguf(&g);
    if let Ok(tok) = &tok {
        persona_fuzz::exercise_tokenizer(tok);
    }
    if let Some(src) = gguf_chat_template(&g) {
        let name = |key: &str| -> String {
            match (g.get_u64(key), &tok) {
                (Some(id), Ok(t)) => u32::try_from(id).ok().and_then(|i| t.id_to_token(i)).unwrap_or_default(),
                _ => String::new(),
            }
        };
        let bos = name("tokenizer.ggml.bos_token_id");
        let eos = name("tokenizer.ggml.eos_token_id");
        if let Ok(t) = ChatTemplate::new(&src, &bos, &eos) {
            let conv = persona_fuzz::conversation();
            if let (Ok(text), Ok(tok)) = (t.render(&conv, true), &tok) {
                let _ = tok.encode(text, false);
            }
            let _ = t.render(&conv[..1], false);
        }
    }
});
