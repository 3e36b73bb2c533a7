// Shared by every shader that reads weights (the WGSL twin of kernels/common.cuh). WGSL has no
// #include: persona prepends this file to a shader whose source calls `w_load` (see
// src/backend/wgpu/context.rs, `shader_sources`); the shader declares the `w` binding itself.
//
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
