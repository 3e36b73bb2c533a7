//! `persona traits`: list and validate trait definitions.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use persona::persona::traits::{self, TraitDef};

#[derive(Args)]
pub struct TraitsArgs {
    /// Trait names in the catalog or paths to trait .json files (default: the whole catalog).
    pub traits: Vec<String>,
    /// Catalog directory (default: $PERSONA_TRAITS, else the shipped traits/).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print JSON: summaries for the catalog, full definitions for named traits.
    #[arg(long)]
    pub json: bool,
}

/// One checked file: where it is and what came of loading it.
struct Entry {
    what: String,
    result: persona::Result<TraitDef>,
}

pub fn run(a: TraitsArgs) -> Result<()> {
    let dir = a.dir.clone().unwrap_or_else(traits::catalog_dir);
    let listing = a.traits.is_empty();
    let entries: Vec<Entry> = if listing {
        if !dir.is_dir() {
            bail!("trait catalog directory {} not found (set {} or pass --dir)", dir.display(), traits::TRAITS_ENV);
        }
        let files = traits::catalog_files(&dir)?;
        if files.is_empty() {
            bail!("no trait files (*.json) in {} (set {} or pass --dir)", dir.display(), traits::TRAITS_ENV);
        }
        let results = traits::list_dir(&dir)?;
        files.iter().zip(results).map(|(f, result)| Entry { what: f.display().to_string(), result }).collect()
    } else {
        a.traits.iter().map(|t| Entry { what: t.clone(), result: traits::find_trait_in(t, &dir) }).collect()
    };
    let bad = entries.iter().filter(|e| e.result.is_err()).count();

    if a.json {
        let items: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| match &e.result {
                Ok(t) if listing => serde_json::json!({
                    "file": t.source, "valid": true, "name": t.name, "pairs": t.instructions.len(),
                    "questions": t.questions.len(), "eval_questions": t.eval_questions.len(),
                    "description": t.description,
                }),
                Ok(t) => {
                    let mut v = serde_json::to_value(t).expect("trait serializes");
                    v["file"] = serde_json::json!(t.source);
                    v["valid"] = serde_json::json!(true);
                    v
                }
                Err(err) => serde_json::json!({ "file": e.what, "valid": false, "error": err.to_string() }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else if listing {
        println!("trait catalog: {}", dir.display());
        println!("{:<16} {:>5} {:>9} {:>6}  description", "name", "pairs", "questions", "eval");
        for e in &entries {
            match &e.result {
                Ok(t) => println!(
                    "{:<16} {:>5} {:>9} {:>6}  {}",
                    t.name,
                    t.instructions.len(),
                    t.questions.len(),
                    t.eval_questions.len(),
                    clip(t.summary(), 70)
                ),
                Err(err) => println!("INVALID          {err}"),
            }
        }
    } else {
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                println!();
            }
            match &e.result {
                Ok(t) => show(t),
                // The error names the file or the unknown name.
                Err(err) => println!("INVALID {err}"),
            }
        }
    }
    if bad > 0 {
        let first = entries.iter().find_map(|e| e.result.as_ref().err()).expect("bad > 0");
        bail!("{bad} of {} trait definition{} invalid; first: {first}", entries.len(), plural(entries.len()));
    }
    if !a.json {
        eprintln!("{} trait definition{} valid", entries.len(), plural(entries.len()));
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n - 3).collect::<String>())
    }
}

/// A readable view of one trait.
fn show(t: &TraitDef) {
    println!("{} ({})", t.name, t.source.display());
    println!("  {}", t.description);
    println!("  {} instruction pairs:", t.instructions.len());
    for (i, p) in t.instructions.iter().enumerate() {
        println!("    [{i}] + {}", p.pos);
        println!("        - {}", p.neg);
    }
    println!("  {} extraction questions, e.g. {:?}", t.questions.len(), t.questions[0]);
    println!("  {} evaluation questions, e.g. {:?}", t.eval_questions.len(), t.eval_questions[0]);
    println!("  judge prompt: {} chars; coherence prompt: {} chars", t.eval_prompt.len(), t.coherence_prompt.len());
}
