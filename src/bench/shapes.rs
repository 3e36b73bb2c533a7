//! Named model shapes ([`Shape`]: the sizes of SmolLM2-135M, Qwen2.5-7B, Llama-3.1-8B), their
//! parameter counts and host-memory checks, and models of those shapes with seeded random weights
//! ([`random_model`]), for benchmarks that need no checkpoint. Also the small seeded generator the
//! benchmarks draw their tokens and steering vectors from.

use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::config::{Arch, Llama3Scaling, ModelConfig, RopeConfig};
use crate::model::load::{LayerTensors, ModelTensors};
use crate::model::tensor::{DType, HostTensor, Storage};

/// A named model shape: the sizes of a real checkpoint, for random-weight benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub config: ModelConfig,
}

/// Names accepted by [`Shape::by_name`].
pub const SHAPE_NAMES: [&str; 3] = ["smollm2-135m", "qwen2.5-7b", "llama3.1-8b"];

impl Shape {
    /// The shape of SmolLM2-135M, Qwen2.5-7B or Llama-3.1-8B (see [`SHAPE_NAMES`]).
    pub fn by_name(name: &str) -> Option<Shape> {
        #[allow(clippy::too_many_arguments)]
        fn cfg(
            arch: Arch,
            layers: usize,
            hidden: usize,
            heads: (usize, usize),
            head_dim: usize,
            ffn: usize,
            vocab: usize,
            tied: bool,
            rope: RopeConfig,
            eps: f32,
        ) -> ModelConfig {
            ModelConfig {
                arch,
                hidden,
                intermediate: ffn,
                n_layers: layers,
                n_heads: heads.0,
                n_kv_heads: heads.1,
                head_dim,
                vocab,
                rms_eps: eps,
                rope,
                max_positions: 32768,
                tie_embeddings: tied,
                qkv_bias: arch == Arch::Qwen2,
                bos_id: None,
                eos_ids: vec![],
                identity: None,
            }
        }
        let plain = |theta| RopeConfig { theta, llama3: None };
        let config = match name {
            "smollm2-135m" => cfg(Arch::Llama, 30, 576, (9, 3), 64, 1536, 49152, true, plain(100000.0), 1e-5),
            "qwen2.5-7b" => cfg(Arch::Qwen2, 28, 3584, (28, 4), 128, 18944, 152064, false, plain(1e6), 1e-6),
            "llama3.1-8b" => {
                let llama3 = Llama3Scaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                };
                let rope = RopeConfig { theta: 500000.0, llama3: Some(llama3) };
                cfg(Arch::Llama, 32, 4096, (32, 8), 128, 14336, 128256, false, rope, 1e-5)
            }
            _ => return None,
        };
        let name = SHAPE_NAMES.iter().copied().find(|n| *n == name)?;
        Some(Shape { name, config })
    }
}

/// Number of weights of a model with this config (embedding, blocks, final norm, untied head).
pub fn param_count(c: &ModelConfig) -> usize {
    let (h, f) = (c.hidden, c.intermediate);
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let bias = if c.qkv_bias { q + 2 * kv } else { 0 };
    let layer = 2 * h + q * h + 2 * kv * h + bias + h * q + 3 * f * h;
    let head = if c.tie_embeddings { 0 } else { c.vocab * h };
    c.vocab * h + c.n_layers * layer + h + head
}

/// Bytes of the f32 host copy of a random model with this config.
pub fn f32_bytes(c: &ModelConfig) -> u64 {
    param_count(c) as u64 * 4
}

/// `MemAvailable` from /proc/meminfo, in bytes (`None` where there is no /proc).
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes the host holds for a random model with weights of `dtype`; a backend that widens 16-bit
/// weights to f32 on upload (`widens`: the CPU) holds that f32 copy as well.
pub fn host_bytes(c: &ModelConfig, dtype: DType, widens: bool) -> u64 {
    let per = dtype.size() + if widens && dtype != DType::F32 { 4 } else { 0 };
    param_count(c) as u64 * per as u64
}

/// Refuse a shape whose f32 host copy needs more than `available` bytes.
pub fn check_memory(shape: &Shape, available: u64) -> Result<()> {
    check_memory_for(shape, DType::F32, false, available)
}

/// Refuse a shape whose host copy in `dtype` (plus the f32 copy of a widening backend) needs
/// more than `available` bytes.
pub fn check_memory_for(shape: &Shape, dtype: DType, widens: bool, available: u64) -> Result<()> {
    let need = host_bytes(&shape.config, dtype, widens);
    if need > available {
        let name = format!("{dtype:?}").to_lowercase();
        let what = if widens && dtype != DType::F32 { format!("{name} + widened f32") } else { name };
        return Err(Error::Invalid(format!(
            "shape {} needs {need} bytes ({:.1} GiB) for its {what} weights on the host, but only {available} bytes \
             ({:.1} GiB) are available (MemAvailable); run it on a machine with more memory",
            shape.name,
            need as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// The sampler's SplitMix64 ([`crate::engine::sampler::Rng`]) with the draws random weights need;
/// every tensor and chunk gets its own stream.
pub(super) struct Rng(crate::engine::sampler::Rng);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(crate::engine::sampler::Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15))
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in (0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub(super) fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed.wrapping_mul(0x100_0000_01B3), |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
}

/// `center + scale · N(0,1)`, rounded to bf16-representable values, generated in parallel chunks;
/// stored as f32, or as 16-bit values in anonymous memory (as a model file's would be mapped).
fn random_tensor(
    seed: u64,
    name: String,
    shape: Vec<usize>,
    center: f32,
    scale: f32,
    dtype: DType,
) -> Result<HostTensor> {
    const CHUNK: usize = 1 << 20;
    let n: usize = shape.iter().product();
    let base = name_seed(seed, &name);
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut r = Rng::new(base.wrapping_add(i as u64));
        for x in c {
            *x = bf16::from_f32(center + scale * r.normal()).to_f32();
        }
    });
    if dtype == DType::F32 {
        return Ok(HostTensor::from_f32(name, shape, data));
    }
    let len = n * 2;
    let io = |e| Error::io(format!("anonymous memory for {name}"), e);
    let mut map = memmap2::MmapMut::map_anon(len.max(1)).map_err(io)?;
    map[..len].par_chunks_mut(2 * CHUNK).zip(data.par_chunks(CHUNK)).for_each(|(dst, src)| {
        for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
            let b = if dtype == DType::BF16 { bf16::from_f32(x).to_le_bytes() } else { f16::from_f32(x).to_le_bytes() };
            d.copy_from_slice(&b);
        }
    });
    let map = Arc::new(map.make_read_only().map_err(io)?);
    Ok(HostTensor { name, shape, storage: Storage::Mapped { map, offset: 0, len, dtype } })
}

/// A model of `shape` with seeded random weights (never zeros): projections and embeddings
/// N(0, 0.02²), norm weights 1 + N(0, 0.02²), biases N(0, 0.02²); every value bf16-representable,
/// stored as `dtype` (the same values for every dtype but f16, which rounds them once more).
pub fn random_model(shape: &Shape, seed: u64, dtype: DType) -> Result<(ModelConfig, ModelTensors)> {
    let c = &shape.config;
    let (h, f) = (c.hidden, c.intermediate);
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let w = |name: String, shape: Vec<usize>| random_tensor(seed, name, shape, 0.0, 0.02, dtype);
    let norm = |name: String| random_tensor(seed, name, vec![h], 1.0, 0.02, dtype);
    let layers = (0..c.n_layers)
        .map(|i| {
            let p = format!("model.layers.{i}.");
            let bias =
                |n: &str, len: usize| c.qkv_bias.then(|| w(format!("{p}self_attn.{n}.bias"), vec![len])).transpose();
            Ok(LayerTensors {
                attn_norm: norm(format!("{p}input_layernorm.weight"))?,
                wq: w(format!("{p}self_attn.q_proj.weight"), vec![q, h])?,
                wk: w(format!("{p}self_attn.k_proj.weight"), vec![kv, h])?,
                wv: w(format!("{p}self_attn.v_proj.weight"), vec![kv, h])?,
                bq: bias("q_proj", q)?,
                bk: bias("k_proj", kv)?,
                bv: bias("v_proj", kv)?,
                wo: w(format!("{p}self_attn.o_proj.weight"), vec![h, q])?,
                mlp_norm: norm(format!("{p}post_attention_layernorm.weight"))?,
                w_gate: w(format!("{p}mlp.gate_proj.weight"), vec![f, h])?,
                w_up: w(format!("{p}mlp.up_proj.weight"), vec![f, h])?,
                w_down: w(format!("{p}mlp.down_proj.weight"), vec![h, f])?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tensors = ModelTensors {
        embed: w("model.embed_tokens.weight".into(), vec![c.vocab, h])?,
        layers,
        final_norm: norm("model.norm.weight".into())?,
        lm_head: (!c.tie_embeddings).then(|| w("lm_head.weight".into(), vec![c.vocab, h])).transpose()?,
    };
    Ok((c.clone(), tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_param_count_matches_the_checkpoint() {
        // SmolLM2-135M has 134,515,008 parameters (tied embeddings).
        assert_eq!(param_count(&Shape::by_name("smollm2-135m").unwrap().config), 134_515_008);
    }
}
