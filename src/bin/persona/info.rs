//! `persona info`: what a model file holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
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

pub fn run(a: InfoArgs) -> Result<()> {
    let path = super::resolve_model(&a.model)?;
    let f = ModelFiles::open(&path)?;
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
            "tensors": if a.tensors { serde_json::to_value(&f.listing)? } else { serde_json::Value::Null },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} ({:?})", path.display(), f.format);
    println!("architecture  {}", c.arch.name());
    println!("parameters    {:.1} M", params as f64 / 1e6);
    println!("layers        {}", c.n_layers);
    println!("hidden        {}  (intermediate {})", c.hidden, c.intermediate);
    println!("heads         {} q / {} kv, head_dim {}", c.n_heads, c.n_kv_heads, c.head_dim);
    println!("vocab         {}", c.vocab);
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
