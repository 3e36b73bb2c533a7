//! Benchmark reports: where and on what a run happened ([`BenchInfo`]: commit, date, device,
//! model sizes) and its rows written as a Markdown table ([`format_markdown`]) or one JSON
//! document ([`to_json`]), with the steering overheads.

use serde::Serialize;

use super::{overheads, param_count, BenchRow};
use crate::model::config::ModelConfig;

/// Where and on what a benchmark ran, recorded with its rows.
#[derive(Debug, Clone, Serialize)]
pub struct BenchInfo {
    pub persona_commit: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub backend: String,
    pub device: String,
    /// The model file or `shape:<name>` (random weights).
    pub model: String,
    pub dtype: String,
    pub arch: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub params: usize,
    pub threads: usize,
    /// Bytes and elements of the matmul weights read per forward call, as stored
    /// ([`super::matmul_weights`]); 0 when not given.
    pub weight_bytes: u64,
    pub matmul_params: u64,
}

impl BenchInfo {
    pub fn new(c: &ModelConfig, backend: &str, device: String, model: String, dtype: String) -> Self {
        BenchInfo {
            persona_commit: commit(),
            date: utc_now(),
            backend: backend.into(),
            device,
            model,
            dtype,
            arch: c.arch.name().into(),
            n_layers: c.n_layers,
            hidden: c.hidden,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            ffn: c.intermediate,
            vocab: c.vocab,
            params: param_count(c),
            threads: rayon::current_num_threads(),
            weight_bytes: 0,
            matmul_params: 0,
        }
    }

    /// With the matmul weights' size ([`super::matmul_weights`]), for the GB/s and GFLOP/s columns.
    pub fn with_weights(mut self, (bytes, params): (u64, u64)) -> Self {
        self.weight_bytes = bytes;
        self.matmul_params = params;
        self
    }
}

/// `git rev-parse --short HEAD` of the working directory, else of the source tree this was built
/// from, else "unknown".
pub fn commit() -> String {
    let try_in = |dir: &std::path::Path| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["rev-parse", "--short", "HEAD"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    };
    std::env::current_dir()
        .ok()
        .and_then(|d| try_in(&d))
        .or_else(|| try_in(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))))
        .unwrap_or_else(|| "unknown".into())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The CPU's model name from /proc/cpuinfo, with the number of logical cores.
pub fn cpu_name() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name"))?.split_once(':').map(|(_, v)| v.trim().into()))
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let simd = crate::backend::cpu::simd::active().name();
    let act = crate::backend::cpu::activations().name();
    format!("{name} ({cores} cores, {simd}, {act} activations)")
}

/// The rows as a Markdown table, the overhead ratios below, headed by where they ran.
pub fn format_markdown(info: &BenchInfo, rows: &[BenchRow]) -> String {
    let mut s = format!(
        "persona {} · {} · backend {} · {}\nmodel {} · {} · {} layers, H {}, heads {}/{}, head_dim {}, FFN {}, \
         vocab {} · {:.1} M params · {} threads · matmul weights {:.1} MB\n\n",
        info.persona_commit,
        info.date,
        info.backend,
        info.device,
        info.model,
        info.dtype,
        info.n_layers,
        info.hidden,
        info.n_heads,
        info.n_kv_heads,
        info.head_dim,
        info.ffn,
        info.vocab,
        info.params as f64 / 1e6,
        info.threads,
        info.weight_bytes as f64 / 1e6
    );
    s += "| test | batch | steer | t/s | ms/token | weights GB/s | GFLOP/s |\n|---|--:|---|--:|--:|--:|--:|\n";
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.2} ± {:.2} | {:.2} | {:.2} | {:.1} |\n",
            r.test,
            r.batch,
            r.steer.name(),
            r.mean_ts,
            r.sd_ts,
            r.ms_per_token,
            r.gb_s,
            r.gflop_s
        );
    }
    let o = overheads(rows);
    if !o.is_empty() {
        s += "\n| test | batch | steer vs none | throughput ratio | overhead |\n|---|--:|---|--:|--:|\n";
        for x in &o {
            s += &format!(
                "| {} | {} | {} | {:.3} | {:+.1}% |\n",
                x.test,
                x.batch,
                x.steer.name(),
                x.ratio,
                x.overhead_pct
            );
        }
    }
    s
}

/// The rows, overheads and run description as one JSON document.
pub fn to_json(info: &BenchInfo, rows: &[BenchRow]) -> serde_json::Value {
    serde_json::json!({ "info": info, "rows": rows, "overheads": overheads(rows) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_date_format() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }
}
