//! Counters and histograms for `GET /metrics` (Prometheus text format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

const TTFT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const PROJ_BUCKETS: &[f64] = &[-20.0, -10.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, buckets: &[f64], v: f64) {
        if self.counts.len() != buckets.len() {
            self.counts = vec![0; buckets.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(buckets) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, &b) in buckets.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Server-wide metrics, shared by the HTTP side and the scheduler.
#[derive(Default)]
pub struct Metrics {
    pub queue_depth: AtomicUsize,
    pub batch_size: AtomicUsize,
    pub tokens: AtomicUsize,
    pub steps: AtomicUsize,
    pub completed: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub engine_errors: AtomicUsize,
    pub flagged: AtomicUsize,
    pub preempted: AtomicUsize,
    pub kv_pages_used: AtomicUsize,
    pub kv_pages_total: AtomicUsize,
    decode_us: AtomicU64,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    ttft: Mutex<Histogram>,
    projections: Mutex<BTreeMap<String, Histogram>>,
}

impl Metrics {
    pub fn observe_ttft(&self, s: f64) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(TTFT_BUCKETS, s);
        }
    }

    pub fn add_decode_time(&self, s: f64) {
        self.decode_us.fetch_add((s * 1e6) as u64, Ordering::Relaxed);
    }

    /// One finished HTTP request on `route` with status `code`.
    pub fn request(&self, route: &str, code: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route.to_string(), code)).or_insert(0) += 1;
        }
    }

    /// A per-token projection onto vector `name` (response tokens).
    pub fn observe_projection(&self, name: &str, v: f32) {
        if let Ok(mut m) = self.projections.lock() {
            m.entry(name.to_string()).or_default().observe(PROJ_BUCKETS, v as f64);
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let ld = |a: &AtomicUsize| a.load(Ordering::Relaxed) as f64;
        let _ = writeln!(o, "# HELP persona_requests_total HTTP requests by route and status code.");
        let _ = writeln!(o, "# TYPE persona_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((route, code), n) in m.iter() {
                let _ = writeln!(o, "persona_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(o, "# HELP persona_errors_total HTTP error responses by status code.");
        let _ = writeln!(o, "# TYPE persona_errors_total counter");
        if let Ok(m) = self.requests.lock() {
            let mut by_code: BTreeMap<u16, u64> = BTreeMap::new();
            for ((_, code), n) in m.iter().filter(|((_, c), _)| *c >= 400) {
                *by_code.entry(*code).or_insert(0) += n;
            }
            for (code, n) in by_code {
                let _ = writeln!(o, "persona_errors_total{{code=\"{code}\"}} {n}");
            }
        }
        g(&mut o, "persona_queue_depth", "gauge", "Sequences waiting for a batch slot.", ld(&self.queue_depth));
        g(&mut o, "persona_batch_size", "gauge", "Sequences in the running batch.", ld(&self.batch_size));
        g(&mut o, "persona_generated_tokens_total", "counter", "Tokens generated.", ld(&self.tokens));
        g(&mut o, "persona_steps_total", "counter", "Batched forward steps.", ld(&self.steps));
        g(&mut o, "persona_sequences_completed_total", "counter", "Sequences finished.", ld(&self.completed));
        g(
            &mut o,
            "persona_sequences_cancelled_total",
            "counter",
            "Sequences dropped (disconnect).",
            ld(&self.cancelled),
        );
        g(&mut o, "persona_engine_errors_total", "counter", "Failed forward steps.", ld(&self.engine_errors));
        g(&mut o, "persona_flagged_total", "counter", "Responses flagged by a monitor.", ld(&self.flagged));
        g(
            &mut o,
            "persona_preempted_total",
            "counter",
            "Sequences paused for lack of KV pages (recomputed when readmitted).",
            ld(&self.preempted),
        );
        g(&mut o, "persona_kv_pages_used", "gauge", "KV-cache pages held by sequences.", ld(&self.kv_pages_used));
        g(&mut o, "persona_kv_pages_total", "gauge", "KV-cache pages in the pool.", ld(&self.kv_pages_total));
        let busy = self.decode_us.load(Ordering::Relaxed) as f64 / 1e6;
        let tps = if busy > 0.0 { ld(&self.tokens) / busy } else { 0.0 };
        g(&mut o, "persona_tokens_per_second", "gauge", "Generated tokens per second of engine time.", tps);
        let _ = writeln!(o, "# HELP persona_time_to_first_token_seconds Queue + prefill time to the first token.");
        let _ = writeln!(o, "# TYPE persona_time_to_first_token_seconds histogram");
        if let Ok(h) = self.ttft.lock() {
            h.write(&mut o, "persona_time_to_first_token_seconds", "", TTFT_BUCKETS);
        }
        let _ = writeln!(o, "# HELP persona_projection Per-token response projections by monitored vector.");
        let _ = writeln!(o, "# TYPE persona_projection histogram");
        if let Ok(m) = self.projections.lock() {
            for (name, h) in m.iter() {
                let label = format!("vector=\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""));
                h.write(&mut o, "persona_projection", &label, PROJ_BUCKETS);
            }
        }
        o
    }
}
