//! A `persona serve` request body (chat or text completion, or the server-default steering), as
//! the handlers check it before queueing: `serve::api::{parse_body, check_keys, check_model,
//! Common::parse, check_prompt_bytes}`, `serve::parse_messages` (then the tiny model's chat
//! template and tokenizer, as the chat route does) and `serve::registry::resolve` (steering and
//! monitors against a registry holding the tiny model's vector), and the error bodies.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use persona::serve::api::{check_keys, check_model, check_prompt_bytes, field, parse_body, Common};
use persona::serve::parse_messages;
use persona::serve::registry::{resolve, Registry};

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let r = Registry::default();
        r.insert(persona_fuzz::tiny_vector());
        let mut bare = persona_fuzz::tiny_vector();
        bare.name = "bare".into();
        bare.metadata.clear();
        r.insert(bare);
        r
    })
}

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let m = match parse_body(data) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.body();
            return;
        }
    };
    for chat in [true, false] {
        if let Err(e) = check_keys(&m, chat) {
            let _ = e.body();
        }
        let _ = Common::parse(&m, chat);
    }
    let _ = check_model(&m, "persona-fuzz-tiny");
    if let Some(s) = field(&m, "prompt").and_then(|p| p.as_str()) {
        let _ = check_prompt_bytes(s.len(), 128, "prompt");
    }
    // The chat route: messages, their size, the template, the tokenizer.
    if let Ok(msgs) = parse_messages(field(&m, "messages")) {
        if check_prompt_bytes(msgs.iter().map(|m| m.content.len()).sum(), 128, "messages").is_ok() {
            let tiny = persona_fuzz::tiny_model();
            if let Ok(text) = tiny.chat_template.as_ref().expect("tiny template").render(&msgs, true) {
                let _ = tiny.tokenizer.as_ref().expect("tiny tokenizer").encode(text, false);
            }
        }
    }
    let cfg = persona_fuzz::tiny_config();
    if let Err(e) = resolve(field(&m, "steering"), field(&m, "monitor"), registry(), cfg) {
        let _ = e.body();
    }
});
