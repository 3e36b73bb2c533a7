//! The kernels: sources embedded with include_str!, compiled by NVRTC to a CUBIN for one
//! architecture, cached on disk by (source hash, arch, NVRTC version), and the compile-only
//! report (registers, spills, shared memory per kernel, from ptxas' `-v` output, which NVRTC
//! returns in its program log when given `--ptxas-options=-v`).

use std::ffi::{c_char, CString};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::libs::{err, nvrtc, Nvrtc};
use crate::error::Result;

/// The header every kernel file includes (handed to NVRTC as `common.cuh`).
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One kernel file and the extern "C" entries it must define.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

pub const FILES: &[KernelFile] = &[
    KernelFile {
        name: "embed",
        source: include_str!("../../../kernels/embed.cu"),
        entries: &["embed_bf16", "embed_f16", "embed_f32"],
    },
    KernelFile {
        name: "residual_steer_norm",
        source: include_str!("../../../kernels/residual_steer_norm.cu"),
        entries: &["residual_steer_norm_f32"],
    },
    KernelFile {
        name: "matmul",
        source: include_str!("../../../kernels/matmul.cu"),
        entries: &["matmul_gemv_bf16", "matmul_gemm_bf16", "matmul_gemv_f16", "matmul_gemm_f16"],
    },
    KernelFile { name: "rope", source: include_str!("../../../kernels/rope.cu"), entries: &["rope_f32"] },
    KernelFile {
        name: "attention",
        source: include_str!("../../../kernels/attention.cu"),
        entries: &["attention_store_f32", "attention_prefill_f32", "attention_decode_f32"],
    },
    KernelFile { name: "silu_mul", source: include_str!("../../../kernels/silu_mul.cu"), entries: &["silu_mul_f32"] },
    KernelFile {
        name: "gather_rows",
        source: include_str!("../../../kernels/gather_rows.cu"),
        entries: &["gather_rows_f32"],
    },
];

pub fn file(name: &str) -> Option<&'static KernelFile> {
    FILES.iter().find(|f| f.name == name)
}

/// NVRTC options for `arch` (e.g. "sm_90"). Precise division and sqrt, no fast math: the
/// kernels are compared with the CPU reference to f32 rounding.
fn options(nv: &Nvrtc, arch: &str, verbose: bool) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
        "-lineinfo".into(),
        format!("-I{}", nv.include.display()),
    ];
    if verbose {
        o.push("--ptxas-options=-v".into());
    }
    o
}

/// A compiled kernel file: the CUBIN and NVRTC's log (ptxas' report with `verbose`).
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn nvrtc_call(r: cudarc::nvrtc::sys::nvrtcResult, what: &str) -> Result<()> {
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(err(format!("{what} failed: {r:?}")))
    }
}

/// Compile one kernel file for `arch` to a CUBIN. A compile error returns NVRTC's log.
pub fn compile(f: &KernelFile, arch: &str, verbose: bool) -> Result<Compiled> {
    use cudarc::nvrtc::sys;
    let nv = nvrtc()?;
    let src = CString::new(f.source).map_err(|_| err(format!("kernels/{}.cu contains a NUL byte", f.name)))?;
    let name = CString::new(format!("{}.cu", f.name)).expect("no NUL in kernel names");
    let header = CString::new(COMMON).map_err(|_| err("kernels/common.cuh contains a NUL byte"))?;
    let header_name = CString::new("common.cuh").expect("no NUL");
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let opts: Vec<CString> =
        options(nv, arch, verbose).into_iter().map(|o| CString::new(o).expect("no NUL in options")).collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the calls; the
    // program is destroyed before returning; buffers have the sizes NVRTC reported.
    unsafe {
        nvrtc_call(
            sys::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), 1, headers.as_ptr(), header_names.as_ptr()),
            "nvrtcCreateProgram",
        )?;
        let compiled = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let mut log_len = 0usize;
        let mut log = String::new();
        if sys::nvrtcGetProgramLogSize(prog, &mut log_len) == sys::nvrtcResult::NVRTC_SUCCESS && log_len > 1 {
            let mut buf = vec![0u8; log_len];
            if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) == sys::nvrtcResult::NVRTC_SUCCESS {
                log = String::from_utf8_lossy(&buf[..log_len - 1]).into_owned();
            }
        }
        let result = (|| {
            if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(err(format!("kernels/{}.cu does not compile for {arch}:\n{log}", f.name)));
            }
            let mut size = 0usize;
            nvrtc_call(sys::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize")?;
            let mut cubin = vec![0u8; size];
            nvrtc_call(sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char), "nvrtcGetCUBIN")?;
            Ok(Compiled { cubin, log: log.clone() })
        })();
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// The CUBIN of `f` for `arch`, from the disk cache when it is there (keyed by the sources,
/// options, arch and NVRTC version), else compiled and stored.
pub fn cubin(f: &KernelFile, arch: &str) -> Result<Vec<u8>> {
    let nv = nvrtc()?;
    let mut h = Sha256::new();
    h.update(COMMON.as_bytes());
    h.update(f.source.as_bytes());
    for o in options(nv, arch, false) {
        // The include path changes nothing in the output; keep the key stable across machines.
        if !o.starts_with("-I") {
            h.update(o.as_bytes());
        }
    }
    let hash: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path: Option<PathBuf> = crate::fetch::cache_dir()
        .map(|d| d.join("cuda").join(format!("{}-{arch}-nvrtc{}.{}-{hash}.cubin", f.name, nv.version.0, nv.version.1)));
    if let Some(p) = &path {
        if let Ok(b) = std::fs::read(p) {
            if !b.is_empty() {
                return Ok(b);
            }
        }
    }
    let c = compile(f, arch, false)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a recompile next time.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &c.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(c.cubin)
}

/// ptxas' resource usage of one kernel on one architecture.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct KernelUsage {
    pub file: String,
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack: u32,
    /// Static shared memory (dynamic shared memory is sized at launch).
    pub smem: u32,
}

fn number_before(s: &str, unit: &str) -> Option<u32> {
    let at = s.find(unit)?;
    s[..at].split_whitespace().last()?.parse().ok()
}

/// Parse ptxas' `-v` report:
/// `Compiling entry function 'k' for 'sm_90'`, `N bytes stack frame, S bytes spill stores, L bytes
/// spill loads`, `Used R registers, ... B bytes smem, ...`.
pub fn parse_ptxas(log: &str, file: &str, arch: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelUsage { file: file.into(), kernel, arch: arch.into(), ..Default::default() });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            cur.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            cur.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            cur.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used") && line.contains("registers") {
            cur.registers = number_before(line, "registers").unwrap_or(0);
            cur.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// Compile every kernel file for each architecture with ptxas' report. Returns the usage of
/// every kernel, and one message per failure (compile error, missing entry, spill).
pub fn compile_report(arches: &[String]) -> Result<(Vec<KernelUsage>, Vec<String>)> {
    nvrtc()?;
    let supported = super::libs::supported_archs()?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for arch in arches {
        let num = arch.strip_prefix("sm_").and_then(|n| n.parse::<i32>().ok());
        match num {
            Some(n) if supported.contains(&n) => {}
            _ => {
                failures.push(format!(
                    "{arch}: not an architecture this NVRTC compiles for (supported: {})",
                    supported.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(", ")
                ));
                continue;
            }
        }
        for f in FILES {
            match compile(f, arch, true) {
                Ok(c) => {
                    let usage = parse_ptxas(&c.log, f.name, arch);
                    for e in f.entries {
                        if !usage.iter().any(|u| u.kernel == *e) {
                            failures.push(format!("kernels/{}.cu ({arch}): entry `{e}` missing", f.name));
                        }
                    }
                    for u in &usage {
                        if u.spill_stores > 0 || u.spill_loads > 0 {
                            failures.push(format!(
                                "{} ({arch}) spills: {} bytes stored, {} loaded",
                                u.kernel, u.spill_stores, u.spill_loads
                            ));
                        }
                    }
                    rows.extend(usage);
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    Ok((rows, failures))
}

/// The compile report as a table.
pub fn format_report(rows: &[KernelUsage], failures: &[String]) -> String {
    let mut s = format!(
        "{:<22} {:<26} {:>6} {:>5} {:>7} {:>7} {:>6} {:>9}\n",
        "file", "kernel", "arch", "regs", "spill_st", "spill_ld", "stack", "smem(B)"
    );
    for r in rows {
        s += &format!(
            "{:<22} {:<26} {:>6} {:>5} {:>7} {:>7} {:>6} {:>9}\n",
            format!("{}.cu", r.file),
            r.kernel,
            r.arch,
            r.registers,
            r.spill_stores,
            r.spill_loads,
            r.stack,
            r.smem
        );
    }
    for f in failures {
        s += &format!("FAIL: {f}\n");
    }
    s += &format!("cuda compile: {} kernels compiled, {} failures\n", rows.len(), failures.len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'matmul_gemm_bf16' for 'sm_80'\n\
ptxas info    : Function properties for matmul_gemm_bf16\n\
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 96 registers, used 1 barriers, 10240 bytes smem, 396 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'rope_f32' for 'sm_80'\n\
ptxas info    : Function properties for rope_f32\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 22 registers, used 0 barriers\n";
        let u = parse_ptxas(log, "x", "sm_80");
        assert_eq!(u.len(), 2);
        assert_eq!(
            u[0],
            KernelUsage {
                file: "x".into(),
                kernel: "matmul_gemm_bf16".into(),
                arch: "sm_80".into(),
                registers: 96,
                spill_stores: 4,
                spill_loads: 12,
                stack: 8,
                smem: 10240
            }
        );
        assert_eq!((u[1].kernel.as_str(), u[1].registers, u[1].smem, u[1].spill_loads), ("rope_f32", 22, 0, 0));
    }

    #[test]
    fn every_kernel_file_declares_its_entries() {
        for f in FILES {
            assert!(f.source.contains("#include \"common.cuh\""), "{}", f.name);
            for e in f.entries {
                let (op, dtype) = e.rsplit_once('_').unwrap();
                assert!(["bf16", "f16", "f32"].contains(&dtype), "{e}: entries are named op_dtype");
                // Entries are spelled out or emitted by a macro (op_##dtype).
                let macro_form = format!("{}_##dtype", op);
                assert!(f.source.contains(e) || f.source.contains(&macro_form), "{e} not in kernels/{}.cu", f.name);
            }
        }
    }
}
