//! CPU backend benchmarks: per-op on SmolLM2-135M shapes, and per-token prefill/decode on the
//! default model when it is cached (`persona fetch`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use persona::backend::cpu::simd::Simd;
use persona::backend::cpu::{matmul_with, CpuBackend, Rows};
use persona::backend::{AttnShape, Backend, KvLayer, PageTable, TokenPos};
use persona::engine::SeqInput;
use persona::model::gguf::{random_blocks, GgmlType};
use persona::model::tensor::HostTensor;
use persona::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp, SteeringPlan};
use persona::LoadedModel;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = persona::engine::sampler::Rng::new(seed);
    (0..n).map(|_| r.next_f64() as f32 - 0.5).collect()
}

fn ops(c: &mut Criterion) {
    let b = CpuBackend;
    let (h, f) = (576, 1536);
    let mut g = c.benchmark_group("cpu_ops");
    g.sample_size(20);
    for t in [1usize, 64] {
        let x = rand_vec(t * h, 1);
        let w = b.upload(&HostTensor::from_f32("w", vec![f, h], rand_vec(f * h, 2))).unwrap();
        let mut out = b.alloc(t * f).unwrap();
        g.throughput(Throughput::Elements((t * f * h) as u64));
        g.bench_function(format!("matmul_{t}x{h}x{f}"), |bn| bn.iter(|| b.matmul(&x, &w, None, t, &mut out).unwrap()));
        let norm = b.upload(&HostTensor::from_f32("n", vec![h], rand_vec(h, 3))).unwrap();
        let d = rand_vec(t * h, 4);
        let mut hh = rand_vec(t * h, 5);
        let mut xo = b.alloc(t * h).unwrap();
        g.bench_function(format!("residual_norm_{t}x{h}"), |bn| {
            bn.iter(|| b.residual_steer_norm(&mut hh, Some(&d), None, &norm, 1e-5, t, h, &mut xo).unwrap())
        });
    }
    // The same matmul with packed weights (decoded as read), at each SIMD level this CPU has.
    for ty in [GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::Q8_0] {
        let data = random_blocks(ty, f * h / ty.block_layout().unwrap().0 as usize, 11);
        let rows = Rows::Packed { ty, data: &data, row_bytes: data.len() / f };
        for t in [1usize, 64] {
            let x = rand_vec(t * h, 1);
            let mut out = vec![0f32; t * f];
            g.throughput(Throughput::Bytes(data.len() as u64));
            for simd in Simd::available() {
                let name = format!("matmul_{ty}_{}_{t}x{h}x{f}", simd.name());
                g.bench_function(name, |bn| bn.iter(|| matmul_with(simd, &x, rows, None, t, f, h, &mut out)));
            }
        }
    }
    // Decode attention over 512 cached positions, SmolLM2 geometry (9 q heads, 3 kv heads, d 64).
    let s = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
    let mut cache = KvLayer::<CpuBackend> { k: rand_vec(1024 * 192, 6), v: rand_vec(1024 * 192, 7) };
    let (q, k, v) = (rand_vec(576, 8), rand_vec(192, 9), rand_vec(192, 10));
    let layout = b.layout(&[TokenPos { slot: 0, pos: 511 }], &PageTable::contiguous(1, 64, 16)).unwrap();
    let mut out = b.alloc(576).unwrap();
    g.bench_function("attention_decode_512", |bn| {
        bn.iter(|| b.attention(&q, &k, &v, &mut cache, &layout, 1, s, &mut out).unwrap())
    });
    g.finish();
}

fn model(c: &mut Criterion) {
    let Some(path) = persona::fetch::cached_default_model() else {
        eprintln!("default model not cached: skipping per-token benchmarks (run `persona fetch`)");
        return;
    };
    let m = LoadedModel::load(&path, CpuBackend, 1024).unwrap();
    let e = &m.engine;
    let prompt: Vec<u32> = (0..64).map(|i| 100 + i * 7).collect();
    let mut g = c.benchmark_group("smollm2_cpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements(prompt.len() as u64));
    g.bench_function("prefill_64", |bn| {
        bn.iter(|| {
            let mut cache = e.new_cache(1, 128).unwrap();
            e.forward(&mut cache, &[SeqInput { slot: 0, tokens: &prompt, ..Default::default() }], false).unwrap()
        })
    });
    g.throughput(Throughput::Elements(1));
    let mut cache = e.new_cache(1, prompt.len() + 1).unwrap();
    e.forward(&mut cache, &[SeqInput { slot: 0, tokens: &prompt, ..Default::default() }], false).unwrap();
    // Steering + monitoring overhead: every layer steered (add) and probed vs nothing.
    let c = &e.config;
    let v: std::sync::Arc<[f32]> = std::sync::Arc::from(rand_vec(c.hidden, 77));
    let op = |l| SteerOp {
        kind: SteerKind::Add,
        layer: l,
        vector: v.clone(),
        coeff: 0.5,
        positions: Positions::All,
        when: None,
    };
    let all = SeqSteering {
        sources: Vec::new(),
        plan: SteeringPlan { ops: (1..=c.n_layers).map(op).collect() },
        probes: (1..=c.n_layers).map(|l| Probe { name: "p".into(), layer: l, vector: v.clone() }).collect(),
    };
    for (name, st) in [("decode_token_at_64", None), ("decode_token_at_64_steer_probe_all_layers", Some(&all))] {
        g.bench_function(name, |bn| {
            bn.iter(|| {
                // Every iteration decodes position 64 after the same 64-token prompt.
                cache.truncate(0, prompt.len());
                let input = SeqInput { slot: 0, tokens: &[42], steering: st, ..Default::default() };
                e.forward(&mut cache, &[input], false).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ops, model);
criterion_main!(benches);
