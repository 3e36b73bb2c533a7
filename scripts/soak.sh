#!/usr/bin/env bash
# Soak test of `persona serve` (tests/soak.rs): 64 concurrent streaming clients on the default
# model for MINUTES (default 10) with a mix of plain, steered, monitored, conditional, cancelled
# and bad requests. Builds in release mode and fetches the default model first. The summary table
# prints last; PERSONA_SOAK_OUT=FILE.json keeps it as JSON, PERSONA_SOAK_BACKEND picks the backend
# (auto), PERSONA_SOAK_CLIENTS the number of clients (64).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-10}"
cargo build --release --locked
./target/release/persona fetch
PERSONA_SOAK_MINUTES="$MINUTES" PERSONA_REQUIRE=1 \
    cargo test --release --locked --test soak -- --ignored --nocapture --test-threads 1
