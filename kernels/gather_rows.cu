// Row gather: out[i, :] = x[rows[i], :]. One block per output row, coalesced copy. Rows are
// validated on the host before launch.
#include "common.cuh"

extern "C" __global__ void gather_rows_f32(const float* __restrict__ x, const u32* __restrict__ rows,
                                           float* __restrict__ out, int width) {
    const size_t i = blockIdx.x;
    const float* src = x + (size_t)rows[i] * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) out[i * width + j] = src[j];
}
