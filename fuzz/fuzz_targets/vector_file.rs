//! A persona vector file (safetensors), then everything done with a loaded vector: norms, unit
//! rows, layer selection, arithmetic, recorded layer and mean norms, a write/read round trip,
//! and the server's upload path — `PersonaVector::from_safetensors_bytes`,
//! `to_safetensors_bytes`, `steer::spec::{recorded_layer, mean_norms}`,
//! `serve::registry::parse_upload`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persona::serve::registry::parse_upload;
use persona::steer::spec::{mean_norms, recorded_layer};
use persona::steer::vector::{cosine_table, PersonaVector};

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let cfg = persona_fuzz::tiny_config();
    let _ = parse_upload(data, Some("upload"), cfg);
    let _ = parse_upload(data, None, cfg);
    let Ok(v) = PersonaVector::from_safetensors_bytes(data, Path::new("fuzz.safetensors")) else { return };
    let n = v.n_layers;
    assert_eq!(v.data.len(), (n + 1) * v.hidden);
    let _ = (v.summary(), v.norms(), v.max_norm_layer(), v.origin(), v.rows());
    for l in 0..=n.min(64) {
        let _ = (v.unit(l), v.check_layer(l), v.is_zero(l), v.norm(l), v.cosine(&v, l));
    }
    let _ = v.only_layers(&[0, n, n + 1]);
    let _ = v.only_layers(&[n / 2]);
    let _ = (v.scaled(-2.5), v.add(&v), v.orthogonalized_against(&v), cosine_table(&[&v, &v], n));
    let _ = (recorded_layer(&v), mean_norms(&v), v.check_model(cfg.hidden, cfg.n_layers));
    let bytes = v.to_safetensors_bytes().expect("a loaded vector serialises");
    let w = PersonaVector::from_safetensors_bytes(&bytes, Path::new("fuzz.safetensors")).expect("round trip");
    assert_eq!((w.n_layers, w.hidden, &w.metadata), (n, v.hidden, &v.metadata));
    assert!(w.data.iter().zip(&v.data).all(|(a, b)| a.to_bits() == b.to_bits()), "round trip changed values");
});
