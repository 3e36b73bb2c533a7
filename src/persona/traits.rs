//! Trait definitions: what a character trait is, in words, and the prompts that elicit, suppress
//! and score it.
//!
//! # File format
//!
//! One JSON object per trait, usually `traits/<name>.json`. The keys `instruction`, `questions`
//! and `eval_prompt` mean what they mean in the paper's repository (safety-research/persona_vectors,
//! `data_generation/trait_data_extract/*.json`); the others are ours. Every key is required and no
//! other key is allowed (a misspelt key is an error, not silently ignored).
//!
//! ```json
//! {
//!   "name": "evil",
//!   "description": "One paragraph: what the trait is and how it shows in an answer.",
//!   "instruction": [
//!     {"pos": "system prompt that elicits the trait", "neg": "system prompt that suppresses it"},
//!     ... at least 5 pairs ...
//!   ],
//!   "questions": ["extraction question", ...],
//!   "eval_questions": ["evaluation question, none of them also in `questions`", ...],
//!   "eval_prompt": "judge prompt with {question} and {answer}; asks for a number 0-100 only",
//!   "coherence_prompt": "judge prompt with {question} and {answer}; scores coherence 0-100 only"
//! }
//! ```
//!
//! - `name`: lower-case letters, digits, `_` and `-`; the catalog looks traits up by it.
//! - `instruction` (alias `instructions`): at least [`MIN_PAIRS`] pairs. Each `pos` / `neg` is used
//!   verbatim as the system prompt (the paper's code prefixes "You are a(n) {assistant_name}
//!   assistant."; ours state the role in the text itself). `pos` and `neg` must differ.
//! - `questions`: user messages answered under every pair to extract the vector.
//! - `eval_questions`: held-out user messages for steering sweeps and monitoring; disjoint from
//!   `questions` (compared ignoring case and surrounding/repeated whitespace).
//! - `eval_prompt`, `coherence_prompt`: judge prompts. `{question}` and `{answer}` are replaced by
//!   [`TraitDef::render_judge`] / [`TraitDef::render_coherence`] in one pass (text inside the
//!   substituted question or answer is never substituted again); no other braces are special.
//!   The judge answers with an integer 0..100 (or `REFUSAL`, which scores nothing).
//!
//! No string may be empty or blank, and no list may hold the same question twice.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Fewest positive/negative instruction pairs a trait may have.
pub const MIN_PAIRS: usize = 5;

/// Environment variable naming the trait catalog directory.
pub const TRAITS_ENV: &str = "PERSONA_TRAITS";

/// One contrastive pair of system prompts: `pos` elicits the trait, `neg` suppresses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructionPair {
    pub pos: String,
    pub neg: String,
}

/// A validated trait definition (see the module docs for the file format).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraitDef {
    pub name: String,
    pub description: String,
    #[serde(rename = "instruction")]
    pub instructions: Vec<InstructionPair>,
    pub questions: Vec<String>,
    pub eval_questions: Vec<String>,
    pub eval_prompt: String,
    pub coherence_prompt: String,
    /// The file it was read from (not part of the JSON).
    #[serde(skip)]
    pub source: PathBuf,
}

/// The file as written: every key optional so that a missing one is reported by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrait {
    name: Option<String>,
    description: Option<String>,
    #[serde(alias = "instructions")]
    instruction: Option<Vec<InstructionPair>>,
    questions: Option<Vec<String>>,
    eval_questions: Option<Vec<String>>,
    eval_prompt: Option<String>,
    coherence_prompt: Option<String>,
}

/// Questions are compared ignoring case and whitespace differences.
pub fn norm_question(q: &str) -> String {
    q.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

impl TraitDef {
    /// Read and validate a trait file. Errors name the file and the offending key.
    pub fn load(path: impl AsRef<Path>) -> Result<TraitDef> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parse and validate trait JSON; `source` is used in error messages and kept in the result.
    pub fn from_json(text: &str, source: impl Into<PathBuf>) -> Result<TraitDef> {
        let source = source.into();
        let err = |msg: String| Error::format(&source, msg);
        let raw: RawTrait = serde_json::from_str(text).map_err(|e| err(format!("invalid trait JSON: {e}")))?;
        fn need<T>(v: Option<T>, key: &str, source: &Path) -> Result<T> {
            v.ok_or_else(|| Error::format(source, format!("missing key `{key}`")))
        }
        let t = TraitDef {
            name: need(raw.name, "name", &source)?,
            description: need(raw.description, "description", &source)?,
            instructions: need(raw.instruction, "instruction", &source)?,
            questions: need(raw.questions, "questions", &source)?,
            eval_questions: need(raw.eval_questions, "eval_questions", &source)?,
            eval_prompt: need(raw.eval_prompt, "eval_prompt", &source)?,
            coherence_prompt: need(raw.coherence_prompt, "coherence_prompt", &source)?,
            source,
        };
        t.validate()?;
        Ok(t)
    }

    /// Check every rule of the format; the error names the file and the key.
    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::format(&self.source, msg));
        let blank = |s: &str| s.trim().is_empty();
        if blank(&self.name) {
            return err("`name` is empty".into());
        }
        if let Some(c) = self.name.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
            return err(format!(
                "`name` \"{}\" has the character {c:?}; use lower-case letters, digits, `_` and `-`",
                self.name
            ));
        }
        if blank(&self.description) {
            return err("`description` is empty".into());
        }
        if self.instructions.len() < MIN_PAIRS {
            return err(format!(
                "`instruction` has {} pos/neg pair{}; at least {MIN_PAIRS} are needed",
                self.instructions.len(),
                if self.instructions.len() == 1 { "" } else { "s" }
            ));
        }
        for (i, p) in self.instructions.iter().enumerate() {
            if blank(&p.pos) {
                return err(format!("`instruction[{i}].pos` is empty"));
            }
            if blank(&p.neg) {
                return err(format!("`instruction[{i}].neg` is empty"));
            }
            if p.pos.trim() == p.neg.trim() {
                return err(format!("`instruction[{i}]` has the same text for pos and neg"));
            }
        }
        for (key, list) in [("questions", &self.questions), ("eval_questions", &self.eval_questions)] {
            if list.is_empty() {
                return err(format!("`{key}` is empty; at least 1 question is needed"));
            }
            let mut seen: HashMap<String, usize> = HashMap::new();
            for (i, q) in list.iter().enumerate() {
                if blank(q) {
                    return err(format!("`{key}[{i}]` is empty"));
                }
                if let Some(j) = seen.insert(norm_question(q), i) {
                    return err(format!("`{key}` has the question {q:?} twice (items {j} and {i})"));
                }
            }
        }
        let extract: BTreeSet<String> = self.questions.iter().map(|q| norm_question(q)).collect();
        if let Some(q) = self.eval_questions.iter().find(|q| extract.contains(&norm_question(q))) {
            return err(format!(
                "the question {q:?} is in both `questions` and `eval_questions`; evaluation questions must be held out"
            ));
        }
        for (key, p) in [("eval_prompt", &self.eval_prompt), ("coherence_prompt", &self.coherence_prompt)] {
            if blank(p) {
                return err(format!("`{key}` is empty"));
            }
            for ph in ["{question}", "{answer}"] {
                if !p.contains(ph) {
                    return err(format!("`{key}` has no `{ph}` placeholder"));
                }
            }
        }
        Ok(())
    }

    /// The trait judge prompt for one answer.
    pub fn render_judge(&self, question: &str, answer: &str) -> String {
        render(&self.eval_prompt, question, answer)
    }

    /// The coherence judge prompt for one answer.
    pub fn render_coherence(&self, question: &str, answer: &str) -> String {
        render(&self.coherence_prompt, question, answer)
    }

    /// The positive (trait-eliciting) system prompts, in file order.
    pub fn pos_instructions(&self) -> impl Iterator<Item = &str> {
        self.instructions.iter().map(|p| p.pos.as_str())
    }

    /// The negative (trait-suppressing) system prompts, in file order.
    pub fn neg_instructions(&self) -> impl Iterator<Item = &str> {
        self.instructions.iter().map(|p| p.neg.as_str())
    }

    /// The first line of the description (for listings).
    pub fn summary(&self) -> &str {
        self.description.lines().next().unwrap_or("").trim()
    }

    /// The definition as trait-file JSON (pretty-printed).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a trait definition always serializes")
    }
}

/// Substitute `{question}` and `{answer}` in one left-to-right pass.
pub fn render(template: &str, question: &str, answer: &str) -> String {
    let mut out = String::with_capacity(template.len() + question.len() + answer.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{question}") {
            out.push_str(question);
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{answer}") {
            out.push_str(answer);
            rest = t;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The shipped trait catalog directory: `$PERSONA_TRAITS` when set; else the first existing of
/// `<executable dir>/../../traits` (cargo's `target/<profile>/` layout), the source checkout's
/// `traits/` (compile-time path), and `./traits`; `./traits` when none exists.
pub fn catalog_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(TRAITS_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        candidates.push(dir.join("../../traits"));
        // Test and example binaries live one level deeper (target/<profile>/deps/).
        candidates.push(dir.join("../../../traits"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("traits"));
    candidates.push(PathBuf::from("traits"));
    match candidates.into_iter().find(|d| is_catalog(d)) {
        Some(d) => std::fs::canonicalize(&d).unwrap_or(d),
        None => PathBuf::from("traits"),
    }
}

/// A directory holding at least one `.json` file.
fn is_catalog(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|rd| rd.flatten().any(|e| is_json(&e.path()))).unwrap_or(false)
}

fn is_json(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) && p.is_file()
}

/// The `.json` files of a directory, sorted by name.
pub fn catalog_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| is_json(p)).collect();
    files.sort();
    Ok(files)
}

/// Load every trait file in `dir` (sorted by file name); each entry is the trait or why its file
/// is invalid. A name used by two files is an error on the later one.
pub fn list_dir(dir: &Path) -> Result<Vec<Result<TraitDef>>> {
    let mut out: Vec<Result<TraitDef>> = catalog_files(dir)?.iter().map(TraitDef::load).collect();
    let mut names: HashMap<String, PathBuf> = HashMap::new();
    for r in out.iter_mut() {
        let dup = match r {
            Ok(t) => names.insert(t.name.clone(), t.source.clone()).map(|first| (t.clone(), first)),
            Err(_) => None,
        };
        if let Some((t, first)) = dup {
            names.insert(t.name.clone(), first.clone());
            *r =
                Err(Error::format(&t.source, format!("`name` \"{}\" is also the name of {}", t.name, first.display())));
        }
    }
    Ok(out)
}

/// Load the shipped catalog ([`catalog_dir`]).
pub fn list_catalog() -> Result<Vec<Result<TraitDef>>> {
    list_dir(&catalog_dir())
}

/// Whether an argument names a file rather than a catalog trait.
pub fn looks_like_path(s: &str) -> bool {
    s.ends_with(".json") || s.contains('/') || s.contains(std::path::MAIN_SEPARATOR)
}

/// A trait by catalog name (e.g. `evil`) or by path to a `.json` file. An unknown name is an
/// error listing the catalog's names.
pub fn find_trait(name_or_path: &str) -> Result<TraitDef> {
    find_trait_in(name_or_path, &catalog_dir())
}

/// [`find_trait`] with an explicit catalog directory.
pub fn find_trait_in(name_or_path: &str, dir: &Path) -> Result<TraitDef> {
    let p = Path::new(name_or_path);
    if looks_like_path(name_or_path) || (p.is_file() && !dir.join(format!("{name_or_path}.json")).is_file()) {
        return TraitDef::load(p);
    }
    let direct = dir.join(format!("{name_or_path}.json"));
    if direct.is_file() {
        return TraitDef::load(direct);
    }
    // A file whose `name` differs from its file name.
    let files = catalog_files(dir).unwrap_or_default();
    let mut names = Vec::new();
    for f in &files {
        if let Ok(t) = TraitDef::load(f) {
            if t.name == name_or_path {
                return Ok(t);
            }
            names.push(t.name);
        } else if let Some(stem) = f.file_stem() {
            names.push(format!("{} (invalid)", stem.to_string_lossy()));
        }
    }
    names.sort();
    Err(Error::Invalid(if names.is_empty() {
        format!(
            "unknown trait `{name_or_path}`: the catalog {} has no trait files (set {TRAITS_ENV} or give a path to a .json file)",
            dir.display()
        )
    } else {
        format!(
            "unknown trait `{name_or_path}`; available in {}: {} (or give a path to a .json file)",
            dir.display(),
            names.join(", ")
        )
    }))
}

/// Metadata key holding the trait definition a vector was extracted with (compact trait JSON).
pub const TRAIT_DEF_KEY: &str = "persona.trait_def";
/// Metadata key holding the sha256 of [`TRAIT_DEF_KEY`]'s text.
pub const TRAIT_SHA_KEY: &str = "persona.trait_sha256";
/// Metadata key holding the path the trait definition was read from (informative only).
pub const TRAIT_PATH_KEY: &str = "persona.trait_path";

impl TraitDef {
    /// The definition as one line of trait-file JSON (what [`record_trait`] stores).
    pub fn to_compact_json(&self) -> String {
        serde_json::to_string(self).expect("a trait definition always serializes")
    }
}

/// Store `t` in the vector's metadata: its definition, the definition's sha256 and the file it
/// came from, so that eval, monitor and demo can use a custom trait without the catalog.
pub fn record_trait(v: &mut crate::steer::vector::PersonaVector, t: &TraitDef) {
    let json = t.to_compact_json();
    v.metadata.insert(TRAIT_SHA_KEY.into(), crate::steer::vector::sha256_hex(json.as_bytes()));
    v.metadata.insert(TRAIT_DEF_KEY.into(), json);
    v.metadata.insert("persona.trait".into(), t.name.clone());
    v.metadata.insert(TRAIT_PATH_KEY.into(), t.source.display().to_string());
}

/// The trait definition stored in a vector by [`record_trait`], if any. A definition that does
/// not match its recorded sha256 (edited by hand) or is not a valid trait is an error.
pub fn recorded_trait(v: &crate::steer::vector::PersonaVector) -> Result<Option<TraitDef>> {
    let Some(json) = v.metadata.get(TRAIT_DEF_KEY) else { return Ok(None) };
    let origin = format!("{} ({TRAIT_DEF_KEY})", v.origin().display());
    let sha = crate::steer::vector::sha256_hex(json.as_bytes());
    match v.metadata.get(TRAIT_SHA_KEY) {
        Some(s) if *s == sha => {}
        Some(s) => {
            return Err(Error::format(
                v.origin(),
                format!("`{TRAIT_DEF_KEY}` does not match `{TRAIT_SHA_KEY}` ({s}; the text hashes to {sha}): the stored trait definition was changed"),
            ))
        }
        None => return Err(Error::format(v.origin(), format!("`{TRAIT_DEF_KEY}` is there but `{TRAIT_SHA_KEY}` is not"))),
    }
    TraitDef::from_json(json, origin).map(Some)
}

/// The trait to evaluate, monitor or demo a vector with:
/// - `arg` a path to a trait file: that file (the way to override a stored definition);
/// - `arg` a name: the definition stored in the vector when it has that name (the trait as it was
///   extracted), else the catalog's;
/// - no `arg`: the definition stored in the vector, else the catalog trait it names (`persona.trait`).
///
/// A stored definition that fails its sha256 check is an error without `arg`; with one, a warning
/// (on stderr) and the argument's trait.
pub fn trait_for_vector(arg: Option<&str>, v: &crate::steer::vector::PersonaVector) -> Result<TraitDef> {
    if let Some(a) = arg.filter(|a| looks_like_path(a)) {
        return TraitDef::load(a);
    }
    let stored = match (recorded_trait(v), arg) {
        (Ok(t), _) => t,
        (Err(e), Some(_)) => {
            eprintln!("warning: ignoring the vector's stored trait definition: {e}");
            None
        }
        (Err(e), None) => return Err(e),
    };
    match (arg, stored) {
        (Some(name), Some(t)) if t.name == name => Ok(t),
        (Some(name), _) => find_trait(name),
        (None, Some(t)) => Ok(t),
        (None, None) => {
            let name = v.metadata.get("persona.trait").ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: the vector records no trait (persona.trait): pass --trait NAME or --trait PATH.json",
                    v.origin().display()
                ))
            })?;
            find_trait(name).map_err(|e| {
                Error::Invalid(format!(
                    "{}: the vector's trait `{name}` has no stored definition ({TRAIT_DEF_KEY}; vectors extracted \
                     before it was recorded) and the catalog cannot supply it: {e}. Pass --trait PATH.json",
                    v.origin().display()
                ))
            })
        }
    }
}
