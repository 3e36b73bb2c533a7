//! Op-by-op parity of a backend against the CPU reference (in the manner of ggml's
//! test-backend-ops): random and awkward shapes, NMSE and max error, NaN/Inf and
//! unwritten-output detection (outputs are poisoned with NaN first). The fused residual op is
//! also checked against an unfused composition written here with plain loops.

use super::cpu::{CpuBackend, CpuVectors};
use super::*;
use crate::engine::sampler::Rng;
use crate::error::Result;
use crate::model::tensor::HostTensor;

/// One line of the parity table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckRow {
    pub op: String,
    pub case: String,
    pub nmse: f64,
    pub max_err: f64,
    pub pass: bool,
    pub note: String,
}

/// Uniform values in `[-scale, scale)` with all 24 bits of an f32 significand: activations,
/// vectors and norms, so a GPU path that rounds f32 inputs (a GEMM staging x in 16-bit halves)
/// shows.
fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.next_f64() * 2.0 - 1.0) as f32 * scale).collect()
}

/// As [`rand`], rounded to bf16: matrices, which GPU backends store as bf16, so every backend
/// multiplies by the same weights.
fn rand_bf16(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    rand(n, seed, scale).into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
}

/// NMSE, max abs error, and a reason to fail (NaN/Inf, unwritten, tolerance).
fn compare(got: &[f32], want: &[f32], tol_nmse: f64) -> (f64, f64, Option<String>) {
    if got.len() != want.len() {
        return (f64::NAN, f64::NAN, Some(format!("length {} vs {}", got.len(), want.len())));
    }
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() {
            let why = if g.is_nan() && w.is_finite() { "NaN (unwritten or computed)" } else { "Inf" };
            return (f64::NAN, f64::NAN, Some(format!("{why} at element {i}")));
        }
        let d = (g - w) as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
        max = max.max(d.abs());
    }
    let nmse = if den > 0.0 { num / den } else { num };
    let fail = (nmse > tol_nmse).then(|| format!("NMSE {nmse:.2e} > {tol_nmse:.0e}"));
    (nmse, max, fail)
}

struct Table(Vec<CheckRow>);

impl Table {
    fn push(&mut self, op: &str, case: String, got: &[f32], want: &[f32], tol: f64) {
        let (nmse, max_err, fail) = compare(got, want, tol);
        self.0.push(CheckRow {
            op: op.into(),
            case,
            nmse,
            max_err,
            pass: fail.is_none(),
            note: fail.unwrap_or_default(),
        });
    }
    fn error(&mut self, op: &str, case: String, e: crate::Error) {
        self.0.push(CheckRow {
            op: op.into(),
            case,
            nmse: f64::NAN,
            max_err: f64::NAN,
            pass: false,
            note: e.to_string(),
        });
    }
}

/// Values after the end of every buffer an op is given: an op that writes past its output
/// changes them.
const GUARD: usize = 67;

/// A NaN whose payload no kernel produces (arithmetic NaNs are the canonical 0x7fc00000).
fn guard_value() -> f32 {
    f32::from_bits(0x7fa5_a5a5)
}

/// A buffer holding `data`, then [`GUARD`] guard values.
fn buf<B: Backend>(b: &B, data: &[f32]) -> Result<B::Buf> {
    let mut x = b.alloc(data.len() + GUARD)?;
    let mut all = data.to_vec();
    all.resize(data.len() + GUARD, guard_value());
    b.write(&mut x, &all)?;
    Ok(x)
}

/// An output buffer of `n` NaNs (so unwritten outputs show), then [`GUARD`] guard values.
fn poisoned<B: Backend>(b: &B, n: usize) -> Result<B::Buf> {
    buf(b, &vec![f32::NAN; n])
}

/// The first `n` values of a buffer made by [`buf`] or [`poisoned`]; an error when the op wrote
/// into the guard values after them.
fn output<B: Backend>(b: &B, x: &B::Buf, n: usize) -> Result<Vec<f32>> {
    let mut all = b.read(x, n + GUARD)?;
    if let Some(i) = all[n..].iter().position(|g| g.to_bits() != guard_value().to_bits()) {
        return Err(Error::Invalid(format!(
            "wrote past the end of its {n}-value buffer (guard value {i} after the end is {})",
            all[n + i]
        )));
    }
    all.truncate(n);
    Ok(all)
}

fn weight(shape: Vec<usize>, seed: u64, scale: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::from_f32("w", shape, rand_bf16(n, seed, scale))
}

/// Token counts of the parity cases; `quick` keeps the small ones.
pub fn token_cases(quick: bool) -> Vec<usize> {
    if quick {
        vec![1, 7, 33]
    } else {
        vec![1, 7, 33, 511, 1025]
    }
}

/// A plan over `t` tokens split into 2 sequences, with every op kind, positions, a condition,
/// probes of each sequence (2 columns and 1: ragged projection rows) and a capture; with the
/// vector table it indexes.
pub fn sample_plan(t: usize, h: usize, n_layers: usize, seed: u64) -> (ResidualPlan, CpuVectors) {
    let split = t / 2;
    let mut p = ResidualPlan { hidden: h, n_layers, ..Default::default() };
    p.seq_cols = vec![2, 1];
    for i in 0..t {
        let seq = (i >= split) as u32;
        let last = i + 1 == split || i + 1 == t;
        p.token_seq.push(seq);
        p.token_flags.push(TOKEN_PROMPT * (seq == 0) as u32 | TOKEN_LAST * last as u32);
        p.token_capture.push(if seq == 1 { 0 } else { NONE });
        p.token_proj.push(p.proj_len as u32);
        p.proj_len += p.seq_cols[seq as usize] as usize;
    }
    let nv = 4;
    let raw = rand(nv * h, seed, 1.0);
    let units: Vec<f32> = raw.chunks(h).flat_map(crate::engine::plan::unit).collect();
    let mut vt = CpuVectors::new(nv, h);
    vt.write(0, &raw, &units).expect("sizes match");
    p.n_vectors = nv;
    let op = |seq, kind, vec, positions, coeff, cond_col| OpDesc {
        seq,
        kind,
        vec,
        positions,
        coeff,
        cond_col,
        cond_cmp: 0,
        threshold: 0.0,
    };
    // Layer 1: every kind on both sequences; layer 2: a clamp when a same-layer projection is
    // above 0, and an add when an earlier layer's projection was below 0.1.
    p.ops = vec![
        op(0, OP_ADD, 0, POS_ALL, 1.5, NONE),
        op(1, OP_ADD, 1, POS_LAST, -2.0, NONE),
        op(0, OP_ABLATE, 2, POS_PROMPT, 0.0, NONE),
        op(1, OP_CLAMP, 3, POS_ALL, 0.75, NONE),
        op(0, OP_CLAMP, 0, POS_ALL, 3.0, 1),
        OpDesc { cond_cmp: 1, threshold: 0.1, ..op(1, OP_ADD, 2, POS_ALL, 0.5, 0) },
    ];
    let op_layers = [1, 1, 1, 1, 2, 2];
    p.probes = vec![
        ProbeDesc { seq: 0, vec: 3, col: 0 },
        ProbeDesc { seq: 1, vec: 2, col: 0 },
        ProbeDesc { seq: 0, vec: 0, col: 1 },
    ];
    let probe_layers = [1, 1, 2];
    // Sorted by (layer, sequence), as the engine builds them.
    let mut ops: Vec<(usize, OpDesc)> = op_layers.into_iter().zip(p.ops.drain(..)).collect();
    ops.sort_by_key(|(l, o)| (*l, o.seq));
    let mut probes: Vec<(usize, ProbeDesc)> = probe_layers.into_iter().zip(p.probes.drain(..)).collect();
    probes.sort_by_key(|(l, pr)| (*l, pr.seq));
    p.op_ranges = ResidualPlan::ranges_of(n_layers, 2, ops.iter().map(|(l, o)| (*l, o.seq)));
    p.probe_ranges = ResidualPlan::ranges_of(n_layers, 2, probes.iter().map(|(l, pr)| (*l, pr.seq)));
    p.ops = ops.into_iter().map(|(_, o)| o).collect();
    p.probes = probes.into_iter().map(|(_, pr)| pr).collect();
    p.n_captures = 1;
    p.validate().expect("the sample plan is valid");
    (p, vt)
}

/// `b`'s copy of a host vector table.
fn table<B: Backend>(b: &B, vt: &CpuVectors) -> Result<B::Vectors> {
    let mut d = b.vectors(vt.rows, vt.hidden)?;
    b.write_vectors(&mut d, 0, &vt.raw, &vt.units)?;
    Ok(d)
}

/// The fused op written unfused, with plain loops: add, probes, ops, probes, capture, norm.
#[allow(clippy::too_many_arguments)]
fn unfused_residual(
    p: &ResidualPlan,
    vt: &CpuVectors,
    l: usize,
    h: &mut [f32],
    d: &[f32],
    w: &[f32],
    eps: f32,
    proj: &mut [f32],
    cap: &mut [f32],
    counts: &mut [u32],
) -> Vec<f32> {
    let hs = p.hidden;
    let t = h.len() / hs;
    let dotu = |a: &[f32], u: &[f32]| a.iter().zip(u).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() as f32;
    for (i, v) in h.iter_mut().enumerate() {
        *v += d[i];
    }
    for i in 0..t {
        let row = &mut h[i * hs..(i + 1) * hs];
        let (base, _) = p.proj_row(i);
        let probes = &p.probes[p.layer_range(&p.probe_ranges, l)];
        let mine = || probes.iter().filter(|pr| pr.seq == p.token_seq[i]);
        for pr in mine() {
            proj[base + pr.col as usize] = dotu(row, vt.unit(pr.vec));
        }
        for (k, op) in p.ops_at(l).iter().enumerate() {
            let o = p.layer_range(&p.op_ranges, l).start + k;
            let at = match op.positions {
                POS_PROMPT => p.token_flags[i] & TOKEN_PROMPT != 0,
                POS_LAST => p.token_flags[i] & TOKEN_LAST != 0,
                _ => true,
            };
            if op.seq != p.token_seq[i] || !at {
                continue;
            }
            counts[2 * o] += 1;
            if op.cond_col != NONE {
                let v = proj[base + op.cond_col as usize];
                let pass = if op.cond_cmp == 0 { v > op.threshold } else { v < op.threshold };
                if !pass {
                    continue;
                }
            }
            counts[2 * o + 1] += 1;
            let u = vt.unit(op.vec);
            match op.kind {
                OP_ADD => row.iter_mut().zip(vt.vector(op.vec)).for_each(|(a, &v)| *a += op.coeff * v),
                OP_ABLATE => {
                    let c = dotu(row, u);
                    row.iter_mut().zip(u).for_each(|(a, &v)| *a -= c * v)
                }
                _ => {
                    let c = op.coeff - dotu(row, u);
                    row.iter_mut().zip(u).for_each(|(a, &v)| *a += c * v)
                }
            }
        }
        for pr in mine() {
            proj[base + pr.col as usize] = dotu(row, vt.unit(pr.vec));
        }
        if p.token_capture[i] != NONE {
            let at = (p.token_capture[i] as usize * (p.n_layers + 1) + l) * hs;
            cap[at..at + hs].iter_mut().zip(row.iter()).for_each(|(s, &a)| *s += a);
        }
    }
    let mut x = vec![0f32; h.len()];
    for i in 0..t {
        let row = &h[i * hs..(i + 1) * hs];
        let ss: f64 = row.iter().map(|&a| a as f64 * a as f64).sum();
        let inv = 1.0 / ((ss / hs as f64) as f32 + eps).sqrt();
        for j in 0..hs {
            x[i * hs + j] = row[j] * inv * w[j];
        }
    }
    x
}

/// Run every op of `b` against the CPU reference.
pub fn run_checks<B: Backend>(b: &B, quick: bool) -> Vec<CheckRow> {
    let mut tab = Table(vec![]);
    let cpu = CpuBackend;
    for t in token_cases(quick) {
        for h in [200usize, 576] {
            let case = format!("t={t} h={h}");
            if let Err(e) = check_residual(b, &cpu, t, h, &mut tab, &case) {
                tab.error("residual_steer_norm", case.clone(), e);
            }
            if let Err(e) = check_dense(b, &cpu, t, h, &mut tab, &case) {
                tab.error("dense", case, e);
            }
        }
        for (nh, nkv) in [(4usize, 4usize), (6, 2), (16, 2)] {
            let case = format!("t={t} heads={nh}/{nkv}");
            if let Err(e) = check_attention(b, &cpu, &ragged(t), t + 24, nh, nkv, 64, &mut tab, &case) {
                tab.error("attention", case, e);
            }
        }
    }
    // A decode step of a batch: one new token per sequence, at very different positions (GPU
    // backends take a different kernel for it); and head sizes other than 64.
    let decode =
        |ps: &[u32]| ps.iter().enumerate().map(|(s, &pos)| TokenPos { slot: s as u32, pos }).collect::<Vec<_>>();
    for (toks, cap, nh, nkv, hd) in [
        (decode(&[4, 40, 0, 63]), 64, 4usize, 4usize, 64usize),
        (decode(&[4, 40, 0, 63]), 64, 6, 2, 64),
        (decode(&[4, 40, 0, 63]), 64, 16, 2, 64),
        (decode(&[17, 0, 90]), 96, 6, 2, 96),
        (ragged(33), 57, 8, 2, 128),
    ] {
        let case = format!(
            "{} tokens in {} slots heads={nh}/{nkv} hd={hd}",
            toks.len(),
            toks.iter().map(|t| t.slot).max().unwrap_or(0) + 1
        );
        if let Err(e) = check_attention(b, &cpu, &toks, cap, nh, nkv, hd, &mut tab, &case) {
            tab.error("attention", case, e);
        }
    }
    // A reduction length that is not a multiple of 8 (no 128-bit load path).
    for t in token_cases(quick) {
        let case = format!("t={t} k=203");
        if let Err(e) = check_matmul(b, &cpu, t, 203, 77, &mut tab, &case) {
            tab.error("matmul", case, e);
        }
    }
    tab.0
}

fn check_matmul<B: Backend>(
    b: &B,
    cpu: &CpuBackend,
    t: usize,
    k: usize,
    n: usize,
    tab: &mut Table,
    case: &str,
) -> Result<()> {
    let x = rand(t * k, 31, 1.0);
    let (wt, bt) = (weight(vec![n, k], 32, 0.1), weight(vec![n], 33, 0.5));
    let (xb, mut ob) = (buf(b, &x)?, poisoned(b, t * n)?);
    b.matmul(&xb, &b.upload(&wt)?, Some(&b.upload(&bt)?), t, &mut ob)?;
    let mut oc = vec![0f32; t * n];
    cpu.matmul(&x, &cpu.upload(&wt)?, Some(&cpu.upload(&bt)?), t, &mut oc)?;
    tab.push("matmul", format!("{case} n={n} +bias"), &output(b, &ob, t * n)?, &oc, 1e-9);
    Ok(())
}

fn check_residual<B: Backend>(b: &B, cpu: &CpuBackend, t: usize, h: usize, tab: &mut Table, case: &str) -> Result<()> {
    let n_layers = 3;
    let (h0, d, w) = (rand(t * h, 1, 2.0), rand(t * h, 2, 1.0), rand(h, 3, 1.0));
    let (plan, vt) = sample_plan(t, h, n_layers, 4);
    let vb = table(b, &vt)?;
    let norm = b.upload(&HostTensor::from_f32("n", vec![h], w.clone()))?;
    let cnorm = cpu.upload(&HostTensor::from_f32("n", vec![h], w.clone()))?;
    for l in [None, Some(1usize), Some(2)] {
        let (mut hb, db, mut xb) = (buf(b, &h0)?, buf(b, &d)?, poisoned(b, t * h)?);
        let mut pb = b.plan(&plan)?;
        b.residual_steer_norm(&mut hb, Some(&db), l.map(|l| (&mut pb, &vb, l)), &norm, 1e-5, t, h, &mut xb)?;
        let (mut hc, mut xc) = (h0.clone(), vec![0f32; t * h]);
        let mut pc = cpu.plan(&plan)?;
        cpu.residual_steer_norm(&mut hc, Some(&d), l.map(|l| (&mut pc, &vt, l)), &cnorm, 1e-5, t, h, &mut xc)?;
        let tag = match l {
            None => "plain".to_string(),
            Some(l) => format!("steer@{l}"),
        };
        tab.push("residual_steer_norm", format!("{case} {tag} x"), &output(b, &xb, t * h)?, &xc, 1e-10);
        tab.push("residual_steer_norm", format!("{case} {tag} h"), &output(b, &hb, t * h)?, &hc, 1e-10);
        if let Some(l) = l {
            let (og, oc) = (b.plan_outputs(&pb)?, cpu.plan_outputs(&pc)?);
            let (pg, cg, pw, cw) = (&og.proj, &og.capture, &oc.proj, &oc.capture);
            tab.push("residual_steer_norm", format!("{case} {tag} projections"), pg, pw, 1e-10);
            tab.push("residual_steer_norm", format!("{case} {tag} capture"), cg, cw, 1e-10);
            // The op counts (steering receipts) are integers: exactly equal.
            let f = |c: &[u32]| c.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            tab.push("residual_steer_norm", format!("{case} {tag} op counts"), &f(&og.counts), &f(&oc.counts), 0.0);
            // The fused op against the unfused composition.
            let mut hu = h0.clone();
            let (mut pu, mut cu) = (vec![0f32; plan.proj_len], vec![0f32; cw.len()]);
            let mut nu = vec![0u32; 2 * plan.ops.len()];
            let xu = unfused_residual(&plan, &vt, l, &mut hu, &d, &w, 1e-5, &mut pu, &mut cu, &mut nu);
            tab.push("fused_vs_unfused", format!("{case} {tag} x"), &output(b, &xb, t * h)?, &xu, 1e-10);
            tab.push("fused_vs_unfused", format!("{case} {tag} projections"), pg, &pu, 1e-10);
            tab.push("fused_vs_unfused", format!("{case} {tag} op counts"), &f(&og.counts), &f(&nu), 0.0);
        }
    }
    Ok(())
}

fn check_dense<B: Backend>(b: &B, cpu: &CpuBackend, t: usize, h: usize, tab: &mut Table, case: &str) -> Result<()> {
    let n = h + 56;
    let x = rand(t * h, 11, 1.0);
    for bias in [false, true] {
        let wt = weight(vec![n, h], 12, 0.1);
        let bt = weight(vec![n], 13, 0.5);
        let (wb, bb) = (b.upload(&wt)?, b.upload(&bt)?);
        let (wc, bc) = (cpu.upload(&wt)?, cpu.upload(&bt)?);
        let (xb, mut ob) = (buf(b, &x)?, poisoned(b, t * n)?);
        b.matmul(&xb, &wb, bias.then_some(&bb), t, &mut ob)?;
        let mut oc = vec![0f32; t * n];
        cpu.matmul(&x, &wc, bias.then_some(&bc), t, &mut oc)?;
        tab.push(
            "matmul",
            format!("{case} n={n}{}", if bias { " +bias" } else { "" }),
            &output(b, &ob, t * n)?,
            &oc,
            1e-9,
        );
    }
    // Embedding gather and row gather.
    let vocab = 301;
    let table = weight(vec![vocab, h], 14, 1.0);
    let ids: Vec<u32> = (0..t).map(|i| ((i * 37 + 5) % vocab) as u32).collect();
    let mut eb = poisoned(b, t * h)?;
    b.embed(&b.upload(&table)?, &ids, h, &mut eb)?;
    let mut ec = vec![0f32; t * h];
    cpu.embed(&cpu.upload(&table)?, &ids, h, &mut ec)?;
    tab.push("embed", case.to_string(), &output(b, &eb, t * h)?, &ec, 0.0);
    let rows: Vec<u32> = (0..t as u32).rev().step_by(2).collect();
    let (xb, mut gb) = (buf(b, &x)?, poisoned(b, rows.len() * h)?);
    b.gather_rows(&xb, &rows, h, &mut gb)?;
    let mut gc = vec![0f32; rows.len() * h];
    cpu.gather_rows(&x, &rows, h, &mut gc)?;
    tab.push("gather_rows", case.to_string(), &output(b, &gb, rows.len() * h)?, &gc, 0.0);
    // SiLU · up.
    let (g, u) = (rand(t * h, 15, 4.0), rand(t * h, 16, 2.0));
    let (gb_, ub, mut sb) = (buf(b, &g)?, buf(b, &u)?, poisoned(b, t * h)?);
    b.silu_mul(&gb_, &ub, t * h, &mut sb)?;
    let mut sc = vec![0f32; t * h];
    cpu.silu_mul(&g, &u, t * h, &mut sc)?;
    tab.push("silu_mul", case.to_string(), &output(b, &sb, t * h)?, &sc, 1e-12);
    Ok(())
}

/// A tensor stored as `dtype` bytes, memory-mapped like the model loaders' tensors.
fn stored(shape: Vec<usize>, vals: &[f32], dtype: crate::model::tensor::DType) -> Result<HostTensor> {
    use crate::model::tensor::{DType, Storage};
    let bytes: Vec<u8> = match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    };
    let anon = |e| crate::Error::io("anonymous memory map", e);
    let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(anon)?;
    m[..bytes.len()].copy_from_slice(&bytes);
    let map = std::sync::Arc::new(m.make_read_only().map_err(anon)?);
    Ok(HostTensor { name: "w".into(), shape, storage: Storage::Mapped { map, offset: 0, len: bytes.len(), dtype } })
}

/// matmul (with bias, odd and even k) and embed with weights stored as f16 and bf16, for GPU
/// backends that keep 16-bit weights as stored. The CPU widens the same stored values exactly,
/// so the f32 tolerances hold. Rows are labelled `matmul[f16]`, `embed[bf16]`, ...
pub fn run_weight_format_checks<B: Backend>(b: &B, quick: bool) -> Vec<CheckRow> {
    use crate::model::tensor::DType;
    let mut tab = Table(vec![]);
    let cpu = CpuBackend;
    for (dtype, tag) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
        for t in token_cases(quick) {
            for k in [200usize, 201] {
                let case = format!("t={t} k={k}");
                let n = k + 56;
                let run = |tab: &mut Table| -> Result<()> {
                    let w = stored(vec![n, k], &rand(n * k, 31, 0.1), dtype)?;
                    let bias = stored(vec![n], &rand(n, 32, 0.5), dtype)?;
                    let x = rand(t * k, 33, 1.0);
                    let (wb, bb) = (b.upload(&w)?, b.upload(&bias)?);
                    let (xb, mut ob) = (buf(b, &x)?, poisoned(b, t * n)?);
                    b.matmul(&xb, &wb, Some(&bb), t, &mut ob)?;
                    let mut oc = vec![0f32; t * n];
                    cpu.matmul(&x, &cpu.upload(&w)?, Some(&cpu.upload(&bias)?), t, &mut oc)?;
                    tab.push(
                        &format!("matmul[{tag}]"),
                        format!("{case} n={n} +bias"),
                        &output(b, &ob, t * n)?,
                        &oc,
                        1e-9,
                    );
                    let ids: Vec<u32> = (0..t).map(|i| ((i * 37 + 5) % n) as u32).collect();
                    let mut eb = poisoned(b, t * k)?;
                    b.embed(&wb, &ids, k, &mut eb)?;
                    let mut ec = vec![0f32; t * k];
                    cpu.embed(&cpu.upload(&w)?, &ids, k, &mut ec)?;
                    tab.push(&format!("embed[{tag}]"), case.clone(), &output(b, &eb, t * k)?, &ec, 0.0);
                    Ok(())
                };
                if let Err(e) = run(&mut tab) {
                    tab.error(&format!("matmul[{tag}]"), case, e);
                }
            }
        }
    }
    tab.0
}

/// A row length for kernel tests of `ty` that is not a multiple of the SIMD width where the format
/// allows: 201 for f16/bf16 (one element per block), 96 for 32-element blocks (3 blocks, not a
/// multiple of 256), 512 for the K-quants (2 super-blocks).
pub fn kernel_case_k(ty: crate::model::gguf::GgmlType) -> usize {
    match ty.block_layout().map_or(1, |b| b.0) {
        1 => 201,
        32 => 96,
        _ => 512,
    }
}

/// The CPU's packed-weight kernels against the widened-f32 reference: for every readable ggml
/// type (and f16/bf16 rows), matmul at t = 1, 7, 33, 129 (decode-sized and prefill-sized row
/// blocks) with k not a multiple of the SIMD width where the format allows (f16/bf16: 201;
/// 32-element blocks: 96; K-quants: 512), at every SIMD level this CPU has, and the embedding
/// rows. The reference is the same matmul on the dequantized f32 values at the portable level;
/// the kernels are exact by construction, so any NMSE above 0 fails. Rows are labelled
/// `matmul[Q4_K/avx2]`, `embed[Q6_K/portable]`, ... The opt-in 8-bit activations
/// (`matmul-q8act[Q4_1/avx512]`, for the types that have them) differ by the activations'
/// rounding and pass under NMSE 1e-3.
pub fn run_cpu_kernel_checks(quick: bool) -> Vec<CheckRow> {
    use super::cpu::simd::Simd;
    use super::cpu::{matmul_act, matmul_with, Activations, Rows};
    use crate::model::gguf::{decode_into, dequantize, random_blocks, GgmlType};
    let mut tab = Table(vec![]);
    let tokens: &[usize] = if quick { &[1, 33] } else { &[1, 7, 33, 129] };
    for ty in GgmlType::READABLE {
        if ty == GgmlType::F32 {
            continue;
        }
        let block = ty.block_layout().map_or(1, |b| b.0 as usize);
        let k = kernel_case_k(ty);
        let n = 37;
        let data = random_blocks(ty, n * k / block, 41);
        let row_bytes = data.len() / n;
        let wide = match dequantize(ty, &data, n * k) {
            Ok(w) => w,
            Err(e) => {
                tab.error(&format!("matmul[{ty}]"), format!("k={k}"), e);
                continue;
            }
        };
        let bias = rand(n, 42, 0.5);
        let w = Rows::Packed { ty, data: &data, row_bytes };
        // Each token count's activations and reference outputs, shared by every level and mode.
        let cases: Vec<(usize, Vec<f32>, Vec<f32>)> = tokens
            .iter()
            .map(|&t| {
                let x = rand(t * k, 43 + t as u64, 1.0);
                let mut want = vec![0f32; t * n];
                matmul_with(Simd::Portable, &x, Rows::F32(&wide), Some(&bias), t, n, k, &mut want);
                (t, x, want)
            })
            .collect();
        for simd in Simd::available() {
            let tag = format!("{ty}/{}", simd.name());
            for (t, x, want) in &cases {
                let mut got = vec![f32::NAN; t * n];
                matmul_with(simd, x, w, Some(&bias), *t, n, k, &mut got);
                tab.push(&format!("matmul[{tag}]"), format!("t={t} k={k} n={n} +bias"), &got, want, 0.0);
            }
            if super::cpu::q8::supports(ty, k) {
                // The opt-in 8-bit activations: the activations' rounding only (NMSE ~1e-5).
                for (t, x, want) in &cases {
                    let mut got = vec![f32::NAN; t * n];
                    matmul_act(simd, Activations::Q8, x, w, Some(&bias), *t, n, k, &mut got);
                    tab.push(&format!("matmul-q8act[{tag}]"), format!("t={t} k={k} n={n} +bias"), &got, want, 1e-3);
                }
            }
            let ids: Vec<usize> = (0..n).step_by(5).collect();
            let mut got = vec![f32::NAN; ids.len() * k];
            for (i, &r) in ids.iter().enumerate() {
                decode_into(
                    ty,
                    &data[r * row_bytes..(r + 1) * row_bytes],
                    &mut got[i * k..(i + 1) * k],
                    simd >= Simd::Avx2,
                );
            }
            let want: Vec<f32> = ids.iter().flat_map(|&r| wide[r * k..(r + 1) * k].iter().copied()).collect();
            tab.push(&format!("embed[{tag}]"), format!("{} rows k={k}", ids.len()), &got, &want, 0.0);
        }
    }
    tab.0
}

/// A ragged batch: `t` new tokens in 3 sequences whose caches already hold 0, 5 and 17 tokens.
fn ragged(t: usize) -> Vec<TokenPos> {
    let starts = [0u32, 5, 17];
    let split = [t / 3, t / 3 + t / 3];
    (0..t)
        .map(|i| {
            let s = if i < split[0] {
                0
            } else if i < split[1] {
                1
            } else {
                2
            };
            let first = [0, split[0], split[1]][s];
            TokenPos { slot: s as u32, pos: starts[s] + (i - first) as u32 }
        })
        .collect()
}

/// Attention (and RoPE on q) for the tokens `toks` over a paged cache of `capacity` positions per
/// slot whose earlier positions hold random keys and values. Pages of 16 positions are
/// interleaved between slots (page j of slot s is page j · slots + s), so every read and write
/// goes through the page table.
#[allow(clippy::too_many_arguments)]
fn check_attention<B: Backend>(
    b: &B,
    cpu: &CpuBackend,
    toks: &[TokenPos],
    capacity: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    tab: &mut Table,
    case: &str,
) -> Result<()> {
    let t = toks.len();
    let slots = toks.iter().map(|tp| tp.slot as usize + 1).max().unwrap_or(1).max(3);
    let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
    let page_size = 16;
    let width = capacity.div_ceil(page_size);
    let pages = PageTable {
        page_size,
        width,
        table: (0..slots * width).map(|i| ((i % width) * slots + i / width) as u32).collect(),
    };
    let (q, k, v) = (rand(t * nh * hd, 21, 1.0), rand(t * nkv * hd, 22, 1.0), rand(t * nkv * hd, 23, 1.0));
    let cache_len = slots * width * page_size * nkv * hd;
    let (k0, v0) = (rand(cache_len, 24, 1.0), rand(cache_len, 25, 1.0));
    // RoPE on q (llama3-free default table, positions up to capacity + 24).
    let half = hd / 2;
    let mut cs = Vec::new();
    for p in 0..capacity + 24 {
        for i in 0..half {
            let a = p as f64 / 10000f64.powf(2.0 * i as f64 / hd as f64);
            cs.push(a.cos() as f32);
            cs.push(a.sin() as f32);
        }
    }
    // An f32 buffer on every backend (a table, not a weight).
    let (lb, lc) = (b.layout(toks, &pages)?, cpu.layout(toks, &pages)?);
    let mut qb = buf(b, &q)?;
    b.rope(&mut qb, &buf(b, &cs)?, &lb, t, nh, hd)?;
    let mut qc = q.clone();
    cpu.rope(&mut qc, &cs, &lc, t, nh, hd)?;
    tab.push("rope", case.to_string(), &output(b, &qb, t * nh * hd)?, &qc, 1e-12);

    let mut cb = KvLayer::<B> { k: buf(b, &k0)?, v: buf(b, &v0)? };
    let mut cc = KvLayer::<CpuBackend> { k: k0.clone(), v: v0.clone() };
    let (kb, vb, mut ob) = (buf(b, &k)?, buf(b, &v)?, poisoned(b, t * nh * hd)?);
    b.attention(&qb, &kb, &vb, &mut cb, &lb, t, shape, &mut ob)?;
    let mut oc = vec![0f32; t * nh * hd];
    cpu.attention(&qc, &k, &v, &mut cc, &lc, t, shape, &mut oc)?;
    tab.push("attention", case.to_string(), &output(b, &ob, t * nh * hd)?, &oc, 1e-10);
    tab.push("attention", format!("{case} kv-cache"), &b.read(&cb.k, cache_len)?, &cc.k, 0.0);
    Ok(())
}

/// The parity table as text, failures first line by line.
pub fn format_table(backend: &str, rows: &[CheckRow]) -> String {
    let mut s = format!("{:<28} {:<34} {:>10} {:>10}  {}\n", "op", "case", "nmse", "max_err", "result");
    for r in rows {
        s += &format!(
            "{:<28} {:<34} {:>10.2e} {:>10.2e}  {}{}\n",
            r.op,
            r.case,
            r.nmse,
            r.max_err,
            if r.pass { "pass" } else { "FAIL" },
            if r.note.is_empty() { String::new() } else { format!(" ({})", r.note) }
        );
    }
    let fails = rows.iter().filter(|r| !r.pass).count();
    s += &format!("{backend}: {} cases, {} passed, {} failed\n", rows.len(), rows.len() - fails, fails);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_flags_unwritten_inf_and_tolerance() {
        assert!(compare(&[1.0, f32::NAN], &[1.0, 2.0], 1.0).2.unwrap().contains("unwritten"));
        assert!(compare(&[1.0, f32::INFINITY], &[1.0, 2.0], 1.0).2.unwrap().contains("Inf"));
        assert!(compare(&[1.0, 2.1], &[1.0, 2.0], 1e-6).2.unwrap().contains("NMSE"));
        let (nmse, max, fail) = compare(&[1.0, 2.0], &[1.0, 2.0], 0.0);
        assert!(nmse == 0.0 && max == 0.0 && fail.is_none());
    }

    /// An op that writes one value past its output fails the row, naming the overrun.
    #[test]
    fn guard_values_catch_a_write_past_the_end() {
        let b = CpuBackend;
        let mut out = poisoned(&b, 5).unwrap();
        out[..5].copy_from_slice(&[1.0; 5]);
        assert_eq!(output(&b, &out, 5).unwrap(), vec![1.0; 5]);
        out[5] = 0.0;
        let e = output(&b, &out, 5).unwrap_err().to_string();
        assert!(e.contains("wrote past the end of its 5-value buffer (guard value 0"), "{e}");
        // Inputs carry guards too, and real f32 values (not bf16-rounded).
        let x = rand(64, 9, 1.0);
        assert!(x.iter().any(|&v| half::bf16::from_f32(v).to_f32() != v));
        assert_eq!(output(&b, &buf(&b, &x).unwrap(), 64).unwrap(), x);
    }

    /// Hostile plans are errors that name the problem, never a panic or a wrapped size.
    #[test]
    fn validate_refuses_hostile_plans() {
        let (p, _) = sample_plan(5, 8, 3, 1);
        let err = |q: &ResidualPlan| q.validate().unwrap_err().to_string();
        let mut q = p.clone();
        q.n_layers = usize::MAX / 4;
        assert!(err(&q).contains("capture slots"), "{}", err(&q));
        (q.n_captures, q.token_capture) = (0, vec![NONE; 5]);
        assert!(err(&q).contains("op_ranges is not"), "{}", err(&q));
        q.n_layers = usize::MAX;
        assert!(err(&q).contains("overflow"), "{}", err(&q));
        let mut q = p.clone();
        q.token_proj[2] = q.token_proj[1];
        assert!(err(&q).contains("token 2: projection row"), "{}", err(&q));
        let mut q = p.clone();
        q.proj_len += 1;
        assert!(err(&q).contains("proj_len"), "{}", err(&q));
        let mut q = p.clone();
        q.n_captures = usize::MAX;
        assert!(err(&q).contains("capture slots"), "{}", err(&q));
        let mut q = p.clone();
        q.ops[0].cond_col = 7;
        assert!(err(&q).contains("condition column 7"), "{}", err(&q));
        let q = ResidualPlan { hidden: 4, token_seq: vec![0], token_flags: vec![0], ..Default::default() };
        assert!(err(&q).contains("token sequences"), "{}", err(&q));
    }

    /// The unfused composition is an independent check: a wrong fused op must fail it.
    #[test]
    fn unfused_composition_catches_a_wrong_plan_result() {
        let (t, h) = (7, 40);
        let (plan, vt) = sample_plan(t, h, 3, 4);
        let (mut h1, d, w) = (rand(t * h, 1, 2.0), rand(t * h, 2, 1.0), rand(h, 3, 1.0));
        let mut h2 = h1.clone();
        let n = plan.proj_len;
        let (mut p1, mut c1, mut n1) = (vec![0f32; n], vec![0f32; 4 * h], vec![0u32; 2 * plan.ops.len()]);
        let x1 = unfused_residual(&plan, &vt, 1, &mut h1, &d, &w, 1e-5, &mut p1, &mut c1, &mut n1);
        let mut wrong = plan.clone();
        wrong.ops[0].coeff = 1.25;
        let (mut p2, mut c2, mut n2) = (vec![0f32; n], vec![0f32; 4 * h], vec![0u32; 2 * plan.ops.len()]);
        let x2 = unfused_residual(&wrong, &vt, 1, &mut h2, &d, &w, 1e-5, &mut p2, &mut c2, &mut n2);
        assert!(compare(&x2, &x1, 1e-10).2.is_some());
        // Every op at layer 1 counted the tokens it touched; the layer-2 op did not run.
        let l1 = plan.layer_range(&plan.op_ranges, 1);
        assert!(l1.clone().all(|o| n1[2 * o] > 0 && n1[2 * o + 1] == n1[2 * o]), "{n1:?}");
        assert!((l1.end..plan.ops.len()).all(|o| n1[2 * o] == 0), "{n1:?}");
    }
}
