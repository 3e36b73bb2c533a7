//! The parity harness on the CPU backend: the fused residual op against its unfused
//! composition (plain loops), and every row of the table well-formed.

mod common;

use persona::backend::check::{format_table, run_checks};
use persona::backend::cpu::CpuBackend;

#[test]
fn cpu_passes_its_own_parity_table() {
    let rows = run_checks(&CpuBackend, true);
    let table = format_table("cpu", &rows);
    eprintln!("{table}");
    assert!(rows.iter().any(|r| r.op == "fused_vs_unfused"));
    assert!(rows.iter().all(|r| r.pass), "{table}");
}

/// `persona check --backend auto` checks the backend `generate --backend auto` runs on (here the
/// CPU, or a GPU where there is one), and says which as `generate` does.
#[test]
fn check_auto_checks_the_backend_generate_picks() {
    let tiny = common::fixtures().join("tiny-llama");
    let backend_line = |err: &str| err.lines().find(|l| l.starts_with("backend: ")).map(str::to_string);
    let (ok, out, err) = common::persona_cli(&["check", "--backend", "auto", "--quick"]);
    assert!(ok, "{out}{err}");
    let (ok2, _, err2) = common::persona_cli(&[
        "generate",
        "--backend",
        "auto",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "1",
    ]);
    assert!(ok2, "{err2}");
    let picked = backend_line(&err).expect("check names the backend it picked");
    assert_eq!(Some(picked.clone()), backend_line(&err2));
    let name = picked.trim_start_matches("backend: ").split(' ').next().unwrap().to_string();
    assert!(out.contains(&format!("{name}: ")), "the table is the picked backend's: {out}");
}
