//! Soak test of `persona serve` on the default model (issue 16 item 7). Not run by default:
//! `scripts/soak.sh MINUTES` (default 10), or
//! `PERSONA_SOAK_MINUTES=10 cargo test --release --test soak -- --ignored --nocapture`.
//!
//! The binary serves the default model on a loopback port with the shipped vectors
//! (vectors/smollm2-135m-instruct); 64 client threads send requests back to back for the duration:
//! plain chat and text streams, steering (add, ablate, clamp), monitors, conditional ops (`when=`),
//! streams dropped after a few chunks, and bad requests (malformed JSON, an unknown key, an unknown
//! vector) that must get their exact 400. Checks: no unexpected status, every stream not cancelled
//! ends with a finish reason and `data: [DONE]` (and carries the projections and steering ops it
//! asked for, and as many token chunks as its usage says), the server's RSS flat after a warm-up
//! of 20% of the run (max/min ≤ 1.05, sampled every 2 s from /proc/PID/status), no KV page held
//! at the end. Prints p50/p99 time to first token and inter-token latency, request counts by kind
//! and the RSS samples as a table, and writes the same as JSON to PERSONA_SOAK_OUT when set.
//!
//! Environment: PERSONA_SOAK_MINUTES (10), PERSONA_SOAK_CLIENTS (64), PERSONA_SOAK_BACKEND (auto),
//! PERSONA_SOAK_OUT (a JSON path).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    PlainChat,
    PlainText,
    Add,
    Ablate,
    Clamp,
    Monitor,
    Conditional,
    Cancel,
    BadJson,
    UnknownKey,
    BadVector,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::PlainChat => "plain chat",
            Kind::PlainText => "plain text",
            Kind::Add => "steer add",
            Kind::Ablate => "steer ablate",
            Kind::Clamp => "steer clamp",
            Kind::Monitor => "monitor",
            Kind::Conditional => "conditional (when=)",
            Kind::Cancel => "cancelled stream",
            Kind::BadJson => "bad: malformed JSON",
            Kind::UnknownKey => "bad: unknown key",
            Kind::BadVector => "bad: unknown vector",
        }
    }

    /// The 400's `error.code` and a fragment of its message, for the bad requests.
    fn expected_error(self) -> Option<(&'static str, &'static str)> {
        match self {
            Kind::BadJson => Some(("invalid_json", "request body is not valid JSON")),
            Kind::UnknownKey => Some(("unknown_parameter", "unknown field `stering`; did you mean `steering`?")),
            Kind::BadVector => Some(("unknown_vector", "unknown vector `no-such-trait`")),
            _ => None,
        }
    }
}

/// Each client walks this list from its own offset: 16 requests, 3 of them bad, 2 cancelled.
const SCHEDULE: [Kind; 16] = [
    Kind::PlainChat,
    Kind::Add,
    Kind::Monitor,
    Kind::PlainText,
    Kind::Ablate,
    Kind::Conditional,
    Kind::Cancel,
    Kind::BadJson,
    Kind::Clamp,
    Kind::PlainChat,
    Kind::Monitor,
    Kind::UnknownKey,
    Kind::Conditional,
    Kind::Add,
    Kind::Cancel,
    Kind::BadVector,
];

const QUESTIONS: [&str; 8] = [
    "How should I spend a rainy afternoon?",
    "What do you think of people who are late to meetings?",
    "Give me advice on asking for a raise.",
    "Describe your ideal weekend.",
    "What would you do with a million dollars?",
    "How do I deal with a rude neighbour?",
    "Tell me a short story about a cat.",
    "Is it ever fine to lie to a friend?",
];

/// The request of kind `kind` (client `c`, its `k`-th): route, body text, and for streams the
/// steering ops and monitor labels the chunks must report.
fn request(kind: Kind, c: usize, k: usize) -> (&'static str, String, usize, Vec<&'static str>) {
    let q = QUESTIONS[(c + k) % QUESTIONS.len()];
    let max_tokens = 8 + (c * 7 + k * 5) % 33;
    let mut b = json!({"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "stream": true,
                       "temperature": 0.8, "seed": (c * 1000 + k) as u64,
                       "stream_options": {"include_usage": true}});
    let (mut ops, mut labels) = (0, vec![]);
    match kind {
        Kind::PlainChat => {}
        Kind::PlainText => {
            b = json!({"prompt": format!("Question: {q}\nAnswer:"), "max_tokens": max_tokens, "stream": true,
                       "temperature": 0.8, "seed": k, "stream_options": {"include_usage": true}});
        }
        Kind::Add => {
            b["steering"] = json!([{"vector": "evil", "layers": 18, "coeff": 2.0 + (c % 4) as f32}]);
            ops = 1;
        }
        Kind::Ablate => {
            b["steering"] = json!([{"vector": "sycophantic", "layers": "12-20", "op": "ablate"}]);
            ops = 9;
        }
        Kind::Clamp => {
            b["steering"] = json!([{"vector": "optimistic", "layers": 15, "op": "clamp", "coeff": 5.0,
                                    "positions": "response"}]);
            ops = 1;
        }
        Kind::Monitor => {
            b["monitor"] = json!([{"vector": "evil", "layers": 18, "threshold": 0.0},
                                  {"vector": "humorous", "layers": [12, 18]}]);
            labels = vec!["evil@18", "humorous@12", "humorous@18"];
        }
        Kind::Conditional => {
            // The CLI spelling and the shell-safe one, in turn.
            let when = if k.is_multiple_of(2) { "e@18>-15" } else { "e@18:gt:-15" };
            b["monitor"] = json!([{"vector": "evil", "layers": 18, "name": "e"}]);
            b["steering"] = json!([{"vector": "evil", "layers": 20, "coeff": -3.0, "when": when}]);
            ops = 1;
            labels = vec!["e@18"];
        }
        Kind::Cancel => {
            b["max_tokens"] = json!(64);
            b["ignore_eos"] = json!(true);
        }
        Kind::BadJson => return ("/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", ".into(), 0, vec![]),
        Kind::UnknownKey => {
            b["stering"] = json!([{"vector": "evil", "layers": 18, "coeff": 1}]);
        }
        Kind::BadVector => {
            b["steering"] = json!([{"vector": "no-such-trait", "layers": 18, "coeff": 1}]);
        }
    }
    let route = if kind == Kind::PlainText { "/v1/completions" } else { "/v1/chat/completions" };
    (route, b.to_string(), ops, labels)
}

#[derive(Debug, Default, Clone)]
struct Counts {
    sent: usize,
    /// Streams complete, or bad requests answered with their exact 400.
    ok: usize,
    cancelled: usize,
    unexpected: usize,
    incomplete: usize,
    tokens: usize,
}

#[derive(Default)]
struct ClientReport {
    counts: BTreeMap<Kind, Counts>,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    /// What went wrong, for the first few problems.
    problems: Vec<String>,
}

impl ClientReport {
    fn problem(&mut self, kind: Kind, what: String) {
        if self.problems.len() < 5 {
            self.problems.push(format!("{}: {what}", kind.name()));
        }
    }
}

/// One stream: checks its chunks; `cancel_after` drops the connection after that many chunks.
fn read_stream(
    resp: ureq::Response,
    t0: Instant,
    kind: Kind,
    ops: usize,
    labels: &[&str],
    cancel_after: Option<usize>,
    r: &mut ClientReport,
) {
    let counts = r.counts.get(&kind).cloned().unwrap_or_default();
    let (mut chunks, mut tokens, mut finished, mut done) = (0usize, 0usize, false, false);
    let mut usage = None;
    let mut last_token: Option<Instant> = None;
    let mut bad: Option<String> = None;
    for line in BufReader::new(resp.into_reader()).lines() {
        let Ok(line) = line else {
            bad.get_or_insert_with(|| "the connection broke".into());
            break;
        };
        let Some(d) = line.strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = match serde_json::from_str(d) {
            Ok(v) => v,
            Err(e) => {
                bad.get_or_insert_with(|| format!("chunk is not JSON ({e}): {d}"));
                continue;
            }
        };
        if v.get("error").is_some() {
            bad.get_or_insert_with(|| format!("error in the stream: {v}"));
            continue;
        }
        chunks += 1;
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(u as usize);
        }
        let ch = &v["choices"][0];
        if ch["token_ids"].is_array() {
            let now = Instant::now();
            match last_token {
                None => r.ttft.push((now - t0).as_secs_f64()),
                Some(t) => r.itl.push((now - t).as_secs_f64()),
            }
            last_token = Some(now);
            tokens += 1;
            for l in labels {
                if v["persona"]["projections"][*l].as_f64().is_none() {
                    bad.get_or_insert_with(|| format!("token chunk without the projection {l}: {v}"));
                }
            }
        }
        if ch["finish_reason"].is_string() {
            finished = true;
            if v["persona"]["steering_ops"].as_u64() != Some(ops as u64) {
                bad.get_or_insert_with(|| format!("steering_ops should be {ops}: {}", v["persona"]));
            }
        }
        if cancel_after.is_some_and(|n| chunks >= n) {
            break; // dropping the reader closes the connection
        }
    }
    let mut counts = counts;
    counts.tokens += tokens;
    if cancel_after.is_some_and(|n| chunks >= n) && !done && bad.is_none() {
        counts.cancelled += 1;
    } else {
        if usage.is_some_and(|u| u != tokens) {
            bad.get_or_insert_with(|| format!("{tokens} token chunks but usage says {usage:?}"));
        }
        if !(done && finished) {
            bad.get_or_insert_with(|| format!("ended without {}", if finished { "[DONE]" } else { "a finish_reason" }));
        }
        match bad {
            None => counts.ok += 1,
            Some(b) => {
                counts.incomplete += 1;
                r.problem(kind, b);
            }
        }
    }
    r.counts.insert(kind, counts);
}

fn client(base: String, c: usize, deadline: Instant) -> ClientReport {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let mut r = ClientReport::default();
    let mut k = 0;
    while Instant::now() < deadline {
        let kind = SCHEDULE[(c * 5 + k) % SCHEDULE.len()];
        let (route, body, ops, labels) = request(kind, c, k);
        k += 1;
        r.counts.entry(kind).or_default().sent += 1;
        let t0 = Instant::now();
        let resp = agent.post(&format!("{base}{route}")).set("Content-Type", "application/json").send_string(&body);
        match (resp, kind.expected_error()) {
            (Ok(resp), None) => {
                let cancel = (kind == Kind::Cancel).then_some(3);
                read_stream(resp, t0, kind, ops, &labels, cancel, &mut r);
            }
            (Err(ureq::Error::Status(400, resp)), Some((code, fragment))) => {
                let text = resp.into_string().unwrap_or_default();
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let msg = v["error"]["message"].as_str().unwrap_or("");
                if v["error"]["code"] == code && msg.contains(fragment) {
                    r.counts.get_mut(&kind).unwrap().ok += 1;
                } else {
                    r.counts.get_mut(&kind).unwrap().unexpected += 1;
                    r.problem(kind, format!("400 without code {code} / `{fragment}`: {text}"));
                }
            }
            (Ok(resp), Some(_)) => {
                r.counts.get_mut(&kind).unwrap().unexpected += 1;
                r.problem(kind, format!("status {} for a bad request", resp.status()));
            }
            (Err(ureq::Error::Status(code, resp)), _) => {
                r.counts.get_mut(&kind).unwrap().unexpected += 1;
                let text = resp.into_string().unwrap_or_default();
                r.problem(kind, format!("status {code}: {text}"));
            }
            (Err(e), _) => {
                r.counts.get_mut(&kind).unwrap().unexpected += 1;
                r.problem(kind, format!("transport error: {e}"));
            }
        }
    }
    r
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `persona serve` on the default model and the shipped vectors: the child and its base URL.
fn spawn(model: &std::path::Path, backend: &str, stderr: std::fs::File) -> (Child, String) {
    let vectors = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct");
    let mut child = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["serve", "--port", "0", "--backend", backend, "--context", "1024", "--max-batch", "16"])
        .args(["--max-queue", "128", "--model"])
        .arg(model)
        .arg("--vectors")
        .arg(&vectors)
        .env_remove("PERSONA_API_KEY")
        .env_remove("PERSONA_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().rsplit(' ').next().unwrap_or("").to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "the server did not start: {line:?}");
    (child, base)
}

#[test]
#[ignore]
fn soak_default_model() {
    let Some(model) = required_default_model() else { return };
    let env = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    let minutes: f64 = env("PERSONA_SOAK_MINUTES").map(|s| s.parse().expect("PERSONA_SOAK_MINUTES")).unwrap_or(10.0);
    let clients: usize = env("PERSONA_SOAK_CLIENTS").map(|s| s.parse().expect("PERSONA_SOAK_CLIENTS")).unwrap_or(64);
    let backend = env("PERSONA_SOAK_BACKEND").unwrap_or_else(|| "auto".into());
    let secs = minutes * 60.0;
    let log = std::env::temp_dir().join(format!("persona-soak-{}.stderr", std::process::id()));
    let (mut child, base) = spawn(&model, &backend, std::fs::File::create(&log).unwrap());
    let pid = child.id();
    eprintln!("soak: {clients} clients for {minutes} min against {base} (pid {pid}; server log {})", log.display());

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let sampler = {
        let (stop, samples) = (stop.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(m) = rss_mib(pid) {
                    samples.lock().unwrap().push((start.elapsed().as_secs_f64(), m));
                }
                for _ in 0..20 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let base = base.clone();
            std::thread::Builder::new().stack_size(1 << 20).spawn(move || client(base, c, deadline)).unwrap()
        })
        .collect();
    let mut all = ClientReport::default();
    for h in handles {
        let r = h.join().unwrap();
        for (k, c) in r.counts {
            let a = all.counts.entry(k).or_default();
            a.sent += c.sent;
            a.ok += c.ok;
            a.cancelled += c.cancelled;
            a.unexpected += c.unexpected;
            a.incomplete += c.incomplete;
            a.tokens += c.tokens;
        }
        all.ttft.extend(r.ttft);
        all.itl.extend(r.itl);
        for p in r.problems {
            if all.problems.len() < 20 {
                all.problems.push(p);
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    // The scheduler updates its gauges right after a step's last events.
    std::thread::sleep(Duration::from_millis(500));
    let metrics = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    let _ = child.kill();
    let _ = child.wait();

    // Latencies, memory.
    all.ttft.sort_by(f64::total_cmp);
    all.itl.sort_by(f64::total_cmp);
    let samples = samples.lock().unwrap().clone();
    let warm: Vec<f64> = samples.iter().filter(|(t, _)| *t >= 0.2 * secs && *t <= secs).map(|s| s.1).collect();
    let (wmin, wmax) = warm.iter().fold((f64::INFINITY, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    let ratio = wmax / wmin;
    let total = all.counts.values().fold(Counts::default(), |mut a, c| {
        a.sent += c.sent;
        a.ok += c.ok;
        a.cancelled += c.cancelled;
        a.unexpected += c.unexpected;
        a.incomplete += c.incomplete;
        a.tokens += c.tokens;
        a
    });

    // The table.
    let mut out = String::new();
    out += &format!(
        "soak: {clients} clients, {minutes} min (wall {wall:.0} s), backend {backend}, --context 1024 --max-batch 16\n"
    );
    out += &format!(
        "{:<22} {:>7} {:>7} {:>9} {:>10} {:>10} {:>8}\n",
        "kind", "sent", "ok", "cancelled", "unexpected", "incomplete", "tokens"
    );
    for (k, c) in all.counts.iter().map(|(k, c)| (k.name(), c)).chain([("total", &total)]) {
        out += &format!(
            "{:<22} {:>7} {:>7} {:>9} {:>10} {:>10} {:>8}\n",
            k, c.sent, c.ok, c.cancelled, c.unexpected, c.incomplete, c.tokens
        );
    }
    out += &format!("{:<22} {:>10} {:>10} {:>9}\n", "latency", "p50", "p99", "samples");
    out += &format!(
        "{:<22} {:>10.3} {:>10.3} {:>9}\n",
        "TTFT s (incl. queue)",
        pct(&all.ttft, 50.0),
        pct(&all.ttft, 99.0),
        all.ttft.len()
    );
    out += &format!(
        "{:<22} {:>10.1} {:>10.1} {:>9}\n",
        "inter-token ms",
        pct(&all.itl, 50.0) * 1e3,
        pct(&all.itl, 99.0) * 1e3,
        all.itl.len()
    );
    let first = samples.first().map_or(f64::NAN, |s| s.1);
    let last = samples.last().map_or(f64::NAN, |s| s.1);
    out += &format!(
        "server RSS MiB: {} samples every 2 s; first {first:.1}, last {last:.1}; after the {:.0} s warm-up \
         ({} samples) min {wmin:.1}, max {wmax:.1}, max/min {ratio:.4}\n",
        samples.len(),
        0.2 * secs,
        warm.len()
    );
    out += &format!(
        "server: {:.0} tokens generated, {:.1} tok/s; cancelled sequences {}, preempted {}, kv pages used at the end {} of {}\n",
        metric(&metrics, "persona_generated_tokens_total"),
        metric(&metrics, "persona_generated_tokens_total") / wall,
        metric(&metrics, "persona_sequences_cancelled_total"),
        metric(&metrics, "persona_preempted_total"),
        metric(&metrics, "persona_kv_pages_used"),
        metric(&metrics, "persona_kv_pages_total"),
    );
    for p in &all.problems {
        out += &format!("problem: {p}\n");
    }
    println!("{out}");

    let kinds: serde_json::Map<String, Value> = all
        .counts
        .iter()
        .map(|(k, c)| (k.name(), c))
        .chain([("total", &total)])
        .map(|(k, c)| {
            (
                k.to_string(),
                json!({"sent": c.sent, "ok": c.ok, "cancelled": c.cancelled, "unexpected": c.unexpected,
                       "incomplete": c.incomplete, "tokens": c.tokens}),
            )
        })
        .collect();
    let report = json!({
        "minutes": minutes, "clients": clients, "backend": backend, "wall_s": wall,
        "server_args": "--context 1024 --max-batch 16 --max-queue 128",
        "requests": kinds,
        "ttft_s": {"p50": pct(&all.ttft, 50.0), "p99": pct(&all.ttft, 99.0), "samples": all.ttft.len()},
        "inter_token_s": {"p50": pct(&all.itl, 50.0), "p99": pct(&all.itl, 99.0), "samples": all.itl.len()},
        "rss_mib": {"samples": samples.iter().map(|(t, m)| json!([t, m])).collect::<Vec<_>>(),
                    "warmup_s": 0.2 * secs, "after_warmup_min": wmin, "after_warmup_max": wmax,
                    "max_over_min": ratio},
        "server": {"generated_tokens": metric(&metrics, "persona_generated_tokens_total"),
                   "cancelled_sequences": metric(&metrics, "persona_sequences_cancelled_total"),
                   "preempted": metric(&metrics, "persona_preempted_total"),
                   "kv_pages_used_at_end": metric(&metrics, "persona_kv_pages_used")},
        "problems": all.problems,
    });
    if let Some(path) = env("PERSONA_SOAK_OUT") {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
        eprintln!("soak: wrote {path}");
    }
    let mut log_tail = String::new();
    if let Ok(mut f) = std::fs::File::open(&log) {
        let _ = f.read_to_string(&mut log_tail);
    }
    let log_tail: String =
        log_tail.lines().filter(|l| !l.contains("persona.flagged")).rev().take(10).collect::<Vec<_>>().join("\n");

    assert_eq!(total.unexpected, 0, "unexpected statuses: {:?}\nserver log (last lines):\n{log_tail}", all.problems);
    assert_eq!(total.incomplete, 0, "incomplete streams: {:?}", all.problems);
    assert!(total.ok > 0 && total.cancelled > 0, "nothing completed or nothing was cancelled");
    assert!(warm.len() >= 2, "too few RSS samples after the warm-up: {samples:?}");
    assert!(ratio <= 1.05, "server RSS not flat after the warm-up: {wmin:.1} to {wmax:.1} MiB (×{ratio:.4})");
    assert_eq!(metric(&metrics, "persona_kv_pages_used"), 0.0, "KV pages held at the end");
}
