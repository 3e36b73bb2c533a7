//! `persona vaccine --screening` on the default model, CI-sized (4-row datasets, 8-token answers,
//! 1 training step): ΔP equals `persona screen`'s per-sample ΔP averaged, every dataset trains from
//! the same adapter, results are written atomically, a re-run resumes without retraining; the
//! correlation arithmetic against known values; bad input through the CLI.

mod common;
use common::*;

use std::path::Path;

use persona::backend::cpu::CpuGemmBackend;
use persona::model::lora::{LoraAdapter, LoraConfig, Target};
use persona::model::ModelFiles;
use persona::persona::dataset::{build, read_rows, DatasetOptions, Kind};
use persona::persona::extract::chat_ids;
use persona::persona::screen::{read_dataset, screen, ScreenOptions};
use persona::persona::screening::{self, ScreeningOptions, StudyDataset, StudyTrait};
use persona::persona::traits::find_trait;
use persona::steer::vector::PersonaVector;
use persona::train::data::{read_jsonl, DataOptions};
use persona::train::TrainOptions;
use persona::LoadedModel;
use serde_json::{json, Value};

fn vector(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("vectors/smollm2-135m-instruct/{name}.safetensors"))
}

#[test]
fn screening_measures_resumes_and_matches_screen() {
    let Some(path) = required_default_model() else { return };
    let m = LoadedModel::load(&path, CpuGemmBackend, 512).unwrap();
    let cfg = m.engine.config.clone();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let mut traits = vec![];
    for name in ["evil", "sycophantic"] {
        let t = find_trait(name).unwrap();
        let pv = PersonaVector::load_for_model(&vector(name), &cfg).unwrap();
        let layer = 18;
        let eval_prompts = t.eval_questions.iter().take(2).map(|q| chat_ids(&m, None, q).unwrap()).collect();
        traits.push(StudyTrait { name: name.into(), layer, v: pv.layer(layer).to_vec(), eval_prompts });
    }
    // Three small datasets: evil positive, evil benign, sycophantic positive (2 questions, 2 samples).
    let mut datasets = vec![];
    for (name, tr, kind) in
        [("evil-pos", "evil", Kind::Pos), ("evil-benign", "evil", Kind::Benign), ("syc-pos", "sycophantic", Kind::Pos)]
    {
        let o = DatasetOptions { kind, questions: 2, samples: 2, max_tokens: 8, seed: 0, ..Default::default() };
        let file = out.join(format!("{name}.jsonl"));
        build(&m, &find_trait(tr).unwrap(), &o, &file).unwrap();
        assert_eq!(read_rows(&file).unwrap().len(), 4);
        let samples = read_dataset(&file).unwrap();
        let train = read_jsonl(&file, &m, &DataOptions { max_len: 512, label: None }).unwrap();
        datasets.push(StudyDataset { name: name.into(), trait_name: tr.into(), samples, train });
    }
    let lora = LoraConfig { r: 4, alpha: 8.0, use_rslora: true, targets: Target::ALL.to_vec() };
    let mut train = TrainOptions::new(lora);
    train.lr = 1e-3;
    train.steps = Some(1);
    train.batch = 2;
    train.warmup = 0;
    let o = ScreeningOptions {
        train,
        random: 5,
        seed: 0,
        max_tokens: 8,
        batch: 4,
        resamples: 100,
        settings: json!({"test": 1}),
    };
    let run = |o: &ScreeningOptions| {
        let mut merged = |a: &LoraAdapter| {
            let mut f = ModelFiles::open(&path)?;
            a.merge_into(&mut f.tensors)?;
            LoadedModel::from_files(f, CpuGemmBackend, 512)
        };
        screening::run(&m, &mut merged, &traits, &datasets, o, out, "smollm2", &mut |l| eprintln!("{l}"))
    };
    let v = run(&o).unwrap();
    let ds = v["datasets"].as_array().unwrap();
    assert_eq!(ds.len(), 3);
    for d in ds {
        for k in ["delta_p", "delta_p_random", "shift"] {
            assert!(d[k].as_f64().is_some_and(f64::is_finite), "{}: {k} = {}", d["name"], d[k]);
        }
        assert_eq!(d["all_traits"].as_object().unwrap().len(), 2, "every dataset measured on every trait");
    }
    assert!(v["r"].as_f64().is_some_and(|r| (-1.0..=1.0).contains(&r)), "r = {}", v["r"]);
    assert!(v["r_ci95"][0].is_null(), "no Fisher interval from 3 points");
    assert_eq!(v["pooled"]["r_random_all"].as_array().unwrap().len(), 5, "one r per random direction");
    assert!(v["per_trait"]["evil"]["r"].is_number() && v["per_trait"]["sycophantic"]["r"].is_number());
    // ΔP is `persona screen`'s per-sample ΔP, averaged.
    let pv = PersonaVector::load_for_model(&vector("evil"), &cfg).unwrap();
    let so = ScreenOptions { layer: 18, max_tokens: 8, batch: 4, random: 0, seed: 0, show_progress: false };
    let rows = screen(&m, &pv, &datasets[0].samples, &out.join("screen.jsonl"), &so).unwrap();
    let mean = rows.iter().map(|r| r.delta_p).sum::<f64>() / rows.len() as f64;
    let got = ds.iter().find(|d| d["name"] == "evil-pos").unwrap()["delta_p"].as_f64().unwrap();
    assert!((mean - got).abs() < 1e-3 * (1.0 + mean.abs()), "screen {mean} vs screening {got}");
    // Training logs every trait's projection.
    let first_step = |n: &str| -> Value {
        let log = std::fs::read_to_string(out.join("datasets").join(n).join("train_log.jsonl")).unwrap();
        serde_json::from_str::<Value>(log.lines().next().unwrap()).unwrap()
    };
    assert!(first_step("evil-pos")["projections"]["evil"].is_object(), "training logs the trait projections");
    // Files: screening.json/md written, no temporary files.
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(out.join("screening.json")).unwrap()).unwrap();
    assert_eq!(on_disk["datasets"].as_array().unwrap().len(), 3);
    assert!(std::fs::read_to_string(out.join("screening.md")).unwrap().contains("| evil-pos | evil | 4 |"));
    let svg = std::fs::read_to_string(out.join("screening.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("evil-pos") && svg.contains("random direction"));
    assert!(!std::fs::read_dir(out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp")));
    // A re-run resumes: nothing retrained, the same numbers.
    let t =
        |n: &str| std::fs::metadata(out.join("datasets").join(n).join("train_log.jsonl")).unwrap().modified().unwrap();
    let before = t("syc-pos");
    let again = run(&o).unwrap();
    assert_eq!(t("syc-pos"), before, "retrained");
    assert_eq!(again["r"].as_f64().map(|x| (x * 1e9).round()), v["r"].as_f64().map(|x| (x * 1e9).round()));
    // A result recorded under other settings is refused.
    let mut o2 = o.clone();
    o2.settings = json!({"test": 2});
    assert!(run(&o2).unwrap_err().to_string().contains("other settings"));
}

#[test]
fn cli_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let out = out.to_str().unwrap();
    let (ok, _, err) = persona_cli(&["vaccine", "--screening", "--traits", "evil,no-such-trait", "--out-dir", out]);
    assert!(!ok && err.contains("no-such-trait"), "{err}");
    let tiny = fixtures().join("tiny-llama");
    let (ok, _, err) = persona_cli(&["vaccine", "--screening", "--out-dir", out, "--model", tiny.to_str().unwrap()]);
    assert!(!ok && err.contains("does not fit this model"), "{err}");
    let (ok, _, err) = persona_cli(&["vaccine", "--screening", "--trait", "evil", "--out-dir", out]);
    assert!(!ok && err.contains("do not apply"), "{err}");
    let (ok, _, err) = persona_cli(&["vaccine", "--out-dir", out]);
    assert!(!ok && err.contains("--trait"), "{err}");
}
