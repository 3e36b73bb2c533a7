//! Import and export llama.cpp control vectors (GGUF).
//!
//! # The file
//! `general.architecture = "controlvector"`, `controlvector.model_hint` (string, the model's
//! `general.architecture`), `controlvector.layer_count` (i32), and one 1-D F32 tensor
//! `direction.K` of `[n_embd]` per steered layer.
//!
//! # Layer numbering, verified by reading llama.cpp's source (ggml-org/llama.cpp, master)
//! - `common/common.cpp`, `common_control_vector_load_one`: parses `K` from `direction.K`;
//!   `K < 0` or unparsable → "invalid/unparsable direction tensor layer index", **`K == 0` →
//!   "invalid (zero) direction tensor layer index"** and the whole file is skipped; non-F32 or
//!   non-1-D tensors are refused; all directions must have the same length. Direction `K` is
//!   added (times the strength) into a flat buffer at offset `n_embd * (K - 1)` ("layer 1 at
//!   \[0\]"); several tensors for the same `K` are summed. `controlvector.layer_count`,
//!   `controlvector.model_hint` and `general.architecture` are not read.
//! - `common/common.cpp`, `common_init_from_params`: the buffer is handed to
//!   `llama_set_adapter_cvec` (earlier names: `llama_apply_adapter_cvec`,
//!   `llama_control_vector_apply`) with `il_start = 1`, `il_end = llama_model_n_layer(model)` by
//!   default. `include/llama.h` documents the buffer as "n_embd x n_layers ... starting from
//!   layer 1".
//! - `src/llama-adapter.cpp`, `llama_adapter_cvec::init`: `tensors[0] = nullptr` ("there's
//!   never a tensor for layer 0"), then one tensor for each `il` in `1..n_layer`.
//!   `llama_adapter_cvec::apply`: for `il` in `1..n_layer`, `tensors[il]` is filled from
//!   buffer offset `n_embd * (il - 1)`. Chaining with the loader: **`direction.K` →
//!   `tensors[K]`**, for `K` in `1..=n_layer-1`; a `direction.K` with `K >= n_layer` is
//!   silently dropped (its data lies past what `apply` copies).
//! - `src/llama-adapter.cpp`, `llama_adapter_cvec::tensor_for(il)` / `apply_to(ctx, cur, il)`:
//!   `cur = ggml_add(cur, tensors[il])` when `il` is in `[layer_start, layer_end]`.
//! - `src/llama-graph.cpp`, `llm_graph_context::build_cvec(cur, il)` calls `cvec->apply_to`;
//!   `src/models/llama.cpp` (and the other architectures) call it at the very end of block
//!   `il` (0-based), after `cur = ffn_out + ffn_inp` (the FFN residual add) and right before
//!   `cb(cur, "l_out", il)`: the vector is added to the **full output of block `il`**, which
//!   then feeds block `il+1` (and, for the last block, the final norm).
//!
//! # Mapping to our residual indices
//! Our index L (1..=N) is the output of 0-based block L-1, so:
//!
//! | llama.cpp                          | block output (0-based) | our index            |
//! |------------------------------------|------------------------|----------------------|
//! | — (`direction.0` is rejected)      | —                      | 0 (embedding output) |
//! | — (`tensors[0]` is never set)      | block 0                | 1                    |
//! | `direction.K`, 1 ≤ K ≤ N-1         | block K                | **K + 1**            |
//! | `direction.K`, K ≥ N (dropped)     | —                      | —                    |
//!
//! Our indices 0 and 1 have no llama.cpp equivalent; [`export_control_vector`] refuses a
//! vector that is non-zero there.
//!
//! Note: llama.cpp's own `tools/cvector-generator` records `l_out` of blocks `0..n_layer-1`
//! and names block `il`'s result `direction.{il+1}` (`mean.hpp` `mean::run`, `pca.hpp` `PCA::run_pca`), so its vectors are
//! *measured* one block earlier than llama.cpp *applies* them. That is the generator's choice;
//! this mapping follows what the applier does. `export_gguf` there writes
//! `controlvector.layer_count` as an i32 equal to the number of directions, `n_layer - 1`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::{GgmlType, GgufFile, GgufValue};
use crate::steer::vector::{is_gguf, PersonaVector, NAME_KEY};

/// `general.architecture` of a control vector.
pub const ARCHITECTURE: &str = "controlvector";
/// Value of `persona.source_format` on imported vectors.
pub const SOURCE_FORMAT: &str = "llama.cpp control vector";

/// Our residual index for llama.cpp's `direction.K` in a model with `n_layers` blocks:
/// `Some(K + 1)` for `1 <= K <= n_layers - 1`, else None (K = 0 is rejected by llama.cpp,
/// K >= n_layers is never applied).
pub fn index_for_direction(k: usize, n_layers: usize) -> Option<usize> {
    (k >= 1 && k < n_layers).then_some(k + 1)
}

/// llama.cpp's `direction.K` for our residual index `l`: `Some(l - 1)` for `2 <= l <= n_layers`,
/// else None (index 0 is the embedding output and index 1 block 0's output; llama.cpp can
/// steer neither).
pub fn direction_for_index(l: usize, n_layers: usize) -> Option<usize> {
    (l >= 2 && l <= n_layers).then(|| l - 1)
}

fn parse_direction(name: &str) -> Option<usize> {
    let k = name.strip_prefix("direction.")?;
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    k.parse().ok()
}

/// Read a llama.cpp control vector for a model with `cfg.n_layers` blocks and hidden size
/// `cfg.hidden`. `direction.K` becomes row `K + 1` (see the module docs); every other row is
/// zero. Metadata: `persona.source_format`, `persona.model` (from `controlvector.model_hint`),
/// plus any other string keys the file carries outside `general.*` / `controlvector.*`.
pub fn import_control_vector(path: impl AsRef<Path>, cfg: &ModelConfig) -> Result<PersonaVector> {
    let path = path.as_ref();
    let bad = |m: String| Error::format(path, m);
    if !is_gguf(path)? {
        return Err(bad("not a GGUF file (no `GGUF` magic): llama.cpp control vectors are GGUF".into()));
    }
    control_vector_from_gguf(&GgufFile::open(path)?, cfg)
}

/// [`import_control_vector`] of an opened GGUF file (e.g. [`GgufFile::from_bytes`] of an upload);
/// the name defaults to the stem of [`GgufFile::path`].
pub fn control_vector_from_gguf(g: &GgufFile, cfg: &ModelConfig) -> Result<PersonaVector> {
    let path = g.path();
    let bad = |m: String| Error::format(path, m);
    match g.get_str("general.architecture") {
        Some(ARCHITECTURE) => {}
        Some(other) => {
            return Err(bad(format!(
                "general.architecture is `{other}`, not `{ARCHITECTURE}`: this is not a llama.cpp control vector"
            )))
        }
        None => return Err(bad(format!("no string `general.architecture` (a control vector has `{ARCHITECTURE}`)"))),
    }
    let (n, h) = (cfg.n_layers, cfg.hidden);
    let mut v = PersonaVector::zeros(String::new(), n, h)?;
    if g.tensors().is_empty() {
        return Err(bad("no direction tensors (llama.cpp refuses an empty control vector)".into()));
    }
    for info in g.tensors() {
        let name = info.name.as_str();
        let Some(k) = parse_direction(name) else {
            return Err(bad(format!(
                "tensor `{name}` is not named `direction.<layer>` (llama.cpp refuses it: \
                 \"invalid/unparsable direction tensor layer index\")"
            )));
        };
        if k == 0 {
            return Err(bad(format!(
                "tensor `{name}`: llama.cpp rejects layer index 0 (\"invalid (zero) direction tensor layer \
                 index\"); its directions start at direction.1 = the output of block 1 (0-based)"
            )));
        }
        let Some(l) = index_for_direction(k, n) else {
            return Err(bad(format!(
                "tensor `{name}` is out of range for this model (N={n} blocks): llama.cpp applies \
                 direction.1..=direction.{} only",
                n.saturating_sub(1)
            )));
        };
        if info.ggml_type != GgmlType::F32 {
            return Err(bad(format!("tensor `{name}` has type {}; llama.cpp control vectors are F32", info.ggml_type)));
        }
        if info.dims.len() != 1 {
            return Err(bad(format!("tensor `{name}` has shape {:?}; directions are 1-D [hidden]", info.shape())));
        }
        let len = info.dims[0] as usize;
        if len != h {
            return Err(bad(format!("tensor `{name}` has {len} values but the model's hidden size is H={h}")));
        }
        let data = g.tensor(name)?.to_f32();
        // llama.cpp sums several tensors for the same layer ("direction.5" and "direction.05").
        for (dst, x) in v.layer_mut(l).iter_mut().zip(data) {
            *dst += x;
        }
    }
    let mut md = BTreeMap::new();
    for (k, val) in g.metadata() {
        if k.starts_with("general.") || k.starts_with("controlvector.") {
            continue;
        }
        if let Some(s) = val.as_str() {
            md.insert(k.clone(), s.to_string());
        }
    }
    v.name = md
        .remove(NAME_KEY)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    md.insert("persona.source_format".into(), SOURCE_FORMAT.into());
    if let Some(hint) = g.get_str("controlvector.model_hint") {
        md.insert("persona.model".into(), hint.into());
    }
    v.metadata = md;
    v.source = Some(path.to_path_buf());
    Ok(v)
}

/// Write `v` as a llama.cpp control vector: `direction.{L-1}` for each of our non-zero rows L
/// (2..=N). Errors when a non-zero row has no llama.cpp equivalent (index 0 or 1), when a row
/// to be written is not finite, or when there is nothing to write. `controlvector.layer_count`
/// is written as llama.cpp's `cvector-generator` writes it: i32 `N - 1`. The vector's string
/// metadata and name go along as extra keys (llama.cpp ignores them), so that an import gives
/// them back. Written atomically (temporary file + rename).
pub fn export_control_vector(v: &PersonaVector, path: impl AsRef<Path>, model_hint: &str) -> Result<()> {
    let path = path.as_ref();
    let n = v.n_layers;
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for l in 0..=n {
        if v.is_zero(l) {
            continue;
        }
        let Some(k) = direction_for_index(l, n) else {
            let what = if l == 0 { "the embedding output" } else { "the output of block 0" };
            return Err(Error::format(
                v.origin(),
                format!(
                    "layer {l} ({what}) is non-zero, but llama.cpp control vectors cannot steer it \
                     (its directions start at our layer 2 = direction.1); zero that layer to export"
                ),
            ));
        };
        if let Some(i) = v.layer(l).iter().position(|x| !x.is_finite()) {
            return Err(Error::format(
                v.origin(),
                format!("layer {l} has a NaN or infinite value (element {i}); refusing to export it"),
            ));
        }
        tensors.push((format!("direction.{k}"), vec![v.hidden], v.layer(l)));
    }
    if tensors.is_empty() {
        return Err(Error::format(
            v.origin(),
            "every layer is zero: nothing to export (llama.cpp refuses a control vector without directions)",
        ));
    }
    let layer_count = i32::try_from(n - 1).map_err(|_| Error::Invalid(format!("N={n} is too large")))?;
    let mut md: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::Str(ARCHITECTURE.into())),
        ("controlvector.model_hint".into(), GgufValue::Str(model_hint.into())),
        ("controlvector.layer_count".into(), GgufValue::I32(layer_count)),
        (NAME_KEY.into(), GgufValue::Str(v.name.clone())),
    ];
    for (k, val) in &v.metadata {
        if k.starts_with("general.") || k.starts_with("controlvector.") || k == NAME_KEY {
            continue;
        }
        md.push((k.clone(), GgufValue::Str(val.clone())));
    }
    // write_gguf writes in place; go through a temporary file for atomicity.
    crate::atomic_file::write_atomic_with(path, |tmp| crate::model::gguf::write_gguf(tmp, &md, &tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::write_gguf;
    use std::path::PathBuf;

    fn cfg(n_layers: usize, hidden: usize) -> ModelConfig {
        let text = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{hidden},"intermediate_size":16,
               "num_hidden_layers":{n_layers},"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,
               "vocab_size":32,"rms_norm_eps":1e-5}}"#
        );
        ModelConfig::from_hf_str(&text, Path::new("config.json")).unwrap()
    }

    fn cv_meta() -> Vec<(String, GgufValue)> {
        vec![
            ("general.architecture".into(), GgufValue::Str("controlvector".into())),
            ("controlvector.model_hint".into(), GgufValue::Str("llama".into())),
            ("controlvector.layer_count".into(), GgufValue::I32(7)),
        ]
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    fn assert_has(msg: &str, needles: &[&str]) {
        for n in needles {
            assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
        }
    }

    #[test]
    fn index_mapping_functions() {
        // N = 8: directions 1..=7 ↔ our 2..=8.
        assert_eq!(index_for_direction(0, 8), None);
        assert_eq!(index_for_direction(1, 8), Some(2));
        assert_eq!(index_for_direction(5, 8), Some(6));
        assert_eq!(index_for_direction(7, 8), Some(8));
        assert_eq!(index_for_direction(8, 8), None);
        assert_eq!(direction_for_index(0, 8), None);
        assert_eq!(direction_for_index(1, 8), None);
        assert_eq!(direction_for_index(2, 8), Some(1));
        assert_eq!(direction_for_index(6, 8), Some(5));
        assert_eq!(direction_for_index(8, 8), Some(7));
        assert_eq!(direction_for_index(9, 8), None);
        for l in 0..=8 {
            if let Some(k) = direction_for_index(l, 8) {
                assert_eq!(index_for_direction(k, 8), Some(l));
            }
        }
    }

    /// Pins the mapping: `direction.5` (added by llama.cpp to the output of 0-based block 5)
    /// is our index 6. If this fails, the llama.cpp mapping changed: re-read the module docs.
    #[test]
    fn direction_5_is_our_index_6() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hand.gguf");
        let dir5: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let dir1 = vec![0.25f32; 8];
        write_gguf(&p, &cv_meta(), &[("direction.5".into(), vec![8], &dir5), ("direction.1".into(), vec![8], &dir1)])
            .unwrap();
        let v = import_control_vector(&p, &cfg(8, 8)).unwrap();
        assert_eq!((v.n_layers, v.hidden), (8, 8));
        assert_eq!(v.layer(6), &dir5[..]);
        assert_eq!(v.layer(2), &dir1[..]);
        for l in [0, 1, 3, 4, 5, 7, 8] {
            assert!(v.is_zero(l), "row {l} should be zero");
        }
        assert_eq!(v.name, "hand");
        assert_eq!(v.metadata.get("persona.source_format").map(String::as_str), Some(SOURCE_FORMAT));
        assert_eq!(v.metadata.get("persona.model").map(String::as_str), Some("llama"));
        assert_eq!(v.source.as_deref(), Some(p.as_path()));
    }

    #[test]
    fn export_then_import_is_identity_on_mappable_rows() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.gguf");
        let (n, h) = (6, 5);
        let mut v = PersonaVector::zeros("optimism", n, h).unwrap();
        for l in 2..=n {
            for (i, x) in v.layer_mut(l).iter_mut().enumerate() {
                *x = (l * 10 + i) as f32 * 0.37 - 4.0;
            }
        }
        v.layer_mut(4).fill(0.0); // a zero row is simply not written
        v.metadata.insert("persona.trait".into(), "optimism".into());
        v.metadata.insert("persona.layer".into(), "3".into());
        export_control_vector(&v, &p, "llama").unwrap();

        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.get_str("general.architecture"), Some("controlvector"));
        assert_eq!(g.get_str("controlvector.model_hint"), Some("llama"));
        assert_eq!(g.get("controlvector.layer_count"), Some(&GgufValue::I32(5)));
        let mut names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["direction.1", "direction.2", "direction.4", "direction.5"]);
        assert_eq!(g.tensor("direction.1").unwrap().to_f32(), v.layer(2));

        let w = import_control_vector(&p, &cfg(n, h)).unwrap();
        assert_eq!(w.data, v.data, "rows 0 and 1 are zero in both, rows 2..=N identical");
        assert_eq!(w.name, "optimism");
        assert_eq!(w.metadata.get("persona.trait").map(String::as_str), Some("optimism"));
        assert_eq!(w.metadata.get("persona.layer").map(String::as_str), Some("3"));
        assert_eq!(w.metadata.get("persona.model").map(String::as_str), Some("llama"));
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn export_refuses_unmappable_and_bad_rows() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.gguf");
        let mut v = PersonaVector::zeros("v", 4, 3).unwrap();
        v.source = Some(PathBuf::from("v.safetensors"));
        assert_has(&err_text(export_control_vector(&v, &p, "llama")), &["v.safetensors", "nothing to export"]);
        v.layer_mut(3)[0] = 1.0;
        v.layer_mut(1)[2] = 0.5;
        assert_has(
            &err_text(export_control_vector(&v, &p, "llama")),
            &["v.safetensors", "layer 1", "block 0", "llama.cpp"],
        );
        v.layer_mut(1).fill(0.0);
        v.layer_mut(0)[0] = 0.5;
        assert_has(&err_text(export_control_vector(&v, &p, "llama")), &["layer 0", "embedding"]);
        v.layer_mut(0).fill(0.0);
        v.layer_mut(4)[1] = f32::NAN;
        assert_has(&err_text(export_control_vector(&v, &p, "llama")), &["layer 4", "NaN"]);
        assert!(!p.exists());
        v.layer_mut(4)[1] = 2.0;
        export_control_vector(&v, &p, "llama").unwrap();
        assert!(p.exists());
    }

    #[test]
    fn import_errors_name_the_problem() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(8, 8);
        let row = [1.0f32; 8];
        let write = |name: &str, md: &[(String, GgufValue)], t: &[(String, Vec<usize>, &[f32])]| {
            let p = d.path().join(name);
            write_gguf(&p, md, t).unwrap();
            p
        };
        let one = |k: &str| vec![(k.to_string(), vec![8usize], &row[..])];

        let p = d.path().join("not.gguf");
        std::fs::write(&p, b"{\"json\": true}").unwrap();
        assert_has(&err_text(import_control_vector(&p, &c)), &["not.gguf", "not a GGUF"]);

        let mut model_md = cv_meta();
        model_md[0].1 = GgufValue::Str("llama".into());
        let p = write("model.gguf", &model_md, &one("direction.1"));
        assert_has(&err_text(import_control_vector(&p, &c)), &["model.gguf", "`llama`", "controlvector"]);

        let p = write("noarch.gguf", &cv_meta()[1..], &one("direction.1"));
        assert_has(&err_text(import_control_vector(&p, &c)), &["noarch.gguf", "general.architecture"]);

        let p = write("zero.gguf", &cv_meta(), &one("direction.0"));
        assert_has(&err_text(import_control_vector(&p, &c)), &["zero.gguf", "direction.0", "llama.cpp rejects"]);

        let p = write("far.gguf", &cv_meta(), &one("direction.8"));
        assert_has(&err_text(import_control_vector(&p, &c)), &["far.gguf", "direction.8", "out of range", "N=8"]);
        // direction.7 is the last block's output: accepted, our index 8.
        let p = write("last.gguf", &cv_meta(), &one("direction.7"));
        assert_eq!(import_control_vector(&p, &c).unwrap().layer(8), &row[..]);

        let short = [1.0f32; 6];
        let p = write("short.gguf", &cv_meta(), &[("direction.2".into(), vec![6], &short[..])]);
        assert_has(&err_text(import_control_vector(&p, &c)), &["short.gguf", "6 values", "H=8"]);

        let p = write("twod.gguf", &cv_meta(), &[("direction.2".into(), vec![2, 4], &row[..])]);
        assert_has(&err_text(import_control_vector(&p, &c)), &["twod.gguf", "1-D"]);

        let p = write("odd.gguf", &cv_meta(), &one("dir.2"));
        assert_has(&err_text(import_control_vector(&p, &c)), &["odd.gguf", "`dir.2`", "direction.<layer>"]);
        let p = write("neg.gguf", &cv_meta(), &one("direction.-1"));
        assert_has(&err_text(import_control_vector(&p, &c)), &["neg.gguf", "direction.-1"]);

        let p = write("empty.gguf", &cv_meta(), &[]);
        assert_has(&err_text(import_control_vector(&p, &c)), &["empty.gguf", "no direction tensors"]);

        // llama.cpp sums directions for the same layer.
        let p = write(
            "dup.gguf",
            &cv_meta(),
            &[("direction.3".into(), vec![8], &row[..]), ("direction.03".into(), vec![8], &row[..])],
        );
        assert_eq!(import_control_vector(&p, &c).unwrap().layer(4), &[2.0f32; 8][..]);
    }

    #[test]
    fn load_for_model_dispatches_on_magic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cv.gguf");
        let row = [0.5f32; 8];
        write_gguf(&p, &cv_meta(), &[("direction.2".into(), vec![8], &row[..])]).unwrap();
        // The extension does not matter, the magic does.
        let q = d.path().join("cv.safetensors");
        std::fs::copy(&p, &q).unwrap();
        for path in [&p, &q] {
            let v = PersonaVector::load_for_model(path, &cfg(8, 8)).unwrap();
            assert_eq!(v.layer(3), &row[..]);
            assert!(PersonaVector::load(path).unwrap_err().to_string().contains("load_for_model"));
        }
        // A safetensors vector is checked against the model.
        let s = d.path().join("s.safetensors");
        PersonaVector::zeros("s", 8, 8).unwrap().save(&s).unwrap();
        assert!(PersonaVector::load_for_model(&s, &cfg(8, 8)).is_ok());
        assert_has(&err_text(PersonaVector::load_for_model(&s, &cfg(6, 8))), &["s.safetensors", "N=8", "N=6"]);
    }
}
