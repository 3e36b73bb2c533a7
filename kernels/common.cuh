// Shared by every kernel (prepended to each .cu file before NVRTC compiles it): the weight
// element types, conversions to f32, and warp/block reductions.
//
// Conventions: activations, the residual stream, the KV cache and every accumulator are f32;
// weights are bf16 (f16 kept as f16); sums that the CPU reference does in f64 (norms,
// projections) are done in f64 here too. Extern "C" entries are named op_dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;
typedef unsigned short u16;

// `NONE` of src/backend/mod.rs: no condition / no capture.
#define PERSONA_NONE 0xffffffffu
// +inf (NVRTC has no <math.h> INFINITY).
#define PERSONA_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

// Eight consecutive 16-bit weights (one 128-bit load) widened to f32; element 0 is the low half
// of the first word (little-endian).
__device__ __forceinline__ void unpack8(uint4 raw, float* out, const __nv_bfloat16*) {
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack8(uint4 raw, float* out, const __half*) {
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __half2float(__ushort_as_half((u16)(w[i] & 0xffffu)));
        out[2 * i + 1] = __half2float(__ushort_as_half((u16)(w[i] >> 16)));
    }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block, returned to every thread. `scratch` holds one value per warp (32).
// Every thread adds the per-warp partials in the same order, so all get the same bits and no
// second barrier is needed; the leading barrier lets the block call this back to back.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = 0;
    for (int w = 0; w < nw; w++) r += scratch[w];
    return r;
}
