//! A chat template (Jinja) compiled and rendered: the template, then optionally the
//! conversation as JSON `[{"role", "content"}]` (split at `persona_fuzz::SEP`) —
//! `ChatTemplate::new`, `ChatTemplate::render`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona::model::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let parts = persona_fuzz::parts(data, 2);
    let Ok(src) = std::str::from_utf8(parts[0]) else { return };
    let msgs: Vec<Message> = serde_json::from_slice(parts[1]).unwrap_or_else(|_| persona_fuzz::conversation());
    let Ok(t) = ChatTemplate::new(src, "<|im_start|>", "<|im_end|>") else { return };
    let _ = t.render(&msgs, true);
    let _ = t.render(&msgs, false);
});
