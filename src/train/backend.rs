//! The training trait: the backward ops of the forward pass's [`Backend`] ops, beside it (not on
//! it). Each op here is the backward of one forward op, named after it; gradients accumulate
//! (`+=`) where several paths meet, as in llm.c's `train_gpt2.c`. The CPU reference implements
//! them in `cpu.rs`; every op has a finite-difference test there.

use crate::backend::{AttnShape, Backend, ResidualPlan};
use crate::error::Result;

/// A sequence of a training batch: its tokens are rows `start..start + len` of every `[t, ·]`
/// buffer, at positions `0..len` (each sequence runs from an empty KV-cache slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRows {
    pub start: usize,
    pub len: usize,
}

pub trait TrainBackend: Backend {
    /// A new buffer holding the first `len` values of `src` (the training tape's copies).
    fn copy(&self, src: &Self::Buf, len: usize) -> Result<Self::Buf>;

    /// `y += a · x` over `n` values.
    fn axpy(&self, y: &mut Self::Buf, a: f32, x: &Self::Buf, n: usize) -> Result<()>;

    /// Backward of `x = rmsnorm(h) · w` with `w` frozen: `dh += ∂L/∂h` given `dy = ∂L/∂x`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        h: &Self::Buf,
        w: &Self::Weight,
        eps: f32,
        dy: &Self::Buf,
        t: usize,
        width: usize,
        dh: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of `matmul` for its input with `w` (`[n, k]`) frozen: `dx (+)= dy · w` (`dy` is
    /// `[t, n]`, `dx` `[t, k]`); `accumulate` adds instead of overwriting.
    fn matmul_backward_x(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        t: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;

    /// Backward of `matmul` for its weight: `dw += a · dyᵀ · x` (`dy` `[t, n]`, `x` `[t, k]`,
    /// `dw` `[n, k]` on the host: parameter gradients live there with the optimiser).
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_w(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        a: f32,
        t: usize,
        n: usize,
        k: usize,
        dw: &mut [f32],
    ) -> Result<()>;

    /// Backward of causal attention over each sequence's own rows (softmax recomputed from `q`,
    /// `k`): `dq`, `dk`, `dv` are overwritten. `q`, `k` are after RoPE.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        d_out: &Self::Buf,
        seqs: &[SeqRows],
        shape: AttnShape,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of `out = silu(gate) · up`: `dgate`, `dup` are overwritten.
    fn silu_mul_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        d_out: &Self::Buf,
        n: usize,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of the steering ops of `plan` (reading `vectors`) at residual index `l`, in place on `dh` (`[t, width]`):
    /// `add` is the identity; `ablate` and `clamp` apply `I − u uᵀ` on the rows they touched, in
    /// reverse op order. Conditional ops (`when=`) are refused.
    fn steer_backward(
        &self,
        dh: &mut Self::Buf,
        plan: &ResidualPlan,
        vectors: &Self::Vectors,
        l: usize,
        t: usize,
    ) -> Result<()>;
}
