// Rotate-half RoPE in place: one thread per (token, head, i < head_dim/2) rotates the pair
// (x[i], x[i + half]) by its token's position. The cos/sin table is `[positions, half, 2]` f32
// (computed by the engine, llama3 scaling included), so this kernel knows no rope variant.
// `tokens` is the layout's `[t][2]` (slot, pos); positions are validated on the host.
#include "common.cuh"

extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ cos_sin,
                                    const u32* __restrict__ tokens, int t, int heads, int head_dim) {
    const int half = head_dim / 2;
    const unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned long long)t * heads * half) return;
    const int i = (int)(idx % half);
    const unsigned long long th = idx / half;  // token * heads + head
    const int token = (int)(th / heads);
    const u32 pos = tokens[2 * token + 1];
    const float c = cos_sin[(size_t)pos * head_dim + 2 * i];
    const float s = cos_sin[(size_t)pos * head_dim + 2 * i + 1];
    float* h = x + th * head_dim;
    const float a = h[i], b = h[i + half];
    h[i] = a * c - b * s;
    h[i + half] = b * c + a * s;
}
