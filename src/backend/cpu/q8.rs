//! 8-bit activations, opt-in ([`set_activations`]; the CLI's `--cpu-activations q8` or
//! `PERSONA_CPU_ACTIVATIONS=q8`): as llama.cpp does on the CPU, each token's activation row is quantized
//! per 32-element block to int8 with one f32 scale (round to nearest, ties to even; scale
//! amax / 127), and matmuls whose weights are stored as Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 take each
//! block's dot product in integers (`vpdpbusd` with AVX-512 VNNI, `vpmaddubsw` with AVX2), scaled
//! by the two blocks' scales in f32. Other weights (f32, f16, bf16, K-quants) keep f32 activations.
//!
//! This changes results: a matmul output differs from the f32 path by the activations' rounding
//! (NMSE about 1e-5 on random rows), so the model goldens hold only in the default mode, which
//! keeps f32 activations and is exact. Within the mode every token's result is still independent
//! of the batch it runs in, and the SIMD levels differ only in the order of their f32 sums.
//!
//! Block arithmetic, for a weight block with stored unsigned values `u` (a nibble, a nibble with
//! its fifth bit, or a Q8_0 byte plus 128), scale `d` and, for Q4_1/Q5_1, minimum `m`, against
//! activations `q` with scale `dx`: `d·dx·Σ(u − offset)·q`, plus `m·dx·Σq` for the types with a
//! minimum (offset 8 for Q4_0, 16 for Q5_0, 128 for Q8_0, 0 for the others). The integer sum is
//! exact at every level (the kernels start it at `−offset·Σq`); the second term is a per-block
//! product the kernels take 16 (8) blocks at a time.

use std::sync::atomic::{AtomicBool, Ordering};

use super::simd::Simd;
use crate::model::gguf::{half_at, GgmlType};

/// How the CPU matmul takes its activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// f32 (the default): results equal the widened f32 weights' bit for bit.
    F32,
    /// int8 per 32-block for weights stored as Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0.
    Q8,
}

impl Activations {
    pub fn name(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Q8 => "q8",
        }
    }
}

/// Whether the CPU matmul takes 8-bit activations (process-wide; f32 until set).
static Q8: AtomicBool = AtomicBool::new(false);

/// The mode the CPU matmul uses: f32 unless [`set_activations`] chose q8 (the CLI does for
/// `--cpu-activations q8` or `PERSONA_CPU_ACTIVATIONS=q8`; the library reads no environment, so
/// an embedder's results change only when it asks).
pub fn activations() -> Activations {
    if Q8.load(Ordering::Relaxed) {
        Activations::Q8
    } else {
        Activations::F32
    }
}

/// Choose the CPU matmul's activations for this process (from now on; every matmul reads it).
pub fn set_activations(a: Activations) {
    Q8.store(a == Activations::Q8, Ordering::Relaxed);
}

/// Whether weights of `ty` take 8-bit activations in [`Activations::Q8`] mode.
pub fn supports(ty: GgmlType) -> bool {
    layout(ty).is_some()
}

/// A type's block: bytes, offset of the 16 (Q4/Q5) or 32 (Q8_0) value bytes, offset of the
/// fifth bits (Q5), whether it has a minimum, and the offset subtracted from its unsigned values.
#[derive(Clone, Copy)]
struct Layout {
    bytes: usize,
    qs: usize,
    qh: Option<usize>,
    min: bool,
    offset: i32,
}

/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the SIMD kernels take the index as a const parameter, so
/// each type's code is compiled with its layout folded in.
const LAYOUTS: [Layout; 5] = [
    Layout { bytes: 18, qs: 2, qh: None, min: false, offset: 8 },
    Layout { bytes: 20, qs: 4, qh: None, min: true, offset: 0 },
    Layout { bytes: 22, qs: 6, qh: Some(2), min: false, offset: 16 },
    Layout { bytes: 24, qs: 8, qh: Some(4), min: true, offset: 0 },
    Layout { bytes: 34, qs: 2, qh: None, min: false, offset: 128 },
];

fn type_index(ty: GgmlType) -> Option<usize> {
    Some(match ty {
        GgmlType::Q4_0 => 0,
        GgmlType::Q4_1 => 1,
        GgmlType::Q5_0 => 2,
        GgmlType::Q5_1 => 3,
        GgmlType::Q8_0 => 4,
        _ => return None,
    })
}

fn layout(ty: GgmlType) -> Option<Layout> {
    type_index(ty).map(|i| LAYOUTS[i])
}

/// Tokens' activation rows quantized per 32-element block: `q` (t·k values), and per block its
/// scale `d`, `s = Σq` and `ds = d·Σq` (t·k/32 each).
#[derive(Default)]
pub struct Q8Rows {
    pub k: usize,
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<i32>,
    pub ds: Vec<f32>,
}

/// One token's row of a [`Q8Rows`].
#[derive(Clone, Copy)]
pub struct XRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [i32],
    pub ds: &'a [f32],
}

/// One block: its values into `q`; its scale, `Σq` and `scale·Σq` (a NaN scale for a
/// non-finite block).
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32, f32) {
    if !x.iter().all(|v| v.is_finite()) {
        q.fill(0);
        return (f32::NAN, 0, f32::NAN);
    }
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        // Round to nearest, ties to even: adding and taking away 1.5·2²³ leaves no bits below 1
        // (|v·inv| ≤ 127); as f32::round_ties_even, without its libm call.
        const ROUND: f32 = 12_582_912.0;
        *q = (((v * inv).clamp(-127.0, 127.0) + ROUND) - ROUND) as i8;
        sum += *q as i32;
    }
    (scale, sum, scale * sum as f32)
}

impl Q8Rows {
    /// Quantize `t` rows of `k` (a multiple of 32) values (prompt-sized batches in parallel). A
    /// block holding a NaN or an infinity gets a NaN scale, so it makes its outputs NaN instead
    /// of vanishing in the rounding.
    pub fn quantize(x: &[f32], t: usize, k: usize) -> Q8Rows {
        use rayon::prelude::*;
        assert!(k % 32 == 0 && x.len() >= t * k);
        let nb = t * k / 32;
        let mut r = Q8Rows { k, q: vec![0; t * k], d: vec![0.0; nb], s: vec![0; nb], ds: vec![0.0; nb] };
        let x = &x[..t * k];
        let one = |((xb, qb), ((d, s), ds)): ((&[f32], &mut [i8]), ((&mut f32, &mut i32), &mut f32))| {
            (*d, *s, *ds) = quantize_block(xb, qb)
        };
        if t > 4 {
            let scales = r.d.par_iter_mut().zip(r.s.par_iter_mut()).zip(r.ds.par_iter_mut());
            x.par_chunks(32).zip(r.q.par_chunks_mut(32)).zip(scales).with_min_len(256).for_each(one);
        } else {
            let scales = r.d.iter_mut().zip(r.s.iter_mut()).zip(r.ds.iter_mut());
            x.chunks(32).zip(r.q.chunks_mut(32)).zip(scales).for_each(one);
        }
        r
    }

    fn row(&self, ti: usize) -> XRow<'_> {
        let nb = self.k / 32;
        let b = ti * nb..(ti + 1) * nb;
        XRow { q: &self.q[ti * self.k..][..self.k], d: &self.d[b.clone()], s: &self.s[b.clone()], ds: &self.ds[b] }
    }
}

/// Dot products of token `ti` of `x` with up to 4 packed rows of `ty` (`out.len()` of them,
/// `row_bytes` apart in `rows`); `false`, doing nothing, for a type without 8-bit kernels.
pub fn dot_rows(
    ty: GgmlType,
    x: &Q8Rows,
    ti: usize,
    rows: &[u8],
    row_bytes: usize,
    out: &mut [f32],
    simd: Simd,
) -> bool {
    let Some(tix) = type_index(ty) else { return false };
    let l = LAYOUTS[tix];
    assert!(out.len() <= 4 && row_bytes == x.k / 32 * l.bytes && rows.len() >= out.len() * row_bytes);
    if out.is_empty() {
        return true;
    }
    let xr = x.row(ti);
    #[cfg(target_arch = "x86_64")]
    if let Some(level) = Level::of(simd) {
        // SAFETY: Level::of checked the CPU's features; the lengths were checked above.
        with_type!(tix, T => unsafe { dot_simd::<T>(level, xr, rows, row_bytes, out) });
        return true;
    }
    let _ = simd;
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_plain(l, xr, &rows[r * row_bytes..][..row_bytes]);
    }
    true
}

/// Every token of `x` against a block of packed rows of `ty` (`rows.len() / row_bytes` of
/// them): `put(token, row, value)`. Up to 4 tokens: the rows 4 at a time as stored. More (with
/// AVX2 or AVX-512 VNNI): the rows unpacked once into a per-thread scratch ([`Unpacked`]), then
/// 4 tokens at a time against each row, with the same arithmetic (a token's result does not
/// depend on the batch). `false`, doing nothing, for a type without 8-bit kernels.
pub fn block(
    ty: GgmlType,
    x: &Q8Rows,
    t: usize,
    rows: &[u8],
    row_bytes: usize,
    simd: Simd,
    mut put: impl FnMut(usize, usize, f32),
) -> bool {
    let Some(tix) = type_index(ty) else { return false };
    let nr = rows.len() / row_bytes.max(1);
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(level)) = (t > 4, Level::of(simd)) {
        let nb = x.k / 32;
        assert!(row_bytes == nb * LAYOUTS[tix].bytes && x.q.len() >= t * x.k);
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<f32>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        SCRATCH.with(|s| {
            let (u, f) = &mut *s.borrow_mut();
            let (vn, sn) = unpacked_sizes(nb);
            u.resize(u.len().max(nr * vn), 0);
            f.resize(f.len().max(nr * sn), 0.0);
            // SAFETY: Level::of checked the CPU's features; unpack checks the lengths, and the
            // kernels read only the rows it wrote.
            with_type!(tix, T => unsafe {
                match level {
                    Level::Avx512 => avx512::unpack::<T>(rows, row_bytes, nr, nb, u, f),
                    Level::Avx2 => avx2::unpack::<T>(rows, row_bytes, nr, nb, u, f),
                }
                let src = Unpacked { u: u.as_ptr(), f: f.as_ptr(), values: vn, scales: sn };
                tokens_simd::<T>(level, x, t, nr, &src, &mut put)
            });
        });
        return true;
    }
    for ti in 0..t {
        for r in (0..nr).step_by(4) {
            let n = (nr - r).min(4);
            let mut v = [0f32; 4];
            dot_rows(ty, x, ti, &rows[r * row_bytes..], row_bytes, &mut v[..n], simd);
            for (j, &v) in v[..n].iter().enumerate() {
                put(ti, r + j, v);
            }
        }
    }
    let _ = tix;
    true
}

/// `$body` with `$t` a const type index (into [`LAYOUTS`]), so each type's kernels are
/// compiled with its layout folded in.
#[cfg(target_arch = "x86_64")]
macro_rules! with_type {
    ($tix:expr, $t:ident => $body:expr) => {
        match $tix {
            0 => {
                const $t: usize = 0;
                $body
            }
            1 => {
                const $t: usize = 1;
                $body
            }
            2 => {
                const $t: usize = 2;
                $body
            }
            3 => {
                const $t: usize = 3;
                $body
            }
            _ => {
                const $t: usize = 4;
                $body
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
use with_type;

/// The SIMD kernels this CPU runs at a level.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Level {
    /// AVX2, FMA, F16C.
    Avx2,
    /// AVX-512 F/BW/VL/DQ and VNNI, with AVX2's set.
    Avx512,
}

#[cfg(target_arch = "x86_64")]
impl Level {
    fn of(simd: Simd) -> Option<Level> {
        match simd.min(super::simd::detected()) {
            Simd::Avx512 if vnni() => Some(Level::Avx512),
            Simd::Avx512 | Simd::Avx2 => Some(Level::Avx2),
            Simd::Portable => None,
        }
    }
}

/// One token against `out.len()` (1..=4) packed rows of type `T`. Safety: `level`'s features
/// were detected; the caller checked the lengths.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_simd<const T: usize>(level: Level, x: XRow, rows: &[u8], row_bytes: usize, out: &mut [f32]) {
    macro_rules! go {
        ($nr:literal) => {{
            let v: [f32; $nr] = match level {
                Level::Avx512 => avx512::dot::<T, $nr>(x, rows, row_bytes),
                Level::Avx2 => avx2::dot::<T, $nr>(x, rows, row_bytes),
            };
            out.copy_from_slice(&v);
        }};
    }
    match out.len() {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        _ => go!(4),
    }
}

/// Every token of `x` (4 at a time) against each of `nr` unpacked rows. Safety: `level`'s
/// features were detected; `src` holds `nr` rows unpacked from type `T`.
#[cfg(target_arch = "x86_64")]
unsafe fn tokens_simd<const T: usize>(
    level: Level,
    x: &Q8Rows,
    t: usize,
    nr: usize,
    src: &Unpacked,
    put: &mut impl FnMut(usize, usize, f32),
) {
    match level {
        Level::Avx512 => avx512::tokens::<T>(x, t, nr, src, put),
        Level::Avx2 => avx2::tokens::<T>(x, t, nr, src, put),
    }
}

/// The body of each SIMD module's `tokens`: every token of `$x` (`$t` of them, 4 at a time)
/// against each of `$nr` rows of `$src`, through the module's inlined `run`.
#[cfg(target_arch = "x86_64")]
macro_rules! tokens_body {
    ($x:expr, $t:expr, $nr:expr, $src:expr, $put:expr) => {{
        let (x, t, src, put) = ($x, $t, $src, $put);
        let xs: Vec<XRow> = (0..t).map(|i| x.row(i)).collect();
        for r in 0..$nr {
            let row = src.row(r);
            for t0 in (0..t).step_by(4) {
                macro_rules! go {
                    ($nt:literal) => {{
                        let v = run::<_, T, $nt, 1>(std::array::from_fn(|i| xs[t0 + i]), &row);
                        for (i, v) in v.iter().enumerate() {
                            put(t0 + i, r, v[0]);
                        }
                    }};
                }
                match t - t0 {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    _ => go!(4),
                }
            }
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use tokens_body;

/// Rows of type `T` (an index into [`LAYOUTS`]) as stored, `row_bytes` apart: the decode path's
/// row source in both SIMD modules.
#[cfg(target_arch = "x86_64")]
struct Packed<const T: usize> {
    rows: *const u8,
    row_bytes: usize,
}

/// A block of rows unpacked once for a prompt's tokens: per row, `values` bytes of stored
/// unsigned values (32 per block, room for an even number of blocks; what follows an odd last
/// block meets zero activations) and `scales` f32 (per group of 16 blocks, the 16 `d` lanes then
/// the 16 `m` lanes, or `d` again; lanes past the last block repeat it, as the packed rows'
/// kernels read them).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Unpacked {
    u: *const u8,
    f: *const f32,
    values: usize,
    scales: usize,
}

#[cfg(target_arch = "x86_64")]
impl Unpacked {
    /// Row `r` alone.
    unsafe fn row(&self, r: usize) -> Unpacked {
        Unpacked { u: self.u.add(r * self.values), f: self.f.add(r * self.scales), ..*self }
    }
}

/// Sizes of one [`Unpacked`] row of `nb` blocks: value bytes, scale floats.
#[cfg(target_arch = "x86_64")]
fn unpacked_sizes(nb: usize) -> (usize, usize) {
    (nb.div_ceil(2) * 64, nb.div_ceil(16) * 32)
}

#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| std::is_x86_feature_detected!("avx512vnni"))
}

/// A block's 32 stored unsigned values, in element order.
fn unpack(l: Layout, b: &[u8]) -> [u8; 32] {
    let mut u = [0u8; 32];
    if l.offset == 128 {
        for (u, &q) in u.iter_mut().zip(&b[l.qs..l.qs + 32]) {
            *u = q ^ 0x80;
        }
        return u;
    }
    let qh = l.qh.map_or(0, |o| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()));
    for j in 0..16 {
        let q = b[l.qs + j];
        u[j] = (q & 0x0F) | (((qh >> j) & 1) << 4) as u8;
        u[j + 16] = (q >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
    }
    u
}

/// The portable kernel: each block's integer sum, then its f32 terms, in block order.
fn dot_plain(l: Layout, x: XRow, row: &[u8]) -> f32 {
    let (mut acc, mut acc_c) = (0f32, 0f32);
    for (b, blk) in row.chunks_exact(l.bytes).enumerate() {
        let u = unpack(l, blk);
        let isum: i32 = u.iter().zip(&x.q[b * 32..][..32]).map(|(&u, &q)| (u as i32 - l.offset) * q as i32).sum();
        acc = (half_at(blk, 0) * x.d[b]).mul_add(isum as f32, acc);
        if l.min {
            acc_c = half_at(blk, 2).mul_add(x.ds[b], acc_c);
        }
    }
    acc + acc_c
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{unpacked_sizes, Layout, Packed, Q8Rows, Unpacked, XRow, LAYOUTS};
    use std::arch::x86_64::*;

    /// Block `b`'s and `b + 1`'s stored unsigned values, 32 each in element order (where `two` is
    /// false, block `b + 1` is not read and its half holds zeros, 0x80 for Q8_0: the kernel's
    /// activations there are zero).
    #[inline(always)]
    unsafe fn weights(l: Layout, row: *const u8, b: usize, two: bool) -> __m512i {
        let a = row.add(b * l.bytes);
        let c = a.add(l.bytes);
        let hi: __mmask16 = if two { 0xFF00 } else { 0 };
        if l.offset == 128 {
            let lo = _mm512_zextsi256_si512(_mm256_loadu_si256(a.add(l.qs) as *const __m256i));
            // Lanes 8..16 from block b + 1 (the masked-off lanes are not read; the base stays
            // inside block b).
            let both = _mm512_mask_loadu_epi32(lo, hi, a.add(l.bytes + l.qs - 32) as *const i32);
            return _mm512_xor_si512(both, _mm512_set1_epi8(-128));
        }
        // [qs_a, qs_a, qs_b, qs_b] by 128-bit lane, the odd lanes shifted to their high nibbles.
        let z = _mm512_maskz_broadcast_i32x4(0x00FF, _mm_loadu_si128(a.add(l.qs) as *const __m128i));
        let z =
            if two { _mm512_mask_broadcast_i32x4(z, hi, _mm_loadu_si128(c.add(l.qs) as *const __m128i)) } else { z };
        let h = 0x0004_0004_0004_0004;
        let shift = _mm512_set_epi64(h, h, 0, 0, h, h, 0, 0);
        let mut u = _mm512_and_si512(_mm512_srlv_epi16(z, shift), _mm512_set1_epi8(0x0F));
        if let Some(o) = l.qh {
            let ha = (a.add(o) as *const u32).read_unaligned() as u64;
            let hb = if two { (c.add(o) as *const u32).read_unaligned() as u64 } else { 0 };
            u = _mm512_mask_add_epi8(u, _cvtu64_mask64(ha | hb << 32), u, _mm512_set1_epi8(16));
        }
        u
    }

    /// The f16 at `p + min(i, n − 1)·stride` for lanes i < 16, as f32 (lanes past the last block
    /// repeat it: read in bounds, and the kernels zero their products).
    #[inline(always)]
    unsafe fn f16x16(p: *const u8, stride: usize, n: usize) -> __m512 {
        let at = |i: usize| (p.add(i.min(n - 1) * stride) as *const i16).read_unaligned();
        let lo = _mm_setr_epi16(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7));
        let hi = _mm_setr_epi16(at(8), at(9), at(10), at(11), at(12), at(13), at(14), at(15));
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
    }

    /// Where the kernel reads a row's blocks: its packed bytes, or an [`Unpacked`] copy. Both
    /// give the same values, so a token's result does not depend on which one ran.
    pub(super) trait Source {
        /// Row `r`'s scales `d` and second-term factors (`m`, or `d` again) of blocks `g..g + 16`
        /// (`n` of them; lanes from `n` on repeat the last).
        unsafe fn scales(&self, r: usize, g: usize, n: usize) -> (__m512, __m512);
        /// Row `r`'s stored values of blocks `b` and `b + 1` (zero for `b + 1` unless `two`).
        unsafe fn values(&self, r: usize, b: usize, two: bool) -> __m512i;
    }

    impl<const T: usize> Source for Packed<T> {
        #[inline(always)]
        unsafe fn scales(&self, r: usize, g: usize, n: usize) -> (__m512, __m512) {
            let l = LAYOUTS[T];
            let base = self.rows.add(r * self.row_bytes + g * l.bytes);
            let d = f16x16(base, l.bytes, n);
            (d, if l.min { f16x16(base.add(2), l.bytes, n) } else { d })
        }
        #[inline(always)]
        unsafe fn values(&self, r: usize, b: usize, two: bool) -> __m512i {
            weights(LAYOUTS[T], self.rows.add(r * self.row_bytes), b, two)
        }
    }

    impl Source for Unpacked {
        #[inline(always)]
        unsafe fn scales(&self, r: usize, g: usize, _n: usize) -> (__m512, __m512) {
            let p = self.f.add(r * self.scales + 2 * g);
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        }
        #[inline(always)]
        unsafe fn values(&self, r: usize, b: usize, _two: bool) -> __m512i {
            _mm512_loadu_si512(self.u.add(r * self.values + b * 32) as *const __m512i)
        }
    }

    /// Unpack `nr` rows of type `T` into `u` and `f` (sized by [`unpacked_sizes`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn unpack<const T: usize>(
        rows: &[u8],
        row_bytes: usize,
        nr: usize,
        nb: usize,
        u: &mut [u8],
        f: &mut [f32],
    ) {
        let (vn, sn) = unpacked_sizes(nb);
        assert!(rows.len() >= nr * row_bytes && u.len() >= nr * vn && f.len() >= nr * sn);
        let src = Packed::<T> { rows: rows.as_ptr(), row_bytes };
        for r in 0..nr {
            for g in (0..nb).step_by(16) {
                let (d, c) = src.scales(r, g, (nb - g).min(16));
                _mm512_storeu_ps(f.as_mut_ptr().add(r * sn + 2 * g), d);
                _mm512_storeu_ps(f.as_mut_ptr().add(r * sn + 2 * g + 16), c);
            }
            for b in (0..nb).step_by(2) {
                let v = src.values(r, b, b + 1 < nb);
                _mm512_storeu_si512(u.as_mut_ptr().add(r * vn + b * 32) as *mut __m512i, v);
            }
        }
    }

    /// `NT` tokens' dot products with `NR` rows of type `T` from `src`, 16 blocks at a time: each
    /// row's 16 scales (and minimums) in one register, then each pair of blocks in one register:
    /// 64 products in `vpdpbusd`, started at the blocks' `−offset·Σq` (lanes 0 and 8), scaled
    /// lane-wise by their block's `d·dx` (permuted from the 16) into 16 f32 lanes. Each (token,
    /// row) is its own chain, the same whatever NT, NR and the source.
    #[inline(always)]
    unsafe fn run<S: Source, const T: usize, const NT: usize, const NR: usize>(
        xs: [XRow; NT],
        src: &S,
    ) -> [[f32; NR]; NT] {
        let l = LAYOUTS[T];
        let nb = xs[0].d.len();
        let mut acc = [[_mm512_setzero_ps(); NR]; NT];
        let mut acc_c = [[_mm512_setzero_ps(); NR]; NT];
        for g in (0..nb).step_by(16) {
            let gn = (nb - g).min(16);
            let m: __mmask16 = if gn == 16 { 0xFFFF } else { (1u16 << gn) - 1 };
            let xd: [__m512; NT] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(m, xs[i].d.as_ptr().add(g)));
            let xs_: [__m512; NT] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(m, xs[i].ds.as_ptr().add(g)));
            let mut sc = [[_mm512_setzero_ps(); NR]; NT];
            for r in 0..NR {
                let (dw, c) = src.scales(r, g, gn);
                for i in 0..NT {
                    if l.min {
                        acc_c[i][r] = _mm512_fmadd_ps(c, xs_[i], acc_c[i][r]);
                    }
                    sc[i][r] = _mm512_mul_ps(dw, xd[i]);
                }
            }
            for p in 0..gn.div_ceil(2) {
                let b = g + 2 * p;
                let two = b + 1 < nb;
                let x: [__m512i; NT] = std::array::from_fn(|i| {
                    let q = xs[i].q.as_ptr().add(b * 32);
                    if two {
                        _mm512_loadu_si512(q as *const __m512i)
                    } else {
                        _mm512_zextsi256_si512(_mm256_loadu_si256(q as *const __m256i))
                    }
                });
                // −offset·Σq of blocks b and b + 1 in lanes 0 and 8.
                let start: [__m512i; NT] = std::array::from_fn(|i| {
                    if l.offset == 0 {
                        return _mm512_setzero_si512();
                    }
                    let s = xs[i].s.as_ptr().add(b);
                    let a = _mm512_maskz_set1_epi32(0x0001, -l.offset * *s);
                    if two {
                        _mm512_mask_set1_epi32(a, 0x0100, -l.offset * *s.add(1))
                    } else {
                        a
                    }
                });
                let pick = _mm512_add_epi32(
                    _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                    _mm512_set1_epi32(2 * p as i32),
                );
                for r in 0..NR {
                    let u = src.values(r, b, two);
                    for i in 0..NT {
                        let s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[i], u, x[i]));
                        acc[i][r] = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(pick, sc[i][r]), acc[i][r]);
                    }
                }
            }
        }
        let mut out = [[0f32; NR]; NT];
        for i in 0..NT {
            for r in 0..NR {
                out[i][r] = _mm512_reduce_add_ps(acc[i][r]);
                if l.min {
                    out[i][r] += _mm512_reduce_add_ps(acc_c[i][r]);
                }
            }
        }
        out
    }

    /// One token against `NR` packed rows of type `T`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot<const T: usize, const NR: usize>(x: XRow, rows: &[u8], row_bytes: usize) -> [f32; NR] {
        run::<_, T, 1, NR>([x], &Packed::<T> { rows: rows.as_ptr(), row_bytes })[0]
    }

    /// Every token of `x` against each of `nr` rows unpacked from type `T`: `put(token, row, v)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn tokens<const T: usize>(
        x: &Q8Rows,
        t: usize,
        nr: usize,
        src: &Unpacked,
        put: &mut impl FnMut(usize, usize, f32),
    ) {
        super::tokens_body!(x, t, nr, src, put)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{unpacked_sizes, Layout, Packed, Q8Rows, Unpacked, XRow, LAYOUTS};
    use std::arch::x86_64::*;

    /// Block `b`'s 32 stored unsigned values in element order.
    #[inline(always)]
    unsafe fn weights(l: Layout, row: *const u8, b: usize) -> __m256i {
        let a = row.add(b * l.bytes);
        if l.offset == 128 {
            return _mm256_xor_si256(_mm256_loadu_si256(a.add(l.qs) as *const __m256i), _mm256_set1_epi8(-128));
        }
        let qs = _mm_loadu_si128(a.add(l.qs) as *const __m128i);
        let z = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(qs), _mm_srli_epi16::<4>(qs));
        let mut u = _mm256_and_si256(z, _mm256_set1_epi8(0x0F));
        if let Some(o) = l.qh {
            // Each byte's fifth bit from qh: byte j of the 32 tests bit j.
            let h = _mm256_set1_epi32((a.add(o) as *const u32).read_unaligned() as i32);
            let spread = _mm256_shuffle_epi8(
                h,
                _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
            );
            let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
            u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(16)));
        }
        u
    }

    /// The f16 at `p + min(from + i, n − 1)·stride` for lanes i < 8, as f32.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, stride: usize, from: usize, n: usize) -> __m256 {
        let at = |i: usize| (p.add((from + i).min(n - 1) * stride) as *const i16).read_unaligned();
        _mm256_cvtph_ps(_mm_setr_epi16(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7)))
    }

    /// As the AVX-512 module's, 8 blocks at a time.
    pub(super) trait Source {
        /// Row `r`'s scales and second-term factors of blocks `g..g + 8` (`g` a multiple of 8;
        /// `n` of them, lanes from `n` on repeat the last).
        unsafe fn scales(&self, r: usize, g: usize, n: usize) -> (__m256, __m256);
        /// Row `r`'s stored values of block `b`.
        unsafe fn values(&self, r: usize, b: usize) -> __m256i;
    }

    impl<const T: usize> Source for Packed<T> {
        #[inline(always)]
        unsafe fn scales(&self, r: usize, g: usize, n: usize) -> (__m256, __m256) {
            let l = LAYOUTS[T];
            let base = self.rows.add(r * self.row_bytes + g * l.bytes);
            let d = f16x8(base, l.bytes, 0, n);
            (d, if l.min { f16x8(base.add(2), l.bytes, 0, n) } else { d })
        }
        #[inline(always)]
        unsafe fn values(&self, r: usize, b: usize) -> __m256i {
            weights(LAYOUTS[T], self.rows.add(r * self.row_bytes), b)
        }
    }

    impl Source for Unpacked {
        #[inline(always)]
        unsafe fn scales(&self, r: usize, g: usize, _n: usize) -> (__m256, __m256) {
            // Group g / 16's 16 d lanes then its 16 second-term lanes; g is its first or second 8.
            let p = self.f.add(r * self.scales + 2 * (g / 16 * 16) + g % 16);
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(16)))
        }
        #[inline(always)]
        unsafe fn values(&self, r: usize, b: usize) -> __m256i {
            _mm256_loadu_si256(self.u.add(r * self.values + b * 32) as *const __m256i)
        }
    }

    /// Unpack `nr` rows of type `T` into `u` and `f` (sized by [`unpacked_sizes`]), laid out as
    /// the AVX-512 module's unpack (this level never reads past the last block).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn unpack<const T: usize>(
        rows: &[u8],
        row_bytes: usize,
        nr: usize,
        nb: usize,
        u: &mut [u8],
        f: &mut [f32],
    ) {
        let (vn, sn) = unpacked_sizes(nb);
        assert!(rows.len() >= nr * row_bytes && u.len() >= nr * vn && f.len() >= nr * sn);
        let l = LAYOUTS[T];
        for r in 0..nr {
            let row = rows.as_ptr().add(r * row_bytes);
            for g in (0..nb).step_by(16) {
                let (base, n) = (row.add(g * l.bytes), (nb - g).min(16));
                let o = f.as_mut_ptr().add(r * sn + 2 * g);
                for half in [0, 8] {
                    let d = f16x8(base, l.bytes, half, n);
                    let c = if l.min { f16x8(base.add(2), l.bytes, half, n) } else { d };
                    _mm256_storeu_ps(o.add(half), d);
                    _mm256_storeu_ps(o.add(16 + half), c);
                }
            }
            let out = u.as_mut_ptr().add(r * vn);
            for b in 0..nb {
                _mm256_storeu_si256(out.add(b * 32) as *mut __m256i, weights(l, row, b));
            }
        }
    }

    /// `NT` tokens' dot products with `NR` rows of type `T` from `src`, one block at a time:
    /// `vpmaddubsw` of the stored values (at most 31 for Q4/Q5, so pairs of products stay under
    /// 2·31·127) with the activations, pairs summed to 8 i32 lanes, `−offset·Σq` added to lane 0,
    /// scaled by the block's `d·dx` (picked from 8 blocks' at a time) into 8 f32 lanes. Q8_0's
    /// stored values are signed bytes plus 128, whose products could saturate: they are taken
    /// back to signed and multiplied by the sign trick (|w| by x signed by w, at most 2·128·127),
    /// which gives the same exact sum.
    #[inline(always)]
    unsafe fn run<S: Source, const T: usize, const NT: usize, const NR: usize>(
        xs: [XRow; NT],
        src: &S,
    ) -> [[f32; NR]; NT] {
        let l = LAYOUTS[T];
        let signed = l.offset == 128;
        let nb = xs[0].d.len();
        let mut acc = [[_mm256_setzero_ps(); NR]; NT];
        let mut acc_c = [[_mm256_setzero_ps(); NR]; NT];
        let ones = _mm256_set1_epi16(1);
        for g in (0..nb).step_by(8) {
            let gn = (nb - g).min(8);
            let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(gn as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let xd: [__m256; NT] = std::array::from_fn(|i| _mm256_maskload_ps(xs[i].d.as_ptr().add(g), m));
            let xs_: [__m256; NT] = std::array::from_fn(|i| _mm256_maskload_ps(xs[i].ds.as_ptr().add(g), m));
            let mut sc = [[_mm256_setzero_ps(); NR]; NT];
            for r in 0..NR {
                let (dw, c) = src.scales(r, g, gn);
                for i in 0..NT {
                    if l.min {
                        acc_c[i][r] = _mm256_fmadd_ps(c, xs_[i], acc_c[i][r]);
                    }
                    sc[i][r] = _mm256_mul_ps(dw, xd[i]);
                }
            }
            for j in 0..gn {
                let b = g + j;
                let x: [__m256i; NT] =
                    std::array::from_fn(|i| _mm256_loadu_si256(xs[i].q.as_ptr().add(b * 32) as *const __m256i));
                let start: [__m256i; NT] = std::array::from_fn(|i| {
                    let v = if signed { 0 } else { -l.offset * xs[i].s[b] };
                    _mm256_zextsi128_si256(_mm_cvtsi32_si128(v))
                });
                let lane = _mm256_set1_epi32(j as i32);
                for r in 0..NR {
                    let u = src.values(r, b);
                    for i in 0..NT {
                        let p = if signed {
                            let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
                            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x[i], w))
                        } else {
                            _mm256_maddubs_epi16(u, x[i])
                        };
                        let s = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(p, ones), start[i]));
                        acc[i][r] = _mm256_fmadd_ps(s, _mm256_permutevar8x32_ps(sc[i][r], lane), acc[i][r]);
                    }
                }
            }
        }
        let mut out = [[0f32; NR]; NT];
        for i in 0..NT {
            for r in 0..NR {
                out[i][r] = hsum(acc[i][r]);
                if l.min {
                    out[i][r] += hsum(acc_c[i][r]);
                }
            }
        }
        out
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    /// One token against `NR` packed rows of type `T`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<const T: usize, const NR: usize>(x: XRow, rows: &[u8], row_bytes: usize) -> [f32; NR] {
        run::<_, T, 1, NR>([x], &Packed::<T> { rows: rows.as_ptr(), row_bytes })[0]
    }

    /// Every token of `x` against each of `nr` rows unpacked from type `T`: `put(token, row, v)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tokens<const T: usize>(
        x: &Q8Rows,
        t: usize,
        nr: usize,
        src: &Unpacked,
        put: &mut impl FnMut(usize, usize, f32),
    ) {
        super::tokens_body!(x, t, nr, src, put)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{dequantize, random_blocks};

    fn nmse(got: &[f32], want: &[f32]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        num / den
    }

    /// The portable kernel against an f64 product of the dequantized weights and the dequantized
    /// activations `d·q` (the same numbers; only f32 rounding differs), and against the f32
    /// activations (the activations' rounding: NMSE under 1e-3); every SIMD level's kernel
    /// against the portable one (the same integer sums: within 1e-6 of Σ|products|). On 1..4
    /// rows and block counts that leave an odd block at the end and partial groups.
    #[test]
    fn kernels_match_the_portable_one_and_the_f32_product() {
        for simd in [Simd::Avx2, Simd::Avx512] {
            if !Simd::available().contains(&simd) {
                eprintln!("SKIPPED: the {} 8-bit kernels (this CPU cannot run them)", simd.name());
            }
        }
        #[cfg(target_arch = "x86_64")]
        if Simd::available().contains(&Simd::Avx512) && !vnni() {
            eprintln!("SKIPPED: the AVX-512 VNNI 8-bit kernels (this CPU has AVX-512 without VNNI)");
        }
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
            // Activations of mean 0 and of mean 0.5 (where a fixed offset subtracted in f32 would
            // cancel a large term and show).
            for (nb, mean) in [(1, 0.0), (3, 0.5), (17, 0.0), (27, 0.5), (34, 0.5)] {
                let k = nb * 32;
                let n = 4;
                let data = random_blocks(ty, n * nb, 5 + nb as u64);
                let row_bytes = data.len() / n;
                let wide = dequantize(ty, &data, n * k).unwrap();
                let x: Vec<f32> = (0..k).map(|i| ((i * 7919) % 23) as f32 * 0.1 - 1.1 + mean).collect();
                let xq = Q8Rows::quantize(&x, 1, k);
                let xhat: Vec<f64> = (0..k).map(|j| xq.q[j] as f64 * xq.d[j / 32] as f64).collect();
                let dot =
                    |r: usize, x: &dyn Fn(usize) -> f64| (0..k).map(|j| x(j) * wide[r * k + j] as f64).sum::<f64>();
                let mut plain = vec![0f32; n];
                assert!(dot_rows(ty, &xq, 0, &data, row_bytes, &mut plain, Simd::Portable));
                // Σ|products|: f32 sums in any order are within a few ulps of it per term.
                let scale: Vec<f64> =
                    (0..n).map(|r| (0..k).map(|j| (xhat[j] * wide[r * k + j] as f64).abs()).sum()).collect();
                for (r, &p) in plain.iter().enumerate() {
                    let want = dot(r, &|j| xhat[j]);
                    assert!((p as f64 - want).abs() <= 1e-6 * scale[r], "{ty} nb={nb} row {r}: {p} vs {want}");
                }
                let exact: Vec<f32> = (0..n).map(|r| dot(r, &|j| x[j] as f64) as f32).collect();
                let e = nmse(&plain, &exact);
                assert!(e < 1e-3, "{ty} nb={nb}: 8-bit activations NMSE {e:e} against f32");
                for simd in Simd::available() {
                    for nr in 1..=n {
                        let mut got = vec![f32::NAN; nr];
                        assert!(dot_rows(ty, &xq, 0, &data, row_bytes, &mut got, simd));
                        for (r, (g, p)) in got.iter().zip(&plain).enumerate() {
                            let err = (g - p).abs() as f64;
                            assert!(
                                err <= 1e-6 * scale[r],
                                "{ty} nb={nb} {simd:?} rows={nr}: row {r} {g} vs portable {p}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The 8-bit matmul: each token of a batch (prompt-sized: rows unpacked once) equals the
    /// token run alone, bit for bit, at every level; close to the f32-activation matmul.
    #[test]
    fn q8_matmul_is_batch_independent_and_close_to_f32() {
        use crate::backend::cpu::{matmul_act, Rows};
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
            // 27 and 33 blocks: a partial second half of a group of 16 (AVX2's 8-block steps).
            for (nb, n) in [(3, 37), (18, 21), (27, 9), (33, 6)] {
                let k = nb * 32;
                let data = random_blocks(ty, n * nb, 11);
                let row_bytes = data.len() / n;
                let w = Rows::Packed { ty, data: &data, row_bytes };
                let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
                for t in [1, 7, 33] {
                    let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919) % 29) as f32 * 0.07 - 1.0).collect();
                    let mut f32_out = vec![0f32; t * n];
                    matmul_act(Simd::Portable, Activations::F32, &x, w, Some(&bias), t, n, k, &mut f32_out);
                    for simd in Simd::available() {
                        let mut got = vec![f32::NAN; t * n];
                        matmul_act(simd, Activations::Q8, &x, w, Some(&bias), t, n, k, &mut got);
                        let e = nmse(&got, &f32_out);
                        assert!(e < 1e-3, "{ty} t={t} {simd:?}: NMSE {e:e} against f32 activations");
                        for ti in 0..t {
                            let mut one = vec![f32::NAN; n];
                            matmul_act(simd, Activations::Q8, &x[ti * k..][..k], w, Some(&bias), 1, n, k, &mut one);
                            let same = one.iter().zip(&got[ti * n..][..n]).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{ty} nb={nb} t={t} {simd:?}: token {ti} alone differs from its batch row");
                        }
                    }
                }
            }
        }
    }

    /// A NaN or an infinity in a token's activations makes every output of that token NaN, at
    /// every level and for both row sources (decode-sized and prompt-sized batches); the other
    /// tokens are untouched.
    #[test]
    fn non_finite_activations_propagate() {
        use crate::backend::cpu::{matmul_act, Rows};
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
            let (nb, n) = (5, 7);
            let k = nb * 32;
            let data = random_blocks(ty, n * nb, 3);
            let w = Rows::Packed { ty, data: &data, row_bytes: data.len() / n };
            for (t, bad) in [(1, f32::NAN), (6, f32::INFINITY), (6, f32::NAN)] {
                let mut x: Vec<f32> = (0..t * k).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
                x[2 * 32 + 5] = bad;
                for simd in Simd::available() {
                    let mut out = vec![0f32; t * n];
                    matmul_act(simd, Activations::Q8, &x, w, None, t, n, k, &mut out);
                    assert!(out[..n].iter().all(|v| v.is_nan()), "{ty} t={t} {simd:?}: {bad} lost: {:?}", &out[..n]);
                    assert!(out[n..].iter().all(|v| v.is_finite()), "{ty} t={t} {simd:?}: other tokens hit");
                }
            }
        }
    }

    /// Rows flush against an unreadable page on either side, every block count up to 40, at
    /// every level, one token and a prompt-sized batch: a kernel that reads a byte outside the
    /// rows (a scale past the last block, an odd block's missing partner) crashes the test.
    #[cfg(unix)]
    #[test]
    fn kernels_read_only_the_rows() {
        let page = 4096;
        // SAFETY: a fresh private anonymous mapping of 3 pages, the outer two made unreadable;
        // unmapped at the end.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                3 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(p != libc::MAP_FAILED);
            assert_eq!(libc::mprotect(p, page, libc::PROT_NONE), 0);
            assert_eq!(libc::mprotect((p as *mut u8).add(2 * page) as *mut libc::c_void, page, libc::PROT_NONE), 0);
            (p as *mut u8).add(page)
        };
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
            for nb in 1..=40 {
                let (k, n) = (nb * 32, 2);
                let data = random_blocks(ty, n * nb, nb as u64);
                assert!(data.len() <= page);
                for at_end in [false, true] {
                    let off = if at_end { page - data.len() } else { 0 };
                    // SAFETY: [off, off + len) lies inside the readable middle page.
                    let rows = unsafe {
                        std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(off), data.len());
                        std::slice::from_raw_parts(base.add(off), data.len())
                    };
                    for t in [1, 6] {
                        let x: Vec<f32> = (0..t * k).map(|i| (i % 11) as f32 * 0.2 - 1.0).collect();
                        let xq = Q8Rows::quantize(&x, t, k);
                        for simd in Simd::available() {
                            let mut seen = 0;
                            assert!(block(ty, &xq, t, rows, data.len() / n, simd, |_, _, _| seen += 1));
                            assert_eq!(seen, t * n);
                        }
                    }
                }
            }
        }
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(base.sub(page) as *mut libc::c_void, 3 * page) };
    }

    #[test]
    fn quantization_rounds_to_nearest_and_keeps_nan() {
        let mut x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        x[40] = f32::NAN;
        let q = Q8Rows::quantize(&x, 1, 64);
        assert_eq!(q.d[0], 20.0 / 127.0);
        // -20 → -127, 0 → 0, 11 → round(69.85) = 70.
        assert_eq!((q.q[0], q.q[20], q.q[31]), (-127, 0, 70));
        assert_eq!(q.ds[0], q.d[0] * q.q[..32].iter().map(|&v| v as i32).sum::<i32>() as f32);
        assert!(q.d[1].is_nan() && q.ds[1].is_nan());
        assert_eq!(q.s[0], q.q[..32].iter().map(|&v| v as i32).sum::<i32>());
        let y: Vec<f32> = (0..32 * 64).map(|i| (i as f32 - 1024.0) * 0.0625 + 0.5).collect();
        let qy = Q8Rows::quantize(&y, 1, y.len());
        for (b, (yb, qb)) in y.chunks(32).zip(qy.q.chunks(32)).enumerate() {
            let inv = 1.0 / qy.d[b];
            for (v, q) in yb.iter().zip(qb) {
                assert_eq!(*q as f32, (v * inv).round_ties_even().clamp(-127.0, 127.0), "{v}");
            }
        }
        let z = Q8Rows::quantize(&[0.0; 32], 1, 32);
        assert!(z.d[0] == 0.0 && z.q.iter().all(|&v| v == 0));
    }
}
