#!/usr/bin/env bash
# Run every cargo-fuzz target (fuzz/fuzz_targets/*.rs) for SECONDS each, one after another, from
# the committed seeds (fuzz/seeds/TARGET) plus a scratch corpus (fuzz/corpus/TARGET, git-ignored:
# the tree stays clean). Prints `target executions crashes seconds` and exits 1 when any target
# crashed (panic, overflow, timeout, out of memory); the crashing input's path is printed.
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# Needs a nightly toolchain (libFuzzer's instrumentation uses -Z flags); installs cargo-fuzz if
# missing. Environment: FUZZ_SANITIZER (default none: the targets are safe Rust, and panics,
# overflow checks, timeouts and memory limits need no sanitizer; `address` for ASan),
# FUZZ_BUILD=0 to skip the build, FUZZ_RSS_MB (default 2048), FUZZ_TIMEOUT (seconds per input,
# default 10). Logs: fuzz/logs/TARGET.log; crashing inputs: fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh SECONDS [TARGET...]   (SECONDS per target, at least 1)" >&2
    exit 2
fi
secs=$1
shift

if cargo +nightly --version >/dev/null 2>&1; then
    NIGHTLY=(+nightly)
elif cargo --version 2>/dev/null | grep -q nightly; then
    NIGHTLY=()
else
    echo "fuzz.sh: fuzzing needs a NIGHTLY Rust toolchain (cargo-fuzz builds with -Z flags), and none" >&2
    echo "fuzz.sh: is installed. Install one with: rustup toolchain install nightly" >&2
    exit 2
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

sanitizer=${FUZZ_SANITIZER:-none}
triple=$(rustc "${NIGHTLY[@]}" -vV | sed -n 's/^host: //p')
if [ "${FUZZ_BUILD:-1}" != 0 ]; then
    start=$(date +%s)
    cargo "${NIGHTLY[@]}" fuzz build -s "$sanitizer"
    echo "fuzz.sh: build took $(($(date +%s) - start)) s" >&2
fi
bin_dir=fuzz/target/$triple/release

if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

# Longest input per target: a little above its largest seed.
max_len() {
    case $1 in
        gguf) echo 65536 ;;
        hf_config) echo 32768 ;;
        gguf_tokenizer | safetensors | peft_adapter | trait_json) echo 16384 ;;
        vector_file | dataset_jsonl) echo 8192 ;;
        control_vector | chat_template | request_body) echo 4096 ;;
        spec) echo 512 ;;
        *) echo 4096 ;;
    esac
}

mkdir -p fuzz/logs
# A panic's backtrace goes to the log.
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
failed=0
total=0
rows=()
for t in "${targets[@]}"; do
    bin=$bin_dir/$t
    if [ ! -x "$bin" ]; then
        echo "fuzz.sh: no fuzz target \`$t\` ($bin); targets: $(cd fuzz/fuzz_targets && ls | sed 's/\.rs$//' | tr '\n' ' ')" >&2
        exit 2
    fi
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log=fuzz/logs/$t.log
    start=$(date +%s)
    set +e
    "$bin" "fuzz/corpus/$t" "fuzz/seeds/$t" \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
        -timeout="${FUZZ_TIMEOUT:-10}" -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        >"$log" 2>&1
    rc=$?
    set -e
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    execs=${execs:-0}
    total=$((total + execs))
    crashes=0
    if [ $rc -ne 0 ]; then
        crashes=1
        failed=1
        artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/Test unit written to //')
        echo "fuzz.sh: $t FAILED (exit $rc); input: ${artifact:-none written}; log: $log" >&2
        grep -m1 -E "panicked at|ERROR: libFuzzer|==ERROR" "$log" >&2 || true
    fi
    rows+=("$(printf '%-16s %14s %8s %8s' "$t" "$execs" "$crashes" "$took")")
done

printf '%-16s %14s %8s %8s\n' target executions crashes seconds
printf '%s\n' "${rows[@]}"
printf '%-16s %14s\n' total "$total"
exit $failed
