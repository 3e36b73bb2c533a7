//! Memory-mapped safetensors reader: one file or a sharded set (`model.safetensors.index.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensorError};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::model::tensor::{DType, HostTensor, Storage};

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// All tensors of one or more safetensors files, by name; bytes stay in the memory maps.
pub struct SafetensorsSet {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: BTreeMap<String, Entry>,
}

fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooLarge => "header length is larger than 100 MB (oversized or corrupt header)".into(),
        SafeTensorError::HeaderTooSmall => "file is shorter than the 8-byte header length".into(),
        SafeTensorError::InvalidHeaderLength => "header length points past the end of the file (truncated?)".into(),
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not match the file size (truncated or trailing bytes)".into()
        }
        other => format!("{other:?}"),
    }
}

pub fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a model file modified while mapped is the user's concern,
    // as with every memory-mapped reader.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(map))
}

impl SafetensorsSet {
    /// Open the safetensors of a HF model folder: the sharded index if present, else `model.safetensors`,
    /// else every `*.safetensors` in the folder.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "missing object `weight_map`"))?;
            let mut names: Vec<String> = map.values().filter_map(|s| s.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") {
                    return Err(Error::format(&index, format!("shard name `{n}` is not a plain file name")));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(Error::format(dir, "no *.safetensors files in the model folder"));
            }
            v
        };
        Self::open_files(&files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut set = SafetensorsSet { files: vec![], entries: BTreeMap::new() };
        for path in paths {
            set.add(path, map_file(path)?)?;
        }
        Ok(set)
    }

    /// One in-memory safetensors image (copied into an anonymous map, so tensors are handed out
    /// exactly as from a file); `path` names it in errors and [`Self::origin`].
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        // (An anonymous map cannot be empty; an image that short has no header anyway.)
        if bytes.len() < 8 {
            return Err(Error::format(path, describe(&SafeTensorError::HeaderTooSmall)));
        }
        let mut m = memmap2::MmapMut::map_anon(bytes.len()).map_err(|e| Error::io(path, e))?;
        m.copy_from_slice(bytes);
        let map = m.make_read_only().map_err(|e| Error::io(path, e))?;
        let mut set = SafetensorsSet { files: vec![], entries: BTreeMap::new() };
        set.add(path, Arc::new(map))?;
        Ok(set)
    }

    /// Add the tensors of one mapped file; a name already present is an error.
    fn add(&mut self, path: &Path, map: Arc<Mmap>) -> Result<()> {
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::format(path, describe(&e)))?;
        let base = 8 + n;
        let fi = self.files.len();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => {
                    return Err(Error::Unsupported(format!(
                        "{}: tensor `{name}` has dtype {other:?} (supported: F32, F16, BF16)",
                        path.display()
                    )))
                }
            };
            let (s, e) = info.data_offsets;
            if self.entries.contains_key(&name) {
                return Err(Error::format(path, format!("tensor `{name}` appears in more than one shard")));
            }
            self.entries
                .insert(name, Entry { file: fi, dtype, shape: info.shape.clone(), offset: base + s, len: e - s });
        }
        self.files.push((path.to_path_buf(), map));
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Path of the (first) file, for error messages.
    pub fn origin(&self) -> &Path {
        self.files.first().map(|f| f.0.as_path()).unwrap_or(Path::new("<none>"))
    }

    pub fn get(&self, name: &str) -> Option<HostTensor> {
        let e = self.entries.get(name)?;
        Some(HostTensor {
            name: name.to_string(),
            shape: e.shape.clone(),
            storage: Storage::Mapped {
                map: self.files[e.file].1.clone(),
                offset: e.offset,
                len: e.len,
                dtype: e.dtype,
            },
        })
    }
}
