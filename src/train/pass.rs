//! One training forward and backward over a batch of ragged sequences. The forward is
//! [`Engine::forward_hooked`] — the inference forward pass itself — with a [`Tape`] hook that adds
//! the LoRA adapter to each target projection and keeps what the backward needs; the backward
//! walks the blocks in reverse (llm.c's `train_gpt2.c` order) and accumulates the LoRA gradients.

use std::collections::HashMap;

use rayon::prelude::*;

use super::backend::{SeqRows, TrainBackend};
use super::data::Example;
use crate::backend::{PageTable, ResidualPlan, TokenPos};
use crate::engine::{Engine, ForwardHook, ForwardOutput, KvCache, Point, SeqInput};
use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, LoraPair, Target};
use crate::model::tensor::HostTensor;
use crate::steer::{Probe, SeqSteering};

/// An adapter's A and B on the backend, with its scale.
pub struct DeviceLora<B: TrainBackend> {
    /// Per layer and target (by [`Target::index`]): (A `[r, in]`, B `[out, r]`, in, out).
    sites: Vec<[Option<(B::Weight, B::Weight, usize, usize)>; 7]>,
    r: usize,
    scale: f32,
}

impl<B: TrainBackend> DeviceLora<B> {
    pub fn upload(b: &B, a: &LoraAdapter) -> Result<Self> {
        let r = a.config.r;
        let mut sites = Vec::with_capacity(a.layers.len());
        for (li, layer) in a.layers.iter().enumerate() {
            let mut row: [Option<(B::Weight, B::Weight, usize, usize)>; 7] = Default::default();
            for (ti, p) in layer.iter().enumerate() {
                if let Some(p) = p {
                    let (din, dout) = (p.a.len() / r, p.b.len() / r);
                    let name = |w: &str| format!("layer {li} target {ti} lora_{w}");
                    let a_w = b.upload(&HostTensor::from_f32(name("A"), vec![r, din], p.a.clone()))?;
                    let b_w = b.upload(&HostTensor::from_f32(name("B"), vec![dout, r], p.b.clone()))?;
                    row[ti] = Some((a_w, b_w, din, dout));
                }
            }
            sites.push(row);
        }
        Ok(DeviceLora { sites, r, scale: a.config.scale() })
    }
}

/// The training forward's hook: adds `scale · (x Aᵀ) Bᵀ` to each target's output and keeps the
/// activations (and `u = x Aᵀ`) the backward reads.
struct Tape<'a, B: TrainBackend> {
    lora: &'a DeviceLora<B>,
    /// Keep activations (a backward follows); without, the hook only adds the adapter.
    keep: bool,
    acts: HashMap<Point, B::Buf>,
    u: HashMap<(usize, Target), B::Buf>,
}

impl<B: TrainBackend> ForwardHook<B> for Tape<'_, B> {
    fn linear(&mut self, b: &B, layer: usize, target: Target, x: &B::Buf, t: usize, out: &mut B::Buf) -> Result<()> {
        let Some((a_w, b_w, _, dout)) = self.lora.sites.get(layer).and_then(|s| s[target.index()].as_ref()) else {
            return Ok(());
        };
        let mut u = b.alloc(t * self.lora.r)?;
        b.matmul(x, a_w, None, t, &mut u)?;
        let mut d = b.alloc(t * dout)?;
        b.matmul(&u, b_w, None, t, &mut d)?;
        b.axpy(out, self.lora.scale, &d, t * dout)?;
        if self.keep {
            self.u.insert((layer, target), u);
        }
        Ok(())
    }

    fn activation(&mut self, b: &B, point: Point, buf: &B::Buf, t: usize, width: usize) -> Result<()> {
        if self.keep {
            self.acts.insert(point, b.copy(buf, t * width)?);
        }
        Ok(())
    }
}

impl<B: TrainBackend> Tape<'_, B> {
    fn get(&self, p: Point) -> Result<&B::Buf> {
        self.acts.get(&p).ok_or_else(|| Error::Invalid(format!("training tape has no {p:?}")))
    }
}

/// [`Engine::forward`] with the adapter added (unmerged, exactly as in training).
pub fn hooked_forward<B: TrainBackend>(
    engine: &Engine<B>,
    lora: &DeviceLora<B>,
    cache: &mut KvCache<B>,
    seqs: &[SeqInput],
) -> Result<ForwardOutput> {
    let mut tape = Tape { lora, keep: false, acts: HashMap::new(), u: HashMap::new() };
    engine.forward_hooked(cache, seqs, false, Some(&mut tape))
}

/// What one pass returns: the summed loss over its target tokens (divide by the batch's target
/// count for the mean), and per monitor the sum of the answer tokens' projections.
#[derive(Debug, Clone, Default)]
pub struct PassOutput {
    pub loss_sum: f64,
    pub targets: usize,
    /// `(probe index, sum over target tokens of h·u before this layer's steering)`.
    pub projection_sums: Vec<f64>,
    /// Tokens in the batch.
    pub tokens: usize,
}

/// Run `examples` forward (each in its own KV slot, no padding) with `lora` and `steering` (the
/// same ops for every sequence), and — with `grads` — backward, accumulating into `grads` the
/// gradient of `Σ loss / norm` (`norm`: the target tokens of the whole optimiser step). Monitors
/// read the residual at their layer before that layer's steering, averaged over target tokens.
pub fn forward_backward<B: TrainBackend>(
    engine: &Engine<B>,
    lora: &DeviceLora<B>,
    examples: &[&Example],
    steering: Option<&SeqSteering>,
    monitors: &[Probe],
    norm: f64,
    grads: Option<&mut LoraAdapter>,
) -> Result<PassOutput> {
    let c = &engine.config;
    let b = &engine.backend;
    if examples.is_empty() {
        return Err(Error::Invalid("a training batch needs at least one example".into()));
    }
    if let Some(st) = steering {
        if let Some(op) = st.plan.ops.iter().find(|o| o.when.is_some()) {
            return Err(Error::Unsupported(format!(
                "steering op at layer {} has a when= condition: conditions are not differentiable and are refused \
                 for training",
                op.layer
            )));
        }
    }
    if let Some(p) = monitors.iter().find(|p| p.layer == 0) {
        return Err(Error::Invalid(format!(
            "monitor `{}` at layer 0: training monitors read layers 1..={} (the residual before steering)",
            p.name, c.n_layers
        )));
    }
    let mut seqs = Vec::with_capacity(examples.len());
    let mut rows = Vec::with_capacity(examples.len());
    let mut t = 0;
    let mut max_len = 0;
    for (i, e) in examples.iter().enumerate() {
        let first = e
            .target
            .iter()
            .position(|&x| x)
            .ok_or_else(|| Error::Invalid(format!("training example (line {}) has no answer tokens", e.line)))?;
        if first == 0 || e.target.len() != e.ids.len() {
            return Err(Error::Invalid(format!("training example (line {}) has malformed targets", e.line)));
        }
        seqs.push(SeqInput {
            slot: i,
            tokens: &e.ids,
            logits_from: Some(first - 1),
            prompt: true,
            answer_from: Some(first),
            steering: steering.filter(|s| !s.is_empty()),
            ..Default::default()
        });
        rows.push(SeqRows { start: t, len: e.ids.len() });
        t += e.ids.len();
        max_len = max_len.max(e.ids.len());
    }
    let mut cache = engine.new_cache(examples.len(), max_len)?;
    // Without gradients, only the monitors' layers are read from the tape.
    let keep = grads.is_some() || !monitors.is_empty();
    let mut tape = Tape { lora, keep, acts: HashMap::new(), u: HashMap::new() };
    let out = engine.forward_hooked(&mut cache, &seqs, false, Some(&mut tape))?;

    // Cross-entropy on the target rows (row p predicts token p + 1), on the host, rows in parallel.
    // Per loss row: (logits row, batch row, target id, source line, token index).
    let vocab = c.vocab;
    let mut picks = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        let from = seqs[i].logits_from.unwrap_or(0);
        for p in from..e.ids.len() - 1 {
            if e.target[p + 1] {
                picks.push((out.rows[i].start + (p - from), rows[i].start + p, e.ids[p + 1] as usize, e.line, p + 1));
            }
        }
    }
    let mut dlogits = if grads.is_some() { vec![0f32; picks.len() * vocab] } else { vec![] };
    let losses: Vec<f64> = if grads.is_some() {
        dlogits
            .par_chunks_mut(vocab)
            .zip(&picks)
            .map(|(d, pk)| cross_entropy(out.row(pk.0), pk.2, norm, Some(d)))
            .collect()
    } else {
        picks.par_iter().map(|pk| cross_entropy(out.row(pk.0), pk.2, norm, None)).collect()
    };
    if let Some((_, pk)) = losses.iter().zip(&picks).find(|(l, _)| !l.is_finite()) {
        return Err(Error::Invalid(format!(
            "the loss is not finite (line {}, token {}): the model or adapter produced non-finite logits",
            pk.3, pk.4
        )));
    }
    let loss_sum: f64 = losses.iter().sum();
    let targets = picks.len();
    let loss_rows: Vec<usize> = picks.iter().map(|pk| pk.1).collect();
    let mut projection_sums = vec![0f64; monitors.len()];
    if !monitors.is_empty() {
        let h = c.hidden;
        let mut cache_rows: HashMap<usize, (Vec<f32>, Vec<f32>)> = HashMap::new();
        for (k, pr) in monitors.iter().enumerate() {
            if !cache_rows.contains_key(&pr.layer) {
                let mid = b.read(tape.get(Point::Mid(pr.layer - 1))?, t * h)?;
                let o = b.read(tape.get(Point::MlpOut(pr.layer - 1))?, t * h)?;
                cache_rows.insert(pr.layer, (mid, o));
            }
            let (mid, o) = &cache_rows[&pr.layer];
            let unit = unit(&pr.vector);
            for (i, e) in examples.iter().enumerate() {
                for p in 0..e.ids.len() {
                    if e.target[p] {
                        let r = (rows[i].start + p) * h;
                        projection_sums[k] += (0..h).map(|j| (mid[r + j] + o[r + j]) as f64 * unit[j]).sum::<f64>();
                    }
                }
            }
        }
    }
    let result = PassOutput { loss_sum, targets, projection_sums, tokens: t };
    let Some(grads) = grads else {
        return Ok(result);
    };

    // The forward's plan again, on the rows the cache's vector table already holds.
    let built = cache.plan(b, &seqs, c.hidden, c.n_layers)?;
    let plan = match (&built, cache.vector_table()) {
        (Some(bp), Some(vt)) => Some((&bp.plan, vt)),
        (Some(_), None) => return Err(Error::Invalid("a residual plan without its vector table".into())),
        (None, _) => None,
    };
    backward(engine, lora, &tape, &seqs, &rows, t, plan, &dlogits, &loss_rows, grads)?;
    Ok(result)
}

/// `−log softmax(z)[y]`; with `d`, also `∂(loss / norm)/∂z = (softmax(z) − onehot(y)) / norm`.
/// Exponentials in f32 (written once into `d`), their sum in f64.
fn cross_entropy(z: &[f32], y: usize, norm: f64, d: Option<&mut [f32]>) -> f64 {
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = match d {
        Some(d) => {
            let mut sum = 0f64;
            for (o, &v) in d.iter_mut().zip(z) {
                *o = (v - m).exp();
                sum += *o as f64;
            }
            let scale = (1.0 / (sum * norm)) as f32;
            d.iter_mut().for_each(|o| *o *= scale);
            d[y] -= (1.0 / norm) as f32;
            sum
        }
        None => z.iter().map(|&v| (v - m).exp() as f64).sum(),
    };
    m as f64 + sum.ln() - z[y] as f64
}

fn unit(v: &[f32]) -> Vec<f64> {
    let n = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt().max(1e-30);
    v.iter().map(|&x| x as f64 / n).collect()
}

/// The backward of a LoRA site `out += s·(x Aᵀ) Bᵀ` given `dy = ∂L/∂out`: dB += s·dyᵀu,
/// dA += s·(dy B)ᵀx, and (with `dx`) dx += s·(dy B) A.
#[allow(clippy::too_many_arguments)]
fn lora_backward<B: TrainBackend>(
    b: &B,
    lora: &DeviceLora<B>,
    tape: &Tape<B>,
    li: usize,
    target: Target,
    x: &B::Buf,
    dy: &B::Buf,
    t: usize,
    grads: &mut LoraAdapter,
    dx: Option<&mut B::Buf>,
) -> Result<()> {
    let Some((a_w, b_w, din, dout)) = lora.sites[li][target.index()].as_ref() else {
        return Ok(());
    };
    let (r, s) = (lora.r, lora.scale);
    let u = tape.u.get(&(li, target)).ok_or_else(|| Error::Invalid(format!("training tape has no u for {li}")))?;
    let g: &mut LoraPair = grads.layers[li][target.index()]
        .as_mut()
        .ok_or_else(|| Error::Invalid(format!("gradient buffer has no {target:?} at layer {li}")))?;
    b.matmul_backward_w(dy, u, s, t, *dout, r, &mut g.b)?;
    let mut du = b.alloc(t * r)?;
    b.matmul_backward_x(dy, b_w, t, &mut du, false)?;
    b.matmul_backward_w(&du, x, s, t, r, *din, &mut g.a)?;
    if let Some(dx) = dx {
        let mut tmp = b.alloc(t * din)?;
        b.matmul_backward_x(&du, a_w, t, &mut tmp, false)?;
        b.axpy(dx, s, &tmp, t * din)?;
    }
    Ok(())
}

/// Frozen projection plus its LoRA: `dx (+)= dy·W + lora`, gradients into `grads`.
#[allow(clippy::too_many_arguments)]
fn linear_backward<B: TrainBackend>(
    engine: &Engine<B>,
    lora: &DeviceLora<B>,
    tape: &Tape<B>,
    li: usize,
    target: Target,
    x: &B::Buf,
    dy: &B::Buf,
    t: usize,
    grads: &mut LoraAdapter,
    dx: Option<(&mut B::Buf, bool)>,
) -> Result<()> {
    let b = &engine.backend;
    let dx = match dx {
        Some((dx, accumulate)) => {
            b.matmul_backward_x(dy, engine.layers()[li].projection(target), t, dx, accumulate)?;
            Some(dx)
        }
        None => None,
    };
    lora_backward(b, lora, tape, li, target, x, dy, t, grads, dx)
}

#[allow(clippy::too_many_arguments)]
fn backward<B: TrainBackend>(
    engine: &Engine<B>,
    lora: &DeviceLora<B>,
    tape: &Tape<B>,
    seqs: &[SeqInput],
    rows: &[SeqRows],
    t: usize,
    plan: Option<(&ResidualPlan, &B::Vectors)>,
    dlogits: &[f32],
    loss_rows: &[usize],
    grads: &mut LoraAdapter,
) -> Result<()> {
    let c = &engine.config;
    let b = &engine.backend;
    let (h, f) = (c.hidden, c.intermediate);
    let shape = engine.attn_shape();
    let (nh, nkv, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let (qw, kvw) = (nh * hd, nkv * hd);

    // lm_head: dX of the final normed rows, scattered into [t, h].
    let n_loss = loss_rows.len();
    let mut dx_final = vec![0f32; t * h];
    if n_loss > 0 {
        let mut dz = b.alloc(n_loss * c.vocab)?;
        b.write(&mut dz, dlogits)?;
        let mut dxs = b.alloc(n_loss * h)?;
        b.matmul_backward_x(&dz, engine.output_weight(), n_loss, &mut dxs, false)?;
        let dxs = b.read(&dxs, n_loss * h)?;
        for (i, &r) in loss_rows.iter().enumerate() {
            dx_final[r * h..(r + 1) * h].copy_from_slice(&dxs[i * h..(i + 1) * h]);
        }
    }
    let mut dy = b.alloc(t * h)?;
    b.write(&mut dy, &dx_final)?;
    let mut dh = b.alloc(t * h)?;
    b.rmsnorm_backward(tape.get(Point::Residual(c.n_layers))?, engine.final_norm(), c.rms_eps, &dy, t, h, &mut dh)?;

    // RoPE backward: rotate by −position (the forward's table with the sines negated).
    let table = {
        let rt = engine.rope_table();
        let n = engine.max_context * hd;
        let mut v = b.read(rt, n)?;
        for s in v.iter_mut().skip(1).step_by(2) {
            *s = -*s;
        }
        let mut buf = b.alloc(n)?;
        b.write(&mut buf, &v)?;
        buf
    };
    let max_len = rows.iter().map(|r| r.len).max().unwrap_or(1);
    let width = max_len.div_ceil(16).max(1);
    let tokens: Vec<TokenPos> = seqs
        .iter()
        .zip(rows)
        .flat_map(|(s, r)| (0..r.len).map(move |p| TokenPos { slot: s.slot as u32, pos: p as u32 }))
        .collect();
    let layout = b.layout(&tokens, &PageTable::contiguous(seqs.len(), width, 16))?;

    let mut d_act = b.alloc(t * f)?;
    let mut d_gate = b.alloc(t * f)?;
    let mut d_up = b.alloc(t * f)?;
    let mut dx = b.alloc(t * h)?;
    let mut d_attn = b.alloc(t * qw)?;
    let mut dq = b.alloc(t * qw)?;
    let mut dk = b.alloc(t * kvw)?;
    let mut dv = b.alloc(t * kvw)?;
    for li in (0..c.n_layers).rev() {
        let l = &engine.layers()[li];
        if let Some((p, vt)) = plan {
            b.steer_backward(&mut dh, p, vt, li + 1, t)?;
        }
        // MLP: dh is ∂L/∂(down output) and flows on to Mid(li) unchanged.
        let act = tape.get(Point::Act(li))?;
        linear_backward(engine, lora, tape, li, Target::Down, act, &dh, t, grads, Some((&mut d_act, false)))?;
        b.silu_mul_backward(
            tape.get(Point::Gate(li))?,
            tape.get(Point::Up(li))?,
            &d_act,
            t * f,
            &mut d_gate,
            &mut d_up,
        )?;
        let x2 = tape.get(Point::MidNormed(li))?;
        linear_backward(engine, lora, tape, li, Target::Gate, x2, &d_gate, t, grads, Some((&mut dx, false)))?;
        linear_backward(engine, lora, tape, li, Target::Up, x2, &d_up, t, grads, Some((&mut dx, true)))?;
        b.rmsnorm_backward(tape.get(Point::Mid(li))?, &l.mlp_norm, c.rms_eps, &dx, t, h, &mut dh)?;
        // Attention: dh is ∂L/∂(o_proj output) and flows on to Residual(li).
        linear_backward(
            engine,
            lora,
            tape,
            li,
            Target::O,
            tape.get(Point::Attn(li))?,
            &dh,
            t,
            grads,
            Some((&mut d_attn, false)),
        )?;
        b.attention_backward(
            tape.get(Point::Q(li))?,
            tape.get(Point::K(li))?,
            tape.get(Point::V(li))?,
            &d_attn,
            rows,
            shape,
            &mut dq,
            &mut dk,
            &mut dv,
        )?;
        b.rope(&mut dq, &table, &layout, t, nh, hd)?;
        b.rope(&mut dk, &table, &layout, t, nkv, hd)?;
        let x1 = tape.get(Point::Normed(li))?;
        // Below block 0 nothing has parameters: only the LoRA gradients are needed there.
        let below = li > 0;
        linear_backward(engine, lora, tape, li, Target::Q, x1, &dq, t, grads, below.then_some((&mut dx, false)))?;
        linear_backward(engine, lora, tape, li, Target::K, x1, &dk, t, grads, below.then_some((&mut dx, true)))?;
        linear_backward(engine, lora, tape, li, Target::V, x1, &dv, t, grads, below.then_some((&mut dx, true)))?;
        if below {
            b.rmsnorm_backward(tape.get(Point::Residual(li))?, &l.attn_norm, c.rms_eps, &dx, t, h, &mut dh)?;
        }
    }
    Ok(())
}
