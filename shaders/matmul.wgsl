// Dense layer: out[i, n0 + r] = Σ_k x[i, k] · w[r, k] + bias[n0 + r], W in PyTorch [out, in]
// layout, accumulated in f32 whatever the weight format. Two entry points, chosen by the host
// from the token count:
//
// matmul_gemv (decode, t ≤ 8): bound by reading W once. A workgroup of 256 threads owns 8 rows,
// 32 threads per row; the 32 threads of a row read consecutive words of it (one coalesced
// stream), two elements at a time. Per token, each thread's partial sum goes to workgroup
// memory and one thread per row adds the row's 32 partials in order (one barrier, not a
// log-step tree). A second token re-reads the workgroup's 8 rows from cache, not from memory;
// x is tiny and stays in cache. A token's result does not depend on t.
//
// matmul_gemm (prefill): bound by arithmetic. 64 tokens × 64 rows per workgroup, staged through
// workgroup memory 16 columns of k at a time (8 KiB), so each x and W element fetched from
// global memory is reused 64 times; each thread accumulates a 4 × 4 block in registers.
//
// A weight larger than the adapter's storage binding limit is split by rows into chunks; the
// host dispatches once per chunk with n0 set to the chunk's first row.

struct Params {
    t: u32,
    k: u32,
    // Rows of this weight chunk and the first output column they produce.
    n_rows: u32,
    n0: u32,
    // Row stride of out (all columns of all chunks).
    n_out: u32,
    // Elements per stored weight row (k, rounded up to even for 16-bit formats).
    stride: u32,
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Weight loads (`W_FORMAT`, `w_load`, `w_load2`) come from common.wgsl, prepended at load time.

const GEMV_ROWS: u32 = 8u;
const GEMV_LANES: u32 = 32u;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn matmul_gemv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let lane = lid.x % GEMV_LANES;
    let r = (wg.x + wg.y * nwg.x) * GEMV_ROWS + lid.x / GEMV_LANES;
    let valid = r < p.n_rows;
    let base = r * p.stride;
    let pairs = p.k / 2u;
    for (var i = 0u; i < p.t; i++) {
        var acc = 0.0;
        if (valid) {
            let xo = i * p.k;
            for (var q = lane; q < pairs; q += GEMV_LANES) {
                let wv = w_load2(base + 2u * q);
                acc = fma(x[xo + 2u * q + 1u], wv.y, fma(x[xo + 2u * q], wv.x, acc));
            }
            if ((p.k & 1u) == 1u && lane == 0u) {
                acc = fma(x[xo + p.k - 1u], w_load(base + p.k - 1u), acc);
            }
        }
        partial[lid.x] = acc;
        workgroupBarrier();
        if (valid && lane == 0u) {
            var v = 0.0;
            for (var s = 0u; s < GEMV_LANES; s++) {
                v += partial[lid.x + s];
            }
            if (p.has_bias != 0u) {
                v += bias[p.n0 + r];
            }
            out[i * p.n_out + p.n0 + r] = v;
        }
        workgroupBarrier();
    }
}

const TILE: u32 = 64u;
const TK: u32 = 16u;

// Staged tiles, k-major ([TK][TILE]) so the inner loop reads 16 consecutive floats per k step.
var<workgroup> xs: array<f32, 1024>;
var<workgroup> ws: array<f32, 1024>;

@compute @workgroup_size(256)
fn matmul_gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.x * TILE;
    let tok0 = wg.y * TILE;
    // Thread (ty, tx) computes tokens tok0 + ty + 16 a and rows row0 + tx + 16 b (a, b < 4): the
    // strided assignment makes the 16 threads of a row of the block read distinct banks.
    let tx = lid.x % 16u;
    let ty = lid.x / 16u;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var s = 0u; s < 4u; s++) {
            let e = lid.x + 256u * s;
            let kk = e % TK;
            let o = e / TK;
            let kg = k0 + kk;
            var xv = 0.0;
            if (tok0 + o < p.t && kg < p.k) {
                xv = x[(tok0 + o) * p.k + kg];
            }
            xs[kk * TILE + o] = xv;
            var wv = 0.0;
            if (row0 + o < p.n_rows && kg < p.k) {
                wv = w_load((row0 + o) * p.stride + kg);
            }
            ws[kk * TILE + o] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var j = 0u; j < 4u; j++) {
                a[j] = xs[kk * TILE + ty + 16u * j];
                b[j] = ws[kk * TILE + tx + 16u * j];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let tok = tok0 + ty + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let r = row0 + tx + 16u * j;
            if (tok < p.t && r < p.n_rows) {
                var v = acc[i][j];
                if (p.has_bias != 0u) {
                    v += bias[p.n0 + r];
                }
                out[tok * p.n_out + p.n0 + r] = v;
            }
        }
    }
}
