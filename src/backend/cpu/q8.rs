//! 8-bit activations, opt-in ([`set_activations`]; the CLI's `--cpu-activations q8` or
//! `PERSONA_CPU_ACTIVATIONS=q8`): as llama.cpp does on the CPU, each token's activation row is quantized
//! per 32-element block to int8 with one f32 scale (round to nearest, ties to even; scale
//! amax / 127), and matmuls whose weights are stored as Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K
//! or Q6_K take each 32-element block's dot product in integers (`vpdpbusd` with AVX-512 VNNI,
//! `vpmaddubsw` with AVX2), scaled by the two blocks' scales in f32. Other weights (f32, f16,
//! bf16, Q2_K, Q3_K) keep f32 activations.
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
//! product the kernels take 16 (8) blocks at a time. The K-quants' 32-element blocks fit the same
//! sum: Q4_K and Q5_K with `d = d_super·scale` and second term `−dmin·min` (their 6-bit scale and
//! minimum), Q6_K with `d = d_super` and an integer sum taken per 16 elements, each half weighted
//! by its i8 scale (`Σ scale_h·Σ(u − 32)·q`). Unlike llama.cpp (one activation scale per 256
//! for the K-quants, `Q8_K`), the activations keep one scale per 32 values for every type.

use std::sync::atomic::{AtomicBool, Ordering};

use super::simd::Simd;
#[cfg(target_arch = "x86_64")]
use crate::model::gguf::k_scales_mins;
use crate::model::gguf::{half_at, scale_min_k4, GgmlType};

/// How the CPU matmul takes its activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// f32 (the default): results equal the widened f32 weights' bit for bit.
    F32,
    /// int8 per 32-block for weights stored as Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K.
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

/// Whether weights of `ty` in rows of `k` values take 8-bit activations in [`Activations::Q8`]
/// mode: a type with 8-bit kernels, and rows of whole stored blocks (32 values; 256 for the
/// K-quants).
pub fn supports(ty: GgmlType, k: usize) -> bool {
    layout(ty).is_some_and(|l| k > 0 && k % (32 * l.blocks) == 0)
}

/// How a type stores its 32-element blocks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One 32-element block per stored block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
    Plain,
    /// 256-element super-blocks of eight 32-element blocks, each with a 6-bit scale and minimum:
    /// block `j`'s values are the low (even `j`) or high (odd) nibbles of `qs[32·(j/2)..][..32]`.
    Q4K,
    /// As Q4K, plus bit `j` of `qh[l]` adding 16 to element `l` of block `j`.
    Q5K,
    /// 256-element super-blocks of eight 32-element blocks with one f16 scale `d`, each block two
    /// i8 scales (one per 16 elements) and 6-bit values offset by 32.
    Q6K,
}

/// A type's layout: bytes per stored block and the 32-element blocks in it, offset of the value
/// bytes (`qs`, `ql`) and of the high bits (Q5, Q6_K), whether blocks have a second term (a
/// minimum), and the offset subtracted from the stored unsigned values.
#[derive(Clone, Copy)]
struct Layout {
    kind: Kind,
    bytes: usize,
    blocks: usize,
    qs: usize,
    qh: Option<usize>,
    min: bool,
    offset: i32,
}

impl Layout {
    /// Whether each block has two scales, one per 16 elements (Q6_K): the integer sum is then
    /// taken per 16 and weighted by them, before the block's f32 terms.
    const fn sixteen(self) -> bool {
        matches!(self.kind, Kind::Q6K)
    }
}

const fn plain(bytes: usize, qs: usize, qh: Option<usize>, min: bool, offset: i32) -> Layout {
    Layout { kind: Kind::Plain, bytes, blocks: 1, qs, qh, min, offset }
}

/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K: the SIMD kernels take the index as a const
/// parameter, so each type's code is compiled with its layout folded in.
const LAYOUTS: [Layout; 8] = [
    plain(18, 2, None, false, 8),
    plain(20, 4, None, true, 0),
    plain(22, 6, Some(2), false, 16),
    plain(24, 8, Some(4), true, 0),
    plain(34, 2, None, false, 128),
    Layout { kind: Kind::Q4K, bytes: 144, blocks: 8, qs: 16, qh: None, min: true, offset: 0 },
    Layout { kind: Kind::Q5K, bytes: 176, blocks: 8, qs: 48, qh: Some(16), min: true, offset: 0 },
    Layout { kind: Kind::Q6K, bytes: 210, blocks: 8, qs: 0, qh: Some(128), min: false, offset: 32 },
];

fn type_index(ty: GgmlType) -> Option<usize> {
    Some(match ty {
        GgmlType::Q4_0 => 0,
        GgmlType::Q4_1 => 1,
        GgmlType::Q5_0 => 2,
        GgmlType::Q5_1 => 3,
        GgmlType::Q8_0 => 4,
        GgmlType::Q4_K => 5,
        GgmlType::Q5_K => 6,
        GgmlType::Q6_K => 7,
        _ => return None,
    })
}

fn layout(ty: GgmlType) -> Option<Layout> {
    type_index(ty).map(|i| LAYOUTS[i])
}

/// The bytes of a row of `k` values of layout `l`.
fn row_bytes_of(l: Layout, k: usize) -> usize {
    k / 32 / l.blocks * l.bytes
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

/// Every token of `x` against a block of packed rows of `ty` (`rows.len() / row_bytes` of
/// them): `put(token, row, value)`, one row at a time (one stream from memory: interleaving 4
/// rows' reads cut Q4_K decode from 18 to 12 GB/s). Up to 4 tokens: the rows as stored. More
/// (with AVX2 or AVX-512 VNNI): the rows unpacked once into a per-thread scratch ([`Unpacked`]),
/// then 4 tokens at a time against each row, with the same arithmetic (a token's result does
/// not depend on the batch). `false`, doing nothing, for a type without 8-bit kernels.
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
    let l = LAYOUTS[tix];
    // Whole stored blocks only: the kernels read a K-quant row 256 values at a time.
    assert!(supports(ty, x.k) && row_bytes == row_bytes_of(l, x.k) && x.q.len() >= t * x.k);
    let nr = rows.len() / row_bytes;
    #[cfg(target_arch = "x86_64")]
    if let Some(level) = Level::of(simd) {
        if t <= 4 {
            // SAFETY: Level::of checked the CPU's features; the lengths were checked above.
            with_type!(tix, T => unsafe {
                let src = Packed::<T> { rows: rows.as_ptr(), row_bytes };
                tokens_simd::<T, _>(level, x, t, nr, &src, &mut put)
            });
            return true;
        }
        let nb = x.k / 32;
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
                tokens_simd::<T, _>(level, x, t, nr, &src, &mut put)
            });
        });
        return true;
    }
    let _ = simd;
    for r in 0..nr {
        for ti in 0..t {
            put(ti, r, dot_plain(l, x.row(ti), &rows[r * row_bytes..][..row_bytes]));
        }
    }
    true
}

/// `$body` with `$t` a const type index (into [`LAYOUTS`]), so each type's kernels are
/// compiled with its layout folded in.
#[cfg(target_arch = "x86_64")]
macro_rules! with_type {
    ($tix:expr, $t:ident => $body:expr) => {
        with_type!(@arms $tix, $t, $body; 0 1 2 3 4 5 6; 7)
    };
    (@arms $tix:expr, $t:ident, $body:expr; $($i:literal)*; $last:literal) => {
        match $tix {
            $($i => {
                const $t: usize = $i;
                $body
            })*
            _ => {
                const $t: usize = $last;
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

/// Every token of `x` (4 at a time) against each of `nr` rows of type `T`, as stored or
/// unpacked. Safety: `level`'s features were detected; `src` holds `nr` rows.
#[cfg(target_arch = "x86_64")]
unsafe fn tokens_simd<const T: usize, S: RowSource + avx512::Source + avx2::Source>(
    level: Level,
    x: &Q8Rows,
    t: usize,
    nr: usize,
    src: &S,
    put: &mut impl FnMut(usize, usize, f32),
) {
    match level {
        Level::Avx512 => avx512::tokens::<T, S>(x, t, nr, src, put),
        Level::Avx2 => avx2::tokens::<T, S>(x, t, nr, src, put),
    }
}

/// Each SIMD module's `tokens`, compiled for `$features`: every token of `x` (`t` of them, 4 at
/// a time) against each of `nr` rows of type `T` from `src`, through the module's inlined `run`:
/// `put(token, row, value)`.
#[cfg(target_arch = "x86_64")]
macro_rules! tokens_fn {
    ($features:literal) => {
        #[target_feature(enable = $features)]
        pub(super) unsafe fn tokens<const T: usize, S: Source + RowSource>(
            x: &Q8Rows,
            t: usize,
            nr: usize,
            src: &S,
            put: &mut impl FnMut(usize, usize, f32),
        ) {
            let xs: Vec<XRow> = (0..t).map(|i| x.row(i)).collect();
            for r in 0..nr {
                let row = src.row(r);
                for t0 in (0..t).step_by(4) {
                    macro_rules! go {
                        ($nt:literal) => {{
                            let v = run::<_, T, $nt>(std::array::from_fn(|i| xs[t0 + i]), &row);
                            for (i, &v) in v.iter().enumerate() {
                                put(t0 + i, r, v);
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
        }
    };
}
#[cfg(target_arch = "x86_64")]
use tokens_fn;

/// Rows of type `T` (an index into [`LAYOUTS`]) as stored, `row_bytes` apart: the decode path's
/// row source in both SIMD modules.
#[cfg(target_arch = "x86_64")]
struct Packed<const T: usize> {
    rows: *const u8,
    row_bytes: usize,
}

/// A row source's row `r` alone. Safety: `r` is one of its rows.
#[cfg(target_arch = "x86_64")]
trait RowSource {
    unsafe fn row(&self, r: usize) -> Self;
}

#[cfg(target_arch = "x86_64")]
impl<const T: usize> RowSource for Packed<T> {
    unsafe fn row(&self, r: usize) -> Self {
        Packed { rows: self.rows.add(r * self.row_bytes), row_bytes: self.row_bytes }
    }
}

/// A block of rows unpacked once for a prompt's tokens: per row, `values` bytes of stored
/// unsigned values (32 per block, room for an even number of blocks; what follows an odd last
/// block meets zero activations) and `scales` f32 (per group of 16 blocks, the 16 `d` lanes then
/// the 16 second-term lanes, as the packed rows' `Source::scales` gives them: `m`, `−dmin·min`,
/// `d` again, or for Q6_K each block's two i8 scales as raw bytes; lanes past the last block are
/// never read by the AVX2 kernels and repeat it for the AVX-512 ones).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Unpacked {
    u: *const u8,
    f: *const f32,
    values: usize,
    scales: usize,
}

#[cfg(target_arch = "x86_64")]
impl RowSource for Unpacked {
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

/// Block `b`'s 32 stored unsigned values of a row, in element order.
fn values(l: Layout, row: &[u8], b: usize) -> [u8; 32] {
    let mut u = [0u8; 32];
    let sb = &row[b / l.blocks * l.bytes..][..l.bytes];
    let j = b % l.blocks;
    match l.kind {
        Kind::Plain if l.offset == 128 => {
            for (u, &q) in u.iter_mut().zip(&sb[l.qs..l.qs + 32]) {
                *u = q ^ 0x80;
            }
        }
        Kind::Plain => {
            let qh = l.qh.map_or(0, |o| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap()));
            for i in 0..16 {
                let q = sb[l.qs + i];
                u[i] = (q & 0x0F) | (((qh >> i) & 1) << 4) as u8;
                u[i + 16] = (q >> 4) | (((qh >> (i + 16)) & 1) << 4) as u8;
            }
        }
        Kind::Q4K | Kind::Q5K => {
            let qs = &sb[l.qs + 32 * (j / 2)..][..32];
            for (i, u) in u.iter_mut().enumerate() {
                *u = (qs[i] >> (4 * (j % 2))) & 0x0F;
                if let Some(o) = l.qh {
                    *u |= ((sb[o + i] >> j) & 1) << 4;
                }
            }
        }
        Kind::Q6K => {
            // Half h = j / 4 of the super-block, run k = j % 4: a nibble of ql[l + 32·(k % 2)]
            // (low for k < 2), and bits 2k, 2k + 1 of qh[l] as bits 4 and 5.
            let (h, k) = (j / 4, j % 4);
            let ql = &sb[64 * h + 32 * (k % 2)..][..32];
            let qh = &sb[l.qh.unwrap() + 32 * h..][..32];
            for (i, u) in u.iter_mut().enumerate() {
                *u = ((ql[i] >> (4 * (k / 2))) & 0x0F) | (((qh[i] >> (2 * k)) & 3) << 4);
            }
        }
    }
    u
}

/// Block `b`'s scale `d` and second-term factor: the minimum (Q4_1, Q5_1), `−dmin·m` (Q4_K,
/// Q5_K), or 0.
fn scales(l: Layout, row: &[u8], b: usize) -> (f32, f32) {
    let sb = &row[b / l.blocks * l.bytes..][..l.bytes];
    match l.kind {
        Kind::Plain => (half_at(sb, 0), if l.min { half_at(sb, 2) } else { 0.0 }),
        Kind::Q4K | Kind::Q5K => {
            let (s, m) = scale_min_k4(b % 8, &sb[4..16]);
            (half_at(sb, 0) * s as f32, -(half_at(sb, 2) * m as f32))
        }
        Kind::Q6K => (half_at(sb, 208), 0.0),
    }
}

/// Q6_K block `b`'s two i8 scales, of its first and second 16 elements.
fn sixteen(l: Layout, row: &[u8], b: usize) -> [i32; 2] {
    let at = b / l.blocks * l.bytes + 192 + 2 * (b % 8);
    [row[at] as i8 as i32, row[at + 1] as i8 as i32]
}

/// The portable kernel: each block's integer sum, then its f32 terms, in block order.
fn dot_plain(l: Layout, x: XRow, row: &[u8]) -> f32 {
    let (mut acc, mut acc_c) = (0f32, 0f32);
    for b in 0..x.d.len() {
        let u = values(l, row, b);
        let prod =
            |r: std::ops::Range<usize>| -> i32 { r.map(|i| (u[i] as i32 - l.offset) * x.q[b * 32 + i] as i32).sum() };
        let isum = if l.sixteen() {
            let [s0, s1] = sixteen(l, row, b);
            s0 * prod(0..16) + s1 * prod(16..32)
        } else {
            prod(0..32)
        };
        let (d, c) = scales(l, row, b);
        acc = (d * x.d[b]).mul_add(isum as f32, acc);
        if l.min {
            acc_c = c.mul_add(x.ds[b], acc_c);
        }
    }
    acc + acc_c
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{k_scales_mins, unpacked_sizes, Kind, Layout, Packed, Q8Rows, RowSource, Unpacked, XRow, LAYOUTS};
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
        /// The row's scales `d` and second-term lanes (`m`, `−dmin·min`, `d` again, or Q6_K's
        /// raw scale bytes; see [`Unpacked`]) of blocks `g..g + 16` (`n` of them; lanes from `n`
        /// on repeat the last).
        unsafe fn scales(&self, g: usize, n: usize) -> (__m512, __m512);
        /// The row's stored values of blocks `b` and `b + 1` (zero for `b + 1` unless `two`).
        unsafe fn values(&self, b: usize, two: bool) -> __m512i;
        /// Q6_K: the row's i8 scales of blocks `b` and `b + 1` (`b` even), each 16 elements'
        /// scale in the 4 i32 lanes whose `vpdpbusd` sums cover them.
        unsafe fn sixteen(&self, b: usize) -> __m512i;
    }

    /// Q4_K/Q5_K/Q6_K: the scales of the 16 blocks of super-blocks `s0` and `s1` (`s1` is `s0`
    /// again where the group has one). Q4_K/Q5_K: `d·scale` and `−dmin·min`, as [`super::scales`];
    /// Q6_K: `d`, and each block's two i8 scales in the low bytes of its second-term lane (an
    /// integer, not a number: [`Unpacked`] keeps it there for [`Source::sixteen`]).
    #[inline(always)]
    unsafe fn k_scales(l: Layout, s0: *const u8, s1: *const u8) -> (__m512, __m512) {
        // The f16 pairs at offset o of both super-blocks (one f16 at 208, Q6_K's last two
        // bytes), [s0's first, s0's second, s1's first, s1's second] as f32, then each over its
        // 8 lanes.
        let halves = |o: usize| {
            let w = |s: *const u8| {
                let p = s.add(o) as *const u16;
                p.read_unaligned() as i32 | if o == 208 { 0 } else { (p.add(1).read_unaligned() as i32) << 16 }
            };
            _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, w(s1), w(s0))))
        };
        let spread = |v: __m512, i: i32| {
            _mm512_permutexvar_ps(
                _mm512_set_epi32(i + 2, i + 2, i + 2, i + 2, i + 2, i + 2, i + 2, i + 2, i, i, i, i, i, i, i, i),
                v,
            )
        };
        if l.kind == Kind::Q6K {
            let sc = _mm256_set_m128i(
                _mm_loadu_si128(s1.add(192) as *const __m128i),
                _mm_loadu_si128(s0.add(192) as *const __m128i),
            );
            return (spread(halves(208), 0), _mm512_castsi512_ps(_mm512_cvtepu16_epi32(sc)));
        }
        let dm = halves(0);
        let ((a0, m0), (a1, m1)) = (k_scales_mins(s0), k_scales_mins(s1));
        let widen = |lo: u64, hi: u64| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(hi as i64, lo as i64)));
        let c = _mm512_mul_ps(spread(dm, 1), widen(m0, m1));
        (_mm512_mul_ps(spread(dm, 0), widen(a0, a1)), _mm512_xor_ps(c, _mm512_set1_ps(-0.0)))
    }

    /// Q4_K/Q5_K/Q6_K: blocks `b` and `b + 1` (`b` even) of the super-block at `sb`.
    #[inline(always)]
    unsafe fn k_values(l: Layout, sb: *const u8, b: usize) -> __m512i {
        let j = b % 8;
        let both = |p: *const u8| _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i));
        let by = |lo: u64, hi: u64| {
            let (lo, hi) = ((lo * 0x0001_0001_0001_0001) as i64, (hi * 0x0001_0001_0001_0001) as i64);
            _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo)
        };
        if l.kind == Kind::Q6K {
            // Half j / 4; runs k = j % 4 ∈ {0, 2} and k + 1: low (k = 0) or high nibbles of the
            // half's 64 ql bytes, and bits 2k.. (2k + 2.. for the second block) of its qh as bits 4, 5.
            let (h, k) = ((j / 4) as u64, (j % 4) as u64);
            let ql = _mm512_loadu_si512(sb.add(64 * h as usize) as *const __m512i);
            let nib = _mm512_and_si512(_mm512_srl_epi16(ql, _mm_cvtsi64_si128(2 * k as i64)), _mm512_set1_epi8(0x0F));
            let qh = both(sb.add(l.qh.unwrap() + 32 * h as usize));
            let hb = _mm512_and_si512(_mm512_srlv_epi16(qh, by(2 * k, 2 * k + 2)), _mm512_set1_epi8(3));
            return _mm512_or_si512(nib, _mm512_slli_epi16::<4>(hb));
        }
        let q = both(sb.add(l.qs + 32 * (j / 2)));
        let mut u = _mm512_and_si512(_mm512_srlv_epi16(q, by(0, 4)), _mm512_set1_epi8(0x0F));
        if let Some(o) = l.qh {
            let qh = _mm256_loadu_si256(sb.add(o) as *const __m256i);
            let lo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << j) as i8)) as u64;
            let hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((2u8 << j) as i8)) as u64;
            u = _mm512_mask_add_epi8(u, _cvtu64_mask64(lo | hi << 32), u, _mm512_set1_epi8(16));
        }
        u
    }

    /// The i8 scales in `v` picked by `idx` into 16 bytes, as 16 i32 lanes.
    #[inline(always)]
    unsafe fn sixteen_lanes(v: __m128i, idx: __m128i) -> __m512i {
        _mm512_cvtepi8_epi32(_mm_shuffle_epi8(v, idx))
    }

    impl<const T: usize> Source for Packed<T> {
        #[inline(always)]
        unsafe fn scales(&self, g: usize, n: usize) -> (__m512, __m512) {
            let l = LAYOUTS[T];
            if l.kind != Kind::Plain {
                let s0 = self.rows.add(g / 8 * l.bytes);
                return k_scales(l, s0, if n > 8 { s0.add(l.bytes) } else { s0 });
            }
            let base = self.rows.add(g * l.bytes);
            let d = f16x16(base, l.bytes, n);
            (d, if l.min { f16x16(base.add(2), l.bytes, n) } else { d })
        }
        #[inline(always)]
        unsafe fn values(&self, b: usize, two: bool) -> __m512i {
            let l = LAYOUTS[T];
            if l.kind != Kind::Plain {
                return k_values(l, self.rows.add(b / 8 * l.bytes), b);
            }
            weights(l, self.rows, b, two)
        }
        #[inline(always)]
        unsafe fn sixteen(&self, b: usize) -> __m512i {
            let l = LAYOUTS[T];
            let p = self.rows.add(b / 8 * l.bytes + 192 + 2 * (b % 8));
            let idx = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            sixteen_lanes(_mm_cvtsi32_si128((p as *const i32).read_unaligned()), idx)
        }
    }

    impl Source for Unpacked {
        #[inline(always)]
        unsafe fn scales(&self, g: usize, _n: usize) -> (__m512, __m512) {
            let p = self.f.add(2 * g);
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        }
        #[inline(always)]
        unsafe fn values(&self, b: usize, _two: bool) -> __m512i {
            _mm512_loadu_si512(self.u.add(b * 32) as *const __m512i)
        }
        #[inline(always)]
        unsafe fn sixteen(&self, b: usize) -> __m512i {
            // Blocks b and b + 1's second-term lanes, each holding the block's two scales.
            let p = self.f.add(2 * (b / 16 * 16) + 16 + b % 16);
            let idx = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 4, 4, 4, 4, 5, 5, 5, 5);
            sixteen_lanes(_mm_loadl_epi64(p as *const __m128i), idx)
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
            let row = src.row(r);
            for g in (0..nb).step_by(16) {
                let (d, c) = row.scales(g, (nb - g).min(16));
                _mm512_storeu_ps(f.as_mut_ptr().add(r * sn + 2 * g), d);
                _mm512_storeu_ps(f.as_mut_ptr().add(r * sn + 2 * g + 16), c);
            }
            for b in (0..nb).step_by(2) {
                let v = row.values(b, b + 1 < nb);
                _mm512_storeu_si512(u.as_mut_ptr().add(r * vn + b * 32) as *mut __m512i, v);
            }
        }
    }

    /// `NT` tokens' dot products with one row of type `T` from `src`, 16 blocks at a time: the
    /// row's 16 scales (and minimums) in one register, then each pair of blocks in one register:
    /// 64 products in `vpdpbusd`, started at the blocks' `−offset·Σq` (lanes 0 and 8), scaled
    /// lane-wise by their block's `d·dx` (permuted from the 16) into 16 f32 lanes. Each token has
    /// its own chains, the same whatever NT and the source.
    #[inline(always)]
    unsafe fn run<S: Source, const T: usize, const NT: usize>(xs: [XRow; NT], src: &S) -> [f32; NT] {
        let l = LAYOUTS[T];
        let nb = xs[0].d.len();
        // Two chains per output (even and odd pairs), so one token does not wait on each FMA's
        // latency; every tile has them, so a result does not depend on NT.
        let mut acc = [[_mm512_setzero_ps(); NT]; 2];
        let mut acc_c = [_mm512_setzero_ps(); NT];
        // Pair p's lanes pick blocks 2p and 2p + 1 of a group's 16 scales.
        let picks: [__m512i; 8] = std::array::from_fn(|p| {
            let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
            _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
        });
        for g in (0..nb).step_by(16) {
            let gn = (nb - g).min(16);
            let m: __mmask16 = if gn == 16 { 0xFFFF } else { (1u16 << gn) - 1 };
            let xd: [__m512; NT] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(m, xs[i].d.as_ptr().add(g)));
            let xs_: [__m512; NT] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(m, xs[i].ds.as_ptr().add(g)));
            let (dw, c) = src.scales(g, gn);
            if l.min {
                for i in 0..NT {
                    acc_c[i] = _mm512_fmadd_ps(c, xs_[i], acc_c[i]);
                }
            }
            let sc: [__m512; NT] = std::array::from_fn(|i| _mm512_mul_ps(dw, xd[i]));
            // Pair p of the group (blocks g + 2p and g + 2p + 1). For one token a whole group is
            // written out pair by pair, so each pair's position in its super-block is a constant
            // (Q6_K decode: 12.8 -> 8.3 cycles per pair); prompts' 4-token tiles keep the loop
            // (unrolling them was not measured to help).
            macro_rules! pair {
                ($p:expr, $chain:literal) => {{
                    let p: usize = $p;
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
                    // −offset·Σq of blocks b and b + 1 in lanes 0 and 8; for Q6_K, whose lanes are
                    // weighted by their 16 elements' scale, each lane's own −32·Σq.
                    let start: [__m512i; NT] = std::array::from_fn(|i| {
                        if l.sixteen() {
                            let z = _mm512_setzero_si512();
                            return _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, _mm512_set1_epi8(32), x[i]));
                        }
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
                    let pick = picks[p];
                    let u = src.values(b, two);
                    let w16 = if l.sixteen() { src.sixteen(b) } else { _mm512_setzero_si512() };
                    for i in 0..NT {
                        let mut v = _mm512_dpbusd_epi32(start[i], u, x[i]);
                        if l.sixteen() {
                            v = _mm512_mullo_epi32(v, w16);
                        }
                        let s = _mm512_cvtepi32_ps(v);
                        acc[$chain][i] = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(pick, sc[i]), acc[$chain][i]);
                    }
                }};
            }
            if gn == 16 && NT == 1 {
                pair!(0, 0);
                pair!(1, 1);
                pair!(2, 0);
                pair!(3, 1);
                pair!(4, 0);
                pair!(5, 1);
                pair!(6, 0);
                pair!(7, 1);
            } else {
                // Even pairs on chain 0, odd on chain 1 (a literal index: the chains stay in
                // registers).
                let np = gn.div_ceil(2);
                for p in (0..np).step_by(2) {
                    pair!(p, 0);
                    if p + 1 < np {
                        pair!(p + 1, 1);
                    }
                }
            }
        }
        std::array::from_fn(|i| {
            let v = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]));
            if l.min {
                v + _mm512_reduce_add_ps(acc_c[i])
            } else {
                v
            }
        })
    }

    super::tokens_fn!("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c");
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{k_scales_mins, unpacked_sizes, Kind, Layout, Packed, Q8Rows, RowSource, Unpacked, XRow, LAYOUTS};
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

    /// The f16 at `p + min(i, n − 1)·stride` for lanes i < 8, as f32.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, stride: usize, n: usize) -> __m256 {
        let at = |i: usize| (p.add(i.min(n - 1) * stride) as *const i16).read_unaligned();
        _mm256_cvtph_ps(_mm_setr_epi16(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7)))
    }

    /// As the AVX-512 module's, 8 blocks at a time.
    pub(super) trait Source {
        /// The row's scales and second-term factors of blocks `g..g + 8` (`g` a multiple of 8;
        /// `n` of them, lanes from `n` on repeat the last).
        unsafe fn scales(&self, g: usize, n: usize) -> (__m256, __m256);
        /// The row's stored values of block `b`.
        unsafe fn values(&self, b: usize) -> __m256i;
        /// Q6_K: the row's two i8 scales of block `b`, each in the 8 i16 lanes of the
        /// `vpmaddubsw` pairs of its 16 elements.
        unsafe fn sixteen(&self, b: usize) -> __m256i;
    }

    /// Q4_K/Q5_K/Q6_K: the scales of the 8 blocks of the super-block at `sb`, as the AVX-512
    /// module's `k_scales`.
    #[inline(always)]
    unsafe fn k_scales(l: Layout, sb: *const u8) -> (__m256, __m256) {
        let half = |o: usize| _mm256_cvtph_ps(_mm_set1_epi16((sb.add(o) as *const i16).read_unaligned()));
        if l.kind == Kind::Q6K {
            let sc = _mm_loadu_si128(sb.add(192) as *const __m128i);
            return (half(208), _mm256_castsi256_ps(_mm256_cvtepu16_epi32(sc)));
        }
        let (a, m) = k_scales_mins(sb);
        let widen = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
        let c = _mm256_mul_ps(half(2), widen(m));
        (_mm256_mul_ps(half(0), widen(a)), _mm256_xor_ps(c, _mm256_set1_ps(-0.0)))
    }

    /// Q4_K/Q5_K/Q6_K: block `b` of the super-block at `sb`.
    #[inline(always)]
    unsafe fn k_values(l: Layout, sb: *const u8, b: usize) -> __m256i {
        let j = b % 8;
        let load = |o: usize| _mm256_loadu_si256(sb.add(o) as *const __m256i);
        let shr = |v: __m256i, n: usize| _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32));
        if l.kind == Kind::Q6K {
            let (h, k) = (j / 4, j % 4);
            let nib = _mm256_and_si256(shr(load(64 * h + 32 * (k % 2)), 4 * (k / 2)), _mm256_set1_epi8(0x0F));
            let hb = _mm256_and_si256(shr(load(l.qh.unwrap() + 32 * h), 2 * k), _mm256_set1_epi8(3));
            return _mm256_or_si256(nib, _mm256_slli_epi16::<4>(hb));
        }
        let u = _mm256_and_si256(shr(load(l.qs + 32 * (j / 2)), 4 * (j % 2)), _mm256_set1_epi8(0x0F));
        let Some(o) = l.qh else { return u };
        let bit = _mm256_set1_epi8((1u8 << j) as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(load(o), bit), bit);
        _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(16)))
    }

    /// Two i8 scales in the low bytes of `v`, each over 8 i16 lanes.
    #[inline(always)]
    unsafe fn sixteen_lanes(v: i32) -> __m256i {
        let idx = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_cvtsi32_si128(v), idx))
    }

    impl<const T: usize> Source for Packed<T> {
        #[inline(always)]
        unsafe fn scales(&self, g: usize, n: usize) -> (__m256, __m256) {
            let l = LAYOUTS[T];
            if l.kind != Kind::Plain {
                return k_scales(l, self.rows.add(g / 8 * l.bytes));
            }
            let base = self.rows.add(g * l.bytes);
            let d = f16x8(base, l.bytes, n);
            (d, if l.min { f16x8(base.add(2), l.bytes, n) } else { d })
        }
        #[inline(always)]
        unsafe fn values(&self, b: usize) -> __m256i {
            let l = LAYOUTS[T];
            if l.kind != Kind::Plain {
                return k_values(l, self.rows.add(b / 8 * l.bytes), b);
            }
            weights(l, self.rows, b)
        }
        #[inline(always)]
        unsafe fn sixteen(&self, b: usize) -> __m256i {
            let l = LAYOUTS[T];
            let p = self.rows.add(b / 8 * l.bytes + 192 + 2 * (b % 8));
            sixteen_lanes((p as *const u16).read_unaligned() as i32)
        }
    }

    impl Source for Unpacked {
        #[inline(always)]
        unsafe fn scales(&self, g: usize, _n: usize) -> (__m256, __m256) {
            // Group g / 16's 16 d lanes then its 16 second-term lanes; g is its first or second 8.
            let p = self.f.add(2 * (g / 16 * 16) + g % 16);
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(16)))
        }
        #[inline(always)]
        unsafe fn values(&self, b: usize) -> __m256i {
            _mm256_loadu_si256(self.u.add(b * 32) as *const __m256i)
        }
        #[inline(always)]
        unsafe fn sixteen(&self, b: usize) -> __m256i {
            // Block b's second-term lane holds its two scales.
            let p = self.f.add(2 * (b / 16 * 16) + 16 + b % 16);
            sixteen_lanes((p as *const i32).read_unaligned())
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
        let src = Packed::<T> { rows: rows.as_ptr(), row_bytes };
        for r in 0..nr {
            let row = src.row(r);
            for g in (0..nb).step_by(8) {
                let (d, c) = row.scales(g, (nb - g).min(8));
                let o = f.as_mut_ptr().add(r * sn + 2 * (g / 16 * 16) + g % 16);
                _mm256_storeu_ps(o, d);
                _mm256_storeu_ps(o.add(16), c);
            }
            for b in 0..nb {
                _mm256_storeu_si256(u.as_mut_ptr().add(r * vn + b * 32) as *mut __m256i, row.values(b));
            }
        }
    }

    /// `NT` tokens' dot products with one row of type `T` from `src`, one block at a time:
    /// `vpmaddubsw` of the stored values (at most 31 for Q4/Q5, so pairs of products stay under
    /// 2·31·127) with the activations, pairs summed to 8 i32 lanes, `−offset·Σq` added to lane 0,
    /// scaled by the block's `d·dx` (picked from 8 blocks' at a time) into 8 f32 lanes. Q8_0's
    /// stored values are signed bytes plus 128, whose products could saturate: they are taken
    /// back to signed and multiplied by the sign trick (|w| by x signed by w, at most 2·128·127),
    /// which gives the same exact sum.
    #[inline(always)]
    unsafe fn run<S: Source, const T: usize, const NT: usize>(xs: [XRow; NT], src: &S) -> [f32; NT] {
        let l = LAYOUTS[T];
        let signed = l.offset == 128;
        let nb = xs[0].d.len();
        // Two chains per output (even and odd blocks), as the AVX-512 kernel's.
        let mut acc = [[_mm256_setzero_ps(); NT]; 2];
        let mut acc_c = [_mm256_setzero_ps(); NT];
        let ones = _mm256_set1_epi16(1);
        for g in (0..nb).step_by(8) {
            let gn = (nb - g).min(8);
            let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(gn as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let xd: [__m256; NT] = std::array::from_fn(|i| _mm256_maskload_ps(xs[i].d.as_ptr().add(g), m));
            let xs_: [__m256; NT] = std::array::from_fn(|i| _mm256_maskload_ps(xs[i].ds.as_ptr().add(g), m));
            let (dw, c) = src.scales(g, gn);
            if l.min {
                for i in 0..NT {
                    acc_c[i] = _mm256_fmadd_ps(c, xs_[i], acc_c[i]);
                }
            }
            let sc: [__m256; NT] = std::array::from_fn(|i| _mm256_mul_ps(dw, xd[i]));
            // Block j of the group on chain j % 2 (a literal index: the chains stay in registers).
            macro_rules! block {
                ($j:expr, $chain:literal) => {{
                    let j: usize = $j;
                    let b = g + j;
                    let x: [__m256i; NT] =
                        std::array::from_fn(|i| _mm256_loadu_si256(xs[i].q.as_ptr().add(b * 32) as *const __m256i));
                    let start: [__m256i; NT] = std::array::from_fn(|i| {
                        let v = if signed || l.sixteen() { 0 } else { -l.offset * xs[i].s[b] };
                        _mm256_zextsi128_si256(_mm_cvtsi32_si128(v))
                    });
                    // Q6_K: the pairs' 32·(q + q'), taken from each pair of products (at most
                    // 2·63·127 before, 2·32·127 after: no i16 overflow) before the scales weigh them.
                    let x32: [__m256i; NT] = std::array::from_fn(|i| {
                        if l.sixteen() {
                            _mm256_maddubs_epi16(_mm256_set1_epi8(32), x[i])
                        } else {
                            _mm256_setzero_si256()
                        }
                    });
                    let lane = _mm256_set1_epi32(j as i32);
                    let u = src.values(b);
                    // The i16 weights of the pairs: the 16 elements' scale (Q6_K), or 1.
                    let w16 = if l.sixteen() { src.sixteen(b) } else { ones };
                    for i in 0..NT {
                        let p = if signed {
                            let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
                            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x[i], w))
                        } else if l.sixteen() {
                            _mm256_sub_epi16(_mm256_maddubs_epi16(u, x[i]), x32[i])
                        } else {
                            _mm256_maddubs_epi16(u, x[i])
                        };
                        let s = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(p, w16), start[i]));
                        acc[$chain][i] = _mm256_fmadd_ps(s, _mm256_permutevar8x32_ps(sc[i], lane), acc[$chain][i]);
                    }
                }};
            }
            for j in (0..gn).step_by(2) {
                block!(j, 0);
                if j + 1 < gn {
                    block!(j + 1, 1);
                }
            }
        }
        std::array::from_fn(|i| {
            let v = hsum(_mm256_add_ps(acc[0][i], acc[1][i]));
            if l.min {
                v + hsum(acc_c[i])
            } else {
                v
            }
        })
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    super::tokens_fn!("avx2,fma,f16c");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{dequantize, random_blocks};

    /// Every type with 8-bit kernels.
    const TYPES: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// `nb` as a count of 32-element blocks of `ty`, rounded up to whole super-blocks (8 blocks)
    /// for the K-quants.
    fn blocks_of(ty: GgmlType, nb: usize) -> usize {
        let per = layout(ty).unwrap().blocks;
        nb.div_ceil(per) * per
    }

    fn nmse(got: &[f32], want: &[f32]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        num / den
    }

    /// The portable kernel against an f64 product of the dequantized weights and the dequantized
    /// activations `d·q` (the same numbers; only f32 rounding differs), and against the f32
    /// activations (the activations' rounding: NMSE under 1e-3); every SIMD level's kernels,
    /// decode-sized (1 and 3 tokens, rows as stored) and prompt-sized (6, rows unpacked), against
    /// the portable one (the same integer sums: within 1e-6 of Σ|products|). On 4 rows and block
    /// counts that leave an odd block at the end and partial groups.
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
        for ty in TYPES {
            // Activations of mean 0 and of mean 0.5 (where a fixed offset subtracted in f32 would
            // cancel a large term and show). The K-quants: 8, 24, 32 and 40 blocks.
            for (nb, mean) in [(1, 0.0), (3, 0.5), (17, 0.0), (27, 0.5), (34, 0.5)] {
                let nb = blocks_of(ty, nb);
                let k = nb * 32;
                let n = 4;
                let data = random_blocks(ty, n * nb / layout(ty).unwrap().blocks, 5 + nb as u64);
                let row_bytes = data.len() / n;
                let wide = dequantize(ty, &data, n * k).unwrap();
                // 6 tokens: each level runs 1 and 3 of them as decode does (rows as stored) and
                // all 6 as prompts do (rows unpacked).
                let t = 6;
                let x: Vec<f32> =
                    (0..t * k).map(|i| ((i * 7919) % 23) as f32 * 0.1 - 1.1 + mean + (i / k) as f32 * 0.03).collect();
                let xq = Q8Rows::quantize(&x, t, k);
                let xhat: Vec<f64> = (0..t * k).map(|j| xq.q[j] as f64 * xq.d[j / 32] as f64).collect();
                let dot = |ti: usize, r: usize, x: &dyn Fn(usize) -> f64| {
                    (0..k).map(|j| x(ti * k + j) * wide[r * k + j] as f64).sum::<f64>()
                };
                let run = |t: usize, simd: Simd| {
                    let mut out = vec![f32::NAN; t * n];
                    let xq = Q8Rows::quantize(&x[..t * k], t, k);
                    assert!(block(ty, &xq, t, &data, row_bytes, simd, |ti, r, v| out[ti * n + r] = v));
                    out
                };
                let plain = run(t, Simd::Portable);
                // Σ|products|: f32 sums in any order are within a few ulps of it per term.
                let scale: Vec<f64> = (0..t * n)
                    .map(|i| (0..k).map(|j| (xhat[i / n * k + j] * wide[i % n * k + j] as f64).abs()).sum())
                    .collect();
                for (i, &p) in plain.iter().enumerate() {
                    let want = dot(i / n, i % n, &|j| xhat[j]);
                    assert!((p as f64 - want).abs() <= 1e-6 * scale[i], "{ty} nb={nb} output {i}: {p} vs {want}");
                }
                let exact: Vec<f32> = (0..t * n).map(|i| dot(i / n, i % n, &|j| x[j] as f64) as f32).collect();
                let e = nmse(&plain, &exact);
                assert!(e < 1e-3, "{ty} nb={nb}: 8-bit activations NMSE {e:e} against f32");
                for simd in Simd::available() {
                    for tt in [1, 3, 6] {
                        for (i, (g, p)) in run(tt, simd).iter().zip(&plain).enumerate() {
                            let err = (g - p).abs() as f64;
                            assert!(
                                err <= 1e-6 * scale[i],
                                "{ty} nb={nb} {simd:?} t={tt}: output {i} {g} vs portable {p}"
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
        for ty in TYPES {
            // 27 and 33 blocks: a partial second half of a group of 16 (AVX2's 8-block steps);
            // the K-quants: 8, 24, 32 and 40 (a group of 16 with one super-block).
            for (nb, n) in [(3, 37), (18, 21), (27, 9), (33, 6)] {
                let nb = blocks_of(ty, nb);
                let k = nb * 32;
                let data = random_blocks(ty, n * nb / layout(ty).unwrap().blocks, 11);
                let row_bytes = data.len() / n;
                let w = Rows::Packed { ty, data: &data, row_bytes };
                let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
                for t in [1, 2, 3, 4, 5, 7, 33] {
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
        for ty in TYPES {
            let (nb, n) = (blocks_of(ty, 5), 7);
            let k = nb * 32;
            let data = random_blocks(ty, n * nb / layout(ty).unwrap().blocks, 3);
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
        for ty in TYPES {
            let per = layout(ty).unwrap().blocks;
            for nb in (per..=40).step_by(per) {
                let (k, n) = (nb * 32, 2);
                let data = random_blocks(ty, n * nb / per, nb as u64);
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

    /// The eight scales and minimums of a Q4_K/Q5_K super-block, all at once, equal ggml's
    /// `get_scale_min_k4` one by one, on every byte value in every position.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn k_scales_and_mins_unpack_as_ggml() {
        let mut sb = [0u8; 16];
        for v in 0..=255u8 {
            for at in 0..12 {
                sb[4..].iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8).wrapping_mul(37) ^ 0x5A);
                sb[4 + at] = v;
                // SAFETY: sb holds the 4 + 12 bytes read.
                let (sc, mn) = unsafe { k_scales_mins(sb.as_ptr()) };
                for j in 0..8 {
                    let (s, m) = scale_min_k4(j, &sb[4..]);
                    assert_eq!(((sc >> (8 * j)) as u8, (mn >> (8 * j)) as u8), (s, m), "byte {at} = {v}, j {j}");
                }
            }
        }
    }

    /// K-quant rows must be whole super-blocks: other lengths are not taken by the 8-bit path
    /// (the f32 one decides), and the kernels refuse them instead of reading past the rows.
    #[test]
    fn rows_of_partial_super_blocks_are_refused() {
        assert!(supports(GgmlType::Q4_K, 512) && !supports(GgmlType::Q4_K, 288) && !supports(GgmlType::Q6_K, 32));
        assert!(supports(GgmlType::Q4_0, 32) && !supports(GgmlType::Q4_0, 0) && !supports(GgmlType::F32, 32));
        let xq = Q8Rows::quantize(&[0.5; 288], 1, 288);
        let rows = vec![0u8; 2 * 144];
        for simd in Simd::available() {
            let run = || block(GgmlType::Q4_K, &xq, 1, &rows, 144, simd, |_, _, _| {});
            assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err(), "{simd:?}");
        }
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
