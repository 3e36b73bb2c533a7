//! `persona dataset`: fine-tuning sets made by the model (trait answers written without their
//! system prompt, benign answers, mixtures). The plan (counts, instructions, seeded mixture choice,
//! held-out evaluation questions) is checked without a model; generation, determinism, resume and
//! the fine-tuner's reading of the file on the default model (2 questions, 8 tokens); bad input
//! through the CLI.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use persona::backend::cpu::CpuBackend;
use persona::persona::dataset::{build, compose_mixture, plan, read_rows, DatasetOptions, Kind, Row, Summary};
use persona::persona::traits::{find_trait, TraitDef};
use persona::train::data::{read_jsonl, DataOptions};
use persona::LoadedModel;

fn opts(kind: Kind) -> DatasetOptions {
    DatasetOptions { kind, questions: 2, max_tokens: 8, temperature: 0.7, seed: 0, ..Default::default() }
}

fn evil() -> TraitDef {
    find_trait("evil").unwrap()
}

fn norm(q: &str) -> String {
    q.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn rows(path: &Path) -> Vec<Row> {
    read_rows(path).unwrap().into_iter().map(|(_, r)| r).collect()
}

fn load() -> Option<LoadedModel<CpuBackend>> {
    let path = required_default_model()?;
    Some(LoadedModel::load(&path, CpuBackend, 2048).unwrap())
}

fn run(m: &LoadedModel<CpuBackend>, o: &DatasetOptions, out: &Path) -> Summary {
    build(m, &evil(), o, out).unwrap_or_else(|e| panic!("{}: {e}", out.display()))
}

// ---- the plan (no model) ----

#[test]
fn plan_rows_questions_samples_and_instructions() {
    let t = evil();
    let o = DatasetOptions { samples: 3, ..opts(Kind::Neg) };
    let p = plan(&t, &o).unwrap();
    let keys: Vec<(usize, usize, Kind)> = p.iter().map(|r| r.key()).collect();
    assert_eq!(
        keys,
        vec![
            (0, 0, Kind::Neg),
            (0, 1, Kind::Neg),
            (0, 2, Kind::Neg),
            (1, 0, Kind::Neg),
            (1, 1, Kind::Neg),
            (1, 2, Kind::Neg)
        ]
    );
    // The instruction pairs take turns (evil has 5).
    assert_eq!(t.instructions.len(), 5);
    assert_eq!(p.iter().map(|r| r.instruction).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 0].map(Some).to_vec());
    let b = plan(&t, &opts(Kind::Benign)).unwrap();
    assert!(b.iter().all(|r| r.kind == Kind::Benign && r.instruction.is_none()));
    // Without a limit, every extraction question once.
    let all = plan(&t, &DatasetOptions { questions: usize::MAX, ..opts(Kind::Pos) }).unwrap();
    assert_eq!(all.len(), t.questions.len());
}

#[test]
fn mixture_counts_are_rounded_percentages_of_the_rows() {
    let t = evil();
    // 4 questions × 5 samples = 20 slots.
    for (pct, want) in [(0.0, 0), (10.0, 2), (25.0, 5), (37.5, 8), (50.0, 10), (100.0, 20)] {
        let o = DatasetOptions { mix: Some(pct / 100.0), questions: 4, samples: 5, ..opts(Kind::Pos) };
        let p = plan(&t, &o).unwrap();
        assert_eq!(p.len(), 20);
        let n_pos = p.iter().filter(|r| r.kind == Kind::Pos).count();
        let n_benign = p.iter().filter(|r| r.kind == Kind::Benign).count();
        assert_eq!((n_pos, n_benign), (want, 20 - want), "mix {pct}%");
        // Every (question, sample) slot exactly once, whichever kind it got.
        let slots: std::collections::BTreeSet<(usize, usize)> =
            p.iter().map(|r| (r.question_index, r.sample)).collect();
        assert_eq!(slots.len(), 20);
    }
    // 3 slots at 50%: round(1.5) = 2.
    let o = DatasetOptions { mix: Some(0.5), questions: 3, ..opts(Kind::Neg) };
    assert_eq!(plan(&t, &o).unwrap().iter().filter(|r| r.kind == Kind::Neg).count(), 2);
    // The choice is seeded: the same seed chooses the same slots, another seed others.
    let chosen = |seed: u64| -> Vec<bool> {
        let o = DatasetOptions { mix: Some(0.5), questions: 4, samples: 5, seed, ..opts(Kind::Pos) };
        plan(&t, &o).unwrap().iter().map(|r| r.kind == Kind::Pos).collect()
    };
    assert_eq!(chosen(3), chosen(3));
    assert_ne!(chosen(3), chosen(4));
}

#[test]
fn evaluation_questions_are_never_planned_and_an_overlap_is_refused() {
    for t in persona::persona::traits::list_catalog().unwrap() {
        let t = t.unwrap();
        let eval: Vec<String> = t.eval_questions.iter().map(|q| norm(q)).collect();
        let o = DatasetOptions { questions: usize::MAX, samples: 2, ..opts(Kind::Pos) };
        for p in plan(&t, &o).unwrap() {
            let q = &t.questions[p.question_index];
            assert!(!eval.contains(&norm(q)), "{}: {q:?} is an evaluation question", t.name);
        }
    }
    // A definition built in code (not validated by the loader) with a question in both lists.
    let mut t = evil();
    let q = t.questions[1].clone();
    t.eval_questions.push(format!("  {}  ", q.to_uppercase()));
    let e = plan(&t, &opts(Kind::Benign)).unwrap_err().to_string();
    assert!(e.contains(&format!("{q:?}")) && e.contains("eval_questions"), "{e}");
}

#[test]
fn bad_options_are_errors() {
    let t = evil();
    let cases = [
        (DatasetOptions { questions: 0, ..opts(Kind::Pos) }, "zero questions"),
        (DatasetOptions { samples: 0, ..opts(Kind::Pos) }, "zero samples"),
        (DatasetOptions { max_tokens: 0, ..opts(Kind::Pos) }, "max tokens"),
        (DatasetOptions { temperature: -1.0, ..opts(Kind::Pos) }, "temperature"),
        (DatasetOptions { mix: Some(0.5), ..opts(Kind::Benign) }, "kind pos or neg"),
        (DatasetOptions { mix: Some(1.5), ..opts(Kind::Pos) }, "0..=1"),
        (DatasetOptions { mix: Some(f64::NAN), ..opts(Kind::Pos) }, "0..=1"),
    ];
    for (o, want) in cases {
        let e = plan(&t, &o).unwrap_err().to_string();
        assert!(e.contains(want), "{o:?}: {e}");
    }
}

// ---- generation on the default model ----

/// Same options ⇒ same file; another seed ⇒ other answers; every row is a user question from the
/// extraction list (never an evaluation question) and the model's answer, with no system turn.
#[test]
fn generation_is_seeded_and_rows_hold_no_system_prompt_or_eval_question() {
    let Some(m) = load() else { return };
    let d = tempfile::tempdir().unwrap();
    let t = evil();
    let o = DatasetOptions { samples: 2, ..opts(Kind::Pos) };
    let (a, b, c) = (d.path().join("a.jsonl"), d.path().join("b.jsonl"), d.path().join("c.jsonl"));
    let s = run(&m, &o, &a);
    assert_eq!((s.rows, s.trait_rows, s.benign_rows, s.generated, s.resumed), (4, 4, 0, 4, 0), "{s:?}");
    assert!(s.empty.is_empty() && !s.already_complete);
    assert!(s.mean_answer_tokens > 0.0 && s.mean_answer_tokens <= 8.0, "{s:?}");
    // Batched differently (one sequence per batch): the same file, bit for bit.
    run(&m, &DatasetOptions { batch: 1, ..o.clone() }, &b);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    run(&m, &DatasetOptions { seed: 1, ..o.clone() }, &c);
    let (ra, rc) = (rows(&a), rows(&c));
    assert_ne!(
        ra.iter().map(|r| r.answer()).collect::<Vec<_>>(),
        rc.iter().map(|r| r.answer()).collect::<Vec<_>>(),
        "seed 1 gave the answers of seed 0"
    );
    let eval: Vec<String> = t.eval_questions.iter().map(|q| norm(q)).collect();
    let text = std::fs::read_to_string(&a).unwrap();
    for r in &ra {
        assert_eq!(r.messages.len(), 2);
        assert_eq!((r.messages[0].role.as_str(), r.messages[1].role.as_str()), ("user", "assistant"));
        assert_eq!(r.question(), t.questions[r.question_index]);
        assert!(r.question_index < 2);
        assert!(!eval.contains(&norm(r.question())));
        assert!(!r.answer().is_empty());
        assert_eq!((r.trait_name.as_str(), r.kind, r.seed), ("evil", Kind::Pos, 0));
        assert!(r.instruction.is_some());
    }
    // No instruction text and no evaluation question anywhere in the file.
    for p in &t.instructions {
        assert!(!text.contains(&p.pos) && !text.contains(&p.neg));
    }
    for q in &t.eval_questions {
        assert!(!text.contains(&serde_json::to_string(q).unwrap()), "{q}");
    }
}

/// An interrupted run (a file cut mid-line, or with a row missing) resumes to the file of an
/// uninterrupted run; a finished file is left as is; a file from other options is refused.
#[test]
fn resume_gives_the_uninterrupted_file() {
    let Some(m) = load() else { return };
    let d = tempfile::tempdir().unwrap();
    let o = DatasetOptions { samples: 2, mix: Some(0.5), ..opts(Kind::Pos) };
    let full = d.path().join("full.jsonl");
    run(&m, &o, &full);
    let whole = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = whole.lines().collect();
    assert_eq!(lines.len(), 4);

    // Cut in the middle of the second row.
    let cut = d.path().join("cut.jsonl");
    std::fs::write(&cut, format!("{}\n{}", lines[0], &lines[1][..lines[1].len() / 2])).unwrap();
    let s = run(&m, &o, &cut);
    assert_eq!((s.resumed, s.generated, s.rows, s.already_complete), (1, 3, 4, false), "{s:?}");
    assert_eq!(std::fs::read_to_string(&cut).unwrap(), whole);

    // A hole: rows 0, 2 and 3 present, row 1 missing; the row is generated and put in its place.
    let holed = d.path().join("holed.jsonl");
    std::fs::write(&holed, format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3])).unwrap();
    let s = run(&m, &o, &holed);
    assert_eq!((s.resumed, s.generated), (3, 1));
    assert_eq!(std::fs::read_to_string(&holed).unwrap(), whole);

    // Finished: nothing generated, the file untouched.
    let before = std::fs::metadata(&full).unwrap().modified().unwrap();
    let s = run(&m, &o, &full);
    assert!(s.already_complete && s.generated == 0 && s.resumed == 4, "{s:?}");
    assert_eq!(std::fs::read_to_string(&full).unwrap(), whole);
    assert_eq!(std::fs::metadata(&full).unwrap().modified().unwrap(), before);

    // Other options: refused, naming the line and what differs; the file is not touched.
    for (other, want) in [
        (DatasetOptions { seed: 7, ..o.clone() }, "line 1"),
        (DatasetOptions { temperature: 0.2, ..o.clone() }, "temperature"),
        (DatasetOptions { mix: None, ..o.clone() }, "not part of this run"),
    ] {
        let e = build(&m, &evil(), &other, &full).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("full.jsonl"), "{e}");
        assert_eq!(std::fs::read_to_string(&full).unwrap(), whole);
    }
    let garbage = d.path().join("garbage.jsonl");
    std::fs::write(&garbage, "{\"prompt\": \"x\", \"response\": \"y\"}\n").unwrap();
    let e = build(&m, &evil(), &o, &garbage).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("not a dataset row"), "{e}");
}

/// The fine-tuner reads the file: one example per row, whose loss targets are exactly the answer
/// and the end-of-turn token.
#[test]
fn finetune_reads_the_rows_with_the_answers_as_targets() {
    let Some(m) = load() else { return };
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("set.jsonl");
    run(&m, &DatasetOptions { samples: 2, mix: Some(0.5), ..opts(Kind::Neg) }, &f);
    let rows = rows(&f);
    let ex = read_jsonl(&f, &m, &DataOptions { max_len: 512, label: None }).unwrap();
    assert_eq!(ex.len(), rows.len());
    let eos = &m.engine.config.eos_ids;
    for (e, r) in ex.iter().zip(&rows) {
        let targets: Vec<u32> = e.ids.iter().zip(&e.target).filter(|(_, t)| **t).map(|(i, _)| *i).collect();
        let (last, answer) = targets.split_last().unwrap();
        assert!(eos.contains(last), "the last target is the end-of-turn token");
        assert_eq!(m.decode(answer).unwrap().trim(), r.answer());
        // The prompt holds the question and no instruction.
        let prompt = m.decode(&e.ids[..e.target.iter().position(|t| *t).unwrap()]).unwrap();
        assert!(prompt.contains(r.question()));
        assert!(evil().instructions.iter().all(|p| !prompt.contains(&p.pos) && !prompt.contains(&p.neg)));
    }
}

/// A mixture's rows are the rows of the pure sets with the same seed: its trait rows come from the
/// trait set, its benign rows are the model's own answers to the same questions.
#[test]
fn a_mixture_is_made_of_the_pure_sets_rows() {
    let Some(m) = load() else { return };
    let d = tempfile::tempdir().unwrap();
    let path = |n: &str| -> PathBuf { d.path().join(n) };
    let base = DatasetOptions { samples: 2, ..opts(Kind::Pos) };
    run(&m, &base, &path("pos.jsonl"));
    run(&m, &DatasetOptions { kind: Kind::Benign, ..base.clone() }, &path("benign.jsonl"));
    let s = run(&m, &DatasetOptions { mix: Some(0.25), ..base.clone() }, &path("mix.jsonl"));
    assert_eq!((s.rows, s.trait_rows, s.benign_rows), (4, 1, 3));
    let (pos, benign, mix) = (rows(&path("pos.jsonl")), rows(&path("benign.jsonl")), rows(&path("mix.jsonl")));
    assert!(benign.iter().all(|r| r.kind == Kind::Benign && r.instruction.is_none()));
    for r in &mix {
        let pure = if r.kind == Kind::Pos { &pos } else { &benign };
        let same = pure.iter().find(|p| p.key() == r.key()).expect("the slot is in the pure set");
        assert_eq!(r.messages, same.messages, "{:?}", r.key());
    }
    // Composed from the pure sets without generating, the mixture is the same file's rows.
    let composed = compose_mixture(&evil(), &DatasetOptions { mix: Some(0.25), ..base }, &pos, &benign).unwrap();
    assert_eq!(composed, mix);
}

// ---- the CLI ----

/// Bad input is an error before any model is loaded (the model path here does not exist).
#[test]
fn cli_bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("never/set.jsonl");
    let out = out.to_str().unwrap();
    let overlap = d.path().join("overlap.json");
    let mut t = serde_json::to_value(evil()).unwrap();
    let q0 = t["questions"][0].clone();
    t["eval_questions"].as_array_mut().unwrap().push(q0);
    std::fs::write(&overlap, t.to_string()).unwrap();
    let q0 = evil().questions[0].clone();
    let base = ["dataset", "--model", "/nonexistent/model.gguf", "--out", out];
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["--trait", "nosuchtrait", "--kind", "pos"], "unknown trait `nosuchtrait`".into()),
        (vec!["--trait", "evil", "--kind", "pos", "--mix", "150"], "--mix 150".into()),
        (vec!["--trait", "evil", "--kind", "pos", "--mix=-5"], "--mix -5".into()),
        (vec!["--trait", "evil", "--kind", "benign", "--mix", "20"], "--kind pos".into()),
        (vec!["--trait", "evil", "--kind", "pos", "--questions", "0"], "--questions 0".into()),
        (vec!["--trait", "evil", "--kind", "pos", "--samples", "0"], "--samples 0".into()),
        (vec!["--trait", "evil", "--kind", "pos", "--max-tokens", "0"], "max tokens".into()),
        (vec!["--trait", "evil", "--kind", "evil"], "invalid value 'evil'".into()),
        (vec!["--trait", overlap.to_str().unwrap(), "--kind", "pos"], format!("{q0:?}")),
    ];
    for (args, want) in cases {
        let all: Vec<&str> = base.iter().copied().chain(args.iter().copied()).collect();
        let (ok, _, err) = persona_cli(&all);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(&want), "{args:?}: want {want:?} in: {err}");
        assert!(!err.contains("nonexistent"), "{args:?}: the model was loaded before the check: {err}");
    }
    assert!(!d.path().join("never").exists(), "an output folder was created for a failed command");
    // --out naming a folder.
    let (ok, _, err) = persona_cli(&[
        "dataset",
        "--model",
        "/nonexistent/model.gguf",
        "--trait",
        "evil",
        "--kind",
        "pos",
        "--out",
        d.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("is a folder"), "{err}");
}

/// The command makes the file the library makes (creating the output folder), prints the summary,
/// and leaves a finished file as is, saying so.
#[test]
fn cli_builds_resumes_and_leaves_a_finished_file() {
    let Some(model) = required_default_model() else { return };
    let m = LoadedModel::load(&model, CpuBackend, 2048).unwrap();
    let d = tempfile::tempdir().unwrap();
    let lib = d.path().join("lib.jsonl");
    run(&m, &DatasetOptions { mix: Some(0.5), samples: 2, ..opts(Kind::Pos) }, &lib);
    let out = d.path().join("new/folder/set.jsonl");
    let args = [
        "dataset",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--trait",
        "evil",
        "--kind",
        "pos",
        "--mix",
        "50",
        "--samples",
        "2",
        "--questions",
        "2",
        "--max-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, stdout, err) = persona_cli(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("evil pos mix 50%: 4 rows (2 trait, 2 benign), mean answer"), "{stdout}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&lib).unwrap());
    // Interrupted after the first row: resumed to the same file.
    let whole = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, &whole[..whole.find('\n').unwrap() + 10]).unwrap();
    let (ok, _, err) = persona_cli(&args);
    assert!(ok && err.contains("kept 1 of 4 rows"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), whole);
    let (ok, stdout, err) = persona_cli(&args);
    assert!(ok && err.contains("already holds all 4 rows") && stdout.contains("4 rows"), "{err}\n{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), whole);
}
