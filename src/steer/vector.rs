//! [`PersonaVector`]: one direction per residual index of a model, its file format and arithmetic.
//!
//! A persona vector is `v[0..=N][H]` f32 for a model with N decoder blocks and hidden size H.
//! Index 0 is the embedding output; index L (1..=N) is the residual stream after block L-1
//! (0-based), before the final norm (DESIGN.md, "Method").
//!
//! File format (DESIGN.md, "File formats"): safetensors with one F32 tensor `vector` of shape
//! `[N+1, H]` and string metadata (`persona.trait`, `persona.model`, `persona.method`,
//! `persona.layer`, counts, ...). The vector's name is stored as `persona.name`; without it the
//! file stem is the name. llama.cpp control vectors (GGUF) are read through
//! [`PersonaVector::load_for_model`], which needs the model's N to map their layers
//! (see [`crate::steer::control_vector`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensorError, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// Name of the tensor that holds the vector in a persona safetensors file.
pub const VECTOR_TENSOR: &str = "vector";
/// Metadata key for the vector's name (taken out of [`PersonaVector::metadata`] on load).
pub const NAME_KEY: &str = "persona.name";
/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// A persona vector: `n_layers + 1` rows of `hidden` f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonaVector {
    /// File stem unless the metadata (`persona.name`) says otherwise.
    pub name: String,
    /// N, the model's decoder blocks; there are N+1 rows.
    pub n_layers: usize,
    /// H, the model's hidden size.
    pub hidden: usize,
    /// `[(N+1) * H]`, row L = residual index L.
    pub data: Vec<f32>,
    /// `persona.trait`, `persona.model`, `persona.method`, `persona.layer`, counts, ...
    pub metadata: BTreeMap<String, String>,
    /// The file it was loaded from, for error messages.
    pub source: Option<PathBuf>,
}

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

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

impl PersonaVector {
    /// A vector from its rows; `data.len()` must be `(n_layers + 1) * hidden`.
    pub fn new(name: impl Into<String>, n_layers: usize, hidden: usize, data: Vec<f32>) -> Result<Self> {
        let name = name.into();
        if n_layers == 0 || hidden == 0 {
            return Err(Error::Invalid(format!(
                "persona vector `{name}`: N={n_layers}, H={hidden}; both must be at least 1"
            )));
        }
        let want = (n_layers + 1).checked_mul(hidden);
        if want != Some(data.len()) {
            return Err(Error::Invalid(format!(
                "persona vector `{name}`: {} values, but N={n_layers}, H={hidden} needs (N+1)·H = {}",
                data.len(),
                want.map(|w| w.to_string()).unwrap_or_else(|| "overflow".into())
            )));
        }
        Ok(PersonaVector { name, n_layers, hidden, data, metadata: BTreeMap::new(), source: None })
    }

    /// An all-zero vector.
    pub fn zeros(name: impl Into<String>, n_layers: usize, hidden: usize) -> Result<Self> {
        let n = (n_layers + 1).checked_mul(hidden).ok_or_else(|| Error::Invalid("vector size overflows".into()))?;
        Self::new(name, n_layers, hidden, vec![0.0; n])
    }

    /// Rows: N+1.
    pub fn rows(&self) -> usize {
        self.n_layers + 1
    }

    /// What error messages call this vector: its file if it has one, else its name.
    pub fn origin(&self) -> PathBuf {
        self.source.clone().unwrap_or_else(|| PathBuf::from(format!("<vector {}>", self.name)))
    }

    /// Row `l` (residual index 0..=N). Panics when `l > N`, like slice indexing; use
    /// [`Self::check_layer`] first for a layer that comes from a user.
    pub fn layer(&self, l: usize) -> &[f32] {
        assert!(l <= self.n_layers, "layer {l} out of range 0..={} for vector `{}`", self.n_layers, self.name);
        &self.data[l * self.hidden..(l + 1) * self.hidden]
    }

    /// Row `l`, mutable. Panics when `l > N`.
    pub fn layer_mut(&mut self, l: usize) -> &mut [f32] {
        assert!(l <= self.n_layers, "layer {l} out of range 0..={} for vector `{}`", self.n_layers, self.name);
        &mut self.data[l * self.hidden..(l + 1) * self.hidden]
    }

    /// Euclidean norm of row `l` (f64 accumulation).
    pub fn norm(&self, l: usize) -> f32 {
        dot64(self.layer(l), self.layer(l)).sqrt() as f32
    }

    /// Norm of every row, index 0..=N.
    pub fn norms(&self) -> Vec<f32> {
        (0..=self.n_layers).map(|l| self.norm(l)).collect()
    }

    /// Whether row `l` is exactly zero.
    pub fn is_zero(&self, l: usize) -> bool {
        self.layer(l).iter().all(|&x| x == 0.0)
    }

    /// The row with the largest finite norm (0 when every row is zero or non-finite).
    pub fn max_norm_layer(&self) -> usize {
        let mut best = (0, 0.0f32);
        for (l, n) in self.norms().into_iter().enumerate() {
            if n.is_finite() && n > best.1 {
                best = (l, n);
            }
        }
        best.0
    }

    /// Unit vector of row `l`. Errors when the row is zero or not finite.
    pub fn unit(&self, l: usize) -> Result<Vec<f32>> {
        self.check_layer(l)?;
        let n = dot64(self.layer(l), self.layer(l)).sqrt();
        if n == 0.0 || !n.is_finite() {
            return Err(Error::format(self.origin(), format!("layer {l} has norm {n}; it has no unit vector")));
        }
        Ok(self.layer(l).iter().map(|&x| (x as f64 / n) as f32).collect())
    }

    /// Check that this vector fits a model with hidden size `hidden` and `n_layers` blocks.
    pub fn check_model(&self, hidden: usize, n_layers: usize) -> Result<()> {
        if self.hidden == hidden && self.n_layers == n_layers {
            return Ok(());
        }
        Err(Error::format(
            self.origin(),
            format!(
                "vector has {} rows × {} (N={}, H={}) but the model has N={n_layers}, H={hidden}",
                self.rows(),
                self.hidden,
                self.n_layers,
                self.hidden
            ),
        ))
    }

    /// Check that layer `l` can be used to steer or monitor: in 0..=N, finite, not all zero.
    pub fn check_layer(&self, l: usize) -> Result<()> {
        let bad = |m: String| Err(Error::format(self.origin(), m));
        if l > self.n_layers {
            return bad(format!("layer {l} is out of range: this vector has layers 0..={}", self.n_layers));
        }
        if let Some(i) = self.layer(l).iter().position(|x| !x.is_finite()) {
            return bad(format!("layer {l} has a NaN or infinite value (element {i} is {})", self.layer(l)[i]));
        }
        if self.is_zero(l) {
            return bad(format!("layer {l} is all zero: nothing to steer with or project onto"));
        }
        Ok(())
    }

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
    /// N and H) or a llama.cpp control-vector GGUF (imported with
    /// [`crate::steer::control_vector::import_control_vector`]).
    pub fn load_for_model(path: impl AsRef<Path>, cfg: &ModelConfig) -> Result<Self> {
        let path = path.as_ref();
        if is_gguf(path)? {
            return crate::steer::control_vector::import_control_vector(path, cfg);
        }
        let v = Self::load(path)?;
        v.check_model(cfg.hidden, cfg.n_layers)?;
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

    fn same_shape(&self, other: &PersonaVector, what: &str) -> Result<()> {
        if self.n_layers == other.n_layers && self.hidden == other.hidden {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "cannot {what} `{}` (N={}, H={}) and `{}` (N={}, H={}): shapes differ",
            self.name, self.n_layers, self.hidden, other.name, other.n_layers, other.hidden
        )))
    }

    fn derived(&self, name: String, how: String, data: Vec<f32>) -> Self {
        let mut metadata = self.metadata.clone();
        metadata.insert("persona.derived".into(), how);
        PersonaVector { name, n_layers: self.n_layers, hidden: self.hidden, data, metadata, source: None }
    }

    /// A copy with every row outside `layers` set to zero (e.g. to export one layer as a llama.cpp
    /// control vector). Errors when a layer is out of range. Keeps `source` for error messages.
    pub fn only_layers(&self, layers: &[usize]) -> Result<Self> {
        if let Some(&l) = layers.iter().find(|&&l| l > self.n_layers) {
            return Err(Error::format(
                self.origin(),
                format!("layer {l} is out of range: this vector has layers 0..={}", self.n_layers),
            ));
        }
        let mut data = vec![0.0; self.data.len()];
        for &l in layers {
            data[l * self.hidden..(l + 1) * self.hidden].copy_from_slice(self.layer(l));
        }
        let list: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
        let mut v = self.derived(self.name.clone(), format!("layer {} of {}", list.join(","), self.name), data);
        v.source = self.source.clone();
        Ok(v)
    }

    /// `c · self` (every row).
    pub fn scaled(&self, c: f32) -> Self {
        let data = self.data.iter().map(|&x| x * c).collect();
        self.derived(self.name.clone(), format!("{c} × {}", self.name), data)
    }

    /// `self + other`, row by row; shapes must match.
    pub fn add(&self, other: &PersonaVector) -> Result<Self> {
        self.same_shape(other, "add")?;
        let data = self.data.iter().zip(&other.data).map(|(&a, &b)| a + b).collect();
        Ok(self.derived(format!("{}+{}", self.name, other.name), format!("{} + {}", self.name, other.name), data))
    }

    /// Per layer `v − (v·û)û` with `û` the unit of `other`'s row; rows where `other` is zero
    /// are left unchanged. Shapes must match.
    pub fn orthogonalized_against(&self, other: &PersonaVector) -> Result<Self> {
        self.same_shape(other, "orthogonalise")?;
        let mut data = self.data.clone();
        for l in 0..=self.n_layers {
            let u = other.layer(l);
            let uu = dot64(u, u);
            if uu == 0.0 || !uu.is_finite() {
                continue;
            }
            // (v·û)û = (v·u / u·u) u
            let k = dot64(self.layer(l), u) / uu;
            for (x, &ui) in data[l * self.hidden..(l + 1) * self.hidden].iter_mut().zip(u) {
                *x = (*x as f64 - k * ui as f64) as f32;
            }
        }
        Ok(self.derived(self.name.clone(), format!("{} ⊥ {}", self.name, other.name), data))
    }

    /// Cosine similarity of the two vectors at layer `l`; None when either row is zero, the
    /// layer is missing from either, the widths differ, or the result is not finite.
    pub fn cosine(&self, other: &PersonaVector, l: usize) -> Option<f32> {
        if l > self.n_layers || l > other.n_layers || self.hidden != other.hidden {
            return None;
        }
        let (a, b) = (self.layer(l), other.layer(l));
        let (aa, bb) = (dot64(a, a), dot64(b, b));
        if aa == 0.0 || bb == 0.0 {
            return None;
        }
        let c = dot64(a, b) / (aa.sqrt() * bb.sqrt());
        c.is_finite().then_some(c as f32)
    }

    /// A one-line description: name, shape and the most telling metadata.
    pub fn summary(&self) -> String {
        let mut s = format!("{} (N={}, H={})", self.name, self.n_layers, self.hidden);
        for k in ["persona.trait", "persona.model", "persona.method", "persona.layer"] {
            if let Some(v) = self.metadata.get(k) {
                let _ = write!(s, ", {}={v}", k.trim_start_matches("persona."));
            }
        }
        s
    }
}

/// Pairwise cosine similarities at `layer`: `table[i][j] = vectors[i].cosine(vectors[j], layer)`.
pub fn cosine_table(vectors: &[&PersonaVector], layer: usize) -> Vec<Vec<Option<f32>>> {
    vectors.iter().map(|a| vectors.iter().map(|b| a.cosine(b, layer)).collect()).collect()
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a half-written file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{fname}.tmp-{}", std::process::id()));
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// N=2, H=3 with hand-picked rows.
    fn small(name: &str, rows: [[f32; 3]; 3]) -> PersonaVector {
        PersonaVector::new(name, 2, 3, rows.concat()).unwrap()
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    fn assert_has(msg: &str, needles: &[&str]) {
        for n in needles {
            assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
        }
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
    fn new_checks_length() {
        assert!(PersonaVector::new("a", 2, 3, vec![0.0; 9]).is_ok());
        assert_has(&err_text(PersonaVector::new("a", 2, 3, vec![0.0; 8])), &["8 values", "N=2", "H=3", "9"]);
        assert_has(&err_text(PersonaVector::new("a", 0, 3, vec![])), &["N=0"]);
        assert_has(&err_text(PersonaVector::new("a", 1, 0, vec![])), &["H=0"]);
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
    fn check_model_names_both_shapes() {
        let mut v = PersonaVector::zeros("x", 30, 576).unwrap();
        v.source = Some(PathBuf::from("vector.safetensors"));
        assert!(v.check_model(576, 30).is_ok());
        let msg = err_text(v.check_model(896, 24));
        assert_eq!(msg, "vector.safetensors: vector has 31 rows × 576 (N=30, H=576) but the model has N=24, H=896");
    }

    #[test]
    fn norms_units_and_zero_rows() {
        let v = small("a", [[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, -2.0, 0.0]]);
        assert_eq!(v.norms(), vec![0.0, 5.0, 2.0]);
        assert_eq!(v.unit(1).unwrap(), vec![0.6, 0.8, 0.0]);
        assert_eq!(v.unit(2).unwrap(), vec![0.0, -1.0, 0.0]);
        assert_has(&err_text(v.unit(0)), &["layer 0", "zero"]);
        assert!(v.is_zero(0) && !v.is_zero(1));
        assert_eq!(v.max_norm_layer(), 1);
        assert!(v.check_layer(1).is_ok());
    }

    #[test]
    fn arithmetic_matches_hand_computed_values() {
        let a = small("a", [[1.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1.0, 1.0, 1.0]]);
        let b = small("b", [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, -1.0, 2.0]]);

        let s = a.scaled(-2.0);
        assert_eq!(s.data, vec![-2.0, -0.0, -0.0, -6.0, -8.0, -0.0, -2.0, -2.0, -2.0]);
        assert_eq!(s.name, "a");

        let sum = a.add(&b).unwrap();
        assert_eq!(sum.data, vec![1.0, 0.0, 0.0, 3.0, 6.0, 0.0, 2.0, 0.0, 3.0]);
        assert_eq!(sum.name, "a+b");

        // Row 0: b is zero → unchanged. Row 1: û = (0,1,0), v·û = 4 → (3,0,0).
        // Row 2: u = (1,-1,2), v·u = 2, u·u = 6 → v − (1/3)u = (2/3, 4/3, 1/3).
        let o = a.orthogonalized_against(&b).unwrap();
        assert_eq!(o.layer(0), &[1.0, 0.0, 0.0]);
        assert_eq!(o.layer(1), &[3.0, 0.0, 0.0]);
        for (x, want) in o.layer(2).iter().zip([2.0 / 3.0, 4.0 / 3.0, 1.0 / 3.0]) {
            assert!((x - want).abs() < 1e-6, "{x} vs {want}");
        }
        assert!(dot64(o.layer(2), b.layer(2)).abs() < 1e-6);

        // cos at row 1: (3,4,0)·(0,2,0) = 8, |a|=5, |b|=2 → 0.8. Row 2: 2/(√3·√6) = √2/3.
        assert_eq!(a.cosine(&b, 0), None);
        assert!((a.cosine(&b, 1).unwrap() - 0.8).abs() < 1e-7);
        assert!((a.cosine(&b, 2).unwrap() - 2f32.sqrt() / 3.0).abs() < 1e-7);
        assert_eq!(a.cosine(&b, 3), None);
        assert!((a.cosine(&a, 2).unwrap() - 1.0).abs() < 1e-7);

        let t = cosine_table(&[&a, &b], 1);
        assert_eq!(t.len(), 2);
        assert!((t[0][0].unwrap() - 1.0).abs() < 1e-7 && (t[1][1].unwrap() - 1.0).abs() < 1e-7);
        assert_eq!(t[0][1], t[1][0]);
        assert!((t[0][1].unwrap() - 0.8).abs() < 1e-7);
        let t0 = cosine_table(&[&a, &b], 0);
        assert_eq!(t0[1], vec![None, None]);

        let only = a.only_layers(&[2]).unwrap();
        assert_eq!(only.data, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_has(&err_text(a.only_layers(&[3])), &["layer 3", "0..=2"]);

        let c = PersonaVector::zeros("c", 3, 3).unwrap();
        assert_has(&err_text(a.add(&c)), &["`a`", "`c`", "N=2", "N=3"]);
        assert!(a.orthogonalized_against(&c).is_err());
        assert_eq!(a.cosine(&c, 1), None);
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
