//! The tiny random-weight models of ../shared/fixtures (HF transformers, fp32, eager) against
//! the CPU reference backend: full logits, residual norms, greedy ids.

mod common;
use common::*;

use persona::backend::cpu::CpuBackend;
use persona::engine::generate::GenRequest;
use persona::engine::{Engine, SeqInput};
use persona::model::ModelFiles;

const MODELS: [&str; 3] = ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2"];

fn load(name: &str) -> (Engine<CpuBackend>, serde_json::Value) {
    let dir = fixtures().join(name);
    let files = ModelFiles::open(&dir).unwrap();
    let engine = Engine::new(CpuBackend, files.config.clone(), &files.tensors, 256).unwrap();
    (engine, json(&dir.join("reference.json")))
}

#[test]
fn logits_and_residual_norms_match_transformers() {
    for name in MODELS {
        let (e, r) = load(name);
        let ids = u32s(&r["ids"]);
        let mut cache = e.new_cache(1, ids.len()).unwrap();
        let out = e
            .forward(
                &mut cache,
                &[SeqInput { slot: 0, tokens: &ids, logits_from: Some(0), ..Default::default() }],
                true,
            )
            .unwrap();
        let want = r["logits"].as_array().unwrap();
        assert_eq!(want.len(), ids.len());
        let mut max_err = 0f32;
        for (t, row) in want.iter().enumerate() {
            for (a, b) in out.row(t).iter().zip(f32s(row)) {
                max_err = max_err.max((a - b).abs());
            }
        }
        assert!(max_err <= 1e-4, "{name}: max |logit error| {max_err}");
        let norms = r["residual_norms"].as_array().unwrap();
        assert_eq!(norms.len(), e.config.n_layers + 1);
        let hsz = e.config.hidden;
        for (l, per_tok) in norms.iter().enumerate() {
            for (t, want) in f32s(per_tok).iter().enumerate() {
                let h = &out.residuals[l][t * hsz..(t + 1) * hsz];
                let got = h.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
                assert!(
                    (got - want).abs() <= 1e-4 * want.max(1.0),
                    "{name}: |h| at index {l} token {t}: {got} vs {want}"
                );
            }
        }
        eprintln!("{name}: max logit error {max_err:.2e}");
    }
}

#[test]
fn greedy_matches_transformers() {
    for name in MODELS {
        let (e, r) = load(name);
        let ids = u32s(&r["ids"]);
        let want = u32s(&r["greedy_16_no_eos"]);
        let margins = f32s(&r["greedy_16_margins"]);
        let mut req = GenRequest::greedy(ids, want.len());
        req.ignore_eos = true;
        let got = e.generate(&[req], &mut |_, _| {}).unwrap().remove(0).ids();
        assert_greedy_prefix(&got, &want, &margins, 1e-4, name);
    }
}

/// A ragged batch gives each sequence the same logits as running it alone.
#[test]
fn ragged_batch_equals_single_sequences() {
    let (e, r) = load("tiny-qwen2");
    let ids = u32s(&r["ids"]);
    let a = &ids[..7];
    let b = &ids[3..];
    let single = |toks: &[u32]| {
        let mut c = e.new_cache(1, 64).unwrap();
        e.forward(&mut c, &[SeqInput { slot: 0, tokens: toks, logits_from: Some(0), ..Default::default() }], false)
            .unwrap()
    };
    let (sa, sb) = (single(a), single(b));
    let mut c = e.new_cache(3, 64).unwrap();
    let both = e
        .forward(
            &mut c,
            &[
                SeqInput { slot: 2, tokens: b, logits_from: Some(0), ..Default::default() },
                SeqInput { slot: 0, tokens: a, logits_from: Some(0), ..Default::default() },
            ],
            false,
        )
        .unwrap();
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
    for t in 0..b.len() {
        assert!(close(both.row(both.rows[0].start + t), sb.row(t)), "seq b token {t}");
    }
    for t in 0..a.len() {
        assert!(close(both.row(both.rows[1].start + t), sa.row(t)), "seq a token {t}");
    }
    // Decode continues each slot from its own cache.
    let step = e
        .forward(
            &mut c,
            &[
                SeqInput { slot: 0, tokens: &[5], ..Default::default() },
                SeqInput { slot: 2, tokens: &[9], ..Default::default() },
            ],
            false,
        )
        .unwrap();
    let mut a5 = a.to_vec();
    a5.push(5);
    let ref_a = single(&a5);
    assert!(close(step.last(0), ref_a.row(a5.len() - 1)));
}

#[test]
fn bad_forward_inputs_are_errors() {
    let (e, _) = load("tiny-llama");
    let mut c = e.new_cache(1, 8).unwrap();
    let err = e.forward(&mut c, &[SeqInput { slot: 0, tokens: &[300], ..Default::default() }], false).unwrap_err();
    assert!(err.to_string().contains("out of vocabulary"), "{err}");
    let err = e.forward(&mut c, &[SeqInput { slot: 1, tokens: &[3], ..Default::default() }], false).unwrap_err();
    assert!(err.to_string().contains("slot 1"), "{err}");
    let err = e.forward(&mut c, &[SeqInput { slot: 0, tokens: &[3; 9], ..Default::default() }], false).unwrap_err();
    assert!(err.to_string().contains("capacity"), "{err}");
    let err = e.generate(&[GenRequest::greedy(vec![3], 0)], &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("max tokens"), "{err}");
}
