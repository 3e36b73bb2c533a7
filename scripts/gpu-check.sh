#!/usr/bin/env bash
# The CUDA backend on a real GPU, in a few minutes, from binaries built elsewhere.
#
#   scripts/gpu-check.sh --prepare   # where Rust is: build the release binary and the CUDA test
#                                    # binary, stripped, into target/gpu/ (carry that folder)
#   scripts/gpu-check.sh             # on the GPU host (CUDA 13, driver 580, Python; no Rust,
#                                    # no network): runs everything below, table last
#   scripts/gpu-check.sh --bench-only  # stage 2 alone (after a fix, or a dry run with
#                                    # GPU_CHECK_BACKEND=cpu BENCH_SHAPES=smollm2-135m BENCH_ARGS=...)
#
# Steps: NVRTC compile report; `persona check --backend cuda` (every op vs the CPU, full
# shapes); the CUDA test binary (parity, tiny-model and steering goldens, α = 0); the tiny-model
# goldens through the CLI (top-20 logits within 1e-2 of HF's, greedy ids up to the first
# low-margin step); CUDA vs CPU on a random-weight model of SmolLM2-135M's shape generated here
# (bf16, so both backends see the same weights); prefill/decode timing. Stage 2 (only when all
# of that passed): persona bench on the SmolLM2-135M and Qwen2.5-7B shapes (batch 1, 8, 64;
# steering none / all layers / a plan per sequence) beside PyTorch eager and the card's copy
# bandwidth (../shared/tools/gpu_baseline.py). Table last. Exit status: non-zero when any step
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    cargo build --release
    mkdir -p target/gpu
    test_bin=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
    strip -o target/gpu/persona target/release/persona
    strip -o target/gpu/cuda-tests "$test_bin"
    ls -la target/gpu
    # The device tool carries at most 64 MiB of ignored files.
    size=$(du -cb target/gpu/persona target/gpu/cuda-tests | tail -1 | cut -f1)
    if (( size > 64 * 1024 * 1024 )); then
        echo "gpu-check --prepare: target/gpu holds $size bytes, above the 64 MiB carry limit" >&2
        exit 1
    fi
    echo "ready: $size bytes in target/gpu; on the GPU host run scripts/gpu-check.sh (carry target/gpu)"
    exit 0
fi

BIN=${PERSONA_BIN:-target/gpu/persona}
[[ -x "$BIN" ]] || BIN=target/release/persona
TESTS=${PERSONA_CUDA_TESTS:-target/gpu/cuda-tests}
WORK=${PERSONA_GPU_WORK:-/tmp/persona-gpu-check}
mkdir -p "$WORK"
export XDG_CACHE_HOME="$WORK/cache"
export PERSONA_FIXTURES="$ROOT/tests/fixtures"
PY=${PYTHON:-python3}
# GPU_CHECK_BACKEND=cpu runs the model steps on the CPU: a dry run of this script without a GPU.
BK=${GPU_CHECK_BACKEND:-cuda}
ROWS=()
FAILED=0
row() { # name, status, detail
    ROWS+=("$(printf '%-26s %-5s %s' "$1" "$2" "$3")")
    [[ "$2" == "FAIL" ]] && FAILED=1
    echo "== $1: $2 $3"
}

[[ "$BIN" == /* ]] || BIN="$ROOT/$BIN"
export PERSONA_BIN="$BIN"
if [[ ! -x "$BIN" ]]; then
    echo "gpu-check: no persona binary (run scripts/gpu-check.sh --prepare where Rust is, carry target/gpu)" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# Stage 1: correctness.
stage1() {
# 1. Every kernel through NVRTC, with ptxas' register / spill / shared-memory report.
if timeout 120 "$BIN" check --backend cuda --compile-only --arch sm_80,sm_90 >"$WORK/compile.txt" 2>&1; then
    row "nvrtc compile sm_80,sm_90" pass "$(tail -1 "$WORK/compile.txt")"
else
    row "nvrtc compile sm_80,sm_90" FAIL "$(tail -1 "$WORK/compile.txt")"
fi
cat "$WORK/compile.txt"

# 2. Full parity table against the CPU reference.
if timeout 240 "$BIN" check --backend cuda >"$WORK/parity.txt" 2>&1; then st=pass; else st=FAIL; fi
grep -E "FAIL|^cuda:" "$WORK/parity.txt" | head -40
row "check --backend cuda" $st "$(grep -E '^cuda:' "$WORK/parity.txt" | tail -1)$(grep -m1 '^error' "$WORK/parity.txt")"

# 3. The CUDA integration tests (goldens, steering goldens, α = 0), when the binary came along.
if [[ -x "$TESTS" ]]; then
    if timeout 240 "$TESTS" --test-threads=1 >"$WORK/tests.txt" 2>&1; then st=pass; else st=FAIL; fi
    grep -E "^test |test result|panicked|error" "$WORK/tests.txt" | head -40
    row "tests/cuda.rs" $st "$(grep -E 'test result' "$WORK/tests.txt" | tail -1)"
else
    row "tests/cuda.rs" skip "no test binary at $TESTS (scripts/gpu-check.sh --prepare)"
fi

# 4. Tiny-model goldens through the CLI: top-20 logits at the last prompt token against HF's
#    full logits, greedy ids up to the first step whose HF margin is below the bf16 noise.
for m in tiny-llama tiny-llama3-rope tiny-qwen2; do
    dir="$ROOT/tests/fixtures/$m"
    ids=$("$PY" -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))['ids'])))" "$dir/reference.json")
    if timeout 120 "$BIN" generate --backend $BK --model "$dir" --prompt-ids "$ids" --max-tokens 16 --ignore-eos \
        --json --top-logits 20 >"$WORK/$m.json" 2>"$WORK/$m.err"; then
        out=$("$PY" - "$dir/reference.json" "$WORK/$m.json" <<'PYEOF'
import json, sys
ref = json.load(open(sys.argv[1])); got = json.loads(open(sys.argv[2]).read().splitlines()[-1])
last = ref["logits"][-1]; top = got["steps"][0]["top"]
# Relative error ||got - ref|| / ||ref|| over the top 20 (bf16 weights alone give ~5e-3).
err = (sum((l - last[i]) ** 2 for i, l in top) / sum(last[i] ** 2 for i, _ in top)) ** 0.5
noise = max(0.02, 2 * max(abs(l - last[i]) for i, l in top))
want, margins = ref["greedy_16_no_eos"], ref["greedy_16_margins"]
ok_ids, upto = True, len(want)
for i, w in enumerate(want):
    if got["ids"][i] != w: ok_ids, upto = False, i; break
    if margins[i] < noise: upto = i + 1; break
ok = err <= 1e-2 and ok_ids
print(("pass" if ok else "FAIL") + f" top-20 rel err {err:.2e}, greedy ids match for {upto} steps" + ("" if ok_ids else f" (then {got['ids'][upto]} vs {want[upto]})"))
PYEOF
)
        row "golden $m" "${out%% *}" "${out#* }"
    else
        row "golden $m" FAIL "$(tail -1 "$WORK/$m.err")"
    fi
done

# 5. A random-weight model of SmolLM2-135M's shape (bf16, tied embeddings), CUDA vs CPU.
RND="$WORK/smollm2-random"
if "$PY" - "$RND" <<'PYEOF'
import json, os, struct, sys
import numpy as np
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
H, F, L, NH, NKV, V, HD = 576, 1536, 30, 9, 3, 49152, 64
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": F,
       "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD,
       "vocab_size": V, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
       "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "bos_token_id": 1,
       "eos_token_id": 2, "torch_dtype": "bfloat16"}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
rng = np.random.default_rng(7)
def bf16(a):  # round to nearest even, as torch does
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
tensors = {"model.embed_tokens.weight": rng.standard_normal((V, H), dtype=np.float32) * 0.5,
           "model.norm.weight": 1.0 + 0.1 * rng.standard_normal(H, dtype=np.float32)}
for i in range(L):
    p = f"model.layers.{i}."
    for n, shape in [("self_attn.q_proj", (NH * HD, H)), ("self_attn.k_proj", (NKV * HD, H)),
                     ("self_attn.v_proj", (NKV * HD, H)), ("self_attn.o_proj", (H, NH * HD)),
                     ("mlp.gate_proj", (F, H)), ("mlp.up_proj", (F, H)), ("mlp.down_proj", (H, F))]:
        tensors[p + n + ".weight"] = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])
    tensors[p + "input_layernorm.weight"] = 1.0 + 0.1 * rng.standard_normal(H, dtype=np.float32)
    tensors[p + "post_attention_layernorm.weight"] = 1.0 + 0.1 * rng.standard_normal(H, dtype=np.float32)
header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
for name, a in tensors.items():
    b = bf16(a).tobytes()
    header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b); off += len(b)
h = json.dumps(header).encode(); h += b" " * (-len(h) % 8)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    for b in blobs: f.write(b)
PYEOF
then
    ids=$("$PY" -c "print(','.join(str((i * 7919 + 13) % 49152) for i in range(64)))")
    ok=1
    for b in cpu $BK; do
        timeout 180 "$BIN" generate --backend $b --model "$RND" --prompt-ids "$ids" --max-tokens 8 --ignore-eos \
            --json --top-logits 20 >"$WORK/rnd-$b.json" 2>"$WORK/rnd-$b.err" || ok=0
    done
    if [[ $ok == 1 ]]; then
        out=$("$PY" - "$WORK/rnd-cpu.json" "$WORK/rnd-$BK.json" <<'PYEOF'
import json, sys
cpu, gpu = (json.loads(open(p).read().splitlines()[-1]) for p in sys.argv[1:3])
c, g = dict(cpu["steps"][0]["top"]), dict(gpu["steps"][0]["top"])
common = set(c) & set(g)
err = (sum((c[i] - g[i]) ** 2 for i in common) / sum(c[i] ** 2 for i in common)) ** 0.5 if common else float("inf")
same = 0
for a, b in zip(cpu["ids"], gpu["ids"]):
    if a != b: break
    same += 1
ok = err <= 1e-2 and len(common) >= 15
print(("pass" if ok else "FAIL") + f" top-20 overlap {len(common)}/20, rel err {err:.2e}, greedy ids equal for {same}/8 steps")
PYEOF
)
        row "random smollm2 $BK~cpu" "${out%% *}" "${out#* }"
    else
        row "random smollm2 $BK~cpu" FAIL "$(tail -1 "$WORK/rnd-$BK.err") $(tail -1 "$WORK/rnd-cpu.err")"
    fi
    # 6. Timing: prefill of 512 tokens, then 128 decode steps (one sequence), on CUDA.
    long=$("$PY" -c "print(','.join(str((i * 7919 + 13) % 49152) for i in range(512)))")
    if timeout 180 "$BIN" generate --backend $BK --model "$RND" --prompt-ids "$long" --max-tokens 128 --ignore-eos \
        --json >"$WORK/timing.json" 2>"$WORK/timing.err"; then
        t=$("$PY" -c "import json,sys; t=json.loads(open(sys.argv[1]).read().splitlines()[-1])['timing']; print(f\"prefill {t['prefill_tokens_per_s']:.0f} tok/s (512), decode {t['decode_tokens_per_s']:.1f} tok/s (128)\")" "$WORK/timing.json")
        row "timing smollm2 ($BK)" info "$t"
    else
        row "timing smollm2 ($BK)" FAIL "$(tail -1 "$WORK/timing.err")"
    fi
else
    row "random smollm2 $BK~cpu" FAIL "could not generate the model (numpy needed)"
fi
}
if [[ "${1:-}" == "--bench-only" ]]; then
    row "stage 1" skip "--bench-only"
else
    stage1
fi

table() {
    echo
    echo "persona gpu-check on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) ($((SECONDS))s)"
    printf '%s\n' "${ROWS[@]}"
}

# Stage 1 is correctness: with a failing row, stop here (the table says which).
if [[ $FAILED != 0 ]]; then
    echo "gpu-check: stage 1 failed; the benchmarks (stage 2) were not run" >&2
    table
    exit 1
fi

# Stage 2: speed. persona bench (random bf16 weights of real shapes: the host has no network and
# the carry no model) for decode and prefill, steering none / every layer (one plan) / a distinct
# plan per sequence (64 at batch 64); then PyTorch eager on the same shapes with the paper's
# hooks, and the card's copy bandwidth, from ../shared/tools/gpu_baseline.py when it runs here.
# Each step has its own timeout and the stage stops starting steps after BENCH_BUDGET seconds,
# so the whole script stays under 8 minutes.
# (BENCH_SHAPES and BENCH_ARGS shrink it for a dry run on the CPU.)
BUDGET=${BENCH_BUDGET:-420}
BENCH_ARGS=${BENCH_ARGS:-"-p 512 -n 64 -b 1,8,64 -r 2"}
for shape in ${BENCH_SHAPES:-smollm2-135m qwen2.5-7b}; do
    if (( SECONDS > BUDGET - 60 )); then
        row "bench $shape" skip "time budget ($SECONDS s used)"
        continue
    fi
    # shellcheck disable=SC2086
    if timeout 150 "$BIN" bench --backend $BK --shape $shape --dtype bf16 $BENCH_ARGS --steer none,all,mixed \
        --json >"$WORK/bench-$shape.json" 2>"$WORK/bench-$shape.err"; then
        row "bench $shape" pass "$WORK/bench-$shape.json"
    else
        row "bench $shape" FAIL "$(tail -1 "$WORK/bench-$shape.err")"
    fi
done
BASELINE=${PERSONA_GPU_BASELINE:-}
for cand in "$ROOT/shared/tools/gpu_baseline.py" "$ROOT/../shared/tools/gpu_baseline.py"; do
    [[ -z "$BASELINE" && -f "$cand" ]] && BASELINE=$cand
done
for shape in smollm2 qwen7b; do
    if [[ -z "$BASELINE" ]]; then
        row "pytorch $shape" skip "no gpu_baseline.py (shared/tools)"
    elif (( SECONDS > BUDGET )); then
        row "pytorch $shape" skip "time budget ($SECONDS s used)"
    elif timeout 120 "$PY" "$BASELINE" $shape --tokens 64 >"$WORK/torch-$shape.txt" 2>"$WORK/torch-$shape.err"; then
        row "pytorch $shape" pass "$WORK/torch-$shape.txt"
    else
        row "pytorch $shape" skip "did not run: $(tail -1 "$WORK/torch-$shape.err")"
    fi
done
# The comparison table: tok/s, weight GB/s and its share of the card's copy bandwidth, steering
# overhead against `none` at the same batch; PyTorch's rows beside each shape.
"$PY" - "$WORK" <<'PYEOF'
import json, os, sys
work = sys.argv[1]
def torch_rows(shape):
    p = os.path.join(work, f"torch-{shape}.txt")
    if not os.path.exists(p):
        return {}
    rows = {}
    for line in open(p):
        if line.startswith("{"):
            r = json.loads(line); rows[r["name"]] = r
    return rows
print("\n| shape | test | batch | steer | persona t/s | GB/s | % copy BW | vs none | PyTorch eager t/s |")
print("|---|---|--:|---|--:|--:|--:|--:|--:|")
for shape, tshape in [("smollm2-135m", "smollm2"), ("qwen2.5-7b", "qwen7b")]:
    p = os.path.join(work, f"bench-{shape}.json")
    if not os.path.exists(p) or os.path.getsize(p) == 0:
        continue
    bench = json.load(open(p))
    tr = torch_rows(tshape)
    copy = tr.get("copy", {}).get("gbps")
    none = {(r["test"], r["batch"]): r["mean_ts"] for r in bench["rows"] if r["steer"] == "none"}
    torch_by = {"none": "hf_eager_decode", "all": "hf_eager_decode_steer_all_layers"}
    for r in bench["rows"]:
        base = none.get((r["test"], r["batch"]))
        ratio = f"{r['mean_ts'] / base:.3f}" if base else ""
        share = f"{100 * r['gb_s'] / copy:.1f}" if copy else ""
        t = tr.get(torch_by.get(r["steer"], ""), {}).get("tok_s") if r["test"].startswith("tg") and r["batch"] == 1 else None
        print(f"| {shape} | {r['test']} | {r['batch']} | {r['steer']} | {r['mean_ts']:.1f} | {r['gb_s']:.1f} | {share} | {ratio} | {'' if t is None else f'{t:.1f}'} |")
    if tr:
        print(f"| {shape} | copy bandwidth {copy and f'{copy:.0f}'} GB/s, bandwidth floor {tr.get('bandwidth_floor', {}).get('tok_s', float('nan')):.0f} tok/s (PyTorch) | | | | | | | |")
PYEOF

table
exit $FAILED
