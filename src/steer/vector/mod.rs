//! [`PersonaVector`]: one direction per residual index of a model, and its arithmetic (norms,
//! units, checks, sums, orthogonalisation, cosines).
//!
//! A persona vector is `v[0..=N][H]` f32 for a model with N decoder blocks and hidden size H.
//! Index 0 is the embedding output; index L (1..=N) is the residual stream after block L-1
//! (0-based), before the final norm (DESIGN.md, "Method").
//!
//! Its files (persona safetensors; llama.cpp control-vector GGUF through
//! [`PersonaVector::load_for_model`]) are read and written in `file.rs`, whose constants and
//! [`is_gguf`] are re-exported here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::error::{Error, Result};

mod file;

pub use file::{is_gguf, GGUF_MAGIC, NAME_KEY, VECTOR_TENSOR};

/// Metadata key of the fingerprint of the model a vector was made from
/// ([`crate::model::load::fingerprint`]).
pub const FINGERPRINT_KEY: &str = "persona.model_fingerprint";

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

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
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

    /// sha256 of the vector's values (rows 0..=N, f32 little-endian): the same for the same
    /// numbers whatever file they came from. Steering receipts carry it.
    pub fn sha256(&self) -> String {
        let bytes: Vec<u8> = self.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        sha256_hex(&bytes)
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

    /// Check that this vector was made from the model `cfg` describes: an error when it records a
    /// fingerprint (`persona.model_fingerprint`) that differs from the model's, unless the model
    /// allows foreign vectors (`--force`), when the mismatch is a warning. `Ok(Some(warning))` also
    /// when the vector records no fingerprint (made elsewhere or by an older persona) — it fits
    /// the shape, but nothing says it comes from this model.
    pub fn check_identity(&self, cfg: &crate::model::ModelConfig) -> Result<Option<String>> {
        let Some(id) = &cfg.identity else { return Ok(None) };
        let made_from = self.metadata.get("persona.model").map(String::as_str).unwrap_or("an unnamed model");
        match self.metadata.get(FINGERPRINT_KEY) {
            None => Ok(Some(format!(
                "vector `{}` records no model fingerprint: it fits {}'s shape, but persona cannot tell whether it was \
                 made from this model (its metadata names {made_from})",
                self.name, id.name
            ))),
            Some(fp) if *fp == id.fingerprint => Ok(None),
            Some(fp) => {
                let msg = format!(
                    "vector `{}` was made from model `{made_from}` (fingerprint {fp}), but this model is `{}` \
                     (fingerprint {}): the shapes match, yet its directions belong to the other model's residual stream",
                    self.name, id.name, id.fingerprint
                );
                if id.allow_foreign {
                    Ok(Some(format!("{msg}; used anyway (--force)")))
                } else {
                    Err(Error::format(
                        self.origin(),
                        format!("{msg}. Use --force (HTTP: `?force=true` on upload) to use it anyway"),
                    ))
                }
            }
        }
    }

    /// Record `cfg`'s model (name and fingerprint) as the one this vector was made from.
    pub fn record_model(&mut self, cfg: &crate::model::ModelConfig) {
        if let Some(id) = &cfg.identity {
            self.metadata.insert("persona.model".into(), id.name.clone());
            self.metadata.insert(FINGERPRINT_KEY.into(), id.fingerprint.clone());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// N=2, H=3 with hand-picked rows.
    pub(super) fn small(name: &str, rows: [[f32; 3]; 3]) -> PersonaVector {
        PersonaVector::new(name, 2, 3, rows.concat()).unwrap()
    }

    pub(super) fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    pub(super) fn assert_has(msg: &str, needles: &[&str]) {
        for n in needles {
            assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
        }
    }

    #[test]
    fn new_checks_length() {
        assert!(PersonaVector::new("a", 2, 3, vec![0.0; 9]).is_ok());
        assert_has(&err_text(PersonaVector::new("a", 2, 3, vec![0.0; 8])), &["8 values", "N=2", "H=3", "9"]);
        assert_has(&err_text(PersonaVector::new("a", 0, 3, vec![])), &["N=0"]);
        assert_has(&err_text(PersonaVector::new("a", 1, 0, vec![])), &["H=0"]);
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
}
