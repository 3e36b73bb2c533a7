#!/usr/bin/env bash
# The PyTorch + PEFT LoRA training baseline (scripts/train_baseline.py) beside `persona bench --train`:
#   scripts/train-baseline.sh [--model HF_DIR|FILE.gguf] [--data FILE] [--threads 2] [--steps 4] [--batch 8] [--rank 16]
# PYTHON picks the interpreter (default python3). Prints one JSON line (s_per_step, train_tok_per_s, ...).
set -euo pipefail
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import torch, transformers, peft, gguf' 2>/dev/null; then
    echo "train-baseline: $PY cannot import torch, transformers, peft and gguf. Install them (CPU torch is enough):" >&2
    echo "  $PY -m pip install torch transformers peft gguf" >&2
    echo "or in a virtual environment, then point PYTHON at it:" >&2
    echo "  python3 -m venv ~/.venv-torch && ~/.venv-torch/bin/pip install torch transformers peft gguf" >&2
    echo "  PYTHON=~/.venv-torch/bin/python $0 $*" >&2
    exit 1
fi
exec "$PY" "$(dirname "$0")/train_baseline.py" "$@"
