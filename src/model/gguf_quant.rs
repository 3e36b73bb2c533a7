//! Dequantization of ggml block-quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants
//! Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K) to f32, bit for bit as ggml's `dequantize_row_*`
//! (ggml/src/ggml-quants.c) and gguf-py's `dequantize` (gguf-py/gguf/quants.py) do; F32/F16/BF16
//! are widened. Every product and difference is one f32 operation in ggml's order (no fused
//! multiply-add), so the results equal numpy's float32 arithmetic in gguf-py exactly.
//!
//! K-quant super-blocks hold 256 elements (`QK_K`), in ggml's structs (`block_q*_K`, ggml-common.h):
//! - Q2_K (84 bytes): `scales[16]` (low nibble: scale, high nibble: min, per 16 elements), `qs[64]`
//!   (2-bit), f16 `d`, f16 `dmin`; y = d·sc·q − dmin·m.
//! - Q3_K (110): `hmask[32]` (the third bit, cleared = −4), `qs[64]` (low 2 bits), `scales[12]`
//!   (sixteen 6-bit scales, biased by 32), f16 `d`; y = d·(sc − 32)·(q − 4·!h).
//! - Q4_K (144): f16 `d`, f16 `dmin`, `scales[12]` (eight 6-bit scales and eight 6-bit mins, per 32
//!   elements: `get_scale_min_k4`), `qs[128]` (nibbles); y = d·sc·q − dmin·m.
//! - Q5_K (176): as Q4_K plus `qh[32]`, the fifth bit.
//! - Q6_K (210): `ql[128]` (low nibbles), `qh[64]` (high 2 bits), `scales[16]` (i8, per 16 elements),
//!   f16 `d`; y = d·sc·(q − 32).
//! - Q8_K (292): f32 `d`, `qs[256]` (i8), `bsums[16]` (i16, unused here); y = d·q.
//! Large tensors are decoded in parallel chunks of blocks. Used by
//! [`GgufFile::tensor`](crate::model::gguf::GgufFile::tensor); public as
//! [`crate::model::gguf::dequantize`].

use half::f16;
use rayon::prelude::*;

use crate::backend::cpu::simd::Simd;
use crate::error::{Error, Result};
use crate::model::gguf_types::GgmlType;

/// Dequantize `n` elements of ggml type `ty` stored in `data` to f32, bit-for-bit as ggml's
/// `dequantize_row_*` (and gguf-py's `dequantize`) do. F32/F16/BF16 are widened.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let (block, bytes) = match ty.block_layout() {
        Some((b, s)) if ty.is_readable() => (b as usize, s as usize),
        _ => {
            return Err(Error::Unsupported(format!(
                "ggml type {ty} cannot be read (supported: {})",
                GgmlType::READABLE.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    if n % block != 0 {
        return Err(Error::Invalid(format!("{n} elements are not a whole number of {ty} blocks of {block}")));
    }
    let need = n / block * bytes;
    if data.len() != need {
        return Err(Error::Invalid(format!("{n} {ty} elements need {need} bytes, got {}", data.len())));
    }
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, y| y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q2_K => block_q2_k,
        GgmlType::Q3_K => block_q3_k,
        GgmlType::Q4_K => block_q4_k,
        GgmlType::Q5_K => block_q5_k,
        GgmlType::Q6_K => block_q6_k,
        GgmlType::Q8_K => block_q8_k,
        _ => unreachable!("is_readable covers exactly these types"),
    };
    let mut out = vec![0f32; n];
    // Chunks of 1024 blocks: big enough to amortise rayon's scheduling, small enough to balance.
    const CHUNK: usize = 1024;
    let run = |(y, b): (&mut [f32], &[u8])| {
        for (yb, bb) in y.chunks_exact_mut(block).zip(b.chunks_exact(bytes)) {
            f(bb, yb);
        }
    };
    if n / block >= 4 * CHUNK {
        out.par_chunks_mut(CHUNK * block).zip(data.par_chunks(CHUNK * bytes)).for_each(run);
    } else {
        run((&mut out, data));
    }
    Ok(out)
}

#[inline(always)]
/// Decode whole blocks of `ty` (rows of a weight, as the CPU matmul reads them) into `out`,
/// serially and without allocating: the same values as [`dequantize`], bit for bit. `simd`
/// runs a copy compiled for AVX2/F16C (the block code auto-vectorizes there; still no fused
/// multiply-add, so the values do not change). `out.len()` elements; `data` must hold exactly
/// their blocks (checked when the tensor was read).
pub fn decode_into(ty: GgmlType, data: &[u8], out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller passes simd only when AVX2, FMA and F16C were detected.
        return unsafe { decode_avx2(ty, data, out) };
    }
    let _ = simd;
    decode_plain(ty, data, out)
}

/// How many packed rows of `ty` [`dot_rows`] takes at once for `t` tokens at SIMD level `simd`
/// (0: it has no fused kernel for them, and the caller decodes rows and runs its f32 tile
/// instead): with AVX-512, 6 rows for one token and 3 for 2 to 4; with AVX2, 3 for one token
/// and, for Q4_K and Q6_K, 2 for 2 to 4.
pub fn dot_rows_max(ty: GgmlType, simd: Simd, t: usize) -> usize {
    use GgmlType::*;
    if !matches!(ty, Q4_0 | Q4_1 | Q5_0 | Q8_0 | Q4_K | Q6_K) {
        return 0;
    }
    match (simd, t) {
        (Simd::Avx512, 1) => 6,
        (Simd::Avx512, 2..=4) | (Simd::Avx2, 1) => 3,
        (Simd::Avx2, 2..=4) if matches!(ty, Q4_K | Q6_K) => AVX2_BATCH_ROWS,
        _ => 0,
    }
}

/// Rows per AVX2 fused kernel call for 2 to 4 tokens (K-quants only). Against decoding the rows
/// into the scratch, with the AVX2 level forced on this machine (medians of 3-4 alternating
/// runs): Qwen2.5-Coder-1.5B Q4_K_M tg16 at batch 2 13.7 -> 21.5-21.9 tok/s (20.7 with 3 rows),
/// batch 3 25.0 (23.5 with 1 row), batch 4 22.1 -> 30.8 (28.6 with 1 row); the default model's
/// Q4_1 did not gain (batch 2 157.0 vs 158.1, batch 3 172.4 vs 168.1, batch 4 243.5 vs 237.9),
/// so the 32-element types keep the scratch there.
const AVX2_BATCH_ROWS: usize = 2;

/// The 8-lane dot-product accumulators of `t` tokens (`x`, `t` rows of k) against up to
/// [`dot_rows_max`] packed rows (`lanes.len() / t`; row r's lanes for token i in
/// `lanes[r · t + i]`), the decode fused into the product and shared by the tokens: the same
/// lanes as the matmul's f32 tile on the decoded rows, bit for bit. Returns false, doing
/// nothing, where [`dot_rows_max`] is smaller than the number of rows, `lanes.len()` or
/// `x.len()` is not a multiple of `t`, or k is not a whole number of blocks (32 elements; 256
/// for the K-quants).
pub fn dot_rows(
    ty: GgmlType,
    x: &[f32],
    t: usize,
    rows: &[u8],
    row_bytes: usize,
    lanes: &mut [[f32; 8]],
    simd: Simd,
) -> bool {
    // A level above what this CPU runs is lowered to the detected one.
    let simd = simd.min(crate::backend::cpu::simd::detected());
    let block = ty.block_layout().map_or(32, |b| b.0 as usize);
    if t == 0 || x.len() % t != 0 || lanes.len() % t != 0 {
        return false;
    }
    let k = x.len() / t;
    if lanes.len() / t > dot_rows_max(ty, simd, t) || k % block != 0 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: simd is at most the detected level, and dot_rows_max is non-zero only from Avx2
    // (AVX2, FMA and F16C; Avx512 adds AVX-512 F/BW/VL/DQ) and for t ≤ 4 (with AVX2, 1 except
    // for Q4_K and Q6_K, so the one-token AVX2 calls get t = 1 only); the kernels check the lengths.
    unsafe {
        // `$m::$f` for this call's tokens: one token with `$one` rows in flight, 2 to 4 with
        // `$batch`. AVX-512: 6 and 3; AVX2 (16 registers): 3 and, for the K-quants, 2.
        macro_rules! tokens {
            ($m:ident :: $f:ident, $one:expr, $batch:expr) => {{
                let xs = |i: usize| &x[i * k..][..k];
                match t {
                    1 => $m::$f::<1, { $one }>([x], rows, row_bytes, lanes),
                    2 => $m::$f::<2, { $batch }>(std::array::from_fn(xs), rows, row_bytes, lanes),
                    3 => $m::$f::<3, { $batch }>(std::array::from_fn(xs), rows, row_bytes, lanes),
                    _ => $m::$f::<4, { $batch }>(std::array::from_fn(xs), rows, row_bytes, lanes),
                }
            }};
        }
        match (simd, ty) {
            (Simd::Avx512, GgmlType::Q4_1) => tokens!(avx512::dot_q4_1, 6, 3),
            (Simd::Avx512, GgmlType::Q4_0) => tokens!(avx512::dot_q4_0, 6, 3),
            (Simd::Avx512, GgmlType::Q5_0) => tokens!(avx512::dot_q5_0, 6, 3),
            (Simd::Avx512, GgmlType::Q8_0) => tokens!(avx512::dot_q8_0, 6, 3),
            (Simd::Avx512, GgmlType::Q4_K) => tokens!(avx512::dot_q4_k, 6, 3),
            (Simd::Avx512, GgmlType::Q6_K) => tokens!(avx512::dot_q6_k, 6, 3),
            // AVX2: the 32-element types take one token only (dot_rows_max).
            (_, GgmlType::Q4_1) => avx2::dot_q4_1::<1, 3>([x], rows, row_bytes, lanes),
            (_, GgmlType::Q4_0) => avx2::dot_q4_0::<1, 3>([x], rows, row_bytes, lanes),
            (_, GgmlType::Q8_0) => avx2::dot_q8_0::<1, 3>([x], rows, row_bytes, lanes),
            (_, GgmlType::Q5_0) => avx2::dot_q5_0::<1, 3>([x], rows, row_bytes, lanes),
            (_, GgmlType::Q4_K) => tokens!(avx2::dot_q4_k, 3, AVX2_BATCH_ROWS),
            (_, GgmlType::Q6_K) => tokens!(avx2::dot_q6_k, 3, AVX2_BATCH_ROWS),
            _ => return false,
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, row_bytes);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_avx2(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    use avx2::*;
    match ty {
        GgmlType::Q4_0 => each_block!(32, 18, data, out, q4_0),
        GgmlType::Q4_1 => each_block!(32, 20, data, out, q4_1),
        GgmlType::Q8_0 => each_block!(32, 34, data, out, q8_0),
        GgmlType::Q5_0 => each_block!(32, 22, data, out, q5_0),
        GgmlType::Q4_K => each_block!(256, 144, data, out, q4_k),
        GgmlType::Q6_K => each_block!(256, 210, data, out, q6_k),
        // The other types: the plain code, auto-vectorized for AVX2.
        _ => decode_plain(ty, data, out),
    }
}

/// Prefetch for kernels that read several rows at once: the hardware prefetcher did not
/// follow their interleaved streams (6 Q4_K rows of k = 1536 from memory: 6.7-7.2 GB/s with
/// per-row prefetches two super-blocks ahead or none, 12-14 GB/s this way). The rows of a
/// task are adjacent, so they are read as one stream: with `done` of its bytes consumed and
/// `step` more about to be, fetch the lines of the step 8 KB further on (never faults past the
/// end). Distance: Q8_0 from memory read 14-16 GB/s at 1-4 KB, 25-26 at 8 KB, 22-25 at 12-16 KB;
/// Q4_0/Q4_1, Q5_0, Q4_K and Q6_K, slower to compute, measured alike from 4 to 12 KB.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn stream_ahead(base: *const u8, done: usize, step: usize) {
    let first = done / 64 + 128;
    for l in first..first + step.div_ceil(64) {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.wrapping_add(l * 64) as *const i8);
    }
}

/// Hand-written AVX2 block decoders for the common types, and the fused decode-dot kernels
/// (3 rows at a time; the AVX-512 module reuses some of their pieces with 6). Each value is
/// computed with the same f32 operations in the same order as the plain block code (a multiply,
/// then an add or subtract; never fused), so the results are identical.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Run a block decoder over whole blocks (`B` elements in `S` bytes each).
    macro_rules! each_block {
        ($b:literal, $s:literal, $data:expr, $out:expr, $f:ident) => {{
            let (data, out): (&[u8], &mut [f32]) = ($data, $out);
            let n = (out.len() / $b).min(data.len() / $s);
            for i in 0..n {
                // Prefetch never faults, so running past the end is harmless.
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    data.as_ptr().wrapping_add((i + 2) * $s) as *const i8,
                );
                $f(data.as_ptr().add(i * $s), out.as_mut_ptr().add(i * $b));
            }
        }};
    }
    pub(super) use each_block;

    #[inline(always)]
    unsafe fn h(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*p, *p.add(1)]) as i32)))
    }

    /// The low 8 bytes of `v` (u8) as 8 f32.
    #[inline(always)]
    unsafe fn bytes8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// Store `d · q − m` of 16 u8 values at `y`.
    #[inline(always)]
    unsafe fn store16_dmul_sub(q: __m128i, d: __m256, m: __m256, y: *mut f32) {
        let a = bytes8(q);
        let b = bytes8(_mm_srli_si128(q, 8));
        _mm256_storeu_ps(y, _mm256_sub_ps(_mm256_mul_ps(d, a), m));
        _mm256_storeu_ps(y.add(8), _mm256_sub_ps(_mm256_mul_ps(d, b), m));
    }

    /// A Q4_1 block as 4 registers of 8 values (elements 0..8, 8..16, 16..24, 24..32).
    #[inline(always)]
    unsafe fn q4_1_regs(b: *const u8) -> [__m256; 4] {
        let d = _mm256_set1_ps(h(b));
        let m = _mm256_set1_ps(h(b.add(2)));
        let q = _mm_loadu_si128(b.add(4) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let (lo, hi) = (_mm_and_si128(q, mask), _mm_and_si128(_mm_srli_epi16(q, 4), mask));
        // No closures or array maps here: they would not inherit the caller's target features.
        [
            _mm256_add_ps(_mm256_mul_ps(bytes8(lo), d), m),
            _mm256_add_ps(_mm256_mul_ps(bytes8(_mm_srli_si128(lo, 8)), d), m),
            _mm256_add_ps(_mm256_mul_ps(bytes8(hi), d), m),
            _mm256_add_ps(_mm256_mul_ps(bytes8(_mm_srli_si128(hi, 8)), d), m),
        ]
    }

    /// A Q4_0 block as 4 registers of 8 values.
    #[inline(always)]
    unsafe fn q4_0_regs(b: *const u8) -> [__m256; 4] {
        let d = _mm256_set1_ps(h(b));
        let q = _mm_loadu_si128(b.add(2) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let eight = _mm256_set1_epi32(8);
        let (lo, hi) = (_mm_and_si128(q, mask), _mm_and_si128(_mm_srli_epi16(q, 4), mask));
        let (lo2, hi2) = (_mm_srli_si128(lo, 8), _mm_srli_si128(hi, 8));
        [
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), eight)), d),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo2), eight)), d),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), eight)), d),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi2), eight)), d),
        ]
    }

    /// A Q5_0 block as 4 registers of 8 values: `(q − 16) · d` with q = the nibble and, as its
    /// fifth bit, bit `e` of `qh` for element `e` — the integer steps of [`super::block_q5_0`],
    /// then one conversion and one multiply.
    #[inline(always)]
    unsafe fn q5_0_regs(b: *const u8) -> [__m256; 4] {
        let d = _mm256_set1_ps(h(b));
        let qh = u32::from_le_bytes([*b.add(2), *b.add(3), *b.add(4), *b.add(5)]);
        let q = _mm_loadu_si128(b.add(6) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let (lo, hi) = (_mm_and_si128(q, mask), _mm_and_si128(_mm_srli_epi16(q, 4), mask));
        let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let (one, sixteen) = (_mm256_set1_epi32(1), _mm256_set1_epi32(16));
        // Elements 8c .. 8c + 8: nibbles of bytes 8(c % 2) .., low for c < 2; fifth bits in byte c of qh.
        #[inline(always)]
        unsafe fn reg(nib: __m128i, qh_byte: u32, bits: __m256i, one: __m256i, sixteen: __m256i, d: __m256) -> __m256 {
            let fifth =
                _mm256_slli_epi32(_mm256_min_epu32(_mm256_and_si256(_mm256_set1_epi32(qh_byte as i32), bits), one), 4);
            let q = _mm256_sub_epi32(_mm256_or_si256(_mm256_cvtepu8_epi32(nib), fifth), sixteen);
            _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
        }
        [
            reg(lo, qh & 0xFF, bits, one, sixteen, d),
            reg(_mm_srli_si128(lo, 8), (qh >> 8) & 0xFF, bits, one, sixteen, d),
            reg(hi, (qh >> 16) & 0xFF, bits, one, sixteen, d),
            reg(_mm_srli_si128(hi, 8), qh >> 24, bits, one, sixteen, d),
        ]
    }

    /// A Q8_0 block as 4 registers of 8 values.
    #[inline(always)]
    pub(super) unsafe fn q8_0_regs(b: *const u8) -> [__m256; 4] {
        let d = _mm256_set1_ps(h(b));
        [
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2) as *const __m128i))), d),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(10) as *const __m128i))), d),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(18) as *const __m128i))), d),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(26) as *const __m128i))), d),
        ]
    }

    #[inline(always)]
    unsafe fn store32(r: [__m256; 4], y: *mut f32) {
        for (i, v) in r.into_iter().enumerate() {
            _mm256_storeu_ps(y.add(8 * i), v);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1(b: *const u8, y: *mut f32) {
        store32(q4_1_regs(b), y)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_0(b: *const u8, y: *mut f32) {
        store32(q4_0_regs(b), y)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0(b: *const u8, y: *mut f32) {
        store32(q8_0_regs(b), y)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q5_0(b: *const u8, y: *mut f32) {
        store32(q5_0_regs(b), y)
    }

    /// The checks every fused kernel makes before it reads: `(nb, nr)`, the number of blocks of
    /// `elems` values (`bytes` bytes) in a row and the number of rows (at most `R`) whose lanes
    /// fit in `lanes` for `NT` tokens; panics where `rows` or a token's activations are short.
    #[inline(always)]
    pub(super) fn fused_lens<const NT: usize, const R: usize>(
        xs: &[&[f32]; NT],
        rows: &[u8],
        row_bytes: usize,
        lanes: &[[f32; 8]],
        elems: usize,
        bytes: usize,
    ) -> (usize, usize) {
        let nb = xs[0].len() / elems;
        let nr = (lanes.len() / NT).min(R);
        assert!(rows.len() >= nr * row_bytes && row_bytes >= nb * bytes && xs.iter().all(|x| x.len() >= nb * elems));
        (nb, nr)
    }

    /// The 8-lane accumulators of `NT` tokens against up to `R` packed rows (`lanes.len() / NT`;
    /// 32-element blocks of `$s` bytes), one row and token per 256-bit register, chunk by chunk in
    /// order (the arithmetic of the matmul's f32 tile on the decoded rows, without writing them
    /// out); `$regs(block)` gives a block's 4 chunks of weights, made once for all the tokens.
    /// Compiled for `$features`: AVX2 runs it with 3 rows, AVX-512 with 6 (or 3 for 2-4 tokens).
    macro_rules! row_dot {
        ($name:ident, $regs:expr, $s:literal, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const NT: usize, const R: usize>(
                xs: [&[f32]; NT],
                rows: &[u8],
                row_bytes: usize,
                lanes: &mut [[f32; 8]],
            ) {
                use $crate::model::gguf_quant::avx2::{fused_lens, store_lanes, XChunks};
                let (nb, nr) = fused_lens::<NT, R>(&xs, rows, row_bytes, lanes, 32, $s);
                let base = rows.as_ptr();
                let mut acc = [[_mm256_setzero_ps(); NT]; R];
                for blk in 0..nb {
                    $crate::model::gguf_quant::stream_ahead(base, blk * $s * nr, $s * nr);
                    let xv = XChunks::<NT, 4>::new(&xs, 32 * blk);
                    for r in 0..R {
                        if r < nr {
                            let w = $regs(base.add(r * row_bytes + blk * $s));
                            for c in 0..4 {
                                for tk in 0..NT {
                                    acc[r][tk] = _mm256_fmadd_ps(xv.at(tk, c), w[c], acc[r][tk]);
                                }
                            }
                        }
                    }
                }
                store_lanes(&acc, nr, lanes);
            }
        };
    }
    pub(super) use row_dot;
    row_dot!(dot_q4_1, q4_1_regs, 20, "avx2,fma,f16c");
    row_dot!(dot_q4_0, q4_0_regs, 18, "avx2,fma,f16c");
    row_dot!(dot_q8_0, q8_0_regs, 34, "avx2,fma,f16c");
    row_dot!(dot_q5_0, q5_0_regs, 22, "avx2,fma,f16c");

    /// Row r's accumulator for token t into `lanes[r · NT + t]`, for the first `nr` rows.
    #[inline(always)]
    pub(super) unsafe fn store_lanes<const NT: usize, const R: usize>(
        acc: &[[__m256; NT]; R],
        nr: usize,
        lanes: &mut [[f32; 8]],
    ) {
        for (r, a) in acc.iter().enumerate().take(nr) {
            for (tk, v) in a.iter().enumerate() {
                _mm256_storeu_ps(lanes[r * NT + tk].as_mut_ptr(), *v);
            }
        }
    }

    /// The tokens' chunks of 8 activations at `off + 8c` (c < C) for the multi-row kernels: one
    /// token's are loaded once for all the rows; more tokens' at each use (kept in registers
    /// they spilled, and 4 tokens ran slower than the decoded-scratch path).
    pub(super) struct XChunks<'a, const NT: usize, const C: usize> {
        xs: &'a [&'a [f32]; NT],
        off: usize,
        one: [__m256; C],
    }

    impl<'a, const NT: usize, const C: usize> XChunks<'a, NT, C> {
        /// Safety: every row of `xs` holds `off + 8C` values.
        #[inline(always)]
        pub(super) unsafe fn new(xs: &'a [&'a [f32]; NT], off: usize) -> Self {
            let mut one = [_mm256_setzero_ps(); C];
            if NT == 1 {
                for (c, v) in one.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(xs[0].as_ptr().add(off + 8 * c));
                }
            }
            XChunks { xs, off, one }
        }

        /// Token `tk`'s chunk `c`.
        #[inline(always)]
        pub(super) unsafe fn at(&self, tk: usize, c: usize) -> __m256 {
            if NT == 1 {
                self.one[c]
            } else {
                _mm256_loadu_ps(self.xs[tk].as_ptr().add(self.off + 8 * c))
            }
        }
    }

    /// A Q4_K super-block's eight sub-block scales `d·s_j` and mins `dmin·m_j` (the plain code's
    /// products).
    #[inline(always)]
    pub(super) unsafe fn k_scales_mins_f32(b: *const u8) -> ([f32; 8], [f32; 8]) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
        let (sc, mn) = super::k_scales_mins(b);
        let wide = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
        let (mut d, mut m) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(d.as_mut_ptr(), _mm256_mul_ps(_mm256_broadcastss_ps(dm), wide(sc)));
        _mm256_storeu_ps(m.as_mut_ptr(), _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dm)), wide(mn)));
        (d, m)
    }

    /// The 8-lane accumulators of `NT` tokens against up to `R` packed Q4_K rows (`lanes.len() /
    /// NT`; AVX2 runs one token with 3): each chunk of 8 weights converted and scaled as the plain
    /// decoder does (`d·s · q − dmin·m`, multiplied then subtracted), in element order through
    /// the row's FMA chain.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_k<const NT: usize, const R: usize>(
        xs: [&[f32]; NT],
        rows: &[u8],
        row_bytes: usize,
        lanes: &mut [[f32; 8]],
    ) {
        let (nb, nr) = fused_lens::<NT, R>(&xs, rows, row_bytes, lanes, 256, 144);
        let base = rows.as_ptr();
        let mask = _mm256_set1_epi32(0x0F);
        let mut acc = [[_mm256_setzero_ps(); NT]; R];
        for blk in 0..nb {
            super::stream_ahead(base, blk * 144 * nr, 144 * nr);
            let mut sm = [([0f32; 8], [0f32; 8]); R];
            for (r, v) in sm.iter_mut().enumerate().take(nr) {
                *v = k_scales_mins_f32(base.add(r * row_bytes + blk * 144));
            }
            for i in 0..4 {
                let xv = XChunks::<NT, 8>::new(&xs, 256 * blk + 64 * i);
                for r in 0..R {
                    if r < nr {
                        let q = base.add(r * row_bytes + blk * 144 + 16 + 32 * i);
                        let (d, m) = &sm[r];
                        // Bytes 8c..8c + 8: elements 8c.. (low nibbles, sub-block 2i), then
                        // 32 + 8c.. (high nibbles, 2i + 1).
                        let mut b = [_mm256_setzero_si256(); 4];
                        for (c, v) in b.iter_mut().enumerate() {
                            *v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8 * c) as *const __m128i));
                        }
                        let (d1, m1) = (_mm256_set1_ps(d[2 * i]), _mm256_set1_ps(m[2 * i]));
                        for c in 0..4 {
                            let w =
                                _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(_mm256_and_si256(b[c], mask))), m1);
                            for tk in 0..NT {
                                acc[r][tk] = _mm256_fmadd_ps(xv.at(tk, c), w, acc[r][tk]);
                            }
                        }
                        let (d2, m2) = (_mm256_set1_ps(d[2 * i + 1]), _mm256_set1_ps(m[2 * i + 1]));
                        for c in 0..4 {
                            let w =
                                _mm256_sub_ps(_mm256_mul_ps(d2, _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b[c]))), m2);
                            for tk in 0..NT {
                                acc[r][tk] = _mm256_fmadd_ps(xv.at(tk, 4 + c), w, acc[r][tk]);
                            }
                        }
                    }
                }
            }
        }
        store_lanes(&acc, nr, lanes);
    }

    /// The 8-lane accumulators of `NT` tokens against up to `R` packed Q6_K rows (`lanes.len() /
    /// NT`), one row and token per 256-bit register. Each 32-element run's 6-bit values are
    /// assembled as bytes for the whole run at once (nibble of `ql` | two bits of `qh` << 4, minus
    /// 32); a chunk of 8 is then widened, converted and multiplied by its scale `d·sc` (per 16
    /// elements) as the plain decoder does, and goes through the row's FMA chain in element order.
    /// (Two rows per 512-bit register measured the same, 17-18 GB/s from memory.)
    macro_rules! q6_k_dot {
        ($name:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const NT: usize, const R: usize>(
                xs: [&[f32]; NT],
                rows: &[u8],
                row_bytes: usize,
                lanes: &mut [[f32; 8]],
            ) {
                let (nb, nr) =
                    $crate::model::gguf_quant::avx2::fused_lens::<NT, R>(&xs, rows, row_bytes, lanes, 256, 210);
                // Run g (0..4) of half h of a row as 32 signed bytes q − 32: `ql` nibble (low for runs
                // 0, 1; high for 2, 3) | bits 2g, 2g + 1 of `qh` at bits 4, 5.
                #[inline(always)]
                unsafe fn run(b: *const u8, h: usize, g: usize) -> __m256i {
                    let ql = _mm256_loadu_si256(b.add(64 * h + 32 * (g % 2)) as *const __m256i);
                    let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
                    let m4 = _mm256_set1_epi8(0x0F);
                    let nib =
                        if g < 2 { _mm256_and_si256(ql, m4) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(ql), m4) };
                    // Bits 2g, 2g + 1 of each byte moved to 4, 5 (16-bit shifts; the bits that cross a
                    // byte boundary are masked off).
                    let hi = match g {
                        0 => _mm256_slli_epi16::<4>(qh),
                        1 => _mm256_slli_epi16::<2>(qh),
                        2 => qh,
                        _ => _mm256_srli_epi16::<2>(qh),
                    };
                    let q = _mm256_or_si256(nib, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
                    _mm256_sub_epi8(q, _mm256_set1_epi8(32))
                }
                let base = rows.as_ptr();
                let mut acc = [[_mm256_setzero_ps(); NT]; R];
                for blk in 0..nb {
                    $crate::model::gguf_quant::stream_ahead(base, blk * 210 * nr, 210 * nr);
                    // Each row's 16 scales `d · sc` (sc as i8), with the plain code's product.
                    let mut sc = [[0f32; 16]; R];
                    for (r, v) in sc.iter_mut().enumerate().take(nr) {
                        let b = base.add(r * row_bytes + blk * 210);
                        let d = _mm_cvtph_ps(_mm_cvtsi32_si128((b.add(208) as *const u16).read_unaligned() as i32));
                        let d = _mm256_broadcastss_ps(d);
                        for half in 0..2 {
                            let s = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                b.add(192 + 8 * half) as *const __m128i
                            )));
                            _mm256_storeu_ps(v.as_mut_ptr().add(8 * half), _mm256_mul_ps(d, s));
                        }
                    }
                    for h in 0..2 {
                        for g in 0..4 {
                            let xv = $crate::model::gguf_quant::avx2::XChunks::<NT, 4>::new(
                                &xs,
                                256 * blk + 128 * h + 32 * g,
                            );
                            for r in 0..R {
                                if r < nr {
                                    let q = run(base.add(r * row_bytes + blk * 210), h, g);
                                    let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                                    let chunks = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                                    for (c, qc) in chunks.into_iter().enumerate() {
                                        let s = _mm256_set1_ps(sc[r][8 * h + 2 * g + c / 2]);
                                        let w = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qc)));
                                        for tk in 0..NT {
                                            acc[r][tk] = _mm256_fmadd_ps(xv.at(tk, c), w, acc[r][tk]);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                $crate::model::gguf_quant::avx2::store_lanes(&acc, nr, lanes);
            }
        };
    }
    pub(super) use q6_k_dot;
    q6_k_dot!(dot_q6_k, "avx2,fma,f16c");

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_k(b: *const u8, y: *mut f32) {
        let d = h(b);
        let min = h(b.add(2));
        let scales = std::slice::from_raw_parts(b.add(4), 12);
        let mask = _mm_set1_epi8(0x0F);
        for i in 0..4 {
            let (s1, m1) = super::scale_min_k4(2 * i, scales);
            let (s2, m2) = super::scale_min_k4(2 * i + 1, scales);
            let (d1, m1) = (_mm256_set1_ps(d * s1 as f32), _mm256_set1_ps(min * m1 as f32));
            let (d2, m2) = (_mm256_set1_ps(d * s2 as f32), _mm256_set1_ps(min * m2 as f32));
            let out = y.add(64 * i);
            for half in 0..2 {
                let q = _mm_loadu_si128(b.add(16 + 32 * i + 16 * half) as *const __m128i);
                store16_dmul_sub(_mm_and_si128(q, mask), d1, m1, out.add(16 * half));
                store16_dmul_sub(_mm_and_si128(_mm_srli_epi16(q, 4), mask), d2, m2, out.add(32 + 16 * half));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6_k(b: *const u8, y: *mut f32) {
        let d = h(b.add(208));
        let m4 = _mm_set1_epi8(0x0F);
        let m3 = _mm_set1_epi8(3);
        let bias = _mm256_set1_epi32(32);
        for half in 0..2 {
            let ql = b.add(64 * half);
            let qh = b.add(128 + 32 * half);
            let sc = b.add(192 + 8 * half);
            let out = y.add(128 * half);
            // 16 elements at a time: l in [16·is, 16·is + 16) share scale sc[is + 2k].
            for is in 0..2 {
                let l0 = 16 * is;
                let a = _mm_loadu_si128(ql.add(l0) as *const __m128i);
                let c = _mm_loadu_si128(ql.add(l0 + 32) as *const __m128i);
                let hb = _mm_loadu_si128(qh.add(l0) as *const __m128i);
                let q = [
                    _mm_or_si128(_mm_and_si128(a, m4), _mm_slli_epi16(_mm_and_si128(hb, m3), 4)),
                    _mm_or_si128(_mm_and_si128(c, m4), _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hb, 2), m3), 4)),
                    _mm_or_si128(
                        _mm_and_si128(_mm_srli_epi16(a, 4), m4),
                        _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hb, 4), m3), 4),
                    ),
                    _mm_or_si128(
                        _mm_and_si128(_mm_srli_epi16(c, 4), m4),
                        _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hb, 6), m3), 4),
                    ),
                ];
                for (k, v) in q.into_iter().enumerate() {
                    let s = _mm256_set1_ps(d * (*sc.add(is + 2 * k) as i8) as f32);
                    for part in 0..2 {
                        let w = if part == 0 { v } else { _mm_srli_si128(v, 8) };
                        let x = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(w), bias));
                        _mm256_storeu_ps(out.add(32 * k + l0 + 8 * part), _mm256_mul_ps(s, x));
                    }
                }
            }
        }
    }
}

/// AVX-512 fused decode and dot. Each row keeps the f32 tile's one 8-lane FMA chain, chunk by
/// chunk in order, in a 256-bit register (AVX-512VL), with 6 rows in flight (rows in pairs per
/// 512-bit register ran 7-35% slower, or no faster for Q6_K). Where a block has few possible
/// values (16 for Q4_0/Q4_1 and per Q4_K sub-block, 32 for Q5_0), they are computed once with the
/// plain code's operations and each chunk's weights are picked by index (`vpermt2ps`, whose
/// 8-lane form reads a 16-entry table of two registers) instead of being converted and scaled
/// one by one. The values are those of the plain decoder bit for bit (the same operations on
/// the same q), so results do not change.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The f16 `d` (and for Q4_1 `m`) at a block's start: (d, m) in every lane.
    #[inline(always)]
    unsafe fn dm(b: *const u8) -> (__m256, __m256) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
        (_mm256_broadcastss_ps(dm), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)))
    }

    /// A block's 16 bytes of nibbles at `q` as 4 registers of 32-bit indices, one per chunk of 8
    /// elements: low nibbles are elements 0..16, high nibbles 16..32. The low nibbles keep their
    /// byte's high bits: a 16-entry permute reads index bits 0..4 only.
    #[inline(always)]
    unsafe fn nibbles(q: *const u8) -> [__m256i; 4] {
        let b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q as *const __m128i));
        let b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8) as *const __m128i));
        [b0, b1, _mm256_srli_epi32::<4>(b0), _mm256_srli_epi32::<4>(b1)]
    }

    /// A Q4_1 (`Q4_1`: `q·d + m`) or Q4_0 (`(q − 8)·d`) block as 4 chunks of 8 weights.
    #[inline(always)]
    unsafe fn q4_regs<const Q4_1: bool>(b: *const u8) -> [__m256; 4] {
        let (d, m) = dm(b);
        let (t0, t1) = if Q4_1 {
            let (lo, hi) =
                (_mm256_setr_ps(0., 1., 2., 3., 4., 5., 6., 7.), _mm256_setr_ps(8., 9., 10., 11., 12., 13., 14., 15.));
            (_mm256_add_ps(_mm256_mul_ps(lo, d), m), _mm256_add_ps(_mm256_mul_ps(hi, d), m))
        } else {
            let (lo, hi) = (
                _mm256_setr_ps(-8., -7., -6., -5., -4., -3., -2., -1.),
                _mm256_setr_ps(0., 1., 2., 3., 4., 5., 6., 7.),
            );
            (_mm256_mul_ps(lo, d), _mm256_mul_ps(hi, d))
        };
        let n = nibbles(b.add(if Q4_1 { 4 } else { 2 }));
        [
            _mm256_permutex2var_ps(t0, n[0], t1),
            _mm256_permutex2var_ps(t0, n[1], t1),
            _mm256_permutex2var_ps(t0, n[2], t1),
            _mm256_permutex2var_ps(t0, n[3], t1),
        ]
    }

    /// A Q5_0 block (`(q − 16)·d`, q = nibble + 16 · the element's bit of `qh`) as 4 chunks of
    /// 8 weights: the 32 values are two 16-entry tables (q < 16, q ≥ 16), and each chunk's 8
    /// bits of `qh` pick between them lane by lane.
    #[inline(always)]
    unsafe fn q5_0_regs(b: *const u8) -> [__m256; 4] {
        let (d, _) = dm(b);
        let t = [
            _mm256_mul_ps(_mm256_setr_ps(-16., -15., -14., -13., -12., -11., -10., -9.), d),
            _mm256_mul_ps(_mm256_setr_ps(-8., -7., -6., -5., -4., -3., -2., -1.), d),
            _mm256_mul_ps(_mm256_setr_ps(0., 1., 2., 3., 4., 5., 6., 7.), d),
            _mm256_mul_ps(_mm256_setr_ps(8., 9., 10., 11., 12., 13., 14., 15.), d),
        ];
        let qh = (b.add(2) as *const u32).read_unaligned();
        let n = nibbles(b.add(6));
        let mut w = [_mm256_setzero_ps(); 4];
        for c in 0..4 {
            // Chunk c is elements 8c..8c + 8: their fifth bits are bits 8c.. of qh.
            let fifth = ((qh >> (8 * c)) & 0xFF) as __mmask8;
            let low = _mm256_permutex2var_ps(t[0], n[c], t[1]);
            let high = _mm256_permutex2var_ps(t[2], n[c], t[3]);
            w[c] = _mm256_mask_blend_ps(fifth, low, high);
        }
        w
    }

    /// The 8-lane accumulators of `NT` tokens against up to `R` packed Q4_K rows (`lanes.len() /
    /// NT`), one row and token per 256-bit register: each 32-element sub-block's 16 values
    /// `d·s·q − dmin·m` (q = 0..16, multiplied then subtracted as the plain decoder) form a table
    /// of two registers per row, and each chunk of 8 weights is picked from it by nibble
    /// (AVX-512VL's two-table permute on 8 lanes), once for all the tokens. A run of 64 elements
    /// is 32 bytes: the low nibbles are elements 0..32 (sub-block 2i), the high nibbles 32..64
    /// (2i + 1). The chunks are multiplied in element order, so each row's chain is the f32
    /// tile's. (Rows in pairs per 512-bit register ran 7% slower: 24.4 vs 26.3 G weights/s on 2
    /// cores.)
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_k<const NT: usize, const R: usize>(
        xs: [&[f32]; NT],
        rows: &[u8],
        row_bytes: usize,
        lanes: &mut [[f32; 8]],
    ) {
        let (nb, nr) = super::avx2::fused_lens::<NT, R>(&xs, rows, row_bytes, lanes, 256, 144);
        let lo = _mm256_setr_ps(0., 1., 2., 3., 4., 5., 6., 7.);
        let hi = _mm256_setr_ps(8., 9., 10., 11., 12., 13., 14., 15.);
        let base = rows.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); NT]; R];
        for blk in 0..nb {
            super::stream_ahead(base, blk * 144 * nr, 144 * nr);
            let mut sm = [([0f32; 8], [0f32; 8]); R];
            for (r, v) in sm.iter_mut().enumerate().take(nr) {
                *v = super::avx2::k_scales_mins_f32(base.add(r * row_bytes + blk * 144));
            }
            for i in 0..4 {
                let xv = super::avx2::XChunks::<NT, 8>::new(&xs, 256 * blk + 64 * i);
                for r in 0..R {
                    if r < nr {
                        let q = base.add(r * row_bytes + blk * 144 + 16 + 32 * i);
                        let (d, m) = &sm[r];
                        let table = |j: usize| {
                            let (dj, mj) = (_mm256_set1_ps(d[j]), _mm256_set1_ps(m[j]));
                            (_mm256_sub_ps(_mm256_mul_ps(lo, dj), mj), _mm256_sub_ps(_mm256_mul_ps(hi, dj), mj))
                        };
                        let (t1, t2) = (table(2 * i), table(2 * i + 1));
                        // Bytes 8c..8c + 8: elements 8c.. (low nibbles, sub-block 2i) and
                        // 32 + 8c.. (high nibbles, 2i + 1); the permute reads index bits 0..4.
                        let mut b = [_mm256_setzero_si256(); 4];
                        for (c, v) in b.iter_mut().enumerate() {
                            *v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8 * c) as *const __m128i));
                        }
                        for c in 0..4 {
                            let w = _mm256_permutex2var_ps(t1.0, b[c], t1.1);
                            for tk in 0..NT {
                                acc[r][tk] = _mm256_fmadd_ps(xv.at(tk, c), w, acc[r][tk]);
                            }
                        }
                        for c in 0..4 {
                            let w = _mm256_permutex2var_ps(t2.0, _mm256_srli_epi32::<4>(b[c]), t2.1);
                            for tk in 0..NT {
                                acc[r][tk] = _mm256_fmadd_ps(xv.at(tk, 4 + c), w, acc[r][tk]);
                            }
                        }
                    }
                }
            }
        }
        super::avx2::store_lanes(&acc, nr, lanes);
    }

    super::avx2::q6_k_dot!(dot_q6_k, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");

    // The AVX2 module's kernel over this module's table-lookup blocks (Q8_0: its converter).
    super::avx2::row_dot!(dot_q4_1, q4_regs::<true>, 20, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");
    super::avx2::row_dot!(dot_q4_0, q4_regs::<false>, 18, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");
    super::avx2::row_dot!(dot_q5_0, q5_0_regs, 22, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");
    super::avx2::row_dot!(dot_q8_0, super::avx2::q8_0_regs, 34, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");
}

#[inline(always)]
fn decode_plain(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    #[inline(always)]
    fn each<const B: usize, const S: usize>(data: &[u8], out: &mut [f32], f: impl Fn(&[u8], &mut [f32])) {
        for (yb, bb) in out.chunks_exact_mut(B).zip(data.chunks_exact(S)) {
            f(bb, yb);
        }
    }
    match ty {
        GgmlType::F32 => {
            for (y, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => match bytemuck::try_cast_slice::<u8, f16>(data) {
            Ok(h) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&h[..out.len()], out),
            Err(_) => {
                for (y, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                    *y = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        },
        GgmlType::BF16 => {
            for (y, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *y = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        GgmlType::Q8_0 => each::<32, 34>(data, out, block_q8_0),
        GgmlType::Q4_0 => each::<32, 18>(data, out, block_q4_0),
        GgmlType::Q4_1 => each::<32, 20>(data, out, block_q4_1),
        GgmlType::Q5_0 => each::<32, 22>(data, out, block_q5_0),
        GgmlType::Q5_1 => each::<32, 24>(data, out, block_q5_1),
        GgmlType::Q2_K => each::<256, 84>(data, out, block_q2_k),
        GgmlType::Q3_K => each::<256, 110>(data, out, block_q3_k),
        GgmlType::Q4_K => each::<256, 144>(data, out, block_q4_k),
        GgmlType::Q5_K => each::<256, 176>(data, out, block_q5_k),
        GgmlType::Q6_K => each::<256, 210>(data, out, block_q6_k),
        GgmlType::Q8_K => each::<256, 292>(data, out, block_q8_k),
        // Unreadable types never become packed tensors (HostTensor::quant refuses them).
        _ => out.fill(f32::NAN),
    }
}

/// `n_blocks` blocks of `ty` with random quants and small finite scales (f16 `d`/`dmin` in
/// ±[0.001, 0.05)): test data for the kernels that read packed weights (`persona check`).
pub fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let (_, size) = ty.block_layout().map_or((1, 4), |(b, s)| (b as usize, s as usize));
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out: Vec<u8> = (0..n_blocks * size).map(|_| next() as u8).collect();
    // Byte offsets of each type's f16 scale fields (ggml-common.h).
    let f16_at: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    for blk in out.chunks_exact_mut(size) {
        let mut small = || {
            let r = next();
            let v = 0.001 + (r % 49_000) as f32 * 1e-6;
            if r & (1 << 40) != 0 {
                -v
            } else {
                v
            }
        };
        for &o in f16_at {
            blk[o..o + 2].copy_from_slice(&f16::from_f32(small()).to_le_bytes());
        }
        match ty {
            GgmlType::Q8_K => blk[0..4].copy_from_slice(&small().to_le_bytes()),
            GgmlType::F32 => blk.copy_from_slice(&small().to_le_bytes()),
            GgmlType::F16 => blk.copy_from_slice(&f16::from_f32(small() * 20.0).to_le_bytes()),
            GgmlType::BF16 => blk.copy_from_slice(&half::bf16::from_f32(small() * 20.0).to_le_bytes()),
            _ => {}
        }
    }
    out
}

/// The little-endian f16 at byte `i` of `b`, as f32.
#[inline(always)]
pub(crate) fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q8_0: f16 d, 32 × i8; y = d·q.
#[inline(always)]
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (yi, &q) in y.iter_mut().zip(&b[2..34]) {
        *yi = (q as i8) as f32 * d;
    }
}

/// Q4_0: f16 d, 16 bytes of nibbles (low nibbles are elements 0..16, high 16..32); y = d·(q−8).
#[inline(always)]
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; y = d·q + m.
#[inline(always)]
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 d, u32 high bits, 16 bytes of nibbles; y = d·(q−16) with q 5 bits.
#[inline(always)]
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((q as u32 & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q as u32 >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 d, f16 m, u32 high bits, 16 bytes of nibbles; y = d·q + m with q 5 bits.
#[inline(always)]
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((q as u32 & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((q as u32 >> 4) | h1) as f32 * d + m;
    }
}

/// Q2_K (`dequantize_row_q2_K`): for each half (128 elements, 32 bytes of `qs`), four 2-bit
/// planes (shift 0, 2, 4, 6), each two runs of 16 elements with their own scale byte.
#[inline(always)]
fn block_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let d = half_at(b, 80);
    let min = half_at(b, 82);
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for part in 0..2 {
                let sc = scales[8 * half + 2 * j + part];
                let dl = d * (sc & 0xF) as f32;
                let ml = min * (sc >> 4) as f32;
                let out = &mut y[128 * half + 32 * j + 16 * part..][..16];
                for (l, yl) in out.iter_mut().enumerate() {
                    *yl = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K (`dequantize_row_q3_K`): the sixteen 6-bit scales, unpacked as ggml's kmask code does:
/// low 4 bits from bytes 0..8 (low nibbles for scales 0..8, high for 8..16), high 2 bits from
/// byte 8 + s % 4 at bit 2·(s / 4).
#[inline(always)]
fn block_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, sb) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half_at(b, 108);
    let scale = |s: usize| -> i32 {
        let low = if s < 8 { sb[s] & 0xF } else { sb[s - 8] >> 4 };
        let high = (sb[8 + s % 4] >> (2 * (s / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    };
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            let shift = 2 * j;
            let m = 1u8 << (4 * half + j);
            for part in 0..2 {
                let dl = d * scale(8 * half + 2 * j + part) as f32;
                let out = &mut y[128 * half + 32 * j + 16 * part..][..16];
                for (l, yl) in out.iter_mut().enumerate() {
                    let i = 16 * part + l;
                    let v = ((q[i] >> shift) & 3) as i32 - if hmask[i] & m != 0 { 0 } else { 4 };
                    *yl = dl * v as f32;
                }
            }
        }
    }
}

/// The eight 6-bit scales and mins of the Q4_K/Q5_K super-block at `sb` (its 12 bytes at offset
/// 4), one per byte of each u64 in block order: [`scale_min_k4`] for all eight at once.
/// `sb` must point at a whole super-block. (Only the x86-64 kernels use it.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn k_scales_mins(sb: *const u8) -> (u64, u64) {
    let w = |o: usize| (sb.add(4 + o) as *const u32).read_unaligned() as u64;
    let (u0, u1, u2) = (w(0), w(4), w(8));
    let (m6, m4, m2) = (0x3F3F_3F3F, 0x0F0F_0F0F, 0x0303_0303);
    let sc = (u0 & m6) | ((u2 & m4) | ((u0 >> 6) & m2) << 4) << 32;
    let mn = (u1 & m6) | (((u2 >> 4) & m4) | ((u1 >> 6) & m2) << 4) << 32;
    (sc, mn)
}

/// ggml's `get_scale_min_k4`: scale and min `j` (0..8) of a Q4_K/Q5_K super-block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K (`dequantize_row_q4_K`): four runs of 64 elements, 32 bytes of `qs` each: the low
/// nibbles with scale/min 2i, then the high nibbles with 2i + 1.
#[inline(always)]
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let min = half_at(b, 2);
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for i in 0..4 {
        let q = &qs[32 * i..32 * i + 32];
        let (s1, m1) = scale_min_k4(2 * i, scales);
        let (s2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let out = &mut y[64 * i..64 * i + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0xF) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K (`dequantize_row_q5_K`): Q4_K's layout plus `qh`, whose bits 2i and 2i + 1 add 16 to the
/// low and high nibbles of run i.
#[inline(always)]
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let min = half_at(b, 2);
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for i in 0..4 {
        let ql = &qs[32 * i..32 * i + 32];
        let (u1, u2) = (1u8 << (2 * i), 2u8 << (2 * i));
        let (s1, m1) = scale_min_k4(2 * i, scales);
        let (s2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let out = &mut y[64 * i..64 * i + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            out[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K (`dequantize_row_q6_K`): per half (128 elements: 64 bytes of `ql`, 32 of `qh`, 8 scales),
/// four runs of 32 built from a nibble of `ql` and two bits of `qh`; y = (d·sc)·(q − 32).
#[inline(always)]
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            out[l] = s(0) * q1 as f32;
            out[l + 32] = s(2) * q2 as f32;
            out[l + 64] = s(4) * q3 as f32;
            out[l + 96] = s(6) * q4 as f32;
        }
    }
}

/// Q8_K (`dequantize_row_q8_K`): f32 d, 256 × i8, then 16 i16 block sums (not needed); y = d·q.
#[inline(always)]
fn block_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (yi, &q) in y.iter_mut().zip(&b[4..260]) {
        *yi = d * (q as i8) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::tests::{f16b, open_bytes, raw};
    use crate::model::gguf_write::encode;
    use crate::model::tensor::{HostTensor, Storage};

    /// The row decoder (plain and AVX2) gives exactly `dequantize`'s values for every type.
    #[test]
    fn decode_into_matches_dequantize_at_every_simd_level() {
        for ty in GgmlType::READABLE {
            let (block, _) = ty.block_layout().unwrap();
            let n = 3 * 256usize.max(block as usize);
            let data = random_blocks(ty, n / block as usize, 7);
            let want = dequantize(ty, &data, n).unwrap();
            assert!(want.iter().all(|v| v.is_finite()), "{ty}: random blocks decode to finite values");
            for simd in [false, true] {
                if simd
                    && !crate::backend::cpu::simd::Simd::available().contains(&crate::backend::cpu::simd::Simd::Avx2)
                {
                    eprintln!("SKIPPED: {ty} AVX2 decode (this CPU has no AVX2)");
                    continue;
                }
                let mut got = vec![f32::NAN; n];
                decode_into(ty, &data, &mut got, simd);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{ty} simd={simd} element {i}: {g} vs {w}");
                }
            }
        }
    }

    /// Nibble pattern used by the Q4/Q5 tests: low nibble j, high nibble 15 − j.
    fn nibbles() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    fn read_one(ty: GgmlType, dims: &[u64], data: Vec<u8>) -> HostTensor {
        let g = open_bytes(&encode(&[], &[raw("q", dims, ty, data)]).unwrap()).unwrap();
        let t = g.tensor("q").unwrap();
        assert!(matches!(t.storage, Storage::Quant { ty: t2, .. } if t2 == ty), "kept packed");
        t
    }

    #[test]
    fn q4_0_dequantizes_like_ggml() {
        // Block 0: d = 0.5, nibbles j / 15−j  →  y[j] = 0.5·(j−8), y[16+j] = 0.5·(7−j).
        // Block 1: d = −2, every byte 0x9F   →  y = −2·(15−8) = −14 (low), −2·(9−8) = −2 (high).
        let mut data = f16b(0.5).to_vec();
        data.extend(nibbles());
        data.extend(f16b(-2.0));
        data.extend([0x9F; 16]);
        let t = read_one(GgmlType::Q4_0, &[32, 2], data);
        assert_eq!(t.shape, [2, 32]);
        let y = t.to_f32();
        assert_eq!([y[0], y[1], y[8], y[15], y[16], y[17], y[31]], [-4.0, -3.5, 0.0, 3.5, 3.5, 3.0, -4.0]);
        assert!(y[32..48].iter().all(|&v| v == -14.0));
        assert!(y[48..64].iter().all(|&v| v == -2.0));
    }

    #[test]
    fn q4_1_dequantizes_like_ggml() {
        // d = 0.25, m = −1: y[j] = 0.25·j − 1, y[16+j] = 0.25·(15−j) − 1.
        let mut data = f16b(0.25).to_vec();
        data.extend(f16b(-1.0));
        data.extend(nibbles());
        let y = read_one(GgmlType::Q4_1, &[32], data).to_f32();
        assert_eq!([y[0], y[1], y[4], y[15], y[16], y[27], y[31]], [-1.0, -0.75, 0.0, 2.75, 2.75, 0.0, -1.0]);
    }

    #[test]
    fn q8_0_dequantizes_like_ggml() {
        // d = 0.125: y = 0.125·q.
        let mut data = f16b(0.125).to_vec();
        let q: [i8; 32] = std::array::from_fn(|i| match i {
            0 => -128,
            1 => 127,
            2 => 0,
            3 => 1,
            4 => -1,
            i => (i as i8) * 3 - 50,
        });
        data.extend(q.iter().map(|&x| x as u8));
        let y = read_one(GgmlType::Q8_0, &[32], data).to_f32();
        assert_eq!(&y[..5], &[-16.0, 15.875, 0.0, 0.125, -0.125]);
        assert_eq!(y[31], (31 * 3 - 50) as f32 * 0.125);
    }

    #[test]
    fn q5_0_and_q5_1_dequantize_like_ggml() {
        // qh bit j is the 5th bit of element j; bit 16 + j that of element 16 + j.
        // Bits 0 and 16 set; qs[1] = 0x21 (element 1 → 1, element 17 → 2), other bytes 0.
        let qh = (1u32 | (1 << 16)).to_le_bytes();
        let mut qs = [0u8; 16];
        qs[1] = 0x21;
        // Q5_0, d = 1: y = q − 16.
        let mut data = f16b(1.0).to_vec();
        data.extend(qh);
        data.extend(qs);
        let y = read_one(GgmlType::Q5_0, &[32], data).to_f32();
        assert_eq!([y[0], y[1], y[2], y[16], y[17], y[31]], [0.0, -15.0, -16.0, 0.0, -14.0, -16.0]);
        // Q5_1, d = 0.5, m = 1: y = 0.5·q + 1.
        let mut data = f16b(0.5).to_vec();
        data.extend(f16b(1.0));
        data.extend(qh);
        data.extend(qs);
        let y = read_one(GgmlType::Q5_1, &[32], data).to_f32();
        assert_eq!([y[0], y[1], y[2], y[16], y[17], y[31]], [9.0, 1.5, 1.0, 9.0, 2.0, 1.0]);
    }

    /// Blocks quantized by gguf-py 0.19.0 (`gguf.quants.quantize`) from
    /// `x = (sin(0.7·i)·1.3 + 0.01·i) as f32, i in 0..64`; the expected values are gguf-py's
    /// `dequantize` of the same bytes (f32 bit patterns at indices 0, 1, 5, 16, 17, 31, 32, 63,
    /// and the f64 sum of all 64).
    #[test]
    fn dequantization_matches_gguf_py() {
        #[rustfmt::skip]
        let cases: [(GgmlType, &str, [u32; 8], f64); 5] = [
            (GgmlType::Q4_0, "53b2e8b47132061a5d9edcd7b36122051a5d6db3194c8cbab693512205194b8cb9b68250",
             [0x80000000, 0x3f4a6000, 0xbeca6000, 0xbf97c800, 0xbf17c800, 0x3f17c800, 0xbe6da000, 0x3f323800], 19.83447265625),
            (GgmlType::Q4_1, "f331d4bc163b8dcdf9e4a15023174c8eddf9e5a1ee3163bbd4905013174c9eddf9e4a15123284c9f",
             [0xbdbb8000, 0x3f568800, 0xbeed4000, 0xbf82b400, 0xbf263800, 0x3f26f000, 0xbe3a8000, 0x3f3e9000], 20.55908203125),
            (GgmlType::Q5_0, "53aee1c18307b067e3541b34ab3c97af56d2440a239a6daf0f1e3c78329708646c25a2330a218607535b1491",
             [0x80000000, 0x3f63ac00, 0xbeca6000, 0xbf8b2200, 0xbf17c800, 0x3f311400, 0xbe6da000, 0x3f4fec00], 20.61224365234375),
            (GgmlType::Q5_1, "c12dd4bc1e3c7cf81d670c9ae3c941a0352f881dabf3da52bd2d63bbe0e1c387c831a0362f882dbbf3c942a147319a3e",
             [0xbd1cc000, 0x3f5c5c00, 0xbecbb800, 0xbf8efe00, 0xbf2ae800, 0x3f2e5400, 0xbe530000, 0x3f47bc00], 20.09222412109375),
            (GgmlType::Q8_0, "5f220044695d26dfaa9fc4094d70632ce5b0a7cd1255786931ebb7aed61b5e7f6f377c23f3c7c1e31f57726433f7ccc7eb265e796a38fcd2cef22e657f6f3d01d8d4fa36",
             [0x00000000, 0x3f589e00, 0xbed23f00, 0xbf8dc1c0, 0xbf227680, 0x3f2f3480, 0xbe429800, 0x3f4a1400], 20.25489044189453),
        ];
        for (ty, hex, bits, sum) in cases {
            let bytes: Vec<u8> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let y = dequantize(ty, &bytes, 64).unwrap();
            let got: Vec<u32> = [0, 1, 5, 16, 17, 31, 32, 63].iter().map(|&i| y[i].to_bits()).collect();
            assert_eq!(got, bits, "{ty}");
            let s: f64 = y.iter().map(|&v| v as f64).sum();
            assert!((s - sum).abs() < 1e-12, "{ty}: sum {s} vs {sum}");
        }
    }

    /// Every K-quant against gguf-py 0.19.0's `dequantize` of the same super-blocks (ordinary
    /// scales, zero scales, the largest f16 scale with a negative min), bit for bit: the
    /// blocks and values are in tests/data/kquant_goldens.json, written by
    /// scripts/kquant_goldens.py.
    #[test]
    fn k_quants_match_gguf_py_bit_for_bit() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
        };
        let g: serde_json::Value = serde_json::from_str(include_str!("../../tests/data/kquant_goldens.json")).unwrap();
        let cases = g["cases"].as_object().unwrap();
        assert_eq!(cases.len(), 6);
        for (name, c) in cases {
            let ty = GgmlType::READABLE.iter().copied().find(|t| t.name() == *name).unwrap();
            let blocks = hex(c["blocks"].as_str().unwrap());
            let want: Vec<u32> = hex(c["expected_f32_le"].as_str().unwrap())
                .chunks(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(want.len(), 3 * 256, "{name}");
            let y = dequantize(ty, &blocks, 3 * 256).unwrap();
            for (i, (got, want)) in y.iter().zip(&want).enumerate() {
                assert_eq!(
                    got.to_bits(),
                    *want,
                    "{name} element {i} (block {}): {got} vs {}",
                    i / 256,
                    f32::from_bits(*want)
                );
            }
            // The zero-scale block is all zeros (signed zero aside), the largest-scale one is finite.
            assert!(y[256..512].iter().all(|&v| v == 0.0), "{name}");
            assert!(y[512..].iter().all(|v| v.is_finite()) && y[512..].iter().any(|&v| v.abs() > 1000.0), "{name}");
            // Wrong sizes are errors.
            assert!(dequantize(ty, &blocks[1..], 3 * 256).is_err());
            assert!(dequantize(ty, &blocks, 3 * 256 - 32).is_err());
        }
    }

    #[test]
    fn parallel_dequantization_matches_serial() {
        // 5000 Q8_0 blocks takes the rayon path; each block compared with a one-block decode.
        let n_blocks = 5000;
        let mut data = Vec::with_capacity(n_blocks * 34);
        for b in 0..n_blocks {
            data.extend(f16b((b % 17) as f32 * 0.01 - 0.08));
            data.extend((0..32).map(|i| ((b * 31 + i * 7) % 256) as u8));
        }
        let all = dequantize(GgmlType::Q8_0, &data, n_blocks * 32).unwrap();
        for b in [0, 1, 1023, 1024, 4095, 4096, 4999] {
            let one = dequantize(GgmlType::Q8_0, &data[b * 34..(b + 1) * 34], 32).unwrap();
            assert_eq!(&all[b * 32..(b + 1) * 32], &one[..], "block {b}");
        }
    }
}
