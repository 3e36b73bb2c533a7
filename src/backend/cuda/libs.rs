//! Finding the CUDA libraries and headers at run time. cudarc loads libcuda and libnvrtc by
//! name and *panics* when it cannot, so everything here is checked first and turned into a
//! clear error that says where it looked.
//!
//! libnvrtc is looked for on the loader's path first, then in CUDA_HOME / CUDA_PATH,
//! /usr/local/cuda, and pip's `nvidia-cuda-nvrtc` wheels (site-packages/nvidia/cu13/lib or
//! nvidia/cuda_nvrtc/lib). A copy found by path is loaded by absolute path (with its
//! libnvrtc-builtins beside it); the dynamic loader then resolves cudarc's later load by
//! soname to that copy, so no LD_LIBRARY_PATH is needed. The headers NVRTC needs
//! (cuda_bf16.h, cuda_fp16.h) come from the same places (pip's `nvidia-cuda-runtime`).

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::Backend { backend: "cuda", msg: msg.into() }
}

/// A usable NVRTC: its version and the include directory with cuda_bf16.h.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    pub version: (i32, i32),
    pub include: PathBuf,
    /// Where libnvrtc was loaded from (None: by name, from the loader's path).
    pub lib: Option<PathBuf>,
}

/// The NVRTC this process uses, found and loaded once.
pub fn nvrtc() -> Result<&'static Nvrtc> {
    static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    NVRTC.get_or_init(find_nvrtc).as_ref().map_err(|m| err(m.clone()))
}

/// Whether libcuda (the NVIDIA driver) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// CUDA install roots named by the environment, then the default one.
fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
        .iter()
        .filter_map(|v| std::env::var_os(v).filter(|x| !x.is_empty()).map(PathBuf::from))
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

/// Python site-packages directories that may hold pip's nvidia packages: `python3`'s own
/// `sys.path`, then the usual places (in case python3 is not on PATH).
fn site_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("PERSONA_PYTHON_SITE") {
        dirs.extend(std::env::split_paths(&p));
    }
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import sys; print('\\n'.join(p for p in sys.path if p))"])
        .stderr(std::process::Stdio::null())
        .output()
    {
        dirs.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from));
    }
    let mut globs = vec![PathBuf::from("/usr/lib/python3/dist-packages")];
    let home = std::env::var_os("HOME").map(PathBuf::from);
    for base in
        [Some(PathBuf::from("/usr/local/lib")), Some(PathBuf::from("/usr/lib")), home.map(|h| h.join(".local/lib"))]
            .into_iter()
            .flatten()
    {
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("python3") {
                    globs.push(e.path().join("site-packages"));
                    globs.push(e.path().join("dist-packages"));
                }
            }
        }
    }
    for v in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(root) = std::env::var_os(v) {
            if let Ok(rd) = std::fs::read_dir(PathBuf::from(root).join("lib")) {
                globs.extend(rd.flatten().map(|e| e.path().join("site-packages")));
            }
        }
    }
    dirs.extend(globs);
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// Directories that may hold libnvrtc, in order.
fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for r in cuda_roots() {
        dirs.push(r.join("lib64"));
        dirs.push(r.join("lib"));
        dirs.push(r.join("targets/x86_64-linux/lib"));
    }
    for s in site_dirs() {
        dirs.push(s.join("nvidia/cu13/lib"));
        dirs.push(s.join("nvidia/cuda_nvrtc/lib"));
    }
    dirs
}

/// Directories that may hold cuda_bf16.h, in order (the one beside a found libnvrtc first).
fn include_dirs(lib: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(parent) = lib.and_then(Path::parent).and_then(Path::parent) {
        dirs.push(parent.join("include"));
    }
    for r in cuda_roots() {
        dirs.push(r.join("include"));
        dirs.push(r.join("targets/x86_64-linux/include"));
    }
    for s in site_dirs() {
        dirs.push(s.join("nvidia/cu13/include"));
        dirs.push(s.join("nvidia/cuda_runtime/include"));
    }
    dirs.push(PathBuf::from("/usr/include"));
    dirs
}

#[cfg(target_os = "linux")]
fn dlopen_global(path: &Path) -> std::result::Result<(), String> {
    extern "C" {
        fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        fn dlerror() -> *mut c_char;
    }
    const RTLD_NOW: c_int = 2;
    const RTLD_GLOBAL: c_int = 0x100;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid C string; the handle is kept for the life of the process.
    let h = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a C string owned by the loader, or null.
        let msg = unsafe {
            let e = dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("{}: {msg}", path.display()));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn dlopen_global(path: &Path) -> std::result::Result<(), String> {
    Err(format!("{}: loading by path is only implemented on Linux; put its folder on the library path", path.display()))
}

/// Load libnvrtc (and its builtins) from `dir` by absolute path, if it is there.
fn preload_from(dir: &Path) -> Option<std::result::Result<PathBuf, String>> {
    let lib = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].iter().map(|n| dir.join(n)).find(|p| p.is_file())?;
    let mut builtins: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.starts_with("libnvrtc-builtins.so") && !n.contains(".alt.")
        })
        .collect();
    builtins.sort();
    let r = (|| {
        for b in &builtins {
            dlopen_global(b)?;
        }
        dlopen_global(&lib)?;
        Ok(lib.clone())
    })();
    Some(r)
}

fn find_nvrtc() -> std::result::Result<Nvrtc, String> {
    let mut lib = None;
    if !nvrtc_present() {
        let dirs = lib_dirs();
        for d in &dirs {
            match preload_from(d) {
                Some(Ok(p)) => {
                    lib = Some(p);
                    break;
                }
                Some(Err(e)) => return Err(format!("libnvrtc found but could not be loaded: {e}")),
                None => {}
            }
        }
        if lib.is_none() || !nvrtc_present() {
            let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            return Err(format!(
                "libnvrtc not found; pip install nvidia-cuda-nvrtc==13.0.* or set CUDA_HOME \
                 (looked on the loader's path and in: {})",
                looked.join(", ")
            ));
        }
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); out-pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    let dirs = include_dirs(lib.as_deref());
    let include = dirs.iter().find(|d| d.join("cuda_bf16.h").is_file()).cloned().ok_or_else(|| {
        let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        format!(
            "CUDA headers not found (cuda_bf16.h, needed by NVRTC); pip install nvidia-cuda-runtime==13.0.* \
             or set CUDA_HOME (looked in: {})",
            looked.join(", ")
        )
    })?;
    Ok(Nvrtc { version: (major, minor), include, lib })
}

/// The `sm_XY` architectures this NVRTC can compile for.
pub fn supported_archs() -> Result<Vec<i32>> {
    nvrtc()?;
    let mut n: c_int = 0;
    // SAFETY: NVRTC is loaded; the buffer has the size NVRTC reported.
    unsafe {
        let r = cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n);
        if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(err(format!("nvrtcGetNumSupportedArchs failed: {r:?}")));
        }
        let mut v = vec![0 as c_int; n.max(0) as usize];
        let r = cudarc::nvrtc::sys::nvrtcGetSupportedArchs(v.as_mut_ptr());
        if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(err(format!("nvrtcGetSupportedArchs failed: {r:?}")));
        }
        Ok(v)
    }
}
