// Causal attention over a KV cache with grouped-query heads, in two entry points:
//
// The cache is paged: [pages][page_size][n_kv_heads][head_dim]; position pos of slot s is row
// pos % page_size of page table[s * width + pos / page_size], the page table following the
// tokens' (slot, pos) pairs in the layout buffer (from word table_at on).
//
// kv_store: writes this batch's k and v ([t, n_kv_heads, head_dim]) into the cache at each
// token's (slot, pos). One thread per value;
// each cache row is one contiguous, coalesced write. It runs as its own dispatch before
// `attention`, so a token sees the keys of the earlier tokens of its own batch.
//
// attention: one workgroup of 64 threads per (token, head), over the slot's positions 0..=pos
// in chunks of 64 with an online softmax (running max m and sum l, rescaled per chunk), so no
// score array of context length is ever stored. In a chunk, thread j computes the score of
// position c0 + j (one dot product over a contiguous cache row of k), then every thread owns
// head dims d ≡ lid (mod 64) and accumulates Σ_j e_j · v[j, d]: for a given j the 64 threads read
// one contiguous v row. q sits in workgroup memory, read by all threads.

struct Params {
    t: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    page_size: u32,
    width: u32,
    table_at: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// (slot, pos) per token, then the page table.
@group(0) @binding(1) var<storage, read> tokens: array<u32>;

// Cache row of position `pos` of `slot`.
fn kv_row(slot: u32, pos: u32) -> u32 {
    return tokens[p.table_at + slot * p.width + pos / p.page_size] * p.page_size + pos % p.page_size;
}

// --- kv_store ---
@group(0) @binding(2) var<storage, read> k_new: array<f32>;
@group(0) @binding(3) var<storage, read> v_new: array<f32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(256)
fn kv_store(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let kvw = p.n_kv_heads * p.head_dim;
    let g = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (g >= p.t * kvw) {
        return;
    }
    let tok = g / kvw;
    let j = g % kvw;
    let at = kv_row(tokens[2u * tok], tokens[2u * tok + 1u]) * kvw + j;
    k_cache[at] = k_new[g];
    v_cache[at] = v_new[g];
}

// --- attention ---
// (Bindings distinct from kv_store's, so each entry point's interface is unambiguous.)
@group(0) @binding(6) var<storage, read> q: array<f32>;
@group(0) @binding(7) var<storage, read> k_read: array<f32>;
@group(0) @binding(8) var<storage, read> v_read: array<f32>;
@group(0) @binding(9) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
// The host checks head_dim ≤ MAX_HEAD_DIM.
const MAX_HEAD_DIM: u32 = 256u;
// Finite stand-in for −∞ (WGSL does not promise infinities).
const NEG_BIG: f32 = -3.0e38;

var<workgroup> qs: array<f32, 256>;
var<workgroup> e: array<f32, 64>;
var<workgroup> red: array<f32, 64>;
// Cache row of each position of the current chunk.
var<workgroup> rows: array<u32, 64>;
var<workgroup> wg_u: vec2<u32>;

fn reduce_max(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red[0]);
}

fn reduce_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red[0]);
}

@compute @workgroup_size(64)
fn attention(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
) {
    let lid = lid3.x;
    let idx = wg.x + wg.y * nwg.x;
    if (idx >= p.t * p.n_heads) {
        return;
    }
    let tok = idx / p.n_heads;
    let head = idx % p.n_heads;
    let kvh = head / (p.n_heads / p.n_kv_heads);
    let hd = p.head_dim;
    let kvw = p.n_kv_heads * hd;
    // The token's slot and position come from a storage buffer; pass them through workgroup
    // memory so the loop bound is provably uniform (the loop contains barriers).
    if (lid == 0u) {
        wg_u = vec2<u32>(tokens[2u * tok], tokens[2u * tok + 1u]);
    }
    let sp = workgroupUniformLoad(&wg_u);
    let n = sp.y + 1u;
    let qo = idx * hd;
    for (var d = lid; d < hd; d += WG) {
        qs[d] = q[qo + d];
    }
    workgroupBarrier();
    var m = NEG_BIG;
    var l = 0.0;
    var o: array<f32, 4>;
    for (var c0 = 0u; c0 < n; c0 += WG) {
        workgroupBarrier(); // the previous chunk's rows are no longer read
        let j = c0 + lid;
        var s = NEG_BIG;
        if (j < n) {
            let row = kv_row(sp.x, j);
            rows[lid] = row;
            let ko = (row * p.n_kv_heads + kvh) * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot = fma(qs[d], k_read[ko + d], dot);
            }
            s = dot * p.scale;
        }
        let m_new = max(m, reduce_max(s, lid));
        var ej = 0.0;
        if (j < n) {
            ej = exp(s - m_new);
        }
        e[lid] = ej;
        let chunk_sum = reduce_sum(ej, lid);
        // Rescale what was accumulated under the old max (nothing in the first chunk).
        let alpha = select(exp(m - m_new), 0.0, c0 == 0u);
        l = l * alpha + chunk_sum;
        m = m_new;
        let count = min(WG, n - c0);
        for (var a = 0u; a < 4u; a++) {
            let d = lid + a * WG;
            if (d < hd) {
                var acc = o[a] * alpha;
                for (var jj = 0u; jj < count; jj++) {
                    acc = fma(e[jj], v_read[(rows[jj] * p.n_kv_heads + kvh) * hd + d], acc);
                }
                o[a] = acc;
            }
        }
    }
    let inv = 1.0 / l;
    for (var a = 0u; a < 4u; a++) {
        let d = lid + a * WG;
        if (d < hd) {
            out[qo + d] = o[a] * inv;
        }
    }
}
