//! `persona bench`: well-formed output on a named shape, the memory guard, and bad flags.
//! (Throughput numbers are never asserted beyond being positive: benchmarks are not timed tests.)

use std::process::{Command, Output};

use persona::bench::{check_memory, check_memory_for, f32_bytes, host_bytes, random_model, Shape};
use persona::model::tensor::DType;

fn bench(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_persona"));
    c.arg("bench").args(args).env_remove("PERSONA_MODEL");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running persona bench")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn tiny_run_on_the_smollm2_shape_is_well_formed_json() {
    let o = bench(
        &[
            "--shape",
            "smollm2-135m",
            "-p",
            "16",
            "-n",
            "4",
            "-b",
            "1,2",
            "-r",
            "2",
            "--steer",
            "none,all,mixed",
            "--backend",
            "cpu",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "persona bench failed: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let info = &v["info"];
    let commit = info["persona_commit"].as_str().expect("persona_commit is a string");
    assert!(!commit.is_empty(), "empty commit");
    assert!(info["date"].as_str().is_some_and(|d| d.len() == 20 && d.ends_with('Z')), "{}", info["date"]);
    assert_eq!(info["backend"], "cpu");
    assert!(info["device"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(info["model"], "shape:smollm2-135m");
    assert_eq!((info["n_layers"].as_u64(), info["hidden"].as_u64()), (Some(30), Some(576)));
    assert_eq!((info["n_heads"].as_u64(), info["n_kv_heads"].as_u64()), (Some(9), Some(3)));
    assert_eq!((info["ffn"].as_u64(), info["vocab"].as_u64()), (Some(1536), Some(49152)));
    // SmolLM2-135M's published parameter count (HF model card / safetensors index).
    assert_eq!(info["params"].as_u64(), Some(134_515_008));

    let rows = v["rows"].as_array().expect("rows");
    let mut want = vec![];
    for s in ["none", "all", "mixed"] {
        want.push(("pp16".to_string(), 1, s.to_string()));
    }
    for b in [1, 2] {
        for s in ["none", "all", "mixed"] {
            want.push(("tg4".to_string(), b, s.to_string()));
        }
    }
    let got: Vec<(String, u64, String)> = rows
        .iter()
        .map(|r| {
            (r["test"].as_str().unwrap().to_string(), r["batch"].as_u64().unwrap(), r["steer"].as_str().unwrap().into())
        })
        .collect();
    let want: Vec<(String, u64, String)> = want.into_iter().map(|(t, b, s)| (t, b as u64, s)).collect();
    assert_eq!(got, want);
    for r in rows {
        let samples = r["samples_ts"].as_array().unwrap();
        assert_eq!(samples.len(), 2, "{r}");
        assert!(samples.iter().all(|x| x.as_f64().unwrap() > 0.0), "{r}");
        assert!(r["mean_ts"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["sd_ts"].as_f64().unwrap() >= 0.0, "{r}");
        assert!(r["ms_per_token"].as_f64().unwrap() > 0.0, "{r}");
    }
    // all/mixed vs none for pp16 batch 1, tg4 batch 1 and batch 2.
    let o = v["overheads"].as_array().unwrap();
    assert_eq!(o.len(), 6, "{o:?}");
    assert!(o.iter().all(|x| x["ratio"].as_f64().unwrap() > 0.0));
}

#[test]
fn markdown_is_the_default() {
    let o = bench(
        &[
            "--shape",
            "smollm2-135m",
            "-p",
            "4",
            "-n",
            "2",
            "-b",
            "1",
            "-r",
            "1",
            "--steer",
            "none,all",
            "--backend",
            "cpu",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| test | batch | steer | t/s | ms/token |"), "{out}");
    assert!(out.contains("| pp4 | 1 | all |") && out.contains("| tg2 | 1 | none |"), "{out}");
    assert!(out.contains("steer vs none"), "{out}");
}

#[test]
fn seven_b_shape_is_refused_where_memory_is_short() {
    // 8 GiB stands in for MemAvailable so the refusal does not depend on the machine.
    let o = bench(
        &["--shape", "qwen2.5-7b", "--backend", "cpu", "-r", "1"],
        &[("PERSONA_BENCH_MEM_AVAILABLE", "8589934592")],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    let need = f32_bytes(&Shape::by_name("qwen2.5-7b").unwrap().config);
    assert!(e.contains("qwen2.5-7b") && e.contains(&format!("{need} bytes")) && e.contains("MemAvailable"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn seven_b_shape_is_refused_on_this_machine_when_it_does_not_fit() {
    let need = f32_bytes(&Shape::by_name("llama3.1-8b").unwrap().config);
    match persona::bench::mem_available() {
        Some(avail) if avail < need => {
            let o = bench(&["--shape", "llama3.1-8b", "--backend", "cpu"], &[]);
            assert!(!o.status.success());
            let e = stderr(&o);
            assert!(e.contains(&format!("{need} bytes")) && e.contains("MemAvailable"), "{e}");
        }
        other => eprintln!("skipped: MemAvailable {other:?} ≥ {need} bytes, the 8B shape fits here"),
    }
}

#[test]
fn memory_guard_numbers() {
    let s = Shape::by_name("qwen2.5-7b").unwrap();
    // Qwen2.5-7B has 7,615,616,512 parameters (HF model card: 7.61B), f32 on the host.
    assert_eq!(f32_bytes(&s.config), 7_615_616_512 * 4);
    assert!(check_memory(&s, 24 << 30).is_err());
    assert!(check_memory(&s, 64 << 30).is_ok());
    let l = Shape::by_name("llama3.1-8b").unwrap();
    // Llama-3.1-8B: 8,030,261,248 parameters.
    assert_eq!(f32_bytes(&l.config), 8_030_261_248 * 4);
    assert!(Shape::by_name("gpt2").is_none());
}

#[test]
fn random_weights_are_seeded_nonzero_and_bf16_representable() {
    let s = Shape::by_name("smollm2-135m").unwrap();
    let (_, a) = random_model(&s, 7, DType::F32).unwrap();
    let wq = a.layers[3].wq.to_f32();
    assert!(wq.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x));
    let zeros = wq.iter().filter(|&&x| x == 0.0).count();
    assert!(zeros < wq.len() / 100, "{zeros} zeros of {}", wq.len());
    let rms = (wq.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / wq.len() as f64).sqrt();
    assert!((rms - 0.02).abs() < 0.001, "rms {rms}");
    let norm = a.layers[3].attn_norm.to_f32();
    let mean = norm.iter().map(|&x| x as f64).sum::<f64>() / norm.len() as f64;
    assert!((mean - 1.0).abs() < 0.01, "norm mean {mean}");
    // Same seed, same weights; another seed, others.
    let (_, b) = random_model(&s, 7, DType::F32).unwrap();
    assert_eq!(b.layers[3].wq.to_f32(), wq);
    let (_, c) = random_model(&s, 8, DType::F32).unwrap();
    assert_ne!(c.layers[3].wq.to_f32(), wq);
    // bf16 storage holds exactly the same values, two bytes each.
    let (_, h) = random_model(&s, 7, DType::BF16).unwrap();
    assert_eq!(h.layers[3].wq.dtype(), DType::BF16);
    assert_eq!(h.layers[3].wq.bytes().len(), wq.len() * 2);
    assert_eq!(h.layers[3].wq.to_f32(), wq);
    assert_eq!(h.embed.to_f32(), a.embed.to_f32());
}

#[test]
fn bf16_weights_run_and_count_in_the_memory_guard() {
    let s = Shape::by_name("llama3.1-8b").unwrap();
    let p = 8_030_261_248u64;
    assert_eq!(host_bytes(&s.config, DType::BF16, false), p * 2);
    // The CPU backend widens bf16 to f32 beside the bf16 copy.
    assert_eq!(host_bytes(&s.config, DType::BF16, true), p * 6);
    assert!(check_memory_for(&s, DType::BF16, false, 20 << 30).is_ok());
    let e = check_memory_for(&s, DType::BF16, true, 20 << 30).unwrap_err().to_string();
    assert!(e.contains(&format!("{} bytes", p * 6)), "{e}");

    let o = bench(
        &["--shape", "smollm2-135m", "--dtype", "bf16", "-p", "4", "-n", "2", "-b", "1", "-r", "1"]
            .into_iter()
            .chain(["--steer", "none", "--backend", "cpu", "--json"])
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    assert_eq!(v["info"]["dtype"], "bf16 (random)");
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_flags_name_the_flag() {
    for (args, flag) in [
        (vec!["--shape", "smollm2-135m", "-p", "0"], "n-prompt"),
        (vec!["--shape", "smollm2-135m", "-p", "16,abc"], "n-prompt"),
        (vec!["--shape", "smollm2-135m", "-r", "0"], "repetitions"),
        (vec!["--shape", "smollm2-135m", "-n", "0"], "n-gen"),
        (vec!["--shape", "smollm2-135m", "-b", "0"], "batch"),
        (vec!["--shape", "gpt-9"], "--shape"),
        (vec!["--shape", "smollm2-135m", "--steer", "some"], "--steer"),
        (vec!["--model", "/nonexistent/model.gguf", "--shape", "smollm2-135m"], "--model and --shape"),
        (vec!["--shape", "smollm2-135m", "--dtype", "q4"], "--dtype"),
    ] {
        let o = bench(&args, &[]);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(flag), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}
