//! Persona vectors through the public API: file format, model checks, arithmetic, llama.cpp
//! control-vector import/export; and the `persona vectors` command.

mod common;

use std::path::{Path, PathBuf};

use persona::model::config::ModelConfig;
use persona::steer::control_vector::{export_control_vector, import_control_vector, SOURCE_FORMAT};
use persona::steer::vector::{cosine_table, PersonaVector};

fn vendored(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn tiny_llama_cfg() -> ModelConfig {
    ModelConfig::from_hf_json(&vendored("tiny-llama/config.json")).unwrap()
}

/// A Llama config with `n_layers` blocks and hidden size `hidden` (nothing else matters here).
fn cfg(n_layers: usize, hidden: usize) -> ModelConfig {
    let text = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{hidden},"intermediate_size":16,
           "num_hidden_layers":{n_layers},"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,
           "vocab_size":32}}"#
    );
    ModelConfig::from_hf_str(&text, Path::new("config.json")).unwrap()
}

fn err_text<T: std::fmt::Debug>(r: persona::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn assert_has(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "`{msg}` does not mention `{n}`");
    }
}

/// A GGUF v3 control vector encoded byte by byte, independently of the crate's writer:
/// string metadata, then 1-D F32 tensors.
fn raw_control_vector(meta: &[(&str, &str)], layer_count: i32, tensors: &[(&str, &[f32])]) -> Vec<u8> {
    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64 + 1).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        b.extend_from_slice(&8u32.to_le_bytes()); // string
        put_str(&mut b, v);
    }
    put_str(&mut b, "controlvector.layer_count");
    b.extend_from_slice(&5u32.to_le_bytes()); // i32
    b.extend_from_slice(&layer_count.to_le_bytes());
    let mut offset = 0u64;
    for (name, data) in tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&1u32.to_le_bytes()); // n_dims
        b.extend_from_slice(&(data.len() as u64).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (data.len() as u64 * 4).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, data) in tensors {
        let start = b.len();
        b.extend(data.iter().flat_map(|x| x.to_le_bytes()));
        b.resize(start + (data.len() * 4).div_ceil(32) * 32, 0);
    }
    b
}

#[test]
fn smollm2_vector_matches_reference_norms() {
    let dir = common::fixtures();
    let reference = common::json(&dir.join("smollm2_reference.json"));
    let ex = &reference["extraction"];
    let v = PersonaVector::load(dir.join(ex["vector_file"].as_str().unwrap())).unwrap();
    let (n, h) = (reference["n_layers"].as_u64().unwrap() as usize, reference["hidden"].as_u64().unwrap() as usize);
    assert_eq!((v.n_layers, v.hidden), (n, h));
    v.check_model(h, n).unwrap();
    assert_eq!(v.metadata["method"], "response_avg_diff");
    assert_eq!(v.metadata["pos_system"], ex["pos_system"].as_str().unwrap());
    let want = common::f32s(&ex["vector_norms"]);
    assert_eq!(want.len(), n + 1);
    for (l, (got, want)) in v.norms().iter().zip(&want).enumerate() {
        assert!((got - want).abs() <= 1e-5 * want.abs(), "layer {l}: norm {got} vs reference {want}");
    }
    for l in 0..=n {
        v.check_layer(l).unwrap();
        let u = v.unit(l).unwrap();
        let nu: f64 = u.iter().map(|&x| x as f64 * x as f64).sum();
        assert!((nu - 1.0).abs() < 1e-5, "layer {l}: |u|² = {nu}");
    }
}

#[test]
fn tiny_vector_fits_its_model_and_not_another() {
    let p = vendored("tiny-llama/test_vector.safetensors");
    let v = PersonaVector::load_for_model(&p, &tiny_llama_cfg()).unwrap();
    assert_eq!((v.n_layers, v.hidden, v.name.as_str()), (3, 64, "test_vector"));
    assert!(v.metadata.is_empty());

    let qwen = ModelConfig::from_hf_json(&vendored("tiny-qwen2/config.json")).unwrap();
    let msg = err_text(PersonaVector::load_for_model(&p, &qwen));
    assert_has(&msg, &["test_vector.safetensors", "4 rows × 64 (N=3, H=64)", &format!("H={}", qwen.hidden)]);
    assert_has(&err_text(v.check_layer(4)), &["test_vector.safetensors", "layer 4"]);
}

#[test]
fn save_load_round_trip_keeps_metadata_and_bits() {
    let d = tempfile::tempdir().unwrap();
    let mut v = PersonaVector::load(vendored("tiny-llama/test_vector.safetensors")).unwrap();
    v.name = "enthusiasm".into();
    v.metadata.insert("persona.trait".into(), "enthusiasm".into());
    v.metadata.insert("persona.model".into(), "tiny-llama".into());
    v.metadata.insert("persona.method".into(), "response_avg_diff".into());
    v.metadata.insert("persona.layer".into(), "2".into());
    v.metadata.insert("persona.n_pairs".into(), "5".into());
    let p = d.path().join("out.safetensors");
    v.save(&p).unwrap();
    let w = PersonaVector::load(&p).unwrap();
    assert_eq!(w.name, "enthusiasm");
    assert_eq!(w.metadata, v.metadata);
    assert_eq!(w.data, v.data);
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "temporary file left behind");
}

#[test]
fn composition_on_real_vectors() {
    let a = PersonaVector::load(vendored("tiny-llama/test_vector.safetensors")).unwrap();
    let mut b = a.scaled(0.5);
    // Make b differ from a: rotate its rows by one element.
    for l in 0..=b.n_layers {
        b.layer_mut(l).rotate_left(1);
    }
    let o = a.orthogonalized_against(&b).unwrap();
    for l in 0..=a.n_layers {
        assert!(o.cosine(&b, l).unwrap().abs() < 1e-5, "layer {l}");
        // a = o + (a·û)û, so |a|² = |o|² + (a·û)².
        let c = a.cosine(&b, l).unwrap() as f64;
        let (na, no) = (a.norm(l) as f64, o.norm(l) as f64);
        assert!((na * na * (1.0 - c * c) - no * no).abs() < 1e-4 * na * na, "layer {l}");
    }
    let s = a.add(&a.scaled(-1.0)).unwrap();
    assert!(s.data.iter().all(|&x| x == 0.0));
    let t = cosine_table(&[&a, &b, &o], 2);
    for (i, row) in t.iter().enumerate() {
        assert!((row[i].unwrap() - 1.0).abs() < 1e-6);
        for (j, c) in row.iter().enumerate() {
            assert_eq!(*c, t[j][i]);
        }
    }
}

/// Pins llama.cpp's layer numbering with a control vector encoded by hand: `direction.5` is added
/// by llama.cpp to the output of 0-based block 5, which is our residual index 6.
#[test]
fn control_vector_direction_5_is_index_6() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("hand.gguf");
    let dir5: Vec<f32> = (0..8).map(|i| (i as f32 - 2.0) * 0.5).collect();
    let dir7 = [1.0f32; 8];
    let bytes = raw_control_vector(
        &[("general.architecture", "controlvector"), ("controlvector.model_hint", "llama")],
        7,
        &[("direction.5", &dir5), ("direction.7", &dir7)],
    );
    std::fs::write(&p, bytes).unwrap();
    let v = PersonaVector::load_for_model(&p, &cfg(8, 8)).unwrap();
    assert_eq!(v.layer(6), &dir5[..]);
    assert_eq!(v.layer(8), &dir7[..], "direction.7 = the last block's output = our index N");
    for l in [0, 1, 2, 3, 4, 5, 7] {
        assert!(v.is_zero(l), "row {l}");
    }
    assert_eq!(v.metadata["persona.source_format"], SOURCE_FORMAT);
    assert_eq!(v.metadata["persona.model"], "llama");
    // `load` alone cannot map it.
    assert_has(&err_text(PersonaVector::load(&p)), &["hand.gguf", "GGUF", "load_for_model"]);
    // direction.0 is refused, as by llama.cpp.
    let bytes = raw_control_vector(&[("general.architecture", "controlvector")], 7, &[("direction.0", &dir7)]);
    std::fs::write(&p, bytes).unwrap();
    assert_has(&err_text(import_control_vector(&p, &cfg(8, 8))), &["hand.gguf", "direction.0", "llama.cpp"]);
}

#[test]
fn control_vector_round_trip_on_tiny_llama() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_llama_cfg();
    let full = PersonaVector::load(vendored("tiny-llama/test_vector.safetensors")).unwrap();
    let out = d.path().join("cv.gguf");
    // Rows 0 and 1 have no llama.cpp equivalent.
    assert_has(&err_text(export_control_vector(&full, &out, "llama")), &["test_vector.safetensors", "layer 0"]);
    assert_has(
        &err_text(export_control_vector(&full.only_layers(&[1, 2]).unwrap(), &out, "llama")),
        &["layer 1", "block 0"],
    );
    assert!(!out.exists());

    let v = full.only_layers(&[2, 3]).unwrap();
    export_control_vector(&v, &out, "llama").unwrap();
    let w = PersonaVector::load_for_model(&out, &cfg).unwrap();
    assert_eq!(w.data, v.data);
    assert_eq!(w.name, "test_vector");
    // The file really says direction.1 and direction.2 (blocks 1 and 2, our indices 2 and 3).
    let g = persona::model::gguf::GgufFile::open(&out).unwrap();
    let mut names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["direction.1", "direction.2"]);
    assert_eq!(g.tensor("direction.2").unwrap().to_f32(), full.layer(3));
    assert_eq!(g.get_u64("controlvector.layer_count"), Some(2));

    // Import for the wrong model.
    let qwen = ModelConfig::from_hf_json(&vendored("tiny-qwen2/config.json")).unwrap();
    assert_has(&err_text(import_control_vector(&out, &qwen)), &["cv.gguf", "64 values", "H=96"]);
    let two = cfg_with_layers(&cfg, 2);
    assert_has(&err_text(import_control_vector(&out, &two)), &["cv.gguf", "direction.2", "out of range"]);
}

fn cfg_with_layers(c: &ModelConfig, n: usize) -> ModelConfig {
    let mut c = c.clone();
    c.n_layers = n;
    c
}

// ---------------------------------------------------------------------------------------------
// The `persona vectors` command. PERSONA_BIN overrides the binary under test.

fn persona_bin() -> PathBuf {
    std::env::var_os("PERSONA_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_persona")))
}

fn run_cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let o = std::process::Command::new(persona_bin()).arg("vectors").args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

macro_rules! cli {
    ($($a:expr),* $(,)?) => { run_cli(&[$(std::ffi::OsStr::new(&$a)),*]) };
}

#[test]
fn cli_vectors() {
    let smol = vendored("smollm2_extracted_vector.safetensors");
    let tiny = vendored("tiny-llama/test_vector.safetensors");
    let tiny_model = vendored("tiny-llama");

    let (ok, out, err) = cli!(smol);
    assert!(ok, "{err}");
    assert_has(&out, &["N=30 blocks, H=576", "response_avg_diff", "max norm", "  30: "]);

    let (ok, out, err) = cli!(smol, "--json");
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["vectors"][0]["n_layers"], 30);
    assert_eq!(j["vectors"][0]["norms"].as_array().unwrap().len(), 31);
    assert_eq!(j["vectors"][0]["max_norm_layer"], 30);
    assert!(j.get("cosine").is_none());

    // Two vectors: a cosine table; the same file twice gives 1.
    let (ok, out, err) = cli!(tiny, tiny, "--json", "--layer", "2");
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["cosine"][0]["layer"], 2);
    assert!((j["cosine"][0]["matrix"][0][1].as_f64().unwrap() - 1.0).abs() < 1e-6);
    let (ok, out, err) = cli!(tiny, smol, "--layer", "all");
    assert!(ok, "{err}");
    assert_has(&out, &["cosine similarity per layer", "test_vector·smollm2_extracted_vector"]);
    let (ok, _, err) = cli!(tiny, tiny, "--layer", "99");
    assert!(!ok);
    assert_has(&err, &["--layer 99", "out of range"]);

    // Model check.
    let (ok, _, err) = cli!(smol, "--model", tiny_model);
    assert!(!ok);
    assert_has(&err, &["smollm2_extracted_vector.safetensors", "N=30", "N=3"]);

    // Export one layer as a control vector, import it back.
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("cv.gguf");
    let back = d.path().join("back.safetensors");
    // Every layer: 0 and 1 (which llama.cpp cannot steer) are zeroed with a note.
    let (ok, out, err) = cli!(tiny, "--export-gguf", gguf, "--model-hint", "llama");
    assert!(ok, "{err}");
    assert_has(&err, &["note: zeroed layer 0", "and 1", "2..=3"]);
    assert_has(&out, &["2 direction(s)", "model_hint `llama`"]);
    // Asking for layer 0 alone is still refused.
    let (ok, _, err) = cli!(tiny, "--export-gguf", gguf, "--layer", "0", "--model-hint", "llama");
    assert!(!ok);
    assert_has(&err, &["layer 0", "non-zero"]);
    let (ok, out, err) = cli!(tiny, "--export-gguf", gguf, "--model-hint", "llama", "--layer", "3");
    assert!(ok, "{err}");
    assert_has(&out, &["cv.gguf", "1 direction"]);
    let (ok, _, err) = cli!(gguf);
    assert!(!ok);
    assert_has(&err, &["cv.gguf", "--model"]);
    let (ok, _, err) = cli!(gguf, "--model", tiny_model, "--out", back);
    assert!(ok, "{err}");
    let v = PersonaVector::load(&back).unwrap();
    let t = PersonaVector::load(&tiny).unwrap();
    assert_eq!(v.layer(3), t.layer(3));
    assert!(v.is_zero(0) && v.is_zero(1) && v.is_zero(2));
    let (ok, out, err) = cli!(gguf, "--model", tiny_model);
    assert!(ok, "{err}");
    assert_has(&out, &["llama.cpp control vector (GGUF)", "persona.model"]);
}
