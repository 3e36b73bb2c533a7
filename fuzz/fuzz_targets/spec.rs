//! `--steer` / `--monitor` spec strings, layer lists and `when=` conditions, parsed and resolved
//! against the tiny model with a real vector file (the spec's path is replaced by it):
//! `SteerSpec::parse`, `MonitorSpec::parse`, `Layers::parse`, `WhenSpec::parse_condition`,
//! `steer::spec::resolve`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use persona::steer::spec::{resolve, Layers, MonitorSpec, SteerSpec, WhenSpec};

fn vector_file() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = persona_fuzz::scratch().join("evil.safetensors");
        persona_fuzz::tiny_vector().save(&p).expect("vector file");
        p
    })
}

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let Ok(s) = std::str::from_utf8(data) else { return };
    let cfg = persona_fuzz::tiny_config();
    if let Ok(l) = Layers::parse(s) {
        let _ = l.resolve(cfg.n_layers);
    }
    let _ = WhenSpec::parse_condition(s);
    let steer: Vec<SteerSpec> = SteerSpec::parse(s).into_iter().collect();
    let monitor: Vec<MonitorSpec> = MonitorSpec::parse(s).into_iter().collect();
    if steer.is_empty() && monitor.is_empty() {
        return;
    }
    let p = persona::steer::spec::VectorRef::Name(vector_file().to_string_lossy().to_string());
    let steer: Vec<SteerSpec> = steer.into_iter().map(|x| SteerSpec { vector: p.clone(), ..x }).collect();
    let monitor: Vec<MonitorSpec> = monitor.into_iter().map(|x| MonitorSpec { vector: p.clone(), ..x }).collect();
    let mut warnings = vec![];
    let _ = resolve(&steer, &monitor, cfg, &mut warnings);
    let _ = resolve(&steer, &[], cfg, &mut warnings);
});
