//! `persona finetune` through the CLI against the PyTorch + PEFT goldens (fixtures/grad):
//! `--init-adapter`, `--grads-out`, `train_log.jsonl`, the saved adapter and `generate --adapter`;
//! resume bit for bit; bad input is a clear error with nothing half-written.

mod common;
use common::*;

use std::path::{Path, PathBuf};

const MODELS: [&str; 3] = ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2"];

fn read_f32s(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{k}");
            (k, t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Worst per-tensor NMSE of `got` against `want` (same key set required).
fn worst_nmse(got: &Path, want: &Path) -> f64 {
    let (g, w) = (read_f32s(got), read_f32s(want));
    assert_eq!(g.iter().map(|x| &x.0).collect::<Vec<_>>(), w.iter().map(|x| &x.0).collect::<Vec<_>>());
    g.iter()
        .zip(&w)
        .map(|((_, a), (_, b))| {
            let e: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
            e / b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().max(1e-300)
        })
        .fold(0.0, f64::max)
}

/// The golden batch as an `{"ids","answer_from"}` JSONL file.
fn data_file(dir: &Path, r: &serde_json::Value) -> PathBuf {
    let lines: String = r["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}\n", serde_json::json!({"ids": s["ids"], "answer_from": s["answer_from"]})))
        .collect();
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn log_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

/// Every case of every tiny model: loss, gradients, three AdamW steps, the final adapter, and the
/// logits of `generate --adapter` under it — all through the command line.
#[test]
fn cli_training_matches_peft_goldens() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let model = fixtures().join(name);
        let gdir = fixtures().join("grad").join(name);
        let r = json(&gdir.join("reference.json"));
        let data = data_file(tmp.path(), &r);
        let vector = gdir.join("vector.safetensors");
        let n = r["sequences"].as_array().unwrap().len().to_string();
        for case in r["cases"].as_array().unwrap() {
            let cname = case["case"].as_str().unwrap();
            let what = format!("{name}/{cname}");
            let out = tmp.path().join(format!("{name}-{cname}"));
            let grads = tmp.path().join(format!("{name}-{cname}-grads.safetensors"));
            let mut args: Vec<String> = [
                "finetune",
                "--backend",
                "cpu",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--init-adapter",
                s(&gdir.join("adapter_init")),
                "--lr",
                "1e-2",
                "--schedule",
                "constant",
                "--warmup",
                "0",
                "--steps",
                "3",
                "--batch",
                &n,
                "--no-shuffle",
                "--clip",
                "1.0",
                "--weight-decay",
                "0.01",
                "--grads-out",
                s(&grads),
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            for op in case["ops"].as_array().unwrap() {
                args.push("--steer".into());
                args.push(format!(
                    "vector={},layer={},coeff={},op={}",
                    vector.display(),
                    op["layer"],
                    op["coeff"],
                    op["kind"].as_str().unwrap()
                ));
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, _, err) = persona_cli(&argv);
            assert!(ok, "{what}: finetune failed: {err}");
            let losses = log_losses(&out);
            for (i, (got, want)) in losses.iter().zip(case["adamw_losses"].as_array().unwrap()).enumerate() {
                let want = want.as_f64().unwrap();
                assert!((got - want).abs() / want <= 1e-5, "{what}: step {i} loss {got} vs {want}");
            }
            assert_eq!(losses.len(), 3, "{what}: log lines");
            let g = worst_nmse(&grads, &gdir.join(case["grads_file"].as_str().unwrap()));
            assert!(g <= 1e-8, "{what}: --grads-out NMSE {g:e}");
            let final_dir = gdir.join(case["adapter_final"].as_str().unwrap());
            let f = worst_nmse(&out.join("adapter_model.safetensors"), &final_dir.join("adapter_model.safetensors"));
            assert!(f <= 1e-6, "{what}: final adapter NMSE {f:e}");
            // The saved adapter through `generate --adapter`: last-position top logits vs PEFT's.
            let ids: Vec<String> = r["sequences"][0]["ids"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
            let (ok, stdout, err) = persona_cli(&[
                "generate",
                "--backend",
                "cpu",
                "--model",
                s(&model),
                "--adapter",
                s(&out),
                "--prompt-ids",
                &ids.join(","),
                "--raw",
                "--max-tokens",
                "1",
                "--top-logits",
                "8",
                "--json",
            ]);
            assert!(ok, "{what}: generate --adapter failed: {err}");
            let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
            let want_rows = case["logits_seq0_after_unsteered"].as_array().unwrap();
            let want = f32s(want_rows.last().unwrap());
            for pair in v["steps"][0]["top"].as_array().unwrap() {
                let (id, logit) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
                assert!((logit - want[id]).abs() <= 1e-4, "{what}: logit of {id}: {logit} vs {}", want[id]);
            }
            let run: serde_json::Value = json(&out.join("persona_train.json"));
            assert_eq!(run["status"], "finished", "{what}");
            assert_eq!(run["steering"].as_array().unwrap().len(), case["ops"].as_array().unwrap().len());
            eprintln!("{what}: losses {losses:?}, grads NMSE {g:.1e}, final adapter NMSE {f:.1e}");
        }
    }
}

/// A run stopped after 2 of 4 steps and resumed equals the uninterrupted run bit for bit; a
/// finished run cannot be resumed, nor a folder without a run.
#[test]
fn resume_continues_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-qwen2");
    let gdir = fixtures().join("grad").join("tiny-qwen2");
    let data = data_file(tmp.path(), &json(&gdir.join("reference.json")));
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "finetune",
            "--backend",
            "cpu",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--lora-rank",
            "4",
            "--lr",
            "1e-2",
            "--steps",
            "4",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--seed",
            "7",
        ];
        a.extend_from_slice(extra);
        persona_cli(&a)
    };
    let (full, split) = (tmp.path().join("full"), tmp.path().join("split"));
    assert!(run(&full, &[]).0);
    let (ok, _, err) = run(&split, &["--stop-after", "2"]);
    assert!(ok, "{err}");
    assert!(err.contains("stopped after step 2 of 4"), "{err}");
    assert!(!split.join("adapter_model.safetensors").exists(), "a stopped run wrote a final adapter");
    let (ok, _, err) = run(&split, &[]);
    assert!(!ok && err.contains("--resume"), "rerun without --resume must be refused: {err}");
    let (ok, _, err) = run(&split, &["--resume", s(&split)]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(split.join("adapter_model.safetensors")).unwrap(),
        "resumed adapter differs from the uninterrupted run"
    );
    assert_eq!(log_losses(&full), log_losses(&split));
    let (ok, _, err) = run(&split, &["--resume", s(&split)]);
    assert!(!ok && err.contains("finished"), "{err}");
    let nothing = tmp.path().join("nothing");
    let (ok, _, err) = run(&nothing, &["--resume", s(&nothing)]);
    assert!(!ok && err.contains("no training run"), "{err}");
    // A stopped run resumed with other options is refused, naming what differs.
    let third = tmp.path().join("third");
    assert!(run(&third, &["--stop-after", "1"]).0);
    let (ok, _, err) = run(&third, &["--resume", s(&third), "--accum", "2"]);
    assert!(!ok && err.contains("`accum` differs"), "{err}");
}

/// Bad input: each a clear error, and no adapter or log written.
#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-llama");
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = write("good.jsonl", "{\"ids\":[1,2,3,4],\"answer_from\":2}\n");
    let ft = |data: &Path, out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut a = vec![
            "finetune",
            "--backend",
            "cpu",
            "--model",
            s(&model),
            "--data",
            s(data),
            "--out",
            s(&out),
            "--steps",
            "2",
        ];
        a.extend_from_slice(extra);
        let (ok, _, err) = persona_cli(&a);
        assert!(!ok, "expected failure for {a:?}");
        assert!(!out.join("adapter_model.safetensors").exists(), "{a:?} wrote an adapter");
        err
    };
    let empty = write("empty.jsonl", "\n\n");
    assert!(ft(&empty, "o1", &[]).contains("no training rows"));
    let bad = write("bad.jsonl", "{\"ids\":[1,2,3],\"answer_from\":1}\n{\"ids\":[1,2\n");
    assert!(ft(&bad, "o2", &[]).contains("line 2"));
    let no_answer = write("noans.jsonl", "{\"ids\":[1,2,3],\"answer_from\":3}\n");
    assert!(ft(&no_answer, "o3", &[]).contains("line 1"));
    let err = ft(&good, "o4", &["--targets", "q,bogus"]);
    assert!(err.contains("bogus"), "{err}");
    let other = fixtures().join("grad").join("tiny-qwen2").join("adapter_init");
    let err = ft(&good, "o5", &["--init-adapter", s(&other)]);
    assert!(err.contains("shape") && err.contains("another model"), "{err}");
    let vec = fixtures().join("grad").join("tiny-llama").join("vector.safetensors");
    let err = ft(&good, "o6", &["--steer", &format!("vector={},layer=2,coeff=1,when=self>0.5", vec.display())]);
    assert!(err.contains("when="), "{err}");
    // A learning rate that makes the model diverge: the loss turns non-finite at a later step; the
    // run stops there, says which step, and keeps the last good adapter as a checkpoint.
    let long = write("long.jsonl", &"{\"ids\":[5,9,33,2,7,81,4,4,19],\"answer_from\":3}\n".repeat(4));
    let out = tmp.path().join("nan");
    let (ok, _, err) = persona_cli(&[
        "finetune",
        "--backend",
        "cpu",
        "--model",
        s(&model),
        "--data",
        s(&long),
        "--out",
        s(&out),
        "--steps",
        "20",
        "--lr",
        "1e30",
        "--warmup",
        "0",
        "--schedule",
        "constant",
        "--clip",
        "0",
    ]);
    assert!(!ok, "a diverging run must fail");
    // The forward pass stops on non-finite logits, naming the block where they appeared (the
    // adapter's hook runs in the diagnostic pass too); a non-finite loss says `not finite`.
    assert!(
        (err.contains("non-finite values: ") && err.contains("after block")) || err.contains("not finite"),
        "{err}"
    );
    assert!(err.contains("step"), "{err}");
    if !err.contains("step 1:") {
        assert!(out.join("checkpoint").join("adapter_model.safetensors").exists(), "{err}");
    }
    assert!(!out.join("adapter_model.safetensors").exists());
}

/// Ctrl-C (SIGINT) during training: the step in flight finishes, a checkpoint is written, the
/// process exits 130 saying how to continue, and `--resume DIR` finishes the run.
#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_resumes() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-llama");
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"ids\":[5,9,33,2,7,81,4,4,19],\"answer_from\":3}\n".repeat(3)).unwrap();
    let out = tmp.path().join("run");
    let args = [
        "finetune",
        "--backend",
        "cpu",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "1000000",
        "--json",
    ];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("\"step\":1"), "{first}");
    // SAFETY: sends SIGINT to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    for _ in lines {}
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted after step") && err.contains("--resume"), "{err}");
    let state = json(&out.join("checkpoint").join("trainer_state.json"));
    let done = state["step"].as_u64().unwrap();
    assert!(done >= 1);
    // The same options resume it.
    let resumed = persona_cli(&[
        "finetune",
        "--backend",
        "cpu",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--resume",
        s(&out),
        "--steps",
        "1000000",
        "--stop-after",
        "2",
    ]);
    assert!(resumed.0, "{}", resumed.2);
    assert!(resumed.2.contains(&format!("resuming at step {done}")), "{}", resumed.2);
    let state = json(&out.join("checkpoint").join("trainer_state.json"));
    assert_eq!(state["step"].as_u64().unwrap(), done + 2);
}

/// `--random-control SEED`: each steering vector becomes a random direction of the same norm,
/// recorded in persona_train.json, and the run differs from the real vector's.
#[test]
fn random_control_is_norm_matched_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-llama");
    let gdir = fixtures().join("grad").join("tiny-llama");
    let data = data_file(tmp.path(), &json(&gdir.join("reference.json")));
    let spec = format!("vector={},layer=2,coeff=3", gdir.join("vector.safetensors").display());
    let run = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut a = vec![
            "finetune",
            "--backend",
            "cpu",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "2",
            "--lr",
            "1e-2",
            "--steer",
            &spec,
        ];
        a.extend_from_slice(extra);
        let (ok, _, err) = persona_cli(&a);
        assert!(ok, "{err}");
        (json(&out.join("persona_train.json")), log_losses(&out))
    };
    let (real, real_losses) = run("real", &[]);
    let (ctl, ctl_losses) = run("control", &["--random-control", "5"]);
    let (ctl2, _) = run("control2", &["--random-control", "5"]);
    let (r, c) = (&real["steering"][0], &ctl["steering"][0]);
    assert_eq!(ctl["random_control"], 5);
    assert!((r["norm"].as_f64().unwrap() - c["norm"].as_f64().unwrap()).abs() < 1e-4 * r["norm"].as_f64().unwrap());
    assert_ne!(r["vector_sha256"], c["vector_sha256"], "the control used the real vector");
    assert_eq!(c["vector_sha256"], ctl2["steering"][0]["vector_sha256"], "the control is not seeded");
    assert_ne!(real_losses, ctl_losses);
}
