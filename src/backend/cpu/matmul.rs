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

/// Dot products of 4 x rows with 3 w rows at once: each loaded chunk is used three or four
/// times, so prefill is bound by arithmetic rather than by loads. 12 accumulators + 3 x + 1 w
/// = 16 AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4x3_avx2(x: [&[f32]; 4], w: [&[f32]; 3]) -> [[f32; 3]; 4] {
    use std::arch::x86_64::*;
    let k = x[0].len();
    let chunks = k / 8;
    let mut acc = [[_mm256_setzero_ps(); 3]; 4];
    for c in 0..chunks {
        let o = c * 8;
        let wv = [
            _mm256_loadu_ps(w[0].as_ptr().add(o)),
            _mm256_loadu_ps(w[1].as_ptr().add(o)),
            _mm256_loadu_ps(w[2].as_ptr().add(o)),
        ];
        for i in 0..4 {
            let xv = _mm256_loadu_ps(x[i].as_ptr().add(o));
            for j in 0..3 {
                acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        }
    }
    let mut out = [[0f32; 3]; 4];
    for i in 0..4 {
        for j in 0..3 {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][j]);
            let mut s =
                ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            for l in chunks * 8..k {
                s = x[i][l].mul_add(w[j][l], s);
            }
            out[i][j] = s;
        }
    }
    out
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub fn matmul(x: &[f32], w: &[f32], bias: Option<&[f32]>, t: usize, n: usize, k: usize, out: &mut [f32]) {
    assert!(x.len() >= t * k && w.len() >= n * k && out.len() >= t * n);
    const ROWS: usize = 12;
    let avx2 = has_avx2();
    let o = OutPtr(out.as_mut_ptr());
    let o = &o;
    w[..n * k].par_chunks(ROWS * k).enumerate().for_each(|(blk, wb)| {
        let n0 = blk * ROWS;
        let rows = wb.len() / k;
        let put = |ti: usize, r: usize, mut v: f32| {
            if let Some(b) = bias {
                v += b[n0 + r];
            }
            // SAFETY: column n0 + r belongs to this block only, and ti < t, so the index is in bounds.
            unsafe { *o.0.add(ti * n + n0 + r) = v };
        };
        let xr = |ti: usize| &x[ti * k..(ti + 1) * k];
        let wr = |r: usize| &wb[r * k..(r + 1) * k];
        let mut ti = 0;
        // 4 tokens × 3 rows tiles (AVX2), then the leftovers one dot at a time.
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            while ti + 4 <= t {
                let mut r = 0;
                while r + 3 <= rows {
                    // SAFETY: AVX2 and FMA were detected; all rows have length k.
                    let v = unsafe {
                        dot4x3_avx2([xr(ti), xr(ti + 1), xr(ti + 2), xr(ti + 3)], [wr(r), wr(r + 1), wr(r + 2)])
                    };
                    for (i, vi) in v.iter().enumerate() {
                        for (j, &vij) in vi.iter().enumerate() {
                            put(ti + i, r + j, vij);
                        }
                    }
                    r += 3;
                }
                for r in r..rows {
                    for i in 0..4 {
                        put(ti + i, r, dot(xr(ti + i), wr(r)));
                    }
                }
                ti += 4;
            }
        }
        for ti in ti..t {
            for r in 0..rows {
                put(ti, r, dot(xr(ti), wr(r)));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile/leftover path against a plain f64 reference, on awkward sizes.
    #[test]
    fn matmul_matches_reference() {
        for (t, n, k) in [(1, 1, 1), (7, 33, 19), (5, 17, 64), (9, 40, 37), (4, 4, 8)] {
            let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 17) as f32 * 0.05 - 0.4).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let mut out = vec![f32::NAN; t * n];
            matmul(&x, &w, Some(&b), t, n, k, &mut out);
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
            }
        }
    }
}
