//! The narrow Backend trait: the ops the forward pass is written over. Every backend
//! (CPU reference, CUDA, wgpu) implements exactly these, and is checked against the CPU one.

pub mod cpu;

use crate::error::Result;
use crate::model::tensor::HostTensor;

/// Where one token of a batch lives: its sequence's KV-cache slot and its position in that sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPos {
    pub slot: u32,
    pub pos: u32,
}

/// Attention geometry of a model, with the KV cache's capacity per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Positions per KV-cache slot.
    pub capacity: usize,
}

/// One layer's KV cache: `k`, `v` are `[slots][capacity][n_kv_heads][head_dim]`.
pub struct KvLayer<B: Backend + ?Sized> {
    pub k: B::Buf,
    pub v: B::Buf,
}

/// The ops of the transformer forward pass. `t` is the number of tokens in the batch
/// (all sequences concatenated); activations are row-major `[t, width]` f32 buffers.
pub trait Backend: Send + Sync {
    /// Activation buffer (f32).
    type Buf: Send;
    /// A weight tensor in the backend's own format.
    type Weight: Send + Sync;
    /// A batch's per-token layout, uploaded once per forward call.
    type Layout;

    fn name(&self) -> &'static str;

    fn upload(&self, t: &HostTensor) -> Result<Self::Weight>;
    /// A zeroed f32 buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn write(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    fn read(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>>;
    fn layout(&self, tokens: &[TokenPos]) -> Result<Self::Layout>;

    /// `out[i] = table[ids[i]]` (rows of `width`).
    fn embed(&self, table: &Self::Weight, ids: &[u32], width: usize, out: &mut Self::Buf) -> Result<()>;

    /// The fused residual boundary: `h += delta` (when given), then `x = rmsnorm(h) · norm`.
    /// One pass over `h`; steering and projections join here.
    fn residual_norm(
        &self,
        h: &mut Self::Buf,
        delta: Option<&Self::Buf>,
        norm: &Self::Weight,
        eps: f32,
        t: usize,
        width: usize,
        x: &mut Self::Buf,
    ) -> Result<()>;

    /// `out[i, n] = Σ_k x[i, k] · w[n, k] + bias[n]` for `w` of shape `[n_out, k]`.
    fn matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        t: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// Rotate `x` (`[t, heads, head_dim]`) in place by each token's position; `cos_sin` is
    /// `[positions, head_dim/2, 2]` (cos, sin) in rotate-half convention.
    fn rope(
        &self,
        x: &mut Self::Buf,
        cos_sin: &Self::Weight,
        layout: &Self::Layout,
        t: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Store this batch's `k`, `v` (`[t, n_kv_heads, head_dim]`) into `cache` at each token's
    /// (slot, pos), then causal attention of each token over its own slot's positions `0..=pos`.
    /// `out` is `[t, n_heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        cache: &mut KvLayer<Self>,
        layout: &Self::Layout,
        t: usize,
        shape: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `out = silu(gate) · up`, elementwise over `n` values.
    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;

    /// `out[i] = x[rows[i]]` (rows of `width`).
    fn gather_rows(&self, x: &Self::Buf, rows: &[u32], width: usize, out: &mut Self::Buf) -> Result<()>;
}
