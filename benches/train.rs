//! Training benchmarks: the CPU backward ops on SmolLM2-135M shapes, and one full LoRA optimiser
//! step on the default model when it is cached (`persona fetch`).
//!
//!   cargo bench --bench train                # all (the step group runs ~12 steps: ~1.5 min on 2 cores)
//!   cargo bench --bench train -- --quick     # a quick look (the step group runs 4 steps)
//!   cargo bench --bench train -- train_ops   # the ops only
//!
//! Under `cargo test --benches` (criterion's test mode: every benchmark once) the step group is
//! skipped: one step takes seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use persona::backend::cpu::{CpuBackend, CpuGemmBackend};
use persona::backend::{AttnShape, Backend};
use persona::model::tensor::HostTensor;
use persona::train::bench::bench_trainer;
use persona::train::data::{read_jsonl, DataOptions};
use persona::train::{SeqRows, TrainBackend, Trainer};
use persona::LoadedModel;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = persona::engine::sampler::Rng::new(seed);
    (0..n).map(|_| r.next_f64() as f32 - 0.5).collect()
}

fn has_arg(flag: &str) -> bool {
    std::env::args().any(|a| a == flag)
}

/// Criterion's test mode: `cargo test --benches` (no `--bench`) or `cargo bench -- --test`.
fn test_mode() -> bool {
    !has_arg("--bench") || has_arg("--test")
}

/// The backward ops, SmolLM2-135M geometry (hidden 576, FFN 1536, 9 query / 3 kv heads of 64),
/// on a batch of t = 256 tokens: 4 sequences of 64. Matmul throughput counts multiply-adds (as
/// benches/cpu.rs does); the element-wise ops count values.
fn ops(c: &mut Criterion) {
    let b = CpuBackend;
    let (h, f, r) = (576usize, 1536usize, 16usize);
    let seqs: Vec<SeqRows> = (0..4).map(|i| SeqRows { start: i * 64, len: 64 }).collect();
    let t: usize = seqs.iter().map(|s| s.len).sum();
    let mut g = c.benchmark_group("train_ops");
    g.sample_size(20);

    // dX = dY · W through the frozen down-projection's transpose shape: dy [t, 1536], W [1536, 576].
    let w = b.upload(&HostTensor::from_f32("w", vec![f, h], rand_vec(f * h, 1))).unwrap();
    let dy_f = rand_vec(t * f, 2);
    let mut dx = b.alloc(t * h).unwrap();
    g.throughput(Throughput::Elements((t * f * h) as u64));
    g.bench_function(format!("matmul_backward_x_{t}x{f}x{h}"), |bn| {
        bn.iter(|| b.matmul_backward_x(&dy_f, &w, t, &mut dx, false).unwrap())
    });

    // LoRA gradients of a 576 -> 1536 target at rank 16 (scale s = alpha / sqrt(r)):
    // dB [1536, 16] += s · dYᵀ · (X Aᵀ), and dA [16, 576] += s · (dY B)ᵀ · X.
    let scale = 32.0 / (r as f32).sqrt();
    let xa = rand_vec(t * r, 3);
    let mut db = vec![0f32; f * r];
    g.throughput(Throughput::Elements((t * f * r) as u64));
    g.bench_function(format!("matmul_backward_w_lora_b_{t}x{f}x{r}"), |bn| {
        bn.iter(|| b.matmul_backward_w(&dy_f, &xa, scale, t, f, r, &mut db).unwrap())
    });
    let dyb = rand_vec(t * r, 4);
    let x = rand_vec(t * h, 5);
    let mut da = vec![0f32; r * h];
    g.throughput(Throughput::Elements((t * r * h) as u64));
    g.bench_function(format!("matmul_backward_w_lora_a_{t}x{r}x{h}"), |bn| {
        bn.iter(|| b.matmul_backward_w(&dyb, &x, scale, t, r, h, &mut da).unwrap())
    });

    // Causal attention backward: per (query, key) pair and head, five length-64 dot products or
    // axpys (scores, dP, dQ, dK, dV).
    let s = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
    let (qw, kvw) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let (q, k, v, d_out) = (rand_vec(t * qw, 6), rand_vec(t * kvw, 7), rand_vec(t * kvw, 8), rand_vec(t * qw, 9));
    let (mut dq, mut dk, mut dv) = (b.alloc(t * qw).unwrap(), b.alloc(t * kvw).unwrap(), b.alloc(t * kvw).unwrap());
    let pairs: usize = seqs.iter().map(|sr| sr.len * (sr.len + 1) / 2).sum();
    g.throughput(Throughput::Elements((5 * pairs * s.n_heads * s.head_dim) as u64));
    g.bench_function(format!("attention_backward_{}x{}", seqs.len(), seqs[0].len), |bn| {
        bn.iter(|| b.attention_backward(&q, &k, &v, &d_out, &seqs, s, &mut dq, &mut dk, &mut dv).unwrap())
    });

    let norm = b.upload(&HostTensor::from_f32("n", vec![h], rand_vec(h, 10))).unwrap();
    let (hh, dy_h) = (rand_vec(t * h, 11), rand_vec(t * h, 12));
    let mut dh = b.alloc(t * h).unwrap();
    g.throughput(Throughput::Elements((t * h) as u64));
    g.bench_function(format!("rmsnorm_backward_{t}x{h}"), |bn| {
        bn.iter(|| b.rmsnorm_backward(&hh, &norm, 1e-5, &dy_h, t, h, &mut dh).unwrap())
    });

    let (gate, up) = (rand_vec(t * f, 13), rand_vec(t * f, 14));
    let (mut dgate, mut dup) = (b.alloc(t * f).unwrap(), b.alloc(t * f).unwrap());
    g.throughput(Throughput::Elements((t * f) as u64));
    g.bench_function(format!("silu_mul_backward_{t}x{f}"), |bn| {
        bn.iter(|| b.silu_mul_backward(&gate, &up, &dy_f, t * f, &mut dgate, &mut dup).unwrap())
    });
    g.finish();
}

const BATCH: usize = 8;
const RANK: usize = 16;

/// One optimiser step as `persona bench --train` and scripts/train_baseline.py time it: LoRA
/// rank 16 (alpha 32, rsLoRA) on all seven targets, batch 8 of the shipped evil answers (label
/// pos) in file order, clip 1.0, AdamW lr 1e-4. Every iteration is the first batch again (the
/// step counter is rewound), so each times the same tokens; one untimed warm-up step first.
fn step(c: &mut Criterion) {
    let name = format!("smollm2_lora_r{RANK}_batch{BATCH}");
    if test_mode() {
        eprintln!("SKIPPED: train_step/{name} in test mode (seconds per step)");
        return;
    }
    if has_arg("--list") {
        // Named without loading the model (criterion lists; it runs nothing).
        c.benchmark_group("train_step").bench_function(&name, |_| {});
        return;
    }
    let Some(path) = persona::fetch::cached_default_model() else {
        eprintln!("SKIPPED: default model not cached (persona fetch)");
        return;
    };
    // The backend `persona finetune` trains on.
    let m = LoadedModel::load(&path, CpuGemmBackend, 4096).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct/evil.jsonl");
    let rows = read_jsonl(&data, &m, &DataOptions { max_len: 4096, label: Some("pos".into()) }).unwrap();
    let (batch, rank) = (BATCH, RANK);
    let tokens: usize = rows.iter().take(batch).map(|e| e.ids.len()).sum();

    // Built (and warmed up) on first use, so a filter that leaves this group out costs no step.
    let mut trainer: Option<Trainer<'_, CpuGemmBackend>> = None;

    let mut g = c.benchmark_group("train_step");
    // ~seconds per iteration: ten samples of one step each (criterion's least), flat sampling.
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(60));
    g.throughput(Throughput::Elements(tokens as u64));
    eprintln!("train_step/{name}: {tokens} tokens per step (the first {batch} rows)");
    g.bench_function(&name, |bn| {
        let t = trainer.get_or_insert_with(|| {
            let mut t = bench_trainer(&m.engine, rows.clone(), batch, rank, 1_000_000).unwrap();
            let warm = t.train_step(None).unwrap();
            eprintln!("warm-up step: {:.2} s, {} tokens, loss {:.4}", warm.seconds, warm.tokens, warm.loss);
            t
        });
        bn.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                t.step = 0;
                let start = Instant::now();
                let log = t.train_step(None).unwrap();
                total += start.elapsed();
                assert_eq!(log.tokens, tokens);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, ops, step);
criterion_main!(benches);
