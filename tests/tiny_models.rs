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
        assert_eq!(out.residuals.len(), e.config.n_layers + 1);
        assert_residual_norms(&out.residuals, &r["residual_norms"], e.config.hidden, 1e-4, name);
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
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
    check_ragged_batch(&e, &ids[..7], &ids[3..], close);
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

/// The paged KV cache: sequences whose pages interleave in a small shared pool (pages of 2
/// positions, handed out as tokens arrive) get exactly the logits they get alone in a cache of
/// their own; a full pool is an error naming it, and reset / truncate return pages to it.
#[test]
fn paged_cache_interleaves_sequences_exactly() {
    let (e, r) = load("tiny-llama3-rope");
    let ids = u32s(&r["ids"]);
    let seqs: [&[u32]; 3] = [&ids[..5], &ids[2..9], &ids[1..4]];
    let alone = |toks: &[u32]| {
        let mut c = e.new_cache(1, 32).unwrap();
        let mut rows = vec![];
        for &t in toks {
            rows.push(e.forward(&mut c, &[SeqInput::new(0, &[t])], false).unwrap().last(0).to_vec());
        }
        rows
    };
    let want: Vec<_> = seqs.iter().map(|s| alone(s)).collect();
    // 9 pages of 2 positions for 3 sequences of up to 32: less than one slot's worth.
    let mut c = e.new_paged_cache(3, 32, 18, 2).unwrap();
    assert_eq!((c.total_pages(), c.free_pages()), (9, 9));
    // Token by token, all three sequences each step, so their pages alternate in the pool.
    for step in 0..9 {
        let toks: Vec<[u32; 1]> = seqs.iter().map(|s| [s.get(step).copied().unwrap_or(0)]).collect();
        let inputs: Vec<SeqInput> =
            (0..3).filter(|&i| step < seqs[i].len()).map(|i| SeqInput::new(i, &toks[i])).collect();
        let out = e.forward(&mut c, &inputs, false).unwrap();
        for (k, inp) in inputs.iter().enumerate() {
            assert_eq!(out.last(k), &want[inp.slot][step][..], "slot {} step {step}", inp.slot);
        }
    }
    // 5 + 7 + 3 positions hold 3 + 4 + 2 pages: all 9.
    assert_eq!(c.free_pages(), 0);
    let err = e.forward(&mut c, &[SeqInput::new(2, &[1, 2])], false).unwrap_err().to_string();
    assert!(err.contains("KV cache is full") && err.contains("0 of 9 are free"), "{err}");
    // A refused call changes nothing: slot 2 continues as if it had not happened.
    c.truncate(1, 4); // 7 → 4 positions: 2 pages back
    assert_eq!((c.len(1), c.free_pages()), (4, 2));
    let out = e.forward(&mut c, &[SeqInput::new(1, &[ids[6]])], false).unwrap();
    assert_eq!(out.last(0), &want[1][4][..]);
    c.reset(0);
    assert_eq!((c.len(0), c.free_pages()), (0, 4));
    let err = e.new_paged_cache(2, 8, 16, 0).err().unwrap().to_string();
    assert!(err.contains("page size"), "{err}");
}

/// `GenRequest::stop`: a request whose flag is set (here by the streaming callback at its third
/// token) ends after that token as `Finish::Stopped`, with the ids it would have produced so far;
/// the other request of the batch runs on to its `max_tokens`.
#[test]
fn stop_flag_ends_one_request_early() {
    use persona::engine::generate::Finish;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (e, r) = load("tiny-llama");
    let ids = u32s(&r["ids"]);
    let req =
        |stop: Option<Arc<AtomicBool>>| GenRequest { ignore_eos: true, stop, ..GenRequest::greedy(ids.clone(), 12) };
    let full = e.generate(&[req(None)], &mut |_, _| {}).unwrap().remove(0);
    assert_eq!((full.steps.len(), full.finish), (12, Finish::Length));
    let stop = Arc::new(AtomicBool::new(false));
    let mut seen = 0;
    let outs = e
        .generate(&[req(Some(stop.clone())), req(None)], &mut |i, _| {
            if i == 0 {
                seen += 1;
                if seen == 3 {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
    assert_eq!(outs[0].finish, Finish::Stopped);
    assert_eq!(outs[0].ids(), full.ids()[..3]);
    assert_eq!((outs[1].finish, outs[1].ids()), (Finish::Length, full.ids()));
}
