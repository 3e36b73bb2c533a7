// out = silu(gate) · up, elementwise: one thread per element, a purely bandwidth-bound pass
// (two reads, one write).

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn silu_mul(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) {
        return;
    }
    let g = gate[i];
    // g · sigmoid(g) without overflow: exp of a non-positive number only (WGSL does not
    // promise infinities, which exp(-g) would give for g < -88).
    let e = exp(-abs(g));
    let sig = select(e / (1.0 + e), 1.0 / (1.0 + e), g >= 0.0);
    out[i] = g * sig * up[i];
}
