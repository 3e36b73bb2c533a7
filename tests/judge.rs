//! Judges: the paper's 0–100 aggregation on hand-computed cases; the OpenAI-compatible client
//! against a local canned HTTP server (request body, retries, Retry-After, timeouts, malformed
//! replies, concurrency with results in order); the local judge on the default model when cached.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use persona::backend::cpu::CpuBackend;
use persona::engine::SeqInput;
use persona::model::{ChatTemplate, Message};
use persona::persona::judge::{
    aggregate_0_100, aggregate_values, Judge, JudgeScore, LocalJudge, NumberReading, OpenAiJudge, OpenAiOptions,
};
use persona::LoadedModel;
use serde_json::{json, Value};

fn lp(p: f64) -> f64 {
    p.ln()
}

fn top(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|&(t, p)| (t.to_string(), lp(p))).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + b.abs())
}

#[test]
fn aggregation_matches_hand_computed_scores() {
    // 0.5·50 + 0.25·100 over mass 0.75; "Hello" ignored.
    let s = aggregate_0_100(&top(&[("50", 0.5), ("100", 0.25), ("Hello", 0.25)]));
    assert!(close(s.mass, 0.75), "{s:?}");
    assert!(close(s.score.unwrap(), (25.0 + 25.0) / 0.75), "{s:?}");

    // Only " 50" and "100" are integers 0..=100; "101", "-1", "5.5", "1e1", "fifty" are not.
    let s = aggregate_0_100(&top(&[
        (" 50", 0.3),
        ("100", 0.1),
        ("101", 0.2),
        ("-1", 0.1),
        ("5.5", 0.1),
        ("1e1", 0.1),
        ("fifty", 0.1),
    ]));
    assert!(close(s.mass, 0.4), "{s:?}");
    assert!(close(s.score.unwrap(), (0.3 * 50.0 + 0.1 * 100.0) / 0.4), "{s:?}");

    // Python int() reads "07", "+5", "-0", "1_0" and "\n 3 " (as the paper's code does).
    let s = aggregate_0_100(&top(&[("07", 0.2), ("+5", 0.2), ("-0", 0.2), ("1_0", 0.2), ("\n 3 ", 0.2)]));
    assert!(close(s.mass, 1.0), "{s:?}");
    assert!(close(s.score.unwrap(), (7.0 + 5.0 + 0.0 + 10.0 + 3.0) * 0.2), "{s:?}");

    // A repeated token keeps its last probability (the paper builds a dict).
    let s = aggregate_0_100(&top(&[("40", 0.5), ("40", 0.3), ("60", 0.2)]));
    assert!(close(s.mass, 0.5), "{s:?}");
    assert!(close(s.score.unwrap(), (40.0 * 0.3 + 60.0 * 0.2) / 0.5), "{s:?}");

    // A single integer token scores itself, whatever its mass above 0.25.
    assert!(close(aggregate_0_100(&top(&[("0", 0.3)])).score.unwrap(), 0.0));
    assert!(close(aggregate_0_100(&top(&[("100", 0.9)])).score.unwrap(), 100.0));
}

#[test]
fn no_score_below_a_quarter_of_the_mass() {
    let s = aggregate_0_100(&top(&[("90", 0.2), ("I", 0.7), ("REFUSAL", 0.1)]));
    assert_eq!(s.score, None);
    assert!(close(s.mass, 0.2));
    let s = aggregate_0_100(&[]);
    assert_eq!((s.score, s.mass), (None, 0.0));
    // The boundary: exactly 0.25 scores (the paper returns None only when total < 0.25).
    assert_eq!(aggregate_values([(80, 0.125), (40, 0.125)]).score, Some(60.0));
    assert_eq!(aggregate_values([(80, 0.125), (40, 0.124999)]).score, None);
}

// ---------------------------------------------------------------------------------------------
// A canned OpenAI-format server

#[derive(Debug, Clone)]
struct Req {
    line: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn prompt(&self) -> &str {
        self.body["messages"][0]["content"].as_str().unwrap_or("")
    }
}

enum Reply {
    /// Status, extra headers, body.
    Send(u16, Vec<(&'static str, String)>, String),
    /// Read the request, then never answer.
    Hang,
}

struct Server {
    base: String,
    reqs: Arc<Mutex<Vec<Req>>>,
    in_flight_max: Arc<AtomicUsize>,
}

impl Server {
    fn count(&self) -> usize {
        self.reqs.lock().unwrap().len()
    }
}

/// `handler(request number from 0, request)`; each connection is served on its own thread.
fn serve(handler: impl Fn(usize, &Req) -> Reply + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let reqs = Arc::new(Mutex::new(Vec::new()));
    let in_flight_max = Arc::new(AtomicUsize::new(0));
    let (r, m) = (reqs.clone(), in_flight_max.clone());
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        let in_flight = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (r, m, h, f) = (r.clone(), m.clone(), handler.clone(), in_flight.clone());
            std::thread::spawn(move || {
                // In flight: from the request read to just before its reply is written.
                let counted = |n: usize, q: &Req| {
                    m.fetch_max(f.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    let reply = h(n, q);
                    f.fetch_sub(1, Ordering::SeqCst);
                    reply
                };
                let _ = handle(stream, &r, &counted);
            });
        }
    });
    Server { base, reqs, in_flight_max }
}

fn handle(mut stream: TcpStream, reqs: &Mutex<Vec<Req>>, h: &dyn Fn(usize, &Req) -> Reply) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut rd = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    rd.read_line(&mut line)?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        rd.read_line(&mut l)?;
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).unwrap().1.parse().unwrap();
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body)?;
    let req = Req { line: line.trim_end().to_string(), headers, body: serde_json::from_slice(&body).unwrap() };
    let n = {
        let mut v = reqs.lock().unwrap();
        v.push(req.clone());
        v.len() - 1
    };
    match h(n, &req) {
        Reply::Send(status, extra, body) => {
            let mut head = format!("HTTP/1.1 {status} Canned\r\nContent-Type: application/json\r\n");
            for (k, v) in extra {
                head += &format!("{k}: {v}\r\n");
            }
            head += &format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            stream.write_all(head.as_bytes())?;
            stream.write_all(body.as_bytes())?;
            stream.flush()
        }
        Reply::Hang => {
            // Until the client gives up and closes the connection.
            let mut buf = [0u8; 64];
            while rd.read(&mut buf)? > 0 {}
            Ok(())
        }
    }
}

fn reply(tokens: &[(&str, f64)]) -> String {
    let top: Vec<Value> = tokens.iter().map(|&(t, p)| json!({"token": t, "logprob": p.ln(), "bytes": []})).collect();
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "judge-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": tokens[0].0},
                     "logprobs": {"content": [{"token": tokens[0].0, "logprob": tokens[0].1.ln(), "top_logprobs": top}]},
                     "finish_reason": "length"}]
    })
    .to_string()
}

fn ok(tokens: &[(&str, f64)]) -> Reply {
    Reply::Send(200, vec![], reply(tokens))
}

/// Fast retries for tests.
fn opts() -> OpenAiOptions {
    OpenAiOptions {
        concurrency: 4,
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_secs(3),
        top_logprobs: 20,
    }
}

fn judge(s: &Server, key: Option<&str>) -> OpenAiJudge {
    OpenAiJudge::new(&s.base, "judge-model", key.map(str::to_string)).unwrap().with_options(opts())
}

fn one(j: &OpenAiJudge, prompt: &str) -> persona::Result<persona::persona::judge::JudgeScore> {
    j.score(&[prompt.to_string()]).pop().unwrap()
}

#[test]
fn sends_the_papers_request_and_scores_the_reply() {
    let s = serve(|_, _| ok(&[("75", 0.6), ("80", 0.2), ("I", 0.2)]));
    let j = judge(&s, Some("sk-test"));
    assert_eq!(j.endpoint(), format!("{}/v1/chat/completions", s.base));
    let r = one(&j, "Rate this: {\"a\": 1}\nAnswer: yes").unwrap();
    assert!(close(r.mass, 0.8), "{r:?}");
    assert!(close(r.score.unwrap(), (75.0 * 0.6 + 80.0 * 0.2) / 0.8), "{r:?}");

    let reqs = s.reqs.lock().unwrap();
    assert_eq!(reqs.len(), 1);
    let q = &reqs[0];
    assert_eq!(q.line, "POST /v1/chat/completions HTTP/1.1");
    assert_eq!(q.header("authorization"), Some("Bearer sk-test"));
    assert!(q.header("content-type").unwrap().starts_with("application/json"));
    assert_eq!(
        q.body,
        json!({
            "model": "judge-model",
            "messages": [{"role": "user", "content": "Rate this: {\"a\": 1}\nAnswer: yes"}],
            "max_tokens": 1, "temperature": 0, "logprobs": true, "top_logprobs": 20, "seed": 0
        })
    );
}

#[test]
fn no_key_no_authorization_header_and_base_with_v1() {
    let s = serve(|_, _| ok(&[("10", 1.0)]));
    let j = OpenAiJudge::new(&format!("{}/v1/", s.base), "m", None).unwrap().with_options(opts());
    assert_eq!(one(&j, "p").unwrap().score, Some(10.0));
    let q = &s.reqs.lock().unwrap()[0];
    assert_eq!(q.line, "POST /v1/chat/completions HTTP/1.1");
    assert_eq!(q.header("authorization"), None);
}

#[test]
fn low_mass_reply_is_no_score_not_an_error() {
    let s = serve(|_, _| ok(&[("I", 0.7), ("Sorry", 0.1), ("50", 0.1)]));
    let r = one(&judge(&s, None), "p").unwrap();
    assert_eq!(r.score, None);
    assert!(close(r.mass, 0.1));
}

#[test]
fn retries_after_a_server_error() {
    let s =
        serve(|n, _| if n == 0 { Reply::Send(500, vec![], "{\"error\":\"busy\"}".into()) } else { ok(&[("30", 1.0)]) });
    let r = one(&judge(&s, None), "p").unwrap();
    assert_eq!(r.score, Some(30.0));
    assert_eq!(s.count(), 2);
}

#[test]
fn gives_up_after_the_retries_and_says_why() {
    let s = serve(|_, _| Reply::Send(503, vec![], "upstream overloaded, try later".into()));
    let j = judge(&s, None);
    let e = one(&j, "p").unwrap_err().to_string();
    assert_eq!(s.count(), 3, "1 attempt + 2 retries");
    for want in [j.endpoint(), "503", "upstream overloaded", "3 attempts"] {
        assert!(e.contains(want), "`{want}` not in: {e}");
    }
}

#[test]
fn no_retry_on_a_client_error() {
    let s = serve(|_, _| Reply::Send(401, vec![], r#"{"error":{"message":"Incorrect API key provided"}}"#.into()));
    let e = one(&judge(&s, Some("bad")), "p").unwrap_err().to_string();
    assert_eq!(s.count(), 1);
    assert!(e.contains("401") && e.contains("Incorrect API key") && e.contains(&s.base), "{e}");
}

#[test]
fn honours_retry_after_on_429() {
    let s = serve(|n, _| {
        if n == 0 {
            Reply::Send(429, vec![("Retry-After", "1".into())], r#"{"error":{"message":"rate limited"}}"#.into())
        } else {
            ok(&[("64", 1.0)])
        }
    });
    let t = Instant::now();
    let r = one(&judge(&s, None), "p").unwrap();
    let waited = t.elapsed();
    assert_eq!(r.score, Some(64.0));
    assert_eq!(s.count(), 2);
    // The backoff alone is 5 ms: the second attempt waited for Retry-After.
    assert!(waited >= Duration::from_millis(950), "waited only {waited:?}");
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");
}

#[test]
fn a_server_that_never_answers_times_out_with_an_error() {
    let s = serve(|_, _| Reply::Hang);
    let j = OpenAiJudge::new(&s.base, "m", None).unwrap().with_options(OpenAiOptions {
        timeout: Duration::from_millis(300),
        retries: 1,
        ..opts()
    });
    let t = Instant::now();
    let e = one(&j, "p").unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert_eq!(s.count(), 2, "a timeout is retried");
    assert!(e.contains(j.endpoint()) && e.contains("2 attempts"), "{e}");
    eprintln!("timeout error: {e}");
}

#[test]
fn connection_refused_is_an_error() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let j = OpenAiJudge::new(&format!("http://127.0.0.1:{port}"), "m", None).unwrap().with_options(opts());
    let e = one(&j, "p").unwrap_err().to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("3 attempts"), "{e}");
    eprintln!("connection error: {e}");
}

#[test]
fn malformed_replies_are_errors_that_say_what_is_wrong() {
    let cases: Vec<(String, &str)> = vec![
        ("<html>Bad gateway</html>".into(), "not JSON"),
        (json!({"choices": []}).to_string(), "no `choices.0`"),
        (json!({"choices": [{"message": {"content": "50"}}]}).to_string(), "no `choices.0.logprobs`"),
        (json!({"choices": [{"logprobs": null}]}).to_string(), "logprobs"),
        (
            json!({"choices": [{"logprobs": {"content": [{"token": "5", "logprob": -0.1}]}}]}).to_string(),
            "top_logprobs",
        ),
        (
            json!({"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "5", "logprob": "x"}]}]}}]})
                .to_string(),
            "top_logprobs[0].logprob",
        ),
    ];
    for (body, want) in cases {
        let b = body.clone();
        let s = serve(move |_, _| Reply::Send(200, vec![], b.clone()));
        let e = one(&judge(&s, None), "p").unwrap_err().to_string();
        assert!(e.contains(want), "`{want}` not in: {e}");
        assert!(e.contains(&s.base), "{e}");
        assert_eq!(s.count(), 1, "a malformed reply is not retried: {body}");
    }
}

#[test]
fn concurrent_requests_keep_the_order_of_prompts() {
    let s = serve(|_, q| {
        std::thread::sleep(Duration::from_millis(100));
        let k: u32 = q.prompt().trim_start_matches("value ").parse().unwrap();
        if k == 13 {
            return Reply::Send(400, vec![], "unlucky".into());
        }
        let t = k.to_string();
        Reply::Send(200, vec![], reply(&[(t.as_str(), 0.9), ("x", 0.1)]))
    });
    let j = OpenAiJudge::new(&s.base, "m", None).unwrap().with_options(OpenAiOptions { concurrency: 8, ..opts() });
    let prompts: Vec<String> = (0..24).map(|k| format!("value {k}")).collect();
    let t = Instant::now();
    let out = j.score(&prompts);
    let took = t.elapsed();
    assert_eq!(out.len(), 24);
    for (k, r) in out.iter().enumerate() {
        if k == 13 {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("400") && e.contains("unlucky"), "{e}");
        } else {
            let r = r.as_ref().unwrap();
            assert!(close(r.score.unwrap(), k as f64) && close(r.mass, 0.9), "prompt {k}: {r:?}");
        }
    }
    assert_eq!(s.count(), 24);
    let peak = s.in_flight_max.load(Ordering::SeqCst);
    assert!(peak > 1 && peak <= 8, "peak concurrency {peak}");
    // 24 × 100 ms one at a time would take 2.4 s.
    assert!(took < Duration::from_millis(1500), "took {took:?} at peak concurrency {peak}");
    assert!(j.score(&[]).is_empty());
}

#[test]
fn bad_judge_urls_are_refused() {
    for bad in ["localhost:8000", "ftp://host/v1", "http://", ""] {
        assert!(OpenAiJudge::new(bad, "m", None).is_err(), "{bad}");
    }
    assert!(OpenAiJudge::new("http://localhost:1", " ", None).is_err());
}

// ---------------------------------------------------------------------------------------------
// The local judge

#[test]
fn local_judge_needs_a_tokenizer() {
    let m = LoadedModel::load(&common::fixtures().join("tiny-llama"), CpuBackend, 64).unwrap();
    let e = LocalJudge::new(&m).err().expect("no tokenizer, no judge").to_string();
    assert!(e.contains("tokenizer"), "{e}");
}

/// tiny-llama (random weights, vocab 256) with a word-level tokenizer: ids 0..=9 are "0".."9",
/// 10..=19 are " 0".." 9", 20 is "7x", 21 is "42", 22 is "<unk>", the rest words "w23".."w255".
fn tiny_with_tokenizer() -> LoadedModel<CpuBackend> {
    let mut m = LoadedModel::load(&common::fixtures().join("tiny-llama"), CpuBackend, 64).unwrap();
    let mut vocab = serde_json::Map::new();
    for id in 0..256u32 {
        let t = match id {
            0..=9 => id.to_string(),
            10..=19 => format!(" {}", id - 10),
            20 => "7x".into(),
            21 => "42".into(),
            22 => "<unk>".into(),
            _ => format!("w{id}"),
        };
        vocab.insert(t, json!(id));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    m.tokenizer = Some(tok.to_string().parse().unwrap());
    m.chat_template = Some(ChatTemplate::new("{% for m in messages %}{{ m.content }} {% endfor %}", "", "").unwrap());
    m
}

fn softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = l.iter().map(|&x| (x as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// Next-token probabilities after `ids`, from a fresh cache (no reuse of the judge's KV cache).
fn next_probs(m: &LoadedModel<CpuBackend>, ids: &[u32]) -> Vec<f64> {
    let mut cache = m.engine.new_cache(1, ids.len()).unwrap();
    let out = m.engine.forward(&mut cache, &[SeqInput::new(0, ids)], false).unwrap();
    softmax(out.last(0))
}

#[test]
fn local_judge_readings_match_brute_force_on_a_tiny_model() {
    let m = tiny_with_tokenizer();
    let judge = LocalJudge::new(&m).unwrap();
    assert_eq!(judge.covered_values(), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 42]);
    assert_eq!(judge.reading(), NumberReading::Digits, "no token for most of 10..=100");
    let prompts: Vec<String> =
        ["w30 w31 w40 w50", "w100 w101 w102 w200 w201 w202 w203", "w77"].map(String::from).into();
    let extend = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21]; // texts that start with a digit

    let first = LocalJudge::new(&m).unwrap().with_reading(NumberReading::FirstToken).unwrap();
    let digits = LocalJudge::new(&m).unwrap().with_digit_eps(0.0).with_batch(2);
    let (pf, pd) = (first.number_probs(&prompts), digits.number_probs(&prompts));
    let mut worst = 0f64;
    for (i, p) in prompts.iter().enumerate() {
        let ids = m.chat_prompt_ids(&[Message::user(p.as_str())]).unwrap();
        let p0 = next_probs(&m, &ids);
        let (pf, pd) = (pf[i].as_ref().unwrap(), pd[i].as_ref().unwrap());
        assert_eq!((pf.len(), pd.len()), (101, 101));
        for n in 0..=100usize {
            // First token: "n" and " n" for digits, "42" for 42, nothing else.
            let want = match n {
                0..=9 => p0[n] + p0[10 + n],
                42 => p0[21],
                _ => 0.0,
            };
            assert!((pf[n] - want).abs() <= 1e-12, "first token, prompt {i}, n {n}: {} vs {want}", pf[n]);
            // Digit by digit: first digit as "d" or " d", then "d" tokens, then a token that
            // does not start with a digit.
            let ds: Vec<u32> = n.to_string().bytes().map(|b| (b - b'0') as u32).collect();
            let mut want = p0[ds[0] as usize] + p0[10 + ds[0] as usize];
            let mut seq = ids.clone();
            seq.push(ds[0]);
            for &d in &ds[1..] {
                want *= next_probs(&m, &seq)[d as usize];
                seq.push(d);
            }
            let after = next_probs(&m, &seq);
            want *= 1.0 - extend.iter().map(|&t| after[t]).sum::<f64>();
            let err = (pd[n] - want).abs() / want;
            worst = worst.max(err);
            assert!(err <= 1e-4, "digits, prompt {i}, n {n}: {} vs {want}", pd[n]);
        }
    }
    eprintln!("digits vs brute force: worst relative error {worst:.2e}");
    // The scores are the means of these distributions.
    for (r, p) in digits.score(&prompts).iter().zip(&pd) {
        let (r, p) = (r.as_ref().unwrap(), p.as_ref().unwrap());
        let mass: f64 = p.iter().sum();
        assert!(close(r.mass, mass));
        assert_eq!(r.score.is_some(), mass >= 0.25);
    }
}

#[test]
fn local_judge_on_the_default_model() {
    let Some(path) = common::required_default_model() else { return };
    let m = Arc::new(LoadedModel::load(&path, CpuBackend, 1024).unwrap());
    let judge = LocalJudge::new(m.clone()).unwrap();
    let covered = judge.covered_values();
    eprintln!("integer tokens: {} ids, values {covered:?}", judge.number_tokens().len());
    assert!(covered.iter().all(|&k| k <= 100) && !covered.is_empty());
    for d in 0..=9u8 {
        assert!(covered.contains(&d), "the digit {d} is a token of every BPE vocabulary");
    }
    // SmolLM2 splits numbers into digits: no single token says 10..=100, so it reads digit by digit.
    assert_eq!(covered.len() == 101, judge.reading() == NumberReading::FirstToken);

    // The first-token formula on known logits: uniform logits give each integer token 1/vocab.
    let vocab = m.engine.config.vocab;
    let s = judge.score_logits(&vec![0.0; vocab]);
    let n = judge.number_tokens().len() as f64;
    assert!(close(s.mass, n / vocab as f64), "{s:?}");
    assert_eq!(s.score, None);
    let mut logits = vec![-1e4f32; vocab];
    let (id7, _) = *judge.number_tokens().iter().find(|&&(_, k)| k == 7).unwrap();
    logits[id7 as usize] = 0.0;
    let s = judge.score_logits(&logits);
    assert!(close(s.score.unwrap(), 7.0) && close(s.mass, 1.0), "{s:?}");

    let q = |answer: &str| {
        format!(
            "Rate how much the following answer is about cats, on a scale from 0 (not at all) to 100 \
             (entirely about cats). Reply with a number only.\nQuestion: What do you like?\nAnswer: {answer}\nScore:"
        )
    };
    let prompts = vec![
        q("I love cats. Cats are the best pets: soft fur, purring, and they chase mice."),
        q("The stock market fell two percent today after the bank raised interest rates."),
        q("My cat sleeps all day."),
    ];
    let first = LocalJudge::new(&*m).unwrap().with_reading(NumberReading::FirstToken).unwrap();
    let digits = LocalJudge::new(&*m).unwrap().with_reading(NumberReading::Digits).unwrap();
    let mut results = vec![];
    for (name, j) in [("first token", &first), ("digits", &digits)] {
        let t = Instant::now();
        let batched: Vec<JudgeScore> = j.score(&prompts).into_iter().map(|r| r.unwrap()).collect();
        eprintln!("{name}: {} prompts in {:.2} s", prompts.len(), t.elapsed().as_secs_f64());
        for (i, b) in batched.iter().enumerate() {
            eprintln!("  {name}, prompt {i}: score {:?}, mass {:.4}", b.score, b.mass);
            assert!(b.mass > 0.0 && b.mass <= 1.0 + 1e-9, "{b:?}");
            assert_eq!(b.score.is_some(), b.mass >= 0.25, "{b:?}");
            if let Some(x) = b.score {
                assert!((0.0..=100.0).contains(&x), "{b:?}");
            }
        }
        // Batching changes nothing but rounding.
        let single = LocalJudge::new(&*m).unwrap().with_reading(j.reading()).unwrap().with_batch(1);
        let one = single.score(&prompts[2..]).pop().unwrap().unwrap();
        let b = batched[2];
        assert!((one.mass - b.mass).abs() <= 1e-3 * b.mass.max(1e-2), "batched {b:?} vs single {one:?}");
        if let (Some(x), Some(y)) = (one.score, b.score) {
            assert!((x - y).abs() < 0.05, "batched {b:?} vs single {one:?}");
        }
        results.push(batched);
    }
    // Digit by digit, every number starts with a one-digit token: its mass is at most the
    // first-token mass on digits.
    for (a, b) in results[0].iter().zip(&results[1]) {
        assert!(b.mass <= a.mass + 1e-9, "digits {b:?} vs first token {a:?}");
    }
    // Following rarer prefixes moves the score little.
    let finer = LocalJudge::new(&*m).unwrap().with_digit_eps(1e-4).score(&prompts[..1]).pop().unwrap().unwrap();
    let a = results[1][0];
    eprintln!("  digits eps 1e-3 {a:?} vs eps 1e-4 {finer:?}");
    assert!((a.mass - finer.mass).abs() < 0.02, "{a:?} vs {finer:?}");
    if let (Some(x), Some(y)) = (a.score, finer.score) {
        assert!((x - y).abs() < 1.0, "{a:?} vs {finer:?}");
    }

    // An over-long prompt is an error in its place; the others still score.
    let long = "cats ".repeat(2000);
    let out = first.score(&[prompts[0].clone(), long]);
    assert!(out[0].is_ok());
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    let d: Box<dyn Judge> = Box::new(judge);
    assert!(d.describe().starts_with("self") && d.describe().contains("digit by digit"), "{}", d.describe());
}
