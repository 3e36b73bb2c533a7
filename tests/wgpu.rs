//! The wgpu backend on the machine's adapter (Mesa lavapipe through Vulkan in CI): the parity
//! table, 16-bit and chunked weights, the tiny-model and steering fixtures end to end, the
//! default model's greedy ids, bad input; and every WGSL file through naga to SPIR-V, MSL and
//! HLSL. Without an adapter the GPU tests print why and pass without running (CI installs
//! lavapipe, so they run there); the naga test needs no adapter.

mod common;
use common::*;

use std::sync::Arc;

use persona::backend::check::{format_table, run_checks, run_weight_format_checks};
use persona::backend::cpu::CpuBackend;
use persona::backend::wgpu::{check_limits, WgpuBackend, WgpuOptions};
use persona::backend::{AttnShape, Backend, KvLayer, PageTable, TokenPos};
use persona::engine::generate::GenRequest;
use persona::engine::{Engine, SeqInput};
use persona::model::tensor::{DType, HostTensor, Storage};
use persona::model::ModelFiles;
use persona::steer::{Positions, Probe, SeqSteering, SteerKind, SteerOp, SteeringPlan};
use persona::LoadedModel;

/// The backend on the machine's adapter, or None (with the reason printed) when there is none.
/// On Linux the adapter must come through Vulkan: lavapipe in CI, never a GL fallback.
fn backend() -> Option<WgpuBackend> {
    static B: std::sync::OnceLock<Option<WgpuBackend>> = std::sync::OnceLock::new();
    B.get_or_init(|| match WgpuBackend::new() {
        Ok(b) => {
            eprintln!("wgpu adapter: {}", b.describe());
            if cfg!(target_os = "linux") {
                assert_eq!(b.adapter_info().backend, wgpu::Backend::Vulkan, "adapter {}", b.describe());
            }
            Some(b)
        }
        Err(e) => {
            common::missing(
                &format!("a wgpu adapter ({e})"),
                "on Linux install lavapipe: apt-get install mesa-vulkan-drivers libvulkan1; scripts/test.sh does",
            );
            None
        }
    })
    .clone()
}

/// Every WGSL file parses, validates, and translates to SPIR-V (Vulkan), MSL (Metal) and HLSL
/// (DX12), for every value of its pipeline constants.
#[test]
fn every_shader_translates_to_spirv_msl_and_hlsl() {
    use naga::back::{hlsl, msl, spv};
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    // The sources as persona compiles them (common.wgsl prepended where weights are read).
    let sources = persona::backend::wgpu::shader_sources();
    assert!(sources.len() >= 7, "expected the seven op shaders");
    for (name, src) in sources {
        let module =
            naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let info = Validator::new(ValidationFlags::all(), Capabilities::SHADER_FLOAT16_IN_FLOAT32)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let formats: &[f64] = if module.overrides.is_empty() { &[f64::NAN] } else { &[0.0, 1.0, 2.0] };
        for &f in formats {
            let mut constants = naga::back::PipelineConstants::default();
            if !f.is_nan() {
                constants.insert("W_FORMAT".to_string(), f);
            }
            for ep in &module.entry_points {
                let what = format!("{name}:{} W_FORMAT={f}", ep.name);
                let (m, i) = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((ep.stage, &ep.name)),
                    &constants,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                let spv_opts = spv::Options::default();
                let spv_pipe = spv::PipelineOptions { shader_stage: ep.stage, entry_point: ep.name.clone() };
                let words =
                    spv::write_vec(&m, &i, &spv_opts, Some(&spv_pipe)).unwrap_or_else(|e| panic!("{what} SPIR-V: {e}"));
                assert!(words.len() > 5 && words[0] == 0x0723_0203, "{what}: not a SPIR-V module");
                let msl_opts = msl::Options { lang_version: (2, 0), ..Default::default() };
                let msl_pipe =
                    msl::PipelineOptions { entry_point: Some((ep.stage, ep.name.clone())), ..Default::default() };
                let (text, _) =
                    msl::write_string(&m, &i, &msl_opts, &msl_pipe).unwrap_or_else(|e| panic!("{what} MSL: {e}"));
                assert!(text.contains("kernel void"), "{what}: no MSL kernel");
                let hlsl_opts = hlsl::Options { shader_model: hlsl::ShaderModel::V6_0, ..Default::default() };
                let hlsl_pipe = hlsl::PipelineOptions { entry_point: Some((ep.stage, ep.name.clone())) };
                let mut out = String::new();
                hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe)
                    .write(&m, &i, None)
                    .unwrap_or_else(|e| panic!("{what} HLSL: {e}"));
                assert!(out.contains("[numthreads("), "{what}: no HLSL compute entry");
            }
        }
    }
}

/// The weight-unpacking helpers live once, in shaders/common.wgsl, and reach exactly the shaders
/// that read weights.
#[test]
fn weight_helpers_come_from_common_wgsl() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for (name, src) in persona::backend::wgpu::shader_sources() {
        let file = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(!file.contains("fn w_load"), "{name} defines w_load itself");
        let reads_weights = file.contains("w_load");
        assert_eq!(src.matches("fn w_load(").count(), reads_weights as usize, "{name}");
    }
}

#[test]
fn parity_table_passes() {
    let Some(b) = backend() else { return };
    let t0 = std::time::Instant::now();
    let mut rows = run_checks(&b, true);
    rows.extend(run_weight_format_checks(&b, true));
    let table = format_table("wgpu", &rows);
    eprintln!("{table}parity table in {:.1} s", t0.elapsed().as_secs_f64());
    assert!(rows.iter().any(|r| r.op == "fused_vs_unfused"));
    assert!(rows.iter().any(|r| r.op == "matmul[bf16]") && rows.iter().any(|r| r.op == "embed[f16]"));
    assert!(rows.iter().all(|r| r.pass), "{table}");
}

/// The 16-bit weight rows are well-formed: the CPU passes them against itself.
#[test]
fn weight_format_rows_pass_on_the_cpu() {
    let rows = run_weight_format_checks(&CpuBackend, true);
    assert!(!rows.is_empty() && rows.iter().all(|r| r.pass), "{}", format_table("cpu", &rows));
}

/// A tensor stored as f16/bf16 bytes (memory-mapped, as the model loaders produce them).
fn stored(name: &str, shape: Vec<usize>, vals: &[f32], dtype: DType) -> HostTensor {
    let bytes: Vec<u8> = match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    };
    let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).unwrap();
    m[..bytes.len()].copy_from_slice(&bytes);
    let map = Arc::new(m.make_read_only().unwrap());
    HostTensor { name: name.into(), shape, storage: Storage::Mapped { map, offset: 0, len: bytes.len(), dtype } }
}

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 40503) >> 8) % 2001) as f32 / 1000.0 - 1.0)
        .map(|v| v * scale)
        .collect()
}

/// ‖got − want‖₂ / ‖want‖₂
fn rel_l2(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}

/// max |got − want| / max |want|
fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

/// matmul (GEMV and GEMM, odd k, bias) and embed with f32, f16 and bf16 weights, whole and split
/// into chunks by a small binding limit, against the CPU on the same stored values.
#[test]
fn sixteen_bit_and_chunked_weights_match_the_cpu() {
    let Some(b) = backend() else { return };
    let small = WgpuBackend::with_options(WgpuOptions {
        adapter: Some(b.adapter_info().name.clone()),
        allow_cpu: true,
        max_binding_bytes: Some(4096),
    })
    .unwrap();
    assert_eq!(small.max_binding_bytes(), 4096);
    let cpu = CpuBackend;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, k) in [(70usize, 33usize), (129, 64)] {
            let w = stored("w", vec![n, k], &values(n * k, 1, 0.5), dtype);
            let bias = stored("b", vec![n], &values(n, 2, 1.0), dtype);
            let wc = cpu.upload(&w).unwrap();
            let bc = cpu.upload(&bias).unwrap();
            for (label, g) in [("whole", &b), ("chunked", &small)] {
                let wg = g.upload(&w).unwrap();
                let bg = g.upload(&bias).unwrap();
                let rows_per_chunk = 4096 / (if dtype == DType::F32 { k * 4 } else { k.next_multiple_of(2) * 2 });
                if label == "chunked" {
                    assert_eq!(wg.chunks_len(), n.div_ceil(rows_per_chunk), "{dtype:?} {n}x{k}");
                }
                for t in [1usize, 3, 8, 9, 70] {
                    let x = values(t * k, 3, 1.0);
                    let mut xb = g.alloc(t * k).unwrap();
                    g.write(&mut xb, &x).unwrap();
                    let mut ob = g.alloc(t * n).unwrap();
                    g.write(&mut ob, &vec![f32::NAN; t * n]).unwrap();
                    g.matmul(&xb, &wg, Some(&bg), t, &mut ob).unwrap();
                    let mut oc = vec![0f32; t * n];
                    cpu.matmul(&x, &wc, Some(&bc), t, &mut oc).unwrap();
                    let got = g.read(&ob, t * n).unwrap();
                    let err = max_rel(&got, &oc);
                    assert!(err < 1e-5, "matmul {dtype:?} {label} t={t} {n}x{k}: rel error {err}");
                }
                let ids: Vec<u32> = (0..n as u32).rev().step_by(3).collect();
                let mut eb = g.alloc(ids.len() * k).unwrap();
                g.embed(&wg, &ids, k, &mut eb).unwrap();
                let mut ec = vec![0f32; ids.len() * k];
                cpu.embed(&wc, &ids, k, &mut ec).unwrap();
                assert_eq!(g.read(&eb, ids.len() * k).unwrap(), ec, "embed {dtype:?} {label} {n}x{k}");
            }
        }
    }
}

fn forward_all<B: Backend>(e: &Engine<B>, ids: &[u32]) -> persona::engine::ForwardOutput {
    let mut cache = e.new_cache(1, ids.len()).unwrap();
    e.forward(&mut cache, &[SeqInput { slot: 0, tokens: ids, logits_from: Some(0), ..Default::default() }], true)
        .unwrap()
}

const TINY: [&str; 3] = ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2"];

/// The tiny HF models (f32): every logit within 1e-4 of transformers, residual norms, greedy ids.
#[test]
fn tiny_models_match_transformers() {
    let Some(b) = backend() else { return };
    let t0 = std::time::Instant::now();
    for name in TINY {
        let dir = fixtures().join(name);
        let f = ModelFiles::open(&dir).unwrap();
        let e = Engine::new(b.clone(), f.config.clone(), &f.tensors, 256).unwrap();
        let r = json(&dir.join("reference.json"));
        let ids = u32s(&r["ids"]);
        let out = forward_all(&e, &ids);
        let mut max_err = 0f32;
        for (t, row) in r["logits"].as_array().unwrap().iter().enumerate() {
            for (a, b) in out.row(t).iter().zip(f32s(row)) {
                max_err = max_err.max((a - b).abs());
            }
        }
        assert!(max_err <= 1e-4, "{name}: max |logit error| {max_err}");
        assert_residual_norms(&out.residuals, &r["residual_norms"], e.config.hidden, 1e-4, name);
        let want = u32s(&r["greedy_16_no_eos"]);
        let mut req = GenRequest::greedy(ids, want.len());
        req.ignore_eos = true;
        let got = e.generate(&[req], &mut |_, _| {}).unwrap().remove(0).ids();
        assert_greedy_prefix(&got, &want, &f32s(&r["greedy_16_margins"]), 1e-4, name);
        eprintln!("{name}: max logit error {max_err:.2e}");
    }
    eprintln!("tiny models on wgpu in {:.1} s", t0.elapsed().as_secs_f64());
}

/// The tiny models rewritten with f16 and bf16 weights: logits within 1e-2 of transformers' f32
/// logits (relative L2 error; the rounding of the weights is the error), and within 1e-4 of the
/// CPU on the same 16-bit weights (the shaders' unpacking is exact).
#[test]
fn tiny_models_with_16_bit_weights() {
    let Some(b) = backend() else { return };
    for name in TINY {
        let src = fixtures().join(name);
        let f = ModelFiles::open(&src).unwrap();
        let r = json(&src.join("reference.json"));
        let ids = u32s(&r["ids"]);
        let want: Vec<f32> = r["logits"].as_array().unwrap().iter().flat_map(f32s).collect();
        for (dtype, st) in [(DType::F16, safetensors::Dtype::F16), (DType::BF16, safetensors::Dtype::BF16)] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
            let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
            let orig = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let data: Vec<(String, Vec<usize>, Vec<u8>)> = orig
                .tensors()
                .into_iter()
                .map(|(n, t)| {
                    let v: Vec<f32> =
                        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    (n, t.shape().to_vec(), stored("x", vec![v.len()], &v, dtype).bytes().to_vec())
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView)> = data
                .iter()
                .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(st, s.clone(), d).unwrap()))
                .collect();
            safetensors::serialize_to_file(views, &None, &dir.path().join("model.safetensors")).unwrap();
            let f16 = ModelFiles::open(dir.path()).unwrap();
            assert_eq!(f16.tensors.layers[0].wq.dtype(), dtype);
            let e = Engine::new(b.clone(), f.config.clone(), &f16.tensors, 256).unwrap();
            let got = forward_all(&e, &ids).logits;
            let rel = rel_l2(&got, &want);
            assert!(rel <= 1e-2, "{name} {dtype:?}: logits relative L2 error {rel} vs transformers");
            let c = Engine::new(CpuBackend, f.config.clone(), &f16.tensors, 256).unwrap();
            let cpu = forward_all(&c, &ids).logits;
            let abs = got.iter().zip(&cpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(abs <= 1e-4, "{name} {dtype:?}: max error {abs} vs the CPU on the same weights");
            eprintln!("{name} {dtype:?}: relative L2 error vs transformers {rel:.2e}, max error vs cpu {abs:.2e}");
        }
    }
}

/// The steering fixtures (transformers with forward hooks) on wgpu: last logits within 1e-4 and
/// steered greedy ids; then probes and captures on wgpu against the CPU.
#[test]
fn tiny_steering_probes_and_captures_match() {
    let Some(b) = backend() else { return };
    for name in TINY {
        let dir = fixtures().join(name);
        let f = ModelFiles::open(&dir).unwrap();
        let e = Engine::new(b.clone(), f.config.clone(), &f.tensors, 256).unwrap();
        let r = json(&dir.join("reference.json"));
        let rows = vector_rows(&dir.join("test_vector.safetensors"));
        let ids = u32s(&r["ids"]);
        for case in r["steering"].as_array().unwrap() {
            let what = format!("{name}/{}", case["case"].as_str().unwrap());
            let st = plan_from(&case["ops"], &rows);
            let mut c = e.new_cache(1, ids.len()).unwrap();
            let input = SeqInput { slot: 0, tokens: &ids, prompt: true, steering: Some(&st), ..Default::default() };
            let got = e.forward(&mut c, &[input], false).unwrap().last(0).to_vec();
            let err = got.iter().zip(f32s(&case["logits_last"])).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 1e-4, "{what}: last logits max error {err}");
            let want = u32s(&case["greedy_16_no_eos"]);
            let mut req = GenRequest::greedy(ids.clone(), want.len());
            req.ignore_eos = true;
            req.steering = Some(Arc::new(st));
            let out = e.generate(&[req], &mut |_, _| {}).unwrap();
            assert_greedy_prefix(&out[0].ids(), &want, &f32s(&case["greedy_16_margins"]), 1e-4, &what);
        }
    }
    // Probes at every index and a capture, with a clamp in between, on a ragged two-sequence batch.
    let dir = fixtures().join("tiny-qwen2");
    let f = ModelFiles::open(&dir).unwrap();
    let rows = vector_rows(&dir.join("test_vector.safetensors"));
    let ids = u32s(&json(&dir.join("reference.json"))["ids"]);
    let n = f.config.n_layers;
    let st = SeqSteering {
        sources: Vec::new(),
        plan: SteeringPlan {
            ops: vec![SteerOp {
                kind: SteerKind::Clamp,
                layer: 2,
                vector: rows[2].clone(),
                coeff: 1.5,
                positions: Positions::All,
                when: None,
            }],
        },
        probes: (0..=n).map(|l| Probe { name: format!("p{l}"), layer: l, vector: rows[l].clone() }).collect(),
    };
    let run = |e: &dyn Fn(&[SeqInput]) -> persona::engine::ForwardOutput| {
        let a = SeqInput { slot: 0, tokens: &ids[..5], prompt: true, steering: Some(&st), ..Default::default() };
        let bq = SeqInput {
            slot: 1,
            tokens: &ids,
            prompt: true,
            steering: Some(&st),
            capture: Some(persona::steer::Capture { from: 3 }),
            ..Default::default()
        };
        e(&[a, bq])
    };
    let eg = Engine::new(b.clone(), f.config.clone(), &f.tensors, 256).unwrap();
    let ec = Engine::new(CpuBackend, f.config.clone(), &f.tensors, 256).unwrap();
    let g = run(&|s| eg.forward(&mut eg.new_cache(2, 64).unwrap(), s, false).unwrap());
    let c = run(&|s| ec.forward(&mut ec.new_cache(2, 64).unwrap(), s, false).unwrap());
    for i in 0..2 {
        assert!(!c.projections[i].is_empty());
        assert!(max_rel(&g.projections[i], &c.projections[i]) < 1e-5, "projections of sequence {i}");
    }
    let (gs, gn) = g.captures[1].clone().unwrap();
    let (cs, cn) = c.captures[1].clone().unwrap();
    assert_eq!(gn, cn);
    assert!(max_rel(&gs, &cs) < 1e-5, "capture sums");
    assert!(g.captures[0].is_none());
    assert!(max_rel(&g.logits, &c.logits) < 1e-5);
}

/// A ragged batch gives each sequence (nearly) the logits it gets alone; decode continues each slot.
#[test]
fn ragged_batch_matches_single_sequences() {
    let Some(b) = backend() else { return };
    let dir = fixtures().join("tiny-llama");
    let f = ModelFiles::open(&dir).unwrap();
    let e = Engine::new(b, f.config.clone(), &f.tensors, 256).unwrap();
    let ids = u32s(&json(&dir.join("reference.json"))["ids"]);
    check_ragged_batch(&e, &ids[..7], &ids[2..], |x, y| max_rel(x, y) < 1e-5);
}

/// Out-of-range ids, positions, slots, shapes and plans are errors that say what is wrong; an
/// adapter short of a limit is refused with the limit's name.
#[test]
fn bad_input_is_an_error_not_a_panic() {
    let l = wgpu::Limits { max_storage_buffers_per_shader_stage: 4, ..Default::default() };
    let msg = check_limits("tiny", &l).unwrap_err().to_string();
    assert!(msg.contains("max_storage_buffers_per_shader_stage is 4") && msg.contains("backend wgpu"), "{msg}");
    let l = wgpu::Limits { max_storage_buffer_binding_size: 1 << 20, ..Default::default() };
    let msg = check_limits("tiny", &l).unwrap_err().to_string();
    assert!(msg.contains("max_storage_buffer_binding_size"), "{msg}");
    assert!(check_limits("webgpu defaults", &wgpu::Limits::default()).is_ok());
    let Some(b) = backend() else { return };
    let msg = WgpuBackend::with_adapter_filter("no such adapter anywhere").err().unwrap().to_string();
    assert!(msg.contains("no such adapter anywhere") && msg.contains("adapters found"), "{msg}");

    let table = b.upload(&HostTensor::from_f32("emb", vec![10, 4], vec![0.5; 40])).unwrap();
    let mut out = b.alloc(8).unwrap();
    let msg = b.embed(&table, &[1, 10], 4, &mut out).unwrap_err().to_string();
    assert!(msg.contains("token id 10") && msg.contains("10 rows"), "{msg}");
    let x = b.alloc(4).unwrap();
    let msg = b.matmul(&x, &table, None, 2, &mut out).unwrap_err().to_string();
    assert!(msg.contains("matmul input"), "{msg}");
    let mut rope = b.alloc(12).unwrap();
    b.write(&mut rope, &[1.0; 12]).unwrap();
    let pages = PageTable::contiguous(2, 1, 4);
    let layout = b.layout(&[TokenPos { slot: 0, pos: 3 }], &pages).unwrap();
    let mut q = b.alloc(8).unwrap();
    let msg = b.rope(&mut q, &rope, &layout, 1, 2, 4).unwrap_err().to_string();
    assert!(msg.contains("position 3") && msg.contains("RoPE table"), "{msg}");
    let s = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 4 };
    // One page of 4 positions: slot 1's page (page 1) is beyond it.
    let mut cache = KvLayer::<WgpuBackend> { k: b.alloc(16).unwrap(), v: b.alloc(16).unwrap() };
    let (k, v) = (b.alloc(4).unwrap(), b.alloc(4).unwrap());
    let far = b.layout(&[TokenPos { slot: 1, pos: 0 }], &pages).unwrap();
    let msg = b.attention(&q, &k, &v, &mut cache, &far, 1, s, &mut out).unwrap_err().to_string();
    assert!(msg.contains("2 KV pages") && msg.contains("cache has 1"), "{msg}");
    let msg = b.layout(&[TokenPos { slot: 2, pos: 0 }], &pages).err().unwrap().to_string();
    assert!(msg.contains("slot 2") && msg.contains("outside the KV cache"), "{msg}");
    let holes = PageTable { page_size: 4, width: 2, table: vec![0, persona::backend::NO_PAGE] };
    let msg = b.layout(&[TokenPos { slot: 0, pos: 5 }], &holes).err().unwrap().to_string();
    assert!(msg.contains("no KV page") && msg.contains("from 4"), "{msg}");
    let msg = b.gather_rows(&x, &[1], 4, &mut out).unwrap_err().to_string();
    assert!(msg.contains("row 1"), "{msg}");
    let msg = b.read(&x, 5).unwrap_err().to_string();
    assert!(msg.contains("read of 5"), "{msg}");
    let (mut plan, _) = persona::backend::check::sample_plan(3, 4, 2, 1);
    let mut small = b.vectors(2, 4).unwrap();
    let mut dp = b.plan(&plan).unwrap();
    let norm = b.upload(&persona::model::tensor::HostTensor::from_f32("n", vec![4], vec![1.0; 4])).unwrap();
    let (mut h3, mut x3) = (b.alloc(12).unwrap(), b.alloc(12).unwrap());
    let msg = b
        .residual_steer_norm(&mut h3, None, Some((&mut dp, &small, 1)), &norm, 1e-5, 3, 4, &mut x3)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("indexes 4 vectors") && msg.contains("holds 2"), "{msg}");
    let msg = b.write_vectors(&mut small, 1, &[0.0; 8], &[0.0; 8]).unwrap_err().to_string();
    assert!(msg.contains("at row 1 of a vector table of 2"), "{msg}");
    plan.ops[0].vec = 99;
    let msg = b.plan(&plan).err().unwrap().to_string();
    assert!(msg.contains("residual plan") && msg.contains("vector 99 of 4"), "{msg}");
    plan.ops[0].vec = 0;
    plan.probes[0].seq = 1;
    let msg = b.plan(&plan).err().unwrap().to_string();
    assert!(msg.contains("probe 0 of sequence 1 is in sequence 0's range"), "{msg}");
    // The device is still usable after refused calls.
    let mut y = b.alloc(4).unwrap();
    b.write(&mut y, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(b.read(&y, 4).unwrap(), [1.0, 2.0, 3.0, 4.0]);
}

/// The default model (SmolLM2-135M Q4_1, dequantized to f32) on the adapter: transformers'
/// greedy ids up to the first low-margin step. lavapipe needs ~15 s to prefill a prompt and ~2 s
/// per decode step, so by default two prompts run as one ragged batch for 8 steps (about a
/// minute); PERSONA_WGPU_FULL=1 runs every fixture prompt for all 24 steps. Skips when the
/// model is not cached.
#[test]
fn default_model_greedy_ids() {
    let Some(b) = backend() else { return };
    let Some(path) = common::required_default_model() else { return };
    let full = std::env::var("PERSONA_WGPU_FULL").is_ok_and(|v| v == "1");
    let (n_prompts, steps) = if full { (usize::MAX, 24) } else { (2, 8) };
    let t0 = std::time::Instant::now();
    let m = LoadedModel::load(&path, b, 512).unwrap();
    let r = json(&fixtures().join("smollm2_reference.json"));
    let prompts: Vec<&serde_json::Value> = r["prompts"].as_array().unwrap().iter().take(n_prompts).collect();
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .map(|p| {
            let mut q = GenRequest::greedy(u32s(&p["ids"]), steps);
            q.ignore_eos = true;
            q
        })
        .collect();
    let out = m.engine.generate(&reqs, &mut |_, _| {}).unwrap();
    for (pi, p) in prompts.iter().enumerate() {
        let want = u32s(&p["greedy_24_no_eos"]);
        let margins = f32s(&p["greedy_24_margins"]);
        assert_greedy_prefix(&out[pi].ids(), &want[..steps], &margins[..steps], 2e-3, &format!("prompt {pi}"));
    }
    eprintln!("default model on wgpu: {} prompts × {steps} tokens in {:.1} s", reqs.len(), t0.elapsed().as_secs_f64());
}
