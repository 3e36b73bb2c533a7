//! Steering and monitoring against HF transformers goldens (forward hooks, as the paper's code
//! steers), and the properties of the fused residual op.

mod common;
use common::*;

use std::sync::Arc;

use persona::backend::cpu::CpuBackend;
use persona::engine::generate::GenRequest;
use persona::engine::{Engine, SeqInput};
use persona::model::ModelFiles;
use persona::steer::{Cmp, Condition, Positions, Probe, SeqSteering, SteerKind, SteerOp, SteeringPlan};
use persona::LoadedModel;

fn steered(ids: &[u32], n: usize, st: &SeqSteering) -> GenRequest {
    let mut r = GenRequest::greedy(ids.to_vec(), n);
    r.ignore_eos = true;
    r.top_logits = 0;
    r.steering = Some(Arc::new(st.clone()));
    r
}

/// Logits at the last prompt position under a plan (prefill = prompt tokens).
fn last_logits<B: persona::backend::Backend>(e: &Engine<B>, ids: &[u32], st: Option<&SeqSteering>) -> Vec<f32> {
    let mut c = e.new_cache(1, ids.len()).unwrap();
    let input = SeqInput { slot: 0, tokens: ids, prompt: true, steering: st, ..Default::default() };
    e.forward(&mut c, &[input], false).unwrap().last(0).to_vec()
}

#[test]
fn tiny_models_steering_cases_match_transformers() {
    for name in ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2"] {
        let dir = fixtures().join(name);
        let f = ModelFiles::open(&dir).unwrap();
        let e = Engine::new(CpuBackend, f.config.clone(), &f.tensors, 256).unwrap();
        let r = json(&dir.join("reference.json"));
        let rows = vector_rows(&dir.join("test_vector.safetensors"));
        let ids = u32s(&r["ids"]);
        for case in r["steering"].as_array().unwrap() {
            let what = format!("{name}/{}", case["case"].as_str().unwrap());
            let st = plan_from(&case["ops"], &rows);
            let got = last_logits(&e, &ids, Some(&st));
            let err = got.iter().zip(f32s(&case["logits_last"])).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 1e-4, "{what}: last logits max error {err}");
            let want = u32s(&case["greedy_16_no_eos"]);
            let out = e.generate(&[steered(&ids, want.len(), &st)], &mut |_, _| {}).unwrap();
            assert_greedy_prefix(&out[0].ids(), &want, &f32s(&case["greedy_16_margins"]), 1e-4, &what);
        }
    }
}

fn smollm2() -> Option<LoadedModel<CpuBackend>> {
    let path = required_default_model()?;
    Some(LoadedModel::load(&path, CpuBackend, 512).unwrap())
}

#[test]
fn smollm2_steering_and_monitor_match_transformers() {
    let Some(m) = smollm2() else { return };
    let e = &m.engine;
    let r = json(&fixtures().join("smollm2_reference.json"));
    let rows = vector_rows(&fixtures().join("smollm2_extracted_vector.safetensors"));
    let prompts = r["prompts"].as_array().unwrap();
    for case in r["steering"].as_array().unwrap() {
        let pi = case["prompt_index"].as_u64().unwrap() as usize;
        let what = format!("{} (prompt {pi})", case["case"].as_str().unwrap());
        let ids = u32s(&prompts[pi]["ids"]);
        let st = plan_from(&case["ops"], &rows);
        let got = last_logits(e, &ids, Some(&st));
        let top = &case["last_logits_top20"];
        let err = u32s(&top["ids"])
            .iter()
            .zip(f32s(&top["values"]))
            .map(|(&i, v)| (got[i as usize] - v).abs())
            .fold(0f32, f32::max);
        assert!(err <= 2e-3, "{what}: top-20 logit error {err}");
        let want = u32s(&case["greedy_24_no_eos"]);
        let out = e.generate(&[steered(&ids, want.len(), &st)], &mut |_, _| {}).unwrap();
        assert_greedy_prefix(&out[0].ids(), &want, &f32s(&case["greedy_24_margins"]), 2e-3, &what);
    }
    // Monitor: last-prompt-token projection onto unit vector[L], L = 1..=N.
    let mon = &r["monitor"];
    let ids = u32s(&prompts[mon["prompt_index"].as_u64().unwrap() as usize]["ids"]);
    let probes =
        (1..=e.config.n_layers).map(|l| Probe { name: format!("v{l}"), layer: l, vector: rows[l].clone() }).collect();
    let st = SeqSteering { sources: Vec::new(), plan: SteeringPlan::default(), probes };
    let mut req = GenRequest::greedy(ids.clone(), 1);
    req.steering = Some(Arc::new(st));
    let out = e.generate(&[req], &mut |_, _| {}).unwrap().remove(0);
    for (k, want) in f32s(&mon["last_prompt_token_projection"]).iter().enumerate() {
        let got = out.last_prompt_projection(k);
        assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "monitor layer {}: {got} vs {want}", k + 1);
    }
}

fn tiny() -> (Engine<CpuBackend>, Vec<u32>, Vec<Arc<[f32]>>) {
    let dir = fixtures().join("tiny-qwen2");
    let f = ModelFiles::open(&dir).unwrap();
    let e = Engine::new(CpuBackend, f.config.clone(), &f.tensors, 256).unwrap();
    let r = json(&dir.join("reference.json"));
    (e, u32s(&r["ids"]), vector_rows(&dir.join("test_vector.safetensors")))
}

fn op(kind: SteerKind, layer: usize, v: &Arc<[f32]>, coeff: f32) -> SteerOp {
    SteerOp { kind, layer, vector: v.clone(), coeff, positions: Positions::All, when: None }
}

#[test]
fn zero_coefficient_is_bit_identical_to_no_plan() {
    let (e, ids, rows) = tiny();
    let plain = last_logits(&e, &ids, None);
    let ops = (0..=e.config.n_layers).map(|l| op(SteerKind::Add, l, &rows[l], 0.0)).collect();
    let st = SeqSteering { sources: Vec::new(), plan: SteeringPlan { ops }, probes: vec![] };
    assert!(plain == last_logits(&e, &ids, Some(&st)));
    let empty = SeqSteering::default();
    assert!(plain == last_logits(&e, &ids, Some(&empty)));
}

/// With a probe on the steered layer: after ablate the projection is ~0, after clamp c it is c;
/// and a probe equals the dot product of the traced residual with the unit vector.
#[test]
fn ablate_and_clamp_set_the_projection_and_probes_are_dot_products() {
    let (e, ids, rows) = tiny();
    let l = 2;
    let probe = vec![Probe { name: "p".into(), layer: l, vector: rows[l].clone() }];
    for (kind, c, want) in
        [(SteerKind::Ablate, 0.0, 0.0), (SteerKind::Clamp, 3.25, 3.25), (SteerKind::Clamp, -1.5, -1.5)]
    {
        let st = SeqSteering {
            sources: Vec::new(),
            plan: SteeringPlan { ops: vec![op(kind, l, &rows[l], c)] },
            probes: probe.clone(),
        };
        let mut cache = e.new_cache(1, ids.len()).unwrap();
        let input = SeqInput { slot: 0, tokens: &ids, prompt: true, steering: Some(&st), ..Default::default() };
        let out = e.forward(&mut cache, &[input], true).unwrap();
        let u: Vec<f64> = {
            let n = rows[l].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            rows[l].iter().map(|&x| x as f64 / n).collect()
        };
        let h = e.config.hidden;
        for (t, &p) in out.projections[0].iter().enumerate() {
            assert!((p - want).abs() < 1e-4, "{kind:?}: token {t} projection {p}, want {want}");
            let dot: f64 = out.residuals[l][t * h..(t + 1) * h].iter().zip(&u).map(|(&a, &b)| a as f64 * b).sum();
            assert!((dot as f32 - p).abs() < 1e-4, "probe {p} vs dot {dot}");
        }
    }
}

/// A batch where every sequence has its own plan gives each exactly what it gets alone.
#[test]
fn mixed_plans_in_one_batch_equal_each_alone() {
    let (e, ids, rows) = tiny();
    let plans = [
        SeqSteering {
            sources: Vec::new(),
            plan: SteeringPlan { ops: vec![op(SteerKind::Add, 1, &rows[1], 2.0)] },
            probes: vec![],
        },
        SeqSteering::default(),
        SeqSteering {
            sources: Vec::new(),
            plan: SteeringPlan {
                ops: vec![op(SteerKind::Clamp, 3, &rows[3], -1.0), op(SteerKind::Ablate, 2, &rows[2], 0.0)],
            },
            probes: vec![Probe { name: "q".into(), layer: 3, vector: rows[3].clone() }],
        },
    ];
    let reqs: Vec<GenRequest> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = steered(&ids[i..], 6, p);
            r.capture_response = i == 2;
            r
        })
        .collect();
    let batch = e.generate(&reqs, &mut |_, _| {}).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone = e.generate(std::slice::from_ref(r), &mut |_, _| {}).unwrap().remove(0);
        assert_eq!(batch[i].ids(), alone.ids(), "sequence {i}");
        assert_eq!(batch[i].projections, alone.projections, "sequence {i}");
        assert_eq!(batch[i].response_mean, alone.response_mean, "sequence {i}");
    }
    // Projections: every prompt token then every generated token.
    assert_eq!(batch[2].projections[0].len(), ids.len() - 2 + 6);
}

/// Steering vectors go to the device once per sequence, not once per forward call: decode steps
/// after the first upload no vector, and a later sequence reuses the rows of a finished one.
#[test]
fn vectors_are_uploaded_once_per_sequence_not_per_step() {
    let (e, ids, rows) = tiny();
    let mut cache = e.new_cache(2, ids.len() + 16).unwrap();
    let plan = |a: &Arc<[f32]>, b: &Arc<[f32]>| SeqSteering {
        sources: Vec::new(),
        plan: SteeringPlan { ops: vec![op(SteerKind::Add, 1, a, 1.0), op(SteerKind::Clamp, 3, b, 0.5)] },
        probes: vec![Probe { name: "p".into(), layer: 3, vector: b.clone() }],
    };
    let first = plan(&rows[1], &rows[3]);
    let input = SeqInput { slot: 0, tokens: &ids, prompt: true, steering: Some(&first), ..Default::default() };
    let out = e.forward(&mut cache, &[input], false).unwrap();
    assert_eq!(cache.vector_rows_written(), 2, "two distinct vectors (the probe shares the clamp's)");
    let mut next =
        vec![out.last(0).iter().enumerate().fold(0, |m, (i, &x)| if x > out.last(0)[m] { i } else { m }) as u32];
    for _ in 0..8 {
        let input = SeqInput { slot: 0, tokens: &next, steering: Some(&first), ..Default::default() };
        let out = e.forward(&mut cache, &[input], false).unwrap();
        assert_eq!(out.projections[0].len(), 1);
        next[0] = (next[0] + 1) % e.config.vocab as u32;
    }
    assert_eq!(cache.vector_rows_written(), 2, "decode steps upload no vector");
    // A second sequence with its own copies of the vectors: two more rows, and both run together.
    let copy = |v: &Arc<[f32]>| -> Arc<[f32]> { v.to_vec().into() };
    let second = plan(&copy(&rows[2]), &copy(&rows[3]));
    let inputs = [
        SeqInput { slot: 0, tokens: &next, steering: Some(&first), ..Default::default() },
        SeqInput { slot: 1, tokens: &ids, prompt: true, steering: Some(&second), ..Default::default() },
    ];
    let out = e.forward(&mut cache, &inputs, false).unwrap();
    assert_eq!((out.projections[0].len(), out.projections[1].len()), (1, ids.len()));
    assert_eq!(cache.vector_rows_written(), 4);
    // The first sequence ends; a third one with new vectors in the same cache equals it alone.
    drop(first);
    cache.reset(0);
    let third = plan(&copy(&rows[1]), &copy(&rows[2]));
    let input = SeqInput { slot: 0, tokens: &ids, prompt: true, steering: Some(&third), ..Default::default() };
    let alone = {
        let mut c = e.new_cache(1, ids.len()).unwrap();
        e.forward(&mut c, std::slice::from_ref(&input), false).unwrap()
    };
    let out = e.forward(&mut cache, &[input], false).unwrap();
    assert_eq!(cache.vector_rows_written(), 6);
    assert_eq!(out.logits, alone.logits, "reused rows hold the new vectors");
    assert_eq!(out.projections, alone.projections);
}

/// Conditional steering: the op applies only where the condition's projection passes.
#[test]
fn conditional_steering_applies_only_where_the_condition_holds() {
    let (e, ids, rows) = tiny();
    let l = 2;
    let probe = vec![Probe { name: "p".into(), layer: l, vector: rows[l].clone() }];
    let base = SeqSteering { sources: Vec::new(), plan: SteeringPlan::default(), probes: probe.clone() };
    let run = |st: &SeqSteering| {
        let mut c = e.new_cache(1, ids.len()).unwrap();
        let input = SeqInput { slot: 0, tokens: &ids, prompt: true, steering: Some(st), ..Default::default() };
        e.forward(&mut c, &[input], false).unwrap().projections[0].clone()
    };
    let before = run(&base);
    let mut sorted = before.clone();
    sorted.sort_by(f32::total_cmp);
    let tau = sorted[sorted.len() / 2];
    let mut clamp = op(SteerKind::Clamp, l, &rows[l], 100.0);
    clamp.when = Some(Condition { vector: rows[l].clone(), layer: l, cmp: Cmp::Gt, threshold: tau });
    let after = run(&SeqSteering { sources: Vec::new(), plan: SteeringPlan { ops: vec![clamp] }, probes: probe });
    for (b, a) in before.iter().zip(&after) {
        if *b > tau {
            assert!((a - 100.0).abs() < 1e-3, "clamped token: {a}");
        } else {
            assert_eq!(a, b, "untouched token");
        }
    }
}

#[test]
fn bad_plans_are_errors_that_name_the_problem() {
    let (e, ids, rows) = tiny();
    let bad = |st: SeqSteering| {
        let mut c = e.new_cache(1, ids.len()).unwrap();
        let input = SeqInput { slot: 0, tokens: &ids, steering: Some(&st), ..Default::default() };
        e.forward(&mut c, &[input], false).err().unwrap().to_string()
    };
    let one = |o: SteerOp| SeqSteering { sources: Vec::new(), plan: SteeringPlan { ops: vec![o] }, probes: vec![] };
    let msg = bad(one(op(SteerKind::Add, 9, &rows[1], 1.0)));
    assert!(msg.contains("layer 9") && msg.contains("out of range"), "{msg}");
    let msg = bad(one(op(SteerKind::Add, 1, &rows[1], f32::NAN)));
    assert!(msg.contains("coefficient"), "{msg}");
    let short: Arc<[f32]> = Arc::from(vec![1.0f32; 5]);
    let msg = bad(one(op(SteerKind::Add, 1, &short, 1.0)));
    assert!(msg.contains("hidden size"), "{msg}");
    let zero: Arc<[f32]> = Arc::from(vec![0.0f32; rows[1].len()]);
    let msg = bad(one(op(SteerKind::Ablate, 1, &zero, 0.0)));
    assert!(msg.contains("all zero"), "{msg}");
}

fn persona_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persona")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `persona generate --steer ... --monitor ... --json` reproduces the fixture's steered greedy ids
/// and reports one projection per prompt token then per generated token.
#[test]
fn cli_steer_and_monitor() {
    let dir = fixtures().join("tiny-llama");
    let r = json(&dir.join("reference.json"));
    let case = r["steering"].as_array().unwrap().iter().find(|c| c["case"] == "add").unwrap();
    let ids: Vec<String> = u32s(&r["ids"]).iter().map(|i| i.to_string()).collect();
    let vec = dir.join("test_vector.safetensors");
    let (m, v) = (dir.to_str().unwrap(), vec.to_str().unwrap());
    let steer = format!("vector={v},layer=2,coeff=1.5,op=add,positions=all");
    let monitor = format!("vector={v},layers=1-3,name=tv");
    let (ok, out, err) = persona_cli(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--steer",
        &steer,
        "--monitor",
        &monitor,
        "--json",
    ]);
    assert!(ok, "{err}");
    let o: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want = u32s(&case["greedy_16_no_eos"]);
    assert_greedy_prefix(&u32s(&o["ids"]), &want[..8], &f32s(&case["greedy_16_margins"])[..8], 1e-4, "cli add");
    for l in ["1", "2", "3"] {
        let p = o["projections"]["tv"][l].as_array().unwrap();
        assert_eq!(p.len(), ids.len() + 8, "layer {l}");
        let s = &o["scores"]["tv"][l];
        assert_eq!(s["last_prompt"], p[ids.len() - 1]);
    }
    // Malformed specs and vectors for another model are refused with a message naming the part.
    let bad = |spec: &str, flag: &str| persona_cli(&["generate", "--model", m, "--prompt-ids", "1,2", flag, spec]);
    let (ok, _, err) = bad(&format!("vector={v},layer=2,coeff=1,op=boost"), "--steer");
    assert!(!ok && err.contains("unknown op `boost`"), "{err}");
    let (ok, _, err) = bad(&format!("vector={v},layer=7,coeff=1"), "--steer");
    assert!(!ok && err.contains("layer 7"), "{err}");
    let (ok, _, err) = bad(&format!("vector={v},layer=2,coeff=NaN"), "--steer");
    assert!(!ok && err.contains("`coeff` must be a finite number") && err.contains("got `NaN`"), "{err}");
    let other = fixtures().join("tiny-qwen2/test_vector.safetensors");
    let (ok, _, err) = bad(&format!("vector={},layers=all", other.display()), "--monitor");
    assert!(!ok && err.contains("the model has N=3, H=64"), "{err}");
    let (ok, _, err) = bad(&format!("vector={v},layer=2,coeff=1,when=nobody>1"), "--steer");
    assert!(!ok && err.contains("no monitor named `nobody`"), "{err}");
}

/// Answer-token mean residuals captured inside the forward pass reproduce the fixture's extracted
/// vector: mean over pairs of (enthusiastic − flat) answer means, at every index 0..=N.
#[test]
fn capture_reproduces_the_reference_extraction() {
    let Some(m) = smollm2() else { return };
    let e = &m.engine;
    let x = &json(&fixtures().join("smollm2_reference.json"))["extraction"];
    let want = vector_rows(&fixtures().join("smollm2_extracted_vector.safetensors"));
    let (n1, h) = (e.config.n_layers + 1, e.config.hidden);
    let mut diff = vec![0f64; n1 * h];
    let pairs = x["pairs"].as_array().unwrap();
    for (pi, p) in pairs.iter().enumerate() {
        for (side, sign) in [("pos", 1.0), ("neg", -1.0)] {
            let msgs = [
                persona::model::Message::system(x[format!("{side}_system")].as_str().unwrap()),
                persona::model::Message::user(p["question"].as_str().unwrap()),
            ];
            let prompt = m.apply_chat_template(&msgs, true).unwrap();
            let answer = p[format!("{side}_answer")].as_str().unwrap();
            let ids = m.encode(&format!("{prompt}{answer}"), false).unwrap();
            let plen = m.encode(&prompt, false).unwrap().len();
            let counts = u32s(&x["token_counts"][pi + pairs.len() * (sign < 0.0) as usize]);
            assert_eq!([plen as u32, ids.len() as u32], counts[..], "pair {pi} {side}: token counts");
            let mut c = e.new_cache(1, ids.len()).unwrap();
            let input = SeqInput {
                slot: 0,
                tokens: &ids,
                capture: Some(persona::steer::Capture { from: plen }),
                ..Default::default()
            };
            let out = e.forward(&mut c, &[input], false).unwrap();
            let (sum, n) = out.captures[0].clone().unwrap();
            assert_eq!(n, ids.len() - plen);
            for (d, s) in diff.iter_mut().zip(sum) {
                *d += sign * s as f64 / n as f64 / pairs.len() as f64;
            }
        }
    }
    for l in 0..n1 {
        let norm = want[l].iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let err = (0..h).map(|j| (diff[l * h + j] - want[l][j] as f64).abs()).fold(0f64, f64::max);
        assert!(err <= 1e-3 * norm.max(1.0), "index {l}: max error {err} (|v| {norm})");
    }
}

/// `scale=relative`: the coefficient is a fraction of |h_L| from the vector's metadata, warned
/// outside the usable window, refused without the metadata.
#[test]
fn relative_scale_uses_recorded_residual_norms() {
    use persona::steer::spec::{resolve, SteerSpec};
    use persona::steer::vector::PersonaVector;
    let cfg = persona::model::ModelConfig::from_hf_json(&fixtures().join("tiny-llama/config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut v = PersonaVector::load(fixtures().join("tiny-llama/test_vector.safetensors")).unwrap();
    let plain = dir.path().join("plain.safetensors");
    v.save(&plain).unwrap();
    v.metadata.insert("persona.mean_norms".into(), "[1.0, 8.0, 10.0, 12.0]".into());
    let with = dir.path().join("with.safetensors");
    v.save(&with).unwrap();
    let spec = |p: &std::path::Path, c: f32| {
        SteerSpec::parse(&format!("vector={},layer=2,coeff={c},scale=relative", p.display())).unwrap()
    };
    let mut warn = vec![];
    let st = resolve(&[spec(&with, 0.2)], &[], &cfg, &mut warn).unwrap();
    let want = 0.2 * 10.0 / v.norm(2);
    assert!((st.plan.ops[0].coeff - want).abs() < 1e-6, "{} vs {want}", st.plan.ops[0].coeff);
    assert!(warn.is_empty(), "{warn:?}");
    resolve(&[spec(&with, 0.8)], &[], &cfg, &mut warn).unwrap();
    assert!(warn.len() == 1 && warn[0].contains("usable window"), "{warn:?}");
    let err = resolve(&[spec(&plain, 0.2)], &[], &cfg, &mut warn).unwrap_err().to_string();
    assert!(err.contains("persona.mean_norms"), "{err}");
}

/// A teacher-forced pass over prompt + answer steers and probes the answer tokens as generation
/// does: `positions=response` steering reaches them (and `positions=prompt` does not), so the
/// pipelines' log-odds and projections under such plans match what generating would give.
#[test]
fn teacher_forced_answers_are_response_positions() {
    use persona::persona::common::{teacher_force, CaptureRange, Forced};
    let dir = fixtures().join("tiny-llama");
    let f = ModelFiles::open(&dir).unwrap();
    let e = Engine::new(CpuBackend, f.config.clone(), &f.tensors, 256).unwrap();
    let rows = vector_rows(&dir.join("test_vector.safetensors"));
    let ids = u32s(&json(&dir.join("reference.json"))["ids"]);
    let plan = |positions| SeqSteering {
        sources: Vec::new(),
        plan: SteeringPlan {
            ops: vec![SteerOp {
                kind: SteerKind::Add,
                layer: 1,
                vector: Arc::from(&rows[1][..]),
                coeff: 6.0,
                positions,
                when: None,
            }],
        },
        probes: vec![Probe { name: "p".into(), layer: 3, vector: Arc::from(&rows[3][..]) }],
    };
    for positions in [Positions::Response, Positions::Prompt, Positions::All] {
        let st = plan(positions);
        let mut req = steered(&ids, 10, &st);
        req.capture_response = false;
        let out = e.generate(&[req], &mut |_, _| {}).unwrap().remove(0);
        // The generated tokens whose residuals generation saw (all but the last).
        let mut toks = ids.clone();
        toks.extend(&out.ids()[..9]);
        let item = Forced { tokens: toks, answer_start: ids.len() };
        let forced = teacher_force(&e, &[item], Some(&st), CaptureRange::None, true, 1, None).unwrap().remove(0);
        let gen_mean: f32 = out.projections[0][ids.len()..ids.len() + 9].iter().sum::<f32>() / 9.0;
        assert!(
            (forced.answer_proj[0] - gen_mean).abs() < 1e-4,
            "{positions:?}: teacher-forced answer projection {} vs generation {gen_mean}",
            forced.answer_proj[0]
        );
        assert!((forced.last_prompt_proj[0] - out.last_prompt_projection(0)).abs() < 1e-4, "{positions:?}");
    }
}

/// Chunked prefill: a prompt fed over several calls (`more_prompt` on all but the last) gives the
/// same logits, bit for bit, as one prefill, under `positions=prompt`, `response` and `all`.
#[test]
fn chunked_prefill_equals_one_prefill_under_every_positions() {
    let dir = fixtures().join("tiny-qwen2");
    let f = ModelFiles::open(&dir).unwrap();
    let e = Engine::new(CpuBackend, f.config.clone(), &f.tensors, 256).unwrap();
    let rows = vector_rows(&dir.join("test_vector.safetensors"));
    let ids = u32s(&json(&dir.join("reference.json"))["ids"]);
    for positions in [Positions::Prompt, Positions::Response, Positions::All] {
        let st = SeqSteering {
            sources: Vec::new(),
            plan: SteeringPlan {
                ops: vec![SteerOp {
                    kind: SteerKind::Add,
                    layer: 1,
                    vector: Arc::from(&rows[1][..]),
                    coeff: 8.0,
                    positions,
                    when: None,
                }],
            },
            probes: vec![Probe { name: "p".into(), layer: 2, vector: Arc::from(&rows[2][..]) }],
        };
        let whole = last_logits(&e, &ids, Some(&st));
        let mut c = e.new_cache(1, ids.len()).unwrap();
        let mut last = vec![];
        for (k, chunk) in ids.chunks(3).enumerate() {
            let more = (k + 1) * 3 < ids.len();
            let input = SeqInput {
                slot: 0,
                tokens: chunk,
                prompt: true,
                more_prompt: more,
                steering: Some(&st),
                ..Default::default()
            };
            last = e.forward(&mut c, &[input], false).unwrap().last(0).to_vec();
        }
        assert_eq!(last, whole, "{positions:?}");
        if positions == Positions::Response {
            // Without `more_prompt` each chunk's last token would be steered: different logits.
            let mut c = e.new_cache(1, ids.len()).unwrap();
            for chunk in ids.chunks(3) {
                let input =
                    SeqInput { slot: 0, tokens: chunk, prompt: true, steering: Some(&st), ..Default::default() };
                last = e.forward(&mut c, &[input], false).unwrap().last(0).to_vec();
            }
            assert_ne!(last, whole);
        }
    }
}
