// The fused residual boundary (see src/backend/cpu/residual.rs, the reference):
//   h += delta; at a residual index, this layer's probes (pre-steering), the token's steering ops
//   in order (add / ablate / clamp, by positions, conditions reading projection columns), the
//   probes again if h changed, the capture sum; then x = rmsnorm(h) · w. Each op counts the
//   tokens its positions rule selects and the tokens it is applied to (`counts[op][2]`, the
//   receipts of steering).
//
// One block per token row. The row is staged in shared memory (`width` floats, dynamic): h and
// delta are read from global memory exactly once, every probe / op / norm pass then works on
// shared memory, and h and x are written once. Each thread owns the same columns
// (j = threadIdx.x + k·blockDim.x) in every pass, so the passes need no barrier between them;
// only the reductions synchronise. Projections and the sum of squares accumulate in f64 like the
// reference. Steering vectors come from the vector table (`[rows, width]` raw and unit vectors,
// resident across calls) in global memory (L2-resident: the rows of a call read few vectors).
// A token runs only its own sequence's probes, into its own projection row (`token_proj`).
//
// All plan pointers live in fixed device buffers, and each token's ranges of ops and probes are
// read from the device (`op_ranges`, `probe_ranges`: (layer · n_seqs + seq) offsets into records
// sorted by layer, then sequence), so a token walks only its own sequence's records and a
// captured graph stays valid when steering changes.
#include "common.cuh"

struct OpDesc {
    u32 seq, kind, vec, positions;
    float coeff;
    u32 cond_col, cond_cmp;
    float threshold;
};
struct ProbeDesc {
    u32 seq, vec, col;
};

#define OP_ADD 0u
#define OP_ABLATE 1u
#define OP_CLAMP 2u
#define POS_ALL 0u
#define POS_PROMPT 1u
#define POS_LAST 2u
#define TOKEN_PROMPT 1u
#define TOKEN_LAST 2u

// h · u over the row in f64, returned to every thread (f32, as the reference rounds it).
__device__ __forceinline__ float project(const float* s, const float* __restrict__ u, int width, double* red) {
    double acc = 0.0;
    for (int j = threadIdx.x; j < width; j += blockDim.x) acc += (double)s[j] * (double)u[j];
    return (float)block_sum(acc, red);
}

// pr[col] = h · units[vec] for each of the token's probes at this layer; thread 0 writes.
__device__ void run_probes(const float* s, int width, const ProbeDesc* __restrict__ probes, u32 p0, u32 p1,
                           const float* __restrict__ units, float* pr, double* red) {
    for (u32 p = p0; p < p1; p++) {
        const ProbeDesc pd = probes[p];
        const float v = project(s, units + (size_t)pd.vec * width, width, red);
        if (threadIdx.x == 0) pr[pd.col] = v;
    }
}

extern "C" __global__ void residual_steer_norm_f32(
    float* __restrict__ h, const float* __restrict__ delta, const float* __restrict__ norm_w,
    float* __restrict__ x, int width, float eps,
    // The plan: all null when this boundary does not steer (then `layer` etc. are unused).
    int layer, int n_layers, int n_seqs, const float* __restrict__ vectors, const float* __restrict__ units,
    const u32* __restrict__ token_seq, const u32* __restrict__ token_flags, const u32* __restrict__ token_capture,
    const u32* __restrict__ token_proj, const OpDesc* __restrict__ ops, const u32* __restrict__ op_ranges,
    const ProbeDesc* __restrict__ probes, const u32* __restrict__ probe_ranges, float* proj, float* capture,
    u32* counts) {
    extern __shared__ float s[];
    __shared__ double red[32];
    const size_t row = blockIdx.x;
    float* hr = h + row * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
        float v = hr[j];
        if (delta != nullptr) v += delta[row * width + j];
        s[j] = v;
    }
    if (ops != nullptr) {
        const u32 seq = token_seq[row], flags = token_flags[row];
        const size_t r = (size_t)layer * n_seqs + seq;
        const u32 p0 = probe_ranges[r], p1 = probe_ranges[r + 1];
        const u32 o0 = op_ranges[r], o1 = op_ranges[r + 1];
        float* pr = proj + token_proj[row];
        run_probes(s, width, probes, p0, p1, units, pr, red);
        // Thread 0's projection writes are visible to the whole block after this barrier
        // (conditions below read them back from global memory).
        __syncthreads();
        bool changed = false;  // uniform over the block: every test below reads shared values
        for (u32 o = o0; o < o1; o++) {
            const OpDesc op = ops[o];
            bool at = false;
            if (op.positions == POS_ALL) at = true;
            else if (op.positions == POS_PROMPT) at = (flags & TOKEN_PROMPT) != 0;
            else if (op.positions == POS_LAST) at = (flags & TOKEN_LAST) != 0;
            if (!at) continue;
            if (threadIdx.x == 0) atomicAdd(&counts[2 * o], 1u);
            if (op.cond_col != PERSONA_NONE) {
                const float v = pr[op.cond_col];
                const bool pass = op.cond_cmp == 0 ? v > op.threshold : v < op.threshold;
                if (!pass) continue;
            }
            if (threadIdx.x == 0) atomicAdd(&counts[2 * o + 1], 1u);
            if (op.kind == OP_ADD) {
                // α = 0 leaves h untouched bit for bit, as in the reference.
                if (op.coeff != 0.0f) {
                    const float* v = vectors + (size_t)op.vec * width;
                    for (int j = threadIdx.x; j < width; j += blockDim.x) s[j] += op.coeff * v[j];
                    changed = true;
                }
            } else if (op.kind == OP_ABLATE || op.kind == OP_CLAMP) {
                const float* u = units + (size_t)op.vec * width;
                const float target = op.kind == OP_CLAMP ? op.coeff : 0.0f;
                const float c = target - project(s, u, width, red);
                for (int j = threadIdx.x; j < width; j += blockDim.x) s[j] += c * u[j];
                changed = true;
            }
        }
        if (changed) run_probes(s, width, probes, p0, p1, units, pr, red);
        const u32 cap = token_capture[row];
        if (cap != PERSONA_NONE) {
            // Tokens of a sequence share one sum: atomics (order-dependent only in the last bits).
            float* dst = capture + ((size_t)cap * (n_layers + 1) + layer) * width;
            for (int j = threadIdx.x; j < width; j += blockDim.x) atomicAdd(&dst[j], s[j]);
        }
    }
    double ss = 0.0;
    for (int j = threadIdx.x; j < width; j += blockDim.x) ss += (double)s[j] * (double)s[j];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf((float)(ss / width) + eps);
    float* xr = x + row * width;
    const bool wrote = delta != nullptr || ops != nullptr;
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
        if (wrote) hr[j] = s[j];
        xr[j] = s[j] * inv * norm_w[j];
    }
}
