//! A safetensors file as the model reader maps it, every tensor widened to f32:
//! `SafetensorsSet::from_bytes`, `SafetensorsSet::get`, `HostTensor::to_f32`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persona::model::safetensors::SafetensorsSet;

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let Ok(set) = SafetensorsSet::from_bytes(Path::new("fuzz.safetensors"), data) else { return };
    let _ = set.origin();
    let names: Vec<String> = set.names().map(str::to_string).collect();
    for n in &names {
        assert!(set.contains(n));
        let t = set.get(n).expect("a listed tensor");
        let v = t.to_f32();
        assert_eq!(v.len(), t.numel(), "tensor `{n}` {:?}", t.shape);
        let _ = t.bytes().len();
    }
});
