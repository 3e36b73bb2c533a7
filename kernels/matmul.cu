// out[t, n] = x[t, :] · W[n, :] + bias[n], W `[n_out, k]` in PyTorch layout (bf16 or f16), x and
// out f32, bias f32 (optional). Two kernels, chosen by the host by token count:
//
// * GEMV (decode, t <= GEMV_MAX_T): one warp per output row, all t tokens at once, so each weight
//   row is streamed from memory exactly once per call -- decode is bound by reading W. Lanes read
//   8 consecutive weights per step (one 128-bit load) and the matching x values (two float4 per
//   token); x is a few KB and stays in L1/L2. x stays f32: the products are exact in f32.
//
// * GEMM (prefill): 64×64 output tiles, 4 warps each computing 32×32 with tensor-core
//   mma.sync.m16n8k16 (bf16 or f16 inputs, f32 accumulation). Each step stages a 64×32 slice of W
//   and of x in shared memory, where each element is read by 2 warps instead of each warp going
//   to global memory. x is staged as two 16-bit parts, hi = round(x) and lo = round(x - hi), and
//   both are multiplied (2 MMAs): x keeps ~16 significant bits instead of bf16's 8, so prefill
//   agrees with the f32-x GEMV path and the CPU to well under bf16 weight rounding (one rounding
//   of x alone costs ~2^-9 relative per element). Rows are padded to 40 elements (80 bytes) so
//   the fragment loads of a warp hit 32 distinct banks.
//   Fragment layouts are those of the PTX ISA for m16n8k16 (.row.col): with g = lane/4 and
//   q = lane%4, A regs hold (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..); B regs hold
//   (k = 2q..2q+1, n = g), (k = 2q+8.., n = g); C holds (g, 2q..2q+1), (g+8, 2q..2q+1).
#include "common.cuh"

#define GEMV_MAX_T 8
#define GEMV_WARPS 8

template <typename W>
__device__ void gemv_body(const float* __restrict__ x, const W* __restrict__ w, const float* __restrict__ bias,
                          float* __restrict__ out, int t, int n, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const W* wr = w + (size_t)row * k;
    float acc[GEMV_MAX_T];
#pragma unroll
    for (int i = 0; i < GEMV_MAX_T; i++) acc[i] = 0.0f;
    if ((k & 7) == 0) {
        // Rows start 16-byte aligned (k % 8 == 0 and 256-byte aligned allocations).
        for (int c = lane * 8; c < k; c += 32 * 8) {
            float wf[8];
            unpack8(*reinterpret_cast<const uint4*>(wr + c), wf, wr);
#pragma unroll
            for (int i = 0; i < GEMV_MAX_T; i++) {
                if (i < t) {
                    const float4 a = *reinterpret_cast<const float4*>(x + (size_t)i * k + c);
                    const float4 b = *reinterpret_cast<const float4*>(x + (size_t)i * k + c + 4);
                    acc[i] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] +
                              b.z * wf[6] + b.w * wf[7];
                }
            }
        }
    } else {
        for (int c = lane; c < k; c += 32) {
            const float wv = to_f32(wr[c]);
#pragma unroll
            for (int i = 0; i < GEMV_MAX_T; i++)
                if (i < t) acc[i] += x[(size_t)i * k + c] * wv;
        }
    }
    const float b = bias != nullptr ? bias[row] : 0.0f;
#pragma unroll
    for (int i = 0; i < GEMV_MAX_T; i++) {
        if (i < t) {
            const float v = warp_sum(acc[i]);
            if (lane == 0) out[(size_t)i * n + row] = v + b;
        }
    }
}

#define TILE_M 64
#define TILE_N 64
#define TILE_K 32
#define TILE_LD (TILE_K + 8)

// v ≈ hi + lo in the weight's 16-bit type (bits of each).
__device__ __forceinline__ void split_bits(float v, u16& hi, u16& lo, const __nv_bfloat16*) {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    hi = __bfloat16_as_ushort(h);
    lo = __bfloat16_as_ushort(__float2bfloat16_rn(v - __bfloat162float(h)));
}
__device__ __forceinline__ void split_bits(float v, u16& hi, u16& lo, const __half*) {
    const __half h = __float2half_rn(v);
    hi = __half_as_ushort(h);
    lo = __half_as_ushort(__float2half_rn(v - __half2float(h)));
}

__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b, const __nv_bfloat16*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b, const __half*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename W>
__device__ void gemm_body(const float* __restrict__ x, const W* __restrict__ w, const float* __restrict__ bias,
                          float* __restrict__ out, int t, int n, int k) {
    __shared__ __align__(16) u16 xs[TILE_M * TILE_LD];  // hi part of x
    __shared__ __align__(16) u16 xl[TILE_M * TILE_LD];  // lo part of x
    __shared__ __align__(16) u16 ws[TILE_N * TILE_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // 2×2 warps, 32×32 each
    const int g = lane >> 2, q = lane & 3;
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    const bool k_vec = (k & 7) == 0;
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;

    for (int k0 = 0; k0 < k; k0 += TILE_K) {
        // Stage x: 64 rows × 32 columns = 512 groups of 4, 4 per thread; zero outside [t, k).
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int idx = tid + r * 128;
            const int row = idx >> 3, col = (idx & 7) * 4;
            const int gm = m0 + row, gk = k0 + col;
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (gm < t) {
                const float* src = x + (size_t)gm * k + gk;
                if (k_vec && gk + 4 <= k) {
                    const float4 f = *reinterpret_cast<const float4*>(src);
                    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
                } else {
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (gk + e < k) v[e] = src[e];
                }
            }
#pragma unroll
            for (int e = 0; e < 4; e++) split_bits(v[e], xs[row * TILE_LD + col + e], xl[row * TILE_LD + col + e], w);
        }
        // Stage W: 64 rows × 32 columns = 256 groups of 8, 2 per thread; zero outside [n, k).
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int idx = tid + r * 128;
            const int row = idx >> 2, col = (idx & 3) * 8;
            const int gn = n0 + row, gk = k0 + col;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (gn < n) {
                const W* src = w + (size_t)gn * k + gk;
                if (k_vec && gk + 8 <= k) {
                    v = *reinterpret_cast<const uint4*>(src);
                } else {
                    u16 e8[8];
#pragma unroll
                    for (int e = 0; e < 8; e++) e8[e] = gk + e < k ? reinterpret_cast<const u16*>(src)[e] : (u16)0;
                    v.x = e8[0] | ((u32)e8[1] << 16);
                    v.y = e8[2] | ((u32)e8[3] << 16);
                    v.z = e8[4] | ((u32)e8[5] << 16);
                    v.w = e8[6] | ((u32)e8[7] << 16);
                }
            }
            *reinterpret_cast<uint4*>(ws + row * TILE_LD + col) = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; kk += 16) {
            u32 af[2][4], al[2][4], bf[4][2];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const int at = (wm * 32 + mt * 16 + g) * TILE_LD + kk + 2 * q;
#pragma unroll
                for (int part = 0; part < 2; part++) {
                    const u16* base = (part == 0 ? xs : xl) + at;
                    u32* a = part == 0 ? af[mt] : al[mt];
                    a[0] = *reinterpret_cast<const u32*>(base);
                    a[1] = *reinterpret_cast<const u32*>(base + 8 * TILE_LD);
                    a[2] = *reinterpret_cast<const u32*>(base + 8);
                    a[3] = *reinterpret_cast<const u32*>(base + 8 * TILE_LD + 8);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const u16* base = ws + (wn * 32 + nt * 8 + g) * TILE_LD + kk + 2 * q;
                bf[nt][0] = *reinterpret_cast<const u32*>(base);
                bf[nt][1] = *reinterpret_cast<const u32*>(base + 8);
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    mma_16816(acc[mt][nt], al[mt], bf[nt], w);
                    mma_16816(acc[mt][nt], af[mt], bf[nt], w);
                }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const int col = n0 + wn * 32 + nt * 8 + 2 * q;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int row = m0 + wm * 32 + mt * 16 + g + half * 8;
                if (row >= t) continue;
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    if (col + e < n)
                        out[(size_t)row * n + col + e] =
                            acc[mt][nt][half * 2 + e] + (bias != nullptr ? bias[col + e] : 0.0f);
                }
            }
        }
    }
}

#define MATMUL(dtype, W)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                          \
        matmul_gemv_##dtype(const float* x, const W* w, const float* bias, float* out, int t, int n, int k) {  \
        gemv_body<W>(x, w, bias, out, t, n, k);                                                            \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                      \
        matmul_gemm_##dtype(const float* x, const W* w, const float* bias, float* out, int t, int n, int k) {  \
        gemm_body<W>(x, w, bias, out, t, n, k);                                                            \
    }
MATMUL(bf16, __nv_bfloat16)
MATMUL(f16, __half)
