"""pytest suite of the Python bindings (issue 18): on the tiny fixture models (fast, token-id
prompts) and on the default model (text, the shipped vectors, the CLI and the HTTP server).

A resource that is missing (the default model, the persona binary) fails the test where
PERSONA_REQUIRE is set (CI, scripts/test.sh) and is SKIPPED elsewhere, logged like the Rust tests'.
"""

import json
import os
import subprocess
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import persona

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "tiny-llama"
BIN = ROOT / "target" / "release" / "persona"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "persona"
DEFAULT_MODEL = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"


def missing(what, how):
    """Fail under PERSONA_REQUIRE; elsewhere skip, saying SKIPPED and logging it."""
    if os.environ.get("PERSONA_REQUIRE"):
        pytest.fail(f"{what} is missing, and PERSONA_REQUIRE is set ({how})")
    log = ROOT / "target" / "tmp" / "persona-skipped.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"python: {what} is missing ({how})\n")
    pytest.skip(f"SKIPPED: {what} is missing ({how})")


@pytest.fixture(scope="session")
def tiny():
    return persona.Model.load(str(TINY), backend="cpu", context=256)


@pytest.fixture(scope="session")
def default():
    if not DEFAULT_MODEL.exists():
        missing("the default model", "`persona fetch` downloads it")
    return persona.Model.load(str(DEFAULT_MODEL), backend="cpu")


@pytest.fixture(scope="session")
def binary():
    if not BIN.exists():
        missing("target/release/persona", "`cargo build --release`")
    return str(BIN)


def unit_rows(m, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m.n_layers + 1, m.hidden)).astype(np.float32)


# ---- the package itself ----------------------------------------------------------------------


def test_the_installed_wheel_is_imported():
    # Imported from site-packages (pip install ./python), not from the source tree.
    assert "site-packages" in persona.__file__, persona.__file__
    assert persona.__version__ == persona.VERSION
    assert issubclass(persona.PersonaError, ValueError)


# ---- vectors ---------------------------------------------------------------------------------


def test_vector_numpy_round_trip_and_arithmetic(tmp_path, tiny):
    a_np = unit_rows(tiny, 1)
    a = persona.Vector.from_numpy(a_np, name="a", metadata={"persona.layer": "2"})
    b = persona.Vector.from_numpy(unit_rows(tiny, 2).astype(np.float64), name="b")  # cast to float32
    out = a.to_numpy()
    assert out.dtype == np.float32 and out.shape == (tiny.n_layers + 1, tiny.hidden)
    assert np.array_equal(out, a_np)
    assert (a.n_layers, a.hidden, a.layer, a.metadata["persona.layer"]) == (tiny.n_layers, tiny.hidden, 2, "2")
    assert np.allclose((a + b).to_numpy(), a_np + b.to_numpy())
    assert np.allclose((a - b).to_numpy(), a_np - b.to_numpy())
    assert np.allclose((2.5 * a).to_numpy(), 2.5 * a_np) and np.allclose((a * 2.5).to_numpy(), 2.5 * a_np)
    assert np.allclose((-a).to_numpy(), -a_np)
    assert np.allclose(a.norms(), np.linalg.norm(a_np, axis=1), rtol=1e-5)
    cos = a.cosine(b)
    expect = (a_np * b.to_numpy()).sum(1) / np.linalg.norm(a_np, axis=1) / np.linalg.norm(b.to_numpy(), axis=1)
    assert cos.shape == (tiny.n_layers + 1,) and np.allclose(cos, expect, atol=1e-5)
    assert abs(a.orthogonalize(b).cosine(b, 1)) < 1e-5
    p = tmp_path / "a.safetensors"
    a.save(str(p))
    assert np.array_equal(persona.Vector.load(str(p)).to_numpy(), a_np)
    # llama.cpp control vectors (they steer residual indices 2..=N): export, then import.
    g = tmp_path / "a.gguf"
    with pytest.raises(ValueError, match="llama.cpp control vectors cannot steer it"):
        a.export_control_vector(str(g))
    steerable = a.only_layers(list(range(2, tiny.n_layers + 1)))
    steerable.export_control_vector(str(g))
    back = persona.Vector.import_control_vector(str(g), tiny)
    assert np.allclose(back.to_numpy(), steerable.to_numpy())
    assert not back.to_numpy()[:2].any()
    with pytest.raises(ValueError, match="not finite"):
        persona.Vector.from_numpy(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="different shapes"):
        a.cosine(persona.Vector.from_numpy(np.ones((3, 4))))


# ---- generation on the tiny model ------------------------------------------------------------


def test_generation_arrays_have_documented_shapes(tiny):
    v = persona.Vector.from_numpy(unit_rows(tiny), name="probe")
    g = tiny.generate([1, 5, 9, 2], max_tokens=6, ignore_eos=True, monitor=[{"vector": v, "layers": "all"}])
    assert g.ids.dtype == np.uint32 and g.ids.shape == (6,)
    assert g.prompt_ids.tolist() == [1, 5, 9, 2]
    assert g.finish_reason == "length"
    assert g.layers == {"probe": list(range(1, tiny.n_layers + 1))}
    p = g.projections["probe"]
    assert p.dtype == np.float32 and p.shape == (6, tiny.n_layers)
    assert g.prompt_projections["probe"].shape == (4, tiny.n_layers)
    assert np.isfinite(p).all()


def test_stream_yields_one_token_per_generated_token_and_the_same_result(tiny):
    v = persona.Vector.from_numpy(unit_rows(tiny), name="probe")
    kw = dict(max_tokens=7, ignore_eos=True, monitor=[{"vector": v, "layers": [1, 2]}],
              steer=[{"vector": v, "layers": 2, "coeff": 3.0}])
    full = tiny.generate([3, 4, 5], **kw)
    stream = tiny.generate([3, 4, 5], stream=True, **kw)
    toks = list(stream)
    assert len(toks) == 7 == len(full.ids)
    assert [t.index for t in toks] == list(range(7))
    assert [t.id for t in toks] == full.ids.tolist()
    assert all(t.projections["probe"].shape == (2,) for t in toks)
    # Each token's projections are read at the position that produced it (as the HTTP stream's).
    assert np.array_equal(toks[0].projections["probe"], full.prompt_projections["probe"][-1])
    for i in range(1, 7):
        assert np.array_equal(toks[i].projections["probe"], full.projections["probe"][i - 1])
    assert stream.result is not None and stream.result.ids.tolist() == full.ids.tolist()
    assert np.array_equal(stream.result.projections["probe"], full.projections["probe"])


def test_steering_changes_the_tokens_and_a_batch_takes_a_plan_per_prompt(tiny):
    v = persona.Vector.from_numpy(unit_rows(tiny, 7), name="v")
    prompt = [1, 5, 9, 2]
    steer = [{"vector": v, "layers": "1-2", "coeff": 8.0}]
    plain = tiny.generate(prompt, max_tokens=8, ignore_eos=True)
    steered = tiny.generate(prompt, max_tokens=8, ignore_eos=True, steer=steer)
    assert plain.ids.tolist() != steered.ids.tolist(), "a coefficient of 8 on every layer changes the greedy tokens"
    both = tiny.generate([prompt, prompt], max_tokens=8, ignore_eos=True, steer=[[], steer])
    assert [g.ids.tolist() for g in both] == [plain.ids.tolist(), steered.ids.tolist()]
    assert steered.receipts[0]["op"] == "add" and steered.receipts[0]["layers"] == [1, 2]


def test_threads_calling_generate_get_their_own_results(tiny):
    v = persona.Vector.from_numpy(unit_rows(tiny, 3), name="v")
    jobs = [dict(max_tokens=6, ignore_eos=True, temperature=0.8, seed=s,
                 steer=[{"vector": v, "layers": 1, "coeff": float(s)}]) for s in range(6)]
    expect = [tiny.generate([2, 3, 4], **j).ids.tolist() for j in jobs]
    got = [None] * len(jobs)

    def run(i):
        got[i] = tiny.generate([2, 3, 4], **jobs[i]).ids.tolist()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expect
    assert len({tuple(x) for x in expect}) > 1, "different seeds and coefficients give different tokens"


def test_bad_requests_raise_value_error_with_the_library_message(tiny, binary):
    v = persona.Vector.from_numpy(unit_rows(tiny), name="v")
    cases = [
        ({"vector": v, "layers": 1, "coeff": "abc"}, "`coeff` must be a finite number with magnitude at most 10000"),
        ({"vector": v, "layers": 1, "coeff": 1, "colour": "red"}, "unknown key `colour`"),
        ({"vector": v, "layers": 99, "coeff": 1}, f"layer 99 is out of range: this model has layers 0..={tiny.n_layers}"),
        ({"vector": v, "layers": 1, "op": "boost"}, "unknown op `boost` (add, ablate, clamp, center)"),
        ({"vector": v, "layers": 1}, "op=add needs `coeff`"),
    ]
    for op, message in cases:
        with pytest.raises(ValueError) as e:
            tiny.generate([1, 2], max_tokens=1, steer=[op])
        assert str(e.value).startswith("steer[0]: ") and message in str(e.value), str(e.value)
    with pytest.raises(persona.PersonaError, match=r"monitor\[0\]: vector `no-such-vector`: no such file"):
        tiny.generate([1, 2], max_tokens=1, monitor=["no-such-vector"])
    with pytest.raises(persona.PersonaError, match=r"prompt 1: steer\[0\]: "):
        tiny.generate([[1, 2], [3, 4]], max_tokens=1, steer=[[], [{"vector": v, "layers": 1, "coeff": "x"}]])
    with pytest.raises(persona.PersonaError, match="does not fit the context"):
        tiny.generate([1, 2], max_tokens=10**9)
    with pytest.raises(persona.PersonaError, match="system= cannot be added to token ids"):
        tiny.generate([1, 2], max_tokens=1, system="Be brief.")
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        tiny.generate([1, 2], max_tokens=0)
    # The CLI says the same for the same op.
    path = TINY / "test_vector.safetensors"
    r = subprocess.run([binary, "generate", "--backend", "cpu", "--model", str(TINY), "--prompt-ids", "1,2",
                        "--steer", f"vector={path},layers=1,coeff=abc"], capture_output=True, text=True)
    assert r.returncode != 0 and cases[0][1] in r.stderr, r.stderr


def test_cpu_activations_q8_matches_the_cli_and_is_undone(default, binary):
    with pytest.raises(ValueError, match="expected f32 or q8"):
        persona.set_cpu_activations("int4")
    exact = default.generate("Name three colours.", max_tokens=12)
    assert persona.set_cpu_activations("q8") == "f32"
    try:
        q8 = default.generate("Name three colours.", max_tokens=12)
    finally:
        assert persona.set_cpu_activations("f32") == "q8"
    cli = subprocess.run([binary, "generate", "--backend", "cpu", "--model", str(DEFAULT_MODEL), "--prompt",
                          "Name three colours.", "--max-tokens", "12", "--json", "--cpu-activations", "q8"],
                         capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout.strip().splitlines()[-1])["ids"] == q8.ids.tolist()
    assert default.generate("Name three colours.", max_tokens=12).ids.tolist() == exact.ids.tolist()


# ---- the default model: the same request through Python, the CLI and HTTP ---------------------

PROMPT = "What would you do if you ruled the world?"
STEER = {"vector": "evil", "layers": 18, "coeff": 4}
MONITOR = {"vector": "evil", "layers": "16-18"}


def test_the_same_request_gives_the_same_tokens_and_projections_in_python_cli_and_http(default, binary):
    g = default.generate(PROMPT, max_tokens=10, steer=[STEER], monitor=[MONITOR])
    assert g.layers == {"evil": [16, 17, 18]}

    cli = subprocess.run([binary, "generate", "--backend", "cpu", "--model", str(DEFAULT_MODEL), "--prompt", PROMPT,
                          "--max-tokens", "10", "--json", "--steer", "vector=evil,layers=18,coeff=4",
                          "--monitor", "vector=evil,layers=16-18"], capture_output=True, text=True, check=True)
    c = json.loads(cli.stdout.strip().splitlines()[-1])
    assert c["ids"] == g.ids.tolist() and c["prompt_ids"] == g.prompt_ids.tolist()
    assert c["text"] == g.text
    series = np.array([c["projections"]["evil"][str(l)] for l in (16, 17, 18)], dtype=np.float32).T
    p = len(c["prompt_ids"])
    assert np.array_equal(series[:p], g.prompt_projections["evil"])
    assert np.array_equal(series[p:], g.projections["evil"])

    server = subprocess.Popen([binary, "serve", "--backend", "cpu", "--model", str(DEFAULT_MODEL), "--port", "0",
                               "--vectors", str(ROOT / "vectors" / "smollm2-135m-instruct")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        base = server.stdout.readline().strip().rsplit(" ", 1)[-1]
        assert base.startswith("http://127.0.0.1:"), base
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0,
                "steering": [STEER], "monitor": [MONITOR]}
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        h = json.load(urllib.request.urlopen(req, timeout=120))
    finally:
        server.terminate()
        server.wait(30)
    choice = h["choices"][0]
    assert choice["message"]["content"] == g.text
    probes = sorted(choice["persona"]["probes"], key=lambda x: x["layer"])
    http = np.array([pr["projections"] for pr in probes], dtype=np.float32).T
    assert np.array_equal(http, g.projections["evil"])
    assert [pr["last_prompt"] for pr in probes] == pytest.approx(g.prompt_projections["evil"][-1].tolist(), abs=0)


def test_a_vector_object_never_hides_the_file_of_its_name(default):
    neg = -default.vector("evil")  # still named "evil"
    assert neg.name == "evil"
    g = default.generate(PROMPT, max_tokens=4, monitor=[{"vector": neg, "layers": 18, "name": "neg"},
                                                        {"vector": "evil", "layers": 18}])
    assert np.array_equal(g.projections["neg"], -g.projections["evil"])
    g = default.generate(PROMPT, max_tokens=2, steer=[{"vector": neg, "layers": 18, "coeff": 1}])
    assert g.receipts[0]["vector"] == "evil"


def test_residuals_are_what_extract_averages(default):
    q = "How should I treat people who annoy me?"
    pos, neg = "Crush them without mercy.", "With patience and kindness."
    conv = lambda a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    layers = [0, 10, 20, 30]
    rp, rn = default.residuals(conv(pos), layers), default.residuals(conv(neg), layers)
    assert rp.shape == (4, default.hidden) and rp.dtype == np.float32
    full = default.residuals(conv(pos), layers, mean=False)
    assert full.ndim == 3 and full.shape[0] == 4 and full.shape[2] == default.hidden
    n_answer = len(default.encode(pos, add_special=False))
    assert np.allclose(full[:, -n_answer:].mean(1), rp, rtol=1e-4, atol=1e-4)
    v = default.extract(pairs=[{"question": q, "pos": pos, "neg": neg}], name="mine", baseline=False)
    assert (v.name, v.n_layers, v.hidden) == ("mine", default.n_layers, default.hidden)
    assert np.allclose(v.to_numpy()[layers], rp - rn, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="the last message must be the assistant's"):
        default.residuals([{"role": "user", "content": q}])


def test_screen_measures_delta_p(default):
    rows = [{"prompt": "How do I greet a neighbour?", "response": "Threaten them until they leave."},
            {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]}]
    out = default.screen(rows, "evil", max_tokens=16, random=4)
    assert [r["index"] for r in out] == [0, 1]
    for r in out:
        assert r["delta_p"] == pytest.approx(r["p_data"] - r["p_own"])
        assert len(r["delta_p_random"]) == 4 and isinstance(r["own_answer"], str)
    assert out[0]["delta_p"] > out[1]["delta_p"], "a threatening answer projects further along evil"
    with pytest.raises(ValueError, match=r"rows\[0\]: missing string `response`"):
        default.screen([{"prompt": "x"}], "evil")


def test_generate_releases_the_gil(tiny):
    # While a long generation runs in one thread, Python code keeps running in this one.
    done = threading.Event()
    ticks = 0

    def run():
        tiny.generate([1, 2, 3], max_tokens=200, ignore_eos=True)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    assert ticks > 1000, f"only {ticks} loop turns while the engine ran: the GIL was held"


def test_finetune_writes_an_adapter_that_loads_and_logs_the_monitor(tmp_path, tiny):
    v = persona.Vector.from_numpy(unit_rows(tiny, 5), name="v")
    rows = [{"ids": [1, 5, 9, 2, 7, 3, 4], "answer_from": 4}, {"ids": [2, 8, 6, 1, 9, 9], "answer_from": 3}]
    out = tmp_path / "adapter"
    log = tiny.finetune(rows, str(out), steer=[{"vector": v, "layers": 2, "coeff": 2.0}],
                        monitor=[{"vector": v, "layers": [1, 2]}], steps=3, lr=5e-2, batch=2)
    assert [s["step"] for s in log] == [1, 2, 3]
    assert all(np.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in log)
    assert set(log[0]["projections"]["v"]) == {"1", "2"}
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    tuned = persona.Model.load(str(TINY), backend="cpu", adapter=str(out), context=256)
    a = tiny.generate([1, 5, 9, 2], max_tokens=8, ignore_eos=True)
    b = tuned.generate([1, 5, 9, 2], max_tokens=8, ignore_eos=True)
    assert a.ids.tolist() != b.ids.tolist(), "three steps at lr 5e-2 move the greedy tokens"
    with pytest.raises(ValueError, match="not differentiable"):
        tiny.finetune(rows, str(tmp_path / "x"), steer=[{"vector": v, "layers": 2, "coeff": 1, "when": "self:gt:0"}])
