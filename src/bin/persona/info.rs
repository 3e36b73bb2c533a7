//! `persona info`: what a model file holds: architecture, sizes (on disk and in parameters),
//! context length, end-of-sequence tokens, dtypes, tensors.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use persona::model::gguf::{GgufFile, GgufValue};
use persona::model::ModelFiles;

#[derive(Args)]
pub struct InfoArgs {
    /// HF model folder or GGUF file (default: the default model).
    pub model: Option<PathBuf>,
    /// List every tensor.
    #[arg(long)]
    pub tensors: bool,
    #[arg(long)]
    pub json: bool,
}

/// Bytes on disk: the file, or the files directly inside the folder.
fn size_on_disk(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let m = e?.metadata()?;
        if m.is_file() {
            total += m.len();
        }
    }
    Ok(total)
}

fn human_bytes(b: u64) -> String {
    let (b, units) = (b as f64, ["B", "KiB", "MiB", "GiB", "TiB"]);
    let i = ((b.max(1.0).ln() / 1024f64.ln()).floor() as usize).min(units.len() - 1);
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{:.1} {}", b / 1024f64.powi(i as i32), units[i])
    }
}

/// A GGUF value as short text (arrays by length).
fn value_text(v: &GgufValue) -> String {
    match v {
        GgufValue::Str(s) => {
            let short: String = s.chars().take(80).collect();
            if short.len() < s.len() {
                format!("{short:?}… ({} chars)", s.chars().count())
            } else {
                format!("{s:?}")
            }
        }
        GgufValue::Array(a) => format!("[{} values]", a.len()),
        GgufValue::Bool(b) => b.to_string(),
        GgufValue::F32(x) => x.to_string(),
        GgufValue::F64(x) => x.to_string(),
        other => other.as_u64().map(|x| x.to_string()).unwrap_or_else(|| format!("{other:?}")),
    }
}

/// What any GGUF file holds, read from its header alone: for files persona cannot run (an
/// architecture or tensor type it does not read), with the reason.
fn gguf_header_info(path: &Path, why: &anyhow::Error, a: &InfoArgs) -> Result<()> {
    let g = GgufFile::open(path)?;
    let mut types: std::collections::BTreeMap<String, (usize, bool)> = Default::default();
    for t in g.tensors() {
        let e = types.entry(t.ggml_type.name()).or_insert((0, t.ggml_type.is_readable()));
        e.0 += 1;
    }
    let unreadable: Vec<String> = types.iter().filter(|(_, (_, ok))| !ok).map(|(t, _)| t.clone()).collect();
    let reason = format!("{why:#}");
    if a.json {
        let meta: serde_json::Map<String, serde_json::Value> =
            g.metadata().iter().map(|(k, v)| (k.clone(), serde_json::Value::String(value_text(v)))).collect();
        let v = serde_json::json!({
            "path": path, "format": "Gguf", "runnable": false, "reason": reason,
            "gguf_version": g.version(), "size_bytes": g.file_size(),
            "architecture": g.get_str("general.architecture"),
            "dtypes": types.iter().map(|(t, (n, _))| (t.clone(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
            "unreadable_dtypes": unreadable, "metadata": meta,
            "tensors": if a.tensors {
                g.tensors().iter().map(|t| serde_json::json!([t.name, t.shape(), t.ggml_type.name()])).collect::<Vec<_>>()
            } else { vec![] },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} (GGUF v{}, header only)", path.display(), g.version());
    println!("size          {} ({} bytes on disk)", human_bytes(g.file_size()), g.file_size());
    println!("runnable      no: {reason}");
    let dt: Vec<String> = types
        .iter()
        .map(|(t, (n, ok))| format!("{t}×{n}{}", if *ok { "" } else { " (persona cannot read)" }))
        .collect();
    println!("dtypes        {}", dt.join(", "));
    println!("metadata:");
    for (k, v) in g.metadata() {
        println!("  {k:<44} {}", value_text(v));
    }
    if a.tensors {
        for t in g.tensors() {
            println!("  {:<48} {:<8} {:?}", t.name, t.ggml_type.name(), t.shape());
        }
    } else {
        println!("tensors       {} (list them with --tensors)", g.tensors().len());
    }
    Ok(())
}

pub fn run(a: InfoArgs) -> Result<()> {
    let path = super::resolve_model(&a.model)?;
    let f = match ModelFiles::open(&path) {
        Ok(f) => f,
        Err(e) if path.is_file() && persona::steer::vector::is_gguf(&path).unwrap_or(false) => {
            return gguf_header_info(&path, &anyhow::Error::from(e), &a);
        }
        Err(e) => return Err(e.into()),
    };
    let bytes = size_on_disk(&path)?;
    // End-of-sequence ids with their tokens, where the model has a tokenizer.
    let eos: Vec<(u32, Option<String>)> =
        f.config.eos_ids.iter().map(|&id| (id, f.tokenizer.as_ref().and_then(|t| t.id_to_token(id)))).collect();
    let c = &f.config;
    let params: usize = f.listing.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
    let mut dtypes: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, _, d) in &f.listing {
        *dtypes.entry(d.as_str()).or_default() += 1;
    }
    if a.json {
        let v = serde_json::json!({
            "path": path, "format": format!("{:?}", f.format), "architecture": c.arch.name(),
            "layers": c.n_layers, "hidden": c.hidden, "intermediate": c.intermediate,
            "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab,
            "rope_theta": c.rope.theta, "llama3_rope": c.rope.llama3.is_some(), "rms_eps": c.rms_eps,
            "tied_embeddings": c.tie_embeddings, "qkv_bias": c.qkv_bias, "parameters": params,
            "dtypes": dtypes, "tokenizer": f.tokenizer.is_some(), "chat_template": f.chat_template.is_some(),
            "context_length": c.max_positions, "size_bytes": bytes,
            "name": c.identity.as_ref().map(|i| &i.name),
            "fingerprint": c.identity.as_ref().map(|i| &i.fingerprint),
            "eos": eos.iter().map(|(id, t)| serde_json::json!({"id": id, "token": t})).collect::<Vec<_>>(),
            "tensors": if a.tensors { serde_json::to_value(&f.listing)? } else { serde_json::Value::Null },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} ({:?})", path.display(), f.format);
    println!("size          {} ({bytes} bytes on disk)", human_bytes(bytes));
    println!("architecture  {}", c.arch.name());
    if let Some(id) = &c.identity {
        println!("model         {}  (fingerprint {}: persona vectors record it)", id.name, id.fingerprint);
    }
    println!("parameters    {:.1} M", params as f64 / 1e6);
    println!("layers        {}", c.n_layers);
    println!("hidden        {}  (intermediate {})", c.hidden, c.intermediate);
    println!("heads         {} q / {} kv, head_dim {}", c.n_heads, c.n_kv_heads, c.head_dim);
    println!("vocab         {}", c.vocab);
    println!("context       {} tokens (the model's; commands plan for --context, default 4096)", c.max_positions);
    let eos_text: Vec<String> =
        eos.iter().map(|(id, t)| t.as_ref().map_or(id.to_string(), |t| format!("{id} {t}"))).collect();
    println!("eos           {}", if eos_text.is_empty() { "none".to_string() } else { eos_text.join(", ") });
    println!(
        "rope          theta {}{}",
        c.rope.theta,
        c.rope.llama3.map(|s| format!(", llama3 scaling ×{}", s.factor)).unwrap_or_default()
    );
    println!("embeddings    {}", if c.tie_embeddings { "tied" } else { "untied" });
    println!("dtypes        {}", dtypes.iter().map(|(d, n)| format!("{d}×{n}")).collect::<Vec<_>>().join(", "));
    println!("tokenizer     {}", if f.tokenizer.is_some() { "yes" } else { "no" });
    println!("chat template {}", if f.chat_template.is_some() { "yes" } else { "no" });
    if a.tensors {
        for (n, s, d) in &f.listing {
            println!("  {n:<48} {d:<6} {s:?}");
        }
    } else {
        println!("tensors       {} (list them with --tensors)", f.listing.len());
    }
    Ok(())
}
