//! Inputs the fuzzers (`fuzz/`, run by `scripts/fuzz.sh`) found to panic, hang or exhaust memory,
//! each inlined and now a clear error; and the generator of the committed seed corpora
//! (`fuzz/seeds/<target>/`), run by hand after a format change:
//! `cargo test --release --test fuzz_regressions -- --ignored write_fuzz_seeds`.

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

/// Seed corpora for the fuzz targets: small valid (and a few nearly valid) inputs of every format,
/// made with the library's own writers where it has them.
mod seeds {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use half::{bf16, f16};
    use persona::model::gguf::GgufValue;
    use persona::model::lora::{LoraAdapter, LoraConfig, Target};
    use persona::model::ModelConfig;
    use persona::steer::vector::PersonaVector;
    use serde_json::json;

    use super::common::fixtures;

    /// Separates the files of a multi-file input (`fuzz/src/lib.rs` splits on it).
    pub const SEP: &[u8] = b"\x00PART\x00";

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// xorshift64 bytes (deterministic seeds).
    struct Rand(u64);
    impl Rand {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        /// Uniform in [-a, a).
        fn f32(&mut self, a: f32) -> f32 {
            ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        }
    }

    // ---- GGUF encoding (any value type, any tensor type) ----

    const T_U8: u32 = 0;
    const T_STR: u32 = 8;
    const T_ARRAY: u32 = 9;

    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::Str(_) => T_STR,
            GgufValue::Array(_) => T_ARRAY,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }

    fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => b.push(*x),
            GgufValue::I8(x) => b.push(*x as u8),
            GgufValue::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => b.push(*x as u8),
            GgufValue::Str(s) => put_str(b, s),
            GgufValue::Array(a) => {
                b.extend_from_slice(&a.first().map_or(T_U8, type_id).to_le_bytes());
                b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(b, x);
                }
            }
        }
    }

    /// A tensor: name, ggml dims (innermost first), ggml type id, raw bytes.
    type Raw = (String, Vec<u64>, u32, Vec<u8>);

    fn gguf(md: &[(String, GgufValue)], tensors: &[Raw]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(md.len() as u64).to_le_bytes());
        for (k, v) in md {
            put_str(&mut b, k);
            b.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut off = 0u64;
        let mut offs = vec![];
        for (name, dims, ty, data) in tensors {
            put_str(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
            offs.push(off);
            off = (off + data.len() as u64).div_ceil(32) * 32;
        }
        let start = b.len().div_ceil(32) * 32;
        for ((_, _, _, data), o) in tensors.iter().zip(offs) {
            b.resize(start + o as usize, 0);
            b.extend_from_slice(data);
        }
        b
    }

    // ggml type ids.
    const F32: u32 = 0;
    const F16: u32 = 1;
    const Q4_0: u32 = 2;
    const Q4_1: u32 = 3;
    const Q5_0: u32 = 6;
    const Q5_1: u32 = 7;
    const Q8_0: u32 = 8;
    const BF16: u32 = 30;

    /// A tensor of PyTorch-order `shape` and ggml type `ty`: small values; for block types,
    /// small finite scales and random quants.
    fn tensor(r: &mut Rand, name: &str, shape: &[u64], ty: u32) -> Raw {
        let n = shape.iter().product::<u64>() as usize;
        let d = f16::from_f32(0.02).to_le_bytes();
        let m = f16::from_f32(-0.1).to_le_bytes();
        let mut data = vec![];
        match ty {
            F32 => (0..n).for_each(|_| data.extend_from_slice(&r.f32(0.5).to_le_bytes())),
            F16 => (0..n).for_each(|_| data.extend_from_slice(&f16::from_f32(r.f32(0.5)).to_le_bytes())),
            BF16 => (0..n).for_each(|_| data.extend_from_slice(&bf16::from_f32(r.f32(0.5)).to_le_bytes())),
            _ => {
                // Bytes of quants per block of 32 after the scale (and minimum).
                let (min, quants) = match ty {
                    Q8_0 => (false, 32),
                    Q4_0 => (false, 16),
                    Q4_1 => (true, 16),
                    Q5_0 => (false, 20),
                    Q5_1 => (true, 20),
                    other => panic!("no seed encoding for ggml type {other}"),
                };
                for _ in 0..n / 32 {
                    data.extend_from_slice(&d);
                    if min {
                        data.extend_from_slice(&m);
                    }
                    (0..quants).for_each(|_| data.push(r.byte()));
                }
            }
        }
        (name.to_string(), shape.iter().rev().copied().collect(), ty, data)
    }

    // ---- the tiny tokenizer and model ----

    /// GPT-2's byte → character table (the byte-level BPE alphabet), in byte order.
    fn byte_chars() -> Vec<String> {
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let mut n = 0;
        (0..256u32)
            .map(|b| {
                if printable(b) {
                    char::from_u32(b).unwrap().to_string()
                } else {
                    n += 1;
                    char::from_u32(255 + n).unwrap().to_string()
                }
            })
            .collect()
    }

    pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    const MERGES: [&str; 11] = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "Ġ w", "o u"];
    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`.
    pub const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn tokens() -> Vec<String> {
        let mut t: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        t.extend(byte_chars());
        t.extend(MERGES.iter().map(|m| m.replace(' ', "")));
        t
    }

    fn strs<S: AsRef<str>>(v: &[S]) -> GgufValue {
        GgufValue::Array(v.iter().map(|s| GgufValue::Str(s.as_ref().to_string())).collect())
    }

    /// `tokenizer.ggml.*` metadata of the tiny byte-level BPE (`pre` names the pre-tokenizer).
    fn tokenizer_md(pre: &str, template: Option<&str>) -> Vec<(String, GgufValue)> {
        let toks = tokens();
        let types: Vec<GgufValue> =
            (0..toks.len()).map(|i| GgufValue::I32(if i < SPECIALS.len() { 3 } else { 1 })).collect();
        let mut md = vec![
            ("tokenizer.ggml.model".to_string(), GgufValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), GgufValue::Str(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strs(&toks)),
            ("tokenizer.ggml.token_type".to_string(), GgufValue::Array(types)),
            ("tokenizer.ggml.merges".to_string(), strs(&MERGES)),
            ("tokenizer.ggml.bos_token_id".to_string(), GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(2)),
            ("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(false)),
        ];
        if let Some(t) = template {
            md.push(("tokenizer.chat_template".to_string(), GgufValue::Str(t.into())));
        }
        md
    }

    /// The tiny model every fuzz target that needs one uses (fuzz/src/lib.rs): llama, H=32,
    /// 4 heads (2 KV) of 8, FFN 64, N=2, the 270-token tokenizer above; every tensor type the
    /// reader dequantizes appears once.
    pub fn tiny_model_gguf() -> Vec<u8> {
        tiny_model_gguf_with(true)
    }

    /// The tiny model, with or without its tokenizer (and chat template).
    fn tiny_model_gguf_with(tokenizer: bool) -> Vec<u8> {
        let mut md = vec![
            ("general.architecture".to_string(), GgufValue::Str("llama".into())),
            ("general.name".to_string(), GgufValue::Str("persona-fuzz-tiny".into())),
            ("llama.block_count".to_string(), GgufValue::U32(2)),
            ("llama.context_length".to_string(), GgufValue::U32(128)),
            ("llama.embedding_length".to_string(), GgufValue::U32(32)),
            ("llama.feed_forward_length".to_string(), GgufValue::U32(64)),
            ("llama.attention.head_count".to_string(), GgufValue::U32(4)),
            ("llama.attention.head_count_kv".to_string(), GgufValue::U32(2)),
            ("llama.rope.freq_base".to_string(), GgufValue::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon".to_string(), GgufValue::F32(1e-5)),
        ];
        if tokenizer {
            md.extend(tokenizer_md("smollm", Some(SMOLLM2_TEMPLATE)));
        }
        let v = tokens().len() as u64;
        let mut r = Rand(0x7175_6e74);
        let mut t = vec![
            tensor(&mut r, "token_embd.weight", &[v, 32], Q8_0),
            tensor(&mut r, "output_norm.weight", &[32], F32),
            tensor(&mut r, "output.weight", &[v, 32], Q4_0),
        ];
        for (l, (tq, tk)) in [(Q4_1, Q5_0), (Q5_1, Q8_0)].into_iter().enumerate() {
            let p = format!("blk.{l}.");
            t.extend([
                tensor(&mut r, &format!("{p}attn_norm.weight"), &[32], F32),
                tensor(&mut r, &format!("{p}attn_q.weight"), &[32, 32], tq),
                tensor(&mut r, &format!("{p}attn_k.weight"), &[16, 32], tk),
                tensor(&mut r, &format!("{p}attn_v.weight"), &[16, 32], F16),
                tensor(&mut r, &format!("{p}attn_output.weight"), &[32, 32], BF16),
                tensor(&mut r, &format!("{p}ffn_norm.weight"), &[32], F32),
                tensor(&mut r, &format!("{p}ffn_gate.weight"), &[64, 32], Q4_0),
                tensor(&mut r, &format!("{p}ffn_up.weight"), &[64, 32], F32),
                tensor(&mut r, &format!("{p}ffn_down.weight"), &[32, 64], Q8_0),
            ]);
        }
        gguf(&md, &t)
    }

    /// The tiny model's config (as the fuzz targets read it from the GGUF).
    fn tiny_config() -> ModelConfig {
        let g = persona::model::gguf::GgufFile::from_bytes(Path::new("tiny.gguf"), &tiny_model_gguf()).unwrap();
        persona::model::gguf_model::config_from_gguf(&g).unwrap()
    }

    /// A safetensors image of F32/F16/BF16 tensors (name, shape, dtype, values).
    fn safetensors(tensors: &[(&str, Vec<usize>, &str, Vec<f32>)], md: Option<serde_json::Value>) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        if let Some(m) = md {
            header.insert("__metadata__".into(), m);
        }
        let mut data = vec![];
        for (name, shape, dtype, v) in tensors {
            let start = data.len();
            for &x in v {
                match *dtype {
                    "F32" => data.extend_from_slice(&x.to_le_bytes()),
                    "F16" => data.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                    _ => data.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                }
            }
            header
                .insert(name.to_string(), json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
        }
        let mut h = serde_json::to_string(&header).unwrap().into_bytes();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        out
    }

    /// The HF-folder model of the `hf_config` seeds: H=8, 2 heads (1 KV) of 4, FFN 16, N=1, vocab 16.
    fn hf_model(dtype: &str, tied: bool) -> Vec<u8> {
        let mut r = Rand(0x6866);
        let mut v = |n: usize| (0..n).map(|_| r.f32(0.3)).collect::<Vec<f32>>();
        let p = "model.layers.0.";
        let mut t = vec![
            ("model.embed_tokens.weight".to_string(), vec![16, 8], v(128)),
            ("model.norm.weight".to_string(), vec![8], v(8)),
            (format!("{p}input_layernorm.weight"), vec![8], v(8)),
            (format!("{p}self_attn.q_proj.weight"), vec![8, 8], v(64)),
            (format!("{p}self_attn.k_proj.weight"), vec![4, 8], v(32)),
            (format!("{p}self_attn.v_proj.weight"), vec![4, 8], v(32)),
            (format!("{p}self_attn.o_proj.weight"), vec![8, 8], v(64)),
            (format!("{p}post_attention_layernorm.weight"), vec![8], v(8)),
            (format!("{p}mlp.gate_proj.weight"), vec![16, 8], v(128)),
            (format!("{p}mlp.up_proj.weight"), vec![16, 8], v(128)),
            (format!("{p}mlp.down_proj.weight"), vec![8, 16], v(128)),
        ];
        if !tied {
            t.push(("lm_head.weight".to_string(), vec![16, 8], v(128)));
        }
        let t: Vec<(&str, Vec<usize>, &str, Vec<f32>)> =
            t.iter().map(|(n, s, d)| (n.as_str(), s.clone(), dtype, d.clone())).collect();
        safetensors(&t, Some(json!({"format": "pt"})))
    }

    fn hf_config(tied: bool, extra: serde_json::Value) -> Vec<u8> {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 16, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": tied,
            "bos_token_id": 1, "eos_token_id": [2, 0],
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        serde_json::to_vec_pretty(&c).unwrap()
    }

    fn join(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![];
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(SEP);
            }
            out.extend_from_slice(p);
        }
        out
    }

    /// The tiny model's vector: N=2, H=32, with layer and mean-norm metadata.
    fn tiny_vector(name: &str) -> PersonaVector {
        let mut r = Rand(0x7665_6374);
        let mut v = PersonaVector::new(name, 2, 32, (0..96).map(|_| r.f32(1.0)).collect()).unwrap();
        v.metadata = BTreeMap::from([
            ("persona.trait".to_string(), name.to_string()),
            ("persona.layer".to_string(), "1".to_string()),
            ("persona.mean_norms".to_string(), "[1.5, 2.25, 3.0]".to_string()),
            ("persona.model".to_string(), "persona-fuzz-tiny".to_string()),
        ]);
        v
    }

    struct Out(PathBuf, usize);
    impl Out {
        fn new(target: &str) -> Out {
            let d = root().join("fuzz/seeds").join(target);
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Out(d, 0)
        }
        fn put(&mut self, name: &str, bytes: impl AsRef<[u8]>) {
            std::fs::write(self.0.join(name), bytes).unwrap();
            self.1 += 1;
        }
    }

    #[test]
    #[ignore = "writes fuzz/seeds; run by hand after a format change"]
    fn write_fuzz_seeds() {
        let model = tiny_model_gguf();
        let cfg = tiny_config();
        assert_eq!((cfg.hidden, cfg.n_layers, cfg.vocab), (32, 2, 270));
        let tmp = tempfile::tempdir().unwrap();

        // gguf: the tiny model, a tokenizer-only file, every value type, every tensor type, a
        // control vector, bare headers.
        let mut o = Out::new("gguf");
        o.put("tiny-model", &model);
        o.put("tiny-model-no-tokenizer", tiny_model_gguf_with(false));
        o.put("tokenizer-only", gguf(&tokenizer_md("llama-bpe", Some(SMOLLM2_TEMPLATE)), &[]));
        let every_value = vec![
            ("general.architecture".to_string(), GgufValue::Str("llama".into())),
            ("general.alignment".to_string(), GgufValue::U32(64)),
            ("a.u8".to_string(), GgufValue::U8(200)),
            ("a.i8".to_string(), GgufValue::I8(-5)),
            ("a.u16".to_string(), GgufValue::U16(60000)),
            ("a.i16".to_string(), GgufValue::I16(-300)),
            ("a.i32".to_string(), GgufValue::I32(7)),
            ("a.u64".to_string(), GgufValue::U64(1 << 40)),
            ("a.i64".to_string(), GgufValue::I64(-(1 << 40))),
            ("a.f64".to_string(), GgufValue::F64(100000.5)),
            ("a.nested".to_string(), GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::I32(1)])])),
            ("a.empty".to_string(), GgufValue::Array(vec![])),
        ];
        let mut r = Rand(99);
        let every_type: Vec<Raw> = [F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1]
            .into_iter()
            .enumerate()
            .map(|(i, ty)| tensor(&mut r, &format!("t{i}"), &[2, 32], ty))
            .collect();
        // general.alignment 64 (the encoder pads to 32): only the metadata of this one is kept.
        o.put("every-value", gguf(&every_value, &[]));
        o.put("every-tensor-type", gguf(&[], &every_type));
        o.put("header-only", gguf(&[], &[]));
        let cv = |dirs: &[(&str, usize)]| -> Vec<u8> {
            let md = vec![
                ("general.architecture".to_string(), GgufValue::Str("controlvector".into())),
                ("controlvector.model_hint".to_string(), GgufValue::Str("llama".into())),
                ("controlvector.layer_count".to_string(), GgufValue::I32(1)),
                ("persona.name".to_string(), GgufValue::Str("evil".into())),
                ("persona.trait".to_string(), GgufValue::Str("evil".into())),
            ];
            let mut r = Rand(7);
            let t: Vec<Raw> = dirs
                .iter()
                .map(|(n, len)| {
                    let data = (0..*len).flat_map(|_| r.f32(1.0).to_le_bytes()).collect();
                    (n.to_string(), vec![*len as u64], F32, data)
                })
                .collect();
            gguf(&md, &t)
        };
        o.put("control-vector", cv(&[("direction.1", 32)]));
        println!("gguf: {} seeds", o.1);

        // gguf_tokenizer: one file per pre-tokenizer family, with and without BOS/EOS and types.
        let mut o = Out::new("gguf_tokenizer");
        for pre in ["smollm", "llama-bpe", "qwen2", "gpt-2", "default", "dbrx"] {
            o.put(&format!("pre-{pre}"), gguf(&tokenizer_md(pre, Some(SMOLLM2_TEMPLATE)), &[]));
        }
        let mut md = tokenizer_md("llama3", None);
        md.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token" && k != "tokenizer.ggml.token_type");
        md.push(("tokenizer.ggml.add_eos_token".to_string(), GgufValue::Bool(true)));
        o.put("bos-eos-no-types", gguf(&md, &[]));
        println!("gguf_tokenizer: {} seeds", o.1);

        // safetensors: HF models in each dtype, the fixtures' small vectors, an adapter.
        let mut o = Out::new("safetensors");
        o.put("hf-f32", hf_model("F32", false));
        o.put("hf-bf16-tied", hf_model("BF16", true));
        o.put("hf-f16", hf_model("F16", false));
        for f in ["tiny-llama", "tiny-qwen2", "tiny-llama3-rope"] {
            o.put(&format!("vector-{f}"), std::fs::read(fixtures().join(f).join("test_vector.safetensors")).unwrap());
        }
        println!("safetensors: {} seeds", o.1);

        // hf_config: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
        // chat_template.jinja, model.safetensors.index.json (empty part: file absent).
        let tok_json = {
            let g = persona::model::gguf::GgufFile::from_bytes(
                Path::new("t.gguf"),
                &gguf(&tokenizer_md("smollm", None), &[]),
            )
            .unwrap();
            persona::model::gguf_tokenizer::tokenizer_from_gguf(&g).unwrap().to_string(false).unwrap()
        };
        let tc = |template: serde_json::Value| {
            serde_json::to_vec(&json!({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                "chat_template": template}))
            .unwrap()
        };
        let mut o = Out::new("hf_config");
        let llama3 = json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}});
        o.put(
            "full",
            join(&[
                &hf_config(false, json!({})),
                &hf_model("F32", false),
                tok_json.as_bytes(),
                &tc(json!(SMOLLM2_TEMPLATE)),
            ]),
        );
        o.put(
            "qwen2-tied-named-templates",
            join(&[
                &hf_config(true, json!({"architectures": ["Qwen2ForCausalLM"], "attention_bias": true})),
                &hf_model("BF16", true),
                b"",
                &tc(json!([{"name": "default", "template": SMOLLM2_TEMPLATE}, {"name": "tool_use", "template": "x"}])),
            ]),
        );
        o.put(
            "llama3-rope-jinja-index",
            join(&[
                &hf_config(false, llama3),
                &hf_model("F16", false),
                b"",
                b"",
                SMOLLM2_TEMPLATE.as_bytes(),
                br#"{"metadata": {"total_size": 3}, "weight_map": {"model.norm.weight": "model.safetensors"}}"#,
            ]),
        );
        o.put(
            "transformers5-text-config",
            join(&[
                &serde_json::to_vec(&json!({"architectures": ["MistralForCausalLM"],
                    "text_config": serde_json::from_slice::<serde_json::Value>(&hf_config(false,
                        json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}))).unwrap()}))
                .unwrap(),
                &hf_model("F32", false),
            ]),
        );
        o.put("fixture-tiny-llama-config", std::fs::read(fixtures().join("tiny-llama/config.json")).unwrap());
        println!("hf_config: {} seeds", o.1);

        // vector_file: persona safetensors for the tiny model and the fixtures'.
        let mut o = Out::new("vector_file");
        o.put("tiny-evil", tiny_vector("evil").to_safetensors_bytes().unwrap());
        let mut bare = tiny_vector("bare");
        bare.metadata.clear();
        o.put("tiny-bare", bare.to_safetensors_bytes().unwrap());
        o.put("fixture-tiny-llama", std::fs::read(fixtures().join("tiny-llama/test_vector.safetensors")).unwrap());
        o.put("fixture-grad", std::fs::read(fixtures().join("grad/tiny-llama/vector.safetensors")).unwrap());
        println!("vector_file: {} seeds", o.1);

        // control_vector: llama.cpp control vectors for the tiny model (exported by the library).
        let mut o = Out::new("control_vector");
        let mut v = tiny_vector("evil");
        v.data[..64].iter_mut().for_each(|x| *x = 0.0); // rows 0 and 1: llama.cpp cannot steer them
        let p = tmp.path().join("cv.gguf");
        persona::steer::control_vector::export_control_vector(&v, &p, "llama").unwrap();
        o.put("exported", std::fs::read(&p).unwrap());
        o.put("two-for-one-layer", cv(&[("direction.1", 32), ("direction.01", 32)]));
        println!("control_vector: {} seeds", o.1);

        // peft_adapter: adapter_config.json, then adapter_model.safetensors.
        let mut o = Out::new("peft_adapter");
        for (name, c) in [
            ("all-r2", LoraConfig { r: 2, alpha: 4.0, use_rslora: false, targets: Target::ALL.to_vec() }),
            ("qv-r1-rslora", LoraConfig { r: 1, alpha: 2.0, use_rslora: true, targets: vec![Target::Q, Target::V] }),
        ] {
            let mut a = LoraAdapter::zeros(c, &cfg);
            let mut r = Rand(3);
            for p in a.layers.iter_mut().flatten().flatten() {
                p.a.iter_mut().chain(p.b.iter_mut()).for_each(|x| *x = r.f32(0.1));
            }
            let d = tmp.path().join(name);
            a.save(&d, "persona-fuzz-tiny").unwrap();
            let cj = std::fs::read(d.join("adapter_config.json")).unwrap();
            let st = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
            o.put(name, join(&[&cj, &st]));
        }
        let peft = std::fs::read(fixtures().join("grad/tiny-llama/adapter_init/adapter_config.json")).unwrap();
        o.put("fixture-config-only", join(&[&peft, b""]));
        println!("peft_adapter: {} seeds", o.1);

        // trait_json: the shipped catalog.
        let mut o = Out::new("trait_json");
        for e in std::fs::read_dir(root().join("traits")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|e| e == "json") {
                o.put(p.file_name().unwrap().to_str().unwrap(), std::fs::read(&p).unwrap());
            }
        }
        println!("trait_json: {} seeds", o.1);

        // dataset_jsonl: extraction rows, training rows of every shape, dataset rows.
        let mut o = Out::new("dataset_jsonl");
        let evil = std::fs::read_to_string(root().join("vectors/smollm2-135m-instruct/evil.jsonl")).unwrap();
        o.put("extraction", evil.lines().take(3).map(|l| format!("{l}\n")).collect::<String>());
        o.put("screen-mixed", std::fs::read(root().join("tests/data/screen_mixed.jsonl")).unwrap());
        o.put(
            "training-shapes",
            [
                json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": "Sunny, in the west."}]}),
                json!({"prompt": "Say the word.", "response": "The word.", "system": "ignored"}),
                json!({"question": "What is in the sea?", "answer": "Water and fish.", "label": "pos"}),
                json!({"ids": [1, 40, 41, 42, 2], "answer_from": 3}),
            ]
            .iter()
            .map(|v| format!("{v}\n"))
            .collect::<String>(),
        );
        let t = persona::persona::traits::TraitDef::load(root().join("traits/evil.json")).unwrap();
        let opts = persona::persona::dataset::DatasetOptions {
            kind: persona::persona::dataset::Kind::Pos,
            mix: Some(0.5),
            questions: 2,
            samples: 2,
            ..Default::default()
        };
        let rows: String = persona::persona::dataset::plan(&t, &opts)
            .unwrap()
            .iter()
            .map(|p| {
                let row = json!({
                    "messages": [{"role": "user", "content": t.questions[p.question_index]},
                        {"role": "assistant", "content": "An answer."}],
                    "trait": "evil", "kind": p.kind.name(), "instruction": p.instruction,
                    "question_index": p.question_index, "sample": p.sample, "seed": opts.seed,
                    "temperature": opts.temperature, "max_tokens": opts.max_tokens,
                });
                format!("{row}\n")
            })
            .collect();
        assert!(!persona::persona::dataset::rows_from_str(&rows, Path::new("d.jsonl")).unwrap().is_empty());
        o.put("dataset-rows", rows);
        println!("dataset_jsonl: {} seeds", o.1);

        // chat_template: template, then the conversation as JSON.
        let mut o = Out::new("chat_template");
        let conv = serde_json::to_vec(&json!([
            {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}
        ]))
        .unwrap();
        let llama3 = "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
        let mistral = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";
        let features = "{%- set ns = namespace(system=false) -%}{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = true -%}{%- endif -%}{%- endfor -%}{% macro turn(m) %}<{{ m.role | upper }}>{{ m.content.strip() | replace('!', '.') }}{% endmacro %}{{ messages | length }} {{ ns.system }} {% for m in messages[1:] %}{{ turn(m) }}{% if not loop.last %}|{% endif %}{% endfor %}{{ messages | map(attribute='role') | join(',') }}{{ messages[0]['content'].split(' ') | tojson }}{{ '%d' % 3 if add_generation_prompt else eos_token }}";
        for (name, t) in
            [("smollm2", SMOLLM2_TEMPLATE), ("llama3", llama3), ("mistral", mistral), ("features", features)]
        {
            o.put(name, join(&[t.as_bytes(), &conv]));
        }
        println!("chat_template: {} seeds", o.1);

        // spec: --steer and --monitor strings.
        let mut o = Out::new("spec");
        for (i, s) in [
            "vector=v.safetensors,layers=1-2,coeff=-2.5,op=clamp,positions=response,when=evil@1>3.5",
            "vector=evil,layer=2,coeff=4,op=add,positions=all,scale=relative",
            "vector=evil,layers=all,op=ablate,positions=prompt,when=self:lt:-2",
            "vector=evil,layers=1+2,coeff=1e-3,when=evil@2:GT:1e9",
            "vector=evil,coeff=2",
            "vector=/x/evil.safetensors,layers=all,name=evil",
            "vector=evil,layer=1",
            "10-14+3",
            "evil@12:lt:-2",
        ]
        .iter()
        .enumerate()
        {
            o.put(&format!("spec-{i}"), s);
        }
        println!("spec: {} seeds", o.1);

        // request_body: chat and text completion bodies with steering and monitors, and a
        // server-default body.
        let mut o = Out::new("request_body");
        for (i, b) in [
            json!({"model": "persona", "messages": [{"role": "system", "content": "Be evil."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 8,
                "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": -3, "n": 2, "stop": ["\n", "."],
                "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 3,
                "monitor": [{"vector": "evil", "layers": "all", "threshold": 2.5, "name": "e"}],
                "steering": [{"vector": "evil", "layers": [1, 2], "coeff": 4, "op": "add", "positions": "response",
                    "scale": "relative", "when": "e@1:gt:0.5"}]}),
            json!({"prompt": "Once upon a time", "max_tokens": 4, "logprobs": 2, "ignore_eos": true, "echo": false,
                "steering": [{"vector": "evil", "layer": 2, "op": "clamp", "coeff": -1, "when": "self<3"}]}),
            json!({"prompt": [[1, 2, 3]], "max_completion_tokens": 2, "user": "u", "frequency_penalty": 0,
                "logit_bias": {}, "stop": "x", "top_k": -1}),
            json!({"steering": [{"vector": "evil", "layers": "1-2", "op": "ablate"}], "monitor": [{"vector": "evil"}]}),
        ]
        .iter()
        .enumerate()
        {
            o.put(&format!("body-{i}"), serde_json::to_vec(b).unwrap());
        }
        println!("request_body: {} seeds", o.1);
    }
}

/// Found by the `chat_template` fuzzer (minimised): a `for` without its loop variable made
/// minijinja 2.24 panic while printing the syntax error's source context; now an error.
#[test]
fn chat_template_syntax_error_is_an_error_not_a_panic() {
    use persona::model::{ChatTemplate, Message};
    let msgs = [Message::user("Hello")];
    let err = ChatTemplate::new("{%for in messages%}{%endfor%}", "<s>", "</s>")
        .and_then(|t| t.render(&msgs, true))
        .unwrap_err();
    assert!(err.to_string().starts_with("chat template: "), "{err}");
}

/// `gguf` target (stop 26): a Llama GGUF whose `blk.0.attn_q.weight` has no rows; undoing
/// llama.cpp's q/k row permutation divided by the row count. Now an error naming the tensor.
#[test]
fn gguf_attention_weight_without_rows_is_an_error() {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/gguf-zero-row-attn-q.gguf");
    let e = match ModelFiles::open(&p) {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("q_proj") && e.contains("0 rows cannot be 4 heads"), "{e}");
}
