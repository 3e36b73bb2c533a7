//! Integrity (issue 16): steering receipts counted by the kernel, and the NaN/Inf guard that
//! stops generation naming the block where non-finite values first appear.

mod common;
use common::*;

use std::sync::Arc;

use persona::backend::cpu::CpuBackend;
use persona::engine::generate::GenRequest;
use persona::engine::SeqInput;
use persona::steer::spec::{resolve, MonitorSpec, SteerSpec};
use persona::LoadedModel;

fn smollm2() -> Option<LoadedModel<CpuBackend>> {
    let path = required_default_model()?;
    Some(LoadedModel::load(&path, CpuBackend, 512).unwrap())
}

fn vector(name: &str) -> String {
    format!("{}/vectors/smollm2-135m-instruct/{name}.safetensors", env!("CARGO_MANIFEST_DIR"))
}

/// The receipts say exactly which tokens each op touched: checked against the positions rules
/// (counted by hand from the prompt and answer lengths) and, for a condition, against an
/// independent monitor of the same projection without steering.
#[test]
fn receipts_count_the_tokens_each_op_touched() {
    let Some(m) = smollm2() else { return };
    let cfg = &m.engine.config;
    let ids = m.encode("The quick brown fox jumps over the lazy dog. Tell me about your day.", true).unwrap();
    let (p, g) = (ids.len(), 6);
    let evil = vector("evil");
    let steer: Vec<SteerSpec> = [
        format!("vector={evil},layer=12,coeff=2,positions=all"),
        format!("vector={evil},layers=10-11,coeff=1,positions=prompt"),
        format!("vector={evil},layer=14,op=ablate,positions=response"),
    ]
    .iter()
    .map(|s| SteerSpec::parse(s).unwrap())
    .collect();
    let st = resolve(&steer, &[], cfg, &mut vec![]).unwrap();
    let mut req = GenRequest::greedy(ids.clone(), g);
    req.ignore_eos = true;
    req.steering = Some(Arc::new(st));
    let out = m.engine.generate(&[req], &mut |_, _| {}).unwrap().remove(0);
    let r = &out.receipts;
    assert_eq!(r.len(), 3, "{r:?}");
    // Without a monitor the last generated token is never fed back: P + G − 1 positions ran.
    assert_eq!((r[0].op, r[0].layers.clone(), r[0].tokens, r[0].fired), ("add", vec![12], (p + g - 1) as u64, None));
    assert_eq!((r[1].layers.clone(), r[1].tokens, r[1].positions), (vec![10, 11], p as u64, "prompt"));
    // positions=response: the last prompt token, then each generated token fed back.
    assert_eq!((r[2].op, r[2].tokens), ("ablate", g as u64));
    let sha = persona::steer::vector::PersonaVector::load(&evil).unwrap().sha256();
    assert!(r.iter().all(|x| x.vector == "evil" && x.sha256 == sha), "{r:?}");
    assert_eq!(sha.len(), 64);

    // A condition at layer 8 on an op at layer 12: the projection at 8 is not moved by the op, so
    // a plain monitor at 8 predicts exactly which tokens fire.
    let mon = [MonitorSpec::parse(&format!("vector={evil},layer=8,name=e8")).unwrap()];
    let plain = resolve(&[], &mon, cfg, &mut vec![]).unwrap();
    let project = |st: &persona::steer::SeqSteering| {
        let mut c = m.engine.new_cache(1, p).unwrap();
        let input = SeqInput { slot: 0, tokens: &ids, prompt: true, steering: Some(st), ..Default::default() };
        m.engine.forward(&mut c, &[input], false).unwrap()
    };
    let proj = project(&plain).projections.remove(0);
    let mut sorted = proj.clone();
    sorted.sort_by(f32::total_cmp);
    let tau = sorted[p / 2];
    let want = proj.iter().filter(|&&x| x > tau).count() as u64;
    assert!(want > 0 && want < p as u64, "threshold {tau} splits the prompt: {proj:?}");
    let cond = [SteerSpec::parse(&format!("vector={evil},layer=12,coeff=3,when=e8@8:gt:{tau}")).unwrap()];
    let st = resolve(&cond, &mon, cfg, &mut vec![]).unwrap();
    let fwd = project(&st);
    let receipts = st.receipts(&fwd.op_counts[0]);
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].tokens, p as u64);
    assert_eq!(receipts[0].fired, Some(want), "the condition fired on the tokens the monitor predicts");
    assert_eq!(receipts[0].when.as_deref(), Some(format!("e8@8:gt:{tau}").as_str()));

    // The CLI reports them in --json beside the projections, and on stderr as text.
    let prompt = "Hello there";
    let (ok, out, err) = persona_cli(&[
        "generate",
        "--json",
        "--prompt",
        prompt,
        "--max-tokens",
        "3",
        "--steer",
        &format!("vector={evil},layer=12,coeff=4,positions=prompt"),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let rec = &v["receipts"][0];
    assert_eq!(rec["tokens"].as_u64(), Some(v["prompt_ids"].as_array().unwrap().len() as u64), "{v}");
    assert_eq!(
        (rec["op"].as_str(), rec["vector"].as_str(), rec["sha256"].as_str()),
        (Some("add"), Some("evil"), Some(sha.as_str()))
    );
    let (ok, _, err) = persona_cli(&[
        "generate",
        "--prompt",
        prompt,
        "--max-tokens",
        "3",
        "--steer",
        &format!("vector={evil},layer=12,coeff=4"),
    ]);
    assert!(ok && err.contains("[steer evil add 4 at layer 12 (positions all): "), "{err}");
}

/// Corrupted weights (bytes overwritten inside a tensor's data) stop generation with an error
/// naming the block, and a non-zero exit; so does a steering coefficient that overflows.
#[test]
fn corrupt_weights_and_overflowing_steering_stop_with_the_block() {
    let Some(path) = required_default_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("corrupt.gguf");
    poison(&path, &bad, "blk.5.ffn_down.weight");
    let (ok, out, err) =
        persona_cli(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "Hello", "--max-tokens", "4"]);
    assert!(!ok, "corrupt weights must fail: {out}");
    assert!(err.contains("non-finite values") && err.contains("after block 5 (residual index 6)"), "{err}");
    assert!(out.trim().is_empty(), "no text from NaN logits: {out}");

    let steer = |spec: String| persona_cli(&["generate", "--prompt", "Hello", "--max-tokens", "4", "--steer", &spec]);
    // A coefficient beyond 1e4 is refused before anything runs (the same limit as the server's).
    let (ok, _, err) = steer(format!("vector={},layer=12,coeff=3e38", vector("evil")));
    assert!(!ok && err.contains("`coeff` must be a finite number with magnitude at most 10000"), "{err}");
    // A vector of huge values times an accepted coefficient overflows inside the forward pass.
    let huge = dir.path().join("huge.safetensors");
    persona::steer::vector::PersonaVector::load(vector("evil")).unwrap().scaled(1e35).save(&huge).unwrap();
    let (ok, _, err) = steer(format!("vector={},layer=12,coeff=1e4", huge.display()));
    assert!(!ok && err.contains("non-finite values") && err.contains("after block 11 (residual index 12)"), "{err}");
}

/// A copy of a shipped vector that says it was made from another model of the same shape.
fn foreign_copy(dir: &std::path::Path, fingerprint: Option<&str>) -> std::path::PathBuf {
    let mut v = persona::steer::vector::PersonaVector::load(vector("evil")).unwrap();
    v.metadata.insert("persona.model".into(), "Other-Model-135M".into());
    match fingerprint {
        Some(f) => v.metadata.insert(persona::steer::vector::FINGERPRINT_KEY.into(), f.into()),
        None => v.metadata.remove(persona::steer::vector::FINGERPRINT_KEY),
    };
    let p = dir.join(format!("evil-{}.safetensors", fingerprint.unwrap_or("none")));
    v.save(&p).unwrap();
    p
}

/// Model identity: the shipped vectors record the default model's fingerprint; a vector from
/// another model of the same shape is refused naming both models (used with `--force`, with a
/// warning), and one recording no fingerprint is used with a warning.
#[test]
fn vectors_from_another_model_are_refused() {
    let Some(m) = smollm2() else { return };
    let id = m.engine.config.identity.clone().expect("ModelFiles::open records the identity");
    assert_eq!(id.name, "SmolLM2-135M-Instruct");
    assert!(id.fingerprint.starts_with("llama-N30-H576-"), "{}", id.fingerprint);
    for name in ["evil", "sycophantic", "hallucinating", "apathetic", "humorous", "impolite", "optimistic"] {
        let v = persona::steer::vector::PersonaVector::load_for_model(vector(name), &m.engine.config).unwrap();
        assert_eq!(v.check_identity(&m.engine.config).unwrap(), None, "{name} records this model");
    }
    let dir = tempfile::tempdir().unwrap();
    let foreign = foreign_copy(dir.path(), Some("llama-N30-H576-00000000deadbeef"));
    let spec = format!("vector={},layer=12,coeff=2", foreign.display());
    let args = ["generate", "--prompt", "Hi", "--max-tokens", "2", "--steer", &spec];
    let (ok, _, err) = persona_cli(&args);
    assert!(!ok, "a foreign vector must be refused");
    for part in ["Other-Model-135M", "SmolLM2-135M-Instruct", "00000000deadbeef", &id.fingerprint, "--force"] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    let (ok, _, err) = persona_cli(&[&args[..], &["--force"]].concat());
    assert!(ok && err.contains("warning:") && err.contains("used anyway (--force)"), "{err}");
    // Monitoring with it is refused too (every path loads vectors through load_for_model).
    let mon = format!("vector={},layer=12", foreign.display());
    let (ok, _, err) = persona_cli(&["generate", "--prompt", "Hi", "--max-tokens", "2", "--monitor", &mon]);
    assert!(!ok && err.contains("Other-Model-135M"), "{err}");

    let unrecorded = foreign_copy(dir.path(), None);
    let spec = format!("vector={},layer=12,coeff=2", unrecorded.display());
    let (ok, _, err) = persona_cli(&["generate", "--prompt", "Hi", "--max-tokens", "2", "--steer", &spec]);
    assert!(ok && err.contains("records no model fingerprint"), "{err}");
}
