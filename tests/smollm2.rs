//! SmolLM2-135M-Instruct (the default model, Q4_1 GGUF) against HF transformers goldens:
//! chat-template prompts and ids, greedy ids, top-20 logits, residual norms and vectors;
//! and the same weights written as a safetensors folder give identical logits.
//! Skips (with a message) when the model is not in the cache: `persona fetch` puts it there.

mod common;
use common::*;

use persona::backend::cpu::CpuBackend;
use persona::engine::generate::GenRequest;
use persona::engine::SeqInput;
use persona::model::ModelFiles;
use persona::LoadedModel;

fn model() -> Option<LoadedModel<CpuBackend>> {
    let path = required_default_model()?;
    Some(LoadedModel::load(&path, CpuBackend, 512).unwrap())
}

#[test]
fn chat_template_prompts_and_ids_match() {
    let Some(m) = model() else { return };
    let r = json(&fixtures().join("smollm2_reference.json"));
    for p in r["prompts"].as_array().unwrap() {
        let msgs = messages(p);
        let text = m.apply_chat_template(&msgs, true).unwrap();
        assert_eq!(text, p["prompt"].as_str().unwrap());
        assert_eq!(m.chat_prompt_ids(&msgs).unwrap(), u32s(&p["ids"]));
    }
    for t in r["tokenizer"].as_array().unwrap() {
        let ids = m.encode(t["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(ids, u32s(&t["ids"]), "{}", t["text"]);
        assert_eq!(m.decode(&ids).unwrap(), t["decoded"].as_str().unwrap());
    }
}

#[test]
fn greedy_ids_logits_and_residuals_match() {
    let Some(m) = model() else { return };
    let r = json(&fixtures().join("smollm2_reference.json"));
    let e = &m.engine;
    let h = e.config.hidden;
    for (pi, p) in r["prompts"].as_array().unwrap().iter().enumerate() {
        let ids = u32s(&p["ids"]);
        // Top-20 logits and residuals at the last prompt position.
        let mut cache = e.new_cache(1, ids.len()).unwrap();
        let out = e.forward(&mut cache, &[SeqInput { slot: 0, tokens: &ids, ..Default::default() }], true).unwrap();
        let logits = out.last(0);
        let top = &p["last_logits_top20"];
        let mut max_err = 0f32;
        for (id, want) in u32s(&top["ids"]).iter().zip(f32s(&top["values"])) {
            max_err = max_err.max((logits[*id as usize] - want).abs());
        }
        assert!(max_err <= 2e-3, "prompt {pi}: top-20 logit error {max_err}");
        let last = ids.len() - 1;
        let norms = f32s(&p["residual_norms_last_token"]);
        assert_eq!(norms.len(), e.config.n_layers + 1);
        for (l, want) in norms.iter().enumerate() {
            let v = &out.residuals[l][last * h..(last + 1) * h];
            let got = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
            assert!((got - want).abs() <= 1e-3 * want.max(1.0), "prompt {pi} |h[{l}]| {got} vs {want}");
        }
        for (l, want) in p["residual_last_token"].as_object().unwrap() {
            let l: usize = l.parse().unwrap();
            let v = &out.residuals[l][last * h..(last + 1) * h];
            let err = v.iter().zip(f32s(want)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 2e-3, "prompt {pi} residual[{l}] max error {err}");
        }
        eprintln!("prompt {pi}: top-20 logit max error {max_err:.2e}");

        // Greedy, 24 steps ignoring EOS, up to the first low-margin step; then the natural run
        // (stopping at EOS) agrees with the reference over the steps that have margins.
        let margins = f32s(&p["greedy_24_margins"]);
        let mut req = GenRequest::greedy(ids.clone(), 24);
        req.ignore_eos = true;
        let got24 = m.engine.generate(&[req], &mut |_, _| {}).unwrap().remove(0).ids();
        assert_greedy_prefix(&got24, &u32s(&p["greedy_24_no_eos"]), &margins, 2e-3, &format!("prompt {pi}"));
        let want = u32s(&p["greedy_natural"]);
        let natural = m.engine.generate(&[GenRequest::greedy(ids.clone(), want.len())], &mut |_, _| {}).unwrap();
        let n = want.len().min(margins.len());
        assert_greedy_prefix(&natural[0].ids(), &want[..n], &margins[..n], 2e-3, &format!("prompt {pi} natural"));
        if want.len() <= margins.len() && margins[..want.len()].iter().all(|&x| x > 2e-3) {
            assert_eq!(natural[0].ids(), want, "prompt {pi}: greedy run stopping at EOS");
        }
    }
}

/// Batched generation of all prompts equals generating each alone.
#[test]
fn batch_generation_equals_single() {
    let Some(m) = model() else { return };
    let r = json(&fixtures().join("smollm2_reference.json"));
    let reqs: Vec<GenRequest> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let mut q = GenRequest::greedy(u32s(&p["ids"]), 12);
            q.ignore_eos = true;
            q
        })
        .collect();
    let batch = m.engine.generate(&reqs, &mut |_, _| {}).unwrap();
    for (i, q) in reqs.iter().enumerate() {
        let single = m.engine.generate(std::slice::from_ref(q), &mut |_, _| {}).unwrap();
        assert_eq!(batch[i].ids(), single[0].ids(), "request {i}");
    }
}

/// The GGUF's (dequantized, un-permuted) tensors written as a HF safetensors folder load to the
/// same model: identical logits.
#[test]
fn gguf_and_safetensors_folder_give_identical_logits() {
    let Some(path) = required_default_model() else { return };
    let files = ModelFiles::open(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = &files.config;
    let t = &files.tensors;
    let mut all = vec![&t.embed, &t.final_norm];
    for l in &t.layers {
        all.extend([&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.mlp_norm, &l.w_gate, &l.w_up, &l.w_down]);
    }
    let data: Vec<(String, Vec<usize>, Vec<f32>)> =
        all.iter().map(|x| (x.name.clone(), x.shape.clone(), x.to_f32())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytemuck::cast_slice(d));
            (n.clone(), v.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.path().join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": c.hidden, "intermediate_size": c.intermediate,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "vocab_size": c.vocab, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope.theta,
        "max_position_embeddings": c.max_positions, "tie_word_embeddings": true,
        "bos_token_id": c.bos_id, "eos_token_id": c.eos_ids[0],
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let st = ModelFiles::open(dir.path()).unwrap();
    // One model in two formats: the same fingerprint (the names are the file's and the folder's).
    let (a, b) = (st.config.identity.clone().unwrap(), c.identity.clone().unwrap());
    assert_eq!(a.fingerprint, b.fingerprint, "{a:?} vs {b:?}");
    assert_eq!(
        persona::model::ModelConfig { identity: None, ..st.config.clone() },
        persona::model::ModelConfig { identity: None, ..c.clone() }
    );
    let run = |f: &ModelFiles| {
        let e = persona::Engine::new(CpuBackend, f.config.clone(), &f.tensors, 64).unwrap();
        let mut cache = e.new_cache(1, 64).unwrap();
        let ids = [1u32, 9690, 198, 2683, 359, 253, 5356];
        e.forward(&mut cache, &[SeqInput { slot: 0, tokens: &ids, logits_from: Some(0), ..Default::default() }], false)
            .unwrap()
            .logits
    };
    let (a, b) = (run(&files), run(&st));
    assert!(a == b, "logits differ between GGUF and safetensors");
}

/// The quantized weights kept packed (the CPU decodes a block of rows at a time as it multiplies)
/// give exactly the logits of the same weights widened to f32 at load: the packed kernels are a
/// memory layout, not an approximation.
#[test]
fn packed_weights_equal_widened_weights_bit_for_bit() {
    let Some(path) = required_default_model() else { return };
    let files = ModelFiles::open(&path).unwrap();
    assert!(files.tensors.layers[0].wq.quantized().is_some(), "the Q4_1 file's weights load packed");
    let mut wide = files.tensors.clone();
    let widen = |t: &mut persona::model::tensor::HostTensor| *t = t.widened().into_owned();
    widen(&mut wide.embed);
    for l in &mut wide.layers {
        for t in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
            widen(t);
        }
    }
    let packed = persona::Engine::new(CpuBackend, files.config.clone(), &files.tensors, 64).unwrap();
    let widened = persona::Engine::new(CpuBackend, files.config.clone(), &wide, 64).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 997 + 13) % files.config.vocab as u32).collect();
    let run = |e: &persona::Engine<CpuBackend>| {
        let mut cache = e.new_cache(1, ids.len()).unwrap();
        let mut logits = e
            .forward(&mut cache, &[SeqInput { slot: 0, tokens: &ids[..20], ..Default::default() }], false)
            .unwrap()
            .logits;
        for &id in &ids[20..] {
            logits.extend(
                e.forward(&mut cache, &[SeqInput { slot: 0, tokens: &[id], ..Default::default() }], false)
                    .unwrap()
                    .logits,
            );
        }
        logits
    };
    let (a, b) = (run(&packed), run(&widened));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "packed and widened logits differ");
}

/// Every SIMD level (PERSONA_CPU_SIMD forces the lower ones) gives the same greedy tokens and
/// logits bit for bit: the kernels share one order of arithmetic.
#[test]
fn every_simd_level_gives_identical_output() {
    let Some(path) = required_default_model() else { return };
    let run = |level: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_persona"))
            .args(["generate", "--backend", "cpu", "--model"])
            .arg(&path)
            .args([
                "-p",
                "Name three colours.",
                "--max-tokens",
                "8",
                "--temperature",
                "0",
                "--top-logits",
                "5",
                "--json",
            ])
            .env("PERSONA_CPU_SIMD", level)
            .output()
            .unwrap();
        assert!(out.status.success(), "{level}: {}", String::from_utf8_lossy(&out.stderr));
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // Timings differ run to run; everything else must not.
        for k in ["timing", "timings", "prefill_tok_s", "decode_tok_s", "elapsed_s"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    let best = run("");
    for level in ["portable", "avx2"] {
        assert_eq!(best, run(level), "PERSONA_CPU_SIMD={level} changes the output");
    }
}
