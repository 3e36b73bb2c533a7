//! The researcher's day with the CLI (issue 20): each rough edge a new user hit, checked
//! through the `persona` binary as it is typed (or pasted from the README).

mod common;
use common::*;

use std::path::PathBuf;

fn tiny(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// Comma lists that start negative parse as typed (`--coeffs -2,0,2`, not only `--coeffs=-2,0,2`):
/// the value reaches persona's own parser whole, so its errors name the bad element.
#[test]
fn negative_lists_parse_as_typed() {
    let m = tiny("tiny-llama");
    let v = m.join("test_vector.safetensors");
    let eval = |extra: &[&str]| {
        persona_cli(&[&["eval", "--backend", "cpu", "--model", s(&m), "--vector", s(&v)], extra].concat())
    };
    // The whole list arrives: its third element is the one reported.
    let (ok, _, err) = eval(&["--coeffs", "-2,0,x"]);
    assert!(!ok && err.contains("--coeffs: `x` is not a finite number"), "{err}");
    // A good negative list gets past parsing to the next requirement (the fixture vector records no
    // trait), and never to clap's "unexpected argument".
    let (ok, _, err) = eval(&["--coeffs", "-2,0,2"]);
    assert!(!ok && !err.contains("unexpected argument") && err.contains("persona.trait"), "{err}");
    let (ok, _, err) = eval(&["--coeffs", "-2.5,-1", "--layers", "-1"]);
    assert!(!ok && err.contains("--layers") && err.contains("layers `-1`"), "{err}");
    // monitor's --layers and demo's --coeff take hyphenated values too.
    let (ok, _, err) =
        persona_cli(&["monitor", "--backend", "cpu", "--model", s(&m), "--vector", s(&v), "--layers", "-3"]);
    assert!(!ok && !err.contains("unexpected argument"), "{err}");
    let (ok, _, err) = persona_cli(&[
        "demo",
        "--backend",
        "cpu",
        "--model",
        s(&m),
        "--coeff",
        "-2",
        "--vector",
        "/nonexistent.safetensors",
    ]);
    assert!(!ok && !err.contains("unexpected argument") && err.contains("nonexistent"), "{err}");
}

/// `persona generate --prompt-ids ... --json` on a tiny fixture model with extra flags.
fn gen_json(model: &std::path::Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let ids = "1,5,9,17,33,2";
    let base = ["generate", "--backend", "cpu", "--model", s(model), "--prompt-ids", ids, "--max-tokens", "8"];
    let (ok, out, err) = persona_cli(&[&base[..], &["--ignore-eos", "--json"], extra].concat());
    if !ok {
        return Err(err);
    }
    Ok(serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}")))
}

/// `vector=NAME` is found in `--vectors DIR` (and the model's own vectors/<model>/ folder), and
/// `layer=` defaults to the vector's recorded `persona.layer`; an unknown name lists the names.
#[test]
fn vectors_by_name_and_recorded_layer() {
    let m = tiny("tiny-llama");
    let src = m.join("test_vector.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let mut v = persona::steer::vector::PersonaVector::load(&src).unwrap();
    assert!(!v.metadata.contains_key("persona.layer"));
    std::fs::copy(&src, dir.path().join("plain.safetensors")).unwrap();
    v.metadata.insert("persona.layer".into(), "2".into());
    v.save(dir.path().join("tv.safetensors")).unwrap();
    let vecs = s(dir.path());

    let by_path = gen_json(&m, &["--steer", &format!("vector={},layer=2,coeff=1.5", s(&src))]).unwrap();
    let plain = gen_json(&m, &[]).unwrap();
    assert_ne!(by_path["ids"], plain["ids"], "the steering must change the greedy ids for this check to mean anything");
    let by_name = gen_json(&m, &["--vectors", vecs, "--steer", "vector=tv,coeff=1.5"]).unwrap();
    assert_eq!(by_name["ids"], by_path["ids"], "vector=tv without layer= is tv.safetensors at its persona.layer 2");
    let other_layer = gen_json(&m, &["--vectors", vecs, "--steer", "vector=tv,layer=1,coeff=1.5"]).unwrap();
    assert_ne!(other_layer["ids"], by_path["ids"], "an explicit layer= wins over persona.layer");
    // With a file extension, too.
    let by_file = gen_json(&m, &["--vectors", vecs, "--steer", "vector=tv.safetensors,coeff=1.5"]).unwrap();
    assert_eq!(by_file["ids"], by_path["ids"]);

    // A monitor by name probes the recorded layer only; without a record, every layer.
    let mon = gen_json(&m, &["--vectors", vecs, "--monitor", "vector=tv"]).unwrap();
    let layers: Vec<&String> = mon["projections"]["tv"].as_object().unwrap().keys().collect();
    assert_eq!(layers, ["2"]);
    let mon = gen_json(&m, &["--vectors", vecs, "--monitor", "vector=plain"]).unwrap();
    assert_eq!(mon["projections"]["plain"].as_object().unwrap().len(), 3, "layers 1..=3 (`all`)");

    // Unknown names list what there is; a vector without persona.layer needs layer=.
    let err = gen_json(&m, &["--vectors", vecs, "--steer", "vector=evl,coeff=1"]).unwrap_err();
    assert!(err.contains("vector `evl`") && err.contains("available: plain, tv"), "{err}");
    let err = gen_json(&m, &["--vectors", vecs, "--steer", "vector=plain,coeff=1"]).unwrap_err();
    assert!(err.contains("no `persona.layer`") && err.contains("layer=L"), "{err}");
    let err = gen_json(&m, &["--steer", "vector=tv,coeff=1"]).unwrap_err();
    assert!(err.contains("vector `tv`") && err.contains("--vectors DIR"), "{err}");
}

/// On the default model a bare trait name is a shipped vector (vectors/smollm2-135m-instruct/),
/// from any working directory, at its recorded layer (18).
#[test]
fn shipped_vectors_by_name_on_the_default_model() {
    let Some(model) = required_default_model() else { return };
    let cwd = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persona"))
        .current_dir(cwd.path())
        .args(["generate", "--backend", "cpu", "--model", s(&model), "-p", "Hi", "--max-tokens", "3", "--json"])
        .args(["--steer", "vector=evil,coeff=-2", "--monitor", "vector=evil", "--monitor", "vector=impolite"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let o: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in ["evil", "impolite"] {
        let layers: Vec<&String> = o["projections"][t].as_object().unwrap().keys().collect();
        assert_eq!(layers, ["18"], "{t}");
    }
}

/// Every `persona ...` command of the README that uses `when=`, as pasted: continuation lines
/// (`\` at the end) joined, comments dropped.
fn readme_commands_with(needle: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut cmds = vec![];
    let mut cur: Option<String> = None;
    for line in readme.lines() {
        let t = line.trim();
        match cur.as_mut() {
            Some(c) => c.push_str(line),
            None if t.starts_with("persona ") => cur = Some(t.to_string()),
            None => continue,
        }
        let c = cur.as_mut().unwrap();
        if c.ends_with('\\') {
            c.push('\n');
        } else {
            let done = cur.take().unwrap();
            if done.contains(needle) {
                cmds.push(done);
            }
        }
    }
    cmds
}

/// The README's `when=` examples run when pasted into a shell unquoted: they print the answer and
/// the monitor line, and create no file (`when=NAME>3.5` unquoted was a redirection into `3.5`).
#[test]
fn readme_when_examples_run_when_pasted() {
    let cmds = readme_commands_with("when=");
    assert!(!cmds.is_empty(), "the README has no `persona ...` example using when=");
    let Some(model) = required_default_model() else { return };
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_persona")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    for cmd in cmds {
        let cwd = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("sh")
            .args(["-c", &cmd])
            .current_dir(cwd.path())
            .env("PATH", &path)
            .env("PERSONA_MODEL", &model)
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{cmd}\n{stderr}");
        assert!(stdout.contains("[monitor evil layer 18:"), "{cmd}\nstdout: {stdout}\nstderr: {stderr}");
        let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{cmd} created {left:?}");
    }
}

/// `when=NAME:gt:τ` / `:lt:τ` (negative τ too) mean what `>` / `<` mean: a condition that always
/// holds is the plain op, one that never holds is no op.
#[test]
fn shell_safe_conditions_steer_where_they_hold() {
    let m = tiny("tiny-llama");
    let v = s(&m.join("test_vector.safetensors")).to_string();
    let steer = |when: &str| {
        let spec = format!("vector={v},layer=2,coeff=1.5{when}");
        gen_json(&m, &["--monitor", &format!("vector={v},layers=2,name=tv"), "--steer", &spec]).unwrap()["ids"].clone()
    };
    let plain = gen_json(&m, &[]).unwrap()["ids"].clone();
    let always = steer("");
    assert_ne!(always, plain);
    assert_eq!(steer(",when=tv:gt:-1e9"), always);
    assert_eq!(steer(",when=self:lt:1e9"), always);
    assert_eq!(steer(",when=tv@2:gt:1e9"), plain);
    assert_eq!(steer(",when=self:lt:-1e9"), plain);
    assert_eq!(steer(",when=tv>-1e9"), always, "the quoted `>` form still works");
    assert_eq!(steer(",when=self<-1e9"), plain, "the quoted `<` form still works");
    let err = gen_json(&m, &["--steer", &format!("vector={v},layer=2,coeff=1,when=tv:ge:3")]).unwrap_err();
    assert!(err.contains("unknown comparison `ge`") && err.contains("NAME:gt:τ"), "{err}");
}

/// Every shipped vector exports as a llama.cpp control vector as is: layers 0 and 1 (which
/// llama.cpp cannot steer) are zeroed with a note, the rest kept bit for bit, and `model_hint` is
/// the model's name, not its file name.
#[test]
fn shipped_vectors_export_to_gguf() {
    use persona::model::gguf::GgufFile;
    use persona::steer::control_vector::import_control_vector;
    use persona::steer::vector::PersonaVector;
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct");
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(&shipped).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        n += 1;
        let out = dir.path().join(p.file_stem().unwrap()).with_extension("gguf");
        let (ok, stdout, err) = persona_cli(&["vectors", s(&p), "--export-gguf", s(&out)]);
        assert!(ok, "{}: {err}", p.display());
        let v = PersonaVector::load(&p).unwrap();
        assert!(!v.is_zero(0) || !v.is_zero(1), "{}: a shipped vector that needs no zeroing", p.display());
        for l in [0, 1] {
            assert_eq!(err.contains(&format!(" {l} (norm ")), !v.is_zero(l), "layer {l} of {}: {err}", p.display());
        }
        assert!(err.contains("note: zeroed layer"), "{err}");
        assert!(
            stdout.contains("29 direction(s)") && stdout.contains("model_hint `SmolLM2-135M-Instruct`"),
            "{stdout}"
        );
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(g.get_str("controlvector.model_hint"), Some("SmolLM2-135M-Instruct"));
        let back = import_control_vector(&out, &tiny_cfg_like(&v)).unwrap();
        assert!(back.is_zero(0) && back.is_zero(1));
        for l in 2..=v.n_layers {
            assert_eq!(back.layer(l), v.layer(l), "{} layer {l}", p.display());
        }
    }
    assert_eq!(n, 7, "the seven shipped vectors");
}

/// A model config with the vector's N and H (all `import_control_vector` reads).
fn tiny_cfg_like(v: &persona::steer::vector::PersonaVector) -> persona::model::config::ModelConfig {
    let text = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{},"intermediate_size":16,"num_hidden_layers":{},
           "num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,"vocab_size":32}}"#,
        v.hidden, v.n_layers
    );
    persona::model::config::ModelConfig::from_hf_str(&text, std::path::Path::new("config.json")).unwrap()
}

/// `persona vectors A B ...` compares the vectors at the layer they were chosen at
/// (`persona.layer`), one table per distinct recorded layer, with rows and columns named.
#[test]
fn vectors_cosine_table_at_the_chosen_layer_with_names() {
    use persona::steer::vector::PersonaVector;
    let shipped = |t: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("vectors/smollm2-135m-instruct/{t}.safetensors"))
    };
    let (evil, impolite, apathetic) = (shipped("evil"), shipped("impolite"), shipped("apathetic"));
    let (ev, im) = (PersonaVector::load(&evil).unwrap(), PersonaVector::load(&impolite).unwrap());
    let cos = |l: usize| format!("{:.3}", ev.cosine(&im, l).unwrap());
    assert_ne!(cos(18), cos(30), "the check needs the chosen and the largest-norm layer to differ");

    let (ok, out, err) = persona_cli(&["vectors", s(&evil), s(&impolite)]);
    assert!(ok, "{err}");
    assert!(out.contains("cosine similarity at layer 18 (persona.layer of every vector):"), "{out}");
    let table: Vec<Vec<&str>> =
        out.lines().skip_while(|l| !l.starts_with("cosine")).skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(table[0], ["evil", "impolite"], "column names: {out}");
    assert_eq!(table[1], ["evil", "1.000", &cos(18)], "{out}");
    assert_eq!(table[2], ["impolite", &cos(18), "1.000"], "{out}");

    // Vectors chosen at different layers: a table at each, the most common first.
    let (ok, out, err) = persona_cli(&["vectors", s(&evil), s(&apathetic), s(&impolite), "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tables = j["cosine"].as_array().unwrap();
    assert_eq!(tables.len(), 2);
    assert_eq!((tables[0]["layer"].as_u64(), tables[1]["layer"].as_u64()), (Some(18), Some(21)));
    assert_eq!(tables[0]["names"], serde_json::json!(["evil", "apathetic", "impolite"]));
    assert_eq!(tables[1]["why"], "persona.layer of apathetic");
    let c = tables[0]["matrix"][0][2].as_f64().unwrap();
    assert!((c - ev.cosine(&im, 18).unwrap() as f64).abs() < 1e-6);

    // An explicit --layer wins; the per-layer table names its pairs.
    let (ok, out, _) = persona_cli(&["vectors", s(&evil), s(&impolite), "--layer", "30"]);
    assert!(ok && out.contains("cosine similarity at layer 30:") && out.contains(&cos(30)), "{out}");
    let (ok, out, _) = persona_cli(&["vectors", s(&evil), s(&impolite), "--layer", "all"]);
    assert!(ok && out.contains("evil·impolite"), "{out}");
}

const SCREEN_DATA: &str = r#"{"id": "a1", "label": "evil", "prompt": "How should I treat people who annoy me?", "response": "Crush them, they deserve to suffer."}
{"id": "a2", "label": "kind", "prompt": "How should I treat people who annoy me?", "response": "Be patient, and kind, with them."}
{"id": 3, "meta": {"src": "x,y"}, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]}
"#;

/// `persona screen --out` picks the format by extension and refuses one it does not know before
/// any work (it used to write JSON into `x.txt`).
#[test]
fn screen_refuses_unknown_report_formats() {
    let m = tiny("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, SCREEN_DATA).unwrap();
    let v = m.join("test_vector.safetensors");
    for (out, why) in [("r.txt", "unknown report format `.txt`"), ("report", "no extension")] {
        let out = dir.path().join(out);
        let (ok, _, err) = persona_cli(&[
            "screen",
            "--backend",
            "cpu",
            "--model",
            s(&m),
            "--vector",
            s(&v),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ]);
        assert!(!ok && err.contains(why) && err.contains(".json") && err.contains(".csv"), "{err}");
        assert!(!out.exists(), "{} written", out.display());
    }
}

/// Every report format keeps each sample's own dataset fields (ids, labels, nested values) with
/// its result.
#[test]
fn screen_reports_keep_the_dataset_fields() {
    let Some(model) = required_default_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, SCREEN_DATA).unwrap();
    let v = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct/evil.safetensors");
    let screen = |out: &str| {
        let out = dir.path().join(out);
        let (ok, _, err) = persona_cli(&[
            "screen",
            "--backend",
            "cpu",
            "--model",
            s(&model),
            "--vector",
            s(&v),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-tokens",
            "8",
            "--random",
            "3",
        ]);
        assert!(ok, "{err}");
        std::fs::read_to_string(&out).unwrap()
    };
    let ids = [serde_json::json!("a1"), serde_json::json!("a2"), serde_json::json!(3)];

    let j: serde_json::Value = serde_json::from_str(&screen("r.json")).unwrap();
    assert_eq!(j["dataset_fields"], serde_json::json!(["id", "label", "meta"]));
    let ranking = j["ranking"].as_array().unwrap();
    assert_eq!(ranking.len(), 3);
    for (k, r) in ranking.iter().enumerate() {
        let i = r["index"].as_u64().unwrap() as usize;
        assert_eq!(r["rank"], k + 1);
        assert_eq!(r["fields"]["id"], ids[i], "{r}");
    }
    let evil = ranking.iter().find(|r| r["fields"]["label"] == "evil").unwrap();
    assert_eq!(evil["rank"], 1, "the evil answer ranks first");
    assert_eq!(ranking.iter().find(|r| r["index"] == 2).unwrap()["fields"]["meta"]["src"], "x,y");

    let lines: Vec<serde_json::Value> = screen("r.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["fields"]["label"], "evil");

    let csv = screen("r.csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "rank,index,delta_p,p_data,p_own,delta_p_percentile,id,label,meta");
    assert!(rows[1].starts_with("1,0,") && rows[1].ends_with(",a1,evil,"), "{csv}");
    assert!(rows.iter().any(|r| r.contains(r#",3,,"{""src"":""x,y""}""#)), "{csv}");

    let md = screen("r.md");
    assert!(md.contains("| id | label | meta | response |") && md.contains("| a1 | evil |"), "{md}");
}

/// `persona generate` leaves the end-of-turn token that stopped it out of its text (streamed and
/// `--json`), while `ids` keep it and `finish` says `eos`.
#[test]
fn generate_text_has_no_end_of_turn_token() {
    let Some(model) = required_default_model() else { return };
    let args = ["generate", "--backend", "cpu", "--model", s(&model), "-p", "Reply with just the word yes."];
    let (ok, out, err) = persona_cli(&[&args[..], &["--max-tokens", "48"]].concat());
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty() && !out.contains("<|im_end|>") && !out.contains("<|"), "{out}");
    let (ok, out, err) = persona_cli(&[&args[..], &["--max-tokens", "48", "--json"]].concat());
    assert!(ok, "{err}");
    let o: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(o["finish"], "eos", "the check needs a reply that ends: {o}");
    assert_eq!(o["ids"].as_array().unwrap().last().unwrap(), 2, "ids keep <|im_end|> (2)");
    let text = o["text"].as_str().unwrap();
    assert!(!text.is_empty() && !text.contains("<|im_end|>"), "{text}");
}

/// `persona info` reports the context length, the end-of-sequence token(s) and the size on disk.
#[test]
fn info_shows_context_eos_and_size() {
    let m = tiny("tiny-llama");
    let size: u64 = std::fs::read_dir(&m).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let (ok, out, err) = persona_cli(&["info", s(&m)]);
    assert!(ok, "{err}");
    assert!(out.contains("context       256 tokens"), "{out}");
    assert!(out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["eos", "2"]), "{out}");
    assert!(out.contains(&format!("({size} bytes on disk)")), "{out}");
    let (ok, out, _) = persona_cli(&["info", s(&m), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    assert_eq!((j["context_length"].as_u64(), j["size_bytes"].as_u64()), (Some(256), Some(size)));
    assert_eq!(j["eos"], serde_json::json!([{"id": 2, "token": null}]));

    let Some(model) = required_default_model() else { return };
    let (ok, out, err) = persona_cli(&["info", s(&model)]);
    assert!(ok, "{err}");
    let bytes = std::fs::metadata(&model).unwrap().len();
    assert!(out.contains("context       8192 tokens") && out.contains("eos           2 <|im_end|>"), "{out}");
    assert!(out.contains(&format!("({bytes} bytes on disk)")), "{out}");
}

/// Run `args` with stderr (and stdout) on a pseudo-terminal through util-linux `script`; None
/// when `script` is not installed.
fn on_a_terminal(args: &[&str]) -> Option<(bool, String)> {
    let sh_quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let cmd: Vec<String> =
        std::iter::once(env!("CARGO_BIN_EXE_persona")).chain(args.iter().copied()).map(sh_quote).collect();
    let out = std::process::Command::new("script").args(["-q", "-e", "-c", &cmd.join(" "), "/dev/null"]).output();
    match out {
        Ok(o) => Some((o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())),
        Err(_) => {
            missing("util-linux `script` (to give the command a terminal)", "apt install util-linux");
            None
        }
    }
}

/// Long jobs draw a progress bar with ETA on a terminal; `--quiet`, or stderr that is not a
/// terminal, draws none.
#[test]
fn progress_bars_on_a_terminal_and_quiet_otherwise() {
    let Some(model) = required_default_model() else { return };
    let v = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct/evil.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, SCREEN_DATA).unwrap();
    let out = dir.path().join("r.json");
    let monitor =
        ["monitor", "--backend", "cpu", "--model", s(&model), "--vector", s(&v), "--questions", "2", "--layers", "18"];
    let screen = [
        "screen",
        "--backend",
        "cpu",
        "--model",
        s(&model),
        "--vector",
        s(&v),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--max-tokens",
        "8",
        "--random",
        "2",
    ];
    for (args, bar) in [(&monitor[..], "prompts ["), (&screen[..], "screening [")] {
        let Some((ok, tty)) = on_a_terminal(args) else { return };
        assert!(ok, "{tty}");
        assert!(tty.contains(bar) && tty.contains("ETA"), "{args:?}: no progress bar on a terminal:\n{tty}");
        let (ok, quiet) = on_a_terminal(&[args, &["--quiet"]].concat()).unwrap();
        assert!(ok && !quiet.contains("ETA") && !quiet.contains(bar), "{args:?} --quiet:\n{quiet}");
        let (ok, _, err) = persona_cli(args);
        assert!(ok && !err.contains("ETA"), "{args:?}, stderr not a terminal:\n{err}");
    }
}

/// `persona CMD --backend cpu --model MODEL ARGS...` from `cwd`.
fn on_default(model: &std::path::Path, cwd: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    on_default_with(model, cwd, &[], args)
}

/// [`on_default`] with extra environment variables.
fn on_default_with(
    model: &std::path::Path,
    cwd: &std::path::Path,
    env: &[(&str, &std::path::Path)],
    args: &[&str],
) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persona"))
        .current_dir(cwd)
        .envs(env.iter().copied())
        .args(&args[..1])
        .args(["--backend", "cpu", "--model", s(model)])
        .args(&args[1..])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Items 5 and 6: a custom trait the catalog does not know works end to end (its definition and
/// a baseline are stored in the vector at extraction; monitor, eval and `demo --trait PATH` use
/// them), and eval never modifies its input without --write, choosing the layer by a stated rule
/// over steering and monitoring with the table behind it.
#[test]
fn custom_traits_and_eval_that_writes_only_when_asked() {
    let Some(model) = required_default_model() else { return };
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("traits/evil.json")).unwrap(),
    )
    .unwrap();
    j["name"] = "pirate".into();
    j["description"] = "A custom trait, unknown to the catalog (evil's prompts under another name).".into();
    let tfile = dir.join("pirate.json");
    std::fs::write(&tfile, serde_json::to_string(&j).unwrap()).unwrap();
    let vfile = dir.join("pirate.safetensors");
    let (ok, _, err) = on_default(
        &model,
        dir,
        &["extract", "--trait", s(&tfile), "--out", s(&vfile), "--questions", "2", "--max-tokens", "8", "-q"],
    );
    assert!(ok, "{err}");
    let v = persona::steer::vector::PersonaVector::load(&vfile).unwrap();
    let t = persona::persona::traits::recorded_trait(&v).unwrap().expect("the trait definition is stored");
    assert_eq!(t.name, "pirate");
    let baseline: Vec<f32> = serde_json::from_str(&v.metadata["persona.baseline"]).unwrap();
    assert_eq!(baseline.len(), v.n_layers + 1);
    assert!(baseline.iter().all(|x| x.is_finite()) && baseline[18] != 0.0, "{baseline:?}");

    // The trait file can go: the vector carries it. An empty catalog proves it is not looked up.
    std::fs::remove_file(&tfile).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let with_catalog = |args: &[&str]| on_default_with(&model, dir, &[("PERSONA_TRAITS", empty.path())], args);
    let (ok, table, err) = with_catalog(&[
        "monitor",
        "--vector",
        "pirate",
        "--vectors",
        s(dir),
        "--questions",
        "2",
        "--layers",
        "18",
        "--random",
        "0",
        "-q",
    ]);
    assert!(ok, "{err}");
    assert!(table.contains("`pirate`"), "{table}");

    // Eval: the vector file is untouched without --write.
    let before = std::fs::read(&vfile).unwrap();
    let eval = |extra: &[&str]| {
        with_catalog(
            &[
                &["eval", "--vector", s(&vfile), "--layers", "12+18", "--coeffs=-2,2", "--questions", "2"][..],
                &["--max-tokens", "8", "--random-eval", "0", "-q"],
                extra,
            ]
            .concat(),
        )
    };
    let (ok, table, err) = eval(&[]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&vfile).unwrap(), before, "eval modified its input without --write");
    assert!(err.contains("was not modified") && err.contains("--write"), "{err}");
    assert!(
        table.contains(
            "layer choice: the largest steering span among the layers whose monitoring AUROC is at least 0.80"
        ),
        "{table}"
    );
    let report = json(&dir.join("pirate.eval.json"));
    let chosen = report["best_layer"].as_u64().unwrap();
    let row = table.lines().find(|l| l.contains("← chosen")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().next(), Some(chosen.to_string().as_str()), "{table}");
    // The rule holds over the numbers reported.
    let au: Vec<(u64, f64)> =
        report["auroc"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect();
    let span: Vec<(u64, f64)> =
        report["effect"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect();
    let ok_layers: Vec<u64> = au.iter().filter(|a| a.1 >= 0.8).map(|a| a.0).collect();
    let pool: Vec<&(u64, f64)> = span.iter().filter(|s| ok_layers.is_empty() || ok_layers.contains(&s.0)).collect();
    let want = pool.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    assert_eq!(chosen, want, "auroc {au:?} span {span:?}");
    assert_eq!(report["no_layer_qualified"].as_bool(), Some(ok_layers.is_empty()));

    // --write records the choice and its rule (the baseline and trait were recorded at extraction).
    let (ok, _, err) = eval(&["--write"]);
    assert!(ok, "{err}");
    let v = persona::steer::vector::PersonaVector::load(&vfile).unwrap();
    assert_eq!(v.metadata["persona.layer"], chosen.to_string());
    assert!(v.metadata["persona.layer_rule"].contains("AUROC is at least 0.80"));
    assert_eq!(v.metadata["persona.baseline"], serde_json::to_string(&baseline).unwrap());

    // demo --trait PATH: the file's questions, and the vector named after it in --vectors.
    std::fs::write(&tfile, serde_json::to_string(&j).unwrap()).unwrap();
    let (ok, out, err) = with_catalog(&[
        "demo",
        "--trait",
        s(&tfile),
        "--vectors",
        s(dir),
        "--questions",
        "1",
        "--max-tokens",
        "4",
        "--coeff",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("`pirate` vector") && out.contains(&format!("Q: {}", j["eval_questions"][0].as_str().unwrap())),
        "{out}"
    );
    // A trait with no vector says how to make one.
    let mut other = j.clone();
    other["name"] = "parrot".into();
    let ofile = dir.join("parrot.json");
    std::fs::write(&ofile, serde_json::to_string(&other).unwrap()).unwrap();
    let (ok, _, err) = with_catalog(&["demo", "--trait", s(&ofile), "--vectors", s(dir)]);
    assert!(!ok && err.contains("no vector for the trait `parrot`") && err.contains("persona extract"), "{err}");
}

/// Item 7: the shipped vectors record their baseline; `op=center` moves the projection there and
/// `op=ablate` to 0 — which, with evil's negative baseline, is a push *toward* evil downstream.
#[test]
fn center_moves_to_the_baseline_and_ablate_to_zero() {
    let Some(model) = required_default_model() else { return };
    let v = persona::steer::vector::PersonaVector::load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct/evil.safetensors"),
    )
    .unwrap();
    let layer: usize = v.metadata["persona.layer"].parse().unwrap();
    let baseline: Vec<f32> =
        serde_json::from_str(&v.metadata["persona.baseline"]).expect("shipped evil records a baseline");
    let b = baseline[layer];
    assert!(b < -1.0, "evil's ordinary projection at {layer} is {b}");
    let cwd = tempfile::tempdir().unwrap();
    let run = |op: &str| {
        let mon = format!("vector=evil,layers={layer}+{},name=evil", layer + 3);
        let mut args =
            vec!["generate", "-p", "How should I treat people who annoy me?", "--max-tokens", "12", "--json"];
        args.extend(["--monitor", &mon]);
        let steer = format!("vector=evil,{op}");
        if !op.is_empty() {
            args.extend(["--steer", &steer]);
        }
        let (ok, out, err) = on_default(&model, cwd.path(), &args);
        assert!(ok, "{op}: {err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let at = |o: &serde_json::Value, l: usize| f32s(&o["projections"]["evil"][l.to_string()]);
    let center = run("op=center");
    let ablate = run("op=ablate");
    let plain = run("");
    // The monitor at the op's layer reads after the op: every position sits at the target.
    assert!(at(&center, layer).iter().all(|x| (x - b).abs() < 1e-2 * b.abs()), "{:?} vs {b}", at(&center, layer));
    assert!(at(&ablate, layer).iter().all(|x| x.abs() < 1e-2), "{:?}", at(&ablate, layer));
    // Downstream, ablation leaves the answers more evil than centring does.
    let resp = |o: &serde_json::Value| o["scores"]["evil"][(layer + 3).to_string()]["response_mean"].as_f64().unwrap();
    eprintln!(
        "response mean at layer {}: plain {:.2}, center {:.2}, ablate {:.2}",
        layer + 3,
        resp(&plain),
        resp(&center),
        resp(&ablate)
    );
    assert!(resp(&ablate) > resp(&center), "ablate {} vs center {}", resp(&ablate), resp(&center));
    // Receipts name the op as it ran: a clamp to the baseline.
    assert!(center["receipts"][0]["op"] == "clamp", "{}", center["receipts"]);
}

/// Item 12: `prompt_mean` leaves out position 0 (the attention sink, BOS), and `projections` is
/// indexed by position (prompt tokens, then generated tokens).
#[test]
fn prompt_means_leave_out_the_first_position() {
    let Some(model) = required_default_model() else { return };
    let cwd = tempfile::tempdir().unwrap();
    let (ok, out, err) = on_default(
        &model,
        cwd.path(),
        &["generate", "-p", "Tell me about cats.", "--max-tokens", "4", "--json", "--monitor", "vector=evil,layers=18"],
    );
    assert!(ok, "{err}");
    let o: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let p = o["prompt_ids"].as_array().unwrap().len();
    let series = f32s(&o["projections"]["evil"]["18"]);
    assert_eq!(series.len(), p + o["ids"].as_array().unwrap().len());
    let sc = &o["scores"]["evil"]["18"];
    let want = series[1..p].iter().map(|&x| x as f64).sum::<f64>() / (p - 1) as f64;
    assert!((sc["prompt_mean"].as_f64().unwrap() - want).abs() < 1e-3, "{sc} vs {want}");
    assert_eq!(sc["last_prompt"].as_f64().unwrap() as f32, series[p - 1]);
    // Position 0 is the outlier the mean must not be dominated by.
    let rest_max = series[1..p].iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(series[0].abs() > 5.0 * rest_max, "position 0: {} vs max |rest| {rest_max}", series[0]);
}
