//! A trait definition (JSON), validated, rendered, written back and planned:
//! `TraitDef::from_json`, `render_judge`, `to_json`, `dataset::plan`, `monitor::ladder`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona::persona::dataset::{plan, training_questions, DatasetOptions, Kind};
use persona::persona::monitor::ladder;
use persona::persona::traits::TraitDef;

fuzz_target!(|data: &[u8]| {
    persona_fuzz::init();
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(t) = TraitDef::from_json(text, "fuzz.json") else { return };
    let _ = (t.render_judge("Q {answer}", "A {question}"), t.render_coherence("", "{"), t.summary());
    let _ = (t.pos_instructions().count(), t.neg_instructions().count());
    let again = TraitDef::from_json(&t.to_json(), "fuzz.json").expect("a trait's own JSON reads back");
    assert_eq!(again, t);
    let _ = training_questions(&t);
    for (kind, mix) in [(Kind::Pos, None), (Kind::Neg, Some(0.5)), (Kind::Benign, None)] {
        let _ = plan(&t, &DatasetOptions { kind, mix, questions: 4, samples: 2, ..Default::default() });
    }
    let _ = ladder(&t, 3);
});
