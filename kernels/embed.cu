// Embedding gather: out[i, :] = table[ids[i], :] widened to f32. One block per token; the row is
// contiguous in both tables, so the threads of a block read and write it fully coalesced.
// Ids are validated on the host before launch.
#include "common.cuh"

template <typename W>
__device__ void embed_body(const W* __restrict__ table, const u32* __restrict__ ids, float* __restrict__ out,
                           int width) {
    const size_t i = blockIdx.x;
    const W* row = table + (size_t)ids[i] * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) out[i * width + j] = to_f32(row[j]);
}

#define EMBED(dtype, W)                                                                                     \
    extern "C" __global__ void embed_##dtype(const W* table, const u32* ids, float* out, int width) {       \
        embed_body<W>(table, ids, out, width);                                                              \
    }
EMBED(bf16, __nv_bfloat16)
EMBED(f16, __half)
EMBED(f32, float)
