//! Shared pieces of the fuzz targets: splitting a multi-file input, the tiny model (from the
//! committed seed `seeds/gguf/tiny-model`, written by `tests/fuzz_regressions.rs`), its tokenizer
//! and chat template, a persona vector for it, and a per-process scratch folder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use persona::model::gguf::GgufFile;
use persona::model::{Message, ModelConfig, ModelFiles};
use persona::steer::vector::PersonaVector;

/// Call first in every target. persona catches the panics of a few third-party crates and turns
/// them into errors (the tokenizers crate on a malformed tokenizer.json, minijinja on some
/// templates); libfuzzer-sys's panic hook aborts on every panic, caught or not, so it is replaced
/// by the default hook. A panic that escapes the library still aborts (libfuzzer-sys catches it
/// around each input) and is reported as a crash, with the default hook's message and backtrace.
pub fn init() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
}

/// Separates the files of a multi-file input (NUL bytes: never inside the JSON or text parts).
pub const SEP: &[u8] = b"\x00PART\x00";

/// The first `n` parts of `data` split at [`SEP`]; missing parts are empty.
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

/// The tiny model's GGUF image (llama, H=32, N=2, a 270-token byte-level BPE, ChatML template).
pub static TINY_MODEL_GGUF: &[u8] = include_bytes!("../seeds/gguf/tiny-model");

/// The tiny model, loaded once.
pub fn tiny_model() -> &'static ModelFiles {
    static M: OnceLock<ModelFiles> = OnceLock::new();
    M.get_or_init(|| {
        let g = GgufFile::from_bytes(Path::new("tiny-model.gguf"), TINY_MODEL_GGUF).expect("tiny model seed");
        persona::model::gguf_model::model_from_gguf(&g).expect("tiny model seed loads")
    })
}

pub fn tiny_config() -> &'static ModelConfig {
    &tiny_model().config
}

/// A vector for the tiny model (`persona.layer` 1, with `persona.mean_norms`).
pub fn tiny_vector() -> PersonaVector {
    static V: OnceLock<PersonaVector> = OnceLock::new();
    V.get_or_init(|| {
        PersonaVector::from_safetensors_bytes(include_bytes!("../seeds/vector_file/tiny-evil"), Path::new("evil"))
            .expect("vector seed")
    })
    .clone()
}

/// A folder of this process's own under the temp dir, created once (for loaders that read
/// files by path).
pub fn scratch() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("persona-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch folder");
        d
    })
}

/// A short conversation with every role.
pub fn conversation() -> Vec<Message> {
    vec![
        Message::system("You are terse."),
        Message::user("Hello, world! 123 <|im_end|> naïve 数学 🎉"),
        Message::assistant("Hi."),
        Message::user("Again?"),
    ]
}

/// Encode and decode a few strings with `tok` (special tokens inside the text, non-ASCII).
pub fn exercise_tokenizer(tok: &tokenizers::Tokenizer) {
    for text in ["", "Hello, world! The weather in the west.", "<|im_start|>user\nnaïve 数学 🎉\t\r\n  x<|im_end|>"]
    {
        for special in [false, true] {
            if let Ok(enc) = tok.encode(text, special) {
                let ids = enc.get_ids().to_vec();
                let _ = tok.decode(&ids, false);
                let _ = tok.decode(&ids, true);
            }
        }
    }
    let _ = tok.id_to_token(0);
    let _ = tok.get_vocab_size(true);
}

/// The tiny model as the fine-tuning reader sees it.
pub struct TinyText;

impl persona::train::data::TextModel for TinyText {
    fn encode(&self, text: &str, add_special: bool) -> persona::Result<Vec<u32>> {
        let tok = tiny_model().tokenizer.as_ref().expect("tiny tokenizer");
        Ok(tok.encode(text, add_special).map_err(|e| persona::Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
    }
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> persona::Result<String> {
        tiny_model().chat_template.as_ref().expect("tiny template").render(messages, add_generation_prompt)
    }
    fn eos_ids(&self) -> &[u32] {
        &tiny_config().eos_ids
    }
    fn vocab(&self) -> usize {
        tiny_config().vocab
    }
}
