//! `persona vectors`: inspect, compare and convert persona vectors.
//!
//! - `persona vectors A.safetensors [B ...] [--layer L|all] [--json]`: metadata and per-layer
//!   norms of each file; with two or more files, their cosine similarities.
//! - `--model M`: the model the vectors belong to; needed to read llama.cpp control vectors
//!   (GGUF), and checks every vector's N and H against it.
//! - `persona vectors IN.gguf --model M --out OUT.safetensors`: import a control vector.
//! - `persona vectors IN.safetensors --export-gguf OUT.gguf [--model-hint NAME]`: export one
//!   (layers 0 and 1, which llama.cpp cannot steer, are zeroed with a note).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use persona::model::config::ModelConfig;
use persona::model::ModelFiles;
use persona::steer::control_vector::{export_control_vector, SOURCE_FORMAT};
use persona::steer::spec::recorded_layer;
use persona::steer::vector::{cosine_table, is_gguf, PersonaVector};

#[derive(Args, Debug)]
pub struct VectorsArgs {
    /// Persona vector files (safetensors), or llama.cpp control vectors (GGUF, needs --model).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// HF model folder or GGUF model the vectors are for: needed to import llama.cpp control
    /// vectors (their layer numbering depends on N); every vector is checked against its N and H.
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Residual index (0..=N) for the cosine table, or `all` for one row per layer (default:
    /// the vectors' chosen layer, `persona.layer` — one table per distinct recorded layer — else
    /// the layer where the first vector's norm is largest). With --out / --export-gguf: keep
    /// only this layer (the others are zeroed), or `all` (the default) to keep every layer.
    #[arg(long, value_parser = parse_layer_sel)]
    pub layer: Option<LayerSel>,
    /// Write the (single) FILE as a persona safetensors vector, e.g. to import a control vector.
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: Option<PathBuf>,
    /// Write the (single) FILE as a llama.cpp control vector (direction.K = our layer K+1).
    #[arg(long, value_name = "OUT.gguf")]
    pub export_gguf: Option<PathBuf>,
    /// `controlvector.model_hint` for --export-gguf (default: the model's name — from --model,
    /// else the vector's `persona.model` metadata — without file extension or quantisation tag,
    /// e.g. `SmolLM2-135M-Instruct`).
    #[arg(long, value_name = "NAME", requires = "export_gguf")]
    pub model_hint: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Which layer(s) the cosine table covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerSel {
    One(usize),
    All,
}

fn parse_layer_sel(s: &str) -> std::result::Result<LayerSel, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(LayerSel::All);
    }
    s.parse().map(LayerSel::One).map_err(|_| format!("`{s}` is not a layer index (0..=N) or `all`"))
}

fn load_one(path: &Path, cfg: Option<&ModelConfig>) -> Result<PersonaVector> {
    match cfg {
        Some(cfg) => Ok(PersonaVector::load_for_model(path, cfg)?),
        None => {
            if is_gguf(path)? {
                bail!(
                    "{}: this is a GGUF file (a llama.cpp control vector?); give --model M so that its \
                     direction.K tensors can be mapped onto the model's layers",
                    path.display()
                );
            }
            Ok(PersonaVector::load(path)?)
        }
    }
}

/// The file's own format (an imported-then-saved vector keeps `persona.source_format` in its
/// metadata, but is a safetensors file).
fn format_of(path: &Path, v: &PersonaVector) -> &'static str {
    let from_gguf = v.metadata.get("persona.source_format").map(String::as_str) == Some(SOURCE_FORMAT);
    if from_gguf && is_gguf(path).unwrap_or(false) {
        "llama.cpp control vector (GGUF)"
    } else {
        "persona safetensors"
    }
}

fn finite(x: f32) -> Option<f32> {
    x.is_finite().then_some(x)
}

pub fn run(a: VectorsArgs) -> Result<()> {
    let cfg = match &a.model {
        Some(m) => Some(ModelFiles::open(m).with_context(|| format!("loading model {}", m.display()))?.config),
        None => None,
    };
    let vectors: Vec<PersonaVector> = a.files.iter().map(|p| load_one(p, cfg.as_ref())).collect::<Result<_>>()?;

    if a.out.is_some() || a.export_gguf.is_some() {
        return convert(&a, &vectors);
    }

    let refs: Vec<&PersonaVector> = vectors.iter().collect();
    let layers: Vec<usize> = if vectors.len() < 2 {
        vec![]
    } else {
        let max_n = vectors.iter().map(|v| v.n_layers).max().unwrap_or(0);
        match a.layer {
            Some(LayerSel::All) => (0..=max_n).collect(),
            Some(LayerSel::One(l)) => {
                if l > max_n {
                    bail!("--layer {l} is out of range: the vectors have layers 0..={max_n}");
                }
                vec![l]
            }
            None => default_layers(&vectors)?.into_iter().map(|(l, _)| l).collect(),
        }
    };
    let why: Vec<String> = match a.layer {
        None if vectors.len() >= 2 => default_layers(&vectors)?.into_iter().map(|(_, w)| w).collect(),
        _ => vec![String::new(); layers.len()],
    };
    let names = display_names(&vectors);
    if vectors.len() >= 2 && vectors.iter().any(|v| v.hidden != vectors[0].hidden) {
        eprintln!("note: the vectors have different hidden sizes; their cosines are undefined (shown as -)");
    }

    if a.json {
        let vs: Vec<_> = vectors
            .iter()
            .zip(&a.files)
            .enumerate()
            .map(|(i, (v, p))| {
                serde_json::json!({
                    "index": i + 1, "path": p, "name": v.name, "format": format_of(p, v),
                    "n_layers": v.n_layers, "hidden": v.hidden, "metadata": v.metadata,
                    "norms": v.norms().into_iter().map(finite).collect::<Vec<_>>(),
                    "max_norm_layer": v.max_norm_layer(),
                })
            })
            .collect();
        let mut out = serde_json::json!({ "vectors": vs });
        if !layers.is_empty() {
            let cos: Vec<_> = layers
                .iter()
                .zip(&why)
                .map(|(&l, w)| {
                    let mut c = serde_json::json!({ "layer": l, "names": names, "matrix": cosine_table(&refs, l) });
                    if !w.is_empty() {
                        c["why"] = w.as_str().into();
                    }
                    c
                })
                .collect();
            out["cosine"] = serde_json::Value::Array(cos);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    for (i, (v, p)) in vectors.iter().zip(&a.files).enumerate() {
        if i > 0 {
            println!();
        }
        print_vector(i + 1, p, v, vectors.len() > 1);
    }
    if !layers.is_empty() {
        println!();
        match a.layer {
            Some(LayerSel::All) => print_cosines_per_layer(&refs, &names, &layers),
            _ => {
                for (k, (&l, w)) in layers.iter().zip(&why).enumerate() {
                    if k > 0 {
                        println!();
                    }
                    print_cosine_table(&refs, &names, l, w);
                }
            }
        }
    }
    Ok(())
}

fn clip(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', "\\n");
    if one_line.chars().count() <= n {
        one_line
    } else {
        format!("{}…", one_line.chars().take(n - 1).collect::<String>())
    }
}

fn print_vector(index: usize, path: &Path, v: &PersonaVector, numbered: bool) {
    if numbered {
        println!("[{index}] {}", path.display());
    } else {
        println!("{}", path.display());
    }
    let width = v.metadata.keys().map(|k| k.len()).max().unwrap_or(0).max(6);
    println!("  {:<width$}  {}", "name", v.name);
    println!("  {:<width$}  {}", "format", format_of(path, v));
    println!("  {:<width$}  N={} blocks, H={} ({} rows)", "shape", v.n_layers, v.hidden, v.rows());
    for (k, val) in &v.metadata {
        println!("  {k:<width$}  {}", clip(val, 100));
    }
    let norms = v.norms();
    println!("  norms (layer: norm; layer 0 = embedding output, L = after block L-1):");
    for chunk in norms.iter().enumerate().collect::<Vec<_>>().chunks(6) {
        let cells: Vec<String> = chunk.iter().map(|(l, n)| format!("{l:>4}: {:<9}", fmt_norm(**n))).collect();
        println!("  {}", cells.join(" ").trim_end());
    }
    let best = v.max_norm_layer();
    println!("  max norm {} at layer {best}", fmt_norm(norms[best]));
}

fn fmt_norm(n: f32) -> String {
    if n == 0.0 {
        "0".into()
    } else if !n.is_finite() {
        format!("{n}")
    } else if !(1e-3..1e4).contains(&n) {
        format!("{n:.3e}")
    } else {
        format!("{n:.4}")
    }
}

fn fmt_cos(c: Option<f32>) -> String {
    c.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into())
}

/// The layers of the default cosine table(s), each with why it was chosen: the vectors' recorded
/// `persona.layer`s (one table per distinct value, the most common first), else the layer
/// where the first vector's norm is largest.
fn default_layers(vs: &[PersonaVector]) -> Result<Vec<(usize, String)>> {
    let mut out: Vec<(usize, Vec<&str>)> = vec![];
    for v in vs {
        if let Some(l) = recorded_layer(v)? {
            match out.iter_mut().find(|(x, _)| *x == l) {
                Some((_, who)) => who.push(&v.name),
                None => out.push((l, vec![&v.name])),
            }
        }
    }
    // The layer most vectors chose first.
    out.sort_by_key(|(_, who)| std::cmp::Reverse(who.len()));
    if out.is_empty() {
        let l = vs[0].max_norm_layer();
        let why = format!("no vector records persona.layer: the largest norm of {}", vs[0].name);
        return Ok(vec![(l, why)]);
    }
    let recorded = out.iter().map(|(_, w)| w.len()).sum::<usize>();
    Ok(out
        .into_iter()
        .map(|(l, who)| {
            let who = if who.len() == vs.len() { "every vector".to_string() } else { who.join(", ") };
            let rest = if recorded < vs.len() { "; the others record none" } else { "" };
            (l, format!("persona.layer of {who}{rest}"))
        })
        .collect())
}

/// Row and column names: each vector's name, numbered where two share one.
fn display_names(vs: &[PersonaVector]) -> Vec<String> {
    vs.iter()
        .enumerate()
        .map(|(i, v)| {
            if vs.iter().filter(|w| w.name == v.name).count() > 1 {
                format!("{} [{}]", v.name, i + 1)
            } else {
                v.name.clone()
            }
        })
        .collect()
}

fn print_cosine_table(vs: &[&PersonaVector], names: &[String], l: usize, why: &str) {
    let why = if why.is_empty() { String::new() } else { format!(" ({why})") };
    println!("cosine similarity at layer {l}{why}:");
    let t = cosine_table(vs, l);
    let first = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let head: Vec<String> = names.iter().map(|n| format!("{n:>w$}", w = n.chars().count().max(6))).collect();
    println!("  {:<first$} {}", "", head.join(" "));
    for (i, row) in t.iter().enumerate() {
        let cells: Vec<String> =
            row.iter().zip(names).map(|(&c, n)| format!("{:>w$}", fmt_cos(c), w = n.chars().count().max(6))).collect();
        println!("  {:<first$} {}", names[i], cells.join(" "));
    }
}

fn print_cosines_per_layer(vs: &[&PersonaVector], names: &[String], layers: &[usize]) {
    println!("cosine similarity per layer:");
    let k = vs.len();
    let pairs: Vec<(usize, usize)> = (0..k).flat_map(|i| (i + 1..k).map(move |j| (i, j))).collect();
    let labels: Vec<String> = pairs.iter().map(|&(i, j)| format!("{}·{}", names[i], names[j])).collect();
    let width = |s: &String| s.chars().count().max(7);
    let head: Vec<String> = labels.iter().map(|s| format!("{s:>w$}", w = width(s))).collect();
    println!("  {:>5} {}", "layer", head.join(" "));
    for &l in layers {
        let cells: Vec<String> = pairs
            .iter()
            .zip(&labels)
            .map(|(&(i, j), s)| format!("{:>w$}", fmt_cos(vs[i].cosine(vs[j], l)), w = width(s)))
            .collect();
        println!("  {l:>5} {}", cells.join(" "));
    }
}

fn convert(a: &VectorsArgs, vectors: &[PersonaVector]) -> Result<()> {
    if vectors.len() != 1 {
        bail!("--out and --export-gguf take exactly one FILE ({} given)", vectors.len());
    }
    let v = &match a.layer {
        Some(LayerSel::One(l)) => vectors[0].only_layers(&[l])?,
        Some(LayerSel::All) | None => vectors[0].clone(),
    };
    // llama.cpp steers the outputs of blocks 1..N-1 only (our layers 2..=N): an extracted vector
    // is non-zero at our layers 0 (the embedding output) and 1 (block 0's output), which the
    // control vector cannot hold. Dropped with a note unless the user asked for one of them.
    let gguf_v = match (&a.export_gguf, a.layer) {
        (Some(_), Some(LayerSel::All) | None) => {
            let dropped: Vec<usize> = (0..=v.n_layers.min(1)).filter(|&l| !v.is_zero(l)).collect();
            if dropped.is_empty() || v.n_layers < 2 {
                None
            } else {
                let keep: Vec<usize> = (2..=v.n_layers).collect();
                let norms = v.norms();
                let what: Vec<String> = dropped.iter().map(|&l| format!("{l} (norm {})", fmt_norm(norms[l]))).collect();
                eprintln!(
                    "note: zeroed layer {} in the control vector: llama.cpp can steer only our layers 2..={} \
                     (direction.1..direction.{}), not the embedding output (0) or block 0's output (1)",
                    what.join(" and "),
                    v.n_layers,
                    v.n_layers - 1
                );
                Some(v.only_layers(&keep)?)
            }
        }
        _ => None,
    };
    let mut wrote = Vec::new();
    if let Some(out) = &a.out {
        v.save(out).with_context(|| format!("writing {}", out.display()))?;
        wrote.push(serde_json::json!({ "path": out, "format": "persona safetensors" }));
        if !a.json {
            println!("wrote {} (persona safetensors, N={}, H={})", out.display(), v.n_layers, v.hidden);
        }
    }
    if let Some(out) = &a.export_gguf {
        let v = gguf_v.as_ref().unwrap_or(v);
        let hint = match (&a.model_hint, &a.model, v.metadata.get("persona.model")) {
            (Some(h), _, _) => h.clone(),
            (None, Some(m), _) => super::model_name(m),
            (None, None, Some(m)) => super::model_name(Path::new(m)),
            (None, None, None) => bail!(
                "--export-gguf needs a model hint: the vector records no persona.model; give --model-hint NAME \
                 (llama.cpp does not read it; its cvector-generator writes the architecture, e.g. `llama`) or --model M"
            ),
        };
        export_control_vector(v, out, &hint).with_context(|| {
            let hint = if a.layer.is_none() { " (to export a single layer, add --layer L)" } else { "" };
            format!("exporting {}{hint}", out.display())
        })?;
        let n = (0..=v.n_layers).filter(|&l| !v.is_zero(l)).count();
        wrote.push(serde_json::json!({
            "path": out, "format": "llama.cpp control vector", "model_hint": hint, "directions": n,
        }));
        if !a.json {
            println!(
                "wrote {} (llama.cpp control vector, {n} direction(s), model_hint `{hint}`; our layer L is \
                 direction.{{L-1}})",
                out.display()
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "wrote": wrote }))?);
    }
    Ok(())
}
