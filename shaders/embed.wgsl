// Embedding lookup: out[i, :] = table[ids[i], :], widened to f32.
//
// One workgroup per token, its 256 threads striding over the row: consecutive threads read
// consecutive words of the table row, so each row is one coalesced read. A table larger than the
// adapter's storage binding limit is split by rows into chunks; the host dispatches once per
// chunk and each dispatch writes only the tokens whose id falls in its rows [row0, row0 + rows).

struct Params {
    n_ids: u32,
    width: u32,
    // First table row held by this chunk, and its row count.
    row0: u32,
    rows: u32,
    // Elements per stored row (width, rounded up to even for 16-bit formats).
    stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

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
fn embed(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let i = wg.x + wg.y * nwg.x;
    if (i >= p.n_ids) {
        return;
    }
    let id = ids[i];
    if (id < p.row0 || id >= p.row0 + p.rows) {
        return;
    }
    let src = (id - p.row0) * p.stride;
    let dst = i * p.width;
    for (var j = lid.x; j < p.width; j += 256u) {
        out[dst + j] = w_load(src + j);
    }
}
