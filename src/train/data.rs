//! Fine-tuning data: JSONL rows to token ids with loss targets.
//!
//! Each non-blank line of a training file is one JSON object of one of these shapes:
//! - `{"messages": [{"role": "user", "content": ".."}, {"role": "assistant", "content": ".."}, ..]}`:
//!   rendered with the model's chat template exactly as for generation; the loss is on every
//!   assistant turn (its text and its end-of-turn token).
//! - `{"prompt": "..", "response": ".."}` or `{"question": "..", "answer": ".."}` (the extraction
//!   files under `vectors/`): one user turn and one assistant turn, as `messages`. A `system` field
//!   in these flat rows is **ignored**: training teaches the persona without the instruction that
//!   elicited it. Use `messages` to train with a system turn.
//! - `{"ids": [..], "answer_from": k}`: token ids (for models without a tokenizer); tokens k.. are
//!   the answer.
//!
//! Flat and `ids` rows may carry other fields (the extraction files have `label`, `pair`, `kept`);
//! no row may mix shapes. Every error names the file and the 1-based line.
//!
//! How a conversation is tokenised: for assistant message i, the template renders the messages
//! before it with the generation prompt (P) and the messages up to it without (F); F must start
//! with P. The ids are `encode(piece, false)` of successive pieces — the text up to P, then F's
//! suffix after P, then the text up to the next P, … — so tokenisation never crosses an
//! assistant-turn boundary. The targets of a turn are its suffix's tokens up to and including the
//! first end-of-sequence token; what follows it (a newline) is context for later turns, and is
//! dropped after the last assistant turn. Messages after the last assistant turn are dropped.

use std::path::Path;

use serde_json::{Map, Value};

use crate::backend::Backend;
use crate::engine::loaded::LoadedModel;
use crate::engine::sampler::Rng;
use crate::error::{Error, Result};
use crate::model::Message;

/// One training sequence: token ids and which of them are loss targets.
///
/// ```
/// use persona::train::data::Example;
/// let ex = Example::with_answer_from(vec![5, 6, 7, 8], 2)?;
/// assert_eq!(ex.target, vec![false, false, true, true]);
/// assert_eq!(ex.n_targets(), 2);
/// # Ok::<(), persona::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `target[i]`: token i is predicted (its loss comes from the logits of row i-1).
    /// `target[0]` is always false.
    pub target: Vec<bool>,
    /// 1-based line number in the source file (for error messages), 0 when built in code.
    pub line: usize,
}

impl Example {
    /// `ids` with every token from `answer_from` on a target (`1 <= answer_from < ids.len()`).
    pub fn with_answer_from(ids: Vec<u32>, answer_from: usize) -> Result<Example> {
        if answer_from < 1 || answer_from >= ids.len() {
            return Err(Error::Invalid(format!(
                "answer_from must be in 1..{} for {} ids (got {answer_from})",
                ids.len().max(1),
                ids.len()
            )));
        }
        let target = (0..ids.len()).map(|i| i >= answer_from).collect();
        Ok(Example { ids, target, line: 0 })
    }

    /// How many tokens are loss targets.
    pub fn n_targets(&self) -> usize {
        self.target.iter().filter(|t| **t).count()
    }
}

/// What the reader needs from a model: tokenizer, chat template and end-of-sequence ids.
/// Implemented for [`LoadedModel`] on any backend.
pub trait TextModel {
    /// Text to ids (`add_special`: let the tokenizer add BOS etc. as configured).
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>>;
    /// The chat template's rendering of `messages`.
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String>;
    /// End-of-sequence ids (an assistant turn ends with one of them).
    fn eos_ids(&self) -> &[u32];
    /// Number of token ids the model has embeddings for.
    fn vocab(&self) -> usize;
}

impl<B: Backend> TextModel for LoadedModel<B> {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        LoadedModel::encode(self, text, add_special)
    }
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template(messages, add_generation_prompt)
    }
    fn eos_ids(&self) -> &[u32] {
        &self.engine.config.eos_ids
    }
    fn vocab(&self) -> usize {
        self.engine.config.vocab
    }
}

/// How rows are read.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// Longest row in tokens; a longer row is an error (never silently truncated).
    pub max_len: usize,
    /// Keep only rows whose `"label"` field equals this (extraction files label answers
    /// `"pos"`/`"neg"`); rows without a label are then skipped.
    pub label: Option<String>,
}

/// Read a JSONL training file (see the module docs for the row shapes).
///
/// ```no_run
/// use persona::{LoadedModel, backend::cpu::CpuBackend};
/// use persona::train::data::{read_jsonl, DataOptions};
/// let m = LoadedModel::load(std::path::Path::new("model.gguf"), CpuBackend, 2048)?;
/// let opts = DataOptions { max_len: 512, label: Some("pos".into()) };
/// let rows = read_jsonl(std::path::Path::new("vectors/smollm2-135m-instruct/evil.jsonl"), &m, &opts)?;
/// println!("{} rows, {} answer tokens", rows.len(), rows.iter().map(|r| r.n_targets()).sum::<usize>());
/// # Ok::<(), persona::Error>(())
/// ```
pub fn read_jsonl(path: &Path, model: &dyn TextModel, opts: &DataOptions) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count();
        Error::format(path, format!("line {line}: not valid UTF-8"))
    })?;
    parse_rows(&text, path, model, opts)
}

/// Parse the rows of a JSONL text; `origin` names it in errors.
pub fn parse_rows(text: &str, origin: &Path, model: &dyn TextModel, opts: &DataOptions) -> Result<Vec<Example>> {
    if opts.max_len < 2 {
        return Err(Error::Invalid(format!("max_len must be at least 2 (got {})", opts.max_len)));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    let mut rows = 0;
    let mut labels: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let at = |msg: String| Error::format(origin, format!("line {n}: {msg}"));
        rows += 1;
        let value: Value = serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(at(format!("expected a JSON object, found {}", kind(&value))));
        };
        if let Some(want) = &opts.label {
            match obj.get("label") {
                Some(Value::String(l)) if l == want => {}
                Some(Value::String(l)) => {
                    if !labels.contains(l) {
                        labels.push(l.clone());
                    }
                    continue;
                }
                None => continue,
                Some(v) => return Err(at(format!("\"label\" must be a string, found {}", kind(v)))),
            }
        }
        let mut ex = parse_row(&obj, model).map_err(|e| match e {
            RowError::Msg(m) => at(m),
            RowError::Model(e) => at(e.to_string()),
        })?;
        if ex.ids.len() > opts.max_len {
            return Err(at(format!(
                "the row is {} tokens, longer than the limit of {} (raise --max-len, or shorten the row)",
                ex.ids.len(),
                opts.max_len
            )));
        }
        ex.line = n;
        out.push(ex);
    }
    if out.is_empty() {
        let msg = match &opts.label {
            Some(l) if rows > 0 => format!(
                "no training rows: none of the {rows} rows has \"label\": \"{l}\" (labels seen: {})",
                if labels.is_empty() { "none".to_string() } else { labels.join(", ") }
            ),
            _ => "no training rows".to_string(),
        };
        return Err(Error::format(origin, msg));
    }
    Ok(out)
}

/// Split off a held-out set: `round(fraction · n)` rows (at least one, and at least one left to
/// train on), chosen by a SplitMix64 shuffle seeded with `seed`. Both sides keep the file order.
/// Returns `(train, holdout)`.
pub fn split_holdout(rows: Vec<Example>, fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::Invalid(format!("the held-out fraction must be between 0 and 1 (got {fraction})")));
    }
    let n = rows.len();
    if n < 2 {
        return Err(Error::Invalid(format!("holding out rows needs at least 2 training rows (got {n})")));
    }
    let n_hold = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    // Fisher-Yates over row indices; the first n_hold of the permutation are held out.
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut held = vec![false; n];
    for &i in &order[..n_hold] {
        held[i] = true;
    }
    let (mut train, mut holdout) = (Vec::with_capacity(n - n_hold), Vec::with_capacity(n_hold));
    for (row, h) in rows.into_iter().zip(held) {
        if h {
            holdout.push(row);
        } else {
            train.push(row);
        }
    }
    Ok((train, holdout))
}

/// A row's error: a message about the row itself, or the model's (tokenizer, template) error.
enum RowError {
    Msg(String),
    Model(Error),
}

impl From<Error> for RowError {
    fn from(e: Error) -> Self {
        RowError::Model(e)
    }
}

impl From<String> for RowError {
    fn from(m: String) -> Self {
        RowError::Msg(m)
    }
}

type RowResult<T> = std::result::Result<T, RowError>;

const SHAPES: &str = "\"messages\", \"prompt\" + \"response\", \"question\" + \"answer\", or \"ids\" + \"answer_from\"";

fn parse_row(obj: &Map<String, Value>, model: &dyn TextModel) -> RowResult<Example> {
    let has = |k: &str| obj.contains_key(k);
    let shapes: Vec<&str> = [
        ("\"messages\"", has("messages")),
        ("\"prompt\"/\"response\"", has("prompt") || has("response")),
        ("\"question\"/\"answer\"", has("question") || has("answer")),
        ("\"ids\"/\"answer_from\"", has("ids") || has("answer_from")),
    ]
    .into_iter()
    .filter(|(_, present)| *present)
    .map(|(name, _)| name)
    .collect();
    match shapes.as_slice() {
        [] => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(format!("unknown row shape: expected {SHAPES} (found keys: {})", keys.join(", ")).into())
        }
        [_, _, ..] => Err(format!("the row mixes shapes ({}); use one of {SHAPES}", shapes.join(" and ")).into()),
        ["\"messages\""] => {
            let messages = parse_messages(obj.get("messages").unwrap_or(&Value::Null))?;
            conversation(model, &messages)
        }
        ["\"ids\"/\"answer_from\""] => ids_row(obj, model.vocab()),
        [flat] => {
            let (user, assistant) =
                if flat.starts_with("\"prompt") { ("prompt", "response") } else { ("question", "answer") };
            let messages = [Message::user(text_field(obj, user)?), Message::assistant(text_field(obj, assistant)?)];
            conversation(model, &messages)
        }
    }
}

/// A required, non-empty string field.
fn text_field(obj: &Map<String, Value>, key: &str) -> RowResult<String> {
    match obj.get(key) {
        None => Err(format!("missing \"{key}\"").into()),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("\"{key}\" is empty").into()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("\"{key}\" must be a string, found {}", kind(v)).into()),
    }
}

fn parse_messages(v: &Value) -> RowResult<Vec<Message>> {
    let Value::Array(items) = v else {
        return Err(
            format!("\"messages\" must be an array of {{\"role\", \"content\"}} objects, found {}", kind(v)).into()
        );
    };
    if items.is_empty() {
        return Err("\"messages\" is empty".to_string().into());
    }
    let mut out = Vec::with_capacity(items.len());
    for (j, m) in items.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(
                format!("messages[{j}] must be an object with \"role\" and \"content\", found {}", kind(m)).into()
            );
        };
        let role = text_field(m, "role").map_err(|e| prefix(e, j))?;
        let content = text_field(m, "content").map_err(|e| prefix(e, j))?;
        out.push(Message::new(role, content));
    }
    Ok(out)
}

fn prefix(e: RowError, j: usize) -> RowError {
    match e {
        RowError::Msg(m) => RowError::Msg(format!("messages[{j}]: {m}")),
        e => e,
    }
}

fn ids_row(obj: &Map<String, Value>, vocab: usize) -> RowResult<Example> {
    let Some(Value::Array(items)) = obj.get("ids") else {
        return Err(match obj.get("ids") {
            None => "missing \"ids\" (an array of token ids)".to_string(),
            Some(v) => format!("\"ids\" must be an array of token ids, found {}", kind(v)),
        }
        .into());
    };
    let mut ids = Vec::with_capacity(items.len());
    for (j, v) in items.iter().enumerate() {
        match v.as_u64() {
            Some(id) if id < vocab as u64 => ids.push(id as u32),
            Some(id) => return Err(format!("ids[{j}] = {id} is outside the vocabulary ({vocab} tokens)").into()),
            None => return Err(format!("ids[{j}] must be a non-negative integer, found {v}").into()),
        }
    }
    let k = match obj.get("answer_from") {
        None => return Err("missing \"answer_from\" (the index of the first answer token)".to_string().into()),
        Some(v) => v.as_u64().ok_or_else(|| format!("\"answer_from\" must be a non-negative integer, found {v}"))?,
    };
    if ids.len() < 2 {
        return Err(
            format!("\"ids\" has {} tokens; a row needs at least one prompt and one answer token", ids.len()).into()
        );
    }
    if k < 1 || k >= ids.len() as u64 {
        return Err(format!(
            "\"answer_from\" is {k}, but must be in 1..{} (the row has no answer tokens otherwise)",
            ids.len()
        )
        .into());
    }
    Ok(Example::with_answer_from(ids, k as usize)?)
}

/// Token ids and targets of a conversation, as the module docs describe.
fn conversation(model: &dyn TextModel, messages: &[Message]) -> RowResult<Example> {
    let Some(last) = messages.iter().rposition(|m| m.role == "assistant") else {
        return Err("the conversation has no assistant turn (nothing to train on)".to_string().into());
    };
    let eos = model.eos_ids();
    let (mut ids, mut target) = (Vec::new(), Vec::new());
    let mut done = String::new();
    for i in (0..=last).filter(|&i| messages[i].role == "assistant") {
        let p = model.render(&messages[..i], true)?;
        let f = model.render(&messages[..=i], false)?;
        let (Some(before), Some(answer)) = (p.strip_prefix(done.as_str()), f.strip_prefix(p.as_str())) else {
            return Err(format!("the chat template does not render turn {i} as a continuation").into());
        };
        if !before.is_empty() {
            let context = model.encode(before, false)?;
            target.extend(std::iter::repeat(false).take(context.len()));
            ids.extend(context);
        }
        let mut answer = model.encode(answer, false)?;
        let end = answer.iter().position(|t| eos.contains(t)).map_or(answer.len(), |k| k + 1);
        if i == last {
            answer.truncate(end);
        }
        target.extend((0..answer.len()).map(|k| k < end));
        ids.extend(answer);
        done = f;
    }
    if let Some(t) = target.first_mut() {
        *t = false; // the first token has no logits row before it
    }
    let vocab = model.vocab();
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(
            format!("token id {bad} from the tokenizer is outside the model's vocabulary ({vocab} tokens)").into()
        );
    }
    let ex = Example { ids, target, line: 0 };
    if ex.n_targets() == 0 {
        return Err("the row has no answer tokens".to_string().into());
    }
    Ok(ex)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes are ids, `$` is the end-of-turn id 1; turns render as `[role]content$\n`.
    struct Bytes;
    impl TextModel for Bytes {
        fn encode(&self, text: &str, _: bool) -> Result<Vec<u32>> {
            Ok(text.bytes().map(|b| if b == b'$' { 1 } else { b as u32 }).collect())
        }
        fn render(&self, messages: &[Message], gen: bool) -> Result<String> {
            let mut s: String = messages.iter().map(|m| format!("[{}]{}$\n", m.role, m.content)).collect();
            if gen {
                s.push_str("[assistant]");
            }
            Ok(s)
        }
        fn eos_ids(&self) -> &[u32] {
            &[1]
        }
        fn vocab(&self) -> usize {
            256
        }
    }

    fn rows(text: &str) -> Result<Vec<Example>> {
        parse_rows(text, Path::new("t.jsonl"), &Bytes, &DataOptions { max_len: 64, label: None })
    }

    /// Ids and targets from (text, is_target) pieces, `$` as id 1.
    fn expect(pieces: &[(&str, bool)]) -> (Vec<u32>, Vec<bool>) {
        let mut out = (vec![], vec![]);
        for (text, t) in pieces {
            for b in text.bytes() {
                out.0.push(if b == b'$' { 1 } else { b as u32 });
                out.1.push(*t);
            }
        }
        out
    }

    #[test]
    fn two_turns_target_answers_and_end_tokens_only() {
        let r = rows(r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"bc"},{"role":"user","content":"d"},{"role":"assistant","content":"e"},{"role":"user","content":"x"}]}"#).unwrap();
        let (ids, target) = expect(&[
            ("[user]a$\n[assistant]", false),
            ("bc$", true),
            ("\n[user]d$\n[assistant]", false),
            ("e$", true),
        ]);
        assert_eq!((r[0].ids.clone(), r[0].target.clone(), r[0].line), (ids, target, 1));
    }

    #[test]
    fn flat_rows_ignore_system_and_extra_fields() {
        let text = "\n{\"system\":\"s\",\"question\":\"q\",\"answer\":\"ok\",\"pair\":[0]}\n\n{\"prompt\":\"p\",\"response\":\"r\"}\n";
        let r = rows(text).unwrap();
        assert_eq!((r[0].line, r[1].line), (2, 4));
        assert_eq!((r[0].ids.clone(), r[0].target.clone()), expect(&[("[user]q$\n[assistant]", false), ("ok$", true)]));
        assert_eq!(r[1].n_targets(), 2);
    }

    #[test]
    fn ids_rows_and_errors() {
        let r = rows(r#"{"ids":[3,4,5],"answer_from":1}"#).unwrap();
        assert_eq!(r[0].target, vec![false, true, true]);
        for (bad, want) in [
            (r#"{"ids":[3,4,256],"answer_from":1}"#, "ids[2] = 256"),
            (r#"{"ids":[3,4],"answer_from":2}"#, "answer_from"),
            (r#"{"ids":[3,4],"answer_from":0}"#, "answer_from"),
            (r#"{"ids":[3,-4],"answer_from":1}"#, "ids[1]"),
            (r#"{"ids":[],"answer_from":1}"#, "at least one"),
            (r#"{"ids":[3,4]}"#, "missing \"answer_from\""),
        ] {
            let e = rows(&format!("\n{bad}")).unwrap_err().to_string();
            assert!(e.contains("t.jsonl: line 2:") && e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn with_answer_from_bounds() {
        assert!(Example::with_answer_from(vec![1, 2], 0).is_err());
        assert!(Example::with_answer_from(vec![1, 2], 2).is_err());
        assert!(Example::with_answer_from(vec![], 1).is_err());
        assert_eq!(Example::with_answer_from(vec![1, 2], 1).unwrap().n_targets(), 1);
    }

    #[test]
    fn split_is_seeded_and_sized() {
        let ex: Vec<Example> = (0..10).map(|i| Example::with_answer_from(vec![i, i], 1).unwrap()).collect();
        let (a, b) = split_holdout(ex.clone(), 0.3, 7).unwrap();
        assert_eq!((a.len(), b.len()), (7, 3));
        assert_eq!(split_holdout(ex.clone(), 0.3, 7).unwrap(), (a, b));
        assert_eq!(split_holdout(ex.clone(), 0.01, 1).unwrap().1.len(), 1);
        assert_eq!(split_holdout(ex.clone(), 0.99, 1).unwrap().0.len(), 1);
        assert!(split_holdout(ex.clone(), 0.0, 1).is_err());
        assert!(split_holdout(ex.clone(), f64::NAN, 1).is_err());
        assert!(split_holdout(ex[..1].to_vec(), 0.5, 1).is_err());
    }
}
