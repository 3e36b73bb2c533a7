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

// -- weights (identical in embed.wgsl, matmul.wgsl and rope.wgsl) --
// Weights are stored as u32 words. W_FORMAT 0: f32, one element per word. 1: f16 and 2: bf16,
// two elements per word, the even element in the low half; 16-bit rows are padded to an even
// length so every row starts on a word. f16 is unpacked with unpack2x16float (core WGSL, no
// SHADER_F16 needed), bf16 by shifting into the high half of an f32. The constant is set per
// pipeline, so the driver compiles one branch.
override W_FORMAT: u32 = 0u;

fn w_load(i: u32) -> f32 {
    if (W_FORMAT == 0u) {
        return bitcast<f32>(w[i]);
    }
    let word = w[i >> 1u];
    if (W_FORMAT == 1u) {
        return unpack2x16float(word)[i & 1u];
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
}

// Elements i and i + 1, for even i: one word for 16-bit formats.
fn w_load2(i: u32) -> vec2<f32> {
    if (W_FORMAT == 0u) {
        return vec2<f32>(bitcast<f32>(w[i]), bitcast<f32>(w[i + 1u]));
    }
    let word = w[i >> 1u];
    if (W_FORMAT == 1u) {
        return unpack2x16float(word);
    }
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}
// -- end weights --

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
