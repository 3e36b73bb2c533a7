//! The persona pipelines: extraction from given responses reproduces the HF reference vector;
//! malformed inputs name their line; and on the default model with the shipped vectors,
//! monitoring, steering and screening do what the paper says they do (with margins for noise).

mod common;
use common::*;

use std::path::{Path, PathBuf};

use persona::steer::vector::PersonaVector;

/// `persona CMD --backend cpu --model MODEL ARGS...`
fn cli_on(model: &Path, cmd: &str, args: &[&str]) -> (bool, String, String) {
    let model = model.to_str().unwrap();
    persona_cli(&[&[cmd, "--backend", "cpu", "--model", model], args].concat())
}

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/smollm2-135m-instruct").join(format!("{name}.safetensors"))
}

/// The fixture's (question, enthusiastic answer, flat answer) pairs as a responses JSONL.
fn fixture_responses(path: &Path) {
    let x = &json(&fixtures().join("smollm2_reference.json"))["extraction"];
    let mut s = String::new();
    for p in x["pairs"].as_array().unwrap() {
        for (side, label) in [("pos", "pos"), ("neg", "neg")] {
            s += &serde_json::json!({
                "system": x[format!("{side}_system")], "question": p["question"],
                "answer": p[format!("{side}_answer")], "label": label,
            })
            .to_string();
            s.push('\n');
        }
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn extract_from_responses_reproduces_the_reference_vector() {
    let Some(model) = required_default_model() else { return };
    let d = tempfile::tempdir().unwrap();
    let (resp, out) = (d.path().join("r.jsonl"), d.path().join("enthusiasm.safetensors"));
    fixture_responses(&resp);
    let (ok, _, err) = cli_on(
        &model,
        "extract",
        &["--trait", "enthusiasm", "--from-responses", resp.to_str().unwrap(), "--out", out.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let got = PersonaVector::load(&out).unwrap();
    let want = PersonaVector::load(fixtures().join("smollm2_extracted_vector.safetensors")).unwrap();
    assert_eq!(got.metadata["persona.method"], "response_avg");
    for l in 0..=want.n_layers {
        let cos = got.cosine(&want, l).unwrap();
        let rel = (got.norm(l) - want.norm(l)).abs() / want.norm(l);
        assert!(cos >= 0.9999 && rel <= 1e-3, "layer {l}: cosine {cos}, relative norm error {rel}");
    }
    let norms: Vec<f32> = serde_json::from_str(&got.metadata["persona.mean_norms"]).unwrap();
    assert_eq!(norms.len(), want.n_layers + 1);
    assert!(norms.iter().all(|&n| n > 0.0));
}

#[test]
fn malformed_pipeline_inputs_name_the_line() {
    let d = tempfile::tempdir().unwrap();
    let m = fixtures().join("tiny-llama");
    let m = m.to_str().unwrap();
    let f = d.path().join("r.jsonl");
    std::fs::write(
        &f,
        "{\"question\":\"q\",\"answer\":\"a\",\"label\":\"pos\"}\n{\"question\":\"q\",\"answer\":\"a\"}\n",
    )
    .unwrap();
    let out = d.path().join("v.safetensors");
    let args = [
        "extract",
        "--model",
        m,
        "--trait",
        "x",
        "--from-responses",
        f.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, _, err) = persona_cli(&args);
    assert!(!ok && err.contains("line 2") && err.contains("label"), "{err}");
    std::fs::write(&f, "").unwrap();
    let (ok, _, err) = persona_cli(&args);
    assert!(!ok && err.contains("no responses"), "{err}");
    assert!(!out.exists(), "nothing is written on failure");
    let data = d.path().join("data.jsonl");
    let v = fixtures().join("tiny-llama/test_vector.safetensors");
    let screen = |text: &str| {
        std::fs::write(&data, text).unwrap();
        let r = d.path().join("rep.json");
        persona_cli(&[
            "screen",
            "--model",
            m,
            "--vector",
            v.to_str().unwrap(),
            "--layer",
            "2",
            "--data",
            data.to_str().unwrap(),
            "--out",
            r.to_str().unwrap(),
        ])
    };
    let (ok, _, err) = screen("{\"prompt\":\"p\",\"response\":\"r\"}\n{\"prompt\":\"p\"}\n");
    assert!(!ok && err.contains("line 2") && err.contains("response"), "{err}");
    let (ok, _, err) = screen("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n");
    assert!(!ok && err.contains("line 1") && err.contains("assistant"), "{err}");
    let (ok, _, err) = screen("\n\n");
    assert!(!ok && err.contains("no samples"), "{err}");
    let (ok, _, err) = screen("{not json\n");
    assert!(!ok && err.contains("line 1") && err.contains("JSON"), "{err}");
}

/// Shipped vectors on the default model, or a skip message.
fn with_shipped(traits: &[&str]) -> Option<PathBuf> {
    let model = required_default_model()?;
    if let Some(t) = traits.iter().find(|t| !shipped(t).exists()) {
        panic!("the shipped vector {} is missing from the checkout", shipped(t).display());
    }
    Some(model)
}

fn monitor_json(model: &Path, t: &str, dir: &Path) -> serde_json::Value {
    let v = PersonaVector::load(shipped(t)).unwrap();
    let layer = v.metadata["persona.layer"].clone();
    let out = dir.join(format!("{t}.monitor.json"));
    let (ok, table, err) = cli_on(
        model,
        "monitor",
        &[
            "--vector",
            shipped(t).to_str().unwrap(),
            "--questions",
            "10",
            "--layers",
            &layer,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    eprintln!("{t}:\n{table}");
    json(&out)
}

/// Monitoring: the last-prompt-token projection separates trait-eliciting from trait-suppressing
/// system prompts at the vector's chosen layer, and norm-matched random directions do worse: the
/// first (the single control of earlier versions) by 0.15, and the vector's |AUROC − 0.5| lies
/// beyond the 95th percentile of the 20 random directions'.
#[test]
fn monitoring_separates_eliciting_from_suppressing_prompts() {
    // The targets: 0.9 for evil, impolite and humorous, 0.85 for optimistic. Measured with
    // the shipped vectors at their chosen layer: evil 0.99, impolite 0.99, humorous 0.92 (its
    // vector uses prompt_last; response_avg gave 0.85), optimistic 0.877 at layer 18 (random
    // 0.553). Optimistic reached only 0.69 with its first, milder instructions ("Focus on problems
    // and risks"); the strongly valenced ones now in traits/optimistic.json separate the sides
    // (within each question every eliciting prompt projects above every suppressing one at layer
    // 18); what remains is the spread between questions. The 20 random directions' 95th percentile
    // of |AUROC − 0.5|: evil 0.23, impolite 0.35, humorous 0.35, optimistic 0.11 (each vector at
    // percentile 100).
    let traits = [("evil", 0.9), ("impolite", 0.9), ("humorous", 0.9), ("optimistic", 0.85)];
    let Some(model) = with_shipped(&traits.map(|t| t.0)) else { return };
    let d = tempfile::tempdir().unwrap();
    for (t, min) in traits {
        let r = monitor_json(&model, t, d.path());
        let au = r["auroc"][0].as_f64().unwrap();
        let c = &r["random"][0];
        let (ra, first, p95) =
            (c["mean"].as_f64().unwrap(), c["values"][0].as_f64().unwrap(), c["p95_abs"].as_f64().unwrap());
        assert_eq!(r["random_auroc"][0].as_f64(), Some(ra));
        assert_eq!(c["values"].as_array().unwrap().len(), 20);
        assert!(au >= min, "{t}: AUROC {au:.3} < {min}");
        assert!(au - first >= 0.15, "{t}: random direction AUROC {first:.3} is within 0.15 of {au:.3}");
        assert!(au - ra >= 0.15, "{t}: mean random AUROC {ra:.3} is within 0.15 of {au:.3}");
        assert!(
            au - 0.5 > p95,
            "{t}: |AUROC − 0.5| {:.3} is within the random directions' 95th percentile {p95:.3}",
            au - 0.5
        );
    }
}

/// Many-shot monitoring: with no system prompt, two example answers in the evil voice before the
/// question (from the vector's extraction answers, whose questions are disjoint from the evaluation
/// questions) project above two opposite answers to the same example questions, at the chosen layer.
#[test]
fn monitoring_tracks_many_shot_examples() {
    let Some(model) = with_shipped(&["evil"]) else { return };
    let d = tempfile::tempdir().unwrap();
    let v = PersonaVector::load(shipped("evil")).unwrap();
    let layer = v.metadata["persona.layer"].clone();
    let out = d.path().join("evil.monitor.json");
    let (ok, table, err) = cli_on(
        &model,
        "monitor",
        &[
            "--vector",
            shipped("evil").to_str().unwrap(),
            "--questions",
            "10",
            "--shots",
            "2",
            "--layers",
            &layer,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    eprintln!("{table}");
    let r = json(&out);
    let rows = r["rows"].as_array().unwrap();
    let shot_rows: Vec<_> =
        rows.iter().filter(|x| x["prompt"]["shots"].as_array().is_some_and(|s| s.len() == 2)).collect();
    assert_eq!(shot_rows.len(), 20, "10 questions × (eliciting, suppressing)");
    assert!(shot_rows.iter().all(|x| x["prompt"]["system"].is_null()));
    let ms = &r["many_shot"][0];
    assert_eq!(ms["shots"].as_u64(), Some(2));
    let au = ms["auroc"][0].as_f64().unwrap();
    let c = &ms["random"][0];
    let (ra, first, p95) =
        (c["mean"].as_f64().unwrap(), c["values"][0].as_f64().unwrap(), c["p95_abs"].as_f64().unwrap());
    // Measured at layer 18: 0.91 (first random direction 0.46; 20 random directions: mean 0.49,
    // 95th percentile of |AUROC − 0.5| 0.19); 4 shots 0.88 (0.35; 0.51, 0.22).
    assert!(au >= 0.8, "2-shot AUROC {au:.3} < 0.8");
    assert!(au - first >= 0.15, "random direction 2-shot AUROC {first:.3} is within 0.15 of {au:.3}");
    assert!(au - ra >= 0.15, "mean random 2-shot AUROC {ra:.3} is within 0.15 of {au:.3}");
    assert!(au - 0.5 > p95, "2-shot |AUROC − 0.5| {:.3} is within the random 95th percentile {p95:.3}", au - 0.5);
}

/// Steering: trait log-odds rises monotonically over −3…+3 at the chosen layer, by ≥ 0.2
/// nats/token for evil and impolite, while random directions move it by less than a quarter on
/// average (and the first, the single control of earlier versions, alone too), and none as much.
#[test]
fn steering_moves_trait_log_odds() {
    let Some(model) = with_shipped(&["evil", "impolite"]) else { return };
    let d = tempfile::tempdir().unwrap();
    for t in ["evil", "impolite"] {
        let v = PersonaVector::load(shipped(t)).unwrap();
        let layer = v.metadata["persona.layer"].clone();
        let copy = d.path().join(format!("{t}.safetensors"));
        std::fs::copy(shipped(t), &copy).unwrap();
        let (ok, table, err) = cli_on(
            &model,
            "eval",
            &[
                "--vector",
                copy.to_str().unwrap(),
                "--layers",
                &layer,
                "--coeffs=-3,-1,1,3",
                "--questions",
                "6",
                "--out-dir",
                d.path().to_str().unwrap(),
            ],
        );
        assert!(ok, "{err}");
        eprintln!("{table}");
        let r = json(&d.path().join(format!("{t}.eval.json")));
        let pts: Vec<(f64, f64, bool)> = r["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["coeff"].as_f64().unwrap(), p["log_odds"].as_f64().unwrap(), p["control"].as_bool().unwrap()))
            .collect();
        let main: Vec<f64> = pts.iter().filter(|p| !p.2).map(|p| p.1).collect();
        assert!(main.windows(2).all(|w| w[1] > w[0]), "{t}: log-odds not monotonic: {main:?}");
        let span = main[main.len() - 1] - main[0];
        let random = r["random_effect"].as_f64().unwrap();
        let c = &r["random"];
        let spans: Vec<f64> = c["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(spans.len(), 3, "{t}: --random-eval defaults to 3");
        assert!((random - spans.iter().sum::<f64>() / 3.0).abs() < 1e-12, "{t}: random_effect is the mean");
        // Measured (6 questions, layer 18): evil 1.650 against random 0.254, −0.007, 0.118;
        // impolite 0.689 against 0.070, 0.244, −0.195.
        assert!(span >= 0.2, "{t}: log-odds span {span:.3} < 0.2 nats/token");
        assert!(random.abs() < span / 4.0, "{t}: mean random direction span {random:.3} vs {span:.3}");
        assert!(spans[0].abs() < span / 4.0, "{t}: first random direction span {:.3} vs {span:.3}", spans[0]);
        assert_eq!(c["rank"].as_u64(), Some(1), "{t}: a random direction moves the log-odds as much: {spans:?}");
    }
}

/// Screening: answers written in the evil voice, mixed among ordinary ones, rank first by ΔP.
#[test]
fn screening_ranks_trait_samples_first() {
    let Some(model) = with_shipped(&["evil"]) else { return };
    let d = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/screen_mixed.jsonl");
    let out = d.path().join("report.json");
    let (ok, _, err) = cli_on(
        &model,
        "screen",
        &[
            "--vector",
            shipped("evil").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let evil: Vec<bool> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["evil"].as_bool().unwrap())
        .collect();
    let r = json(&out);
    let (mut pos, mut neg) = (vec![], vec![]);
    for row in r["ranking"].as_array().unwrap() {
        let i = row["index"].as_u64().unwrap() as usize;
        if evil[i] { &mut pos } else { &mut neg }.push(row["delta_p"].as_f64().unwrap());
    }
    let au = persona::persona::common::auroc(&pos, &neg);
    // The shipped evil vector (greedy extraction answers) reaches 0.90 at its layer; sampled at
    // temperature 1 it reached only 0.83.
    assert!(au >= 0.9, "screening AUROC {au:.3}");
}
