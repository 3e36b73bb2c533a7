#!/usr/bin/env bash
# persona beside llama.cpp, in one run, on the same GGUF files and the same number of threads:
# prompt processing (pp) and token generation (tg), each tool's own benchmark (`persona bench`,
# `llama-bench`), one after the other.
#
#   scripts/bench-llamacpp.sh [MODEL.gguf ...]
#
# Default models: the default model's Q4_1 file and an F32 copy of it (made with llama.cpp's
# llama-quantize, kept in $CACHE). llama.cpp is the copy vendored by the PyPI sdist
# llama-cpp-python==$LCP_VERSION (sha256 pinned below), built once with CMake (pip's cmake/ninja)
# into $CACHE; pass LLAMA_BENCH=/path/to/llama-bench to use your own build instead.
# Environment: THREADS (default: all cores), PP (512), TG (128), REPS (3).
set -euo pipefail
cd "$(dirname "$0")/.."

LCP_VERSION=0.3.16
LCP_SHA256=34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6
CACHE=${PERSONA_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/persona/llamacpp}
THREADS=${THREADS:-$(nproc)}
PP=${PP:-512}
TG=${TG:-128}
REPS=${REPS:-3}

say() { echo "bench-llamacpp: $*" >&2; }

build_llamacpp() {
    local src="$CACHE/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
    if [ ! -x "$src/build/bin/llama-bench" ] || [ ! -x "$src/build/bin/llama-quantize" ]; then
        mkdir -p "$CACHE"
        if [ ! -d "$src" ]; then
            say "downloading llama-cpp-python==$LCP_VERSION (sdist, vendors llama.cpp)"
            # The sdist's address from PyPI's simple index: `pip download --no-binary :all:` would
            # build the package's build tools (cmake among them) from source just to read its metadata.
            local tgz="$CACHE/llama_cpp_python-$LCP_VERSION.tar.gz"
            python3 - "$LCP_VERSION" "$tgz" <<'PY'
import re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60).read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
urls = [u for u in re.findall(r'href="([^"]+)"', index) if u.split("#")[0].endswith("/" + name)]
if not urls:
    sys.exit(f"bench-llamacpp: {name} is not in PyPI's index")
urllib.request.urlretrieve(urls[0].split("#")[0], dest)
PY
            local got
            got=$(sha256sum "$tgz" | cut -d' ' -f1)
            if [ "$got" != "$LCP_SHA256" ]; then
                say "sha256 of $tgz is $got, expected $LCP_SHA256; refusing to build it"
                exit 1
            fi
            tar -xzf "$tgz" -C "$CACHE"
        fi
        command -v cmake >/dev/null && command -v ninja >/dev/null || python3 -m pip install --quiet cmake ninja
        say "building llama-bench and llama-quantize (a few minutes on 2 cores)"
        cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
        cmake --build "$src/build" --target llama-bench llama-quantize -j "$THREADS" >/dev/null
    fi
    LLAMA_BENCH=${LLAMA_BENCH:-$src/build/bin/llama-bench}
    LLAMA_QUANTIZE=$src/build/bin/llama-quantize
}

cargo build --release --quiet
PERSONA=target/release/persona

if [ -n "${LLAMA_BENCH:-}" ] && [ $# -gt 0 ]; then
    : # the user's own llama-bench and models: nothing to build
else
    build_llamacpp
fi

if [ $# -eq 0 ]; then
    q41=$("$PERSONA" fetch 2>/dev/null | tail -1)
    [ -f "$q41" ] || q41="${XDG_CACHE_HOME:-$HOME/.cache}/persona/SmolLM2-135M-Instruct.Q4_1.gguf"
    f32="$CACHE/SmolLM2-135M-Instruct.F32.gguf"
    if [ ! -f "$f32" ]; then
        say "making an F32 copy of $q41 with llama-quantize"
        "$LLAMA_QUANTIZE" --allow-requantize "$q41" "$f32.tmp" F32 >/dev/null 2>&1
        mv "$f32.tmp" "$f32"
    fi
    set -- "$f32" "$q41"
fi

echo "# persona vs llama.cpp · $(date -u +%Y-%m-%dT%H:%MZ) · persona $(git rev-parse --short HEAD 2>/dev/null || echo unknown) · llama.cpp from llama-cpp-python==$LCP_VERSION · $THREADS threads"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') · $(nproc) cores"
for m in "$@"; do
    echo
    echo "## $(basename "$m")"
    echo
    echo "persona:"
    RAYON_NUM_THREADS=$THREADS "$PERSONA" bench --backend cpu -m "$m" -p "$PP" -n "$TG" -b 1 --steer none -r "$REPS" 2>/dev/null | grep -E '^\|'
    case "$(basename "$m")" in
        *F32*|*F16*|*BF16*|*f32*|*f16*|*bf16*) ;; # no 8-bit kernels for float weights
        *)
            echo
            echo "persona --cpu-activations q8 (8-bit activations, as llama.cpp):"
            RAYON_NUM_THREADS=$THREADS "$PERSONA" bench --backend cpu --cpu-activations q8 -m "$m" -p "$PP" -n "$TG" -b 1 --steer none -r "$REPS" 2>/dev/null | grep -E '^\|'
            ;;
    esac
    echo
    echo "llama.cpp:"
    "$LLAMA_BENCH" -m "$m" -t "$THREADS" -p "$PP" -n "$TG" -r "$REPS" 2>/dev/null | grep -E '^\|'
done
