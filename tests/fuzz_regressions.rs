//! Inputs the fuzzers (`fuzz/`, run by `scripts/fuzz.sh`) found to panic, hang or exhaust memory,
//! each inlined and now a clear error.

mod common;
use common::fixtures;

use persona::model::{ModelConfig, ModelFiles};
use persona::serve::registry::Registry;
use persona::steer::spec::{Layers, SteerSpec, MAX_LAYER};
use persona::steer::vector::PersonaVector;
use serde_json::json;

/// `spec` target: a layer range up to 777777777777777 (`--steer ...,layers=10777777-777777777777777`,
/// or `"layers": "..."` in a request's steering) was collected into a Vec: the process aborted
/// allocating it. Now indices above MAX_LAYER and lists longer than MAX_LAYER + 1 are errors.
#[test]
fn huge_layer_ranges_are_refused_before_allocating() {
    let e = Layers::parse("10777777-777777777777777").unwrap_err().to_string();
    assert!(e.contains("layer 10777777 is out of range") && e.contains("65536"), "{e}");
    let e = Layers::parse("0-65536+0-65536").unwrap_err().to_string();
    assert!(e.contains("more than 65537 layers listed"), "{e}");
    assert_eq!(Layers::parse(&format!("0-{MAX_LAYER}")).unwrap(), Layers::List((0..=MAX_LAYER).collect()));
    let e = SteerSpec::parse("vector=v,layers=1-18446744073709551615,coeff=1").unwrap_err().to_string();
    assert!(e.contains("--steer") && e.contains("out of range"), "{e}");

    // The server's steering and monitor objects read layer strings with the same parser.
    let cfg = ModelConfig::from_hf_json(&fixtures().join("tiny-llama/config.json")).unwrap();
    let reg = Registry::default();
    let v = PersonaVector::new("v", cfg.n_layers, cfg.hidden, vec![1.0; (cfg.n_layers + 1) * cfg.hidden]).unwrap();
    reg.insert(v);
    for key in ["steering", "monitor"] {
        let mut op = json!({"vector": "v", "layers": "3-99999999999"});
        if key == "steering" {
            op["coeff"] = json!(1);
        }
        let body = json!([op]);
        let (s, m) = if key == "steering" { (Some(&body), None) } else { (None, Some(&body)) };
        let e = persona::serve::registry::resolve(s, m, &reg, &cfg).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("out of range"), "{key}: {}", e.message);
    }
}

/// Found while writing the `gguf` target: a GGUF model without `tokenizer.ggml.tokens` takes
/// its vocabulary size from `token_embd.weight`'s shape, which was indexed without a check: a
/// 0-dimensional `token_embd.weight` panicked. Now it is an error naming the tensor and shape.
#[test]
fn gguf_model_with_scalar_token_embedding_is_an_error() {
    use persona::model::gguf::{write_gguf, GgufValue};
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    let u = |k: &str, v: u32| (format!("llama.{k}"), GgufValue::U32(v));
    let md = vec![
        ("general.architecture".to_string(), GgufValue::Str("llama".into())),
        u("embedding_length", 8),
        u("attention.head_count", 2),
        u("feed_forward_length", 16),
        u("block_count", 1),
    ];
    write_gguf(&p, &md, &[("token_embd.weight".into(), vec![], &[1.0f32][..])]).unwrap();
    let e = match ModelFiles::open(&p) {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("token_embd.weight") && e.contains("shape []") && e.contains("m.gguf"), "{e}");
}

/// A HF model folder (the tiny-llama fixture) with `tokenizer` as its tokenizer.json.
fn open_with_tokenizer(tokenizer: &[u8]) -> persona::Result<ModelFiles> {
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), d.path().join(f)).unwrap();
    }
    std::fs::write(d.path().join("tokenizer.json"), tokenizer).unwrap();
    ModelFiles::open(d.path())
}

/// `hf_config` target: the tokenizers crate panics (`expect("Helper")`) on a JSON syntax error
/// inside `"decoder"`, and (`expect("Precompiled")`) on an invalid Precompiled charsmap; opening
/// such a model folder aborted. Now both are errors naming tokenizer.json.
#[test]
fn malformed_tokenizer_json_is_an_error() {
    for (bad, want) in [
        (&br#"{"version": "1.0", "decoder": tru}"#[..], "not valid JSON"),
        (br#"{"version": "1.0", "decoder": {"type": "ByteLevel", "add_prefix_space": tru}}"#, "not valid JSON"),
        (
            br#"{"version": "1.0", "normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"},
                "model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
            "not a valid tokenizer file",
        ),
        (br#"{"version": "1.0", "model": 3}"#, "tokenizer.json"),
    ] {
        let e = match open_with_tokenizer(bad) {
            Ok(_) => panic!("{} opened", String::from_utf8_lossy(bad)),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("tokenizer.json") && e.contains(want), "{e}");
    }
}
