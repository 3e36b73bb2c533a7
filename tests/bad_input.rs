//! Malformed model files and bad requests: each is an error that names the problem, never a panic.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

use persona::model::ModelFiles;

fn copy_fixture(name: &str, to: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join(name).join(f), to.join(f)).unwrap();
    }
}

fn open_err(dir: &Path) -> String {
    match ModelFiles::open(dir) {
        Ok(_) => panic!("{} opened but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture("tiny-llama", d.path());
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn oversized_safetensors_header() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture("tiny-llama", d.path());
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("header"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture("tiny-llama", d.path());
    // Declare 4 layers where the file has 3.
    let c = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(d.path().join("config.json"), c.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4"))
        .unwrap();
    let e = open_err(d.path());
    assert!(e.contains("model.layers.3.input_layernorm.weight"), "{e}");
}

#[test]
fn config_missing_field_and_unknown_arch() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture("tiny-llama", d.path());
    let c = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(d.path().join("config.json"), c.replace("\"intermediate_size\": 160,", "")).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("config.json") && e.contains("intermediate_size"), "{e}");
    std::fs::write(d.path().join("config.json"), c.replace("LlamaForCausalLM", "FalconForCausalLM")).unwrap();
    let e = open_err(d.path());
    assert!(e.contains("FalconForCausalLM"), "{e}");
    std::fs::write(d.path().join("config.json"), "{not json").unwrap();
    let e = open_err(d.path());
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn gguf_bad_magic_absurd_counts_and_offsets() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    std::fs::write(&p, b"GGMLxxxxxxxxxxxxxxxxxxxxxxxx").unwrap();
    let e = ModelFiles::open(&p).err().unwrap().to_string();
    assert!(e.contains("magic"), "{e}");
    // Valid magic and version 3, then a tensor count of 2^60.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    b.extend(0u64.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = ModelFiles::open(&p).err().unwrap().to_string();
    assert!(e.contains("tensor count"), "{e}");
    // A real writer's file whose tensor data lies past the end.
    let data = vec![1f32; 64];
    persona::model::gguf::write_gguf(&p, &[], &[("t".to_string(), vec![8, 8], &data)]).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(bytes.len() - 16);
    std::fs::write(&p, &bytes).unwrap();
    let e = ModelFiles::open(&p).err().unwrap().to_string();
    assert!(e.contains("past the end"), "{e}");
}

fn persona(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_persona")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn cli_rejects_bad_requests() {
    let m = fixtures().join("tiny-llama");
    let m = m.to_str().unwrap();
    let (ok, err) = persona(&["generate", "--model", m, "--prompt-ids", "1,2,999"]);
    assert!(!ok && err.contains("out of vocabulary"), "{err}");
    let (ok, err) = persona(&["generate", "--model", m, "--prompt-ids", "1,2", "--max-tokens", "0"]);
    assert!(!ok && err.contains("--max-tokens"), "{err}");
    let (ok, err) = persona(&["generate", "--model", m, "--prompt-ids", "1,two"]);
    assert!(!ok && err.contains("`two`"), "{err}");
    let (ok, err) = persona(&["generate", "--model", m, "--prompt", "hi"]);
    assert!(!ok && err.contains("no tokenizer"), "{err}");
    let (ok, err) = persona(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!ok && err.contains("/nonexistent/model"), "{err}");
    let (ok, err) = persona(&["generate", "--model", m, "--prompt-ids", "1", "--top-p", "0"]);
    assert!(!ok && err.contains("top-p"), "{err}");
    // 8-bit activations: only the CPU backend has them, training never runs them, and a bad
    // value is named.
    let (ok, err) =
        persona(&["generate", "--model", m, "--prompt-ids", "1", "--backend", "wgpu", "--cpu-activations", "q8"]);
    assert!(!ok && err.contains("applies to the CPU backend only"), "{err}");
    let (ok, err) = persona(&["generate", "--model", m, "--prompt-ids", "1", "--cpu-activations", "q9"]);
    assert!(!ok && err.contains("q9"), "{err}");
    let (ok, err) = persona(&["finetune", "--model", m, "--data", "x.jsonl", "--out", "o", "--cpu-activations", "q8"]);
    assert!(!ok && err.contains("training widens the weights"), "{err}");
    let (ok, err) =
        persona(&["generate", "--model", m, "--prompt-ids", "1,2", "--backend", "cpu", "--cpu-activations", "q8"]);
    assert!(ok, "{err}");
}

#[test]
fn cli_json_output_shape() {
    let m = fixtures().join("tiny-llama");
    let r = json(&m.join("reference.json"));
    let ids: Vec<String> = u32s(&r["ids"]).iter().map(|i| i.to_string()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["generate", "--model", m.to_str().unwrap(), "--prompt-ids", &ids.join(","), "--max-tokens", "4"])
        .args(["--ignore-eos", "--top-logits", "3", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = u32s(&r["greedy_16_no_eos"]);
    assert_eq!(u32s(&v["ids"]), want[..4]);
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    let top = steps[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!(top[0][0].as_u64().unwrap() as u32, want[0]);
    // Highest first, and the reference logit of the chosen token.
    assert!(top[0][1].as_f64().unwrap() >= top[1][1].as_f64().unwrap());
    let last = r["logits"].as_array().unwrap().last().unwrap();
    let want_logit = last[want[0] as usize].as_f64().unwrap();
    assert!((top[0][1].as_f64().unwrap() - want_logit).abs() < 1e-4);
    assert!(v["timing"]["decode_tokens_per_s"].as_f64().is_some());
}
