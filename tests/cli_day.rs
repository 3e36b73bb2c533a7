//! The researcher's day with the CLI (issue 20): each rough edge a new user hit, checked
//! through the `persona` binary as it is typed (or pasted from the README).

mod common;
use common::*;

use std::path::PathBuf;

fn tiny(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// Comma lists that start negative parse as typed (`--coeffs -2,0,2`, not only `--coeffs=-2,0,2`):
/// the value reaches persona's own parser whole, so its errors name the bad element.
#[test]
fn negative_lists_parse_as_typed() {
    let m = tiny("tiny-llama");
    let v = m.join("test_vector.safetensors");
    let eval = |extra: &[&str]| {
        persona_cli(&[&["eval", "--backend", "cpu", "--model", s(&m), "--vector", s(&v)], extra].concat())
    };
    // The whole list arrives: its third element is the one reported.
    let (ok, _, err) = eval(&["--coeffs", "-2,0,x"]);
    assert!(!ok && err.contains("--coeffs: `x` is not a finite number"), "{err}");
    // A good negative list gets past parsing to the next requirement (the fixture vector records no
    // trait), and never to clap's "unexpected argument".
    let (ok, _, err) = eval(&["--coeffs", "-2,0,2"]);
    assert!(!ok && !err.contains("unexpected argument") && err.contains("persona.trait"), "{err}");
    let (ok, _, err) = eval(&["--coeffs", "-2.5,-1", "--layers", "-1"]);
    assert!(!ok && err.contains("--layers") && err.contains("layers `-1`"), "{err}");
    // monitor's --layers and demo's --coeff take hyphenated values too.
    let (ok, _, err) =
        persona_cli(&["monitor", "--backend", "cpu", "--model", s(&m), "--vector", s(&v), "--layers", "-3"]);
    assert!(!ok && !err.contains("unexpected argument"), "{err}");
    let (ok, _, err) = persona_cli(&[
        "demo",
        "--backend",
        "cpu",
        "--model",
        s(&m),
        "--coeff",
        "-2",
        "--vector",
        "/nonexistent.safetensors",
    ]);
    assert!(!ok && !err.contains("unexpected argument") && err.contains("nonexistent"), "{err}");
}
