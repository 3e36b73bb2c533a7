//! The parity harness on the CPU backend: the fused residual op against its unfused
//! composition (plain loops), and every row of the table well-formed.

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
