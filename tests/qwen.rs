//! Qwen2.5-Coder-0.5B-Instruct, the official Q4_K_M GGUF (`persona fetch qwen2.5-coder-0.5b`):
//! K-quant tensors (Q4_K, Q6_K) beside Q5_0/Q8_0, against HF transformers goldens (the same file
//! dequantized by transformers' GGUF loader, fp32, eager): the chat template's text and ids, the
//! top-20 logits at the last prompt position within 5e-3, and 24 greedy ids up to the first
//! low-margin step. The wgpu backend (lavapipe in CI) runs the first prompt's logits and a few
//! greedy steps. Skips (fails under PERSONA_REQUIRE, as in CI) when the model is not cached.

mod common;
use common::*;

use persona::backend::cpu::CpuBackend;
use persona::backend::Backend;
use persona::engine::generate::GenRequest;
use persona::engine::SeqInput;
use persona::model::Message;
use persona::LoadedModel;

const NAME: &str = "qwen2.5-coder-0.5b";

fn model_path() -> Option<std::path::PathBuf> {
    let p = persona::fetch::cached_named_model(NAME);
    if p.is_none() {
        missing(&format!("the model {NAME}"), &format!("run `persona fetch {NAME}`"));
    }
    p
}

fn reference() -> serde_json::Value {
    json(&fixtures().join("qwen2.5-coder-0.5b_reference.json"))
}

/// The largest |logit − reference| over the reference's top 20 at the last prompt position.
fn top20_error<B: Backend>(m: &LoadedModel<B>, p: &serde_json::Value) -> f32 {
    let ids = u32s(&p["ids"]);
    let mut cache = m.engine.new_cache(1, ids.len()).unwrap();
    let out = m.engine.forward(&mut cache, &[SeqInput { slot: 0, tokens: &ids, ..Default::default() }], false).unwrap();
    let logits = out.last(0);
    let top = &p["last_logits_top20"];
    u32s(&top["ids"])
        .iter()
        .zip(f32s(&top["values"]))
        .map(|(id, want)| (logits[*id as usize] - want).abs())
        .fold(0f32, f32::max)
}

#[test]
fn template_ids_logits_and_greedy_ids_match_transformers() {
    let Some(path) = model_path() else { return };
    let m = LoadedModel::load(&path, CpuBackend, 512).unwrap();
    let r = reference();
    for (pi, p) in r["prompts"].as_array().unwrap().iter().enumerate() {
        let msgs = messages(p);
        assert_eq!(m.apply_chat_template(&msgs, true).unwrap(), p["text"].as_str().unwrap(), "prompt {pi}");
        let ids = u32s(&p["ids"]);
        assert_eq!(m.chat_prompt_ids(&msgs).unwrap(), ids, "prompt {pi}");
        let err = top20_error(&m, p);
        eprintln!("prompt {pi}: top-20 logit max error {err:.2e}");
        assert!(err <= 5e-3, "prompt {pi}: top-20 logit error {err}");
        let mut req = GenRequest::greedy(ids, 24);
        req.ignore_eos = true;
        let got = m.engine.generate(&[req], &mut |_, _| {}).unwrap().remove(0).ids();
        let margins = f32s(&p["greedy_24_margins"]);
        assert_greedy_prefix(&got, &u32s(&p["greedy_24_no_eos"]), &margins, 5e-3, &format!("prompt {pi}"));
    }
}

/// `persona info` names the K-quant types, and the model's name (for vectors/<model name>/).
#[test]
fn info_lists_the_k_quant_types() {
    let Some(path) = model_path() else { return };
    let (ok, out, err) = persona_cli(&["info", path.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "qwen2");
    for t in ["Q4_K", "Q6_K"] {
        assert!(v["dtypes"][t].as_u64().unwrap_or(0) > 0, "{t}: {}", v["dtypes"]);
    }
    assert_eq!(v["name"], "qwen2.5-coder-0.5b-instruct");
    // --model takes the registry name anywhere a path goes.
    let (ok, out, err) = persona_cli(&["info", NAME, "--json"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["size_bytes"], 491_400_064);
}

/// The wgpu backend (lavapipe in CI): the first prompt's top-20 logits and 2 greedy steps.
#[test]
fn wgpu_matches_transformers_on_a_short_run() {
    let b = match persona::backend::wgpu::WgpuBackend::new() {
        Ok(b) => b,
        Err(e) => {
            missing(&format!("a wgpu adapter ({e})"), "on Linux install lavapipe; scripts/test.sh does");
            return;
        }
    };
    let Some(path) = model_path() else { return };
    let t0 = std::time::Instant::now();
    let m = LoadedModel::load(&path, b, 256).unwrap();
    let r = reference();
    let p = &r["prompts"][0];
    let err = top20_error(&m, p);
    eprintln!("wgpu: top-20 logit max error {err:.2e}");
    assert!(err <= 5e-3, "wgpu top-20 logit error {err}");
    let mut req = GenRequest::greedy(u32s(&p["ids"]), 2);
    req.ignore_eos = true;
    let got = m.engine.generate(&[req], &mut |_, _| {}).unwrap().remove(0).ids();
    let margins = f32s(&p["greedy_24_margins"]);
    assert_greedy_prefix(&got, &u32s(&p["greedy_24_no_eos"])[..2], &margins[..2], 5e-3, "wgpu");
    eprintln!("qwen on wgpu: {:.1} s", t0.elapsed().as_secs_f64());
}

/// `persona demo --model qwen2.5-coder-0.5b`: the default trait's vector is found by the model's
/// name (vectors/qwen2.5-coder-0.5b-instruct/evil.safetensors), at its recorded layer, with the
/// trait stored in it.
#[test]
fn demo_runs_on_the_second_model_by_name() {
    let Some(_) = model_path() else { return };
    let cwd = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persona"))
        .current_dir(cwd.path())
        .args(["demo", "--backend", "cpu", "--model", NAME, "--questions", "1", "--max-tokens", "6"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let v = persona::steer::vector::PersonaVector::load(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("vectors/qwen2.5-coder-0.5b-instruct/evil.safetensors"),
    )
    .unwrap();
    let layer = &v.metadata["persona.layer"];
    assert!(stdout.contains(&format!("`evil` vector, layer {layer}")), "{stdout}");
    assert_eq!(stdout.matches("[score").count(), 3, "{stdout}");
}

/// The 1.5B (`persona fetch qwen2.5-coder-1.5b`, 1.1 GB; ~7 GB of f32 weights in memory): loads,
/// and greedy generation batched equals each prompt alone. Ignored by default (slow on 2 cores):
/// `cargo test --release --test qwen -- --ignored`.
#[test]
#[ignore]
fn the_1_5b_model_loads_and_batches_like_single_runs() {
    let Some(path) = persona::fetch::cached_named_model("qwen2.5-coder-1.5b") else {
        missing("the model qwen2.5-coder-1.5b", "run `persona fetch qwen2.5-coder-1.5b`");
        return;
    };
    let m = LoadedModel::load(&path, CpuBackend, 256).unwrap();
    assert_eq!((m.engine.config.n_layers, m.engine.config.hidden), (28, 1536));
    let prompts = ["Write a haiku about Rust.", "What is 2 + 2?"];
    let reqs: Vec<GenRequest> =
        prompts.iter().map(|p| GenRequest::greedy(m.chat_prompt_ids(&[Message::user(*p)]).unwrap(), 8)).collect();
    let batched = m.engine.generate(&reqs, &mut |_, _| {}).unwrap();
    for (r, b) in reqs.iter().zip(&batched) {
        let alone = m.engine.generate(std::slice::from_ref(r), &mut |_, _| {}).unwrap();
        assert_eq!(alone[0].ids(), b.ids());
    }
    let text = m.answer_text(&batched[1]).unwrap();
    assert!(text.contains('4'), "{text}");
}
