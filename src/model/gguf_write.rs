//! GGUF v3 writer: [`write_gguf`] serializes metadata and F32 tensors (used to export llama.cpp
//! control vectors); `encode` takes tensors of any ggml type and is what the reader's tests build
//! their files with. Public as [`crate::model::gguf::write_gguf`].

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::gguf::{DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::model::gguf_types::{GgmlType, GgufValue, T_U8};

/// A tensor to encode: raw bytes of any ggml type, `dims` in ggml order.
pub(super) struct RawTensor<'a> {
    pub(super) name: &'a str,
    pub(super) dims: Vec<u64>,
    pub(super) ggml_type: u32,
    pub(super) data: Vec<u8>,
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(super) fn put_value(out: &mut Vec<u8>, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::Str(s) => put_str(out, s),
        GgufValue::Array(items) => {
            let ty = items.first().map_or(T_U8, GgufValue::type_id);
            if items.iter().any(|x| x.type_id() != ty) {
                return Err(Error::Invalid("a GGUF array must hold values of a single type".into()));
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x)?;
            }
        }
    }
    Ok(())
}

/// Serialize a GGUF v3 file. Alignment comes from `general.alignment` when given.
pub(super) fn encode(metadata: &[(String, GgufValue)], tensors: &[RawTensor]) -> Result<Vec<u8>> {
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(Error::Invalid(format!("general.alignment must be a power of two, got {v:?}"))),
        },
    } as usize;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v)?;
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
    }
    let data_start = out.len().div_ceil(alignment) * alignment;
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(data_start + off, 0);
        out.extend_from_slice(&t.data);
    }
    Ok(out)
}

/// Write a GGUF v3 file holding `metadata` and F32 `tensors` (name, PyTorch-order shape, data).
/// Used to export llama.cpp control vectors.
///
/// ```no_run
/// use persona::model::gguf::{write_gguf, GgufValue};
/// let v = vec![0.0f32; 576];
/// write_gguf(
///     "control.gguf",
///     &[("general.architecture".into(), GgufValue::Str("controlvector".into()))],
///     &[("direction.1".into(), vec![576], &v[..])],
/// )?;
/// # Ok::<(), persona::Error>(())
/// ```
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<()> {
    let path = path.as_ref();
    let mut names = std::collections::HashSet::new();
    for (name, shape, data) in tensors {
        if !names.insert(name.as_str()) {
            return Err(Error::Invalid(format!("write_gguf {}: duplicate tensor `{name}`", path.display())));
        }
        if shape.len() > MAX_DIMS as usize || shape.iter().product::<usize>() != data.len() {
            return Err(Error::Invalid(format!(
                "write_gguf {}: tensor `{name}` has shape {shape:?} but {} values",
                path.display(),
                data.len()
            )));
        }
    }
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, shape, data)| RawTensor {
            name,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: GgmlType::F32.id(),
            data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let bytes = encode(metadata, &raw)?;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&bytes).and_then(|_| f.flush()).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgufFile;

    #[test]
    fn write_gguf_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cv.gguf");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b = vec![-1.0f32; 5];
        let md = vec![
            ("general.architecture".to_string(), GgufValue::Str("controlvector".into())),
            ("controlvector.layer_count".to_string(), GgufValue::U32(2)),
        ];
        write_gguf(&p, &md, &[("direction.1".into(), vec![2, 3], &a[..]), ("direction.2".into(), vec![5], &b[..])])
            .unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.path(), p);
        assert_eq!(g.get_str("general.architecture"), Some("controlvector"));
        assert_eq!(g.get_u64("controlvector.layer_count"), Some(2));
        assert_eq!(g.tensor_info("direction.1").unwrap().dims, [3, 2]);
        let t = g.tensor("direction.1").unwrap();
        assert_eq!((t.shape.clone(), t.to_f32()), (vec![2, 3], a));
        assert_eq!(g.tensor("direction.2").unwrap().to_f32(), b);
        // Shape/data mismatch and duplicate names are refused.
        assert!(write_gguf(&p, &[], &[("x".into(), vec![2, 2], &b[..])]).is_err());
        assert!(write_gguf(&p, &[], &[("x".into(), vec![5], &b[..]), ("x".into(), vec![5], &b[..])]).is_err());
    }
}
