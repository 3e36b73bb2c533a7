//! The file formats of a [`PersonaVector`]: reading, writing and recognising them.
//!
//! Persona format (DESIGN.md, "File formats"): safetensors with one F32 tensor `vector` of shape
//! `[N+1, H]` and string metadata (`persona.trait`, `persona.model`, `persona.method`,
//! `persona.layer`, counts, ...). The vector's name is stored as `persona.name`; without it the
//! file stem is the name. llama.cpp control vectors (GGUF) are read through
//! [`PersonaVector::load_for_model`], which needs the model's N to map their layers
//! (see [`crate::steer::control_vector`]). Files are written atomically ([`write_atomic`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensorError, TensorView};
use safetensors::SafeTensors;

use super::PersonaVector;
use crate::atomic_file::write_atomic;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// Name of the tensor that holds the vector in a persona safetensors file.
pub const VECTOR_TENSOR: &str = "vector";
/// Metadata key for the vector's name (taken out of [`PersonaVector::metadata`] on load).
pub const NAME_KEY: &str = "persona.name";
/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` starts with the GGUF magic (a llama.cpp control vector, or a model).
pub fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(got == 4 && &magic == GGUF_MAGIC)
}

fn describe(e: &SafeTensorError, len: usize) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            format!("file is {len} bytes, shorter than the 8-byte safetensors header length (truncated?)")
        }
        SafeTensorError::HeaderTooLarge => {
            "safetensors header length is over 100 MB: not a safetensors file, or a corrupt header".into()
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("safetensors header length points past the end of the file ({len} bytes): truncated?")
        }
        SafeTensorError::InvalidHeader | SafeTensorError::InvalidHeaderStart => {
            "safetensors header is not UTF-8 JSON: not a safetensors file?".into()
        }
        SafeTensorError::InvalidHeaderDeserialization => {
            "safetensors header is not valid (bad JSON, or non-string `__metadata__` values)".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("tensor data does not match the file size ({len} bytes): truncated or trailing bytes")
        }
        SafeTensorError::InvalidOffset(name) => format!("tensor `{name}` has invalid data offsets"),
        SafeTensorError::TensorInvalidInfo => "a tensor's shape, dtype and data offsets disagree".into(),
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".into(),
        other => format!("{other:?}"),
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "vector".into())
}

impl PersonaVector {
    /// Read a persona safetensors file. A GGUF file (llama.cpp control vector) is refused with a
    /// pointer to [`Self::load_for_model`], since mapping its layers needs the model's N.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.starts_with(GGUF_MAGIC) {
            return Err(Error::format(
                path,
                "this is a GGUF file (a llama.cpp control vector?); mapping its `direction.K` tensors onto \
                 residual indices needs the model's layer count: load it with PersonaVector::load_for_model \
                 (on the command line: `persona vectors FILE --model M`)",
            ));
        }
        Self::from_safetensors_bytes(&bytes, path)
    }

    /// Read a persona vector for a given model: persona safetensors (checked against the model's
    /// N and H, and its recorded model fingerprint: [`PersonaVector::check_identity`]) or a llama.cpp control-vector GGUF (imported with
    /// [`crate::steer::control_vector::import_control_vector`]).
    pub fn load_for_model(path: impl AsRef<Path>, cfg: &ModelConfig) -> Result<Self> {
        let path = path.as_ref();
        if is_gguf(path)? {
            return crate::steer::control_vector::import_control_vector(path, cfg);
        }
        let v = Self::load(path)?;
        v.check_model(cfg.hidden, cfg.n_layers)?;
        v.check_identity(cfg)?;
        Ok(v)
    }

    /// Parse the bytes of a persona safetensors file; `path` is for the name and error messages.
    pub fn from_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |m: String| Error::format(path, m);
        let (n, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(describe(&e, bytes.len())))?;
        let tensors = meta.tensors();
        let Some(info) = tensors.get(VECTOR_TENSOR) else {
            let mut names: Vec<&str> = tensors.keys().map(String::as_str).collect();
            names.sort();
            let found = if names.is_empty() { "no tensors".to_string() } else { names.join(", ") };
            return Err(bad(format!("no tensor `{VECTOR_TENSOR}` (found: {found}); not a persona vector file")));
        };
        if info.dtype != Dtype::F32 {
            return Err(bad(format!("tensor `{VECTOR_TENSOR}` has dtype {:?}; persona vectors are F32", info.dtype)));
        }
        if info.shape.len() != 2 {
            return Err(bad(format!("tensor `{VECTOR_TENSOR}` has shape {:?}; expected 2-D [N+1, H]", info.shape)));
        }
        let (rows, hidden) = (info.shape[0], info.shape[1]);
        if rows < 2 {
            return Err(bad(format!(
                "tensor `{VECTOR_TENSOR}` has {rows} row(s); a persona vector needs at least 2 \
                 (the embedding output and one block's output)"
            )));
        }
        if hidden == 0 {
            return Err(bad(format!("tensor `{VECTOR_TENSOR}` has shape {:?}: zero width", info.shape)));
        }
        let (s, e) = info.data_offsets;
        let start = 8 + n + s;
        let end = 8 + n + e;
        if end > bytes.len() || e - s != rows * hidden * 4 {
            return Err(bad(format!("tensor `{VECTOR_TENSOR}` data is out of bounds or the wrong size (truncated?)")));
        }
        let data: Vec<f32> =
            bytes[start..end].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut metadata: BTreeMap<String, String> = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let name = metadata.remove(NAME_KEY).filter(|n| !n.is_empty()).unwrap_or_else(|| file_stem(path));
        let mut v = Self::new(name, rows - 1, hidden, data).map_err(|e| bad(e.to_string()))?;
        v.metadata = metadata;
        v.source = Some(path.to_path_buf());
        Ok(v)
    }

    /// The persona safetensors bytes of this vector (metadata + `persona.name`).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let raw: Vec<u8> = self.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![self.rows(), self.hidden], &raw)
            .map_err(|e| Error::Invalid(format!("vector `{}`: {e:?}", self.name)))?;
        let mut md: HashMap<String, String> = self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        md.insert(NAME_KEY.to_string(), self.name.clone());
        safetensors::serialize([(VECTOR_TENSOR, view)], &Some(md))
            .map_err(|e| Error::Invalid(format!("vector `{}`: cannot serialise: {e:?}", self.name)))
    }

    /// Write as persona safetensors, atomically (temporary file in the same folder, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_safetensors_bytes()?;
        write_atomic(path.as_ref(), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steer::vector::tests::{assert_has, err_text, small};
    use std::path::PathBuf;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// A safetensors file with arbitrary tensors and metadata.
    fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], md: Option<HashMap<String, String>>) {
        let views: Vec<(&str, TensorView)> =
            tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())).collect();
        std::fs::write(path, safetensors::serialize(views, &md).unwrap()).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn round_trip_with_metadata() {
        let d = tmpdir();
        let p = d.path().join("evil.safetensors");
        let mut v = small("evil-v2", [[0.0, 0.0, 0.0], [1.0, -2.5, 3.25], [1e-30, f32::MAX, -0.0]]);
        v.metadata.insert("persona.trait".into(), "evil".into());
        v.metadata.insert("persona.layer".into(), "2".into());
        v.metadata.insert("persona.n_pos".into(), "17".into());
        v.metadata.insert("note".into(), "naïve — 数学".into());
        v.save(&p).unwrap();
        let w = PersonaVector::load(&p).unwrap();
        assert_eq!(w.name, "evil-v2");
        assert_eq!((w.n_layers, w.hidden), (2, 3));
        assert_eq!(w.metadata, v.metadata);
        assert_eq!(
            w.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(w.source.as_deref(), Some(p.as_path()));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Overwriting works (rename over an existing file).
        v.scaled(2.0).save(&p).unwrap();
        assert_eq!(PersonaVector::load(&p).unwrap().layer(1), &[2.0, -5.0, 6.5]);
    }

    #[test]
    fn name_is_file_stem_without_metadata() {
        let d = tmpdir();
        let p = d.path().join("humour.safetensors");
        write_st(&p, &[("vector", Dtype::F32, vec![2, 2], f32_bytes(&[0.0, 0.0, 1.0, 2.0]))], None);
        let v = PersonaVector::load(&p).unwrap();
        assert_eq!(v.name, "humour");
        assert!(v.metadata.is_empty());
        assert_eq!((v.n_layers, v.hidden), (1, 2));
    }

    #[test]
    fn bad_files_are_refused_with_clear_errors() {
        let d = tmpdir();
        let p = |n: &str| d.path().join(n);

        write_st(&p("no_vector.st"), &[("other", Dtype::F32, vec![2, 2], f32_bytes(&[0.0; 4]))], None);
        assert_has(&err_text(PersonaVector::load(p("no_vector.st"))), &["no_vector.st", "no tensor `vector`", "other"]);

        write_st(&p("f16.st"), &[("vector", Dtype::F16, vec![2, 2], vec![0u8; 8])], None);
        assert_has(&err_text(PersonaVector::load(p("f16.st"))), &["f16.st", "F16", "F32"]);

        write_st(&p("one_d.st"), &[("vector", Dtype::F32, vec![4], f32_bytes(&[0.0; 4]))], None);
        assert_has(&err_text(PersonaVector::load(p("one_d.st"))), &["one_d.st", "[4]", "2-D"]);

        write_st(&p("three_d.st"), &[("vector", Dtype::F32, vec![2, 1, 2], f32_bytes(&[0.0; 4]))], None);
        assert_has(&err_text(PersonaVector::load(p("three_d.st"))), &["[2, 1, 2]", "2-D"]);

        write_st(&p("one_row.st"), &[("vector", Dtype::F32, vec![1, 4], f32_bytes(&[1.0; 4]))], None);
        assert_has(&err_text(PersonaVector::load(p("one_row.st"))), &["one_row.st", "1 row", "at least 2"]);

        write_st(&p("zero_w.st"), &[("vector", Dtype::F32, vec![3, 0], vec![])], None);
        assert_has(&err_text(PersonaVector::load(p("zero_w.st"))), &["zero width"]);

        // Truncated: a good file cut short.
        let good = small("g", [[1.0; 3]; 3]).to_safetensors_bytes().unwrap();
        std::fs::write(p("trunc.st"), &good[..good.len() - 5]).unwrap();
        assert_has(&err_text(PersonaVector::load(p("trunc.st"))), &["trunc.st", "truncated"]);
        std::fs::write(p("trunc_hdr.st"), &good[..20]).unwrap();
        assert_has(&err_text(PersonaVector::load(p("trunc_hdr.st"))), &["trunc_hdr.st", "past the end", "truncated"]);
        std::fs::write(p("tiny.st"), [1u8, 2, 3]).unwrap();
        assert_has(&err_text(PersonaVector::load(p("tiny.st"))), &["tiny.st", "3 bytes", "truncated"]);
        std::fs::write(p("empty.st"), []).unwrap();
        assert_has(&err_text(PersonaVector::load(p("empty.st"))), &["empty.st", "0 bytes"]);

        // Not safetensors at all.
        std::fs::write(p("text.st"), b"hello, this is certainly not a safetensors file").unwrap();
        assert!(err_text(PersonaVector::load(p("text.st"))).contains("text.st"));

        // Missing file.
        assert_has(&err_text(PersonaVector::load(p("missing.st"))), &["missing.st"]);

        // GGUF needs the model-aware loader.
        std::fs::write(p("cv.gguf"), b"GGUF\x03\x00\x00\x00").unwrap();
        assert_has(&err_text(PersonaVector::load(p("cv.gguf"))), &["cv.gguf", "GGUF", "load_for_model", "--model"]);
    }

    #[test]
    fn nan_loads_but_check_layer_refuses_it() {
        let d = tmpdir();
        let p = d.path().join("nan.safetensors");
        small("n", [[0.0; 3], [1.0, f32::NAN, 0.0], [0.0, 0.0, f32::INFINITY]]).save(&p).unwrap();
        let v = PersonaVector::load(&p).unwrap();
        assert!(v.layer(1)[1].is_nan());
        assert_has(&err_text(v.check_layer(1)), &["nan.safetensors", "layer 1", "NaN"]);
        assert_has(&err_text(v.check_layer(2)), &["layer 2", "inf"]);
        assert_has(&err_text(v.check_layer(0)), &["layer 0", "all zero"]);
        assert_has(&err_text(v.check_layer(3)), &["nan.safetensors", "layer 3", "0..=2"]);
        assert!(v.unit(1).is_err());
    }

    #[test]
    fn loads_reference_fixtures() {
        let v = PersonaVector::load(fixture("tests/fixtures/smollm2_extracted_vector.safetensors")).unwrap();
        assert_eq!((v.n_layers, v.hidden, v.rows()), (30, 576, 31));
        assert_eq!(v.name, "smollm2_extracted_vector");
        assert_eq!(v.metadata.get("method").map(String::as_str), Some("response_avg_diff"));
        assert!(v.metadata.contains_key("pos_system"));
        assert!(v.data.iter().all(|x| x.is_finite()));
        assert!(v.check_layer(12).is_ok());
        assert!(v.check_model(576, 30).is_ok());

        let t = PersonaVector::load(fixture("tests/fixtures/tiny-llama/test_vector.safetensors")).unwrap();
        assert_eq!((t.n_layers, t.hidden), (3, 64));
        assert_eq!(t.name, "test_vector");
        assert!(t.metadata.is_empty());
    }
}
