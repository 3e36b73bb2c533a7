//! CPU matmul `out[t, n] = x[t, :] · w[n, :] + b[n]`, W in PyTorch `[out, in]` layout.
//! Parallel over blocks of W rows: each block of W is read from memory once and reused for
//! every token while it sits in cache, which is what decode (t = 1) is bound by.

use rayon::prelude::*;

/// Dot product with eight independent accumulators (vectorises; AVX2+FMA when available).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_plain(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_plain(a, b)
}

#[inline(always)]
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = acc[i] + acc[i + 8];
    }
    (t[0] + t[4]) + (t[1] + t[5]) + (t[2] + t[6]) + (t[3] + t[7]) + s
}

struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub fn matmul(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    t: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
) {
    assert!(x.len() >= t * k && w.len() >= n * k && out.len() >= t * n);
    const ROWS: usize = 16;
    let o = OutPtr(out.as_mut_ptr());
    let o = &o;
    w[..n * k]
        .par_chunks(ROWS * k)
        .enumerate()
        .for_each(|(blk, wb)| {
            let n0 = blk * ROWS;
            for ti in 0..t {
                let xr = &x[ti * k..(ti + 1) * k];
                for (r, wr) in wb.chunks_exact(k).enumerate() {
                    let mut v = dot(xr, wr);
                    if let Some(b) = bias {
                        v += b[n0 + r];
                    }
                    // SAFETY: column n0 + r belongs to this block only; rows ti < t, so the index is in bounds.
                    unsafe { *o.0.add(ti * n + n0 + r) = v };
                }
            }
        });
}
