//! The trait catalog: every shipped definition validates; malformed files are errors that name the
//! file and the problem; `persona traits` lists the catalog and fails on a bad file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use persona::persona::traits::{self, TraitDef};
use serde_json::{json, Value};

const SHIPPED: [&str; 7] = ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"];

fn shipped_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("traits")
}

fn evil_json() -> Value {
    let text = std::fs::read_to_string(shipped_dir().join("evil.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn norm(q: &str) -> String {
    q.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

#[test]
fn every_shipped_trait_validates() {
    let all = traits::list_dir(&shipped_dir()).unwrap();
    let mut names = BTreeSet::new();
    for r in all {
        let t = r.unwrap_or_else(|e| panic!("shipped trait invalid: {e}"));
        assert!(t.instructions.len() >= 5, "{}: {} pairs", t.name, t.instructions.len());
        assert_eq!(t.questions.len(), 20, "{}: extraction questions", t.name);
        assert_eq!(t.eval_questions.len(), 20, "{}: evaluation questions", t.name);
        let a: BTreeSet<String> = t.questions.iter().map(|q| norm(q)).collect();
        let b: BTreeSet<String> = t.eval_questions.iter().map(|q| norm(q)).collect();
        assert_eq!(a.len(), 20, "{}: duplicate extraction questions", t.name);
        assert_eq!(b.len(), 20, "{}: duplicate evaluation questions", t.name);
        assert!(a.is_disjoint(&b), "{}: overlapping question sets", t.name);
        for p in [&t.eval_prompt, &t.coherence_prompt] {
            assert!(p.contains("{question}") && p.contains("{answer}"), "{}", t.name);
            assert!(p.contains("between 0 and 100") && p.contains("just the number"), "{}", t.name);
        }
        assert!(t.eval_prompt.contains("REFUSAL") && t.eval_prompt.contains(&format!("**{}**", t.name)), "{}", t.name);
        assert!(!t.description.contains('\n'), "{}: description is one paragraph", t.name);
        assert_eq!(t.source.file_stem().unwrap(), t.name.as_str(), "file name matches the trait name");
        // Short, imperative system prompts: the default model is tiny.
        for p in &t.instructions {
            assert!(p.pos.len() <= 160 && p.neg.len() <= 160, "{}: long instruction {:?}", t.name, p);
        }
        names.insert(t.name.clone());
    }
    assert_eq!(names, SHIPPED.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
}

#[test]
fn find_by_name_and_path() {
    let dir = shipped_dir();
    for name in SHIPPED {
        let t = traits::find_trait_in(name, &dir).unwrap();
        assert_eq!(t.name, name);
        let by_path = traits::find_trait_in(dir.join(format!("{name}.json")).to_str().unwrap(), &dir).unwrap();
        assert_eq!(by_path, t);
    }
    // The default catalog (found from the test executable or the source tree) holds them too,
    // unless the person running the tests points PERSONA_TRAITS elsewhere.
    if std::env::var_os(traits::TRAITS_ENV).is_none() {
        assert_eq!(traits::catalog_dir(), std::fs::canonicalize(&dir).unwrap());
        assert_eq!(traits::find_trait("evil").unwrap().name, "evil");
        assert_eq!(traits::list_catalog().unwrap().len(), SHIPPED.len());
    }
}

#[test]
fn unknown_name_lists_the_catalog() {
    let e = traits::find_trait_in("evill", &shipped_dir()).unwrap_err().to_string();
    assert!(e.contains("unknown trait `evill`"), "{e}");
    for name in SHIPPED {
        assert!(e.contains(name), "{e} should list {name}");
    }
}

#[test]
fn render_substitutes_once() {
    let t = traits::find_trait_in("evil", &shipped_dir()).unwrap();
    let s = t.render_judge("Q? {answer}", "A! {question}");
    assert!(s.contains("[QUESTION START]\nQ? {answer}\n[QUESTION END]"), "{s}");
    assert!(s.contains("[ANSWER START]\nA! {question}\n[ANSWER END]"), "{s}");
    // Only the braces inside the substituted texts remain.
    assert_eq!((s.matches("{question}").count(), s.matches("{answer}").count()), (1, 1), "{s}");
    let c = t.render_coherence("why?", "because");
    assert!(c.contains("why?") && c.contains("because") && !c.contains("{question}"));
    assert_eq!(traits::render("{x} {question}{answer}{", "q", "a"), "{x} qa{");
}

#[test]
fn json_round_trip_and_alias() {
    let t = traits::find_trait_in("humorous", &shipped_dir()).unwrap();
    let back = TraitDef::from_json(&t.to_json(), &t.source).unwrap();
    assert_eq!(back, t);
    // `instructions` is accepted as an alias of the paper's `instruction`.
    let mut v: Value = serde_json::from_str(&t.to_json()).unwrap();
    let pairs = v.as_object_mut().unwrap().remove("instruction").unwrap();
    v["instructions"] = pairs;
    assert_eq!(TraitDef::from_json(&v.to_string(), &t.source).unwrap(), t);
}

type Edit = Box<dyn Fn(&mut Value)>;

fn edit(f: impl Fn(&mut Value) + 'static) -> Edit {
    Box::new(f)
}

/// Write `v` to a temp file, load it, and return the error message (panics if it loads).
fn load_err(dir: &Path, file: &str, text: &str) -> String {
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    match TraitDef::load(&p) {
        Ok(_) => panic!("{file} loaded but should not"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains(&p.display().to_string()), "error should name the file: {e}");
            e
        }
    }
}

#[test]
fn malformed_definitions_are_named() {
    let d = tempfile::tempdir().unwrap();
    let base = evil_json();
    let q4 = base["questions"][4].as_str().unwrap().to_string();
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "no_eval_q",
            edit(|v| drop(v.as_object_mut().unwrap().remove("eval_questions"))),
            vec!["missing key `eval_questions`".into()],
        ),
        (
            "no_coh",
            edit(|v| drop(v.as_object_mut().unwrap().remove("coherence_prompt"))),
            vec!["missing key `coherence_prompt`".into()],
        ),
        ("no_name", edit(|v| drop(v.as_object_mut().unwrap().remove("name"))), vec!["missing key `name`".into()]),
        (
            "no_instr",
            edit(|v| drop(v.as_object_mut().unwrap().remove("instruction"))),
            vec!["missing key `instruction`".into()],
        ),
        (
            "three_pairs",
            edit(|v| v["instruction"].as_array_mut().unwrap().truncate(3)),
            vec!["`instruction` has 3 pos/neg pairs".into(), "at least 5".into()],
        ),
        ("empty_neg", edit(|v| v["instruction"][1]["neg"] = json!("  ")), vec!["`instruction[1].neg` is empty".into()]),
        (
            "same_pos_neg",
            edit(|v| v["instruction"][2]["neg"] = v["instruction"][2]["pos"].clone()),
            vec!["`instruction[2]` has the same text".into()],
        ),
        (
            "pair_no_neg",
            edit(|v| drop(v["instruction"][0].as_object_mut().unwrap().remove("neg"))),
            vec!["missing field `neg`".into()],
        ),
        ("pair_extra", edit(|v| v["instruction"][0]["neutral"] = json!("x")), vec!["unknown field `neutral`".into()]),
        ("empty_desc", edit(|v| v["description"] = json!("")), vec!["`description` is empty".into()]),
        ("bad_name", edit(|v| v["name"] = json!("Evil Trait")), vec!["`name`".into(), "lower-case".into()]),
        (
            "no_questions",
            edit(|v| v["questions"] = json!([])),
            vec!["`questions` is empty".into(), "at least 1 question".into()],
        ),
        ("blank_eval_q", edit(|v| v["eval_questions"][3] = json!("")), vec!["`eval_questions[3]` is empty".into()]),
        (
            "dup_question",
            edit(|v| v["questions"][7] = v["questions"][2].clone()),
            vec!["`questions` has the question".into(), "twice (items 2 and 7)".into()],
        ),
        (
            "overlap",
            edit(move |v| v["eval_questions"][5] = json!(format!("  {}", q4.to_uppercase()))),
            vec![
                "is in both `questions` and `eval_questions`".into(),
                base["questions"][4].as_str().unwrap().to_uppercase(),
            ],
        ),
        (
            "judge_no_answer",
            edit(|v| v["eval_prompt"] = json!("Rate {question} from 0 to 100.")),
            vec!["`eval_prompt` has no `{answer}` placeholder".into()],
        ),
        (
            "coh_no_question",
            edit(|v| v["coherence_prompt"] = json!("Rate {answer} from 0 to 100.")),
            vec!["`coherence_prompt` has no `{question}` placeholder".into()],
        ),
        ("unknown_key", edit(|v| v["eval_prompts"] = json!("typo")), vec!["unknown field `eval_prompts`".into()]),
        ("wrong_type", edit(|v| v["questions"] = json!("one question")), vec!["invalid trait JSON".into()]),
    ];
    for (file, change, wants) in cases {
        let mut v = base.clone();
        change(&mut v);
        let e = load_err(d.path(), &format!("{file}.json"), &serde_json::to_string_pretty(&v).unwrap());
        for w in wants {
            assert!(e.contains(&w), "{file}: error {e:?} should contain {w:?}");
        }
    }
    let e = load_err(d.path(), "not_json.json", "{ \"name\": \"x\", ");
    assert!(e.contains("invalid trait JSON"), "{e}");
    let e = TraitDef::load(d.path().join("absent.json")).unwrap_err().to_string();
    assert!(e.contains("absent.json"), "{e}");
}

#[test]
fn duplicate_names_in_a_catalog() {
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(shipped_dir().join("evil.json")).unwrap();
    std::fs::write(d.path().join("a.json"), &text).unwrap();
    std::fs::write(d.path().join("b.json"), &text).unwrap();
    std::fs::write(d.path().join("README.md"), "not a trait").unwrap();
    let all = traits::list_dir(d.path()).unwrap();
    assert_eq!(all.len(), 2);
    assert!(all[0].is_ok());
    let e = all[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("b.json") && e.contains("also the name of") && e.contains("a.json"), "{e}");
    // A name that differs from its file name is still found by name.
    assert_eq!(traits::find_trait_in("evil", d.path()).unwrap().source, d.path().join("a.json"));
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_persona")).args(args).env_remove(traits::TRAITS_ENV).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn cli_lists_the_catalog() {
    let (ok, out, err) = cli(&["traits"]);
    assert!(ok, "{out}\n{err}");
    for name in SHIPPED {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} not listed:\n{out}"));
        assert!(line.contains(" 5 ") && line.contains(" 20 "), "{line}");
    }
    assert!(!out.contains("INVALID"), "{out}");
    assert!(err.contains("7 trait definitions valid"), "{err}");

    let (ok, out, _) = cli(&["traits", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 7);
    assert!(items.iter().all(|i| i["valid"] == json!(true) && i["pairs"] == json!(5)));

    let (ok, out, _) = cli(&["traits", "evil", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], json!("evil"));
    assert_eq!(v[0]["instruction"].as_array().unwrap().len(), 5);
    assert_eq!(v[0]["eval_questions"].as_array().unwrap().len(), 20);

    let (ok, out, _) = cli(&["traits", "humorous"]);
    assert!(ok && out.contains("humorous") && out.contains("[4] +"), "{out}");
}

#[test]
fn cli_fails_on_a_bad_file() {
    let d = tempfile::tempdir().unwrap();
    let mut v = evil_json();
    v["instruction"].as_array_mut().unwrap().truncate(2);
    let bad = d.path().join("bad.json");
    std::fs::write(&bad, v.to_string()).unwrap();
    let (ok, out, err) = cli(&["traits", "evil", bad.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("INVALID") && out.contains("has 2 pos/neg pairs"), "{out}");
    assert!(err.contains("1 of 2 trait definitions invalid") && err.contains("bad.json"), "{err}");

    // A catalog directory with a bad file: listed as invalid, non-zero exit.
    std::fs::copy(shipped_dir().join("optimistic.json"), d.path().join("optimistic.json")).unwrap();
    let (ok, out, err) = cli(&["traits", "--dir", d.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("optimistic") && out.contains("INVALID"), "{out}");
    assert!(err.contains("bad.json"), "{err}");

    let (ok, _, err) = cli(&["traits", "no-such-trait"]);
    assert!(!ok && err.contains("unknown trait `no-such-trait`") && err.contains("sycophantic"), "{err}");
}

/// A vector carries the trait definition it was extracted with (issue 20 item 5): a custom trait
/// the catalog does not know is found in the vector; a name that matches uses the stored copy; a
/// path wins; an edited stored definition is refused by its sha256.
#[test]
fn vectors_carry_their_trait_definition() {
    use persona::steer::vector::PersonaVector;
    let dir = tempfile::tempdir().unwrap();
    let mut j = evil_json();
    j["name"] = json!("pirate");
    j["description"] = json!("Talks like a pirate.");
    let file = dir.path().join("pirate.json");
    std::fs::write(&file, serde_json::to_string_pretty(&j).unwrap()).unwrap();
    let t = TraitDef::load(&file).unwrap();
    let mut v = PersonaVector::new("pirate", 2, 3, vec![1.0; 9]).unwrap();
    v.metadata.insert("persona.trait".into(), "pirate".into());
    // Before: the catalog has no `pirate`.
    let e = traits::trait_for_vector(None, &v).unwrap_err().to_string();
    assert!(e.contains("pirate") && e.contains("--trait PATH.json"), "{e}");
    traits::record_trait(&mut v, &t);
    let path = dir.path().join("pirate.safetensors");
    v.save(&path).unwrap();
    let v = PersonaVector::load(&path).unwrap();
    assert_eq!(v.metadata[traits::TRAIT_PATH_KEY], file.display().to_string());
    let got = traits::trait_for_vector(None, &v).unwrap();
    assert_eq!((got.name.as_str(), &got.questions, &got.eval_prompt), ("pirate", &t.questions, &t.eval_prompt));
    assert_eq!(traits::trait_for_vector(Some("pirate"), &v).unwrap().description, "Talks like a pirate.");
    // Another name goes to the catalog; a path is read as given.
    assert_eq!(traits::trait_for_vector(Some("evil"), &v).unwrap().name, "evil");
    let other = shipped_dir().join("impolite.json");
    assert_eq!(traits::trait_for_vector(Some(other.to_str().unwrap()), &v).unwrap().name, "impolite");
    // Edited by hand: the sha256 no longer matches.
    let mut bad = v.clone();
    let def = bad.metadata[traits::TRAIT_DEF_KEY].replace("Talks like a pirate.", "Talks like a parrot.");
    bad.metadata.insert(traits::TRAIT_DEF_KEY.into(), def);
    let e = traits::trait_for_vector(None, &bad).unwrap_err().to_string();
    assert!(e.contains("persona.trait_sha256") && e.contains("changed"), "{e}");
    // ... which a --trait argument gets past (with a warning).
    assert_eq!(traits::trait_for_vector(Some("evil"), &bad).unwrap().name, "evil");
}
