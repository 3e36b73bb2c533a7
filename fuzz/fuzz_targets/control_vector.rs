//! A llama.cpp control vector (GGUF) imported for the tiny model, exported again and re-imported;
//! and the server's upload path — `control_vector::control_vector_from_gguf`,
//! `export_control_vector`, `import_control_vector`, `serve::registry::parse_upload`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persona::model::gguf::GgufFile;
use persona::serve::registry::parse_upload;
use persona::steer::control_vector::{control_vector_from_gguf, export_control_vector, import_control_vector};

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let cfg = persona_fuzz::tiny_config();
    let _ = parse_upload(data, Some("cv"), cfg);
    let Ok(g) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data) else { return };
    let Ok(v) = control_vector_from_gguf(&g, cfg) else { return };
    assert_eq!((v.n_layers, v.hidden), (cfg.n_layers, cfg.hidden));
    let p = persona_fuzz::scratch().join("cv.gguf");
    if export_control_vector(&v, &p, "llama").is_ok() {
        let w = import_control_vector(&p, cfg).expect("an exported control vector imports");
        assert_eq!(w.data, v.data, "export/import changed the vector");
    }
});
