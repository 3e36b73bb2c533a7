//! PEFT LoRA adapters (`--adapter DIR`): the trained adapters of the grad goldens
//! (../shared/fixtures/grad, PyTorch + PEFT in float64) merged into the tiny models reproduce
//! PEFT's logits, through the library and through `persona generate`; PEFT's own adapter files
//! round-trip exactly; an adapter for another model is refused by name.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use persona::backend::cpu::CpuBackend;
use persona::engine::SeqInput;
use persona::model::lora::{peft_keys, LoraAdapter, Target};
use persona::model::ModelFiles;
use persona::LoadedModel;

const MODELS: [&str; 3] = ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2"];

fn grad_dir(model: &str) -> PathBuf {
    fixtures().join("grad").join(model)
}

/// Logits `[T][vocab]` of `ids` (every position) from a model with an optional adapter.
fn all_logits(model: &str, adapter: Option<&Path>, ids: &[u32]) -> Vec<Vec<f32>> {
    let m = LoadedModel::load_with_adapter(&fixtures().join(model), adapter, CpuBackend, 64).unwrap();
    let mut cache = m.engine.new_cache(1, ids.len()).unwrap();
    let out = m
        .engine
        .forward(&mut cache, &[SeqInput { slot: 0, tokens: ids, logits_from: Some(0), ..Default::default() }], false)
        .unwrap();
    (0..ids.len()).map(|t| out.row(t).to_vec()).collect()
}

fn max_abs_diff(got: &[Vec<f32>], want: &serde_json::Value) -> f32 {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let mut err = 0f32;
    for (g, w) in got.iter().zip(want) {
        let w = f32s(w);
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(&w) {
            err = err.max((a - b).abs());
        }
    }
    err
}

#[test]
fn trained_adapters_reproduce_peft_logits() {
    for model in MODELS {
        let r = json(&grad_dir(model).join("reference.json"));
        let ids = u32s(&r["sequences"][0]["ids"]);
        let base = all_logits(model, None, &ids);
        for case in r["cases"].as_array().unwrap() {
            let name = case["case"].as_str().unwrap();
            let dir = grad_dir(model).join(case["adapter_final"].as_str().unwrap());
            let want = &case["logits_seq0_after_unsteered"];
            let err = max_abs_diff(&all_logits(model, Some(&dir), &ids), want);
            // Without the adapter the logits are far off: the comparison can see the adapter.
            let base_err = max_abs_diff(&base, want);
            eprintln!("{model} {name}: max |logit diff| {err:.2e} (without the adapter {base_err:.2e})");
            assert!(err <= 1e-4, "{model} {name}: max |logit diff| {err}");
            assert!(base_err > 1e-2, "{model} {name}: the adapter barely changes the logits ({base_err})");
        }
    }
}

/// `persona generate` with `--adapter`: top logits of the last prompt position.
fn cli_top_logits(model: &str, adapter: &Path, ids: &[u32]) -> Result<Vec<(u32, f32)>, String> {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let (m, a) = (fixtures().join(model), adapter.to_path_buf());
    let (ok, out, err) = persona_cli(&[
        "generate",
        "--backend",
        "cpu",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--raw",
        "--max-tokens",
        "1",
        "--top-logits",
        "5",
        "--json",
    ]);
    if !ok {
        return Err(err);
    }
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let top = v["steps"][0]["top"].as_array().unwrap();
    Ok(top.iter().map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32)).collect())
}

#[test]
fn cli_adapter_flag_matches_peft_top_logits() {
    for model in MODELS {
        let r = json(&grad_dir(model).join("reference.json"));
        let ids = u32s(&r["sequences"][0]["ids"]);
        for case in r["cases"].as_array().unwrap() {
            let name = case["case"].as_str().unwrap();
            let dir = grad_dir(model).join(case["adapter_final"].as_str().unwrap());
            let want = f32s(&case["logits_seq0_after_unsteered"][ids.len() - 1]);
            let got = cli_top_logits(model, &dir, &ids).unwrap_or_else(|e| panic!("{model} {name}: {e}"));
            assert_eq!(got.len(), 5);
            let mut err = 0f32;
            for &(id, l) in &got {
                err = err.max((l - want[id as usize]).abs());
            }
            assert!(err <= 1e-4, "{model} {name}: top logits {got:?} differ by {err}");
            // The same five ids as the reference, unless the reference's 5th and 6th nearly tie.
            let mut order: Vec<usize> = (0..want.len()).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
            if want[order[4]] - want[order[5]] > 1e-3 {
                let mut g: Vec<usize> = got.iter().map(|p| p.0 as usize).collect();
                g.sort();
                let mut w = order[..5].to_vec();
                w.sort();
                assert_eq!(g, w, "{model} {name}: top-5 ids");
            }
            eprintln!("{model} {name}: CLI top-5 max |logit diff| {err:.2e}");
        }
    }
}

#[test]
fn cli_refuses_an_adapter_for_another_model() {
    let llama_adapter = grad_dir("tiny-llama").join("adapter_final_plain");
    let e = cli_top_logits("tiny-qwen2", &llama_adapter, &[1, 2, 3]).unwrap_err();
    assert!(e.contains("base_model.model.model.layers.0.") && e.contains("lora_"), "{e}");
    assert!(e.contains("shape") && e.contains("another model"), "{e}");
    assert!(e.contains("adapter_model.safetensors"), "{e}");

    // An adapter missing its last layer names the first missing key.
    let cfg = ModelFiles::open(&fixtures().join("tiny-llama")).unwrap().config;
    let mut a = LoraAdapter::load(&llama_adapter, &cfg).unwrap();
    a.layers.pop();
    let d = tempfile::tempdir().unwrap();
    a.save(d.path(), "tiny-llama").unwrap();
    let e = cli_top_logits("tiny-llama", d.path(), &[1, 2, 3]).unwrap_err();
    let (ka, _) = peft_keys(2, Target::Q);
    assert!(e.contains(&ka) && e.contains("missing"), "{e}");

    // A folder that is not an adapter names the file.
    let e = cli_top_logits("tiny-llama", &fixtures().join("tiny-llama"), &[1, 2, 3]).unwrap_err();
    assert!(e.contains("adapter_config.json"), "{e}");
}

/// (key, shape, f32 data) of every tensor of a safetensors file, read with the safetensors crate.
fn raw_tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{k}");
            (k, t.shape().to_vec(), t.data().to_vec())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn peft_adapter_round_trips_bit_exactly() {
    for model in MODELS {
        let cfg = ModelFiles::open(&fixtures().join(model)).unwrap().config;
        let init = grad_dir(model).join("adapter_init");
        let a = LoraAdapter::load(&init, &cfg).unwrap();
        assert_eq!(a.config.r, 4);
        assert_eq!(a.config.targets, Target::ALL);
        assert_eq!(a.config.scale(), 4.0);
        let d = tempfile::tempdir().unwrap();
        a.save(d.path(), model).unwrap();
        let b = LoraAdapter::load(d.path(), &cfg).unwrap();
        assert_eq!(a, b, "{model}");
        // Same keys, shapes and bytes as PEFT's own file.
        let (orig, ours) = (
            raw_tensors(&init.join("adapter_model.safetensors")),
            raw_tensors(&d.path().join("adapter_model.safetensors")),
        );
        assert_eq!(orig.len(), 7 * 2 * cfg.n_layers);
        assert!(orig == ours, "{model}: saved tensors differ from PEFT's");
        let c = json(&d.path().join("adapter_config.json"));
        assert_eq!(c["peft_type"], "LORA");
        assert_eq!(c["r"], 4);
        assert_eq!(c["lora_alpha"], 8);
        assert_eq!(c["use_rslora"], true);
        assert_eq!(c["base_model_name_or_path"], model);
    }
}
