// Row gather: out[i, :] = x[rows[i], :] (the hidden states whose logits are wanted).
//
// One workgroup per gathered row, threads striding over it: coalesced reads and writes.

struct Params {
    n_rows: u32,
    width: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> rows: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn gather_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let i = wg.x + wg.y * nwg.x;
    if (i >= p.n_rows) {
        return;
    }
    let src = rows[i] * p.width;
    let dst = i * p.width;
    for (var j = lid.x; j < p.width; j += 256u) {
        out[dst + j] = x[src + j];
    }
}
