// Rotary position embedding in place, rotate-half convention: for each head and i < hd/2,
// (a, b) = (x[i], x[i + hd/2]) becomes (a·cos − b·sin, b·cos + a·sin) with (cos, sin) read from
// the table row of the token's position ([positions, hd/2, 2]).
//
// One thread per rotated pair: the pair is read and written by that thread only, so the op is
// safe in place; a token's heads share one table row, which stays in cache.

struct Params {
    t: u32,
    heads: u32,
    head_dim: u32,
    // Elements per stored table row.
    stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// (slot, pos) per token.
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

// Weight loads (`W_FORMAT`, `w_load`, `w_load2`) come from common.wgsl, prepended at load time.

@compute @workgroup_size(256)
fn rope(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let half_dim = p.head_dim / 2u;
    let g = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (g >= p.t * p.heads * half_dim) {
        return;
    }
    let i = g % half_dim;
    let th = g / half_dim;
    let tok = th / p.heads;
    let pos = tokens[2u * tok + 1u];
    let cs = w_load2(pos * p.stride + 2u * i);
    let base = th * p.head_dim;
    let a = x[base + i];
    let b = x[base + i + half_dim];
    x[base + i] = a * cs.x - b * cs.y;
    x[base + i + half_dim] = b * cs.x + a * cs.y;
}
