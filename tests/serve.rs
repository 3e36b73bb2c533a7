//! `persona serve` end to end: the real server on a loopback port (in-process), driven over HTTP.
//! Tiny fixture models (no tokenizer: `/v1/completions` with token ids) for everything that needs
//! no text; the default SmolLM2 model for chat when it is cached.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use persona::backend::cpu::CpuBackend;
use persona::engine::generate::{GenOutput, GenRequest};
use persona::engine::sampler::SamplingParams;
use persona::serve::{run_server, ServeConfig};
use persona::steer::vector::PersonaVector;
use persona::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp, SteeringPlan};
use persona::LoadedModel;
use serde_json::{json, Value};

const CTX: usize = 256;

fn start(model: &Path, cfg: ServeConfig) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let model = model.to_path_buf();
    std::thread::spawn(move || {
        let m = LoadedModel::load(&model, CpuBackend, CTX).unwrap();
        run_server(m, ServeConfig { port: 0, ..cfg }, |a| tx.send(a).unwrap()).unwrap();
    });
    let addr = rx.recv_timeout(Duration::from_secs(120)).expect("server did not start");
    format!("http://{addr}")
}

fn tiny() -> std::path::PathBuf {
    fixtures().join("tiny-llama")
}

fn tiny_vector() -> std::path::PathBuf {
    tiny().join("test_vector.safetensors")
}

/// (status, JSON body) of a request.
fn call(method: &str, url: &str, body: Option<&Value>, key: Option<&str>) -> (u16, Value, Option<String>) {
    let mut r = ureq::request(method, url).timeout(Duration::from_secs(120));
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match body {
        Some(b) => r.set("Content-Type", "application/json").send_string(&b.to_string()),
        None => r.call(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let code = resp.status();
    let retry = resp.header("retry-after").map(str::to_string);
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v, retry)
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let (c, v, _) = call("POST", url, Some(body), None);
    (c, v)
}

fn upload(base: &str, name: &str, path: &Path) -> (u16, Value) {
    let bytes = std::fs::read(path).unwrap();
    let r = ureq::post(&format!("{base}/v1/vectors?name={name}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&bytes);
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("upload: {e}"),
    };
    let code = resp.status();
    (code, serde_json::from_str(&resp.into_string().unwrap()).unwrap())
}

/// SSE `data:` payloads of a streaming request.
fn stream(url: &str, body: &Value) -> Vec<Value> {
    let resp = ureq::post(url).set("Content-Type", "application/json").send_string(&body.to_string()).unwrap();
    let mut out = vec![];
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                out.push(Value::String("[DONE]".into()));
                break;
            }
            out.push(serde_json::from_str(d).unwrap());
        }
    }
    out
}

fn ids_of(v: &Value) -> Vec<u32> {
    u32s(v)
}

/// The steering the JSON extension `{"vector": V, "layers": layer, "coeff": coeff}` and a monitor
/// of `V` at `probe_layers` resolve to, built by hand from the file.
fn steering(v: &PersonaVector, layer: usize, coeff: f32, probe_layers: &[usize]) -> SeqSteering {
    let ops = if coeff == 0.0 {
        vec![]
    } else {
        vec![SteerOp {
            kind: SteerKind::Add,
            layer,
            vector: Arc::from(v.layer(layer)),
            coeff,
            positions: Positions::All,
            when: None,
        }]
    };
    let probes =
        probe_layers.iter().map(|&l| Probe { name: "t".into(), layer: l, vector: Arc::from(v.layer(l)) }).collect();
    SeqSteering { sources: Vec::new(), plan: SteeringPlan { ops }, probes }
}

fn engine_alone(
    m: &LoadedModel<CpuBackend>,
    prompt: &[u32],
    n: usize,
    st: SeqSteering,
    sampling: SamplingParams,
) -> GenOutput {
    let mut r = GenRequest::greedy(prompt.to_vec(), n);
    r.ignore_eos = true;
    r.sampling = sampling;
    r.steering = if st.is_empty() { None } else { Some(Arc::new(st)) };
    m.engine.generate(&[r], &mut |_, _| {}).unwrap().remove(0)
}

const PROMPT: &[u32] = &[37, 235, 140, 72, 255, 137, 203, 133, 79];

#[test]
fn tiny_steered_completion_matches_engine_and_registry_round_trip() {
    let base = start(&tiny(), ServeConfig::default());
    let (code, h, _) = call("GET", &format!("{base}/health"), None, None);
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")));
    let (code, models, _) = call("GET", &format!("{base}/v1/models"), None, None);
    assert_eq!(code, 200);
    assert_eq!(models["data"][0]["object"], "model");

    // Registry: upload, list, get, delete, re-upload.
    let (code, v) = upload(&base, "t", &tiny_vector());
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["name"], "t");
    assert_eq!(v["norms"].as_array().unwrap().len(), 4);
    let (_, list, _) = call("GET", &format!("{base}/v1/vectors"), None, None);
    assert!(list["data"].as_array().unwrap().iter().any(|x| x["name"] == "t"));
    let (code, _, _) = call("DELETE", &format!("{base}/v1/vectors/t"), None, None);
    assert_eq!(code, 200);
    let (code, _, _) = call("GET", &format!("{base}/v1/vectors/t"), None, None);
    assert_eq!(code, 404);
    let body = json!({"prompt": PROMPT, "max_tokens": 4, "steering": [{"vector": "t", "layers": 2, "coeff": 4}]});
    let (code, e) = post(&format!("{base}/v1/completions"), &body);
    assert_eq!(code, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("unknown vector `t`"), "{e}");
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);

    let m = LoadedModel::load(&tiny(), CpuBackend, CTX).unwrap();
    let pv = PersonaVector::load(tiny_vector()).unwrap();
    let body = json!({
        "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "logprobs": 3,
        "steering": [{"vector": "t", "layers": "2", "coeff": 6.0}],
        "monitor": [{"vector": "t", "layers": [1, 3], "threshold": 1e4}],
    });
    let (code, r) = post(&format!("{base}/v1/completions"), &body);
    assert_eq!(code, 200, "{r}");
    let want = engine_alone(&m, PROMPT, 12, steering(&pv, 2, 6.0, &[1, 3]), SamplingParams::greedy());
    let got = ids_of(&r["choices"][0]["token_ids"]);
    assert_eq!(got, want.ids(), "served tokens differ from Engine::generate with the same steering");
    let plain = engine_alone(&m, PROMPT, 12, SeqSteering::default(), SamplingParams::greedy());
    assert_ne!(plain.ids(), want.ids(), "the steering should change the tokens of the tiny model");
    // Projections: last prompt token, response series and mean equal the engine's.
    let probes = r["persona"]["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2);
    for (k, p) in probes.iter().enumerate() {
        let lp = p["last_prompt"].as_f64().unwrap() as f32;
        assert!((lp - want.last_prompt_projection(k)).abs() < 1e-4, "{lp} vs {}", want.last_prompt_projection(k));
        let mean = p["response_mean"].as_f64().unwrap() as f32;
        assert!((mean - want.response_mean_projection(k)).abs() < 1e-4);
        let series = f32s(&p["projections"]);
        assert_eq!(series.len(), 12);
        for (a, b) in series.iter().zip(&want.projections[k][PROMPT.len()..]) {
            assert!((a - b).abs() < 1e-4);
        }
    }
    assert_eq!(r["persona"]["flagged"], false);
    assert_eq!(r["usage"]["completion_tokens"], 12);
    assert_eq!(r["usage"]["prompt_tokens"], PROMPT.len());
    let lps = &r["choices"][0]["logprobs"];
    assert_eq!(lps["token_logprobs"].as_array().unwrap().len(), 12);
    assert_eq!(lps["top_logprobs"][0].as_object().unwrap().len(), 3);
    assert!(lps["token_logprobs"][0].as_f64().unwrap() <= 0.0);

    // Server-wide default steering: applies when a request omits `steering`; `[]` opts out.
    // Unset, GET says so explicitly.
    let unset = |d: &Value| {
        assert_eq!((&d["set"], &d["steering"], &d["monitor"]), (&json!(false), &json!([]), &json!([])), "{d}");
        assert!(d["message"].as_str().unwrap().contains("no server-wide default steering"), "{d}");
    };
    let (code, d, _) = call("GET", &format!("{base}/v1/steering"), None, None);
    assert_eq!(code, 200);
    unset(&d);
    let (code, d, _) = call(
        "PUT",
        &format!("{base}/v1/steering"),
        Some(&json!({"steering": [{"vector": "t", "layers": 2, "coeff": 6.0}]})),
        None,
    );
    assert_eq!(code, 200, "{d}");
    let (_, d, _) = call("GET", &format!("{base}/v1/steering"), None, None);
    assert_eq!(d["set"], true, "{d}");
    assert_eq!(d["steering"], json!([{"vector": "t", "layers": 2, "coeff": 6.0}]));
    assert_eq!((d["monitor"].clone(), d.get("message")), (json!([]), None));
    let plain_body = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (_, r) = post(&format!("{base}/v1/completions"), &plain_body);
    assert_eq!(ids_of(&r["choices"][0]["token_ids"]), want.ids());
    let mut opt_out = plain_body.clone();
    opt_out["steering"] = json!([]);
    let (_, r) = post(&format!("{base}/v1/completions"), &opt_out);
    assert_eq!(ids_of(&r["choices"][0]["token_ids"]), plain.ids());
    call("PUT", &format!("{base}/v1/steering"), Some(&json!({})), None);
    unset(&call("GET", &format!("{base}/v1/steering"), None, None).1);
    let (_, r) = post(&format!("{base}/v1/completions"), &plain_body);
    assert_eq!(ids_of(&r["choices"][0]["token_ids"]), plain.ids());
}

/// The issue's mixed batch: 8 concurrent requests with 8 different plans (and seeds) each get
/// exactly what they get alone.
#[test]
fn concurrent_requests_with_different_steering_each_get_their_own() {
    // A small step delay keeps all of them in the running batch together; prompts are prefilled
    // 4 tokens per step across all of them (chunked; most sequences sit some steps out), under
    // every `positions`.
    let cfg =
        ServeConfig { step_delay: Some(Duration::from_millis(3)), max_prefill_tokens: 4, ..ServeConfig::default() };
    let base = start(&tiny(), cfg);
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    let m = LoadedModel::load(&tiny(), CpuBackend, CTX).unwrap();
    let pv = PersonaVector::load(tiny_vector()).unwrap();
    let cases: Vec<(f32, usize, u64, usize)> = vec![
        (-8.0, 1, 1, 20),
        (-3.0, 2, 2, 9),
        (0.0, 2, 3, 15),
        (2.0, 3, 4, 24),
        (5.0, 1, 5, 7),
        (9.0, 2, 6, 18),
        (-1.0, 3, 7, 12),
        (4.0, 1, 8, 16),
    ];
    let handles: Vec<_> = cases
        .iter()
        .map(|&(coeff, layer, seed, n)| {
            let base = base.clone();
            std::thread::spawn(move || {
                let mut body = json!({
                    "prompt": PROMPT, "max_tokens": n, "temperature": 0.9, "top_k": 40, "seed": seed,
                    "ignore_eos": true, "monitor": [{"vector": "t", "layers": [2]}],
                });
                if coeff != 0.0 {
                    let positions = ["all", "prompt", "response"][seed as usize % 3];
                    body["steering"] =
                        json!([{"vector": "t", "layers": layer, "coeff": coeff, "positions": positions}]);
                }
                let (code, r) = post(&format!("{base}/v1/completions"), &body);
                assert_eq!(code, 200, "{r}");
                r
            })
        })
        .collect();
    let results: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (&(coeff, layer, seed, n), r) in cases.iter().zip(&results) {
        let sampling = SamplingParams { temperature: 0.9, top_k: 40, top_p: 1.0, seed };
        let mut st = steering(&pv, layer, coeff, &[2]);
        let positions = [Positions::All, Positions::Prompt, Positions::Response][seed as usize % 3];
        st.plan.ops.iter_mut().for_each(|op| op.positions = positions);
        let want = engine_alone(&m, PROMPT, n, st, sampling);
        assert_eq!(ids_of(&r["choices"][0]["token_ids"]), want.ids(), "coeff {coeff} layer {layer} seed {seed}");
        let mean = r["persona"]["probes"][0]["response_mean"].as_f64().unwrap() as f32;
        assert!((mean - want.response_mean_projection(0)).abs() < 1e-4);
    }
    // The batch really ran several sequences per step.
    let (_, metrics, _) = call("GET", &format!("{base}/metrics"), None, None);
    let text = metrics.as_str().unwrap().to_string();
    let steps = metric(&text, "persona_steps_total");
    let tokens = metric(&text, "persona_generated_tokens_total");
    assert!(tokens > steps, "continuous batching: {tokens} tokens in {steps} steps");
}

/// Paged KV memory: six sequences of ~70 tokens (5 pages each) share a pool of 16 pages, so
/// they cannot all grow at once; the scheduler pauses the latest admitted and recomputes them
/// later (prompt, then the generated tokens, in chunks). Every stream still gets exactly its
/// solo tokens and projections — with `positions=response` steering too — and all pages return.
#[test]
fn kv_pool_smaller_than_the_batch_preempts_and_stays_exact() {
    // A prefill budget of 8 tokens per step: prompts and replays go in chunks.
    let cfg = ServeConfig {
        kv_tokens: Some(CTX),
        max_prefill_tokens: 8,
        step_delay: Some(Duration::from_millis(2)),
        ..ServeConfig::default()
    };
    let base = start(&tiny(), cfg);
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    let m = LoadedModel::load(&tiny(), CpuBackend, CTX).unwrap();
    let pv = PersonaVector::load(tiny_vector()).unwrap();
    let cases: Vec<(f32, usize, u64)> =
        vec![(0.0, 2, 1), (6.0, 3, 2), (-6.0, 1, 3), (3.0, 2, 4), (-2.0, 1, 5), (4.0, 2, 6)];
    let n = 60;
    // Staggered starts admit them in order, so the ones preempted (the latest admitted) are the
    // last, `positions=response`-steered ones: their replay must steer every response token.
    let handles: Vec<_> = cases
        .iter()
        .map(|&(coeff, layer, seed)| {
            let base = base.clone();
            std::thread::sleep(Duration::from_millis(15));
            std::thread::spawn(move || {
                let mut body = json!({
                    "prompt": PROMPT, "max_tokens": n, "temperature": 0.8, "seed": seed, "ignore_eos": true,
                    "monitor": [{"vector": "t", "layers": [2]}], "stream": true,
                });
                if coeff != 0.0 {
                    let positions = if seed >= 3 { "response" } else { "all" };
                    body["steering"] =
                        json!([{"vector": "t", "layers": layer, "coeff": coeff, "positions": positions}]);
                }
                stream(&format!("{base}/v1/completions"), &body)
            })
        })
        .collect();
    let results: Vec<Vec<Value>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (&(coeff, layer, seed), chunks) in cases.iter().zip(&results) {
        let sampling = SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed };
        let mut st = steering(&pv, layer, coeff, &[2]);
        if seed >= 3 {
            st.plan.ops.iter_mut().for_each(|op| op.positions = Positions::Response);
        }
        let want = engine_alone(&m, PROMPT, n, st, sampling);
        let tokens: Vec<&Value> = chunks.iter().filter(|c| c["persona"]["token_id"].is_number()).collect();
        let ids: Vec<u32> = tokens.iter().map(|c| c["persona"]["token_id"].as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want.ids(), "coeff {coeff} layer {layer} seed {seed}");
        for (i, c) in tokens.iter().enumerate() {
            let p = c["persona"]["projections"]["t@2"].as_f64().unwrap() as f32;
            assert!((p - want.steps[i].projections[0]).abs() < 1e-4, "seed {seed} token {i}");
        }
        let last = chunks.iter().find(|c| c["persona"]["probes"].is_array()).expect("a final persona object");
        let mean = last["persona"]["probes"][0]["response_mean"].as_f64().unwrap() as f32;
        assert!(
            (mean - want.response_mean_projection(0)).abs() < 1e-4,
            "{mean} vs {}",
            want.response_mean_projection(0)
        );
    }
    let (_, metrics, _) = call("GET", &format!("{base}/metrics"), None, None);
    let text = metrics.as_str().unwrap().to_string();
    assert!(metric(&text, "persona_preempted_total") > 0.0, "the pool is too small for all six: {text}");
    assert_eq!(metric(&text, "persona_kv_pages_total"), 16.0);
    assert_eq!(metric(&text, "persona_kv_pages_used"), 0.0, "pages leaked");
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// The `persona serve` binary on a free loopback port: the child and its base URL.
fn spawn_server(args: &[&str]) -> (std::process::Child, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let base = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    (child, base)
}

#[derive(Debug, Default)]
struct LoadReport {
    streams: usize,
    tokens: usize,
    /// Responses with a status other than 200, by status.
    bad_status: Vec<u16>,
    /// Streams that ended without `[DONE]`, a finish reason, or all their tokens.
    incomplete: usize,
    secs: f64,
}

/// `clients` threads each sending streaming requests back to back until `secs` have passed;
/// every stream must bring `max_tokens` token chunks, a finish reason and `[DONE]`.
fn load(
    base: &str,
    clients: usize,
    secs: f64,
    max_tokens: usize,
    body: impl Fn(usize, usize) -> (String, Value) + Send + Sync + 'static,
) -> LoadReport {
    let t0 = std::time::Instant::now();
    let body = Arc::new(body);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (base, body) = (base.to_string(), body.clone());
            std::thread::spawn(move || {
                let mut r = LoadReport::default();
                let mut k = 0;
                while t0.elapsed().as_secs_f64() < secs {
                    let (route, b) = body(c, k);
                    k += 1;
                    let resp = ureq::post(&format!("{base}{route}"))
                        .timeout(Duration::from_secs(300))
                        .set("Content-Type", "application/json")
                        .send_string(&b.to_string());
                    let resp = match resp {
                        Ok(x) => x,
                        Err(ureq::Error::Status(code, _)) => {
                            r.bad_status.push(code);
                            continue;
                        }
                        Err(e) => panic!("client {c}: {e}"),
                    };
                    let (mut tokens, mut finished, mut done) = (0, false, false);
                    for line in BufReader::new(resp.into_reader()).lines() {
                        let Ok(line) = line else { break };
                        let Some(d) = line.strip_prefix("data: ") else { continue };
                        if d == "[DONE]" {
                            done = true;
                            break;
                        }
                        let v: Value = serde_json::from_str(d).unwrap();
                        // The usage chunk (stream_options.include_usage) counts the tokens.
                        tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                        finished |= v["choices"][0]["finish_reason"].is_string();
                    }
                    r.streams += 1;
                    r.tokens += tokens;
                    r.incomplete += !(done && finished && tokens == max_tokens) as usize;
                }
                r
            })
        })
        .collect();
    let mut all = LoadReport::default();
    for h in handles {
        let r = h.join().unwrap();
        all.streams += r.streams;
        all.tokens += r.tokens;
        all.bad_status.extend(r.bad_status);
        all.incomplete += r.incomplete;
    }
    all.secs = t0.elapsed().as_secs_f64();
    all
}

struct Rounds {
    first: LoadReport,
    second: LoadReport,
    /// Server RSS after each round, MiB.
    rss1: f64,
    rss2: f64,
    /// `/metrics` at the end.
    metrics: String,
}

/// Two load rounds of 32 clients against a spawned server (a first, then a second of `secs2`),
/// the server's memory after each, and its metrics at the end; the server is then stopped.
fn two_rounds(
    mut child: std::process::Child,
    base: &str,
    secs1: f64,
    secs2: f64,
    max_tokens: usize,
    body: impl Fn(usize, usize) -> (String, Value) + Send + Sync + Copy + 'static,
) -> Rounds {
    let first = load(base, 32, secs1, max_tokens, body);
    let rss1 = rss_mib(child.id());
    let second = load(base, 32, secs2, max_tokens, body);
    let rss2 = rss_mib(child.id());
    // The scheduler updates its gauges right after sending a step's last events.
    std::thread::sleep(Duration::from_millis(200));
    let (_, metrics, _) = call("GET", &format!("{base}/metrics"), None, None);
    let _ = child.kill();
    let _ = child.wait();
    Rounds { first, second, rss1, rss2, metrics: metrics.as_str().unwrap().to_string() }
}

/// 32 concurrent streaming clients against the `persona serve` binary on the tiny model, with a
/// pool too small for all of them (preemption under load): no error status, every stream
/// complete, no page left held, and the server's memory flat between a first and a second round.
#[test]
fn load_32_streaming_clients_tiny() {
    let tiny = tiny().display().to_string();
    let args = ["--backend", "cpu", "--context", "256", "--max-batch", "16", "--kv-tokens", "512"];
    let (child, base) = spawn_server(&[&args[..], &["--model", &tiny, "--vectors", &tiny]].concat());
    let body = |c: usize, k: usize| {
        let n = 5 + (c * 7 + k * 3) % 40;
        let mut b = json!({"prompt": vec![37u32 + c as u32; n], "max_tokens": 40, "ignore_eos": true, "stream": true,
                           "stream_options": {"include_usage": true}, "seed": k,
                           "monitor": [{"vector": "test_vector", "layers": [2]}]});
        if c.is_multiple_of(2) {
            b["steering"] = json!([{"vector": "test_vector", "layers": 1 + c % 3, "coeff": c as f32 - 16.0}]);
        }
        ("/v1/completions".to_string(), b)
    };
    let Rounds { first, second, rss1, rss2, metrics: text } = two_rounds(child, &base, 4.0, 8.0, 40, body);
    eprintln!(
        "load: {first:?}\n      {second:?}\n      server RSS {rss1:.1} → {rss2:.1} MiB, preempted {}",
        metric(&text, "persona_preempted_total")
    );
    for r in [&first, &second] {
        assert!(r.bad_status.is_empty() && r.incomplete == 0 && r.streams >= 32, "{r:?}");
    }
    assert!(metric(&text, "persona_preempted_total") > 0.0, "the pool should be too small for 16 at once");
    assert_eq!(metric(&text, "persona_kv_pages_used"), 0.0, "pages leaked");
    assert_eq!(metric(&text, "persona_batch_size"), 0.0);
    assert!(rss1 > 0.0 && rss2 - rss1 < 16.0, "server memory grew from {rss1:.1} to {rss2:.1} MiB between rounds");
}

/// The issue's load check on the default model (not run by default: `PERSONA_LOAD_SECS=180 cargo
/// test --release --test serve load_32_streaming_clients_default_model -- --ignored --nocapture`):
/// 32 concurrent streaming chat clients against the binary, zero errors, every stream complete,
/// memory flat.
#[test]
#[ignore]
fn load_32_streaming_clients_default_model() {
    if required_default_model().is_none() {
        return;
    }
    let secs: f64 = std::env::var("PERSONA_LOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(180.0);
    let (child, base) = spawn_server(&["--backend", "cpu", "--max-batch", "16", "--context", "1024"]);
    let body = |c: usize, k: usize| {
        let b = json!({"messages": [{"role": "user", "content": format!("Tell me about topic number {}.", c * 100 + k)}],
                       "max_tokens": 48, "ignore_eos": true, "stream": true, "seed": k,
                       "stream_options": {"include_usage": true}});
        ("/v1/chat/completions".to_string(), b)
    };
    let Rounds { first: warm, second: main, rss1, rss2, metrics: text } =
        two_rounds(child, &base, secs / 4.0, secs, 48, body);
    println!("warm-up: {warm:?}");
    println!(
        "load: {} streams, {} tokens in {:.0} s = {:.1} tok/s aggregate; bad status {:?}, incomplete {}; \
         server RSS {rss1:.0} → {rss2:.0} MiB; preempted {}; kv pages used {} of {}; mean TTFT {:.2} s",
        main.streams,
        main.tokens,
        main.secs,
        main.tokens as f64 / main.secs,
        main.bad_status,
        main.incomplete,
        metric(&text, "persona_preempted_total"),
        metric(&text, "persona_kv_pages_used"),
        metric(&text, "persona_kv_pages_total"),
        metric(&text, "persona_time_to_first_token_seconds_sum")
            / metric(&text, "persona_time_to_first_token_seconds_count"),
    );
    assert!(main.bad_status.is_empty() && main.incomplete == 0 && warm.bad_status.is_empty(), "{main:?}");
    assert_eq!(metric(&text, "persona_kv_pages_used"), 0.0);
    assert!(rss2 - rss1 < 64.0, "server memory grew from {rss1:.0} to {rss2:.0} MiB");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

#[test]
fn streaming_chunks_carry_projections_and_flags() {
    let base = start(&tiny(), ServeConfig::default());
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    let m = LoadedModel::load(&tiny(), CpuBackend, CTX).unwrap();
    let pv = PersonaVector::load(tiny_vector()).unwrap();
    let body = json!({
        "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}, "logprobs": 2,
        "steering": [{"vector": "t", "layers": "1-2", "coeff": -3}],
        "monitor": [{"vector": "t", "layers": 3, "threshold": -1e4}],
    });
    let chunks = stream(&format!("{base}/v1/completions"), &body);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let mut st = steering(&pv, 1, -3.0, &[3]);
    st.plan.ops.push(SteerOp { layer: 2, vector: Arc::from(pv.layer(2)), ..st.plan.ops[0].clone() });
    let want = engine_alone(&m, PROMPT, 10, st, SamplingParams::greedy());
    let token_chunks: Vec<&Value> = chunks.iter().filter(|c| c["persona"]["token_id"].is_number()).collect();
    assert_eq!(token_chunks.len(), 10);
    for (i, c) in token_chunks.iter().enumerate() {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["persona"]["token_id"].as_u64().unwrap() as u32, want.steps[i].id);
        assert_eq!(c["choices"][0]["token_ids"][0].as_u64().unwrap() as u32, want.steps[i].id);
        let p = c["persona"]["projections"]["t@3"].as_f64().unwrap() as f32;
        // The projection at the position that produced the token (chunk 0: the last prompt token).
        assert!((p - want.steps[i].projections[0]).abs() < 1e-4, "chunk {i}: {p} vs {:?}", want.steps[i].projections);
        assert!(c["choices"][0]["logprobs"]["token_logprobs"][0].is_number());
    }
    let last = chunks.iter().find(|c| c["choices"][0]["finish_reason"].is_string()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["persona"]["flagged"], true);
    assert!(last["persona"]["reason"].as_str().unwrap().contains("t@3"));
    let probe = &last["persona"]["probes"][0];
    let mean = probe["response_mean"].as_f64().unwrap() as f32;
    assert!((mean - want.response_mean_projection(0)).abs() < 1e-4);
    // Positions (issue 20 item 12): a streamed value is labelled with the position it was read at,
    // and the final object holds the same value at that position: `last_prompt` at p − 1, then
    // `projections[i]` at `projections_start + i` (each generated token's own position).
    let p = want.prompt_ids.len();
    assert_eq!(probe["projections_start"].as_u64(), Some(p as u64));
    assert_eq!(probe["last_prompt_position"].as_u64(), Some(p as u64 - 1));
    let series = f32s(&probe["projections"]);
    assert_eq!(series.len(), 10);
    for (i, c) in token_chunks.iter().enumerate() {
        let pos = c["persona"]["position"].as_u64().unwrap() as usize;
        assert_eq!(pos, p + i - 1, "chunk {i}");
        let streamed = c["persona"]["projections"]["t@3"].as_f64().unwrap() as f32;
        let fin = if pos == p - 1 {
            probe["last_prompt"].as_f64().unwrap() as f32
        } else {
            series[pos - probe["projections_start"].as_u64().unwrap() as usize]
        };
        assert!((streamed - fin).abs() < 1e-4, "position {pos}: streamed {streamed}, final {fin}");
    }
    // The prompt mean leaves out position 0 (BOS: the attention sink).
    let pm = probe["prompt_mean"].as_f64().unwrap() as f32;
    let own: Vec<f32> = want.projections[0][1..p].to_vec();
    assert!((pm - own.iter().sum::<f32>() / own.len() as f32).abs() < 1e-3, "{pm} vs {own:?}");
    assert!((pm - want.prompt_mean_projection(0)).abs() < 1e-4);
    let usage = chunks.iter().find(|c| c["usage"].is_object()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 10);
}

#[test]
fn bad_requests_are_400_with_openai_errors() {
    // A step delay keeps a long stream in flight while the bad requests arrive.
    let base = start(&tiny(), ServeConfig { step_delay: Some(Duration::from_millis(4)), ..ServeConfig::default() });
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    let url = format!("{base}/v1/completions");
    let in_flight = {
        let url = url.clone();
        let body = json!({"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "ignore_eos": true, "stream": true,
                          "steering": [{"vector": "t", "layers": 2, "coeff": 3.0}]});
        std::thread::spawn(move || stream(&url, &body))
    };
    let ok = json!({"prompt": [1, 2, 3], "max_tokens": 2});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("steering", json!([{"vector": "nope", "layers": 1, "coeff": 1}])), "unknown vector"),
        (with("steering", json!([{"vector": "t", "layers": 99, "coeff": 1}])), "out of range"),
        (with("steering", json!([{"vector": "t", "layers": 1, "coeff": 1e9}])), "coeff"),
        (with("steering", json!([{"vector": "t", "layers": 1, "coeff": "x"}])), "coeff"),
        (with("steering", json!([{"vector": "t", "layers": 1, "coeff": "NaN"}])), "coeff"),
        (with("steering", json!([{"vector": "t", "layers": 1, "coeff": 1, "op": "boost"}])), "unknown op"),
        (with("steering", json!([{"vector": "t", "layers": 1, "coeff": 1, "when": "zz>1"}])), "no monitor named"),
        (with("monitor", json!([{"vector": "t", "layers": "5-9"}])), "out of range"),
        (with("n", json!(100)), "`n`"),
        (with("max_tokens", json!(100000)), "context"),
        (with("temperature", json!(-1)), "temperature"),
        (with("prompt", json!([1, 2, 99999])), "vocabulary"),
        (with("prompt", json!([])), "empty"),
        (with("stop", json!(5)), "stop"),
    ];
    for (body, want) in cases {
        let (code, e) = post(&url, &body);
        assert_eq!(code, 400, "{body} → {e}");
        let msg = e["error"]["message"].as_str().unwrap_or_else(|| panic!("no error.message: {e}"));
        assert!(msg.contains(want), "{body}: message `{msg}` should mention `{want}`");
        assert!(
            e["error"]["type"].is_string() && e["error"].get("param").is_some() && e["error"].get("code").is_some()
        );
    }
    // Malformed JSON, and chat errors.
    for raw in [
        "{\"prompt\": [1,",
        "{\"prompt\": [1], \"steering\": [{\"vector\": \"t\", \"layers\": 1, \"coeff\": NaN}]}",
        "{\"prompt\": [1], \"steering\": [{\"vector\": \"t\", \"layers\": 1, \"coeff\": 1e999}]}",
    ] {
        match ureq::post(&url).set("Content-Type", "application/json").send_string(raw) {
            Err(ureq::Error::Status(400, resp)) => {
                let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
                assert!(v["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{raw}: {v}");
            }
            other => panic!("{raw}: {:?}", other.map(|r| r.status())),
        }
    }
    let (code, e) = post(&format!("{base}/v1/chat/completions"), &json!({"messages": []}));
    assert_eq!(code, 400);
    assert_eq!(e["error"]["param"], "messages");
    // Vectors for other models: another width (tiny-qwen2), another depth (tiny-llama3-rope).
    for other in ["tiny-qwen2", "tiny-llama3-rope"] {
        let (code, e) = upload(&base, "other", &fixtures().join(other).join("test_vector.safetensors"));
        assert_eq!(code, 400, "{other}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("model"), "{other}: {e}");
    }
    let (code, e) = upload(&base, "junk", Path::new(file!()));
    assert_eq!(code, 400, "{e}");
    // The server still works, and the stream in flight got exactly its tokens.
    let (code, _) = post(&url, &ok);
    assert_eq!(code, 200);
    let chunks = in_flight.join().unwrap();
    let ids: Vec<u32> =
        chunks.iter().filter_map(|c| c["choices"][0]["token_ids"][0].as_u64()).map(|x| x as u32).collect();
    let m = LoadedModel::load(&tiny(), CpuBackend, CTX).unwrap();
    let pv = PersonaVector::load(tiny_vector()).unwrap();
    let want = engine_alone(&m, PROMPT, 100, steering(&pv, 2, 3.0, &[]), SamplingParams::greedy());
    assert_eq!(ids, want.ids(), "the in-flight stream was disturbed");
    assert_eq!(chunks.last().unwrap(), "[DONE]");
}

#[test]
fn full_queue_is_429_and_disconnect_frees_the_slot() {
    let cfg =
        ServeConfig { max_batch: 1, max_queue: 1, step_delay: Some(Duration::from_millis(40)), ..Default::default() };
    let base = start(&tiny(), cfg);
    let url = format!("{base}/v1/completions");
    // A occupies the only slot (streaming, long).
    let body = json!({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": true, "stream": true});
    let resp = ureq::post(&url).set("Content-Type", "application/json").send_string(&body.to_string()).unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    // B waits in the queue.
    let b_url = url.clone();
    let b = std::thread::spawn(move || {
        post(&b_url, &json!({"prompt": PROMPT, "max_tokens": 3, "ignore_eos": true, "temperature": 0}))
    });
    std::thread::sleep(Duration::from_millis(400));
    // C finds the queue full.
    let (code, e, retry) = call("POST", &url, Some(&json!({"prompt": PROMPT, "max_tokens": 3})), None);
    assert_eq!(code, 429, "{e}");
    assert_eq!(e["error"]["code"], "queue_full");
    assert!(retry.is_some(), "429 needs Retry-After");
    // A disconnects: B gets the slot and finishes long before A's 200 tokens would have.
    let t = std::time::Instant::now();
    drop(reader);
    let (code, r) = b.join().unwrap();
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 3);
    assert!(t.elapsed() < Duration::from_secs(5), "B waited {:?}", t.elapsed());
    let (_, m, _) = call("GET", &format!("{base}/metrics"), None, None);
    assert!(metric(m.as_str().unwrap(), "persona_sequences_cancelled_total") >= 1.0);
}

#[test]
fn api_key_and_metrics_format() {
    let base = start(&tiny(), ServeConfig { api_key: Some("sekrit".into()), ..Default::default() });
    assert_eq!(call("GET", &format!("{base}/health"), None, None).0, 200);
    let (code, e, _) = call("GET", &format!("{base}/v1/models"), None, None);
    assert_eq!(code, 401);
    assert_eq!(e["error"]["code"], "invalid_api_key");
    assert_eq!(call("GET", &format!("{base}/v1/models"), None, Some("wrong")).0, 401);
    assert_eq!(call("GET", &format!("{base}/v1/models"), None, Some("sekrit")).0, 200);
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 3});
    assert_eq!(call("POST", &format!("{base}/v1/completions"), Some(&body), Some("sekrit")).0, 200);
    assert_eq!(call("GET", &format!("{base}/metrics"), None, None).0, 401);
    let (code, m, _) = call("GET", &format!("{base}/metrics"), None, Some("sekrit"));
    assert_eq!(code, 200);
    let text = m.as_str().unwrap();
    // Prometheus text: comments, or `name{labels} value` with a numeric value.
    for l in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {l}");
        let bare = name.split('{').next().unwrap();
        assert!(bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name in {l}");
        assert_eq!(name.contains('{'), name.ends_with('}'), "bad labels in {l}");
    }
    assert!(text.contains("persona_requests_total{route=\"/v1/completions\",code=\"200\"} 1"), "{text}");
    assert!(text.contains("persona_errors_total{code=\"401\"}"), "{text}");
    assert!(metric(text, "persona_generated_tokens_total") >= 3.0);
    assert!(text.contains("persona_time_to_first_token_seconds_count 1"));
}

#[test]
fn smollm2_chat_steered_matches_engine() {
    let Some(model) = required_default_model() else { return };
    let vec_path = fixtures().join("smollm2_extracted_vector.safetensors");
    let base = start(&model, ServeConfig::default());
    assert_eq!(upload(&base, "evil", &vec_path).0, 201);
    let m = LoadedModel::load(&model, CpuBackend, CTX).unwrap();
    let pv = PersonaVector::load_for_model(&vec_path, &m.engine.config).unwrap();
    let layer = 15.min(pv.n_layers);
    let msgs = [persona::model::Message::user("How should I treat my neighbours?")];
    let ids = m.chat_prompt_ids(&msgs).unwrap();
    let body = json!({
        "model": "persona", "messages": [{"role": "user", "content": "How should I treat my neighbours?"}],
        "max_tokens": 16, "temperature": 0, "logprobs": true, "top_logprobs": 2,
        "steering": [{"vector": "evil", "layers": layer, "coeff": 4}],
        "monitor": [{"vector": "evil", "layers": layer, "name": "t"}],
    });
    let (code, r) = post(&format!("{base}/v1/chat/completions"), &body);
    assert_eq!(code, 200, "{r}");
    let mut req = GenRequest::greedy(ids.clone(), 16);
    req.steering = Some(Arc::new(steering(&pv, layer, 4.0, &[layer])));
    let want = m.engine.generate(&[req], &mut |_, _| {}).unwrap().remove(0);
    let got = ids_of(&r["choices"][0]["token_ids"]);
    assert_eq!(got, want.ids());
    let eos = &m.engine.config.eos_ids;
    let text_ids: Vec<u32> = want.ids().into_iter().filter(|i| !eos.contains(i)).collect();
    assert_eq!(r["choices"][0]["message"]["content"].as_str().unwrap(), m.decode(&text_ids).unwrap());
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), got.len());
    let lp = r["persona"]["probes"][0]["last_prompt"].as_f64().unwrap() as f32;
    assert!((lp - want.last_prompt_projection(0)).abs() < 1e-3);

    // Streaming text joins to the same content; a stop string cuts it.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let chunks = stream(&format!("{base}/v1/chat/completions"), &sbody);
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().join("");
    let full = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(text, full);
    if let Some(word) = full.split_whitespace().nth(2) {
        let mut stop = body.clone();
        stop["stop"] = json!([word]);
        let (_, s) = post(&format!("{base}/v1/chat/completions"), &stop);
        let cut = s["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(cut, &full[..full.find(word).unwrap()]);
        assert_eq!(s["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn conditional_steering_and_vectors_dir_and_control_vector_upload() {
    // --vectors DIR: the tiny model folder holds one vector file (the model file is skipped).
    let cfg = ServeConfig { vectors_dir: Some(tiny()), ..Default::default() };
    let base = start(&tiny(), cfg);
    let (_, list, _) = call("GET", &format!("{base}/v1/vectors"), None, None);
    let names: Vec<&str> = list["data"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(names.contains(&"test_vector"), "{names:?}");

    // A llama.cpp control vector (GGUF) uploads and maps to the same rows (2..=N).
    let pv = PersonaVector::load(tiny_vector()).unwrap();
    let mut only = pv.clone();
    // llama.cpp has no equivalent of our rows 0 and 1.
    only.layer_mut(0).fill(0.0);
    only.layer_mut(1).fill(0.0);
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("cv.gguf");
    persona::steer::control_vector::export_control_vector(&only, &gguf, "tiny").unwrap();
    let (code, v) = upload(&base, "cv", &gguf);
    assert_eq!(code, 201, "{v}");
    let norms = f32s(&v["norms"]);
    for l in 2..=3 {
        assert!((norms[l] - pv.norm(l)).abs() < 1e-4 * pv.norm(l).max(1.0), "layer {l}: {norms:?}");
    }

    // `when`: steer only where the vector's own projection is above a threshold.
    let m = LoadedModel::load(&tiny(), CpuBackend, CTX).unwrap();
    let body = json!({
        "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": true,
        "steering": [{"vector": "test_vector", "layers": 2, "coeff": 5, "when": "self<0.0"}],
    });
    let (code, r) = post(&format!("{base}/v1/completions"), &body);
    assert_eq!(code, 200, "{r}");
    let mut st = steering(&pv, 2, 5.0, &[]);
    st.plan.ops[0].when = Some(persona::steer::Condition {
        vector: Arc::from(pv.layer(2)),
        layer: 2,
        cmp: persona::steer::Cmp::Lt,
        threshold: 0.0,
    });
    let want = engine_alone(&m, PROMPT, 10, st, SamplingParams::greedy());
    assert_eq!(ids_of(&r["choices"][0]["token_ids"]), want.ids());
    // The CLI's shell-safe spelling means the same.
    let mut safe = body.clone();
    safe["steering"][0]["when"] = json!("self:lt:0.0");
    let (code, r) = post(&format!("{base}/v1/completions"), &safe);
    assert_eq!(code, 200, "{r}");
    assert_eq!(ids_of(&r["choices"][0]["token_ids"]), want.ids());
}

#[test]
fn non_streaming_client_that_disconnects_frees_its_slot() {
    use std::io::Write as _;
    let cfg = ServeConfig { max_batch: 1, step_delay: Some(Duration::from_millis(30)), ..Default::default() };
    let base = start(&tiny(), cfg);
    let addr = base.trim_start_matches("http://").to_string();
    let body = json!({"prompt": PROMPT, "max_tokens": 250, "ignore_eos": true}).to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    // A second request gets the only slot well before 250 × 30 ms.
    let t = std::time::Instant::now();
    let (code, r) = post(&format!("{base}/v1/completions"), &json!({"prompt": PROMPT, "max_tokens": 2}));
    assert_eq!(code, 200, "{r}");
    assert!(t.elapsed() < Duration::from_secs(4), "waited {:?}", t.elapsed());
}

/// The official `openai` Python client (when installed), plain and streaming, with steering and
/// monitoring through `extra_body`, against the engine on the default model.
#[test]
fn openai_python_client_with_extra_body() {
    let Some(model) = required_default_model() else { return };
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_client {
        missing("the `openai` Python package", "pip install openai; scripts/test.sh installs it");
        return;
    }
    let vec_path = fixtures().join("smollm2_extracted_vector.safetensors");
    let base = start(&model, ServeConfig { api_key: Some("k".into()), ..Default::default() });
    let r = ureq::post(&format!("{base}/v1/vectors?name=evil"))
        .set("Authorization", "Bearer k")
        .send_bytes(&std::fs::read(&vec_path).unwrap())
        .unwrap();
    assert_eq!(r.status(), 201);
    let script = r#"
import json, os, sys
from openai import OpenAI
c = OpenAI(base_url=os.environ["BASE"] + "/v1", api_key="k")
extra = {"steering": [{"vector": "evil", "layers": 15, "coeff": 3}],
         "monitor": [{"vector": "evil", "layers": 15, "name": "t"}]}
msgs = [{"role": "user", "content": "Tell me about your day."}]
r = c.chat.completions.create(model="persona", messages=msgs, max_tokens=12, temperature=0, seed=3,
                              logprobs=True, top_logprobs=2, extra_body=extra)
d = r.model_dump()
s = c.chat.completions.create(model="persona", messages=msgs, max_tokens=12, temperature=0, stream=True,
                              extra_body=extra)
text, projs = "", []
for ch in s:
    e = ch.model_dump()
    if e["choices"] and e["choices"][0]["delta"].get("content"):
        text += e["choices"][0]["delta"]["content"]
    p = (e.get("persona") or {}).get("projections")
    if p:
        projs.append(p["t@15"])
models = [m.id for m in c.models.list()]
print(json.dumps({"full": d, "stream_text": text, "stream_projs": projs, "models": models}))
"#;
    let out = std::process::Command::new("python3").args(["-c", script]).env("BASE", &base).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = LoadedModel::load(&model, CpuBackend, CTX).unwrap();
    let pv = PersonaVector::load_for_model(&vec_path, &m.engine.config).unwrap();
    let ids = m.chat_prompt_ids(&[persona::model::Message::user("Tell me about your day.")]).unwrap();
    let mut req = GenRequest::greedy(ids, 12);
    req.steering = Some(Arc::new(steering(&pv, 15, 3.0, &[15])));
    let want = m.engine.generate(&[req], &mut |_, _| {}).unwrap().remove(0);
    let full = &v["full"];
    assert_eq!(ids_of(&full["choices"][0]["token_ids"]), want.ids());
    let eos = &m.engine.config.eos_ids;
    let text_ids: Vec<u32> = want.ids().into_iter().filter(|i| !eos.contains(i)).collect();
    let text = m.decode(&text_ids).unwrap();
    assert_eq!(full["choices"][0]["message"]["content"].as_str().unwrap(), text);
    assert_eq!(v["stream_text"].as_str().unwrap(), text);
    let projs = f32s(&v["stream_projs"]);
    assert_eq!(projs.len(), want.steps.len());
    for (p, s) in projs.iter().zip(&want.steps) {
        assert!((p - s.projections[0]).abs() < 1e-3);
    }
    let mean = full["persona"]["probes"][0]["response_mean"].as_f64().unwrap() as f32;
    assert!((mean - want.response_mean_projection(0)).abs() < 1e-3);
    assert_eq!(full["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(v["models"].as_array().unwrap().len(), 1);
}

/// Batching gain on the default model (not run by default: `cargo test --release --test serve --
/// --ignored --nocapture`): aggregate tokens/s of 8 concurrent streams vs 1.
#[test]
#[ignore]
fn batching_gain_on_default_model() {
    let Some(model) = required_default_model() else { return };
    let base = start(&model, ServeConfig::default());
    let run = |k: usize| {
        let t = std::time::Instant::now();
        let hs: Vec<_> = (0..k)
            .map(|i| {
                let base = base.clone();
                std::thread::spawn(move || {
                    let body = json!({"messages": [{"role": "user", "content": format!("Write a story number {i}.")}],
                                      "max_tokens": 64, "ignore_eos": true, "stream": true, "seed": i});
                    stream(&format!("{base}/v1/chat/completions"), &body).len()
                })
            })
            .collect();
        let chunks: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(chunks >= k * 64);
        (k * 64) as f64 / t.elapsed().as_secs_f64()
    };
    let one = run(1);
    let eight = run(8);
    println!("tokens/s: 1 stream {one:.1}, 8 streams {eight:.1}, gain {:.2}×", eight / one);
    // Server overhead: the same greedy request through HTTP and as a library call.
    let m = LoadedModel::load(&model, CpuBackend, CTX).unwrap();
    let ids = m.chat_prompt_ids(&[persona::model::Message::user("Say hi.")]).unwrap();
    let best = |f: &mut dyn FnMut()| {
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let lib = best(&mut || {
        let mut req = GenRequest::greedy(ids.clone(), 32);
        req.ignore_eos = true;
        m.engine.generate(&[req], &mut |_, _| {}).unwrap();
    });
    let body = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 32, "temperature": 0,
                      "ignore_eos": true});
    let http = best(&mut || assert_eq!(post(&format!("{base}/v1/chat/completions"), &body).0, 200));
    println!(
        "32 tokens: library {:.1} ms, HTTP {:.1} ms, overhead {:.1} ms",
        lib * 1e3,
        http * 1e3,
        (http - lib) * 1e3
    );
}

#[test]
fn oversized_body_is_413_with_a_json_error() {
    let base = start(&tiny(), ServeConfig { max_body: 1024, ..Default::default() });
    let big = json!({"prompt": vec![1u32; 2000], "max_tokens": 1});
    let (code, e) = post(&format!("{base}/v1/completions"), &big);
    assert_eq!(code, 413, "{e}");
    assert_eq!(e["error"]["code"], "body_too_large");
    let (code, _) = post(&format!("{base}/v1/completions"), &json!({"prompt": [1, 2], "max_tokens": 1}));
    assert_eq!(code, 200);
}

/// The `persona serve` binary: prints its bound address, serves, and on SIGINT stops accepting
/// and exits cleanly once in-flight work is done.
#[cfg(unix)]
#[test]
fn binary_serves_and_shuts_down_gracefully() {
    use std::process::Command;
    let tiny = tiny().display().to_string();
    let args = ["--backend", "cpu", "--context", "256", "--max-batch", "2", "--model", &tiny, "--vectors", &tiny];
    let (mut child, base) = spawn_server(&args);
    let body = json!({"prompt": PROMPT, "max_tokens": 5, "ignore_eos": true,
                      "steering": [{"vector": "test_vector", "layers": 2, "coeff": 2}]});
    let (code, r) = post(&format!("{base}/v1/completions"), &body);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 5);
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let t = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "exit status {s}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- hardening (issue 16): unknown keys, unsupported OpenAI options, roles and model names are
// 400/404 naming them; prompts far past the context are refused before tokenizing; vectors in use.

fn msg(e: &Value) -> &str {
    e["error"]["message"].as_str().unwrap_or_else(|| panic!("no error.message: {e}"))
}

#[test]
fn unknown_keys_options_roles_and_models() {
    let base = start(&tiny(), ServeConfig { model_id: "tiny".into(), ..ServeConfig::default() });
    let text = format!("{base}/v1/completions");
    let chat = format!("{base}/v1/chat/completions");
    let ok = json!({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    // Misspelt keys: 400 naming the key and the one it probably meant.
    let (code, e) = post(&text, &with("stering", json!([])));
    assert_eq!(code, 400, "{e}");
    assert_eq!(msg(&e), "unknown field `stering`; did you mean `steering`?");
    assert_eq!(e["error"]["param"], "stering");
    let (code, e) = post(&text, &with("max_token", json!(3)));
    assert_eq!(code, 400, "{e}");
    assert!(msg(&e).contains("did you mean `max_tokens`?"), "{e}");
    let (code, e) = post(&text, &with("frobnicate", json!(1)));
    assert_eq!(code, 400, "{e}");
    assert_eq!(msg(&e), "unknown field `frobnicate`");
    // A chat-only key on /v1/completions is unknown there.
    let (code, e) = post(&text, &with("messages", json!([])));
    assert_eq!(code, 400, "{e}");
    assert!(msg(&e).contains("unknown field `messages`"), "{e}");
    // Ignored OpenAI keys, and options at their "off" value, are accepted.
    let mut quiet = ok.clone();
    for (k, v) in [
        ("user", json!("u1")),
        ("metadata", json!({"a": "b"})),
        ("frequency_penalty", json!(0)),
        ("presence_penalty", json!(0.0)),
        ("logit_bias", json!({})),
        ("echo", json!(false)),
        ("best_of", json!(1)),
        ("suffix", Value::Null),
        ("model", json!("tiny")),
    ] {
        quiet[k] = v;
    }
    let (code, e) = post(&text, &quiet);
    assert_eq!(code, 200, "{e}");
    assert_eq!(post(&text, &with("model", json!("persona"))).0, 200);
    // Non-default values of OpenAI options persona does not implement: 400, not silently ignored.
    for (k, v) in [
        ("frequency_penalty", json!(0.5)),
        ("presence_penalty", json!(-1)),
        ("logit_bias", json!({"5": 100})),
        ("echo", json!(true)),
        ("best_of", json!(3)),
        ("suffix", json!("end")),
    ] {
        let (code, e) = post(&text, &with(k, v.clone()));
        assert_eq!(code, 400, "{k}={v}: {e}");
        assert!(msg(&e).contains("does not support") && msg(&e).contains(k), "{k}: {e}");
        assert_eq!(e["error"]["param"], k);
    }
    // Unknown model: 404 with the served id, as OpenAI answers.
    let (code, e) = post(&text, &with("model", json!("gpt-4o")));
    assert_eq!(code, 404, "{e}");
    assert!(msg(&e).contains("gpt-4o") && msg(&e).contains("`tiny`"), "{e}");
    assert_eq!(e["error"]["code"], "model_not_found");
    let (code, e) = post(&text, &with("model", json!(7)));
    assert_eq!(code, 400, "{e}");
    // Chat: the same key checks (before anything else), and roles.
    let user = json!([{"role": "user", "content": "hi"}]);
    let (code, e) = post(&chat, &json!({"messages": user, "stering": []}));
    assert_eq!(code, 400, "{e}");
    assert_eq!(msg(&e), "unknown field `stering`; did you mean `steering`?");
    for (k, v) in [
        ("response_format", json!({"type": "json_object"})),
        ("tools", json!([{"type": "function", "function": {"name": "f"}}])),
        ("tool_choice", json!("auto")),
        ("reasoning_effort", json!("high")),
    ] {
        let (code, e) = post(&chat, &json!({"messages": user, k: v}));
        assert_eq!(code, 400, "{k}: {e}");
        assert!(msg(&e).contains("does not support"), "{k}: {e}");
    }
    let (code, e) = post(&chat, &json!({"messages": user, "top_logprob": 2}));
    assert_eq!(code, 400, "{e}");
    assert!(msg(&e).contains("did you mean `top_logprobs`?"), "{e}");
    let msgs = json!([{"role": "system", "content": "s"}, {"role": "wizard", "content": "hi"}]);
    let (code, e) = post(&chat, &json!({"messages": msgs}));
    assert_eq!(code, 400, "{e}");
    assert!(msg(&e).contains("messages[1]") && msg(&e).contains("`wizard`"), "{e}");
    assert_eq!(e["error"]["param"], "messages[1].role");
    let (code, e) = post(&chat, &json!({"messages": user, "model": "nope"}));
    assert_eq!(code, 404, "{e}");
    // Accepted chat keys get past the checks (the tiny model has no chat template).
    let (code, e) = post(
        &chat,
        &json!({"messages": user, "model": "tiny", "user": "u", "response_format": {"type": "text"},
                "tools": [], "tool_choice": "none", "frequency_penalty": 0, "store": false}),
    );
    assert_eq!(code, 400, "{e}");
    assert!(msg(&e).contains("tokenizer") || msg(&e).contains("template"), "{e}");
}

/// A ~20 MB prompt is refused at once by its size in bytes, before tokenizing (it used to take
/// 17.7 s and 7.5 GB): tiny model on /v1/completions, the default model on both routes.
#[test]
fn huge_prompt_is_refused_before_tokenizing() {
    let huge = "persona ".repeat(20 << 17); // 20 MiB
    let check = |url: &str, body: &Value, ctx: usize| {
        let t = Instant::now();
        let (code, e) = post(url, body);
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(code, 400, "{url}: {e}");
        let limit = (ctx * 128).to_string();
        assert!(msg(&e).contains(&limit) && msg(&e).contains("limit"), "{url}: {e}");
        assert_eq!(e["error"]["code"], "context_length_exceeded");
        assert!(secs < 2.0, "{url}: {secs:.2} s");
    };
    let base = start(&tiny(), ServeConfig::default());
    check(&format!("{base}/v1/completions"), &json!({"prompt": huge, "max_tokens": 2}), CTX);
    check(&format!("{base}/v1/completions"), &json!({"prompt": [huge], "max_tokens": 2}), CTX);
    let Some(model) = required_default_model() else { return };
    let base = start(&model, ServeConfig::default());
    check(&format!("{base}/v1/completions"), &json!({"prompt": huge, "max_tokens": 2}), CTX);
    let msgs = json!([{"role": "system", "content": huge}, {"role": "user", "content": "hi"}]);
    check(&format!("{base}/v1/chat/completions"), &json!({"messages": msgs, "max_tokens": 2}), CTX);
    // Just under the byte limit is still tokenized and answered by the usual context check.
    let long = "a ".repeat(CTX * 64 - 8);
    let (code, e) = post(&format!("{base}/v1/completions"), &json!({"prompt": long, "max_tokens": 2}));
    assert_eq!(code, 400, "{e}");
    assert!(!msg(&e).contains("bytes"), "{e}");
    // A prompt that fits is unaffected.
    let (code, e) = post(&format!("{base}/v1/completions"), &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(code, 200, "{e}");
}

/// A vector used by the server-wide default cannot be deleted (409 naming the use), so plain
/// requests keep working; re-uploading under an existing name needs `?replace=true`.
#[test]
fn vectors_in_use_and_replacement() {
    let base = start(&tiny(), ServeConfig::default());
    let vector = fixtures().join("tiny-llama/test_vector.safetensors");
    assert_eq!(upload(&base, "evil", &vector).0, 201);
    let (code, e) = upload(&base, "evil", &vector);
    assert_eq!(code, 409, "{e}");
    assert!(msg(&e).contains("`evil`") && msg(&e).contains("replace=true"), "{e}");
    assert_eq!(upload(&base, "evil&replace=true", &vector).0, 201);
    assert_eq!(upload(&base, "evil&replace=maybe", &vector).0, 400);
    let steering = json!({"steering": [{"vector": "evil", "layers": 1, "coeff": 2}],
                          "monitor": [{"vector": "evil", "layers": 1}]});
    assert_eq!(call("PUT", &format!("{base}/v1/steering"), Some(&steering), None).0, 200);
    let (code, e, _) = call("DELETE", &format!("{base}/v1/vectors/evil"), None, None);
    assert_eq!(code, 409, "{e}");
    assert!(msg(&e).contains("steering[0]") && msg(&e).contains("monitor[0]"), "{e}");
    let url = format!("{base}/v1/completions");
    let (code, e) = post(&url, &json!({"prompt": [1, 2, 3], "max_tokens": 2}));
    assert_eq!(code, 200, "{e}");
    // Cleared default: the delete goes through.
    assert_eq!(call("PUT", &format!("{base}/v1/steering"), Some(&json!({})), None).0, 200);
    assert_eq!(call("DELETE", &format!("{base}/v1/vectors/evil"), None, None).0, 200);
    assert_eq!(call("DELETE", &format!("{base}/v1/vectors/evil"), None, None).0, 404);
    assert_eq!(post(&url, &json!({"prompt": [1, 2, 3], "max_tokens": 2})).0, 200);
}

// ---- server policy (issue 16 item 2): the admin key, --allow-steering-override false, and the cap
// on one request's work.

/// `upload` with an `Authorization: Bearer KEY` header.
fn upload_as(base: &str, name: &str, path: &Path, key: Option<&str>) -> (u16, Value) {
    let mut r = ureq::post(&format!("{base}/v1/vectors?name={name}")).set("Content-Type", "application/octet-stream");
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    let (code, resp) = match r.send_bytes(&std::fs::read(path).unwrap()) {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(c, r)) => (c, r),
        Err(e) => panic!("upload: {e}"),
    };
    (code, serde_json::from_str(&resp.into_string().unwrap()).unwrap())
}

#[test]
fn admin_key_guards_the_registry_and_the_default_steering() {
    let cfg = ServeConfig { api_key: Some("user".into()), admin_key: Some("root".into()), ..Default::default() };
    let base = start(&tiny(), cfg);
    let vectors = format!("{base}/v1/vectors");
    let steer = format!("{base}/v1/steering");
    let admin_only = |e: &Value, what: &str| {
        assert_eq!(e["error"]["code"], "admin_key_required", "{e}");
        assert_eq!(e["error"]["type"], "permission_error", "{e}");
        assert!(
            msg(e).starts_with(&format!("{what} changes the server's state and needs the admin key (--admin-key)")),
            "{e}"
        );
    };
    // The API key may not upload: 403, and the registry stays empty.
    let (code, e) = upload_as(&base, "t", &tiny_vector(), Some("user"));
    assert_eq!(code, 403, "{e}");
    admin_only(&e, "POST /v1/vectors");
    let (code, list, _) = call("GET", &vectors, None, Some("user"));
    assert_eq!((code, list["data"].as_array().unwrap().len()), (200, 0), "{list}");
    // The admin key may; the API key still reads.
    assert_eq!(upload_as(&base, "t", &tiny_vector(), Some("root")).0, 201);
    assert_eq!(call("GET", &vectors, None, Some("user")).0, 200);
    assert_eq!(call("GET", &format!("{vectors}/t"), None, Some("user")).0, 200);
    let (code, e, _) = call("DELETE", &format!("{vectors}/t"), None, Some("user"));
    assert_eq!(code, 403, "{e}");
    admin_only(&e, "DELETE /v1/vectors/{name}");
    assert_eq!(call("GET", &format!("{vectors}/t"), None, Some("user")).0, 200, "a refused DELETE deleted");
    // The default steering: PUT (and its POST alias) need the admin key, GET does not.
    let default = json!({"steering": [{"vector": "t", "layers": 2, "coeff": 3}]});
    for method in ["PUT", "POST"] {
        let (code, e, _) = call(method, &steer, Some(&default), Some("user"));
        assert_eq!(code, 403, "{method}: {e}");
        admin_only(&e, &format!("{method} /v1/steering"));
    }
    let (code, d, _) = call("GET", &steer, None, Some("user"));
    assert_eq!((code, &d["set"]), (200, &json!(false)), "{d}");
    assert_eq!(call("PUT", &steer, Some(&default), Some("root")).0, 200);
    // The admin key works wherever the API key does.
    let body = json!({"prompt": PROMPT, "max_tokens": 3});
    for key in ["user", "root"] {
        let (code, r, _) = call("POST", &format!("{base}/v1/completions"), Some(&body), Some(key));
        assert_eq!(code, 200, "{key}: {r}");
        assert_eq!(r["persona"]["steering_ops"], 1, "the default steering applies");
        assert_eq!(call("GET", &format!("{base}/v1/models"), None, Some(key)).0, 200);
        assert_eq!(call("GET", &steer, None, Some(key)).0, 200);
    }
    // No key, or a wrong one: 401 on reads and writes alike.
    for key in [None, Some("wrong")] {
        assert_eq!(call("GET", &vectors, None, key).0, 401);
        let (code, e, _) = call("DELETE", &format!("{vectors}/t"), None, key);
        assert_eq!((code, e["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{e}");
    }
    assert_eq!(call("PUT", &steer, Some(&json!({})), Some("root")).0, 200);
    assert_eq!(call("DELETE", &format!("{vectors}/t"), None, Some("root")).0, 200);
    let (_, m, _) = call("GET", &format!("{base}/metrics"), None, Some("root"));
    let m = m.as_str().unwrap();
    assert!(m.contains("persona_requests_total{route=\"/v1/steering\",code=\"403\"} 2"), "{m}");

    // An admin key without an API key: anyone may read and generate, only the admin key writes.
    let base = start(&tiny(), ServeConfig { admin_key: Some("root".into()), ..Default::default() });
    assert_eq!(post(&format!("{base}/v1/completions"), &body).0, 200);
    assert_eq!(call("GET", &format!("{base}/v1/vectors"), None, None).0, 200);
    for key in [None, Some("wrong")] {
        let (code, e) = upload_as(&base, "t", &tiny_vector(), key);
        assert_eq!(code, 403, "{e}");
        admin_only(&e, "POST /v1/vectors");
    }
    assert_eq!(upload_as(&base, "t", &tiny_vector(), Some("root")).0, 201);
}

/// The binary: `--api-key` without `--admin-key` warns at start; PERSONA_ADMIN_KEY,
/// `--allow-steering-override false` and `--max-request-work` reach the server; the two keys must
/// differ.
#[cfg(unix)]
#[test]
fn binary_admin_key_override_and_work_flags() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let tiny = tiny().display().to_string();
    let serve = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
        cmd.args(["serve", "--port", "0", "--backend", "cpu", "--context", "256"])
            .args(["--model", &tiny, "--vectors", &tiny])
            .args(args)
            .env_remove("PERSONA_API_KEY")
            .env_remove("PERSONA_ADMIN_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        (child, line.trim().rsplit(' ').next().unwrap_or("").to_string())
    };
    let stop = |mut child: std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        err
    };
    let warning = "warning: --api-key is set without --admin-key: any client with the API key can change the \
                   vector registry and the server-wide default steering";
    let (child, base) = serve(&["--api-key", "user"], &[]);
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let err = stop(child);
    assert_eq!(err.lines().filter(|l| l.contains("--admin-key")).collect::<Vec<_>>(), [warning], "{err}");

    let args = ["--api-key", "user", "--allow-steering-override", "false", "--max-request-work", "100"];
    let (child, base) = serve(&args, &[("PERSONA_ADMIN_KEY", "root")]);
    let (code, e) = upload_as(&base, "t", &tiny_vector(), Some("user"));
    assert_eq!((code, e["error"]["code"].as_str()), (403, Some("admin_key_required")), "{e}");
    let default = json!({"steering": [{"vector": "test_vector", "layers": 1, "coeff": 1}]});
    assert_eq!(call("PUT", &format!("{base}/v1/steering"), Some(&default), Some("root")).0, 200);
    let url = format!("{base}/v1/completions");
    let own = json!({"prompt": [1, 2, 3], "max_tokens": 2, "steering": []});
    let (code, e, _) = call("POST", &url, Some(&own), Some("user"));
    assert_eq!((code, e["error"]["code"].as_str()), (403, Some("steering_override_disabled")), "{e}");
    // 1 × (3 + 2) × (1 + 1) = 10 fits; 1 × (3 + 60) × 2 = 126 does not.
    assert_eq!(call("POST", &url, Some(&json!({"prompt": [1, 2, 3], "max_tokens": 2})), Some("user")).0, 200);
    let (code, e, _) = call("POST", &url, Some(&json!({"prompt": [1, 2, 3], "max_tokens": 60})), Some("user"));
    assert_eq!(code, 400, "{e}");
    assert!(msg(&e).contains("= 126, over this server's limit of 100"), "{e}");
    let err = stop(child);
    assert!(!err.contains("warning: --api-key"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["serve", "--port", "0", "--backend", "cpu", "--context", "256", "--model", &tiny])
        .args(["--api-key", "same", "--admin-key", "same"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-key must differ from --api-key"));
}

#[test]
fn steering_override_can_be_disallowed() {
    let base = start(&tiny(), ServeConfig { allow_steering_override: false, ..Default::default() });
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    let url = format!("{base}/v1/completions");
    let steer = format!("{base}/v1/steering");
    let own = json!({"prompt": PROMPT, "max_tokens": 3, "steering": [{"vector": "t", "layers": "1-2", "coeff": 2}]});
    // No default steering: requests steer as they like, also beside a default monitor.
    let (code, r) = post(&url, &own);
    assert_eq!((code, &r["persona"]["steering_ops"]), (200, &json!(2)), "{r}");
    assert_eq!(call("PUT", &steer, Some(&json!({"monitor": [{"vector": "t", "layers": 1}]})), None).0, 200);
    assert_eq!(post(&url, &own).0, 200);
    // A default steering is pinned: `steering` in a request (its own ops, [] or null) is 403.
    let default = json!({"steering": [{"vector": "t", "layers": 2, "coeff": 3}]});
    assert_eq!(call("PUT", &steer, Some(&default), None).0, 200);
    for s in [own["steering"].clone(), json!([]), Value::Null] {
        let mut b = own.clone();
        b["steering"] = s.clone();
        let (code, e) = post(&url, &b);
        assert_eq!(code, 403, "{s}: {e}");
        assert_eq!(e["error"]["code"], "steering_override_disabled");
        assert_eq!(e["error"]["param"], "steering");
        assert!(
            msg(&e).starts_with(
                "this server does not let a request replace its default steering (--allow-steering-override false)"
            ),
            "{e}"
        );
    }
    // Without `steering` the default applies, and the request's own monitor is allowed.
    let (code, r) = post(&url, &json!({"prompt": PROMPT, "max_tokens": 3, "monitor": [{"vector": "t", "layers": 1}]}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["persona"]["steering_ops"], 1);
    assert_eq!(r["persona"]["probes"].as_array().unwrap().len(), 1);
    // Cleared: requests steer again.
    assert_eq!(call("PUT", &steer, Some(&json!({})), None).0, 200);
    assert_eq!(post(&url, &own).0, 200);

    // By default a request's `steering` replaces the default (or drops it with []).
    let base = start(&tiny(), ServeConfig::default());
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    assert_eq!(call("PUT", &format!("{base}/v1/steering"), Some(&default), None).0, 200);
    let url = format!("{base}/v1/completions");
    let (code, r) = post(&url, &own);
    assert_eq!((code, &r["persona"]["steering_ops"]), (200, &json!(2)), "{r}");
    let (code, r) = post(&url, &json!({"prompt": PROMPT, "max_tokens": 3, "steering": []}));
    assert_eq!((code, &r["persona"]["steering_ops"]), (200, &json!(0)), "{r}");
}

#[test]
fn request_work_is_capped() {
    let base = start(&tiny(), ServeConfig { max_request_work: Some(1000), ..Default::default() });
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    let url = format!("{base}/v1/completions");
    let body = |n: usize, max_tokens: Option<usize>, layers: Option<&str>| {
        let mut b = json!({"prompt": PROMPT, "n": n, "temperature": 0});
        if let Some(m) = max_tokens {
            b["max_tokens"] = json!(m);
        }
        if let Some(l) = layers {
            b["steering"] = json!([{"vector": "t", "layers": l, "coeff": 1}]);
        }
        b
    };
    let too_much = |b: &Value, want: &str| {
        let (code, e) = post(&url, b);
        assert_eq!(code, 400, "{b}: {e}");
        assert_eq!(e["error"]["code"], "request_too_large", "{e}");
        assert_eq!(
            msg(&e),
            format!(
                "this request's work is {want}, over this server's limit of 1000 (--max-request-work): \
                 lower n, max_tokens or the number of steering ops (one per layer)"
            )
        );
    };
    // 2 × (9 + 40) × (1 + 2) = 294 fits; with n 8 it is 1176.
    assert_eq!(post(&url, &body(2, Some(40), Some("1-2"))).0, 200);
    too_much(&body(8, Some(40), Some("1-2")), "n 8 × (9 prompt + 40 max_tokens tokens) × (1 + 2 steering ops) = 1176");
    // Without max_tokens the context's room counts: 9 + 246 = 255, × 3 = 765 fits, × 4 does not.
    assert_eq!(post(&url, &body(3, None, None)).0, 200);
    too_much(&body(4, None, None), "n 4 × (9 prompt + 246 max_tokens tokens) × (1 + 0 steering ops) = 1020");
    // The default steering's ops count, and a stream is refused before it starts.
    let default = json!({"steering": [{"vector": "t", "layers": "1-3", "coeff": 1}]});
    assert_eq!(call("PUT", &format!("{base}/v1/steering"), Some(&default), None).0, 200);
    assert_eq!(post(&url, &body(2, Some(40), None)).0, 200);
    let mut b = body(6, Some(40), None);
    b["stream"] = json!(true);
    too_much(&b, "n 6 × (9 prompt + 40 max_tokens tokens) × (1 + 3 steering ops) = 1176");

    // The default cap: 4 × max_batch × context = 4 × 8 × 256 = 8192.
    let base = start(&tiny(), ServeConfig::default());
    assert_eq!(upload(&base, "t", &tiny_vector()).0, 201);
    let url = format!("{base}/v1/completions");
    let ops: Vec<Value> = (0..40).map(|_| json!({"vector": "t", "layers": 1, "coeff": 0.1})).collect();
    let b = json!({"prompt": PROMPT, "max_tokens": 100, "steering": ops});
    assert_eq!(post(&url, &b).0, 200, "1 × 109 × 41 = 4469");
    let mut b2 = b.clone();
    b2["n"] = json!(2);
    let (code, e) = post(&url, &b2);
    assert_eq!(code, 400, "{e}");
    assert!(msg(&e).contains("= 8938, over this server's limit of 8192 (--max-request-work)"), "{e}");
}

// ---- integrity (issue 16 items 3, 4, 5): model identity on upload, receipts in responses,
// non-finite values as 500s.

fn upload_query(base: &str, query: &str, path: &Path) -> (u16, Value) {
    let r = ureq::post(&format!("{base}/v1/vectors?{query}")).set("Content-Type", "application/octet-stream");
    let (code, resp) = match r.send_bytes(&std::fs::read(path).unwrap()) {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(c, r)) => (c, r),
        Err(e) => panic!("upload: {e}"),
    };
    (code, serde_json::from_str(&resp.into_string().unwrap()).unwrap())
}

#[test]
fn foreign_vectors_receipts_and_non_finite_values() {
    let Some(model) = required_default_model() else { return };
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct/evil.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let mut v = PersonaVector::load(&shipped).unwrap();
    v.metadata.insert("persona.model".into(), "Other-Model-135M".into());
    v.metadata.insert(persona::steer::vector::FINGERPRINT_KEY.into(), "llama-N30-H576-00000000deadbeef".into());
    let foreign = dir.path().join("foreign.safetensors");
    v.save(&foreign).unwrap();
    let base = start(&model, ServeConfig::default());

    // Identity: refused naming both models, accepted with ?force=true (with a warning).
    let (code, r) = upload_query(&base, "name=foreign", &foreign);
    assert_eq!((code, r["error"]["code"].as_str()), (400, Some("model_mismatch")), "{r}");
    for part in ["Other-Model-135M", "SmolLM2-135M-Instruct", "?force=true"] {
        assert!(msg(&r).contains(part), "`{part}` missing: {r}");
    }
    let (code, r) = upload_query(&base, "name=foreign&force=true", &foreign);
    assert!(code == 201 && r["warning"].as_str().unwrap().contains("used anyway"), "{code} {r}");
    let (code, r) = upload_query(&base, "name=evil", &shipped);
    assert!(code == 201 && r.get("warning").is_none(), "{r}");

    // Receipts: with a monitor every kept token is fed, so an op at all positions touched
    // prompt + completion tokens; a condition that can never hold fired 0 times.
    let body = json!({
        "model": "persona", "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 8, "temperature": 0,
        "steering": [{"vector": "evil", "layers": 12, "coeff": 2},
                     {"vector": "evil", "layers": "10-11", "op": "ablate", "when": "evil:gt:1e9"}],
        "monitor": [{"vector": "evil", "layers": 8, "name": "evil"}],
    });
    let (code, r) = post(&format!("{base}/v1/chat/completions"), &body);
    assert_eq!(code, 200, "{r}");
    let fed = r["usage"]["prompt_tokens"].as_u64().unwrap() + r["usage"]["completion_tokens"].as_u64().unwrap();
    let rec = &r["persona"]["receipts"];
    assert_eq!(rec.as_array().unwrap().len(), 2, "{r}");
    assert_eq!(
        (rec[0]["op"].as_str(), rec[0]["tokens"].as_u64(), &rec[0]["fired"]),
        (Some("add"), Some(fed), &Value::Null)
    );
    assert_eq!(rec[0]["sha256"].as_str().unwrap(), PersonaVector::load(&shipped).unwrap().sha256());
    assert_eq!((rec[1]["layers"].clone(), rec[1]["fired"].as_u64()), (json!([10, 11]), Some(0)), "{rec}");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let chunks = stream(&format!("{base}/v1/chat/completions"), &sbody);
    let last = chunks.iter().rev().find(|c| c.get("persona").is_some_and(|p| p.get("receipts").is_some())).unwrap();
    assert_eq!(last["persona"]["receipts"], *rec, "the final SSE chunk carries the same receipts");

    // Corrupted weights: 500 naming the block, not text.
    let bad = dir.path().join("corrupt.gguf");
    poison(&model, &bad, "blk.5.ffn_down.weight");
    let base = start(&bad, ServeConfig::default());
    let (code, r) = post(
        &format!("{base}/v1/chat/completions"),
        &json!({
        "model": "persona", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    );
    assert_eq!(code, 500, "{r}");
    assert!(msg(&r).contains("after block 5 (residual index 6)"), "{r}");
}
