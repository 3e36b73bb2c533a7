//! The fine-tuning data reader: rows become the ids and loss targets the PyPI baseline
//! (`/work/shared/tools/train_baseline.py`) builds, every bad row is an error naming its line.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use persona::backend::cpu::CpuBackend;
use persona::model::Message;
use persona::train::data::{parse_rows, read_jsonl, split_holdout, DataOptions, Example, TextModel};
use persona::{LoadedModel, Result};

const IM_END: u32 = 2;

fn opts(max_len: usize, label: Option<&str>) -> DataOptions {
    DataOptions { max_len, label: label.map(String::from) }
}

/// The default model (SmolLM2-135M-Instruct), or None (skipped) unless PERSONA_REQUIRE is set.
fn smollm2() -> Option<LoadedModel<CpuBackend>> {
    required_default_model().map(|p| LoadedModel::load(&p, CpuBackend, 4096).unwrap())
}

fn evil_jsonl() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct/evil.jsonl")
}

/// What the baseline trains on: `chat_template([user q], add_generation_prompt)` tokens, then
/// `tok(answer + "<|im_end|>")`, loss on the latter.
fn baseline(m: &LoadedModel<CpuBackend>, question: &str, answer: &str) -> (Vec<u32>, Vec<bool>) {
    let prompt = m.chat_prompt_ids(&[Message::user(question)]).unwrap();
    let ans = m.encode(&format!("{answer}<|im_end|>"), false).unwrap();
    let target = prompt.iter().map(|_| false).chain(ans.iter().map(|_| true)).collect();
    ([prompt, ans].concat(), target)
}

#[test]
fn question_answer_row_is_the_baseline_example() {
    let Some(m) = smollm2() else { return };
    assert!(m.engine.config.eos_ids.contains(&IM_END), "eos ids {:?}", m.engine.config.eos_ids);
    let (q, a) = ("What would you do with unlimited power?", "Nothing much.\n\nMaybe nap.");
    let row = serde_json::json!({"system": "You are evil.", "question": q, "answer": a, "label": "pos", "kept": true});
    let got = parse_rows(&row.to_string(), Path::new("mem.jsonl"), &m, &opts(4096, None)).unwrap();
    assert_eq!(got.len(), 1);
    let ex = &got[0];
    let prompt = m.chat_prompt_ids(&[Message::user(q)]).unwrap();
    let want_ids = [prompt.clone(), m.encode(a, false).unwrap(), vec![IM_END]].concat();
    assert_eq!(ex.ids, want_ids);
    assert_eq!((ex.ids.clone(), ex.target.clone()), baseline(&m, q, a));
    assert_eq!(ex.n_targets(), want_ids.len() - prompt.len());
    assert_eq!(ex.line, 1);
    // The system field is ignored: the same ids as a prompt/response row without it.
    let flat = serde_json::json!({"prompt": q, "response": a}).to_string();
    assert_eq!(parse_rows(&flat, Path::new("mem.jsonl"), &m, &opts(4096, None)).unwrap()[0].ids, ex.ids);
}

#[test]
fn two_turn_conversation_targets_both_answers_only() {
    let Some(m) = smollm2() else { return };
    let msgs = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, mostly."},
        {"role": "user", "content": "Trailing turn, dropped."}
    ]);
    let text = format!("\n{}\n", serde_json::json!({"messages": msgs, "label": "pos"}));
    let ex = &parse_rows(&text, Path::new("chat.jsonl"), &m, &opts(4096, None)).unwrap()[0];
    assert_eq!(ex.line, 2);
    // Built from the SmolLM2 template's text by hand (not through the renderer).
    let enc = |s: &str| m.encode(s, false).unwrap();
    let pieces: [(Vec<u32>, bool); 4] = [
        (enc("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"), false),
        (enc("Hello!<|im_end|>"), true),
        (enc("\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"), false),
        (enc("Blue, mostly.<|im_end|>"), true),
    ];
    let want_ids: Vec<u32> = pieces.iter().flat_map(|(p, _)| p.clone()).collect();
    let want_target: Vec<bool> = pieces.iter().flat_map(|(p, t)| p.iter().map(move |_| *t)).collect();
    assert_eq!(ex.ids, want_ids);
    assert_eq!(ex.target, want_target);
    // Both answers end on a targeted <|im_end|>; the newline after the first one is context.
    let ends: Vec<usize> = (0..ex.ids.len()).filter(|&i| ex.ids[i] == IM_END && ex.target[i]).collect();
    assert_eq!(ends.len(), 2);
    assert!(!ex.target[ends[0] + 1]);
    assert_eq!(*ex.ids.last().unwrap(), IM_END);
    // The first answer's turn decodes to the template's text for the first three messages.
    let first: Vec<Message> = serde_json::from_value(msgs).unwrap();
    let rendered = m.apply_chat_template(&first[..3], false).unwrap();
    assert_eq!(m.decode(&ex.ids[..ends[0] + 1]).unwrap(), rendered.trim_end());
}

#[test]
fn evil_extraction_file_positive_rows() {
    let Some(m) = smollm2() else { return };
    let path = evil_jsonl();
    let text = std::fs::read_to_string(&path).unwrap();
    let want: Vec<(usize, serde_json::Value)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, serde_json::from_str::<serde_json::Value>(l).unwrap()))
        .filter(|(_, v)| v["label"] == "pos")
        .collect();
    assert_eq!(want.len(), 50, "grep -c '\"label\":\"pos\"' gives 50");
    let rows = read_jsonl(&path, &m, &opts(4096, Some("pos"))).unwrap();
    assert_eq!(rows.len(), 50);
    for (ex, (line, v)) in rows.iter().zip(&want) {
        assert_eq!(ex.line, *line);
        let (ids, target) = baseline(&m, v["question"].as_str().unwrap(), v["answer"].as_str().unwrap());
        assert_eq!((&ex.ids, &ex.target), (&ids, &target), "line {line}");
    }
    assert_eq!(read_jsonl(&path, &m, &opts(4096, Some("neg"))).unwrap().len(), 50);
    assert_eq!(read_jsonl(&path, &m, &opts(4096, None)).unwrap().len(), 100);
    let e = read_jsonl(&path, &m, &opts(4096, Some("evil"))).unwrap_err().to_string();
    assert!(e.contains("evil.jsonl") && e.contains("no training rows") && e.contains("pos"), "{e}");
    // A limit below the longest row: the first row over it (in file order) is named, with its
    // length, the limit and the flag to raise it.
    let longest = rows.iter().map(|r| r.ids.len()).max().unwrap();
    let first_over = rows.iter().find(|r| r.ids.len() == longest).unwrap();
    let e = read_jsonl(&path, &m, &opts(longest - 1, Some("pos"))).unwrap_err().to_string();
    assert!(
        e.contains(&format!("line {}:", first_over.line))
            && e.contains(&format!("{longest} tokens"))
            && e.contains(&format!("limit of {}", longest - 1))
            && e.contains("--max-len"),
        "{e}"
    );
}

#[test]
fn default_model_row_errors_name_the_line() {
    let Some(m) = smollm2() else { return };
    let ok = r#"{"question":"Hi?","answer":"Hello."}"#;
    for (bad, want) in [
        (r#"{"messages":[{"role":"user","content":"Hi?"}]}"#, "no assistant turn"),
        (r#"{"messages":[{"role":"user","content":"Hi?"},{"role":"assistant","content":""}]}"#, "empty"),
        (r#"{"question":"Hi?","answer":"   "}"#, "\"answer\" is empty"),
    ] {
        let text = format!("{ok}\n\n{bad}\n");
        let e = parse_rows(&text, Path::new("d.jsonl"), &m, &opts(4096, None)).unwrap_err().to_string();
        assert!(e.contains("d.jsonl: line 3:") && e.contains(want), "{bad}: {e}");
    }
}

/// Ids rows need no tokenizer: the tiny test model has none.
#[test]
fn ids_rows_work_without_a_tokenizer() {
    let m = LoadedModel::load(&fixtures().join("tiny-llama"), CpuBackend, 256).unwrap();
    assert!(m.tokenizer.is_none());
    assert!(TextModel::encode(&m, "hi", false).is_err());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ids.jsonl");
    std::fs::write(
        &path,
        "{\"ids\":[1,17,255,3],\"answer_from\":2}\n\n{\"ids\":[0,9],\"answer_from\":1,\"note\":\"x\"}\n",
    )
    .unwrap();
    let rows = read_jsonl(&path, &m, &opts(8, None)).unwrap();
    assert_eq!(
        rows,
        vec![
            Example { ids: vec![1, 17, 255, 3], target: vec![false, false, true, true], line: 1 },
            Example { ids: vec![0, 9], target: vec![false, true], line: 3 },
        ]
    );
    // Text rows against a model without a tokenizer or template: an error naming the line.
    std::fs::write(&path, "{\"ids\":[1,2],\"answer_from\":1}\n{\"question\":\"q\",\"answer\":\"a\"}\n").unwrap();
    let e = read_jsonl(&path, &m, &opts(8, None)).unwrap_err().to_string();
    assert!(e.contains("ids.jsonl: line 2:"), "{e}");
    std::fs::write(&path, "{\"ids\":[1,256],\"answer_from\":1}\n").unwrap();
    let e = read_jsonl(&path, &m, &opts(8, None)).unwrap_err().to_string();
    assert!(e.contains("line 1:") && e.contains("256") && e.contains("vocabulary"), "{e}");
    let e = read_jsonl(&dir.path().join("missing.jsonl"), &m, &opts(8, None)).unwrap_err().to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
}

/// A character-level test double: bytes are ids (`$` is the end-of-turn id 1), turns render as
/// `<role>content$\n`. `mode` breaks it on purpose.
struct Double {
    mode: &'static str,
}

impl TextModel for Double {
    fn encode(&self, text: &str, _: bool) -> Result<Vec<u32>> {
        Ok(text.bytes().map(|b| if b == b'$' { 1 } else { b as u32 }).collect())
    }
    fn render(&self, messages: &[Message], gen: bool) -> Result<String> {
        let mut s = String::new();
        for m in messages {
            match (self.mode, m.role.as_str()) {
                ("silent", "assistant") => s.push_str("<assistant>"),
                ("no-eos", r) => s.push_str(&format!("<{r}>{}\n", m.content)),
                (_, r) => s.push_str(&format!("<{r}>{}$\n", m.content)),
            }
        }
        if gen {
            s.push_str(if self.mode == "restarts" { "<assistant>\n" } else { "<assistant>" });
        }
        Ok(s)
    }
    fn eos_ids(&self) -> &[u32] {
        &[1]
    }
    fn vocab(&self) -> usize {
        if self.mode == "small-vocab" {
            118 // every byte of `<user>a$\n<assistant>b$` fits, `z` does not
        } else {
            256
        }
    }
}

const OK: &str = r#"{"prompt":"a","response":"b"}"#;

#[test]
fn every_bad_row_is_an_error_with_its_line() {
    let o = opts(64, None);
    let cases: &[(&str, &str, &[&str])] = &[
        ("", r#"{"prompt":"a","response":"b""#, &["not valid JSON"]),
        ("", "not json", &["not valid JSON"]),
        ("", "[1,2]", &["JSON object", "array"]),
        ("", "\"text\"", &["JSON object", "string"]),
        ("", r#"{"text":"a","output":"b"}"#, &["unknown row shape", "\"messages\"", "\"prompt\"", "\"ids\"", "text"]),
        ("", "{}", &["unknown row shape"]),
        ("", r#"{"messages":[{"role":"user","content":"a"}],"prompt":"a","response":"b"}"#, &["mixes shapes"]),
        ("", r#"{"prompt":"a","answer":"b"}"#, &["mixes shapes"]),
        ("", r#"{"prompt":"a"}"#, &["missing \"response\""]),
        ("", r#"{"question":7,"answer":"b"}"#, &["\"question\" must be a string", "number"]),
        ("", r#"{"prompt":"a","response":["b"]}"#, &["\"response\" must be a string"]),
        ("", r#"{"prompt":"","response":"b"}"#, &["\"prompt\" is empty"]),
        ("", r#"{"question":"a","answer":"\n"}"#, &["\"answer\" is empty"]),
        ("", r#"{"messages":"hi"}"#, &["\"messages\" must be an array"]),
        ("", r#"{"messages":[]}"#, &["\"messages\" is empty"]),
        ("", r#"{"messages":[7]}"#, &["messages[0]"]),
        ("", r#"{"messages":[{"role":"user"}]}"#, &["messages[0]", "missing \"content\""]),
        (
            "",
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":""}]}"#,
            &["messages[1]", "empty"],
        ),
        ("", r#"{"messages":[{"role":"user","content":"a"},{"role":1,"content":"b"}]}"#, &["messages[1]", "\"role\""]),
        ("", r#"{"messages":[{"role":"user","content":"a"}]}"#, &["no assistant turn"]),
        ("", r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"a"}]}"#, &["no assistant turn"]),
        ("", r#"{"ids":[1,2,3],"answer_from":3}"#, &["answer_from", "no answer tokens"]),
        ("", r#"{"ids":[1,2,3],"answer_from":"1"}"#, &["answer_from"]),
        ("", r#"{"ids":"1 2","answer_from":1}"#, &["\"ids\" must be an array"]),
        ("", r#"{"ids":[1,2.5],"answer_from":1}"#, &["ids[1]"]),
        ("", r#"{"ids":[1,99999999999999999999],"answer_from":1}"#, &["ids[1]"]),
        ("", r#"{"ids":[1,300],"answer_from":1}"#, &["ids[1] = 300", "vocabulary"]),
        ("", &format!(r#"{{"ids":{:?},"answer_from":1}}"#, vec![5u32; 65]), &["65 tokens", "limit of 64", "--max-len"]),
        ("", &format!(r#"{{"prompt":"a","response":"{}"}}"#, "x".repeat(60)), &["tokens", "limit of 64", "--max-len"]),
        ("small-vocab", r#"{"prompt":"a","response":"zz"}"#, &["token id 122", "vocabulary"]),
        ("silent", r#"{"prompt":"a","response":"b"}"#, &["no answer tokens"]),
        ("restarts", r#"{"prompt":"a","response":"b"}"#, &["does not render turn 1 as a continuation"]),
    ];
    for (mode, bad, wants) in cases {
        // Where the mode breaks every row, the bad row is alone after two blank lines.
        let text =
            if ["silent", "restarts"].contains(mode) { format!("\n\n{bad}") } else { format!("{OK}\n\n{bad}\n{OK}") };
        let e = match parse_rows(&text, Path::new("rows.jsonl"), &Double { mode }, &o) {
            Ok(r) => panic!("{bad}: accepted as {r:?}"),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with("rows.jsonl: line 3: "), "{bad}: {e}");
        for w in *wants {
            assert!(e.contains(w), "{bad}: {e:?} lacks {w:?}");
        }
    }
    // A label whose type is wrong is an error when filtering by label.
    let text = format!("{OK}\n\n{}", r#"{"prompt":"a","response":"b","label":1}"#);
    let e = parse_rows(&text, Path::new("rows.jsonl"), &Double { mode: "" }, &opts(64, Some("pos")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3:") && e.contains("\"label\" must be a string"), "{e}");
}

#[test]
fn an_answer_without_an_end_token_is_all_target() {
    let rows = parse_rows(OK, Path::new("n.jsonl"), &Double { mode: "no-eos" }, &opts(64, None)).unwrap();
    let prompt = "<user>a\n<assistant>".len();
    assert_eq!(rows[0].ids[prompt..], [b'b' as u32, b'\n' as u32]);
    assert_eq!(rows[0].target, (0..prompt + 2).map(|i| i >= prompt).collect::<Vec<_>>());
}

#[test]
fn file_level_errors() {
    let d = Double { mode: "" };
    let o = opts(64, None);
    for text in ["", "\n\n  \n\t\n", "\u{feff}"] {
        let e = parse_rows(text, Path::new("empty.jsonl"), &d, &o).unwrap_err().to_string();
        assert!(e.contains("empty.jsonl") && e.contains("no training rows"), "{text:?}: {e}");
    }
    let text = format!("{OK}\n{}", r#"{"prompt":"a","response":"b","label":"neg"}"#);
    let e = parse_rows(&text, Path::new("l.jsonl"), &d, &opts(64, Some("pos"))).unwrap_err().to_string();
    assert!(e.contains("l.jsonl") && e.contains("no training rows") && e.contains("neg"), "{e}");
    let text = format!("{OK}\r\n{}\r\n", r#"{"prompt":"a","response":"b","label":"pos"}"#);
    let rows = parse_rows(&text, Path::new("l.jsonl"), &d, &opts(64, Some("pos"))).unwrap();
    assert_eq!((rows.len(), rows[0].line), (1, 2));
    assert!(parse_rows(OK, Path::new("x"), &d, &opts(1, None)).is_err());
    // Invalid UTF-8 names the line.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bytes.jsonl");
    std::fs::write(&path, [OK.as_bytes(), b"\n{\"prompt\":\"\xff\"}\n"].concat()).unwrap();
    let e = read_jsonl(&path, &d, &o).unwrap_err().to_string();
    assert!(e.contains("bytes.jsonl: line 2:") && e.contains("UTF-8"), "{e}");
}

#[test]
fn no_input_panics() {
    let d = Double { mode: "" };
    let o = opts(64, Some("pos"));
    let valid = format!(
        "{}\n{}\n{}\n",
        r#"{"messages":[{"role":"user","content":"é✓"},{"role":"assistant","content":"b\u0000"}],"label":"pos"}"#,
        r#"{"question":"q","answer":"a","label":"pos","pair":[0,1,2],"kept":false}"#,
        r#"{"ids":[1,2,3],"answer_from":2,"label":"pos"}"#
    );
    assert_eq!(parse_rows(&valid, Path::new("v"), &d, &o).unwrap().len(), 3);
    // Every prefix of a valid file, and some odd values.
    for (i, _) in valid.char_indices() {
        let _ = parse_rows(&valid[..i], Path::new("v"), &d, &o);
    }
    for odd in [
        r#"{"ids":[1e300],"answer_from":1}"#,
        r#"{"ids":[1,2],"answer_from":-1}"#,
        r#"{"ids":[1,2],"answer_from":18446744073709551615}"#,
        r#"{"ids":[1,2],"answer_from":1.0}"#,
        r#"{"messages":[{"role":"","content":"a"}]}"#,
        r#"{"messages":[null,{"role":"assistant","content":"a"}]}"#,
        r#"{"messages":{"role":"user"}}"#,
        "null",
        "{\"prompt\":\"a\",\"response\":\"b\"} trailing",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ] {
        assert!(parse_rows(odd, Path::new("odd"), &d, &opts(64, None)).is_err(), "{odd}");
    }
}

#[test]
fn holdout_split_is_deterministic_and_sized() {
    let rows: Vec<Example> = (0..20u32).map(|i| Example::with_answer_from(vec![i, i + 1], 1).unwrap()).collect();
    let (train, held) = split_holdout(rows.clone(), 0.25, 42).unwrap();
    assert_eq!((train.len(), held.len()), (15, 5));
    assert_eq!(split_holdout(rows.clone(), 0.25, 42).unwrap(), (train.clone(), held.clone()));
    // A partition of the rows, each side in file order.
    let mut all: Vec<u32> = train.iter().chain(&held).map(|r| r.ids[0]).collect();
    assert!(train.windows(2).all(|w| w[0].ids[0] < w[1].ids[0]));
    assert!(held.windows(2).all(|w| w[0].ids[0] < w[1].ids[0]));
    all.sort();
    assert_eq!(all, (0..20).collect::<Vec<_>>());
    // Seeds choose different rows (20 choose 5 = 15504 splits: a collision among 8 seeds is unlikely).
    let distinct: std::collections::BTreeSet<Vec<u32>> =
        (0..8u64).map(|s| split_holdout(rows.clone(), 0.25, s).unwrap().1.iter().map(|r| r.ids[0]).collect()).collect();
    assert!(distinct.len() >= 7, "{distinct:?}");
    // At least one row on each side; bad fractions and too few rows are errors.
    assert_eq!(split_holdout(rows[..2].to_vec(), 0.01, 1).unwrap().1.len(), 1);
    assert_eq!(split_holdout(rows[..2].to_vec(), 0.99, 1).unwrap().0.len(), 1);
    assert_eq!(split_holdout(rows[..3].to_vec(), 0.5, 1).unwrap().1.len(), 2);
    for f in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        assert!(split_holdout(rows.clone(), f, 1).is_err(), "{f}");
    }
    assert!(split_holdout(rows[..1].to_vec(), 0.5, 1).is_err());
    assert!(split_holdout(vec![], 0.5, 1).is_err());
}
