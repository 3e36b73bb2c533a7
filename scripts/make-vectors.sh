#!/usr/bin/env bash
# Reproduce the shipped vectors: vectors/smollm2-135m-instruct/<trait>.safetensors for the whole
# catalog, on the default model, on the CPU. MODEL=qwen2.5-coder-0.5b makes those of the second
# model (vectors/qwen2.5-coder-0.5b-instruct/; LAYERS overrides the swept layers). Each vector's metadata records the exact command
# (persona.command), the seed, the trait definition, the baseline projection, and the layer
# chosen by `persona eval --write` (persona.layer; the rule is in persona.layer_rule).
# EVAL_ONLY=1 re-runs only the eval step on the existing vectors (e.g. to record a new rule's
# layer, the baseline and the trait definition in vectors made before they existed).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/persona
model=${MODEL:-}
if [ -n "$model" ]; then
  out=vectors/$($bin info "$model" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["name"].lower())')
  layers=${LAYERS:-10+12+14+16}
  margs=(--model "$model")
else
  out=vectors/smollm2-135m-instruct
  layers=${LAYERS:-12+15+18+21}
  margs=()
fi
mkdir -p "$out"
for t in ${TRAITS:-evil impolite humorous optimistic sycophantic apathetic hallucinating}; do
  start=$(date +%s)
  # humorous: the last prompt token's residual separates the system prompts better on this model
  # (monitoring AUROC 0.92 at layer 18 vs 0.85 with response_avg).
  # evil: greedy answers (--temperature 0) give a cleaner direction for screening (ΔP AUROC 0.90
  # on tests/data/screen_mixed.jsonl vs 0.83 sampled at temperature 1).
  method=response_avg
  temperature=1
  [ "$t" = humorous ] && method=prompt_last
  [ "$t" = evil ] && temperature=0
  [ -n "${EVAL_ONLY:-}" ] || $bin extract --backend cpu "${margs[@]}" --trait "$t" --out "$out/$t.safetensors" --questions 10 --max-tokens 48 --seed 0 \
    --method "$method" --temperature "$temperature"
  $bin eval --backend cpu "${margs[@]}" --vector "$out/$t.safetensors" --layers "$layers" --coeffs=-3,0,3 --questions 8 \
    --out-dir "$out/eval" --write
  echo "$t: $(( $(date +%s) - start ))s"
done
