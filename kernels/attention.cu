// Causal attention over the paged KV cache, with GQA (query head h reads kv head h / (n_heads / n_kv)).
// Cache layout: `[pages][page_size][n_kv_heads][head_dim]` f32; position pos of slot s is row
// pos % page_size of page `pages[s * width + pos / page_size]` (the layout's page table);
// `tokens` is the layout's `[t][2]` (slot, pos). Three kernels, launched in order on one stream:
//
// * attention_store_f32: this batch's k, v rows into the cache at each token's (slot, pos).
// * attention_prefill_f32: one block per (query tile, head). A tile is up to PREFILL_Q
//   consecutive tokens of one sequence (built on the host). Keys and values are staged through
//   shared memory PREFILL_K positions at a time and shared by all the tile's queries, so each K/V
//   row is read from global memory once per tile instead of once per query. Each warp owns
//   PREFILL_Q / 4 queries; lane j scores key j of the staged block, then an online softmax
//   (running max and sum, f32) folds the block into the warp's output, lane l owning dimensions
//   l, l+32, ... of the head.
// * attention_decode_f32: one block per (token, head), for calls with about one token per
//   sequence (decode). The 4 warps split the sequence's positions; each keeps an online softmax
//   with the query and its output share in registers, and the 4 partial results are merged in
//   shared memory at the end. (Splitting long contexts across blocks is the next step for speed.)
#include "common.cuh"

#define MAX_HEAD_DIM 256
#define DIMS_PER_LANE (MAX_HEAD_DIM / 32)
#define PREFILL_Q 16
#define PREFILL_K 32

// Cache row of position `pos` of `slot` through the page table.
__device__ __forceinline__ size_t kv_row(const u32* __restrict__ pages, u32 slot, u32 pos, int page_size, int width) {
    return (size_t)pages[(size_t)slot * width + pos / page_size] * page_size + pos % page_size;
}

extern "C" __global__ void attention_store_f32(const float* __restrict__ k, const float* __restrict__ v,
                                               float* __restrict__ kc, float* __restrict__ vc,
                                               const u32* __restrict__ tokens, const u32* __restrict__ pages,
                                               int t, int kv_width, int page_size, int width) {
    const unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned long long)t * kv_width) return;
    const unsigned long long i = idx / kv_width, e = idx % kv_width;
    const u32 slot = tokens[2 * i], pos = tokens[2 * i + 1];
    const size_t at = kv_row(pages, slot, pos, page_size, width) * kv_width + e;
    kc[at] = k[idx];
    vc[at] = v[idx];
}

extern "C" __global__ void __launch_bounds__(128)
    attention_prefill_f32(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc,
                          const u32* __restrict__ tokens, const u32* __restrict__ tiles, float* __restrict__ out,
                          const u32* __restrict__ pages, int n_heads, int n_kv_heads, int head_dim, int page_size,
                          int width, float scale) {
    extern __shared__ float sm[];
    const int hd = head_dim, kld = hd + 1;  // K rows padded: lanes reading different keys hit different banks
    float* qs = sm;                          // [PREFILL_Q][hd]
    float* ks = qs + PREFILL_Q * hd;         // [PREFILL_K][hd + 1]
    float* vs = ks + PREFILL_K * kld;        // [PREFILL_K][hd]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 start = tiles[2 * blockIdx.x], len = tiles[2 * blockIdx.x + 1];
    const int head = blockIdx.y, kvh = head / (n_heads / n_kv_heads);
    const u32 slot = tokens[2 * start];
    u32 max_pos = 0;
    for (u32 r = 0; r < len; r++) max_pos = max(max_pos, tokens[2 * (start + r) + 1]);
    for (int e = threadIdx.x; e < PREFILL_Q * hd; e += blockDim.x) {
        const int r = e / hd, d = e % hd;
        qs[e] = r < (int)len ? q[((size_t)(start + r) * n_heads + head) * hd + d] : 0.0f;
    }
    const int per_warp = PREFILL_Q / 4;
    float m[per_warp], l[per_warp], o[per_warp][DIMS_PER_LANE];
    u32 qpos[per_warp];
#pragma unroll
    for (int i = 0; i < per_warp; i++) {
        const u32 r = warp * per_warp + i;
        qpos[i] = r < len ? tokens[2 * (start + r) + 1] : 0;
        m[i] = -PERSONA_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < DIMS_PER_LANE; c++) o[i][c] = 0.0f;
    }
    const size_t kv_width = (size_t)n_kv_heads * hd;
    const float* kbase = kc + (size_t)kvh * hd;
    const float* vbase = vc + (size_t)kvh * hd;
    for (u32 k0 = 0; k0 <= max_pos; k0 += PREFILL_K) {
        __syncthreads();  // the previous block of keys is no longer read
        for (int e = threadIdx.x; e < PREFILL_K * hd; e += blockDim.x) {
            const int j = e / hd, d = e % hd;
            const bool in = k0 + j <= max_pos;
            const size_t at = in ? kv_row(pages, slot, k0 + j, page_size, width) * kv_width + d : 0;
            ks[j * kld + d] = in ? kbase[at] : 0.0f;
            vs[j * hd + d] = in ? vbase[at] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < per_warp; i++) {
            const u32 r = warp * per_warp + i;
            if (r >= len || k0 > qpos[i]) continue;  // warp-uniform
            const float* qr = qs + r * hd;
            float s = 0.0f;
            for (int d = 0; d < hd; d++) s += qr[d] * ks[lane * kld + d];
            const bool valid = k0 + lane <= qpos[i];
            s = valid ? s * scale : -PERSONA_INF;
            const float m_new = fmaxf(m[i], warp_max(s));  // finite: key k0 <= qpos is valid
            const float corr = expf(m[i] - m_new);
            const float p = valid ? expf(s - m_new) : 0.0f;
            l[i] = l[i] * corr + warp_sum(p);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < DIMS_PER_LANE; c++) o[i][c] *= corr;
            for (int j = 0; j < PREFILL_K; j++) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int c = 0; c < DIMS_PER_LANE; c++) {
                    const int d = lane + 32 * c;
                    if (d < hd) o[i][c] += pj * vs[j * hd + d];
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < per_warp; i++) {
        const u32 r = warp * per_warp + i;
        if (r >= len) continue;
        const float inv = 1.0f / l[i];
        float* dst = out + ((size_t)(start + r) * n_heads + head) * hd;
#pragma unroll
        for (int c = 0; c < DIMS_PER_LANE; c++) {
            const int d = lane + 32 * c;
            if (d < hd) dst[d] = o[i][c] * inv;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    attention_decode_f32(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc,
                         const u32* __restrict__ tokens, float* __restrict__ out, const u32* __restrict__ pages,
                         int n_heads, int n_kv_heads, int head_dim, int page_size, int width, float scale) {
    __shared__ float part_m[4], part_l[4];
    __shared__ float part_o[4][MAX_HEAD_DIM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int head = blockIdx.x, token = blockIdx.y, hd = head_dim;
    const int kvh = head / (n_heads / n_kv_heads);
    const u32 slot = tokens[2 * token], pos = tokens[2 * token + 1];
    const float* qr = q + ((size_t)token * n_heads + head) * hd;
    float qv[DIMS_PER_LANE], o[DIMS_PER_LANE];
#pragma unroll
    for (int c = 0; c < DIMS_PER_LANE; c++) {
        const int d = lane + 32 * c;
        qv[c] = d < hd ? qr[d] : 0.0f;
        o[c] = 0.0f;
    }
    const size_t kv_width = (size_t)n_kv_heads * hd;
    const float* kbase = kc + (size_t)kvh * hd;
    const float* vbase = vc + (size_t)kvh * hd;
    // Warp w takes a contiguous quarter of positions 0..=pos.
    const u32 n = pos + 1, chunk = (n + 3) / 4;
    const u32 j0 = min(n, warp * chunk), j1 = min(n, j0 + chunk);
    float m = -PERSONA_INF, l = 0.0f;
    for (u32 j = j0; j < j1; j++) {
        const size_t row = kv_row(pages, slot, j, page_size, width) * kv_width;
        const float* kr = kbase + row;
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < DIMS_PER_LANE; c++) {
            const int d = lane + 32 * c;
            if (d < hd) s += qv[c] * kr[d];
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        m = m_new;
        const float* vr = vbase + row;
#pragma unroll
        for (int c = 0; c < DIMS_PER_LANE; c++) {
            const int d = lane + 32 * c;
            if (d < hd) o[c] = o[c] * corr + p * vr[d];
        }
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < DIMS_PER_LANE; c++) {
        const int d = lane + 32 * c;
        if (d < hd) part_o[warp][d] = o[c];
    }
    __syncthreads();
    // Merge: warps that saw no position have m = -inf and weigh exp(-inf) = 0.
    const float mm = fmaxf(fmaxf(part_m[0], part_m[1]), fmaxf(part_m[2], part_m[3]));
    float wsum = 0.0f, wgt[4];
#pragma unroll
    for (int w = 0; w < 4; w++) {
        wgt[w] = expf(part_m[w] - mm);
        wsum += part_l[w] * wgt[w];
    }
    const float inv = 1.0f / wsum;
    float* dst = out + ((size_t)token * n_heads + head) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; w++) acc += part_o[w][d] * wgt[w];
        dst[d] = acc * inv;
    }
}
