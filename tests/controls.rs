//! Random-direction controls: R seeded, norm-matched random directions, the vector's percentile
//! among them, and their use in `monitor`, `eval` and `screen` — on constructed residuals with a
//! planted direction, on the tiny fixture model (captured residuals projected by hand against the
//! engine's own probes) and, where it is cached, on the default model.

mod common;
use common::*;

use std::path::PathBuf;
use std::sync::Arc;

use persona::backend::cpu::CpuBackend;
use persona::engine::sampler::Rng;
use persona::persona::common::{
    dot, norm, percentile_of, project, quantile, random_directions, random_like, teacher_force, unit, CaptureRange,
    Forced, RandomControl,
};
use persona::persona::eval::{sweep, EvalOptions};
use persona::persona::monitor::{auroc_control, ladder, MonitorOptions};
use persona::persona::screen::{control, read_progress, screen, ScreenOptions, ScreenRow};
use persona::persona::traits::find_trait;
use persona::steer::vector::PersonaVector;
use persona::steer::{Probe, SeqSteering};
use persona::LoadedModel;

#[test]
fn random_set_is_seeded_norm_matched_and_isotropic() {
    let v: Vec<f32> = (0..576).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3).collect();
    let r = random_directions(&v, 200, 11);
    assert_eq!(r.len(), 200);
    assert_eq!(r, random_directions(&v, 200, 11), "same seed, same set");
    assert_eq!(r[..20], random_directions(&v, 20, 11)[..], "a larger R appends");
    assert_ne!(r[0], random_directions(&v, 1, 12)[0], "another seed, another set");
    assert_eq!(r[0], random_like(&v, 11));
    assert!(random_directions(&v, 0, 11).is_empty());
    for d in &r {
        assert_eq!(d.len(), v.len());
        assert!((norm(d) / norm(&v) - 1.0).abs() < 1e-5);
    }
    // Isotropic: the squared cosine with a fixed direction averages 1/d (the expectation for a
    // uniform direction in d dimensions); with 200 draws the mean lies within ±30% of it.
    let e = unit(&v);
    let cos2: f64 = r.iter().map(|d| (dot(d, &e) / norm(d)).powi(2)).sum::<f64>() / r.len() as f64;
    assert!((cos2 * 576.0 - 1.0).abs() < 0.3, "mean cos² · d = {:.3}", cos2 * 576.0);
    // And no preferred coordinate: each coordinate's mean over the draws is near 0.
    let mean0: f64 = r.iter().map(|d| d[0] as f64 / norm(d)).sum::<f64>() / r.len() as f64;
    assert!(mean0.abs() < 3.0 / (576f64 * 200.0).sqrt(), "coordinate 0 mean {mean0:.4}");
}

#[test]
fn percentile_and_quantile_edge_cases() {
    assert_eq!(percentile_of(10.0, &[1.0, 2.0, 3.0]), 100.0);
    assert_eq!(percentile_of(0.0, &[1.0, 2.0, 3.0]), 0.0);
    assert_eq!(percentile_of(2.0, &[1.0, 2.0, 3.0]), 50.0);
    assert_eq!(percentile_of(3.0, &[3.0; 5]), 50.0, "all ties: the middle");
    assert!(percentile_of(1.0, &[]).is_nan());
    assert!(percentile_of(f64::NAN, &[1.0]).is_nan());
    assert_eq!(percentile_of(1.5, &[f64::NAN, 1.0, 2.0]), 50.0, "NaN samples are left out");
    // numpy.percentile(range(1, 21), 95) = 19.05
    let s: Vec<f64> = (1..=20).map(f64::from).collect();
    assert!((quantile(&s, 0.95) - 19.05).abs() < 1e-12);
    assert!(quantile(&[f64::NAN], 0.95).is_nan());

    // The control measures distance from the center either way: an AUROC of 0.2 separates as well
    // as 0.8.
    let c = RandomControl::new(0.25, vec![0.75, 0.5, 0.375], 0.5);
    assert_eq!(c.rank, 1, "ties with the vector do not outrank it");
    assert!((c.percentile - 100.0 * 2.5 / 3.0).abs() < 1e-9);
    assert_eq!(c.mean, 1.625 / 3.0);
    let c = RandomControl::new(0.5, vec![0.8, 0.1], 0.5);
    assert_eq!((c.rank, c.percentile), (3, 0.0));
    let c = RandomControl::new(0.5, vec![], 0.5);
    assert!(c.mean.is_nan() && c.percentile.is_nan() && c.p95_abs.is_nan());
    // NaN becomes null in the JSON reports.
    assert!(serde_json::to_value(&c).unwrap()["mean"].is_null());
}

/// Residuals whose classes differ only along a planted direction (uniform noise in [−1, 1] in
/// every coordinate, ±2 along the planted one): the vector separates them perfectly and stands
/// above every random direction, whose AUROCs scatter around 0.5.
#[test]
fn planted_direction_outranks_every_random_direction() {
    let (d, n, planted) = (128, 40, 17);
    let mut rng = Rng::new(3);
    let mut sample = |class: f32| -> Vec<f32> {
        let mut h: Vec<f32> = (0..d).map(|_| (2.0 * rng.next_f64() - 1.0) as f32).collect();
        h[planted] += 2.0 * class;
        h
    };
    let pos: Vec<Vec<f32>> = (0..n).map(|_| sample(1.0)).collect();
    let neg: Vec<Vec<f32>> = (0..n).map(|_| sample(-1.0)).collect();
    let mut v = vec![0.0f32; d];
    v[planted] = 5.0;
    let r = 200;
    let units: Vec<Vec<f32>> = random_directions(&v, r, 0).iter().map(|x| unit(x)).collect();
    let u = unit(&v);
    // Each sample's projection onto the vector and onto every random direction.
    type Proj = (f32, Vec<f32>);
    let proj =
        |h: &Vec<f32>| -> Proj { (dot(h, &u) as f32, project(h, &units).into_iter().map(|x| x as f32).collect()) };
    let (p, q): (Vec<Proj>, Vec<Proj>) = (pos.iter().map(proj).collect(), neg.iter().map(proj).collect());
    fn view(s: &[Proj]) -> Vec<(f32, &[f32])> {
        s.iter().map(|(a, b)| (*a, &b[..])).collect()
    }
    let (au, c) = auroc_control(&view(&p), &view(&q), r);
    assert_eq!(au, 1.0);
    assert_eq!(c.values.len(), r);
    assert_eq!((c.percentile, c.rank), (100.0, 1));
    assert!(c.values.iter().all(|&a| a > 0.0 && a < 1.0), "no random direction separates perfectly");
    assert!((c.mean - 0.5).abs() < 0.05, "random mean AUROC {:.3}", c.mean);
    // A random unit direction meets the planted axis at ~1/√128, shifting the classes by about
    // ±0.18 against noise of sd 0.58: |AUROC − 0.5| is typically ~0.1, rarely above 0.3.
    let mean_abs = c.values.iter().map(|a| (a - 0.5).abs()).sum::<f64>() / r as f64;
    assert!(mean_abs > 0.02 && mean_abs < 0.2, "mean |AUROC − 0.5| {mean_abs:.3}");
    assert!(c.p95_abs < 0.35 && c.max_abs < 0.5, "p95 {:.3}, max {:.3}", c.p95_abs, c.max_abs);
    // Flipping the vector's sign flips its AUROC, not its standing.
    let flip = |s: &[Proj]| s.iter().map(|(a, b)| (-a, b.clone())).collect::<Vec<_>>();
    let (au, c2) = auroc_control(&view(&flip(&p)), &view(&flip(&q)), r);
    assert_eq!((au, c2.percentile, c2.rank), (0.0, 100.0, 1));
}

#[test]
fn screen_control_summarises_random_delta_p() {
    let row = |i: usize, dp: f64, rand: Vec<f64>| ScreenRow {
        index: i,
        delta_p: dp,
        p_data: dp,
        p_own: 0.0,
        own_answer: String::new(),
        delta_p_random: rand,
        delta_p_percentile: None,
    };
    let rows = [row(0, 3.0, vec![1.0, -2.0]), row(1, 1.0, vec![-1.0, 0.0]), row(2, 2.0, vec![0.5, 0.5])];
    let c = control(&rows);
    // Per direction, the dataset mean ΔP: (1 − 1 + 0.5)/3 and (−2 + 0 + 0.5)/3.
    assert_eq!(c.mean_delta_p.values.len(), 2);
    assert!((c.mean_delta_p.values[0] - 0.5 / 3.0).abs() < 1e-12);
    assert!((c.mean_delta_p.values[1] + 0.5).abs() < 1e-12);
    assert_eq!((c.mean_delta_p.percentile, c.mean_delta_p.rank), (100.0, 1));
    // Pooled over samples and directions: |ΔP| = 1, 2, 1, 0, 0.5, 0.5; mean −1/6.
    assert!((c.sample_mean + 1.0 / 6.0).abs() < 1e-12);
    assert!((c.sample_p95_abs - quantile(&[1.0, 2.0, 1.0, 0.0, 0.5, 0.5], 0.95)).abs() < 1e-12);
    assert_eq!(c.samples_above_p95, 2, "ΔP = 3 and 2 exceed 1.75");
}

/// Monitor and screen project captured residuals onto the random directions by hand instead of
/// probing them in the forward pass: on the tiny model, the last prompt token's residual and the
/// answer's mean residual, projected onto a unit direction, give what the engine's probe gives.
#[test]
fn captured_residual_projections_match_the_probes() {
    let m = LoadedModel::load(&fixtures().join("tiny-llama"), CpuBackend, 64).unwrap();
    let rows = vector_rows(&fixtures().join("tiny-llama/test_vector.safetensors"));
    let hidden = m.engine.config.hidden;
    let layers = [1usize, 2, 3];
    let dirs: Vec<Vec<f32>> = layers.iter().map(|&l| random_like(&rows[l], 9 + l as u64)).collect();
    let st = SeqSteering {
        sources: Vec::new(),
        plan: Default::default(),
        probes: layers
            .iter()
            .zip(&dirs)
            .map(|(&l, d)| Probe { name: format!("r{l}"), layer: l, vector: Arc::from(&d[..]) })
            .collect(),
    };
    let items = vec![
        Forced { tokens: vec![37, 235, 140, 72, 255, 137, 203, 133], answer_start: 5 },
        Forced { tokens: vec![79, 192, 144, 129, 204, 71], answer_start: 2 },
    ];
    for (cap, last) in [(CaptureRange::PromptLast, true), (CaptureRange::Answer, false)] {
        let outs = teacher_force(&m.engine, &items, Some(&st), cap, false, 2, None).unwrap();
        for (i, o) in outs.iter().enumerate() {
            let h = o.mean.as_ref().unwrap();
            assert_eq!(h.len(), (m.engine.config.n_layers + 1) * hidden);
            for (j, (&l, d)) in layers.iter().zip(&dirs).enumerate() {
                let got = project(&h[l * hidden..(l + 1) * hidden], &[unit(d)])[0];
                let want = if last { o.last_prompt_proj[j] } else { o.answer_proj[j] } as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{cap:?} item {i} layer {l}: {got} vs {want}"
                );
            }
        }
    }
}

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct").join(format!("{name}.safetensors"))
}

fn default_loaded() -> Option<(LoadedModel<CpuBackend>, PersonaVector)> {
    let model = required_default_model()?;
    let m = LoadedModel::load(&model, CpuBackend, 2048).unwrap();
    let v = PersonaVector::load_for_model(shipped("evil"), &m.engine.config).unwrap();
    Some((m, v))
}

/// `monitor` on the default model with the evil vector, 2 questions, layers 12 and 18: the random set is
/// seeded (the same seed gives the same AUROCs, a smaller R a prefix of them, another seed others),
/// and the vector separates the ladder better than every one of its 20 random directions.
#[test]
fn monitor_reports_the_vector_among_random_directions() {
    let Some((m, v)) = default_loaded() else { return };
    let t = find_trait("evil").unwrap();
    let opts = |random: usize, seed: u64| MonitorOptions {
        questions: 2,
        layers: vec![12, 18],
        layer: None,
        generate: false,
        max_tokens: 8,
        batch: 16,
        seed,
        random,
        show_progress: false,
    };
    let run =
        |o: &MonitorOptions| persona::persona::monitor::run(&m, "evil", ladder(&t, 2), &v, Some(&t), None, o).unwrap();
    let a = run(&opts(20, 0));
    assert_eq!(a.random_directions, 20);
    assert_eq!(a.random.len(), 2);
    for (k, c) in a.random.iter().enumerate() {
        assert_eq!(c.values.len(), 20);
        assert_eq!(c.center, 0.5);
        assert!((a.random_auroc[k] - c.mean).abs() < 1e-12, "random_auroc is the mean");
        assert!(c.mean > 0.3 && c.mean < 0.7, "layer {}: random mean AUROC {:.3}", a.layers[k], c.mean);
        eprintln!("layer {}: AUROC {:.3}, random {c:?}", a.layers[k], a.auroc[k]);
    }
    let at18 = &a.random[1];
    // Measured: AUROC 1.000 at layer 18 (10 eliciting vs 10 suppressing prompts); the 20 random
    // directions' |AUROC − 0.5| reach at most 0.36.
    assert!(a.auroc[1] >= 0.95, "AUROC {:.3}", a.auroc[1]);
    assert_eq!((at18.percentile, at18.rank), (100.0, 1), "{at18:?}");
    assert!(at18.p95_abs < a.auroc[1] - 0.5);
    for r in &a.rows {
        assert_eq!(r.random_projections.len(), 2);
        assert!(r.random_projections.iter().all(|p| p.len() == 20));
        assert_eq!(r.random_projection, vec![r.random_projections[0][0], r.random_projections[1][0]]);
    }
    let b = run(&opts(5, 0));
    assert_eq!(b.random[1].values[..], a.random[1].values[..5], "seeded: a smaller R is a prefix");
    assert_eq!(b.auroc, a.auroc);
    let c = run(&opts(5, 1));
    assert_ne!(c.random[1].values[..], a.random[1].values[..5], "another seed, other directions");
    let table = a.table();
    assert!(table.contains("20 norm-matched random directions") && table.contains("pct"), "{table}");
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["random"][1]["values"].as_array().unwrap().len(), 20);
    assert!(json["random"][1]["p95_abs"].is_f64() && json["random"][1]["percentile"].is_f64());
}

/// `eval` with 2 random directions at the (single) layer: one line of points per direction, their
/// spans' mean as `random_effect`, and the vector's rank among them.
#[test]
fn eval_sweeps_several_random_directions() {
    let Some((m, v)) = default_loaded() else { return };
    let t = find_trait("evil").unwrap();
    let o = EvalOptions {
        layers: vec![18],
        coeffs: vec![-3.0, 3.0],
        questions: 2,
        generate: false,
        max_tokens: 12,
        batch: 16,
        seed: 0,
        random: 2,
        min_auroc: 0.8,
        show_progress: false,
    };
    let r = sweep(&m, &t, &v, None, &o).unwrap();
    assert_eq!(r.points.len(), 2 + 2 * 2);
    let ctl: Vec<_> = r.points.iter().filter(|p| p.control).collect();
    assert_eq!(ctl.iter().map(|p| p.random_index).collect::<Vec<_>>(), [Some(0), Some(0), Some(1), Some(1)]);
    assert!(r.points.iter().filter(|p| !p.control).all(|p| p.random_index.is_none()));
    let spans: Vec<f64> = ctl.chunks(2).map(|c| c[1].log_odds - c[0].log_odds).collect();
    assert_eq!(r.random.values, spans);
    assert!((r.random_effect - (spans[0] + spans[1]) / 2.0).abs() < 1e-12);
    assert!((r.random.max_abs - spans[0].abs().max(spans[1].abs())).abs() < 1e-12);
    let span = r.effect[0].1;
    assert_eq!(r.random.rank, 1 + spans.iter().filter(|s| s.abs() > span.abs()).count());
    // The vector moves the log-odds more than either random direction of its norm (measured on
    // these 2 questions: 0.785 nats/token over ±3 at layer 18; random 0.416 and 0.044).
    assert!(span > 0.2 && r.random.max_abs < span, "span {span:.3}, random {:?}", r.random.values);
    let table = r.table();
    assert!(
        table.contains("18 random 1") && table.contains("18 random 2") && table.contains("ranks 1 of 3"),
        "{table}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["points"][2]["random_index"], 0);
    assert!(json["points"][0].get("random_index").is_none());
    assert!(json["random_effect"].is_f64());
}

/// `screen` on two samples with 5 random directions: every row carries ΔP along each and its
/// percentile; rows left by a run without random directions (an older progress file) are redone.
#[test]
fn screen_adds_random_delta_p_and_redoes_rows_without_it() {
    let Some((m, v)) = default_loaded() else { return };
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/screen_mixed.jsonl");
    let samples = persona::persona::screen::read_dataset(&data).unwrap()[..2].to_vec();
    let d = tempfile::tempdir().unwrap();
    let progress = d.path().join("p.progress.jsonl");
    // An older row for sample 0 (no `delta_p_random`), with a ΔP no run would give.
    std::fs::write(&progress, "{\"index\":0,\"delta_p\":99.0,\"p_data\":99.0,\"p_own\":0.0,\"own_answer\":\"x\"}\n")
        .unwrap();
    assert_eq!(read_progress(&progress).unwrap()[0].delta_p_random, Vec::<f64>::new());
    let o = ScreenOptions { layer: 18, max_tokens: 16, batch: 4, random: 5, seed: 0, show_progress: false };
    let rows = screen(&m, &v, &samples, &progress, &o).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_ne!(r.delta_p, 99.0, "the old row was redone");
        assert_eq!(r.delta_p_random.len(), 5);
        assert!(r.delta_p_random.iter().all(|x| x.is_finite()));
        let abs: Vec<f64> = r.delta_p_random.iter().map(|x| x.abs()).collect();
        assert_eq!(r.delta_p_percentile, Some(percentile_of(r.delta_p.abs(), &abs)));
    }
    // Resuming with the same options keeps the finished rows as they are.
    let again = screen(&m, &v, &samples, &progress, &o).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(1.0);
    assert_eq!(again.len(), rows.len());
    for (a, b) in again.iter().zip(&rows) {
        assert_eq!((a.index, &a.own_answer, a.delta_p_random.len()), (b.index, &b.own_answer, 5));
        assert!(
            close(a.delta_p, b.delta_p) && a.delta_p_random.iter().zip(&b.delta_p_random).all(|(x, y)| close(*x, *y))
        );
    }
    let c = control(&rows);
    assert_eq!(c.mean_delta_p.values.len(), 5);
}
