//! Load a model from a HF folder or a GGUF file into named host tensors (HF naming),
//! plus its tokenizer and chat template.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::chat::ChatTemplate;
use crate::model::config::{ModelConfig, ModelIdentity};
use crate::model::safetensors::SafetensorsSet;
use crate::model::tensor::HostTensor;

/// Weights of one decoder block, PyTorch layout (`[out, in]` for projections).
#[derive(Debug, Clone)]
pub struct LayerTensors {
    pub attn_norm: HostTensor,
    pub wq: HostTensor,
    pub wk: HostTensor,
    pub wv: HostTensor,
    pub bq: Option<HostTensor>,
    pub bk: Option<HostTensor>,
    pub bv: Option<HostTensor>,
    pub wo: HostTensor,
    pub mlp_norm: HostTensor,
    pub w_gate: HostTensor,
    pub w_up: HostTensor,
    pub w_down: HostTensor,
}

#[derive(Debug, Clone)]
pub struct ModelTensors {
    pub embed: HostTensor,
    pub layers: Vec<LayerTensors>,
    pub final_norm: HostTensor,
    /// `None` when the output projection is tied to the embedding table.
    pub lm_head: Option<HostTensor>,
}

/// Which file format a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Safetensors,
    Gguf,
}

/// Everything read from a model's files. Nothing here executes.
pub struct ModelFiles {
    pub path: PathBuf,
    pub format: SourceFormat,
    pub config: ModelConfig,
    pub tensors: ModelTensors,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// (name, shape, dtype) of every tensor in the files, for `persona info`.
    pub listing: Vec<(String, Vec<usize>, String)>,
}

impl ModelFiles {
    /// Open a HF folder (config.json + safetensors) or a `.gguf` file; the config carries the
    /// model's [`ModelIdentity`] (name and fingerprint).
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = if path.is_dir() {
            open_hf(path)?
        } else if path.is_file() {
            crate::model::gguf_model::open_gguf(path)?
        } else {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or folder"),
            ));
        };
        f.config.identity = Some(ModelIdentity {
            name: model_name(path),
            fingerprint: fingerprint(&f.config, &f.tensors),
            allow_foreign: false,
        });
        Ok(f)
    }
}

/// A model's fingerprint, `ARCH-N<layers>-H<hidden>-<16 hex>`: the hex is the start of a sha256
/// over the architecture's sizes and the values of three norm weights (the final norm, the first
/// block's attention norm, the last block's MLP norm), each rounded to bf16 — so the same model
/// stored as BF16 safetensors, F32 or a quantised GGUF (whose norms stay F32) has one fingerprint,
/// a LoRA fine-tune of it (norms untouched) keeps it, and another model of the same shape does not.
pub fn fingerprint(cfg: &ModelConfig, t: &ModelTensors) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(cfg.arch.name().as_bytes());
    for x in [cfg.n_layers, cfg.hidden, cfg.intermediate, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab] {
        h.update((x as u64).to_le_bytes());
    }
    let norms = [Some(&t.final_norm), t.layers.first().map(|l| &l.attn_norm), t.layers.last().map(|l| &l.mlp_norm)];
    for n in norms.into_iter().flatten() {
        for v in n.to_f32() {
            h.update(half::bf16::from_f32(v).to_bits().to_le_bytes());
        }
    }
    let hex: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{}-N{}-H{}-{hex}", cfg.arch.name(), cfg.n_layers, cfg.hidden)
}

/// A model's name: an HF folder's name (the repository's, for a hub cache snapshot), or a file's
/// name without its extension and quantisation tag (`SmolLM2-135M-Instruct.Q4_1.gguf` →
/// `SmolLM2-135M-Instruct`).
pub fn model_name(path: &Path) -> String {
    let file = |p: &Path| p.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    if path.is_dir() {
        // ~/.cache/huggingface/hub/models--ORG--NAME/snapshots/HASH
        let parent = path.parent();
        if parent.is_some_and(|p| p.ends_with("snapshots")) {
            if let Some(repo) = parent.and_then(Path::parent).map(file) {
                if let Some(name) = repo.rsplit("--").next().filter(|_| repo.starts_with("models--")) {
                    return name.to_string();
                }
            }
        }
        return file(path);
    }
    let mut name = file(path);
    for ext in [".gguf", ".safetensors", ".bin"] {
        if let Some(s) = name.strip_suffix(ext) {
            name = s.to_string();
            break;
        }
    }
    // A trailing quantisation tag after `.` or `-`: Q4_1, Q4_K_M, IQ3_XS, F16, BF16, F32, ...
    let is_quant = |t: &str| {
        let u = t.to_ascii_uppercase();
        matches!(u.as_str(), "F16" | "F32" | "BF16")
            || ((u.starts_with('Q') || u.starts_with("IQ"))
                && u.trim_start_matches('I').trim_start_matches('Q').starts_with(|c: char| c.is_ascii_digit()))
    };
    if let Some(i) = name.rfind(['.', '-']) {
        if i > 0 && is_quant(&name[i + 1..]) {
            name.truncate(i);
        }
    }
    name
}

fn check_shape(origin: &Path, t: &HostTensor, want: &[usize]) -> Result<()> {
    if t.shape != want {
        return Err(Error::format(origin, format!("tensor `{}` has shape {:?}, expected {:?}", t.name, t.shape, want)));
    }
    Ok(())
}

/// Fetch every tensor the architecture needs through `get` (HF names), checking shapes.
pub(crate) fn collect_tensors(
    cfg: &ModelConfig,
    origin: &Path,
    get: &dyn Fn(&str) -> Result<Option<HostTensor>>,
) -> Result<ModelTensors> {
    let need = |name: &str, shape: &[usize]| -> Result<HostTensor> {
        let t = get(name)?.ok_or_else(|| Error::MissingTensor { path: origin.to_path_buf(), name: name.into() })?;
        check_shape(origin, &t, shape)?;
        Ok(t)
    };
    let opt = |name: &str, shape: &[usize]| -> Result<Option<HostTensor>> {
        match get(name)? {
            Some(t) => check_shape(origin, &t, shape).map(|_| Some(t)),
            None => Ok(None),
        }
    };
    let (h, f, hd) = (cfg.hidden, cfg.intermediate, cfg.head_dim);
    let (q, kv) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}.");
        let bias = |n: &str, len: usize| -> Result<Option<HostTensor>> {
            if cfg.qkv_bias {
                need(&format!("{p}self_attn.{n}.bias"), &[len]).map(Some)
            } else {
                opt(&format!("{p}self_attn.{n}.bias"), &[len])
            }
        };
        layers.push(LayerTensors {
            attn_norm: need(&format!("{p}input_layernorm.weight"), &[h])?,
            wq: need(&format!("{p}self_attn.q_proj.weight"), &[q, h])?,
            wk: need(&format!("{p}self_attn.k_proj.weight"), &[kv, h])?,
            wv: need(&format!("{p}self_attn.v_proj.weight"), &[kv, h])?,
            bq: bias("q_proj", q)?,
            bk: bias("k_proj", kv)?,
            bv: bias("v_proj", kv)?,
            wo: need(&format!("{p}self_attn.o_proj.weight"), &[h, q])?,
            mlp_norm: need(&format!("{p}post_attention_layernorm.weight"), &[h])?,
            w_gate: need(&format!("{p}mlp.gate_proj.weight"), &[f, h])?,
            w_up: need(&format!("{p}mlp.up_proj.weight"), &[f, h])?,
            w_down: need(&format!("{p}mlp.down_proj.weight"), &[h, f])?,
        });
    }
    let embed = need("model.embed_tokens.weight", &[cfg.vocab, h])?;
    let lm_head = if cfg.tie_embeddings { None } else { opt("lm_head.weight", &[cfg.vocab, h])? };
    if !cfg.tie_embeddings && lm_head.is_none() {
        return Err(Error::MissingTensor { path: origin.to_path_buf(), name: "lm_head.weight".into() });
    }
    Ok(ModelTensors { embed, layers, final_norm: need("model.norm.weight", &[h])?, lm_head })
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// A special token in tokenizer_config.json is a string or `{"content": ..}`.
fn token_str(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
        None => String::new(),
    }
}

/// Read a `tokenizer.json`. The tokenizers crate (0.21) panics on some malformed files instead of
/// returning an error (`expect`s in its decoder and normalizer deserializers: a syntax error inside
/// `"decoder"`, an invalid `Precompiled` charsmap); the JSON syntax is checked first, and a panic
/// that still happens is caught and reported as an error naming the file.
fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| Error::Tokenizer(format!("{}: not valid JSON: {e}", path.display())))?;
    match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::Tokenizer(format!("{}: {e}", path.display()))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown reason");
            Err(Error::Tokenizer(format!(
                "{}: not a valid tokenizer file (the tokenizers crate failed on it: {why})",
                path.display()
            )))
        }
    }
}

fn open_hf(dir: &Path) -> Result<ModelFiles> {
    let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
    let set = SafetensorsSet::open_dir(dir)?;
    let tensors = collect_tensors(&config, set.origin(), &|n| Ok(set.get(n)))?;
    let listing = set
        .names()
        .filter_map(|n| set.get(n))
        .map(|t| (t.name.clone(), t.shape.clone(), format!("{:?}", t.dtype())))
        .collect();

    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() { Some(read_tokenizer(&tok_path)?) } else { None };
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json(&tc_path)?;
    let jinja = dir.join("chat_template.jinja");
    let mut source =
        if jinja.exists() { Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?) } else { None };
    if source.is_none() {
        source = match tc.as_ref().and_then(|t| t.get("chat_template")) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
    }
    let chat_template = match source {
        Some(s) => {
            let bos = token_str(tc.as_ref().and_then(|t| t.get("bos_token")));
            let eos = token_str(tc.as_ref().and_then(|t| t.get("eos_token")));
            Some(ChatTemplate::new(&s, &bos, &eos)?)
        }
        None => None,
    };
    Ok(ModelFiles {
        path: dir.to_path_buf(),
        format: SourceFormat::Safetensors,
        config,
        tensors,
        tokenizer,
        chat_template,
        listing,
    })
}
