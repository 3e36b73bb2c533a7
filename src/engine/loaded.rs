//! A model ready for text: the engine plus its tokenizer and chat template.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::Engine;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{ChatTemplate, Message, ModelFiles};

/// What a request starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages, rendered with the model's chat template (with the generation prompt).
    Chat(Vec<Message>),
    /// Text sent as is (the tokenizer adds special tokens as configured).
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// A model loaded on a backend, with text in and out.
///
/// ```no_run
/// use persona::{LoadedModel, backend::cpu::CpuBackend, model::Message};
/// use persona::engine::generate::GenRequest;
/// let m = LoadedModel::load(std::path::Path::new("model.gguf"), CpuBackend, 2048)?;
/// let ids = m.chat_prompt_ids(&[Message::user("Hi!")])?;
/// let out = m.engine.generate(&[GenRequest::greedy(ids, 32)], &mut |_, _| {})?;
/// println!("{}", m.decode(&out[0].ids())?);
/// # Ok::<(), persona::Error>(())
/// ```
pub struct LoadedModel<B: Backend> {
    pub engine: Engine<B>,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
}

impl<B: Backend> LoadedModel<B> {
    /// Open a HF folder or GGUF file and upload it to `backend`; `max_context` bounds the
    /// sequence length (prompt + generated tokens).
    pub fn load(path: &Path, backend: B, max_context: usize) -> Result<Self> {
        let files = ModelFiles::open(path)?;
        Self::from_files(files, backend, max_context)
    }

    pub fn from_files(files: ModelFiles, backend: B, max_context: usize) -> Result<Self> {
        let engine = Engine::new(backend, files.config.clone(), &files.tensors, max_context)?;
        Ok(LoadedModel { engine, tokenizer: files.tokenizer, chat_template: files.chat_template, path: files.path })
    }

    fn tok(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!("{} has no tokenizer; pass token ids instead", self.path.display()))
        })
    }

    /// Text to ids (`add_special`: let the tokenizer add BOS etc. as it is configured to).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.tok()?.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids to text, special tokens included (as transformers' decode does by default).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok()?.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The generated ids of `g` without end-of-sequence tokens.
    pub fn answer_ids(&self, g: &crate::engine::generate::GenOutput) -> Vec<u32> {
        let eos = &self.engine.config.eos_ids;
        g.ids().into_iter().filter(|i| !eos.contains(i)).collect()
    }

    /// The generated text of `g`, end-of-sequence tokens left out.
    pub fn answer_text(&self, g: &crate::engine::generate::GenOutput) -> Result<String> {
        self.decode(&self.answer_ids(g))
    }

    /// The exact prompt string the model's chat template produces.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            Error::Template(format!("{} has no chat template; use a raw prompt", self.path.display()))
        })?;
        t.render(messages, add_generation_prompt)
    }

    /// The token ids of a [`Prompt`].
    pub fn prompt_ids(&self, p: &Prompt) -> Result<Vec<u32>> {
        match p {
            Prompt::Chat(m) => self.chat_prompt_ids(m),
            Prompt::Text(t) => self.encode(t, true),
            Prompt::Ids(ids) => Ok(ids.clone()),
        }
    }

    /// Chat messages to prompt ids, with the generation prompt (special tokens are in the text).
    pub fn chat_prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.tok()?;
        let text = self.apply_chat_template(messages, true)?;
        self.encode(&text, false)
    }

    /// [`LoadedModel::load`] with a PEFT LoRA adapter folder (`adapter_config.json` +
    /// `adapter_model.safetensors`) merged into the weights; `None` loads the model as is.
    ///
    /// ```no_run
    /// use persona::{LoadedModel, backend::cpu::CpuBackend};
    /// use std::path::Path;
    /// let m = LoadedModel::load_with_adapter(Path::new("model"), Some(Path::new("adapter")), CpuBackend, 2048)?;
    /// # Ok::<(), persona::Error>(())
    /// ```
    pub fn load_with_adapter(path: &Path, adapter: Option<&Path>, backend: B, max_context: usize) -> Result<Self> {
        let mut files = ModelFiles::open(path)?;
        if let Some(dir) = adapter {
            crate::model::lora::LoraAdapter::load(dir, &files.config)?.merge_into(&mut files.tensors)?;
        }
        Self::from_files(files, backend, max_context)
    }
}

/// Turns a growing list of ids into text pieces for streaming: decodes the whole list and emits
/// what is new, holding back an incomplete UTF-8 sequence (shown as U+FFFD) until it completes.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let text = tok.decode(&self.ids, false).unwrap_or_default();
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            return String::new();
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        piece
    }
}
