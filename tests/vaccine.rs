//! `persona vaccine` on tiny-llama (token-id data, 2 steps per arm): arms share data order and
//! LoRA seed, evaluation prompts are never trained on, results are written atomically, a re-run
//! resumes finished arms without retraining, bad input gives clear errors.

mod common;

use std::path::Path;

use persona::backend::cpu::CpuGemmBackend;
use persona::model::lora::{LoraAdapter, LoraConfig, Target};
use persona::model::ModelFiles;
use persona::persona::vaccine::{
    self, control_arms, plan_arms, ArmKind, ArmMeasure, Protocol, VaccineData, VaccineOptions,
};
use persona::train::data::Example;
use persona::train::TrainOptions;
use persona::LoadedModel;
use serde_json::{json, Value};

fn tiny() -> std::path::PathBuf {
    common::fixtures().join("tiny-llama")
}

fn load() -> LoadedModel<CpuGemmBackend> {
    LoadedModel::load(&tiny(), CpuGemmBackend, 128).unwrap()
}

/// Deterministic token rows: prompt `[1, q, q+1, ...]`, answer from `answer_from`.
fn data() -> VaccineData {
    let row = |q: u32, len: usize, ans: usize| {
        let ids: Vec<u32> = (0..len as u32).map(|i| if i == 0 { 1 } else { 3 + (q * 7 + i * 5) % 250 }).collect();
        Example::with_answer_from(ids, ans).unwrap()
    };
    let train: Vec<Example> = (0..6).map(|q| row(q, 10 + q as usize, 5)).collect();
    let trait_holdout = vec![row(20, 11, 5), row(21, 9, 4)];
    let benign_holdout = vec![row(30, 12, 6), row(31, 8, 3)];
    let eval_prompts: Vec<Vec<u32>> = (40..43).map(|q| row(q, 6, 1).ids).collect();
    VaccineData { train, trait_holdout, benign_holdout, eval_prompts, logodds_pos: vec![], logodds_neg: vec![] }
}

fn vec_row(hidden: usize, seed: u64) -> Vec<f32> {
    persona::persona::common::random_like(&vec![1.0f32; hidden], seed)
}

fn options() -> VaccineOptions {
    let lora = LoraConfig { r: 4, alpha: 8.0, use_rslora: true, targets: Target::ALL.to_vec() };
    let mut train = TrainOptions::new(lora);
    train.lr = 1e-2;
    train.steps = Some(2);
    train.batch = 2;
    train.warmup = 0;
    VaccineOptions {
        layer: 2,
        train,
        max_answer_tokens: 4,
        resamples: 200,
        boot_seed: 0,
        batch: 4,
        settings: json!({"test": 1}),
    }
}

fn run_all(out: &Path) -> Value {
    let m = load();
    let h = m.engine.config.hidden;
    let v = vec_row(h, 1);
    let other = vec_row(h, 2);
    let p = protocol(&[1.0, 4.0], &[1000], Some(("o".into(), other)), Some(7));
    let mut merged = |a: &LoraAdapter| {
        let mut f = ModelFiles::open(&tiny())?;
        a.merge_into(&mut f.tensors)?;
        LoadedModel::from_files(f, CpuGemmBackend, 128)
    };
    vaccine::run(&m, &mut merged, "t", &p, &data(), &v, &options(), out, "tiny", &mut |l| eprintln!("{l}")).unwrap()
}

fn protocol(coeffs: &[f32], seeds: &[u64], other: Option<(String, Vec<f32>)>, noise_seed: Option<u64>) -> Protocol {
    Protocol {
        coeffs: coeffs.to_vec(),
        random_seeds: seeds.to_vec(),
        random_at_all: true,
        other,
        noise_seed,
        nll_margin: 0.05,
    }
}

fn assert_close(a: &Value, b: &Value, at: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-12 * (1.0 + x.abs()), "{at}: {x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            x.iter().zip(y).enumerate().for_each(|(i, (x, y))| assert_close(x, y, &format!("{at}[{i}]")));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}");
            x.iter().for_each(|(k, v)| assert_close(v, &y[k], &format!("{at}.{k}")));
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

const PLOTS: [&str; 3] = ["shift_vs_coeff.svg", "response_shift_vs_coeff.svg", "training_projection.svg"];

fn measure(dir: &Path) -> ArmMeasure {
    serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap()
}

#[test]
fn arms_share_data_and_seed_results_atomic_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let results = run_all(out);
    let arms = results["arms"].as_array().unwrap();
    let kinds: Vec<&str> = arms.iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["base", "plain", "steer", "steer", "caft", "random", "random", "other_trait", "plain", "steer"],
        "arms in order"
    );
    // The controls and the seed-noise arms follow the best steer arm.
    let best = results["best"]["name"].as_str().unwrap();
    let best_coeff = results["best"]["coeff"].as_f64().unwrap();
    assert_eq!(arms[7]["coeff"].as_f64(), Some(best_coeff), "other_trait at the best coefficient");
    assert_eq!(arms[8]["name"], json!("plain-seed7"));
    assert_eq!(arms[9]["name"], json!(format!("{best}-seed7")));
    assert_eq!(arms[9]["seed"], json!(7));
    assert_eq!(results["seed_noise"].as_array().unwrap().len(), 2);
    assert!(results["verdict"]["checks"]["plain_shift_significant"].is_boolean());
    // Base is the reference: its shifts are exactly zero.
    assert_eq!(arms[0]["shift"], json!(0.0));
    for a in arms {
        for k in ["shift", "response_shift", "benign_nll", "trait_nll_off", "trait_nll_on"] {
            assert!(a[k].as_f64().is_some_and(f64::is_finite), "{}: {k} = {}", a["name"], a[k]);
        }
        let ci = &a["ci95"]["shift"];
        assert!(ci[0].as_f64().unwrap() <= a["shift"].as_f64().unwrap() + 1e-12);
        assert!(ci[1].as_f64().unwrap() >= a["shift"].as_f64().unwrap() - 1e-12);
        assert!(a["logodds_shift"].is_null(), "no log-odds items were given");
    }
    // Steering in training changes what is learnt: a trained arm moved away from base.
    assert_ne!(arms[1]["shift"], json!(0.0));
    // Every trained arm: same initial adapter, same training rows, same batches (per-step token counts).
    let names: Vec<String> = arms.iter().map(|a| a["name"].as_str().unwrap().to_string()).collect();
    let ms: Vec<ArmMeasure> = names.iter().map(|n| measure(&out.join("arms").join(n))).collect();
    let (run_seed, reseeded): (Vec<&ArmMeasure>, Vec<&ArmMeasure>) = ms.iter().partition(|m| m.seed.is_none());
    assert!(run_seed.iter().all(|m| m.init_hash == ms[0].init_hash && m.data_hash == ms[0].data_hash));
    assert!(reseeded.iter().all(|m| m.init_hash != ms[0].init_hash), "seed-noise arms start elsewhere");
    let steps = |n: &str| -> Vec<(u64, u64)> {
        std::fs::read_to_string(out.join("arms").join(n).join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["tokens"].as_u64().unwrap(), v["targets"].as_u64().unwrap())
            })
            .collect()
    };
    let plain = steps("plain");
    assert_eq!(plain.len(), 2);
    for n in names.iter().skip(2).filter(|n| !n.contains("-seed")) {
        assert_eq!(steps(n), plain, "{n}: the same batches as plain");
        assert!(out.join("arms").join(n).join("adapter_model.safetensors").exists());
    }
    assert!(!out.join("arms/base/train_log.jsonl").exists(), "base is not trained");
    // The steer arms train with steering on: their on/off held-out NLL differ; plain's do not.
    let steer = arms.iter().find(|a| a["kind"] == "steer").unwrap();
    assert_ne!(steer["trait_nll_on"], steer["trait_nll_off"]);
    assert_eq!(arms[1]["trait_nll_on"], arms[1]["trait_nll_off"]);
    // results.json / results.md written, no temporary files left.
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_close(&on_disk, &results, "results.json");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| plain | plain |") && md.contains("PR"));
    let leftovers: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !["results.json", "results.md", "arms"].contains(&n.as_str()) && !PLOTS.contains(&n.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "stray files: {leftovers:?}");
    for p in PLOTS {
        let svg = std::fs::read_to_string(out.join(p)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("plain"), "{p}");
    }
    let tp = std::fs::read_to_string(out.join("training_projection.svg")).unwrap();
    assert!(tp.contains("steer-c4") && tp.contains("random-c1-s1000"), "every trained arm's curve");

    // A re-run resumes: nothing is retrained (train logs untouched), the same results.
    let mtimes: Vec<_> = names
        .iter()
        .skip(1)
        .map(|n| std::fs::metadata(out.join("arms").join(n).join("train_log.jsonl")).unwrap().modified().unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = run_all(out);
    // (f64s read back from result.json may differ in the last bit: serde_json's parser.)
    assert_close(&again, &results, "re-run");
    let mtimes_plain = mtimes[0];
    for (n, t) in names.iter().skip(1).zip(mtimes) {
        let now = std::fs::metadata(out.join("arms").join(n).join("train_log.jsonl")).unwrap().modified().unwrap();
        assert_eq!(now, t, "{n} was retrained");
    }

    // The protocol is not an arm setting: more coefficients extend the run, finished arms are kept.
    {
        let m = load();
        let h = m.engine.config.hidden;
        let (v, other) = (vec_row(h, 1), vec_row(h, 2));
        let p = protocol(&[1.0, 4.0, 2.0], &[1000], Some(("o".into(), other)), Some(7));
        let mut merged = |a: &LoraAdapter| {
            let mut f = ModelFiles::open(&tiny())?;
            a.merge_into(&mut f.tensors)?;
            LoadedModel::from_files(f, CpuGemmBackend, 128)
        };
        let more = vaccine::run(&m, &mut merged, "t", &p, &data(), &v, &options(), out, "tiny", &mut |_| {}).unwrap();
        assert!(more["arms"].as_array().unwrap().iter().any(|a| a["name"] == "steer-c2"));
        assert_eq!(more["settings"]["coeffs"], json!([1.0, 4.0, 2.0]));
        let plain_log = out.join("arms/plain/train_log.jsonl");
        assert_eq!(std::fs::metadata(plain_log).unwrap().modified().unwrap(), mtimes_plain, "plain was retrained");
    }

    // An arm recorded under other settings is refused, not silently mixed in.
    let m = load();
    let v = vec_row(m.engine.config.hidden, 1);
    let mut o = options();
    o.settings = json!({"test": 2});
    let mut merged = |_: &LoraAdapter| -> persona::Result<LoadedModel<CpuGemmBackend>> { unreachable!() };
    let p = protocol(&[1.0], &[], None, None);
    let e = vaccine::run(&m, &mut merged, "t", &p, &data(), &v, &o, out, "tiny", &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("other settings"), "{e}");
}

#[test]
fn eval_prompts_never_trained_and_bad_input() {
    let mut d = data();
    vaccine::check_data(&d).unwrap();
    // An evaluation prompt that is a training row's prompt is refused.
    let first = d.train[2].target.iter().position(|&t| t).unwrap();
    d.eval_prompts[1] = d.train[2].ids[..first].to_vec();
    let e = vaccine::check_data(&d).unwrap_err().to_string();
    assert!(e.contains("never be trained"), "{e}");
    // Too few questions.
    let mut d = data();
    d.eval_prompts.truncate(1);
    let e = vaccine::check_data(&d).unwrap_err().to_string();
    assert!(e.contains("at least 2"), "{e}");
    // No held-out rows.
    let mut d = data();
    d.benign_holdout.clear();
    assert!(vaccine::check_data(&d).unwrap_err().to_string().contains("too little data"));
    // A vector row of the wrong width.
    let m = load();
    let v = vec![1.0f32; m.engine.config.hidden + 1];
    let mut merged = |_: &LoraAdapter| -> persona::Result<LoadedModel<CpuGemmBackend>> { unreachable!() };
    let tmp = tempfile::tempdir().unwrap();
    let p = protocol(&[1.0], &[], None, None);
    let e = vaccine::run(&m, &mut merged, "t", &p, &data(), &v, &options(), tmp.path(), "tiny", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden size"), "{e}");
    // No coefficients, zero vector.
    assert!(plan_arms(2, &[1.0, 0.0], "t", &[]).is_err());
    assert!(plan_arms(2, &[0.0, 0.0], "t", &[1.0]).unwrap_err().to_string().contains("zero"));
    assert!(plan_arms(2, &[1.0, 0.0], "t", &[f32::NAN]).unwrap_err().to_string().contains("finite"));
    // Random arms are norm-matched, other-trait arms scaled to |v|.
    let v = [3.0f32, 4.0, 0.0, 0.0];
    let arms = control_arms(1, &v, &[0.5, 2.0, 8.0], &[7, 8], Some(("o", &[0.0, 0.0, 1.0, 0.0])), 2.0).unwrap();
    assert_eq!(arms.iter().filter(|a| a.kind == ArmKind::Random).count(), 6, "two directions × three coefficients");
    let dir = |a: &vaccine::Arm| persona::persona::common::unit(&a.op.as_ref().unwrap().vector);
    assert_eq!(dir(&arms[0]), dir(&arms[1]), "one direction per seed at every coefficient");
    assert_ne!(dir(&arms[0]), dir(&arms[3]), "seeds give different directions");
    for a in arms.iter().filter(|a| matches!(a.kind, ArmKind::Random | ArmKind::OtherTrait)) {
        let n = persona::persona::common::norm(&a.op.as_ref().unwrap().vector);
        assert!((n - 5.0).abs() < 1e-4, "{}: norm {n}", a.name);
    }
    let other = arms.iter().find(|a| a.kind == ArmKind::OtherTrait).unwrap();
    assert_eq!(other.coeff, Some(2.0), "other_trait at the given (best) coefficient");
    assert!(control_arms(1, &v, &[1.0], &[], Some(("o", &[0.0; 4])), 1.0).unwrap_err().to_string().contains("zero"));
}

#[test]
fn cli_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let out = out.to_str().unwrap();
    let vec = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/smollm2-135m-instruct/evil.safetensors");
    let (ok, _, err) = common::persona_cli(&["vaccine", "--trait", "no-such-trait", "--vector", vec, "--out-dir", out]);
    assert!(!ok && err.contains("no-such-trait"), "{err}");
    let model = tiny();
    let model = model.to_str().unwrap();
    // A vector for another model (SmolLM2's, on tiny-llama).
    let (ok, _, err) =
        common::persona_cli(&["vaccine", "--trait", "evil", "--vector", vec, "--out-dir", out, "--model", model]);
    assert!(!ok && err.contains("does not fit this model"), "{err}");
    // Too few evaluation questions.
    let (ok, _, err) = common::persona_cli(&[
        "vaccine",
        "--trait",
        "evil",
        "--vector",
        vec,
        "--out-dir",
        out,
        "--model",
        model,
        "--questions",
        "1",
    ]);
    assert!(!ok && err.contains("at least 2"), "{err}");
}
