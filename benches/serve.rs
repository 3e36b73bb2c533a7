//! Server overhead: the same greedy request as a library call (`Engine::generate`) and through
//! `persona serve` over loopback HTTP (JSON and SSE), on the tiny fixture model (where the
//! forward pass is cheap and the difference is the server's own cost) and on the default model
//! when it is cached.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use persona::backend::cpu::CpuBackend;
use persona::engine::generate::GenRequest;
use persona::serve::{run_server, ServeConfig};
use persona::LoadedModel;
use serde_json::json;

const CTX: usize = 256;
const PROMPT: &[u32] = &[37, 235, 140, 72, 255, 137, 203, 133, 79];

fn start(model: &Path) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let model = model.to_path_buf();
    std::thread::spawn(move || {
        let m = LoadedModel::load(&model, CpuBackend, CTX).unwrap();
        run_server(m, ServeConfig { port: 0, ..ServeConfig::default() }, |a| tx.send(a).unwrap()).unwrap();
    });
    format!("http://{}", rx.recv_timeout(Duration::from_secs(120)).expect("server did not start"))
}

fn fixtures() -> PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if shared.is_dir() {
        shared
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }
}

fn case(c: &mut Criterion, name: &str, model: &Path, prompt: Vec<u32>, n: usize) {
    let m = LoadedModel::load(model, CpuBackend, CTX).unwrap();
    let base = start(model);
    let url = format!("{base}/v1/completions");
    let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true}).to_string();
    let mut sse = serde_json::from_str::<serde_json::Value>(&body).unwrap();
    sse["stream"] = json!(true);
    let sse = sse.to_string();
    let mut g = c.benchmark_group(format!("serve_overhead_{name}"));
    g.sample_size(20);
    g.bench_function(format!("library_generate_{n}"), |b| {
        b.iter(|| {
            let mut r = GenRequest::greedy(prompt.clone(), n);
            r.ignore_eos = true;
            m.engine.generate(&[r], &mut |_, _| {}).unwrap()
        })
    });
    g.bench_function(format!("http_completion_{n}"), |b| {
        b.iter(|| {
            let r = ureq::post(&url).set("Content-Type", "application/json").send_string(&body).unwrap();
            assert_eq!(r.status(), 200);
            r.into_string().unwrap()
        })
    });
    g.bench_function(format!("http_stream_{n}"), |b| {
        b.iter(|| {
            let r = ureq::post(&url).set("Content-Type", "application/json").send_string(&sse).unwrap();
            BufReader::new(r.into_reader()).lines().map_while(|l| l.ok()).filter(|l| l.starts_with("data: ")).count()
        })
    });
    g.finish();
}

fn overhead(c: &mut Criterion) {
    case(c, "tiny", &fixtures().join("tiny-llama"), PROMPT.to_vec(), 16);
    match persona::fetch::cached_default_model() {
        Some(path) => {
            let ids: Vec<u32> = (0..32).map(|i| 100 + i * 7).collect();
            case(c, "smollm2", &path, ids, 16);
        }
        None => eprintln!("default model not cached: skipping its serve overhead case (run `persona fetch`)"),
    }
}

criterion_group!(benches, overhead);
criterion_main!(benches);
