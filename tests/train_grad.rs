//! LoRA training against PyTorch + PEFT float64 goldens (fixtures/grad, made outside persona):
//! loss, every LoRA gradient, three AdamW steps, the final adapter and the logits under it, for
//! plain training, add-steering, ablate (CAFT) and two-layer steering; and the invariants
//! (B = 0 ⇒ the training forward is `Engine::forward` bit for bit, α = 0 ≡ no steering, a ragged
//! batch is the sum of its sequences).

mod common;
use common::*;

use std::sync::Arc;

use persona::backend::cpu::{CpuBackend, CpuGemmBackend};
use persona::engine::{Engine, SeqInput};
use persona::model::lora::{LoraAdapter, Target};
use persona::model::ModelFiles;
use persona::steer::{Positions, SeqSteering, SteerKind, SteerOp};
use persona::train::data::Example;
use persona::train::optim::{AdamWConfig, Schedule};
use persona::train::pass::{forward_backward, DeviceLora};
use persona::train::{TrainBackend, TrainOptions, Trainer};

const MODELS: [&str; 3] = ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2"];

struct Case<B: TrainBackend> {
    engine: Engine<B>,
    dir: std::path::PathBuf,
    r: serde_json::Value,
    init: LoraAdapter,
    examples: Vec<Example>,
    vector: Vec<Arc<[f32]>>,
}

fn load<B: TrainBackend>(b: B, name: &str) -> Case<B> {
    let files = ModelFiles::open(&fixtures().join(name)).unwrap();
    let engine = Engine::new(b, files.config.clone(), &files.tensors, 256).unwrap();
    let dir = fixtures().join("grad").join(name);
    let r = json(&dir.join("reference.json"));
    let init = LoraAdapter::load(&dir.join("adapter_init"), &engine.config).unwrap();
    let examples = r["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Example::with_answer_from(u32s(&s["ids"]), s["answer_from"].as_u64().unwrap() as usize).unwrap())
        .collect();
    let vector = vector_rows(&dir.join(r["vector_file"].as_str().unwrap()));
    Case { engine, dir, r, init, examples, vector }
}

fn steering<B: TrainBackend>(c: &Case<B>, ops: &serde_json::Value) -> Option<SeqSteering> {
    let ops = ops.as_array().unwrap();
    if ops.is_empty() {
        return None;
    }
    let mut st = SeqSteering::default();
    for o in ops {
        let layer = o["layer"].as_u64().unwrap() as usize;
        let kind = match o["kind"].as_str().unwrap() {
            "add" => SteerKind::Add,
            "ablate" => SteerKind::Ablate,
            k => panic!("unknown kind {k}"),
        };
        st.plan.ops.push(SteerOp {
            kind,
            layer,
            vector: c.vector[layer].clone(),
            coeff: o["coeff"].as_f64().unwrap() as f32,
            positions: Positions::All,
            when: None,
        });
    }
    Some(st)
}

fn flat(a: &LoraAdapter) -> Vec<(String, Vec<f32>)> {
    let mut out = vec![];
    for (l, layer) in a.layers.iter().enumerate() {
        for t in Target::ALL {
            if let Some(p) = &layer[t.index()] {
                let (ka, kb) = persona::model::lora::peft_keys(l, t);
                out.push((ka, p.a.clone()));
                out.push((kb, p.b.clone()));
            }
        }
    }
    out
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let e: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let n: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    e / n.max(1e-300)
}

/// Every tensor of `got` against the PEFT safetensors file `want` (same keys).
fn assert_tensors(got: &LoraAdapter, want: &std::path::Path, tol: f64, what: &str) {
    let bytes = std::fs::read(want).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = 0f64;
    for (key, g) in flat(got) {
        let t = st.tensor(&key).unwrap_or_else(|e| panic!("{what}: {key}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let w: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let e = nmse(&g, &w);
        assert!(e <= tol, "{what}: {key} NMSE {e:e} > {tol:e}");
        worst = worst.max(e);
    }
    assert_eq!(st.names().len(), flat(got).len(), "{what}: tensor count");
    eprintln!("{what}: worst NMSE {worst:.2e}");
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn options<B: TrainBackend>(c: &Case<B>) -> TrainOptions {
    let o = &c.r["optimizer"];
    let mut opts = TrainOptions::new(c.init.config.clone());
    opts.lr = o["lr"].as_f64().unwrap();
    opts.adamw = AdamWConfig {
        beta1: o["betas"][0].as_f64().unwrap(),
        beta2: o["betas"][1].as_f64().unwrap(),
        eps: o["eps"].as_f64().unwrap(),
        weight_decay: o["weight_decay"].as_f64().unwrap(),
    };
    opts.clip = Some(o["max_grad_norm"].as_f64().unwrap());
    opts.schedule = Schedule::Constant;
    opts.warmup = 0;
    opts.steps = Some(o["steps"].as_u64().unwrap() as usize);
    opts.batch = c.examples.len();
    opts.shuffle = false;
    opts
}

/// On the reference backend and on the GEMM-library one the fine-tuner runs on.
#[test]
fn loss_gradients_and_adamw_match_peft() {
    goldens(CpuBackend);
    goldens(CpuGemmBackend);
}

fn goldens<B: TrainBackend + Clone>(b: B) {
    for name in MODELS {
        let c = load(b.clone(), name);
        assert!((c.init.config.scale() as f64 - c.r["lora"]["scale"].as_f64().unwrap()).abs() < 1e-6);
        for case in c.r["cases"].as_array().unwrap() {
            let what = format!("{}: {name}/{}", c.engine.backend.name(), case["case"].as_str().unwrap());
            let st = steering(&c, &case["ops"]);
            let mut trainer =
                Trainer::new(&c.engine, options(&c), c.init.clone(), c.examples.clone(), vec![], st.clone(), vec![])
                    .unwrap();
            let mut grads = LoraAdapter::zeros(c.init.config.clone(), &c.engine.config);
            let first = trainer.train_step(Some(&mut grads)).unwrap();
            assert_eq!(first.targets as u64, case["answer_tokens"].as_u64().unwrap(), "{what}");
            let want_loss = case["loss"].as_f64().unwrap();
            assert!(rel(first.loss, want_loss) <= 1e-5, "{what}: loss {} vs {want_loss}", first.loss);
            let want_norm = case["grad_norm"].as_f64().unwrap();
            assert!(rel(first.grad_norm, want_norm) <= 1e-4, "{what}: grad norm {} vs {want_norm}", first.grad_norm);
            assert_tensors(&grads, &c.dir.join(case["grads_file"].as_str().unwrap()), 1e-8, &format!("{what} grads"));
            let mut losses = vec![first.loss];
            for _ in 1..3 {
                losses.push(trainer.train_step(None).unwrap().loss);
            }
            for (i, (got, want)) in losses.iter().zip(case["adamw_losses"].as_array().unwrap()).enumerate() {
                let want = want.as_f64().unwrap();
                assert!(rel(*got, want) <= 1e-5, "{what}: AdamW loss {i}: {got} vs {want}");
            }
            let after = trainer.loss_on(&c.examples).unwrap();
            let want_after = case["loss_after_steps"].as_f64().unwrap();
            assert!(rel(after, want_after) <= 1e-5, "{what}: loss after steps {after} vs {want_after}");
            let final_dir = c.dir.join(case["adapter_final"].as_str().unwrap());
            assert_tensors(
                &trainer.adapter,
                &final_dir.join("adapter_model.safetensors"),
                1e-6,
                &format!("{what} final"),
            );
            // Logits of sequence 0 under the final adapter, steering off, through the training forward.
            let lora = DeviceLora::upload(&c.engine.backend, &trainer.adapter).unwrap();
            let logits = training_logits(&c.engine, &lora, &c.examples[0]);
            let want = case["logits_seq0_after_unsteered"].as_array().unwrap();
            let mut worst = 0f32;
            for (t, row) in want.iter().enumerate() {
                for (a, b) in logits[t].iter().zip(f32s(row)) {
                    worst = worst.max((a - b).abs());
                }
            }
            assert!(worst <= 1e-4, "{what}: logits under the final adapter differ by {worst}");
            eprintln!(
                "{what}: loss {:.8} (ref {want_loss:.8}), 3-step losses {losses:?}, logits max err {worst:.1e}",
                first.loss
            );
        }
    }
}

/// All logits rows of one sequence through the training forward (its tape hook adding `lora`).
fn training_logits<B: TrainBackend>(e: &Engine<B>, lora: &DeviceLora<B>, ex: &Example) -> Vec<Vec<f32>> {
    let mut cache = e.new_cache(1, ex.ids.len()).unwrap();
    let seq = [SeqInput { slot: 0, tokens: &ex.ids, logits_from: Some(0), ..Default::default() }];
    let out = persona::train::pass::hooked_forward(e, lora, &mut cache, &seq).unwrap();
    (0..ex.ids.len()).map(|t| out.row(t).to_vec()).collect()
}

/// With B = 0 the training forward's logits are `Engine::forward`'s bit for bit, steered or not.
#[test]
fn zero_b_training_forward_is_the_inference_forward() {
    zero_b(CpuBackend);
    zero_b(CpuGemmBackend);
}

fn zero_b<B: TrainBackend + Clone>(b: B) {
    for name in MODELS {
        let c = load(b.clone(), name);
        let mut zero_b = c.init.clone();
        for p in zero_b.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
            p.b.iter_mut().for_each(|x| *x = 0.0);
        }
        let lora = DeviceLora::upload(&c.engine.backend, &zero_b).unwrap();
        for st in [None, steering(&c, &c.r["cases"][3]["ops"]), steering(&c, &c.r["cases"][2]["ops"])] {
            let ex = &c.examples[2];
            let seq = [SeqInput {
                slot: 0,
                tokens: &ex.ids,
                logits_from: Some(0),
                prompt: true,
                answer_from: Some(5),
                steering: st.as_ref(),
                ..Default::default()
            }];
            let mut cache = c.engine.new_cache(1, ex.ids.len()).unwrap();
            let plain = c.engine.forward(&mut cache, &seq, false).unwrap();
            let mut cache = c.engine.new_cache(1, ex.ids.len()).unwrap();
            let hooked = persona::train::pass::hooked_forward(&c.engine, &lora, &mut cache, &seq).unwrap();
            assert_eq!(
                plain.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                hooked.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{name}: B = 0 training forward differs from Engine::forward"
            );
        }
    }
}

/// α = 0 add-steering gives the unsteered loss and gradients exactly; a batch of three ragged
/// sequences gives the sum of their gradients run one by one.
#[test]
fn zero_coefficient_and_ragged_batch_invariants() {
    let c = load(CpuBackend, "tiny-qwen2");
    let lora = DeviceLora::upload(&c.engine.backend, &c.init).unwrap();
    let refs: Vec<&Example> = c.examples.iter().collect();
    let norm = refs.iter().map(|e| e.n_targets()).sum::<usize>() as f64;
    let run = |refs: &[&Example], st: Option<&SeqSteering>| {
        let mut g = LoraAdapter::zeros(c.init.config.clone(), &c.engine.config);
        let out = forward_backward(&c.engine, &lora, refs, st, &[], norm, Some(&mut g)).unwrap();
        (out.loss_sum, g)
    };
    let (loss, g) = run(&refs, None);
    let mut zero = steering(&c, &c.r["cases"][1]["ops"]).unwrap();
    zero.plan.ops[0].coeff = 0.0;
    let (loss0, g0) = run(&refs, Some(&zero));
    assert_eq!(loss.to_bits(), loss0.to_bits(), "α = 0 changes the loss");
    assert_eq!(flat(&g), flat(&g0), "α = 0 changes the gradients");
    let mut sum = LoraAdapter::zeros(c.init.config.clone(), &c.engine.config);
    let mut loss_parts = 0.0;
    for e in &refs {
        let (l, g1) = run(&[*e], None);
        loss_parts += l;
        for (sp, gp) in sum
            .layers
            .iter_mut()
            .flat_map(|l| l.iter_mut().flatten())
            .zip(g1.layers.iter().flat_map(|l| l.iter().flatten()))
        {
            sp.a.iter_mut().zip(&gp.a).for_each(|(a, b)| *a += b);
            sp.b.iter_mut().zip(&gp.b).for_each(|(a, b)| *a += b);
        }
    }
    assert!(rel(loss, loss_parts) < 1e-6, "batch loss {loss} vs sum of parts {loss_parts}");
    for ((k, a), (_, b)) in flat(&g).iter().zip(flat(&sum)) {
        assert!(nmse(a, &b) < 1e-10, "{k}: batch gradient differs from the sum of its sequences ({:e})", nmse(a, &b));
    }
}

/// Gradient accumulation: three micro-batches of one sequence make the same step as one batch of
/// three (the loss is the mean over the step's answer tokens either way).
#[test]
fn accumulation_equals_one_large_batch() {
    let c = load(CpuBackend, "tiny-llama");
    let step = |batch: usize, accum: usize| {
        let mut o = options(&c);
        o.batch = batch;
        o.accum = accum;
        let mut t = Trainer::new(&c.engine, o, c.init.clone(), c.examples.clone(), vec![], None, vec![]).unwrap();
        let mut g = LoraAdapter::zeros(c.init.config.clone(), &c.engine.config);
        let log = t.train_step(Some(&mut g)).unwrap();
        (log.loss, g, t.adapter)
    };
    let (l1, g1, a1) = step(3, 1);
    let (l3, g3, a3) = step(1, 3);
    assert!(rel(l1, l3) < 1e-6, "loss {l1} vs {l3}");
    for (((k, x), (_, y)), ((_, p), (_, q))) in flat(&g1).iter().zip(flat(&g3)).zip(flat(&a1).iter().zip(flat(&a3))) {
        assert!(nmse(x, &y) < 1e-10, "{k}: accumulated gradient differs ({:e})", nmse(x, &y));
        assert!(nmse(p, &q) < 1e-10, "{k}: parameters after the step differ");
    }
}

/// The adapter saved after training, loaded and merged into the weights (how `--adapter` runs
/// it), gives the training forward's logits.
#[test]
fn saved_adapter_runs_as_trained() {
    for name in MODELS {
        let c = load(CpuBackend, name);
        let mut t =
            Trainer::new(&c.engine, options(&c), c.init.clone(), c.examples.clone(), vec![], None, vec![]).unwrap();
        t.train_step(None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        t.adapter.save(dir.path(), name).unwrap();
        let lora = DeviceLora::upload(&c.engine.backend, &t.adapter).unwrap();
        let trained = training_logits(&c.engine, &lora, &c.examples[1]);
        let mut files = ModelFiles::open(&fixtures().join(name)).unwrap();
        LoraAdapter::load(dir.path(), &files.config).unwrap().merge_into(&mut files.tensors).unwrap();
        let merged = Engine::new(CpuBackend, files.config.clone(), &files.tensors, 256).unwrap();
        let ex = &c.examples[1];
        let mut cache = merged.new_cache(1, ex.ids.len()).unwrap();
        let seq = [SeqInput { slot: 0, tokens: &ex.ids, logits_from: Some(0), ..Default::default() }];
        let out = merged.forward(&mut cache, &seq, false).unwrap();
        let worst = (0..ex.ids.len())
            .flat_map(|r| out.row(r).iter().zip(&trained[r]).map(|(a, b)| (a - b).abs()).collect::<Vec<_>>())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: merged adapter logits differ from the training forward by {worst}");
    }
}
