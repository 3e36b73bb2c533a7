// out = silu(gate) · up, elementwise: a pure stream over three arrays, one thread per element.
// expf (not __expf) and a true division keep it within an ulp or two of the CPU reference.
#include "common.cuh"

extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, unsigned long long n) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
}
