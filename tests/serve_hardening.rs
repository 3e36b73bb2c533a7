//! Server hardening (issue 16): unknown top-level keys, unsupported OpenAI options, roles and
//! model names are 400/404 with a message that names them; prompts far past the context are
//! refused before tokenizing.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use persona::backend::cpu::CpuBackend;
use persona::serve::{run_server, ServeConfig};
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

fn send(method: &str, url: &str, body: &str) -> (u16, Value) {
    let r = ureq::request(method, url).timeout(Duration::from_secs(120)).set("Content-Type", "application/json");
    let resp = match r.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let code = resp.status();
    let text = resp.into_string().unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    send("POST", url, &body.to_string())
}

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
    let upload = |q: &str| {
        let r = ureq::post(&format!("{base}/v1/vectors?{q}"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(&std::fs::read(&vector).unwrap());
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("upload: {e}"),
        };
        let code = resp.status();
        (code, serde_json::from_str::<Value>(&resp.into_string().unwrap()).unwrap())
    };
    assert_eq!(upload("name=evil").0, 201);
    let (code, e) = upload("name=evil");
    assert_eq!(code, 409, "{e}");
    assert!(msg(&e).contains("`evil`") && msg(&e).contains("replace=true"), "{e}");
    assert_eq!(upload("name=evil&replace=true").0, 201);
    assert_eq!(upload("name=evil&replace=maybe").0, 400);
    let steering = json!({"steering": [{"vector": "evil", "layers": 1, "coeff": 2}],
                          "monitor": [{"vector": "evil", "layers": 1}]});
    assert_eq!(send("PUT", &format!("{base}/v1/steering"), &steering.to_string()).0, 200);
    let (code, e) = send("DELETE", &format!("{base}/v1/vectors/evil"), "");
    assert_eq!(code, 409, "{e}");
    assert!(msg(&e).contains("steering[0]") && msg(&e).contains("monitor[0]"), "{e}");
    let url = format!("{base}/v1/completions");
    let (code, e) = post(&url, &json!({"prompt": [1, 2, 3], "max_tokens": 2}));
    assert_eq!(code, 200, "{e}");
    // Cleared default: the delete goes through.
    assert_eq!(send("PUT", &format!("{base}/v1/steering"), "{}").0, 200);
    assert_eq!(send("DELETE", &format!("{base}/v1/vectors/evil"), "").0, 200);
    assert_eq!(send("DELETE", &format!("{base}/v1/vectors/evil"), "").0, 404);
    assert_eq!(post(&url, &json!({"prompt": [1, 2, 3], "max_tokens": 2})).0, 200);
}
