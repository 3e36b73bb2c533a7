//! `persona check`: a backend op by op against the CPU reference.

use anyhow::{bail, Result};
use clap::Args;
use persona::backend::check::{format_table, run_checks};
use persona::backend::cpu::CpuBackend;

use super::BackendKind;

#[derive(Args)]
pub struct CheckArgs {
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// Small shapes only (1, 7, 33 tokens).
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: CheckArgs) -> Result<()> {
    let (name, rows) = match a.backend {
        BackendKind::Auto | BackendKind::Cpu => ("cpu", run_checks(&CpuBackend, a.quick)),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", format_table(name, &rows));
    }
    let fails = rows.iter().filter(|r| !r.pass).count();
    if fails > 0 {
        bail!("{name}: {fails} of {} parity cases failed", rows.len());
    }
    Ok(())
}
