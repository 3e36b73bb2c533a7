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

// Weight loads (`W_FORMAT`, `w_load`, `w_load2`) come from common.wgsl, prepended at load time.

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
