//! `persona check`: a backend op by op against the CPU reference.

use anyhow::{bail, Result};
use clap::Args;
use persona::backend::check::{format_table, run_checks, run_cpu_kernel_checks, run_weight_format_checks};
use persona::backend::cpu::CpuBackend;
use persona::backend::cuda::{compile, CudaBackend};
use persona::backend::wgpu::WgpuBackend;

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
    /// CUDA: only compile every kernel with NVRTC (no GPU needed) and report registers, spills
    /// and shared memory per kernel; fails on a compile error or any spill.
    #[arg(long)]
    pub compile_only: bool,
    /// Architectures for --compile-only (comma-separated).
    #[arg(long, default_value = "sm_80,sm_90", requires = "compile_only")]
    pub arch: String,
}

pub fn run(a: CheckArgs) -> Result<()> {
    if a.compile_only {
        return compile_only(&a);
    }
    let (name, rows) = match a.backend {
        // The backend `generate --backend auto` picks (it says which on stderr).
        BackendKind::Auto => match super::auto_backend() {
            super::Auto::Cuda(b) => ("cuda", gpu_rows(&b, a.quick)),
            super::Auto::Wgpu(b) => ("wgpu", gpu_rows(&b, a.quick)),
            super::Auto::Cpu => ("cpu", cpu_rows(a.quick)),
        },
        BackendKind::Cpu => ("cpu", cpu_rows(a.quick)),
        BackendKind::Cuda => {
            let b = CudaBackend::new(0)?;
            eprintln!("checking cuda on {} ({})", b.device_name(), b.arch());
            ("cuda", gpu_rows(&b, a.quick))
        }
        BackendKind::Wgpu => {
            let b = WgpuBackend::new()?;
            eprintln!("checking wgpu on {}", b.describe());
            ("wgpu", gpu_rows(&b, a.quick))
        }
    };
    report(name, &rows, a.json)
}

/// The CPU backend's table: its fused op against the unfused composition, and the packed / SIMD
/// kernels against the widened plain reference.
fn cpu_rows(quick: bool) -> Vec<persona::backend::check::CheckRow> {
    let mut rows = run_checks(&CpuBackend, quick);
    rows.extend(run_cpu_kernel_checks(quick));
    rows
}

/// A GPU backend's table: every op and weight format against the CPU reference.
fn gpu_rows<B: persona::backend::Backend>(b: &B, quick: bool) -> Vec<persona::backend::check::CheckRow> {
    let mut rows = run_checks(b, quick);
    rows.extend(run_weight_format_checks(b, quick));
    rows
}

fn report(name: &str, rows: &[persona::backend::check::CheckRow], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        print!("{}", format_table(name, rows));
    }
    let fails = rows.iter().filter(|r| !r.pass).count();
    if fails > 0 {
        bail!("{name}: {fails} of {} parity cases failed", rows.len());
    }
    Ok(())
}

/// `--compile-only`: every kernel through NVRTC for each architecture, with ptxas' resource report.
fn compile_only(a: &CheckArgs) -> Result<()> {
    if a.backend != BackendKind::Cuda {
        bail!("--compile-only applies to --backend cuda");
    }
    let arches: Vec<String> = a.arch.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if arches.is_empty() {
        bail!("--arch: no architectures in `{}` (e.g. sm_80,sm_90)", a.arch);
    }
    let (rows, failures) = compile::compile_report(&arches)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"kernels": rows, "failures": failures}))?);
    } else {
        print!("{}", compile::format_report(&rows, &failures));
    }
    if !failures.is_empty() {
        bail!("cuda: {} kernel compile failures", failures.len());
    }
    Ok(())
}
