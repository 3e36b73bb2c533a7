#!/usr/bin/env python3
"""Write tests/data/kquant_goldens.json: K-quant super-blocks with known contents and gguf-py's
dequantization of them, the reference for persona's decoders (src/model/gguf_quant.rs).

Needs gguf-py pinned: `pip install gguf==0.19.0 numpy`. For each of Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
three super-blocks of random bytes whose f16 scale fields are then set to: ordinary values
(block 0), zero (block 1: every output 0, or −0/−min), and the largest f16, 65504, with a negative
dmin where there is one (block 2). gguf-py has no Q8_K; its expected values are ggml's formula
y = d·q in float32 numpy (d: f32, including 0 and 3.4e38-scale edge values).
"""
import json
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

import importlib.metadata

assert importlib.metadata.version("gguf") == "0.19.0", "pip install gguf==0.19.0"

rng = np.random.default_rng(20261130)

# (type, bytes per block, offsets of the f16 `d` and `dmin` fields)
LAYOUT = {
    "Q2_K": (T.Q2_K, 84, 80, 82),
    "Q3_K": (T.Q3_K, 110, 108, None),
    "Q4_K": (T.Q4_K, 144, 0, 2),
    "Q5_K": (T.Q5_K, 176, 0, 2),
    "Q6_K": (T.Q6_K, 210, 208, None),
}


def f16_bytes(x):
    return np.array([x], dtype=np.float16).tobytes()


out = {"generator": "scripts/kquant_goldens.py", "gguf_py": "0.19.0", "cases": {}}
for name, (ty, size, d_at, m_at) in LAYOUT.items():
    blocks = bytearray(rng.integers(0, 256, size=3 * size, dtype=np.uint8).tobytes())
    for b, (d, m) in enumerate([(0.0123, 0.0041), (0.0, 0.0), (65504.0, -0.5)]):
        blocks[b * size + d_at:b * size + d_at + 2] = f16_bytes(d)
        if m_at is not None:
            blocks[b * size + m_at:b * size + m_at + 2] = f16_bytes(m)
    y = dequantize(np.frombuffer(bytes(blocks), dtype=np.uint8), ty).astype(np.float32).reshape(-1)
    assert y.size == 3 * 256 and np.isfinite(y).all(), name
    out["cases"][name] = {"blocks": bytes(blocks).hex(), "expected_f32_le": y.tobytes().hex()}

# Q8_K: f32 d, 256 i8, 16 i16 bsums (ignored by dequantization).
q8k = bytearray()
ys = []
for d in [0.0371, 0.0, 1.0e36]:
    qs = rng.integers(-128, 128, size=256, dtype=np.int8)
    bsums = qs.reshape(16, 16).astype(np.int16).sum(axis=1).astype(np.int16)
    q8k += np.array([d], dtype=np.float32).tobytes() + qs.tobytes() + bsums.tobytes()
    ys.append(np.float32(d) * qs.astype(np.float32))
y = np.concatenate(ys).astype(np.float32)
assert np.isfinite(y).all()
out["cases"]["Q8_K"] = {"blocks": bytes(q8k).hex(), "expected_f32_le": y.tobytes().hex()}

with open("tests/data/kquant_goldens.json", "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
print({k: len(v["blocks"]) // 2 for k, v in out["cases"].items()})
