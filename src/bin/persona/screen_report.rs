//! `persona screen`'s report file, in the format its extension names: `.json` (the whole report),
//! `.jsonl` (one ranked sample per line), `.csv` or `.md` (a ranked table). Every format keeps
//! each sample's own dataset fields (ids, labels, ...) beside its ΔP.

use std::path::Path;

use anyhow::{bail, Result};
use persona::persona::screen::{Sample, SampleFields, ScreenControl, ScreenRow};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Json,
    Jsonl,
    Csv,
    Markdown,
}

impl ReportFormat {
    /// The format `--out`'s extension names; any other is refused (before any work is done).
    pub fn for_path(p: &Path) -> Result<Self> {
        let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        Ok(match ext.as_deref() {
            Some("json") => ReportFormat::Json,
            Some("jsonl") => ReportFormat::Jsonl,
            Some("csv") => ReportFormat::Csv,
            Some("md") => ReportFormat::Markdown,
            other => bail!(
                "--out {}: {}; the report's format is chosen by extension: .json (the whole report), .jsonl (one \
                 sample per line), .csv or .md (a ranked table)",
                p.display(),
                match other {
                    Some(e) => format!("unknown report format `.{e}`"),
                    None => "no extension".to_string(),
                }
            ),
        })
    }
}

/// What the report holds.
pub struct Report<'a> {
    pub vector: &'a Path,
    pub layer: usize,
    pub mean: f64,
    pub random: usize,
    pub seed: u64,
    pub control: &'a ScreenControl,
    /// Rows by ΔP, highest first.
    pub ranked: &'a [ScreenRow],
    pub samples: &'a [Sample],
    /// Each sample's own dataset fields, by sample index.
    pub fields: &'a [SampleFields],
}

/// Names of the dataset's own fields over every sample, in order of first appearance.
fn field_names(fields: &[SampleFields]) -> Vec<String> {
    let mut names: Vec<String> = vec![];
    for f in fields {
        for k in f.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names
}

/// A field's value as a table cell: strings as they are, anything else as JSON, absent empty.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn pct(r: &ScreenRow) -> String {
    r.delta_p_percentile.map_or(String::new(), |p| format!("{p:.1}"))
}

/// The row as JSON with its rank and the sample's own fields (under `fields`, so that a dataset
/// field can never overwrite a result).
fn row_json(rank: usize, r: &ScreenRow, fields: &SampleFields) -> Result<Value> {
    let mut v = serde_json::to_value(r)?;
    v["rank"] = json!(rank);
    v["fields"] = Value::Object(fields.clone());
    Ok(v)
}

pub fn render(format: ReportFormat, r: &Report) -> Result<String> {
    let fields = |i: usize| r.fields.get(i).cloned().unwrap_or_default();
    let names = field_names(r.fields);
    Ok(match format {
        ReportFormat::Json => {
            let ranking: Vec<Value> = r
                .ranked
                .iter()
                .enumerate()
                .map(|(k, x)| row_json(k + 1, x, &fields(x.index)))
                .collect::<Result<_>>()?;
            serde_json::to_string_pretty(&json!({
                "vector": r.vector, "layer": r.layer, "samples": r.ranked.len(), "mean_delta_p": r.mean,
                "random_directions": r.random, "seed": r.seed, "delta_p_random": r.control,
                "dataset_fields": names, "ranking": ranking,
            }))?
        }
        ReportFormat::Jsonl => {
            let mut s = String::new();
            for (k, x) in r.ranked.iter().enumerate() {
                s += &serde_json::to_string(&row_json(k + 1, x, &fields(x.index))?)?;
                s.push('\n');
            }
            s
        }
        ReportFormat::Csv => {
            const OURS: [&str; 6] = ["rank", "index", "delta_p", "p_data", "p_own", "delta_p_percentile"];
            // A dataset field named like one of ours gets a `data.` prefix.
            let head: Vec<String> = OURS
                .iter()
                .map(|s| s.to_string())
                .chain(names.iter().map(|n| if OURS.contains(&n.as_str()) { format!("data.{n}") } else { n.clone() }))
                .map(|h| csv_cell(&h))
                .collect();
            let mut s = head.join(",") + "\n";
            for (k, x) in r.ranked.iter().enumerate() {
                let f = fields(x.index);
                let mut cells = vec![
                    (k + 1).to_string(),
                    x.index.to_string(),
                    format!("{:.6}", x.delta_p),
                    format!("{:.6}", x.p_data),
                    format!("{:.6}", x.p_own),
                    pct(x),
                ];
                cells.extend(names.iter().map(|n| csv_cell(&cell(f.get(n)))));
                s += &(cells.join(",") + "\n");
            }
            s
        }
        ReportFormat::Markdown => {
            let mut s = format!(
                "# persona screen: {} at layer {}\n\n{} samples, dataset mean ΔP = {:+.3}\n\n",
                r.vector.display(),
                r.layer,
                r.ranked.len(),
                r.mean
            );
            let mut head = vec!["rank", "index", "ΔP", "p_data", "p_own", "pct"];
            head.extend(names.iter().map(String::as_str));
            head.push("response");
            s += &format!("| {} |\n", head.iter().map(|h| md_cell(h)).collect::<Vec<_>>().join(" | "));
            s += &format!("|{}\n", "---|".repeat(head.len()));
            for (k, x) in r.ranked.iter().enumerate() {
                let f = fields(x.index);
                let resp: String =
                    r.samples.get(x.index).map(|s| s.response.chars().take(80).collect()).unwrap_or_default();
                let mut cells = vec![
                    (k + 1).to_string(),
                    x.index.to_string(),
                    format!("{:+.3}", x.delta_p),
                    format!("{:.3}", x.p_data),
                    format!("{:.3}", x.p_own),
                    pct(x),
                ];
                cells.extend(names.iter().map(|n| cell(f.get(n))));
                cells.push(resp);
                s += &format!("| {} |\n", cells.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | "));
            }
            s
        }
    })
}
