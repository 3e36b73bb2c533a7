//! A JSONL dataset: as `persona dataset` rows (`dataset::rows_from_str`, `compose_mixture`) and
//! as fine-tuning rows tokenized with the tiny model's tokenizer and chat template
//! (`train::data::parse_rows`, `split_holdout`).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use persona::persona::dataset::{compose_mixture, rows_from_str, DatasetOptions, Kind};
use persona::persona::traits::TraitDef;
use persona::train::data::{parse_rows, split_holdout, DataOptions};

fn evil() -> &'static TraitDef {
    static T: OnceLock<TraitDef> = OnceLock::new();
    T.get_or_init(|| TraitDef::from_json(include_str!("../../traits/evil.json"), "evil.json").expect("evil trait"))
}

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.jsonl");
    if let Ok(rows) = rows_from_str(text, path) {
        let rows: Vec<_> = rows.into_iter().map(|(_, r)| r).collect();
        for r in &rows {
            let _ = (r.question(), r.answer(), r.key(), serde_json::to_string(r));
        }
        let o = DatasetOptions { kind: Kind::Pos, mix: Some(0.5), questions: 4, samples: 2, ..Default::default() };
        let _ = compose_mixture(evil(), &o, &rows, &rows);
    }
    for label in [None, Some("pos".to_string())] {
        let opts = DataOptions { max_len: 256, label };
        if let Ok(ex) = parse_rows(text, path, &persona_fuzz::TinyText, &opts) {
            for e in &ex {
                assert_eq!(e.ids.len(), e.target.len());
                assert!(e.ids.len() <= 256 && !e.target.first().copied().unwrap_or(false));
            }
            let _ = split_holdout(ex, 0.25, 7);
        }
    }
});
