// The fused residual boundary, one ok over each token row of h:
//   h += delta; probes (pre-steering); this token's steering ops in order; probes again if h
//   changed; x = rmsnorm(h) · norm.
// Captures (sums of h over the tokens of a capture slot) are a second, tiny entry point,
// `capture_sum`, run after this one: tokens of one slot share a sum, and WGSL has no float
// atomics, so one thread per (slot, column) adds the tokens in order, as the CPU does.
//
// One workgroup of 256 threads per token row. Thread `lid` owns columns j ≡ lid (mod 256) for
// the whole op, so every update of h is read-modify-write by its owner only and needs no
// barrier; only the dot products (probes, ablate/clamp projections, the sum of squares) cross
// threads, through a tree reduction in workgroup memory. h is read from and written to global
// memory once per op that changes it; with no steering that is one read and one write of h, one
// read of delta and one write of x per element.
//
// Control flow that surrounds a reduction must be uniform across the workgroup (barriers), so
// everything it depends on comes from the uniform params or passes through workgroup memory
// (workgroupUniformLoad): the token's sequence and flags, each op, each condition value.

struct Params {
    t: u32,
    width: u32,
    eps: f32,
    has_delta: u32,
    // Residual index l and the call's number of sequences S.
    layer: u32,
    n_seqs: u32,
    // Word offsets in `plan` of the op records, the probe records, and the (l·S + s) range
    // offsets of each (token records start at 0).
    ops_off: u32,
    probes_off: u32,
    op_ranges_off: u32,
    probe_ranges_off: u32,
    // Zero.
    reserved: u32,
    // Float offset in `vecs` of the unit vectors (raw vectors start at 0): the table's rows × width.
    units_off: u32,
    n_layers: u32,
    n_captures: u32,
    reserved2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> h: array<f32>;
@group(0) @binding(2) var<storage, read> delta: array<f32>;
@group(0) @binding(3) var<storage, read> norm: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;
// The vector table: [rows][width] raw vectors, then [rows][width] unit vectors. It stays on the
// device across calls; plans index its rows.
@group(0) @binding(5) var<storage, read> vecs: array<f32>;
// Token records [t][4] (seq, flags, capture slot or NONE, offset of its projection row), op
// records [n_ops][8] (OpDesc: seq, kind, vec, positions, coeff bits, cond_col, cond_cmp,
// threshold bits), probe records [n_probes][3] (seq, vec, col), both sorted by (layer, seq), and
// their range offsets [(n_layers + 1)·S + 1] each: sequence s's records at layer l are
// [ranges[l·S + s], ranges[l·S + s + 1]).
@group(0) @binding(6) var<storage, read> plan: array<u32>;
// Each token's projection row (its sequence's probe columns) at the token's offset.
@group(0) @binding(7) var<storage, read_write> proj: array<f32>;
// [n_ops][2]: tokens each op's positions rule selected, and tokens it was applied to (the
// receipts of steering; thread 0 of each row counts).
@group(0) @binding(10) var<storage, read_write> counts: array<atomic<u32>>;

const NONE: u32 = 0xffffffffu;
const TOKEN_PROMPT: u32 = 1u;
const TOKEN_LAST: u32 = 2u;
const OP_ADD: u32 = 0u;
const OP_CLAMP: u32 = 2u;
const POS_ALL: u32 = 0u;
const POS_PROMPT: u32 = 1u;
const POS_LAST: u32 = 2u;

var<workgroup> red: array<f32, 256>;
var<workgroup> wg_u: vec4<u32>;
var<workgroup> wg_f: f32;

// Σ over the workgroup, the same value in every thread.
fn wg_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red[0]);
}

// Thread 0's `v`, made uniform.
fn uniform_u4(v: vec4<u32>, lid: u32) -> vec4<u32> {
    workgroupBarrier();
    if (lid == 0u) {
        wg_u = v;
    }
    return workgroupUniformLoad(&wg_u);
}

fn uniform_f(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    if (lid == 0u) {
        wg_f = v;
    }
    return workgroupUniformLoad(&wg_f);
}

// h_row · units[vec]
fn project(row: u32, vec: u32, lid: u32) -> f32 {
    let uo = p.units_off + vec * p.width;
    var acc = 0.0;
    for (var j = lid; j < p.width; j += 256u) {
        acc = fma(h[row + j], vecs[uo + j], acc);
    }
    return wg_sum(acc, lid);
}

// Sequence `seq`'s probes at this layer, into its projection row at `base`.
fn run_probes(seq: u32, base: u32, row: u32, lid: u32) {
    let at = p.probe_ranges_off + p.layer * p.n_seqs + seq;
    let range = uniform_u4(vec4<u32>(plan[at], plan[at + 1u], 0u, 0u), lid);
    for (var k = range.x; k < range.y; k++) {
        let rec = p.probes_off + 3u * k;
        let pr = uniform_u4(vec4<u32>(plan[rec + 1u], plan[rec + 2u], 0u, 0u), lid);
        let v = project(row, pr.x, lid);
        if (lid == 0u) {
            proj[base + pr.y] = v;
        }
    }
}

fn add_delta(row: u32, lid: u32) {
    if (p.has_delta != 0u) {
        for (var j = lid; j < p.width; j += 256u) {
            h[row + j] += delta[row + j];
        }
    }
}

fn norm_row(row: u32, lid: u32) {
    var ss = 0.0;
    for (var j = lid; j < p.width; j += 256u) {
        let a = h[row + j];
        ss = fma(a, a, ss);
    }
    let total = wg_sum(ss, lid);
    let inv = 1.0 / sqrt(total / f32(p.width) + p.eps);
    for (var j = lid; j < p.width; j += 256u) {
        x[row + j] = h[row + j] * inv * norm[j];
    }
}

// Plain boundary (no plan at this index): h += delta; x = rmsnorm(h) · norm.
@compute @workgroup_size(256)
fn residual_norm(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
) {
    let i = wg.x + wg.y * nwg.x;
    if (i >= p.t) {
        return;
    }
    let row = i * p.width;
    add_delta(row, lid3.x);
    norm_row(row, lid3.x);
}

@compute @workgroup_size(256)
fn residual_steer_norm(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
) {
    let lid = lid3.x;
    let i = wg.x + wg.y * nwg.x;
    if (i >= p.t) {
        return;
    }
    let row = i * p.width;
    add_delta(row, lid);
    let tok = uniform_u4(vec4<u32>(plan[4u * i], plan[4u * i + 1u], 0u, plan[4u * i + 3u]), lid);
    let seq = tok.x;
    let flags = tok.y;
    let base = tok.w;
    // Same-layer conditions see the pre-steering projections.
    run_probes(seq, base, row, lid);
    var changed = false;
    let ra = p.op_ranges_off + p.layer * p.n_seqs + seq;
    let ops = uniform_u4(vec4<u32>(plan[ra], plan[ra + 1u], 0u, 0u), lid);
    for (var k = ops.x; k < ops.y; k++) {
        let at = p.ops_off + 8u * k;
        let a = uniform_u4(vec4<u32>(plan[at], plan[at + 1u], plan[at + 2u], plan[at + 3u]), lid);
        let b = uniform_u4(vec4<u32>(plan[at + 4u], plan[at + 5u], plan[at + 6u], plan[at + 7u]), lid);
        let kind = a.y;
        let vec = a.z;
        let positions = a.w;
        let coeff = bitcast<f32>(b.x);
        let cond_col = b.y;
        let cond_cmp = b.z;
        let threshold = bitcast<f32>(b.w);
        var at_pos = false;
        if (positions == POS_ALL) {
            at_pos = true;
        } else if (positions == POS_PROMPT) {
            at_pos = (flags & TOKEN_PROMPT) != 0u;
        } else if (positions == POS_LAST) {
            at_pos = (flags & TOKEN_LAST) != 0u;
        }
        if (!at_pos) {
            continue;
        }
        if (lid == 0u) {
            atomicAdd(&counts[2u * k], 1u);
        }
        if (cond_col != NONE) {
            // Thread 0 wrote this layer's projections itself, so it reads them back in program
            // order; earlier layers' come from earlier dispatches.
            var pv = 0.0;
            if (lid == 0u) {
                pv = proj[base + cond_col];
            }
            let v = uniform_f(pv, lid);
            let ok = select((v < threshold), (v > threshold), cond_cmp == 0u);
            if (!ok) {
                continue;
            }
        }
        if (lid == 0u) {
            atomicAdd(&counts[2u * k + 1u], 1u);
        }
        if (kind == OP_ADD) {
            // α = 0 leaves h untouched bit for bit.
            if (coeff != 0.0) {
                let vo = vec * p.width;
                for (var j = lid; j < p.width; j += 256u) {
                    h[row + j] += coeff * vecs[vo + j];
                }
                changed = true;
            }
        } else if (kind <= OP_CLAMP) {
            // ablate: h -= (h·u) u; clamp: h += (c − h·u) u.
            let goal = select(0.0, coeff, kind == OP_CLAMP);
            let c = goal - project(row, vec, lid);
            let uo = p.units_off + vec * p.width;
            for (var j = lid; j < p.width; j += 256u) {
                h[row + j] += c * vecs[uo + j];
            }
            changed = true;
        }
    }
    if (changed) {
        run_probes(seq, base, row, lid);
    }
    norm_row(row, lid);
}

// --- capture_sum: capture[c, l, :] += Σ h[i, :] over the tokens i of capture slot c, in token
// order. One thread per (slot, column): the token records are broadcast reads, h reads are
// coalesced across threads.
@group(0) @binding(8) var<storage, read> h_read: array<f32>;
@group(0) @binding(9) var<storage, read_write> capture: array<f32>;

@compute @workgroup_size(256)
fn capture_sum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wg.x * 256u + lid.x;
    let c = wg.y;
    if (j >= p.width || c >= p.n_captures) {
        return;
    }
    let at = (c * (p.n_layers + 1u) + p.layer) * p.width + j;
    var acc = capture[at];
    for (var i = 0u; i < p.t; i++) {
        if (plan[4u * i + 2u] == c) {
            acc += h_read[i * p.width + j];
        }
    }
    capture[at] = acc;
}
