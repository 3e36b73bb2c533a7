//! GGUF reader and GGUF tokenizer against the real default model, SmolLM2-135M-Instruct Q4_1.
//!
//! The model is found through `PERSONA_MODEL_GGUF`, else
//! `$XDG_CACHE_HOME/persona/SmolLM2-135M-Instruct.Q4_1.gguf` (default `~/.cache/persona/...`).
//! When it is absent every test prints SKIPPED (fails under PERSONA_REQUIRE, as in CI). Token ids come from the HF
//! transformers fixtures (`tests/common`: `../shared/fixtures`, else the vendored copy); dequantized values from
//! gguf-py (see `dequantization_matches_gguf_py`).

mod common;

use std::path::PathBuf;

use persona::model::gguf::{GgmlType, GgufFile};
use persona::model::gguf_tokenizer::{gguf_chat_template, tokenizer_from_gguf};
use persona::model::tensor::{Bytes, Storage};

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> Option<PathBuf> {
    let p = common::default_model();
    if p.is_none() {
        common::missing(&format!("the model {MODEL_FILE}"), "set PERSONA_MODEL_GGUF or run `persona fetch`");
    }
    p
}

fn open_model() -> Option<GgufFile> {
    let path = model_path()?;
    Some(GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")))
}

fn fixtures() -> serde_json::Value {
    common::json(&common::fixtures().join("smollm2_reference.json"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn header_metadata_and_every_tensor() {
    let Some(g) = open_model() else { return };
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get_u64("llama.block_count"), Some(30));
    assert_eq!(g.get_u64("llama.embedding_length"), Some(576));
    assert_eq!(g.get_u64("llama.feed_forward_length"), Some(1536));
    assert_eq!(g.get_u64("llama.attention.head_count"), Some(9));
    assert_eq!(g.get_u64("llama.attention.head_count_kv"), Some(3));
    assert_eq!(g.get_u64("llama.vocab_size"), Some(49152));
    assert_eq!(g.get_f64("llama.rope.freq_base"), Some(100000.0));
    let eps = g.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap();
    assert!((eps - 1e-5).abs() < 1e-12, "{eps}");
    assert_eq!(g.get_u64("tokenizer.ggml.eos_token_id"), Some(2));
    assert_eq!(g.get_u64("general.file_type"), Some(3)); // MOSTLY_Q4_1
    assert_eq!(g.metadata().len(), 33);

    // 30 blocks × 9 tensors + token_embd + output_norm (the output projection is tied).
    assert_eq!(g.tensors().len(), 272);
    let count = |t: GgmlType| g.tensors().iter().filter(|i| i.ggml_type == t).count();
    assert_eq!((count(GgmlType::Q4_1), count(GgmlType::F32), count(GgmlType::Q8_0)), (210, 61, 1));

    let shape = |name: &str| g.tensor_info(name).unwrap_or_else(|| panic!("no {name}")).shape();
    assert_eq!(shape("token_embd.weight"), [49152, 576]);
    assert_eq!(g.tensor_info("token_embd.weight").unwrap().dims, [576, 49152]);
    assert_eq!(shape("output_norm.weight"), [576]);
    assert_eq!(shape("blk.0.attn_q.weight"), [576, 576]);
    assert_eq!(shape("blk.0.attn_k.weight"), [192, 576]);
    assert_eq!(shape("blk.0.attn_v.weight"), [192, 576]);
    assert_eq!(shape("blk.29.attn_output.weight"), [576, 576]);
    assert_eq!(shape("blk.29.ffn_gate.weight"), [1536, 576]);
    assert_eq!(shape("blk.29.ffn_up.weight"), [1536, 576]);
    assert_eq!(shape("blk.29.ffn_down.weight"), [576, 1536]);
    assert_eq!(shape("blk.29.ffn_norm.weight"), [576]);
    assert!(g.tensor_info("output.weight").is_none());

    let mut total = 0usize;
    for info in g.tensors() {
        let t = g.tensor(&info.name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.shape, info.shape(), "{}", info.name);
        let v = t.to_f32();
        assert_eq!(v.len(), t.numel(), "{}", info.name);
        assert!(v.iter().all(|x| x.is_finite()), "{} has non-finite values", info.name);
        match info.ggml_type {
            GgmlType::F32 => assert!(matches!(t.storage, Storage::Mapped { .. }), "{}", info.name),
            // Quantized tensors stay packed as stored, a range of the file's map.
            ty => assert!(
                matches!(&t.storage, Storage::Quant { ty: q, bytes: Bytes::Mapped { .. } } if *q == ty),
                "{}",
                info.name
            ),
        }
        total += v.len();
    }
    // 134.5M parameters (embedding counted once).
    assert_eq!(total, 134_515_008);
}

/// (tensor, [(row, column, f32 bits)], sum, sum of squares)
type Case = (&'static str, &'static [(usize, usize, u32)], f64, f64);

/// Reference values from gguf-py 0.19.0 on this very file:
/// ```python
/// r = gguf.GGUFReader(path); t = {t.name: t for t in r.tensors}[name]
/// x = gguf.quants.dequantize(t.data, t.tensor_type)   # numpy, shape in PyTorch order
/// x[i, j].view(np.uint32); x.astype(np.float64).sum(); (x.astype(np.float64) ** 2).sum()
/// ```
#[test]
fn dequantization_matches_gguf_py() {
    let Some(g) = open_model() else { return };
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("blk.0.attn_q.weight", &[
            (0, 0, 0xbdc54000), (0, 1, 0x3e212000), (0, 15, 0x3f09b000), (0, 16, 0xbe648000),
            (0, 31, 0xbdc54000), (0, 32, 0xbeb14000), (1, 0, 0xbdf04000), (575, 575, 0xbe830000),
            (300, 123, 0xbe632000),
        ], 59.22322082519531, 26749.573275085306),
        ("token_embd.weight", &[
            (0, 0, 0xbdda3400), (0, 1, 0x3d071400), (0, 575, 0x3cf3c000), (1, 0, 0xbcc30000),
            (19556, 0, 0xbd51d000), (19556, 100, 0xbda64a00), (49151, 575, 0xbd2ad000),
        ], -15353.04449415207, 520415.71544763993),
        ("blk.29.ffn_down.weight", &[
            (0, 0, 0xbe8bf000), (575, 1535, 0x3d680000), (100, 1000, 0xbd7a8000),
        ], 49.83570861816406, 29667.074891592143),
        ("blk.0.attn_norm.weight", &[(0, 0, 0x3c650000), (0, 575, 0xbd1d0000)],
         0.6129436492919922, 0.9180835409024439),
        ("output_norm.weight", &[(0, 0, 0x3fe10000), (0, 575, 0x3ffe0000)],
         1038.33203125, 1921.7355499267578),
    ];
    for &(name, picks, sum, sumsq) in cases {
        let t = g.tensor(name).unwrap();
        let cols = *t.shape.last().unwrap();
        let x = t.to_f32();
        for &(i, j, bits) in picks {
            let v = x[i * cols + j];
            assert_eq!(v.to_bits(), bits, "{name}[{i},{j}] = {v}, gguf-py {}", f32::from_bits(bits));
        }
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        let s2: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((s - sum).abs() <= 1e-9 * sumsq.max(1.0), "{name}: sum {s} vs {sum}");
        assert!((s2 - sumsq).abs() <= 1e-9 * sumsq, "{name}: sum of squares {s2} vs {sumsq}");
    }
}

#[test]
fn tokenizer_matches_hf_reference() {
    let Some(g) = open_model() else { return };
    let tok = tokenizer_from_gguf(&g).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tok.get_vocab_size(true), 49152);
    let fx = fixtures();
    let cases = fx["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids(), &want[..], "ids of {text:?}");
        let decoded = tok.decode(&want, false).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "decoding of {text:?}");
    }
    for p in fx["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let enc = tok.encode(prompt, false).unwrap();
        assert_eq!(enc.get_ids(), &ids(&p["ids"])[..], "ids of prompt {prompt:?}");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), prompt);
    }
    // tokenizer.ggml.add_bos_token is false: adding special tokens adds nothing.
    let with = tok.encode("Hello, world!", true).unwrap();
    assert_eq!(with.get_ids(), [19556, 28, 905, 17]);
    // Control tokens are special: skipped on request.
    assert_eq!(tok.decode(&[1, 4093, 198, 6004, 2], true).unwrap(), "user\nhi");
}

#[test]
fn chat_template_is_read() {
    let Some(g) = open_model() else { return };
    let t = gguf_chat_template(&g).expect("tokenizer.chat_template");
    assert!(t.contains("<|im_start|>") && t.contains("add_generation_prompt"), "{t}");
}

/// `persona info` reads any GGUF's header, also one persona cannot run (here an architecture it
/// does not know), and says why it cannot run it.
#[test]
fn info_reads_the_header_of_any_gguf() {
    use persona::model::gguf::{write_gguf, GgufValue};
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("other.gguf");
    let meta = vec![
        ("general.architecture".to_string(), GgufValue::Str("gemma3".into())),
        ("general.name".to_string(), GgufValue::Str("Some Other Model".into())),
        ("gemma3.context_length".to_string(), GgufValue::U32(8192)),
    ];
    let w = vec![0.5f32; 8];
    write_gguf(&f, &meta, &[("token_embd.weight".to_string(), vec![2, 4], &w[..])]).unwrap();
    let (ok, out, err) = common::persona_cli(&["info", f.to_str().unwrap(), "--tensors"]);
    assert!(ok, "{err}");
    assert!(out.contains("runnable      no:") && out.contains("gemma3"), "{out}");
    assert!(out.contains("general.name") && out.contains("\"Some Other Model\"") && out.contains("8192"), "{out}");
    assert!(out.contains("token_embd.weight") && out.contains("F32×1"), "{out}");
    let (ok, out, err) = common::persona_cli(&["info", f.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["runnable"].as_bool(), v["architecture"].as_str()), (Some(false), Some("gemma3")));
    // Not a GGUF at all: an error, not a header dump.
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf").unwrap();
    let (ok, _, err) = common::persona_cli(&["info", junk.to_str().unwrap()]);
    assert!(!ok && err.contains("junk.gguf"), "{err}");
}
