//! The persona pipelines: extraction from given responses reproduces the HF reference vector;
//! malformed inputs name their line; and on the default model with the shipped vectors,
//! monitoring, steering and screening do what the paper says they do (with margins for noise).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use persona::steer::vector::PersonaVector;

fn persona_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_persona")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct").join(format!("{name}.safetensors"))
}

/// The fixture's (question, enthusiastic answer, flat answer) pairs as a responses JSONL.
fn fixture_responses(path: &Path) {
    let x = &json(&fixtures().join("smollm2_reference.json"))["extraction"];
    let mut s = String::new();
    for p in x["pairs"].as_array().unwrap() {
        for (side, label) in [("pos", "pos"), ("neg", "neg")] {
            s += &serde_json::json!({
                "system": x[format!("{side}_system")], "question": p["question"],
                "answer": p[format!("{side}_answer")], "label": label,
            })
            .to_string();
            s.push('\n');
        }
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn extract_from_responses_reproduces_the_reference_vector() {
    let Some(model) = default_model() else {
        eprintln!("skipping: default model not cached");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let (resp, out) = (d.path().join("r.jsonl"), d.path().join("enthusiasm.safetensors"));
    fixture_responses(&resp);
    let (ok, _, err) = persona_cli(&[
        "extract", "--backend", "cpu", "--model", model.to_str().unwrap(), "--trait", "enthusiasm",
        "--from-responses", resp.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = PersonaVector::load(&out).unwrap();
    let want = PersonaVector::load(fixtures().join("smollm2_extracted_vector.safetensors")).unwrap();
    assert_eq!(got.metadata["persona.method"], "response_avg");
    for l in 0..=want.n_layers {
        let cos = got.cosine(&want, l).unwrap();
        let rel = (got.norm(l) - want.norm(l)).abs() / want.norm(l);
        assert!(cos >= 0.9999 && rel <= 1e-3, "layer {l}: cosine {cos}, relative norm error {rel}");
    }
    let norms: Vec<f32> = serde_json::from_str(&got.metadata["persona.mean_norms"]).unwrap();
    assert_eq!(norms.len(), want.n_layers + 1);
    assert!(norms.iter().all(|&n| n > 0.0));
}

#[test]
fn malformed_pipeline_inputs_name_the_line() {
    let d = tempfile::tempdir().unwrap();
    let m = fixtures().join("tiny-llama");
    let m = m.to_str().unwrap();
    let f = d.path().join("r.jsonl");
    std::fs::write(&f, "{\"question\":\"q\",\"answer\":\"a\",\"label\":\"pos\"}\n{\"question\":\"q\",\"answer\":\"a\"}\n").unwrap();
    let out = d.path().join("v.safetensors");
    let args = ["extract", "--model", m, "--trait", "x", "--from-responses", f.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let (ok, _, err) = persona_cli(&args);
    assert!(!ok && err.contains("line 2") && err.contains("label"), "{err}");
    std::fs::write(&f, "").unwrap();
    let (ok, _, err) = persona_cli(&args);
    assert!(!ok && err.contains("no responses"), "{err}");
    assert!(!out.exists(), "nothing is written on failure");
    let data = d.path().join("data.jsonl");
    let v = fixtures().join("tiny-llama/test_vector.safetensors");
    let screen = |text: &str| {
        std::fs::write(&data, text).unwrap();
        let r = d.path().join("rep.json");
        persona_cli(&["screen", "--model", m, "--vector", v.to_str().unwrap(), "--layer", "2", "--data", data.to_str().unwrap(), "--out", r.to_str().unwrap()])
    };
    let (ok, _, err) = screen("{\"prompt\":\"p\",\"response\":\"r\"}\n{\"prompt\":\"p\"}\n");
    assert!(!ok && err.contains("line 2") && err.contains("response"), "{err}");
    let (ok, _, err) = screen("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n");
    assert!(!ok && err.contains("line 1") && err.contains("assistant"), "{err}");
    let (ok, _, err) = screen("\n\n");
    assert!(!ok && err.contains("no samples"), "{err}");
    let (ok, _, err) = screen("{not json\n");
    assert!(!ok && err.contains("line 1") && err.contains("JSON"), "{err}");
}
