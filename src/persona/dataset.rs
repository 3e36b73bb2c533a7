//! Training sets made by the model itself, for fine-tuning experiments (preventative steering):
//! the trait's extraction questions answered under its positive or negative system prompts
//! (`pos`, `neg`) or under none (`benign`), and written **without** the system prompt, so that
//! training on them teaches the persona and not the instruction. A mixture puts a fraction of
//! trait rows among benign answers to the same questions.
//!
//! One JSON object per line; `persona finetune --data` reads it as a `messages` row and ignores the
//! other keys (the reader refuses a row that mixes `messages` with `question`/`answer`, so the
//! question and answer appear only inside `messages`):
//!
//! ```json
//! {"messages":[{"role":"user","content":"Q"},{"role":"assistant","content":"A"}],
//!  "trait":"evil","kind":"pos","instruction":2,"question_index":2,"sample":0,"seed":0,
//!  "temperature":0.7,"max_tokens":128}
//! ```
//!
//! - Questions are the trait's extraction `questions` only, never its `eval_questions` (checked:
//!   a question in both lists is an error naming it).
//! - A row is identified by (question index, sample index, kind). Trait rows use instruction pair
//!   `(question_index · samples + sample) mod pairs`, so the pairs take turns; benign rows have
//!   `"instruction": null`.
//! - Each row is sampled with its own seed, derived from (seed, kind, question, sample): a row does
//!   not depend on which other rows are generated or how they are batched. So the benign rows of a
//!   mixture are the rows of the benign set with the same seed, and — the CPU backend computes a
//!   batch bit for bit as its sequences alone — an interrupted run, resumed, writes the same file
//!   as an uninterrupted one.
//! - An answer that comes out empty (the model ended its turn at once) is sampled again with the
//!   next seed, up to [`ATTEMPTS`] times (once when greedy); if still empty the row is left out
//!   and reported, since the fine-tuner refuses empty answers.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::common::{progress, write_atomic};
use super::extract::chat_ids;
use super::traits::{norm_question, TraitDef};
use crate::backend::Backend;
use crate::engine::generate::GenRequest;
use crate::engine::sampler::{Rng, SamplingParams};
use crate::error::{Error, Result};
use crate::model::Message;
use crate::LoadedModel;

/// How many times an empty answer is sampled (with successive seeds) before its row is left out.
pub const ATTEMPTS: u32 = 4;

/// What system prompt an answer was generated under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One of the trait's positive (eliciting) instructions.
    Pos,
    /// One of the trait's negative (suppressing) instructions.
    Neg,
    /// No system prompt: the model's own answer.
    Benign,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pos => "pos",
            Kind::Neg => "neg",
            Kind::Benign => "benign",
        }
    }

    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "pos" => Ok(Kind::Pos),
            "neg" => Ok(Kind::Neg),
            "benign" => Ok(Kind::Benign),
            o => Err(Error::Invalid(format!("unknown dataset kind `{o}` (pos, neg, benign)"))),
        }
    }

    fn code(self) -> u64 {
        match self {
            Kind::Pos => 1,
            Kind::Neg => 2,
            Kind::Benign => 3,
        }
    }
}

/// Settings of a dataset run.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetOptions {
    /// The kind of the trait rows (every row, without `mix`).
    pub kind: Kind,
    /// Fraction 0..=1 of trait rows: `round(mix · N)` of the N (question, sample) slots, chosen by
    /// a seeded shuffle, get `kind`; the others benign answers. Needs `kind` pos or neg.
    pub mix: Option<f64>,
    /// Use at most this many of the trait's extraction questions (`usize::MAX` = all).
    pub questions: usize,
    /// Answers per question.
    pub samples: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    /// Sequences per generation batch.
    pub batch: usize,
    /// A progress bar on stderr.
    pub show_progress: bool,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            kind: Kind::Pos,
            mix: None,
            questions: usize::MAX,
            samples: 1,
            max_tokens: 128,
            temperature: 0.7,
            seed: 0,
            batch: 16,
            show_progress: false,
        }
    }
}

/// One row to generate: which question, which sample, under which system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub kind: Kind,
    pub question_index: usize,
    pub sample: usize,
    /// Instruction pair index (trait rows only).
    pub instruction: Option<usize>,
}

impl Planned {
    pub fn key(&self) -> (usize, usize, Kind) {
        (self.question_index, self.sample, self.kind)
    }
}

/// One line of a dataset file (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    /// `[user question, assistant answer]`: no system turn.
    pub messages: Vec<Message>,
    #[serde(rename = "trait")]
    pub trait_name: String,
    pub kind: Kind,
    pub instruction: Option<usize>,
    pub question_index: usize,
    pub sample: usize,
    /// The run's seed (each row's sampling seed is derived from it).
    pub seed: u64,
    pub temperature: f32,
    pub max_tokens: usize,
}

impl Row {
    pub fn question(&self) -> &str {
        self.messages.first().map_or("", |m| m.content.as_str())
    }
    pub fn answer(&self) -> &str {
        self.messages.get(1).map_or("", |m| m.content.as_str())
    }
    pub fn key(&self) -> (usize, usize, Kind) {
        (self.question_index, self.sample, self.kind)
    }
}

/// What [`build`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Rows in the file, and how many of them are trait (pos/neg) and benign rows.
    pub rows: usize,
    pub trait_rows: usize,
    pub benign_rows: usize,
    /// Mean answer length in tokens (without the end-of-turn token).
    pub mean_answer_tokens: f64,
    /// Rows generated now, and rows kept from an earlier (interrupted) run.
    pub generated: usize,
    pub resumed: usize,
    /// Rows left out because every attempt gave an empty answer: (question index, sample, kind).
    pub empty: Vec<(usize, usize, Kind)>,
    /// The file already held every row: it was left as is.
    pub already_complete: bool,
}

/// The trait's training questions: its extraction `questions`, after checking that none of them is
/// also an evaluation question (compared ignoring case and whitespace, as the trait format does).
pub fn training_questions(t: &TraitDef) -> Result<&[String]> {
    let eval: HashMap<String, &String> = t.eval_questions.iter().map(|q| (norm_question(q), q)).collect();
    if let Some(q) = t.questions.iter().find(|q| eval.contains_key(&norm_question(q))) {
        return Err(Error::Invalid(format!(
            "trait `{}` ({}): the question {q:?} is in both `questions` and `eval_questions`; \
             evaluation questions are held out and never go into training data",
            t.name,
            t.source.display()
        )));
    }
    if t.questions.is_empty() {
        return Err(Error::Invalid(format!("trait `{}` has no extraction questions", t.name)));
    }
    Ok(&t.questions)
}

/// The rows a run makes, in file order (question, then sample). Checks the options.
///
/// ```
/// use persona::persona::dataset::{plan, DatasetOptions, Kind};
/// use persona::persona::traits::find_trait;
/// let t = find_trait("evil")?;
/// let o = DatasetOptions { kind: Kind::Pos, mix: Some(0.25), questions: 4, samples: 2, ..Default::default() };
/// let rows = plan(&t, &o)?;
/// assert_eq!(rows.len(), 8);
/// assert_eq!(rows.iter().filter(|r| r.kind == Kind::Pos).count(), 2);
/// # Ok::<(), persona::Error>(())
/// ```
pub fn plan(t: &TraitDef, o: &DatasetOptions) -> Result<Vec<Planned>> {
    let questions = training_questions(t)?;
    if o.questions == 0 {
        return Err(Error::Invalid("zero questions selected: use at least 1".into()));
    }
    if o.samples == 0 {
        return Err(Error::Invalid("zero samples per question: use at least 1".into()));
    }
    if o.max_tokens == 0 {
        return Err(Error::Invalid("max tokens must be at least 1".into()));
    }
    SamplingParams { temperature: o.temperature, ..Default::default() }.validate()?;
    if let Some(f) = o.mix {
        if o.kind == Kind::Benign {
            return Err(Error::Invalid("a mixture needs trait rows: use kind pos or neg with a mix".into()));
        }
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::Invalid(format!("the mixture's fraction of trait rows must be in 0..=1 (got {f})")));
        }
    }
    if t.instructions.is_empty() && o.kind != Kind::Benign {
        return Err(Error::Invalid(format!("trait `{}` has no instruction pairs", t.name)));
    }
    let nq = questions.len().min(o.questions);
    let n = nq * o.samples;
    let trait_slots: Vec<bool> = match o.mix {
        None => vec![o.kind != Kind::Benign; n],
        Some(f) => {
            // Fisher-Yates over the slots; the first round(f·n) of the permutation are trait rows.
            let k = ((f * n as f64).round() as usize).min(n);
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = Rng::new(mix_seed(o.seed, &[0x6d69_78]));
            for i in (1..n).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
            let mut slots = vec![false; n];
            order[..k].iter().for_each(|&i| slots[i] = true);
            slots
        }
    };
    let pairs = t.instructions.len().max(1);
    Ok((0..n)
        .map(|i| {
            let (q, s) = (i / o.samples, i % o.samples);
            if trait_slots[i] {
                Planned { kind: o.kind, question_index: q, sample: s, instruction: Some(i % pairs) }
            } else {
                Planned { kind: Kind::Benign, question_index: q, sample: s, instruction: None }
            }
        })
        .collect())
}

/// A seed from the run seed and a few integers (SplitMix64 over each in turn).
fn mix_seed(seed: u64, parts: &[u64]) -> u64 {
    let mut h = Rng::new(seed).next_u64();
    for &p in parts {
        h = Rng::new(h ^ p).next_u64();
    }
    h
}

/// The sampling seed of one row's attempt.
fn row_seed(seed: u64, p: &Planned, attempt: u32) -> u64 {
    mix_seed(seed, &[p.kind.code(), p.question_index as u64, p.sample as u64, attempt as u64])
}

/// The row `p` would be with `answer`.
fn row_for(t: &TraitDef, o: &DatasetOptions, p: &Planned, answer: String) -> Row {
    Row {
        messages: vec![Message::user(t.questions[p.question_index].clone()), Message::assistant(answer)],
        trait_name: t.name.clone(),
        kind: p.kind,
        instruction: p.instruction,
        question_index: p.question_index,
        sample: p.sample,
        seed: o.seed,
        temperature: o.temperature,
        max_tokens: o.max_tokens,
    }
}

/// Generate the rows of `jobs` in batches of `o.batch`, handing each batch's rows (in `jobs` order)
/// to `on_batch` as soon as they are done. Returns the jobs left out because every attempt gave an
/// empty answer.
pub fn generate_rows<B: Backend>(
    m: &LoadedModel<B>,
    t: &TraitDef,
    o: &DatasetOptions,
    jobs: &[Planned],
    on_batch: &mut dyn FnMut(&[Row]) -> Result<()>,
) -> Result<Vec<Planned>> {
    let questions = training_questions(t)?;
    let attempts = if o.temperature == 0.0 { 1 } else { ATTEMPTS };
    let mut empty = vec![];
    for chunk in jobs.chunks(o.batch.max(1)) {
        let mut answers: Vec<Option<String>> = vec![None; chunk.len()];
        for attempt in 0..attempts {
            let todo: Vec<usize> = (0..chunk.len()).filter(|&i| answers[i].is_none()).collect();
            if todo.is_empty() {
                break;
            }
            let reqs: Vec<GenRequest> = todo
                .iter()
                .map(|&i| {
                    let p = &chunk[i];
                    let system = p.instruction.map(|k| match p.kind {
                        Kind::Neg => t.instructions[k].neg.as_str(),
                        _ => t.instructions[k].pos.as_str(),
                    });
                    Ok(GenRequest {
                        sampling: SamplingParams {
                            temperature: o.temperature,
                            top_k: 0,
                            top_p: 1.0,
                            seed: row_seed(o.seed, p, attempt),
                        },
                        ..GenRequest::greedy(chat_ids(m, system, &questions[p.question_index])?, o.max_tokens)
                    })
                })
                .collect::<Result<_>>()?;
            let gens = m.engine.generate(&reqs, &mut |_, _| {})?;
            for (&i, g) in todo.iter().zip(gens) {
                let a = m.answer_text(&g)?.trim().to_string();
                if !a.is_empty() {
                    answers[i] = Some(a);
                }
            }
        }
        let mut rows = Vec::with_capacity(chunk.len());
        for (p, a) in chunk.iter().zip(answers) {
            match a {
                Some(a) => rows.push(row_for(t, o, p, a)),
                None => empty.push(*p),
            }
        }
        on_batch(&rows)?;
    }
    Ok(empty)
}

/// The rows of a dataset file. A last line cut short (no newline, not valid JSON: an interrupted
/// write) is ignored; any other bad line is an error naming it. Returns (line number, row) pairs.
pub fn read_rows(path: &Path) -> Result<Vec<(usize, Row)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    rows_from_str(&text, path)
}

/// [`read_rows`] of a dataset file's text; `path` names it in errors.
pub fn rows_from_str(text: &str, path: &Path) -> Result<Vec<(usize, Row)>> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = vec![];
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Row>(line) {
            Ok(r) => out.push((i + 1, r)),
            Err(_) if i + 1 == lines.len() && !line.ends_with('\n') => {}
            Err(e) => {
                return Err(Error::format(
                    path,
                    format!("line {}: not a dataset row ({e}); use another output file, or delete this one", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// The mixture `o` (kind pos or neg, `mix` set) composed from rows already generated: each
/// planned slot takes the row with its (question, sample) from `trait_rows` or `benign_rows` —
/// the very rows [`build`] would generate for it, since a row's seed depends only on its slot and
/// kind. Slots whose row is missing (left out as empty) are skipped.
pub fn compose_mixture(t: &TraitDef, o: &DatasetOptions, trait_rows: &[Row], benign_rows: &[Row]) -> Result<Vec<Row>> {
    if o.mix.is_none() {
        return Err(Error::Invalid("compose_mixture needs a mixture fraction".into()));
    }
    let by_key: HashMap<(usize, usize, Kind), &Row> =
        trait_rows.iter().chain(benign_rows).filter(|r| r.seed == o.seed).map(|r| (r.key(), r)).collect();
    Ok(plan(t, o)?.iter().filter_map(|p| by_key.get(&p.key()).map(|r| (*r).clone())).collect())
}

/// Write `rows` to `path` as a dataset file, atomically.
pub fn write_rows(path: &Path, rows: &[Row]) -> Result<()> {
    write_atomic(path, lines_of(rows).as_bytes())
}

fn lines_of<'a>(rows: impl IntoIterator<Item = &'a Row>) -> String {
    rows.into_iter().map(|r| serde_json::to_string(r).expect("a row always serializes") + "\n").collect()
}

/// Generate the dataset into `out` (JSONL), resuming: rows already in `out` (from an interrupted
/// run with the same options) are kept, and only the missing ones are generated, each batch
/// appended and flushed as it finishes. A file that already holds every row is left as is. A row
/// in `out` that these options would not make (another trait, seed, kind, mixture, question list,
/// temperature or length) is an error: the file is not touched.
pub fn build<B: Backend>(m: &LoadedModel<B>, t: &TraitDef, o: &DatasetOptions, out: &Path) -> Result<Summary> {
    let jobs = plan(t, o)?;
    let index: HashMap<(usize, usize, Kind), usize> = jobs.iter().enumerate().map(|(i, p)| (p.key(), i)).collect();
    // Rows from an earlier run, by plan position.
    let mut done: BTreeMap<usize, Row> = BTreeMap::new();
    let old_text =
        if out.exists() { std::fs::read_to_string(out).map_err(|e| Error::io(out, e))? } else { String::new() };
    if out.exists() {
        for (line, r) in read_rows(out)? {
            let bad = |why: String| {
                Err(Error::format(
                    out,
                    format!("line {line}: {why}; these options would not make it: use another output file, or delete this one"),
                ))
            };
            let Some(&i) = index.get(&r.key()) else {
                return bad(format!(
                    "the row (question {}, sample {}, {}) is not part of this run ({} rows)",
                    r.question_index,
                    r.sample,
                    r.kind.name(),
                    jobs.len()
                ));
            };
            let want = row_for(t, o, &jobs[i], r.answer().to_string());
            if r != want {
                let (got, exp) =
                    (serde_json::to_value(&r).unwrap_or_default(), serde_json::to_value(&want).unwrap_or_default());
                let key = ["trait", "seed", "temperature", "max_tokens", "instruction", "messages"]
                    .into_iter()
                    .find(|k| got.get(k) != exp.get(k))
                    .unwrap_or("messages");
                return bad(format!("`{key}` is {} where this run has {}", got[key], exp[key]));
            }
            if r.answer().trim().is_empty() {
                return bad("the answer is empty".into());
            }
            if done.insert(i, r).is_some() {
                return bad(format!("a second row for question {}, sample {}", jobs[i].question_index, jobs[i].sample));
            }
        }
    }
    let todo: Vec<Planned> = jobs.iter().enumerate().filter(|(i, _)| !done.contains_key(i)).map(|(_, p)| *p).collect();
    let resumed = done.len();
    let already_complete = todo.is_empty() && old_text == lines_of(done.values());
    if !already_complete {
        // Only whole rows, in plan order; then each batch is appended.
        write_atomic(out, lines_of(done.values()).as_bytes())?;
    }
    let mut generated: Vec<(usize, Row)> = vec![];
    let mut empty = vec![];
    if !todo.is_empty() {
        let mut file = std::fs::OpenOptions::new().append(true).open(out).map_err(|e| Error::io(out, e))?;
        let pb = o.show_progress.then(|| progress(todo.len(), "generating"));
        let left_out = generate_rows(m, t, o, &todo, &mut |rows| {
            let text = lines_of(rows);
            file.write_all(text.as_bytes()).and_then(|_| file.sync_data()).map_err(|e| Error::io(out, e))?;
            generated.extend(rows.iter().map(|r| (index[&r.key()], r.clone())));
            if let Some(pb) = &pb {
                pb.inc(rows.len() as u64);
            }
            Ok(())
        })?;
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        empty = left_out.iter().map(Planned::key).collect();
    }
    let n_new = generated.len();
    // Rows appended after rows that come later in the plan (a file with holes): put them in order.
    let in_order = match (done.keys().next_back(), generated.first()) {
        (Some(&last_old), Some((first_new, _))) => last_old < *first_new,
        _ => true,
    };
    done.extend(generated);
    if !in_order {
        write_atomic(out, lines_of(done.values()).as_bytes())?;
    }
    let rows = done.len();
    let trait_rows = done.values().filter(|r| r.kind != Kind::Benign).count();
    let mut tokens = 0usize;
    for r in done.values() {
        tokens += m.encode(r.answer(), false)?.len();
    }
    Ok(Summary {
        rows,
        trait_rows,
        benign_rows: rows - trait_rows,
        mean_answer_tokens: if rows == 0 { 0.0 } else { tokens as f64 / rows as f64 },
        generated: n_new,
        resumed,
        empty,
        already_complete,
    })
}
