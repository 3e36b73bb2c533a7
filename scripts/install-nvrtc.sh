#!/usr/bin/env bash
# Install NVRTC and the CUDA headers it needs (cuda_bf16.h, cuda_fp16.h) from PyPI, pinned to
# CUDA 13.0 (the GPU host's toolkit), so the CUDA kernels can be compiled and checked on a
# machine without a GPU: `persona check --backend cuda --compile-only`. Prints where they are.
# persona finds pip's copy by itself (no LD_LIBRARY_PATH needed).
set -euo pipefail
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null; then
    echo "install-nvrtc: $PY not found (apt-get install python3 python3-pip)" >&2
    exit 1
fi
PKGS=('nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*')
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)
# A distribution's own Python refuses plain installs (PEP 668); then install beside it.
"${PIP[@]}" "${PKGS[@]}" 2>/dev/null || "${PIP[@]}" --break-system-packages "${PKGS[@]}"
"$PY" - <<'PY'
import os, sys
import nvidia
for base in nvidia.__path__:
    lib = os.path.join(base, "cu13", "lib")
    inc = os.path.join(base, "cu13", "include")
    if os.path.exists(os.path.join(lib, "libnvrtc.so.13")) and os.path.exists(os.path.join(inc, "cuda_bf16.h")):
        print(f"nvrtc lib: {lib}")
        print(f"cuda include: {inc}")
        sys.exit(0)
sys.exit("install-nvrtc: libnvrtc.so.13 / cuda_bf16.h not found under " + ", ".join(nvidia.__path__))
PY
