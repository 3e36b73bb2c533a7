//! A model from a GGUF file: config from `{arch}.*` metadata, tensors renamed to HF names
//! (llama.cpp's q/k row permutation undone), tokenizer and chat template from metadata.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::chat::ChatTemplate;
use crate::model::config::{Arch, ModelConfig, RopeConfig};
use crate::model::gguf::GgufFile;
use crate::model::gguf_tokenizer::{gguf_chat_template, tokenizer_from_gguf};
use crate::model::load::{collect_tensors, ModelFiles, SourceFormat};
use crate::model::tensor::{Bytes, HostTensor};

/// Model hyper-parameters from GGUF metadata (`{arch}.*` keys as llama.cpp writes them).
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let path = g.path();
    let arch_name = g
        .get_str("general.architecture")
        .ok_or_else(|| Error::format(path, "missing metadata `general.architecture`"))?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF architecture `{other}` (supported: llama, qwen2)",
                path.display()
            )))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let req = |k: &str| -> Result<usize> {
        g.get_u64(&key(k))
            .map(|x| x as usize)
            .ok_or_else(|| Error::format(path, format!("missing metadata `{}`", key(k))))
    };
    let hidden = req("embedding_length")?;
    let n_heads = req("attention.head_count")?;
    let n_kv_heads = g.get_u64(&key("attention.head_count_kv")).map(|x| x as usize).unwrap_or(n_heads);
    if n_heads == 0 {
        return Err(Error::format(path, format!("`{}` is 0", key("attention.head_count"))));
    }
    let head_dim = g.get_u64(&key("attention.key_length")).map(|x| x as usize).unwrap_or(hidden / n_heads);
    let vocab = match g.get("tokenizer.ggml.tokens").and_then(|t| t.as_array()) {
        Some(a) => a.len(),
        None => {
            let t = g
                .tensor_info("token_embd.weight")
                .ok_or_else(|| Error::MissingTensor { path: path.to_path_buf(), name: "token_embd.weight".into() })?;
            match t.shape()[..] {
                [vocab, _] => vocab,
                ref other => {
                    return Err(Error::format(
                        path,
                        format!("tensor `token_embd.weight` has shape {other:?}, expected [vocab, hidden]"),
                    ))
                }
            }
        }
    };
    if g.tensor_info("rope_freqs.weight").is_some() {
        return Err(Error::Unsupported(format!(
            "{}: per-frequency RoPE factors (`rope_freqs.weight`, Llama-3.1 style) in GGUF; use the HF folder",
            path.display()
        )));
    }
    let id = |k: &str| g.get_u64(k).map(|x| x as u32);
    let cfg = ModelConfig {
        arch,
        hidden,
        intermediate: req("feed_forward_length")?,
        n_layers: req("block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6) as f32,
        rope: RopeConfig { theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0), llama3: None },
        max_positions: g.get_u64(&key("context_length")).unwrap_or(4096) as usize,
        tie_embeddings: g.tensor_info("output.weight").is_none(),
        qkv_bias: arch == Arch::Qwen2,
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        identity: None,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// llama.cpp's converter stores Llama q/k rows permuted for its interleaved RoPE:
/// GGUF row `h·hd + 2i + j` holds HF row `h·hd + j·hd/2 + i`. Undo it.
pub fn unpermute_rows(t: &HostTensor, n_heads: usize) -> Result<HostTensor> {
    let rows = t.shape.first().copied().unwrap_or(0);
    let bad = |why: String| Error::Invalid(format!("tensor `{}` (shape {:?}): {why}", t.name, t.shape));
    if rows == 0 || n_heads == 0 || !rows.is_multiple_of(n_heads) || !(rows / n_heads).is_multiple_of(2) {
        return Err(bad(format!("{rows} rows cannot be {n_heads} heads of an even head size")));
    }
    let hd = rows / n_heads;
    // Rows move whole, so quantized rows move as their packed blocks and stay quantized.
    let (src, quant) = match t.quantized() {
        Some((ty, b)) => (std::borrow::Cow::Borrowed(b), Some(ty)),
        None => (std::borrow::Cow::Owned(bytemuck::cast_slice::<f32, u8>(&t.to_f32()).to_vec()), None),
    };
    if src.len() % rows != 0 {
        return Err(bad(format!("{} bytes are not {rows} whole rows", src.len())));
    }
    let rb = src.len() / rows;
    let mut dst = vec![0u8; src.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let from = h * hd + 2 * i + j;
                let to = h * hd + j * (hd / 2) + i;
                dst[to * rb..(to + 1) * rb].copy_from_slice(&src[from * rb..(from + 1) * rb]);
            }
        }
    }
    match quant {
        Some(ty) => HostTensor::quant(t.name.clone(), t.shape.clone(), ty, Bytes::Owned(std::sync::Arc::new(dst))),
        None => Ok(HostTensor::from_f32(
            t.name.clone(),
            t.shape.clone(),
            dst.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        )),
    }
}

/// GGUF tensor name for a HF tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let g = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}"))
}

pub(crate) fn open_gguf(path: &Path) -> Result<ModelFiles> {
    model_from_gguf(&GgufFile::open(path)?)
}

/// Everything [`ModelFiles::open`] reads from a GGUF file, from an opened one (config, tensors
/// in HF naming, tokenizer, chat template).
pub fn model_from_gguf(g: &GgufFile) -> Result<ModelFiles> {
    let path = g.path();
    let config = config_from_gguf(g)?;
    let get = |hf: &str| -> Result<Option<HostTensor>> {
        let Some(name) = gguf_name(hf) else {
            return Ok(None);
        };
        if g.tensor_info(&name).is_none() {
            return Ok(None);
        }
        let mut t = g.tensor(&name)?;
        t.name = hf.to_string();
        if config.arch == Arch::Llama && t.shape.len() == 2 {
            if name.ends_with("attn_q.weight") {
                t = unpermute_rows(&t, config.n_heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute_rows(&t, config.n_kv_heads)?;
            }
        }
        Ok(Some(t))
    };
    let tensors = collect_tensors(&config, path, &get)?;
    let listing = g.tensors().iter().map(|t| (t.name.clone(), t.shape(), t.ggml_type.name().to_string())).collect();
    let tokenizer = if g.get("tokenizer.ggml.tokens").is_some() { Some(tokenizer_from_gguf(g)?) } else { None };
    let chat_template = match gguf_chat_template(g) {
        Some(src) => {
            let tok = |id: Option<u32>| -> String {
                match (id, &tokenizer) {
                    (Some(i), Some(t)) => t.id_to_token(i).unwrap_or_default(),
                    _ => String::new(),
                }
            };
            Some(ChatTemplate::new(&src, &tok(config.bos_id), &tok(config.eos_ids.first().copied()))?)
        }
        None => None,
    };
    Ok(ModelFiles {
        path: path.to_path_buf(),
        format: SourceFormat::Gguf,
        config,
        tensors,
        tokenizer,
        chat_template,
        listing,
    })
}
