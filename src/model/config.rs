//! Model hyper-parameters, from a HF `config.json` (hub spelling and transformers-5 spelling)
//! or from GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Supported decoder architectures. All three share the Llama block
/// (RMSNorm, RoPE attention with GQA, SwiGLU MLP); Qwen2 adds q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }
}

/// Llama-3 style frequency-dependent RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub llama3: Option<Llama3Scaling>,
}

impl RopeConfig {
    /// Inverse frequencies for a head of `head_dim`, as transformers computes them (f64 here).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let half = head_dim / 2;
        let mut f: Vec<f64> = (0..half).map(|i| 1.0 / self.theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        if let Some(s) = self.llama3 {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for x in f.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *x;
                if wavelen > low_wavelen {
                    *x /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *x = (1.0 - smooth) * *x / s.factor + smooth * *x;
                }
            }
        }
        f
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    /// Which model this is (set by [`crate::model::ModelFiles::open`]): persona vectors record it
    /// at extraction and are refused on another model of the same shape.
    pub identity: Option<ModelIdentity>,
}

/// A model's name and fingerprint ([`crate::model::load::fingerprint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    pub name: String,
    pub fingerprint: String,
    /// Use vectors recorded for another model anyway (the CLI's `--force`), with a warning.
    pub allow_foreign: bool,
}

impl ModelConfig {
    /// Check the relations between sizes that the forward pass relies on.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::format(origin, m));
        for (name, v) in [
            ("hidden_size", self.hidden),
            ("intermediate_size", self.intermediate),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab),
        ] {
            if v == 0 || v > 1 << 24 {
                return bad(format!("`{name}` = {v} is out of range"));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rms_eps > 0.0 && self.rms_eps.is_finite()) {
            return bad(format!("rms_norm_eps {} must be positive", self.rms_eps));
        }
        if !(self.rope.theta > 0.0 && self.rope.theta.is_finite()) {
            return bad(format!("rope_theta {} must be positive", self.rope.theta));
        }
        Ok(())
    }

    /// Parse a HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_str(&text, path)
    }

    pub fn from_hf_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        // Some configs nest the language model under `text_config`.
        let v = obj.get("text_config").filter(|t| t.is_object()).unwrap_or(&v);
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let req_usize = |k: &str| -> Result<usize> {
            field(k)
                .ok_or_else(|| Error::format(path, format!("missing field `{k}`")))?
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| Error::format(path, format!("field `{k}` must be a non-negative integer")))
        };
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(str::to_string)
            .or_else(|| field("model_type").and_then(|m| m.as_str()).map(str::to_string))
            .ok_or_else(|| Error::format(path, "missing field `architectures` (and `model_type`)"))?;
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: architecture `{other}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)",
                    path.display()
                )))
            }
        };
        let hidden = req_usize("hidden_size")?;
        let n_heads = req_usize("num_attention_heads")?;
        let n_kv_heads =
            if field("num_key_value_heads").is_some() { req_usize("num_key_value_heads")? } else { n_heads };
        let head_dim = if field("head_dim").is_some() {
            req_usize("head_dim")?
        } else {
            if n_heads == 0 || hidden % n_heads != 0 {
                return Err(Error::format(path, "hidden_size is not a multiple of num_attention_heads"));
            }
            hidden / n_heads
        };
        let rms_eps = match field("rms_norm_eps") {
            Some(x) => x.as_f64().ok_or_else(|| Error::format(path, "`rms_norm_eps` must be a number"))? as f32,
            None => 1e-6,
        };
        // RoPE: hub style (`rope_theta` + `rope_scaling`) or transformers 5 (`rope_parameters`).
        let params = field("rope_parameters").filter(|p| p.is_object());
        let scaling = params.or_else(|| field("rope_scaling").filter(|p| p.is_object()));
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| field("rope_theta"))
            .map(|t| t.as_f64().ok_or_else(|| Error::format(path, "`rope_theta` must be a number")))
            .transpose()?
            .unwrap_or(10000.0);
        let mut llama3 = None;
        if let Some(s) = scaling {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            let num = |k: &str| -> Result<f64> {
                s.get(k)
                    .and_then(|x| x.as_f64())
                    .ok_or_else(|| Error::format(path, format!("rope scaling `{kind}` needs a numeric `{k}`")))
            };
            match kind {
                "default" => {}
                "llama3" => {
                    llama3 = Some(Llama3Scaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    })
                }
                other => return Err(Error::Unsupported(format!("{}: rope scaling `{other}`", path.display()))),
            }
        }
        let ids = |k: &str| -> Vec<u32> {
            match field(k) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                _ => vec![],
            }
        };
        let cfg = ModelConfig {
            arch,
            hidden,
            intermediate: req_usize("intermediate_size")?,
            n_layers: req_usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab: req_usize("vocab_size")?,
            rms_eps,
            rope: RopeConfig { theta, llama3 },
            max_positions: field("max_position_embeddings").and_then(|x| x.as_u64()).unwrap_or(4096) as usize,
            tie_embeddings: field("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                _ => field("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            },
            bos_id: ids("bos_token_id").first().copied(),
            eos_ids: ids("eos_token_id"),
            identity: None,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_field_is_named() {
        let e =
            ModelConfig::from_hf_str(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8}"#, Path::new("c.json"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = ModelConfig::from_hf_str(r#"{"architectures":["GPTNeoXForCausalLM"]}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPTNeoXForCausalLM"), "{e}");
    }

    #[test]
    fn llama3_scaling_matches_transformers() {
        // Reference values computed with transformers' _compute_llama3_parameters
        // for theta 500000, head_dim 16, factor 8, low 1, high 4, original 64.
        let r = RopeConfig {
            theta: 500000.0,
            llama3: Some(Llama3Scaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            }),
        };
        let f = r.inv_freq(16);
        // i=0: wavelen 2π < 16 → unchanged (1.0). i=7: very long wavelength → divided by 8.
        assert!((f[0] - 1.0).abs() < 1e-12);
        let plain = 1.0 / 500000f64.powf(14.0 / 16.0);
        assert!((f[7] - plain / 8.0).abs() < 1e-15);
    }
}
