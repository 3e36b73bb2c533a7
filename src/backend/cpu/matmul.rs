//! CPU matmul `out[t, n] = x[t, :] · w[n, :] + b[n]`, W in PyTorch `[out, in]` layout.
//! Parallel over blocks of W rows: each block of W is read from memory once and reused for
//! every token while it sits in cache, which is what decode (t = 1) is bound by. W may be f32 or
//! stored packed (ggml quantized blocks, f16, bf16: [`Rows::Packed`]); a packed block of rows is
//! decoded into a per-thread f32 scratch right before its tiles run, so only the packed bytes
//! come from memory, and the results equal those of the widened f32 weight bit for bit. Inside a block,
//! tiles of up to 4 tokens × 3 rows share their loads (12 accumulators + 3 w + 1 x = 16 AVX2
//! registers), so prefill is bound by arithmetic; with AVX-512, 8 tokens × 6 rows (two tokens
//! per register). f32 rows in decode-sized batches stream from memory and run one row per tile.
//! For one token, the common packed types skip the scratch: their decode is fused into the dot
//! products ([`crate::model::gguf::dot_rows`]: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K; 3 rows at
//! a time with AVX2, 6 with AVX-512).
//!
//! Every output is one 8-lane FMA chain over the row in order, reduced the same way, whatever
//! tile it falls in and whichever SIMD level runs it: a token's result does not depend on its position
//! in the batch, so a batch equals its sequences run alone, bit for bit.

/// Scalar tile with the exact arithmetic of the AVX2 one (lane-wise FMA, same reduction).
#[inline(always)]
fn tile_plain<const NT: usize, const NR: usize>(x: [&[f32]; NT], w: [&[f32]; NR]) -> [[f32; NR]; NT] {
    let k = x[0].len();
    let chunks = k / 8;
    let mut acc = [[[0f32; 8]; NR]; NT];
    for c in 0..chunks {
        let o = c * 8;
        for i in 0..NT {
            for j in 0..NR {
                for l in 0..8 {
                    acc[i][j][l] = x[i][o + l].mul_add(w[j][o + l], acc[i][j][l]);
                }
            }
        }
    }
    let mut out = [[0f32; NR]; NT];
    for i in 0..NT {
        for j in 0..NR {
            out[i][j] = finish(&acc[i][j], x[i], w[j], chunks * 8);
        }
    }
    out
}

/// Reduce 8 lanes and add the tail `[from..k)`.
#[inline(always)]
fn finish(a: &[f32; 8], x: &[f32], w: &[f32], from: usize) -> f32 {
    let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for l in from..x.len() {
        s = x[l].mul_add(w[l], s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const NT: usize, const NR: usize>(x: [&[f32]; NT], w: [&[f32]; NR]) -> [[f32; NR]; NT] {
    use std::arch::x86_64::*;
    let k = x[0].len();
    let chunks = k / 8;
    let mut acc = [[_mm256_setzero_ps(); NR]; NT];
    for c in 0..chunks {
        let o = c * 8;
        let mut wv = [_mm256_setzero_ps(); NR];
        for j in 0..NR {
            wv[j] = _mm256_loadu_ps(w[j].as_ptr().add(o));
        }
        for i in 0..NT {
            let xv = _mm256_loadu_ps(x[i].as_ptr().add(o));
            for j in 0..NR {
                acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        }
    }
    let mut out = [[0f32; NR]; NT];
    for i in 0..NT {
        for j in 0..NR {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][j]);
            out[i][j] = finish(&lanes, x[i], w[j], chunks * 8);
        }
    }
    out
}

/// f32 rows for decode-sized batches (`NT` ≤ 4 tokens), the rows of `wb` one at a time (one
/// row streams fastest from memory), each with the chain of [`tile_avx2`]:
/// `out[i·n + r] = x[i] · wb[r] + bias[r]` for the block's rows `r`. `out` is the block's
/// first column of the `[NT, n]` output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const NT: usize>(x: [&[f32]; NT], wb: &[f32], bias: Option<&[f32]>, out: *mut f32, n: usize) {
    let k = x[0].len();
    for (r, w) in wb.chunks_exact(k).enumerate() {
        let v = tile_avx2::<NT, 1>(x, [w]);
        let b = bias.map_or(0.0, |b| b[r]);
        for (i, vi) in v.iter().enumerate() {
            *out.add(i * n + r) = vi[0] + b;
        }
    }
}

/// Rows per parallel task in [`rows_avx2`]'s decode.
const F32_DECODE_ROWS: usize = 12;

use super::q8::{self, Activations};
use super::simd::{active, Simd};

/// 8 tokens × 6 rows with AVX-512: each 512-bit accumulator holds two tokens' 8 lanes (low half
/// the even token, high half the odd one) against one row, so every lane runs the 8-lane chain of
/// [`tile_plain`] and the results are the same bit for bit. 24 accumulators + 4 token pairs + 1
/// row = 29 of the 32 registers. The caller must have detected AVX-512 F/DQ, AVX2 and FMA; all
/// rows have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn tile8x6(x: [&[f32]; 8], w: [&[f32]; 6]) -> [[f32; 6]; 8] {
    use std::arch::x86_64::*;
    let k = x[0].len();
    let chunks = k / 8;
    let mut acc = [[_mm512_setzero_ps(); 6]; 4];
    for c in 0..chunks {
        let o = c * 8;
        let mut xv = [_mm512_setzero_ps(); 4];
        for (p, v) in xv.iter_mut().enumerate() {
            let lo = _mm512_castps256_ps512(_mm256_loadu_ps(x[2 * p].as_ptr().add(o)));
            *v = _mm512_insertf32x8::<1>(lo, _mm256_loadu_ps(x[2 * p + 1].as_ptr().add(o)));
        }
        for j in 0..6 {
            let wv = _mm512_broadcast_f32x8(_mm256_loadu_ps(w[j].as_ptr().add(o)));
            for p in 0..4 {
                acc[p][j] = _mm512_fmadd_ps(xv[p], wv, acc[p][j]);
            }
        }
    }
    let mut out = [[0f32; 6]; 8];
    for p in 0..4 {
        for j in 0..6 {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[p][j]);
            let (a, b) = lanes.split_at(8);
            out[2 * p][j] = finish(a.try_into().unwrap(), x[2 * p], w[j], chunks * 8);
            out[2 * p + 1][j] = finish(b.try_into().unwrap(), x[2 * p + 1], w[j], chunks * 8);
        }
    }
    out
}

use crate::model::gguf::GgmlType;

/// The rows of W as the matmul reads them.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// `[n, k]` f32, row-major.
    F32(&'a [f32]),
    /// `n` rows of `k` elements of `ty` (a ggml quantized type, F16 or BF16), `row_bytes` each.
    Packed { ty: GgmlType, data: &'a [u8], row_bytes: usize },
}

#[inline(always)]
fn tile<const NT: usize, const NR: usize>(avx2: bool, x: [&[f32]; NT], w: [&[f32]; NR]) -> [[f32; NR]; NT] {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 and FMA were detected by the caller; all rows have the same length.
        return unsafe { tile_avx2(x, w) };
    }
    let _ = avx2;
    tile_plain(x, w)
}

/// Dot product, with the same arithmetic as every matmul output.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    tile::<1, 1>(active() >= Simd::Avx2, [&a[..n]], [&b[..n]])[0][0]
}

/// Every dot product of `xs[i]` with `ws[j]` (rows of equal length), each with exactly the
/// arithmetic of [`dot`], computed in tiles that share their loads; `put(i, j, value)`.
pub fn dot_tiles(xs: &[&[f32]], ws: &[&[f32]], mut put: impl FnMut(usize, usize, f32)) {
    let avx2 = active() >= Simd::Avx2;
    // One x (a decode step's query head against its keys): 8 rows per tile, so 8 chains hide
    // the FMA latency that 3 left exposed.
    let rows = if xs.len() == 1 { 8 } else { 3 };
    for i0 in (0..xs.len()).step_by(4) {
        for j0 in (0..ws.len()).step_by(rows) {
            let (nt, nr) = ((xs.len() - i0).min(4), (ws.len() - j0).min(rows));
            tile_at(avx2, nt, nr, |i| xs[i0 + i], |j| ws[j0 + j], |i, j, v| put(i0 + i, j0 + j, v));
        }
    }
}

/// One tile of `nt` ≤ 4 rows `xr(i)` × `nr` ≤ 3 rows `wr(j)` (up to 8 when `nt` is 1),
/// dispatched to a fixed-size tile;
/// `put(i, j, value)` with tile-local indices.
#[inline(always)]
fn tile_at<'a>(
    avx2: bool,
    nt: usize,
    nr: usize,
    xr: impl Fn(usize) -> &'a [f32],
    wr: impl Fn(usize) -> &'a [f32],
    mut put: impl FnMut(usize, usize, f32),
) {
    macro_rules! go {
        ($nt:literal, $nr:literal) => {{
            let v = tile::<$nt, $nr>(avx2, std::array::from_fn(&xr), std::array::from_fn(&wr));
            for (i, vi) in v.iter().enumerate() {
                for (j, &vij) in vi.iter().enumerate() {
                    put(i, j, vij);
                }
            }
        }};
    }
    match (nt, nr) {
        (4, 3) => go!(4, 3),
        (4, 2) => go!(4, 2),
        (4, 1) => go!(4, 1),
        (3, 3) => go!(3, 3),
        (3, 2) => go!(3, 2),
        (3, 1) => go!(3, 1),
        (2, 3) => go!(2, 3),
        (2, 2) => go!(2, 2),
        (2, 1) => go!(2, 1),
        (1, 8) => go!(1, 8),
        (1, 7) => go!(1, 7),
        (1, 6) => go!(1, 6),
        (1, 5) => go!(1, 5),
        (1, 4) => go!(1, 4),
        (1, 3) => go!(1, 3),
        (1, 2) => go!(1, 2),
        _ => go!(1, 1),
    }
}

struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub fn matmul(x: &[f32], w: Rows<'_>, bias: Option<&[f32]>, t: usize, n: usize, k: usize, out: &mut [f32]) {
    matmul_act(active(), super::q8::activations(), x, w, bias, t, n, k, out)
}

/// [`matmul_with`] with the activations `act`: in [`Activations::Q8`] mode, weights stored as
/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K run the 8-bit kernels of [`super::q8`];
/// every other weight, and every weight in f32 mode, the exact f32 path.
#[allow(clippy::too_many_arguments)]
pub fn matmul_act(
    simd: Simd,
    act: Activations,
    x: &[f32],
    w: Rows<'_>,
    bias: Option<&[f32]>,
    t: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
) {
    match w {
        Rows::Packed { ty, data, row_bytes } if act == Activations::Q8 && q8::supports(ty, k) => {
            matmul_q8(simd, ty, data, row_bytes, x, bias, t, n, k, out)
        }
        _ => matmul_with(simd, x, w, bias, t, n, k, out),
    }
}

/// The 8-bit path: every token's row quantized once, then blocks of W rows in parallel (32 for
/// decode-sized batches, each row read once for all its tokens; 16 for prompts, so a block stays
/// in cache while every token passes over it; [`q8::block`]). A token's results do not depend on
/// the batch.
#[allow(clippy::too_many_arguments)]
fn matmul_q8(
    simd: Simd,
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    x: &[f32],
    bias: Option<&[f32]>,
    t: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    assert!(x.len() >= t * k && out.len() >= t * n && data.len() >= n * row_bytes && k % 32 == 0);
    let xq = q8::Q8Rows::quantize(x, t, k);
    let rows_per_task = if t <= 4 { 32 } else { 16 };
    let o = OutPtr(out.as_mut_ptr());
    let o = &o;
    data[..n * row_bytes].par_chunks(rows_per_task * row_bytes).enumerate().for_each(|(blk, bytes)| {
        let n0 = blk * rows_per_task;
        let done = q8::block(ty, &xq, t, bytes, row_bytes, simd, |ti, r, v| {
            let c = n0 + r;
            // SAFETY: column c belongs to this block only, and ti < t, so the index is in bounds.
            unsafe { *o.0.add(ti * n + c) = v + bias.map_or(0.0, |b| b[c]) };
        });
        debug_assert!(done, "{ty} has 8-bit kernels");
    });
}

thread_local! {
    /// Decoded rows of one block of a packed W (at most 12 × k values).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`matmul`] at a given SIMD level (tests force the lower ones); a level above what this CPU
/// runs is lowered to [`detected`](super::simd::detected).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    simd: Simd,
    x: &[f32],
    w: Rows<'_>,
    bias: Option<&[f32]>,
    t: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
) {
    let simd = simd.min(super::simd::detected());
    assert!(x.len() >= t * k && out.len() >= t * n);
    match w {
        Rows::F32(w) => assert!(w.len() >= n * k),
        Rows::Packed { data, row_bytes, .. } => assert!(data.len() >= n * row_bytes),
    }
    // Decode-sized batches: blocks of 3 rows, or as many as the fused decode-dot kernel takes
    // for these tokens (6 for one token with AVX-512).
    let fused = match w {
        Rows::Packed { ty, .. } if t <= 4 => crate::model::gguf::dot_rows_max(ty, simd, t),
        _ => 0,
    };
    let rows_per_task: usize = match (t, fused) {
        (..=4, 0) => 3,
        // At least 3 rows, whole calls of the fused kernel.
        (..=4, f) => f * 3usize.div_ceil(f),
        _ => 12,
    };
    let avx2 = simd >= Simd::Avx2;
    // f32 rows in decode-sized batches stream from memory, and one row at a time streams fastest:
    // interleaving 2 or 3 rows halved the bandwidth (default model's F32 copy, 2 cores, tg64:
    // 27-28 tok/s with 2 or 3 rows per tile, 52 with 1; batch 4: 93-105 vs 146 tok/s). Elsewhere
    // rows come from cache (a decoded scratch, or reused over many tokens) and 3 share x's loads.
    let tile_rows = if t <= 4 && matches!(w, Rows::F32(_)) { 1 } else { 3 };
    let o = OutPtr(out.as_mut_ptr());
    let o = &o;
    let block = |blk: usize, wb: &[f32]| {
        let n0 = blk * rows_per_task;
        let rows = wb.len() / k.max(1);
        let put = |ti: usize, r: usize, mut v: f32| {
            if let Some(b) = bias {
                v += b[n0 + r];
            }
            // SAFETY: column n0 + r belongs to this block only, and ti < t, so the index is in bounds.
            unsafe { *o.0.add(ti * n + n0 + r) = v };
        };
        // With AVX-512, prompt-sized batches run in 8 × 6 tiles where they fit (tokens 0..t8, rows
        // 0..r6); every other output in the 4 × 3 tiles. Both give each output the same chain.
        let (t8, r6) = if simd >= Simd::Avx512 && t > 4 { (t / 8 * 8, rows / 6 * 6) } else { (0, 0) };
        // (Off x86-64 the level is never Avx512, so t8 = 0 and nothing is skipped.)
        #[cfg(target_arch = "x86_64")]
        for ti in (0..t8).step_by(8) {
            for r in (0..r6).step_by(6) {
                // SAFETY: simd ≥ Avx512 is at most the detected level (lowered at the top), so
                // AVX-512 F/DQ, AVX2 and FMA run here; every row slice is k long.
                let v = unsafe {
                    tile8x6(
                        std::array::from_fn(|i| &x[(ti + i) * k..][..k]),
                        std::array::from_fn(|j| &wb[(r + j) * k..][..k]),
                    )
                };
                for (i, vi) in v.iter().enumerate() {
                    for (j, &vij) in vi.iter().enumerate() {
                        put(ti + i, r + j, vij);
                    }
                }
            }
        }
        for ti in (0..t).step_by(4) {
            for r in (if ti < t8 { r6 } else { 0 }..rows).step_by(tile_rows) {
                let (xr, wr) = (|i: usize| &x[(ti + i) * k..][..k], |j: usize| &wb[(r + j) * k..][..k]);
                tile_at(avx2, (t - ti).min(4), (rows - r).min(tile_rows), xr, wr, |i, j, v| put(ti + i, r + j, v));
            }
        }
    };
    if k == 0 {
        for ti in 0..t {
            for r in 0..n {
                out[ti * n + r] = bias.map_or(0.0, |b| b[r]);
            }
        }
        return;
    }
    use rayon::prelude::*;
    match w {
        #[cfg(target_arch = "x86_64")]
        Rows::F32(w) if (1..=4).contains(&t) && avx2 => {
            // One call per block of 12 rows runs them all: dispatching each row's tile through
            // `block` cost 2-5% of an F32 decode step (default model's F32 copy, 2 cores, tg64,
            // medians of 8-10 alternating runs: 48.3 -> 49.3-50.8 tok/s).
            w[..n * k].par_chunks(F32_DECODE_ROWS * k).enumerate().for_each(|(blk, wb)| {
                let n0 = blk * F32_DECODE_ROWS;
                let bias = bias.map(|b| &b[n0..]);
                let xs = |i: usize| &x[i * k..][..k];
                // SAFETY: AVX2 and FMA run here (simd ≥ Avx2 is at most the detected level);
                // columns n0.. of every token's row belong to this block only.
                unsafe {
                    let out = o.0.add(n0);
                    match t {
                        1 => rows_avx2::<1>([xs(0)], wb, bias, out, n),
                        2 => rows_avx2::<2>(std::array::from_fn(xs), wb, bias, out, n),
                        3 => rows_avx2::<3>(std::array::from_fn(xs), wb, bias, out, n),
                        _ => rows_avx2::<4>(std::array::from_fn(xs), wb, bias, out, n),
                    }
                }
            })
        }
        Rows::F32(w) => w[..n * k].par_chunks(rows_per_task * k).enumerate().for_each(|(blk, wb)| block(blk, wb)),
        Rows::Packed { ty, data, row_bytes } => {
            data[..n * row_bytes].par_chunks(rows_per_task * row_bytes).enumerate().for_each(|(blk, bytes)| {
                let rows = bytes.len() / row_bytes;
                // Decode fused into the dot products (same lanes as the tile on decoded rows),
                // `fused` rows per call; row r's lanes for token i in lanes[r·t + i]. Every call
                // has the same k, so the first one refusing (k not whole blocks) is the only way
                // to end up in the scratch path below.
                let fused_ran = fused > 0
                    && (0..rows).step_by(fused).all(|g0| {
                        let gr = (rows - g0).min(fused);
                        let mut lanes = [[0f32; 8]; 12];
                        let lanes = &mut lanes[..gr * t];
                        let group = &bytes[g0 * row_bytes..(g0 + gr) * row_bytes];
                        if !crate::model::gguf::dot_rows(ty, &x[..t * k], t, group, row_bytes, lanes, simd) {
                            return false;
                        }
                        for (ri, l) in lanes.iter().enumerate() {
                            let (r, ti) = (g0 + ri / t, ri % t);
                            let c = blk * rows_per_task + r;
                            // k is a whole number of blocks (dot_rows checked), so no tail.
                            let mut v = finish(l, &[], &[], 0);
                            if let Some(b) = bias {
                                v += b[c];
                            }
                            // SAFETY: column c belongs to this block only, and ti < t.
                            unsafe { *o.0.add(ti * n + c) = v };
                        }
                        true
                    });
                if fused_ran {
                    return;
                }
                SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    if s.len() < rows * k {
                        s.resize(rows * k, 0.0);
                    }
                    let wb = &mut s[..rows * k];
                    crate::model::gguf::decode_into(ty, bytes, wb, avx2);
                    block(blk, wb);
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packed weight gives exactly the results of its widened f32 copy, at every SIMD level
    /// and batch size (decode-sized and prefill-sized row blocks), for every readable type.
    #[test]
    fn packed_matmul_equals_widened_reference() {
        use crate::model::gguf::{dequantize, random_blocks};
        // The loops below run every level this CPU has; say which ones they cannot run.
        for simd in [Simd::Avx2, Simd::Avx512] {
            if !Simd::available().contains(&simd) {
                eprintln!("SKIPPED: the {} kernels (this CPU cannot run them)", simd.name());
            }
        }
        for ty in GgmlType::READABLE {
            let block = ty.block_layout().unwrap().0 as usize;
            let k = crate::backend::check::kernel_case_k(ty);
            let n = 29;
            let data = random_blocks(ty, n * k / block, 3);
            let row_bytes = data.len() / n;
            let wide = dequantize(ty, &data, n * k).unwrap();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            for t in [1, 2, 3, 4, 7, 33, 129] {
                let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
                let mut want = vec![0f32; t * n];
                matmul_with(Simd::Portable, &x, Rows::F32(&wide), Some(&bias), t, n, k, &mut want);
                for simd in Simd::available() {
                    let mut got = vec![f32::NAN; t * n];
                    matmul_with(simd, &x, Rows::Packed { ty, data: &data, row_bytes }, Some(&bias), t, n, k, &mut got);
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{ty} t={t} {simd:?}: packed differs from widened");
                    let mut f = vec![f32::NAN; t * n];
                    matmul_with(simd, &x, Rows::F32(&wide), Some(&bias), t, n, k, &mut f);
                    let same = f.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{ty} t={t} {simd:?}: f32 path differs across SIMD levels");
                }
            }
        }
    }

    /// `dot_tiles` gives every pair exactly `dot`'s value, whatever the tile it falls in (one x
    /// against up to 8 rows per tile, or 4 × 3), at the active SIMD level.
    #[test]
    fn dot_tiles_equal_dot() {
        for (nx, nw, k) in [(1, 1, 64), (1, 7, 64), (1, 8, 128), (1, 19, 37), (3, 10, 64), (5, 4, 13)] {
            let v = |seed: usize, i: usize| ((i * 7919 + seed * 104729) % 23) as f32 * 0.07 - 0.8;
            let xs: Vec<Vec<f32>> = (0..nx).map(|a| (0..k).map(|i| v(a, i)).collect()).collect();
            let ws: Vec<Vec<f32>> = (0..nw).map(|b| (0..k).map(|i| v(100 + b, i)).collect()).collect();
            let (xr, wr): (Vec<&[f32]>, Vec<&[f32]>) =
                (xs.iter().map(|x| &x[..]).collect(), ws.iter().map(|w| &w[..]).collect());
            let mut got = vec![f32::NAN; nx * nw];
            dot_tiles(&xr, &wr, |i, j, val| got[i * nw + j] = val);
            for i in 0..nx {
                for j in 0..nw {
                    assert_eq!(got[i * nw + j].to_bits(), dot(xr[i], wr[j]).to_bits(), "{nx}x{nw} k{k} [{i},{j}]");
                }
            }
        }
    }

    /// Every tile shape against a plain f64 reference, on awkward sizes; and each token's result
    /// is the same whatever its position in the batch.
    #[test]
    fn matmul_matches_reference_and_is_position_independent() {
        // (9, 31, 37): with AVX-512 the last block of 7 rows has one 8 × 6 tile and one row in
        // 4 × 3 tiles for the same tokens.
        let cases = [(1, 1, 1), (7, 33, 19), (5, 17, 64), (9, 40, 37), (9, 31, 37), (17, 12, 40), (4, 4, 8)];
        for ((t, n, k), simd) in cases.into_iter().flat_map(|c| Simd::available().into_iter().map(move |s| (c, s))) {
            let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 17) as f32 * 0.05 - 0.4).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let mut out = vec![f32::NAN; t * n];
            matmul_with(simd, &x, Rows::F32(&w), Some(&b), t, n, k, &mut out);
            for ti in 0..t {
                for r in 0..n {
                    let want: f64 =
                        (0..k).map(|j| x[ti * k + j] as f64 * w[r * k + j] as f64).sum::<f64>() + b[r] as f64;
                    let got = out[ti * n + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "t{t} n{n} k{k} [{ti},{r}] {got} vs {want}"
                    );
                }
                let mut one = vec![0f32; n];
                matmul_with(simd, &x[ti * k..(ti + 1) * k], Rows::F32(&w), Some(&b), 1, n, k, &mut one);
                let same = one.iter().zip(&out[ti * n..(ti + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{simd:?} t{t} n{n} k{k}: token {ti} alone differs from its batch row");
            }
            assert_eq!(tile_plain::<1, 1>([&x[..k]], [&w[..k]])[0][0].to_bits(), dot(&x[..k], &w[..k]).to_bits());
        }
    }
}
