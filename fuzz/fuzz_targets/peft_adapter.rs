//! A PEFT LoRA adapter (`adapter_config.json`, then `adapter_model.safetensors`, split at
//! `persona_fuzz::SEP`) read for the tiny model and merged into its weights:
//! `LoraAdapter::from_parts`, `LoraAdapter::merge_into`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persona::model::lora::{LoraAdapter, Target};

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let parts = persona_fuzz::parts(data, 2);
    let Ok(config) = std::str::from_utf8(parts[0]) else { return };
    let m = persona_fuzz::tiny_model();
    let Ok(a) = LoraAdapter::from_parts(config, parts[1], Path::new("fuzz-adapter"), &m.config) else { return };
    let _ = a.config.scale();
    for l in 0..m.config.n_layers {
        for t in Target::ALL {
            let _ = a.pair(l, t);
        }
    }
    let mut tensors = m.tensors.clone();
    a.merge_into(&mut tensors).expect("an adapter read for this model merges into it");
});
