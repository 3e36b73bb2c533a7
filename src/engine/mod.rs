//! The forward pass, written once over [`Backend`]: embed → N × (norm, attention, residual,
//! norm, MLP, residual) → norm → logits, for a batch of ragged sequences that each own a
//! KV-cache slot. Prefill and decode are the same call.

pub mod generate;
pub mod loaded;
pub mod plan;
pub mod sampler;
pub mod vectors;

use crate::backend::{AttnShape, Backend, KvLayer, PageTable, PlanOutputs, TokenPos, NO_PAGE};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::load::ModelTensors;
use crate::model::lora::Target;
use crate::model::tensor::HostTensor;
pub use crate::steer::plan::OpCount;
use crate::steer::{Capture, SeqSteering};

use self::plan::Built;

/// One decoder block's weights on a backend (read-only outside the engine).
pub struct Layer<B: Backend> {
    pub attn_norm: B::Weight,
    pub wq: B::Weight,
    pub wk: B::Weight,
    pub wv: B::Weight,
    pub bq: Option<B::Weight>,
    pub bk: Option<B::Weight>,
    pub bv: Option<B::Weight>,
    pub wo: B::Weight,
    pub mlp_norm: B::Weight,
    pub w_gate: B::Weight,
    pub w_up: B::Weight,
    pub w_down: B::Weight,
}

impl<B: Backend> Layer<B> {
    /// The projection weight of a LoRA target (`[out, in]`).
    pub fn projection(&self, t: Target) -> &B::Weight {
        match t {
            Target::Q => &self.wq,
            Target::K => &self.wk,
            Target::V => &self.wv,
            Target::O => &self.wo,
            Target::Gate => &self.w_gate,
            Target::Up => &self.w_up,
            Target::Down => &self.w_down,
        }
    }
}

/// Activations of the forward pass that a [`ForwardHook`] sees, per block `l` (`Residual` and
/// `Normed` also at `l = N`, the final norm). Each is `[t, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// The residual stream at index `l` after its steering (the input of the norm that follows).
    Residual(usize),
    /// `rmsnorm(Residual(l))`: the input of block `l`'s q/k/v (of the lm_head at `l = N`).
    Normed(usize),
    /// Block `l`'s queries and keys after RoPE, and its values.
    Q(usize),
    K(usize),
    V(usize),
    /// Block `l`'s attention output (the input of o_proj).
    Attn(usize),
    /// The residual after block `l`'s attention (the input of its MLP norm).
    Mid(usize),
    /// `rmsnorm(Mid(l))`: the input of gate/up.
    MidNormed(usize),
    Gate(usize),
    Up(usize),
    /// `silu(gate)·up`: the input of down_proj.
    Act(usize),
    /// down_proj's output, before it is added to the residual stream (and before steering).
    MlpOut(usize),
}

/// Extends and observes a forward pass without a second copy of it: an adapter adds to the
/// block's projections ([`ForwardHook::linear`]); a training tape keeps activations
/// ([`ForwardHook::activation`]). Buffers hold `t` rows.
pub trait ForwardHook<B: Backend> {
    /// `out` holds `x · Wᵀ (+ b)` of projection `target` in block `layer`; the hook may add to it.
    fn linear(&mut self, b: &B, layer: usize, target: Target, x: &B::Buf, t: usize, out: &mut B::Buf) -> Result<()>;
    /// The activation at `point`, read-only, `t` rows of `width`.
    fn activation(&mut self, b: &B, point: Point, buf: &B::Buf, t: usize, width: usize) -> Result<()>;
}

/// A model's weights on a backend, ready to run.
pub struct Engine<B: Backend> {
    pub backend: B,
    pub config: ModelConfig,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Weight,
    lm_head: Option<B::Weight>,
    /// `[max_context, head_dim/2, 2]` cos/sin (f32).
    rope: B::Buf,
    /// Longest sequence the RoPE table covers.
    pub max_context: usize,
}

/// Positions per KV-cache page.
pub const PAGE_SIZE: usize = 16;

/// A paged KV cache shared by `slots` sequences of up to `capacity` tokens each: a pool of pages
/// of [`PAGE_SIZE`] positions, handed to a slot as its tokens arrive and returned when the slot is
/// reset or truncated, so memory follows the tokens actually held rather than slots × capacity.
/// Also holds the forward pass's reusable scratch buffers.
pub struct KvCache<B: Backend> {
    layers: Vec<KvLayer<B>>,
    /// Most tokens one sequence may hold.
    pub capacity: usize,
    page_size: usize,
    n_pages: usize,
    lens: Vec<usize>,
    /// Pages of each slot, in position order.
    pages: Vec<Vec<u32>>,
    /// Free pages (a stack: the most recently freed page is handed out first).
    free: Vec<u32>,
    scratch: Option<Scratch<B>>,
    /// Steering and probe vectors on the device, across calls.
    vectors: vectors::VectorTable<B>,
}

impl<B: Backend> KvCache<B> {
    /// The call's residual plan with its ops and probes pointing at rows of this cache's vector
    /// table (vectors it has not seen yet are uploaded); `None` when nothing steers, probes or
    /// captures.
    pub(crate) fn plan(&mut self, b: &B, seqs: &[SeqInput], hidden: usize, n_layers: usize) -> Result<Option<Built>> {
        let Some(mut built) = plan::build(seqs, hidden, n_layers) else {
            return Ok(None);
        };
        let rows = self.vectors.rows_for(b, &built.vectors)?;
        built.remap(&rows, self.vectors.capacity());
        Ok(Some(built))
    }

    /// The device vector table the last [`KvCache::plan`] indexes.
    pub(crate) fn vector_table(&self) -> Option<&B::Vectors> {
        self.vectors.device()
    }

    /// Vector rows written to the device since the cache was made.
    pub fn vector_rows_written(&self) -> u64 {
        self.vectors.written
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }
    /// Tokens already cached for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }
    /// Forget a slot's tokens and return its pages to the pool.
    pub fn reset(&mut self, slot: usize) {
        self.truncate(slot, 0);
    }
    /// Keep only the first `len` tokens of a slot (e.g. to decode again from the same prompt);
    /// pages past them go back to the pool.
    pub fn truncate(&mut self, slot: usize, len: usize) {
        self.lens[slot] = self.lens[slot].min(len);
        let keep = self.pages_for(len);
        while self.pages[slot].len() > keep {
            let p = self.pages[slot].pop().expect("len checked");
            self.free.push(p);
        }
    }
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Pages in the pool.
    pub fn total_pages(&self) -> usize {
        self.n_pages
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Pages needed to hold `tokens` positions.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }
    /// Pages `slot` still needs to hold `tokens` positions in all.
    pub fn pages_missing(&self, slot: usize, tokens: usize) -> usize {
        self.pages_for(tokens).saturating_sub(self.pages[slot].len())
    }
    /// Give `slot` pages for `tokens` positions in all, now (all or nothing).
    pub fn reserve(&mut self, slot: usize, tokens: usize) -> Result<()> {
        if tokens > self.capacity {
            return Err(Error::Invalid(format!(
                "sequence in slot {slot} would reach {tokens} tokens, beyond the KV cache capacity {}",
                self.capacity
            )));
        }
        let need = self.pages_missing(slot, tokens);
        if need > self.free.len() {
            return Err(Error::Invalid(format!(
                "the KV cache is full: slot {slot} needs {need} more pages of {} tokens, {} of {} are free",
                self.page_size,
                self.free.len(),
                self.n_pages
            )));
        }
        let at = self.free.len() - need;
        self.pages[slot].extend(self.free.drain(at..).rev());
        Ok(())
    }
    /// The page table as the backends read it.
    fn table(&self) -> PageTable {
        let width = self.pages_for(self.capacity).max(1);
        let mut table = vec![NO_PAGE; self.slots() * width];
        for (s, pages) in self.pages.iter().enumerate() {
            table[s * width..][..pages.len()].copy_from_slice(pages);
        }
        PageTable { page_size: self.page_size, width, table }
    }
}

struct Scratch<B: Backend> {
    tokens: usize,
    h: B::Buf,
    x: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    o: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
}

/// One sequence's part of a forward call: new tokens appended to its slot.
#[derive(Debug, Clone, Default)]
pub struct SeqInput<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    /// Logits for the new tokens from this index on (`Some(0)`: all of them); the last token's
    /// logits always.
    pub logits_from: Option<usize>,
    /// These tokens are prompt (prefill) tokens, for `positions=prompt` steering.
    pub prompt: bool,
    /// With `prompt`: the new tokens from this index on are answer (response) tokens instead, as
    /// in a teacher-forced pass over prompt + answer (steered and probed as generation would).
    pub answer_from: Option<usize>,
    /// With `prompt`: more of this prompt follows in a later call (chunked prefill), so the last
    /// token here is not the last prompt token (`positions=response` does not apply to it).
    pub more_prompt: bool,
    /// Steering ops and probes for this sequence.
    pub steering: Option<&'a SeqSteering>,
    /// Sum the residual at every index over the new tokens from `from` on.
    pub capture: Option<Capture>,
}

impl<'a> SeqInput<'a> {
    /// Plain tokens: no steering, logits for the last token only.
    pub fn new(slot: usize, tokens: &'a [u32]) -> Self {
        SeqInput { slot, tokens, ..Default::default() }
    }
}

/// What a forward call returns: logits rows (`[rows, vocab]`), and per sequence the range of rows
/// that belong to it.
#[derive(Debug, Clone, Default)]
pub struct ForwardOutput {
    pub logits: Vec<f32>,
    pub vocab: usize,
    pub rows: Vec<std::ops::Range<usize>>,
    /// With `trace`: the residual stream at every index 0..=N, `[N+1][t][hidden]`.
    pub residuals: Vec<Vec<f32>>,
    /// Per sequence: projections `[new tokens][its probes]`, flattened (empty without probes).
    pub projections: Vec<Vec<f32>>,
    /// Per sequence with a capture: residual sums `[(N+1) * hidden]` and the number of tokens summed.
    pub captures: Vec<Option<(Vec<f32>, usize)>>,
    /// Per sequence, per op of its steering plan: what the kernel counted (the receipts).
    pub op_counts: Vec<Vec<OpCount>>,
}

impl ForwardOutput {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.logits[r * self.vocab..(r + 1) * self.vocab]
    }
    /// The last logits row of sequence `i` of the call.
    pub fn last(&self, i: usize) -> &[f32] {
        self.row(self.rows[i].end - 1)
    }
}

/// `[positions, head_dim/2, 2]` cos/sin table (rotate-half convention), computed in f64.
fn rope_table(cfg: &ModelConfig, positions: usize) -> Vec<f32> {
    let inv = cfg.rope.inv_freq(cfg.head_dim);
    let half = cfg.head_dim / 2;
    let mut t = Vec::with_capacity(positions * half * 2);
    for p in 0..positions {
        for f in &inv {
            // transformers computes the angle in f32; round the same way before cos/sin.
            let a = (p as f32 * *f as f32) as f64;
            t.push(a.cos() as f32);
            t.push(a.sin() as f32);
        }
    }
    t
}

impl<B: Backend> Engine<B> {
    /// Upload a model's tensors. `max_context` bounds positions (and the RoPE table).
    pub fn new(backend: B, config: ModelConfig, t: &ModelTensors, max_context: usize) -> Result<Self> {
        let max_context = max_context.min(config.max_positions.max(1)).max(1);
        let up = |x: &HostTensor| backend.upload(x);
        let upo = |x: &Option<HostTensor>| x.as_ref().map(|x| backend.upload(x)).transpose();
        let mut layers = Vec::with_capacity(t.layers.len());
        for l in &t.layers {
            layers.push(Layer {
                attn_norm: up(&l.attn_norm)?,
                wq: up(&l.wq)?,
                wk: up(&l.wk)?,
                wv: up(&l.wv)?,
                bq: upo(&l.bq)?,
                bk: upo(&l.bk)?,
                bv: upo(&l.bv)?,
                wo: up(&l.wo)?,
                mlp_norm: up(&l.mlp_norm)?,
                w_gate: up(&l.w_gate)?,
                w_up: up(&l.w_up)?,
                w_down: up(&l.w_down)?,
            });
        }
        Ok(Engine {
            embed: up(&t.embed)?,
            final_norm: up(&t.final_norm)?,
            lm_head: upo(&t.lm_head)?,
            rope: {
                let table = rope_table(&config, max_context);
                let mut b = backend.alloc(table.len())?;
                backend.write(&mut b, &table)?;
                b
            },
            layers,
            config,
            backend,
            max_context,
        })
    }

    /// The decoder blocks' weights.
    pub fn layers(&self) -> &[Layer<B>] {
        &self.layers
    }
    /// The final norm's weight.
    pub fn final_norm(&self) -> &B::Weight {
        &self.final_norm
    }
    /// The output projection (the embedding table when tied), `[vocab, hidden]`.
    pub fn output_weight(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
    /// The RoPE cos/sin table (`[max_context, head_dim/2, 2]`).
    pub fn rope_table(&self) -> &B::Buf {
        &self.rope
    }

    pub fn attn_shape(&self) -> AttnShape {
        let c = &self.config;
        AttnShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim }
    }

    /// A KV cache for `slots` sequences of up to `capacity` tokens, with room for all of them at
    /// full length.
    pub fn new_cache(&self, slots: usize, capacity: usize) -> Result<KvCache<B>> {
        self.new_paged_cache(slots, capacity, slots * capacity.div_ceil(PAGE_SIZE) * PAGE_SIZE, PAGE_SIZE)
    }

    /// A KV cache for `slots` sequences of up to `capacity` tokens each that share a pool of
    /// `kv_tokens` positions (rounded up to whole pages of `page_size`).
    pub fn new_paged_cache(
        &self,
        slots: usize,
        capacity: usize,
        kv_tokens: usize,
        page_size: usize,
    ) -> Result<KvCache<B>> {
        if capacity > self.max_context {
            return Err(Error::Invalid(format!(
                "a context of {capacity} tokens exceeds the model's limit of {}",
                self.max_context
            )));
        }
        if page_size == 0 || slots == 0 {
            return Err(Error::Invalid(format!("a KV cache needs slots ({slots}) and a page size ({page_size})")));
        }
        let c = &self.config;
        let n_pages = kv_tokens.div_ceil(page_size).max(1);
        if n_pages > u32::MAX as usize / 2 {
            return Err(Error::Invalid(format!("a KV cache of {kv_tokens} tokens is too large")));
        }
        let n = n_pages * page_size * c.n_kv_heads * c.head_dim;
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(KvLayer { k: self.backend.alloc(n)?, v: self.backend.alloc(n)? });
        }
        Ok(KvCache {
            layers,
            capacity,
            page_size,
            n_pages,
            lens: vec![0; slots],
            pages: vec![vec![]; slots],
            free: (0..n_pages as u32).rev().collect(),
            scratch: None,
            vectors: vectors::VectorTable::new(c.hidden),
        })
    }

    fn scratch(&self, tokens: usize) -> Result<Scratch<B>> {
        let c = &self.config;
        let b = &self.backend;
        let (h, q, kv, f) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate);
        Ok(Scratch {
            tokens,
            h: b.alloc(tokens * h)?,
            x: b.alloc(tokens * h)?,
            q: b.alloc(tokens * q)?,
            k: b.alloc(tokens * kv)?,
            v: b.alloc(tokens * kv)?,
            attn: b.alloc(tokens * q)?,
            o: b.alloc(tokens * h)?,
            gate: b.alloc(tokens * f)?,
            up: b.alloc(tokens * f)?,
            act: b.alloc(tokens * f)?,
        })
    }

    /// Run the new tokens of each sequence through the model, appending them to the KV cache.
    pub fn forward(&self, cache: &mut KvCache<B>, seqs: &[SeqInput], trace: bool) -> Result<ForwardOutput> {
        self.forward_hooked(cache, seqs, trace, None)
    }

    /// [`Engine::forward`] with a hook that may add to the block projections and sees activations.
    ///
    /// Non-finite logits stop here with [`Error::NonFinite`] naming the sequence and the residual
    /// index (and so the block) where NaN or Inf first appeared: the call is run again with a
    /// trace from the same cache positions to find it (only on that error path; the check itself
    /// is one pass over the logits the call reads back anyway). Every sequence's KV cache is then
    /// back where it was before the call, so a caller may drop the bad sequence and retry.
    pub fn forward_hooked(
        &self,
        cache: &mut KvCache<B>,
        seqs: &[SeqInput],
        trace: bool,
        mut hook: Option<&mut dyn ForwardHook<B>>,
    ) -> Result<ForwardOutput> {
        let starts: Vec<usize> = seqs.iter().map(|s| cache.lens.get(s.slot).copied().unwrap_or(0)).collect();
        let out = self.run(cache, seqs, trace, hook.as_deref_mut())?;
        let Some(bad_row) = out.logits.chunks(out.vocab.max(1)).position(|r| r.iter().any(|x| !x.is_finite())) else {
            return Ok(out);
        };
        let seq = out.rows.iter().position(|r| r.contains(&bad_row)).unwrap_or(0);
        for (s, &start) in seqs.iter().zip(&starts) {
            cache.truncate(s.slot, start);
        }
        // With the same hook (an adapter adds to the projections; a training tape sees the
        // activations again, but the caller gets an error and drops it).
        let traced = self.run(cache, seqs, true, hook)?;
        let h = self.config.hidden;
        let first = traced
            .residuals
            .iter()
            .enumerate()
            .find_map(|(l, r)| r.chunks(h).position(|row| row.iter().any(|x| !x.is_finite())).map(|t| (l, t)));
        for (s, &start) in seqs.iter().zip(&starts) {
            cache.truncate(s.slot, start);
        }
        let at = match first {
            Some((0, t)) => format!("the embedding of token {t} of the call (residual index 0) is not finite"),
            Some((l, t)) => format!(
                "the residual stream after block {} (residual index {l}) is not finite first at token {t} of the call",
                l - 1
            ),
            None => "the residual stream is finite, so the output projection (lm_head) overflowed".into(),
        };
        let slot = seqs.get(seq).map_or(0, |s| s.slot);
        Err(Error::NonFinite {
            slot,
            msg: format!(
                "the logits of sequence {seq} (slot {slot}) hold NaN or Inf: {at}; the model's weights may be corrupt \
                 (or a steering coefficient is too large)"
            ),
        })
    }

    fn run<'h>(
        &self,
        cache: &mut KvCache<B>,
        seqs: &[SeqInput],
        trace: bool,
        mut hook: Option<&mut (dyn ForwardHook<B> + 'h)>,
    ) -> Result<ForwardOutput> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut out_rows = Vec::new();
        let mut seen = vec![false; cache.slots()];
        for s in seqs {
            if s.slot >= cache.slots() {
                return Err(Error::Invalid(format!(
                    "slot {} is outside the KV cache ({} slots)",
                    s.slot,
                    cache.slots()
                )));
            }
            if std::mem::replace(&mut seen[s.slot], true) {
                return Err(Error::Invalid(format!("slot {} appears twice in one forward call", s.slot)));
            }
            if s.tokens.is_empty() {
                return Err(Error::Invalid(format!("sequence in slot {} has no new tokens", s.slot)));
            }
            let start = cache.lens[s.slot];
            if start + s.tokens.len() > cache.capacity {
                return Err(Error::Invalid(format!(
                    "sequence in slot {} would reach {} tokens, beyond the KV cache capacity {}",
                    s.slot,
                    start + s.tokens.len(),
                    cache.capacity
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&id| id as usize >= c.vocab) {
                return Err(Error::Invalid(format!("token id {bad} is out of vocabulary (size {})", c.vocab)));
            }
            let first = out_rows.len();
            for (i, &id) in s.tokens.iter().enumerate() {
                if s.logits_from.is_some_and(|f| i >= f) || i + 1 == s.tokens.len() {
                    out_rows.push(tokens.len() as u32);
                }
                ids.push(id);
                tokens.push(TokenPos { slot: s.slot as u32, pos: (start + i) as u32 });
            }
            rows.push(first..out_rows.len());
        }
        let t = tokens.len();
        for s in seqs {
            if let Some(st) = s.steering {
                st.validate(c.hidden, c.n_layers)?;
            }
        }
        let missing: usize =
            seqs.iter().map(|s| cache.pages_missing(s.slot, cache.lens[s.slot] + s.tokens.len())).sum();
        if missing > cache.free_pages() {
            return Err(Error::Invalid(format!(
                "the KV cache is full: this call needs {missing} more pages of {} tokens, {} of {} are free",
                cache.page_size,
                cache.free_pages(),
                cache.n_pages
            )));
        }
        for s in seqs {
            cache.reserve(s.slot, cache.lens[s.slot] + s.tokens.len())?;
        }
        let built = cache.plan(&self.backend, seqs, c.hidden, c.n_layers)?;
        let mut dev_plan = built.as_ref().map(|bp| self.backend.plan(&bp.plan)).transpose()?;
        let table = match (&dev_plan, cache.vectors.device()) {
            (Some(_), None) => return Err(Error::Invalid("a residual plan without its vector table".into())),
            (_, t) => t,
        };
        if cache.scratch.as_ref().is_none_or(|s| s.tokens < t) {
            cache.scratch = Some(self.scratch(t)?);
        }
        let b = &self.backend;
        let layout = b.layout(&tokens, &cache.table())?;
        let shape = self.attn_shape();
        let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let mut residuals = Vec::new();
        let ws = cache.scratch.as_mut().expect("scratch allocated above");
        let kv_layers = &mut cache.layers;

        b.embed(&self.embed, &ids, c.hidden, &mut ws.h)?;
        let first_norm = self.layers.first().map(|l| &l.attn_norm).unwrap_or(&self.final_norm);
        b.residual_steer_norm(
            &mut ws.h,
            None,
            dev_plan.as_mut().zip(table).map(|(p, vt)| (p, vt, 0)),
            first_norm,
            c.rms_eps,
            t,
            c.hidden,
            &mut ws.x,
        )?;
        if trace {
            residuals.push(b.read(&ws.h, t * c.hidden)?);
        }
        // Hook calls: `see` hands an activation to the hook; `linear` a projection's output.
        macro_rules! see {
            ($point:expr, $buf:expr, $width:expr) => {
                if let Some(hk) = hook.as_deref_mut() {
                    hk.activation(b, $point, $buf, t, $width)?;
                }
            };
        }
        macro_rules! linear {
            ($li:expr, $target:expr, $x:expr, $out:expr) => {
                if let Some(hk) = hook.as_deref_mut() {
                    hk.linear(b, $li, $target, $x, t, $out)?;
                }
            };
        }
        let (qw, kvw, f) = (nh * hd, nkv * hd, c.intermediate);
        see!(Point::Residual(0), &ws.h, c.hidden);
        see!(Point::Normed(0), &ws.x, c.hidden);
        for (li, l) in self.layers.iter().enumerate() {
            b.matmul(&ws.x, &l.wq, l.bq.as_ref(), t, &mut ws.q)?;
            linear!(li, Target::Q, &ws.x, &mut ws.q);
            b.matmul(&ws.x, &l.wk, l.bk.as_ref(), t, &mut ws.k)?;
            linear!(li, Target::K, &ws.x, &mut ws.k);
            b.matmul(&ws.x, &l.wv, l.bv.as_ref(), t, &mut ws.v)?;
            linear!(li, Target::V, &ws.x, &mut ws.v);
            b.rope(&mut ws.q, &self.rope, &layout, t, nh, hd)?;
            b.rope(&mut ws.k, &self.rope, &layout, t, nkv, hd)?;
            see!(Point::Q(li), &ws.q, qw);
            see!(Point::K(li), &ws.k, kvw);
            see!(Point::V(li), &ws.v, kvw);
            b.attention(&ws.q, &ws.k, &ws.v, &mut kv_layers[li], &layout, t, shape, &mut ws.attn)?;
            see!(Point::Attn(li), &ws.attn, qw);
            b.matmul(&ws.attn, &l.wo, None, t, &mut ws.o)?;
            linear!(li, Target::O, &ws.attn, &mut ws.o);
            b.residual_steer_norm(&mut ws.h, Some(&ws.o), None, &l.mlp_norm, c.rms_eps, t, c.hidden, &mut ws.x)?;
            see!(Point::Mid(li), &ws.h, c.hidden);
            see!(Point::MidNormed(li), &ws.x, c.hidden);
            b.matmul(&ws.x, &l.w_gate, None, t, &mut ws.gate)?;
            linear!(li, Target::Gate, &ws.x, &mut ws.gate);
            b.matmul(&ws.x, &l.w_up, None, t, &mut ws.up)?;
            linear!(li, Target::Up, &ws.x, &mut ws.up);
            b.silu_mul(&ws.gate, &ws.up, t * f, &mut ws.act)?;
            see!(Point::Gate(li), &ws.gate, f);
            see!(Point::Up(li), &ws.up, f);
            see!(Point::Act(li), &ws.act, f);
            b.matmul(&ws.act, &l.w_down, None, t, &mut ws.o)?;
            linear!(li, Target::Down, &ws.act, &mut ws.o);
            see!(Point::MlpOut(li), &ws.o, c.hidden);
            let next_norm = self.layers.get(li + 1).map(|n| &n.attn_norm).unwrap_or(&self.final_norm);
            b.residual_steer_norm(
                &mut ws.h,
                Some(&ws.o),
                dev_plan.as_mut().zip(table).map(|(p, vt)| (p, vt, li + 1)),
                next_norm,
                c.rms_eps,
                t,
                c.hidden,
                &mut ws.x,
            )?;
            see!(Point::Residual(li + 1), &ws.h, c.hidden);
            see!(Point::Normed(li + 1), &ws.x, c.hidden);
            if trace {
                residuals.push(b.read(&ws.h, t * c.hidden)?);
            }
        }
        let n_out = out_rows.len();
        let mut xs = b.alloc(n_out * c.hidden)?;
        b.gather_rows(&ws.x, &out_rows, c.hidden, &mut xs)?;
        let mut logits = b.alloc(n_out * c.vocab)?;
        b.matmul(&xs, self.lm_head.as_ref().unwrap_or(&self.embed), None, n_out, &mut logits)?;
        let logits = b.read(&logits, n_out * c.vocab)?;
        for s in seqs {
            cache.lens[s.slot] += s.tokens.len();
        }
        let mut projections = vec![vec![]; seqs.len()];
        let mut captures = vec![None; seqs.len()];
        let mut op_counts: Vec<Vec<OpCount>> =
            seqs.iter().map(|s| vec![OpCount::default(); s.steering.map_or(0, |st| st.plan.ops.len())]).collect();
        if let (Some(dp), Some(Built { plan: p, cols, op_origin, .. })) = (&dev_plan, &built) {
            let PlanOutputs { proj, capture: cap, counts } = b.plan_outputs(dp)?;
            if counts.len() != 2 * op_origin.len() {
                return Err(Error::Invalid(format!(
                    "the {} backend returned {} op counts for {} ops",
                    b.name(),
                    counts.len(),
                    op_origin.len()
                )));
            }
            for (k, &(si, oi)) in op_origin.iter().enumerate() {
                op_counts[si][oi] += OpCount { selected: counts[2 * k] as u64, applied: counts[2 * k + 1] as u64 };
            }
            let per_cap = (c.n_layers + 1) * c.hidden;
            let mut first = 0;
            for (i, s) in seqs.iter().enumerate() {
                let sc = &cols[i];
                for tok in first..first + s.tokens.len() {
                    let at = p.token_proj[tok] as usize;
                    projections[i].extend_from_slice(&proj[at..at + sc.n_probes]);
                }
                if let (Some(slot), Some(capt)) = (sc.capture, s.capture) {
                    let count = s.tokens.len().saturating_sub(capt.from);
                    captures[i] = Some((cap[slot * per_cap..(slot + 1) * per_cap].to_vec(), count));
                }
                first += s.tokens.len();
            }
        }
        Ok(ForwardOutput { logits, vocab: c.vocab, rows, residuals, projections, captures, op_counts })
    }
}
